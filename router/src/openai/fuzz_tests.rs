//! Fuzz targets for the parsers a client reaches in the router: request bodies (the OpenAI
//! chat and completions endpoints, the native `/completion`, `/tokenize`, `/detokenize`,
//! `/apply-template`, embeddings and rerank bodies, the model name read first when the router
//! serves several models), and JSON schemas as a request carries them to a worker (whose
//! llama.cpp converter turns them into grammars, within the router's bounds).
//! (The IPC frame decoder's and the GBNF pre-check's targets are in `common/tests/`.)
//!
//! The properties: nothing panics; a body is either a [`ValidRequest`] whose parameters pass
//! their own validation again, or an [`InvalidRequest`] that maps to a 4xx; nesting deeper
//! than serde_json's recursion limit (128) is refused; a schema is accepted (and sent on as the
//! request's JSON schema) or refused with a 4xx naming its field, in bounded time.
//!
//! These are property tests (proptest) named `fuzz_*`: `cargo test` runs a few hundred cases
//! each; `scripts/fuzz` runs them for a fixed time (`LLAMAPOOL_FUZZ_SECONDS`) or case count
//! (`LLAMAPOOL_FUZZ_CASES`). A crasher found becomes a plain `#[test]` at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llamapool_common::RequestId;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use serde_json::{json, Map, Value};

use super::embeddings::{EmbeddingsRequest, RerankRequest, MAX_INPUTS};
use super::request::*;
use crate::error::ApiError;

// The runner, shared with llamapool-common's fuzz targets.
#[path = "../../../common/tests/fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::fuzz;

// ---------------------------------------------------------------------------------------------
// JSON values: strings with odd Unicode, numbers at the edges, nesting.

fn weird_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z ]{0,12}",
        4 => any::<String>(),
        2 => "\\PC{0,40}",
        1 => prop::sample::select(vec![
            "",
            "\0",
            "\u{feff}",
            "\u{10ffff}",
            "e\u{301}",
            "\u{202e}rtl",
            "☕🦙",
            "root",
            "\\",
            "\"",
            "\n\r\t",
            "user",
            "assistant",
            "system",
            "tool",
            "text",
            "json_object",
            "json_schema",
            "none",
            "auto",
            "m",
        ])
        .prop_map(String::from),
        1 => (1usize..70_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn weird_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (-3i64..40).prop_map(Value::from),
        prop::sample::select(vec![
            json!(0),
            json!(-0.0),
            json!(1),
            json!(-1),
            json!(16),
            json!(17),
            json!(20),
            json!(21),
            json!(2.0000001),
            json!(1e-45),
            json!(1e39),
            json!(-1e39),
            json!(1e308),
            json!(i32::MAX),
            json!(i64::from(i32::MAX) + 1),
            json!(u32::MAX),
            json!(u64::from(u32::MAX) + 1),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(0.5),
            json!(100),
            json!(-100.0001),
        ]),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        weird_number(),
        weird_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((weird_string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// JSON schemas built from the converter's keywords (and a few it refuses).

fn count_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..12).prop_map(Value::from),
        1 => prop::sample::select(vec![
            json!(0),
            json!(999),
            json!(1000),
            json!(1001),
            json!(-1),
            json!(1.5),
            json!("3"),
            json!(u64::MAX),
            json!(null),
        ]),
    ]
}

fn type_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "string", "integer", "number", "boolean", "null", "object", "array",
        ])
        .prop_map(Value::from),
        1 => Just(json!("date")),
        1 => Just(json!(7)),
        1 => prop::collection::vec(
            prop::sample::select(vec!["string", "integer", "null", "object", "array"]),
            0..4
        )
        .prop_map(|list| json!(list)),
    ]
}

