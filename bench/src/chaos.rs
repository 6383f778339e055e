//! `--chaos`: what the router does under failures and overload, counted request by request.
//! Each phase starts a fresh router with `--workers` workers, each pinned to one CPU with one
//! thread, on SmolLM2 with `configs/default.toml`'s worker settings (16 slots, 16384 cells), and
//! runs for `--duration-secs`:
//!
//! - `kill`: `--concurrency` clients stream `/v1/completions` requests of exactly
//!   `--max-tokens` tokens (`ignore_eos`) back to back while a random ready worker gets
//!   SIGKILL every `--kill-every-secs`. Every request ends as exactly one of: *completed*
//!   (`[DONE]`, `usage.completion_tokens` = `--max-tokens`, finish `length`), *failed cleanly*
//!   (an HTTP error status before any body), or *lost*: an error event or the end of the
//!   stream without `[DONE]`, a wrong token count, a broken connection, or no progress for
//!   `--stall-secs` (the router is configured without keep-alive pings, so a stalled stream
//!   is silent). Lost must be 0.
//! - `load`: `--clients` clients send non-streaming requests of `--load-max-tokens` tokens
//!   back to back. Every answer must be 200 with that many tokens, or 429 with `Retry-After`
//!   (the client then waits as told); anything else is counted as bad. The router's resident
//!   memory (`VmRSS`) before and after, and its peak (`VmHWM`).
//!
//! The report says whether the run held ([`Report::held`]); the command fails when it did not.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_common::cpus::CpuList;
use llamapool_testkit::http::{self, HttpResponse, SseReader};
use llamapool_testkit::Router;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs;
use crate::{completion_body, Args};

/// The model name the chaos router serves.
const ALIAS: &str = "chaos";

/// How long a client of the kill phase waits after a clean failure (the router's
/// `Retry-After`).
const RETRY_WAIT: Duration = Duration::from_secs(1);

/// Stack of each client thread: they hold a socket and a few small buffers.
const CLIENT_STACK: usize = 256 * 1024;

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    /// Explicit workers asked for; `None`: the default layout (one adaptive worker per core).
    pub workers: Option<usize>,
    pub max_queued: usize,
    pub kill: Option<KillReport>,
    pub load: Option<LoadReport>,
    /// No request lost in `kill`, no bad answer in `load`.
    pub held: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct KillReport {
    pub duration_s: f64,
    pub concurrency: usize,
    pub max_tokens: u32,
    pub kill_every_s: f64,
    /// SIGKILLs sent.
    pub kills: usize,
    /// Kills of the only ready worker (the others were still restarting).
    pub kills_of_last_ready: usize,
    /// Kill times at which no worker was ready (nothing was killed).
    pub kills_skipped: usize,
    /// Sum of the workers' `restarts` at the end.
    pub worker_restarts: u64,
    /// Requests started; = completed + failed_cleanly + lost.
    pub sent: usize,
    pub completed: usize,
    pub failed_cleanly: usize,
    /// Clean failures by HTTP status.
    pub failed_statuses: BTreeMap<u16, usize>,
    pub lost: usize,
    /// Lost requests by reason: `error_event: MESSAGE`, `no_done`, `wrong_tokens`, `hung`,
    /// `transport`.
    pub lost_reasons: BTreeMap<String, usize>,
    /// End-to-end seconds of completed requests.
    pub completed_e2e_p50_s: f64,
    pub completed_e2e_max_s: f64,
    pub wall_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub duration_s: f64,
    pub clients: usize,
    pub max_tokens: u32,
    /// Requests sent; = ok + rejected_429 + bad.
    pub sent: usize,
    /// 200 with the exact token count.
    pub ok: usize,
    /// 429 with `Retry-After`.
    pub rejected_429: usize,
    pub bad: usize,
    /// Bad answers by kind (`HTTP 503`, `429 without Retry-After`, `wrong_tokens`, `hung`,
    /// `transport`).
    pub bad_reasons: BTreeMap<String, usize>,
    pub ok_per_s: f64,
    pub ok_latency_p50_ms: f64,
    pub ok_latency_p99_ms: f64,
    /// The router's `VmRSS` once its workers were ready, before the load.
    pub rss_before_kib: u64,
    /// `VmRSS` when every client had finished.
    pub rss_after_kib: u64,
    /// `VmHWM`: the router's peak resident memory over its life.
    pub rss_peak_kib: u64,
    pub wall_s: f64,
}

