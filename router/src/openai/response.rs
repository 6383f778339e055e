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

/// Several choices (`n` > 1): the shapes above, each choice with its `index`.
impl Envelope {
    /// The whole non-streaming response for `choices` (text and finish, in index order): each
    /// choice as [`Envelope::response`] builds it, with its `index`; `usage` sums them
    /// ([`sum_usage`]); `timings` are the first choice's.
    pub fn response_choices(&self, choices: &[(String, Finish)]) -> Value {
        let (first_text, first) = choices.first().expect("at least one choice");
        let mut body = self.response(first_text, first);
        if choices.len() > 1 {
            body["choices"] = choices
                .iter()
                .enumerate()
                .map(|(index, (text, finish))| {
                    with_index(self.response(text, finish)["choices"][0].take(), index)
                })
                .collect();
            body["usage"] = usage_json(&sum_usage(choices.iter().map(|(_, f)| &f.usage)));
        }
        body
    }
}

/// `chunk` (or a choice) with its choice's `index`: `chunk["choices"][0]` when it has
/// choices, else the value itself.
pub fn with_index(mut chunk: Value, index: usize) -> Value {
    match chunk.get_mut("choices").and_then(|c| c.get_mut(0)) {
        Some(choice) => choice["index"] = json!(index),
        None => chunk["index"] = json!(index),
    }
    chunk
}

/// The usage of several choices of one request: their prompt is one prompt, counted once
/// (the first choice's count), and their completion tokens are summed, as OpenAI counts `n`.
pub fn sum_usage<'a>(usages: impl IntoIterator<Item = &'a Usage>) -> Usage {
    let mut usages = usages.into_iter();
    let mut total = usages.next().copied().unwrap_or_default();
    for u in usages {
        total.completion_tokens += u.completion_tokens;
    }
    total
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens(),
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn timings_json(u: &Usage, t: &Timings) -> Value {
    let per_second = if t.predicted_ms > 0.0 {
        f64::from(u.completion_tokens) * 1000.0 / t.predicted_ms
    } else {
        0.0
    };
    json!({
        "cache_n": u.cached_tokens,
        "prompt_n": u.prompt_tokens.saturating_sub(u.cached_tokens),
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
                cached_tokens: 0,
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

    #[test]
    fn several_choices_have_their_index_and_usage_counts_the_prompt_once() {
        let finish = |reason, completion_tokens| Finish {
            reason,
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens,
                cached_tokens: 3,
            },
            timings: Timings::default(),
            stop_word: None,
        };
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let env = Envelope::new(endpoint, "m");
            let one = env.response_choices(&[("a".into(), finish(FinishReason::Stop, 2))]);
            assert_eq!(one, env.response("a", &finish(FinishReason::Stop, 2)));
            let body = env.response_choices(&[
                ("a".into(), finish(FinishReason::Stop, 2)),
                ("b".into(), finish(FinishReason::Length, 5)),
            ]);
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
            let chunk = with_index(env.text_chunk("b"), 1);
            assert_eq!(chunk["choices"][0]["index"], 1);
        }
    }
}
