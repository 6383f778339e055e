//! One supervisor task per worker: it owns the worker's process and runs its connection.
//!
//! Each round starts the process (in its own process group, so a terminal's Ctrl-C or a
//! service manager's group signal reaches only the router, which drains and then stops it),
//! waits for its socket and `Ready`, and runs the connection until one of: the worker goes
//! away (death), the watchdog finds it hung (killed, then handled exactly as a death), the
//! operator restarts it, or the pool shuts down. Requests it still had are judged by the
//! poison policy ([`super::poison`]) and move to the other workers
//! (`Inner::requeue`, in [`super::placement`]).
//!
//! Restarts fit the cause, by the rules of [`super::supervision`]: a worker that reached ready
//! and served is started again at once, whoever killed it; one that cannot start, or dies
//! before serving, backs off exponentially, and after `crash_deaths` such failures in a row
//! within `crash_window` it is `failed` and retried every `failed_retry` — systemd's start
//! limit and Kubernetes' CrashLoopBackOff, which also never count a container that ran fine.
//! Kills from outside never make a worker `failed`.
//!
//! The worker's own log lines come on its stdout and are written to the router's stderr as
//! they are; what native code prints on its stderr is captured line by line, capped, escaped
//! and logged through the router's logger, and its last lines are the worker's last words.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{ConnectOptions, GenericFilePath};
use llamapool_common::protocol::WorkerInfo;
use std::io::Write;
use std::process::ExitStatus;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::connection::{self, Watch};
use super::poison::DeathCause;
use super::shared::Inner;
use super::supervision::{early_death_backoff, CrashHistory, SupervisionPolicy, SERVED_AFTER};
use super::worker::{Worker, WorkerState};

/// How one round went: how it ended, and whether the worker served before.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Round {
    end: RoundEnd,
    served: bool,
    /// Why it died (for `Died` and `Hung`).
    cause: Option<DeathCause>,
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

pub(super) async fn supervise(inner: Arc<Inner>, index: usize) {
    let worker = &inner.workers[index];
    let mut shutdown = inner.shutdown.subscribe();
    let policy = inner.policy;
    // Failed starts and deaths before serving, in a row: the crash-loop rule.
    let mut early = CrashHistory::new(policy.crash_deaths, policy.crash_window);
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        worker.update(|s| {
            if s.state != WorkerState::Failed {
                s.state = if s.restarts == 0 && failures_in_a_row == 0 {
                    WorkerState::Starting
                } else {
                    WorkerState::Restarting
                };
            }
        });
        let round = match start_worker(&inner, index).await {
            Ok(started) => Some(run_round(&inner, index, started).await),
            Err(e) => {
                tracing::error!(worker = index, error = %e, "worker failed to start");
                worker.update(|s| {
                    s.last_error = Some(e);
                    s.respawning = false;
                });
                None
            }
        };
        if round.as_ref().is_some_and(|r| r.end == RoundEnd::Shutdown) || *shutdown.borrow() {
            break;
        }
        worker.update(|s| s.restarts += 1);
        let backoff = match round {
            Some(Round {
                end: RoundEnd::Restart,
                ..
            }) => {
                worker.update(|s| s.draining = false);
                Duration::ZERO
            }
            Some(Round { served: true, .. }) => {
                // It served: whoever killed it, start it again now.
                failures_in_a_row = 0;
                early = CrashHistory::new(policy.crash_deaths, policy.crash_window);
                Duration::ZERO
            }
            Some(Round {
                cause: Some(DeathCause::Outside(_)),
                ..
            }) => {
                // Killed from outside before it served: not its fault, but do not spin.
                early_death_backoff(1)
            }
            _ => {
                failures_in_a_row += 1;
                if early.record(Instant::now()) {
                    tracing::error!(
                        worker = index,
                        failures = failures_in_a_row,
                        window = ?policy.crash_window,
                        "worker cannot start or dies before serving; marking it failed and retrying slowly"
                    );
                    worker.update(|s| {
                        s.state = WorkerState::Failed;
                        s.respawning = false;
                    });
                    policy.failed_retry
                } else {
                    early_death_backoff(failures_in_a_row)
                }
            }
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
        s.respawning = false;
    });
    // Nothing will come back for requests still waiting.
    inner.unpark();
}

