//! Per-request timing records and the report, with vLLM's serving-benchmark definitions:
//! TTFT to the first content; TPOT = (end-to-end − TTFT) / (tokens − 1) per request; ITL the
//! pooled gaps between successive chunks.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

/// What one request saw, measured at the client.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    pub ok: bool,
    pub tokens: u32,
    pub ttft: Duration,
    pub e2e: Duration,
    /// Gaps between successive chunks after the first.
    pub itls: Vec<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// "0" to "4", or "url".
    pub stage: String,
    pub name: String,
    pub concurrency: usize,
    /// A busy-loop process competed for the CPUs during the run.
    pub interference: bool,
    pub tokens_per_s: f64,
    /// Against Stage 0, when Stage 0 ran.
    pub vs_stage0: Option<f64>,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub failed: usize,
    pub generated_tokens: u64,
    /// With --repeat: every run's tokens/s; the row shows the median run.
    pub runs_tokens_per_s: Vec<f64>,
    pub wall_s: f64,
    /// llamapool's adaptive workers during the run, read from its `/metrics` before and
    /// after (`None` for other servers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolActivity>,
}

/// How often llamapool's workers changed shape and its requests moved during one run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PoolActivity {
    /// Switches between wide and narrow, all workers together, per minute of the run.
    pub shape_changes_per_min: f64,
    /// Running requests moved between live workers (`pack` and `split`).
    pub rebalanced: u64,
}

/// The `p`th percentile (0 to 100, nearest rank) of `values`, which it sorts; NaN when empty.
/// The sum of the samples in a Prometheus text exposition whose line starts with `series`
/// (a name, with `{` to take only labelled ones) and contains `labels` (`""` for any): a
/// family's total over its label sets. 0 when none matches.
pub fn sum_samples(text: &str, series: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn summarize(
    stage: &str,
    name: &str,
    records: &[RequestRecord],
    wall: Duration,
) -> StageReport {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
    let generated: u64 = ok.iter().map(|r| u64::from(r.tokens)).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|r| ms(r.ttft)).collect();
    let mut tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.tokens > 1)
        .map(|r| ms(r.e2e.saturating_sub(r.ttft)) / f64::from(r.tokens - 1))
        .collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|r| r.itls.iter().map(|d| ms(*d)))
        .collect();
    StageReport {
        stage: stage.to_string(),
        name: name.to_string(),
        concurrency: 0,
        interference: false,
        tokens_per_s: generated as f64 / wall.as_secs_f64(),
        vs_stage0: None,
        ttft_p50_ms: percentile(&mut ttft, 50.0),
        ttft_p99_ms: percentile(&mut ttft, 99.0),
        tpot_p50_ms: percentile(&mut tpot, 50.0),
        itl_p99_ms: percentile(&mut itl, 99.0),
        failed: records.len() - ok.len(),
        runs_tokens_per_s: Vec::new(),
        generated_tokens: generated,
        wall_s: wall.as_secs_f64(),
        pool: None,
    }
}

/// Collapses repeated runs of the same (stage, concurrency, interference) into the median
/// run by throughput, keeping every run's tokens/s; the order of first appearance is kept.
pub fn medians(reports: &[StageReport]) -> Vec<StageReport> {
    let key = |r: &StageReport| (r.stage.clone(), r.concurrency, r.interference);
    let mut out: Vec<StageReport> = Vec::new();
    for r in reports {
        if out.iter().any(|o| key(o) == key(r)) {
            continue;
        }
        let mut runs: Vec<&StageReport> = reports.iter().filter(|x| key(x) == key(r)).collect();
        runs.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
        let mut median = runs[runs.len() / 2].clone();
        median.runs_tokens_per_s = reports
            .iter()
            .filter(|x| key(x) == key(r))
            .map(|x| x.tokens_per_s)
            .collect();
        median.failed = runs.iter().map(|x| x.failed).sum();
        out.push(median);
    }
    out
}

/// Fills `vs_stage0` from the Stage 0 row of the same concurrency and interference setting.
pub fn with_ratios(reports: &[StageReport]) -> Vec<StageReport> {
    reports
        .iter()
        .cloned()
        .map(|mut r| {
            let base = reports
                .iter()
                .find(|b| {
                    b.stage == "0"
                        && b.concurrency == r.concurrency
                        && b.interference == r.interference
                })
                .map(|b| b.tokens_per_s);
            r.vs_stage0 = base.map(|b| r.tokens_per_s / b);
            r
        })
        .collect()
}

pub fn table(reports: &[StageReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| stage | what | conc. | tokens/s | vs stage 0 | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | failed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for r in with_ratios(reports) {
        let ratio = r
            .vs_stage0
            .map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
        let name = if r.interference {
            format!("{} + busy loop", r.name)
        } else {
            r.name.clone()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
            r.stage,
            name,
            r.concurrency,
            r.tokens_per_s,
            ratio,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p50_ms,
            r.itl_p99_ms,
            r.failed
        );
    }
    out
}

pub fn json_report(workload: serde_json::Value, reports: &[StageReport]) -> serde_json::Value {
    serde_json::json!({
        "workload": workload,
        "stages": with_ratios(reports),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_follows_vllm_definitions() {
        let r = RequestRecord {
            ok: true,
            tokens: 3,
            ttft: Duration::from_millis(10),
            e2e: Duration::from_millis(30),
            itls: vec![Duration::from_millis(8), Duration::from_millis(12)],
        };
        let failed = RequestRecord::default();
        let s = summarize("1", "x", &[r, failed], Duration::from_secs(1));
        assert_eq!(s.failed, 1);
        assert_eq!(s.generated_tokens, 3);
        assert!((s.tpot_p50_ms - 10.0).abs() < 1e-9);
        assert!((s.itl_p99_ms - 12.0).abs() < 1e-9);
        assert!((s.tokens_per_s - 3.0).abs() < 1e-9);
    }
}
