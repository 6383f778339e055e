//! The typed response bodies compared with recorded ones (`router/tests/shapes/`): llama-server's
//! bodies recorded from the real server (OpenAI-shaped, native and Anthropic-shaped), and
//! OpenAI's objects from its API reference. Each body is built as a route builds it and
//! serialized; its keys and JSON types must match the recording's, but for the differences
//! listed here by path (so a new one fails).

use llamapool_common::{
    Candidate, Finish, FinishReason, PromptProgress, RequestError, SamplingParams, StoppingParams,
    Timings, TokenLogprob, Usage,
};
use serde::Serialize;
use serde_json::Value;

use super::llama_server::{
    DefaultSettings, GenerationSettings, NativeFinal, NativeOptions, NativePartial, PropsBody,
    RenderedBody, SlotBody,
};
use super::logprobs::{self, Logprobs};
use super::request::{Endpoint, StreamReports};
use super::response::{Envelope, FinishedChoice};
use super::timings::{ProgressBody, TimingsBody};
use super::InvalidRequest;
use crate::error::ApiError;

macro_rules! recorded {
    ($file:literal) => {
        serde_json::from_str::<Value>(include_str!(concat!("../../tests/shapes/", $file)))
            .expect($file)
    };
}

/// Where `ours` differs from `reference`: `missing PATH`, `extra PATH` (only with `extras`),
/// `type PATH`. `null` on either side matches anything (a field that may be null); an array's
/// elements are compared by its first element. Paths under one of `partial` may lack keys
/// the reference has (llama-server reports knobs this server does not have).
fn differences(reference: &Value, ours: &Value, extras: bool, partial: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    compare(reference, ours, "", extras, partial, &mut out);
    out
}

fn compare(
    reference: &Value,
    ours: &Value,
    path: &str,
    extras: bool,
    partial: &[&str],
    out: &mut Vec<String>,
) {
    match (reference, ours) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(r), Value::Object(o)) => {
            for (key, value) in r {
                let at = format!("{path}.{key}");
                match o.get(key) {
                    Some(mine) => compare(value, mine, &at, extras, partial, out),
                    None if partial.iter().any(|p| path.starts_with(p)) => {}
                    None => out.push(format!("missing {at}")),
                }
            }
            if extras {
                let extra = o.keys().filter(|k| !r.contains_key(*k));
                out.extend(extra.map(|key| format!("extra {path}.{key}")));
            }
        }
        (Value::Array(r), Value::Array(o)) => {
            if let (Some(r), Some(o)) = (r.first(), o.first()) {
                compare(r, o, &format!("{path}[]"), extras, partial, out);
            }
        }
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_)) => {}
        _ => out.push(format!("type {path}")),
    }
}

fn json_of(body: impl Serialize) -> Value {
    serde_json::to_value(body).unwrap()
}

fn finish() -> Finish {
    Finish {
        reason: FinishReason::Length,
        usage: Usage {
            prompt_tokens: 5,
            completion_tokens: 4,
            cached_tokens: 1,
        },
        timings: Timings {
            queue_ms: 0.5,
            prompt_ms: 3.0,
            predicted_ms: 8.0,
        },
        stop_word: None,
    }
}

fn token_logprobs() -> Vec<TokenLogprob> {
    let candidate = |token, logprob| Candidate {
        token,
        bytes: b"Hi".to_vec(),
        logprob,
    };
    vec![TokenLogprob {
        sampled: candidate(1, -0.5),
        top: vec![candidate(1, -0.5), candidate(2, -1.0)],
    }]
}

fn response(endpoint: Endpoint, envelope: &Envelope, finish: &Finish) -> Value {
    let mut logprobs = Logprobs::new(endpoint, true);
    logprobs.push(&token_logprobs());
    let choice = FinishedChoice {
        text: "Hi",
        parsed: None,
        finish,
        logprobs: logprobs.take(),
    };
    json_of(envelope.response(vec![choice], 1))
}

fn options() -> NativeOptions {
    NativeOptions {
        model: "m".into(),
        settings: GenerationSettings::new(
            &SamplingParams::default(),
            &StoppingParams::default(),
            true,
            &[],
        ),
        return_tokens: false,
        prompt_tokens: None,
        prompt: Some("Once upon a time".into()),
        post_sampling_probs: false,
        reports: StreamReports::default(),
    }
}

/// What this server does not report in llama-server's `generation_settings` (samplers and
/// features it does not have) is left out rather than faked.
const SETTINGS: &[&str] = &[
    ".generation_settings",
    ".default_generation_settings.params",
];