/// Runs one started worker until it dies, hangs, is restarted or the pool shuts down; judges
/// and moves its requests, and makes sure the process is gone.
async fn run_round(inner: &Arc<Inner>, index: usize, started: Started) -> Round {
    let Started {
        mut child,
        stream,
        info,
        stderr,
    } = started;
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
        s.respawning = false;
    });
    let ready_at = Instant::now();
    inner.first_ready.get_or_init(std::time::Instant::now);
    tracing::info!(worker = index, pid, cpus = %worker.plan().cpus, "worker ready");
    inner.unpark();
    let watch = Watch {
        metrics: &inner.metrics,
        vitals: &worker.vitals,
        ping_interval: inner.policy.ping_interval(),
    };
    let connection = connection::run(stream, rx, watch);
    tokio::pin!(connection);
    let mut shutdown = inner.shutdown.subscribe();
    let mut stopped_from_outside = false;
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
            stopped_from_outside = is_stopped(pid);
            tracing::error!(worker = index, pid, timeout = ?inner.policy.hang_timeout, stopped_from_outside, "worker is hung: no progress; killing it");
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
    let served =
        ready_at.elapsed() >= SERVED_AFTER || worker.vitals.stats().is_some_and(|s| s.steps > 0);
    let dying = matches!(end, RoundEnd::Died | RoundEnd::Hung);
    worker.update(|s| {
        s.commands = None;
        if s.state == WorkerState::Ready {
            s.state = WorkerState::Restarting;
        }
        // Requests wait for a worker that reached ready and died (until it fails to start
        // again), not for one an operator stops.
        s.respawning = dying;
    });
    // Its exit status says who is to blame; it is known as soon as the connection broke.
    let (status, lingered) = stop_child(&mut child).await;
    // Its last words are what it wrote before it died: wait for the relay to read them all.
    if let Some(stderr) = stderr {
        let _ = tokio::time::timeout(Duration::from_millis(500), stderr).await;
    }
    let cause = match end {
        RoundEnd::Died if lingered => Some(DeathCause::Inside(
            "closed its connection and did not exit".into(),
        )),
        RoundEnd::Died => Some(DeathCause::classify(status, false)),
        // A process stopped by a signal (SIGSTOP, a debugger) hangs through no request.
        RoundEnd::Hung if stopped_from_outside => Some(DeathCause::Outside(
            "stopped by a signal and killed as hung".into(),
        )),
        RoundEnd::Hung => Some(DeathCause::classify(status, true)),
        RoundEnd::Restart | RoundEnd::Shutdown => None,
    };
    // Requests of a restart or a shutdown blame nobody.
    let judged = cause
        .clone()
        .unwrap_or_else(|| DeathCause::Outside("stopped by the router".into()));
    inner.requeue(index, orphans, &judged);
    let status_text = status.map_or_else(|| "unknown".to_string(), |s| s.to_string());
    worker.update(|s| {
        s.pid = None;
        if end == RoundEnd::Died {
            s.last_error = Some(format!("the worker exited ({status_text})"));
        }
    });
    if let Some(cause) = &cause {
        tracing::warn!(worker = index, status = %status_text, cause = cause.description(), served, "worker went away; restarting it");
    }
    Round { end, served, cause }
}

/// Whether process `pid` is stopped (`T`) or traced (`t`), as `/proc/PID/stat` says.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "T" || state == "t")
    })
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
/// ignore SIGTERM, so SIGKILL it is). Returns its exit status and whether it lingered.
async fn stop_child(child: &mut Child) -> (Option<ExitStatus>, bool) {
    if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        return (Some(status), false);
    }
    let _ = child.kill().await;
    (child.wait().await.ok(), true)
}

/// Longest line of a worker's output kept; the rest of the line is dropped.
const MAX_LINE_BYTES: usize = 2048;
/// Lines of a worker's stderr logged per second at most; the others are counted and dropped.
const MAX_STDERR_LINES_PER_SEC: u32 = 50;

/// Reads one line of at most [`MAX_LINE_BYTES`] (the rest of a longer line is skipped);
/// `None` at the end of the stream.
async fn read_capped_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> Option<bool> {
    line.clear();
    let mut truncated = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) => {
                return (!line.is_empty() || truncated).then_some(truncated);
            }
            Ok(buf) => buf,
            Err(_) => return None,
        };
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        let kept = take.min(room);
        line.extend_from_slice(&buf[..kept]);
        truncated |= kept < take && !(done && kept + 1 == take);
        reader.consume(take);
        if done {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            return Some(truncated);
        }
    }
}

