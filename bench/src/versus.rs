//! `--vs-llama-server PATH`: llamapool side by side with llama-server in one run, on the same
//! model and the same HTTP workload as `--url` (streamed `/v1/completions`, token-id prompts,
//! `ignore_eos`). This module owns the comparison: starting and stopping both servers, the
//! interleaved rounds over the rows and the two conditions (quiet, and with the busy loop of
//! `--interference`), the ratios the project's goals are stated in, and their report.
//!
//! llamapool runs with a configuration that sets only the model (so what is measured is the
//! router's built-in default worker layout, whatever it is at the time), or with `--vs-config`.
//! llama-server runs as in docs/PERFORMANCE.md: `-np 8 -c 8192 -kvu`, with `-t 2`, `-t 1`,
//! and `-t 2` under `OMP_WAIT_POLICY=passive`.
//!
//! Every (server, condition) is measured with each client of `--client` (default both): the
//! built-in Rust client ([`http_load`]) and the external Python one ([`crate::external`], a
//! fresh `python3` process per run), each run on a fresh server; the rows and the goals are
//! given per client. The warm-up request is always the Rust client's. The `--sweep` runs the
//! Rust client only.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use llamapool_bench::metrics::{self, sum_samples, summarize, PoolActivity, StageReport};
use llamapool_common::Token;
use llamapool_testkit::{binary, Router};
use serde_json::json;

use crate::external::PythonClient;
use crate::llama_server::{LlamaServer, Shape};
use crate::stages::{http_load, http_request, Progress, Workload};
use crate::{procs, Args};

/// How long a server may take to load the model and answer.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Tokens of the warm-up request before each measured run.
const WARM_UP_TOKENS: u32 = 4;
/// The goals of docs/PERFORMANCE.md, as ratios of tokens/s.
const QUIET_GOAL: f64 = 1.05;
const BUSY_GOAL: f64 = 1.15;

/// `--client`: which clients measure each (server, condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientChoice {
    /// The built-in Rust client only.
    Rust,
    /// The external Python client only (`bench/clients/stream_client.py`).
    Python,
    /// Both, one after the other on fresh servers.
    Both,
}

impl ClientChoice {
    fn clients(self) -> &'static [Client] {
        match self {
            Self::Rust => &[Client::Rust],
            Self::Python => &[Client::Python],
            Self::Both => &[Client::Rust, Client::Python],
        }
    }
}

/// The client that sends a run's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// In this process: [`http_load`].
    Rust,
    /// A `python3` process: [`PythonClient`].
    Python,
}

impl Client {
    fn key(self) -> &'static str {
        match self {
            Self::Rust => "rust",
            Self::Python => "python",
        }
    }
}

/// The row key of `server` measured by `client` (the report's `stage` field, which
/// `metrics::medians` groups by), e.g. `llamapool/python`.
fn row_key(server: Server, client: Client) -> String {
    format!("{}/{}", server.key(), client.key())
}

/// One server setting of the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    /// `llamapool-router` with the default layout (or `--vs-config`).
    Llamapool,
    /// llama-server with `-t threads`, and `OMP_WAIT_POLICY=passive` when `passive`.
    LlamaServer { threads: u32, passive: bool },
}

const LLAMAPOOL: Server = Server::Llamapool;
const LS_T2: Server = Server::LlamaServer {
    threads: 2,
    passive: false,
};
const LS_T1: Server = Server::LlamaServer {
    threads: 1,
    passive: false,
};
const LS_T2_PASSIVE: Server = Server::LlamaServer {
    threads: 2,
    passive: true,
};

