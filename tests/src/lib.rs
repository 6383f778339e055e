//! The end-to-end harness: starts the real `llamapool-router` (which starts real workers with
//! the real SmolLM2 model) through `llamapool-testkit` and talks to it over real sockets with the
//! kit's minimal HTTP/1.1 client (so tests control exactly when a connection goes away). What
//! is here is only what the tests share beyond the kit: the SmolLM2 config builder and the
//! standard two-worker config, panicking constructors, and `/proc` probes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::sync::LazyLock;
use std::time::Duration;

pub use llamapool_common::settings::models_dir;
pub use llamapool_testkit::{bin_dir, http, scratch_dir, HttpResponse, Router, SseReader, TempDir};
use serde_json::{json, Value};

/// A config serving SmolLM2 as `smol` on a free port (`listen = "127.0.0.1:0"`): `server`
/// holds more `[server]` lines, `(slots, context)` are the `[worker_defaults]`, and each entry
/// of `workers` is the lines of one `[[workers]]` table (see [`PINNED_0`], [`PINNED_0_1`]).
pub fn smol_config(server: &str, (slots, context): (u32, u32), workers: &[&str]) -> String {
    let mut config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
alias = "smol"
[worker_defaults]
slots = {slots}
context = {context}
"#
    );
    for worker in workers {
        config.push_str(&format!("[[workers]]\n{worker}\n"));
    }
    config
}

/// The default configuration (one adaptive worker per core, every default setting) serving
/// SmolLM2 as `smol` on a free port.
pub const DEFAULT_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
alias = "smol"
"#;

/// One worker, pinned to CPU 0 (for [`smol_config`]).
pub const PINNED_0: &[&str] = &[r#"cpus = "0""#];

/// Two workers, pinned to CPUs 0 and 1 (for [`smol_config`]).
pub const PINNED_0_1: &[&str] = &[r#"cpus = "0""#, r#"cpus = "1""#];

/// Two SmolLM2 workers pinned to CPUs 0 and 1, 4 slots of 1024 tokens each.
pub static TWO_WORKERS: LazyLock<String> = LazyLock::new(|| {
    smol_config(
        "keepalive_secs = 1\nmax_body_bytes = 65536",
        (4, 4096),
        PINNED_0_1,
    )
});

/// A greedy one-message `/v1/chat/completions` body for `smol`.
pub fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "smol",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// A running router ([`Router`]: `addr`, `get`, `post`, `stream`, `workers`, `terminate`, ...);
/// stopped (SIGINT, then SIGTERM, then SIGKILL) on drop. Start-up failures panic.
pub struct Server(Router);

impl Server {
    /// Starts the router with `config` and waits until every worker is ready. Readiness is
    /// polled with the configured `api_key`, if any (tests send their own).
    pub fn start(config: &str) -> Self {
        let mut server = Self::launch(config);
        let key = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("api_key = "))
            .map(|v| format!("Bearer {}", v.trim_matches('"')));
        server
            .0
            .wait_ready(Duration::from_secs(120), key.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        server
    }

    /// Starts the router with `config` and returns once it listens (workers may not be ready).
    pub fn launch(config: &str) -> Self {
        Self(Router::launch(config).unwrap_or_else(|e| panic!("{e}")))
    }
}

impl Deref for Server {
    type Target = Router;
    fn deref(&self) -> &Router {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Router {
        &mut self.0
    }
}

/// Every thread's allowed-CPU list of a process, from /proc.
pub fn cpus_allowed_of_threads(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc task dir") {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            lists.push(
                line.trim_start_matches("Cpus_allowed_list:")
                    .trim()
                    .to_string(),
            );
        }
    }
    lists
}

/// True while a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Runs a Python script that drives `server` with the unmodified `openai` client: the script
/// gets the server's base URL as `sys.argv[1]` and must print `ok` last.
pub fn run_openai_client(server: &Router, script: &str) {
    run_python_client(server, "openai", script);
}

/// Runs a Python script that drives `server` with the unmodified client `package` (`openai`,
/// `anthropic`: scripts/test installs both): the script gets the server's base URL as
/// `sys.argv[1]` and must print `ok` last.
pub fn run_python_client(server: &Router, package: &str, script: &str) {
    let out = std::process::Command::new("python3")
        .args(["-c", script, &format!("http://{}", server.addr)])
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(&format!("No module named '{package}'")),
        "the {package} package is missing: scripts/test installs it (python3 -m pip install {package})"
    );
    assert!(out.status.success(), "{package} client failed:\n{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// Sends `body` on a raw connection with `headers` and returns the status line's code and
/// the whole answer.
pub fn raw_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_answer(s)
}

/// Reads the whole answer of a raw connection: the status line's code (0 without one) and
/// the text.
fn read_answer(mut s: TcpStream) -> (u16, String) {
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// Sends only the head of a POST announcing `length` bytes of JSON, and returns the status
/// line's code and the whole answer.
pub fn announced_only(addr: &str, path: &str, length: usize) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    read_answer(s)
}

/// The hostile bodies every JSON route must refuse clearly, sent to `path` on raw
/// connections: 1 KiB of `{` (400 in the error shape), `deep` (JSON nested past serde's limit:
/// 400), a body announced at 5 MiB, over `server.max_body_bytes` (413 on its Content-Length,
/// before a byte of it is read), and, given the router's `server.body_read_timeout_secs`, a
/// body that never arrives whole (408, the connection closed, within that time and a margin).
pub fn refuses_hostile_bodies(addr: &str, path: &str, deep: &str, body_timeout: Option<Duration>) {
    let json_type = [("Content-Type", "application/json")];
    let (status, answer) = raw_post(addr, path, &json_type, &[b'{'; 1024]);
    assert_eq!(status, 400, "{path} garbage: {answer}");
    assert!(answer.contains("\"error\""), "{path}: {answer}");
    let (status, answer) = raw_post(addr, path, &json_type, deep.as_bytes());
    assert_eq!(status, 400, "{path} nesting: {answer}");
    let (status, answer) = announced_only(addr, path, 5 * 1024 * 1024);
    assert_eq!(status, 413, "{path} over the limit: {answer}");
    let Some(timeout) = body_timeout else {
        return;
    };
    let start = std::time::Instant::now();
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    trickle.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = trickle.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{path} trickled: {answer}"
    );
    assert!(
        start.elapsed() < timeout + Duration::from_secs(8),
        "{path}: {:?}",
        start.elapsed()
    );
}
