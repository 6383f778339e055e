//! The `llamapool-worker` binary as a process: it ignores SIGINT and SIGTERM (a group-wide
//! Ctrl-C or systemd stop must not kill it while its router drains), exits when its
//! connection closes, dies with its parent (SIGKILL as the parent-death signal), and exits at
//! once when `LLAMAPOOL_ROUTER_PID` names a router that is no longer its parent.

#[allow(dead_code)]
mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llamapool_common::codec;
use llamapool_common::protocol::{FromWorker, ToWorker, PROTOCOL_VERSION};
use llamapool_worker::cli::ROUTER_PID_ENV;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::smollm2_path;

const WORKER: &str = env!("CARGO_BIN_EXE_llamapool-worker");

/// A private directory for one test's socket, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("llamapool-wp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("worker.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGKILLs a process on drop (SIGTERM would be ignored), so a failing test leaves nothing.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

fn worker_args(socket: &Path) -> Vec<String> {
    vec![
        "--socket".into(),
        socket.display().to_string(),
        "--model".into(),
        smollm2_path().display().to_string(),
        "--slots=1".into(),
        "--context=512".into(),
        "--threads=1".into(),
    ]
}

/// True while a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

fn wait_for_socket(socket: &Path, mut exited: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket.exists() {
        assert!(!exited(), "the worker exited during start-up");
        assert!(
            Instant::now() < deadline,
            "the worker never bound its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_whose_router_is_already_gone_exits_before_loading_the_model() {
    let scratch = Scratch::new("orphan");
    // Runs a worker told that its router is `router_pid`; it must fail: returns its stderr.
    let failing_run = |router_pid: &str| {
        let out = Command::new(WORKER)
            .args(["--model", "/nonexistent/model.gguf", "--socket"])
            .arg(scratch.socket())
            .env(ROUTER_PID_ENV, router_pid)
            .stdin(Stdio::null())
            .output()
            .expect("run the worker");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // pid 1 is not this test: the "router" died and the worker was reparented.
    let stderr = failing_run("1");
    assert!(
        stderr.contains("the router (pid 1) is gone") && !stderr.contains("nonexistent"),
        "{stderr}"
    );
    // With the right parent the check passes and the model load is what fails.
    let stderr = failing_run(&std::process::id().to_string());
    assert!(
        !stderr.contains("is gone") && stderr.contains("nonexistent"),
        "{stderr}"
    );
}

#[test]
fn sigint_and_sigterm_are_ignored_and_a_closed_connection_ends_the_worker() {
    let scratch = Scratch::new("signals");
    let socket = scratch.socket();
    let mut child = Command::new(WORKER)
        .args(worker_args(&socket))
        .env(ROUTER_PID_ENV, std::process::id().to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the worker");
    let pid = i32::try_from(child.id()).unwrap();
    let _guard = KillOnDrop(pid);
    wait_for_socket(&socket, || child.try_wait().unwrap().is_some());
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGINT] {
        kill(Pid::from_raw(pid), signal).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "a signal stopped the worker"
    );

    // Still serving: it answers the handshake and a ping.
    let conn = UnixStream::connect(&socket).expect("connect");
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut buf = Vec::new();
    let send = |m: &ToWorker| codec::write_frame(&mut &conn, m).unwrap();
    send(&ToWorker::Hello {
        version: PROTOCOL_VERSION,
    });
    send(&ToWorker::Ping { nonce: 3 });
    let mut next = || codec::read_frame::<FromWorker>(&mut reader, &mut buf).unwrap();
    assert!(matches!(next(), Some(FromWorker::Ready(info)) if info.pid == child.id()));
    assert_eq!(next(), Some(FromWorker::Pong { nonce: 3 }));

    // Closing the connection is how the router stops it.
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20)).expect("exits on EOF");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed");
}

#[test]
fn the_worker_dies_with_its_parent_even_one_killed_with_sigkill() {
    let scratch = Scratch::new("pdeathsig");
    let socket = scratch.socket();
    // A stand-in router: a shell that starts the worker (naming itself as the router) and
    // prints its pid.
    let mut parent = Command::new("sh")
        .arg("-c")
        .arg(format!("{ROUTER_PID_ENV}=$$ \"$0\" \"$@\" & echo $!; wait"))
        .arg(WORKER)
        .args(worker_args(&socket))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the shell");
    let _parent_guard = KillOnDrop(i32::try_from(parent.id()).unwrap());
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the worker's pid");
    let pid: i32 = line.trim().parse().expect("a pid");
    let _guard = KillOnDrop(pid);
    wait_for_socket(&socket, || !alive(pid));
    assert!(alive(pid));

    parent.kill().expect("SIGKILL the parent");
    parent.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the worker {pid} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
