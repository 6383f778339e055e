//! Dispatch: the worker pool, one connection task per worker, and the per-request handle
//! whose drop aborts the request on its worker. Nothing here knows about HTTP: failures are
//! [`DispatchError`]s and request-scoped [`RequestError`]s, mapped to statuses in
//! `crate::error`.
//!
//! - [`pool`]: spawns and supervises the worker processes, picks a worker per request, and
//!   moves the requests of a worker that died to the others.
//! - [`supervisor`]: one task per worker: spawns it, runs its connection, kills it when the
//!   hang watchdog says so, respawns it (slowly when it crash-loops).
//! - [`connection`]: owns one worker's socket and its in-flight map; demultiplexes the
//!   worker's events to the requests; pings it.
//! - [`vitals`]: what the worker last pushed, and the hang rule.
//! - [`affinity`]: which worker's prompt cache most likely holds a prompt's prefix.
//! - [`poison`]: which request a worker's death points to, and the requests refused for it.
//! - [`rebalance`]: when running requests move between live adaptive workers (re-packing
//!   when the machine is quiet again, splitting when a neighbour crowds it).

pub mod affinity;
pub mod connection;
pub mod poison;
pub mod pool;
pub mod rebalance;
pub mod supervisor;
pub mod vitals;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamapool_common::{RequestError, RequestId, SeqOutput};
use tokio::sync::mpsc;

pub use pool::{AdminError, Pool, Refusal, RoutingPolicy, WorkerState, WorkerView};
pub use supervisor::SupervisionPolicy;

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

/// A dispatched request: its events, and a guard that aborts it when dropped unfinished.
#[derive(Debug)]
pub struct RequestHandle {
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
    pub guard: AbortGuard,
}

impl RequestHandle {
    /// The worker running the request now (it changes when the request moves).
    pub fn worker(&self) -> usize {
        self.guard.current.load(Ordering::Acquire)
    }
}

/// Sends `Abort` to the request's current worker on drop, unless the request finished.
#[derive(Debug)]
pub struct AbortGuard {
    pool: Pool,
    id: RequestId,
    current: CurrentWorker,
    finished: bool,
}

impl AbortGuard {
    /// The request ended on its own; dropping the guard sends nothing.
    pub fn finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.finished {
            // Unfinished means its client went away (or stopped reading): every other end
            // marks the guard finished.
            self.pool.metrics().record_cancellation();
            self.pool
                .abort(self.current.load(Ordering::Acquire), self.id);
        }
    }
}