/// Runs the phases `args.phases` names and prints the report.
pub fn run(args: &Args) -> Result<()> {
    let model = args.chat_model_path()?;
    if args.duration_secs <= 0.0 || args.kill_every_secs <= 0.0 || args.stall_secs <= 0.0 {
        bail!("--duration-secs, --kill-every-secs and --stall-secs must be positive");
    }
    if args.concurrency == 0
        || args.clients == 0
        || args.max_tokens == 0
        || args.load_max_tokens == 0
    {
        bail!("--concurrency, --clients, --max-tokens and --load-max-tokens must be at least 1");
    }
    for phase in &args.phases {
        if phase != "kill" && phase != "load" {
            bail!("unknown phase {phase:?} (phases: kill, load)");
        }
    }
    let config = router_config(&model, args.workers, args.max_queued)?;
    let duration = Duration::from_secs_f64(args.duration_secs);
    let stall = Duration::from_secs_f64(args.stall_secs);
    let mut report = Report {
        model: model.display().to_string(),
        workers: args.workers,
        max_queued: args.max_queued,
        kill: None,
        load: None,
        held: true,
    };
    if args.phases.iter().any(|p| p == "kill") {
        eprintln!(
            "chaos kill: {} streams for {:.0} s, SIGKILL of a random worker every {} s",
            args.concurrency, args.duration_secs, args.kill_every_secs
        );
        let router = procs::start_router(&config)?;
        let kill = kill_phase(
            &router,
            duration,
            Duration::from_secs_f64(args.kill_every_secs),
            args.concurrency,
            args.max_tokens,
            stall,
        );
        report.held &= kill.lost == 0;
        report.kill = Some(kill);
    }
    if args.phases.iter().any(|p| p == "load") {
        eprintln!(
            "chaos load: {} clients for {:.0} s",
            args.clients, args.duration_secs
        );
        let router = procs::start_router(&config)?;
        let load = load_phase(&router, duration, args.clients, args.load_max_tokens, stall)?;
        report.held &= load.bad == 0;
        report.load = Some(load);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    if !report.held {
        bail!("the run did not hold: requests were lost or answered badly (see the report)");
    }
    Ok(())
}

/// `configs/default.toml`'s settings (crash-loop rule included) on a free port, with
/// `max_queued` and no keep-alive pings (so that a stalled stream is silent); the default
/// layout (one adaptive worker per core) unless `workers` asks for that many explicit
/// one-thread workers on the first allowed CPUs.
fn router_config(
    model: &std::path::Path,
    workers: Option<usize>,
    max_queued: usize,
) -> Result<String> {
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued = {max_queued}\nkeepalive_secs = 86400\n\
         [model]\npath = {path}\nalias = \"{ALIAS}\"\n",
        path = json!(model),
    );
    let Some(workers) = workers else {
        return Ok(config);
    };
    let allowed = CpuList::allowed();
    if workers == 0 || workers > allowed.len() {
        bail!(
            "--workers {workers}: between 1 and the {} CPUs this process may use",
            allowed.len()
        );
    }
    for cpu in &allowed.cpus()[..workers] {
        config.push_str(&format!("[[workers]]\ncpus = \"{cpu}\"\nthreads = 1\n"));
    }
    Ok(config)
}

/// How one streamed request ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Completed(Duration),
    FailedCleanly(u16),
    /// Why, as counted in [`KillReport::lost_reasons`].
    Lost(String),
}

fn prompt(i: usize) -> String {
    format!("Request {i}. Write a long story about a lighthouse keeper and the sea.")
}

