//! Several choices per request (`n` > 1): the real router, two real pinned workers, SmolLM2.
//! The router fans a request out into `n` generations that may run on either worker.

use llamapool_tests::*;
use serde_json::{json, Value};

fn chat_n(n: u32, max_tokens: u32) -> Value {
    let mut body = chat("Name a colour.", max_tokens, false);
    body["n"] = json!(n);
    body
}

/// Two sampled choices: one on each idle worker (dispatch picks the least-loaded worker, the
/// lowest index on ties), so each runs alone in its batch and a repeat decodes exactly alike.
/// (Choices sharing a worker's batch can drift apart between runs: llama.cpp's numerics
/// depend on the batch, as for any concurrent requests.)
fn sampled_texts(server: &Server, seed: u32) -> Vec<String> {
    let mut body = chat_n(2, 12);
    body["messages"] =
        json!([{"role": "user", "content": "Write one short sentence about anything."}]);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(seed);
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            c["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        })
        .collect()
}

/// The chunks of an SSE stream, without the final `[DONE]`, which must come exactly once, last.
fn stream_chunks(payloads: &[String]) -> Vec<Value> {
    assert_eq!(
        payloads.iter().filter(|p| *p == "[DONE]").count(),
        1,
        "{payloads:?}"
    );
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}")))
        .collect()
}

#[test]
fn several_choices_streamed_or_not_on_both_endpoints() {
    let server = Server::start(&TWO_WORKERS);

    // Chat, not streamed: three choices, indexes 0..2, usage summed with the prompt once.
    let r = server.post("/v1/chat/completions", &chat_n(3, 6));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        assert_eq!(c["message"]["role"], "assistant");
        assert!(c["message"]["content"].is_string());
        assert!(
            ["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()),
            "{v}"
        );
    }
    // Greedy: every choice is the same generation.
    assert_eq!(choices[0]["message"], choices[2]["message"]);
    let one = server.post("/v1/chat/completions", &chat_n(1, 6)).json();
    assert_eq!(one["choices"].as_array().unwrap().len(), 1);
    assert_eq!(one["choices"][0]["message"], choices[0]["message"]);
    let (prompt, completion) = (
        one["usage"]["prompt_tokens"].as_u64().unwrap(),
        one["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(
        v["usage"]["prompt_tokens"], prompt,
        "the prompt is counted once: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3 * completion, "{v}");
    assert_eq!(v["usage"]["total_tokens"], prompt + 3 * completion, "{v}");

    // Seeded sampling: the choices differ from each other, and a repeat gives the same texts.
    let first = sampled_texts(&server, 1234);
    assert_eq!(first.len(), 2);
    assert_ne!(first[0], first[1], "seeded choices differ");
    assert_eq!(
        sampled_texts(&server, 1234),
        first,
        "a seeded request is reproducible"
    );

    // Chat, streamed: both indexes appear, each ends with a finish_reason, one [DONE] after
    // the usage chunk, which sums the choices.
    let mut body = chat_n(2, 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&server.stream("/v1/chat/completions", &body).collect());
    let mut texts = [String::new(), String::new()];
    let mut finishes = [0, 0];
    let mut roles = [0, 0];
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().expect("index") as usize;
        assert_eq!(finishes[i], 0, "nothing after choice {i}'s finish: {c}");
        if choice["delta"]["role"] == "assistant" {
            roles[i] += 1;
        }
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finishes[i] += 1;
        }
    }
    assert_eq!(roles, [1, 1], "one role chunk per choice");
    assert_eq!(finishes, [1, 1], "one finish per choice");
    assert_eq!(texts[0], texts[1], "greedy choices are identical");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["prompt_tokens"], prompt, "{usage}");
    let streamed = server.post("/v1/chat/completions", &chat_n(1, 8)).json();
    assert_eq!(
        usage["completion_tokens"],
        2 * streamed["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(texts[0], streamed["choices"][0]["message"]["content"]);

    // Completions, streamed or not, with best_of equal to n.
    let completion = |stream: bool| {
        json!({"model": "smol", "prompt": "The sky is", "max_tokens": 5, "temperature": 0,
               "n": 2, "best_of": 2, "stream": stream})
    };
    let r = server.post("/v1/completions", &completion(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (&choices[0]["index"], &choices[1]["index"]),
        (&json!(0), &json!(1))
    );
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    let mut single = completion(false);
    single["n"] = json!(1);
    single.as_object_mut().unwrap().remove("best_of");
    let single = server.post("/v1/completions", &single).json();
    assert_eq!(single["choices"][0]["text"], choices[0]["text"]);
    assert_eq!(
        v["usage"]["completion_tokens"],
        2 * single["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(
        v["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );
    let chunks = stream_chunks(
        &server
            .stream("/v1/completions", &completion(true))
            .collect(),
    );
    let mut texts = [String::new(), String::new()];
    for c in &chunks {
        let choice = &c["choices"][0];
        texts[choice["index"].as_u64().unwrap() as usize]
            .push_str(choice["text"].as_str().unwrap());
    }
    assert_eq!(texts[0], choices[0]["text"]);
    assert_eq!(texts[1], choices[1]["text"]);

    // Out of range, or best_of other than n: 400 naming the field.
    for (n, param) in [(json!(0), "n"), (json!(17), "n"), (json!(-1), "n")] {
        let mut body = chat_n(1, 2);
        body["n"] = n;
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["param"], param);
    }
    let mut body = completion(false);
    body["n"] = json!(17);
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "n");
    let mut body = completion(false);
    body["best_of"] = json!(3);
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "best_of");
    // The native endpoint has one result.
    let r = server.post(
        "/completion",
        &json!({"prompt": "x", "n": 2, "n_predict": 1}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "n");
}

#[test]
fn the_official_openai_python_client_parses_several_choices() {
    let server = Server::start(&TWO_WORKERS);
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0, n=2)
assert [c.index for c in r.choices] == [0, 1], r
assert r.choices[0].message.content == r.choices[1].message.content, r
assert all(c.finish_reason in ("stop", "length") for c in r.choices), r
texts = {0: "", 1: ""}
finished = set()
for chunk in client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=6, temperature=0, n=2, stream=True):
    for c in chunk.choices:
        texts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished.add(c.index)
assert finished == {0, 1}, finished
assert texts[0] == r.choices[0].message.content == texts[1], (texts, r)
c = client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0, n=2)
assert [x.index for x in c.choices] == [0, 1] and c.choices[0].text, c
assert c.usage.completion_tokens == 2 * client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0).usage.completion_tokens, c.usage
print("ok")
"#;
    run_openai_client(&server, script);
}

