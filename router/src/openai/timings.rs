//! llama-server's `timings` and `prompt_progress` objects, which every generating endpoint
//! reports alike (OpenAI-shaped responses and chunks as an extension, native results as
//! llama-server does): [`TimingsBody`] from a finished request's usage and timings, or, while
//! a stream runs, from [`RunningTimings`].

use std::time::Instant;

use llamapool_common::{PromptProgress, SeqOutput, Timings, Usage};
use serde::Serialize;

use super::request::StreamReports;

/// llama-server's `timings` (`server_slot_stats::to_json`): counts and times, the rates
/// derived from them so that every endpoint reports them alike, and this server's `queue_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimingsBody {
    pub cache_n: u32,
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_token_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_token_ms: f64,
    pub predicted_per_second: f64,
    /// Submitted until admitted; known only at the finish (not llama-server's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
}

impl TimingsBody {
    /// The timings of these counts: `prompt_n` prompt tokens evaluated in `prompt_ms`,
    /// `predicted_n` tokens generated with `predicted_ms` from the first to the last.
    pub fn new(
        cache_n: u32,
        (prompt_n, prompt_ms): (u32, f64),
        (predicted_n, predicted_ms): (u32, f64),
        queue_ms: Option<f64>,
    ) -> Self {
        let (prompt_per_token_ms, prompt_per_second) = rates(prompt_n, prompt_ms);
        // As llama-server: the first token comes from the prompt's last batch, so the rate is
        // over the decode steps after it (`predicted_ms` runs from the first token on).
        let (predicted_per_token_ms, predicted_per_second) =
            rates(predicted_n.saturating_sub(1), predicted_ms);
        Self {
            cache_n,
            prompt_n,
            prompt_ms,
            prompt_per_token_ms,
            prompt_per_second,
            predicted_n,
            predicted_ms,
            predicted_per_token_ms,
            predicted_per_second,
            queue_ms,
        }
    }

    /// A finished request's timings, from the worker's usage and timings.
    pub fn finished(u: &Usage, t: &Timings) -> Self {
        // As llama-server: `prompt_n` counts the prompt tokens evaluated, `cache_n` those
        // reused.
        Self::new(
            u.cached_tokens,
            (u.prompt_tokens.saturating_sub(u.cached_tokens), t.prompt_ms),
            (u.completion_tokens, t.predicted_ms),
            Some(t.queue_ms),
        )
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProgressBody {
    pub total: u32,
    pub cache: u32,
    pub processed: u32,
    pub time_ms: f64,
}

impl From<&PromptProgress> for ProgressBody {
    fn from(p: &PromptProgress) -> Self {
        Self {
            total: p.total,
            cache: p.cache,
            processed: p.processed,
            time_ms: p.time_ms,
        }
    }
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

/// A progress report to forward: the report, and the `timings` so far when asked for.
pub type Report = (ProgressBody, Option<TimingsBody>);

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
    pub fn report(&mut self, output: &SeqOutput, reports: StreamReports) -> Option<Report> {
        self.on_output(output);
        let progress = output.progress.filter(|_| reports.progress)?;
        if self.started() {
            return None;
        }
        Some((
            ProgressBody::from(&progress),
            reports.timings.then(|| self.body()),
        ))
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
    pub fn body(&self) -> TimingsBody {
        let p = self.progress.unwrap_or(PromptProgress {
            total: 0,
            cache: 0,
            processed: 0,
            time_ms: 0.0,
        });
        let predicted_ms = self
            .tokens_at
            .map_or(0.0, |(first, last)| (last - first).as_secs_f64() * 1000.0);
        TimingsBody::new(
            p.cache,
            (p.processed.saturating_sub(p.cache), p.time_ms),
            (self.predicted, predicted_ms),
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn json_of(value: impl Serialize) -> serde_json::Value {
        serde_json::to_value(value).unwrap()
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
            parsed: false,
            chat: Vec::new(),
            ..progress(0, 0.0)
        };
        t.on_output_at(&tokens(1), start);
        assert_eq!(t.body().predicted_ms, 0.0);
        assert_eq!(t.body().predicted_per_second, 0.0);
        t.on_output_at(&tokens(2), start + std::time::Duration::from_millis(30));
        let json = json_of(t.body());
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
        let body = TimingsBody::finished(
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
            json_of(body),
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
