//! The OpenAI-compatible request and response shapes.
//!
//! Requests are parsed at the edge into [`ValidRequest`] (nothing past the handler sees JSON);
//! every rejection names the offending field. Response bodies and stream chunks are built here
//! in exactly the shapes clients expect (see shared/API.md).

use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::{
    ChatMessage, Finish, FinishReason, RequestId, SamplingParams, StoppingParams, Timings, Usage,
};
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub include_usage: bool,
    pub generate: GenerateRequest,
}

type Obj = Map<String, Value>;

fn field<'a>(obj: &'a Obj, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn number(obj: &Obj, name: &str) -> Result<Option<f64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            ApiError::invalid_param(name, format!("{name} must be a number, got {v}"))
        }),
    }
}

fn integer(obj: &Obj, name: &str) -> Result<Option<i64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            ApiError::invalid_param(name, format!("{name} must be an integer, got {v}"))
        }),
    }
}

fn boolean(obj: &Obj, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            ApiError::invalid_param(name, format!("{name} must be true or false, got {v}"))
        }),
    }
}

fn f32_field(obj: &Obj, name: &str, default: f32) -> Result<f32, ApiError> {
    Ok(number(obj, name)?.map_or(default, |v| v as f32))
}

/// Parses a request body for `endpoint`. `alias` is the only model name served.
pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    alias: &str,
    id: RequestId,
) -> Result<ValidRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid("the body must be a JSON object"));
    };
    if let Some(model) = field(&obj, "model") {
        let name = model
            .as_str()
            .ok_or_else(|| ApiError::invalid_param("model", "model must be a string"))?;
        if name != alias {
            return Err(ApiError {
                code: Some("model_not_found".into()),
                param: Some("model".into()),
                ..ApiError::not_found(format!(
                    "the model {name:?} does not exist; this server serves {alias:?}"
                ))
            });
        }
    }
    if let Some(n) = integer(&obj, "n")? {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    let prompt = match endpoint {
        Endpoint::Chat => Prompt::Chat(parse_messages(&obj)?),
        Endpoint::Completions => parse_prompt(&obj)?,
    };
    let max_tokens = match (
        integer(&obj, "max_completion_tokens")?,
        integer(&obj, "max_tokens")?,
    ) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        None => None,
        Some((name, v)) if v < 1 => {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} must be at least 1, got {v}"),
            ))
        }
        Some((name, v)) => Some(
            u32::try_from(v)
                .map_err(|_| ApiError::invalid_param(name, format!("{name} is too large: {v}")))?,
        ),
    };
    let defaults = SamplingParams::default();
    let top_k = integer(&obj, "top_k")?.unwrap_or(i64::from(defaults.top_k));
    // Any 64-bit seed is accepted; llama.cpp takes 32 bits.
    let seed = integer(&obj, "seed")?.map(|s| (s as u64 & 0xffff_ffff) as u32);
    let sampling = SamplingParams {
        temperature: f32_field(&obj, "temperature", defaults.temperature)?,
        top_k: i32::try_from(top_k)
            .map_err(|_| ApiError::invalid_param("top_k", "top_k is out of range"))?,
        top_p: f32_field(&obj, "top_p", defaults.top_p)?,
        min_p: f32_field(&obj, "min_p", defaults.min_p)?,
        repeat_penalty: f32_field(&obj, "repeat_penalty", defaults.repeat_penalty)?,
        repeat_last_n: defaults.repeat_last_n,
        presence_penalty: f32_field(&obj, "presence_penalty", defaults.presence_penalty)?,
        frequency_penalty: f32_field(&obj, "frequency_penalty", defaults.frequency_penalty)?,
        seed,
        logit_bias: parse_logit_bias(&obj)?,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid_param(&e.param, e.message))?;
    let stopping = StoppingParams {
        max_tokens,
        stop: parse_stop(&obj)?,
        ignore_eos: boolean(&obj, "ignore_eos")?.unwrap_or(false),
    };
    stopping
        .validate()
        .map_err(|e| ApiError::invalid_param(&e.param, e.message))?;
    let stream = boolean(&obj, "stream")?.unwrap_or(false);
    let include_usage = match field(&obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|_| {
                ApiError::invalid_param(
                    "stream_options",
                    "stream_options.include_usage must be true or false",
                )
            })?
            .unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    Ok(ValidRequest {
        endpoint,
        stream,
        include_usage,
        generate: GenerateRequest {
            id,
            prompt,
            sampling,
            stopping,
            resume: Vec::new(),
        },
    })
}

