//! The [`Pool`]: the handle the HTTP layer holds. It starts one supervisor per worker
//! ([`super::supervisor`]) and the placement tasks, submits requests (refusing those that no
//! worker's context can hold and those convicted as poison, and retrying a too-long prompt on
//! a larger worker), makes control calls, and builds the views `/workers` and `/metrics`
//! read. The operator's actions on it are in [`super::admin`]; where requests go is
//! [`super::placement`]'s job.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use llamapool_common::protocol::{ControlCall, ControlReply, GenerateRequest, Prompt, WorkerInfo};
use llamapool_common::settings::WorkerPlan;
use llamapool_common::worker::Pooling;
use llamapool_common::RequestError;
use tokio::sync::{mpsc, oneshot, watch};

use super::affinity::{prefix_chain, PrefixChain};
use super::connection::{ConnCommand, InFlight};
use super::handle::{AbortGuard, RequestHandle};
use super::placement;
use super::poison::{Fingerprint, PoisonRegistry};
use super::routing::RoutingPolicy;
use super::shared::{Inner, LaunchConfig};
use super::supervision::SupervisionPolicy;
use super::supervisor::supervise;
use super::worker::{Shape, Worker, WorkerState};
use super::{DispatchError, LoadTicket, StreamEvent};
use crate::metrics::{Gauges, Metrics, WorkerGauges};

/// How long, after the first worker is ready, `/health` waits for the others' first starts:
/// they load the same model at the same time, so they are normally a moment behind.
const FIRST_START_GRACE: Duration = Duration::from_secs(30);

