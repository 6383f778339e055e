//! OpenAI's Responses API end to end (real router, one real worker, SmolLM2): the response
//! object, the stream's events in order with their sequence numbers, llama-server's progress
//! and timings telemetry, the same generation as the chat route, the refusals of what is not
//! served, and the unmodified `openai` Python client.

use llamapool_tests::*;
use serde_json::{json, Value};

fn config() -> String {
    smol_config("keepalive_secs = 1", (2, 2048), PINNED_0)
}

fn body(stream: bool) -> Value {
    json!({
        "model": "gpt-4.1",
        "instructions": "You are a helpful assistant.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}],
        "max_output_tokens": 12,
        "temperature": 0,
        "stream": stream,
    })
}

/// The events of a streamed response, each checked to be named by its type.
fn events(server: &Server, body: &Value) -> Vec<Value> {
    let mut sse = server.stream("/v1/responses", body);
    assert_eq!(sse.status, 200);
    let mut events = Vec::new();
    while let Some((name, data)) = sse.next_named() {
        let event: Value = serde_json::from_str(&data).expect("JSON event");
        assert_eq!(name.as_deref(), event["type"].as_str(), "{event}");
        events.push(event);
    }
    events
}

#[test]
fn a_response_is_the_chat_routes_generation_in_openais_shape() {
    let server = Server::start(&config());
    let r = server.post("/v1/responses", &body(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let response = r.json();
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    let message = &response["output"][0];
    assert_eq!(message["type"], "message");
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["content"][0]["type"], "output_text");
    let text = message["content"][0]["text"].as_str().unwrap();
    let usage = &response["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );

    let chat = server
        .post(
            "/v1/chat/completions",
            &json!({
                "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is the capital of France?"}]
            }),
        )
        .json();
    assert_eq!(chat["choices"][0]["message"]["content"], text);
    assert_eq!(chat["usage"]["prompt_tokens"], usage["input_tokens"]);
    // llama-server's path without /v1 too.
    assert_eq!(server.post("/responses", &body(false)).status, 200);
}

#[test]
fn a_stream_sends_openais_events_in_order() {
    let server = Server::start(&config());
    let whole = server.post("/v1/responses", &body(false)).json();
    let events = events(&server, &body(true));
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let deltas = kinds
        .iter()
        .filter(|k| **k == "response.output_text.delta")
        .count();
    assert!(deltas > 0, "{kinds:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(kinds, expected);
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let id = events[0]["response"]["id"].as_str().unwrap();
    let item = events[2]["item"]["id"].as_str().unwrap();
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| {
            assert_eq!(e["item_id"], item);
            e["delta"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        text,
        whole["output"][0]["content"][0]["text"].as_str().unwrap()
    );
    let completed = events.last().unwrap();
    assert_eq!(completed["response"]["id"], id);
    assert_eq!(completed["response"]["output"][0]["id"], item);
    assert_eq!(
        completed["response"]["output"][0]["content"][0]["text"],
        text
    );
    assert_eq!(
        completed["response"]["usage"]["output_tokens"],
        whole["usage"]["output_tokens"]
    );
    assert!(
        completed["timings"]["predicted_per_second"].is_number(),
        "{completed}"
    );
}

#[test]
fn a_stream_reports_llama_servers_progress_and_timings_when_asked() {
    let server = Server::start(&config());
    let asked = json!({
        "input": "This is a test ".repeat(10), "max_output_tokens": 8, "stream": true,
        "timings_per_token": true, "return_progress": true,
    });
    let events = events(&server, &asked);
    let progress: Vec<&Value> = events
        .iter()
        .filter(|e| e.get("prompt_progress").is_some())
        .collect();
    assert!(!progress.is_empty(), "no progress event");
    for e in &progress {
        assert_eq!(e["type"], "response.in_progress");
        assert!(e["prompt_progress"]["total"].as_u64().unwrap() > 0);
    }
    assert!(events
        .iter()
        .any(|e| e["type"] == "response.output_text.delta"
            && e["timings"]["predicted_per_second"].is_number()));
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert!(completed["response"]["usage"].is_object() && completed["timings"].is_object());
}

#[test]
fn what_is_not_served_is_refused_by_name() {
    let server = Server::start(&config());
    let cases = [
        (
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"input": [{"type": "computer_call", "call_id": "c"}]}),
            "input[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
            "input[0].content[0].type",
        ),
        (json!({"max_output_tokens": 5}), "input"),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
    ];
    for (body, param) in cases {
        let r = server.post("/v1/responses", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    assert_eq!(server.post("/v1/responses", &body(false)).status, 200);
}

#[test]
fn the_openai_python_client_reads_responses_unmodified() {
    let server = Server::start(&config());
    let script = r#"
import sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
conversation = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
res = client.responses.create(model="gpt-4.1", input=conversation, max_output_tokens=8, temperature=0)
assert res.id.startswith("resp_") and res.output[0].id.startswith("msg_"), res
assert res.output_text, res
gathered, completed = "", None
for event in client.responses.create(model="gpt-4.1", input=conversation, max_output_tokens=8,
                                     temperature=0, stream=True):
    if event.type == "response.output_text.delta":
        gathered += event.delta
    if event.type == "response.completed":
        completed = event.response
assert completed is not None
assert gathered == completed.output_text == res.output_text, (gathered, completed.output_text, res.output_text)
print("ok")
"#;
    run_openai_client(&server, script);
}