fn parse_messages(obj: &Obj) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(messages) = field(obj, "messages") else {
        return Err(ApiError::invalid_param("messages", "messages is required"));
    };
    let Value::Array(list) = messages else {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must be an array",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid_param(
                    &param,
                    format!("{param} must be an object"),
                ));
            };
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_param(&param, format!("{param}.role must be a string"))
            })?;
            if !["system", "user", "assistant", "developer", "tool"].contains(&role) {
                return Err(ApiError::invalid_param(
                    &param,
                    format!("{param}.role {role:?} is not a known role"),
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (
                            part.get("type").and_then(Value::as_str),
                            part.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid_param(
                                    &param,
                                    format!("{param}.content: only text parts are supported"),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        &param,
                        format!("{param}.content must be a string or an array of text parts"),
                    ))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn parse_prompt(obj: &Obj) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a string, an array of one string, or an array of token ids",
        )
    };
    match field(obj, "prompt") {
        None => Err(ApiError::invalid_param("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be empty",
        )),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|t| {
                t.as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Prompt::Tokens),
        Some(Value::Array(items)) if items.len() == 1 => items[0]
            .as_str()
            .map(|s| Prompt::Text(s.to_string()))
            .ok_or_else(bad),
        Some(Value::Array(_)) => Err(ApiError::invalid_param(
            "prompt",
            "only one prompt per request is supported",
        )),
        Some(_) => Err(bad()),
    }
}

fn parse_stop(obj: &Obj) -> Result<Vec<String>, ApiError> {
    match field(obj, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid_param("stop", "stop must be a string or an array of strings")
                })
            })
            .collect(),
        Some(_) => Err(ApiError::invalid_param(
            "stop",
            "stop must be a string or an array of strings",
        )),
    }
}

fn parse_logit_bias(obj: &Obj) -> Result<Vec<(i32, f32)>, ApiError> {
    match field(obj, "logit_bias") {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(token, bias)| {
                let token = token.parse::<i32>().map_err(|_| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("logit_bias key {token:?} is not a token id"),
                    )
                })?;
                let bias = match bias {
                    Value::Bool(false) => f32::NEG_INFINITY,
                    v => v.as_f64().ok_or_else(|| {
                        ApiError::invalid_param(
                            "logit_bias",
                            format!("logit_bias for {token} must be a number"),
                        )
                    })? as f32,
                };
                Ok((token, bias))
            })
            .collect(),
        Some(_) => Err(ApiError::invalid_param(
            "logit_bias",
            "logit_bias must be an object of token id to bias",
        )),
    }
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

pub const FINGERPRINT: &str = concat!("llamapool-", env!("CARGO_PKG_VERSION"));

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

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// The whole non-streaming response.
    pub fn response(&self, text: &str, finish: &Finish) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(finish.reason),
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(finish.reason),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
            "usage": usage_json(&finish.usage),
            "timings": timings_json(&finish.usage, &finish.timings),
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
        })
    }

    /// The first chat chunk: the role and empty content.
    pub fn role_chunk(&self) -> Value {
        self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
    }

    pub fn text_chunk(&self, text: &str) -> Value {
        match self.endpoint {
            Endpoint::Chat => self.chunk(json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})),
            Endpoint::Completions => self.chunk(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})),
        }
    }

    /// The last choice chunk: empty delta (or text), the finish reason, and timings.
    pub fn finish_chunk(&self, finish: &Finish) -> Value {
        let reason = finish_reason(finish.reason);
        let mut chunk = match self.endpoint {
            Endpoint::Chat => self
                .chunk(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})),
            Endpoint::Completions => self
                .chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})),
        };
        chunk["timings"] = timings_json(&finish.usage, &finish.timings);
        chunk
    }

    /// With `stream_options.include_usage`: `choices: []` and the usage.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut chunk = self.chunk(Value::Null);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage_json(usage);
        chunk
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens()})
}

