//! One supervisor task per worker: it owns the worker's process and runs its connection.
//!
//! Each round starts the process (in its own process group, so a terminal's Ctrl-C or a
//! service manager's group signal reaches only the router, which drains and then stops it),
//! waits for its socket and `Ready`, and runs the connection until one of: the worker goes
//! away (death), the watchdog finds it hung (killed, then handled exactly as a death), the
//! operator restarts it, or the pool shuts down. Requests it still had move to the other
//! workers. Deaths are counted: a worker that dies too often in a short window is `failed`
//! and retried slowly instead of every few hundred milliseconds.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{ConnectOptions, GenericFilePath};
use llamapool_common::protocol::WorkerInfo;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::connection::{self, Watch};
use super::pool::{Inner, Worker, WorkerState};

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

/// How one connection round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoundEnd {
    /// The worker closed the connection or it broke.
    Died,
    /// The watchdog found no progress; the worker was killed.
    Hung,
    /// The operator asked for a restart.
    Restart,
    Shutdown,
}

/// Deaths in a sliding window: the crash-loop rule.
#[derive(Debug)]
struct CrashHistory {
    deaths: VecDeque<Instant>,
    limit: usize,
    window: Duration,
}

impl CrashHistory {
    fn new(limit: usize, window: Duration) -> Self {
        Self {
            deaths: VecDeque::new(),
            limit,
            window,
        }
    }

    /// Records a death; true when the worker is crash-looping.
    fn record(&mut self, now: Instant) -> bool {
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

pub(super) async fn supervise(inner: Arc<Inner>, index: usize) {
    let worker = &inner.workers[index];
    let mut shutdown = inner.shutdown.subscribe();
    let policy = inner.policy;
    let mut crashes = CrashHistory::new(policy.crash_deaths, policy.crash_window);
    let mut start_failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        worker.update(|s| {
            if s.state != WorkerState::Failed {
                s.state = if s.restarts == 0 && start_failures == 0 {
                    WorkerState::Starting
                } else {
                    WorkerState::Restarting
                };
            }
        });
        let end = match start_worker(&inner, index).await {
            Ok((child, stream, info)) => {
                start_failures = 0;
                Some(run_round(&inner, index, child, stream, info).await)
            }
            Err(e) => {
                tracing::error!(worker = index, error = %e, "worker failed to start");
                worker.update(|s| s.last_error = Some(e));
                start_failures += 1;
                None
            }
        };
        if end == Some(RoundEnd::Shutdown) || *shutdown.borrow() {
            break;
        }
        worker.update(|s| s.restarts += 1);
        let backoff = if end == Some(RoundEnd::Restart) {
            worker.update(|s| s.draining = false);
            Duration::ZERO
        } else if crashes.record(Instant::now()) {
            tracing::error!(
                worker = index,
                deaths = policy.crash_deaths,
                window = ?policy.crash_window,
                "worker is crash-looping; marking it failed and retrying slowly"
            );
            worker.update(|s| s.state = WorkerState::Failed);
            policy.failed_retry
        } else {
            Duration::from_millis(250u64.saturating_mul(1 << start_failures.min(7)))
                .min(Duration::from_secs(30))
        };
        // An operator's restart cuts the wait short (also for a failed worker).
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
            () = worker.restart.notified() => {}
        }
    }
    worker.update(|s| {
        s.state = WorkerState::Stopped;
        s.commands = None;
    });
}

