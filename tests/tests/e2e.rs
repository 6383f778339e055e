//! End to end: the real router, two real pinned workers, the real SmolLM2 model, real sockets.

use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

/// [`llamapool_tests::chat`] that asks for a usage chunk at the end of a stream.
fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    let mut body = llamapool_tests::chat(content, max_tokens, stream);
    body["stream_options"] = json!({"include_usage": true});
    body
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

/// Checks the whole SSE shape and returns (text, finish_reason, usage if sent).
fn check_stream(payloads: &[String], object: &str, chat: bool) -> (String, String, Option<Value>) {
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "the stream ends with [DONE]"
    );
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {p}")))
        .collect();
    assert!(!chunks.is_empty());
    let (id, created) = (chunks[0]["id"].clone(), chunks[0]["created"].clone());
    for c in &chunks {
        assert!(c.get("error").is_none(), "error event: {c}");
        assert_eq!(c["id"], id);
        assert_eq!(c["created"], created);
        assert_eq!(c["model"], "smol");
        assert_eq!(c["object"], object);
    }
    if chat {
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["role"], "assistant",
            "the first chat chunk carries the role"
        );
    }
    let usage = chunks
        .last()
        .filter(|c| c["choices"] == json!([]))
        .map(|c| c["usage"].clone());
    let choice_chunks: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"] != json!([]))
        .collect();
    let last = choice_chunks.last().expect("a finish chunk");
    let finish = last["choices"][0]["finish_reason"]
        .as_str()
        .expect("finish_reason on the last choice chunk")
        .to_string();
    if chat {
        assert_eq!(
            last["choices"][0]["delta"],
            json!({}),
            "the finish chunk has an empty delta"
        );
    }
    for c in &choice_chunks[..choice_chunks.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    let text: String = choice_chunks
        .iter()
        .map(|c| {
            let choice = &c["choices"][0];
            if chat {
                choice["delta"]["content"].as_str()
            } else {
                choice["text"].as_str()
            }
            .unwrap_or("")
            .to_string()
        })
        .collect();
    (text, finish, usage)
}

#[test]
fn chat_and_completions_give_the_same_text_streaming_or_not() {
    let server = Server::start(&TWO_WORKERS);
    // Chat.
    let r = server.post(
        "/v1/chat/completions",
        &chat("Name three fruits.", 24, false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "smol");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(v["timings"]["predicted_n"].as_u64().unwrap() >= 1);
    let payloads = server
        .stream(
            "/v1/chat/completions",
            &chat("Name three fruits.", 24, true),
        )
        .collect();
    let (streamed, finish, stream_usage) = check_stream(&payloads, "chat.completion.chunk", true);
    assert_eq!(streamed, text);
    assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());
    // The same prompt again: a worker's prompt cache may hold all of it but its last token.
    let (mut usage, mut stream_usage) = (usage.clone(), stream_usage.expect("usage chunk"));
    for u in [&mut usage, &mut stream_usage] {
        let cached = u["prompt_tokens_details"]["cached_tokens"].take();
        assert!(cached.as_u64().unwrap() < u["prompt_tokens"].as_u64().unwrap());
    }
    assert_eq!(stream_usage, usage);

    // Completions.
    let r = server.post(
        "/v1/completions",
        &completion("The capital of France is", 12, false),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let payloads = server
        .stream(
            "/v1/completions",
            &completion("The capital of France is", 12, true),
        )
        .collect();
    let (streamed, _, no_usage) = check_stream(&payloads, "text_completion", false);
    assert_eq!(streamed, text);
    assert!(
        no_usage.is_none(),
        "usage chunk only with stream_options.include_usage"
    );
    // A token-array prompt works too.
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": [504, 3575, 282], "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 3);
}

#[test]
fn eight_concurrent_streams_end_with_done_and_correct_usage() {
    let server = Server::start(&TWO_WORKERS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u32)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let mut body = chat(
                        &format!("Tell me fact number {i} about the sea."),
                        20 + i,
                        true,
                    );
                    body["ignore_eos"] = json!(true);
                    let payloads = server.stream("/v1/chat/completions", &body).collect();
                    let (_, finish, usage) = check_stream(&payloads, "chat.completion.chunk", true);
                    assert_eq!(finish, "length");
                    assert_eq!(usage.expect("usage")["completion_tokens"], 20 + i);
                })
            })
            .collect();
        for h in handles {
            h.join().expect("stream thread");
        }
    });
    // Both workers took part.
    let workers = server.workers();
    assert!(workers.iter().all(|w| w["restarts"] == 0));
}