fn timings_json(u: &Usage, t: &Timings) -> Value {
    let per_second = if t.predicted_ms > 0.0 {
        f64::from(u.completion_tokens) * 1000.0 / t.predicted_ms
    } else {
        0.0
    };
    json!({
        "prompt_n": u.prompt_tokens,
        "prompt_ms": t.prompt_ms,
        "predicted_n": u.completion_tokens,
        "predicted_ms": t.predicted_ms,
        "predicted_per_second": per_second,
        "queue_ms": t.queue_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ValidRequest, ApiError> {
        parse(body.as_bytes(), Endpoint::Chat, "m", RequestId(1))
    }

    fn completion(body: &str) -> Result<ValidRequest, ApiError> {
        parse(body.as_bytes(), Endpoint::Completions, "m", RequestId(1))
    }

    #[test]
    fn parses_a_full_chat_request() {
        let r = chat(r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
            "max_completion_tokens":5,"temperature":0,"top_p":0.5,"top_k":3,"min_p":0.1,"presence_penalty":0.5,"frequency_penalty":0.1,
            "repeat_penalty":1.1,"seed":7,"stop":"x","logit_bias":{"12":-100},"n":1,"stream":true,"stream_options":{"include_usage":true},"ignore_eos":true}"#)
        .unwrap();
        assert!(r.stream && r.include_usage);
        let g = r.generate;
        assert_eq!(g.stopping.max_tokens, Some(5));
        assert_eq!(g.stopping.stop, vec!["x".to_string()]);
        assert!(g.stopping.ignore_eos);
        assert_eq!(g.sampling.top_k, 3);
        assert_eq!(g.sampling.seed, Some(7));
        assert_eq!(g.sampling.logit_bias, vec![(12, -100.0)]);
        let Prompt::Chat(m) = g.prompt else { panic!() };
        assert_eq!(m[1].content, "hi");
    }

    #[test]
    fn completions_take_strings_and_token_arrays() {
        assert_eq!(
            completion(r#"{"prompt":"abc"}"#).unwrap().generate.prompt,
            Prompt::Text("abc".into())
        );
        assert_eq!(
            completion(r#"{"prompt":["abc"]}"#).unwrap().generate.prompt,
            Prompt::Text("abc".into())
        );
        assert_eq!(
            completion(r#"{"prompt":[1,2]}"#).unwrap().generate.prompt,
            Prompt::Tokens(vec![1, 2])
        );
        assert_eq!(
            completion(r#"{"prompt":["a","b"]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn bad_inputs_name_their_field() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":5}"#,
                "temperature",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "n"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":3}"#,
                "stop",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                "messages[0]",
            ),
            (r#"{"messages":[]}"#, "messages"),
            (r#"{}"#, "messages"),
        ];
        for (body, param) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
        assert_eq!(
            chat("{not json").unwrap_err().status,
            hyper::StatusCode::BAD_REQUEST
        );
        assert_eq!(
            chat("[1]").unwrap_err().status,
            hyper::StatusCode::BAD_REQUEST
        );
        assert_eq!(
            chat(r#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#)
                .unwrap_err()
                .status,
            hyper::StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn chunks_share_the_envelope() {
        let env = Envelope::new(Endpoint::Chat, "m");
        let finish = Finish {
            reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
            timings: Timings::default(),
        };
        for chunk in [
            env.role_chunk(),
            env.text_chunk("a"),
            env.finish_chunk(&finish),
            env.usage_chunk(&finish.usage),
        ] {
            assert_eq!(chunk["id"], env.id);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "m");
        }
        assert_eq!(env.finish_chunk(&finish)["choices"][0]["delta"], json!({}));
        assert_eq!(env.usage_chunk(&finish.usage)["choices"], json!([]));
        assert_eq!(env.usage_chunk(&finish.usage)["usage"]["total_tokens"], 5);
        assert!(env.id.starts_with("chatcmpl-"));
    }
}
