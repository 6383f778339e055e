//! `/metrics` end to end: the real router and workers, scraped and parsed by a real Prometheus
//! parser (Python `prometheus_client`'s `text_string_to_metric_families`), checking that the
//! counts move with the requests sent.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

/// Two workers of one slot each and no queue: two long requests fill the pool.
fn two_single_slot_workers() -> String {
    smol_config("keepalive_secs = 1\nmax_queued = 0", (1, 2048), PINNED_0_1)
}

const CHAT: &str = "/v1/chat/completions";

/// Parses an exposition with `prometheus_client` and prints every family's type and sample.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {"types": {}, "samples": []}
for family in text_string_to_metric_families(sys.stdin.read()):
    out["types"][family.name] = family.type
    for s in family.samples:
        out["samples"].append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// One scrape of `/metrics`, as the Prometheus parser read it.
struct Scrape {
    /// Family name (as the parser names it: counters without `_total`) → type.
    types: HashMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn take(server: &Server) -> Self {
        let r = server.get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        let content_type = r.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Self::parse(&r.text())
    }

    fn parse(text: &str) -> Self {
        let mut child = Command::new("python3")
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writing the exposition to python3");
        let out = child.wait_with_output().expect("python3 ends");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named 'prometheus_client'"),
            "the prometheus-client package is missing: scripts/test installs it (python3 -m pip install prometheus-client)"
        );
        assert!(
            out.status.success(),
            "the Prometheus parser refused /metrics:\n{stderr}\n{text}"
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("the parser's JSON");
        let types = v["types"]
            .as_object()
            .expect("types")
            .iter()
            .map(|(k, t)| (k.clone(), t.as_str().unwrap_or_default().to_string()))
            .collect();
        let samples = v["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|s| {
                let labels = s[1]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                (
                    s[0].as_str().expect("name").to_string(),
                    labels,
                    s[2].as_f64().expect("value"),
                )
            })
            .collect();
        Self { types, samples }
    }

    /// The sample with exactly these labels, if any.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
    }

    /// [`Scrape::get`], 0 for a series not created yet.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    fn responses(&self, endpoint: &str, status: &str) -> f64 {
        self.value(
            "llamapool_http_requests_total",
            &[("endpoint", endpoint), ("status", status)],
        )
    }

    fn worker(&self, name: &str, worker: usize) -> Option<f64> {
        self.get(name, &[("worker", &worker.to_string())])
    }
}

