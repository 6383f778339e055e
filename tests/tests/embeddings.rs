//! Embeddings and reranking end to end: the real router, real embedding workers and SmolLM2
//! (mean, last and no pooling), the unmodified `openai` client, a pool that generates and
//! embeds side by side, hostile inputs, and `/v1/rerank` on a tiny ranking model that
//! `scripts/make_tiny_reranker.py` writes (no ranking GGUF can be downloaded in CI).

use std::path::PathBuf;

use llamapool_tests::*;
use serde_json::{json, Value};

/// A config serving the model at `path` as `alias`, with embedding `pooling`: `defaults` are
/// more `[worker_defaults]` lines, each entry of `workers` the lines of one `[[workers]]` table.
fn config(path: &str, alias: &str, pooling: &str, defaults: &str, workers: &[&str]) -> String {
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[model]\npath = \"{path}\"\nalias = \"{alias}\"\n\
         pooling = \"{pooling}\"\n[worker_defaults]\n{defaults}\n"
    );
    for worker in workers {
        config.push_str(&format!("[[workers]]\n{worker}\n"));
    }
    config
}

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2 as `smol` on two pinned workers that serve embeddings with `pooling`.
fn embedding_pool(pooling: &str) -> Server {
    Server::start(&config(
        SMOL,
        "smol",
        pooling,
        "embedding = true\nslots = 4\ncontext = 2048",
        PINNED_0_1,
    ))
}

fn vectors(body: &Value) -> Vec<Vec<f64>> {
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i, "in input order");
            assert_eq!(item["object"], "embedding");
            item["embedding"]
                .as_array()
                .expect("a list of floats")
                .iter()
                .map(|x| x.as_f64().expect("a float"))
                .collect()
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn embed(server: &Server, input: Value) -> Value {
    let r = server.post("/v1/embeddings", &json!({"model": "smol", "input": input}));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn each_input_gets_its_normalised_vector_in_order_alone_or_batched() {
    let server = embedding_pool("mean");
    let texts = [
        "I believe the meaning of life is",
        "The giant panda is a bear native to China.",
        "fn main() { println!(\"hi\"); }",
        "I believe the meaning of life is",
    ];
    let body = embed(&server, json!(texts));
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "smol");
    let batched = vectors(&body);
    assert_eq!(batched.len(), 4);
    for v in &batched {
        assert_eq!(v.len(), 576, "SmolLM2's width");
        assert!((dot(v, v) - 1.0).abs() < 1e-3, "unit length: {}", dot(v, v));
    }
    assert!(
        dot(&batched[0], &batched[3]) > 0.9999,
        "same text, same vector"
    );
    assert!(
        dot(&batched[0], &batched[1]) < 0.99,
        "different texts differ"
    );
    let mut tokens = 0;
    for (text, in_batch) in texts.iter().zip(&batched) {
        let alone = embed(&server, json!(text));
        tokens += alone["usage"]["prompt_tokens"].as_u64().unwrap();
        let cos = dot(&vectors(&alone)[0], in_batch);
        assert!(cos > 0.9999, "alone and batched agree: {cos}");
    }
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["total_tokens"], tokens);
    // Embedded tokens count as prompt tokens and their decodes as decodes, as in llama-server.
    let metrics = server.get("/metrics").text();
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert_eq!(sample("llamacpp:prompt_tokens_total"), 2.0 * tokens as f64);
    assert!(sample("llamacpp:n_decode_total") > 0.0);
    assert_eq!(sample("llamacpp:tokens_predicted_total"), 0.0);
}

