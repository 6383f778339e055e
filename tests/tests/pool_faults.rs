//! Faults of the pool with the real binaries (SmolLM2, two pinned workers): a hung worker, a
//! worker killed from outside again and again, workers of different context sizes, per-worker drain and restart,
//! and a rolling reload under load. Each test asserts what was lost, not only that the server
//! is still up.

use std::time::{Duration, Instant};

use llamapool_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Two workers with a short hang timeout and a small crash-loop limit.
fn config(extra_server: &str, workers: &[&str]) -> String {
    smol_config(
        &format!("keepalive_secs = 1\ndrain_timeout_secs = 30\n{extra_server}"),
        (4, 4096),
        workers,
    )
}

fn story(max_tokens: u32) -> Value {
    json!({
        "model": "smol",
        "messages": [{"role": "user", "content": "Tell a long story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Reads a whole stream; returns the completion tokens of its usage chunk, or why it failed.
fn finish_stream(mut reader: SseReader) -> Result<u64, String> {
    let mut usage = None;
    let mut last = String::new();
    while let Some(data) = reader.next_data() {
        if data == "[DONE]" {
            return usage.ok_or_else(|| "no usage chunk".to_string());
        }
        let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {data}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event: {v}"));
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(n);
        }
        last = data;
    }
    Err(format!("the stream ended without [DONE] after {last}"))
}

fn signal(pid: u64, sig: Signal) {
    let _ = kill(Pid::from_raw(i32::try_from(pid).unwrap()), sig);
}

fn worker(server: &Server, id: u64) -> Value {
    server
        .workers()
        .into_iter()
        .find(|w| w["id"] == id)
        .expect("the worker exists")
}

/// Polls `/workers` until `pred` holds for worker `id`.
fn wait_for(
    server: &Server,
    id: u64,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let w = worker(server, id);
        if pred(&w) {
            return w;
        }
        assert!(Instant::now() < deadline, "worker {id} never {what}: {w}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn short_completion(server: &Server) -> u16 {
    server
        .post(
            "/v1/completions",
            &json!({"model": "smol", "prompt": "Hello", "max_tokens": 4, "temperature": 0}),
        )
        .status
}

#[test]
fn a_stopped_worker_is_found_hung_and_its_streams_finish_elsewhere() {
    let server = Server::start(&config("hang_timeout_secs = 3", PINNED_0_1));
    let streams: Vec<SseReader> = (0..4)
        .map(|_| server.stream("/v1/chat/completions", &story(120)))
        .collect();
    // Both workers are busy once the requests are spread.
    let busy = wait_for(&server, 0, Duration::from_secs(20), "got work", |w| {
        w["in_flight"].as_u64() > Some(0)
    });
    let pid = busy["pid"].as_u64().unwrap();
    signal(pid, Signal::SIGSTOP);
    let stopped_at = Instant::now();
    std::thread::scope(|s| {
        // A new request during the hang is served (by the other worker, or after the move).
        let during = s.spawn(|| short_completion(&server));
        let hung = wait_for(&server, 0, Duration::from_secs(20), "was found hung", |w| {
            w["state"] == "hung" || w["pid"].as_u64() != Some(pid)
        });
        // The hang timeout, plus the watchdog's tick and a loaded machine's slack.
        assert!(
            stopped_at.elapsed() < Duration::from_secs(3 + 7),
            "found after {:?}: {hung}",
            stopped_at.elapsed()
        );
        assert_eq!(during.join().unwrap(), 200);
    });
    let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|r| s.spawn(move || finish_stream(r)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r, &Ok(120), "every stream finished at full length");
    }
    assert!(
        stopped_at.elapsed() < Duration::from_secs(60),
        "streams took {:?}",
        stopped_at.elapsed()
    );
    // The hung process was killed (a stopped process dies on SIGKILL) and replaced.
    assert!(!process_alive(u32::try_from(pid).unwrap()));
    let back = wait_for(&server, 0, Duration::from_secs(60), "came back", |w| {
        w["state"] == "ready"
    });
    assert!(back["restarts"].as_u64().unwrap() >= 1);
    assert!(back["last_error"].is_null() || back["last_error"].as_str().is_some());
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn an_idle_stopped_worker_stops_counting_for_health_and_is_replaced() {
    let server = Server::start(&config("hang_timeout_secs = 3", PINNED_0_1));
    let pid = worker(&server, 1)["pid"].as_u64().unwrap();
    signal(pid, Signal::SIGSTOP);
    wait_for(&server, 1, Duration::from_secs(10), "was replaced", |w| {
        w["pid"].as_u64() != Some(pid) && w["state"] == "ready"
    });
    assert!(!process_alive(u32::try_from(pid).unwrap()));
    assert_eq!(short_completion(&server), 200);
}

/// Kills from outside (SIGKILL: an operator, the OOM killer) are not a crash loop: a worker
/// killed again and again, even right after it became ready, is started again each time and
/// never marked `failed` (the crash-loop rule counts only failed starts and crashes before
/// serving), while the other serves.
#[test]
fn a_worker_killed_from_outside_again_and_again_is_never_marked_failed() {
    let server = Server::start(&config(
        "crash_loop_deaths = 3\ncrash_loop_window_secs = 300\nfailed_retry_secs = 600",
        PINNED_0_1,
    ));
    let mut last_pid = None;
    for _ in 0..5 {
        let w = wait_for(&server, 1, Duration::from_secs(30), "became ready", |w| {
            w["state"] == "ready" && w["pid"].as_u64() != last_pid
        });
        let pid = w["pid"].as_u64().unwrap();
        signal(pid, Signal::SIGKILL);
        last_pid = Some(pid);
        assert_eq!(short_completion(&server), 200);
    }
    let back = wait_for(&server, 1, Duration::from_secs(30), "came back", |w| {
        w["state"] == "ready" && w["pid"].as_u64() != last_pid
    });
    assert_eq!(back["restarts"], 5, "{back}");
    assert_eq!(worker(&server, 0)["state"], "ready");
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_prompt_goes_to_a_worker_whose_context_holds_it() {
    // Worker 0 holds 256 tokens per sequence, worker 1 holds 2048.
    let workers = [
        "cpus = \"0\"\nslots = 2\ncontext = 512",
        "cpus = \"1\"\nslots = 2\ncontext = 4096",
    ];
    let server = Server::start(&config("", &workers));
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["meta"]["n_ctx_per_seq"], 2048);
    let long = "word ".repeat(600);
    for _ in 0..4 {
        // Whichever worker least-load picks first, the request is served.
        let r = server.post(
            "/v1/completions",
            &json!({"model": "smol", "prompt": long, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let tokens: Vec<u32> = vec![1; 600];
    let r = server.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": tokens, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let too_long = "word ".repeat(3000);
    let r = server.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": too_long, "max_tokens": 4}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["type"], "exceed_context_size_error");
    assert_eq!(
        error["n_ctx"], 2048,
        "the largest worker's context is reported"
    );
}

#[test]
fn a_drained_worker_gets_no_new_work_and_a_restart_brings_it_back() {
    let server = Server::start(&config("", PINNED_0_1));
    let pid = worker(&server, 0)["pid"].as_u64().unwrap();
    let r = server.request("POST", "/admin/workers/0/drain", Some(b""));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(worker(&server, 0)["state"], "draining");
    let streams: Vec<SseReader> = (0..3)
        .map(|_| server.stream("/v1/chat/completions", &story(20)))
        .collect();
    assert_eq!(
        worker(&server, 0)["in_flight"],
        0,
        "a draining worker takes nothing"
    );
    let r = server.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(
        r.header("x-llamapool-worker"),
        Some("1"),
        "served by the other worker"
    );
    for s in streams {
        assert_eq!(finish_stream(s), Ok(20));
    }
    let r = server.request("POST", "/admin/workers/0/restart", Some(b""));
    assert_eq!(r.status, 200, "{}", r.text());
    let w = worker(&server, 0);
    assert_eq!(w["state"], "ready");
    assert_ne!(w["pid"].as_u64(), Some(pid));
    for bad in ["/admin/workers/7/drain", "/admin/workers/x/restart"] {
        let r = server.request("POST", bad, Some(b""));
        assert_eq!(r.status, 404, "{bad}");
        assert_eq!(r.json()["error"]["type"], "not_found_error", "{bad}");
    }
}

#[test]
fn a_rolling_reload_under_load_loses_nothing() {
    let server = Server::start(&config("", PINNED_0_1));
    let pids: Vec<u64> = (0..2)
        .map(|id| worker(&server, id)["pid"].as_u64().unwrap())
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (results, reload) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut results = Vec::new();
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        results.push(finish_stream(
                            server.stream("/v1/chat/completions", &story(40)),
                        ));
                    }
                    results
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let reload = server.request("POST", "/admin/reload", Some(b""));
        done.store(true, std::sync::atomic::Ordering::Release);
        let results: Vec<Result<u64, String>> = clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        (results, reload)
    });
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert!(results.len() >= 8);
    let failed: Vec<&Result<u64, String>> = results.iter().filter(|r| **r != Ok(40)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
    for (id, old) in pids.iter().enumerate() {
        let w = worker(&server, id as u64);
        assert_eq!(w["state"], "ready");
        assert_ne!(w["pid"].as_u64(), Some(*old), "worker {id} was restarted");
    }
}
