//! Request bodies as typed structs, and their validation into what the pool runs.
//!
//! Bodies are deserialized with `serde` through `serde_path_to_error`, so a field of the wrong
//! type is reported with its path (`messages[0].content`, `max_tokens`). Unknown fields are
//! ignored, as OpenAI's and llama-server's servers do; fields this server cannot honour yet
//! (tools) are named in a 400 instead
//! of being silently dropped. Nothing past [`parse_generation`] sees JSON.

use std::collections::BTreeMap;

use llamapool_common::params::MAX_LOGIT_BIAS;
use llamapool_common::protocol::{ChatEnding, ChatPrompt, GenerateRequest, Prompt};
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::{ChatMessage, ParamError, RequestId, SamplingParams, StoppingParams, Token};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::grammar;

/// The model a server answers for, and what a request gets for the fields it leaves out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedModel {
    /// The name responses report: the first of `names`.
    pub alias: String,
    /// Every name the model is served under (`model.alias` split at commas, sorted).
    pub names: Vec<String>,
    /// `model.tags`, listed by `/v1/models`.
    pub tags: Vec<String>,
    /// `model.strict_name`: a request's `model` must equal the alias (404 otherwise). When
    /// false, any name is accepted, as llama-server does.
    pub strict_name: bool,
    /// `[generation]`: server-wide defaults.
    pub defaults: GenerationDefaults,
}

impl ServedModel {
    /// Serves `alias` with the built-in defaults and any model name accepted.
    pub fn new(alias: impl Into<String>) -> Self {
        let alias = alias.into();
        Self {
            names: vec![alias.clone()],
            alias,
            ..Self::default()
        }
    }

    /// Whether `name` is one of the served names.
    pub fn serves(&self, name: &str) -> bool {
        name == self.alias || self.names.iter().any(|n| n == name)
    }
}

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
    /// Chat: how the rendered conversation ends (see [`chat_prompt`]).
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// Structured output (see [`GenerationBody::grammar`]): OpenAI's `response_format`,
    /// llama-server's `json_schema` and `grammar`.
    pub response_format: Option<Value>,
    pub json_schema: Option<Value>,
    pub grammar: Option<Value>,
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
    best_of: Option<Value>,
    echo: Option<Value>,
    suffix: Option<Value>,
}

