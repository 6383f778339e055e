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
//! The list of models can be read again (`GET /v1/models?reload=1`, [`ModelRegistry::reload`]):
//! each model has an id that outlives reloads, so requests, leases and loads refer to a model,
//! not to a position in the list; a model whose entry is unchanged keeps its state.
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
    #[error("the list of models could not be read again: {0}")]
    Reload(String),
}

/// A model's identity in the registry, kept across reloads of the list.
pub type ModelId = u64;

/// Reads the list of models again (the configuration's sources: `[[models]]`, the models
/// directory, the preset file).
pub type Replan = Box<dyn Fn() -> Result<Vec<ModelPlan>, String> + Send + Sync>;

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

    fn status(&self) -> Status {
        match self {
            Self::Unloaded => Status::Unloaded,
            Self::Loading => Status::Loading,
            Self::Loaded(_) => Status::Loaded,
            Self::Unloading => Status::Unloading,
            Self::Failed { .. } => Status::Failed,
        }
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

/// One model: its plan, its metrics (kept across loads and reloads) and its state.
struct Entry<S> {
    id: ModelId,
    plan: Arc<ModelPlan>,
    metrics: Arc<Metrics>,
    phase: Phase<S>,
    last_used: Instant,
    /// Bytes its estimate says it takes (known once it was tried).
    estimate: Option<u64>,
    /// Requests waiting for it to be loaded.
    waiters: usize,
}

impl<S> Entry<S> {
    fn new(id: ModelId, plan: Arc<ModelPlan>, metrics: Arc<Metrics>) -> Self {
        Self {
            id,
            plan,
            metrics,
            phase: Phase::Unloaded,
            last_used: Instant::now(),
            estimate: None,
            waiters: 0,
        }
    }
}

/// Every model in list order, and the order in which models that wait for room get it.
struct Table<S> {
    entries: Vec<Entry<S>>,
    /// Models waiting for room, first come first served (llama-server's queue): one entry
    /// per model however many requests wait for it.
    queue: VecDeque<ModelId>,
    next_id: ModelId,
}

impl<S> Table<S> {
    fn get(&self, id: ModelId) -> Option<&Entry<S>> {
        self.entries.iter().find(|e| e.id == id)
    }

    fn get_mut(&mut self, id: ModelId) -> Option<&mut Entry<S>> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    fn not_found(&self, name: &str) -> ModelError {
        ModelError::NotFound {
            requested: name.to_string(),
            served: self
                .entries
                .iter()
                .map(|e| e.plan.alias().to_string())
                .collect(),
        }
    }
}

/// Every configured model and its state. One per router; cheap to share (`Arc`).
pub struct ModelRegistry<S> {
    table: Mutex<Table<S>>,
    changed: Notify,
    policy: LoadPolicy,
    starter: Starter<S>,
    replan: Option<Replan>,
    models_dir: PathBuf,
}

impl<S> std::fmt::Debug for ModelRegistry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry").finish_non_exhaustive()
    }
}

/// A request's hold on its loaded model: while any is held, the model is not unloaded to
/// make room. Dropped with the response (its body, for a stream).
#[derive(Debug)]
pub struct Lease<S: ModelState> {
    leases: Arc<AtomicUsize>,
    registry: Arc<ModelRegistry<S>>,
    id: ModelId,
}

impl<S: ModelState> Drop for Lease<S> {
    fn drop(&mut self) {
        self.leases.fetch_sub(1, Ordering::AcqRel);
        if let Some(entry) = self.registry.lock().get_mut(self.id) {
            entry.last_used = Instant::now();
        }
        self.registry.changed.notify_waiters();
    }
}

/// A loaded model's state and the request's lease on it.
pub type Held<S> = (Arc<S>, Lease<S>);

/// A model as `/v1/models` lists it.
#[derive(Clone)]
pub struct ModelListing<S> {
    pub id: ModelId,
    pub plan: Arc<ModelPlan>,
    pub metrics: Arc<Metrics>,
    pub status: Status,
    pub state: Option<Arc<S>>,
    pub error: Option<String>,
}

