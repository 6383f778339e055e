//! Dispatch: the worker pool, one connection task per worker, and the per-request handle
//! whose drop aborts the request on its worker. Nothing here knows about HTTP: failures are
//! [`DispatchError`]s and request-scoped [`RequestError`]s, mapped to statuses in
//! `crate::error`.
//!
//! - [`pool`]: the [`Pool`] handle: starts the workers' supervisors, submits requests (and
//!   refuses those too long for every worker or convicted as poison), and the views
//!   `/workers` and `/metrics` read.
//! - [`admin`]: the operator's actions on the pool: drain, restart, reload, shutdown.
//! - [`handle`]: what a request's handler holds: its events and the guard that aborts it.
//! - [`shared`]: the state the pool shares with its tasks, and how workers are launched.
//! - [`worker`]: one worker's shared state: plan, status, load, vitals, cached prefixes.
//! - [`routing`] (policy, pure): which worker a request goes to — packed onto the first
//!   packable worker with room, else prefix affinity, else the least loaded.
//! - [`placement`]: sends requests to the chosen worker, parks them while one comes back,
//!   moves those of a worker that died, and makes the moves rebalancing plans.
//! - [`supervisor`]: one task per worker: spawns it, runs its connection, kills it when the
//!   hang watchdog says so, respawns it; [`supervision`] (policy): the hang timeout, the
//!   crash-loop rule and the back-off.
//! - [`connection`]: owns one worker's socket and its in-flight map; demultiplexes the
//!   worker's events to the requests; pings it.
//! - [`vitals`]: what the worker last pushed, and the hang rule.
//! - [`affinity`]: which worker's prompt cache most likely holds a prompt's prefix.
//! - [`poison`]: which request a worker's death points to, and the requests refused for it.
//! - [`rebalance`] (policy, pure): when running requests move between live adaptive workers
//!   (re-packing when the machine is quiet again, splitting when a neighbour crowds it).

pub mod admin;
pub mod affinity;
pub mod connection;
pub mod handle;
pub mod placement;
pub mod poison;
pub mod pool;
pub mod rebalance;
pub mod routing;
pub mod shared;
pub mod supervision;
pub mod supervisor;
pub mod vitals;
pub mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamapool_common::{RequestError, SeqOutput};

pub use admin::AdminError;
pub use handle::{AbortGuard, RequestHandle};
pub use pool::{Pool, Refusal, WorkerView};
pub use routing::RoutingPolicy;
pub use shared::LaunchConfig;
pub use supervision::SupervisionPolicy;
pub use worker::{Shape, WorkerState};

/// Why the pool could not run a request or answer a call (not the request's own fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    #[error("no worker is ready")]
    NoWorkerReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the worker went away")]
    WorkerGone,
    #[error("the worker did not answer in time")]
    NoAnswer,
    #[error("the request lost {0} workers in a row; giving up")]
    TooManyMoves(u32),
    #[error("the request is too large to send to a worker: {0}")]
    TooLargeToSend(String),
    #[error("unexpected worker reply: {0}")]
    UnexpectedReply(String),
    /// The request was in flight when workers died, and the poison policy blames it.
    #[error("this request was ended because {0}; requests like it are refused for a while")]
    PoisonKilled(String),
    /// The request is one that killed workers recently (same prompt and parameters).
    #[error("this request is refused: an identical request was in flight when {reason}; it is refused for {retry_after_secs} s more")]
    PoisonRefused {
        reason: String,
        retry_after_secs: u64,
    },
}

/// What a request's handler receives, in order: `Accepted` (or an error), then outputs until
/// one carries the finish, or an error.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The worker admitted the request: from here on, the response is committed.
    Accepted,
    Output(SeqOutput),
    /// The request ended with its own error (possibly after some output).
    Failed(RequestError),
    /// The pool could not run it (all workers down, shutting down, lost too many workers).
    Unavailable(DispatchError),
}

/// Which worker currently runs a request (it changes when a dead worker's request moves).
pub type CurrentWorker = Arc<AtomicUsize>;

/// A worker's count of requests dispatched to it and not finished: the dispatch policy's input.
pub type Load = Arc<AtomicUsize>;

/// One unit of a worker's [`Load`], held by a request while that worker owns it; dropping it
/// (the request finished, failed, was aborted or moved) gives the unit back.
#[derive(Debug)]
pub struct LoadTicket(Load);

impl LoadTicket {
    pub fn take(load: &Load) -> Self {
        load.fetch_add(1, Ordering::AcqRel);
        Self(load.clone())
    }
}

impl Drop for LoadTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
