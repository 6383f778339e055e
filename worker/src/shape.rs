//! Adaptive width: an adaptive worker (`--wide-cpus`) runs wide — several threads over all of
//! its wide CPUs — while nothing else keeps those CPUs busy, and narrow — one thread on its
//! own CPU — as soon as something does: a neighbour process or another worker of the pool.
//!
//! Why: on a quiet machine one wide context batches best (every sequence in one decode), but
//! llama.cpp's threads meet at a barrier after every operation, so one descheduled thread
//! stalls the others: under a competing process a wide context collapses, while independent
//! one-thread workers keep nearly all the CPU time they are given (docs/PERFORMANCE.md).
//!
//! - [`ContentionMeter`] (mechanism): over the last window, how many CPUs of the wide set were
//!   kept busy by the rest of the pool (the router, its parent, and the other workers, its
//!   children: `/proc/<router>/task/*/children`) and by foreign processes — the busy time
//!   `/proc/stat` counts on those CPUs, less this process's own and the pool's.
//! - [`WidthPolicy`] (policy, pure): the worker becomes *crowded* when windows in which
//!   foreign processes took more than 0.3 of a CPU add up to 0.7 s of the last second, and
//!   quiet again after 0.45 s of windows in a row at 0.2 or less (a process starting, a
//!   client, a scrape is a spike of a window or two that this rides out; a busy loop or a
//!   build trips it within about 0.75 s); it stops being *packable* only once crowded for a
//!   second more, so that a burst that narrows it for a moment leaves the router's placement
//!   alone;
//!   it is *wide* only while not crowded and no other worker of the pool is working (which
//!   counts at once, and clears after two idle windows: two workers at work must never both
//!   run wide).
//! - [`Shaper`]: runs both from the engine thread after every engine iteration (and every
//!   idle tick) and switches: the OpenMP team is turned off (`omp_set_max_active_levels(0)`:
//!   ggml then computes with the one thread it got) and the engine thread is pinned to its own
//!   CPU, or turned back on and unpinned over the wide CPUs.
//!
//! The router reads `WorkerStats::packable` (adaptive and not crowded) from every `Progress`:
//! it packs requests onto the first packable worker while that one has free slots, so that on
//! a quiet machine the other workers drain, go idle, and the first one widens; when foreign
//! work crowds the CPUs, no worker is packable and requests spread over the narrow workers.

use std::time::{Duration, Instant};

use llamapool_common::cpus::CpuList;
use llamapool_common::worker::WideShape;

/// How often contention is measured: short enough to notice a neighbour within a few decode
/// steps, long enough for `/proc`'s 10 ms ticks to add up to a usable figure.
pub const WINDOW: Duration = Duration::from_millis(250);
/// A figure is taken once at least this much has passed: a little under [`WINDOW`], so that
/// an idle worker, which measures on its 250 ms idle ticks, does not skip every other one.
const MIN_WINDOW: Duration = Duration::from_millis(200);