/// At start-up `/health` turns 200 only once no worker is still in its first start, so the
/// first requests a client sends after it can go to every worker, not only the quickest.
#[test]
fn health_at_start_up_waits_for_every_first_start() {
    let server = Server::launch(&TWO_WORKERS);
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.get("/health").status != 200 {
        assert!(Instant::now() < deadline, "the pool never became healthy");
        std::thread::sleep(Duration::from_millis(2));
    }
    let workers = server.workers();
    assert!(
        workers.iter().all(|w| w["state"] != "starting"),
        "healthy while a worker still starts: {workers:?}"
    );
}

#[test]
fn models_health_workers_and_metrics_show_two_pinned_workers() {
    let server = Server::start(&TWO_WORKERS);
    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(models["data"][0]["owned_by"], "llamapool");
    assert_eq!(models["data"][0]["meta"]["n_vocab"], 49152);
    let health = server.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let workers = server.workers();
    assert_eq!(workers.len(), 2);
    let mut seen = Vec::new();
    for w in &workers {
        assert_eq!(w["state"], "ready");
        assert_eq!(w["slots"], 4);
        let pid = u32::try_from(w["pid"].as_u64().expect("pid")).unwrap();
        let expected = w["cpus"].as_str().unwrap().to_string();
        let lists = cpus_allowed_of_threads(pid);
        assert!(!lists.is_empty());
        assert!(
            lists.iter().all(|l| *l == expected),
            "worker {pid} threads run on {lists:?}, expected {expected}"
        );
        seen.push(expected);
    }
    seen.sort();
    assert_eq!(
        seen,
        vec!["0", "1"],
        "the two workers are pinned to different CPUs"
    );
    let tokenized = server
        .post(
            "/tokenize",
            &json!({"content": "Hello world", "with_pieces": true}),
        )
        .json();
    let pieces = tokenized["tokens"].as_array().unwrap();
    assert_eq!(pieces[0]["piece"], "Hello");
    let ids: Vec<Value> = pieces.iter().map(|p| p["id"].clone()).collect();
    let detok = server.post("/detokenize", &json!({ "tokens": ids })).json();
    assert_eq!(detok["content"], "Hello world");
    let _ = server.post("/v1/completions", &completion("Hi", 3, false));
    let metrics = server.get("/metrics").text();
    for name in [
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:requests_processing",
        "llamacpp:n_decode_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

fn wait_until_idle(server: &Server, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let workers = server.workers();
        if workers
            .iter()
            .all(|w| w["running"] == 0 && w["waiting"] == 0 && w["in_flight"] == 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sequences still held: {workers:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_disconnect_frees_the_sequence() {
    let server = Server::start(&TWO_WORKERS);
    let mut body = chat("Write a very long story.", 900, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream("/v1/chat/completions", &body);
    assert_eq!(reader.status, 200);
    for _ in 0..4 {
        reader.next_data().expect("a chunk");
    }
    let busy = server.workers();
    assert_eq!(
        busy.iter()
            .map(|w| w["running"].as_u64().unwrap())
            .sum::<u64>(),
        1,
        "{busy:?}"
    );
    drop(reader);
    wait_until_idle(&server, Duration::from_secs(10));
    // The freed slot serves the next request.
    assert_eq!(
        server
            .post("/v1/chat/completions", &chat("Hi", 4, false))
            .status,
        200
    );
}

#[test]
fn bad_inputs_get_openai_errors_and_harm_nothing() {
    // With model.strict_name, an unknown model name is a 404 (by default any name is served).
    let strict = TWO_WORKERS.replace("alias = \"smol\"", "alias = \"smol\"\nstrict_name = true");
    let server = Server::start(&strict);
    let pids: Vec<Value> = server.workers().iter().map(|w| w["pid"].clone()).collect();
    let long_prompt = "hello ".repeat(3000);
    let big_body = format!("{{\"prompt\":\"{}\"}}", "x".repeat(200_000));
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/v1/chat/completions",
            b"{not json".to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            b"[]".to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":"hi"}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"n":17}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"x"}],"stop":5}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "not_found_error",
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"prompt":[1,2,999999]}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": long_prompt}).to_string().into_bytes(),
            400,
            "exceed_context_size_error",
        ),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": long_prompt, "stream": true})
                .to_string()
                .into_bytes(),
            400,
            "exceed_context_size_error",
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"prompt":"x","max_tokens":5000}"#.to_vec(),
            400,
            "exceed_context_size_error",
        ),
        (
            "POST",
            "/v1/completions",
            big_body.into_bytes(),
            413,
            "invalid_request_error",
        ),
        (
            "POST",
            "/tokenize",
            br#"{"content":5}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/detokenize",
            br#"{"tokens":[-4]}"#.to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "GET",
            "/v1/chat/completions",
            Vec::new(),
            405,
            "invalid_request_error",
        ),
        (
            "DELETE",
            "/v1/models",
            Vec::new(),
            405,
            "invalid_request_error",
        ),
        ("GET", "/v2/everything", Vec::new(), 404, "not_found_error"),
    ];
    for (method, path, body, status, kind) in cases {
        let r = server.request(method, path, Some(&body));
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert_eq!(r.status, status, "{method} {path} {shown}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let v = r.json();
        let error = &v["error"];
        assert_eq!(error["type"], kind, "{method} {path} {shown}: {v}");
        assert!(!error["message"].as_str().unwrap_or("").is_empty());
        for key in ["param", "code"] {
            assert!(error.get(key).is_some(), "{key} missing in {v}");
        }
        if kind == "exceed_context_size_error" {
            assert_eq!(error["n_ctx"], 1024);
            assert!(error["n_prompt_tokens"].as_u64().is_some());
        }
    }
    // Nothing was harmed: same worker processes, no restarts, normal service.
    let workers = server.workers();
    assert_eq!(
        workers.iter().map(|w| w["pid"].clone()).collect::<Vec<_>>(),
        pids
    );
    assert!(workers
        .iter()
        .all(|w| w["restarts"] == 0 && w["state"] == "ready"));
    let r = server.post("/v1/chat/completions", &chat("Hello", 5, false));
    assert_eq!(r.status, 200);
    wait_until_idle(&server, Duration::from_secs(10));
}

#[test]
fn api_key_and_queue_limits() {
    let server = Server::start(&smol_config(
        "api_key = \"sesame\"\nmax_queued = 0",
        (1, 2048),
        PINNED_0,
    ));
    let r = server.post("/v1/chat/completions", &chat("Hi", 2, false));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    for path in ["/workers", "/metrics", "/v1/models"] {
        assert_eq!(server.get(path).status, 401, "{path} needs the key");
    }
    assert_eq!(
        server.get("/health").status,
        200,
        "/health stays open for probes"
    );
    let key = [("Authorization", "Bearer sesame")];
    let authed = |body: &Value| {
        let r = http::request(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            &key,
            body.to_string().as_bytes(),
        )
        .unwrap();
        format!(
            "HTTP/1.1 {} {}",
            r.status,
            r.headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect::<String>()
        ) + &r.text()
    };
    let in_flight = || {
        let r = http::request(&server.addr, "GET", "/workers", &key, b"").unwrap();
        r.json()["workers"][0]["in_flight"].as_u64().unwrap()
    };
    assert!(authed(&chat("Hi", 2, false)).starts_with("HTTP/1.1 200"));
    // One slot, no queue: while a long request runs, another gets 429 with Retry-After.
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            let mut body = chat("Write a long story.", 300, false);
            body["ignore_eos"] = json!(true);
            authed(&body)
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while in_flight() == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let rejected = authed(&chat("Hi", 2, false));
        assert!(rejected.starts_with("HTTP/1.1 429"), "{rejected}");
        assert!(rejected.to_ascii_lowercase().contains("retry-after: 1"));
        assert!(rejected.contains("rate_limit_error"));
        assert!(long.join().unwrap().starts_with("HTTP/1.1 200"));
    });
}