/// One streaming request, classified.
fn stream_one(addr: &str, i: usize, max_tokens: u32, stall: Duration) -> Outcome {
    let body = completion_body(ALIAS, prompt(i), max_tokens, true);
    let start = Instant::now();
    let mut last_progress = start;
    // The read timeout ends a silent stream; the time since the last event tells a stall from
    // a connection that was closed.
    let stalled = |last: Instant| last.elapsed() >= stall.mul_f64(0.9);
    let stream = match http::post_json(addr, "/v1/completions", &body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("request {i} lost: connecting: {e}");
            return Outcome::Lost("transport".into());
        }
    };
    if stream.set_read_timeout(Some(stall)).is_err() {
        return Outcome::Lost("transport".into());
    }
    let mut sse = match SseReader::new(stream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("request {i} lost: no response head: {e}");
            let reason = if stalled(last_progress) {
                "hung"
            } else {
                "transport"
            };
            return Outcome::Lost(reason.into());
        }
    };
    if sse.status != 200 {
        return Outcome::FailedCleanly(sse.status);
    }
    let mut usage = None;
    let mut finish = None;
    loop {
        let Some(data) = sse.next_data() else {
            let reason = if stalled(last_progress) {
                "hung"
            } else {
                "no_done"
            };
            eprintln!("request {i} lost: {reason} after {:?}", start.elapsed());
            return Outcome::Lost(reason.into());
        };
        last_progress = Instant::now();
        if data == "[DONE]" {
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
            eprintln!("request {i} lost: not JSON: {data}");
            return Outcome::Lost("no_done".into());
        };
        if let Some(error) = chunk.get("error") {
            eprintln!("request {i} lost: error event {error}");
            let message = error["message"].as_str().unwrap_or("(no message)");
            return Outcome::Lost(format!("error_event: {message}"));
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            usage = Some(n);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    if usage == Some(u64::from(max_tokens)) && finish.as_deref() == Some("length") {
        Outcome::Completed(start.elapsed())
    } else {
        eprintln!("request {i} lost: usage {usage:?}, finish {finish:?}");
        Outcome::Lost("wrong_tokens".into())
    }
}

/// A small xorshift generator: which worker to kill need not be cryptographic.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `GET /workers` of `router`, or an empty list when it does not answer.
fn workers(router: &Router) -> Vec<Value> {
    router
        .try_request("GET", "/workers", None)
        .ok()
        .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .and_then(|v| v["workers"].as_array().cloned())
        .unwrap_or_default()
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The parent of a process, from `/proc/PID/status`.
fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

#[derive(Default)]
struct Kills {
    kills: usize,
    of_last_ready: usize,
    skipped: usize,
}

/// Every `every` until `deadline`: SIGKILL to a random ready worker of `router`.
fn killer(router: &Router, deadline: Instant, every: Duration) -> Kills {
    let mut rng = Rng::seeded();
    let mut kills = Kills::default();
    let mut next = Instant::now() + every;
    while next < deadline {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += every;
        let ready: Vec<u32> = workers(router)
            .iter()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
            // Only this router's children: a pid read a moment ago may have been reused.
            .filter(|&pid| parent_of(pid) == Some(router.pid()))
            .collect();
        if ready.is_empty() {
            kills.skipped += 1;
            continue;
        }
        let victim = ready[rng.below(ready.len())];
        let Ok(pid) = i32::try_from(victim) else {
            continue;
        };
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            kills.kills += 1;
            kills.of_last_ready += usize::from(ready.len() == 1);
        }
    }
    kills
}

fn kill_phase(
    router: &Router,
    duration: Duration,
    every: Duration,
    concurrency: usize,
    max_tokens: u32,
    stall: Duration,
) -> KillReport {
    let start = Instant::now();
    let deadline = start + duration;
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let kills = std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let outcome = stream_one(&router.addr, i, max_tokens, stall);
                    let failed = matches!(outcome, Outcome::FailedCleanly(_));
                    outcomes.lock().expect("no client panicked").push(outcome);
                    if failed {
                        // 503 and 429 say `Retry-After: 1`; a client waits before retrying.
                        let left = deadline.saturating_duration_since(Instant::now());
                        std::thread::sleep(RETRY_WAIT.min(left));
                    }
                }
            });
        }
        killer(router, deadline, every)
    });
    let wall = start.elapsed();
    let outcomes = outcomes.into_inner().expect("no client panicked");
    let mut report = KillReport {
        duration_s: duration.as_secs_f64(),
        concurrency,
        max_tokens,
        kill_every_s: every.as_secs_f64(),
        kills: kills.kills,
        kills_of_last_ready: kills.of_last_ready,
        kills_skipped: kills.skipped,
        worker_restarts: workers(router)
            .iter()
            .filter_map(|w| w["restarts"].as_u64())
            .sum(),
        sent: outcomes.len(),
        wall_s: wall.as_secs_f64(),
        ..KillReport::default()
    };
    let mut e2e = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Completed(d) => {
                report.completed += 1;
                e2e.push(d.as_secs_f64());
            }
            Outcome::FailedCleanly(status) => {
                report.failed_cleanly += 1;
                *report.failed_statuses.entry(status).or_default() += 1;
            }
            Outcome::Lost(reason) => {
                report.lost += 1;
                *report.lost_reasons.entry(reason).or_default() += 1;
            }
        }
    }
    report.completed_e2e_p50_s = llamapool_bench::metrics::percentile(&mut e2e, 50.0);
    report.completed_e2e_max_s = e2e.iter().copied().fold(0.0, f64::max);
    report
}