/// Foreign work is judged over about the last second, not one window: a process starting
/// (an interpreter, a `curl`, a scrape) takes half a CPU or more for a window or two and is
/// gone, while a real neighbour (a busy loop, a build) keeps taking it window after window.
const RECENT: Duration = Duration::from_secs(1);
/// A window in which foreign processes took more than this many CPUs is a busy one ...
const BUSY_WINDOW_ABOVE: f64 = 0.3;
/// ... counting in full from this many CPUs (a busy loop takes about 0.66 of one against a
/// wide worker), in proportion below: a window that a short burst only partly covers (or a
/// long one: a worker measures between decode steps) must not count as wholly busy ...
const BUSY_FULL_AT: f64 = 0.6;
/// ... and busy windows adding up to this much of the last second crowd the CPUs: a busy
/// loop trips it within about 0.75 s.
const BUSY_TIME_TO_CROWD: Duration = Duration::from_millis(700);
/// A window with at most this much foreign work is a quiet one, and quiet windows in a row
/// adding up to this much clear the crowding (in between, the verdict stays as it was).
const QUIET_WINDOW_BELOW: f64 = 0.2;
const QUIET_TIME_TO_CLEAR: Duration = Duration::from_millis(450);
/// Crowded this long, the worker stops being packable and the router spreads requests (and
/// splits a packed wave) over the narrow workers. Narrowing itself is cheap and immediate;
/// spreading moves requests and costs prefills, so a burst that narrows the worker for a
/// moment (a heavy process start: `llamapool-bench` itself takes 0.8 CPU-seconds to load its
/// tokenizer) leaves the wave where it is.
const SPREAD_AFTER: Duration = Duration::from_secs(1);
/// Another worker using more than this much CPU in a window is working (an idle one uses
/// next to none). Two workers at work must not both run wide, so this counts at once.
const SIBLING_WORKING_ABOVE: f64 = 0.2;
/// Windows in a row without a working sibling before widening again.
const SIBLING_QUIET_WINDOWS: u32 = 2;

/// One window's figures, in CPUs kept busy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Contention {
    /// By processes outside the pool.
    pub foreign: f64,
    /// By the other workers of the pool.
    pub siblings: f64,
}

/// The width decision, from one window's [`Contention`] at a time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WidthPolicy {
    /// (length, foreign CPUs) of the windows covering the last [`RECENT`], oldest first.
    recent: std::collections::VecDeque<(Duration, f64)>,
    /// Foreign processes keep the CPUs busy (see [`BUSY_TIME_TO_CROWD`]).
    crowded: bool,
    /// How long it has been crowded without a break (see [`SPREAD_AFTER`]).
    crowded_for: Duration,
    /// Another worker is working now, or was within the last [`SIBLING_QUIET_WINDOWS`].
    sibling_working: bool,
    sibling_quiet_windows: u32,
}

impl WidthPolicy {
    /// Starts wide and packable: a worker starts on a machine assumed quiet, and the first
    /// windows correct it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs wide: no foreign process crowds its CPUs and no other worker is working.
    pub fn is_wide(&self) -> bool {
        !self.crowded && !self.sibling_working
    }

    /// May be packed with requests: no foreign process has crowded its CPUs for
    /// [`SPREAD_AFTER`] (the pool's own workers do not count: packing is what lets them go
    /// idle).
    pub fn is_packable(&self) -> bool {
        !(self.crowded && self.crowded_for >= SPREAD_AFTER)
    }

    /// Takes one window's figures.
    pub fn observe(&mut self, c: Contention, length: Duration) {
        self.remember(c.foreign, length);
        let busy: Duration = self
            .recent
            .iter()
            .filter(|(_, f)| *f > BUSY_WINDOW_ABOVE)
            .map(|(len, f)| len.mul_f64((f / BUSY_FULL_AT).min(1.0)))
            .sum();
        let quiet_run: Duration = self
            .recent
            .iter()
            .rev()
            .take_while(|(_, f)| *f <= QUIET_WINDOW_BELOW)
            .map(|(len, _)| *len)
            .sum();
        let was_crowded = self.crowded;
        if busy >= BUSY_TIME_TO_CROWD {
            self.crowded = true;
        } else if quiet_run >= QUIET_TIME_TO_CLEAR {
            self.crowded = false;
        }
        self.crowded_for = if was_crowded && self.crowded {
            self.crowded_for + length
        } else {
            Duration::ZERO
        };
        if c.siblings > SIBLING_WORKING_ABOVE {
            self.sibling_working = true;
            self.sibling_quiet_windows = 0;
        } else {
            self.sibling_quiet_windows = self.sibling_quiet_windows.saturating_add(1);
            if self.sibling_quiet_windows >= SIBLING_QUIET_WINDOWS {
                self.sibling_working = false;
            }
        }
    }