fn with_extras(base: Map<String, Value>, extras: Vec<(&'static str, Value)>) -> Map<String, Value> {
    let mut map = base;
    for (k, v) in extras {
        map.insert(k.to_string(), v);
    }
    map
}

/// Optional extra keywords: counts, annotations, `nullable`, now and then an unsupported one.
fn extras() -> impl Strategy<Value = Vec<(&'static str, Value)>> {
    let keyword = prop_oneof![
        4 => prop::sample::select(vec!["minLength", "maxLength", "minItems", "maxItems"])
            .prop_flat_map(|k| count_value().prop_map(move |v| (k, v))),
        2 => prop::sample::select(vec!["title", "description", "$comment", "default", "examples"])
            .prop_flat_map(|k| json_value().prop_map(move |v| (k, v))),
        2 => any::<bool>().prop_map(|b| ("nullable", json!(b))),
        1 => prop::sample::select(vec!["pattern", "format", "$ref", "minimum", "oneOf"])
            .prop_map(|k| (k, json!("x"))),
    ];
    prop::collection::vec(keyword, 0..3)
}

fn schema_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (type_name(), extras())
            .prop_map(|(t, e)| Value::Object(with_extras(Map::from_iter([("type".into(), t)]), e))),
        1 => Just(json!(true)),
        1 => Just(json!({})),
        1 => Just(json!(false)),
        1 => json_value(),
        2 => prop::collection::vec(json_value(), 0..5).prop_map(|v| json!({ "enum": v })),
        2 => json_value().prop_map(|v| json!({ "const": v })),
    ]
}

/// Schemas nested up to `depth` levels, up to about `size` nodes.
fn schema(depth: u32, size: u32) -> impl Strategy<Value = Value> {
    schema_leaf().prop_recursive(depth, size, 5, |inner| {
        let properties = prop::collection::vec((weird_string(), inner.clone()), 0..5);
        prop_oneof![
            3 => (inner.clone(), extras()).prop_map(|(items, e)| {
                Value::Object(with_extras(
                    Map::from_iter([("type".into(), json!("array")), ("items".into(), items)]),
                    e,
                ))
            }),
            3 => (
                properties,
                prop::collection::vec(any::<prop::sample::Index>(), 0..4),
                prop::option::of(prop_oneof![any::<bool>().prop_map(Value::from), inner.clone()]),
                any::<bool>(),
                extras(),
            )
                .prop_map(|(props, required, additional, stray_required, e)| {
                    let names: Vec<String> = props.iter().map(|(k, _)| k.clone()).collect();
                    let mut required: Vec<Value> = if names.is_empty() {
                        Vec::new()
                    } else {
                        required
                            .iter()
                            .map(|i| json!(names[i.index(names.len())]))
                            .collect()
                    };
                    if stray_required {
                        required.push(json!("not-a-property"));
                    }
                    let mut map = Map::from_iter([
                        ("type".into(), json!("object")),
                        (
                            "properties".into(),
                            Value::Object(props.into_iter().collect()),
                        ),
                        ("required".into(), Value::Array(required)),
                    ]);
                    if let Some(a) = additional {
                        map.insert("additionalProperties".into(), a);
                    }
                    Value::Object(with_extras(map, e))
                }),
            2 => prop::collection::vec(inner.clone(), 0..5).prop_map(|v| json!({ "anyOf": v })),
            1 => (inner.clone(), inner).prop_map(|(items, prop)| {
                json!({
                    "type": ["object", "array", "null"],
                    "items": items,
                    "properties": { "p": prop },
                })
            }),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Request bodies: known fields with typical and arbitrary values, as JSON text with raw
// numbers and escapes JSON values cannot hold, and duplicate keys.

/// A value's JSON text: mostly a serialized value, sometimes raw text serde_json must judge.
fn raw(value: impl Strategy<Value = Value>) -> impl Strategy<Value = String> {
    prop_oneof![
        12 => value.prop_map(|v| v.to_string()),
        1 => prop::sample::select(vec![
            "1e999",
            "-1e999",
            "123456789012345678901234567890",
            "-9223372036854775809",
            "18446744073709551616",
            "4294967296",
            "-0",
            "1E400",
            "5e-324",
            "0.0000000000000000000000000000000000000000000001",
            "NaN",
            "Infinity",
            "01",
            "1.",
            ".5",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\u0000\"",
            "\"\\uDBFF\\uDFFF\"",
            "\"\\x41\"",
            "[1,]",
            "{\"a\":1,}",
            "tru",
            "",
        ])
        .prop_map(String::from),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        weird_string().prop_map(|t| json!({"type": "text", "text": t})),
        weird_string().prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        json_value(),
    ];
    let content = prop_oneof![
        4 => weird_string().prop_map(Value::from),
        1 => Just(Value::Null),
        2 => prop::collection::vec(part, 0..4).prop_map(Value::Array),
        1 => json_value(),
    ];
    let role = prop_oneof![
        4 => prop::sample::select(vec!["system", "user", "assistant", "tool", "developer"])
            .prop_map(String::from),
        1 => weird_string(),
    ];
    prop_oneof![
        8 => (role, prop::option::of(content)).prop_map(|(role, content)| {
            let mut m = json!({ "role": role });
            if let Some(c) = content {
                m["content"] = c;
            }
            m
        }),
        1 => json_value(),
    ]
}

fn prompt() -> impl Strategy<Value = Value> {
    let token = prop_oneof![(0i64..50_000).prop_map(Value::from), weird_number(),];
    prop_oneof![
        4 => weird_string().prop_map(Value::from),
        2 => prop::collection::vec(weird_string(), 0..20).prop_map(|v| json!(v)),
        2 => prop::collection::vec(token.clone(), 0..20).prop_map(Value::Array),
        2 => prop::collection::vec(
            prop_oneof![weird_string().prop_map(Value::from), token.clone()],
            0..8
        )
        .prop_map(Value::Array),
        2 => prop::collection::vec(
            prop_oneof![
                prop::collection::vec(token, 0..6).prop_map(Value::Array),
                weird_string().prop_map(Value::from),
                weird_string().prop_map(|s| json!({ "prompt_string": s })),
                json_value(),
            ],
            0..20
        )
        .prop_map(Value::Array),
        1 => (weird_string(), json_value())
            .prop_map(|(s, m)| json!({ "prompt_string": s, "multimodal_data": m })),
        1 => json_value(),
    ]
}

fn logit_bias() -> impl Strategy<Value = Value> {
    let bias = prop_oneof![
        weird_number(),
        any::<bool>().prop_map(Value::from),
        json_value()
    ];
    let key = prop_oneof![(-2i64..60_000).prop_map(|t| t.to_string()), weird_string(),];
    prop_oneof![
        prop::collection::vec((key, bias.clone()), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        prop::collection::vec(
            (
                prop_oneof![weird_number(), weird_string().prop_map(Value::from)],
                bias
            ),
            0..6
        )
        .prop_map(|pairs| json!(pairs)),
        json_value(),
    ]
}

fn response_format() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"type": "text"})),
        Just(json!({"type": "json_object"})),
        schema(3, 24).prop_map(|s| json!({"type": "json_object", "schema": s})),
        (schema(3, 24), weird_string()).prop_map(|(s, name)| {
            json!({"type": "json_schema", "json_schema": {"name": name, "schema": s, "strict": true}})
        }),
        json_value().prop_map(|t| json!({ "type": t })),
        json_value(),
    ]
}

