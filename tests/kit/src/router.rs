//! [`Router`]: a `llamapool-router` process started with a configuration written to a private
//! [`TempDir`], its HTTP address (read from the first stdout line, `llamapool listening on
//! http://ADDR (N workers starting)`), readiness polling on `GET /workers`, and small HTTP
//! helpers for tests. The process is stopped (SIGINT, which skips the drain notice period a
//! SIGTERM gives gateways; then SIGKILL) and the directory removed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::http::{self, HttpResponse, SseReader};
use crate::{binary, scratch_dir, Error, Proc};

/// A running router; see the module doc.
#[derive(Debug)]
pub struct Router {
    /// `HOST:PORT` it listens on.
    pub addr: String,
    // Declared before the directory: the router stops before its configuration is removed.
    proc: Proc,
    _config_dir: TempDir,
}

impl Router {
    /// Starts the release `llamapool-router` with `config` (TOML) and returns once it listens;
    /// its workers may still be starting (see [`Router::wait_ready`]).
    pub fn launch(config: &str) -> Result<Self, Error> {
        Self::launch_with(Command::new(binary("llamapool-router")?), config)
    }

    /// [`Router::launch`] with another command, which gets `--config FILE` appended, and
    /// `RUST_LOG=warn` unless it sets `RUST_LOG` itself.
    pub fn launch_with(command: Command, config: &str) -> Result<Self, Error> {
        Self::launch_with_stderr(command, config, Stdio::inherit())
    }

    /// [`Router::launch_with`], the router's stderr (which its workers inherit) going to
    /// `stderr` (say, a file) instead of the caller's.
    pub fn launch_with_stderr(
        mut command: Command,
        config: &str,
        stderr: Stdio,
    ) -> Result<Self, Error> {
        let dir = scratch_dir("router").map_err(Error::io("creating the config directory"))?;
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).map_err(Error::io("writing the router config"))?;
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(Error::io("starting the router"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut proc = Proc::new(child);
        let mut line = String::new();
        let n = BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(Error::io("reading the router's address"))?;
        if n == 0 {
            let status = proc.wait().map_err(Error::io("waiting for the router"))?;
            return Err(Error::Exited {
                what: "the router",
                status,
            });
        }
        let addr = parse_address(&line)
            .ok_or_else(|| Error::NoAddress(line.clone()))?
            .to_string();
        Ok(Self {
            addr,
            proc,
            _config_dir: dir,
        })
    }

    /// Polls `GET /workers` (with `authorization` as the `Authorization` header, if given)
    /// until there is at least one worker and every one is `ready`. Fails early if the router
    /// exits.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        authorization: Option<&str>,
    ) -> Result<(), Error> {
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| ("Authorization", a))
            .into_iter()
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            let last = match http::request(&self.addr, "GET", "/workers", &headers, b"") {
                Ok(r)
                    if r.status == 200
                        && serde_json::from_slice(&r.body).is_ok_and(|v| all_ready(&v)) =>
                {
                    return Ok(());
                }
                Ok(r) => format!("HTTP {} {}", r.status, r.text()),
                Err(e) => e.to_string(),
            };
            if let Some(status) = self
                .proc
                .try_wait()
                .map_err(Error::io("polling the router"))?
            {
                return Err(Error::Exited {
                    what: "the router",
                    status,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady { timeout, last });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGINT (a stop without the drain notice period), then waits; returns whether it
    /// exited within `timeout`.
    pub fn interrupt(&mut self, timeout: Duration) -> bool {
        self.proc
            .signal_and_wait(nix::sys::signal::Signal::SIGINT, timeout)
    }

    /// SIGTERM, then waits; returns whether it exited within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.proc.terminate(timeout)
    }

    /// One request without extra headers.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<HttpResponse> {
        http::request(&self.addr, method, path, &[], body.unwrap_or(b""))
    }

