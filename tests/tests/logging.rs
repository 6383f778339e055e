//! Request ids and log lines, with the real router and a real worker: `x-request-id` comes
//! back on every answer (kept when the client sent a valid one, else made up), and the
//! router's and the worker's log lines about a request carry it, as JSON with
//! `server.log_format = "json"` and as text without colour codes when stderr is a file.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use llamapool_testkit::{binary, TempDir};
use llamapool_tests::*;
use serde_json::{json, Value};

/// One SmolLM2 worker; `log_format` as given.
fn config(log_format: &str, cpus: &str) -> String {
    smol_config(
        &format!("log_format = \"{log_format}\""),
        (2, 2048),
        &[&format!("cpus = \"{cpus}\"")],
    )
}

/// A ready router with `RUST_LOG=info` whose stderr (and its worker's) goes to a file.
struct LoggedRouter {
    router: Router,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl LoggedRouter {
    fn start(config: &str) -> Self {
        let dir = scratch_dir("logging").expect("a scratch directory");
        let log = dir.path().join("stderr.log");
        let file = File::create(&log).expect("the log file");
        let mut command =
            Command::new(binary("llamapool-router").unwrap_or_else(|e| panic!("{e}")));
        command.env("RUST_LOG", "info");
        let mut router = Router::launch_with_stderr(command, config, Stdio::from(file))
            .unwrap_or_else(|e| panic!("{e}"));
        router
            .wait_ready(Duration::from_secs(120), None)
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            router,
            log,
            _dir: dir,
        }
    }

