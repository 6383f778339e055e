//! A llama-server child process for the side-by-side benchmarks (`--vs-llama-server`,
//! `--multi-turn`): started on a free port with its shared libraries found next to it, its
//! logs kept in a private directory (their tail explains a failed start), stopped when dropped.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_testkit::{http, scratch_dir, Proc, TempDir};

/// How long llama-server may take to load the model and answer `GET /health`.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How to run it: `-t threads -np slots -c (cells_per_slot × slots) -kvu`, and
/// `OMP_WAIT_POLICY=passive` when `passive` (else the variable is removed, so that an
/// inherited value cannot blur a comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub threads: u32,
    pub passive: bool,
    pub slots: usize,
    pub cells_per_slot: usize,
}

/// A llama-server child process, its logs in a private directory; stopped (SIGTERM, then
/// SIGKILL, and waited for) when dropped.
pub struct LlamaServer {
    /// `127.0.0.1:PORT` it listens on.
    pub addr: String,
    // Declared before the directory: the process stops before its log file is removed.
    proc: Proc,
    log: PathBuf,
    _dir: TempDir,
}

impl LlamaServer {
    /// Starts `binary` on `model` in `shape`, on a free port; returns once `GET /health`
    /// answers 200.
    pub fn start(binary: &Path, model: &Path, shape: Shape) -> Result<Self> {
        let Shape {
            threads,
            passive,
            slots,
            cells_per_slot,
        } = shape;
        let dir = scratch_dir("llama-server")?;
        let log = dir.path().join("llama-server.log");
        let log_file = std::fs::File::create(&log)?;
        let port = free_port()?;
        let mut command = Command::new(binary);
        command
            .arg("-m")
            .arg(model)
            .args(["-np", &slots.to_string()])
            .args(["-c", &(cells_per_slot * slots).to_string()])
            .arg("-kvu")
            .args(["-t", &threads.to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--no-webui")
            // Its shared libraries sit next to it.
            .env("LD_LIBRARY_PATH", library_path(binary))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // Set only for the passive row, so an inherited value cannot blur the other rows.
        if passive {
            command.env("OMP_WAIT_POLICY", "passive");
        } else {
            command.env_remove("OMP_WAIT_POLICY");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = Self {
            addr: format!("127.0.0.1:{port}"),
            proc: Proc::new(child),
            log,
            _dir: dir,
        };
        server.wait_healthy(START_TIMEOUT)?;
        Ok(server)
    }

    /// Polls `GET /health` until it answers 200 (503 while the model loads).
    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = http::request(&self.addr, "GET", "/health", &[], b"") {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Some(status) = self.proc.try_wait()? {
                bail!(
                    "llama-server exited during start-up ({status}): {}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "llama-server was not healthy within {timeout:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of its log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// A port that was free a moment ago (bound, read, released).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `LD_LIBRARY_PATH` with the binary's directory first.
fn library_path(binary: &Path) -> OsString {
    let dir = binary.parent().unwrap_or(Path::new("."));
    let mut value = OsString::from(dir);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        value.push(":");
        value.push(old);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_path_starts_with_the_binary_directory() {
        let path = library_path(Path::new("/opt/ls/llama-server"));
        assert!(path.to_string_lossy().starts_with("/opt/ls"));
    }
}
