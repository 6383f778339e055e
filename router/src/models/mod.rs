//! Several models in one router: the [`ModelRegistry`] owns each configured model's state
//! (`unloaded`, `loading`, `loaded`, `unloading`, `failed`), loads a model on demand, unloads models to
//! stay within `server.models_max` and the memory budget, and unloads idle ones after their
//! `ttl_secs`. A loaded model is a pool of its own workers behind an `AppState` of its own
//! (its admission permits, its queue, its metrics), so one model's queue, failover and prefix
//! affinity never involve another's workers.
//!
//! Policy ([`LoadPolicy`], [`ModelRegistry::make_room`]): a model with requests in flight
//! (a [`Lease`] held, or work in its pool, or a request waiting for it), or still loading, or
//! pinned, is never unloaded to make room; among the others the lowest priority, then the
//! least recently used goes first, and only when enough can go. A request for a model
//! that cannot get room waits (up to `server.model_load_timeout_secs`) for a busy model to
//! become idle, and then gets a 503 with `Retry-After`.
//!
//! With one model configured the registry is not used at all: the router is the single-model
//! server it always was.

pub mod estimate;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use llamapool_common::settings::ModelPlan;
use serde::Serialize;
use tokio::sync::Notify;

use crate::dispatch::Pool;
use crate::metrics::Metrics;

/// What a loaded model is to the registry: the state its requests are served with (the HTTP
/// layer's), of which the registry needs only the pool.
pub trait ModelState: Send + Sync + 'static {
    fn pool(&self) -> &Pool;
}

/// Starts a model's workers: from its plan, its resolved file and its metrics, the state its
/// requests are served with (the pool starts in the background).
pub type Starter<S> =
    Box<dyn Fn(&ModelPlan, PathBuf, Arc<Metrics>) -> Result<Arc<S>, String> + Send + Sync>;

/// The limits loading works within (`server.models_*`).
#[derive(Debug, Clone, Copy)]
pub struct LoadPolicy {
    /// Models loaded (or loading) at once; 0: no limit.
    pub models_max: usize,
    /// Bytes the loaded models' estimates may add up to.
    pub memory_budget: u64,
    /// A request for an unloaded model loads it.
    pub autoload: bool,
    /// How long a request waits for its model.
    pub load_timeout: Duration,
    /// How long a model may take to get its first worker ready.
    pub ready_timeout: Duration,
    /// A failed model is tried again by a request after this long.
    pub failed_retry: Duration,
    /// How long an unload waits for the model's requests to finish.
    pub drain_timeout: Duration,
}

/// A model's state as `/v1/models` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Unloaded,
    Loading,
    Loaded,
    Unloading,
    Failed,
}

/// A client's name for an error message: at most 200 characters.
fn shortened(name: &str) -> String {
    match name.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.to_string(),
    }
}

/// Why a request could not get its model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("model {:?} not found; this server serves {}", shortened(requested), served.join(", "))]
    NotFound {
        requested: String,
        served: Vec<String>,
    },
    #[error("model {0:?} is not loaded (load it with POST /models/load)")]
    NotLoaded(String),
    #[error("model {0:?} did not finish loading in time; retry shortly")]
    LoadTimeout(String),
    #[error("model {name:?} failed to load: {error}")]
    Failed { name: String, error: String },
    #[error("too many requests are waiting for model {0:?}; retry shortly")]
    TooManyWaiting(String),
}

/// One model's state.
enum Phase<S> {
    Unloaded,
    Loading,
    Loaded(Loaded<S>),
    /// Its pool is stopping (its requests finish first): it still holds its memory and cores,
    /// so it counts against the limits until it is `Unloaded`.
    Unloading,
    Failed {
        error: String,
        at: Instant,
    },
}

impl<S> Phase<S> {
    /// Holds memory and cores, or is about to: counts against `models_max` and the budget.
    fn is_resident(&self) -> bool {
        matches!(self, Self::Loaded(_) | Self::Loading | Self::Unloading)
    }
}

/// What [`ModelRegistry::make_room`] found.
enum Room {
    /// Enough was unloaded (or nothing had to be).
    Made,
    /// Models in the way are busy, loading or unloading: wait.
    NotYet,
    /// Even with every unpinned model gone it would not fit.
    Never(String),
}

