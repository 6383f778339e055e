//! Request bodies as typed structs, and their validation into what the pool runs.
//!
//! Bodies are deserialized with `serde` through `serde_path_to_error`, so a field of the wrong
//! type is reported with its path (`messages[0].content`, `max_tokens`). Unknown fields are
//! ignored, as OpenAI's and llama-server's servers do; fields this server cannot honour yet
//! (tools, structured output, log probabilities, several choices) are named in a 400 instead
//! of being silently dropped. Nothing past [`parse_generation`] sees JSON.

use std::collections::BTreeMap;

use llamapool_common::params::MAX_LOGIT_BIAS;
use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::{ChatMessage, ParamError, RequestId, SamplingParams, StoppingParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// Which endpoint a generation request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Why a request body was refused. Mapped to HTTP in `crate::error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The body is not JSON, or not an object.
    #[error("{0}")]
    Body(String),
    /// A field is missing, of the wrong type or out of range.
    #[error("{message}")]
    Field { param: String, message: String },
    /// A field this server does not honour yet was given a value that needs it.
    #[error("{param} is not supported by this server{detail}")]
    Unsupported { param: &'static str, detail: String },
    #[error("the model {requested:?} does not exist; this server serves {served:?}")]
    UnknownModel { requested: String, served: String },
}

impl InvalidRequest {
    fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<ParamError> for InvalidRequest {
    fn from(e: ParamError) -> Self {
        Self::field(e.param, e.message)
    }
}

/// Deserializes a JSON body into `T`, naming the failing field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, InvalidRequest> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                InvalidRequest::field(path.clone(), format!("invalid value for {path}: {inner}"))
            }
            serde_json::error::Category::Data => {
                InvalidRequest::Body(format!("the body must be a JSON object: {inner}"))
            }
            _ => InvalidRequest::Body(format!("the body is not valid JSON: {inner}")),
        }
    })
}

/// The body of `/v1/chat/completions` and `/v1/completions`: the fields of either, all
/// optional here; which prompt field is required depends on the endpoint.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationBody {
    pub model: Option<String>,
    pub messages: Option<Vec<MessageBody>>,
    pub prompt: Option<PromptBody>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
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
    pub logit_bias: Option<BTreeMap<String, BiasBody>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub unsupported: UnsupportedFields,
}

/// Fields of OpenAI's or llama-server's API that this server cannot honour yet. Their neutral
/// values (`null`, `false`, `0`, `[]`, `"none"`, `{"type": "text"}`) are accepted.
#[derive(Debug, Default, Deserialize)]
pub struct UnsupportedFields {
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<Value>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    best_of: Option<Value>,
    echo: Option<Value>,
    suffix: Option<Value>,
    grammar: Option<Value>,
    json_schema: Option<Value>,
    n_probs: Option<Value>,
}