impl<S: ModelState> ModelRegistry<S> {
    /// The registry of `plans`, none loaded yet ([`Self::start`] loads those marked
    /// `load_on_startup`). `models_dir` is where relative paths are also looked for;
    /// `replan` reads the list again for [`Self::reload`].
    pub fn new(
        plans: Vec<ModelPlan>,
        policy: LoadPolicy,
        starter: Starter<S>,
        replan: Option<Replan>,
        models_dir: PathBuf,
    ) -> Arc<Self> {
        let entries: Vec<Entry<S>> = plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| {
                let metrics = Arc::new(Metrics::for_model(plan.alias()));
                Entry::new(i as ModelId, Arc::new(plan), metrics)
            })
            .collect();
        let next_id = entries.len() as ModelId;
        Arc::new(Self {
            table: Mutex::new(Table {
                entries,
                queue: VecDeque::new(),
                next_id,
            }),
            changed: Notify::new(),
            policy,
            starter,
            replan,
            models_dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<S>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the `load_on_startup` models and starts the idle-unload sweep.
    pub fn start(self: &Arc<Self>) {
        self.load_on_startup();
        tokio::spawn(sweep_idle(Arc::downgrade(self)));
    }

    /// Loads every `load_on_startup` model that is unloaded, in the background.
    fn load_on_startup(self: &Arc<Self>) {
        let ids: Vec<ModelId> = self
            .lock()
            .entries
            .iter()
            .filter(|e| e.plan.load_on_startup && matches!(e.phase, Phase::Unloaded))
            .map(|e| e.id)
            .collect();
        for id in ids {
            let registry = self.clone();
            tokio::spawn(async move {
                if let Err(error) = registry.load(id).await {
                    tracing::warn!(%error, "a load_on_startup model did not load");
                }
            });
        }
    }

    pub fn policy(&self) -> &LoadPolicy {
        &self.policy
    }

    /// The model a request names: by one of its names, else the model that answers unknown
    /// names, else 404; no name: the first model.
    pub fn find(&self, requested: Option<&str>) -> Result<ModelId, ModelError> {
        let table = self.lock();
        let Some(name) = requested.filter(|n| !n.is_empty()) else {
            return table
                .entries
                .first()
                .map(|e| e.id)
                .ok_or_else(|| table.not_found(""));
        };
        table
            .entries
            .iter()
            .find(|e| e.plan.names.iter().any(|n| n == name))
            .or_else(|| table.entries.iter().find(|e| e.plan.catch_all))
            .map(|e| e.id)
            .ok_or_else(|| table.not_found(name))
    }

    /// The model called exactly `name` (`/models/load` and `/models/unload` name one model,
    /// not whatever answers unknown names).
    pub fn find_exact(&self, name: &str) -> Result<ModelId, ModelError> {
        let table = self.lock();
        table
            .entries
            .iter()
            .find(|e| e.plan.names.iter().any(|n| n == name))
            .map(|e| e.id)
            .ok_or_else(|| table.not_found(name))
    }

    /// Every model with its status, in list order.
    pub fn listing(&self) -> Vec<ModelListing<S>> {
        self.lock()
            .entries
            .iter()
            .map(|e| ModelListing {
                id: e.id,
                plan: e.plan.clone(),
                metrics: e.metrics.clone(),
                status: e.phase.status(),
                state: match &e.phase {
                    Phase::Loaded(loaded) => Some(loaded.state.clone()),
                    _ => None,
                },
                error: match &e.phase {
                    Phase::Failed { error, .. } => Some(error.clone()),
                    _ => None,
                },
            })
            .collect()
    }

    /// The first loaded model, in list order.
    pub fn first_loaded(&self) -> Option<ModelId> {
        self.loaded().first().map(|(id, _)| *id)
    }

    /// The loaded models' states (for `/metrics` and shutdown).
    pub fn loaded(&self) -> Vec<(ModelId, Arc<S>)> {
        self.lock()
            .entries
            .iter()
            .filter_map(|e| match &e.phase {
                Phase::Loaded(loaded) => Some((e.id, loaded.state.clone())),
                _ => None,
            })
            .collect()
    }

    /// Model `id` for a request: loaded (by this call, with autoload: the request's
    /// `autoload`, else `server.models_autoload`) and held until the lease drops. Waits at
    /// most `load_timeout`.
    pub async fn lease(
        self: &Arc<Self>,
        id: ModelId,
        autoload: Option<bool>,
    ) -> Result<Held<S>, ModelError> {
        self.acquire(id, autoload.unwrap_or(self.policy.autoload))
            .await
    }

    /// Loads model `id` (`POST /models/load`, and start-up) and waits for it, whatever
    /// `autoload` says.
    pub async fn load(self: &Arc<Self>, id: ModelId) -> Result<Arc<S>, ModelError> {
        if let Some(entry) = self.lock().get_mut(id) {
            // An operator's load tries a failed model again at once.
            if matches!(entry.phase, Phase::Failed { .. }) {
                entry.phase = Phase::Unloaded;
                entry.estimate = None;
            }
        }
        self.acquire(id, true).await.map(|(state, _)| state)
    }

    async fn acquire(self: &Arc<Self>, id: ModelId, autoload: bool) -> Result<Held<S>, ModelError> {
        let deadline = tokio::time::Instant::now() + self.policy.load_timeout;
        let _waiting = Waiting::new(self, id)?;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(result) = self.try_acquire(id, autoload) {
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
                let name = self
                    .lock()
                    .get(id)
                    .map_or_else(String::new, |e| e.plan.alias().to_string());
                return Err(ModelError::LoadTimeout(name));
            }
        }
    }

    /// One look: the model with a lease, an error, or `None` to wait (loading, or no room yet).
    fn try_acquire(
        self: &Arc<Self>,
        id: ModelId,
        autoload: bool,
    ) -> Option<Result<Held<S>, ModelError>> {
        let mut table = self.lock();
        let Some(entry) = table.get_mut(id) else {
            return Some(Err(ModelError::NotFound {
                requested: format!("#{id}"),
                served: Vec::new(),
            }));
        };
        let name = entry.plan.alias().to_string();
        match &entry.phase {
            Phase::Loaded(loaded) => {
                loaded.leases.fetch_add(1, Ordering::AcqRel);
                let lease = Lease {
                    leases: loaded.leases.clone(),
                    registry: self.clone(),
                    id,
                };
                let state = loaded.state.clone();
                entry.last_used = Instant::now();
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
                entry.phase = Phase::Unloaded;
                entry.estimate = None;
            }
            Phase::Unloaded if !autoload => return Some(Err(ModelError::NotLoaded(name))),
            Phase::Unloaded => {}
        }
        // Unloaded: its estimate first (read outside the lock: it reads the file's header),
        // then room for it.
        let cached = entry.estimate;
        let plan = entry.plan.clone();
        drop(table);
        let estimate = match cached {
            Some(bytes) => bytes,
            None => match tokio::task::block_in_place(|| self.estimate(&plan)) {
                Ok(bytes) => bytes,
                Err(error) => {
                    let mut table = self.lock();
                    // Only an unloaded model fails here: another request may have loaded it
                    // meanwhile (a file being replaced can fail one read and not the next).
                    let entry = table.get_mut(id)?;
                    if !matches!(entry.phase, Phase::Unloaded) {
                        return None;
                    }
                    tracing::warn!(model = %name, %error, "model failed to load");
                    entry.phase = Phase::Failed {
                        error: error.clone(),
                        at: Instant::now(),
                    };
                    drop(table);
                    self.changed.notify_waiters();
                    return Some(Err(ModelError::Failed { name, error }));
                }
            },
        };
        let mut table = self.lock();
        let entry = table.get_mut(id)?;
        if !matches!(entry.phase, Phase::Unloaded) {
            return None; // another request started it meanwhile
        }
        entry.estimate = Some(estimate);
        if !table.queue.contains(&id) {
            table.queue.push_back(id);
        }
        // First come, first served: a model waits for the ones queued before it.
        if table.queue.front() != Some(&id) {
            return None;
        }
        match self.make_room(&mut table.entries, id, estimate) {
            Room::Made => {}
            Room::NotYet => return None,
            Room::Never(why) => {
                table.queue.pop_front();
                return Some(Err(ModelError::Failed { name, error: why }));
            }
        }
        table.queue.pop_front();
        table.get_mut(id)?.phase = Phase::Loading;
        drop(table);
        self.changed.notify_waiters();
        tokio::spawn(self.clone().run_load(id, plan));
        None
    }

    /// The model's file, resolved, and its estimated bytes (reads the GGUF header: a few MB).
    fn estimate(&self, plan: &ModelPlan) -> Result<u64, String> {
        let path = self.resolved_path(plan)?;
        estimate::estimate(&path, &plan.workers).map(|e| e.total())
    }

    fn resolved_path(&self, plan: &ModelPlan) -> Result<PathBuf, String> {
        if let Some(repo) = plan.path.to_str().and_then(|p| p.strip_prefix(HF_PREFIX)) {
            return Err(format!(
                "{repo} is a Hugging Face repository; models are not downloaded here: give \
                 the GGUF file (`model = PATH`)"
            ));
        }
        plan.settings
            .resolve_model_path(&self.models_dir)
            .map_err(|e| e.message)
    }

    /// Unloads idle models until model `id` fits both limits, choosing them first (lowest
    /// priority, then least recently used: [`Self::victims`]) so that nothing is unloaded
    /// unless enough can go. A model bigger than the whole budget still loads once nothing
    /// else is resident.
    fn make_room(self: &Arc<Self>, entries: &mut [Entry<S>], id: ModelId, estimate: u64) -> Room {
        let resident: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].id != id && entries[i].phase.is_resident())
            .collect();
        let fits = |gone: &[usize]| {
            let left: Vec<usize> = resident
                .iter()
                .copied()
                .filter(|i| !gone.contains(i))
                .collect();
            let used: u64 = left.iter().filter_map(|&i| entries[i].estimate).sum();
            let count_ok = self.policy.models_max == 0 || left.len() < self.policy.models_max;
            let memory_ok =
                left.is_empty() || used.saturating_add(estimate) <= self.policy.memory_budget;
            count_ok && memory_ok
        };
        let mut gone = Vec::new();
        for victim in Self::victims(entries, id) {
            if fits(&gone) {
                break;
            }
            gone.push(victim);
        }
        if fits(&gone) {
            for victim in gone {
                self.unload_entry(&mut entries[victim], "to make room");
            }
            return Room::Made;
        }
        // Would it fit once every model that may ever go has gone?
        let evictable: Vec<usize> = resident
            .iter()
            .copied()
            .filter(|&i| !entries[i].plan.pinned)
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