/// A loaded model: its state and the requests that hold it.
struct Loaded<S> {
    state: Arc<S>,
    leases: Arc<AtomicUsize>,
}

impl<S: ModelState> Loaded<S> {
    /// Nothing holds it and its pool has nothing in flight.
    fn is_idle(&self) -> bool {
        self.leases.load(Ordering::Acquire) == 0 && self.state.pool().in_flight() == 0
    }
}

struct Slot<S> {
    phase: Phase<S>,
    last_used: Instant,
    /// Bytes its estimate says it takes (known once it was tried).
    estimate: Option<u64>,
    /// Requests waiting for it to be loaded.
    waiters: usize,
}

/// Every model's state, and the order in which models that wait for room get it.
struct Table<S> {
    slots: Vec<Slot<S>>,
    /// Models waiting for room, first come first served (llama-server's queue): one entry
    /// per model however many requests wait for it.
    queue: VecDeque<usize>,
}

impl<S> std::ops::Index<usize> for Table<S> {
    type Output = Slot<S>;
    fn index(&self, index: usize) -> &Slot<S> {
        &self.slots[index]
    }
}

impl<S> std::ops::IndexMut<usize> for Table<S> {
    fn index_mut(&mut self, index: usize) -> &mut Slot<S> {
        &mut self.slots[index]
    }
}

/// Every configured model and its state. One per router; cheap to share (`Arc`).
pub struct ModelRegistry<S> {
    plans: Vec<ModelPlan>,
    metrics: Vec<Arc<Metrics>>,
    slots: Mutex<Table<S>>,
    changed: Notify,
    policy: LoadPolicy,
    starter: Starter<S>,
    models_dir: PathBuf,
}

impl<S> std::fmt::Debug for ModelRegistry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("models", &self.plans.len())
            .finish_non_exhaustive()
    }
}

/// A request's hold on its loaded model: while any is held, the model is not unloaded to
/// make room. Dropped with the response (its body, for a stream).
#[derive(Debug)]
pub struct Lease<S: ModelState> {
    leases: Arc<AtomicUsize>,
    registry: Arc<ModelRegistry<S>>,
    index: usize,
}

impl<S: ModelState> Drop for Lease<S> {
    fn drop(&mut self) {
        self.leases.fetch_sub(1, Ordering::AcqRel);
        self.registry.lock()[self.index].last_used = Instant::now();
        self.registry.changed.notify_waiters();
    }
}

/// A loaded model's state and the request's lease on it.
pub type Held<S> = (Arc<S>, Lease<S>);

/// A model as `/v1/models` lists it.
#[derive(Clone)]
pub struct ModelListing<S> {
    pub plan_index: usize,
    pub status: Status,
    pub state: Option<Arc<S>>,
    pub error: Option<String>,
}

