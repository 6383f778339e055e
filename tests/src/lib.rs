//! The end-to-end harness: starts the real `llamapool-router` (which starts real workers with
//! the real SmolLM2 model) on a free port, and talks to it over real sockets with a minimal
//! HTTP/1.1 client (so tests control exactly when a connection goes away).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use llamapool_bench::http::{self, HttpResponse, SseReader};
pub use llamapool_common::settings::models_dir;
use serde_json::Value;

/// `target/release` (or wherever the test binary's profile directory is).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// Two SmolLM2 workers pinned to CPUs 0 and 1, 4 slots of 1024 tokens each.
pub const TWO_WORKERS: &str = r#"
[server]
listen = "127.0.0.1:0"
keepalive_secs = 1
max_body_bytes = 65536
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
alias = "smol"
[worker_defaults]
slots = 4
context = 4096
[[workers]]
cpus = "0"
[[workers]]
cpus = "1"
"#;

/// A running router; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Server {
    /// Starts the router with `config` and waits until every worker is ready.
    pub fn start(config: &str) -> Self {
        let server = Self::launch(config);
        // Readiness is polled with the configured API key, if any (tests send their own).
        let key = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("api_key = "))
            .map(|v| format!("Bearer {}", v.trim_matches('"')));
        server.wait_all_ready(Duration::from_secs(120), key.as_deref());
        server
    }

    /// Starts the router with `config` and returns once it listens (workers may not be ready).
    pub fn launch(config: &str) -> Self {
        let router = bin_dir().join("llamapool-router");
        assert!(
            router.is_file(),
            "{} is missing: run `cargo build --release --workspace` first",
            router.display()
        );
        let dir = std::env::temp_dir().join(format!(
            "llamapool-e2e-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut child = Command::new(router)
            .arg("--config")
            .arg(&config_path)
            .env("LLAMAPOOL_MODELS", models_dir())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the router");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the router prints its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self {
            child,
            addr,
            _dir: TempDir(dir),
        }
    }

    pub fn wait_all_ready(&self, timeout: Duration, authorization: Option<&str>) {
        let deadline = Instant::now() + timeout;
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| ("Authorization", a))
            .into_iter()
            .collect();
        loop {
            if let Ok(r) = http::request(&self.addr, "GET", "/workers", &headers, b"") {
                if r.status == 200 {
                    let v = r.json();
                    let workers = v["workers"].as_array().expect("workers").clone();
                    if !workers.is_empty() && workers.iter().all(|w| w["state"] == "ready") {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "workers did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn workers(&self) -> Vec<Value> {
        self.get("/workers").json()["workers"]
            .as_array()
            .expect("workers")
            .clone()
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> HttpResponse {
        self.try_request(method, path, body).expect("HTTP request")
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<HttpResponse> {
        http::request(&self.addr, method, path, &[], body.unwrap_or(b""))
    }

    /// Opens a streaming request; the returned reader yields SSE `data:` payloads.
    pub fn stream(&self, path: &str, body: &Value) -> SseReader {
        let stream = http::send(&self.addr, "POST", path, &[], body.to_string().as_bytes())
            .expect("connect");
        SseReader::new(stream).expect("a response head")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for exit; returns whether it exited within the timeout.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.terminate(Duration::from_secs(20)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
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
