//! Prefix-affinity routing with the real model: a conversation's next turn goes to the worker
//! whose prompt cache holds the conversation so far, so it reuses its cells
//! (`usage.prompt_tokens_details.cached_tokens`), and `/metrics` counts how each request was
//! routed. Off, the router counts every request as `least_loaded`.

use std::thread;

use llamapool_tests::{smol_config, Server, PINNED_0_1};
use serde_json::{json, Value};

/// A system prompt of several hundred tokens, different per conversation from its first word.
fn system_prompt(conversation: usize) -> String {
    let mut text = format!("Conversation {conversation}. You are a patient guide to the sea. ");
    for i in 0..40 {
        text.push_str(&format!(
            "Fact {i} of {conversation}: the tide turns twice a day. "
        ));
    }
    text
}

fn turn(server: &Server, messages: &[Value]) -> (String, u64, u64) {
    let body = json!({
        "model": "smol",
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
    });
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let usage = &v["usage"];
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    )
}

/// `conversations` chats run their first turn at once, then their second turn at once.
/// Returns, per conversation, the second turn's (prompt tokens, cached tokens) and the first
/// turn's prompt tokens.
fn two_turns_each(server: &Server, conversations: usize) -> Vec<(u64, u64, u64)> {
    let first: Vec<(Vec<Value>, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..conversations)
            .map(|c| {
                s.spawn(move || {
                    let mut messages = vec![
                        json!({"role": "system", "content": system_prompt(c)}),
                        json!({"role": "user", "content": "Where does the tide go?"}),
                    ];
                    let (reply, prompt, _) = turn(server, &messages);
                    messages.push(json!({"role": "assistant", "content": reply}));
                    messages.push(json!({"role": "user", "content": "And when does it return?"}));
                    (messages, prompt)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    thread::scope(|s| {
        let handles: Vec<_> = first
            .iter()
            .map(|(messages, first_prompt)| {
                s.spawn(move || {
                    let (_, prompt, cached) = turn(server, messages);
                    (prompt, cached, *first_prompt)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn routed(server: &Server, outcome: &str) -> u64 {
    let metrics = server.get("/metrics").text();
    let series = format!("llamapool_routed_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[test]
fn every_second_turn_reuses_its_conversation_on_the_worker_that_holds_it() {
    // Two workers of 4 slots: 4 conversations spread 2 + 2, each worker can cache its own.
    let server = Server::start(&smol_config("", (4, 4096), PINNED_0_1));
    let results = two_turns_each(&server, 4);
    for (prompt, cached, first_prompt) in &results {
        // The cache holds (nearly) the whole first turn's prompt; another worker would hold
        // none of it, as the conversations differ from their system prompt's second word.
        assert!(
            cached * 10 >= first_prompt * 9 && cached < prompt,
            "second turn: {cached} of {prompt} prompt tokens cached, first turn had {first_prompt}: {results:?}"
        );
    }
    assert_eq!(
        routed(&server, "affinity"),
        4,
        "the 4 second turns followed their prefix"
    );
    assert_eq!(routed(&server, "no_prefix"), 4, "4 new conversations");
}

#[test]
fn with_affinity_off_every_request_is_routed_by_load() {
    let server = Server::start(&smol_config(
        "prefix_affinity = false",
        (4, 4096),
        PINNED_0_1,
    ));
    let results = two_turns_each(&server, 2);
    assert_eq!(results.len(), 2);
    assert_eq!(routed(&server, "least_loaded"), 4);
    assert_eq!(routed(&server, "affinity"), 0);
}
