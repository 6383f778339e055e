//! Processes the bench starts: workers, routers, and the busy loop for `--interference`.
//! Each is stopped when its guard is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_bench::http;

/// A sibling executable of this one (`target/release/<name>`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace (cargo build --release --workspace)",
            path.display()
        );
    }
    Ok(path)
}

/// A private scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "llamapool-bench-{tag}-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A child that gets SIGTERM, then SIGKILL, when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a worker process listening on `socket` and waits for the socket.
pub fn start_worker(socket: &Path, extra: &[String]) -> Result<Proc> {
    let child = Command::new(sibling("llamapool-worker")?)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting llamapool-worker")?;
    let mut proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !socket.exists() {
        if let Ok(Some(status)) = proc.0.try_wait() {
            bail!("the worker exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("the worker did not bind its socket in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// A running router and its HTTP address.
pub struct Router {
    pub addr: String,
    _proc: Proc,
    _scratch: Scratch,
}

/// Starts the router with `config` (TOML) and waits until every worker is ready.
pub fn start_router(config: &str) -> Result<Router> {
    let scratch = Scratch::new("router")?;
    let path = scratch.0.join("config.toml");
    std::fs::write(&path, config)?;
    let mut child = Command::new(sibling("llamapool-router")?)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting llamapool-router")?;
    let stdout = child.stdout.take().context("router stdout")?;
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("the router printed {line:?} instead of its address"))?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = http::request(&addr, "GET", "/workers", &[], b"") {
            if r.status == 200 {
                let v = r.json();
                let workers = v["workers"].as_array().cloned().unwrap_or_default();
                if !workers.is_empty() && workers.iter().all(|w| w["state"] == "ready") {
                    break;
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the router's workers did not become ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Router {
        addr,
        _proc: proc,
        _scratch: scratch,
    })
}

/// The competing process of `--interference`: this binary with `--busy-loop`, unpinned.
pub struct BusyLoop(#[allow(dead_code)] Proc);

impl BusyLoop {
    pub fn start() -> Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .arg("--busy-loop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the busy loop")?;
        Ok(Self(Proc(child)))
    }
}

pub fn spin_forever() -> ! {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
