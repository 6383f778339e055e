//! OpenAI's response bodies and stream chunks, as types serialized once: the whole
//! `chat.completion` / `text_completion` ([`CompletionBody`]), each `chat.completion.chunk` or
//! streamed `text_completion` ([`ChunkBody`]), `usage`, and llama-server's extensions to them
//! (`timings`, `prompt_progress`, `__verbose`). Built from what a worker reports; nothing here
//! reads a request. The [`Envelope`] holds what every body of one request shares.

use llamapool_common::{ChatDelta, Finish, FinishReason, Usage};
use serde::Serialize;

use super::llama_server::NativeFinal;
use super::logprobs::LogprobsBody;
use super::parsed::{ParsedMessage, ToolCallDeltaReply, ToolCallReply};
use super::request::Endpoint;
use super::timings::{ProgressBody, TimingsBody};
use super::FINGERPRINT;

/// What every body of one request starts with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Head<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
}

/// A whole non-streamed response: `chat.completion` or `text_completion`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionBody<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub choices: Vec<Choice<'a>>,
    pub usage: UsageBody,
    /// The first choice's (llama-server's extension).
    pub timings: TimingsBody,
    /// llama-server's `__verbose` (a request with `"verbose": true`): the native result of
    /// the first choice.
    #[serde(rename = "__verbose", skip_serializing_if = "Option::is_none")]
    pub verbose: Option<NativeFinal<'a>>,
}

/// One streamed chunk: `chat.completion.chunk`, or a streamed `text_completion`. It holds one
/// choice, or none (the usage chunk).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkBody<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub choices: Vec<Choice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_progress: Option<ProgressBody>,
}

/// One choice of a response or a chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice<'a> {
    pub index: usize,
    /// `message` (chat response), `delta` (chat chunk) or `text` (completions).
    #[serde(flatten)]
    pub body: ChoiceBody<'a>,
    /// `null` unless log probabilities were asked for.
    pub logprobs: Option<LogprobsBody>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<&'static str>,
}

/// What a [`Choice`] holds, by endpoint and kind of body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChoiceBody<'a> {
    Message(Message<'a>),
    Delta(Delta<'a>),
    Text(&'a str),
}

/// A chat response's `message`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    /// The answer's text; `""` (never `null`) when it only made tool calls, as llama-server.
    pub content: &'a str,
    /// The model's reasoning, when the chat format separates it (`reasoning_format`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallReply<'a>>>,
}

impl<'a> Message<'a> {
    /// The assistant's message: the parsed answer when the worker parsed it, else `text`.
    fn of(text: &'a str, parsed: Option<&'a ParsedMessage>) -> Self {
        let Some(parsed) = parsed else {
            return Self {
                role: "assistant",
                content: text,
                reasoning_content: None,
                tool_calls: None,
            };
        };
        Self {
            role: "assistant",
            content: &parsed.content,
            reasoning_content: (!parsed.reasoning.is_empty()).then_some(parsed.reasoning.as_str()),
            tool_calls: parsed
                .made_calls()
                .then(|| parsed.tool_calls.iter().map(ToolCallReply::from).collect()),
        }
    }
}

/// A chat chunk's `delta`: the role in the first chunk (with `content: null`, as llama-server
/// sends it; OpenAI sends `""` and clients take either), text in the next ones, nothing in
/// the last.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Absent (`None`), `null` (`Some(None)`) or the text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDeltaReply<'a>>>,
}

