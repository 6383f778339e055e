//! Response bodies and stream chunks in exactly the shapes OpenAI clients expect, plus
//! llama-server's `timings`. Built from what a worker reports; nothing here reads a request.

use llamapool_common::{Finish, FinishReason, Timings, Usage};
use serde_json::{json, Value};

use super::request::Endpoint;

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
            stop_word: None,
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
