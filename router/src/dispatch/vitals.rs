//! A worker's signs of life and its last pushed load, written by its connection task (on
//! `Progress` and `Pong` frames) and read by its supervisor's watchdog, `/workers`,
//! `/health` and `/metrics`. Nothing here asks the worker anything: the worker pushes
//! `Progress` at every engine step, and the connection pings it on a timer.
//!
//! The hang rule ([`Vitals::is_hung`]) is pure and unit-tested: a worker is hung when its last
//! `Progress` said the engine had work and no step followed within the hang timeout (a stuck
//! decode, a deadlocked engine), or when nothing at all came back (no `Progress`, no `Pong`)
//! within it while it was being pinged (SIGSTOP, a dead IPC thread).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use llamapool_common::protocol::WorkerStats;

/// What the connection has heard from its worker.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    /// The last `Progress`, if any since the connection started.
    pub stats: Option<WorkerStats>,
    /// When the last `Progress` arrived.
    pub progress_at: Instant,
    /// When anything that proves the worker alive (`Progress` or `Pong`) last arrived.
    pub alive_at: Instant,
    /// Shape changes its earlier processes made (each process counts from 0).
    pub shape_changes_before: u64,
}

/// Shared between one worker's connection task and everyone who looks at the worker.
#[derive(Debug)]
pub struct Vitals(Mutex<Heard>);

impl Default for Vitals {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Vitals {
    pub fn new(now: Instant) -> Self {
        Self(Mutex::new(Heard {
            stats: None,
            progress_at: now,
            alive_at: now,
            shape_changes_before: 0,
        }))
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.0.lock().expect("vitals lock is never poisoned")
    }

    /// A new connection: the clock starts now, and a worker that just said `Ready` runs
    /// nothing.
    pub fn reset(&self, now: Instant) {
        let mut heard = self.heard();
        let before = heard.shape_changes_before + heard.stats.map_or(0, |s| s.shape_changes);
        *heard = Heard {
            stats: Some(WorkerStats::default()),
            progress_at: now,
            alive_at: now,
            shape_changes_before: before,
        };
    }

    /// Shape changes of this worker slot since the router started, over all its processes.
    pub fn shape_changes(&self) -> u64 {
        let heard = self.heard();
        heard.shape_changes_before + heard.stats.map_or(0, |s| s.shape_changes)
    }

    pub fn on_progress(&self, stats: WorkerStats, now: Instant) {
        let mut heard = self.heard();
        heard.stats = Some(stats);
        heard.progress_at = now;
        heard.alive_at = now;
    }

    pub fn on_pong(&self, now: Instant) {
        self.heard().alive_at = now;
    }

    pub fn snapshot(&self) -> Heard {
        *self.heard()
    }

    /// The last pushed load (running, waiting, decode calls).
    pub fn stats(&self) -> Option<WorkerStats> {
        self.heard().stats
    }

    /// Whether the worker has been heard from within `window`.
    pub fn answers_within(&self, window: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.heard().alive_at) <= window
    }

    /// The hang rule; see the module doc.
    pub fn is_hung(&self, hang_timeout: Duration, now: Instant) -> bool {
        let heard = self.snapshot();
        let engine_busy = heard.stats.is_some_and(|s| s.running + s.waiting > 0);
        let since_progress = now.saturating_duration_since(heard.progress_at);
        let since_alive = now.saturating_duration_since(heard.alive_at);
        (engine_busy && since_progress > hang_timeout) || since_alive > hang_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(running: u32, waiting: u32) -> WorkerStats {
        WorkerStats {
            running,
            waiting,
            ..WorkerStats::default()
        }
    }

    const HANG: Duration = Duration::from_secs(10);

    /// Vitals that got `running` requests' progress at `t0`, then a pong every second up to
    /// `t0 + pongs` seconds.
    fn answering_pings(running: u32, pongs: u64) -> (Vitals, Instant) {
        let t0 = Instant::now();
        let v = Vitals::new(t0);
        v.on_progress(stats(running, 0), t0);
        for s in 1..=pongs {
            v.on_pong(t0 + Duration::from_secs(s));
        }
        (v, t0)
    }

    #[test]
    fn a_busy_engine_without_steps_is_hung_even_if_it_answers_pings() {
        let (v, t0) = answering_pings(2, 11);
        assert!(!v.is_hung(HANG, t0 + Duration::from_secs(9)));
        assert!(v.is_hung(HANG, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn an_idle_worker_is_alive_while_it_answers_pings() {
        let (v, t0) = answering_pings(0, 30);
        assert!(!v.is_hung(HANG, t0 + Duration::from_secs(31)));
        assert!(v.answers_within(Duration::from_secs(2), t0 + Duration::from_secs(31)));
    }

    #[test]
    fn silence_is_a_hang_busy_or_not() {
        let t0 = Instant::now();
        let v = Vitals::new(t0);
        assert!(!v.is_hung(HANG, t0 + Duration::from_secs(10)));
        assert!(v.is_hung(HANG, t0 + Duration::from_secs(11)));
        assert!(!v.answers_within(Duration::from_secs(2), t0 + Duration::from_secs(3)));
    }

    #[test]
    fn steps_keep_a_busy_worker_alive() {
        let t0 = Instant::now();
        let v = Vitals::new(t0);
        for s in 0..60 {
            v.on_progress(stats(1, 3), t0 + Duration::from_secs(s));
        }
        assert!(!v.is_hung(HANG, t0 + Duration::from_secs(65)));
        v.reset(t0 + Duration::from_secs(100));
        assert_eq!(v.stats(), Some(WorkerStats::default()));
    }

    #[test]
    fn shape_changes_add_up_over_restarts() {
        let t0 = Instant::now();
        let v = Vitals::new(t0);
        let changed = |n| WorkerStats {
            shape_changes: n,
            ..WorkerStats::default()
        };
        v.on_progress(changed(3), t0);
        v.reset(t0);
        assert_eq!(v.shape_changes(), 3);
        v.on_progress(changed(2), t0);
        assert_eq!(v.shape_changes(), 5);
    }
}