#[test]
fn token_ids_mixed_inputs_and_content_parts_are_inputs_too() {
    let server = embedding_pool("last");
    let tokenized = server.post("/tokenize", &json!({"content": "hello world"}));
    assert_eq!(tokenized.status, 200, "{}", tokenized.text());
    let ids = tokenized.json()["tokens"].clone();
    let body = embed(
        &server,
        json!([
            "hello world",
            ids,
            {"content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
            {"prompt_string": "hello world"},
        ]),
    );
    let v = vectors(&body);
    for other in &v[1..] {
        assert!(
            dot(&v[0], other) > 0.9999,
            "the same tokens, the same vector"
        );
    }
    // A list holding token ids is one input, its texts and ids in order.
    let mixed = embed(&server, json!(["hello", 1917]));
    assert_eq!(mixed["data"].as_array().unwrap().len(), 1);
}

#[test]
fn pooling_none_gives_a_vector_per_token_in_llama_servers_own_shape() {
    let server = embedding_pool("none");
    let n_tokens = server
        .post("/tokenize", &json!({"content": "one two three"}))
        .json()["tokens"]
        .as_array()
        .unwrap()
        .len();
    let r = server.post("/embedding", &json!({"content": "one two three"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body[0]["index"], 0);
    let per_token = body[0]["embedding"].as_array().unwrap();
    assert_eq!(per_token.len(), n_tokens);
    assert_eq!(per_token[0].as_array().unwrap().len(), 576);
    // OpenAI's shape has one vector per input: refused, as llama-server refuses it.
    let r = server.post("/v1/embeddings", &json!({"input": "one two three"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not OAI compatible"), "{}", r.text());
}

#[test]
fn bad_inputs_get_clear_errors_and_cost_no_worker() {
    let server = embedding_pool("mean");
    let pids: Vec<Value> = server.workers().iter().map(|w| w["pid"].clone()).collect();
    let long = "This is a test ".repeat(600);
    for (body, status, says) in [
        (json!({}), 400, "must be provided"),
        (json!({"input": []}), 400, "must not be empty"),
        (json!({"input": true}), 400, "an input is"),
        (json!({"input": ""}), 400, "cannot be empty"),
        (
            json!({"input": [[49152, 1]]}),
            400,
            "outside the vocabulary",
        ),
        (json!({"input": [-1]}), 400, "not a token id"),
        (json!({"input": long}), 400, "too large to process"),
        (
            json!({"input": "a", "encoding_format": "hex"}),
            400,
            "float or base64",
        ),
        (
            json!({"input": {"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}}),
            400,
            "multimodal",
        ),
        (json!({"input": vec!["x"; 2049]}), 400, "at most 2048"),
    ] {
        let r = server.post("/v1/embeddings", &body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{}", r.text());
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{body}: {}",
            r.text()
        );
    }
    let r = server.post("/v1/chat/completions", &chat("hi", 4, false));
    assert_eq!(
        r.status,
        501,
        "an embedding pool generates nothing: {}",
        r.text()
    );
    assert_eq!(r.json()["error"]["type"], "not_supported_error");
    let after: Vec<Value> = server.workers().iter().map(|w| w["pid"].clone()).collect();
    assert_eq!(pids, after, "no worker died");
    assert_eq!(vectors(&embed(&server, json!("still fine"))).len(), 1);
}

#[test]
fn the_openai_client_gets_base64_and_float_vectors() {
    let server = embedding_pool("mean");
    run_openai_client(
        &server,
        r#"
import sys, math, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
# The client asks for base64 unless told otherwise, and decodes it.
out = client.embeddings.create(model="smol", input=["hello world", "a panda"])
assert len(out.data) == 2 and out.data[1].index == 1, out
for item in out.data:
    assert len(item.embedding) == 576
    assert abs(sum(x * x for x in item.embedding) - 1) < 1e-3
floats = client.embeddings.create(model="smol", input="hello world", encoding_format="float")
cos = sum(a * b for a, b in zip(floats.data[0].embedding, out.data[0].embedding))
assert cos > 0.9999, cos
assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
print("ok")
"#,
    );
}

#[test]
fn a_mixed_pool_generates_and_embeds_side_by_side() {
    let server = Server::start(&config(
        SMOL,
        "smol",
        "mean",
        "slots = 4\ncontext = 4096",
        &["cpus = \"0\"", "cpus = \"1\"\nembedding = true\nslots = 8"],
    ));
    let workers = server.workers();
    assert_eq!(workers[0]["embedding"], Value::Null);
    assert_eq!(workers[1]["embedding"], "mean");
    let stream = server.stream("/v1/chat/completions", &chat("Count to ten.", 40, true));
    let body = embed(&server, json!(["during a generation", "another one"]));
    assert_eq!(vectors(&body).len(), 2);
    let chunks = stream.collect();
    assert!(chunks.len() > 2, "the stream ran: {chunks:?}");
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let r = server.post("/v1/chat/completions", &chat("hi", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let served: Vec<u64> = server
        .workers()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .collect();
    assert_eq!(served, [0, 0]);
}

#[test]
fn a_pool_without_embedding_workers_says_how_to_start_one() {
    let server = Server::start(&smol_config("", (2, 2048), PINNED_0));
    for path in ["/v1/embeddings", "/embedding", "/v1/rerank"] {
        let r = server.post(
            path,
            &json!({"input": "a", "query": "q", "documents": ["d"]}),
        );
        assert_eq!(r.status, 501, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "not_supported_error");
    }
}

/// A tiny BERT ranking model written by `scripts/make_tiny_reranker.py` (random weights).
fn tiny_reranker() -> (TempDir, PathBuf) {
    let dir = scratch_dir("reranker").expect("scratch dir");
    let path = dir.path().join("tiny-reranker.gguf");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/make_tiny_reranker.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&path)
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'gguf'"),
        "the gguf package is missing: scripts/test installs it (python3 -m pip install gguf)"
    );
    assert!(out.status.success(), "{}: {stderr}", script.display());
    (dir, path)
}

#[test]
fn rerank_scores_documents_on_a_ranking_model() {
    let (_dir, model) = tiny_reranker();
    let server = Server::start(&config(
        &model.display().to_string(),
        "ranker",
        "rank",
        "embedding = true\nslots = 4\ncontext = 2048",
        PINNED_0,
    ));
    let documents = ["hi", "the giant panda is a bear", "it is a cat"];
    let r = server.post(
        "/v1/rerank",
        &json!({"query": "what is a panda?", "documents": documents}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["relevance_score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    assert!(scores[0] > scores[2], "the scores differ: {scores:?}");
    let mut indices: Vec<u64> = results
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    indices.sort_unstable();
    assert_eq!(indices, [0, 1, 2]);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 9);
    // Each document's score does not depend on the others in its request.
    let alone = server.post(
        "/v1/rerank",
        &json!({"query": "what is a panda?", "documents": [documents[1]]}),
    );
    let alone = alone.json()["results"][0]["relevance_score"]
        .as_f64()
        .unwrap();
    let batched = results.iter().find(|r| r["index"] == 1).unwrap()["relevance_score"]
        .as_f64()
        .unwrap();
    assert!((alone - batched).abs() < 1e-4, "{alone} vs {batched}");
    // TEI's shape, and top_n.
    let r = server.post(
        "/rerank",
        &json!({"query": "q", "texts": documents, "return_text": true, "top_n": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let tei = r.json();
    assert_eq!(tei.as_array().unwrap().len(), 2);
    assert!(
        tei[0]["score"].is_f64() && tei[0]["text"].is_string(),
        "{tei}"
    );
    let r = server.post("/v1/rerank", &json!({"query": "q", "documents": []}));
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn an_embedding_worker_killed_mid_request_costs_the_request_nothing() {
    let server = embedding_pool("mean");
    let inputs: Vec<String> = (0..400)
        .map(|i| format!("document number {i} talks about topic {} at length", i % 7))
        .collect();
    let victim = server.workers()[0]["pid"].as_u64().unwrap();
    let addr = server.addr.clone();
    let body = json!({"input": inputs});
    let request = std::thread::spawn(move || {
        let raw = serde_json::to_vec(&body).unwrap();
        http::request(
            &addr,
            "POST",
            "/v1/embeddings",
            &[("content-type", "application/json")],
            &raw,
        )
        .expect("a response")
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(victim).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let r = request.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = vectors(&r.json());
    assert_eq!(v.len(), 400);
    assert!(v.iter().all(|v| (dot(v, v) - 1.0).abs() < 1e-3));
    // The killed worker is replaced.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let w = &server.workers()[0];
        if w["state"] == "ready" && w["pid"].as_u64() != Some(victim) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not replaced: {w}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
