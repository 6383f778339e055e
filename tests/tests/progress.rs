//! llama-server's `return_progress` and `timings_per_token` on streams, end to end (real
//! router, one real worker, SmolLM2): small batches (`n_batch = 64`) make a long prompt take
//! several prefill steps, so several `prompt_progress` chunks come before the first token;
//! per-token `timings` grow with each chunk; without the flags, streams are as before.

use llamapool_tests::*;
use serde_json::{json, Value};

/// One worker of 2 slots, prefilling at most 64 tokens a step.
fn config() -> String {
    smol_config(
        "keepalive_secs = 1",
        (2, 2048),
        &["cpus = \"0\"\nn_batch = 64\nn_ubatch = 64"],
    )
}

/// Some 250 tokens: four or more prefill steps.
fn long_prompt() -> String {
    "The quick brown fox jumps over the lazy dog, and then it runs away. ".repeat(17)
}

/// A stream's JSON payloads (without `[DONE]`).
fn chunks(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    server
        .stream(path, body)
        .collect()
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}")))
        .collect()
}

/// The `prompt_progress` objects of a stream's chunks, which must all come before the first
/// chunk without one, and that chunk's index.
fn progress_then_rest(chunks: &[Value]) -> (Vec<&Value>, usize) {
    let first_other = chunks
        .iter()
        .position(|c| c.get("prompt_progress").is_none())
        .expect("a chunk after the progress");
    assert!(
        chunks[first_other..]
            .iter()
            .all(|c| c.get("prompt_progress").is_none()),
        "progress after the first token: {chunks:?}"
    );
    let progress = chunks[..first_other]
        .iter()
        .map(|c| &c["prompt_progress"])
        .collect();
    (progress, first_other)
}

/// Progress reports advance from `cache` to `total` in time; returns `(total, cache)`.
fn check_progress(progress: &[&Value]) -> (u64, u64) {
    let field = |p: &Value, key: &str| p[key].as_u64().unwrap_or_else(|| panic!("{key} in {p}"));
    let (total, cache) = (field(progress[0], "total"), field(progress[0], "cache"));
    assert_eq!(field(progress[0], "processed"), cache, "{progress:?}");
    for pair in progress.windows(2) {
        assert_eq!(field(pair[1], "total"), total);
        assert_eq!(field(pair[1], "cache"), cache);
        assert!(field(pair[0], "processed") < field(pair[1], "processed"));
        assert!(pair[0]["time_ms"].as_f64().unwrap() <= pair[1]["time_ms"].as_f64().unwrap());
    }
    assert_eq!(field(progress.last().unwrap(), "processed"), total);
    (total, cache)
}

const TIMINGS_KEYS: [&str; 9] = [
    "cache_n",
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
];

fn check_timings_shape(t: &Value) {
    for key in TIMINGS_KEYS {
        assert!(t[key].as_f64().is_some(), "timings.{key}: {t}");
    }
}

#[test]
fn native_stream_reports_prompt_progress_before_the_first_token() {
    let server = Server::start(&config());
    let body = json!({
        "prompt": long_prompt(),
        "stream": true,
        "return_progress": true,
        "n_predict": 4,
        "temperature": 0,
        "cache_prompt": false,
    });
    let stream = chunks(&server, "/completion", &body);
    let (progress, first_token) = progress_then_rest(&stream);
    assert!(progress.len() >= 3, "several prefill steps: {progress:?}");
    let (total, cache) = check_progress(&progress);
    assert_eq!(cache, 0, "cache_prompt is off");
    for c in &stream[..first_token] {
        assert_eq!(c["content"], "", "{c}");
        assert_eq!(c["tokens"], json!([]), "{c}");
        assert_eq!(c["stop"], false, "{c}");
        assert_eq!(c["tokens_evaluated"], total, "{c}");
        assert!(c.get("timings").is_none(), "timings_per_token is off: {c}");
    }
    let (last, partial) = stream.split_last().unwrap();
    assert!(partial[first_token..]
        .iter()
        .all(|c| c["stop"] == false && c.get("timings").is_none()));
    assert_eq!(last["stop"], true, "{last}");
    assert_eq!(last["tokens_evaluated"], total, "{last}");
    let t = &last["timings"];
    check_timings_shape(t);
    assert_eq!(
        t["prompt_n"].as_u64().unwrap() + t["cache_n"].as_u64().unwrap(),
        total
    );

    // Again, with the prompt cache: the first report is what was found there.
    let mut again = body.clone();
    again["cache_prompt"] = json!(true);
    let stream = chunks(&server, "/completion", &again);
    let (progress, _) = progress_then_rest(&stream);
    let (total_again, cache) = check_progress(&progress);
    assert_eq!(total_again, total);
    assert!(cache > 0, "{progress:?}");
    assert_eq!(stream.last().unwrap()["timings"]["cache_n"], cache);
}

