//! The worker pool: spawning, supervision and the dispatch policy.
//!
//! Each worker has a supervisor task that starts the process (pinned by its own `main`),
//! waits for its socket and `Ready`, runs the connection until the worker goes away, hands the
//! requests it had to other workers (continuing a stream from the tokens generated so far),
//! and respawns it with exponential backoff while the others keep serving.
//!
//! Shared state is deliberately small: per worker, a status snapshot (written only by its
//! supervisor) and an atomic load counter (in-flight requests, kept by its connection task).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{ConnectOptions, GenericFilePath};
use llamapool_common::protocol::{
    ControlCall, ControlReply, GenerateRequest, WorkerInfo, WorkerStats,
};
use llamapool_common::settings::WorkerPlan;
use llamapool_common::RequestId;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::connection::{self, ConnCommand, InFlight};
use super::{AbortGuard, RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    Restarting,
    Stopped,
}

#[derive(Debug, Clone)]
struct Status {
    state: WorkerState,
    pid: Option<u32>,
    restarts: u32,
    info: Option<WorkerInfo>,
    last_error: Option<String>,
    commands: Option<mpsc::UnboundedSender<ConnCommand>>,
}

#[derive(Debug)]
struct Worker {
    plan: WorkerPlan,
    status: RwLock<Status>,
    /// Requests dispatched to this worker and not yet finished.
    load: AtomicUsize,
}

/// How many times a request may move to another worker after its worker died.
const MAX_MOVES: u32 = 2;

/// How to start workers.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub worker_binary: PathBuf,
    pub runtime_dir: PathBuf,
    pub model_path: PathBuf,
    pub chat_template: Option<String>,
    pub ready_timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    workers: Vec<Worker>,
    launch: LaunchConfig,
    shutting_down: AtomicBool,
    shutdown: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