/// Grammar-shaped text: GBNF's pieces in any order, often after `root ::= `.
fn grammar_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "root",
            " ::= ",
            "::=",
            "(",
            ")",
            "|",
            "*",
            "+",
            "?",
            "{",
            "}",
            ",",
            "\"",
            "\\",
            "[",
            "]",
            "[^",
            "-",
            "<",
            ">",
            "!<",
            ".",
            "#",
            "\n",
            "\r\n",
            " ",
            "a",
            "rule-1",
            "\"abc\"",
            "\"\\x41\"",
            "\"\\u00e9\"",
            "\"\\U0001F999\"",
            "\"\\x4\"",
            "[a-z]",
            "[^\"\\\\]",
            "<|tok|>",
            "☕",
        ])
        .prop_map(String::from),
        (0u64..5, prop::option::of(0u64..5)).prop_map(|(m, n)| match n {
            Some(n) => format!("{{{m},{n}}}"),
            None => format!("{{{m},}}"),
        }),
        prop::sample::select(vec![
            "{2000}",
            "{2001}",
            "{0,2000}",
            "{4294967296}",
            "{99999999999999999999}",
            "{5,1}",
            "{,3}",
        ])
        .prop_map(String::from),
    ];
    (any::<bool>(), prop::collection::vec(piece, 0..60)).prop_map(|(rooted, pieces)| {
        let body: String = pieces.concat();
        if rooted {
            format!("root ::= {body}")
        } else {
            body
        }
    })
}

