//! Operating the server: the router's exit statuses, configuration from the environment,
//! `scripts/serve` (stops on usage and configuration errors, restarts a crashed router, stops
//! on SIGTERM), and the chaos run of `llamapool-bench` in miniature.
//!
//! `scripts/serve` runs here with `LLAMAPOOL_SKIP_SETUP=1` (no setup, no cargo build inside a
//! test) and `LLAMAPOOL_BIN_DIR` pointing at the binaries under test.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llamapool_testkit::{Proc, TempDir};
use llamapool_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The router's statuses (`EXIT_USAGE`, `EXIT_CONFIG` in router/src/main.rs).
const EXIT_USAGE: i32 = 2;
const EXIT_CONFIG: i32 = 78;

/// How long a run that must stop at once may take (no restart loop: the first restart alone
/// would wait 1 s, and the loop runs forever).
const PROMPT: Duration = Duration::from_secs(5);

/// One SmolLM2 worker on CPU 0: enough to listen, cheap to restart.
fn one_worker(listen: &str) -> String {
    smol_config("", (2, 1024), PINNED_0).replace("127.0.0.1:0", listen)
}

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn router_command() -> Command {
    let mut c = Command::new(bin_dir().join("llamapool-router"));
    c.env("RUST_LOG", "warn");
    c
}

fn serve_command() -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/serve");
    let mut c = Command::new(script);
    c.env("LLAMAPOOL_SKIP_SETUP", "1")
        .env("LLAMAPOOL_BIN_DIR", bin_dir())
        .env("RUST_LOG", "warn");
    c
}

/// Runs `command` to its end, failing if that takes longer than `limit`; returns the status,
/// stderr, and how long it took.
fn run_to_end(mut command: Command, limit: Duration) -> (ExitStatus, String, Duration) {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut proc = Proc::new(child);
    let status = loop {
        if let Some(status) = proc.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < limit,
            "{command:?} still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap(), start.elapsed())
}

/// Asserts that `command` exits with `code` within [`PROMPT`]; returns its stderr.
fn exits_with(command: Command, code: i32) -> String {
    let shown = format!("{command:?}");
    let (status, stderr, took) = run_to_end(command, PROMPT);
    assert_eq!(status.code(), Some(code), "{shown}: {status}\n{stderr}");
    assert!(took < PROMPT, "{shown} took {took:?}");
    stderr
}

#[test]
fn router_exit_statuses_name_the_kind_of_error() {
    let dir = scratch_dir("ops").unwrap();
    let good = write(&dir, "good.toml", &one_worker("127.0.0.1:0"));
    let bad_key = write(&dir, "bad.toml", "[server]\nlisten_typo = 1\n");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();

    let mut c = router_command();
    c.arg("--config").arg(&bad_key);
    assert!(exits_with(c, EXIT_CONFIG).contains("listen_typo"));
    let mut c = router_command();
    c.arg("--config").arg(dir.path().join("none.toml"));
    assert!(exits_with(c, EXIT_CONFIG).contains("none.toml"));
    let mut c = router_command();
    c.arg("--config")
        .arg(&good)
        .args(["--model", "/nonexistent/model.gguf"]);
    assert!(exits_with(c, EXIT_CONFIG).contains("model.path"));
    let mut c = router_command();
    c.arg("--config").arg(&good).args(["--listen", &taken]);
    assert!(exits_with(c, EXIT_CONFIG).contains("server.listen"));
    let mut c = router_command();
    c.arg("--config")
        .arg(&good)
        .env("LLAMAPOOL__SERVER__NOPE", "1");
    exits_with(c, EXIT_CONFIG);

    let mut c = router_command();
    c.arg("--config")
        .arg(&good)
        .args(["--set", "no-equals-sign"]);
    assert!(exits_with(c, EXIT_USAGE).contains("KEY=VALUE"));
    let mut c = router_command();
    c.arg("--no-such-flag");
    exits_with(c, EXIT_USAGE);
    let mut c = router_command();
    c.arg("--config").arg(&good).arg("--check");
    exits_with(c, 0);
}

#[test]
fn set_and_environment_override_the_file_and_keys_stay_strings() {
    // The file's address is taken; `--set` replaces it. The key is a string of digits.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = one_worker(&taken.local_addr().unwrap().to_string());
    let mut command = router_command();
    command
        .args(["--set", "server.listen=127.0.0.1:0"])
        .env("LLAMAPOOL__SERVER__API_KEY", "000123");
    let mut router = Router::launch_with(command, &config).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), Some("Bearer 000123"))
        .unwrap_or_else(|e| panic!("{e}"));
    let with = |key: &str| {
        http::request(
            &router.addr,
            "GET",
            "/v1/models",
            &[("Authorization", key)],
            b"",
        )
        .unwrap()
        .status
    };
    assert_eq!(with("Bearer 000123"), 200);
    assert_eq!(with("Bearer 123"), 401);
}