impl<S: ModelState> ModelRegistry<S> {
    /// The registry of `plans`, none loaded yet ([`Self::start`] loads those marked
    /// `load_on_startup`). `models_dir` is where relative paths are also looked for.
    pub fn new(
        plans: Vec<ModelPlan>,
        policy: LoadPolicy,
        starter: Starter<S>,
        models_dir: PathBuf,
    ) -> Arc<Self> {
        let metrics = plans
            .iter()
            .map(|p| Arc::new(Metrics::for_model(p.alias())))
            .collect();
        let slots = plans
            .iter()
            .map(|_| Slot {
                phase: Phase::Unloaded,
                last_used: Instant::now(),
                estimate: None,
                waiters: 0,
            })
            .collect();
        Arc::new(Self {
            plans,
            metrics,
            slots: Mutex::new(Table {
                slots,
                queue: VecDeque::new(),
            }),
            changed: Notify::new(),
            policy,
            starter,
            models_dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<S>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the `load_on_startup` models and starts the idle-unload sweep.
    pub fn start(self: &Arc<Self>) {
        for plan in self.plans.iter().filter(|p| p.load_on_startup) {
            let registry = self.clone();
            let index = plan.index;
            tokio::spawn(async move {
                if let Err(error) = registry.load(index).await {
                    tracing::warn!(%error, "a load_on_startup model did not load");
                }
            });
        }
        tokio::spawn(sweep_idle(Arc::downgrade(self)));
    }

    pub fn policy(&self) -> &LoadPolicy {
        &self.policy
    }

    pub fn plans(&self) -> &[ModelPlan] {
        &self.plans
    }

    /// Every model's metrics, in plan order.
    pub fn metrics(&self) -> &[Arc<Metrics>] {
        &self.metrics
    }

    /// The model a request names: by one of its names, else the model that answers unknown
    /// names, else 404; no name: the first model.
    pub fn find(&self, requested: Option<&str>) -> Result<usize, ModelError> {
        let Some(name) = requested.filter(|n| !n.is_empty()) else {
            return Ok(0);
        };
        if let Some(plan) = self
            .plans
            .iter()
            .find(|p| p.names.iter().any(|n| n == name))
        {
            return Ok(plan.index);
        }
        self.plans
            .iter()
            .find(|p| p.catch_all)
            .map(|p| p.index)
            .ok_or_else(|| ModelError::NotFound {
                requested: name.to_string(),
                served: self.plans.iter().map(|p| p.alias().to_string()).collect(),
            })
    }

    /// The model called exactly `name` (`/models/load` and `/models/unload` name one model,
    /// not whatever answers unknown names).
    pub fn find_exact(&self, name: &str) -> Result<usize, ModelError> {
        self.plans
            .iter()
            .find(|p| p.names.iter().any(|n| n == name))
            .map(|p| p.index)
            .ok_or_else(|| ModelError::NotFound {
                requested: name.to_string(),
                served: self.plans.iter().map(|p| p.alias().to_string()).collect(),
            })
    }

    /// Every model with its status, in plan order.
    pub fn listing(&self) -> Vec<ModelListing<S>> {
        self.lock()
            .slots
            .iter()
            .enumerate()
            .map(|(plan_index, slot)| match &slot.phase {
                Phase::Unloaded => ModelListing {
                    plan_index,
                    status: Status::Unloaded,
                    state: None,
                    error: None,
                },
                Phase::Loading => ModelListing {
                    plan_index,
                    status: Status::Loading,
                    state: None,
                    error: None,
                },
                Phase::Unloading => ModelListing {
                    plan_index,
                    status: Status::Unloading,
                    state: None,
                    error: None,
                },
                Phase::Loaded(loaded) => ModelListing {
                    plan_index,
                    status: Status::Loaded,
                    state: Some(loaded.state.clone()),
                    error: None,
                },
                Phase::Failed { error, .. } => ModelListing {
                    plan_index,
                    status: Status::Failed,
                    state: None,
                    error: Some(error.clone()),
                },
            })
            .collect()
    }

    /// The first loaded model, in plan order.
    pub fn first_loaded(&self) -> Option<usize> {
        self.loaded().first().map(|(i, _)| *i)
    }

    /// The loaded models' states (for `/metrics` and shutdown).
    pub fn loaded(&self) -> Vec<(usize, Arc<S>)> {
        self.lock()
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match &slot.phase {
                Phase::Loaded(loaded) => Some((i, loaded.state.clone())),
                _ => None,
            })
            .collect()
    }

    /// Model `index` for a request: loaded (by this call, with autoload: the request's
    /// `autoload`, else `server.models_autoload`) and held until the lease drops. Waits at
    /// most `load_timeout`.
    pub async fn lease(
        self: &Arc<Self>,
        index: usize,
        autoload: Option<bool>,
    ) -> Result<Held<S>, ModelError> {
        self.acquire(index, autoload.unwrap_or(self.policy.autoload))
            .await
    }

    /// Loads model `index` (`POST /models/load`, and start-up) and waits for it, whatever
    /// `autoload` says.
    pub async fn load(self: &Arc<Self>, index: usize) -> Result<Arc<S>, ModelError> {
        {
            // An operator's load tries a failed model again at once.
            let mut table = self.lock();
            if matches!(table[index].phase, Phase::Failed { .. }) {
                table[index].phase = Phase::Unloaded;
                table[index].estimate = None;
            }
        }
        self.acquire(index, true).await.map(|(state, _)| state)
    }

    async fn acquire(
        self: &Arc<Self>,
        index: usize,
        autoload: bool,
    ) -> Result<Held<S>, ModelError> {
        let deadline = tokio::time::Instant::now() + self.policy.load_timeout;
        let _waiting = Waiting::new(self, index)?;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(result) = self.try_acquire(index, autoload) {
                return result;
            }
            // Busy models free up without a notification when their pool empties; look again
            // every 100 ms as well.
            let tick = tokio::time::Instant::now() + Duration::from_millis(100);
            if tokio::time::timeout_at(deadline.min(tick), changed)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Err(ModelError::LoadTimeout(self.plans[index].alias().into()));
            }
        }
    }

