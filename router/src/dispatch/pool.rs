//! The worker pool: per-worker shared state, the dispatch policy, the views `/workers` and
//! `/metrics` read, and the operator's drain / restart / reload.
//!
//! Each worker has a supervisor task ([`super::supervisor`]) that owns its process and its
//! connection. Shared state is deliberately small: per worker, a status snapshot (written by
//! its supervisor; `draining` also by the operator), an atomic load counter (one
//! [`LoadTicket`] per request it owns) and its [`Vitals`] (written by its connection).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use llamapool_common::protocol::{ControlCall, ControlReply, GenerateRequest, Prompt, WorkerInfo};
use llamapool_common::settings::WorkerPlan;
use llamapool_common::{RequestError, RequestId};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::affinity::{prefix_chain, PrefixChain, PrefixTable};
use super::connection::{ConnCommand, InFlight};
use super::poison::{last_words, DeathCause, Fingerprint, PoisonRegistry, Suspect, Verdict};
use super::rebalance::{self, Move, Seat};
use super::supervisor::{supervise, SupervisionPolicy};
use super::vitals::Vitals;
use super::{AbortGuard, DispatchError, Load, LoadTicket, RequestHandle, StreamEvent};
use crate::metrics::{Gauges, Metrics, WorkerGauges};

/// An adaptive worker's shape, as its last progress reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Its threads over all of its wide CPUs.
    Wide,
    /// One thread on its own CPU.
    Narrow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    /// Ready, but the operator asked for no new work; in-flight requests finish.
    Draining,
    /// Alive but making no progress: it is being killed and will be respawned.
    Hung,
    Restarting,
    /// Died too often in a short time (a crash loop): retried slowly.
    Failed,
    Stopped,
}

impl WorkerState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [Self; 7] = [
        Self::Starting,
        Self::Ready,
        Self::Draining,
        Self::Hung,
        Self::Restarting,
        Self::Failed,
        Self::Stopped,
    ];

    /// The name `/workers` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Hung => "hung",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Status {
    pub state: WorkerState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub info: Option<WorkerInfo>,
    pub last_error: Option<String>,
    pub commands: Option<mpsc::UnboundedSender<ConnCommand>>,
    /// The operator asked for no new work (drain, or a restart in progress).
    pub draining: bool,
    /// It reached ready, died, and is being started again: requests wait for it rather than
    /// fail (until a start of it fails).
    pub respawning: bool,
}

#[derive(Debug)]
pub(super) struct Worker {
    pub plan: RwLock<WorkerPlan>,
    pub status: RwLock<Status>,
    /// Requests dispatched to this worker and not yet finished.
    pub load: Load,
    pub vitals: Vitals,
    /// Wakes the supervisor to stop the worker (it is then respawned at once).
    pub restart: Notify,
    /// What its prompt cache most likely holds (cleared when it starts).
    pub prefixes: PrefixTable,
    /// The last lines its process wrote to stderr: its last words when it dies.
    pub stderr_tail: Mutex<VecDeque<String>>,
}

/// Lines of a worker's stderr kept as its last words.
const STDERR_TAIL_LINES: usize = 6;

impl Worker {
    pub fn status(&self) -> Status {
        self.status
            .read()
            .expect("status lock is never poisoned")
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().expect("status lock is never poisoned"));
    }

    pub fn plan(&self) -> WorkerPlan {
        self.plan
            .read()
            .expect("plan lock is never poisoned")
            .clone()
    }

    /// Its last progress said it is packable (adaptive, no foreign work on its CPUs), and it
    /// has a sequence slot free beyond the `load` it holds.
    fn is_packable_with_room(&self, load: usize) -> bool {
        let packable = self.vitals.stats().is_some_and(|s| s.packable);
        packable && load < self.slots()
    }

    /// Sequence slots of the running worker (0 before its first start).
    fn slots(&self) -> usize {
        self.status().info.map_or(0, |info| info.slots as usize)
    }

    /// Ready and not draining: may take new work.
    fn takes_work(&self) -> bool {
        let s = self.status();
        s.state == WorkerState::Ready && !s.draining
    }

    /// Keeps `line` among its last words.
    pub fn remember_stderr(&self, line: String) {
        let mut tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// Its last words, joined (and forgotten: a new process starts afresh).
    pub fn take_last_words(&self) -> String {
        let lines: Vec<String> = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        last_words(&lines)
    }

    /// Ready, and heard from recently (a hung worker stops counting before the watchdog acts).
    fn answers(&self, window: Duration) -> bool {
        self.status().state == WorkerState::Ready
            && self.vitals.answers_within(window, Instant::now())
    }
}

