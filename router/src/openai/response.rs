//! Response bodies and stream chunks in exactly the shapes OpenAI clients expect, plus
//! llama-server's `timings` and `prompt_progress` (one builder for every endpoint, native
//! included). Built from what a worker reports; nothing here reads a request.

use std::time::Instant;

use llamapool_common::{Finish, FinishReason, PromptProgress, SeqOutput, Timings, Usage};
use serde_json::{json, Value};

use super::request::{Endpoint, StreamReports};

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

    /// The first chat chunk: the role, and `content: null` as llama-server sends it (OpenAI
    /// sends `""`; clients take either).
    pub fn role_chunk(&self) -> Value {
        self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": null}, "logprobs": null, "finish_reason": null}))
    }

    /// A prompt-processing progress chunk (`return_progress`), as llama-server sends it before
    /// the first token: chat repeats the role delta with `content: null`, a completion has
    /// empty text.
    pub fn progress_chunk(&self, progress: &PromptProgress) -> Value {
        let mut chunk = match self.endpoint {
            Endpoint::Chat => self.role_chunk(),
            Endpoint::Completions => {
                self.chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null}))
            }
        };
        chunk["prompt_progress"] = progress_json(progress);
        chunk
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
    /// The last chunk before `[DONE]` with `stream_options.include_usage`: no choices, the
    /// usage, and (as llama-server sends it) the whole request's timings.
    pub fn usage_chunk(&self, finish: &Finish) -> Value {
        let mut chunk = self.chunk(Value::Null);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage_json(&finish.usage);
        chunk["timings"] = timings_json(&finish.usage, &finish.timings);
        chunk
    }
}

/// Several choices (`n` > 1): the shapes above, each choice with its `index`.
impl Envelope {
    /// The whole non-streaming response for `choices` (text and finish, in index order): each
    /// choice as [`Envelope::response`] builds it, with its `index`; `usage` sums them
    /// ([`sum_usage`], `per_prompt` choices for each prompt); `timings` are the first choice's.
    pub fn response_choices(&self, choices: &[(String, Finish)], per_prompt: usize) -> Value {
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
            body["usage"] = usage_json(&sum_usage(
                choices.iter().map(|(_, f)| &f.usage),
                per_prompt,
            ));
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

/// A finished request's `timings` (every endpoint's final result): [`TimingsJson`] from the
/// worker's usage and timings, with this server's extra `queue_ms`.
pub fn timings_json(u: &Usage, t: &Timings) -> Value {
    TimingsJson {
        // As llama-server: `prompt_n` counts the prompt tokens evaluated, `cache_n` those
        // reused.
        cache_n: u.cached_tokens,
        prompt_n: u.prompt_tokens.saturating_sub(u.cached_tokens),
        prompt_ms: t.prompt_ms,
        predicted_n: u.completion_tokens,
        predicted_ms: t.predicted_ms,
        queue_ms: Some(t.queue_ms),
    }
    .to_json()
}

/// llama-server's `timings` (`server_slot_stats::to_json`): counts and times, the rates
/// derived here so that every endpoint reports them alike.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TimingsJson {
    pub cache_n: u32,
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    /// Submitted until admitted; known only at the finish (not llama-server's).
    pub queue_ms: Option<f64>,
}

impl TimingsJson {
    pub fn to_json(&self) -> Value {
        let (prompt_per_token, prompt_per_second) = rates(self.prompt_n, self.prompt_ms);
        // As llama-server: the first token comes from the prompt's last batch, so the rate is
        // over the decode steps after it (`predicted_ms` runs from the first token on).
        let (predicted_per_token, predicted_per_second) =
            rates(self.predicted_n.saturating_sub(1), self.predicted_ms);
        let mut json = json!({
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": prompt_per_token,
            "prompt_per_second": prompt_per_second,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": predicted_per_token,
            "predicted_per_second": predicted_per_second,
        });
        if let Some(queue_ms) = self.queue_ms {
            json["queue_ms"] = json!(queue_ms);
        }
        json
    }
}

/// (ms per token, tokens per second); zeros when either is zero, as no rate is known yet.
fn rates(n: u32, ms: f64) -> (f64, f64) {
    if n > 0 && ms > 0.0 {
        (ms / f64::from(n), f64::from(n) * 1000.0 / ms)
    } else {
        (0.0, 0.0)
    }
}

/// llama-server's `prompt_progress` (`result_prompt_progress::to_json`).
pub fn progress_json(p: &PromptProgress) -> Value {
    json!({
        "total": p.total,
        "cache": p.cache,
        "processed": p.processed,
        "time_ms": p.time_ms,
    })
}

/// One stream choice's `timings` so far, for `timings_per_token`: the prompt side from the
/// worker's latest progress report, the predicted side from this router's count of tokens
/// and its clock from the first token to the latest (a worker sends no timings before the
/// finish). The first token's chunk thus has `predicted_ms` 0 and no rates yet.
#[derive(Debug, Clone, Default)]
pub struct RunningTimings {
    progress: Option<PromptProgress>,
    /// When the first and the latest token arrived.
    tokens_at: Option<(Instant, Instant)>,
    predicted: u32,
}

impl RunningTimings {
    /// Takes in one output: its progress report, or its tokens.
    pub fn on_output(&mut self, output: &SeqOutput) {
        self.on_output_at(output, Instant::now());
    }

    fn on_output_at(&mut self, output: &SeqOutput, now: Instant) {
        if let Some(progress) = output.progress {
            self.progress = Some(progress);
        }
        if !output.tokens.is_empty() {
            let first = self.tokens_at.map_or(now, |(first, _)| first);
            self.tokens_at = Some((first, now));
            let n = u32::try_from(output.tokens.len()).unwrap_or(u32::MAX);
            self.predicted = self.predicted.saturating_add(n);
        }
    }