fn int_field() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => weird_number(),
        1 => json_value(),
    ]
    .boxed()
}

fn float_field() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => (-3.0f64..3.0).prop_map(Value::from),
        4 => weird_number(),
        1 => json_value(),
    ]
    .boxed()
}

fn bool_field() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => any::<bool>().prop_map(Value::from),
        1 => json_value(),
    ]
    .boxed()
}

fn neutral_or_any() -> BoxedStrategy<Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(null),
            json!(false),
            json!(0),
            json!([]),
            json!("none"),
            json!("auto"),
            json!({"type": "text"}),
        ]),
        json_value(),
    ]
    .boxed()
}

/// A value a client would plausibly send for `field`: right type, mostly in range.
fn sane_value(field: &str) -> BoxedStrategy<Value> {
    let int = |lo: i64, hi: i64| (lo..hi).prop_map(Value::from).boxed();
    let float = |lo: f64, hi: f64| (lo..hi).prop_map(Value::from).boxed();
    let boolean = || any::<bool>().prop_map(Value::from).boxed();
    let sane_message = (
        prop::sample::select(vec!["system", "user", "assistant", "user"]),
        prop_oneof![
            3 => weird_string().prop_map(Value::from),
            1 => weird_string().prop_map(|t| json!([{"type": "text", "text": t}])),
        ],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    match field {
        "model" => prop_oneof![Just(json!("m")), weird_string().prop_map(Value::from)].boxed(),
        "messages" => prop::collection::vec(sane_message, 1..4)
            .prop_map(Value::Array)
            .boxed(),
        "prompt" => prop_oneof![
            weird_string().prop_map(Value::from),
            prop::collection::vec(0i64..1000, 1..8).prop_map(|v| json!(v)),
            prop::collection::vec(weird_string(), 1..4).prop_map(|v| json!(v)),
            (weird_string(), 0i64..1000).prop_map(|(s, t)| json!([s, t])),
        ]
        .boxed(),
        "max_tokens" | "max_completion_tokens" | "n_predict" => int(-1, 2000),
        "temperature" => float(0.0, 2.0),
        "top_k" => int(0, 100),
        "top_p" | "min_p" => float(0.0, 1.0),
        "repeat_penalty" => float(0.5, 2.0),
        "presence_penalty" | "frequency_penalty" => float(-2.0, 2.0),
        "seed" => any::<i64>().prop_map(Value::from).boxed(),
        "stop" => prop_oneof![
            weird_string().prop_map(Value::from),
            prop::collection::vec(weird_string(), 0..4).prop_map(|v| json!(v)),
        ]
        .boxed(),
        "logit_bias" => prop::collection::vec(
            ((0i64..1000).prop_map(|t| t.to_string()), -100i64..100),
            0..4,
        )
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k, json!(v))).collect()))
        .boxed(),
        "n" | "best_of" => int(1, 4),
        "stream_options" => boolean()
            .prop_map(|b| json!({ "include_usage": b }))
            .boxed(),
        "logprobs" => prop_oneof![boolean(), int(0, 5)].boxed(),
        "top_logprobs" | "n_probs" => int(0, 21),
        "response_format" => response_format().boxed(),
        "json_schema" => schema(3, 24).boxed(),
        "grammar" => prop_oneof![
            Just(json!("root ::= \"yes\" | \"no\"")),
            Just(json!("root ::= [a-z]{1,8} (\",\" [a-z]{1,8})*")),
            grammar_text().prop_map(Value::from),
        ]
        .boxed(),
        "tools" | "functions" => Just(json!([])).boxed(),
        "tool_choice" | "function_call" => Just(json!("auto")).boxed(),
        "echo" => Just(json!(false)).boxed(),
        "suffix" => Just(json!(null)).boxed(),
        "content" => weird_string().prop_map(Value::from).boxed(),
        "tokens" => prop::collection::vec(0i64..1000, 0..8)
            .prop_map(|v| json!(v))
            .boxed(),
        _ => boolean(),
    }
}