impl Server {
    /// The server's part of the row key ([`row_key`]).
    fn key(self) -> &'static str {
        match self {
            Self::Llamapool => "llamapool",
            Self::LlamaServer {
                threads: 1,
                passive: false,
            } => "ls-t1",
            Self::LlamaServer { passive: true, .. } => "ls-t2-passive",
            Self::LlamaServer { .. } => "ls-t2",
        }
    }

    fn name(self, vs_config: Option<&Path>) -> String {
        match (self, vs_config) {
            (Self::Llamapool, None) => "llamapool (default config)".into(),
            (Self::Llamapool, Some(path)) => format!("llamapool ({})", path.display()),
            (Self::LlamaServer { threads, passive }, _) => format!(
                "llama-server -t {threads}{}",
                if passive {
                    " OMP_WAIT_POLICY=passive"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The rows of each condition: the quiet one has no passive row, since passive waiting only
/// matters when something else wants the CPUs.
///
/// llama-server `-t 2` is left out of the busy rows: its spinning threads collapse under the
/// busy loop (4–5 tokens/s, TPOT 1.4–2.2 s, docs/PERFORMANCE.md), so one run of the workload
/// would take minutes, and it is not the better llama-server configuration there.
fn rows(busy: bool) -> &'static [Server] {
    if busy {
        &[LLAMAPOOL, LS_T1, LS_T2_PASSIVE]
    } else {
        &[LLAMAPOOL, LS_T2, LS_T1]
    }
}

/// The llamapool configuration of the default row: the model and nothing about workers, so
/// the router's built-in default layout is what gets measured.
fn default_config(model: &Path, alias: &str) -> String {
    // A base Gemma GGUF has no chat template (configs/gemma-bench.toml); other models bring theirs.
    let gemma = model
        .file_name()
        .is_some_and(|n| n.to_string_lossy().to_lowercase().contains("gemma"));
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[model]\npath = {path}\nalias = {alias}\n{template}",
        path = json!(model),
        alias = json!(alias),
        template = if gemma {
            "chat_template = \"gemma\"\n"
        } else {
            ""
        },
    )
}

/// Starts `llamapool-router` with the default configuration, or with `vs_config` (its
/// `server.listen`, `model.path` and `model.alias` overridden), and waits for its workers.
fn start_llamapool(model: &Path, alias: &str, vs_config: Option<&Path>) -> Result<Router> {
    let mut command = Command::new(binary("llamapool-router")?);
    // llama.cpp's model-load warnings would repeat for every run, between the progress lines.
    command.env("RUST_LOG", "error");
    // Inherited LLAMAPOOL__ variables would change the configuration under measurement.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LLAMAPOOL__") {
            command.env_remove(key);
        }
    }
    let config = match vs_config {
        None => default_config(model, alias),
        Some(path) => {
            command.args(["--set", "server.listen=127.0.0.1:0"]);
            command
                .arg("--set")
                .arg(format!("model.path={}", model.display()));
            command.arg("--set").arg(format!("model.alias={alias}"));
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    let mut router = Router::launch_with(command, &config)?;
    router.wait_ready(START_TIMEOUT, None)?;
    Ok(router)
}

/// A running server of either kind; dropping it stops it.
enum Running {
    Llamapool(Router),
    LlamaServer(LlamaServer),
}

impl Running {
    fn addr(&self) -> &str {
        match self {
            Self::Llamapool(r) => &r.addr,
            Self::LlamaServer(s) => &s.addr,
        }
    }
}

/// What every run of the comparison shares.
struct Comparison<'a> {
    args: &'a Args,
    workload: &'a Workload,
    llama_server: &'a Path,
    model: PathBuf,
    /// The `model` field sent to both servers: llamapool's alias (llama-server takes any).
    alias: String,
    /// llamapool's worker layout as `GET /workers` first showed it (cpus, threads, slots, wide shape), so
    /// a report says which default it measured.
    layout: RefCell<Option<serde_json::Value>>,
    /// The script of the Python client, written out once when a run needs it.
    python: Option<PythonClient>,
}

impl Comparison<'_> {
    fn start(&self, server: Server, concurrency: usize) -> Result<Running> {
        Ok(match server {
            Server::Llamapool => Running::Llamapool(start_llamapool(
                &self.model,
                &self.alias,
                self.args.vs_config.as_deref(),
            )?),
            Server::LlamaServer { threads, passive } => Running::LlamaServer(LlamaServer::start(
                self.llama_server,
                &self.model,
                Shape {
                    threads,
                    passive,
                    slots: concurrency.max(8),
                    cells_per_slot: 1024,
                },
            )?),
        })
    }

    /// Keeps the first layout llamapool reports.
    fn note_layout(&self, router: &Router) {
        if self.layout.borrow().is_some() {
            return;
        }
        let Some(body) = router
            .try_request("GET", "/workers", None)
            .ok()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        else {
            return;
        };
        let workers: Vec<serde_json::Value> = body["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                json!({"cpus": w["cpus"], "threads": w["threads"], "slots": w["slots"],
                       "wide_cpus": w["wide_cpus"], "wide_threads": w["wide_threads"]})
            })
            .collect();
        eprintln!("llamapool workers: {}", json!(workers));
        *self.layout.borrow_mut() = Some(json!(workers));
    }

    /// One short request, so first-request costs (page faults, thread pools) stay out of
    /// the measurement. Its prompt is a measured one reversed: nothing a measured request
    /// could find in a prompt cache.
    fn warm_up(&self, addr: &str) -> Result<()> {
        let prompt: Vec<Token> = self.workload.prompts[0].iter().rev().copied().collect();
        let record = http_request(addr, &self.alias, &prompt, WARM_UP_TOKENS)
            .context("the warm-up request failed")?;
        if !record.ok {
            bail!("the warm-up request did not generate {WARM_UP_TOKENS} tokens");
        }
        Ok(())
    }

    /// One measured run: the busy loop (when `busy`, started first as with `--interference`),
    /// a fresh server, a warm-up request, then the workload sent by `client`; everything
    /// stopped afterwards.
    fn measure(
        &self,
        server: Server,
        client: Client,
        busy: bool,
        concurrency: usize,
        requests: usize,
    ) -> Result<StageReport> {
        let name = format!(
            "{} · {} client",
            server.name(self.args.vs_config.as_deref()),
            client.key()
        );
        eprintln!(
            "{name}: {requests} requests at concurrency {concurrency}{}",
            if busy { ", with a busy loop" } else { "" }
        );
        let busy_loop = busy.then(procs::BusyLoop::start).transpose()?;
        let running = self
            .start(server, concurrency)
            .with_context(|| format!("starting {name}"))?;
        if let Running::Llamapool(router) = &running {
            self.note_layout(router);
        }
        self.warm_up(running.addr())
            .with_context(|| format!("warming up {name}"))?;
        let prompts = &self.workload.prompts[..requests];
        let pool_before = pool_counters(&running);
        let (records, wall) = match client {
            Client::Rust => {
                let progress = Progress::start(requests);
                let load = http_load(
                    running.addr(),
                    &self.alias,
                    prompts,
                    concurrency,
                    self.args.max_tokens,
                    &progress,
                );
                progress.finish();
                load
            }
            Client::Python => self
                .python
                .as_ref()
                .context("the python client was not set up")?
                .load(
                    running.addr(),
                    &self.alias,
                    prompts,
                    concurrency,
                    self.args.max_tokens,
                )
                .with_context(|| format!("the python client against {name}"))?,
        };
        let pool_after = pool_counters(&running);
        drop(running);
        drop(busy_loop);
        let mut report = summarize(&row_key(server, client), &name, &records, wall);
        report.concurrency = concurrency;
        report.interference = busy;
        report.pool = pool_before
            .zip(pool_after)
            .map(|(before, after)| PoolActivity {
                shape_changes_per_min: (after.0 - before.0) * 60.0 / wall.as_secs_f64(),
                rebalanced: (after.1 - before.1) as u64,
            });
        Ok(report)
    }
}

