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
        // `*` never covers Authorization (Fetch standard): the preflight asked for it, so it
        // is listed.
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("Authorization")
        );
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

/// With keys set, the probes and a gateway's load poll stay open; `/metrics` needs a key
/// unless `server.public_metrics` opens it (for an endpoint picker that sends none), and
/// inference needs one either way.
#[test]
fn probes_are_open_and_metrics_only_with_public_metrics() {
    for public in [false, true] {
        let server = Server::start(&config(&format!(
            "api_key = \"sk-main\"\npublic_metrics = {public}"
        )));
        for path in ["/health", "/v1/health", "/ready", "/v1/loads"] {
            assert_eq!(call(&server, "GET", path, &[]).status, 200, "{path}");
        }
        let metrics = call(&server, "GET", "/metrics", &[]);
        assert_eq!(
            metrics.status,
            if public { 200 } else { 401 },
            "{}",
            metrics.text()
        );
        assert_eq!(
            call(&server, "POST", "/metrics", &[]).status,
            401,
            "only GET is opened"
        );
        assert_eq!(call(&server, "GET", "/v1/models", &[]).status, 401);
        assert_eq!(call(&server, "POST", "/v1/completions", &[]).status, 401);
    }
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
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Authorization")
    );
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

/// Sends `head` (the request line and headers, without the blank line) with `body` on a new
/// connection, exactly as written (no header added), and reads the whole answer.
fn raw(server_addr: &str, head: &str, body: &str) -> HttpResponse {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(server_addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        conn,
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    HttpResponse::parse(&answer).unwrap()
}

fn worker_state(server: &Server, id: usize) -> (String, u64) {
    let w = &server.workers()[id];
    (
        w["state"].as_str().unwrap().to_string(),
        w["pid"].as_u64().unwrap(),
    )
}

fn assert_refused(r: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let error = &r.json()["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "{what}: no {key} in {}", r.text());
    }
    assert_eq!(error["code"], code, "{what}");
    for (name, _) in &r.headers {
        assert!(
            !name.starts_with("access-control-"),
            "{what}: {name} on an admin answer"
        );
    }
}

#[test]
fn a_web_page_cannot_drain_a_worker_and_the_host_must_name_this_machine() {
    // The default access settings: no key of any kind.
    let server = Server::start(&config(""));
    let addr = server.addr.clone();
    let before = worker_state(&server, 0);
    assert_eq!(before.0, "ready");
    // What any web page can send from the operator's browser without a preflight: a form
    // post, text/plain, or no body at all, with its own Origin.
    for (what, content_type) in [
        ("text/plain", "Content-Type: text/plain\r\n"),
        (
            "a form",
            "Content-Type: application/x-www-form-urlencoded\r\n",
        ),
        ("no content type", ""),
    ] {
        for path in [
            "/admin/workers/0/drain",
            "/admin/workers/0/restart",
            "/admin/reload",
        ] {
            let r = raw(
                &addr,
                &format!(
                    "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{content_type}Origin: https://evil.example"
                ),
                "x",
            );
            assert_refused(&r, 403, "admin_forbidden", &format!("{what} to {path}"));
            assert_eq!(r.json()["error"]["type"], "permission_error");
        }
    }
    // Its preflight grants nothing, so the browser never sends a JSON post either.
    let r = raw(
        &addr,
        &format!(
            "OPTIONS /admin/workers/0/drain HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type"
        ),
        "",
    );
    assert_refused(&r, 403, "admin_forbidden", "preflight");
    // And were it sent anyway, another origin is refused.
    let r = raw(
        &addr,
        &format!(
            "POST /admin/workers/0/drain HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nOrigin: https://evil.example"
        ),
        "{}",
    );
    assert_refused(
        &r,
        403,
        "admin_forbidden",
        "a JSON post from another origin",
    );
    // DNS rebinding: the page's own name resolved to 127.0.0.1; every route refuses it.
    let port = addr.rsplit(':').next().unwrap();
    for (method, path, extra) in [
        (
            "POST",
            "/admin/workers/0/drain",
            "Content-Type: application/json\r\n",
        ),
        ("GET", "/v1/models", ""),
        ("GET", "/workers", ""),
    ] {
        let r = raw(
            &addr,
            &format!("{method} {path} HTTP/1.1\r\n{extra}Host: evil.example:{port}"),
            "",
        );
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "host_not_allowed");
    }
    assert_eq!(worker_state(&server, 0), before, "nothing changed");
    // Names of this machine are served.
    for host in [
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        addr.clone(),
    ] {
        let r = raw(
            &addr,
            &format!("GET /v1/models HTTP/1.1\r\nHost: {host}"),
            "",
        );
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    // The operator's own calls from this machine work: a JSON post (what curl -H
    // 'Content-Type: application/json' and the kit send), or the admin header.
    let r = server.request("POST", "/admin/workers/0/drain", Some(b""));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(worker_state(&server, 0).0, "draining");
    let r = raw(
        &addr,
        &format!("POST /admin/workers/0/restart HTTP/1.1\r\nHost: localhost:{port}\r\nX-Llamapool-Admin: 1"),
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let after = worker_state(&server, 0);
    assert_eq!(after.0, "ready");
    assert_ne!(after.1, before.1, "restarted");
    // Inference preflights: Authorization asked for is listed, `*` otherwise.
    let r = raw(
        &addr,
        &format!("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://web.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type,authorization"),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type,authorization")
    );
    let r = raw(
        &addr,
        &format!("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://web.example\r\nAccess-Control-Request-Method: POST"),
        "",
    );
    assert_eq!(r.header("access-control-allow-headers"), Some("*"));
}

#[test]
fn admin_keys_are_not_api_keys_and_every_admin_action_is_logged() {
    let dir = scratch_dir("admin-keys").unwrap();
    let file = dir.path().join("admin-keys");
    std::fs::write(&file, "# operators\nsk-admin-file\n").unwrap();
    let log = dir.path().join("router.log");
    let mut command = std::process::Command::new(bin_dir().join("llamapool-router"));
    command
        .env(
            "LLAMAPOOL__SERVER__ADMIN_API_KEYS",
            "sk-admin-env, sk-admin-two",
        )
        .env("RUST_LOG", "warn,llamapool_router::http::access=info");
    let mut server = Router::launch_with_stderr(
        command,
        &config(&format!(
            "api_key = \"sk-infer\"\nadmin_api_key_file = {:?}",
            file.display().to_string()
        )),
        std::fs::File::create(&log).unwrap().into(),
    )
    .unwrap();
    server
        .wait_ready(Duration::from_secs(120), Some("Bearer sk-infer"))
        .unwrap();
    let drain = "/admin/workers/0/drain";
    for headers in [
        vec![],
        vec![("Authorization", "Bearer sk-infer")],
        vec![("X-Api-Key", "sk-infer")],
        vec![("Authorization", "Bearer sk-admin")],
    ] {
        let r = http::request(&server.addr, "POST", drain, &headers, b"").unwrap();
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "authentication_error");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("admin key"), "{message}");
    }
    let state = |server: &Router| {
        let r = http::request(
            &server.addr,
            "GET",
            "/workers",
            &[("X-Api-Key", "sk-infer")],
            b"",
        )
        .unwrap();
        r.json()["workers"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state(&server), "ready", "an API key drains nothing");
    let r = http::request(
        &server.addr,
        "POST",
        drain,
        &[("Authorization", "Bearer sk-admin-two")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(state(&server), "draining");
    let r = http::request(
        &server.addr,
        "POST",
        "/admin/workers/0/restart",
        &[("X-Api-Key", "sk-admin-file")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(state(&server), "ready");
    // The operator's key opens the other routes too; the API key still does.
    for key in ["sk-admin-env", "sk-infer"] {
        let r = http::request(
            &server.addr,
            "GET",
            "/v1/models",
            &[("X-Api-Key", key)],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 200, "{key}");
    }
    assert!(server.terminate(Duration::from_secs(30)));
    let text = std::fs::read_to_string(&log).unwrap();
    let actions: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("admin action"))
        .collect();
    assert_eq!(actions.len(), 2, "{text}");
    assert!(
        actions[0].contains("admin#1") && actions[0].contains("drain"),
        "{}",
        actions[0]
    );
    assert!(
        actions[1].contains("admin#2") && actions[1].contains("restart"),
        "{}",
        actions[1]
    );
    for line in &actions {
        assert!(
            line.contains("127.0.0.1:") && line.contains("worker=0"),
            "{line}"
        );
    }
    let refused = text
        .lines()
        .filter(|l| l.contains("admin request refused") && l.contains("action=drain"))
        .count();
    assert_eq!(refused, 4, "each refusal is logged: {text}");
    assert!(!text.contains("sk-admin"), "a key in the log: {text}");
}
