//! Chat edge cases as llama-server handles them, end to end (real router, one real worker,
//! SmolLM2): `add_generation_prompt`, `continue_final_message` and the assistant prefill (a
//! final assistant message is continued), two assistant turns at the end, and the refusals.
//! The expected prompts are llama-server's `/apply-template` answers for the same messages.

use llamapool_tests::*;
use serde_json::{json, Value};

const SYSTEM: &str = "<|im_start|>system\nBe brief.<|im_end|>\n";
const USER: &str = "<|im_start|>user\nHi<|im_end|>\n";
const PARTIAL: &str = "Hello, I am";

fn config() -> String {
    smol_config("keepalive_secs = 1", (2, 2048), PINNED_0)
}

fn system() -> Value {
    json!({"role": "system", "content": "Be brief."})
}

fn user() -> Value {
    json!({"role": "user", "content": "Hi"})
}

fn assistant() -> Value {
    json!({"role": "assistant", "content": PARTIAL})
}

/// `/apply-template` for `messages` with `extra` fields: the status and the body.
fn render(server: &Server, messages: &[Value], extra: Value) -> (u16, Value) {
    let mut body = json!({ "messages": messages });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let r = server.post("/apply-template", &body);
    (r.status, r.json())
}

fn rendered(server: &Server, messages: &[Value], extra: Value) -> String {
    let (status, body) = render(server, messages, extra);
    assert_eq!(status, 200, "{body}");
    body["prompt"].as_str().expect("prompt").to_string()
}

/// A 400 naming `param`, with llama-server's message where it has one.
fn refused(status: u16, body: &Value, param: &str, message: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    let text = body["error"]["message"].as_str().unwrap_or_default();
    assert!(text.contains(message), "{body}");
}

#[test]
fn templates_end_as_llama_server_renders_them() {
    let server = Server::start(&config());
    let (s, u, a) = (system(), user(), assistant());
    // The default opens the assistant's turn; add_generation_prompt = false does not.
    let open = rendered(&server, &[s.clone(), u.clone()], json!({}));
    assert_eq!(open, format!("{SYSTEM}{USER}<|im_start|>assistant\n"));
    let closed = rendered(
        &server,
        &[s.clone(), u.clone()],
        json!({"add_generation_prompt": false}),
    );
    assert_eq!(closed, format!("{SYSTEM}{USER}"));

    // continue_final_message leaves the assistant's message open: the prompt ends with its
    // content, not with <|im_end|>.
    let continued = format!("{SYSTEM}{USER}<|im_start|>assistant\n{PARTIAL}");
    let asked = json!({"continue_final_message": true, "add_generation_prompt": false});
    assert_eq!(
        rendered(&server, &[s.clone(), u.clone(), a.clone()], asked.clone()),
        continued
    );
    // A final assistant message is continued unasked too (llama-server's prefill).
    assert_eq!(
        rendered(&server, &[s.clone(), u.clone(), a.clone()], json!({})),
        continued
    );

    // Both true is refused, with llama-server's message.
    let (status, body) = render(
        &server,
        &[s.clone(), u.clone(), a.clone()],
        json!({"continue_final_message": true}),
    );
    refused(
        status,
        &body,
        "continue_final_message",
        "Cannot set both add_generation_prompt and continue_final_message to true.",
    );
    // Continuing a message that is not the assistant's is refused.
    let (status, body) = render(&server, &[s.clone(), u.clone()], asked.clone());
    refused(status, &body, "continue_final_message", "assistant");

    // Two assistant turns at the end: refused unless continuing is asked for explicitly, which
    // closes the first and continues the second (llama-server, same messages).
    let two = [s.clone(), u.clone(), a.clone(), a.clone()];
    let (status, body) = render(&server, &two, json!({}));
    refused(
        status,
        &body,
        "messages",
        "Cannot have 2 or more assistant messages at the end of the list.",
    );
    assert_eq!(
        rendered(&server, &two, asked),
        format!(
            "{SYSTEM}{USER}<|im_start|>assistant\n{PARTIAL}<|im_end|>\n<|im_start|>assistant\n{PARTIAL}"
        )
    );
    // An assistant turn in the middle is closed as usual.
    assert_eq!(
        rendered(&server, &[s, u.clone(), a, u], json!({})),
        format!("{SYSTEM}{USER}<|im_start|>assistant\n{PARTIAL}<|im_end|>\n{USER}<|im_start|>assistant\n")
    );
}

#[test]
fn chat_requests_continue_the_final_message() {
    let server = Server::start(&config());
    let messages = [system(), user(), assistant()];
    let prompt = rendered(&server, &messages, json!({}));
    // Greedy, the continued chat generates what a completion of the rendered text does.
    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 6, "temperature": 0,
                "continue_final_message": true, "add_generation_prompt": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let chat = r.json();
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let r = server.post(
        "/completion",
        &json!({"prompt": prompt, "n_predict": 6, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(content, r.json()["content"].as_str().unwrap());
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        r.json()["tokens_evaluated"],
        "{chat}"
    );

    // The refusals come before any generation.
    for (extra, param) in [
        (
            json!({"continue_final_message": true}),
            "continue_final_message",
        ),
        (json!({}), "messages"),
    ] {
        let mut body = json!({"messages": [user(), assistant(), assistant()], "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{}", r.text());
    }
}