/// A request body's fields, each `(key, JSON text of its value)`: usually `messages` and
/// `prompt`, then a few known fields (any of them repeated) with plausible values or odd ones,
/// now and then an unknown one.
fn body_fields() -> impl Strategy<Value = Vec<(String, String)>> {
    let fields: Vec<(&'static str, BoxedStrategy<Value>)> = vec![
        ("model", weird_string().prop_map(Value::from).boxed()),
        (
            "messages",
            prop_oneof![
                8 => prop::collection::vec(message(), 0..5).prop_map(Value::Array),
                1 => json_value(),
            ]
            .boxed(),
        ),
        ("prompt", prompt().boxed()),
        ("input", prompt().boxed()),
        ("encoding_format", neutral_or_any()),
        ("embd_normalize", int_field()),
        ("query", weird_string().prop_map(Value::from).boxed()),
        (
            "documents",
            prop_oneof![
                prop::collection::vec(weird_string(), 0..8).prop_map(|v| json!(v)),
                json_value(),
            ]
            .boxed(),
        ),
        ("top_n", int_field()),
        ("max_tokens", int_field()),
        ("max_completion_tokens", int_field()),
        ("n_predict", int_field()),
        ("temperature", float_field()),
        ("top_k", int_field()),
        ("top_p", float_field()),
        ("min_p", float_field()),
        ("repeat_penalty", float_field()),
        ("presence_penalty", float_field()),
        ("frequency_penalty", float_field()),
        ("seed", int_field()),
        (
            "stop",
            prop_oneof![
                weird_string().prop_map(Value::from),
                prop::collection::vec(weird_string(), 0..8).prop_map(|v| json!(v)),
                json_value(),
            ]
            .boxed(),
        ),
        ("logit_bias", logit_bias().boxed()),
        ("ignore_eos", bool_field()),
        ("cache_prompt", bool_field()),
        ("n", int_field()),
        ("stream", bool_field()),
        (
            "stream_options",
            prop_oneof![
                json_value().prop_map(|v| json!({ "include_usage": v })),
                json_value(),
            ]
            .boxed(),
        ),
        ("return_tokens", bool_field()),
        ("logprobs", prop_oneof![bool_field(), int_field()].boxed()),
        ("top_logprobs", int_field()),
        ("n_probs", int_field()),
        ("post_sampling_probs", bool_field()),
        ("return_progress", bool_field()),
        ("timings_per_token", bool_field()),
        ("verbose", bool_field()),
        ("add_generation_prompt", bool_field()),
        ("continue_final_message", bool_field()),
        ("response_format", response_format().boxed()),
        (
            "json_schema",
            prop_oneof![schema(3, 24), json_value()].boxed(),
        ),
        (
            "grammar",
            prop_oneof![
                4 => grammar_text().prop_map(Value::from),
                1 => json_value(),
            ]
            .boxed(),
        ),
        ("tools", neutral_or_any()),
        ("tool_choice", neutral_or_any()),
        ("functions", neutral_or_any()),
        ("function_call", neutral_or_any()),
        (
            "best_of",
            prop_oneof![int_field(), neutral_or_any()].boxed(),
        ),
        ("echo", neutral_or_any()),
        ("suffix", neutral_or_any()),
        ("content", weird_string().prop_map(Value::from).boxed()),
        ("add_special", bool_field()),
        ("with_pieces", bool_field()),
        (
            "tokens",
            prop_oneof![
                prop::collection::vec(weird_number(), 0..8).prop_map(Value::Array),
                json_value(),
            ]
            .boxed(),
        ),
    ];
    let names: Vec<&'static str> = fields.iter().map(|(name, _)| *name).collect();
    let field = prop_oneof![
        12 => prop::sample::select((0..fields.len()).collect::<Vec<_>>()).prop_flat_map(
            move |i| {
                let (name, wild) = &fields[i];
                let name = name.to_string();
                prop_oneof![
                    3 => sane_value(&name).prop_map(|v| v.to_string()),
                    1 => raw(wild.clone()),
                ]
                .prop_map(move |v| (name.clone(), v))
            }
        ),
        1 => (weird_string(), raw(json_value())),
    ];
    debug_assert!(names.contains(&"prompt"));
    let base = |name: &'static str| {
        prop::option::weighted(
            0.8,
            sane_value(name).prop_map(move |v| (name.to_string(), v.to_string())),
        )
    };
    (
        base("messages"),
        base("prompt"),
        prop::collection::vec(field, 0..6),
    )
        .prop_map(|(messages, prompt, more)| {
            messages.into_iter().chain(prompt).chain(more).collect()
        })
}

