//! Access control with the real binaries (SmolLM2, one pinned worker): CORS answered as
//! llama-server answers it (its `tests/unit/test_security.py`), several API keys from the three
//! settings in either header, and the worker refusing a connection that is not its router's.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llamapool_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

/// One small worker; `server` goes into `[server]`.
fn config(server: &str) -> String {
    smol_config(server, (2, 2048), PINNED_0)
}

fn call(server: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let body = if method == "POST" {
        json!({"model": "smol", "prompt": "Hello", "max_tokens": 2, "temperature": 0}).to_string()
    } else {
        String::new()
    };
    http::request(&server.addr, method, path, headers, body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Every value of `name` (lower case), comma-separated lists split.
fn values(r: &HttpResponse, name: &str) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect()
}

/// A preflight as a browser sends it before a cross-origin POST with an API key.
fn preflight(server: &Server, origin: &str) -> HttpResponse {
    call(
        server,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "Authorization"),
        ],
    )
}

#[test]
fn cors_allows_the_listed_origins_only() {
    let server = Server::start(&config(
        "api_key = \"sk-cors\"\ncors_origins = [\"https://web.mydomain.fr\", \"http://localhost:5173/\"]",
    ));
    let key = ("Authorization", "Bearer sk-cors");
    for origin in ["https://web.mydomain.fr", "http://localhost:5173"] {
        let r = preflight(&server, origin);
        assert_eq!(r.status, 200, "a preflight needs no key: {}", r.text());
        assert!(r.body.is_empty());
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(
            r.header("access-control-allow-methods"),
            Some("GET, POST, DELETE, OPTIONS")
        );
        assert_eq!(r.header("access-control-allow-headers"), Some("*"));
        assert!(values(&r, "vary").contains(&"origin".to_string()));

        let r = call(&server, "GET", "/v1/models", &[("Origin", origin), key]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        let r = call(
            &server,
            "POST",
            "/v1/completions",
            &[("Origin", origin), key],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        // A page can read why it was refused.
        let r = call(&server, "GET", "/v1/models", &[("Origin", origin)]);
        assert_eq!(r.status, 401);
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    }
    for origin in [
        "https://evil.example",
        "http://web.mydomain.fr",
        "http://localhost:5174",
    ] {
        let r = preflight(&server, origin);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), None, "{origin}");
        assert_eq!(r.header("access-control-allow-credentials"), None);
        let r = call(&server, "GET", "/v1/models", &[("Origin", origin), key]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), None, "{origin}");
    }
    let r = call(&server, "GET", "/health", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None, "no Origin");
}

/// A key file in the format of `server.api_key_file`.
const KEY_FILE: &str = "# keys of the operators\n\nsk-file-1\n  sk-file-2  \n#sk-commented\n";

#[test]
fn several_keys_each_work_in_either_header() {
    let dir = scratch_dir("keys").unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, KEY_FILE).unwrap();
    let server = Server::start(&config(&format!(
        "api_key = \"sk-main\"\napi_keys = [\"sk-two\", \"sk-three\"]\napi_key_file = {:?}",
        file.display().to_string()
    )));
    for key in ["sk-main", "sk-two", "sk-three", "sk-file-1", "sk-file-2"] {
        let bearer = format!("Bearer {key}");
        for header in [("Authorization", bearer.as_str()), ("X-Api-Key", key)] {
            let r = call(&server, "GET", "/v1/models", &[header]);
            assert_eq!(r.status, 200, "{header:?}: {}", r.text());
        }
    }
    let r = call(
        &server,
        "POST",
        "/v1/completions",
        &[("X-Api-Key", "sk-file-2")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for headers in [
        vec![],
        vec![("Authorization", "Bearer sk-wrong")],
        vec![("Authorization", "Bearer sk-commented")],
        vec![("Authorization", "sk-main")],
        vec![("X-Api-Key", "sk-mai")],
        vec![("X-Api-Key", "# keys of the operators")],
    ] {
        for (method, path) in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/metrics"),
            ("POST", "/admin/reload"),
            ("GET", "/no/such/route"),
        ] {
            let r = call(&server, method, path, &headers);
            assert_eq!(r.status, 401, "{method} {path} with {headers:?}");
            let error = &r.json()["error"];
            assert_eq!(error["type"], "authentication_error");
        }
    }
    let r = call(&server, "GET", "/no/such/route", &[("X-Api-Key", "sk-two")]);
    assert_eq!(r.status, 404, "with a key, routing answers");
    assert_eq!(call(&server, "GET", "/health", &[]).status, 200);
    // Preflights are open; without `server.cors_origins` every origin is echoed, as by
    // llama-server (whose test sends `Origin: localhost`).
    let r = preflight(&server, "localhost");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("localhost"));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, DELETE, OPTIONS")
    );
    assert_eq!(r.header("access-control-allow-headers"), Some("*"));
}

