//! The node's drain: set once (SIGTERM, SIGINT or `POST /admin/drain`), never cleared. While
//! it is set, `/health` and `/ready` answer 503 so that gateways and Kubernetes stop sending;
//! the server goes on serving for `server.drain_notice_secs` ([`notice`]), then closes its
//! listeners and lets the requests in flight finish (`router/src/serve.rs` owns that
//! sequence).

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
    /// Whether a probe (`/health`, `/ready`) has been answered 503 since the drain started.
    told: AtomicBool,
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

    /// A probe was answered 503: someone polling health has been told.
    pub fn record_refused_probe(&self) {
        self.0.told.store(true, Ordering::Relaxed);
    }

    /// Whether any probe has been answered 503 since the drain started.
    pub fn has_told(&self) -> bool {
        self.0.told.load(Ordering::Relaxed)
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

/// The notice period of a drain: returns after `notice`, or earlier once a probe has been
/// answered 503 (`told` reads true: whoever polls health knows) and `in_flight` has read 0 for
/// a whole second since (nothing is being sent here any more). Without a probe the whole
/// notice runs: a gateway that polls less often than that has not been told yet.
pub async fn notice(notice: Duration, in_flight: impl Fn() -> usize, told: impl Fn() -> bool) {
    const QUIET: Duration = Duration::from_secs(1);
    const POLL: Duration = Duration::from_millis(100);
    // A day at most: beyond, `Instant + Duration` could overflow.
    let end = Instant::now() + notice.min(Duration::from_secs(24 * 3600));
    let mut quiet_since = Instant::now();
    while Instant::now() < end {
        if in_flight() > 0 || !told() {
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
    async fn the_notice_ends_a_quiet_second_after_a_refused_probe_or_at_its_end() {
        let within = |d: Duration, low: u64, high: u64| {
            d >= Duration::from_millis(low) && d < Duration::from_millis(high)
        };
        let start = Instant::now();
        notice(Duration::from_secs(5), || 0, || true).await;
        let told_and_quiet = start.elapsed();
        assert!(within(told_and_quiet, 1000, 1300), "{told_and_quiet:?}");
        let start = Instant::now();
        notice(Duration::from_secs(5), || 1, || true).await;
        let busy = start.elapsed();
        assert!(within(busy, 5000, 5200), "{busy:?}");
        let start = Instant::now();
        notice(Duration::from_secs(5), || 0, || false).await;
        let nobody_told = start.elapsed();
        assert!(within(nobody_told, 5000, 5200), "{nobody_told:?}");
        let start = Instant::now();
        notice(Duration::from_secs(u64::MAX), || 0, || true).await;
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a huge notice does not overflow"
        );
    }
}