fn body_text(fields: &[(String, String)]) -> String {
    let entries: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
        .collect();
    format!("{{{}}}", entries.join(","))
}

/// Byte-level damage to a body: flips, overwrites, insertions, cuts.
fn damaged(body: String, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    let mut bytes = body.into_bytes();
    for (at, kind, b) in edits {
        if bytes.is_empty() {
            bytes.push(*b);
            continue;
        }
        let i = at.index(bytes.len());
        match kind % 4 {
            0 => bytes[i] ^= 1 << (b % 8),
            1 => bytes[i] = *b,
            2 => bytes.insert(i, *b),
            _ => {
                bytes.remove(i);
            }
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// Calling the parsers as the handlers do.

fn served() -> Vec<ServedModel> {
    vec![
        ServedModel::new("m"),
        ServedModel {
            strict_name: true,
            ..ServedModel::new("m")
        },
    ]
}

/// Bodies that became a valid request, and schemas accepted, over all targets (a generator
/// whose cases are all refused at the first field would test little).
static VALID_BODIES: AtomicU64 = AtomicU64::new(0);
static ACCEPTED_SCHEMAS: AtomicU64 = AtomicU64::new(0);

fn report_valid() {
    let bodies = VALID_BODIES.load(Ordering::Relaxed);
    let schemas = ACCEPTED_SCHEMAS.load(Ordering::Relaxed);
    println!("fuzz: so far (all targets): {bodies} valid requests, {schemas} schemas accepted");
}

/// A refusal must map to a client error.
fn check_refusal(e: InvalidRequest) -> TestCaseResult {
    let status = ApiError::from(e.clone()).status;
    prop_assert!(
        status.is_client_error(),
        "{e:?} maps to {status}, not a 4xx"
    );
    Ok(())
}

/// What a validated request promises: its parameters pass their own checks again.
fn check_valid(valid: &ValidRequest) -> TestCaseResult {
    prop_assert!((1..=MAX_CHOICES).contains(&valid.n));
    prop_assert!(valid.total_choices() <= MAX_CHOICES);
    prop_assert!(valid.generate.sampling.validate().is_ok());
    prop_assert!(valid.generate.stopping.validate().is_ok());
    Ok(())
}

/// The native `/completion` parse (`http::native::parse_native`) without its mixed-prompt
/// tokenization, which needs a worker.
fn parse_native(body: &[u8], served: &ServedModel) -> Result<(), InvalidRequest> {
    let mut body: GenerationBody = parse_json(body)?;
    body.check_common(served)?;
    if body.choices()? != 1 {
        return Ok(());
    }
    let sampling = body.sampling(&served.defaults)?;
    let mut prompts = Vec::new();
    for prompt in native_prompts(body.prompt.take())? {
        prompts.push(match prompt {
            NativePrompt::Ready(prompt) => prompt,
            NativePrompt::Mixed(_) => llamapool_common::protocol::Prompt::Tokens(vec![1]),
        });
    }
    let first = prompts.remove(0);
    let mut valid =
        body.finish_valid(Endpoint::Completions, served, RequestId(1), first, sampling)?;
    valid.more_prompts = prompts;
    Ok(())
}

/// `/apply-template`'s parse (`http::template` before the worker call).
fn parse_apply_template(body: &[u8]) -> Result<(), InvalidRequest> {
    let mut body: GenerationBody = parse_json(body)?;
    body.chat(&Default::default())?;
    Ok(())
}

/// Every body parser a client reaches, on `body`.
fn parse_everywhere(body: &[u8]) -> TestCaseResult {
    for served in served() {
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            match parse_generation(body, endpoint, &served, RequestId(1)) {
                Ok(valid) => {
                    VALID_BODIES.fetch_add(1, Ordering::Relaxed);
                    check_valid(&valid)?;
                }
                Err(e) => check_refusal(e)?,
            }
        }
        if let Err(e) = parse_native(body, &served) {
            check_refusal(e)?;
        }
    }
    if let Err(e) = parse_apply_template(body) {
        check_refusal(e)?;
    }
    if let Err(e) = parse_json::<TokenizeBody>(body) {
        check_refusal(e)?;
    }
    if let Err(e) = parse_json::<DetokenizeBody>(body) {
        check_refusal(e)?;
    }
    for openai in [true, false] {
        match EmbeddingsRequest::parse(body, openai) {
            Ok(request) => {
                prop_assert!(!request.inputs.is_empty() && request.inputs.len() <= MAX_INPUTS);
            }
            Err(e) => check_refusal(e)?,
        }
    }
    match RerankRequest::parse(body) {
        Ok(request) => {
            prop_assert!(!request.documents.is_empty() && request.documents.len() <= MAX_INPUTS);
        }
        Err(e) => check_refusal(e)?,
    }
    // With several models, the router reads the model's name first.
    if let Err(e) = requested_model(body) {
        check_refusal(e)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The targets.

#[test]
fn fuzz_request_body_arbitrary_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "\\PC{0,200}".prop_map(String::into_bytes),
        prop::collection::vec(
            prop::sample::select(vec![
                b'{', b'}', b'[', b']', b'"', b':', b',', b'\\', b'u', b'1', b'e', b'-', b' ',
                b'n', b'0', 0xff, 0xc3,
            ]),
            0..200
        ),
    ];
    fuzz("request_body_arbitrary_bytes", 256, bytes, |body| {
        parse_everywhere(&body)
    });
}

#[test]
fn fuzz_request_body_structured() {
    fuzz("request_body_structured", 256, body_fields(), |fields| {
        parse_everywhere(body_text(&fields).as_bytes())
    });
    report_valid();
}

#[test]
fn fuzz_request_body_damaged() {
    let input = (
        body_fields(),
        prop::collection::vec(
            (any::<prop::sample::Index>(), any::<u8>(), any::<u8>()),
            1..6,
        ),
    );
    fuzz("request_body_damaged", 256, input, |(fields, edits)| {
        parse_everywhere(&damaged(body_text(&fields), &edits))
    });
    report_valid();
}

#[test]
fn fuzz_request_body_deep_nesting() {
    // Nesting past serde_json's limit (128) in any field is refused, never a stack overflow.
    let input = (
        prop::sample::select(vec![
            "messages",
            "prompt",
            "response_format",
            "json_schema",
            "logit_bias",
            "grammar",
            "stop",
            "tools",
            "unknown",
        ]),
        prop_oneof![1usize..140, 120usize..140, 140usize..20_000],
        prop::sample::select(vec!["[", "{\"a\":", "[{\"items\":"]),
        any::<bool>(),
    );
    fuzz(
        "request_body_deep_nesting",
        64,
        input,
        |(field, depth, open, closed)| {
            let close: String = open
                .chars()
                .rev()
                .filter_map(|c| match c {
                    '[' => Some(']'),
                    '{' => Some('}'),
                    _ => None,
                })
                .collect();
            let mut body = format!("{{\"{field}\":");
            body.push_str(&open.repeat(depth));
            body.push_str("null");
            if closed {
                body.push_str(&close.repeat(depth));
            }
            body.push('}');
            let levels = depth * open.matches(['[', '{']).count() + 1;
            for endpoint in [Endpoint::Chat, Endpoint::Completions] {
                let result =
                    parse_generation(body.as_bytes(), endpoint, &served()[0], RequestId(1));
                if levels > 128 {
                    // A value the body keeps is refused at serde_json's recursion limit; one it
                    // skips (an unknown field inside a message) is skipped without recursion.
                    let limit = matches!(&result, Err(InvalidRequest::Body(m)) if m.contains("recursion limit"));
                    prop_assert!(
                        limit || (field == "messages" && result.is_err()),
                        "{levels} levels: {result:?}"
                    );
                }
                if let Err(e) = result {
                    check_refusal(e)?;
                }
            }
            parse_everywhere(body.as_bytes())
        },
    );
}

/// Longest the router's checks of a schema may take. The cases take microseconds; the bound
/// catches a blow-up, with room for a loaded CI machine that pauses the thread.
const MAX_SCHEMA_TIME: Duration = Duration::from_secs(2);

/// A schema as `response_format` carries it: accepted and sent on as the request's JSON schema
/// (its text, naming the field), or refused with a 4xx naming `response_format`.
fn check_schema(schema: &Value) -> TestCaseResult {
    let body = json!({
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    });
    let start = Instant::now();
    let result = parse_generation(
        body.to_string().as_bytes(),
        Endpoint::Chat,
        &served()[0],
        RequestId(1),
    );
    let took = start.elapsed();
    prop_assert!(took <= MAX_SCHEMA_TIME, "the checks took {took:?}");
    match result {
        Ok(valid) => {
            ACCEPTED_SCHEMAS.fetch_add(1, Ordering::Relaxed);
            let sent = valid.generate.sampling.json_schema;
            prop_assert!(
                sent.as_ref().is_some_and(|s| s.field == "response_format"),
                "{sent:?}"
            );
        }
        Err(e) => {
            // Named by its field, or (nested past serde's limit) a body that cannot be read.
            let named = match &e {
                InvalidRequest::Field { param, .. } => param == "response_format",
                InvalidRequest::Body(_) => true,
                _ => false,
            };
            prop_assert!(named, "{:?}", e);
            check_refusal(e)?;
        }
    }
    Ok(())
}

#[test]
fn fuzz_schema_converter() {
    fuzz("schema_converter", 256, schema(6, 64), |schema| {
        check_schema(&schema)
    });
    report_valid();
}

#[test]
fn fuzz_schema_converter_deep() {
    // Deep chains of one keyword: size must grow with the schema, not with 2^depth.
    let input = (
        prop::sample::select(vec![
            "array",
            "anyOf",
            "object",
            "nullable-array",
            "type-list",
        ]),
        1usize..120,
    );
    fuzz("schema_converter_deep", 64, input, |(kind, depth)| {
        let mut schema = json!({"type": "string"});
        for _ in 0..depth {
            schema = match kind {
                "array" => json!({"type": "array", "items": schema}),
                "anyOf" => json!({"anyOf": [schema, {"type": "null"}]}),
                "object" => {
                    json!({"type": "object", "properties": {"a": schema, "b": {"type": "integer"}}})
                }
                "nullable-array" => {
                    json!({"type": "array", "items": schema, "nullable": true, "minItems": 1, "maxItems": 3})
                }
                _ => json!({"type": ["array", "object", "null"], "items": schema}),
            };
        }
        // As a request would carry it: through JSON text and serde_json's parser.
        let text = schema.to_string();
        let Ok(schema) = serde_json::from_str::<Value>(&text) else {
            return Ok(());
        };
        check_schema(&schema)
    });
}

// ---------------------------------------------------------------------------------------------
// Regression tests: each a crasher or a property the targets guard, with its minimal input.

/// serde_json's recursion limit (128) is in force for every body parser: the `unbounded_depth`
/// feature would let a deep body overflow a handler thread's stack.
#[test]
fn bodies_nested_past_128_levels_are_refused_at_the_recursion_limit() {
    let nested =
        |depth: usize| format!("{{\"prompt\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        let e = parse_generation(nested(128).as_bytes(), endpoint, &served()[0], RequestId(1))
            .unwrap_err();
        assert!(
            matches!(&e, InvalidRequest::Body(m) if m.contains("recursion limit")),
            "{e:?}"
        );
        let e = parse_generation(nested(100).as_bytes(), endpoint, &served()[0], RequestId(1))
            .unwrap_err();
        assert!(
            !matches!(&e, InvalidRequest::Body(m) if m.contains("recursion limit")),
            "{e:?}"
        );
    }
    assert!(parse_native(nested(20_000).as_bytes(), &served()[0]).is_err());
}