/// Runs one started worker until it dies, hangs, is restarted or the pool shuts down; moves
/// its requests elsewhere and makes sure the process is gone.
async fn run_round(
    inner: &Inner,
    index: usize,
    mut child: Child,
    stream: interprocess::local_socket::tokio::Stream,
    info: WorkerInfo,
) -> RoundEnd {
    let worker = &inner.workers[index];
    let (tx, rx) = mpsc::unbounded_channel();
    let pid = info.pid;
    // A new process: whatever its predecessor cached is gone.
    worker.prefixes.clear();
    worker.update(|s| {
        s.state = WorkerState::Ready;
        s.pid = Some(pid);
        s.info = Some(info);
        s.commands = Some(tx);
        s.last_error = None;
    });
    inner.first_ready.get_or_init(std::time::Instant::now);
    tracing::info!(worker = index, pid, cpus = %worker.plan().cpus, "worker ready");
    let watch = Watch {
        metrics: &inner.metrics,
        vitals: &worker.vitals,
        ping_interval: inner.policy.ping_interval(),
    };
    let connection = connection::run(stream, rx, watch);
    tokio::pin!(connection);
    let mut shutdown = inner.shutdown.subscribe();
    let (end, orphans) = tokio::select! {
        orphans = &mut connection => (RoundEnd::Died, orphans),
        _ = shutdown.changed() => {
            // Dropping the sender ends the connection loop after the queued commands.
            worker.update(|s| s.commands = None);
            (RoundEnd::Shutdown, connection.await)
        }
        () = worker.restart.notified() => {
            worker.update(|s| s.commands = None);
            (RoundEnd::Restart, connection.await)
        }
        () = watchdog(worker, inner.policy) => {
            tracing::error!(worker = index, pid, timeout = ?inner.policy.hang_timeout, "worker is hung: no progress; killing it");
            inner.metrics.record_hung_kill(index);
            worker.update(|s| {
                s.state = WorkerState::Hung;
                s.commands = None;
                s.last_error = Some(format!(
                    "hung: no progress for {:?}; killed",
                    inner.policy.hang_timeout
                ));
            });
            let _ = child.start_kill();
            (RoundEnd::Hung, connection.await)
        }
    };
    worker.update(|s| {
        s.commands = None;
        if s.state == WorkerState::Ready {
            s.state = WorkerState::Restarting;
        }
    });
    inner.requeue(index, orphans);
    let status = stop_child(&mut child).await;
    worker.update(|s| {
        s.pid = None;
        if end == RoundEnd::Died {
            s.last_error = Some(format!("the worker exited ({status})"));
        }
    });
    if end == RoundEnd::Died {
        tracing::warn!(worker = index, %status, "worker went away; restarting it");
    }
    end
}

/// Resolves when the worker's vitals say it is hung.
async fn watchdog(worker: &Worker, policy: SupervisionPolicy) {
    let mut ticks = tokio::time::interval(policy.ping_interval());
    loop {
        ticks.tick().await;
        if worker.vitals.is_hung(policy.hang_timeout, Instant::now()) {
            return;
        }
    }
}

/// Waits for the child to exit after its connection closed; kills it if it lingers (workers
/// ignore SIGTERM, so SIGKILL it is). Returns how it ended.
async fn stop_child(child: &mut Child) -> String {
    if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        return status.to_string();
    }
    let _ = child.kill().await;
    match child.wait().await {
        Ok(status) => format!("{status}, killed after it lingered"),
        Err(e) => format!("unknown: {e}"),
    }
}

async fn start_worker(
    inner: &Inner,
    index: usize,
) -> Result<(Child, interprocess::local_socket::tokio::Stream, WorkerInfo), String> {
    let plan = inner.workers[index].plan();
    let launch = inner.launch();
    let socket = launch.runtime_dir.join(format!("worker-{index}.sock"));
    let _ = std::fs::remove_file(&socket);
    let args = plan.worker_args(
        socket.clone(),
        launch.model_path.clone(),
        launch.chat_template.clone(),
    );
    let mut cmd = Command::new(&launch.worker_binary);
    cmd.args(args.to_args())
        .env("LLAMAPOOL_ROUTER_PID", std::process::id().to_string())
        // Its own process group: group signals (Ctrl-C) reach the router, which drains first.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", launch.worker_binary.display()))?;
    inner.workers[index].update(|s| s.pid = child.id());
    let deadline = tokio::time::Instant::now() + launch.ready_timeout;
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the worker exited during start-up ({status}); see its log above"
            ));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(format!(
                "the worker was not ready within {:?}",
                launch.ready_timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let name = socket
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| format!("socket name: {e}"))?;
    // The socket file appears at bind(), a moment before listen(): a refusal then is the
    // worker still getting ready, not a failure.
    let mut stream = loop {
        match ConnectOptions::new()
            .name(name.clone())
            .connect_tokio()
            .await
        {
            Ok(stream) => break stream,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(format!("connecting to {}: {e}", socket.display())),
        }
    };
    let info = connection::handshake(&mut stream, Duration::from_secs(10)).await?;
    Ok((child, stream, info))
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
    fn pings_fit_several_times_into_the_hang_timeout() {
        let policy = SupervisionPolicy {
            hang_timeout: Duration::from_secs(3),
            crash_deaths: 5,
            crash_window: Duration::from_secs(300),
            failed_retry: Duration::from_secs(60),
        };
        assert_eq!(policy.ping_interval(), Duration::from_millis(750));
        assert!(policy.answer_window() < policy.hang_timeout);
    }
}