    /// One look: the model with a lease, an error, or `None` to wait (loading, or no room yet).
    fn try_acquire(
        self: &Arc<Self>,
        index: usize,
        autoload: bool,
    ) -> Option<Result<Held<S>, ModelError>> {
        let name = self.plans[index].alias().to_string();
        let mut slots = self.lock();
        match &slots[index].phase {
            Phase::Loaded(loaded) => {
                loaded.leases.fetch_add(1, Ordering::AcqRel);
                let lease = Lease {
                    leases: loaded.leases.clone(),
                    registry: self.clone(),
                    index,
                };
                let state = loaded.state.clone();
                slots[index].last_used = Instant::now();
                return Some(Ok((state, lease)));
            }
            Phase::Loading | Phase::Unloading => return None,
            Phase::Failed { error, at } => {
                if !autoload || at.elapsed() < self.policy.failed_retry {
                    return Some(Err(ModelError::Failed {
                        name,
                        error: error.clone(),
                    }));
                }
                // Time to try it again, once: its file is read afresh.
                slots[index].phase = Phase::Unloaded;
                slots[index].estimate = None;
            }
            Phase::Unloaded if !autoload => return Some(Err(ModelError::NotLoaded(name))),
            Phase::Unloaded => {}
        }
        // Unloaded: its estimate first (read outside the lock: it reads the file's header),
        // then room for it.
        let cached = slots[index].estimate;
        drop(slots);
        let estimate = match cached {
            Some(bytes) => bytes,
            None => match tokio::task::block_in_place(|| self.estimate(index)) {
                Ok(bytes) => bytes,
                Err(error) => {
                    let mut table = self.lock();
                    // Only an unloaded model fails here: another request may have loaded it
                    // meanwhile (a file being replaced can fail one read and not the next).
                    if !matches!(table[index].phase, Phase::Unloaded) {
                        return None;
                    }
                    tracing::warn!(model = %name, %error, "model failed to load");
                    table[index].phase = Phase::Failed {
                        error: error.clone(),
                        at: Instant::now(),
                    };
                    drop(table);
                    self.changed.notify_waiters();
                    return Some(Err(ModelError::Failed { name, error }));
                }
            },
        };
        let mut slots = self.lock();
        if !matches!(slots[index].phase, Phase::Unloaded) {
            return None; // another request started it meanwhile
        }
        slots[index].estimate = Some(estimate);
        if !slots.queue.contains(&index) {
            slots.queue.push_back(index);
        }
        // First come, first served: a model waits for the ones queued before it.
        if slots.queue.front() != Some(&index) {
            return None;
        }
        match self.make_room(&mut slots.slots, index, estimate) {
            Room::Made => {}
            Room::NotYet => return None,
            Room::Never(why) => {
                slots.queue.pop_front();
                return Some(Err(ModelError::Failed { name, error: why }));
            }
        }
        slots.queue.pop_front();
        slots[index].phase = Phase::Loading;
        drop(slots);
        self.changed.notify_waiters();
        tokio::spawn(self.clone().run_load(index));
        None
    }

    /// The model's file, resolved, and its estimated bytes (reads the GGUF header: a few MB).
    fn estimate(&self, index: usize) -> Result<u64, String> {
        let path = self.resolved_path(index)?;
        estimate::estimate(&path, &self.plans[index].workers).map(|e| e.total())
    }

    fn resolved_path(&self, index: usize) -> Result<PathBuf, String> {
        self.plans[index]
            .settings
            .resolve_model_path(&self.models_dir)
            .map_err(|e| e.message)
    }

