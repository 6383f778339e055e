//! Dispatch: the worker pool, one connection task per worker, and the per-request handle
//! whose drop aborts the request on its worker.
//!
//! - [`pool`]: spawns and supervises the worker processes, picks a worker per request, and
//!   re-dispatches the requests of a worker that died.
//! - [`connection`]: owns one worker's socket and its in-flight map; demultiplexes output
//!   frames to the requests.

pub mod connection;
pub mod pool;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamapool_common::{RequestError, RequestId, SeqOutput};
use tokio::sync::mpsc;

pub use pool::{Pool, WorkerState, WorkerView};

/// What a request's handler receives.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Outputs in order; the first one (empty) says the worker accepted the request.
    Output(SeqOutput),
    /// The request ended with an error (possibly after some output).
    Failed(RequestError),
    /// No worker can run it (all down or shutting down).
    Unavailable(String),
}

/// Which worker currently runs a request (it changes when a dead worker's request moves).
pub type CurrentWorker = Arc<AtomicUsize>;

/// A dispatched request: its events, and a guard that aborts it when dropped unfinished.
#[derive(Debug)]
pub struct RequestHandle {
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
    pub guard: AbortGuard,
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
            self.pool
                .abort(self.current.load(Ordering::Acquire), self.id);
        }
    }
}