    /// The positions of the loaded models that may be unloaded now, in the order they go:
    /// idle (no lease, no work in the pool, no request waiting for it), not pinned; lowest
    /// priority first, then least recently used.
    fn victims(entries: &[Entry<S>], id: ModelId) -> Vec<usize> {
        let mut victims: Vec<(usize, (i32, Instant))> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.id != id && !e.plan.pinned && e.waiters == 0)
            .filter_map(|(i, e)| match &e.phase {
                Phase::Loaded(loaded) if loaded.is_idle() => {
                    Some((i, (e.plan.priority, e.last_used)))
                }
                _ => None,
            })
            .collect();
        victims.sort_by_key(|(_, order)| *order);
        victims.into_iter().map(|(i, _)| i).collect()
    }

    /// Marks a loaded model `unloading` and stops its pool in the background, after its
    /// requests (up to the drain timeout); then it is `unloaded`.
    fn unload_entry(self: &Arc<Self>, entry: &mut Entry<S>, why: &str) {
        if !matches!(entry.phase, Phase::Loaded(_)) {
            return;
        }
        let Phase::Loaded(loaded) = std::mem::replace(&mut entry.phase, Phase::Unloading) else {
            return;
        };
        tracing::info!(model = entry.plan.alias(), why, "unloading model");
        self.stop_in_background(Some(entry.id), loaded);
    }

    /// Stops a loaded model's pool once its requests are done (up to the drain timeout);
    /// then marks model `id` (if any, and still unloading) `unloaded`.
    fn stop_in_background(self: &Arc<Self>, id: Option<ModelId>, loaded: Loaded<S>) {
        let drain = self.policy.drain_timeout;
        let registry = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + drain;
            while !loaded.is_idle() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            loaded.state.pool().shutdown(Duration::from_secs(10)).await;
            drop(loaded);
            if let Some(id) = id {
                if let Some(entry) = registry.lock().get_mut(id) {
                    if matches!(entry.phase, Phase::Unloading) {
                        entry.phase = Phase::Unloaded;
                    }
                }
            }
            registry.changed.notify_waiters();
        });
    }

    /// `POST /models/unload`: unloads a loaded model (its requests finish first); false when
    /// it was not loaded.
    pub fn unload(self: &Arc<Self>, id: ModelId) -> bool {
        let mut table = self.lock();
        let Some(entry) = table.get_mut(id) else {
            return false;
        };
        let was_loaded = matches!(entry.phase, Phase::Loaded(_));
        self.unload_entry(entry, "asked to");
        drop(table);
        self.changed.notify_waiters();
        was_loaded
    }

    /// Starts model `id`'s workers and waits for the first to be ready (or for every worker
    /// to fail, or the ready timeout): then `loaded`, or `failed` with the error. A model
    /// removed by a reload meanwhile has its pool stopped.
    async fn run_load(self: Arc<Self>, id: ModelId, plan: Arc<ModelPlan>) {
        let started = Instant::now();
        let metrics = self.lock().get(id).map(|e| e.metrics.clone());
        let outcome = match (self.resolved_path(&plan), metrics) {
            (Ok(path), Some(metrics)) => match (self.starter)(&plan, path, metrics) {
                Ok(state) => match wait_ready(&*state, self.policy.ready_timeout).await {
                    Ok(()) => Ok(state),
                    Err(error) => {
                        state.pool().shutdown(Duration::from_secs(5)).await;
                        Err(error)
                    }
                },
                Err(error) => Err(error),
            },
            (Err(error), _) => Err(error),
            (_, None) => Err("removed from the list of models".into()),
        };
        let listed = self.lock().get(id).is_some();
        if !listed {
            if let Ok(state) = outcome {
                state.pool().shutdown(Duration::from_secs(10)).await;
            }
            self.changed.notify_waiters();
            return;
        }
        let mut table = self.lock();
        let Some(entry) = table.get_mut(id) else {
            return;
        };
        entry.phase = match outcome {
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
        entry.last_used = Instant::now();
        drop(table);
        self.changed.notify_waiters();
    }

    /// Unloads the models idle past their `ttl` (every second, while the registry lives);
    /// pinned models stay.
    fn unload_expired(self: &Arc<Self>) {
        let mut table = self.lock();
        for entry in table.entries.iter_mut() {
            let Some(ttl) = entry.plan.ttl.filter(|_| !entry.plan.pinned) else {
                continue;
            };
            let expired = matches!(&entry.phase, Phase::Loaded(l) if l.is_idle())
                && entry.last_used.elapsed() >= ttl;
            if expired {
                self.unload_entry(entry, "idle past its ttl");
            }
        }
    }

    /// Reads the list of models again (`GET /v1/models?reload=1`): a model whose entry is
    /// unchanged keeps its state; a changed or new one starts unloaded; one no longer listed
    /// is unloaded (its requests finish first) and removed.
    pub fn reload(self: &Arc<Self>) -> Result<(), ModelError> {
        let replan = self
            .replan
            .as_ref()
            .ok_or_else(|| ModelError::Reload("this router has no list to read again".into()))?;
        let plans = replan().map_err(ModelError::Reload)?;
        let mut table = self.lock();
        let mut old: Vec<Option<Entry<S>>> = table.entries.drain(..).map(Some).collect();
        let mut entries = Vec::with_capacity(plans.len());
        for plan in plans {
            let same = old
                .iter()
                .position(|e| e.as_ref().is_some_and(|e| same_model(&e.plan, &plan)));
            match same.and_then(|i| old[i].take()) {
                Some(mut entry) => {
                    entry.plan = Arc::new(plan);
                    entries.push(entry);
                }
                None => {
                    // Counters continue under the same name.
                    let metrics = old
                        .iter()
                        .flatten()
                        .find(|e| e.plan.alias() == plan.alias())
                        .map(|e| e.metrics.clone())
                        .unwrap_or_else(|| Arc::new(Metrics::for_model(plan.alias())));
                    let id = table.next_id;
                    table.next_id += 1;
                    entries.push(Entry::new(id, Arc::new(plan), metrics));
                }
            }
        }
        for entry in old.into_iter().flatten() {
            tracing::info!(model = entry.plan.alias(), "no longer listed: removed");
            if let Phase::Loaded(loaded) = entry.phase {
                self.stop_in_background(None, loaded);
            }
        }
        table.entries = entries;
        let Table { entries, queue, .. } = &mut *table;
        queue.retain(|id| entries.iter().any(|e| e.id == *id));
        drop(table);
        self.changed.notify_waiters();
        self.load_on_startup();
        Ok(())
    }

    /// Stops every loaded model's workers (router shutdown).
    pub async fn shutdown(&self, timeout: Duration) {
        let states: Vec<Arc<S>> = self.loaded().into_iter().map(|(_, s)| s).collect();
        futures_util::future::join_all(states.iter().map(|s| s.pool().shutdown(timeout))).await;
    }
}