/// Polls until `done` holds for a fresh scrape.
fn scrape_until(server: &Server, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = Scrape::take(server);
        if done(&scrape) {
            return scrape;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn in_flight(server: &Server) -> u64 {
    server
        .workers()
        .iter()
        .map(|w| w["in_flight"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn counts_move_with_requests_and_every_worker_has_its_gauges() {
    let server = Server::start(&two_single_slot_workers());
    let before = Scrape::take(&server);
    for (family, kind) in [
        ("llamacpp:prompt_tokens", "counter"),
        ("llamacpp:requests_processing", "gauge"),
        ("llamapool_http_requests", "counter"),
        ("llamapool_time_to_first_token_seconds", "histogram"),
        ("llamapool_time_per_output_token_seconds", "histogram"),
        ("llamapool_inter_token_latency_seconds", "histogram"),
        ("llamapool_queue_time_seconds", "histogram"),
        ("llamapool_request_duration_seconds", "histogram"),
        ("llamapool_worker_state", "gauge"),
        ("llamapool_worker_kv_cells_used", "gauge"),
        ("llamapool_worker_restarts", "counter"),
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    for worker in ["0", "1"] {
        assert_eq!(
            before.get(
                "llamapool_worker_state",
                &[("worker", worker), ("state", "ready")]
            ),
            Some(1.0),
            "worker {worker} is ready"
        );
        assert_eq!(
            before.get(
                "llamapool_worker_state",
                &[("worker", worker), ("state", "hung")]
            ),
            Some(0.0)
        );
    }
    for name in [
        "llamapool_worker_running_requests",
        "llamapool_worker_waiting_requests",
        "llamapool_worker_in_flight_requests",
        "llamapool_worker_kv_cells_used",
        "llamapool_worker_kv_cells",
        "llamapool_worker_slots",
        "llamapool_worker_restarts_total",
        "llamapool_worker_hung_kills_total",
    ] {
        for worker in 0..2 {
            assert!(
                before.worker(name, worker).is_some(),
                "{name} has no series for worker {worker}"
            );
        }
    }
    for w in server.workers() {
        let id = usize::try_from(w["id"].as_u64().unwrap()).unwrap();
        let cells = w["slots"].as_f64().unwrap() * w["n_ctx_per_seq"].as_f64().unwrap();
        assert_eq!(before.worker("llamapool_worker_kv_cells", id), Some(cells));
        assert_eq!(before.worker("llamapool_worker_slots", id), Some(1.0));
    }

    // N chat requests, streamed or not: each one a 200 and a first token.
    const N: usize = 3;
    for i in 0..N {
        let body = chat("Name a fruit.", 6, i == 1);
        if i == 1 {
            let payloads = server.stream(CHAT, &body).collect();
            assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        } else {
            let r = server.post(CHAT, &body);
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let after = Scrape::take(&server);
    let grew = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    assert_eq!(
        after.responses(CHAT, "200") - before.responses(CHAT, "200"),
        N as f64
    );
    assert_eq!(
        grew("llamapool_time_to_first_token_seconds_count"),
        N as f64
    );
    assert_eq!(grew("llamapool_request_duration_seconds_count"), N as f64);
    assert_eq!(grew("llamapool_queue_time_seconds_count"), N as f64);
    assert_eq!(grew("llamacpp:requests_total"), N as f64);
    assert!(grew("llamacpp:prompt_tokens_total") > 0.0);
    assert!(grew("llamacpp:tokens_predicted_total") >= N as f64);
    assert!(grew("llamacpp:prompt_seconds_total") > 0.0);
    assert!(grew("llamacpp:tokens_predicted_seconds_total") > 0.0);
    assert!(grew("llamacpp:n_decode_total") > 0.0);
    assert_eq!(
        grew("llamapool_generation_tokens_total"),
        grew("llamacpp:tokens_predicted_total")
    );
    assert!(grew("llamapool_inter_token_latency_seconds_count") > 0.0);
    assert!(
        after.value(
            "llamapool_time_to_first_token_seconds_bucket",
            &[("le", "+Inf")]
        ) >= N as f64
    );
    assert_eq!(
        after.responses("/metrics", "200") - before.responses("/metrics", "200"),
        1.0,
        "the scrape before this one counted"
    );

    // A 400 and a 404 under their status; the raw path of a 404 is no label.
    let bad = server.post(
        CHAT,
        &json!({"model": "smol", "messages": [], "max_tokens": 2}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(server.get("/no/such/path").status, 404);

    // A 429: two long requests hold both permits, a third is refused.
    let long = || {
        let mut body = chat("Write a long story.", 200, false);
        body["ignore_eos"] = json!(true);
        server.post(CHAT, &body).status
    };
    let during = std::thread::scope(|scope| {
        let a = scope.spawn(long);
        let b = scope.spawn(long);
        let deadline = Instant::now() + Duration::from_secs(30);
        while in_flight(&server) < 2 {
            assert!(Instant::now() < deadline, "the long requests never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let refused = server.post(CHAT, &chat("Hi", 2, false));
        assert_eq!(refused.status, 429, "{}", refused.text());
        // While both run, the workers report their sequences and KV cells.
        let during = scrape_until(&server, "both workers report a running sequence", |s| {
            (0..2).all(|w| s.worker("llamapool_worker_running_requests", w) == Some(1.0))
        });
        assert_eq!(a.join().unwrap(), 200);
        assert_eq!(b.join().unwrap(), 200);
        during
    });
    for worker in 0..2 {
        assert!(
            during
                .worker("llamapool_worker_kv_cells_used", worker)
                .is_some_and(|cells| cells > 0.0),
            "worker {worker} holds KV cells while it runs a request"
        );
        assert_eq!(
            during.worker("llamapool_worker_in_flight_requests", worker),
            Some(1.0)
        );
    }
    assert_eq!(during.value("llamacpp:requests_processing", &[]), 2.0);

    let end = scrape_until(&server, "both workers report their sequence gone", |s| {
        (0..2).all(|w| s.worker("llamapool_worker_running_requests", w) == Some(0.0))
    });
    assert_eq!(
        end.responses(CHAT, "400") - after.responses(CHAT, "400"),
        1.0
    );
    assert_eq!(
        end.responses(CHAT, "429") - after.responses(CHAT, "429"),
        1.0
    );
    assert_eq!(
        end.responses(CHAT, "200") - after.responses(CHAT, "200"),
        2.0
    );
    assert_eq!(end.responses("unmatched", "404"), 1.0);
    assert!(
        !end.samples
            .iter()
            .any(|(_, l, _)| l.get("endpoint").is_some_and(|e| e.contains("no/such"))),
        "a raw path became a label"
    );
}

#[test]
fn cancellations_moves_and_restarts_are_counted() {
    let server = Server::start(&TWO_WORKERS);
    let before = Scrape::take(&server);

    // A client that leaves mid-stream is a cancellation.
    let mut body = chat("Write a long story about a cat.", 200, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream(CHAT, &body);
    reader.next_data().expect("a first chunk");
    drop(reader);
    scrape_until(&server, "the cancellation is counted", |s| {
        s.value("llamapool_client_cancellations_total", &[])
            - before.value("llamapool_client_cancellations_total", &[])
            == 1.0
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight(&server) > 0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled request never left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A stream whose worker is killed mid-generation moves, resumed, to the other worker.
    let mut body = chat("Write a long story about a ship.", 120, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream(CHAT, &body);
    for _ in 0..5 {
        reader.next_data().expect("a chunk");
    }
    let busy = server
        .workers()
        .into_iter()
        .find(|w| w["in_flight"] == 1)
        .expect("one worker runs the stream");
    let id = usize::try_from(busy["id"].as_u64().unwrap()).unwrap();
    let pid = i32::try_from(busy["pid"].as_u64().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let payloads = reader.collect();
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let after = scrape_until(&server, "the killed worker's restart is counted", |s| {
        s.worker("llamapool_worker_restarts_total", id) == Some(1.0)
    });
    let grew = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    assert_eq!(grew("llamapool_requests_moved_total"), 1.0);
    assert_eq!(grew("llamapool_requests_resumed_total"), 1.0);
    assert_eq!(grew("llamapool_client_cancellations_total"), 1.0);
    assert_eq!(
        after.worker("llamapool_worker_restarts_total", 1 - id),
        Some(0.0)
    );
    assert_eq!(
        after.worker("llamapool_worker_hung_kills_total", id),
        Some(0.0),
        "a death is no hang"
    );
}

/// The model-server protocol a gateway's endpoint picker reads (vLLM's names), and smg's load
/// report (`/v1/loads`), follow the pool: two single-slot workers and three long streams are
/// two running and one waiting, then nothing once they end.
#[test]
fn the_gateway_load_gauges_follow_the_pool() {
    let server = Server::start(&smol_config(
        "keepalive_secs = 1\nmax_queued = 4",
        (1, 2048),
        PINNED_0_1,
    ));
    let idle = Scrape::take(&server);
    for family in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
    ] {
        assert_eq!(
            idle.types.get(family).map(String::as_str),
            Some("gauge"),
            "{family}"
        );
    }
    let cells: f64 = server
        .workers()
        .iter()
        .map(|w| w["slots"].as_f64().unwrap() * w["n_ctx_per_seq"].as_f64().unwrap())
        .sum();
    let blocks = ((cells as u64) / 64).to_string();
    assert_eq!(
        idle.get(
            "vllm:cache_config_info",
            &[("block_size", "64"), ("num_gpu_blocks", &blocks)]
        ),
        Some(1.0)
    );
    assert_eq!(idle.get("vllm:num_requests_running", &[]), Some(0.0));
    assert_eq!(idle.get("vllm:num_requests_waiting", &[]), Some(0.0));

    let streams: Vec<SseReader> = (0..3)
        .map(|i| {
            let mut body = chat(&format!("Write a long story number {i}."), 400, true);
            body["ignore_eos"] = json!(true);
            server.stream(CHAT, &body)
        })
        .collect();
    let busy = scrape_until(&server, "two running and one waiting", |s| {
        s.value("vllm:num_requests_running", &[]) == 2.0
            && s.value("vllm:num_requests_waiting", &[]) == 1.0
    });
    let usage = busy.value("vllm:kv_cache_usage_perc", &[]);
    assert!(usage > 0.0 && usage <= 1.0, "KV usage {usage}");
    let loads = server.get("/v1/loads");
    assert_eq!(loads.status, 200, "{}", loads.text());
    let body = loads.json();
    assert_eq!(body["dp_rank_count"], 1, "{body}");
    let load = &body["loads"][0];
    assert_eq!(load["num_total_reqs"], 3, "{body}");
    assert_eq!(load["max_running_requests"], 2, "{body}");
    assert_eq!(load["max_total_num_tokens"].as_f64(), Some(cells), "{body}");
    let token_usage = load["token_usage"].as_f64().unwrap();
    assert!(token_usage > 0.0 && token_usage <= 1.0, "{body}");

    drop(streams);
    scrape_until(&server, "nothing running or waiting", |s| {
        s.value("vllm:num_requests_running", &[]) == 0.0
            && s.value("vllm:num_requests_waiting", &[]) == 0.0
    });
}
