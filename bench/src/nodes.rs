//! `--nodes N`: N llamapool nodes (one pinned one-thread worker each, SmolLM2) behind the
//! Shepherd Model Gateway (`smg`, from PyPI), found through its file-based service discovery,
//! under the multi-turn chat workload of `--multi-turn` (`multiturn.rs`). Everything is real:
//! the release router, the real `smg launch`, loopback sockets.
//!
//! 1. **Cache**: the workload against one node directly, then through the gateway with each
//!    `--policies` policy (a fresh gateway each): the cached share of later turns' prompt
//!    tokens, TTFT, failures.
//! 2. **Gateway cost**: TTFT of one short cached chat, through the first policy's gateway and directly to
//!    the node the gateway chose, alternated.
//! 3. **Drain**: `--concurrency` looping clients through the gateway (cache-aware); SIGTERM to
//!    one node; its drain time, the requests that failed, and the gateway's view of it after.
//! 4. **New node**: a node added to the discovery file under load; seconds until it serves.
//! 5. **Kill**: `kill -9` of another node under load; its requests in flight at the kill, the
//!    requests that failed and what each client saw.
//! 6. **The gateway's view**: its worker list against the nodes that live, and its count of
//!    requests sent to each node against the node's own count.
//!
//! Writes `nodes.json` in `--out-dir` and prints a summary. `tests/tests/nodes.rs` runs it
//! small and checks the figures.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_bench::metrics::{percentile, sum_samples};
use llamapool_common::cpus::CpuList;
use llamapool_testkit::{http, scratch_dir, Router, TempDir};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};

use crate::multiturn::{self, RowReport, TurnRecord, Workload, ALIAS};
use crate::{procs, Args};

/// The policies `--policies` takes by default.
pub const DEFAULT_POLICIES: &str = "cache_aware,power_of_two,round_robin";

/// How often the gateway checks a node's `/health` and polls its `/v1/loads`, and re-reads
/// its discovery file, in seconds (smg's defaults, 60, 10 and 30, are for long-lived fleets;
/// docs/DEPLOYMENT.md says why 1 here).
const GATEWAY_POLL_SECS: &str = "1";

/// Runs every phase; see the module doc.
pub fn run(args: &Args) -> Result<()> {
    let workload = multiturn::workload(args)?;
    let nodes = args.nodes.unwrap_or(3);
    if nodes < 2 {
        bail!("--nodes needs at least 2 nodes (one is drained, one killed)");
    }
    let smg = smg_binary(args.smg.as_deref())?;
    let policies: Vec<String> = args
        .policies
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    std::fs::create_dir_all(&args.out_dir)?;
    let mut fleet = Fleet::start(&workload.model, nodes)?;
    eprintln!("{nodes} nodes ready: {:?}", fleet.addrs());

    eprintln!("one node, direct: {} conversations", workload.conversations);
    let mut rows = vec![measure(
        &fleet.nodes[0].addr,
        &workload,
        0,
        "one node, direct",
    )];
    let mut overhead = None;
    for (k, policy) in policies.iter().enumerate() {
        let gateway = Gateway::start(&smg, policy, &fleet)?;
        let label = format!("{nodes} nodes behind smg, {policy}");
        eprintln!("{label}: {} conversations", workload.conversations);
        rows.push(measure(&gateway.addr, &workload, (k + 1) * 1000, &label));
        if overhead.is_none() {
            overhead = Some(gateway_overhead(&fleet, &gateway, policy)?);
        }
    }
    let overhead = match overhead {
        Some(overhead) => overhead,
        None => {
            let gateway = Gateway::start(&smg, "cache_aware", &fleet)?;
            gateway_overhead(&fleet, &gateway, "cache_aware")?
        }
    };

    // The faults under a gateway of their own, so that its counts cover only what is sent
    // from here on (the overhead's direct requests reach a node without it).
    let gateway = Gateway::start(&smg, "cache_aware", &fleet)?;
    let counts_at_start = fleet.chat_counts();
    let drain = drain_phase(&mut fleet, &gateway, &workload)?;
    let added = add_phase(&mut fleet, &gateway, &workload)?;
    let killed = kill_phase(&mut fleet, &gateway, &workload)?;
    let view = gateway_view(&fleet, &gateway, &counts_at_start)?;

    let report = json!({
        "workload": workload,
        "nodes": nodes,
        "smg_version": smg_version(&smg),
        "rows": rows,
        "gateway_overhead": overhead,
        "drain": drain,
        "new_node": added,
        "kill": killed,
        "gateway_view": view,
    });
    multiturn::write_report(args, "nodes.json", &report, || {
        summary(&rows, &overhead, &drain, &added, &killed, &view)
    })
}

