//! Structured output end to end: `response_format` (`json_object`, `json_schema`),
//! llama-server's `json_schema` and `grammar` (GBNF) fields, on the real router, a real worker
//! and SmolLM2. The output must parse and validate (schemas are converted by llama.cpp's own
//! converter, so `minimum`, `pattern`, `format` and `$ref` work as in llama-server); a broken
//! grammar or a schema llama.cpp cannot use is a 400, and the worker that refused it goes on
//! serving.

use llamapool_tests::*;
use serde_json::{json, Value};

fn one_worker() -> Server {
    Server::start(&smol_config("", (2, 2048), PINNED_0))
}

fn chat_with(content: &str, max_tokens: u32, extra: Value) -> Value {
    let mut body = chat(content, max_tokens, false);
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

fn content_of(r: &HttpResponse) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn json_object_and_json_schema_outputs_parse_and_validate() {
    let server = one_worker();
    let r = server.post(
        "/v1/chat/completions",
        &chat_with(
            "Reply with a JSON object with the keys name and age of a cat.",
            256,
            json!({"response_format": {"type": "json_object"}}),
        ),
    );
    let object = parse(&content_of(&r));
    assert!(object.is_object(), "{object}");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");

    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "indoor": {"type": "boolean"},
        },
        "required": ["name", "age"],
    });
    let check = |text: &str| {
        let v = parse(text);
        let name = v["name"].as_str().unwrap_or_else(|| panic!("name: {v}"));
        assert!(name.chars().count() <= 20, "{v}");
        assert!(v["age"].is_i64() || v["age"].is_u64(), "age: {v}");
        assert!(v.get("indoor").is_none_or(Value::is_boolean), "indoor: {v}");
        let keys: Vec<&String> = v.as_object().expect("an object").keys().collect();
        assert!(
            keys.iter()
                .all(|k| ["name", "age", "indoor"].contains(&k.as_str())),
            "{v}"
        );
    };
    // OpenAI's shape, on a sampled (not greedy) request.
    let r = server.post(
        "/v1/chat/completions",
        &chat_with(
            "Invent a cat with a name and an age.",
            96,
            json!({
                "temperature": 0.8,
                "seed": 3,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "cat", "strict": true, "schema": schema},
                },
            }),
        ),
    );
    check(&content_of(&r));
    // llama-server's `json_schema`, on /v1/completions, greedy.
    let r = server.post(
        "/v1/completions",
        &json!({
            "prompt": "A cat, as JSON:",
            "max_tokens": 96,
            "temperature": 0,
            "json_schema": schema,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    check(r.json()["choices"][0]["text"].as_str().expect("text"));
}

#[test]
fn a_gbnf_grammar_constrains_chat_completions_and_streams() {
    let server = one_worker();
    let grammar = json!({"grammar": "root ::= \"yes\" | \"no\""});
    let answers = ["yes", "no"];
    let r = server.post(
        "/v1/chat/completions",
        &chat_with("Is the sky green?", 16, grammar.clone()),
    );
    let text = content_of(&r);
    assert!(answers.contains(&text.as_str()), "{text:?}");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");

    let mut body = json!({"prompt": "Is water wet? Answer:", "max_tokens": 16, "temperature": 0});
    body["grammar"] = grammar["grammar"].clone();
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(answers.contains(&text.as_str()), "{text:?}");

    let mut body = chat_with("Is fire cold?", 16, grammar);
    body["stream"] = json!(true);
    let payloads = server.stream("/v1/chat/completions", &body).collect();
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let text: String = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| parse(p))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(answers.contains(&text.as_str()), "{text:?}");
}

#[test]
fn a_broken_grammar_or_unsupported_schema_is_a_400_and_the_worker_lives_on() {
    let server = one_worker();
    let pids =
        |s: &Server| -> Vec<Value> { s.workers().iter().map(|w| w["pid"].clone()).collect() };
    let before = pids(&server);
    for (extra, param) in [
        // Not GBNF, an undefined rule, left recursion: llama.cpp refuses each in the worker.
        (json!({"grammar": "root ::= \"yes"}), "grammar"),
        (json!({"grammar": "root ::= (\"a\""}), "grammar"),
        (json!({"grammar": "root ::= answer"}), "grammar"),
        (json!({"grammar": "root ::= root \"a\" | \"b\""}), "grammar"),
        (json!({"grammar": "root ::= [a-"}), "grammar"),
        // No root rule: refused by the router.
        (json!({"grammar": "start ::= \"x\""}), "grammar"),
        // Schemas llama.cpp's converter cannot use (llama-server refuses them too).
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}}),
            "response_format",
        ),
        (json!({"json_schema": {"$ref": "#/$defs/x"}}), "json_schema"),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
    ] {
        let r = server.post("/v1/chat/completions", &chat_with("Hi", 4, extra.clone()));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{extra}: {}", r.text());
    }
    let r = server.post("/v1/chat/completions", &chat("Hi", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(pids(&server), before, "the worker was not restarted");
}

#[test]
fn the_official_openai_python_client_gets_parsed_structured_output() {
    let server = one_worker();
    let script = r#"
import json, sys, openai, pydantic
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
class Cat(pydantic.BaseModel):
    name: str
    age: int
r = client.chat.completions.parse(model="smol", messages=[{"role": "user", "content": "Invent a cat."}],
    response_format=Cat, max_tokens=128, temperature=0)
cat = r.choices[0].message.parsed
assert isinstance(cat, Cat) and isinstance(cat.age, int), r
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Reply with a JSON object with the keys name and age of a cat."}],
    response_format={"type": "json_object"}, max_tokens=256, temperature=0)
assert isinstance(json.loads(r.choices[0].message.content), dict), r
try:
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": {"type": "frobnicate"}}})
    raise SystemExit("expected an error")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "response_format", e.body
print("ok")
"#;
    run_openai_client(&server, script);
}

#[test]
fn schema_keywords_llama_server_supports_constrain_the_output() {
    let server = one_worker();
    let schema = json!({
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 3, "maximum": 7},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "day": {"type": "string", "format": "date"},
            "kind": {"$ref": "#/$defs/kind"},
        },
        "required": ["n", "code", "day", "kind"],
        "additionalProperties": false,
        "$defs": {"kind": {"enum": ["cat", "dog"]}},
    });
    let r = server.post(
        "/v1/chat/completions",
        &chat_with(
            "Describe a pet as JSON.",
            128,
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}}),
        ),
    );
    let v = parse(&content_of(&r));
    let n = v["n"].as_i64().unwrap_or_else(|| panic!("n: {v}"));
    assert!((3..=7).contains(&n), "{v}");
    let code = v["code"].as_str().unwrap_or_else(|| panic!("code: {v}"));
    assert!(
        code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase()),
        "{v}"
    );
    let day = v["day"].as_str().unwrap_or_else(|| panic!("day: {v}"));
    assert_eq!(day.len(), 10, "{v}");
    assert!(
        ["cat", "dog"].contains(&v["kind"].as_str().unwrap_or_default()),
        "{v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
}