/// How one non-streaming request of the load phase ended.
enum Answer {
    Ok(Duration),
    Rejected(Duration),
    Bad(String),
}

fn request_one(addr: &str, i: usize, max_tokens: u32, stall: Duration) -> Answer {
    let body = completion_body(ALIAS, prompt(i), max_tokens, false);
    let start = Instant::now();
    let response = http::post_json(addr, "/v1/completions", &body).and_then(|mut stream| {
        stream.set_read_timeout(Some(stall))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        HttpResponse::parse(&raw)
    });
    let response = match response {
        Ok(r) => r,
        Err(e) if start.elapsed() >= stall.mul_f64(0.9) => {
            return Answer::Bad(format!("hung ({})", e.kind()))
        }
        Err(e) => return Answer::Bad(format!("transport ({})", e.kind())),
    };
    match response.status {
        200 => {
            let tokens = serde_json::from_slice::<Value>(&response.body)
                .ok()
                .and_then(|v| v["usage"]["completion_tokens"].as_u64());
            if tokens == Some(u64::from(max_tokens)) {
                Answer::Ok(start.elapsed())
            } else {
                Answer::Bad("wrong_tokens".into())
            }
        }
        429 => match response
            .header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(secs) => Answer::Rejected(Duration::from_secs(secs)),
            None => Answer::Bad("429 without Retry-After".into()),
        },
        status => Answer::Bad(format!("HTTP {status}")),
    }
}

