//! Issue 17's attacks, one after the other, against one router with the default
//! configuration (one adaptive worker per core) and the real model, while a stream is under
//! way: every attack gets its clear error, no worker dies, a plain request gets 200 right
//! after each, the stream keeps its pace, the foreign page's POST changes nothing, and the
//! router's peak resident memory stays under 300 MB.

use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

/// The pids and restart counts of the workers: unchanged means no worker died.
fn lives(router: &Router) -> Vec<(Value, Value)> {
    router
        .workers()
        .iter()
        .map(|w| (w["pid"].clone(), w["restarts"].clone()))
        .collect()
}

fn plain(router: &Router) -> u16 {
    router
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
        )
        .status
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn nested_array_schema(depth: usize) -> Value {
    let mut schema = json!({"type": "string"});
    for _ in 0..depth {
        schema = json!({"type": "array", "items": schema});
    }
    schema
}

#[test]
fn no_attack_costs_a_worker_the_pool_or_the_stream_under_way() {
    let mut router = Router::launch(DEFAULT_CONFIG).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = lives(&router);

    // A stream under way all along: its largest gap between two events is its pace.
    let mut stream = router.stream(
        "/v1/completions",
        &json!({"prompt": "Tell a long story about the sea.", "max_tokens": 400,
                "ignore_eos": true, "temperature": 0, "stream": true}),
    );
    let watcher = std::thread::spawn(move || {
        let (mut events, mut widest, mut last) = (0, Duration::ZERO, Instant::now());
        while let Some(data) = stream.next_data() {
            if data == "[DONE]" {
                return Ok((events, widest));
            }
            if data.contains("\"error\"") {
                return Err(data);
            }
            events += 1;
            if events > 1 {
                widest = widest.max(last.elapsed());
            }
            last = Instant::now();
        }
        Err("no [DONE]".to_string())
    });
    std::thread::sleep(Duration::from_millis(500));

    let nested_groups = format!(
        "root ::= {}\"a\"{}",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    let repetition = format!(
        "root ::= {}",
        vec![format!("\"{}\"{{2000}}", "x".repeat(1000)); 250].join(" ")
    );
    let attacks: Vec<(&str, &str, Value, u16)> = vec![
        (
            "nested groups, n = 16",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 4, "n": 16, "grammar": nested_groups}),
            400,
        ),
        (
            "repetition expansion",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 4, "grammar": repetition}),
            400,
        ),
        (
            "schema nested 30 deep",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_schema",
                   "json_schema": {"schema": nested_array_schema(30)}}}),
            200,
        ),
        (
            "schema nested 200 deep",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_schema",
                   "json_schema": {"schema": nested_array_schema(200)}}}),
            400,
        ),
        (
            "native prompt fan-out",
            "/completion",
            json!({"prompt": (0..5000).map(|i| if i % 2 == 0 { json!("a") } else { json!(1) }).collect::<Vec<_>>(), "n_predict": 1}),
            400,
        ),
        (
            "logit_bias of 40 000 entries",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 1,
                   "logit_bias": (0..40_000).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
            400,
        ),
    ];
    for (name, path, body, status) in attacks {
        let started = Instant::now();
        let r = router.post(path, &body);
        assert_eq!(r.status, status, "{name}: {}", r.text());
        if status != 200 {
            let error = &r.json()["error"];
            assert!(
                error["message"].is_string() && error["type"].is_string(),
                "{name}: {error}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: {:?}",
            started.elapsed()
        );
        assert_eq!(plain(&router), 200, "a plain request right after {name}");
        assert_eq!(lives(&router), before, "a worker died of {name}");
    }

    // A foreign page's simple POST to the admin API changes nothing.
    let (status, answer) = raw_post(
        &router.addr,
        "/admin/workers/0/drain",
        &[
            ("Content-Type", "text/plain"),
            ("Origin", "https://evil.example"),
        ],
        b"drain",
    );
    assert!(status == 403 || status == 401, "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{answer}"
    );
    assert!(
        router.workers().iter().all(|w| w["state"] == "ready"),
        "{:?}",
        router.workers()
    );

    let (events, widest) = watcher.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(events > 100, "{events} events");
    assert!(
        widest < Duration::from_secs(3),
        "the stream stalled for {widest:?}"
    );
    assert_eq!(lives(&router), before);
    let peak = peak_rss_kib(router.pid());
    assert!(peak > 0 && peak < 300 * 1024, "router peak RSS {peak} KiB");
}

