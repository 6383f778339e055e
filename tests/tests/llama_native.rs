//! llama-server's native API end to end (real router, two real workers, SmolLM2):
//! `/completion` and `/completions` in its shapes, streamed and not, with string, token-id and
//! mixed prompts; `/props`, `/slots`, `/apply-template`, `/v1/health`; any model name served
//! (404 only with `model.strict_name`); and the `[generation]` defaults.

use llamapool_tests::*;
use serde_json::{json, Value};

/// Two workers of 2 slots each, with server-wide generation defaults.
fn config() -> String {
    let mut config = smol_config("keepalive_secs = 1", (2, 2048), PINNED_0_1);
    config.push_str("[generation]\nn_predict = 5\ntemperature = 0.0\nseed = 42\ntop_k = 30\n");
    config
}

fn tokenize(server: &Server, text: &str, add_special: bool) -> Vec<Value> {
    let r = server.post(
        "/tokenize",
        &json!({"content": text, "add_special": add_special}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"].as_array().unwrap().clone()
}

/// A non-streamed native completion that must succeed.
fn complete(server: &Server, path: &str, body: &Value) -> Value {
    let r = server.post(path, body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

fn check_final(v: &Value, predicted: u64) {
    assert_eq!(v["stop"], true, "{v}");
    assert_eq!(v["model"], "smol");
    assert_eq!(v["stop_type"], "limit", "{v}");
    assert_eq!(v["stopping_word"], "");
    assert_eq!(v["truncated"], false);
    assert_eq!(v["tokens_predicted"], predicted, "{v}");
    assert!(v["tokens_evaluated"].as_u64().unwrap() > 0);
    assert!(v["id_slot"].as_u64().is_some());
    let t = &v["timings"];
    assert_eq!(t["predicted_n"], predicted);
    // As llama-server: `prompt_n` tokens evaluated, `cache_n` taken from the prompt cache.
    assert_eq!(
        t["prompt_n"].as_u64().unwrap() + t["cache_n"].as_u64().unwrap(),
        v["tokens_evaluated"].as_u64().unwrap()
    );
    assert_eq!(t["cache_n"], v["tokens_cached"]);
    for key in ["prompt_ms", "predicted_ms", "predicted_per_second"] {
        assert!(t[key].as_f64().is_some(), "timings.{key}: {t}");
    }
    let g = &v["generation_settings"];
    assert_eq!(g["temperature"], 0.0);
    assert_eq!(g["seed"], 42);
    assert_eq!(g["top_k"], 30);
}

#[test]
fn native_completion_in_llama_server_shapes() {
    let server = Server::start(&config());
    // No token limit in the request: the config's n_predict = 5 applies.
    let body =
        json!({"prompt": "The capital of France is", "return_tokens": true, "cache_prompt": true});
    let v = complete(&server, "/completion", &body);
    check_final(&v, 5);
    assert_eq!(v["generation_settings"]["n_predict"], 5);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5, "{v}");
    let text = v["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    // /completions is the same native endpoint; without return_tokens, `tokens` is empty.
    let w = complete(
        &server,
        "/completions",
        &json!({"prompt": "The capital of France is"}),
    );
    check_final(&w, 5);
    assert_eq!(w["content"], text.as_str());
    assert_eq!(w["tokens"], json!([]));
    // n_predict from the request wins over the default.
    let w = complete(
        &server,
        "/completion",
        &json!({"prompt": "The capital of France is", "n_predict": 3}),
    );
    check_final(&w, 3);

    // Token ids, as the worker tokenizes a text prompt (with BOS if the model wants one).
    let ids = tokenize(&server, "The capital of France is", true);
    let w = complete(&server, "/completion", &json!({"prompt": ids}));
    assert_eq!(w["content"], text.as_str(), "token-id prompt");
    // A mixed list: text then ids, one prompt (its first text part gets BOS).
    let tail = tokenize(&server, " Paris", false);
    let mut all = ids.clone();
    all.extend(tail.iter().cloned());
    let by_ids = complete(&server, "/completion", &json!({"prompt": all}));
    let mut mixed = vec![json!("The capital of France is")];
    mixed.extend(tail.iter().cloned());
    let w = complete(&server, "/completion", &json!({"prompt": mixed}));
    assert_eq!(w["content"], by_ids["content"], "mixed prompt");
    assert_eq!(w["tokens_evaluated"], by_ids["tokens_evaluated"]);

    // Streamed: `stop: false` chunks with content, then one final `stop: true` result; no [DONE].
    let payloads = server
        .stream(
            "/completion",
            &json!({"prompt": "The capital of France is", "stream": true}),
        )
        .collect();
    assert!(payloads.len() >= 2, "{payloads:?}");
    assert!(payloads.iter().all(|p| p != "[DONE]"), "{payloads:?}");
    let chunks: Vec<Value> = payloads
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}")))
        .collect();
    let (last, partial) = chunks.split_last().unwrap();
    let mut streamed = String::new();
    for c in partial {
        assert_eq!(c["stop"], false, "{c}");
        assert!(c["tokens_predicted"].as_u64().is_some(), "{c}");
        streamed.push_str(c["content"].as_str().unwrap());
    }
    check_final(last, 5);
    assert_eq!(last["content"], "");
    assert_eq!(last["generation_settings"]["stream"], true);
    assert_eq!(streamed, text, "the stream's text is the non-streamed text");

    // A stop string: `word`, and which one; an end-of-generation token: `eos`.
    let w = complete(
        &server,
        "/completion",
        &json!({"prompt": "The capital of France is", "n_predict": 20, "stop": [".", "zzz"]}),
    );
    assert_eq!(w["stop_type"], "word", "{w}");
    assert_eq!(w["stopping_word"], ".");
    assert_eq!(w["content"], " Paris", "{w}");
    let w = complete(
        &server,
        "/completion",
        &json!({"prompt": "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n", "n_predict": 200}),
    );
    assert_eq!(w["stop_type"], "eos", "{w}");
    assert_eq!(w["stopping_word"], "");

    // /v1/completions is still OpenAI's, and gets the defaults too.
    let v = complete(
        &server,
        "/v1/completions",
        &json!({"prompt": "The capital of France is"}),
    );
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["model"], "smol");
}

#[test]
fn props_slots_template_health_and_model_names() {
    let server = Server::start(&config());
    let props = server.get("/props");
    assert_eq!(props.status, 200, "{}", props.text());
    let p = props.json();
    assert_eq!(p["total_slots"], 4);
    assert_eq!(p["model_alias"], "smol");
    assert!(p["model_path"].as_str().unwrap().ends_with(".gguf"), "{p}");
    assert!(!p["chat_template"].as_str().unwrap().is_empty(), "{p}");
    assert_eq!(p["modalities"]["vision"], false);
    assert!(p["build_info"].as_str().unwrap().starts_with("llamapool-"));
    let d = &p["default_generation_settings"];
    assert_eq!(d["n_ctx"], 1024);
    assert_eq!(d["params"]["n_predict"], 5);
    assert_eq!(d["params"]["temperature"], 0.0);
    assert_eq!(d["params"]["seed"], 42);
    assert_eq!(d["params"]["top_k"], 30);
    assert_eq!(
        d["params"]["top_p"], 0.949999988079071,
        "built-in default (f32)"
    );

    let slots = server.get("/slots");
    assert_eq!(slots.status, 200);
    let slots = slots.json();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 4, "one entry per slot of the pool: {slots:?}");
    for (i, s) in slots.iter().enumerate() {
        assert_eq!(s["id"], i, "ids 0..N-1, worker-major");
        assert_eq!(s["id_worker"], i / 2);
        assert_eq!(s["n_ctx"], 1024);
        assert_eq!(s["is_processing"], false);
    }

    let r = server.post(
        "/apply-template",
        &json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello llamapool"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let prompt = r.json()["prompt"].as_str().unwrap().to_string();
    assert!(prompt.contains("Hello llamapool"), "{prompt}");
    assert!(prompt.contains("Be brief."), "{prompt}");
    assert!(prompt.len() > "Be brief.Hello llamapool".len(), "{prompt}");
    let r = server.post("/apply-template", &json!({"messages": []}));
    assert_eq!(r.status, 400, "{}", r.text());

    let r = server.get("/v1/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));

    // Any model name is served, and answered as the alias.
    let mut body = chat("Hi", 2, false);
    body["model"] = json!("gpt-3.5-turbo");
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "smol");
    let r = server.post(
        "/completion",
        &json!({"model": "anything", "prompt": "Hi", "n_predict": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "smol");
}

#[test]
fn strict_model_names_are_404() {
    let config = smol_config("", (1, 1024), PINNED_0)
        .replace("alias = \"smol\"", "alias = \"smol\"\nstrict_name = true");
    let server = Server::start(&config);
    let mut body = chat("Hi", 2, false);
    body["model"] = json!("gpt-3.5-turbo");
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = server.post(
        "/completion",
        &json!({"model": "gpt-3.5-turbo", "prompt": "Hi", "n_predict": 1}),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // The alias itself, or no model at all, is served; without [generation] there is no limit
    // but the request's.
    let r = server.post(
        "/completion",
        &json!({"model": "smol", "prompt": "Hi", "n_predict": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tokens_predicted"], 2);
    let p = server.get("/props").json();
    assert_eq!(p["default_generation_settings"]["params"]["n_predict"], -1);
    assert_eq!(p["total_slots"], 1);
}

/// llama-server's `logit_bias` forms: `[token id, bias]` pairs and texts (every token of the
/// text gets the bias), as an array or as object keys; `false` bans.
#[test]
fn logit_bias_pairs_and_texts_ban_what_they_name() {
    let server = Server::start(&config());
    let body = |bias: Value| {
        json!({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0,
               "logit_bias": bias})
    };
    let free = complete(&server, "/completion", &body(json!([])));
    let first: Vec<u64> = free["tokens"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let text = free["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    // Ban the greedy first token by id (pair form): the output changes.
    let first_id = tokenize(&server, &text, false)[0].clone();
    let by_pair = complete(&server, "/completion", &body(json!([[first_id, false]])));
    let banned_piece = server
        .post("/detokenize", &json!({"tokens": [first_id]}))
        .json()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !by_pair["content"]
            .as_str()
            .unwrap()
            .starts_with(&banned_piece),
        "{by_pair} still starts with the banned {banned_piece:?} ({first:?})"
    );
    // The same ban given as text, in both forms: the same generation.
    let by_text = complete(
        &server,
        "/completion",
        &body(json!([[banned_piece, false]])),
    );
    assert_eq!(by_text["content"], by_pair["content"]);
    let by_key = complete(
        &server,
        "/completion",
        &body(json!({banned_piece.clone(): false})),
    );
    assert_eq!(by_key["content"], by_pair["content"]);
    // A pair that is not [key, bias] is a 400 naming the field.
    let r = server.post("/completion", &body(json!([[1, 2, 3]])));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "logit_bias");
}

/// `/metrics` as llama-server serves it: the process start time header, and prompt tokens
/// split into decoded and cached.
#[test]
fn metrics_have_the_start_header_and_count_cached_prompt_tokens() {
    let server = Server::start(&smol_config("", (2, 2048), PINNED_0));
    let r = server.get("/metrics");
    let started: u64 = r
        .header("process-start-time-unix")
        .expect("Process-Start-Time-Unix")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(started <= now && now - started < 600, "{started} vs {now}");
    let prompt = "Tell me about the lighthouse keeper and the sea, in one short sentence.";
    let body = json!({"prompt": prompt, "n_predict": 2, "temperature": 0});
    let once = complete(&server, "/completion", &body);
    let again = complete(&server, "/completion", &body);
    let cached = again["timings"]["cache_n"].as_u64().unwrap();
    assert!(cached > 0, "the repeat hits the prompt cache: {again}");
    let text = server.get("/metrics").text();
    let sample = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let evaluated = once["timings"]["prompt_n"].as_u64().unwrap()
        + again["timings"]["prompt_n"].as_u64().unwrap();
    assert_eq!(sample("llamacpp:prompt_tokens_total"), evaluated);
    assert_eq!(sample("llamacpp:prompt_tokens_cached_total"), cached);
}

/// The rest of llama-server's `/metrics` names: `n_tokens_max` (no `_total`, as llama-server
/// writes it), the speculative counters at 0, and the averages; each with HELP and TYPE.
#[test]
fn metrics_have_llama_server_extra_names() {
    let server = Server::start(&smol_config("", (2, 2048), PINNED_0));
    let done = complete(
        &server,
        "/completion",
        &json!({"prompt": "I believe", "n_predict": 8, "temperature": 0, "ignore_eos": true}),
    );
    let length = done["tokens_evaluated"].as_u64().unwrap() + 8;
    let text = server.get("/metrics").text();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    for (name, kind) in [
        ("llamacpp:n_tokens_max", "counter"),
        ("llamacpp:spec_decode_num_draft_tokens_total", "counter"),
        ("llamacpp:spec_decode_num_accepted_tokens_total", "counter"),
        ("llamacpp:spec_decode_num_drafts_total", "counter"),
        ("llamacpp:prompt_tokens_seconds", "gauge"),
        ("llamacpp:predicted_tokens_seconds", "gauge"),
        ("llamacpp:n_busy_slots_per_decode", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}"
        );
        assert!(text.contains(&format!("# HELP {name} ")), "{name} help");
    }
    assert_eq!(sample("llamacpp:n_tokens_max"), length as f64);
    assert_eq!(sample("llamacpp:spec_decode_num_drafts_total"), 0.0);
    assert!(sample("llamacpp:predicted_tokens_seconds") > 0.0);
    assert!(sample("llamacpp:prompt_tokens_seconds") > 0.0);
    assert!(sample("llamacpp:n_busy_slots_per_decode") > 0.0);
}

/// llama-server's smaller request features: the prompt object, `ignore_eos` reported in
/// `generation_settings.logit_bias`, `verbose` → `__verbose`, and the chat token count.
#[test]
fn prompt_object_ignore_eos_bias_verbose_and_input_tokens() {
    let server = Server::start(&config());

    // `{"prompt_string"}` is the text prompt; media are refused.
    let text = complete(
        &server,
        "/completion",
        &json!({"prompt": "I believe the meaning of life is", "n_predict": 4}),
    );
    let object = complete(
        &server,
        "/completion",
        &json!({"prompt": {"prompt_string": "I believe the meaning of life is"}, "n_predict": 4}),
    );
    assert_eq!(object["content"], text["content"], "greedy: same text");
    assert_eq!(object["tokens_evaluated"], text["tokens_evaluated"]);
    let r = server.post(
        "/completion",
        &json!({"prompt": {"prompt_string": "look <__media__>", "multimodal_data": ["iVBORw0KGgo="]}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "prompt.multimodal_data");

    // ignore_eos: the end-of-generation tokens appear banned (bias null = -inf).
    let r = complete(
        &server,
        "/completion",
        &json!({"prompt": "Once upon a time", "n_predict": 2, "ignore_eos": true, "logit_bias": [[12, 1.5]]}),
    );
    let bias = r["generation_settings"]["logit_bias"].as_array().unwrap();
    assert_eq!(bias[0], json!({"bias": 1.5, "token": 12}), "{bias:?}");
    assert!(bias.len() > 1, "{bias:?}");
    assert!(bias[1..].iter().all(|b| b["bias"].is_null()), "{bias:?}");
    let r = complete(
        &server,
        "/completion",
        &json!({"prompt": "Once upon a time", "n_predict": 2}),
    );
    assert_eq!(r["generation_settings"]["logit_bias"], json!([]));

    // verbose: the native result of the first choice, beside the OpenAI shape.
    let messages = json!([{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]);
    for verbose in [true, false] {
        let r = server.post(
            "/chat/completions",
            &json!({"messages": messages, "max_tokens": 2, "verbose": verbose}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if verbose {
            let native = &v["__verbose"];
            assert_eq!(native["content"], v["choices"][0]["message"]["content"]);
            let prompt = native["prompt"].as_str().unwrap();
            assert!(
                prompt.contains("Book") && prompt.contains("What is the best book"),
                "the rendered chat: {prompt}"
            );
            assert_eq!(native["tokens_predicted"], 2);
            assert_eq!(native["stop_type"], "limit");
            assert_eq!(native["generation_settings"]["n_predict"], 2);
            assert_eq!(
                native["tokens_evaluated"], v["usage"]["prompt_tokens"],
                "{v}"
            );
        } else {
            assert!(v.get("__verbose").is_none(), "{v}");
        }
    }

    // The chat token count is the prompt a chat request gets.
    let usage = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 1}),
        )
        .json()["usage"]["prompt_tokens"]
        .clone();
    for path in [
        "/chat/completions/input_tokens",
        "/v1/chat/completions/input_tokens",
    ] {
        let r = server.post(path, &json!({"messages": messages, "model": "x"}));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"input_tokens": usage}), "{path}");
    }
    let r = server.post("/chat/completions/input_tokens", &json!({"messages": []}));
    assert_eq!(r.status, 400, "{}", r.text());
}

/// `server.slots_endpoint = false` (llama-server's `--no-slots`): `/slots` is a 501 in the
/// error shape, the rest is served.
#[test]
fn slots_endpoint_can_be_turned_off() {
    let server = Server::start(&smol_config("slots_endpoint = false", (2, 2048), PINNED_0));
    let r = server.get("/slots");
    assert_eq!(r.status, 501, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_supported_error");
    assert_eq!(server.get("/props").status, 200);
}

/// llama-server's batch on `/completion`: token lists, strings, prompt objects and mixed lists,
/// each element one prompt, answered as an array in order; a batch is not streamed.
#[test]
fn native_batches_answer_an_array_in_order() {
    let server = Server::start(&config());
    let text = "I believe the meaning of life is";
    let tokens = tokenize(&server, text, true);
    let one = complete(&server, "/completion", &json!({"prompt": tokens}));
    let batch = |prompt: Value| {
        let r = server.post("/completion", &json!({"prompt": prompt}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().expect("an array of results").clone()
    };
    for prompt in [
        json!([tokens, tokens]),
        json!([tokens, text]),
        json!([tokens, {"prompt_string": text}]),
    ] {
        let results = batch(prompt.clone());
        assert_eq!(results.len(), 2, "{prompt}");
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r["index"], i);
            check_final(r, 5);
            // Greedy ([generation] temperature 0): every element is the single prompt's text.
            assert_eq!(r["content"], one["content"], "{prompt}");
        }
    }
    let three = batch(json!(["Hello", "The sky is", [1, 2, 3]]));
    assert_eq!(three.len(), 3);
    assert_eq!(three[1]["prompt"], "The sky is");
    let r = server.post(
        "/completion",
        &json!({"prompt": [tokens, tokens], "stream": true}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "stream");
}