/// llamapool's shape changes (all workers) and rebalanced requests so far, from its
/// `/metrics`; `None` for llama-server.
fn pool_counters(running: &Running) -> Option<(f64, f64)> {
    let Running::Llamapool(router) = running else {
        return None;
    };
    let text = router.try_request("GET", "/metrics", None).ok()?.text();
    Some((
        sum_samples(&text, "llamapool_worker_shape_changes_total{", ""),
        sum_samples(&text, "llamapool_requests_rebalanced_total{", ""),
    ))
}

/// Runs the comparison (and with `--sweep` the quiet concurrency sweep), prints the report
/// and writes `vs-llama-server.json` (and `vs-llama-server-sweep.json`) into `--out-dir`.
pub fn run(args: &Args, workload: &Workload, llama_server: &Path) -> Result<()> {
    if !llama_server.is_file() {
        bail!("llama-server binary {} not found", llama_server.display());
    }
    let model = args.model_path();
    let alias = model
        .file_stem()
        .map_or("bench".into(), |s| s.to_string_lossy().into_owned());
    let clients = args.client.clients();
    let python = if clients.contains(&Client::Python) {
        Some(PythonClient::new().context("setting up the python client")?)
    } else {
        None
    };
    let cmp = Comparison {
        args,
        workload,
        llama_server,
        model: model.clone(),
        alias,
        layout: RefCell::new(None),
        python,
    };
    let reports = measure_rounds(&cmp)?;
    let sweep = if args.sweep {
        measure_sweep(&cmp)?
    } else {
        Vec::new()
    };
    let reports = metrics::medians(&reports);
    let sweep = metrics::medians(&sweep);
    let goals: Vec<Goals> = clients
        .iter()
        .map(|&client| Goals::from_reports(&reports, client))
        .collect();
    let workload_json = json!({
        "model": model,
        "llama_server": llama_server,
        "vs_config": args.vs_config,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "clients": clients.iter().map(|c| c.key()).collect::<Vec<_>>(),
        "llamapool_workers": cmp.layout.borrow().clone(),
    });
    let report = json!({
        "workload": workload_json,
        "rows": rows_json(&reports),
        "goals": goals_json(&goals),
        "sweep": sweep_json(&sweep),
    });
    std::fs::create_dir_all(&args.out_dir)?;
    let path = args.out_dir.join("vs-llama-server.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", path.display());
    if args.sweep {
        let path = args.out_dir.join("vs-llama-server-sweep.json");
        let sweep_report = json!({
            "workload": report["workload"],
            "levels": args.levels,
            "sweep": sweep_json(&sweep),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&sweep_report)?)?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&reports));
        print!("{}", goals_table(&goals));
        if args.sweep {
            print!("{}", sweep_table(&sweep));
        }
    }
    Ok(())
}