impl UnsupportedFields {
    /// The first field given a value that would need a feature this server lacks.
    fn check(&self) -> Result<(), InvalidRequest> {
        let fields: [(&'static str, &Option<Value>, NeutralTest); 13] = [
            ("tools", &self.tools, is_neutral),
            ("tool_choice", &self.tool_choice, |v| {
                is_neutral(v) || v == "none" || v == "auto"
            }),
            ("functions", &self.functions, is_neutral),
            ("function_call", &self.function_call, |v| {
                is_neutral(v) || v == "none" || v == "auto"
            }),
            ("response_format", &self.response_format, |v| {
                is_neutral(v) || v.get("type").is_some_and(|t| t == "text")
            }),
            ("logprobs", &self.logprobs, is_neutral),
            ("top_logprobs", &self.top_logprobs, is_neutral),
            ("best_of", &self.best_of, |v| {
                is_neutral(v) || v.as_f64() == Some(1.0)
            }),
            ("echo", &self.echo, is_neutral),
            ("suffix", &self.suffix, is_neutral),
            ("grammar", &self.grammar, is_neutral),
            ("json_schema", &self.json_schema, is_neutral),
            ("n_probs", &self.n_probs, is_neutral),
        ];
        for (param, value, neutral) in fields {
            if let Some(v) = value {
                if !neutral(v) {
                    return Err(InvalidRequest::Unsupported {
                        param,
                        detail: format!(" (got {v})"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Whether an unsupported field's value asks for nothing.
type NeutralTest = fn(&Value) -> bool;

fn is_neutral(value: &Value) -> bool {
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
    expecting = "a string, an array of one string, or an array of token ids"
)]
pub enum PromptBody {
    Text(String),
    List(Vec<Value>),
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

/// A generation request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub include_usage: bool,
    pub generate: GenerateRequest,
}

/// Parses and validates a generation body for `endpoint`. `alias` is the only model served.
pub fn parse_generation(
    body: &[u8],
    endpoint: Endpoint,
    alias: &str,
    id: RequestId,
) -> Result<ValidRequest, InvalidRequest> {
    let body: GenerationBody = parse_json(body)?;
    body.into_valid(endpoint, alias, id)
}

impl GenerationBody {
    pub fn into_valid(
        self,
        endpoint: Endpoint,
        alias: &str,
        id: RequestId,
    ) -> Result<ValidRequest, InvalidRequest> {
        self.check_model(alias)?;
        self.unsupported.check()?;
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(InvalidRequest::field(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
        let sampling = self.sampling()?;
        let prompt = match endpoint {
            Endpoint::Chat => Prompt::Chat(chat_messages(self.messages)?),
            Endpoint::Completions => completion_prompt(self.prompt)?,
        };
        let stopping = StoppingParams {
            max_tokens: max_tokens(self.max_completion_tokens, self.max_tokens)?,
            stop: match self.stop {
                None => Vec::new(),
                Some(StopBody::One(s)) => vec![s],
                Some(StopBody::Many(list)) => list,
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        stopping.validate()?;
        Ok(ValidRequest {
            endpoint,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            generate: GenerateRequest {
                id,
                // The handler sets it from the request's `x-request-id`.
                request_id: String::new(),
                prompt,
                sampling,
                stopping,
                resumed: Vec::new(),
            },
        })
    }

    fn check_model(&self, alias: &str) -> Result<(), InvalidRequest> {
        match &self.model {
            Some(name) if name != alias => Err(InvalidRequest::UnknownModel {
                requested: name.clone(),
                served: alias.to_string(),
            }),
            _ => Ok(()),
        }
    }

    fn sampling(&self) -> Result<SamplingParams, InvalidRequest> {
        let defaults = SamplingParams::default();
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(k) => i32::try_from(k)
                .map_err(|_| InvalidRequest::field("top_k", "top_k is out of range"))?,
        };
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            seed: self.seed.map(|s| (s as u64 & 0xffff_ffff) as u32),
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
        };
        sampling.validate()?;
        Ok(sampling)
    }
}

/// `max_completion_tokens` wins over the older `max_tokens`; the error names the one given.
fn max_tokens(
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
) -> Result<Option<u32>, InvalidRequest> {
    let (name, value) = match (max_completion_tokens, max_tokens) {
        (Some(v), _) => ("max_completion_tokens", v),
        (None, Some(v)) => ("max_tokens", v),
        (None, None) => return Ok(None),
    };
    if value < 1 {
        return Err(InvalidRequest::field(
            name,
            format!("{name} must be at least 1, got {value}"),
        ));
    }
    u32::try_from(value)
        .map(Some)
        .map_err(|_| InvalidRequest::field(name, format!("{name} is too large: {value}")))
}

fn logit_bias(
    biases: Option<&BTreeMap<String, BiasBody>>,
) -> Result<Vec<(i32, f32)>, InvalidRequest> {
    let Some(biases) = biases else {
        return Ok(Vec::new());
    };
    biases
        .iter()
        .map(|(token, bias)| {
            let token = token.parse::<i32>().map_err(|_| {
                InvalidRequest::field(
                    "logit_bias",
                    format!("logit_bias key {token:?} is not a token id"),
                )
            })?;
            let bias = match *bias {
                BiasBody::Value(v) if v.is_finite() => v,
                // Beyond f32's range the number became an infinity: -1e39 is not a ban.
                BiasBody::Value(_) => {
                    return Err(InvalidRequest::field(
                        "logit_bias",
                        format!(
                            "logit_bias for token {token} must be a number between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, or false to ban it"
                        ),
                    ))
                }
                BiasBody::Ban(false) => f32::NEG_INFINITY,
                BiasBody::Ban(true) => {
                    return Err(InvalidRequest::field(
                        "logit_bias",
                        format!("logit_bias for {token} must be a number or false"),
                    ))
                }
            };
            Ok((token, bias))
        })
        .collect()
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

fn chat_messages(messages: Option<Vec<MessageBody>>) -> Result<Vec<ChatMessage>, InvalidRequest> {
    let messages =
        messages.ok_or_else(|| InvalidRequest::field("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(InvalidRequest::field(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect()
}

fn chat_message(index: usize, message: MessageBody) -> Result<ChatMessage, InvalidRequest> {
    let param = format!("messages[{index}]");
    if !ROLES.contains(&message.role.as_str()) {
        return Err(InvalidRequest::field(
            &param,
            format!("{param}.role {:?} is not a known role", message.role),
        ));
    }
    let content = match message.content {
        None => String::new(),
        Some(ContentBody::Text(text)) => text,
        Some(ContentBody::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    _ => {
                        return Err(InvalidRequest::field(
                            format!("{param}.content"),
                            format!("{param}.content: only text parts are supported"),
                        ))
                    }
                }
            }
            text
        }
    };
    // OpenAI's newer name for the system role; chat templates know only `system`.
    let role = match message.role.as_str() {
        "developer" => "system".to_string(),
        _ => message.role,
    };
    Ok(ChatMessage { role, content })
}

fn completion_prompt(prompt: Option<PromptBody>) -> Result<Prompt, InvalidRequest> {
    let bad = || {
        InvalidRequest::field(
            "prompt",
            "prompt must be a string, an array of one string, or an array of token ids",
        )
    };
    let items = match prompt {
        None => return Err(InvalidRequest::field("prompt", "prompt is required")),
        Some(PromptBody::Text(text)) => return Ok(Prompt::Text(text)),
        Some(PromptBody::List(items)) => items,
    };
    match items.as_slice() {
        [] => Err(InvalidRequest::field("prompt", "prompt must not be empty")),
        [Value::String(text)] => Ok(Prompt::Text(text.clone())),
        _ if items.iter().all(Value::is_number) => items
            .iter()
            .map(|t| {
                t.as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Prompt::Tokens),
        _ if items.iter().all(Value::is_string) => Err(InvalidRequest::field(
            "prompt",
            "only one prompt per request is supported",
        )),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests;