    /// Takes in a progress report `output`; returns it, with the `timings` so far when the
    /// client asked for them, if the client asked for progress and no token came yet (a
    /// resumed request's worker sends none anyway).
    pub fn report(
        &mut self,
        output: &SeqOutput,
        reports: StreamReports,
    ) -> Option<(PromptProgress, Option<Value>)> {
        self.on_output(output);
        let progress = output.progress.filter(|_| reports.progress)?;
        if self.started() {
            return None;
        }
        Some((progress, reports.timings.then(|| self.json())))
    }

    /// Whether a generated token was seen (progress reports after it are not forwarded).
    pub fn started(&self) -> bool {
        self.tokens_at.is_some()
    }

    /// Prompt tokens in all, once a progress report told.
    pub fn prompt_tokens(&self) -> Option<u32> {
        self.progress.map(|p| p.total)
    }

    /// The `timings` object as of the latest output.
    pub fn json(&self) -> Value {
        let p = self.progress.unwrap_or(PromptProgress {
            total: 0,
            cache: 0,
            processed: 0,
            time_ms: 0.0,
        });
        TimingsJson {
            cache_n: p.cache,
            prompt_n: p.processed.saturating_sub(p.cache),
            prompt_ms: p.time_ms,
            predicted_n: self.predicted,
            predicted_ms: self
                .tokens_at
                .map_or(0.0, |(first, last)| (last - first).as_secs_f64() * 1000.0),
            queue_ms: None,
        }
        .to_json()
    }
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
            env.usage_chunk(&finish),
        ] {
            assert_eq!(chunk["id"], env.id);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "m");
        }
        assert_eq!(env.finish_chunk(&finish)["choices"][0]["delta"], json!({}));
        assert_eq!(env.usage_chunk(&finish)["choices"], json!([]));
        assert_eq!(env.usage_chunk(&finish)["usage"]["total_tokens"], 5);
        assert_eq!(env.usage_chunk(&finish)["timings"]["predicted_n"], 2);
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
            let one = env.response_choices(&[("a".into(), finish(FinishReason::Stop, 2))], 1);
            assert_eq!(one, env.response("a", &finish(FinishReason::Stop, 2)));
            let body = env.response_choices(
                &[
                    ("a".into(), finish(FinishReason::Stop, 2)),
                    ("b".into(), finish(FinishReason::Length, 5)),
                ],
                2,
            );
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

    #[test]
    fn progress_chunks_have_llama_server_shapes() {
        let progress = PromptProgress {
            total: 10,
            cache: 2,
            processed: 6,
            time_ms: 4.5,
        };
        let chat = Envelope::new(Endpoint::Chat, "m").progress_chunk(&progress);
        assert_eq!(
            chat["choices"][0]["delta"],
            json!({"role": "assistant", "content": null})
        );
        assert_eq!(
            chat["prompt_progress"],
            json!({"total": 10, "cache": 2, "processed": 6, "time_ms": 4.5})
        );
        let text = Envelope::new(Endpoint::Completions, "m").progress_chunk(&progress);
        assert_eq!(text["choices"][0]["text"], "");
        assert_eq!(text["prompt_progress"]["processed"], 6);
    }

    #[test]
    fn running_timings_follow_progress_and_tokens() {
        let id = llamapool_common::RequestId(1);
        let mut t = RunningTimings::default();
        let start = Instant::now();
        let progress = |processed, time_ms| {
            SeqOutput::progress(
                id,
                PromptProgress {
                    total: 10,
                    cache: 2,
                    processed,
                    time_ms,
                },
            )
        };
        t.on_output_at(&progress(2, 0.0), start);
        t.on_output_at(&progress(10, 40.0), start);
        assert!(!t.started());
        assert_eq!(t.prompt_tokens(), Some(10));
        let tokens = |n: usize| SeqOutput {
            tokens: vec![1; n],
            progress: None,
            ..progress(0, 0.0)
        };
        t.on_output_at(&tokens(1), start);
        assert_eq!(t.json()["predicted_ms"], 0.0);
        assert_eq!(t.json()["predicted_per_second"], 0.0);
        t.on_output_at(&tokens(2), start + std::time::Duration::from_millis(30));
        let json = t.json();
        assert_eq!(json["cache_n"], 2);
        assert_eq!(json["prompt_n"], 8);
        assert_eq!(json["prompt_ms"], 40.0);
        assert_eq!(json["prompt_per_second"], 200.0);
        assert_eq!(json["predicted_n"], 3);
        assert_eq!(json["predicted_ms"], 30.0);
        // Two decode steps after the first token, in 30 ms.
        let rate = json["predicted_per_second"].as_f64().unwrap();
        assert!((rate - 2000.0 / 30.0).abs() < 1e-9, "{rate}");
        assert!(json.get("queue_ms").is_none());
        assert!(t.started());
    }

    #[test]
    fn final_timings_have_every_llama_server_field_and_queue_ms() {
        let json = timings_json(
            &Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 1,
            },
            &Timings {
                queue_ms: 1.0,
                prompt_ms: 4.0,
                predicted_ms: 8.0,
            },
        );
        assert_eq!(
            json,
            json!({
                "cache_n": 1,
                "prompt_n": 2,
                "prompt_ms": 4.0,
                "prompt_per_token_ms": 2.0,
                "prompt_per_second": 500.0,
                "predicted_n": 4,
                "predicted_ms": 8.0,
                // 3 decode steps after the first token.
                "predicted_per_token_ms": 8.0 / 3.0,
                "predicted_per_second": 375.0,
                "queue_ms": 1.0,
            })
        );
    }
}