/// The order of the measured runs: per round, per condition, per server, per client, so
/// drift over the run hits all rows alike.
fn schedule(repeat: usize, clients: &[Client]) -> Vec<(usize, bool, Server, Client)> {
    let mut runs = Vec::new();
    for round in 0..repeat {
        for busy in [false, true] {
            for &server in rows(busy) {
                for &client in clients {
                    runs.push((round, busy, server, client));
                }
            }
        }
    }
    runs
}

/// `--repeat` rounds, each running every (row, condition, client) once in the same order.
fn measure_rounds(cmp: &Comparison) -> Result<Vec<StageReport>> {
    let mut reports = Vec::new();
    let mut last_round = None;
    for (round, busy, server, client) in schedule(cmp.args.repeat, cmp.args.client.clients()) {
        if last_round != Some(round) {
            eprintln!("round {} of {}", round + 1, cmp.args.repeat);
            last_round = Some(round);
        }
        reports.push(cmp.measure(
            server,
            client,
            busy,
            cmp.args.concurrency,
            cmp.args.requests,
        )?);
    }
    Ok(reports)
}

/// The report's rows, each with its `server` and `client` besides the `stage` key.
fn rows_json(reports: &[StageReport]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let mut row = json!(r);
            if let Some((server, client)) = r.stage.split_once('/') {
                row["server"] = json!(server);
                row["client"] = json!(client);
            }
            row
        })
        .collect();
    json!(rows)
}