/// OpenAI's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<&Usage> for UsageBody {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens(),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// One finished choice of a non-streamed response, in index order.
#[derive(Debug, Clone)]
pub struct FinishedChoice<'a> {
    pub text: &'a str,
    /// The parsed answer of a chat request whose output the worker parsed.
    pub parsed: Option<&'a ParsedMessage>,
    pub finish: &'a Finish,
    pub logprobs: Option<LogprobsBody>,
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl Envelope {
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completions => "cmpl-",
        };
        let random: u64 = rand::random();
        Self {
            id: format!("{prefix}{random:016x}"),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
            endpoint,
        }
    }

    /// The head of a response (or, with `chunk`, of a chunk).
    fn head(&self, chunk: bool) -> Head<'_> {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        };
        Head {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            system_fingerprint: FINGERPRINT,
        }
    }

    /// The whole non-streamed response for `choices` (in index order; `per_prompt` of them
    /// for each prompt): `usage` sums them ([`sum_usage`]), `timings` are the first choice's.
    pub fn response<'a>(
        &'a self,
        choices: Vec<FinishedChoice<'a>>,
        per_prompt: usize,
    ) -> CompletionBody<'a> {
        let first = choices.first().expect("at least one choice").finish;
        let usage = sum_usage(choices.iter().map(|c| &c.finish.usage), per_prompt);
        CompletionBody {
            head: self.head(false),
            usage: UsageBody::from(&usage),
            timings: TimingsBody::finished(&first.usage, &first.timings),
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(index, choice)| Choice {
                    index,
                    body: match self.endpoint {
                        Endpoint::Chat => {
                            ChoiceBody::Message(Message::of(choice.text, choice.parsed))
                        }
                        Endpoint::Completions => ChoiceBody::Text(choice.text),
                    },
                    logprobs: choice.logprobs,
                    finish_reason: Some(finish_reason(
                        choice.finish.reason,
                        choice.parsed.is_some_and(ParsedMessage::made_calls),
                    )),
                })
                .collect(),
            verbose: None,
        }
    }

    /// A chunk holding `choice` (or none).
    fn chunk<'a>(&'a self, choice: Option<Choice<'a>>) -> ChunkBody<'a> {
        ChunkBody {
            head: self.head(true),
            choices: choice.into_iter().collect(),
            usage: None,
            timings: None,
            prompt_progress: None,
        }
    }

    /// A chunk with choice `index` holding `body`, no log probabilities and no finish yet.
    fn choice_chunk<'a>(&'a self, index: usize, body: ChoiceBody<'a>) -> ChunkBody<'a> {
        self.chunk(Some(Choice {
            index,
            body,
            logprobs: None,
            finish_reason: None,
        }))
    }

    /// A chat choice's first chunk: the role, and `content: null`.
    pub fn role_chunk(&self, index: usize) -> ChunkBody<'_> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(None),
            ..Delta::default()
        };
        self.choice_chunk(index, ChoiceBody::Delta(delta))
    }

    /// A prompt-processing progress chunk (`return_progress`), as llama-server sends it before
    /// the first token: chat repeats the role delta, a completion has empty text; with
    /// `timings_per_token`, the `timings` so far.
    pub fn progress_chunk(
        &self,
        index: usize,
        progress: ProgressBody,
        timings: Option<TimingsBody>,
    ) -> ChunkBody<'_> {
        let mut chunk = match self.endpoint {
            Endpoint::Chat => self.role_chunk(index),
            Endpoint::Completions => self.choice_chunk(index, ChoiceBody::Text("")),
        };
        chunk.prompt_progress = Some(progress);
        chunk.timings = timings;
        chunk
    }

    /// A chunk of text, with the log probabilities of its tokens and (`timings_per_token`)
    /// the `timings` so far.
    pub fn text_chunk<'a>(
        &'a self,
        index: usize,
        text: &'a str,
        logprobs: Option<LogprobsBody>,
        timings: Option<TimingsBody>,
    ) -> ChunkBody<'a> {
        let body = match self.endpoint {
            Endpoint::Chat => ChoiceBody::Delta(Delta {
                content: Some(Some(text)),
                ..Delta::default()
            }),
            Endpoint::Completions => ChoiceBody::Text(text),
        };
        let mut chunk = self.choice_chunk(index, body);
        chunk.choices[0].logprobs = logprobs;
        chunk.timings = timings;
        chunk
    }

    /// A chat chunk of one parsed change (llama-server sends one per change): reasoning,
    /// content or a tool call's part, with the log probabilities of its tokens and
    /// (`timings_per_token`) the `timings` so far.
    pub fn delta_chunk<'a>(
        &'a self,
        index: usize,
        delta: &'a ChatDelta,
        logprobs: Option<LogprobsBody>,
        timings: Option<TimingsBody>,
    ) -> ChunkBody<'a> {
        let some = |s: &'a String| (!s.is_empty()).then_some(s.as_str());
        let body = Delta {
            content: some(&delta.content).map(Some),
            reasoning_content: some(&delta.reasoning),
            tool_calls: delta
                .tool_call
                .as_ref()
                .map(|call| vec![ToolCallDeltaReply::from(call)]),
            ..Delta::default()
        };
        let mut chunk = self.choice_chunk(index, ChoiceBody::Delta(body));
        chunk.choices[0].logprobs = logprobs;
        chunk.timings = timings;
        chunk
    }

    /// A choice's last chunk: empty delta (or text), the finish reason (`tool_calls` for an
    /// answer that `made_calls`), the log probabilities still held back with text that never
    /// came, and the choice's timings.
    pub fn finish_chunk(
        &self,
        index: usize,
        finish: &Finish,
        made_calls: bool,
        logprobs: Option<LogprobsBody>,
    ) -> ChunkBody<'_> {
        let body = match self.endpoint {
            Endpoint::Chat => ChoiceBody::Delta(Delta::default()),
            Endpoint::Completions => ChoiceBody::Text(""),
        };
        let mut chunk = self.chunk(Some(Choice {
            index,
            body,
            logprobs,
            finish_reason: Some(finish_reason(finish.reason, made_calls)),
        }));
        chunk.timings = Some(TimingsBody::finished(&finish.usage, &finish.timings));
        chunk
    }

    /// The last chunk before `[DONE]` with `stream_options.include_usage`: no choices, the
    /// usage, and (as llama-server sends it) the whole request's timings.
    pub fn usage_chunk(&self, total: &Finish) -> ChunkBody<'_> {
        let mut chunk = self.chunk(None);
        chunk.usage = Some(UsageBody::from(&total.usage));
        chunk.timings = Some(TimingsBody::finished(&total.usage, &total.timings));
        chunk
    }
}