    /// Keeps the newest windows that cover [`RECENT`]; older ones no longer count.
    fn remember(&mut self, foreign: f64, length: Duration) {
        self.recent.push_back((length, foreign));
        let mut covered = Duration::ZERO;
        let keep = self
            .recent
            .iter()
            .rev()
            .take_while(|(len, _)| {
                let before = covered;
                covered += *len;
                before < RECENT
            })
            .count();
        let stale = self.recent.len() - keep;
        self.recent.drain(..stale);
    }

    /// Foreign CPUs on average over the recent windows, for the log.
    pub fn foreign_cpus(&self) -> f64 {
        let covered: Duration = self.recent.iter().map(|(len, _)| *len).sum();
        let cpu_s: f64 = self
            .recent
            .iter()
            .map(|(len, f)| len.as_secs_f64() * f)
            .sum();
        cpu_s / covered.as_secs_f64().max(f64::EPSILON)
    }
}

/// CPU time counters at one moment, in clock ticks (`USER_HZ`, 100 per second on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counters {
    /// Busy ticks (user, nice, system, irq, softirq) of the watched CPUs, all processes.
    busy: u64,
    /// This process's user and system ticks, all threads.
    own: u64,
    /// The router's (this process's parent), all threads.
    router: u64,
    /// The other workers' (the router's other children).
    siblings: u64,
}

/// Clock ticks per second of `/proc`'s counters (`USER_HZ`, fixed at 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Measures who keeps the watched CPUs busy.
#[derive(Debug)]
pub struct ContentionMeter {
    cpus: CpuList,
    router: u32,
    last: Option<(Instant, Counters)>,
}

impl ContentionMeter {
    /// Watches `cpus`; `router` is the parent process, whose other children are the pool's
    /// other workers.
    pub fn new(cpus: CpuList, router: u32) -> Self {
        Self {
            cpus,
            router,
            last: None,
        }
    }

    /// When at least [`WINDOW`] has passed since the last figure: who kept the CPUs busy over
    /// that time, and how long it was. `None` before that, or when `/proc` cannot be read.
    pub fn sample(&mut self, now: Instant) -> Option<(Contention, Duration)> {
        if let Some((at, _)) = self.last {
            if now.duration_since(at) < MIN_WINDOW {
                return None;
            }
        }
        let counters = read_counters(&self.cpus, self.router)?;
        let previous = self.last.replace((now, counters));
        let (at, before) = previous?;
        let length = now.duration_since(at);
        Some((contention(before, counters, length), length))
    }
}

/// Who kept the CPUs busy between two readings `elapsed` apart.
fn contention(before: Counters, after: Counters, elapsed: Duration) -> Contention {
    let ticks = elapsed.as_secs_f64() * TICKS_PER_SEC;
    if ticks <= 0.0 {
        return Contention::default();
    }
    let delta = |f: fn(&Counters) -> u64| f(&after).saturating_sub(f(&before));
    let busy = delta(|c| c.busy);
    let siblings = delta(|c| c.siblings);
    let pool = delta(|c| c.own) + delta(|c| c.router) + siblings;
    Contention {
        foreign: busy.saturating_sub(pool) as f64 / ticks,
        siblings: siblings as f64 / ticks,
    }
}

fn read_counters(cpus: &CpuList, router: u32) -> Option<Counters> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own_pid = std::process::id();
    let siblings = children(router)
        .into_iter()
        .filter(|&pid| pid != own_pid)
        .filter_map(process_ticks)
        .sum();
    Some(Counters {
        busy: busy_ticks(&stat, cpus),
        own: process_ticks(own_pid)?,
        router: process_ticks(router).unwrap_or(0),
        siblings,
    })
}

/// The child processes of `pid` (every thread's `children` list).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn process_ticks(pid: u32) -> Option<u64> {
    own_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The busy ticks of `cpus` in a `/proc/stat` text: per `cpuN` line, user + nice + system +
