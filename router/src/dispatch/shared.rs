//! The state the pool shares with its tasks: [`Inner`], held behind one `Arc` by the
//! [`Pool`](super::Pool) handles, each worker's supervisor, the request guards and the
//! placement tasks; and [`LaunchConfig`], how workers are started (swapped by a reload).
//!
//! Shared state is deliberately small: per worker a [`Worker`] (see [`super::worker`]), plus
//! the policies, the shutdown signal, the poison registry and the parked requests. Who writes
//! what is documented on each field; the placement mechanics that use it are in
//! [`super::placement`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::connection::InFlight;
use super::poison::PoisonRegistry;
use super::routing::RoutingPolicy;
use super::supervision::SupervisionPolicy;
use super::worker::Worker;
use crate::metrics::Metrics;

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
    /// Written by the operator's reload; read by each start of a worker.
    pub launch: RwLock<LaunchConfig>,
    pub policy: SupervisionPolicy,
    pub routing: RoutingPolicy,
    pub shutting_down: AtomicBool,
    pub shutdown: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    /// When the first worker first became ready (see [`Pool::is_healthy`](super::Pool::is_healthy)).
    pub first_ready: OnceLock<Instant>,
    /// Held from choosing a worker until its load counts the request, so that two requests
    /// dispatched at the same moment are each weighed with the other's load (they do not both
    /// take the last free slot of the worker they pack onto, say).
    pub choosing: Mutex<()>,
    /// Which requests killed workers, and which are refused for it.
    pub poison: PoisonRegistry,
    /// Requests waiting for a worker that is being started again, with their deadlines.
    pub parked: Mutex<Vec<(tokio::time::Instant, InFlight)>>,
    /// `Embed` calls out at the workers at once: twice the embedding workers' slots at start
    /// (a full decode queued behind the running one). The other calls wait here, untimed, so
    /// that a call's reply timeout measures its worker, not the queue in front of it.
    pub embed_calls: tokio::sync::Semaphore,
}

impl Inner {
    pub fn launch(&self) -> LaunchConfig {
        self.launch
            .read()
            .expect("launch lock is never poisoned")
            .clone()
    }
}
