//! llamapool-bench: the staged benchmark. Every stage runs the same workload (by default
//! 40 requests, 8 concurrent, 32 prompt tokens, 50 generated with `ignore_eos`, Gemma 3 270M)
//! and reports throughput and latency next to Stage 0, the raw batched-decode loop:
//!
//! | stage | what |
//! |---|---|
//! | 0 | raw llama.cpp batched decode in-process, no engine |
//! | 1 | the engine in-process |
//! | 2 | one worker process over its Unix socket, no HTTP |
//! | 3 | the router over HTTP with one worker (`--threads` threads) |
//! | 4 | the router over HTTP with the pool (one pinned one-thread worker per core) |
//! | 5 | the pool's shape in-process: one pinned one-thread engine per core, no IPC, no HTTP |
//!
//! `--url` runs the same HTTP load against any OpenAI-compatible server; `--sweep` repeats the
//! stages over concurrency levels and writes a JSON file and an SVG chart; `--interference`
//! runs each stage while an unpinned busy-loop process competes for the CPUs.
//!
//! `--chaos` runs the failure and overload checks instead (`chaos.rs`, docs/RELIABILITY.md);
//! `--multi-turn` the multi-turn chat workload (`multiturn.rs`); `--nodes N` several nodes
//! behind the Shepherd Model Gateway (`nodes.rs`, docs/DEPLOYMENT.md).