/// How many times a request may move off a worker that died of an inside cause: a safety
/// net only, since the poison policy convicts a request after two such deaths.
const MAX_MOVES: u32 = 8;

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
pub(super) struct Inner {
    pub workers: Vec<Worker>,
    pub launch: RwLock<LaunchConfig>,
    pub policy: SupervisionPolicy,
    pub routing: RoutingPolicy,
    pub shutting_down: AtomicBool,
    pub shutdown: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    /// When the first worker first became ready (see [`Pool::is_healthy`]).
    pub first_ready: OnceLock<Instant>,
    /// Held from choosing a worker until its load counts the request, so that two requests
    /// dispatched at the same moment do not both see the same worker as the least loaded.
    pub choosing: Mutex<()>,
    /// Which requests killed workers, and which are refused for it.
    pub poison: PoisonRegistry,
    /// Requests waiting for a worker that is being started again, with their deadlines.
    pub parked: Mutex<Vec<(tokio::time::Instant, InFlight)>>,
}

/// How long, after the first worker is ready, `/health` waits for the others' first starts:
/// they load the same model at the same time, so they are normally a moment behind.
const FIRST_START_GRACE: Duration = Duration::from_secs(30);

impl Inner {
    pub fn launch(&self) -> LaunchConfig {
        self.launch
            .read()
            .expect("launch lock is never poisoned")
            .clone()
    }
}

/// How requests are spread over the workers (`server.prefix_affinity`,
/// `server.affinity_max_load_gap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// Prefer the worker whose prompt cache most likely holds the prompt's longest prefix.
    pub prefix_affinity: bool,
    /// ... unless it has more than this many requests in flight beyond the least-loaded one.
    pub max_load_gap: usize,
    /// Move running requests between live adaptive workers when the machine changes under
    /// them (`server.rebalance`, see [`super::rebalance`]).
    pub rebalance: bool,
}

/// How the dispatch policy chose a worker (`llamapool_routed_total`'s outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Packed onto the first adaptive worker that no foreign work crowds and that had a free
    /// slot.
    Packed,
    /// To the worker most likely holding the longest prefix.
    Affinity,
    /// No worker held a prefix: the least loaded.
    NoPrefix,
    /// The workers holding a prefix were too busy: the least loaded.
    Overloaded,
    /// Prefix affinity is off (or the request has no prompt to match): the least loaded.
    LeastLoaded,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Self::Packed => "packed",
            Self::Affinity => "affinity",
            Self::NoPrefix => "no_prefix",
            Self::Overloaded => "overloaded",
            Self::LeastLoaded => "least_loaded",
        }
    }
}

/// A worker that may take a request, as the dispatch policy weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    /// Requests in flight on it.
    pub load: usize,
    /// Leading prompt blocks its cache most likely holds.
    pub matched: usize,
    /// Prompts its cache most likely holds: among equally loaded workers a new prefix goes to
    /// the one with the most room, so that sequential new conversations spread.
    pub cached: usize,
    /// A packable adaptive worker (no foreign work crowds its CPUs) with a free slot.
    pub packable: bool,
}

/// The policy: first, packing — the first packable worker with a free slot takes the request:
/// on a quiet machine that keeps the other adaptive workers idle, so that it widens over all
/// the CPUs (one wide context batches best). Else the candidate with the longest matched prefix
/// among those within `max_load_gap` of the least load (fewer in flight, then lower index, on
/// ties); without any match, the least loaded (fewest cached prompts, then lowest index, on
/// ties).
pub fn choose(candidates: &[Candidate], max_load_gap: usize) -> Option<(usize, Routing)> {
    if let Some(first) = candidates
        .iter()
        .filter(|c| c.packable)
        .min_by_key(|c| c.index)
    {
        return Some((first.index, Routing::Packed));
    }
    let least = candidates
        .iter()
        .min_by_key(|c| (c.load, c.cached, c.index))?;
    let mut matched = candidates.iter().filter(|c| c.matched > 0).peekable();
    if matched.peek().is_none() {
        return Some((least.index, Routing::NoPrefix));
    }
    let within_gap = matched
        .filter(|c| c.load <= least.load.saturating_add(max_load_gap))
        .max_by_key(|c| (c.matched, std::cmp::Reverse((c.load, c.index))));
    match within_gap {
        Some(c) => Some((c.index, Routing::Affinity)),
        None => Some((least.index, Routing::Overloaded)),
    }
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
    /// An adaptive worker's wide shape (`None` for a fixed worker): it runs `wide_threads`
    /// threads over `wide_cpus` while nothing else keeps them busy, else `threads` on `cpus`.
    pub wide_cpus: Option<String>,
    pub wide_threads: Option<u32>,
    /// An adaptive worker that no foreign process crowds: requests are packed onto the first
    /// such worker (from its last progress; `None` before any).
    pub packable: Option<bool>,
    /// An adaptive worker's shape now: `wide` or `narrow` (from its last progress; `None`
    /// for a fixed worker or before any).
    pub shape: Option<Shape>,
    /// Threads its decode runs with now: `wide_threads` while wide, `threads` while narrow.
    pub threads_in_use: Option<u32>,
    /// Switches between wide and narrow since the router started (an adaptive worker).
    pub shape_changes: Option<u64>,
    pub state: WorkerState,
    pub slots: u32,
    /// KV cells of its context as configured (llama.cpp may round them up).
    pub context: u32,
    /// Per-sequence context of the running worker.
    pub n_ctx_per_seq: Option<u32>,
    pub running: Option<u32>,
    pub waiting: Option<u32>,
    pub in_flight: usize,
    pub restarts: u32,
    pub last_error: Option<String>,
}

