//! The operator's actions on the pool (`POST /admin/workers/{id}/drain`, `…/restart`,
//! `/admin/reload`) and its shutdown: a second `impl` block of [`Pool`], so that the pool's
//! serving API and the actions that take workers out of service read apart.

use std::sync::atomic::Ordering;
use std::time::Duration;

use llamapool_common::settings::WorkerPlan;

use super::pool::Pool;
use super::shared::LaunchConfig;
use super::worker::{Worker, WorkerState};

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

impl Pool {
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
