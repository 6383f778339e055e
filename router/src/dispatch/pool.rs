//! The worker pool: spawning, supervision and the dispatch policy.
//!
//! Each worker has a supervisor task that starts the process (pinned by its own `main`),
//! waits for its socket and `Ready`, runs the connection until the worker goes away, hands the
//! requests it had to other workers (continuing a stream from the tokens generated so far),
//! and respawns it with exponential backoff while the others keep serving.
//!
//! Shared state is deliberately small: per worker, a status snapshot (written only by its
//! supervisor) and an atomic load counter (one [`LoadTicket`] per request it owns).

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
use super::{AbortGuard, DispatchError, Load, LoadTicket, RequestHandle, StreamEvent};
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
    load: Load,
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
                    load: Load::default(),
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
            .map(|w| w.plan.context.slots as usize)
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

    /// The model facts of any ready worker.
    pub fn worker_info(&self) -> Option<WorkerInfo> {
        self.inner.workers.iter().find_map(|w| {
            status(w)
                .info
                .filter(|_| status(w).state == WorkerState::Ready)
        })
    }

    /// Sends a request to the ready worker with the least load.
    pub fn dispatch(&self, request: GenerateRequest) -> Result<RequestHandle, DispatchError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let id = request.id;
        let current = Arc::new(AtomicUsize::new(usize::MAX));
        let flight = InFlight {
            request,
            events: events_tx,
            generated: Vec::new(),
            current: current.clone(),
            moves: 0,
            ticket: None,
        };
        self.inner
            .send_to_best(flight, None)
            .map_err(|(_, error)| error)?;
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
    pub async fn control(&self, body: ControlCall) -> Result<ControlReply, DispatchError> {
        let index = self
            .inner
            .best_worker(&[])
            .ok_or(DispatchError::NoWorkerReady)?;
        self.control_on(index, body).await
    }

    async fn control_on(
        &self,
        index: usize,
        body: ControlCall,
    ) -> Result<ControlReply, DispatchError> {
        let tx = status(&self.inner.workers[index])
            .commands
            .ok_or(DispatchError::NoWorkerReady)?;
        let (reply_tx, reply) = oneshot::channel();
        tx.send(ConnCommand::Control {
            body,
            reply: reply_tx,
        })
        .map_err(|_| DispatchError::WorkerGone)?;
        match tokio::time::timeout(Duration::from_secs(10), reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(DispatchError::WorkerGone),
            Err(_) => Err(DispatchError::NoAnswer),
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
                threads: w.plan.context.threads,
                state: s.state,
                slots: w.plan.context.slots,
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
    ) -> Result<(), (InFlight, DispatchError)> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err((flight, DispatchError::ShuttingDown));
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
            // Replacing the ticket gives the previous worker's unit back.
            flight.ticket = Some(LoadTicket::take(&worker.load));
            flight.current.store(index, Ordering::Release);
            match tx.send(ConnCommand::Generate(flight)) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(ConnCommand::Generate(back))) => {
                    flight = back;
                    flight.ticket = None;
                }
                Err(_) => unreachable!("the command sent was Generate"),
            }
        }
        Err((flight, DispatchError::NoWorkerReady))
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
                let _ = flight
                    .events
                    .send(StreamEvent::Unavailable(DispatchError::TooManyMoves(
                        flight.moves,
                    )));
                continue;
            }
            tracing::info!(id = %flight.request.id, from, tokens = flight.generated.len(), "moving a request off a failed worker");
            if let Err((flight, error)) = self.send_to_best(flight, Some(from)) {
                let _ = flight.events.send(StreamEvent::Unavailable(error));
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
                let info_pid = info.pid;
                update(worker, |s| {
                    s.state = WorkerState::Ready;
                    s.pid = Some(info.pid);
                    s.info = Some(info);
                    s.commands = Some(tx);
                    s.last_error = None;
                });
                tracing::info!(worker = index, pid = info_pid, cpus = %worker.plan.cpus, "worker ready");
                let connection = connection::run(stream, rx, &inner.metrics);
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
    let args = plan.worker_args(
        socket.clone(),
        launch.model_path.clone(),
        launch.chat_template.clone(),
    );
    let mut cmd = Command::new(&launch.worker_binary);
    cmd.args(args.to_args())
        .stdin(Stdio::null())
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