/// The prefix of a model path that names a Hugging Face repository (a preset's `hf-repo`),
/// which is listed but cannot load.
pub const HF_PREFIX: &str = "hf://";

/// Whether two plans describe the same model (everything but its place in the list).
fn same_model(a: &ModelPlan, b: &ModelPlan) -> bool {
    a.names == b.names
        && a.path == b.path
        && a.workers == b.workers
        && a.settings == b.settings
        && a.catch_all == b.catch_all
        && a.load_on_startup == b.load_on_startup
        && a.ttl == b.ttl
        && a.pinned == b.pinned
        && a.priority == b.priority
}

/// A request waiting in [`ModelRegistry::acquire`]: counted on its model while it waits, so
/// that a model nobody waits for any more leaves the queue.
struct Waiting<'a, S: ModelState> {
    registry: &'a ModelRegistry<S>,
    id: ModelId,
}

impl<'a, S: ModelState> Waiting<'a, S> {
    /// Counts a request on model `id`; refused beyond the model's slots plus `max_queued`
    /// waiting at once (each holds its connection and its body).
    fn new(registry: &'a ModelRegistry<S>, id: ModelId) -> Result<Self, ModelError> {
        let mut table = registry.lock();
        let Some(entry) = table.get_mut(id) else {
            return Err(ModelError::NotFound {
                requested: format!("#{id}"),
                served: Vec::new(),
            });
        };
        let slots: usize = entry
            .plan
            .workers
            .iter()
            .map(|w| w.context.slots as usize)
            .sum();
        let cap = slots + entry.plan.settings.server.max_queued;
        let loaded = matches!(entry.phase, Phase::Loaded(_));
        if !loaded && entry.waiters >= cap {
            return Err(ModelError::TooManyWaiting(entry.plan.alias().to_string()));
        }
        entry.waiters += 1;
        Ok(Self { registry, id })
    }
}

impl<S: ModelState> Drop for Waiting<'_, S> {
    fn drop(&mut self) {
        let mut table = self.registry.lock();
        let none_left = table.get_mut(self.id).is_none_or(|entry| {
            entry.waiters -= 1;
            entry.waiters == 0
        });
        if none_left {
            table.queue.retain(|&id| id != self.id);
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
