//! Poison containment and restarts that fit the cause, with the real binaries (SmolLM2).
//!
//! A poison request is simulated by the worker's test hook (`LLAMAPOOL_TEST_POISON`): a
//! worker whose text prompt holds the marker aborts (SIGABRT), as a native crash on some input
//! would. Everything else is the real path: the router judges the death, ends the request that
//! caused it with a 500, refuses it afterwards, and moves the innocent ones on.
//!
//! The chaos test kills workers from outside (SIGKILL every 5 s for 60 s) under load with the
//! default configuration, crash-loop breaker included.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llamapool_testkit::binary;
use llamapool_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const MARKER: &str = "XYZZY-POISON";

/// A ready router whose workers abort on [`MARKER`].
fn poisonable(config: &str) -> Router {
    let mut command = Command::new(binary("llamapool-router").unwrap_or_else(|e| panic!("{e}")));
    command.env("LLAMAPOOL_TEST_POISON", MARKER);
    let mut router = Router::launch_with(command, config).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    router
}

fn restarts(router: &Router) -> u64 {
    router
        .workers()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap_or(0))
        .sum()
}

fn poison() -> Value {
    json!({"model": "smol", "prompt": format!("Once upon a time {MARKER}"), "max_tokens": 8, "n": 4})
}

fn long_stream(max_tokens: u32) -> Value {
    json!({
        "model": "smol",
        "prompt": "Tell a long story about the sea.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    })
}

/// Reads a stream to its end; the number of text events, or why it failed.
fn finish(mut reader: SseReader) -> Result<usize, String> {
    let mut events = 0;
    while let Some(data) = reader.next_data() {
        if data == "[DONE]" {
            return Ok(events);
        }
        let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {data}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event: {v}"));
        }
        events += 1;
    }
    Err("the stream ended without [DONE]".into())
}

fn plain(router: &Router) -> u16 {
    router
        .post(
            "/v1/completions",
            &json!({"model": "smol", "prompt": "Hello", "max_tokens": 4, "temperature": 0}),
        )
        .status
}

fn wait_all_ready(router: &Router, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !router.workers().iter().all(|w| w["state"] == "ready") {
        assert!(Instant::now() < deadline, "{:?}", router.workers());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lone_poison_request_costs_one_worker_death_and_is_refused_afterwards() {
    let router = poisonable(&smol_config("", (4, 4096), PINNED_0_1));
    // A stream under way on the pool keeps going whatever happens to the poison.
    let stream = router.stream("/v1/completions", &long_stream(120));
    let innocent = std::thread::spawn(move || finish(stream));
    std::thread::sleep(Duration::from_millis(300));

    let r = router.post("/v1/completions", &poison());
    assert_eq!(r.status, 500, "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["type"], "poison_request_error", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("SIGABRT"), "{message}");
    assert!(
        message.contains("LLAMAPOOL_TEST_POISON"),
        "the last words: {message}"
    );
    assert_eq!(restarts(&router), 1, "{:?}", router.workers());

    // Refused at once afterwards, without costing a worker (a retry, another seed).
    let mut again = poison();
    again["seed"] = json!(7);
    let r = router.post("/v1/completions", &again);
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "poison_request_error");
    assert!(r.header("retry-after").is_some());

    assert!(innocent.join().unwrap().is_ok_and(|n| n > 0));
    assert_eq!(plain(&router), 200);
    wait_all_ready(&router, Duration::from_secs(30));
    assert_eq!(restarts(&router), 1, "{:?}", router.workers());
    let metrics = router.get("/metrics").text();
    assert!(
        metrics.contains("llamapool_poison_requests_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("llamapool_poison_refusals_total 1"));
}

#[test]
fn a_poison_sharing_a_batch_is_found_on_probation_and_the_innocent_stream_goes_on() {
    // One worker: the innocent stream shares the poison's batch and its worker's death.
    let router = poisonable(&smol_config("", (4, 4096), PINNED_0));
    let stream = router.stream("/v1/completions", &long_stream(150));
    let innocent = std::thread::spawn(move || finish(stream));
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let r = router.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": format!("x {MARKER}"), "max_tokens": 8}),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "poison_request_error");
    // The first death blames both (two requests), probation finds the poison at the second:
    // the innocent stream waited for the respawns and finished without an error.
    assert!(innocent.join().unwrap().is_ok_and(|n| n > 0));
    assert!(restarts(&router) <= 2, "{:?}", router.workers());
    assert!(started.elapsed() < Duration::from_secs(60));
    wait_all_ready(&router, Duration::from_secs(30));
    assert_eq!(plain(&router), 200);
    assert_eq!(router.workers()[0]["state"], "ready");
}

/// A kill every 5 s for 60 s, alternating over the two workers of the default configuration,
/// while 4 clients loop on streamed completions: nothing is lost, nothing ends `failed`.
#[test]
fn outside_kills_under_load_lose_nothing_with_the_default_configuration() {
    // The default configuration: one adaptive worker per core, the default crash-loop rule.
    let mut router = Router::launch(DEFAULT_CONFIG).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let router = Arc::new(router);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (router, stop, ok, failed) =
                (router.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match finish(router.stream("/v1/completions", &long_stream(40))) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(5));
        let workers = router.workers();
        let target = &workers[kills % workers.len()];
        if let Some(pid) = target["pid"].as_u64() {
            let _ = kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL);
            kills += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("chaos: {kills} kills, {ok} streams finished, {failed} failed");
    assert!(kills >= 10, "{kills} kills");
    assert!(
        errors.is_empty(),
        "{failed} of {} streams failed: {errors:?}",
        ok + failed
    );
    assert!(ok > 20, "only {ok} streams finished");
    wait_all_ready(&router, Duration::from_secs(30));
    assert!(router.workers().iter().all(|w| w["state"] == "ready"));
    assert_eq!(router.get("/health").status, 200);
    assert_eq!(plain(&router), 200);
}