    fn request(&self, method: &str, path: &str, id: Option<&str>, body: &[u8]) -> HttpResponse {
        let headers: Vec<(&str, &str)> = id.map(|id| ("x-request-id", id)).into_iter().collect();
        http::request(&self.router.addr, method, path, &headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Stops the router (it drains, and its worker exits), then returns what was logged.
    fn stop(mut self) -> String {
        assert!(
            self.router.terminate(Duration::from_secs(30)),
            "the router stops"
        );
        std::fs::read_to_string(&self.log).expect("the log file")
    }
}

fn chat(max_tokens: u32, stream: bool) -> Vec<u8> {
    json!({
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
    .to_string()
    .into_bytes()
}

fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id
            .bytes()
            .enumerate()
            .all(|(i, b)| matches!(i, 8 | 13 | 18 | 23) == (b == b'-'))
}

/// Sends the requests both formats are checked with; returns the generated id.
fn exercise(server: &LoggedRouter) -> String {
    // Kept and returned.
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some("test-123"),
        &chat(4, false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("test-123"));

    // A stream carries it too.
    let stream = http::send(
        &server.router.addr,
        "POST",
        "/v1/completions",
        &[("x-request-id", "test-stream")],
        &json!({"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": true, "stream": true})
            .to_string()
            .into_bytes(),
    )
    .expect("a stream");
    let reader = SseReader::new(stream).expect("a response head");
    assert_eq!(reader.status, 200);
    let header = reader
        .headers
        .iter()
        .find(|(k, _)| k == "x-request-id")
        .map(|(_, v)| v.clone());
    assert_eq!(header.as_deref(), Some("test-stream"));
    assert_eq!(reader.collect().last().map(String::as_str), Some("[DONE]"));

    // None sent: one is made up, a UUID.
    let r = server.request("POST", "/v1/chat/completions", None, &chat(2, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let generated = r.header("x-request-id").expect("an id").to_string();
    assert!(is_uuid(&generated), "{generated:?}");

    // Errors carry one: a 400 keeps the client's, a 404 and a 405 get one made up.
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        Some("test-bad"),
        b"{not json",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-request-id"), Some("test-bad"));
    for (method, path, status) in [("GET", "/nowhere", 404), ("GET", "/v1/completions", 405)] {
        let r = server.request(method, path, None, b"");
        assert_eq!(r.status, status, "{method} {path}");
        assert!(
            r.header("x-request-id").is_some_and(is_uuid),
            "{method} {path}: {:?}",
            r.headers
        );
    }

    // An id that is too long, or not printable ASCII, is replaced.
    let long = "x".repeat(129);
    for bad in [long.as_str(), "tab\there"] {
        let r = server.request("GET", "/nowhere", Some(bad), b"");
        assert!(
            r.header("x-request-id").is_some_and(is_uuid),
            "{bad:?}: {:?}",
            r.headers
        );
    }
    let max = "y".repeat(128);
    let r = server.request("GET", "/health", Some(&max), b"");
    assert_eq!(r.header("x-request-id"), Some(max.as_str()));
    generated
}

/// The router's `request finished` line of the request with `id`.
fn router_end<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| {
            l["message"] == "request finished"
                && l["span"]["request_id"] == id
                && l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("llamapool_router"))
        })
        .unwrap_or_else(|| panic!("no router line ends {id}"))
}

#[test]
fn json_logs_are_json_lines_and_carry_the_request_id_in_router_and_worker() {
    let server = LoggedRouter::start(&config("json", "0"));
    let generated = exercise(&server);
    let log = server.stop();

    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(!log.contains("\u{1b}["), "JSON has no colours");

    // The router's line: the span's fields, recorded at the end.
    let span = &router_end(&lines, "test-123")["span"];
    assert_eq!(span["name"], "request");
    assert_eq!(span["endpoint"], "chat");
    assert_eq!(span["worker"], 0);
    assert!(
        span["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{span}"
    );
    assert_eq!(span["generated_tokens"], 4);
    assert!(
        span["ttft_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{span}"
    );
    assert!(span["duration_ms"].as_f64().is_some(), "{span}");
    assert_eq!(span["status"], 200);
    assert_eq!(span["outcome"], "ok");

    // The stream's line comes from its producer task, in the same span.
    let span = &router_end(&lines, "test-stream")["span"];
    assert_eq!(
        (
            &span["endpoint"],
            &span["outcome"],
            &span["generated_tokens"]
        ),
        (&json!("completions"), &json!("ok"), &json!(3))
    );
    assert_eq!(router_end(&lines, &generated)["span"]["outcome"], "ok");
    let bad = router_end(&lines, "test-bad");
    assert_eq!(
        (&bad["span"]["outcome"], &bad["span"]["status"]),
        (&json!("client_error"), &json!(400))
    );
    assert!(bad["error"].is_string(), "{bad}");

    // The worker's line about the same request carries the same id.
    let worker = lines
        .iter()
        .find(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("llamapool_worker"))
                && l["span"]["request_id"] == "test-123"
        })
        .unwrap_or_else(|| panic!("no worker line carries test-123:\n{log}"));
    assert_eq!(worker["message"], "request finished");
    assert_eq!(worker["reason"], "length");
    assert_eq!(worker["generated_tokens"], 4);

    // The worker logged its model load.
    for message in ["loading the model", "model loaded"] {
        assert!(
            lines.iter().any(|l| l["message"] == message),
            "no {message:?} line:\n{log}"
        );
    }
}

#[test]
fn text_logs_to_a_file_have_no_colour_codes_and_carry_the_request_id() {
    let server = LoggedRouter::start(&config("text", "1"));
    exercise(&server);
    let log = server.stop();
    assert!(!log.contains("\u{1b}["), "colour codes in a file:\n{log}");
    let about = |crate_name: &str| {
        log.lines()
            .any(|l| l.contains(crate_name) && l.contains("request_id=\"test-123\""))
    };
    assert!(
        about("llamapool_router"),
        "no router line has test-123:\n{log}"
    );
    assert!(
        about("llamapool_worker"),
        "no worker line has test-123:\n{log}"
    );
}

/// What a client sends never reaches the log raw: llama.cpp prints a grammar it refuses to the
/// worker's stderr, which the router captures line by line, escapes, caps and logs as JSON.
/// A grammar made of fake log lines, escape sequences and a long line leaves one JSON object
/// per line, none of them the fake, and only a few KiB.
#[test]
fn a_hostile_grammar_cannot_inject_log_lines() {
    let server = LoggedRouter::start(&config("json", "0"));
    let fake = r#"{"level":"ERROR","target":"llamapool_router::serve","message":"INJECTED"}"#;
    let grammar = format!(
        "root ::= undefined-rule\n{fake}\n\u{1b}[31mred\u{1b}[0m\r\n# {}\n",
        "A".repeat(60_000)
    );
    let body = json!({"prompt": "Hi", "max_tokens": 2, "grammar": grammar}).to_string();
    let before = std::fs::metadata(&server.log).map_or(0, |m| m.len());
    let r = server.request("POST", "/completion", None, body.as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains('\u{1b}'), "{}", r.text());
    let ok = server.request(
        "POST",
        "/completion",
        None,
        br#"{"prompt":"Hi","n_predict":2}"#,
    );
    assert_eq!(ok.status, 200);
    let log = server.stop();
    assert!(!log.contains('\u{1b}'), "a raw escape sequence in the log");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert_ne!(v["message"], "INJECTED", "{line}");
    }
    let grew = log.len() as u64 - before.min(log.len() as u64);
    assert!(grew < 64 * 1024, "the log grew by {grew} bytes");
}