    /// Unloads idle models until model `index` fits both limits, choosing them first (lowest
    /// priority, then least recently used: [`Self::victims`]) so that nothing is unloaded
    /// unless enough can go. A model bigger than the whole budget still loads once nothing
    /// else is resident.
    fn make_room(self: &Arc<Self>, slots: &mut [Slot<S>], index: usize, estimate: u64) -> Room {
        let resident: Vec<usize> = (0..slots.len())
            .filter(|&i| i != index && slots[i].phase.is_resident())
            .collect();
        let fits = |gone: &[usize]| {
            let left: Vec<usize> = resident
                .iter()
                .copied()
                .filter(|i| !gone.contains(i))
                .collect();
            let used: u64 = left.iter().filter_map(|&i| slots[i].estimate).sum();
            let count_ok = self.policy.models_max == 0 || left.len() < self.policy.models_max;
            let memory_ok =
                left.is_empty() || used.saturating_add(estimate) <= self.policy.memory_budget;
            count_ok && memory_ok
        };
        let mut gone = Vec::new();
        for victim in Self::victims(slots, &self.plans, index) {
            if fits(&gone) {
                break;
            }
            gone.push(victim);
        }
        if fits(&gone) {
            for victim in gone {
                self.unload_locked(slots, victim, "to make room");
            }
            return Room::Made;
        }
        // Would it fit once every model that may ever go has gone?
        let evictable: Vec<usize> = resident
            .iter()
            .copied()
            .filter(|&i| !self.plans[i].pinned)
            .collect();
        if fits(&evictable) {
            Room::NotYet
        } else {
            Room::Never(format!(
                "it does not fit beside the pinned models (server.models_max = {}, \
                 server.models_memory_mib = {})",
                self.policy.models_max,
                self.policy.memory_budget / (1024 * 1024)
            ))
        }
    }

    /// The loaded models that may be unloaded now, in the order they go: idle (no lease, no
    /// work in the pool, no request waiting for it), not pinned; lowest priority first, then
    /// least recently used.
    fn victims(slots: &[Slot<S>], plans: &[ModelPlan], index: usize) -> Vec<usize> {
        let mut victims: Vec<(usize, (i32, Instant))> = slots
            .iter()
            .enumerate()
            .filter(|(i, slot)| *i != index && !plans[*i].pinned && slot.waiters == 0)
            .filter_map(|(i, slot)| match &slot.phase {
                Phase::Loaded(loaded) if loaded.is_idle() => {
                    Some((i, (plans[i].priority, slot.last_used)))
                }
                _ => None,
            })
            .collect();
        victims.sort_by_key(|(_, order)| *order);
        victims.into_iter().map(|(i, _)| i).collect()
    }