#[test]
fn openai_bodies_have_every_field_of_openai_reference() {
    let finish = finish();
    let chat = Envelope::new(Endpoint::Chat, "m");
    let text = Envelope::new(Endpoint::Completions, "m");
    let cases = [
        (
            recorded!("openai/chat_response.json"),
            response(Endpoint::Chat, &chat, &finish),
        ),
        (
            recorded!("openai/chat_chunk_text.json"),
            json_of(chat.text_chunk(0, "Hi", None, None)),
        ),
        (
            recorded!("openai/chat_chunk_finish.json"),
            json_of(chat.finish_chunk(0, &finish, false, None)),
        ),
        (
            recorded!("openai/chat_chunk_usage.json"),
            json_of(chat.usage_chunk(&finish)),
        ),
        (
            recorded!("openai/completion_response.json"),
            response(Endpoint::Completions, &text, &finish),
        ),
    ];
    for (reference, ours) in cases {
        assert_eq!(
            differences(&reference, &ours, false, &[]),
            Vec::<String>::new()
        );
    }
    let error = ApiError::from(InvalidRequest::Field {
        param: "messages".into(),
        message: "bad".into(),
    });
    let error = json_of(error.body());
    let reference = recorded!("openai/error.json");
    assert_eq!(
        differences(&reference, &error, true, &[]),
        Vec::<String>::new()
    );
}

#[test]
fn openai_bodies_match_llama_servers() {
    let finish = finish();
    let chat = Envelope::new(Endpoint::Chat, "m");
    let text = Envelope::new(Endpoint::Completions, "m");
    let cases: [(Value, Value, &[&str]); 9] = [
        (
            recorded!("llama_server/chat_response.json"),
            response(Endpoint::Chat, &chat, &finish),
            // llama-server adds the token id to OpenAI's logprobs.
            &[
                "missing .choices[].logprobs.content[].id",
                "missing .choices[].logprobs.content[].top_logprobs[].id",
                "extra .choices[].logprobs.refusal",
                "extra .timings.queue_ms",
            ],
        ),
        (
            recorded!("llama_server/chat_chunk_role.json"),
            json_of(chat.role_chunk(0)),
            &["extra .choices[].logprobs"],
        ),
        (
            recorded!("llama_server/chat_chunk_text.json"),
            json_of(chat.text_chunk(0, "Hi", None, None)),
            &["extra .choices[].logprobs"],
        ),
        (
            recorded!("llama_server/chat_chunk_finish.json"),
            json_of(chat.finish_chunk(0, &finish, false, None)),
            // The finish chunk's timings are this server's (llama-server sends them in the
            // usage chunk only).
            &["extra .choices[].logprobs", "extra .timings"],
        ),
        (
            recorded!("llama_server/chat_chunk_usage.json"),
            json_of(chat.usage_chunk(&finish)),
            &["extra .timings.queue_ms"],
        ),
        (
            recorded!("llama_server/completion_response.json"),
            response(Endpoint::Completions, &text, &finish),
            // Completions' log probabilities in OpenAI's legacy shape, where llama-server
            // uses its chat shape.
            &[
                "missing .choices[].logprobs.content",
                "extra .choices[].logprobs.tokens",
                "extra .choices[].logprobs.token_logprobs",
                "extra .choices[].logprobs.top_logprobs",
                "extra .choices[].logprobs.text_offset",
                "extra .timings.queue_ms",
            ],
        ),
        (
            recorded!("llama_server/completion_chunk_text.json"),
            json_of(text.text_chunk(0, "Hi", None, None)),
            &[],
        ),
        (
            recorded!("llama_server/completion_chunk_finish.json"),
            json_of(text.finish_chunk(0, &finish, false, None)),
            // llama-server puts the usage in a completion's finish chunk; this server sends
            // it in a chunk of its own with `stream_options.include_usage`, as OpenAI does.
            &["missing .usage", "extra .timings.queue_ms"],
        ),
        (
            recorded!("llama_server/error_context.json"),
            json_of(
                ApiError::from(RequestError::ExceedsContext {
                    n_prompt_tokens: 9,
                    n_requested: 1,
                    n_ctx: 8,
                })
                .body(),
            ),
            &["extra .error.param"],
        ),
    ];
    for (reference, ours, expected) in cases {
        let mut found = differences(&reference, &ours, true, &[]);
        found.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(found, expected, "{ours}");
    }
}

