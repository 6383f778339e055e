//! What a request gets back: acceptance, incremental outputs, the finish with usage and
//! timings, or a request-scoped error. These cross the worker's IPC boundary unchanged.

use serde::{Deserialize, Serialize};

use crate::{RequestId, Token};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the sequence's context limit.
    Length,
    /// The requester cancelled it.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens found in the worker's prompt cache and not evaluated again (part of
    /// `prompt_tokens`).
    #[serde(default)]
    pub cached_tokens: u32,
}

impl Usage {
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Where a request's time went, in milliseconds (llama-server's `timings`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Timings {
    /// Submitted until admitted into a sequence slot.
    pub queue_ms: f64,
    /// Admitted until the first token was sampled (prefill).
    pub prompt_ms: f64,
    /// First token until the finish (decode).
    pub predicted_ms: f64,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// The stop string that ended the generation (`reason` is then `Stop`); `None` for an
    /// end-of-generation token and every other finish. llama-server's `stopping_word`.
    pub stop_word: Option<String>,
}

/// One step's worth of output for one request. `text` holds only complete UTF-8 and never
/// text that could still turn into a stop string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqOutput {
    pub id: RequestId,
    pub tokens: Vec<Token>,
    pub text: String,
    pub finish: Option<Finish>,
    /// One entry per token of `tokens` whose text is part of the output, when the request
    /// asked for log probabilities (`SamplingParams::logprobs`); empty otherwise. An
    /// end-of-generation token has none.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on a prompt-processing progress report (a request with
    /// `GenerateRequest::report_progress`): such an output has no tokens, text or finish.
    pub progress: Option<PromptProgress>,
    /// Set on every output of a chat request whose output the worker parses (llama.cpp's chat
    /// parser): then `chat` says what the text meant, and `text` is still the raw text.
    pub parsed: bool,
    /// What this output's text changed in the parsed message: content, reasoning and tool
    /// calls, in llama-server's diff order. Empty when nothing changed yet (a tool call's
    /// opener is held back until it is sure).
    pub chat: Vec<ChatDelta>,
}

/// One change of a parsed chat message (llama.cpp's `common_chat_msg_diff`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_call: Option<ToolCallDelta>,
}

/// A tool call's change: the call `index` (0-based, in the message), its id and name (sent
/// when the call first appears) and more of its JSON arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// How far a request's prompt processing got (llama-server's `prompt_progress`): sent when the
/// request gets its sequence and after each step that evaluated part of its prompt, so a
/// client of a long prompt sees it advance before the first token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PromptProgress {
    /// Prompt tokens in all.
    pub total: u32,
    /// Prompt tokens found in the prompt cache (never evaluated for this request).
    pub cache: u32,
    /// Prompt tokens in the KV cache so far: `cache` plus those evaluated; `total` when done.
    pub processed: u32,
    /// Milliseconds since prompt processing started (the request got its sequence).
    pub time_ms: f64,
}

/// A token with its text bytes (possibly part of a UTF-8 character) and its natural-log
/// probability over the full vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub token: Token,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log probability and the most likely tokens at its position (most
/// likely first, as many as the request asked for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub sampled: Candidate,
    pub top: Vec<Candidate>,
}

impl SeqOutput {
    /// A last output that only carries `finish` (no new tokens or text).
    pub fn finished(id: RequestId, finish: Finish) -> Self {
        Self {
            id,
            tokens: Vec::new(),
            text: String::new(),
            finish: Some(finish),
            logprobs: Vec::new(),
            progress: None,
            parsed: false,
            chat: Vec::new(),
        }
    }

    /// A progress report: no tokens, text or finish.
    pub fn progress(id: RequestId, progress: PromptProgress) -> Self {
        Self {
            id,
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
            logprobs: Vec::new(),
            progress: Some(progress),
            parsed: false,
            chat: Vec::new(),
        }
    }

    /// Whether this output only reports prompt progress (it carries no generated token).
    pub fn is_progress(&self) -> bool {
        self.progress.is_some() && self.tokens.is_empty()
    }
}

