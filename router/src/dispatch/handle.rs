//! What a request's handler holds: a [`RequestHandle`] with the request's events, and the
//! [`AbortGuard`] that aborts it on its current worker when the handler drops it unfinished
//! (its client went away). Made by [`Pool::dispatch`](super::Pool::dispatch).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use llamapool_common::RequestId;
use tokio::sync::mpsc;

use super::shared::Inner;
use super::{CurrentWorker, StreamEvent};

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
    inner: Arc<Inner>,
    id: RequestId,
    current: CurrentWorker,
    finished: bool,
}

impl AbortGuard {
    /// Guards request `id`, which runs on the worker `current` names.
    pub(super) fn new(inner: Arc<Inner>, id: RequestId, current: CurrentWorker) -> Self {
        Self {
            inner,
            id,
            current,
            finished: false,
        }
    }

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
            self.inner.metrics.record_cancellation();
            let worker = self.current.load(Ordering::Acquire);
            if let Some(worker) = self.inner.workers.get(worker) {
                worker.abort(self.id);
            }
        }
    }
}
