//! Log probabilities end to end: OpenAI chat (`logprobs` + `top_logprobs`), legacy
//! completions (`logprobs: N`), streamed and not, llama-server's native `n_probs`, and the
//! official `openai` Python client parsing them. The real router, one real worker, SmolLM2.

use llamapool_tests::*;
use serde_json::{json, Value};

fn server() -> Server {
    Server::start(&smol_config("keepalive_secs = 1", (2, 2048), PINNED_0))
}

fn as_f64(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap_or_else(|| panic!("bytes is not an array: {v}"))
        .iter()
        .map(|b| u8::try_from(b.as_u64().expect("a byte")).expect("a byte"))
        .collect()
}

/// One chat `logprobs.content[]` entry: at temperature 0 the sampled token is the most likely
/// one, so its logprob is the first (largest) of its `top_logprobs`, all ≤ 0.
fn check_chat_entry(entry: &Value, top_n: usize) {
    let logprob = as_f64(&entry["logprob"]);
    assert!(logprob <= 0.0, "{entry}");
    let top = entry["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(top.len(), top_n, "{entry}");
    let best = as_f64(&top[0]["logprob"]);
    assert!(
        (logprob - best).abs() < 1e-5,
        "greedy takes the most likely token: {entry}"
    );
    assert_eq!(top[0]["token"], entry["token"], "{entry}");
    for pair in top.windows(2) {
        assert!(
            as_f64(&pair[0]["logprob"]) >= as_f64(&pair[1]["logprob"]),
            "{entry}"
        );
    }
    for t in top {
        assert!(as_f64(&t["logprob"]) <= 0.0);
        assert!(t["token"].is_string());
        bytes_of(&t["bytes"]);
    }
}

#[test]
fn log_probabilities_in_every_shape() {
    let server = server();

    // Chat, not streamed.
    let mut body = chat("Name a colour.", 12, false);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.content: {v}"));
    assert!(!content.is_empty(), "{v}");
    let mut bytes = Vec::new();
    let mut tokens = String::new();
    for entry in content {
        check_chat_entry(entry, 3);
        bytes.extend(bytes_of(&entry["bytes"]));
        tokens.push_str(entry["token"].as_str().unwrap());
    }
    assert_eq!(String::from_utf8(bytes).expect("bytes decode"), text);
    assert_eq!(tokens, text, "the tokens concatenate to the message");

    // Without logprobs: null, as before.
    let plain = server.post("/v1/chat/completions", &chat("Name a colour.", 12, false));
    assert_eq!(plain.json()["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        plain.json()["choices"][0]["message"]["content"],
        text.as_str()
    );

    // Chat, streamed: the chunks carry the same entries.
    body["stream"] = json!(true);
    let payloads = server.stream("/v1/chat/completions", &body).collect();
    let mut streamed = Vec::new();
    let mut streamed_text = String::new();
    for p in payloads.iter().filter(|p| *p != "[DONE]") {
        let c: Value = serde_json::from_str(p).unwrap();
        let choice = &c["choices"][0];
        if let Some(s) = choice["delta"]["content"].as_str() {
            streamed_text.push_str(s);
        }
        if let Some(list) = choice["logprobs"]["content"].as_array() {
            streamed.extend(list.iter().cloned());
        }
    }
    assert_eq!(streamed_text, text);
    assert_eq!(
        &streamed, content,
        "streamed entries equal the non-streamed ones"
    );

    // Out of range: 400 naming the field.
    for (field, value, param) in [
        ("top_logprobs", json!(21), "top_logprobs"),
        ("logprobs", json!(21), "logprobs"),
        ("n_probs", json!(-1), "n_probs"),
    ] {
        let mut bad = chat("x", 2, false);
        bad["logprobs"] = json!(true);
        bad[field] = value;
        let r = server.post("/v1/chat/completions", &bad);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{}", r.text());
    }

    // Completions, logprobs = 2.
    let completion = |stream: bool| {
        json!({"model": "smol", "prompt": "The sky is", "max_tokens": 6, "temperature": 0,
               "logprobs": 2, "stream": stream})
    };
    let r = server.post("/v1/completions", &completion(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap_or_else(|| panic!("{v}"));
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(tokens.len(), 6, "{v}");
    assert_eq!(token_logprobs.len(), 6);
    assert_eq!(top.len(), 6);
    assert_eq!(offsets.len(), 6);
    let mut offset = 0;
    for i in 0..6 {
        let token = tokens[i].as_str().unwrap();
        let logprob = as_f64(&token_logprobs[i]);
        assert!(logprob <= 0.0);
        let alternatives = top[i].as_object().unwrap();
        assert!(!alternatives.is_empty() && alternatives.len() <= 2, "{v}");
        let best = alternatives.values().map(as_f64).fold(f64::MIN, f64::max);
        assert!((best - logprob).abs() < 1e-5, "{v}");
        assert_eq!(offsets[i], offset);
        offset += token.chars().count();
    }
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, text);

    // Completions, streamed.
    let payloads = server
        .stream("/v1/completions", &completion(true))
        .collect();
    let mut streamed_tokens = Vec::new();
    for p in payloads.iter().filter(|p| *p != "[DONE]") {
        let c: Value = serde_json::from_str(p).unwrap();
        if let Some(list) = c["choices"][0]["logprobs"]["tokens"].as_array() {
            streamed_tokens.extend(list.iter().cloned());
        }
    }
    assert_eq!(&streamed_tokens, tokens);

    // Native /completion with n_probs.
    let native = json!({"prompt": "The sky is", "n_predict": 4, "temperature": 0, "n_probs": 2});
    let r = server.post("/completion", &native);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let probs = v["completion_probabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(probs.len(), 4, "{v}");
    for p in probs {
        assert!(p["id"].is_i64() && p["token"].is_string(), "{p}");
        bytes_of(&p["bytes"]);
        assert!(as_f64(&p["logprob"]) <= 0.0);
        let top = p["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["id"], p["id"], "{p}");
        for t in top {
            assert!(t["id"].is_i64() && t["token"].is_string() && t["logprob"].is_number());
        }
    }
    assert_eq!(v["generation_settings"]["n_probs"], 2);
    let mut post = native.clone();
    post["post_sampling_probs"] = json!(true);
    let v = server.post("/completion", &post).json();
    let first = &v["completion_probabilities"][0];
    let prob = as_f64(&first["prob"]);
    assert!(prob > 0.0 && prob <= 1.0, "{v}");
    assert_eq!(first["top_probs"].as_array().unwrap().len(), 2, "{v}");
    // Streamed: each event carries its token's entry; the final one none.
    let mut native_stream = native.clone();
    native_stream["stream"] = json!(true);
    let payloads = server.stream("/completion", &native_stream).collect();
    let events: Vec<Value> = payloads
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let with_probs = events
        .iter()
        .filter(|e| e["completion_probabilities"].is_array())
        .count();
    assert!(with_probs >= 3, "{payloads:?}");
    assert!(events.last().unwrap()["completion_probabilities"].is_null());
    // Without n_probs: no field.
    let v = server
        .post(
            "/completion",
            &json!({"prompt": "The sky is", "n_predict": 2}),
        )
        .json();
    assert!(v.get("completion_probabilities").is_none(), "{v}");

    // The official client parses chat log probabilities.
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}],
    max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
content = r.choices[0].logprobs.content
assert content, r
assert "".join(t.token for t in content) == r.choices[0].message.content, r
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token, t
    assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5, t
chunks = [c for c in client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}],
    max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs]
assert [t.token for c in chunks for t in c.choices[0].logprobs.content] == [t.token for t in content]
print("ok")
"#;
    run_openai_client(&server, script);
}