/// A request-scoped failure: the request ends, nothing else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RequestError {
    #[error("the prompt has {n_prompt_tokens} tokens and {n_requested} more were requested, but a sequence holds at most {n_ctx} tokens")]
    ExceedsContext {
        n_prompt_tokens: u32,
        n_requested: u32,
        n_ctx: u32,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary of {n_vocab} tokens")]
    InvalidToken { token: Token, n_vocab: u32 },
    #[error("the KV cache is full; retry later")]
    KvCacheFull,
    #[error("decoding failed: {0}")]
    DecodeFailed(String),
    #[error("invalid parameter {param}: {message}")]
    InvalidParam { param: String, message: String },
    #[error("the chat template could not be applied: {0}")]
    ChatTemplate(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("a request with id {0} is already running")]
    DuplicateId(RequestId),
}

impl From<crate::params::ParamError> for RequestError {
    fn from(e: crate::params::ParamError) -> Self {
        Self::InvalidParam {
            param: e.param,
            message: e.message,
        }
    }
}

/// What the engine sends a requester: `Accepted`, then `Output`s until one carries a finish.
/// `Rejected` is final too: in place of `Accepted` when admission fails, or after it when the
/// request fails mid-generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerationEvent {
    /// The request passed admission and is queued. The router can commit to a success
    /// response (and keep a queued stream alive) before the first token exists.
    Accepted {
        id: RequestId,
    },
    Output(SeqOutput),
    /// The request ended with a request-scoped error.
    Rejected {
        id: RequestId,
        error: RequestError,
    },
}

impl GenerationEvent {
    pub fn id(&self) -> RequestId {
        match self {
            Self::Accepted { id } | Self::Rejected { id, .. } => *id,
            Self::Output(o) => o.id,
        }
    }

    /// True for the last event a request gets.
    pub fn is_final(&self) -> bool {
        match self {
            Self::Accepted { .. } => false,
            Self::Output(o) => o.finish.is_some(),
            Self::Rejected { .. } => true,
        }
    }
}

/// Facts about the loaded model, for `/v1/models` and admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ModelInfo {
    pub n_ctx_train: u32,
    pub n_params: u64,
    pub n_vocab: u32,
    pub size: u64,
    pub has_chat_template: bool,
    /// The chat template's text (the GGUF's, or `model.chat_template` as given: a built-in
    /// name or template text); empty when there is none. For `/props`.
    pub chat_template: String,
    /// End-of-generation tokens (what `ignore_eos` bans), for `generation_settings`.
    pub eog_tokens: Vec<Token>,
}

/// One chat message in OpenAI's terms, as the router validated it. Empty strings stand for
/// absent fields (the wire format has no optional fields to skip).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// The text; for content given as parts, the parts' texts joined (what the router counts
    /// and hashes).
    pub content: String,
    /// The text parts when content came as a list of parts: templates that want typed content
    /// get them as parts, as llama-server passes them.
    pub text_parts: Vec<String>,
    /// The calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// A tool result's `tool_call_id`.
    pub tool_call_id: String,
    /// A tool result's `name`.
    pub name: String,
    /// An assistant message's `reasoning_content`.
    pub reasoning_content: String,
}

impl ChatMessage {
    /// A plain message: a role and its text.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// One tool call of an assistant message (OpenAI's `{id, type: "function", function: {name,
/// arguments}}`); `arguments` is JSON text, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_finish_or_a_rejection_is_final() {
        let id = RequestId(5);
        let output = |finish| {
            GenerationEvent::Output(SeqOutput {
                id,
                tokens: vec![1],
                text: "a".into(),
                finish,
                logprobs: Vec::new(),
                progress: None,
                parsed: false,
                chat: Vec::new(),
            })
        };
        let finish = Finish {
            reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
            stop_word: None,
        };
        let rejected = GenerationEvent::Rejected {
            id,
            error: RequestError::EmptyPrompt,
        };
        let events = [
            (GenerationEvent::Accepted { id }, false),
            (output(None), false),
            (output(Some(finish)), true),
            (rejected, true),
        ];
        for (event, is_final) in events {
            assert_eq!(event.id(), id);
            assert_eq!(event.is_final(), is_final, "{event:?}");
        }
    }
}