impl UnsupportedFields {
    /// The first field given a value that would need a feature this server lacks.
    fn check(&self) -> Result<(), InvalidRequest> {
        let fields: [(&'static str, &Option<Value>, NeutralTest); 6] = [
            ("tools", &self.tools, is_neutral),
            ("tool_choice", &self.tool_choice, |v| {
                is_neutral(v) || v == "none" || v == "auto"
            }),
            ("functions", &self.functions, is_neutral),
            ("function_call", &self.function_call, |v| {
                is_neutral(v) || v == "none" || v == "auto"
            }),
            ("echo", &self.echo, is_neutral),
            ("suffix", &self.suffix, is_neutral),
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

/// `best_of` asks for nothing beyond `n` choices only when it is neutral or equal to `n`
/// (OpenAI's default is `n`); generating more candidates than are returned is not supported.
fn check_best_of(best_of: Option<&Value>, n: u32) -> Result<(), InvalidRequest> {
    match best_of {
        Some(v) if !is_neutral(v) && v.as_f64() != Some(f64::from(n)) => {
            Err(InvalidRequest::Unsupported {
                param: "best_of",
                detail: format!(" unless it equals n (got {v}, n = {n})"),
            })
        }
        _ => Ok(()),
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
    prompt_string: Option<String>,
    multimodal_data: Option<Value>,
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

/// A generation request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    /// Choices asked for (`n`), 1 to [`MAX_CHOICES`]; `generate` is the first one's request.
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub reports: StreamReports,
    /// `verbose` on a non-streamed request: add `__verbose`.
    pub verbose: bool,
    pub generate: GenerateRequest,
    /// OpenAI's batch of prompts (`/v1/completions`): the prompts after `generate`'s, each
    /// with `n` choices of its own.
    pub more_prompts: Vec<Prompt>,
}

impl ValidRequest {
    /// Choices in the response: `n` for each prompt, prompt-major. Saturates rather than
    /// wraps, so that a huge batch cannot pass the [`MAX_CHOICES`] check as a small number.
    pub fn total_choices(&self) -> u32 {
        let prompts = u32::try_from(self.more_prompts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        self.n.saturating_mul(prompts)
    }
}

/// What a stream reports besides the text (llama-server's `return_progress` and
/// `timings_per_token`); both off for a non-streamed request, whose result has its timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamReports {
    /// `prompt_progress` chunks before the first token.
    pub progress: bool,
    /// `timings` on every token chunk.
    pub timings: bool,
}

impl StreamReports {
    fn new(stream: bool, return_progress: Option<bool>, timings_per_token: Option<bool>) -> Self {
        Self {
            progress: stream && return_progress.unwrap_or(false),
            timings: stream && timings_per_token.unwrap_or(false),
        }
    }

    /// Whether the worker must send progress reports: per-token timings take their prompt
    /// side from them.
    pub fn needs_progress(self) -> bool {
        self.progress || self.timings
    }
}

/// Parses and validates a generation body for `endpoint`, with `served`'s model-name rule
/// and defaults.
pub fn parse_generation(
    body: &[u8],
    endpoint: Endpoint,
    served: &ServedModel,
    id: RequestId,
) -> Result<ValidRequest, InvalidRequest> {
    let body: GenerationBody = parse_json(body)?;
    body.into_valid(endpoint, served, id)
}

impl GenerationBody {
    pub fn into_valid(
        mut self,
        endpoint: Endpoint,
        served: &ServedModel,
        id: RequestId,
    ) -> Result<ValidRequest, InvalidRequest> {
        self.check_common(served)?;
        let sampling = self.sampling(&served.defaults)?;
        let prompt = match endpoint {
            Endpoint::Chat => Prompt::Chat(chat_prompt(
                chat_messages(self.messages.take())?,
                self.add_generation_prompt,
                self.continue_final_message,
            )?),
            Endpoint::Completions => {
                let mut prompts = completion_prompts(self.prompt.take())?;
                let first = prompts.remove(0);
                let mut valid = self.finish_valid(endpoint, served, id, first, sampling)?;
                valid.more_prompts = prompts;
                if valid.total_choices() > MAX_CHOICES {
                    return Err(InvalidRequest::field(
                        "prompt",
                        format!(
                            "{} prompts of n = {} are more than {MAX_CHOICES} choices",
                            valid.more_prompts.len() + 1,
                            valid.n
                        ),
                    ));
                }
                return Ok(valid);
            }
        };
        self.finish_valid(endpoint, served, id, prompt, sampling)
    }

    /// The checks every endpoint makes first: the model name, unsupported fields, `n` (and
    /// `best_of` against it).
    pub(crate) fn check_common(&self, served: &ServedModel) -> Result<(), InvalidRequest> {
        self.check_model(served)?;
        self.unsupported.check()?;
        check_best_of(self.unsupported.best_of.as_ref(), self.choices()?)
    }

    /// `n`: 1 when absent or `null`, else 1 to [`MAX_CHOICES`].
    pub(crate) fn choices(&self) -> Result<u32, InvalidRequest> {
        match self.n {
            None => Ok(1),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    InvalidRequest::field(
                        "n",
                        format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
                    )
                }),
        }
    }

    /// The stopping fields checked, and the request assembled around `prompt`.
    pub(crate) fn finish_valid(
        self,
        endpoint: Endpoint,
        served: &ServedModel,
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
    ) -> Result<ValidRequest, InvalidRequest> {
        let n = self.choices()?;
        let stopping = StoppingParams {
            max_tokens: max_tokens(self.max_completion_tokens, self.max_tokens, self.n_predict)?
                .unwrap_or_else(|| served.defaults.max_tokens()),
            stop: match self.stop {
                None => Vec::new(),
                Some(StopBody::One(s)) => vec![s],
                Some(StopBody::Many(list)) => list,
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            cache_prompt: self.cache_prompt.unwrap_or(true),
        };
        stopping.validate()?;
        let stream = self.stream.unwrap_or(false);
        let reports = StreamReports::new(stream, self.return_progress, self.timings_per_token);
        Ok(ValidRequest {
            endpoint,
            n,
            stream,
            reports,
            verbose: !stream && self.verbose.unwrap_or(false),
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
                report_progress: reports.needs_progress(),
            },
            more_prompts: Vec::new(),
        })
    }

    /// Any name is accepted unless `model.strict_name` is set (llama-server serves whatever
    /// name a client hard-codes, such as `gpt-3.5-turbo`).
    fn check_model(&self, served: &ServedModel) -> Result<(), InvalidRequest> {
        match &self.model {
            Some(name) if served.strict_name && !served.serves(name) => {
                Err(InvalidRequest::UnknownModel {
                    requested: name.clone(),
                    served: served.alias.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The request's sampling fields over the server's defaults (`[generation]`).
    pub(crate) fn sampling(
        &self,
        server: &GenerationDefaults,
    ) -> Result<SamplingParams, InvalidRequest> {
        let defaults = server.sampling();
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(k) => i32::try_from(k)
                .map_err(|_| InvalidRequest::field("top_k", "top_k is out of range"))?,
        };
        let biases = logit_bias(self.logit_bias.as_ref())?;
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            // -1 is llama-server's "random".
            seed: match self.seed {
                None => defaults.seed,
                Some(-1) => None,
                Some(s) => Some((s as u64 & 0xffff_ffff) as u32),
            },
            logit_bias: biases.0,
            logit_bias_text: biases.1,
            grammar: self.grammar()?,
            logprobs: self.logprobs()?,
        };
        sampling.validate()?;
        Ok(sampling)
    }
}

impl GenerationBody {
    /// How many alternatives to report with each token, if log probabilities were asked for:
    /// chat's `logprobs: true` with `top_logprobs` (default 0), legacy completions'
    /// `logprobs: N`, or llama-server's `n_probs: N` (0 asks for none, as llama-server).
    fn logprobs(&self) -> Result<Option<u8>, InvalidRequest> {
        let count = |param: &str, n: i64| {
            u8::try_from(n)
                .ok()
                .filter(|&n| n <= SamplingParams::MAX_TOP_LOGPROBS)
                .ok_or_else(|| {
                    InvalidRequest::field(
                        param,
                        format!(
                            "{param} must be between 0 and {}, got {n}",
                            SamplingParams::MAX_TOP_LOGPROBS
                        ),
                    )
                })
        };
        let top = self
            .top_logprobs
            .map(|n| count("top_logprobs", n))
            .transpose()?;
        let requested = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(top.unwrap_or(0)),
            Some(Value::Number(n)) => {
                let n = n.as_i64().ok_or_else(|| {
                    InvalidRequest::field(
                        "logprobs",
                        format!("logprobs must be an integer, got {n}"),
                    )
                })?;
                Some(count("logprobs", n)?)
            }
            Some(other) => {
                return Err(InvalidRequest::field(
                    "logprobs",
                    format!("logprobs must be a boolean or an integer, got {other}"),
                ))
            }
        };
        if top.is_some_and(|n| n > 0) && requested.is_none() {
            return Err(InvalidRequest::field(
                "top_logprobs",
                "top_logprobs requires logprobs to be set to true",
            ));
        }
        let n_probs = self
            .n_probs
            .map(|n| count("n_probs", n))
            .transpose()?
            .filter(|&n| n > 0);
        Ok(requested.or(n_probs))
    }
}

/// `max_completion_tokens` wins over the older `max_tokens`, which wins over llama-server's
/// `n_predict` (negative: no limit); the error names the one given. `None`: none was given
/// (the server's default applies); `Some(None)`: no limit.
fn max_tokens(
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
    n_predict: Option<i64>,
) -> Result<Option<Option<u32>>, InvalidRequest> {
    let (name, value) = match (max_completion_tokens, max_tokens, n_predict) {
        (Some(v), _, _) => ("max_completion_tokens", v),
        (None, Some(v), _) => ("max_tokens", v),
        (None, None, Some(v)) if v < 0 => return Ok(Some(None)),
        (None, None, Some(v)) => ("n_predict", v),
        (None, None, None) => return Ok(None),
    };
    if value < 1 {
        return Err(InvalidRequest::field(
            name,
            format!("{name} must be at least 1, got {value}"),
        ));
    }
    u32::try_from(value)
        .map(|v| Some(Some(v)))
        .map_err(|_| InvalidRequest::field(name, format!("{name} is too large: {value}")))
}

/// Token biases and text biases (the worker tokenizes the texts).
type Biases = (Vec<(i32, f32)>, Vec<(String, f32)>);

fn logit_bias(biases: Option<&LogitBiasBody>) -> Result<Biases, InvalidRequest> {
    /// An entry's key, whichever form it came in.
    enum Key<'a> {
        Token(i64),
        Text(&'a str),
    }
    let entries: Vec<(Key, &BiasBody)> = match biases {
        None => Vec::new(),
        Some(LogitBiasBody::Map(map)) => map
            .iter()
            .map(|(key, bias)| match key.parse::<i64>() {
                Ok(token) => (Key::Token(token), bias),
                Err(_) => (Key::Text(key), bias),
            })
            .collect(),
        Some(LogitBiasBody::Pairs(pairs)) => pairs
            .iter()
            .map(|(key, bias)| match key {
                TokenOrText::Token(token) => (Key::Token(*token), bias),
                TokenOrText::Text(text) => (Key::Text(text), bias),
            })
            .collect(),
    };
    let mut tokens = Vec::new();
    let mut texts = Vec::new();
    for (key, bias) in entries {
        match key {
            Key::Token(token) => {
                let id = i32::try_from(token).map_err(|_| {
                    InvalidRequest::field(
                        "logit_bias",
                        format!("logit_bias key {token} is not a token id"),
                    )
                })?;
                tokens.push((id, bias_value(&token.to_string(), bias)?));
            }
            Key::Text(text) => {
                let bias = bias_value(&format!("{text:?}"), bias)?;
                texts.push((text.to_owned(), bias));
            }
        }
    }
    Ok((tokens, texts))
}

/// One bias: a finite number, or `false` (a ban).
fn bias_value(key: &str, bias: &BiasBody) -> Result<f32, InvalidRequest> {
    match *bias {
        BiasBody::Value(v) if v.is_finite() => Ok(v),
        // Beyond f32's range the number became an infinity: -1e39 is not a ban.
        BiasBody::Value(_) => Err(InvalidRequest::field(
            "logit_bias",
            format!(
                "logit_bias for {key} must be a number between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, or false to ban it"
            ),
        )),
        BiasBody::Ban(false) => Ok(f32::NEG_INFINITY),
        BiasBody::Ban(true) => Err(InvalidRequest::field(
            "logit_bias",
            format!("logit_bias for {key} must be a number or false"),
        )),
    }
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

/// The conversation with its ending, as llama-server decides it from `add_generation_prompt`
/// (default true) and `continue_final_message` (default false): a final assistant message is
/// continued even when not asked (llama-server's assistant prefill, on by default), unless the
/// one before it is an assistant's too; both flags true is refused, and so is continuing a
/// final message that is not an assistant's (llama-server renders nonsense there).
pub(crate) fn chat_prompt(
    messages: Vec<ChatMessage>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
) -> Result<ChatPrompt, InvalidRequest> {
    let is_assistant = |m: Option<&ChatMessage>| m.is_some_and(|m| m.role == "assistant");
    let last_is_assistant = is_assistant(messages.last());
    let mut add_generation_prompt = add_generation_prompt.unwrap_or(true);
    let mut continue_final = continue_final_message.unwrap_or(false);
    if !continue_final && last_is_assistant {
        if is_assistant(messages.iter().rev().nth(1)) {
            return Err(InvalidRequest::field(
                "messages",
                "Cannot have 2 or more assistant messages at the end of the list.",
            ));
        }
        continue_final = true;
        add_generation_prompt = false;
    }
    if continue_final && add_generation_prompt {
        return Err(InvalidRequest::field(
            "continue_final_message",
            "Cannot set both add_generation_prompt and continue_final_message to true.",
        ));
    }
    if continue_final && !last_is_assistant {
        return Err(InvalidRequest::field(
            "continue_final_message",
            "continue_final_message needs the last message to be the assistant's",
        ));
    }
    let ending = if continue_final {
        ChatEnding::ContinueFinal
    } else if add_generation_prompt {
        ChatEnding::OpenAssistant
    } else {
        ChatEnding::AsRendered
    };
    Ok(ChatPrompt { messages, ending })
}

pub(crate) fn chat_messages(
    messages: Option<Vec<MessageBody>>,
) -> Result<Vec<ChatMessage>, InvalidRequest> {
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
        Some(PromptBody::Object(object)) => return object_prompt(object),
        Some(PromptBody::List(items)) => items,
    };
    match items.as_slice() {
        [] => Err(InvalidRequest::field("prompt", "prompt must not be empty")),
        [Value::String(text)] => Ok(Prompt::Text(text.clone())),
        _ if items.iter().all(Value::is_number) => {
            token_ids(&items).map(Prompt::Tokens).ok_or_else(bad)
        }
        _ if items.iter().all(Value::is_string) => Err(InvalidRequest::field(
            "prompt",
            "the native endpoint takes one prompt per request (/v1/completions takes several)",
        )),
        _ => Err(bad()),
    }
}

/// OpenAI's `prompt` of `/v1/completions`: one prompt as [`completion_prompt`] reads it, or a
/// batch: a list of strings, or a list of token-id lists (at least one either way).
fn completion_prompts(prompt: Option<PromptBody>) -> Result<Vec<Prompt>, InvalidRequest> {
    let Some(PromptBody::List(items)) = &prompt else {
        return Ok(vec![completion_prompt(prompt)?]);
    };
    if items.len() > 1 && items.iter().all(Value::is_string) {
        return Ok(items
            .iter()
            .filter_map(|t| t.as_str().map(|t| Prompt::Text(t.to_owned())))
            .collect());
    }
    if !items.is_empty() && items.iter().all(Value::is_array) {
        return items
            .iter()
            .map(|list| {
                let ids = list.as_array().map(Vec::as_slice).unwrap_or_default();
                if ids.is_empty() {
                    return Err(InvalidRequest::field(
                        "prompt",
                        "a prompt must not be empty",
                    ));
                }
                token_ids(ids).map(Prompt::Tokens).ok_or_else(|| {
                    InvalidRequest::field("prompt", "a token-id prompt holds only token ids")
                })
            })
            .collect();
    }
    Ok(vec![completion_prompt(prompt)?])
}

/// A list of token ids; `None` if any element is not one.
fn token_ids(items: &[Value]) -> Option<Vec<Token>> {
    items
        .iter()
        .map(|t| t.as_i64().and_then(|t| Token::try_from(t).ok()))
        .collect()
}

/// `{"prompt_string": …}` is its text; media in `multimodal_data` are refused (no projector).
fn object_prompt(object: PromptObject) -> Result<Prompt, InvalidRequest> {
    let has_media = match &object.multimodal_data {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::String(data)) => !data.is_empty(),
        Some(_) => true,
    };
    if has_media {
        return Err(InvalidRequest::field(
            "prompt.multimodal_data",
            "multimodal input is not supported: the served model has no multimodal projector",
        ));
    }
    object
        .prompt_string
        .map(Prompt::Text)
        .ok_or_else(|| InvalidRequest::field("prompt.prompt_string", "prompt_string is required"))
}

/// A prompt of llama-server's native `/completion`: ready to send, or a list mixing text
/// and token ids whose text parts still have to be tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum NativePrompt {
    Ready(Prompt),
    Mixed(Vec<PromptPart>),
}

/// One element of a mixed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    Text(String),
    Token(Token),
}

/// The native `prompt` as llama-server reads it: one prompt ([`native_prompt`]), or a batch
/// of at most [`MAX_CHOICES`]: a list of several strings, or a list holding token-id lists or
/// prompt objects, each element then one prompt (a string, token ids, a list mixing both, or
/// `{"prompt_string"}`).
pub fn native_prompts(prompt: Option<PromptBody>) -> Result<Vec<NativePrompt>, InvalidRequest> {
    let is_nested = |item: &Value| item.is_array() || item.is_object();
    let items = match prompt {
        Some(PromptBody::List(items))
            if items.iter().any(is_nested)
                || (items.len() > 1 && items.iter().all(Value::is_string)) =>
        {
            items
        }
        other => return Ok(vec![native_prompt(other)?]),
    };
    if items.len() > MAX_CHOICES as usize {
        return Err(InvalidRequest::field(
            "prompt",
            format!("a batch holds at most {MAX_CHOICES} prompts"),
        ));
    }
    items
        .into_iter()
        .map(|item| {
            let bad = || {
                InvalidRequest::field(
                    "prompt",
                    "each prompt of a batch is a string, token ids, a list mixing both, or an \
                     object with prompt_string",
                )
            };
            let body: PromptBody = serde_json::from_value(item).map_err(|_| bad())?;
            if matches!(&body, PromptBody::List(inner) if inner.iter().any(is_nested)) {
                return Err(bad());
            }
            native_prompt(Some(body))
        })
        .collect()
}

/// The native `prompt`: a string, token ids, one string in a list, or a list mixing strings
/// and token ids (one prompt, as llama-server reads it). Several strings are a batch
/// ([`native_prompts`]), refused here.
pub fn native_prompt(prompt: Option<PromptBody>) -> Result<NativePrompt, InvalidRequest> {
    if let Some(PromptBody::List(items)) = &prompt {
        let has_text = items.iter().any(Value::is_string);
        let has_number = items.iter().any(Value::is_number);
        if has_text && has_number {
            return items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(PromptPart::Text(text.clone())),
                    other => other
                        .as_i64()
                        .and_then(|t| Token::try_from(t).ok())
                        .map(PromptPart::Token)
                        .ok_or_else(|| {
                            InvalidRequest::field(
                                "prompt",
                                "a mixed prompt holds only strings and token ids",
                            )
                        }),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(NativePrompt::Mixed);
        }
    }
    completion_prompt(prompt).map(NativePrompt::Ready)
}

/// Structured output: at most one of `response_format` (`text`, `json_object` with an
/// optional `schema`, `json_schema` with `json_schema.schema`), llama-server's `json_schema`
/// (a schema) and `grammar` (GBNF text), turned into one GBNF grammar. Neutral values
/// (`null`, `""`, `{}`, `{"type": "text"}`) ask for nothing. A schema outside what
/// [`grammar::schema_grammar`] supports is a 400 naming the field it came in.
impl GenerationBody {
    fn grammar(&self) -> Result<Option<String>, InvalidRequest> {
        let mut found: Vec<(&'static str, String)> = Vec::new();
        if let Some(format) = self.response_format.as_ref().filter(|v| !is_neutral(v)) {
            if let Some(g) = response_format_grammar(format)? {
                found.push(("response_format", g));
            }
        }
        if let Some(schema) = self.json_schema.as_ref().filter(|v| !v.is_null()) {
            found.push(("json_schema", schema_grammar("json_schema", schema)?));
        }
        match &self.grammar {
            None | Some(Value::Null) => {}
            Some(Value::String(g)) if g.is_empty() => {}
            Some(Value::String(g)) => found.push(("grammar", g.clone())),
            Some(_) => {
                return Err(InvalidRequest::field(
                    "grammar",
                    "grammar must be a string of GBNF rules",
                ))
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, g)| g)),
            _ => Err(InvalidRequest::field(
                found[1].0,
                format!(
                    "{} and {} cannot be used together: give one constraint",
                    found[0].0, found[1].0
                ),
            )),
        }
    }
}

fn response_format_grammar(format: &Value) -> Result<Option<String>, InvalidRequest> {
    let bad = |message: &str| InvalidRequest::field("response_format", message);
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format must be an object with a \"type\": \"text\", \"json_object\" or \"json_schema\"")
    })?;
    match kind {
        "text" => Ok(None),
        // llama-server's extension: a json_object may carry a schema.
        "json_object" => match format.get("schema").filter(|s| !is_neutral(s)) {
            Some(schema) => schema_grammar("response_format", schema).map(Some),
            None => Ok(Some(grammar::json_object_grammar())),
        },
        "json_schema" => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required"))?;
            if is_neutral(schema) {
                // llama-server: an empty schema is any object.
                return Ok(Some(grammar::json_object_grammar()));
            }
            schema_grammar("response_format", schema).map(Some)
        }
        other => Err(bad(&format!(
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
        ))),
    }
}

fn schema_grammar(param: &'static str, schema: &Value) -> Result<String, InvalidRequest> {
    grammar::schema_grammar(schema).map_err(|e| {
        InvalidRequest::field(
            param,
            format!("{param}: this server cannot turn the JSON schema into a grammar: {e}"),
        )
    })
}

#[cfg(test)]
mod tests;