/// OpenAI's batch of prompts on `/v1/completions`: `n` choices for each prompt, prompt-major
/// indexes, each prompt counted once in `usage`; streamed, every index finishes once.
#[test]
fn a_batch_of_prompts_on_completions() {
    let server = Server::start(&TWO_WORKERS);
    let prompts = ["The capital of France is", "One, two, three,"];
    let body = |prompt: Value, stream: bool| {
        json!({"model": "smol", "prompt": prompt, "max_tokens": 4, "temperature": 0, "n": 2,
               "stream": stream, "stream_options": {"include_usage": true}})
    };
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let mut one = body(json!(p), false);
            one["n"] = json!(1);
            server.post("/v1/completions", &one).json()
        })
        .collect();
    let r = server.post("/v1/completions", &body(json!(prompts), false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        // Greedy: each prompt's choices are what the prompt alone gives.
        assert_eq!(c["text"], alone[i / 2]["choices"][0]["text"], "{v}");
    }
    let tokens = |key: &str| -> u64 {
        alone
            .iter()
            .map(|a| a["usage"][key].as_u64().unwrap())
            .sum()
    };
    assert_eq!(v["usage"]["prompt_tokens"], tokens("prompt_tokens"), "{v}");
    assert_eq!(
        v["usage"]["completion_tokens"],
        2 * tokens("completion_tokens"),
        "{v}"
    );

    let chunks = stream_chunks(
        &server
            .stream("/v1/completions", &body(json!(prompts), true))
            .collect(),
    );
    let mut finishes = [0; 4];
    for c in &chunks[..chunks.len() - 1] {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().expect("index") as usize;
        if !choice["finish_reason"].is_null() {
            finishes[i] += 1;
        }
    }
    assert_eq!(finishes, [1; 4], "one finish per choice");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], tokens("prompt_tokens"), "{usage}");

    // Token-id lists are a batch too; too many choices is a 400 naming the prompt.
    let r = server.post("/v1/completions", &body(json!([[1, 2, 3], [4, 5]]), false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 4);
    let mut many = body(json!(prompts), false);
    many["n"] = json!(9);
    let r = server.post("/v1/completions", &many);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "prompt");
}

/// The choices of one request on one worker compute their prompt once: the later ones take the
/// first one's KV cells (llama.cpp's unified cache), and greedy choices stay identical.
#[test]
fn choices_on_one_worker_share_the_prompt_cells() {
    let server = Server::start(&smol_config("", (4, 4096), PINNED_0));
    let prompt =
        "The history of the lighthouse on the northern cape is long and full of storms. ".repeat(6);
    let body =
        json!({"model": "smol", "prompt": prompt, "n": 3, "max_tokens": 6, "temperature": 0});
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 64, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let metrics = server.get("/metrics").text();
    let sample = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    // The first choice decodes the prompt; the other two only its last token each.
    assert_eq!(sample("llamacpp:prompt_tokens_total"), prompt_tokens + 2);
    assert_eq!(
        sample("llamacpp:prompt_tokens_cached_total"),
        2 * (prompt_tokens - 1)
    );
}