/// `bytes` as one printable line: invalid UTF-8 replaced, control characters (escape
/// sequences, carriage returns, NULs) written as `\u{..}` escapes.
pub fn escape_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// The worker's own log lines (its stdout under the router): written to the router's stderr
/// as they are when they have the router's format (JSON: one JSON object), else logged as
/// foreign lines.
async fn relay_worker_log<R: AsyncRead + Unpin>(index: usize, out: R) {
    // The router's own format, which the workers inherit through this variable.
    let json = std::env::var(llamapool_common::settings::LOG_FORMAT_ENV).is_ok_and(|f| f == "json");
    let mut reader = BufReader::new(out);
    let mut line = Vec::new();
    while let Some(truncated) = read_capped_line(&mut reader, &mut line).await {
        let trusted = !truncated
            && (!json
                || serde_json::from_slice::<serde_json::Value>(&line).is_ok_and(|v| v.is_object()));
        if trusted && !line.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
            line.push(b'\n');
            let _ = std::io::stderr().lock().write_all(&line);
        } else {
            let text = escape_line(&line);
            tracing::warn!(worker = index, line = %text, truncated, "worker log line");
        }
    }
}

/// What native code printed on the worker's stderr: each line capped, escaped and logged
/// through the router's logger (at most [`MAX_STDERR_LINES_PER_SEC`] a second), and kept as
/// the worker's last words.
async fn relay_worker_stderr<R: AsyncRead + Unpin>(inner: Arc<Inner>, index: usize, err: R) {
    let mut reader = BufReader::new(err);
    let mut line = Vec::new();
    let mut second = Instant::now();
    let (mut logged, mut dropped) = (0u32, 0u64);
    while let Some(truncated) = read_capped_line(&mut reader, &mut line).await {
        let text = escape_line(&line);
        if second.elapsed() >= Duration::from_secs(1) {
            if dropped > 0 {
                tracing::warn!(
                    worker = index,
                    dropped,
                    "worker stderr lines dropped (too many)"
                );
            }
            second = Instant::now();
            logged = 0;
            dropped = 0;
        }
        if logged < MAX_STDERR_LINES_PER_SEC {
            logged += 1;
            tracing::warn!(worker = index, line = %text, truncated, "worker stderr");
        } else {
            dropped += 1;
        }
        let mut kept = text;
        if kept.len() > 256 {
            let mut cut = 256;
            while !kept.is_char_boundary(cut) {
                cut -= 1;
            }
            kept.truncate(cut);
            kept.push('…');
        }
        if !kept.trim().is_empty() {
            inner.workers[index].remember_stderr(kept);
        }
    }
    if dropped > 0 {
        tracing::warn!(
            worker = index,
            dropped,
            "worker stderr lines dropped (too many)"
        );
    }
}

/// A worker process that said `Ready`.
struct Started {
    child: Child,
    stream: interprocess::local_socket::tokio::Stream,
    info: WorkerInfo,
    /// The task relaying its stderr; it ends when the process is gone.
    stderr: Option<tokio::task::JoinHandle<()>>,
}

async fn start_worker(inner: &Arc<Inner>, index: usize) -> Result<Started, String> {
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
        .env(llamapool_common::logging::LOG_TO_STDOUT_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", launch.worker_binary.display()))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay_worker_log(index, out));
    }
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(relay_worker_stderr(inner.clone(), index, err)));
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
    Ok(Started {
        child,
        stream,
        info,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_lines_are_escaped_and_capped() {
        assert_eq!(escape_line(b"a\x1b[31mb\rc\td"), "a\\u{1b}[31mb\\u{d}c\td");
        assert_eq!(escape_line(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
        let mut input: Vec<u8> = vec![b'x'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\nshort\nlast");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let lines = rt.block_on(async {
            let mut reader = BufReader::new(&input[..]);
            let mut line = Vec::new();
            let mut lines = Vec::new();
            while let Some(truncated) = read_capped_line(&mut reader, &mut line).await {
                lines.push((line.len(), truncated));
            }
            lines
        });
        assert_eq!(lines, [(MAX_LINE_BYTES, true), (5, false), (4, false)]);
    }

    #[test]
    fn a_running_process_is_not_stopped() {
        assert!(!is_stopped(std::process::id()));
        assert!(!is_stopped(u32::MAX));
    }
}