/// The pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    pub(super) inner: Arc<Inner>,
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
    /// An embedding worker's pooling (`mean`, `last`, …); `None` for a generation worker.
    pub embedding: Option<Pooling>,
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
        let embedding_slots: usize = plans
            .iter()
            .filter(|plan| plan.embedding.is_some())
            .map(|plan| plan.context.slots as usize)
            .sum();
        let inner = Arc::new(Inner {
            workers: plans.into_iter().map(Worker::new).collect(),
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
            embed_calls: tokio::sync::Semaphore::new(embedding_slots.saturating_mul(2).max(1)),
        });
        for index in 0..inner.workers.len() {
            tokio::spawn(supervise(inner.clone(), index));
        }
        tokio::spawn(placement::sweep_parked(inner.clone()));
        if inner.routing.rebalance {
            tokio::spawn(placement::rebalance(inner.clone()));
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

    /// The model facts of the ready generation worker with the largest per-sequence
    /// context, else (a pool of embedding workers only) of a ready embedding worker.
    pub fn worker_info(&self) -> Option<WorkerInfo> {
        self.inner
            .workers
            .iter()
            .map(Worker::status)
            .filter(|s| matches!(s.state, WorkerState::Ready))
            .filter_map(|s| s.info)
            .max_by_key(|info| (info.embedding.is_none(), info.n_ctx_per_seq))
    }

    /// Whether any configured worker generates (else every one serves embeddings).
    pub fn generates(&self) -> bool {
        self.inner.workers.iter().any(|w| !w.is_embedding())
    }

    /// The pooling of the ready embedding workers (`None` while none is ready).
    pub fn embedding_pooling(&self) -> Option<Pooling> {
        self.inner
            .workers
            .iter()
            .filter_map(|w| w.status().info)
            .find_map(|info| info.embedding)
    }

    /// Sequence slots of the configured embedding workers.
    pub fn embedding_slots(&self) -> usize {
        self.inner
            .workers
            .iter()
            .map(Worker::plan)
            .filter(|plan| plan.embedding.is_some())
            .map(|plan| plan.context.slots as usize)
            .sum()
    }

    /// Whether any configured worker serves embeddings.
    pub fn embeds(&self) -> bool {
        self.inner.workers.iter().any(Worker::is_embedding)
    }

    /// Sends a request to a worker that takes work and whose sequences hold at least `min_ctx`
    /// tokens, as the routing policy picks it (see [`super::routing`]): packed onto the first
    /// packable worker with room, else the one most likely caching the prompt's prefix, else
    /// the least loaded.
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
            guard: AbortGuard::new(self.inner.clone(), id, current),
        })
    }

    /// Dispatches a request and waits until a worker accepts it, so the caller can commit to
    /// a response. With workers of different context sizes, a prompt too long for the chosen
    /// worker is tried on a larger one: the request is refused as too long only when no worker
    /// can take it.
    pub async fn submit(&self, request: GenerateRequest) -> Result<RequestHandle, Refusal> {
        self.refuse_poison(&request)?;
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

    /// The per-sequence contexts of the generation workers that reported one.
    fn contexts(&self) -> impl Iterator<Item = u32> + '_ {
        self.inner
            .workers
            .iter()
            .filter_map(|w| w.status().info)
            .filter(|info| info.embedding.is_none())
            .map(|info| info.n_ctx_per_seq)
    }

    fn largest_context(&self) -> u32 {
        self.contexts().max().unwrap_or(0)
    }

    fn smallest_context(&self) -> u32 {
        self.contexts().min().unwrap_or(0)
    }

    /// A control call on a worker that takes work, as the routing policy picks it for a
    /// request without a prompt (the first packable one with room, else the least loaded);
    /// in a pool of embedding workers only, the least loaded of them.
    pub async fn control(&self, body: ControlCall) -> Result<ControlReply, DispatchError> {
        let index = self
            .inner
            .best_worker(&[], 0, &[])
            .map(|(index, _)| index)
            .or_else(|| self.inner.least_loaded_embedder(&[]))
            .ok_or(DispatchError::NoWorkerReady)?;
        self.call(index, body).await
    }

    /// An `Embed` call on the least loaded embedding worker, counted in its load while it
    /// runs. It waits its turn among the calls out at once (`Inner::embed_calls`). A worker
    /// that goes away before it answers is replaced by another once (an embedding has no side
    /// effects, and an input that kills workers gets no third one).
    pub async fn embed(&self, body: ControlCall) -> Result<ControlReply, DispatchError> {
        let _turn = self
            .inner
            .embed_calls
            .acquire()
            .await
            .map_err(|_| DispatchError::ShuttingDown)?;
        let mut tried = Vec::new();
        loop {
            let index = self
                .inner
                .least_loaded_embedder(&tried)
                .ok_or(DispatchError::NoWorkerReady)?;
            tried.push(index);
            let ticket = LoadTicket::take(&self.inner.workers[index].load);
            let result = self.call(index, body.clone()).await;
            drop(ticket);
            match result {
                Err(DispatchError::WorkerGone) if tried.len() < 2 => continue,
                other => return other,
            }
        }
    }

    /// Sends a control call to worker `index` and waits for its answer, at most the hang
    /// timeout.
    async fn call(&self, index: usize, body: ControlCall) -> Result<ControlReply, DispatchError> {
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
                    n_ctx_per_seq: s.info.as_ref().map(|i| i.n_ctx_per_seq),
                    running: stats.map(|st| st.running),
                    waiting: stats.map(|st| st.waiting),
                    in_flight: w.load.load(Ordering::Acquire),
                    restarts: s.restarts,
                    last_error: s.last_error,
                    embedding: s
                        .info
                        .as_ref()
                        .and_then(|info| info.embedding)
                        .or(plan.embedding),
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

    /// Refuses a request whose fingerprint killed workers recently (see [`super::poison`]).
    fn refuse_poison(&self, request: &GenerateRequest) -> Result<(), DispatchError> {
        if !self.inner.poison.has_convictions() {
            return Ok(());
        }
        let fingerprint = Fingerprint::of(request);
        let Some(conviction) = self.inner.poison.refusal(fingerprint, Instant::now()) else {
            return Ok(());
        };
        self.inner.metrics.record_poison_refusal();
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