mod chaos;
mod chart;
mod external;
mod llama_server;
mod multiturn;
mod nodes;
mod procs;
mod stages;
mod versus;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use llamapool_bench::metrics::{self, StageReport};
use llamapool_common::settings::models_dir;
use llamapool_common::worker::{ContextConfig, FlashAttention};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Staged throughput and latency benchmark for llamapool"
)]
pub struct Args {
    /// GGUF model (default: Gemma 3 270M from the setup cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Requests in the whole run (per concurrency level with --sweep, at least 4 × the level).
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
    /// Threads of the single context (Stages 0 to 3).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Slots of the single context (Stages 0 to 3); default: max(concurrency, 8).
    #[arg(long)]
    slots: Option<u32>,
    /// Slots per pool worker (Stage 4); default: the concurrency spread over the workers, at least 4.
    #[arg(long)]
    pool_slots: Option<u32>,
    /// Tokens per decode call.
    #[arg(long, default_value_t = ContextConfig::default().n_batch)]
    n_batch: u32,
    /// Tokens per physical compute step (default: n_batch).
    #[arg(long)]
    n_ubatch: Option<u32>,
    /// Flash attention: auto, on or off.
    #[arg(long, default_value_t = ContextConfig::default().flash_attention)]
    flash_attention: FlashAttention,
    /// One KV buffer for all sequences (llama-server's --kv-unified); false: one stream each.
    #[arg(long, default_value_t = ContextConfig::default().kv_unified, action = clap::ArgAction::Set)]
    kv_unified: bool,
    /// The router's tokio threads in Stages 3 and 4 (0: its default).
    #[arg(long, default_value_t = 0)]
    router_threads: usize,
    /// Which stages to run, comma-separated.
    #[arg(long, default_value = "0,1,2,3,4,5", value_delimiter = ',')]
    stages: Vec<u8>,
    /// Measure an OpenAI-compatible server at this base URL (http://host:port) instead of the stages.
    #[arg(long)]
    url: Option<String>,
    /// The `model` field sent over HTTP with --url.
    #[arg(long, default_value = "bench")]
    served_model: String,
    /// Repeat over concurrency 1, 2, 4, 8, 16, 32; write sweep.json and sweep.svg.
    #[arg(long)]
    sweep: bool,
    /// Concurrency levels for --sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    levels: Vec<usize>,
    /// Run every stage twice: quiet, then with an unpinned busy-loop process competing.
    #[arg(long)]
    interference: bool,
    /// Run everything this many times (interleaved) and report each row's median run.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Where --sweep, --multi-turn and --nodes write their files.
    #[arg(long, default_value = "bench-results")]
    out_dir: PathBuf,
    /// Instead of the stages, the chaos and load run against a fresh router with --workers
    /// pinned workers (default model: SmolLM2): phase `kill` streams --concurrency requests
    /// of --max-tokens while a random worker gets SIGKILL every --kill-every-secs; phase
    /// `load` runs --clients clients; each for --duration-secs. Fails if anything was lost.
    #[arg(long)]
    chaos: bool,
    /// With --chaos: the phases to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "kill,load")]
    phases: Vec<String>,
    /// With --chaos: seconds each phase runs.
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
    /// With --chaos: seconds between two worker kills.
    #[arg(long, default_value_t = 5.0)]
    kill_every_secs: f64,
    /// With --chaos: concurrent clients of the load phase.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// With --chaos: tokens per request of the load phase.
    #[arg(long, default_value_t = 16)]
    load_max_tokens: u32,
    /// With --chaos: explicit workers of the router, one pinned one-thread worker per CPU;
    /// without it, the default layout (one adaptive worker per core).
    #[arg(long)]
    workers: Option<usize>,
    /// With --chaos: the router's server.max_queued (beyond the 16 slots per worker, then 429).
    #[arg(long, default_value_t = 64)]
    max_queued: usize,
    /// With --chaos: a request without progress for this many seconds counts as hung.
    #[arg(long, default_value_t = 60.0)]
    stall_secs: f64,
    /// Instead of the stages, the multi-turn chat workload (`multiturn.rs`, default model:
    /// SmolLM2): the prompt cache and prefix-affinity routing, llamapool with affinity on and
    /// off, and llama-server with --llama-server; --concurrency conversations in flight.
    #[arg(long)]
    multi_turn: bool,
    /// With --multi-turn: conversations in the run.
    #[arg(long, default_value_t = 16)]
    conversations: usize,
    /// With --multi-turn: turns per conversation.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// With --multi-turn: approximate length of each conversation's own system prompt.
    #[arg(long, default_value_t = 500)]
    system_tokens: usize,
    /// With --multi-turn: the most tokens of each reply (greedy).
    #[arg(long, default_value_t = 32)]
    reply_tokens: u32,
    /// With --multi-turn: also measure this llama-server binary.
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Instead of the stages, llamapool side by side with the llama-server binary at PATH
    /// (`versus.rs`): same model and workload, quiet and with a busy loop, llamapool's default
    /// config against llama-server -t 2, -t 1 and -t 2 with OMP_WAIT_POLICY=passive; --repeat
    /// interleaved rounds; prints the goal ratios and writes OUT_DIR/vs-llama-server.json
    /// (with --sweep also a quiet concurrency sweep, vs-llama-server-sweep.json).
    #[arg(long, value_name = "PATH")]
    vs_llama_server: Option<PathBuf>,
    /// With --vs-llama-server: the clients that measure every row, each on a fresh server:
    /// the built-in Rust client, the external Python one (bench/clients/stream_client.py, a
    /// fresh python3 process per run), or both; rows and goals are given per client. The
    /// --sweep uses the Rust client only.
    #[arg(long, value_enum, default_value_t = versus::ClientChoice::Both)]
    client: versus::ClientChoice,
    /// With --vs-llama-server: measure llamapool with this TOML config instead of the default
    /// one (server.listen, model.path and model.alias are overridden; no API key may be set).
    #[arg(long, value_name = "FILE", requires = "vs_llama_server")]
    vs_config: Option<PathBuf>,
    /// Instead of the stages, N llamapool nodes (one pinned worker each, SmolLM2) behind the
    /// Shepherd Model Gateway (`smg`, `pip install smg`) with file discovery (`nodes.rs`):
    /// the multi-turn workload (--conversations, --turns, --system-tokens, --reply-tokens,
    /// --concurrency) directly and through the gateway per --policies, the gateway's TTFT
    /// cost, a drain, a new node and a kill -9 under load; writes OUT_DIR/nodes.json.
    #[arg(long, value_name = "N")]
    nodes: Option<usize>,
    /// With --nodes: the smg executable (default: `smg` on the PATH).
    #[arg(long, value_name = "PATH")]
    smg: Option<PathBuf>,
    /// With --nodes: the gateway's policies to measure the workload under, comma-separated.
    #[arg(long, default_value = nodes::DEFAULT_POLICIES)]
    policies: String,
    /// (internal) spin forever: the interference process.
    #[arg(long, hide = true)]
    busy_loop: bool,
}