#[test]
fn native_bodies_match_llama_servers() {
    let finish = finish();
    let options = options();
    let mut result = NativeFinal::new(&options, 0, "Hi", &[], &finish);
    result.completion_probabilities = Some(logprobs::native(&token_logprobs(), false));
    let progress = ProgressBody::from(&PromptProgress {
        total: 5,
        cache: 1,
        processed: 5,
        time_ms: 3.0,
    });
    let running = TimingsBody::finished(&finish.usage, &finish.timings);
    let mut partial = NativePartial::new(&options, "Hi", &[1], 1);
    partial.tokens_evaluated = Some(5);
    partial.timings = Some(running);
    let settings = DefaultSettings {
        params: options.settings.clone(),
        n_ctx: Some(1024),
    };
    let slot = SlotBody {
        id: 0,
        id_worker: 0,
        n_ctx: 1024,
        speculative: false,
        is_processing: false,
    };
    let cases: [(Value, Value, &[&str]); 7] = [
        (
            recorded!("llama_server/native_result.json"),
            json_of(&result),
            // `cache_prompt` in the settings is this server's.
            &[
                "extra .generation_settings.cache_prompt",
                "extra .timings.queue_ms",
            ],
        ),
        (
            recorded!("llama_server/native_final.json"),
            json_of(NativeFinal::new(&options, 0, "", &[], &finish)),
            &[
                "extra .generation_settings.cache_prompt",
                "extra .timings.queue_ms",
            ],
        ),
        (
            recorded!("llama_server/native_partial.json"),
            json_of(&partial),
            &["extra .timings.queue_ms"],
        ),
        (
            recorded!("llama_server/native_progress.json"),
            json_of(NativePartial::progress(&options, progress, Some(running))),
            &["extra .timings.queue_ms"],
        ),
        (
            recorded!("llama_server/props.json"),
            json_of(PropsBody::new(settings, 2, ("m", "/m.gguf"), "{{ x }}")),
            // Template capabilities, special tokens and the web UI's settings are not
            // reported; the default settings are the same object as a result's.
            &[
                "extra .default_generation_settings.params.cache_prompt",
                "extra .default_generation_settings.params.logit_bias",
                "extra .default_generation_settings.params.stop",
                "missing .bos_token",
                "missing .chat_template_caps",
                "missing .cors_proxy_enabled",
                "missing .eos_token",
                "missing .media_marker",
                "missing .model_ftype",
                "missing .ui",
                "missing .ui_settings",
            ],
        ),
        (
            recorded!("llama_server/slots.json"),
            json_of(vec![slot]),
            // A slot's task state is not reported (a worker reports how many run, not
            // which); the worker it belongs to is added.
            &[
                "missing [].id_task",
                "missing [].n_prompt_tokens",
                "missing [].n_prompt_tokens_cache",
                "missing [].n_prompt_tokens_processed",
                "missing [].next_token",
                "missing [].params",
                "extra [].id_worker",
            ],
        ),
        (
            recorded!("llama_server/apply_template.json"),
            json_of(RenderedBody { prompt: "x".into() }),
            &[],
        ),
    ];
    for (reference, ours, expected) in cases {
        let mut found = differences(&reference, &ours, true, SETTINGS);
        found.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(found, expected, "{ours}");
    }
}

#[test]
fn the_comparison_catches_a_missing_or_retyped_field() {
    let reference = serde_json::json!({"a": {"b": 1, "c": [{"d": "x"}]}, "e": null});
    let ours = serde_json::json!({"a": {"c": [{"d": 2}], "z": true}, "e": 3});
    assert_eq!(
        differences(&reference, &ours, true, &[]),
        ["missing .a.b", "type .a.c[].d", "extra .a.z"]
    );
    assert_eq!(
        differences(&reference, &ours, false, &[".a"]),
        ["type .a.c[].d"]
    );
}

#[test]
fn anthropic_bodies_match_llama_servers() {
    use crate::anthropic::response::{BlockDelta, ContentBlock, MessageHead, StreamEvent};

    let finish = finish();
    let head = MessageHead::new("m");
    let cases: [(Value, Value, &[&str]); 7] = [
        (
            recorded!("llama_server/anthropic_message.json"),
            json_of(head.message("Hi", None, &finish)),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_message_start.json"),
            json_of(head.start(5, 1)),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_content_block_start.json"),
            json_of(StreamEvent::ContentBlockStart {
                index: 0,
                content_block: ContentBlock::Text { text: "" },
            }),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_content_block_delta.json"),
            json_of(StreamEvent::ContentBlockDelta {
                index: 0,
                delta: BlockDelta::TextDelta { text: "Hi" },
            }),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_content_block_stop.json"),
            json_of(StreamEvent::ContentBlockStop { index: 0 }),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_message_delta.json"),
            json_of(StreamEvent::message_delta(&finish, false)),
            &[],
        ),
        (
            recorded!("llama_server/anthropic_message_stop.json"),
            json_of(StreamEvent::MessageStop),
            &[],
        ),
    ];
    for (reference, ours, expected) in cases {
        let mut found = differences(&reference, &ours, true, &[]);
        found.sort();
        assert_eq!(found, expected, "{ours}");
    }
    let count = recorded!("llama_server/anthropic_count_tokens.json");
    let ours = json_of(crate::http::messages::TokenCountBody { input_tokens: 3 });
    assert_eq!(differences(&count, &ours, true, &[]), Vec::<String>::new());
}