/// Why an operator's request on a worker could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("there is no worker {0}")]
    NoSuchWorker(usize),
    #[error("the new configuration has {new} workers, the pool has {old}; restart the server to change the number of workers")]
    WorkerCountChanged { old: usize, new: usize },
    #[error("worker {0} did not come back within {1:?}")]
    NotBack(usize, Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why a request was not accepted: its own fault, or the pool's.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Request(RequestError),
    Dispatch(DispatchError),
}

impl From<DispatchError> for Refusal {
    fn from(e: DispatchError) -> Self {
        Self::Dispatch(e)
    }
}

impl Pool {
    /// Starts a supervisor per planned worker; workers come up in the background.
    pub fn start(
        plans: Vec<WorkerPlan>,
        launch: LaunchConfig,
        policy: SupervisionPolicy,
        routing: RoutingPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            workers: plans
                .into_iter()
                .map(|plan| Worker {
                    plan: RwLock::new(plan),
                    status: RwLock::new(Status {
                        state: WorkerState::Starting,
                        pid: None,
                        restarts: 0,
                        info: None,
                        last_error: None,
                        commands: None,
                        draining: false,
                        respawning: false,
                    }),
                    load: Load::default(),
                    vitals: Vitals::default(),
                    restart: Notify::new(),
                    prefixes: PrefixTable::default(),
                    stderr_tail: Mutex::new(VecDeque::new()),
                })
                .collect(),
            launch: RwLock::new(launch),
            policy,
            routing,
            shutting_down: AtomicBool::new(false),
            shutdown,
            metrics,
            first_ready: OnceLock::new(),
            choosing: Mutex::new(()),
            poison: PoisonRegistry::new(policy.poison),
            parked: Mutex::new(Vec::new()),
        });
        for index in 0..inner.workers.len() {
            tokio::spawn(supervise(inner.clone(), index));
        }
        tokio::spawn(sweep_parked(inner.clone()));
        if inner.routing.rebalance {
            tokio::spawn(rebalance(inner.clone()));
        }
        Self { inner }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Total sequence slots of the configured workers.
    pub fn total_slots(&self) -> usize {
        self.inner
            .workers
            .iter()
            .map(|w| w.plan().context.slots as usize)
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

    /// What `/health` answers: a ready worker answered recently, and no worker is still in its
    /// first start, unless the first ready one has been so for [`FIRST_START_GRACE`]. So a
    /// pool that is starting up reports healthy once all its workers can take the first
    /// requests, not only the quickest (which would then get them all).
    pub fn is_healthy(&self) -> bool {
        if self.ready_count() == 0 {
            return false;
        }
        let starting = self
            .inner
            .workers
            .iter()
            .any(|w| w.status().state == WorkerState::Starting);
        let waited_enough = self
            .inner
            .first_ready
            .get()
            .is_some_and(|at| at.elapsed() >= FIRST_START_GRACE);
        !starting || waited_enough
    }

    /// Ready workers that answered recently (what `/health` counts).
    pub fn ready_count(&self) -> usize {
        let window = self.inner.policy.answer_window();
        self.inner
            .workers
            .iter()
            .filter(|w| w.answers(window))
            .count()
    }

    /// The model facts of the ready worker with the largest per-sequence context.
    pub fn worker_info(&self) -> Option<WorkerInfo> {
        self.inner
            .workers
            .iter()
            .map(Worker::status)
            .filter(|s| matches!(s.state, WorkerState::Ready))
            .filter_map(|s| s.info)
            .max_by_key(|info| info.n_ctx_per_seq)
    }

    /// Sends a request to the least-loaded worker that takes work and whose sequences hold at
    /// least `min_ctx` tokens.
    pub fn dispatch(
        &self,
        request: GenerateRequest,
        min_ctx: u32,
    ) -> Result<RequestHandle, DispatchError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let id = request.id;
        let current = Arc::new(AtomicUsize::new(usize::MAX));
        let prefix = if self.inner.routing.prefix_affinity {
            prefix_chain(&request.prompt)
        } else {
            PrefixChain::default()
        };
        let flight = InFlight {
            request,
            events: events_tx,
            generated: Vec::new(),
            current: current.clone(),
            moves: 0,
            ticket: None,
            min_ctx,
            prefix,
            probation: None,
            rebalanced: 0,
        };
        self.inner.place(flight, None).map_err(|(_, error)| error)?;
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

    /// Dispatches a request and waits until a worker accepts it, so the caller can commit to
    /// a response. With workers of different context sizes, a prompt too long for the chosen
    /// worker is tried on a larger one: the request is refused as too long only when no worker
    /// can take it.
    pub async fn submit(&self, request: GenerateRequest) -> Result<RequestHandle, Refusal> {
        self.inner.refuse_poison(&request)?;
        let mut min_ctx = known_prompt_len(&request);
        let mut next = Some(request);
        loop {
            let largest = self.largest_context();
            if largest > 0 && min_ctx > largest {
                return Err(too_long(&next.expect("a request to send"), largest));
            }
            let request = next.take().expect("a request to send");
            // Only a pool of different context sizes may need a second try.
            if largest > self.smallest_context() {
                next = Some(request.clone());
            }
            let mut handle = self.dispatch(request, min_ctx)?;
            match accepted(&mut handle).await {
                Ok(()) => return Ok(handle),
                Err(Refusal::Request(RequestError::ExceedsContext {
                    n_prompt_tokens,
                    n_requested,
                    n_ctx,
                })) if next.is_some() => {
                    let needed = n_prompt_tokens.saturating_add(n_requested);
                    if needed > self.largest_context() || n_ctx >= self.largest_context() {
                        return Err(Refusal::Request(RequestError::ExceedsContext {
                            n_prompt_tokens,
                            n_requested,
                            n_ctx: n_ctx.max(self.largest_context()),
                        }));
                    }
                    min_ctx = needed;
                }
                Err(refusal) => return Err(refusal),
            }
        }
    }

    /// Submits several requests (the `n` choices or the prompts of one HTTP request): the
    /// first alone, then, once a worker accepted it, the others together. So a request that
    /// kills a worker while it is prepared or admitted costs one worker, not one per choice;
    /// the others are refused as poison by then. All or nothing: a refusal drops (and so
    /// aborts) the choices already accepted.
    pub async fn submit_all(
        &self,
        requests: Vec<GenerateRequest>,
    ) -> Result<Vec<RequestHandle>, Refusal> {
        let mut requests = requests.into_iter();
        let Some(first) = requests.next() else {
            return Ok(Vec::new());
        };
        let first = self.submit(first).await?;
        let rest = futures_util::future::try_join_all(requests.map(|r| self.submit(r))).await?;
        Ok(std::iter::once(first).chain(rest).collect())
    }

    fn contexts(&self) -> impl Iterator<Item = u32> + '_ {
        self.inner
            .workers
            .iter()
            .filter_map(|w| w.status().info.map(|i| i.n_ctx_per_seq))
    }

    fn largest_context(&self) -> u32 {
        self.contexts().max().unwrap_or(0)
    }

    fn smallest_context(&self) -> u32 {
        self.contexts().min().unwrap_or(0)
    }

    /// Aborts a request on a worker (idempotent).
    pub fn abort(&self, worker: usize, id: RequestId) {
        if let Some(tx) = self
            .inner
            .workers
            .get(worker)
            .and_then(|w| w.status().commands)
        {
            let _ = tx.send(ConnCommand::Abort(id));
        }
    }

    /// A control call on the least-loaded worker that takes work.
    pub async fn control(&self, body: ControlCall) -> Result<ControlReply, DispatchError> {
        let index = self
            .inner
            .best_worker(&[], 0, &[])
            .map(|(index, _)| index)
            .ok_or(DispatchError::NoWorkerReady)?;
        let tx = self.inner.workers[index]
            .status()
            .commands
            .ok_or(DispatchError::NoWorkerReady)?;
        let (reply_tx, reply) = oneshot::channel();
        tx.send(ConnCommand::Control {
            body,
            reply: reply_tx,
        })
        .map_err(|_| DispatchError::WorkerGone)?;
        match tokio::time::timeout(self.inner.policy.hang_timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(DispatchError::WorkerGone),
            Err(_) => Err(DispatchError::NoAnswer),
        }
    }

    /// Every worker's state, with the load it last pushed.
    pub fn views(&self) -> Vec<WorkerView> {
        self.inner
            .workers
            .iter()
            .enumerate()
            .map(|(id, w)| {
                let s = w.status();
                let plan = w.plan();
                let live = matches!(s.state, WorkerState::Ready);
                let stats = w.vitals.stats().filter(|_| live);
                let adaptive = stats.filter(|_| plan.wide.is_some());
                let state = match s.state {
                    WorkerState::Ready if s.draining => WorkerState::Draining,
                    other => other,
                };
                WorkerView {
                    id,
                    pid: s.pid,
                    cpus: plan.cpus.to_string(),
                    threads: plan.context.threads,
                    wide_cpus: plan.wide.as_ref().map(|w| w.cpus.to_string()),
                    wide_threads: plan.wide.as_ref().map(|w| w.threads),
                    packable: adaptive.map(|st| st.packable),
                    shape: adaptive.map(|st| if st.wide { Shape::Wide } else { Shape::Narrow }),
                    threads_in_use: match adaptive {
                        Some(st) if st.threads_in_use > 0 => Some(st.threads_in_use),
                        Some(_) => None,
                        None => stats.map(|_| plan.context.threads),
                    },
                    shape_changes: plan.wide.is_some().then(|| w.vitals.shape_changes()),
                    state,
                    slots: plan.context.slots,
                    context: plan.context.context,
                    n_ctx_per_seq: s.info.map(|i| i.n_ctx_per_seq),
                    running: stats.map(|st| st.running),
                    waiting: stats.map(|st| st.waiting),
                    in_flight: w.load.load(Ordering::Acquire),
                    restarts: s.restarts,
                    last_error: s.last_error,
                }
            })
            .collect()
    }

    /// Decode calls summed over the workers' last pushed stats (for `/metrics`).
    pub fn decode_calls(&self) -> u64 {
        self.inner
            .workers
            .iter()
            .filter_map(|w| w.vitals.stats())
            .map(|s| s.decode_calls)
            .sum()
    }

    /// The pool as `/metrics` shows it at this moment.
    pub fn gauges(&self) -> Gauges {
        let processing = self.in_flight();
        let workers = self
            .views()
            .into_iter()
            .zip(&self.inner.workers)
            .map(|(view, w)| {
                let live = view.state == WorkerState::Ready || view.state == WorkerState::Draining;
                let kv_cells_used = w
                    .vitals
                    .stats()
                    .filter(|_| live)
                    .map_or(0, |s| s.kv_cells_used);
                let kv_cells = w
                    .status()
                    .info
                    .filter(|_| live)
                    .map_or(0, |i| u64::from(i.slots) * u64::from(i.n_ctx_per_seq));
                WorkerGauges {
                    state: view.state.name(),
                    slots: view.slots,
                    running: view.running.unwrap_or(0),
                    waiting: view.waiting.unwrap_or(0),
                    kv_cells_used,
                    kv_cells,
                    in_flight: view.in_flight,
                    restarts: view.restarts,
                    wide: view.shape == Some(Shape::Wide),
                    threads_in_use: view.threads_in_use.unwrap_or(0),
                    shape_changes: view.shape_changes.unwrap_or(0),
                }
            })
            .collect();
        Gauges {
            processing,
            deferred: processing.saturating_sub(self.total_slots()),
            decode_calls: self.decode_calls(),
            ready_workers: self.ready_count(),
            states: WorkerState::ALL.map(WorkerState::name).to_vec(),
            workers,
        }
    }

    fn worker(&self, id: usize) -> Result<&Worker, AdminError> {
        self.inner
            .workers
            .get(id)
            .ok_or(AdminError::NoSuchWorker(id))
    }

    /// No new work for worker `id`; what it runs finishes. Lasts until it is restarted.
    pub fn drain(&self, id: usize) -> Result<(), AdminError> {
        self.worker(id)?.update(|s| s.draining = true);
        Ok(())
    }

    /// Drains worker `id`, waits for its requests to finish (at most `drain_timeout`; what is
    /// left then moves to the other workers and continues there), stops it and waits until
    /// its replacement is ready.
    pub async fn restart(&self, id: usize, drain_timeout: Duration) -> Result<(), AdminError> {
        let worker = self.worker(id)?;
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(AdminError::ShuttingDown);
        }
        worker.update(|s| s.draining = true);
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while worker.load.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let old_pid = worker.status().pid;
        worker.restart.notify_one();
        let ready_timeout = self.inner.launch().ready_timeout;
        let deadline = tokio::time::Instant::now() + ready_timeout + Duration::from_secs(10);
        loop {
            let s = worker.status();
            if s.state == WorkerState::Ready && s.pid != old_pid && !s.draining {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(AdminError::NotBack(id, ready_timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rolling restart: takes the new plans and launch settings (same number of workers),
    /// then restarts the workers one at a time, so the others keep serving.
    pub async fn reload(
        &self,
        plans: Vec<WorkerPlan>,
        launch: LaunchConfig,
        drain_timeout: Duration,
    ) -> Result<(), AdminError> {
        let old = self.inner.workers.len();
        if plans.len() != old {
            return Err(AdminError::WorkerCountChanged {
                old,
                new: plans.len(),
            });
        }
        *self
            .inner
            .launch
            .write()
            .expect("launch lock is never poisoned") = launch;
        for (id, plan) in plans.into_iter().enumerate() {
            *self.inner.workers[id]
                .plan
                .write()
                .expect("plan lock is never poisoned") = plan;
            self.restart(id, drain_timeout).await?;
        }
        Ok(())
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
            .any(|w| w.status().state != WorkerState::Stopped)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The prompt length when it is known before a worker tokenizes it (token-id prompts).
fn known_prompt_len(request: &GenerateRequest) -> u32 {
    match &request.prompt {
        Prompt::Tokens(tokens) => {
            let wanted = request.stopping.max_tokens.unwrap_or(1);
            u32::try_from(tokens.len())
                .unwrap_or(u32::MAX)
                .saturating_add(wanted)
        }
        Prompt::Text(_) | Prompt::Chat(_) => 0,
    }
}

/// The refusal of a token prompt that no worker can hold.
fn too_long(request: &GenerateRequest, largest: u32) -> Refusal {
    let n_prompt_tokens = match &request.prompt {
        Prompt::Tokens(tokens) => u32::try_from(tokens.len()).unwrap_or(u32::MAX),
        Prompt::Text(_) | Prompt::Chat(_) => 0,
    };
    Refusal::Request(RequestError::ExceedsContext {
        n_prompt_tokens,
        n_requested: request.stopping.max_tokens.unwrap_or(1),
        n_ctx: largest,
    })
}

/// Waits until the worker admitted the request; then the response can be committed.
async fn accepted(handle: &mut RequestHandle) -> Result<(), Refusal> {
    loop {
        let refusal = match handle.events.recv().await {
            Some(StreamEvent::Accepted) => return Ok(()),
            Some(StreamEvent::Output(_)) => continue, // a worker accepts before it outputs
            Some(StreamEvent::Failed(e)) => Refusal::Request(e),
            Some(StreamEvent::Unavailable(e)) => Refusal::Dispatch(e),
            None => Refusal::Dispatch(DispatchError::WorkerGone),
        };
        handle.guard.finished(); // nothing is left to abort
        return Err(refusal);
    }
}

impl Inner {
    /// The workers that take work and fit `min_ctx`, weighed by [`choose`]: prefix affinity
    /// for `prefix` when it is on, else the least loaded.
    pub fn best_worker(
        &self,
        exclude: &[usize],
        min_ctx: u32,
        prefix: &[u64],
    ) -> Option<(usize, Routing)> {
        let candidates: Vec<Candidate> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| !exclude.contains(i) && w.takes_work())
            .filter(|(_, w)| {
                w.status()
                    .info
                    .is_some_and(|info| info.n_ctx_per_seq >= min_ctx)
            })
            .map(|(index, w)| {
                let (matched, cached) = if prefix.is_empty() {
                    (0, 0)
                } else {
                    w.prefixes.weigh(prefix)
                };
                let load = w.load.load(Ordering::Acquire);
                Candidate {
                    index,
                    load,
                    matched,
                    cached,
                    packable: w.is_packable_with_room(load),
                }
            })
            .collect();
        let (index, routing) = choose(&candidates, self.routing.max_load_gap)?;
        let routing = match routing {
            Routing::NoPrefix if prefix.is_empty() => Routing::LeastLoaded,
            other => other,
        };
        Some((index, routing))
    }

    pub fn send_to_best(
        &self,
        mut flight: InFlight,
        exclude: Option<usize>,
    ) -> Result<(), (InFlight, DispatchError)> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err((flight, DispatchError::ShuttingDown));
        }
        // A worker can go away between the choice and the send: try each ready one once.
        let mut tried: Vec<usize> = exclude.into_iter().collect();
        let _choosing = self.choosing.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..self.workers.len() {
            let Some((index, routing)) = self.best_worker(&tried, flight.min_ctx, &flight.prefix)
            else {
                break;
            };
            tried.push(index);
            let worker = &self.workers[index];
            let Some(tx) = worker.status().commands else {
                continue;
            };
            // Replacing the ticket gives the previous worker's unit back.
            flight.ticket = Some(LoadTicket::take(&worker.load));
            flight.current.store(index, Ordering::Release);
            let prefix = flight.prefix.clone();
            match tx.send(ConnCommand::Generate(Box::new(flight))) {
                Ok(()) => {
                    self.on_dispatched(index, prefix, routing);
                    return Ok(());
                }
                Err(mpsc::error::SendError(ConnCommand::Generate(back))) => {
                    flight = *back;
                    flight.ticket = None;
                }
                Err(_) => unreachable!("the command sent was Generate"),
            }
        }
        Err((flight, DispatchError::NoWorkerReady))
    }

    /// A request went to worker `index`: counts how it was chosen, and the worker now most
    /// likely caches `prefix` (see [`PrefixTable::record`]).
    fn on_dispatched(&self, index: usize, prefix: PrefixChain, routing: Routing) {
        self.metrics.record_routing(routing.name());
        if prefix.is_empty() {
            return;
        }
        let worker = &self.workers[index];
        worker.prefixes.record(prefix, worker.slots());
    }

    /// Refuses a request whose fingerprint killed workers recently (see [`super::poison`]).
    fn refuse_poison(&self, request: &GenerateRequest) -> Result<(), DispatchError> {
        if !self.poison.has_convictions() {
            return Ok(());
        }
        let fingerprint = Fingerprint::of(request);
        let Some(conviction) = self.poison.refusal(fingerprint, Instant::now()) else {
            return Ok(());
        };
        self.metrics.record_poison_refusal();
        tracing::warn!(request_id = %request.request_id, %fingerprint, "refusing a request that killed workers");
        let secs = conviction
            .until
            .saturating_duration_since(Instant::now())
            .as_secs();
        Err(DispatchError::PoisonRefused {
            reason: conviction.reason,
            retry_after_secs: secs,
        })
    }

    /// Sends a request to the best worker; when none takes work but one that reached ready is
    /// being started again after a death, the request waits for it (parked, see
    /// [`Inner::unpark`]).
    pub fn place(
        &self,
        flight: InFlight,
        exclude: Option<usize>,
    ) -> Result<(), (InFlight, DispatchError)> {
        match self.send_to_best(flight, exclude) {
            Err((flight, DispatchError::NoWorkerReady)) if self.one_is_coming_back() => {
                self.park(flight);
                Ok(())
            }
            other => other,
        }
    }

    /// A worker that reached ready is being started again (after a death, not an operator's
    /// stop).
    fn one_is_coming_back(&self) -> bool {
        self.workers.iter().any(|w| {
            let s = w.status();
            s.respawning && !s.draining && s.state != WorkerState::Failed
        })
    }

    /// How long a parked request waits for a worker to come back before it gets a 503.
    fn park_timeout(&self) -> Duration {
        self.launch().ready_timeout.min(Duration::from_secs(60))
    }

    fn park(&self, flight: InFlight) {
        let deadline = tokio::time::Instant::now() + self.park_timeout();
        tracing::info!(request_id = %flight.request.request_id, "no worker is ready; the request waits for one that is restarting");
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((deadline, flight));
    }

    /// Sends the parked requests on (a worker became ready), and ends those whose wait ran
    /// out or whose client left.
    pub fn unpark(&self) {
        let now = tokio::time::Instant::now();
        let parked: Vec<(tokio::time::Instant, InFlight)> =
            std::mem::take(&mut *self.parked.lock().unwrap_or_else(PoisonError::into_inner));
        for (deadline, flight) in parked {
            if flight.events.is_closed() {
                continue;
            }
            if now >= deadline {
                let _ = flight
                    .events
                    .send(StreamEvent::Unavailable(DispatchError::NoWorkerReady));
                continue;
            }
            match self.send_to_best(flight, None) {
                Ok(()) => {}
                Err((flight, DispatchError::NoWorkerReady)) if self.one_is_coming_back() => {
                    self.parked
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((deadline, flight));
                }
                Err((flight, error)) => {
                    let _ = flight.events.send(StreamEvent::Unavailable(error));
                }
            }
        }
    }

    /// Every worker as the rebalancing policy sees it.
    fn seats(&self) -> Vec<Seat> {
        self.workers
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let stats = w.vitals.stats();
                Seat {
                    index,
                    adaptive: w.plan().wide.is_some() && w.takes_work() && stats.is_some(),
                    packable: stats.is_some_and(|s| s.packable),
                    load: w.load.load(Ordering::Acquire),
                    slots: w.slots(),
                }
            })
            .collect()
    }

    /// Asks worker `planned.from` to release requests and places them again (on
    /// `planned.to`, as the routing policy picks it). Returns how many moved.
    async fn rebalance_once(&self, planned: Move) -> usize {
        let Some(tx) = self.workers[planned.from].status().commands else {
            return 0;
        };
        let (reply, released) = oneshot::channel();
        let command = ConnCommand::Release {
            count: planned.count,
            reply,
        };
        if tx.send(command).is_err() {
            return 0;
        }
        let Ok(Ok(flights)) = tokio::time::timeout(rebalance::COOLDOWN, released).await else {
            return 0;
        };
        let moved = flights.len();
        if moved == 0 {
            return 0;
        }
        tracing::info!(
            from = planned.from,
            to = planned.to,
            requests = moved,
            reason = planned.reason.name(),
            "moving running requests between workers"
        );
        for mut flight in flights {
            flight.rebalanced += 1;
            self.metrics.record_rebalance(planned.reason.name());
            let placed = match self.send_to_best(flight, Some(planned.from)) {
                Err((flight, _)) => self.place(flight, None),
                ok => ok,
            };
            if let Err((flight, error)) = placed {
                let _ = flight.events.send(StreamEvent::Unavailable(error));
            }
        }
        moved
    }

    /// Requests of a worker that went away: judged by the poison policy, then moved to the
    /// others (those on probation one fingerprint at a time), or ended as poison.
    pub fn requeue(self: &Arc<Self>, from: usize, orphans: Vec<InFlight>, cause: &DeathCause) {
        let orphans: Vec<InFlight> = orphans
            .into_iter()
            .filter(|f| !f.events.is_closed())
            .collect();
        if orphans.is_empty() {
            return;
        }
        let suspects: Vec<Suspect> = orphans
            .iter()
            .map(|f| Suspect {
                fingerprint: Fingerprint::of(&f.request),
                on_probation: f.probation.is_some(),
            })
            .collect();
        let last_words = self.workers[from].take_last_words();
        let verdicts = self
            .poison
            .judge(cause, &suspects, &last_words, Instant::now());
        let mut on_probation: Vec<(Fingerprint, InFlight)> = Vec::new();
        for ((mut flight, suspect), verdict) in orphans.into_iter().zip(suspects).zip(verdicts) {
            flight.probation = None;
            match verdict {
                Verdict::Convicted(conviction) => {
                    self.metrics.record_poison_conviction();
                    tracing::error!(
                        request_id = %flight.request.request_id,
                        fingerprint = %conviction.fingerprint,
                        worker = from,
                        reason = %conviction.reason,
                        "a request killed its worker: ending it and refusing it for a while"
                    );
                    let _ =
                        flight
                            .events
                            .send(StreamEvent::Unavailable(DispatchError::PoisonKilled(
                                conviction.reason,
                            )));
                }
                Verdict::Move { probation: true } => {
                    on_probation.push((suspect.fingerprint, flight));
                }
                Verdict::Move { probation: false } => self.move_one(from, flight, cause),
            }
        }
        if !on_probation.is_empty() {
            tokio::spawn(probation(self.clone(), from, on_probation));
        }
    }

    /// Moves one request off worker `from`. Only inside deaths count against its moves.
    fn move_one(&self, from: usize, mut flight: InFlight, cause: &DeathCause) {
        if matches!(cause, DeathCause::Inside(_)) {
            flight.moves += 1;
            if flight.moves > MAX_MOVES {
                let _ = flight
                    .events
                    .send(StreamEvent::Unavailable(DispatchError::TooManyMoves(
                        flight.moves,
                    )));
                return;
            }
        }
        tracing::info!(request_id = %flight.request.request_id, id = %flight.request.id, from, tokens = flight.generated.len(), "moving a request off a failed worker");
        let resumed = !flight.generated.is_empty();
        match self.place(flight, Some(from)) {
            Ok(()) => self.metrics.record_move(resumed),
            Err((flight, error)) => {
                let _ = flight.events.send(StreamEvent::Unavailable(error));
            }
        }
    }
}

