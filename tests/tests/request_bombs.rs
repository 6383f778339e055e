//! One request must never take the pool down (issue 17): grammar bombs, schema bombs and
//! fan-out, on the real router with two real workers and SmolLM2. Each is a quick 400 naming
//! its parameter, no worker dies or restarts, the router's memory stays small, and the next
//! plain request is served.

use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": "smol", "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// The router's peak resident memory, in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn nested_arrays(depth: usize) -> Value {
    (0..depth).fold(
        json!({"type": "integer"}),
        |inner, _| json!({"type": "array", "items": inner}),
    )
}

#[test]
fn grammar_schema_and_fan_out_bombs_are_quick_400s_and_no_worker_dies() {
    let server = Server::start(&smol_config(
        "max_body_bytes = 1048576",
        (4, 2048),
        PINNED_0_1,
    ));
    let workers = |s: &Server| -> Vec<(Value, Value)> {
        s.workers()
            .iter()
            .map(|w| (w["pid"].clone(), w["restarts"].clone()))
            .collect()
    };
    let before = workers(&server);
    assert_eq!(before.len(), 2);
    let refused = |path: &str, body: &Value, param: &str| {
        let start = Instant::now();
        let r = server.post(path, body);
        let took = start.elapsed();
        assert_eq!(r.status, 400, "{param}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{}", r.text());
        assert!(took < Duration::from_secs(3), "{param}: {took:?}");
        eprintln!("{path} {param}: 400 in {took:?}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.len() < 400, "no grammar echoed: {message}");
        message
    };

    // 100 000 nested groups, n = 16: llama.cpp's recursive parser aborted every worker.
    let depth = 100_000;
    let nested = format!("root ::= {}\"a\"{}", "(".repeat(depth), ")".repeat(depth));
    let m = refused(
        "/v1/completions",
        &completion(json!({"grammar": nested, "n": 16})),
        "grammar",
    );
    assert!(m.contains("128 deep"), "{m}");
    let r = server.post("/v1/completions", &completion(json!({})));
    assert_eq!(r.status, 200, "{}", r.text());

    // A 1000-character literal repeated 2000 times, 250 times over: 500 million elements.
    let item = format!("\"{}\"{{2000}} ", "x".repeat(1000));
    let repeated = format!("root ::= {}", item.repeat(250));
    let m = refused(
        "/v1/completions",
        &completion(json!({"grammar": repeated})),
        "grammar",
    );
    assert!(m.contains("elements"), "{m}");
    // 16 rules `r ::= s "a" | s "b"` (400 bytes): 65 536 parse stacks, 115 s in llama.cpp.
    let mut layered = String::from("root ::= r0\n");
    for i in 0..16 {
        layered.push_str(&format!("r{i} ::= r{} \"a\" | r{} \"b\"\n", i + 1, i + 1));
    }
    layered.push_str("r16 ::= \"c\"\n");
    let m = refused(
        "/v1/completions",
        &completion(json!({"grammar": layered, "n": 16})),
        "grammar",
    );
    assert!(m.contains("ambiguous"), "{m}");
    // llama.cpp loops without end on a maximum below the minimum.
    refused(
        "/v1/completions",
        &completion(json!({"grammar": "root ::= \"x\"{5,3}"})),
        "grammar",
    );

    // Arrays nested 30 deep: 738 MB of grammar at 24 before; now a small grammar, served.
    let start = Instant::now();
    let r = server.post(
        "/v1/chat/completions",
        &json!({
            "model": "smol", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "A list, please."}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": nested_arrays(30)}},
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(start.elapsed() < Duration::from_secs(10));
    // Past 64 levels (JSON itself stops at 128): a 400 naming where.
    let m = refused(
        "/v1/chat/completions",
        &json!({
            "model": "smol", "max_tokens": 8,
            "messages": [{"role": "user", "content": "A list, please."}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": nested_arrays(80)}},
        }),
        "response_format",
    );
    assert!(m.contains("nested more than 64"), "{m}");

    // Fan-out: 300 strings in a mixed native prompt were 300 tokenize calls.
    let mixed: Vec<Value> = (0..300).flat_map(|_| [json!("a"), json!(1)]).collect();
    let m = refused(
        "/completion",
        &json!({"prompt": mixed, "n_predict": 2}),
        "prompt",
    );
    assert!(m.contains("256"), "{m}");
    let few: Vec<Value> = (0..8).flat_map(|_| [json!("a"), json!(1)]).collect();
    let r = server.post("/completion", &json!({"prompt": few, "n_predict": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    // logit_bias beyond 1024 entries.
    let biases: serde_json::Map<String, Value> =
        (0..2000).map(|t| (t.to_string(), json!(1))).collect();
    let m = refused(
        "/v1/completions",
        &completion(json!({"logit_bias": biases})),
        "logit_bias",
    );
    assert!(m.contains("1024"), "{m}");

    // The pool is whole: the same worker processes, never restarted, and serving.
    let r = server.post("/v1/completions", &completion(json!({"n": 4})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(workers(&server), before);
    assert!(before.iter().all(|(_, restarts)| restarts == 0));
    let peak = peak_kib(server.pid());
    assert!(peak < 256 * 1024, "the router peaked at {peak} KiB");
    eprintln!("router VmHWM {peak} KiB");
}
