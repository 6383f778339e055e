//! llamapool-bench: the staged benchmark. Every stage runs the same workload (MODELS.md:
//! 40 requests, 8 concurrent, 32 prompt tokens, 50 generated with `ignore_eos`) and reports
//! throughput and latency against Stage 0, the raw batched-decode loop.

mod metrics;
mod stages;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

use metrics::StageReport;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Staged throughput and latency benchmark for llamapool"
)]
pub struct Args {
    /// GGUF model (default: Gemma 3 270M from the setup cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Requests in the whole run.
    #[arg(long, default_value_t = 40)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Prompt length in tokens (the prompt is made exactly this long for the model).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per request (end-of-generation is ignored).
    #[arg(long, default_value_t = 50)]
    max_tokens: u32,
    /// Threads of the single in-process context (Stages 0 and 1).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Sequence slots of the in-process context (default: the concurrency).
    #[arg(long)]
    slots: Option<u32>,
    /// Tokens per decode call.
    #[arg(long, default_value_t = 512)]
    n_batch: u32,
    /// Tokens per physical compute step (default: n_batch).
    #[arg(long)]
    n_ubatch: Option<u32>,
    /// Flash attention: auto, on or off.
    #[arg(long, default_value = "auto")]
    flash_attention: llamapool_worker::FlashAttention,
    /// One KV buffer for all sequences (llama-server's --kv-unified); false: one stream each.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kv_unified: bool,
    /// Which stages to run, comma-separated.
    #[arg(long, default_value = "0,1", value_delimiter = ',')]
    stages: Vec<u8>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| models_dir().join("gemma-3-270m-q4_k_m.gguf"))
    }

    pub fn slots(&self) -> u32 {
        self.slots
            .unwrap_or(u32::try_from(self.concurrency).unwrap_or(u32::MAX))
    }
}

fn models_dir() -> PathBuf {
    std::env::var_os("LLAMAPOOL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into()))
                .join(".cache/llamapool/models")
        })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.requests == 0
        || args.concurrency == 0
        || args.max_tokens == 0
        || args.prompt_tokens == 0
    {
        bail!("--requests, --concurrency, --prompt-tokens and --max-tokens must all be at least 1");
    }
    let model = args.model_path();
    if !model.is_file() {
        bail!(
            "model {} not found: run scripts/setup or pass --model",
            model.display()
        );
    }
    let workload = stages::Workload::new(&args).context("building the workload")?;
    let mut reports: Vec<StageReport> = Vec::new();
    for &stage in &args.stages {
        eprintln!(
            "stage {stage}: running {} requests at concurrency {}",
            args.requests, args.concurrency
        );
        let report = stages::run(stage, &args, &workload)?;
        reports.push(report);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&metrics::json_report(&args, &reports))?
        );
    } else {
        print!("{}", metrics::table(&reports));
    }
    Ok(())
}
