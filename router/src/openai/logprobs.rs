//! Log probabilities in the three shapes clients expect, built from the `TokenLogprob`s a
//! worker sends with each token: OpenAI chat (`choices[].logprobs.content[]`), OpenAI legacy
//! completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and llama-server's
//! native `completion_probabilities`. A token's `token` string is its bytes cut to their
//! longest valid UTF-8 prefix, as llama-server does (a token may hold part of a character);
//! `bytes` are always complete.

use llamapool_common::{Candidate, TokenLogprob};
use serde_json::{json, Map, Value};

use super::request::Endpoint;

/// The token's text: its bytes up to the first incomplete or invalid UTF-8 sequence.
fn text(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid prefix"),
    }
}

/// A log probability as JSON: −∞ (a banned token) has no JSON form, so it becomes f32's
/// lowest value, as llama-server does.
fn number(logprob: f32) -> Value {
    json!(if logprob.is_finite() {
        logprob
    } else {
        f32::MIN
    })
}

/// One request's log probabilities, gathered as outputs arrive and handed out per chunk
/// (streaming) or all at once. `None` from [`Logprobs::take`] when none were asked for.
#[derive(Debug)]
pub struct Logprobs {
    endpoint: Endpoint,
    requested: bool,
    pending: Vec<TokenLogprob>,
    /// Completions' `text_offset`: characters of the output before the next token.
    offset: usize,
}

impl Logprobs {
    pub fn new(endpoint: Endpoint, requested: bool) -> Self {
        Self {
            endpoint,
            requested,
            pending: Vec::new(),
            offset: 0,
        }
    }

    pub fn push(&mut self, logprobs: &[TokenLogprob]) {
        self.pending.extend_from_slice(logprobs);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The `logprobs` value of a choice for the tokens gathered since the last call: `null`
    /// when none were asked for.
    pub fn take(&mut self) -> Value {
        if !self.requested {
            return Value::Null;
        }
        let tokens = std::mem::take(&mut self.pending);
        match self.endpoint {
            Endpoint::Chat => chat(&tokens),
            Endpoint::Completions => self.completions(&tokens),
        }
    }

    fn completions(&mut self, tokens: &[TokenLogprob]) -> Value {
        let mut offsets = Vec::with_capacity(tokens.len());
        for t in tokens {
            offsets.push(self.offset);
            self.offset += text(&t.sampled.bytes).chars().count();
        }
        let top: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let map: Map<String, Value> = t
                    .top
                    .iter()
                    .map(|c| (text(&c.bytes).to_owned(), number(c.logprob)))
                    .collect();
                Value::Object(map)
            })
            .collect();
        json!({
            "tokens": tokens.iter().map(|t| text(&t.sampled.bytes)).collect::<Vec<_>>(),
            "token_logprobs": tokens.iter().map(|t| number(t.sampled.logprob)).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": offsets,
        })
    }
}

fn chat_candidate(c: &Candidate) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("token".into(), json!(text(&c.bytes)));
    m.insert("logprob".into(), number(c.logprob));
    m.insert("bytes".into(), json!(c.bytes));
    m
}

fn chat(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = chat_candidate(&t.sampled);
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|c| Value::Object(chat_candidate(c)))
                .collect();
            m.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(m)
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// llama-server's `completion_probabilities`. With `post_sampling_probs`, `prob` and
/// `top_probs` (probabilities, not logarithms) in place of `logprob` and `top_logprobs`; they
/// are the same full-vocabulary distribution (see docs/API.md).
pub fn native(tokens: &[TokenLogprob], post_sampling_probs: bool) -> Value {
    let (value_key, top_key) = if post_sampling_probs {
        ("prob", "top_probs")
    } else {
        ("logprob", "top_logprobs")
    };
    let one = |c: &Candidate| {
        let mut m = Map::new();
        m.insert("id".into(), json!(c.token));
        m.insert("token".into(), json!(text(&c.bytes)));
        m.insert("bytes".into(), json!(c.bytes));
        let value = if post_sampling_probs {
            json!(c.logprob.exp())
        } else {
            number(c.logprob)
        };
        m.insert(value_key.into(), value);
        m
    };
    let list: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = one(&t.sampled);
            let top: Vec<Value> = t.top.iter().map(|c| Value::Object(one(c))).collect();
            m.insert(top_key.into(), Value::Array(top));
            Value::Object(m)
        })
        .collect();
    Value::Array(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(token: i32, bytes: &[u8], logprob: f32) -> Candidate {
        Candidate {
            token,
            bytes: bytes.to_vec(),
            logprob,
        }
    }

    fn sample() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob {
                sampled: candidate(1, b"Hi", -0.5),
                top: vec![candidate(1, b"Hi", -0.5), candidate(2, b"Yo", -1.0)],
            },
            TokenLogprob {
                // The first byte of "é": no text yet, the byte is kept.
                sampled: candidate(3, &[0xc3], f32::NEG_INFINITY),
                top: vec![],
            },
        ]
    }

    #[test]
    fn chat_shape() {
        let mut lp = Logprobs::new(Endpoint::Chat, true);
        lp.push(&sample());
        let v = lp.take();
        assert_eq!(
            v["content"][0],
            json!({"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
                {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                {"token": "Yo", "logprob": -1.0, "bytes": [89, 111]}]})
        );
        assert_eq!(v["content"][1]["token"], "");
        assert_eq!(v["content"][1]["bytes"], json!([0xc3]));
        assert_eq!(v["content"][1]["logprob"], json!(f32::MIN));
        assert_eq!(v["refusal"], Value::Null);
        // Taken: the next chunk starts empty.
        assert_eq!(lp.take()["content"], json!([]));
        assert_eq!(Logprobs::new(Endpoint::Chat, false).take(), Value::Null);
    }

    #[test]
    fn completions_shape_and_offsets_across_chunks() {
        let mut lp = Logprobs::new(Endpoint::Completions, true);
        lp.push(&sample()[..1]);
        let first = lp.take();
        assert_eq!(
            first,
            json!({"tokens": ["Hi"], "token_logprobs": [-0.5],
                   "top_logprobs": [{"Hi": -0.5, "Yo": -1.0}], "text_offset": [0]})
        );
        lp.push(&sample());
        assert_eq!(lp.take()["text_offset"], json!([2, 4]));
    }

    #[test]
    fn native_shape() {
        let v = native(&sample()[..1], false);
        assert_eq!(
            v[0],
            json!({"id": 1, "token": "Hi", "bytes": [72, 105], "logprob": -0.5, "top_logprobs": [
                {"id": 1, "token": "Hi", "bytes": [72, 105], "logprob": -0.5},
                {"id": 2, "token": "Yo", "bytes": [89, 111], "logprob": -1.0}]})
        );
        let p = native(&sample()[..1], true);
        assert!((p[0]["prob"].as_f64().unwrap() - (-0.5f64).exp()).abs() < 1e-6);
        assert_eq!(p[0]["top_probs"].as_array().unwrap().len(), 2);
        assert!(p[0].get("logprob").is_none());
    }
}
