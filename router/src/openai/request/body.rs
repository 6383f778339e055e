//! The request bodies as typed structs, exactly as clients send them: every field optional,
//! unknown fields ignored, and the fields this server cannot honour collected in
//! [`UnsupportedFields`]. Nothing here checks a value; the sibling modules turn a body into
//! what the pool runs.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The body of `/v1/chat/completions` and `/v1/completions`: the fields of either, all
/// optional here; which prompt field is required depends on the endpoint.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationBody {
    pub model: Option<String>,
    pub messages: Option<Vec<MessageBody>>,
    pub prompt: Option<PromptBody>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    /// llama-server's name for the token limit; -1 (any negative) is no limit.
    pub n_predict: Option<i64>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Any 64-bit seed is accepted; llama.cpp takes 32 bits.
    pub seed: Option<i64>,
    pub stop: Option<StopBody>,
    pub logit_bias: Option<LogitBiasBody>,
    pub ignore_eos: Option<bool>,
    /// llama-server's prompt cache switch (default on).
    pub cache_prompt: Option<bool>,
    /// Choices per request: 1 to [`MAX_CHOICES`].
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// llama-server's native endpoints: also return the generated token ids.
    pub return_tokens: Option<bool>,
    /// Log probabilities: `true` (chat, with `top_logprobs` alternatives) or a number of
    /// alternatives (legacy completions), 0..=20.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    /// llama-server's name for the number of alternatives (native endpoints), 0..=20.
    pub n_probs: Option<i64>,
    /// llama-server's native endpoints: report probabilities (`prob`, `top_probs`) instead of
    /// log probabilities.
    pub post_sampling_probs: Option<bool>,
    /// llama-server: a stream reports prompt processing in `prompt_progress` chunks.
    pub return_progress: Option<bool>,
    /// llama-server: every token chunk of a stream carries the `timings` so far.
    pub timings_per_token: Option<bool>,
    /// llama-server: a non-streamed OpenAI-shaped result also carries `__verbose`, the
    /// native result of its first choice.
    pub verbose: Option<bool>,
    /// Chat: how the rendered conversation ends (see [`chat_prompt`](super::chat_prompt)).
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// Structured output (see [`GenerationBody::grammar`]): OpenAI's `response_format`,
    /// llama-server's `json_schema` and `grammar`.
    pub response_format: Option<Value>,
    pub json_schema: Option<Value>,
    pub grammar: Option<Value>,
    /// Chat: OpenAI's tools (see [`super::tools`]).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Chat: variables for the chat template (`enable_thinking`, …), an object.
    pub chat_template_kwargs: Option<Value>,
    /// Chat: where reasoning goes (`none`, `auto`, `deepseek`, `deepseek-legacy`).
    pub reasoning_format: Option<String>,
    #[serde(flatten)]
    pub unsupported: UnsupportedFields,
}

/// Fields of OpenAI's or llama-server's API that this server cannot honour yet. Their neutral
/// values (`null`, `false`, `0`, `[]`, `"none"`, `{"type": "text"}`) are accepted.
#[derive(Debug, Default, Deserialize)]
pub struct UnsupportedFields {
    pub(super) functions: Option<Value>,
    pub(super) function_call: Option<Value>,
    pub(super) best_of: Option<Value>,
    pub(super) echo: Option<Value>,
    pub(super) suffix: Option<Value>,
}

/// Whether a field's value asks for nothing: `null`, `false`, `0`, `""`, `[]` or `{}`.
pub(super) fn is_neutral(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

#[derive(Debug, Deserialize)]
pub struct MessageBody {
    pub role: String,
    pub content: Option<ContentBody>,
    /// An assistant message's calls.
    pub tool_calls: Option<Vec<ToolCallBody>>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    pub reasoning_content: Option<String>,
}

impl MessageBody {
    /// A message of plain text.
    pub fn text(role: &str, text: String) -> Self {
        Self {
            role: role.into(),
            content: Some(ContentBody::Text(text)),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            reasoning_content: None,
        }
    }

    /// A tool's result for the call `call_id`.
    pub fn tool_result(call_id: String, text: String) -> Self {
        Self {
            tool_call_id: Some(call_id),
            ..Self::text("tool", text)
        }
    }
}

/// One call of an assistant message: `{id, type: "function", function: {name, arguments}}`;
/// `arguments` is JSON text (or, as some clients send it, the object itself).
#[derive(Debug, Deserialize)]
pub struct ToolCallBody {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallBody,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallBody {
    pub name: String,
    pub arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of text parts")]
pub enum ContentBody {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of one string, an array of token ids, or an object with prompt_string"
)]
pub enum PromptBody {
    Text(String),
    List(Vec<Value>),
    /// llama-server's multimodal prompt form, `{"prompt_string", "multimodal_data"}`.
    Object(PromptObject),
}

/// llama-server's prompt object: text, and media for a multimodal model (this server serves
/// text models only, so any media is refused).
#[derive(Debug, Deserialize)]
pub struct PromptObject {
    pub(super) prompt_string: Option<String>,
    pub(super) multimodal_data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum StopBody {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged, expecting = "a number, or false to ban the token")]
pub enum BiasBody {
    Value(f32),
    Ban(bool),
}

/// `logit_bias`: OpenAI's object of token id → bias, or llama-server's array of
/// `[token id or text, bias]` pairs; in both, llama-server also takes a text (every token of it
/// gets the bias) and `false` for a ban.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LogitBiasBody {
    Map(BTreeMap<String, BiasBody>),
    Pairs(Vec<(TokenOrText, BiasBody)>),
}

/// The first element of a `logit_bias` pair.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenOrText {
    Token(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `/tokenize`.
#[derive(Debug, Deserialize)]
pub struct TokenizeBody {
    pub content: Option<String>,
    pub add_special: Option<bool>,
    pub with_pieces: Option<bool>,
}

/// `/detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeBody {
    pub tokens: Option<Vec<i32>>,
}

/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 16;