#[test]
fn serve_stops_on_usage_and_configuration_errors() {
    let dir = scratch_dir("ops").unwrap();
    let bad_key = write(&dir, "bad.toml", "[server]\nlisten_typo = 1\n");
    let no_model = write(
        &dir,
        "no-model.toml",
        &one_worker("127.0.0.1:0").replace("SmolLM2-135M-Instruct.Q4_1.gguf", "/nonexistent.gguf"),
    );
    let good = write(&dir, "good.toml", &one_worker("127.0.0.1:0"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();

    let mut c = serve_command();
    c.arg("--config").arg(&bad_key);
    let stderr = exits_with(c, EXIT_CONFIG);
    assert!(stderr.contains("listen_typo"), "{stderr}");
    assert!(!stderr.contains("restarting in"), "{stderr}");
    let mut c = serve_command();
    c.arg(&no_model);
    assert!(exits_with(c, EXIT_CONFIG).contains("model.path"));
    let mut c = serve_command();
    c.arg(format!("--config={}", good.display()))
        .args(["--listen", &taken]);
    assert!(exits_with(c, EXIT_CONFIG).contains("server.listen"));
    let mut c = serve_command();
    c.arg(&good).arg("--no-such-flag");
    exits_with(c, EXIT_USAGE);
    let mut c = serve_command();
    c.arg("--config").arg(&good).arg("--check");
    exits_with(c, 0);
}

/// The pids of `parent`'s children named `name` (as `/proc/PID/stat` has it, at most 15
/// characters).
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if comm == name && ppid == Some(&parent.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to `limit` for the router under `serve` (a child other than `not`).
fn router_under(serve: u32, not: Option<u32>, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(&pid) = children_named(serve, "llamapool-route")
            .iter()
            .find(|&&p| Some(p) != not)
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no router under scripts/serve");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_restarts_a_crashed_router_and_stops_on_sigterm() {
    let dir = scratch_dir("ops").unwrap();
    let good = write(&dir, "good.toml", &one_worker("127.0.0.1:9"));
    let mut c = serve_command();
    // The positional form, with a router flag after it.
    c.arg(&good)
        .args(["--set", "server.listen=127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("scripts/serve starts");
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut serve = Proc::new(child);
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    // The address of the next `llamapool listening on http://ADDR (...)` line.
    let listening = |what: &str| {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: no line from the router ({e})"));
        line.strip_prefix("llamapool listening on http://")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{what}: {line}"))
            .to_string()
    };
    listening("first start");
    let first = router_under(serve.pid(), None, Duration::from_secs(10));
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let addr = listening("after the crash");
    let second = router_under(serve.pid(), Some(first), Duration::from_secs(10));
    assert_ne!(first, second);
    // Serving again, then stopped as a user would stop it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http::request(&addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
        assert!(
            Instant::now() < deadline,
            "the restarted router never became healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    assert!(
        serve.terminate(Duration::from_secs(60)),
        "scripts/serve stops on SIGTERM"
    );
    let status = serve.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{status} after {:?}\n{stderr}",
        start.elapsed()
    );
    assert!(stderr.contains("status 137; restarting in 1s"), "{stderr}");
    assert!(!process_alive(second), "the router stopped with the script");
}

#[test]
fn chaos_smoke_run_loses_nothing() {
    let model = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(bin_dir().join("llamapool-bench"))
        .arg("--chaos")
        .arg("--model")
        .arg(&model)
        .args([
            "--duration-secs",
            "6",
            "--kill-every-secs",
            "2.5",
            "--concurrency",
            "4",
            "--max-tokens",
            "16",
            "--clients",
            "32",
            "--load-max-tokens",
            "8",
            "--max-queued",
            "8",
            "--json",
        ])
        .env("RUST_LOG", "error")
        .output()
        .expect("llamapool-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let n = |v: &Value, key: &str| {
        v[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {v}"))
    };
    let k = &report["kill"];
    assert_eq!(n(k, "lost"), 0, "{report:#}\n{stderr}");
    assert_eq!(
        n(k, "sent"),
        n(k, "completed") + n(k, "failed_cleanly") + n(k, "lost"),
        "{k}"
    );
    assert!(n(k, "completed") >= 1, "{k}");
    assert!(n(k, "kills") + n(k, "kills_skipped") >= 1, "{k}");
    assert!(k["lost_reasons"].is_object() && k["failed_statuses"].is_object());
    let l = &report["load"];
    assert_eq!(n(l, "bad"), 0, "{report:#}\n{stderr}");
    assert_eq!(
        n(l, "sent"),
        n(l, "ok") + n(l, "rejected_429") + n(l, "bad"),
        "{l}"
    );
    assert!(n(l, "ok") >= 1, "{l}");
    for key in ["rss_before_kib", "rss_after_kib", "rss_peak_kib"] {
        assert!(n(l, key) > 0, "{key} in {l}");
    }
    assert_eq!(report["held"], true);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
}