/// The quiet sweep: llamapool and llama-server -t 2 at every `--levels` concurrency, at least
/// 4 requests per client thread, rounds interleaved as in [`measure_rounds`]; the Rust client only.
fn measure_sweep(cmp: &Comparison) -> Result<Vec<StageReport>> {
    let mut reports = Vec::new();
    for round in 0..cmp.args.repeat {
        eprintln!("sweep round {} of {}", round + 1, cmp.args.repeat);
        for &level in &cmp.args.levels {
            let requests = cmp.args.requests.max(4 * level);
            for server in [LLAMAPOOL, LS_T2] {
                reports.push(cmp.measure(server, Client::Rust, false, level, requests)?);
            }
        }
    }
    Ok(reports)
}

/// The row `key` of a condition.
fn find<'a>(reports: &'a [StageReport], key: &str, busy: bool) -> Option<&'a StageReport> {
    reports
        .iter()
        .find(|r| r.stage == key && r.interference == busy)
}

/// The numbers the project's goals are stated in, for one client: llamapool's rows against
/// llama-server's rows measured by the same client.
struct Goals {
    client: Client,
    /// llamapool quiet ÷ llama-server -t 2 quiet (tokens/s).
    quiet: f64,
    /// llamapool busy ÷ the better of llama-server -t 1 and -t 2 passive, busy (tokens/s).
    busy: f64,
    /// TTFT p50, quiet: llamapool and llama-server -t 2 (ms).
    ttft_llamapool_ms: f64,
    ttft_llama_server_ms: f64,
    /// ITL p99, quiet: llamapool and llama-server -t 2 (ms).
    itl_llamapool_ms: f64,
    itl_llama_server_ms: f64,
}

impl Goals {
    fn from_reports(reports: &[StageReport], client: Client) -> Self {
        let row = |server, busy| find(reports, &row_key(server, client), busy);
        let tps = |server, busy| row(server, busy).map_or(f64::NAN, |r| r.tokens_per_s);
        let quiet = |server, f: fn(&StageReport) -> f64| row(server, false).map_or(f64::NAN, f);
        Self {
            client,
            quiet: tps(LLAMAPOOL, false) / tps(LS_T2, false),
            busy: tps(LLAMAPOOL, true) / tps(LS_T1, true).max(tps(LS_T2_PASSIVE, true)),
            ttft_llamapool_ms: quiet(LLAMAPOOL, |r| r.ttft_p50_ms),
            ttft_llama_server_ms: quiet(LS_T2, |r| r.ttft_p50_ms),
            itl_llamapool_ms: quiet(LLAMAPOOL, |r| r.itl_p99_ms),
            itl_llama_server_ms: quiet(LS_T2, |r| r.itl_p99_ms),
        }
    }

    fn quiet_met(&self) -> bool {
        self.quiet >= QUIET_GOAL
    }

    fn busy_met(&self) -> bool {
        self.busy >= BUSY_GOAL
    }

    fn ttft_met(&self) -> bool {
        self.ttft_llamapool_ms <= self.ttft_llama_server_ms
    }

    fn itl_met(&self) -> bool {
        self.itl_llamapool_ms <= self.itl_llama_server_ms
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "quiet_ratio": self.quiet,
            "quiet_goal": QUIET_GOAL,
            "quiet_met": self.quiet_met(),
            "busy_ratio": self.busy,
            "busy_goal": BUSY_GOAL,
            "busy_met": self.busy_met(),
            "ttft_p50_quiet_llamapool_ms": self.ttft_llamapool_ms,
            "ttft_p50_quiet_llama_server_t2_ms": self.ttft_llama_server_ms,
            "ttft_met": self.ttft_met(),
            "itl_p99_quiet_llamapool_ms": self.itl_llamapool_ms,
            "itl_p99_quiet_llama_server_t2_ms": self.itl_llama_server_ms,
            "itl_met": self.itl_met(),
        })
    }
}

