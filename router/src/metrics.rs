//! Counters for `/metrics`, under the names llama-server's dashboards already scrape.
//! Written by connection tasks when a request finishes; read when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use llamapool_common::Finish;

#[derive(Debug, Default)]
pub struct Metrics {
    prompt_tokens: AtomicU64,
    predicted_tokens: AtomicU64,
    prompt_micros: AtomicU64,
    predicted_micros: AtomicU64,
    requests: AtomicU64,
}

/// A point-in-time view of the pool for the gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub processing: usize,
    pub deferred: usize,
    pub decode_calls: u64,
    pub ready_workers: usize,
}

impl Metrics {
    pub fn record_finish(&self, finish: &Finish) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(u64::from(finish.usage.prompt_tokens), Ordering::Relaxed);
        self.predicted_tokens
            .fetch_add(u64::from(finish.usage.completion_tokens), Ordering::Relaxed);
        self.prompt_micros.fetch_add(
            (finish.timings.prompt_ms * 1000.0) as u64,
            Ordering::Relaxed,
        );
        self.predicted_micros.fetch_add(
            (finish.timings.predicted_ms * 1000.0) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(out, "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n");
        };
        let secs = |a: &AtomicU64| format!("{:.6}", a.load(Ordering::Relaxed) as f64 / 1e6);
        metric(
            "prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "prompt_seconds_total",
            "counter",
            "Prompt process time.",
            secs(&self.prompt_micros),
        );
        metric(
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            self.predicted_tokens.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "tokens_predicted_seconds_total",
            "counter",
            "Predict process time.",
            secs(&self.predicted_micros),
        );
        metric(
            "n_decode_total",
            "counter",
            "Total number of llama_decode() calls.",
            g.decode_calls.to_string(),
        );
        metric(
            "requests_processing",
            "gauge",
            "Number of requests processing.",
            g.processing.to_string(),
        );
        metric(
            "requests_deferred",
            "gauge",
            "Number of requests deferred.",
            g.deferred.to_string(),
        );
        metric(
            "requests_total",
            "counter",
            "Number of finished requests.",
            self.requests.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "workers_ready",
            "gauge",
            "Number of ready workers.",
            g.ready_workers.to_string(),
        );
        out
    }
}