/// Compares the pool's placement with the workers' shapes every [`rebalance::INTERVAL`] and
/// makes the move [`rebalance::plan`] asks for, until the pool shuts down.
async fn rebalance(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ticks = tokio::time::interval(rebalance::INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => return,
        }
        if inner.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let Some(planned) = rebalance::plan(&inner.seats()) else {
            continue;
        };
        if inner.rebalance_once(planned).await > 0 {
            tokio::time::sleep(rebalance::COOLDOWN).await;
        }
    }
}

/// Ends the parked requests whose wait ran out (or whose client left), once a second, until
/// the pool shuts down.
async fn sweep_parked(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => {}
        }
        let waiting = !inner
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if waiting {
            inner.unpark();
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Sends the suspects of a death on one fingerprint at a time, the freshest (no token yet)
/// first: the next group goes when one of the previous produced a token, or all of it ended,
/// or after the hang timeout. A death meanwhile convicts the group still on probation.
async fn probation(inner: Arc<Inner>, from: usize, suspects: Vec<(Fingerprint, InFlight)>) {
    let mut groups: Vec<(Fingerprint, Vec<InFlight>)> = Vec::new();
    for (fingerprint, flight) in suspects {
        match groups.iter_mut().find(|(f, _)| *f == fingerprint) {
            Some((_, group)) => group.push(flight),
            None => groups.push((fingerprint, vec![flight])),
        }
    }
    groups.sort_by_key(|(_, group)| group.iter().any(|f| !f.generated.is_empty()));
    let cause = DeathCause::Inside("died".into());
    for (fingerprint, group) in groups {
        let (passed_tx, mut passed) = mpsc::channel(1);
        tracing::info!(worker = from, %fingerprint, requests = group.len(), "sending a suspect on, on probation");
        for mut flight in group {
            flight.probation = Some(passed_tx.clone());
            inner.move_one(from, flight, &cause);
        }
        drop(passed_tx);
        let _ = tokio::time::timeout(inner.policy.hang_timeout, passed.recv()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_what_workers_shows() {
        for state in WorkerState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }

    fn c(index: usize, load: usize, matched: usize) -> Candidate {
        Candidate {
            index,
            load,
            matched,
            cached: 0,
            packable: false,
        }
    }

    #[test]
    fn the_first_packable_worker_with_room_takes_everything_first() {
        let mut workers = [c(0, 5, 0), c(1, 0, 9), c(2, 0, 0)];
        workers[0].packable = true;
        workers[2].packable = true;
        assert_eq!(choose(&workers, 2), Some((0, Routing::Packed)));
        workers[0].packable = false;
        workers[2].packable = false;
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
    }

    #[test]
    fn a_new_prefix_goes_to_the_idle_worker_with_the_fewest_cached_prompts() {
        let mut workers = [c(0, 0, 0), c(1, 0, 0), c(2, 1, 0)];
        workers[0].cached = 3;
        workers[1].cached = 1;
        assert_eq!(choose(&workers, 2), Some((1, Routing::NoPrefix)));
    }

    #[test]
    fn without_a_prefix_the_least_loaded_wins_lowest_index_first() {
        let workers = [c(0, 3, 0), c(1, 1, 0), c(2, 1, 0)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::NoPrefix)));
        assert_eq!(choose(&[], 2), None);
    }

    #[test]
    fn the_longest_prefix_wins_within_the_load_gap() {
        let workers = [c(0, 0, 0), c(1, 2, 5), c(2, 1, 3)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
        // Worker 1 is now 3 beyond the least loaded: the next-longest holder within the gap.
        let workers = [c(0, 0, 0), c(1, 3, 5), c(2, 1, 3)];
        assert_eq!(choose(&workers, 2), Some((2, Routing::Affinity)));
    }

    #[test]
    fn holders_too_busy_fall_back_to_the_least_loaded() {
        let workers = [c(0, 0, 0), c(1, 4, 5)];
        assert_eq!(choose(&workers, 2), Some((0, Routing::Overloaded)));
        assert_eq!(choose(&workers, 4), Some((1, Routing::Affinity)));
    }

    #[test]
    fn equal_matches_go_to_the_less_loaded() {
        let workers = [c(0, 2, 4), c(1, 1, 4)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
    }
}