#[test]
fn a_key_file_without_keys_or_an_empty_key_stops_the_router_at_start() {
    let dir = scratch_dir("keys").unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# nobody yet\n\n").unwrap();
    for server in [
        format!("api_key_file = {:?}", file.display().to_string()),
        format!(
            "api_key_file = {:?}",
            dir.path().join("missing").display().to_string()
        ),
        "api_keys = [\"\"]".to_string(),
    ] {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config(&server)).unwrap();
        let mut router = std::process::Command::new(bin_dir().join("llamapool-router"))
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = router.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = router.kill();
                panic!("{server}: the router started");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        router
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(78), "{server}: {stderr}");
        assert!(stderr.contains("server.api_key"), "{stderr}");
    }
}

/// Stand-in worker executable: waits for the test's go-ahead, stops its parent (the router)
/// so that the test can reach the worker's socket first, notes its pid, then becomes the real
/// worker (`exec` keeps the pid, so the worker's parent is still the router).
fn stopping_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("worker");
    let worker = bin_dir().join("llamapool-worker");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             while [ ! -e {d}/go ]; do sleep 0.02; done\n\
             if [ ! -e {d}/worker.pid ]; then\n\
             kill -STOP $PPID\n\
             echo $$ > {d}/worker.pid.tmp && mv {d}/worker.pid.tmp {d}/worker.pid\n\
             fi\n\
             exec {} \"$@\"\n",
            worker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Sends SIGCONT to the router when dropped, so that a failing assertion never leaves it
/// stopped.
struct Continue(i32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_worker_refuses_a_connection_that_is_not_the_router() {
    let dir = scratch_dir("peer").unwrap();
    let wrapper = stopping_wrapper(dir.path());
    let mut server = Server::launch(&config(&format!(
        "worker_binary = {:?}",
        wrapper.display().to_string()
    )));
    let router = i32::try_from(server.pid()).unwrap();
    std::fs::write(dir.path().join("go"), "").unwrap();
    let worker: u32 = wait_for("the worker's pid", Duration::from_secs(30), || {
        std::fs::read_to_string(dir.path().join("worker.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let resume = Continue(router);
    let stat = std::fs::read_to_string(format!("/proc/{router}/stat")).unwrap();
    let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
    assert_eq!(state, Some("T"), "the router is stopped: {stat}");
    // The socket's path from the worker's command line (once the wrapper has exec'd it).
    let socket: PathBuf = wait_for("the worker's command line", Duration::from_secs(30), || {
        let cmdline = std::fs::read(format!("/proc/{worker}/cmdline")).ok()?;
        cmdline
            .split(|&b| b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .find_map(|a| a.strip_prefix("--socket="))
            .map(PathBuf::from)
    });
    wait_for("the worker's socket", Duration::from_secs(120), || {
        socket.exists().then_some(())
    });
    // This process is not the worker's parent: connected, then closed without a byte.
    let mut stranger = UnixStream::connect(&socket).expect("connecting to the worker's socket");
    stranger
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    match stranger.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the worker kept a stranger's connection: {other:?}"),
    }
    assert!(process_alive(worker), "the worker is still up");
    assert!(socket.exists(), "and still waiting for its router");
    drop(resume);
    server
        .wait_ready(Duration::from_secs(60), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let workers = server.workers();
    assert_eq!(
        workers[0]["pid"], worker,
        "the same worker served the router"
    );
    assert_eq!(workers[0]["restarts"], 0);
    let r = call(&server, "POST", "/v1/completions", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !socket.exists(),
        "once the router is connected, nobody else can connect"
    );
}