/// `--smg`, else `smg` on the PATH; an error naming the install command when it is missing.
fn smg_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = given.map_or_else(|| PathBuf::from("smg"), Path::to_path_buf);
    let ok = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "the Shepherd Model Gateway ({}) did not run: install it with `python3 -m pip install smg` or pass --smg PATH",
            path.display()
        );
    }
    Ok(path)
}

fn smg_version(smg: &Path) -> String {
    Command::new(smg)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The workload's conversations `first..first + conversations` against `addr`.
fn measure(addr: &str, workload: &Workload, first: usize, label: &str) -> RowReport {
    let (records, wall) = multiturn::run_conversations(addr, workload, first);
    multiturn::summarize(label, &records, wall)
}

/// One llamapool node.
struct Node {
    /// Its name in the discovery file.
    id: String,
    addr: String,
    /// `None` once it has exited (drained) or been killed.
    router: Option<Router>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The nodes and the discovery file that lists them.
struct Fleet {
    model: PathBuf,
    nodes: Vec<Node>,
    dir: TempDir,
}

impl Fleet {
    fn start(model: &Path, n: usize) -> Result<Self> {
        let mut fleet = Self {
            model: model.to_path_buf(),
            nodes: Vec::new(),
            dir: scratch_dir("nodes")?,
        };
        for _ in 0..n {
            fleet.add_node()?;
        }
        Ok(fleet)
    }

    /// Starts one more node, pinned to the next allowed CPU, and lists it in the discovery
    /// file. Returns its index.
    fn add_node(&mut self) -> Result<usize> {
        let index = self.nodes.len();
        let allowed = CpuList::allowed();
        let cpus = allowed.cpus();
        let cpu = cpus[index % cpus.len()];
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued = 4096\n\
             [model]\npath = {path}\nalias = \"{ALIAS}\"\n\
             [worker_defaults]\nslots = 8\ncontext = 8192\n\
             [[workers]]\ncpus = \"{cpu}\"\nthreads = 1\n",
            path = json!(self.model),
        );
        let router = procs::start_router(&config)?;
        self.nodes.push(Node {
            id: format!("node-{index}"),
            addr: router.addr.clone(),
            router: Some(router),
        });
        self.write_discovery()?;
        Ok(index)
    }

    fn discovery_file(&self) -> PathBuf {
        self.dir.path().join("workers.json")
    }

    /// Every node started, live or not (an operator's file lists what it deployed; the
    /// gateway's health checks find out which answer). Written to a temporary file and
    /// renamed over the old one: smg watches the directory and must never read half a file.
    fn write_discovery(&self) -> Result<()> {
        let workers: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| json!({"id": n.id, "url": n.url()}))
            .collect();
        let text = serde_json::to_string_pretty(&json!({"version": 1, "workers": workers}))?;
        let tmp = self.dir.path().join("workers.json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.discovery_file())?;
        Ok(())
    }

    fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Each live node's count of chat completions answered (any status), by index.
    fn chat_counts(&self) -> Vec<Option<f64>> {
        self.nodes
            .iter()
            .map(|n| n.router.as_ref().and_then(|_| node_chat_count(&n.addr)))
            .collect()
    }
}

/// `llamapool_http_requests_total` of `/v1/chat/completions`, every status, from the node's
/// `/metrics`.
fn node_chat_count(addr: &str) -> Option<f64> {
    let text = get(addr, "/metrics").ok()?;
    Some(sum_samples(
        &text,
        "llamapool_http_requests_total{",
        "endpoint=\"/v1/chat/completions\"",
    ))
}

/// One count of the node's `/v1/loads` (`num_total_reqs`, `num_running_reqs`, ...), if it
/// answers.
fn node_load(addr: &str, field: &str) -> Option<u64> {
    let text = get(addr, "/v1/loads").ok()?;
    serde_json::from_str::<Value>(&text).ok()?["loads"][0][field].as_u64()
}

/// Requests the node at `addr` has accepted and not finished, if it answers.
fn node_in_flight(addr: &str) -> Option<u64> {
    node_load(addr, "num_total_reqs")
}

/// The live node with the most requests in flight (the first of the busiest) and that count,
/// waiting up to 10 s for one with any: a drain or a kill is meant to meet work.
fn busiest_node(fleet: &Fleet) -> Result<(usize, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let busiest = fleet
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.router.is_some())
            .map(|(i, n)| (node_in_flight(&n.addr).unwrap_or(0), i))
            .max_by_key(|&(load, i)| (load, std::cmp::Reverse(i)))
            .context("no node is running")?;
        if busiest.0 > 0 || Instant::now() > deadline {
            return Ok((busiest.1, busiest.0));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `GET`'s body, or an error for a status other than 200.
fn get(addr: &str, path: &str) -> Result<String> {
    let response = http::request(addr, "GET", path, &[], b"")?;
    if response.status != 200 {
        bail!("GET {path}: HTTP {}", response.status);
    }
    Ok(response.text())
}

/// A running `smg launch`, its own process group, killed with it when dropped.
struct Gateway {
    addr: String,
    metrics_addr: String,
    child: Child,
}

impl Gateway {
    /// Starts smg with `policy` and file discovery of `fleet`, and waits until every live
    /// node is `ready` in its worker list.
    fn start(smg: &Path, policy: &str, fleet: &Fleet) -> Result<Self> {
        let port = free_port()?;
        let metrics_port = free_port()?;
        let log = File::create(fleet.dir.path().join(format!("smg-{policy}-{port}.log")))?;
        let child = Command::new(smg)
            .arg("launch")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--policy", policy])
            .args(["--discovery-provider", "file", "--discovery-file"])
            .arg(fleet.discovery_file())
            .args(["--discovery-check-interval-secs", GATEWAY_POLL_SECS])
            .args(["--health-check-interval-secs", GATEWAY_POLL_SECS])
            .args(["--load-monitor-interval", GATEWAY_POLL_SECS])
            .args(["--worker-startup-check-interval", GATEWAY_POLL_SECS])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--prometheus-port", &metrics_port.to_string()])
            .args(["--shutdown-grace-period-secs", "1", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting smg launch")?;
        let gateway = Self {
            addr: format!("127.0.0.1:{port}"),
            metrics_addr: format!("127.0.0.1:{metrics_port}"),
            child,
        };
        let live: Vec<String> = fleet
            .nodes
            .iter()
            .filter(|n| n.router.is_some())
            .map(Node::url)
            .collect();
        gateway.wait_for(Duration::from_secs(90), |workers| {
            live.iter().all(|url| {
                workers
                    .iter()
                    .any(|w| w["url"] == url.as_str() && w["status"] == "ready")
            })
        })?;
        Ok(gateway)
    }

    /// `GET /workers`' list.
    fn workers(&self) -> Result<Vec<Value>> {
        let body: Value = serde_json::from_str(&get(&self.addr, "/workers")?)?;
        Ok(body["workers"].as_array().cloned().unwrap_or_default())
    }

    /// The gateway's status of the node at `url` (`absent` when it does not list it).
    fn status_of(&self, url: &str) -> String {
        self.workers()
            .ok()
            .and_then(|ws| ws.into_iter().find(|w| w["url"] == url))
            .and_then(|w| w["status"].as_str().map(str::to_string))
            .unwrap_or_else(|| "absent".to_string())
    }

    /// Polls the worker list until `done` holds; the time it took.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(workers) = self.workers() {
                if done(&workers) {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "the gateway's worker list did not get there within {timeout:?}: {:?}",
                    self.workers().ok()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Attempts the gateway made again on another try (`smg_worker_retries_total`, every
    /// label), 0 when it has none yet.
    fn retries(&self) -> f64 {
        let text = get(&self.metrics_addr, "/metrics").unwrap_or_default();
        sum_samples(&text, "smg_worker_retries_total", "")
    }

    /// `smg_worker_requests_total` of the node at `url`: the requests the gateway sent it,
    /// every retry attempt included (0 once it no longer lists the node).
    fn sent_to(&self, url: &str) -> f64 {
        let text = get(&self.metrics_addr, "/metrics").unwrap_or_default();
        sum_samples(
            &text,
            "smg_worker_requests_total{",
            &format!("worker=\"{url}\""),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // `smg launch` is a Python launcher with the gateway as its child: stop the group.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// TTFT of a short, cached chat through the gateway and directly to the node it chose.
#[derive(Debug, Serialize)]
struct Overhead {
    /// The gateway's policy while measured.
    policy: String,
    samples: usize,
    ttft_p50_direct_ms: f64,
    ttft_p50_gateway_ms: f64,
    /// Gateway minus direct.
    added_ms: f64,
}

fn gateway_overhead(fleet: &Fleet, gateway: &Gateway, policy: &str) -> Result<Overhead> {
    const SAMPLES: usize = 20;
    let messages = [json!({"role": "user", "content": "Say hello in three words."})];
    let before = fleet.chat_counts();
    multiturn::chat_turn(&gateway.addr, &messages, 4)?;
    let after = fleet.chat_counts();
    let chosen = before
        .iter()
        .zip(&after)
        .position(|(b, a)| a.unwrap_or(0.0) > b.unwrap_or(0.0))
        .context("no node counted the gateway's request")?;
    let direct_addr = &fleet.nodes[chosen].addr;
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        direct.push(multiturn::chat_turn(direct_addr, &messages, 4)?.0.ttft_ms);
        through.push(multiturn::chat_turn(&gateway.addr, &messages, 4)?.0.ttft_ms);
    }
    let ttft_p50_direct_ms = percentile(&mut direct, 50.0);
    let ttft_p50_gateway_ms = percentile(&mut through, 50.0);
    Ok(Overhead {
        policy: policy.to_string(),
        samples: SAMPLES,
        ttft_p50_direct_ms,
        ttft_p50_gateway_ms,
        added_ms: ttft_p50_gateway_ms - ttft_p50_direct_ms,
    })
}

/// Client threads running conversations through the gateway until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<TurnRecord>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: &str, workload: &Workload, first: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(first));
        let threads = (0..workload.concurrency)
            .map(|_| {
                let (stop, records, next) = (stop.clone(), records.clone(), next.clone());
                let (addr, workload) = (addr.to_string(), workload.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let done = multiturn::conversation(&addr, &workload, i);
                        records.lock().expect("no client panicked").extend(done);
                    }
                })
            })
            .collect();
        Self {
            stop,
            records,
            threads,
        }
    }

    /// Stops after the conversations in progress and returns every turn's record.
    fn finish(self) -> Vec<TurnRecord> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.records.lock().expect("no client panicked"))
    }
}

/// Requests sent in a phase and those that failed, with what each failed client saw.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    requests: usize,
    failed: usize,
    errors: Vec<String>,
    /// Attempts the gateway retried during the phase.
    gateway_retries: f64,
}

impl Outcome {
    /// A failed turn ends its conversation: the turns after it were never sent.
    fn of(records: &[TurnRecord], gateway_retries: f64) -> Self {
        let sent: Vec<&TurnRecord> = records
            .iter()
            .filter(|r| r.ok || r.error.is_some())
            .collect();
        let errors: Vec<String> = sent.iter().filter_map(|r| r.error.clone()).collect();
        Self {
            requests: sent.len(),
            failed: errors.len(),
            errors,
            gateway_retries,
        }
    }
}

#[derive(Debug, Serialize)]
struct DrainReport {
    node: String,
    /// Requests the node had accepted and not finished when it got SIGTERM.
    in_flight_at_sigterm: u64,
    /// From SIGTERM to the node's exit.
    drain_s: f64,
    /// The gateway's status of the node once it had exited.
    gateway_status_after: String,
    /// Requests the gateway sent to the node after SIGTERM (served in the notice period).
    sent_after_sigterm: f64,
    outcome: Outcome,
}

/// Starts looping clients (conversations from `first` on), lets them run 4 s, and picks the
/// busiest node: the load, the gateway's retries so far, the node and its requests in flight.
fn load_and_pick(
    fleet: &Fleet,
    gateway: &Gateway,
    workload: &Workload,
    first: usize,
) -> Result<(Load, f64, usize, u64)> {
    let retries = gateway.retries();
    let load = Load::start(&gateway.addr, workload, first);
    std::thread::sleep(Duration::from_secs(4));
    let (victim, in_flight) = busiest_node(fleet)?;
    Ok((load, retries, victim, in_flight))
}

/// Looping clients; SIGTERM to the busiest node; its exit; three more seconds of load.
fn drain_phase(fleet: &mut Fleet, gateway: &Gateway, workload: &Workload) -> Result<DrainReport> {
    let (load, retries, victim, in_flight_at_sigterm) =
        load_and_pick(fleet, gateway, workload, 10_000)?;
    let node = &mut fleet.nodes[victim];
    let url = node.url();
    let sent_before = gateway.sent_to(&url);
    eprintln!("drain: SIGTERM to {}", node.id);
    let start = Instant::now();
    let mut router = node
        .router
        .take()
        .context("the node to drain is not running")?;
    let exited = router.terminate(Duration::from_secs(90));
    let drain_s = start.elapsed().as_secs_f64();
    drop(router);
    if !exited {
        bail!("{} did not exit within 90 s of SIGTERM", node.id);
    }
    let sent_after_sigterm = gateway.sent_to(&url) - sent_before;
    std::thread::sleep(Duration::from_secs(3));
    let outcome = Outcome::of(&load.finish(), gateway.retries() - retries);
    Ok(DrainReport {
        node: fleet.nodes[victim].id.clone(),
        in_flight_at_sigterm,
        drain_s,
        gateway_status_after: gateway.status_of(&url),
        sent_after_sigterm,
        outcome,
    })
}

#[derive(Debug, Serialize)]
struct AddReport {
    node: String,
    /// From the discovery file's rewrite to the gateway listing the node `ready`.
    ready_in_gateway_s: f64,
    /// From the rewrite to the node's first chat request (in flight or answered).
    first_request_s: f64,
    outcome: Outcome,
}

/// Looping clients; a new node started and added to the discovery file; how long until it
/// serves.
fn add_phase(fleet: &mut Fleet, gateway: &Gateway, workload: &Workload) -> Result<AddReport> {
    let retries = gateway.retries();
    let load = Load::start(&gateway.addr, workload, 20_000);
    std::thread::sleep(Duration::from_secs(2));
    let index = fleet.add_node()?;
    let written = Instant::now();
    let node = &fleet.nodes[index];
    eprintln!("new node: {} at {}", node.id, node.addr);
    let url = node.url();
    let ready = gateway.wait_for(Duration::from_secs(60), |workers| {
        workers
            .iter()
            .any(|w| w["url"] == url.as_str() && w["status"] == "ready")
    });
    let mut first_request = None;
    while written.elapsed() < Duration::from_secs(60) {
        if node_in_flight(&node.addr).unwrap_or(0) > 0
            || node_chat_count(&node.addr).unwrap_or(0.0) > 0.0
        {
            first_request = Some(written.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let outcome = Outcome::of(&load.finish(), gateway.retries() - retries);
    Ok(AddReport {
        node: node.id.clone(),
        ready_in_gateway_s: ready?.as_secs_f64(),
        first_request_s: first_request
            .context("the new node served no request within 60 s")?
            .as_secs_f64(),
        outcome,
    })
}

#[derive(Debug, Serialize)]
struct KillReport {
    node: String,
    /// Requests the node had accepted and not finished, just before the kill.
    in_flight_at_kill: u64,
    gateway_status_after: String,
    outcome: Outcome,
}

/// Looping clients; `kill -9` of the busiest node (its workers, left without their router,
/// exit); five more seconds of load.
fn kill_phase(fleet: &mut Fleet, gateway: &Gateway, workload: &Workload) -> Result<KillReport> {
    let (load, retries, victim, in_flight_at_kill) =
        load_and_pick(fleet, gateway, workload, 30_000)?;
    let node = &mut fleet.nodes[victim];
    let url = node.url();
    let router = node
        .router
        .take()
        .context("the node to kill is not running")?;
    eprintln!("kill: SIGKILL to {}", node.id);
    kill(Pid::from_raw(i32::try_from(router.pid())?), Signal::SIGKILL)?;
    drop(router);
    std::thread::sleep(Duration::from_secs(5));
    let outcome = Outcome::of(&load.finish(), gateway.retries() - retries);
    Ok(KillReport {
        node: node.id.clone(),
        in_flight_at_kill,
        gateway_status_after: gateway.status_of(&url),
        outcome,
    })
}

/// One node as the gateway and the node itself see it.
#[derive(Debug, Serialize)]
struct NodeView {
    node: String,
    alive: bool,
    gateway_status: String,
    /// Requests the gateway sent since this gateway started (`smg_worker_requests_total`).
    gateway_sent: f64,
    /// Chat requests the node answered in the same time (`llamapool_http_requests_total`).
    node_answered: Option<f64>,
    /// The node's load as the gateway last polled it (`engine_load`), and as the node
    /// reports it now (`/v1/loads`), with no load running.
    gateway_running: Option<u64>,
    node_running: Option<u64>,
}

fn gateway_view(
    fleet: &Fleet,
    gateway: &Gateway,
    counts_at_start: &[Option<f64>],
) -> Result<Vec<NodeView>> {
    // One load poll after the last request, so the gateway's copy is current.
    std::thread::sleep(Duration::from_secs(2));
    let workers = gateway.workers()?;
    Ok(fleet
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let url = node.url();
            let listed = workers.iter().find(|w| w["url"] == url.as_str());
            let alive = node.router.is_some();
            let node_answered = alive
                .then(|| node_chat_count(&node.addr))
                .flatten()
                .map(|now| now - counts_at_start.get(i).copied().flatten().unwrap_or(0.0));
            let node_running = alive
                .then(|| node_load(&node.addr, "num_running_reqs"))
                .flatten();
            NodeView {
                node: node.id.clone(),
                alive,
                gateway_status: listed
                    .and_then(|w| w["status"].as_str())
                    .unwrap_or("absent")
                    .to_string(),
                gateway_sent: gateway.sent_to(&url),
                node_answered,
                gateway_running: listed
                    .and_then(|w| w["engine_load"]["loads"][0]["num_running_reqs"].as_u64()),
                node_running,
            }
        })
        .collect())
}

fn summary(
    rows: &[RowReport],
    overhead: &Overhead,
    drain: &DrainReport,
    added: &AddReport,
    killed: &KillReport,
    view: &[NodeView],
) -> String {
    let mut out = multiturn::table(rows);
    let _ = writeln!(
        out,
        "\ngateway cost: TTFT p50 {:.1} ms through smg, {:.1} ms direct ({:+.1} ms, {} samples each)",
        overhead.ttft_p50_gateway_ms,
        overhead.ttft_p50_direct_ms,
        overhead.added_ms,
        overhead.samples
    );
    let _ = writeln!(
        out,
        "drain ({}): {} requests in flight on it at SIGTERM; exited {:.1} s after; gateway sent it {} requests after SIGTERM; then {}; {} of {} requests failed ({} retried by the gateway)",
        drain.node,
        drain.in_flight_at_sigterm,
        drain.drain_s,
        drain.sent_after_sigterm,
        drain.gateway_status_after,
        drain.outcome.failed,
        drain.outcome.requests,
        drain.outcome.gateway_retries
    );
    let _ = writeln!(
        out,
        "new node ({}): ready in the gateway {:.1} s after the discovery file changed, first request at {:.1} s; {} of {} requests failed ({} retried by the gateway)",
        added.node,
        added.ready_in_gateway_s,
        added.first_request_s,
        added.outcome.failed,
        added.outcome.requests,
        added.outcome.gateway_retries
    );
    let _ = writeln!(
        out,
        "kill -9 ({}): {} requests in flight on it; then {}; {} of {} requests failed ({} retried by the gateway){}",
        killed.node,
        killed.in_flight_at_kill,
        killed.gateway_status_after,
        killed.outcome.failed,
        killed.outcome.requests,
        killed.outcome.gateway_retries,
        if killed.outcome.errors.is_empty() {
            String::new()
        } else {
            format!(": {:?}", killed.outcome.errors)
        }
    );
    let _ = writeln!(out, "\n| node | alive | gateway status | gateway sent | node answered | running (gateway / node) |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for v in view {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} |",
            v.node,
            v.alive,
            v.gateway_status,
            v.gateway_sent,
            v.node_answered.map_or("-".to_string(), |n| n.to_string()),
            v.gateway_running.map_or("-".to_string(), |n| n.to_string()),
            v.node_running.map_or("-".to_string(), |n| n.to_string()),
        );
    }
    out
}