/// The Messages and Responses routes (issue 20) take the same hostile bodies as the others, on
/// the default configuration: garbage, JSON nested past serde's limit and a body over
/// `server.max_body_bytes` are clear errors before anything is dispatched; a body just under
/// the limit holding one 3.5 MB message is rendered and tokenized by a worker and refused as
/// too long for the context (or, for `count_tokens`, counted). No worker dies, the router
/// stays small, and a plain request is served after each.
#[test]
fn the_messages_and_responses_routes_refuse_hostile_bodies_clearly() {
    let mut router = Router::launch(DEFAULT_CONFIG).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = lives(&router);
    let huge = "hello ".repeat(600_000);
    let routes: [(&str, Value); 3] = [
        (
            "/v1/messages",
            json!({"max_tokens": 4, "messages": [{"role": "user", "content": huge}]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"messages": [{"role": "user", "content": huge}]}),
        ),
        (
            "/v1/responses",
            json!({"max_output_tokens": 4, "input": huge}),
        ),
    ];
    let deep = format!(
        "{{\"messages\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for (path, large) in routes {
        refuses_hostile_bodies(&router.addr, path, &deep, None);
        let start = Instant::now();
        let r = router.post(path, &large);
        if path.ends_with("count_tokens") {
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert!(r.json()["input_tokens"].as_u64().unwrap() > 500_000);
        } else {
            assert_eq!(r.status, 400, "{path}: {}", r.text());
            assert_eq!(r.json()["error"]["type"], "exceed_context_size_error");
        }
        eprintln!("{path}: 3.5 MB message answered in {:?}", start.elapsed());
        assert_eq!(plain(&router), 200, "after {path}");
        assert_eq!(lives(&router), before, "after {path}");
    }
    let peak = peak_rss_kib(router.pid());
    assert!(peak < 300 * 1024, "router peak {peak} KiB");
}

/// The embedding and rerank routes take the same hostile bodies as the others, on a pool that
/// generates on one worker and embeds (pooling `rank`, so `/v1/rerank` is served too) on the
/// other: garbage, JSON nested past serde's limit, a body announced over
/// `server.max_body_bytes` and one trickled past `server.body_read_timeout_secs` are clear
/// errors before anything is dispatched; a body just under the limit holding one 3.5 MB input
/// is tokenized by the embedding worker and refused as too large. No worker dies, the router
/// stays small, and a plain completion and a plain embedding are served after each.
#[test]
fn the_embedding_routes_refuse_hostile_bodies_clearly() {
    let mut router = Router::launch(
        &smol_config(
            "body_read_timeout_secs = 2",
            (2, 2048),
            &[r#"cpus = "0""#, "cpus = \"1\"\nembedding = true"],
        )
        .replace("alias = \"smol\"", "alias = \"smol\"\npooling = \"rank\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = lives(&router);
    let huge = "hello ".repeat(600_000);
    let routes: [(&str, Value); 3] = [
        ("/v1/embeddings", json!({ "input": huge })),
        ("/embedding", json!({ "content": [huge] })),
        ("/v1/rerank", json!({"query": huge, "documents": ["a"]})),
    ];
    let deep = format!(
        "{{\"input\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let embeds = |router: &Router| {
        router
            .post("/v1/embeddings", &json!({"input": "hello"}))
            .status
    };
    for (path, large) in routes {
        refuses_hostile_bodies(&router.addr, path, &deep, Some(Duration::from_secs(2)));
        let r = router.post(path, &large);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains("too large"), "{path}: {}", r.text());
        assert_eq!(plain(&router), 200, "after {path}");
        assert_eq!(embeds(&router), 200, "after {path}");
        assert_eq!(lives(&router), before, "after {path}");
    }
    let peak = peak_rss_kib(router.pid());
    assert!(peak < 300 * 1024, "router peak {peak} KiB");
}