/// The pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// A worker as `/workers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub id: usize,
    pub pid: Option<u32>,
    pub cpus: String,
    pub threads: u32,
    pub state: WorkerState,
    pub slots: u32,
    pub running: Option<u32>,
    pub waiting: Option<u32>,
    pub in_flight: usize,
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl Pool {
    /// Starts a supervisor per planned worker; workers come up in the background.
    pub fn start(plans: Vec<WorkerPlan>, launch: LaunchConfig, metrics: Arc<Metrics>) -> Self {
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            workers: plans
                .into_iter()
                .map(|plan| Worker {
                    plan,
                    status: RwLock::new(Status {
                        state: WorkerState::Starting,
                        pid: None,
                        restarts: 0,
                        info: None,
                        last_error: None,
                        commands: None,
                    }),
                    load: AtomicUsize::new(0),
                })
                .collect(),
            launch,
            shutting_down: AtomicBool::new(false),
            shutdown,
            metrics,
        });
        for index in 0..inner.workers.len() {
            tokio::spawn(supervise(inner.clone(), index));
        }
        Self { inner }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Total sequence slots of the configured workers.
    pub fn total_slots(&self) -> usize {
        self.inner
            .workers
            .iter()
            .map(|w| w.plan.slots as usize)
            .sum()
    }

    /// Requests dispatched and not finished, over all workers.
    pub fn in_flight(&self) -> usize {
        self.inner
            .workers
            .iter()
            .map(|w| w.load.load(Ordering::Acquire))
            .sum()
    }

    pub fn ready_count(&self) -> usize {
        self.inner
            .workers
            .iter()
            .filter(|w| status(w).state == WorkerState::Ready)
            .count()
    }

    /// Waits until `n` workers are ready (or the timeout passes); returns how many are.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.ready_count() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.ready_count()
    }

    /// The model facts of any ready worker.
    pub fn worker_info(&self) -> Option<WorkerInfo> {
        self.inner.workers.iter().find_map(|w| {
            status(w)
                .info
                .filter(|_| status(w).state == WorkerState::Ready)
        })
    }

    /// Sends a request to the ready worker with the least load.
    pub fn dispatch(&self, request: GenerateRequest) -> Result<RequestHandle, ApiError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let id = request.id;
        let current = Arc::new(AtomicUsize::new(usize::MAX));
        let flight = InFlight {
            request,
            events: events_tx,
            generated: Vec::new(),
            current: current.clone(),
            moves: 0,
        };
        self.inner
            .send_to_best(flight, None)
            .map_err(|(_, message)| ApiError::unavailable(message))?;
        Ok(RequestHandle {
            events,
            guard: AbortGuard {
                pool: self.clone(),
                id,
                current,
                finished: false,
            },
        })
    }

    /// Aborts a request on a worker (idempotent).
    pub fn abort(&self, worker: usize, id: RequestId) {
        if let Some(tx) = self
            .inner
            .workers
            .get(worker)
            .and_then(|w| status(w).commands)
        {
            let _ = tx.send(ConnCommand::Abort(id));
        }
    }

    /// A control call on the least-loaded ready worker.
    pub async fn control(&self, body: ControlCall) -> Result<ControlReply, ApiError> {
        let index = self
            .inner
            .best_worker(&[])
            .ok_or_else(|| ApiError::unavailable("no worker is ready"))?;
        self.control_on(index, body).await
    }

    async fn control_on(&self, index: usize, body: ControlCall) -> Result<ControlReply, ApiError> {
        let tx = status(&self.inner.workers[index])
            .commands
            .ok_or_else(|| ApiError::unavailable("the worker is not ready"))?;
        let (reply_tx, reply) = oneshot::channel();
        tx.send(ConnCommand::Control {
            body,
            reply: reply_tx,
        })
        .map_err(|_| ApiError::unavailable("the worker went away"))?;
        match tokio::time::timeout(Duration::from_secs(10), reply).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(ApiError::unavailable("the worker did not answer")),
        }
    }

    /// Every worker's state, with live slot counts from the ready ones.
    pub async fn views(&self) -> Vec<WorkerView> {
        let mut views = Vec::new();
        for (id, w) in self.inner.workers.iter().enumerate() {
            let s = status(w);
            let stats = if s.state == WorkerState::Ready {
                match self.control_on(id, ControlCall::Stats).await {
                    Ok(ControlReply::Stats(stats)) => Some(stats),
                    _ => None,
                }
            } else {
                None
            };
            views.push(WorkerView {
                id,
                pid: s.pid,
                cpus: w.plan.cpus.to_string(),
                threads: w.plan.threads,
                state: s.state,
                slots: w.plan.slots,
                running: stats.map(|st: WorkerStats| st.running),
                waiting: stats.map(|st| st.waiting),
                in_flight: w.load.load(Ordering::Acquire),
                restarts: s.restarts,
                last_error: s.last_error,
            });
        }
        views
    }

    /// Decode calls summed over ready workers (for `/metrics`).
    pub async fn decode_calls(&self) -> u64 {
        let mut total = 0;
        for id in 0..self.inner.workers.len() {
            if let Ok(ControlReply::Stats(s)) = self.control_on(id, ControlCall::Stats).await {
                total += s.decode_calls;
            }
        }
        total
    }

    /// Stops every worker: connections close, workers exit on EOF, stragglers are killed.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let _ = self.inner.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        while self
            .inner
            .workers
            .iter()
            .any(|w| status(w).state != WorkerState::Stopped)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn status(w: &Worker) -> Status {
    w.status
        .read()
        .expect("status lock is never poisoned")
        .clone()
}

fn update(w: &Worker, f: impl FnOnce(&mut Status)) {
    f(&mut w.status.write().expect("status lock is never poisoned"));
}

impl Inner {
    /// The policy: the ready worker with the fewest requests in flight (lowest index on ties).
    fn best_worker(&self, exclude: &[usize]) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(i, w)| !exclude.contains(i) && status(w).state == WorkerState::Ready)
            .min_by_key(|(_, w)| w.load.load(Ordering::Acquire))
            .map(|(i, _)| i)
    }

    fn send_to_best(
        &self,
        mut flight: InFlight,
        exclude: Option<usize>,
    ) -> Result<(), (InFlight, String)> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err((flight, "the server is shutting down".into()));
        }
        // A worker can go away between the choice and the send: try each ready one once.
        let mut tried: Vec<usize> = exclude.into_iter().collect();
        for _ in 0..self.workers.len() {
            let Some(index) = self.best_worker(&tried) else {
                break;
            };
            tried.push(index);
            let worker = &self.workers[index];
            let Some(tx) = status(worker).commands else {
                continue;
            };
            worker.load.fetch_add(1, Ordering::AcqRel);
            flight.current.store(index, Ordering::Release);
            match tx.send(ConnCommand::Generate(flight)) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(ConnCommand::Generate(back))) => {
                    worker.load.fetch_sub(1, Ordering::AcqRel);
                    flight = back;
                }
                Err(_) => unreachable!("the command sent was Generate"),
            }
        }
        Err((flight, "no worker is ready".into()))
    }

    /// Requests of a worker that went away move to the others.
    fn requeue(&self, from: usize, orphans: Vec<InFlight>) {
        for mut flight in orphans {
            if flight.events.is_closed() {
                continue;
            }
            flight.moves += 1;
            if flight.moves > MAX_MOVES {
                // A request that keeps taking workers down must not take down the whole pool.
                let _ = flight.events.send(StreamEvent::Unavailable(format!(
                    "the request lost {} workers in a row; giving up",
                    flight.moves
                )));
                continue;
            }
            tracing::info!(id = %flight.request.id, from, tokens = flight.generated.len(), "moving a request off a failed worker");
            if let Err((flight, message)) = self.send_to_best(flight, Some(from)) {
                let _ = flight.events.send(StreamEvent::Unavailable(message));
            }
        }
    }
}

