//! Log probabilities in the three shapes clients expect, built from the `TokenLogprob`s a
//! worker sends with each token: OpenAI chat (`choices[].logprobs.content[]`), OpenAI legacy
//! completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and llama-server's
//! native `completion_probabilities`. A token's `token` string is its bytes cut to their
//! longest valid UTF-8 prefix, as llama-server does (a token may hold part of a character);
//! `bytes` are always complete.

use std::collections::BTreeMap;

use llamapool_common::{Candidate, TokenLogprob};
use serde::Serialize;

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
fn number(logprob: f32) -> f64 {
    f64::from(if logprob.is_finite() {
        logprob
    } else {
        f32::MIN
    })
}

/// A choice's `logprobs`: OpenAI chat's or legacy completions' shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LogprobsBody {
    Chat(ChatLogprobs),
    Completions(CompletionLogprobs),
}

/// OpenAI chat's `choices[].logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatToken>,
    /// Always `null`: this server does not refuse.
    pub refusal: Option<String>,
}

/// One token of [`ChatLogprobs`]: the sampled token and its alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatToken {
    #[serde(flatten)]
    pub sampled: ChatCandidate,
    pub top_logprobs: Vec<ChatCandidate>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCandidate {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

impl From<&Candidate> for ChatCandidate {
    fn from(c: &Candidate) -> Self {
        Self {
            token: text(&c.bytes).to_owned(),
            logprob: number(c.logprob),
            bytes: c.bytes.clone(),
        }
    }
}

/// OpenAI legacy completions' `choices[].logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    /// Each token's alternatives, text → log probability.
    pub top_logprobs: Vec<BTreeMap<String, f64>>,
    /// Characters of the output before each token.
    pub text_offset: Vec<usize>,
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

    /// The `logprobs` of a choice for the tokens gathered since the last call: `None`
    /// (`null`) when none were asked for.
    pub fn take(&mut self) -> Option<LogprobsBody> {
        if !self.requested {
            return None;
        }
        let tokens = std::mem::take(&mut self.pending);
        Some(match self.endpoint {
            Endpoint::Chat => LogprobsBody::Chat(chat(&tokens)),
            Endpoint::Completions => LogprobsBody::Completions(self.completions(&tokens)),
        })
    }

    fn completions(&mut self, tokens: &[TokenLogprob]) -> CompletionLogprobs {
        let mut text_offset = Vec::with_capacity(tokens.len());
        for t in tokens {
            text_offset.push(self.offset);
            self.offset += text(&t.sampled.bytes).chars().count();
        }
        CompletionLogprobs {
            tokens: tokens
                .iter()
                .map(|t| text(&t.sampled.bytes).to_owned())
                .collect(),
            token_logprobs: tokens.iter().map(|t| number(t.sampled.logprob)).collect(),
            top_logprobs: tokens
                .iter()
                .map(|t| {
                    t.top
                        .iter()
                        .map(|c| (text(&c.bytes).to_owned(), number(c.logprob)))
                        .collect()
                })
                .collect(),
            text_offset,
        }
    }
}

fn chat(tokens: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatToken {
                sampled: ChatCandidate::from(&t.sampled),
                top_logprobs: t.top.iter().map(ChatCandidate::from).collect(),
            })
            .collect(),
        refusal: None,
    }
}

/// llama-server's `completion_probabilities`: each token with its alternatives, as log
/// probabilities, or with `post_sampling_probs` as probabilities (`prob`, `top_probs`).
pub type NativeProbs = Vec<NativeToken>;

/// One token of [`NativeProbs`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NativeToken {
    #[serde(flatten)]
    pub sampled: NativeCandidate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<NativeCandidate>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_probs: Option<Vec<NativeCandidate>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NativeCandidate {
    pub id: i32,
    pub token: String,
    pub bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prob: Option<f64>,
}

impl NativeCandidate {
    fn new(c: &Candidate, post_sampling_probs: bool) -> Self {
        let (logprob, prob) = if post_sampling_probs {
            (None, Some(f64::from(c.logprob.exp())))
        } else {
            (Some(number(c.logprob)), None)
        };
        Self {
            id: c.token,
            token: text(&c.bytes).to_owned(),
            bytes: c.bytes.clone(),
            logprob,
            prob,
        }
    }
}

pub fn native(tokens: &[TokenLogprob], post_sampling_probs: bool) -> NativeProbs {
    tokens
        .iter()
        .map(|t| {
            let top: Vec<NativeCandidate> = t
                .top
                .iter()
                .map(|c| NativeCandidate::new(c, post_sampling_probs))
                .collect();
            let (top_logprobs, top_probs) = if post_sampling_probs {
                (None, Some(top))
            } else {
                (Some(top), None)
            };
            NativeToken {
                sampled: NativeCandidate::new(&t.sampled, post_sampling_probs),
                top_logprobs,
                top_probs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn json_of(value: impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

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
        let v = json_of(lp.take());
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
        assert_eq!(json_of(lp.take())["content"], json!([]));
        assert_eq!(Logprobs::new(Endpoint::Chat, false).take(), None);
    }

    #[test]
    fn completions_shape_and_offsets_across_chunks() {
        let mut lp = Logprobs::new(Endpoint::Completions, true);
        lp.push(&sample()[..1]);
        let first = json_of(lp.take());
        assert_eq!(
            first,
            json!({"tokens": ["Hi"], "token_logprobs": [-0.5],
                   "top_logprobs": [{"Hi": -0.5, "Yo": -1.0}], "text_offset": [0]})
        );
        lp.push(&sample());
        assert_eq!(json_of(lp.take())["text_offset"], json!([2, 4]));
    }

    #[test]
    fn native_shape() {
        let v = json_of(native(&sample()[..1], false));
        assert_eq!(
            v[0],
            json!({"id": 1, "token": "Hi", "bytes": [72, 105], "logprob": -0.5, "top_logprobs": [
                {"id": 1, "token": "Hi", "bytes": [72, 105], "logprob": -0.5},
                {"id": 2, "token": "Yo", "bytes": [89, 111], "logprob": -1.0}]})
        );
        let p = json_of(native(&sample()[..1], true));
        assert!((p[0]["prob"].as_f64().unwrap() - (-0.5f64).exp()).abs() < 1e-6);
        assert_eq!(p[0]["top_probs"].as_array().unwrap().len(), 2);
        assert!(p[0].get("logprob").is_none());
    }
}