impl Args {
    /// `--model`, else SmolLM2 from the setup cache (the chat-template model of `--chaos` and
    /// `--multi-turn`); an error when the file is missing.
    pub fn chat_model_path(&self) -> Result<PathBuf> {
        let model = self
            .model
            .clone()
            .unwrap_or_else(|| models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        if !model.is_file() {
            bail!(
                "model {} not found: run scripts/setup or pass --model",
                model.display()
            );
        }
        Ok(model)
    }

    pub fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| models_dir().join("gemma-3-270m-q4_k_m.gguf"))
    }
}

/// A `/v1/completions` body of the HTTP stages and the chaos run: greedy, exactly `max_tokens`
/// generated (`ignore_eos`), and when `stream`, streamed with a final usage chunk.
fn completion_body(
    model: &str,
    prompt: impl serde::Serialize,
    max_tokens: u32,
    stream: bool,
) -> serde_json::Value {
    // Keys in sorted order, as the Python client writes them (`external.rs` checks the bytes):
    // serde_json keeps insertion order in this workspace.
    let mut body = json!({
        "ignore_eos": true,
        "max_tokens": max_tokens,
        "model": model,
        "prompt": prompt,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body["temperature"] = json!(0);
    body
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.busy_loop {
        procs::spin_forever();
    }
    if args.chaos {
        return chaos::run(&args);
    }
    if args.multi_turn {
        return multiturn::run(&args);
    }
    if args.nodes.is_some() {
        return nodes::run(&args);
    }
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
    if let Some(llama_server) = &args.vs_llama_server {
        return versus::run(&args, &workload, llama_server);
    }
    let levels = if args.sweep {
        args.levels.clone()
    } else {
        vec![args.concurrency]
    };
    let interference_modes: &[bool] = if args.interference {
        &[false, true]
    } else {
        &[false]
    };
    let mut reports: Vec<StageReport> = Vec::new();
    for &concurrency in &levels {
        let requests = if args.sweep {
            args.requests.max(4 * concurrency)
        } else {
            args.requests
        };
        let run = stages::Run {
            args: &args,
            workload: &workload,
            concurrency,
            requests,
        };
        for (rep, &interference) in
            (0..args.repeat).flat_map(|r| interference_modes.iter().map(move |i| (r, i)))
        {
            let targets: Vec<stages::Target> = match &args.url {
                Some(url) => vec![stages::Target::Url(url.clone())],
                None => args
                    .stages
                    .iter()
                    .map(|&s| stages::Target::Stage(s))
                    .collect(),
            };
            for target in targets {
                eprintln!(
                    "{}: {requests} requests at concurrency {concurrency}, run {}{}",
                    target.label(),
                    rep + 1,
                    if interference {
                        ", with a busy loop"
                    } else {
                        ""
                    }
                );
                let busy = interference.then(procs::BusyLoop::start).transpose()?;
                let report = run.measure(&target);
                drop(busy);
                let mut report = report.with_context(|| format!("{} failed", target.label()))?;
                report.concurrency = concurrency;
                report.interference = interference;
                reports.push(report);
            }
        }
    }
    let workload_json = json!({
        "model": model,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "levels": levels,
        "repeat": args.repeat,
    });
    let reports = metrics::medians(&reports);
    let report = metrics::json_report(workload_json, &reports);
    if args.sweep {
        std::fs::create_dir_all(&args.out_dir)?;
        let json_path = args.out_dir.join("sweep.json");
        let svg_path = args.out_dir.join("sweep.svg");
        std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
        std::fs::write(&svg_path, chart::svg(&metrics::with_ratios(&reports)))?;
        eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", metrics::table(&reports));
    }
    Ok(())
}