/// The usage of several choices of one request, prompt-major with `per_prompt` (`n`) choices
/// for each prompt: each prompt is counted once (its first choice's count), and every
/// choice's completion tokens are summed, as OpenAI counts `n` and batches of prompts.
pub fn sum_usage<'a>(usages: impl IntoIterator<Item = &'a Usage>, per_prompt: usize) -> Usage {
    let mut total = Usage::default();
    for (index, u) in usages.into_iter().enumerate() {
        if index % per_prompt.max(1) == 0 {
            total.prompt_tokens += u.prompt_tokens;
            total.cached_tokens += u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
    }
    total
}

/// OpenAI's finish reason; a stopped answer that made tool calls ends with `tool_calls`.
fn finish_reason(reason: FinishReason, made_calls: bool) -> &'static str {
    match reason {
        FinishReason::Stop if made_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

#[cfg(test)]
mod tests {
    use llamapool_common::{PromptProgress, Timings};
    use serde_json::{json, Value};

    use super::*;

    fn json_of(value: impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

    fn finish(reason: FinishReason, completion_tokens: u32) -> Finish {
        Finish {
            reason,
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens,
                cached_tokens: 3,
            },
            timings: Timings::default(),
            stop_word: None,
        }
    }

    #[test]
    fn chunks_share_the_envelope() {
        let env = Envelope::new(Endpoint::Chat, "m");
        let finish = finish(FinishReason::Stop, 2);
        for chunk in [
            env.role_chunk(0),
            env.text_chunk(0, "a", None, None),
            env.finish_chunk(0, &finish, false, None),
            env.usage_chunk(&finish),
        ] {
            let chunk = json_of(chunk);
            assert_eq!(chunk["id"], env.id);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "m");
        }
        let last = json_of(env.finish_chunk(0, &finish, false, None));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        let usage = json_of(env.usage_chunk(&finish));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 9);
        assert_eq!(usage["timings"]["predicted_n"], 2);
        let role = json_of(env.role_chunk(0));
        assert_eq!(
            role["choices"][0],
            json!({"index": 0, "delta": {"role": "assistant", "content": null},
                   "logprobs": null, "finish_reason": null})
        );
        assert!(role.get("usage").is_none() && role.get("timings").is_none());
        assert!(env.id.starts_with("chatcmpl-"));
    }

    #[test]
    fn several_choices_have_their_index_and_usage_counts_the_prompt_once() {
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let env = Envelope::new(endpoint, "m");
            let (stop, length) = (
                finish(FinishReason::Stop, 2),
                finish(FinishReason::Length, 5),
            );
            let choices = vec![
                FinishedChoice {
                    text: "a",
                    parsed: None,
                    finish: &stop,
                    logprobs: None,
                },
                FinishedChoice {
                    text: "b",
                    parsed: None,
                    finish: &length,
                    logprobs: None,
                },
            ];
            let body = json_of(env.response(choices, 2));
            let choices = body["choices"].as_array().unwrap();
            assert_eq!(choices.len(), 2);
            for (i, c) in choices.iter().enumerate() {
                assert_eq!(c["index"], i);
            }
            assert_eq!(choices[0]["finish_reason"], "stop");
            assert_eq!(choices[1]["finish_reason"], "length");
            assert_eq!(
                body["usage"],
                json!({
                    "prompt_tokens": 7,
                    "completion_tokens": 7,
                    "total_tokens": 14,
                    "prompt_tokens_details": {"cached_tokens": 3},
                })
            );
            assert_eq!(body["timings"]["cache_n"], 3);
            assert_eq!(body["timings"]["prompt_n"], 4);
            assert!(body.get("__verbose").is_none());
            let chunk = json_of(env.text_chunk(1, "b", None, None));
            assert_eq!(chunk["choices"][0]["index"], 1);
        }
    }

    #[test]
    fn progress_chunks_have_llama_server_shapes() {
        let progress = ProgressBody::from(&PromptProgress {
            total: 10,
            cache: 2,
            processed: 6,
            time_ms: 4.5,
        });
        let chat = json_of(Envelope::new(Endpoint::Chat, "m").progress_chunk(0, progress, None));
        assert_eq!(
            chat["choices"][0]["delta"],
            json!({"role": "assistant", "content": null})
        );
        assert_eq!(
            chat["prompt_progress"],
            json!({"total": 10, "cache": 2, "processed": 6, "time_ms": 4.5})
        );
        assert!(chat.get("timings").is_none());
        let env = Envelope::new(Endpoint::Completions, "m");
        let text = json_of(env.progress_chunk(0, progress, None));
        assert_eq!(text["choices"][0]["text"], "");
        assert_eq!(text["prompt_progress"]["processed"], 6);
    }
}