async fn supervise(inner: Arc<Inner>, index: usize) {
    let worker = &inner.workers[index];
    let mut shutdown = inner.shutdown.subscribe();
    let mut failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        update(worker, |s| {
            s.state = if s.restarts == 0 && failures == 0 {
                WorkerState::Starting
            } else {
                WorkerState::Restarting
            }
        });
        match start_worker(&inner, index).await {
            Ok((mut child, stream, info)) => {
                failures = 0;
                let (tx, rx) = mpsc::unbounded_channel();
                update(worker, |s| {
                    s.state = WorkerState::Ready;
                    s.pid = Some(info.pid);
                    s.info = Some(info);
                    s.commands = Some(tx);
                    s.last_error = None;
                });
                tracing::info!(worker = index, pid = ?worker.status.read().map(|s| s.pid).ok().flatten(), cpus = %worker.plan.cpus, "worker ready");
                let connection = connection::run(stream, rx, &worker.load, &inner.metrics);
                tokio::pin!(connection);
                let orphans = tokio::select! {
                    orphans = &mut connection => orphans,
                    _ = shutdown.changed() => {
                        // Dropping the sender ends the connection loop after the queued commands.
                        update(worker, |s| s.commands = None);
                        connection.await
                    }
                };
                update(worker, |s| {
                    s.commands = None;
                    s.state = WorkerState::Restarting;
                });
                inner.requeue(index, orphans);
                stop_child(&mut child).await;
                update(worker, |s| s.pid = None);
                if *shutdown.borrow() {
                    break;
                }
                tracing::warn!(worker = index, "worker went away; restarting it");
            }
            Err(e) => {
                tracing::error!(worker = index, error = %e, "worker failed to start");
                update(worker, |s| s.last_error = Some(e));
                failures += 1;
            }
        }
        update(worker, |s| s.restarts += 1);
        let backoff = Duration::from_millis(250u64.saturating_mul(1 << failures.min(7)))
            .min(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
    }
    update(worker, |s| {
        s.state = WorkerState::Stopped;
        s.commands = None;
    });
}

/// Waits for the child to exit after its connection closed; kills it if it lingers.
async fn stop_child(child: &mut Child) {
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn start_worker(
    inner: &Inner,
    index: usize,
) -> Result<(Child, interprocess::local_socket::tokio::Stream, WorkerInfo), String> {
    let plan = &inner.workers[index].plan;
    let launch = &inner.launch;
    let socket = launch.runtime_dir.join(format!("worker-{index}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(&launch.worker_binary);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--model")
        .arg(&launch.model_path)
        .args(["--cpus", &plan.cpus.to_string()])
        .args(["--threads", &plan.threads.to_string()])
        .args(["--slots", &plan.slots.to_string()])
        .args(["--context", &plan.context.to_string()])
        .args(["--n-batch", &plan.n_batch.to_string()])
        .args(["--n-ubatch", &plan.n_ubatch.to_string()])
        .args(["--flash-attention", &plan.flash_attention])
        .args(["--gpu-layers", &plan.gpu_layers.to_string()]);
    cmd.args([
        "--kv-unified",
        if plan.kv_unified { "true" } else { "false" },
    ]);
    if let Some(template) = &launch.chat_template {
        cmd.args(["--chat-template", template]);
    }
    if let Some(gpu) = plan.gpu {
        cmd.env("CUDA_VISIBLE_DEVICES", gpu.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", launch.worker_binary.display()))?;
    update(&inner.workers[index], |s| s.pid = child.id());
    let deadline = tokio::time::Instant::now() + launch.ready_timeout;
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the worker exited during start-up ({status}); see its log above"
            ));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(format!(
                "the worker was not ready within {:?}",
                launch.ready_timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let name = socket
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| format!("socket name: {e}"))?;
    let mut stream = ConnectOptions::new()
        .name(name)
        .connect_tokio()
        .await
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let info = connection::handshake(&mut stream, Duration::from_secs(10)).await?;
    Ok((child, stream, info))
}
