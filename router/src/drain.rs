//! The node's drain: set once (SIGTERM, SIGINT or `POST /admin/drain`), never cleared. While
//! it is set, `/health` and `/ready` answer 503 so that gateways and Kubernetes stop sending;
//! the server goes on serving for `server.drain_notice_secs`, then closes its listeners and
//! lets the requests in flight finish (`router/src/serve.rs` owns that sequence).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

/// Whether the node drains; clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Drain(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    started: AtomicBool,
    changed: Notify,
}

impl Drain {
    /// Starts the drain; true the first time.
    pub fn start(&self) -> bool {
        let first = !self.0.started.swap(true, Ordering::SeqCst);
        if first {
            self.0.changed.notify_waiters();
        }
        first
    }

    pub fn is_started(&self) -> bool {
        self.0.started.load(Ordering::SeqCst)
    }

    /// Returns once the drain has started.
    pub async fn started(&self) {
        loop {
            let changed = self.0.changed.notified();
            if self.is_started() {
                return;
            }
            changed.await;
        }
    }
}

/// The notice period of a drain: returns after `notice`, or earlier once `in_flight` has
/// read 0 for a whole second (nothing is being sent here any more, so nothing is gained by
/// waiting longer).
pub async fn notice(notice: Duration, in_flight: impl Fn() -> usize) {
    const QUIET: Duration = Duration::from_secs(1);
    const POLL: Duration = Duration::from_millis(100);
    let end = Instant::now() + notice;
    let mut quiet_since = Instant::now();
    while Instant::now() < end {
        if in_flight() > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            return;
        }
        tokio::time::sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_drain_starts_and_the_flag_stays_set() {
        let drain = Drain::default();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await }
        });
        tokio::task::yield_now().await;
        assert!(!drain.is_started());
        assert!(drain.start());
        assert!(!drain.start(), "only the first start counts");
        waiter.await.unwrap();
        assert!(drain.is_started());
        drain.started().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_notice_ends_a_second_after_the_last_request_or_at_its_end() {
        let start = Instant::now();
        notice(Duration::from_secs(5), || 0).await;
        let quiet = start.elapsed();
        assert!(
            quiet >= Duration::from_secs(1) && quiet < Duration::from_millis(1300),
            "{quiet:?}"
        );
        let start = Instant::now();
        notice(Duration::from_secs(5), || 1).await;
        let busy = start.elapsed();
        assert!(
            busy >= Duration::from_secs(5) && busy < Duration::from_millis(5200),
            "{busy:?}"
        );
    }
}