/// irq + softirq (not idle, iowait or steal; guest time is already inside user).
fn busy_ticks(stat: &str, cpus: &CpuList) -> u64 {
    stat.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let cpu: usize = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            if !cpus.cpus().contains(&cpu) {
                return None;
            }
            let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
            let at = |i: usize| values.get(i).copied().unwrap_or(0);
            Some(at(0) + at(1) + at(2) + at(5) + at(6))
        })
        .sum()
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` text; the command name in
/// parentheses may contain spaces, so fields are counted after its closing parenthesis.
fn own_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // After the name, field 3 (state) is at index 0: utime (14) is at 11, stime (15) at 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// What an adaptive worker reports of its shape with every `Progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShapeNow {
    /// The router may pack requests onto it (see [`WidthPolicy::is_packable`]).
    pub packable: bool,
    pub wide: bool,
    /// Threads its decode runs with now.
    pub threads: u32,
    /// Switches between wide and narrow since it started.
    pub changes: u64,
}

/// Switches the worker's width from the engine thread (the thread that runs llama.cpp's
/// decode, and so the master of its OpenMP team).
#[derive(Debug)]
pub struct Shaper {
    policy: WidthPolicy,
    meter: ContentionMeter,
    home: CpuList,
    wide: WideShape,
    /// OpenMP's nesting limit before any change: restored when widening.
    full_levels: i32,
    applied: Option<bool>,
    changes: u64,
}

impl Shaper {
    /// An adaptive worker's shaper: `home` is its own CPU, `wide` its wide shape, `router`
    /// the parent process (the pool is it and its children).
    pub fn new(home: CpuList, wide: WideShape, router: u32) -> Self {
        Self {
            policy: WidthPolicy::new(),
            meter: ContentionMeter::new(wide.cpus.clone(), router),
            home,
            wide,
            full_levels: omp::max_active_levels().max(1),
            applied: None,
            changes: 0,
        }
    }

    /// Measures when a window has passed and switches if the policy says so; returns the
    /// shape it has now. Must run on the engine thread.
    pub fn tick(&mut self, now: Instant) -> ShapeNow {
        if let Some((contention, length)) = self.meter.sample(now) {
            self.policy.observe(contention, length);
            tracing::debug!(
                window_ms = length.as_millis() as u64,
                foreign = format!("{:.2}", contention.foreign),
                siblings = format!("{:.2}", contention.siblings),
                policy = ?self.policy,
                "shape window"
            );
            if self.applied != Some(self.policy.is_wide()) {
                self.apply(self.policy.is_wide(), contention);
            }
        } else if self.applied.is_none() {
            self.apply(self.policy.is_wide(), Contention::default());
        }
        let wide = self.applied == Some(true);
        ShapeNow {
            packable: self.policy.is_packable(),
            wide,
            threads: if wide { self.wide.threads } else { 1 },
            changes: self.changes,
        }
    }

    fn apply(&mut self, wide: bool, contention: Contention) {
        let (levels, cpus) = if wide {
            (self.full_levels, &self.wide.cpus)
        } else {
            (0, &self.home)
        };
        omp::set_max_active_levels(levels);
        if let Err(e) = crate::pin::pin_to(cpus) {
            tracing::warn!(cpus = %cpus, "pinning the engine thread: {e}");
        }
        let foreign = format!("{:.2}", self.policy.foreign_cpus());
        if wide {
            tracing::info!(
                threads = self.wide.threads,
                cpus = %self.wide.cpus,
                foreign_busy_cpus_recent = foreign,
                "wide: the CPUs are free"
            );
        } else {
            tracing::info!(
                cpus = %self.home,
                foreign_busy_cpus_recent = foreign,
                other_workers_busy_cpus = format!("{:.2}", contention.siblings),
                "narrow: other work keeps the CPUs busy"
            );
        }
        if self.applied.is_some() {
            self.changes += 1;
        }
        self.applied = Some(wide);
    }
}