    /// Marks `index` unloaded and stops its pool in the background, after its requests (up
    /// to the drain timeout).
    fn unload_locked(self: &Arc<Self>, slots: &mut [Slot<S>], index: usize, why: &str) {
        if !matches!(slots[index].phase, Phase::Loaded(_)) {
            return;
        }
        let Phase::Loaded(loaded) = std::mem::replace(&mut slots[index].phase, Phase::Unloading)
        else {
            return;
        };
        tracing::info!(model = self.plans[index].alias(), why, "unloading model");
        let drain = self.policy.drain_timeout;
        let registry = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + drain;
            while !loaded.is_idle() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            loaded.state.pool().shutdown(Duration::from_secs(10)).await;
            drop(loaded);
            let mut table = registry.lock();
            if matches!(table[index].phase, Phase::Unloading) {
                table[index].phase = Phase::Unloaded;
            }
            drop(table);
            registry.changed.notify_waiters();
        });
    }

    /// `POST /models/unload`: unloads a loaded model (its requests finish first); false when
    /// it was not loaded.
    pub fn unload(self: &Arc<Self>, index: usize) -> bool {
        let mut slots = self.lock();
        let was_loaded = matches!(slots[index].phase, Phase::Loaded(_));
        self.unload_locked(&mut slots.slots, index, "asked to");
        drop(slots);
        self.changed.notify_waiters();
        was_loaded
    }

    /// Starts model `index`'s workers and waits for the first to be ready (or for every
    /// worker to fail, or the ready timeout): then `loaded`, or `failed` with the error.
    async fn run_load(self: Arc<Self>, index: usize) {
        let plan = &self.plans[index];
        let started = Instant::now();
        let outcome = match self.resolved_path(index) {
            Ok(path) => match (self.starter)(plan, path, self.metrics[index].clone()) {
                Ok(state) => match wait_ready(&*state, self.policy.ready_timeout).await {
                    Ok(()) => Ok(state),
                    Err(error) => {
                        state.pool().shutdown(Duration::from_secs(5)).await;
                        Err(error)
                    }
                },
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let mut slots = self.lock();
        slots[index].phase = match outcome {
            Ok(state) => {
                tracing::info!(
                    model = plan.alias(),
                    seconds = started.elapsed().as_secs_f64(),
                    "model loaded"
                );
                Phase::Loaded(Loaded {
                    state,
                    leases: Arc::new(AtomicUsize::new(0)),
                })
            }
            Err(error) => {
                tracing::warn!(model = plan.alias(), %error, "model failed to load");
                Phase::Failed {
                    error,
                    at: Instant::now(),
                }
            }
        };
        slots[index].last_used = Instant::now();
        drop(slots);
        self.changed.notify_waiters();
    }

    /// Unloads the models idle past their `ttl` (every second, while the registry lives).
    fn unload_expired(self: &Arc<Self>) {
        let mut slots = self.lock();
        for plan in self.plans.iter().filter(|p| !p.pinned) {
            let Some(ttl) = plan.ttl else { continue };
            let slot = &slots[plan.index];
            let expired = matches!(&slot.phase, Phase::Loaded(l) if l.is_idle())
                && slot.last_used.elapsed() >= ttl;
            if expired {
                self.unload_locked(&mut slots.slots, plan.index, "idle past its ttl");
            }
        }
    }

    /// Stops every loaded model's workers (router shutdown).
    pub async fn shutdown(&self, timeout: Duration) {
        let states: Vec<Arc<S>> = self.loaded().into_iter().map(|(_, s)| s).collect();
        futures_util::future::join_all(states.iter().map(|s| s.pool().shutdown(timeout))).await;
    }
}

/// A request waiting in [`ModelRegistry::acquire`]: counted on its model while it waits, so
/// that a model nobody waits for any more leaves the queue.
struct Waiting<'a, S: ModelState> {
    registry: &'a ModelRegistry<S>,
    index: usize,
}

impl<'a, S: ModelState> Waiting<'a, S> {
    /// Counts a request on model `index`; refused beyond the model's slots plus
    /// `max_queued` waiting at once (each holds its connection and its body).
    fn new(registry: &'a ModelRegistry<S>, index: usize) -> Result<Self, ModelError> {
        let plan = &registry.plans[index];
        let slots: usize = plan.workers.iter().map(|w| w.context.slots as usize).sum();
        let cap = slots + plan.settings.server.max_queued;
        let mut table = registry.lock();
        let loaded = matches!(table[index].phase, Phase::Loaded(_));
        if !loaded && table[index].waiters >= cap {
            return Err(ModelError::TooManyWaiting(plan.alias().to_string()));
        }
        table[index].waiters += 1;
        Ok(Self { registry, index })
    }
}

impl<S: ModelState> Drop for Waiting<'_, S> {
    fn drop(&mut self) {
        let mut table = self.registry.lock();
        table[self.index].waiters -= 1;
        if table[self.index].waiters == 0 {
            table.queue.retain(|&i| i != self.index);
        }
        drop(table);
        self.registry.changed.notify_waiters();
    }
}

/// Waits for the first ready worker of `state`'s pool; an error when every worker has
/// failed a start before any was ready, or after `timeout`.
async fn wait_ready<S: ModelState>(state: &S, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if state.pool().ready_count() > 0 {
            return Ok(());
        }
        let views = state.pool().views();
        if !views.is_empty() && views.iter().all(|v| v.last_error.is_some()) {
            let error = views
                .iter()
                .find_map(|v| v.last_error.clone())
                .unwrap_or_default();
            return Err(format!("no worker started: {error}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no worker was ready within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sweep_idle<S: ModelState>(registry: std::sync::Weak<ModelRegistry<S>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.unload_expired();
    }
}

/// 90% of this machine's memory (`MemTotal`), the default budget; 16 GiB when unknown.
pub fn default_memory_budget() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .unwrap_or(16 * 1024 * 1024);
    total_kib * 1024 / 10 * 9
}