    /// [`Router::try_request`]; panics on a transport error (for tests).
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> HttpResponse {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// Opens a streaming POST; the reader yields SSE `data:` payloads. Panics if the
    /// connection or the response head fails.
    pub fn stream(&self, path: &str, body: &Value) -> SseReader {
        let stream =
            http::post_json(&self.addr, path, body).unwrap_or_else(|e| panic!("POST {path}: {e}"));
        SseReader::new(stream).unwrap_or_else(|e| panic!("POST {path}: no response head: {e}"))
    }

    /// The `workers` array of `GET /workers`; panics if there is none.
    pub fn workers(&self) -> Vec<Value> {
        let r = self.get("/workers");
        match r.json()["workers"].as_array() {
            Some(workers) => workers.clone(),
            None => panic!("GET /workers: HTTP {} {}", r.status, r.text()),
        }
    }
}

/// `ADDR` of the router's first line, `llamapool listening on http://ADDR (...)`.
fn parse_address(line: &str) -> Option<&str> {
    line.split("http://").nth(1)?.split_whitespace().next()
}

/// A `/workers` body with at least one worker, all `ready`.
fn all_ready(workers: &Value) -> bool {
    workers["workers"]
        .as_array()
        .is_some_and(|w| !w.is_empty() && w.iter().all(|w| w["state"] == "ready"))
}

impl Drop for Router {
    fn drop(&mut self) {
        // SIGINT, then SIGKILL for a router that did not stop (`Proc`'s own drop then finds
        // it gone).
        if !self.interrupt(crate::proc::DROP_GRACE) {
            self.proc
                .signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn the_address_comes_from_the_first_line() {
        assert_eq!(
            parse_address("llamapool listening on http://127.0.0.1:41234 (2 workers starting)\n"),
            Some("127.0.0.1:41234")
        );
        assert_eq!(parse_address("something else\n"), None);
    }

    #[test]
    fn ready_means_at_least_one_worker_and_all_ready() {
        let body = |states: &[&str]| serde_json::json!({"workers": states.iter().map(|s| serde_json::json!({"state": s})).collect::<Vec<_>>()});
        assert!(all_ready(&body(&["ready", "ready"])));
        assert!(!all_ready(&body(&["ready", "starting"])));
        assert!(!all_ready(&body(&[])));
        assert!(!all_ready(&serde_json::json!({"error": {}})));
    }

    /// Serves `/workers`: 401 without `Bearer k`, then `starting` twice, then `ready`.
    fn fake_workers_endpoint() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut polls = 0;
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                let (status, body) =
                    if !String::from_utf8_lossy(&head).contains("Authorization: Bearer k") {
                        (401, r#"{"error":{}}"#)
                    } else {
                        polls += 1;
                        if polls < 3 {
                            (200, r#"{"workers":[{"state":"starting"}]}"#)
                        } else {
                            (200, r#"{"workers":[{"state":"ready"}]}"#)
                        }
                    };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    /// A stand-in router: prints the address line, checks its `--config` file, then `rest`.
    fn fake_router(addr: &str, rest: &str) -> Command {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!(
                "echo 'llamapool listening on http://{addr} (1 workers starting)'; \
                 [ \"$1\" = --config ] && grep -q alias \"$2\" || exit 9; {rest}"
            ),
            "fake-router",
        ]);
        command
    }

    #[test]
    fn launch_waits_for_ready_workers_and_terminates() {
        let addr = fake_workers_endpoint();
        let mut router =
            Router::launch_with(fake_router(&addr, "exec sleep 60"), "alias = \"x\"\n").unwrap();
        assert_eq!(router.addr, addr);
        let err = router
            .wait_ready(Duration::from_millis(300), None)
            .unwrap_err();
        assert!(matches!(err, Error::NotReady { .. }), "{err}");
        assert!(err.to_string().contains("HTTP 401"), "{err}");
        router
            .wait_ready(Duration::from_secs(10), Some("Bearer k"))
            .unwrap();
        assert!(router.terminate(Duration::from_secs(10)));
    }

    #[test]
    fn a_router_that_exits_is_reported() {
        let mut router =
            Router::launch_with(fake_router("127.0.0.1:1", "exit 3"), "alias = 1\n").unwrap();
        let err = router
            .wait_ready(Duration::from_secs(10), None)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Exited { status, .. } if status.code() == Some(3)),
            "{err}"
        );
        let mut silent = Command::new("sh");
        silent.args(["-c", "exit 4"]);
        let err = Router::launch_with(silent, "").unwrap_err();
        assert!(matches!(err, Error::Exited { .. }), "{err}");
    }
}