/// The two OpenMP runtime calls the shaper needs (libgomp, linked by llama.cpp's OpenMP build).
#[allow(unsafe_code)]
mod omp {
    use std::ffi::c_int;

    extern "C" {
        fn omp_set_max_active_levels(levels: c_int);
        fn omp_get_max_active_levels() -> c_int;
    }

    /// With 0, every parallel region runs with one thread: ggml then computes the whole graph
    /// on the engine thread (it reads the team's actual size).
    pub fn set_max_active_levels(levels: i32) {
        // SAFETY: a plain setter of an OpenMP internal control variable; no pointers.
        unsafe { omp_set_max_active_levels(levels) }
    }

    pub fn max_active_levels() -> i32 {
        // SAFETY: a plain getter of an OpenMP internal control variable; no pointers.
        unsafe { omp_get_max_active_levels() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(foreign: f64, siblings: f64) -> Contention {
        Contention { foreign, siblings }
    }

    fn feed(p: &mut WidthPolicy, windows: usize, foreign: f64, siblings: f64) {
        for _ in 0..windows {
            p.observe(c(foreign, siblings), WINDOW);
        }
    }

    #[test]
    fn a_spike_does_not_narrow_it_but_a_neighbour_does_within_a_second() {
        let mut p = WidthPolicy::new();
        assert!(p.is_wide() && p.is_packable(), "starts wide");
        // A process starting: 0.6 of a CPU for half a second.
        feed(&mut p, 2, 0.6, 0.0);
        assert!(p.is_wide() && p.is_packable(), "a passing spike: {p:?}");
        feed(&mut p, 4, 0.0, 0.0);
        // A busy loop against a wide worker takes about 2/3 of a CPU.
        feed(&mut p, 2, 0.66, 0.0);
        assert!(p.is_wide(), "half a second of it is not enough yet");
        feed(&mut p, 1, 0.66, 0.0);
        assert!(!p.is_wide(), "narrow within 0.75 s: {p:?}");
        assert!(p.is_packable(), "but the wave stays where it is for now");
        feed(&mut p, 3, 0.66, 0.0);
        assert!(p.is_packable(), "{p:?}");
        feed(&mut p, 1, 0.66, 0.0);
        assert!(
            !p.is_packable(),
            "crowded for a second: requests spread: {p:?}"
        );
    }

    #[test]
    fn a_heavy_process_start_narrows_it_for_a_moment_but_does_not_spread_the_wave() {
        let mut p = WidthPolicy::new();
        // llamapool-bench starting: a whole CPU for 0.8 s.
        feed(&mut p, 1, 0.5, 0.0);
        feed(&mut p, 3, 1.0, 0.0);
        feed(&mut p, 1, 0.2, 0.0);
        assert!(!p.is_wide());
        feed(&mut p, 2, 0.0, 0.0);
        assert!(p.is_wide(), "{p:?}");
        assert!(p.is_packable());
        let mut q = WidthPolicy::new();
        for f in [0.5, 1.0, 1.0, 1.0, 0.2, 0.0, 0.0] {
            q.observe(c(f, 0.0), WINDOW);
            assert!(q.is_packable(), "never spread: {q:?}");
        }
    }

    #[test]
    fn a_neighbour_that_leaves_is_forgotten_within_a_second() {
        let mut p = WidthPolicy::new();
        feed(&mut p, 8, 0.55, 0.0);
        assert!(!p.is_wide() && !p.is_packable());
        feed(&mut p, 1, 0.0, 0.0);
        assert!(!p.is_wide(), "a quarter second later it still counts");
        feed(&mut p, 1, 0.0, 0.0);
        assert!(
            p.is_wide() && p.is_packable(),
            "half a second later it does not"
        );
    }

    #[test]
    fn light_steady_foreign_work_changes_nothing_either_way() {
        let mut p = WidthPolicy::new();
        feed(&mut p, 20, 0.3, 0.0);
        assert!(
            p.is_wide(),
            "a client using 0.3 of a CPU does not narrow it"
        );
        feed(&mut p, 8, 0.8, 0.0);
        feed(&mut p, 20, 0.3, 0.0);
        assert!(!p.is_wide(), "nor widens it once a neighbour narrowed it");
    }

    #[test]
    fn long_windows_count_for_their_length() {
        // A wide worker that a neighbour slows steps slowly, and measures between steps.
        let mut p = WidthPolicy::new();
        p.observe(c(0.7, 0.0), Duration::from_millis(500));
        assert!(p.is_wide(), "half a second is not enough yet");
        p.observe(c(0.7, 0.0), Duration::from_millis(500));
        assert!(!p.is_wide(), "a second is: {p:?}");
    }

    #[test]
    fn a_burst_inside_a_long_window_counts_for_its_share() {
        // 0.4 s of a whole CPU, measured by a worker whose step took half a second.
        let mut p = WidthPolicy::new();
        p.observe(c(0.54, 0.0), Duration::from_millis(500));
        p.observe(c(0.4, 0.0), Duration::from_millis(220));
        p.observe(c(0.05, 0.0), WINDOW);
        assert!(p.is_wide(), "{p:?}");
    }

    #[test]
    fn a_short_heavy_burst_does_not_narrow_it() {
        let mut p = WidthPolicy::new();
        // Something starting on both CPUs for half a second.
        feed(&mut p, 2, 1.8, 0.0);
        feed(&mut p, 2, 0.1, 0.0);
        assert!(p.is_wide() && p.is_packable(), "{p:?}");
        // Two bursts with a quiet window between are not a neighbour either.
        feed(&mut p, 1, 0.9, 0.0);
        feed(&mut p, 1, 0.1, 0.0);
        feed(&mut p, 1, 0.9, 0.0);
        assert!(p.is_wide(), "{p:?}");
    }

    #[test]
    fn a_working_sibling_narrows_it_at_once_but_leaves_it_packable() {
        let mut p = WidthPolicy::new();
        feed(&mut p, 1, 0.0, 1.0);
        assert!(!p.is_wide(), "two workers at work: each on its own CPU");
        assert!(
            p.is_packable(),
            "the router may still pack onto it, so the other drains"
        );
        feed(&mut p, 1, 0.0, 0.0);
        assert!(!p.is_wide(), "one idle window is not enough");
        feed(&mut p, 1, 0.0, 0.0);
        assert!(p.is_wide(), "the other went idle");
    }

    #[test]
    fn the_pool_is_not_foreign() {
        let before = Counters {
            busy: 1000,
            own: 400,
            router: 10,
            siblings: 300,
        };
        let after = Counters {
            busy: 1050,
            own: 420,
            router: 12,
            siblings: 320,
        };
        // 50 busy ticks in 0.25 s (25 ticks per CPU): 20 ours, 2 the router's, 20 another
        // worker's, 8 foreign.
        let got = contention(before, after, Duration::from_millis(250));
        assert!((got.foreign - 0.32).abs() < 1e-9, "{got:?}");
        assert!((got.siblings - 0.8).abs() < 1e-9, "{got:?}");
    }

    #[test]
    fn proc_texts_are_parsed() {
        let stat = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                    cpu0 1 2 3 100 50 4 5 60 0 0\n\
                    cpu1 10 20 30 100 50 40 50 60 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(busy_ticks(stat, &CpuList::parse("0").unwrap()), 15);
        assert_eq!(busy_ticks(stat, &CpuList::parse("0-1").unwrap()), 165);
        let own = "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 77 33 0 0";
        assert_eq!(own_ticks(own), Some(110));
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert!(
            read_counters(&CpuList::allowed(), parent).is_some(),
            "this machine's /proc"
        );
        assert!(children(parent).contains(&std::process::id()));
    }
}