fn load_phase(
    router: &Router,
    duration: Duration,
    clients: usize,
    max_tokens: u32,
    stall: Duration,
) -> Result<LoadReport> {
    let pid = router.pid();
    let rss_before = status_kib(pid, "VmRSS").context("reading the router's VmRSS")?;
    let start = Instant::now();
    let deadline = start + duration;
    let next = AtomicUsize::new(0);
    let report = Mutex::new(LoadReport::default());
    let latencies = Mutex::new(Vec::new());
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..clients {
            std::thread::Builder::new()
                .stack_size(CLIENT_STACK)
                .spawn_scoped(scope, || {
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let answer = request_one(&router.addr, i, max_tokens, stall);
                        let mut r = report.lock().expect("no client panicked");
                        r.sent += 1;
                        match answer {
                            Answer::Ok(d) => {
                                r.ok += 1;
                                drop(r);
                                latencies
                                    .lock()
                                    .expect("no client panicked")
                                    .push(d.as_secs_f64() * 1000.0);
                            }
                            Answer::Rejected(wait) => {
                                r.rejected_429 += 1;
                                drop(r);
                                // As a well-behaved client does; never past the end.
                                let left = deadline.saturating_duration_since(Instant::now());
                                std::thread::sleep(wait.min(left));
                            }
                            Answer::Bad(reason) => {
                                r.bad += 1;
                                *r.bad_reasons.entry(reason).or_default() += 1;
                            }
                        }
                    }
                })
                .context("starting a client thread")?;
        }
        Ok(())
    })?;
    let wall = start.elapsed();
    let mut report = report.into_inner().expect("no client panicked");
    let mut latencies = latencies.into_inner().expect("no client panicked");
    report.duration_s = duration.as_secs_f64();
    report.clients = clients;
    report.max_tokens = max_tokens;
    report.ok_per_s = report.ok as f64 / wall.as_secs_f64();
    report.ok_latency_p50_ms = llamapool_bench::metrics::percentile(&mut latencies, 50.0);
    report.ok_latency_p99_ms = llamapool_bench::metrics::percentile(&mut latencies, 99.0);
    report.rss_before_kib = rss_before;
    report.rss_after_kib = status_kib(pid, "VmRSS").context("reading the router's VmRSS")?;
    report.rss_peak_kib = status_kib(pid, "VmHWM").context("reading the router's VmHWM")?;
    report.wall_s = wall.as_secs_f64();
    Ok(report)
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as text.
fn table(report: &Report) -> String {
    let mut out = format!(
        "router: {}, max_queued {}, {}\n",
        report.workers.map_or_else(
            || "the default layout (one adaptive worker per core)".to_string(),
            |n| format!("{n} workers (one pinned thread each)")
        ),
        report.max_queued,
        report.model
    );
    if let Some(k) = &report.kill {
        out.push_str(&format!(
            "kill: {:.0} s, {} streams of {} tokens, SIGKILL every {} s: {} kills ({} of the last ready worker, {} skipped), {} worker restarts\n\
             \x20 sent {}  completed {}  failed cleanly {} ({})  lost {} ({})\n\
             \x20 completed end-to-end p50 {:.2} s, max {:.2} s; wall {:.1} s\n",
            k.duration_s, k.concurrency, k.max_tokens, k.kill_every_s, k.kills, k.kills_of_last_ready,
            k.kills_skipped, k.worker_restarts, k.sent, k.completed, k.failed_cleanly,
            counts(&k.failed_statuses), k.lost, counts(&k.lost_reasons),
            k.completed_e2e_p50_s, k.completed_e2e_max_s, k.wall_s,
        ));
    }
    if let Some(l) = &report.load {
        out.push_str(&format!(
            "load: {:.0} s, {} clients, {} tokens each:\n\
             \x20 sent {}  200 {}  429 {}  bad {} ({})\n\
             \x20 {:.1} ok/s, latency p50 {:.0} ms, p99 {:.0} ms; wall {:.1} s\n\
             \x20 router RSS {} KiB before, {} KiB after, peak {} KiB\n",
            l.duration_s,
            l.clients,
            l.max_tokens,
            l.sent,
            l.ok,
            l.rejected_429,
            l.bad,
            counts(&l.bad_reasons),
            l.ok_per_s,
            l.ok_latency_p50_ms,
            l.ok_latency_p99_ms,
            l.wall_s,
            l.rss_before_kib,
            l.rss_after_kib,
            l.rss_peak_kib,
        ));
    }
    out.push_str(if report.held {
        "held: nothing lost, every answer 200 or 429 with Retry-After\n"
    } else {
        "DID NOT HOLD\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_status_fields_and_picks_in_range() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS").is_some_and(|k| k > 0));
        assert!(status_kib(me, "VmHWM").is_some());
        assert_eq!(status_kib(me, "NoSuchField"), None);
        assert!(parent_of(me).is_some());
        let mut rng = Rng::seeded();
        assert!((0..1000).all(|_| rng.below(3) < 3));
    }

    #[test]
    fn the_config_is_the_default_one_without_pings() {
        let m = std::path::Path::new("/m.gguf");
        let config = router_config(m, None, 7).unwrap();
        assert!(config.contains("max_queued = 7"));
        assert!(config.contains("keepalive_secs = 86400"));
        // The default crash-loop rule and the default layout.
        assert!(!config.contains("crash_loop"));
        assert!(!config.contains("[[workers]]"));
        let pinned = router_config(m, Some(1), 7).unwrap();
        assert_eq!(pinned.matches("[[workers]]").count(), 1);
        assert!(router_config(m, Some(0), 7).is_err());
        assert!(router_config(m, Some(100_000), 7).is_err());
    }
}