#[test]
fn a_killed_worker_is_respawned_and_its_stream_continues_elsewhere() {
    let server = Server::start(&TWO_WORKERS);
    let mut body = chat("Write a long story about a ship.", 120, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream("/v1/chat/completions", &body);
    let mut payloads = Vec::new();
    for _ in 0..5 {
        payloads.push(reader.next_data().expect("a chunk"));
    }
    let workers = server.workers();
    let busy = workers
        .iter()
        .find(|w| w["in_flight"] == 1)
        .expect("one worker runs the stream");
    let (id, pid) = (busy["id"].clone(), busy["pid"].as_u64().unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    payloads.extend(reader.collect());
    let (_, finish, usage) = check_stream(&payloads, "chat.completion.chunk", true);
    assert_eq!(finish, "length");
    assert_eq!(
        usage.expect("usage")["completion_tokens"],
        120,
        "the stream continued to the full length on the other worker"
    );
    // The dead worker comes back with a new pid.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = server
            .workers()
            .into_iter()
            .find(|w| w["id"] == id)
            .unwrap();
        if w["state"] == "ready" && w["pid"].as_u64() != Some(pid) {
            assert!(w["restarts"].as_u64().unwrap() >= 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker was not respawned: {w}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        server
            .post("/v1/completions", &completion("Hello", 4, false))
            .status,
        200
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_leaves_no_worker_behind() {
    let mut server = Server::start(&TWO_WORKERS);
    let pids: Vec<u32> = server
        .workers()
        .iter()
        .map(|w| u32::try_from(w["pid"].as_u64().unwrap()).unwrap())
        .collect();
    let mut body = chat("Count to fifty.", 60, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream("/v1/chat/completions", &body);
    let first = reader.next_data().expect("a first chunk");
    assert!(
        server.terminate(Duration::from_secs(60)),
        "the router did not exit after SIGTERM"
    );
    let mut payloads = vec![first];
    payloads.extend(reader.collect());
    let (_, finish, usage) = check_stream(&payloads, "chat.completion.chunk", true);
    assert_eq!(
        finish, "length",
        "the in-flight stream was finished, not cut"
    );
    assert_eq!(usage.unwrap()["completion_tokens"], 60);
    for pid in pids {
        assert!(!process_alive(pid), "worker {pid} outlived the router");
    }
}

#[test]
fn the_official_openai_python_client_works() {
    let server = Server::start(&TWO_WORKERS);
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens >= 1, r
text = "".join((c.choices[0].delta.content or "") for c in client.chat.completions.create(
    model="smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, stream=True) if c.choices)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
c = client.completions.create(model="smol", prompt="The sky is", max_tokens=6, temperature=0)
assert c.choices[0].text, c
text = "".join(x.choices[0].text for x in client.completions.create(model="smol", prompt="The sky is", max_tokens=6, temperature=0, stream=True) if x.choices)
assert text == c.choices[0].text, (text, c.choices[0].text)
chunks = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
    stream=True, stream_options={"include_usage": True}))
assert chunks[-1].usage.completion_tokens == 4 or chunks[-1].usage.completion_tokens >= 1, chunks[-1]
try:
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    raise SystemExit("expected an error")
except openai.BadRequestError as e:
    assert e.status_code == 400
print("ok")
"#;
    run_openai_client(&server, script);
}

#[test]
fn no_ready_worker_means_503_and_bad_configs_name_their_key() {
    // The worker exits at load (unknown chat template), so it never becomes ready.
    let server = Server::launch(
        r#"
[server]
listen = "127.0.0.1:0"
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
alias = "smol"
chat_template = "no-such-template"
[[workers]]
cpus = "0"
"#,
    );
    let health = server.get("/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["error"]["type"], "unavailable_error");
    let r = server.post("/v1/chat/completions", &chat("Hi", 2, false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "unavailable_error");
    assert!(r.header("retry-after").is_some());
    // `/slots` shows what a worker that is not ready will hold: its configured context over
    // its slots (the defaults, 16384 cells and 16 slots).
    let slots = server.get("/slots").json();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 16);
    assert!(slots.iter().all(|s| s["n_ctx"] == 1024), "{slots:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = &server.workers()[0];
        assert_ne!(w["state"], "ready");
        if w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("exited"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no start-up error reported: {w}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Invalid configurations stop the router before anything starts, naming the key.
    let dir = scratch_dir("badconfig").unwrap();
    for (config, key) in [
        (
            "[[workers]]\ncpus = \"0\"\n[[workers]]\ncpus = \"0-1\"\n",
            "workers[1].cpus",
        ),
        ("[[workers]]\ncpus = \"4096\"\n", "workers[0].cpus"),
        ("[worker_defaults]\nslots = 0\n", "workers[0].slots"),
        (
            "[model]\npath = \"/nonexistent/model.gguf\"\n",
            "model.path",
        ),
        ("[server]\nlisten_on = \"x\"\n", "listen_on"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(bin_dir().join("llamapool-router"))
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .env("LLAMAPOOL_MODELS", models_dir())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{config} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "{key} not named for {config:?}: {stderr}"
        );
    }
}