#[test]
fn responses_bodies_match_llama_servers() {
    use crate::responses::response::{EventKind, OutputText, ResponseHead, StreamEvent};

    let finish = finish();
    let head = ResponseHead::new("m");
    let event = |kind, timings| {
        json_of(StreamEvent {
            kind,
            sequence_number: 0,
            timings,
            prompt_progress: None,
        })
    };
    let item = || head.message(Some("Hi"), "completed");
    let ids = &head.message_id;
    let timings = TimingsBody::finished(&finish.usage, &finish.timings);
    // This server adds OpenAI's `sequence_number` to every event, and `created_at`, `model`
    // and `output` to the response of the first two; its usage has `output_tokens_details`.
    let numbered = "extra .sequence_number";
    let cases: [(Value, Value, &[&str]); 10] = [
        (
            recorded!("llama_server/responses_response.json"),
            json_of(head.completed("Hi", None, &finish)),
            &[
                "missing .completed_at",
                "extra .usage.output_tokens_details",
            ],
        ),
        (
            recorded!("llama_server/responses_created.json"),
            event(
                EventKind::Created {
                    response: head.in_progress(),
                },
                None,
            ),
            &[
                numbered,
                "extra .response.created_at",
                "extra .response.model",
                "extra .response.output",
            ],
        ),
        (
            recorded!("llama_server/responses_in_progress.json"),
            event(
                EventKind::InProgress {
                    response: head.in_progress(),
                },
                None,
            ),
            &[
                numbered,
                "extra .response.created_at",
                "extra .response.model",
                "extra .response.output",
            ],
        ),
        (
            recorded!("llama_server/responses_output_item_added.json"),
            event(
                EventKind::ItemAdded {
                    output_index: 0,
                    item: head.message(None, "in_progress"),
                },
                None,
            ),
            &[numbered, "extra .output_index"],
        ),
        (
            recorded!("llama_server/responses_content_part_added.json"),
            event(
                EventKind::PartAdded {
                    item_id: ids,
                    output_index: 0,
                    content_index: 0,
                    part: OutputText::new(""),
                },
                None,
            ),
            &[
                numbered,
                "extra .output_index",
                "extra .content_index",
                "extra .part.annotations",
                "extra .part.logprobs",
            ],
        ),
        (
            recorded!("llama_server/responses_output_text_delta.json"),
            event(
                EventKind::TextDelta {
                    item_id: ids,
                    output_index: 0,
                    content_index: 0,
                    delta: "Hi",
                },
                None,
            ),
            &[numbered, "extra .output_index", "extra .content_index"],
        ),
        (
            recorded!("llama_server/responses_output_text_done.json"),
            event(
                EventKind::TextDone {
                    item_id: ids,
                    output_index: 0,
                    content_index: 0,
                    text: "Hi",
                },
                None,
            ),
            &[numbered, "extra .output_index", "extra .content_index"],
        ),
        (
            recorded!("llama_server/responses_content_part_done.json"),
            event(
                EventKind::PartDone {
                    item_id: ids,
                    output_index: 0,
                    content_index: 0,
                    part: OutputText::new("Hi"),
                },
                None,
            ),
            &[numbered, "extra .output_index", "extra .content_index"],
        ),
        (
            recorded!("llama_server/responses_output_item_done.json"),
            event(
                EventKind::ItemDone {
                    output_index: 0,
                    item: item(),
                },
                None,
            ),
            &[numbered, "extra .output_index"],
        ),
        (
            recorded!("llama_server/responses_completed.json"),
            event(
                EventKind::Completed {
                    response: head.completed("Hi", None, &finish),
                },
                Some(timings),
            ),
            &[
                numbered,
                "extra .response.usage.output_tokens_details",
                "extra .timings.queue_ms",
            ],
        ),
    ];
    for (reference, ours, expected) in cases {
        let mut found = differences(&reference, &ours, true, &[]);
        found.sort();
        let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(found, expected, "{ours}");
    }
}
