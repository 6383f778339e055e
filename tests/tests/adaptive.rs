//! Adaptive workers (the default layout): the real router and workers, SmolLM2. `/workers`
//! shows each worker's wide shape and its shape now, and a process that keeps a CPU busy
//! makes every worker unpackable within a few measurement windows, so that requests spread
//! over the pool. Under continuous load, a wave packed onto the first worker is split over
//! the workers when busy loops start, and packed back (the first worker widening again)
//! when they stop, every stream finishing whole.
//! One test function, so that no other router of this binary runs meanwhile (each would be a
//! foreign process to the other). That the first worker is packable on a quiet machine is
//! waited for but not required (the machine may be busy: the packing checks are then
//! skipped, saying so); that a busy neighbour makes every worker unpackable is.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

/// A config without `[[workers]]`: one adaptive worker per allowed CPU.
fn default_layout(extra: &str) -> String {
    smol_config("", (4, 4096), &[]) + extra
}

/// Keeps one CPU busy until dropped.
struct BusyLoop(Child);

impl BusyLoop {
    fn start() -> Self {
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("sh"),
        )
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn allowed_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[test]
fn the_default_layout_is_adaptive_and_a_busy_neighbour_makes_it_unpackable() {
    fixed_workers_when_adaptive_is_false();
    if allowed_cpus() < 2 {
        eprintln!("one CPU: the default layout has a single fixed worker; nothing to test");
        return;
    }
    let server = Server::start(&default_layout(""));
    let workers = server.workers();
    assert_eq!(workers.len(), allowed_cpus());
    for w in &workers {
        assert_eq!(w["threads"], 1, "{w}");
        assert!(w["wide_cpus"].is_string(), "{w}");
        assert_eq!(w["wide_threads"], allowed_cpus(), "{w}");
    }
    // A request works whatever the shape.
    let r = server.post("/v1/chat/completions", &chat("Say hi.", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let packable = |w: &Value| w["packable"].as_bool();
    let quiet_seen = wait_for(Duration::from_secs(15), || {
        packable(&server.workers()[0]) == Some(true)
    });
    if !quiet_seen {
        eprintln!(
            "the machine is busy: worker 0 never reported packable; checking only the busy side"
        );
    }
    // One busy loop per CPU leaves no doubt: every worker reports it is crowded.
    let loops: Vec<BusyLoop> = (0..allowed_cpus()).map(|_| BusyLoop::start()).collect();
    let crowded = wait_for(Duration::from_secs(20), || {
        server.workers().iter().all(|w| packable(w) == Some(false))
    });
    assert!(
        crowded,
        "still packable under busy loops: {:?}",
        server.workers()
    );
    for w in server.workers() {
        assert_eq!(w["shape"], "narrow", "crowded workers run narrow: {w}");
        assert_eq!(w["threads_in_use"], 1, "{w}");
    }
    // Crowded, the pool still serves.
    let r = server.post("/v1/chat/completions", &chat("Say hi.", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(loops);
    drop(server);
    a_wave_is_split_under_a_neighbour_and_packed_again_when_it_leaves();
}

/// Requests held by each worker (`in_flight`), by index.
fn in_flight(server: &Server) -> Vec<u64> {
    server
        .workers()
        .iter()
        .map(|w| w["in_flight"].as_u64().unwrap_or(0))
        .collect()
}

/// One sample of the `/metrics` text: the value on the line that starts with `series `.
fn metric(server: &Server, series: &str) -> f64 {
    let text = server.get("/metrics").text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

const WAVE: usize = 4;
const WAVE_TOKENS: u64 = 900;

/// Streams one long generation to its end: (completion tokens, finish reason).
fn long_stream(server: &Server, i: usize) -> (u64, String) {
    let body = json!({
        "model": "smol",
        "prompt": format!("Story number {i}: once upon a time"),
        "max_tokens": WAVE_TOKENS,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut sse = server.stream("/v1/completions", &body);
    assert_eq!(sse.status, 200);
    let (mut tokens, mut finish) = (0, String::new());
    while let Some(data) = sse.next_data() {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).expect("a JSON chunk");
        assert!(chunk["error"].is_null(), "stream {i} failed: {chunk}");
        if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = reason.to_string();
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    (tokens, finish)
}

/// Four long streams packed onto worker 0 on a quiet machine; busy loops make the router
/// split them over both workers; when the loops stop, they are packed back onto worker 0,
/// which widens again. Nothing is lost: every stream generates all its tokens.
fn a_wave_is_split_under_a_neighbour_and_packed_again_when_it_leaves() {
    let server = Server::start(&default_layout(""));
    let quiet = wait_for(Duration::from_secs(20), || {
        let w = &server.workers()[0];
        w["packable"] == true && w["shape"] == "wide"
    });
    if !quiet {
        eprintln!("the machine is busy: worker 0 never ran wide; the wave checks are skipped");
        return;
    }
    let wide = &server.workers()[0];
    assert_eq!(wide["threads_in_use"], wide["wide_threads"], "{wide}");
    std::thread::scope(|scope| {
        let streams: Vec<_> = (0..WAVE)
            .map(|i| {
                let server = &server;
                scope.spawn(move || long_stream(server, i))
            })
            .collect();
        assert!(
            wait_for(Duration::from_secs(10), || in_flight(&server)[0]
                == WAVE as u64),
            "the wave was not packed onto worker 0: {:?}",
            server.workers()
        );
        assert!(in_flight(&server)[1..].iter().all(|&n| n == 0));

        let loops: Vec<BusyLoop> = (0..allowed_cpus()).map(|_| BusyLoop::start()).collect();
        let split = wait_for(Duration::from_secs(15), || {
            in_flight(&server).iter().all(|&n| n > 0)
        });
        assert!(
            split,
            "the wave stayed packed under busy loops: {:?}",
            server.workers()
        );
        assert!(
            metric(
                &server,
                r#"llamapool_requests_rebalanced_total{reason="split"}"#
            ) >= 1.0
        );
        drop(loops);

        let packed = wait_for(Duration::from_secs(15), || {
            let load = in_flight(&server);
            load[0] > 0 && load[1..].iter().all(|&n| n == 0)
        });
        assert!(
            packed,
            "not packed back after the loops stopped: {:?}",
            server.workers()
        );
        assert!(
            metric(
                &server,
                r#"llamapool_requests_rebalanced_total{reason="pack"}"#
            ) >= 1.0
        );
        let widened = wait_for(Duration::from_secs(10), || {
            server.workers()[0]["shape"] == "wide"
        });
        assert!(
            widened,
            "worker 0 did not widen again: {:?}",
            server.workers()
        );
        assert!(metric(&server, r#"llamapool_worker_wide{worker="0"}"#) == 1.0);
        assert!(
            metric(
                &server,
                r#"llamapool_worker_shape_changes_total{worker="0"}"#
            ) >= 2.0
        );

        for (i, stream) in streams.into_iter().enumerate() {
            let (tokens, finish) = stream.join().expect("a stream thread");
            assert_eq!(
                (tokens, finish.as_str()),
                (WAVE_TOKENS, "length"),
                "stream {i}"
            );
        }
    });
}

/// Polls `done` every 200 ms until it holds or `timeout` passes.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// `worker_defaults.adaptive = false`: fixed one-thread workers, no wide shape reported.
fn fixed_workers_when_adaptive_is_false() {
    let server = Server::start(&default_layout("adaptive = false\n"));
    for w in server.workers() {
        assert!(w["wide_cpus"].is_null(), "{w}");
        assert!(w["packable"].is_null(), "{w}");
    }
}