/// The goals of every client, keyed by the client (`{"rust": {...}, "python": {...}}`).
fn goals_json(goals: &[Goals]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for g in goals {
        out.insert(g.client.key().into(), g.json());
    }
    serde_json::Value::Object(out)
}

/// The goals side by side, one column per client.
fn goals_table(goals: &[Goals]) -> String {
    // NaN when a row is missing (a failed run): neither met nor not.
    let met = |value: f64, ok: bool| {
        if value.is_nan() {
            "n/a"
        } else if ok {
            "met"
        } else {
            "NOT met"
        }
    };
    let mut out = String::new();
    let _ = write!(out, "\n| goal (llamapool vs llama-server) |");
    for g in goals {
        let _ = write!(out, " {} client |", g.client.key());
    }
    let _ = write!(out, "\n|---|");
    for _ in goals {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    type Cell = fn(&Goals) -> (String, f64, bool);
    let lines: [(String, Cell); 4] = [
        (format!("quiet tokens/s ÷ -t 2 >= {QUIET_GOAL:.2}x"), |g| {
            (format!("{:.2}x", g.quiet), g.quiet, g.quiet_met())
        }),
        (
            format!("busy tokens/s ÷ max(-t 1, -t 2 passive) >= {BUSY_GOAL:.2}x"),
            |g| (format!("{:.2}x", g.busy), g.busy, g.busy_met()),
        ),
        ("TTFT p50 quiet <= -t 2's".into(), |g| {
            (
                format!(
                    "{:.0} vs {:.0} ms",
                    g.ttft_llamapool_ms, g.ttft_llama_server_ms
                ),
                g.ttft_llamapool_ms - g.ttft_llama_server_ms,
                g.ttft_met(),
            )
        }),
        ("ITL p99 quiet <= -t 2's".into(), |g| {
            (
                format!(
                    "{:.1} vs {:.1} ms",
                    g.itl_llamapool_ms, g.itl_llama_server_ms
                ),
                g.itl_llamapool_ms - g.itl_llama_server_ms,
                g.itl_met(),
            )
        }),
    ];
    for (label, cell) in lines {
        let _ = write!(out, "| {label} |");
        for g in goals {
            let (text, value, ok) = cell(g);
            let _ = write!(out, " {text} {} |", met(value, ok));
        }
        out.push('\n');
    }
    out
}

fn table(reports: &[StageReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| condition | server | conc. | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | failed | runs tokens/s | shape changes/min | moved |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let runs: Vec<String> = r
            .runs_tokens_per_s
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} | {} | {} | {} |",
            if r.interference { "busy" } else { "quiet" },
            r.name,
            r.concurrency,
            r.tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p50_ms,
            r.itl_p99_ms,
            r.failed,
            runs.join(", "),
            r.pool
                .map_or("–".into(), |p| format!("{:.1}", p.shape_changes_per_min)),
            r.pool.map_or("–".into(), |p| p.rebalanced.to_string()),
        );
    }
    out
}

/// One entry per sweep level: both servers' tokens/s and TTFT p50, and the ratio.
fn sweep_levels(sweep: &[StageReport]) -> Vec<(usize, Option<&StageReport>, Option<&StageReport>)> {
    let mut levels: Vec<usize> = Vec::new();
    for r in sweep {
        if !levels.contains(&r.concurrency) {
            levels.push(r.concurrency);
        }
    }
    levels
        .into_iter()
        .map(|c| {
            let row = |server| {
                let key = row_key(server, Client::Rust);
                sweep.iter().find(|r| r.stage == key && r.concurrency == c)
            };
            (c, row(LLAMAPOOL), row(LS_T2))
        })
        .collect()
}