#[test]
fn openai_streams_report_progress_and_per_token_timings() {
    let server = Server::start(&config());
    let prompt = long_prompt();

    // Chat with both: progress chunks (the role delta, `content: null`), then content chunks
    // whose `timings` count the tokens so far.
    let mut body = chat(&prompt, 8, true);
    body["return_progress"] = json!(true);
    body["timings_per_token"] = json!(true);
    body["cache_prompt"] = json!(false);
    body["stream_options"] = json!({"include_usage": true});
    let stream = chunks(&server, "/v1/chat/completions", &body);
    // Our role chunk comes first, as without progress.
    assert_eq!(stream[0]["choices"][0]["delta"]["role"], "assistant");
    let (progress, first_token) = progress_then_rest(&stream[1..]);
    assert!(progress.len() >= 3, "several prefill steps: {progress:?}");
    let (total, _) = check_progress(&progress);
    for c in &stream[1..=first_token] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(
            c["choices"][0]["delta"],
            json!({"role": "assistant", "content": null}),
            "{c}"
        );
        check_timings_shape(&c["timings"]);
        assert_eq!(c["timings"]["predicted_n"], 0, "{c}");
    }
    let content: Vec<&Value> = stream[first_token + 1..]
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .collect();
    assert!(content.len() >= 2, "{stream:?}");
    let mut last_n = 0;
    for c in &content {
        let t = &c["timings"];
        check_timings_shape(t);
        let n = t["predicted_n"].as_u64().unwrap();
        assert!(n > last_n, "predicted_n grows by chunk: {content:?}");
        last_n = n;
        assert_eq!(
            t["prompt_n"].as_u64().unwrap() + t["cache_n"].as_u64().unwrap(),
            total
        );
    }
    let usage = &stream.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], total, "{usage}");
    assert!(last_n <= usage["completion_tokens"].as_u64().unwrap());

    // Completions with progress only: empty-text progress chunks, no per-token timings.
    let body = json!({
        "model": "smol",
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0,
        "stream": true,
        "return_progress": true,
    });
    let stream = chunks(&server, "/v1/completions", &body);
    let (progress, first_token) = progress_then_rest(&stream);
    assert!(!progress.is_empty());
    check_progress(&progress);
    for c in &stream[..first_token] {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "", "{c}");
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
    let finish = stream
        .iter()
        .position(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert!(stream[..finish].iter().all(|c| c.get("timings").is_none()));
}

#[test]
fn without_the_flags_streams_have_no_progress_and_timings_only_at_the_end() {
    let server = Server::start(&config());
    let prompt = long_prompt();
    let native = chunks(
        &server,
        "/completion",
        &json!({"prompt": prompt, "stream": true, "n_predict": 4}),
    );
    let (last, partial) = native.split_last().unwrap();
    assert!(!partial.is_empty());
    assert!(partial
        .iter()
        .all(|c| c.get("prompt_progress").is_none() && c.get("timings").is_none()));
    check_timings_shape(&last["timings"]);

    let chat_stream = chunks(&server, "/v1/chat/completions", &chat(&prompt, 4, true));
    let with_timings: Vec<usize> = (0..chat_stream.len())
        .filter(|&i| chat_stream[i].get("timings").is_some())
        .collect();
    let finish = chat_stream
        .iter()
        .position(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(with_timings, [finish], "{chat_stream:?}");
    assert!(chat_stream
        .iter()
        .all(|c| c.get("prompt_progress").is_none()));
    // A non-streamed request with the flags is unchanged: its result has the timings.
    let mut body = chat(&prompt, 4, false);
    body["return_progress"] = json!(true);
    body["timings_per_token"] = json!(true);
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    check_timings_shape(&r.json()["timings"]);
}
