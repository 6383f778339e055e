//! Anthropic's Messages API end to end (real router, one real worker, SmolLM2): the message
//! and the stream in Anthropic's shapes and order, the same generation as the chat route for
//! the same conversation, token counts, the refusals of what is not served, and the
//! unmodified `anthropic` Python client.

use llamapool_tests::*;
use serde_json::{json, Value};

fn config() -> String {
    smol_config("keepalive_secs = 1", (2, 2048), PINNED_0)
}

/// A greedy Messages body with a system prompt and a multi-part user turn.
fn messages_body(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "claude-3-5-haiku-latest",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "system": "You are a helpful assistant.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                         {"type": "text", "text": " of France?"}]}
        ]
    })
}

#[test]
fn a_message_is_the_chat_routes_generation_in_anthropics_shape() {
    let server = Server::start(&config());
    let r = server.post("/v1/messages", &messages_body(12, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let message = r.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["content"][0]["type"], "text");
    let text = message["content"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert!(["end_turn", "max_tokens"].contains(&message["stop_reason"].as_str().unwrap()));
    let usage = &message["usage"];
    for key in ["input_tokens", "cache_read_input_tokens", "output_tokens"] {
        assert!(usage[key].is_u64(), "{key}: {usage}");
    }
    assert!(usage["output_tokens"].as_u64().unwrap() > 0);
    assert!(message.get("timings").is_none(), "{message}");

    // The same conversation through the OpenAI route: the same prompt, the same greedy text.
    // (Text parts stay parts, as llama-server passes them: SmolLM2's template joins them with
    // a newline.)
    let chat = server.post(
        "/v1/chat/completions",
        &json!({
            "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                                      {"type": "text", "text": " of France?"}]}]
        }),
    );
    let chat = chat.json();
    assert_eq!(chat["choices"][0]["message"]["content"], text);
    let prompt = usage["input_tokens"].as_u64().unwrap()
        + usage["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(chat["usage"]["prompt_tokens"].as_u64(), Some(prompt));

    // count_tokens renders and tokenizes the same prompt, without max_tokens.
    let mut count = messages_body(1, false);
    count.as_object_mut().unwrap().remove("max_tokens");
    let counted = server.post("/v1/messages/count_tokens", &count);
    assert_eq!(counted.status, 200, "{}", counted.text());
    assert_eq!(counted.json(), json!({ "input_tokens": prompt }));

    // One token: the limit ends it.
    let short = server.post("/v1/messages", &messages_body(1, false)).json();
    assert_eq!(short["stop_reason"], "max_tokens");
    assert_eq!(short["usage"]["output_tokens"], 1);
}

#[test]
fn a_stream_sends_anthropics_events_in_order() {
    let server = Server::start(&config());
    let whole = server
        .post("/v1/messages", &messages_body(12, false))
        .json();
    let mut sse = server.stream("/v1/messages", &messages_body(12, true));
    assert_eq!(sse.status, 200);
    let mut events = Vec::new();
    while let Some((name, data)) = sse.next_named() {
        let event: Value = serde_json::from_str(&data).expect("JSON event");
        // Every event is named by its type, as Anthropic's SDKs read them.
        assert_eq!(name.as_deref(), event["type"].as_str(), "{event}");
        events.push(event);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let deltas = kinds
        .iter()
        .filter(|k| **k == "content_block_delta")
        .count();
    assert!(deltas > 0, "{kinds:?}");
    let mut expected = vec!["message_start", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(kinds, expected);

    let start = &events[0]["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    let prompt = |u: &Value| {
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
    };
    assert_eq!(prompt(&start["usage"]), prompt(&whole["usage"]));
    assert!(prompt(&start["usage"]) > 0);
    assert_eq!(
        events[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!(e["index"], 0);
            assert_eq!(e["delta"]["type"], "text_delta");
            e["delta"]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, whole["content"][0]["text"].as_str().unwrap());
    let delta = &events[events.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], whole["stop_reason"]);
    assert_eq!(
        delta["usage"]["output_tokens"],
        whole["usage"]["output_tokens"]
    );
}

#[test]
fn what_is_not_served_is_refused_by_name() {
    let server = Server::start(&config());
    let user = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            json!({"max_tokens": 5, "messages": user, "tools": [{"type": "web_search_20250305"}]}),
            "tools[0]",
        ),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"max_tokens": 5}), "messages"),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": 7}]}),
            "messages[0].content",
        ),
        (
            json!({"max_tokens": 5, "messages": user, "temperature": -1}),
            "temperature",
        ),
    ];
    for (body, param) in cases {
        let r = server.post("/v1/messages", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let error = r.json();
        assert!(
            error["error"]["param"]
                .as_str()
                .unwrap_or_default()
                .starts_with(param),
            "{body}: {error}"
        );
    }
    // The server is still serving.
    assert_eq!(
        server.post("/v1/messages", &messages_body(2, false)).status,
        200
    );
}

#[test]
fn the_anthropic_python_client_talks_to_it_unmodified() {
    let server = Server::start(&config());
    let script = r#"
import sys
import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="unused")
conversation = [{"role": "user", "content": "What is the capital of France?"}]
# This SDK has no sampling arguments (newer Anthropic models take none): greedy sampling, so
# that the stream must repeat the message, goes as an extra body field.
greedy = {"temperature": 0}
message = client.messages.create(
    model="claude-3-5-haiku-latest", max_tokens=8, extra_body=greedy,
    system="You are a helpful assistant.", messages=conversation)
assert message.type == "message" and message.role == "assistant", message
assert message.content[0].type == "text" and message.content[0].text, message
assert message.stop_reason in ("end_turn", "max_tokens"), message
with client.messages.stream(
        model="claude-3-5-haiku-latest", max_tokens=8, extra_body=greedy,
        system="You are a helpful assistant.", messages=conversation) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed == message.content[0].text, (streamed, message.content[0].text)
assert final.usage.output_tokens == message.usage.output_tokens, final
count = client.messages.count_tokens(
    model="claude-3-5-haiku-latest", system="You are a helpful assistant.",
    messages=conversation)
assert count.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0), count
print("ok")
"#;
    run_python_client(&server, "anthropic", script);
}