fn sweep_json(sweep: &[StageReport]) -> serde_json::Value {
    let levels: Vec<serde_json::Value> = sweep_levels(sweep)
        .into_iter()
        .map(|(c, lp, ls)| {
            json!({
                "concurrency": c,
                "llamapool": lp,
                "llama_server_t2": ls,
                "ratio": ratio(lp, ls),
            })
        })
        .collect();
    json!(levels)
}

/// llamapool ÷ llama-server tokens/s; NaN when either is missing.
fn ratio(lp: Option<&StageReport>, ls: Option<&StageReport>) -> f64 {
    lp.map_or(f64::NAN, |r| r.tokens_per_s) / ls.map_or(f64::NAN, |r| r.tokens_per_s)
}

fn sweep_table(sweep: &[StageReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nquiet sweep, llamapool vs llama-server -t 2:");
    let _ = writeln!(
        out,
        "| conc. | llamapool tokens/s | llama-server tokens/s | ratio | llamapool TTFT p50 ms | llama-server TTFT p50 ms | failed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (c, lp, ls) in sweep_levels(sweep) {
        let tps = |r: Option<&StageReport>| r.map_or(f64::NAN, |r| r.tokens_per_s);
        let ttft = |r: Option<&StageReport>| r.map_or(f64::NAN, |r| r.ttft_p50_ms);
        let failed = lp.map_or(0, |r| r.failed) + ls.map_or(0, |r| r.failed);
        let _ = writeln!(
            out,
            "| {c} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} | {failed} |",
            tps(lp),
            tps(ls),
            ratio(lp, ls),
            ttft(lp),
            ttft(ls),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(server: Server, client: Client, busy: bool, tps: f64) -> StageReport {
        let key = row_key(server, client);
        let mut r = summarize(&key, &key, &[], Duration::from_secs(1));
        r.interference = busy;
        r.tokens_per_s = tps;
        r
    }

    #[test]
    fn busy_ratio_is_against_the_better_single_thread_or_passive_row() {
        let rust = Client::Rust;
        let reports = [
            report(LLAMAPOOL, rust, false, 110.0),
            report(LS_T2, rust, false, 100.0),
            report(LLAMAPOOL, rust, true, 90.0),
            report(LS_T2, rust, true, 10.0),
            report(LS_T1, rust, true, 50.0),
            report(LS_T2_PASSIVE, rust, true, 60.0),
        ];
        let goals = Goals::from_reports(&reports, rust);
        assert!((goals.quiet - 1.1).abs() < 1e-9);
        assert!((goals.busy - 1.5).abs() < 1e-9);
    }

    /// Each client's goals come from its own rows only, with the goals of docs/PERFORMANCE.md:
    /// quiet >= 1.05x, busy >= 1.15x, TTFT p50 and ITL p99 at most llama-server -t 2's.
    #[test]
    fn goals_are_per_client() {
        let (rust, python) = (Client::Rust, Client::Python);
        let mut reports = vec![
            report(LLAMAPOOL, rust, false, 106.0),
            report(LLAMAPOOL, python, false, 100.0),
            report(LS_T2, rust, false, 100.0),
            report(LS_T2, python, false, 100.0),
            report(LS_T1, rust, false, 60.0),
            report(LS_T1, python, false, 60.0),
            report(LLAMAPOOL, rust, true, 70.0),
            report(LLAMAPOOL, python, true, 57.0),
            report(LS_T1, rust, true, 60.0),
            report(LS_T1, python, true, 40.0),
            report(LS_T2_PASSIVE, rust, true, 50.0),
            report(LS_T2_PASSIVE, python, true, 50.0),
        ];
        for r in &mut reports {
            let lp = r.stage.starts_with("llamapool/");
            r.ttft_p50_ms = if lp { 300.0 } else { 350.0 };
            r.itl_p99_ms = match (lp, r.stage.ends_with("/python")) {
                (true, true) => 80.0,
                (true, false) => 50.0,
                (false, _) => 60.0,
            };
        }
        let rust_goals = Goals::from_reports(&reports, rust);
        assert!((rust_goals.quiet - 1.06).abs() < 1e-9);
        assert!((rust_goals.busy - 70.0 / 60.0).abs() < 1e-9);
        assert!(rust_goals.quiet_met() && rust_goals.busy_met());
        assert!(rust_goals.ttft_met() && rust_goals.itl_met());
        let python_goals = Goals::from_reports(&reports, python);
        assert!((python_goals.quiet - 1.0).abs() < 1e-9);
        assert!((python_goals.busy - 57.0 / 50.0).abs() < 1e-9);
        assert!(!python_goals.quiet_met() && !python_goals.busy_met());
        assert!(python_goals.ttft_met() && !python_goals.itl_met());
        assert_eq!(python_goals.itl_llamapool_ms, 80.0);
        assert_eq!(python_goals.itl_llama_server_ms, 60.0);

        let goals = [rust_goals, python_goals];
        let json = goals_json(&goals);
        assert_eq!(json["rust"]["busy_goal"], json!(1.15));
        assert_eq!(json["python"]["itl_met"], json!(false));
        assert_eq!(json["rust"]["itl_p99_quiet_llamapool_ms"], json!(50.0));
        let table = goals_table(&goals);
        assert!(table.contains("| rust client | python client |"), "{table}");
        assert!(
            table.contains(
                "| ITL p99 quiet <= -t 2's | 50.0 vs 60.0 ms met | 80.0 vs 60.0 ms NOT met |"
            ),
            "{table}"
        );
        assert!(
            table.contains(">= 1.15x | 1.17x met | 1.14x NOT met |"),
            "{table}"
        );
    }

    #[test]
    fn a_client_without_rows_has_no_goal_met() {
        let reports = [report(LLAMAPOOL, Client::Rust, false, 100.0)];
        let goals = Goals::from_reports(&reports, Client::Python);
        assert!(goals.quiet.is_nan() && !goals.quiet_met());
        assert!(!goals.ttft_met() && !goals.itl_met());
        assert!(goals_table(&[goals]).contains("NaNx n/a"));
    }

    #[test]
    fn runs_interleave_servers_and_clients_within_each_condition() {
        let runs = schedule(2, ClientChoice::Both.clients());
        assert_eq!(runs.len(), 2 * (3 + 3) * 2);
        let keys: Vec<String> = runs[..6]
            .iter()
            .map(|&(_, busy, server, client)| {
                assert!(!busy);
                row_key(server, client)
            })
            .collect();
        assert_eq!(
            keys,
            [
                "llamapool/rust",
                "llamapool/python",
                "ls-t2/rust",
                "ls-t2/python",
                "ls-t1/rust",
                "ls-t1/python"
            ]
        );
        assert!(runs[6..12].iter().all(|r| r.0 == 0 && r.1));
        assert!(runs[12..].iter().all(|r| r.0 == 1));
        assert_eq!(schedule(1, ClientChoice::Python.clients()).len(), 6);
    }

    #[test]
    fn rows_say_their_server_and_client() {
        let rows = rows_json(&[report(LS_T2_PASSIVE, Client::Python, true, 1.0)]);
        assert_eq!(rows[0]["stage"], "ls-t2-passive/python");
        assert_eq!(rows[0]["server"], "ls-t2-passive");
        assert_eq!(rows[0]["client"], "python");
    }

    #[test]
    fn the_default_config_sets_no_workers() {
        let config = default_config(Path::new("/m/gemma-3-270m.gguf"), "gemma-3-270m");
        assert!(!config.contains("workers"), "{config}");
        assert!(config.contains("chat_template = \"gemma\""), "{config}");
        assert!(config.contains("listen = \"127.0.0.1:0\""), "{config}");
    }
}
