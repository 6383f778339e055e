//! The supervision policy: when a worker counts as hung, when its deaths make a crash loop,
//! and how long it waits before the next start. Plain data and pure rules; the supervisor
//! task ([`super::supervisor`]) applies them.
//!
//! A worker that reached ready and served (it stepped, or stayed up [`SERVED_AFTER`]) is
//! started again at once, whoever killed it; one that cannot start, or dies before serving,
//! backs off exponentially (250 ms doubling, at most 30 s: [`early_death_backoff`]), and
//! after `crash_deaths` such failures within `crash_window` ([`CrashHistory`]) it is `failed`
//! and retried every `failed_retry`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::poison::PoisonPolicy;

/// Timing of supervision: the hang watchdog and the crash-loop rule.
#[derive(Debug, Clone, Copy)]
pub struct SupervisionPolicy {
    /// A worker with work and no engine step for this long, or silent this long, is hung.
    pub hang_timeout: Duration,
    /// This many deaths within `crash_window` make a worker `failed`.
    pub crash_deaths: usize,
    pub crash_window: Duration,
    /// How long a failed worker waits before the next try.
    pub failed_retry: Duration,
    /// How long requests that killed workers are refused.
    pub poison: PoisonPolicy,
}

/// A worker that stays up this long after `Ready` has served, even if idle.
pub const SERVED_AFTER: Duration = Duration::from_secs(5);

/// The back-off after a round that did not serve: 250 ms doubling per failure in a row, at
/// most 30 s.
pub(super) fn early_death_backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << failures.saturating_sub(1).min(7)))
        .min(Duration::from_secs(30))
}

impl SupervisionPolicy {
    /// How often the connection pings and the watchdog looks: several times per hang timeout.
    pub fn ping_interval(&self) -> Duration {
        (self.hang_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// A ready worker counts as answering while heard from within this window.
    pub fn answer_window(&self) -> Duration {
        (self.ping_interval() * 3).max(Duration::from_secs(2))
    }
}

/// Deaths in a sliding window: the crash-loop rule.
#[derive(Debug)]
pub(super) struct CrashHistory {
    deaths: VecDeque<Instant>,
    limit: usize,
    window: Duration,
}

impl CrashHistory {
    pub fn new(limit: usize, window: Duration) -> Self {
        Self {
            deaths: VecDeque::new(),
            limit,
            window,
        }
    }

    /// Records a death; true when the worker is crash-looping.
    pub fn record(&mut self, now: Instant) -> bool {
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > self.window)
        {
            self.deaths.pop_front();
        }
        self.deaths.len() >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_in_the_window_make_a_crash_loop() {
        let t0 = Instant::now();
        let mut h = CrashHistory::new(3, Duration::from_secs(60));
        assert!(!h.record(t0));
        assert!(!h.record(t0 + Duration::from_secs(10)));
        assert!(h.record(t0 + Duration::from_secs(20)));
    }

    #[test]
    fn old_deaths_age_out() {
        let t0 = Instant::now();
        let mut h = CrashHistory::new(3, Duration::from_secs(60));
        assert!(!h.record(t0));
        assert!(!h.record(t0 + Duration::from_secs(50)));
        // At 120 s the deaths at 0 s and 50 s are out of the window.
        assert!(!h.record(t0 + Duration::from_secs(120)));
        assert!(!h.record(t0 + Duration::from_secs(121)));
        assert!(h.record(t0 + Duration::from_secs(130)));
    }

    #[test]
    fn early_deaths_back_off_exponentially_up_to_30_s() {
        assert_eq!(early_death_backoff(1), Duration::from_millis(250));
        assert_eq!(early_death_backoff(2), Duration::from_millis(500));
        assert_eq!(early_death_backoff(20), Duration::from_secs(30));
    }

    #[test]
    fn pings_fit_several_times_into_the_hang_timeout() {
        let policy = SupervisionPolicy {
            hang_timeout: Duration::from_secs(3),
            crash_deaths: 5,
            crash_window: Duration::from_secs(300),
            failed_retry: Duration::from_secs(60),
            poison: PoisonPolicy::default(),
        };
        assert_eq!(policy.ping_interval(), Duration::from_millis(750));
        assert!(policy.answer_window() < policy.hang_timeout);
    }
}
