//! The engine with the real SmolLM2-135M model: correctness of continuous batching, sequence
//! reuse, cancellation, stopping, sampling and request-scoped failures.

mod support;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llamapool_common::protocol::ChatPrompt;
use llamapool_common::{
    ChatMessage, FinishReason, GenerationEvent, RequestError, RequestId, SamplingParams,
    StoppingParams,
};
use llamapool_worker::engine::text::TextAssembler;
use llamapool_worker::{EngineRequest, Model, ModelOptions};
use support::*;

#[test]
fn no_kv_leakage_across_50_reused_sequences() {
    let engine = engine(4, 2048, 256);
    let h = &engine.handle;
    let prompt = "The capital of France is";
    let before = run(h, greedy(1, prompt, 24));
    assert_eq!(before.tokens.len(), 24);
    let (tx, rx) = mpsc::channel();
    for i in 0..50u64 {
        let filler = format!(
            "Request number {i} talks about {} and more.",
            ["cats", "ships", "rain", "numbers", "bread"][i as usize % 5]
        );
        h.submit(greedy(100 + i, &filler, 4 + (i % 7) as u32), tx.clone());
    }
    let mut finished = 0;
    while finished < 50 {
        if rx.recv_timeout(TIMEOUT).expect("events").is_final() {
            finished += 1;
        }
    }
    let after = run(h, greedy(2, prompt, 24));
    assert_eq!(
        before.tokens, after.tokens,
        "the same prompt gave different greedy tokens after reuse"
    );
    assert_eq!(before.text, after.text);
    let stats = h.stats().unwrap();
    assert_eq!(stats.free_ids, 4, "every sequence id is free at the end");
    assert_eq!((stats.running, stats.waiting), (0, 0));
    engine.stop(true);
}

#[test]
fn concurrent_requests_get_exact_counts_and_late_ones_join_the_running_batch() {
    let engine = engine(16, 8192, 512);
    let h = &engine.handle;
    let (tx, rx) = mpsc::channel();
    let prompts = [
        "Once upon a time",
        "List three colors:",
        "def fibonacci(n):",
        "The weather today",
        "Dear friend,",
        "In 1492",
        "Water boils at",
        "My favourite food is",
    ];
    let mut expected = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let max = 30 + 5 * i as u32;
        let mut r = greedy(i as u64, p, max);
        r.stopping.ignore_eos = true;
        expected.insert(RequestId(i as u64), max);
        h.submit(r, tx.clone());
    }
    let mut counts: HashMap<RequestId, u32> = HashMap::new();
    let mut late_submitted = false;
    let mut late_first_token_before_any_finish = None;
    let mut any_finished = false;
    let mut done = 0;
    while done < prompts.len() + 1 {
        let o = match rx.recv_timeout(TIMEOUT).expect("events") {
            GenerationEvent::Accepted { .. } => continue,
            GenerationEvent::Output(o) => o,
            rejected @ GenerationEvent::Rejected { .. } => {
                panic!("unexpected rejection: {rejected:?}")
            }
        };
        *counts.entry(o.id).or_default() += o.tokens.len() as u32;
        if o.id == RequestId(99)
            && late_first_token_before_any_finish.is_none()
            && !o.tokens.is_empty()
        {
            late_first_token_before_any_finish = Some(!any_finished);
        }
        if let Some(f) = &o.finish {
            done += 1;
            if o.id != RequestId(99) {
                any_finished = true;
                assert_eq!(f.reason, FinishReason::Length);
                assert_eq!(f.usage.completion_tokens, expected[&o.id]);
            }
        }
        // Once every running request has produced 5 tokens, submit a late one.
        if !late_submitted && counts.len() == prompts.len() && counts.values().all(|&c| c >= 5) {
            h.submit(greedy(99, "A late request", 8), tx.clone());
            late_submitted = true;
        }
    }
    for (id, max) in expected {
        assert_eq!(
            counts[&id], max,
            "{id} generated the wrong number of tokens"
        );
    }
    assert_eq!(
        late_first_token_before_any_finish,
        Some(true),
        "the late request waited for the batch to finish"
    );
    engine.stop(true);
}

#[test]
fn cancel_while_waiting_prefilling_and_decoding() {
    // One slot and 8-token chunks: a 400-token prompt prefills over 50 steps.
    let engine = engine(1, 1024, 8);
    let h = &engine.handle;
    let reference = run(h, greedy(1, "Hello there", 10));
    let long_prompt = "word ".repeat(400);
    let (tx_a, rx_a) = mpsc::channel();
    h.submit(greedy(2, &long_prompt, 4), tx_a);
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.stats().unwrap().running == 0 {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    let (tx_b, rx_b) = mpsc::channel();
    h.submit(greedy(3, "Hi", 4), tx_b);
    h.cancel(RequestId(3)); // waiting: the only slot is taken
    h.cancel(RequestId(2)); // prefilling
    let b = wait(&rx_b);
    assert_eq!(b.finish.unwrap().reason, FinishReason::Cancelled);
    assert!(b.tokens.is_empty());
    let a = wait(&rx_a);
    assert_eq!(a.finish.unwrap().reason, FinishReason::Cancelled);
    assert!(a.tokens.is_empty(), "cancelled before its first token");

    let (tx_c, rx_c) = mpsc::channel();
    let mut c = greedy(4, "Tell me a story", 500);
    c.stopping.ignore_eos = true;
    h.submit(c, tx_c);
    let accepted = rx_c.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(accepted, GenerationEvent::Accepted { id: RequestId(4) });
    let first = rx_c.recv_timeout(TIMEOUT).unwrap();
    assert!(
        matches!(&first, GenerationEvent::Output(o) if o.tokens.len() == 1 && o.finish.is_none())
    );
    h.cancel(RequestId(4)); // decoding
    let rest = wait(&rx_c);
    let finish = rest.finish.unwrap();
    assert_eq!(finish.reason, FinishReason::Cancelled);
    assert!(finish.usage.completion_tokens < 500);
    assert_eq!(h.stats().unwrap().free_ids, 1);
    let again = run(h, greedy(5, "Hello there", 10));
    assert_eq!(reference.tokens, again.tokens);
    engine.stop(true);
}

#[test]
fn stop_string_spanning_tokens_is_cut_and_not_emitted() {
    let engine = engine(2, 2048, 256);
    let h = &engine.handle;
    let model = smollm2();
    let request = |id| {
        let mut r = greedy(id, "Write a sentence about the sea.", 40);
        r.stopping.ignore_eos = true;
        r
    };
    let reference = run(h, request(1));
    // Pick a stop string that spans the boundary between two generated tokens.
    let pieces: Vec<String> = reference
        .tokens
        .iter()
        .map(|&t| String::from_utf8_lossy(&model.piece(t)).into_owned())
        .collect();
    let k = (3..pieces.len() - 1)
        .find(|&k| {
            [&pieces[k], &pieces[k + 1]]
                .iter()
                .all(|p| p.len() >= 2 && p.is_ascii())
        })
        .unwrap_or_else(|| panic!("two adjacent ASCII tokens in {pieces:?}"));
    let before: String = pieces[..k].concat();
    let stop = format!(
        "{}{}",
        &pieces[k][pieces[k].len() - 2..],
        &pieces[k + 1][..2]
    );
    let expected_text = reference.text[..reference
        .text
        .find(&stop)
        .expect("stop occurs in the reference")]
        .to_string();
    assert!(expected_text.len() <= before.len() + pieces[k].len());
    let mut r = request(2);
    r.stopping.stop = vec![stop.clone()];
    let out = run(h, r);
    assert_eq!(out.text, expected_text, "stop {stop:?}");
    assert!(!out.text.contains(&stop));
    assert_eq!(out.finish.unwrap().reason, FinishReason::Stop);
    engine.stop(true);
}

#[test]
fn multi_byte_characters_split_across_tokens_come_out_whole() {
    let model = smollm2();
    let text = "Llamas 🦙 live in the Andes: 日本語 and café ☕.";
    let tokens = model.tokenize(text, false);
    let split = tokens
        .iter()
        .any(|&t| std::str::from_utf8(&model.piece(t)).is_err());
    assert!(
        split,
        "the test text must contain a character split across tokens"
    );
    let mut assembler = TextAssembler::new(Vec::new());
    let mut out = String::new();
    for &t in &tokens {
        let released = assembler.push(&model.piece(t));
        assert!(
            !released.text.contains('\u{fffd}'),
            "a partial character was emitted"
        );
        out.push_str(&released.text);
    }
    out.push_str(&assembler.finish());
    assert_eq!(out, text);
    // And through the engine: an echo-style prompt whose output is never broken UTF-8.
    let engine = engine(1, 1024, 256);
    let mut r = greedy(1, "Repeat exactly: 🦙🦙🦙 日本語 日本語", 30);
    r.stopping.ignore_eos = true;
    let out = run(&engine.handle, r);
    assert_eq!(out.tokens.len(), 30);
    assert!(std::str::from_utf8(out.text.as_bytes()).is_ok());
    engine.stop(true);
}

#[test]
fn seeded_sampling_is_reproducible_and_penalties_run() {
    let engine = engine(2, 2048, 256);
    let h = &engine.handle;
    let sampled = |id: u64, seed: u32| {
        let mut r = greedy(id, "Invent a name for a cat:", 24);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            min_p: 0.0,
            seed: Some(seed),
            repeat_penalty: 1.1,
            presence_penalty: 0.2,
            frequency_penalty: 0.2,
            logit_bias: vec![(0, -5.0)],
            ..SamplingParams::default()
        };
        run(h, r)
    };
    let a = sampled(1, 42);
    let b = sampled(2, 42);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    let others: Vec<_> = (0..4)
        .map(|s| sampled(10 + s as u64, 1000 + s).tokens)
        .collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "different seeds never changed the output"
    );
    // A logit bias of -inf bans a token: ban greedy's first choice and it must not appear first.
    let plain = run(h, greedy(20, "The capital of France is", 3));
    let mut banned = greedy(21, "The capital of France is", 3);
    banned.sampling.logit_bias = vec![(plain.tokens[0], f32::NEG_INFINITY)];
    let out = run(h, banned);
    assert_ne!(out.tokens[0], plain.tokens[0]);
    engine.stop(true);
}

#[test]
fn a_prompt_longer_than_the_context_is_rejected_and_the_engine_keeps_serving() {
    // 4 slots of 256 tokens each.
    let engine = engine(4, 1024, 256);
    let h = &engine.handle;
    let long = run(h, greedy(1, &"lorem ipsum ".repeat(200), 8));
    match long.error {
        Some(RequestError::ExceedsContext {
            n_prompt_tokens,
            n_ctx,
            ..
        }) => {
            assert!(n_prompt_tokens > 256);
            assert_eq!(n_ctx, 256);
        }
        other => panic!("expected ExceedsContext, got {other:?}"),
    }
    let mut unbounded = greedy(2, "Count: 1, 2, 3,", 1);
    unbounded.stopping = StoppingParams {
        ignore_eos: true,
        ..StoppingParams::default()
    };
    let n_prompt = unbounded.prompt.len();
    let out = run(h, unbounded);
    assert_eq!(out.finish.as_ref().unwrap().reason, FinishReason::Length);
    assert_eq!(
        out.tokens.len() + n_prompt,
        256,
        "generation ends at the sequence's context limit"
    );
    let ok = run(h, greedy(3, "Hello", 5));
    assert_eq!(ok.tokens.len(), 5);
    assert_eq!(h.stats().unwrap().free_ids, 4);
    engine.stop(true);
}

#[test]
fn chat_templates_from_the_model_or_the_configuration() {
    let messages = [ChatMessage {
        role: "user".into(),
        content: "Say hi".into(),
        ..ChatMessage::default()
    }];
    let chat = |messages: &[ChatMessage]| ChatPrompt {
        messages: messages.to_vec(),
        ..ChatPrompt::default()
    };
    let smol = smollm2();
    let rendered = smol
        .render_chat(&chat(&messages), None)
        .expect("SmolLM2 has a chat template");
    // SmolLM2's own Jinja template adds its default system prompt.
    assert!(
        rendered
            .prompt
            .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{}",
        rendered.prompt
    );
    assert!(rendered
        .prompt
        .ends_with("Say hi<|im_end|>\n<|im_start|>assistant\n"));
    let tokens = smol.tokenize(&rendered.prompt, true);
    let engine = engine(1, 1024, 256);
    let out = run(
        &engine.handle,
        EngineRequest {
            prompt: tokens,
            ..greedy(1, "", 30)
        },
    );
    assert!(out.error.is_none());
    assert!(!out.tokens.is_empty());
    engine.stop(true);

    let gemma_path = models_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(
        gemma_path.is_file(),
        "run scripts/setup: {} is missing",
        gemma_path.display()
    );
    // Without a template of its own, as llama-server: ChatML.
    let gemma = Model::load(&gemma_path, &ModelOptions::default()).unwrap();
    let rendered = gemma.render_chat(&chat(&messages), None).unwrap();
    assert_eq!(
        rendered.prompt,
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A built-in name goes through llama.cpp's template matcher.
    let gemma = Model::load(
        &gemma_path,
        &ModelOptions {
            chat_template: Some("gemma".into()),
            ..ModelOptions::default()
        },
    )
    .unwrap();
    let rendered = gemma.render_chat(&chat(&messages), None).unwrap();
    assert!(
        rendered
            .prompt
            .contains("<start_of_turn>user\nSay hi<end_of_turn>"),
        "{}",
        rendered.prompt
    );
    let bad = Model::load(
        &gemma_path,
        &ModelOptions {
            chat_template: Some("{% if messages %}unclosed".into()),
            ..ModelOptions::default()
        },
    );
    assert!(
        bad.is_err(),
        "a template that does not parse must fail at load"
    );
}

#[test]
fn a_grammar_constrains_greedy_ignore_eos_and_resumed_requests() {
    let engine = engine(2, 1024, 256);
    let h = &engine.handle;
    let with_grammar = |id: u64, prompt: &str, max: u32, grammar: &str| {
        let mut r = greedy(id, prompt, max);
        r.sampling.grammar = Some(grammar.to_string());
        r
    };
    let answer = r#"root ::= "The answer is " ("yes" | "no") "." "#;
    let whole = run(h, with_grammar(1, "Is the sky blue?", 32, answer));
    assert!(
        ["The answer is yes.", "The answer is no."].contains(&whole.text.as_str()),
        "{whole:?}"
    );
    assert_eq!(whole.finish.as_ref().unwrap().reason, FinishReason::Stop);

    // At the grammar's end only end-of-generation is allowed, and ignore_eos bans it: the
    // sequence runs to max_tokens without any more text instead of aborting the process.
    let mut banned = with_grammar(2, "Is the sky blue?", 24, answer);
    banned.stopping.ignore_eos = true;
    let out = run(h, banned);
    assert_eq!(out.text, whole.text);
    assert_eq!(out.finish.as_ref().unwrap().reason, FinishReason::Length);

    // A request moved after two tokens replays them into the grammar and continues the same.
    let mut moved = with_grammar(3, "Is the sky blue?", 30, answer);
    moved.prompt.extend_from_slice(&whole.tokens[..2]);
    moved.resumed = 2;
    let rest = run(h, moved);
    assert_eq!(rest.tokens, whole.tokens[2..], "{rest:?}");
    // Resumed tokens the grammar does not allow, and grammars llama.cpp refuses, are
    // rejections naming `grammar`; the engine goes on serving.
    let mut wrong = with_grammar(4, "Is the sky blue?", 30, r#"root ::= "x""#);
    wrong.prompt.extend_from_slice(&whole.tokens[..2]);
    wrong.resumed = 2;
    for (request, what) in [
        (wrong, "resumed"),
        (
            with_grammar(5, "Hi", 4, "root ::= \"unterminated"),
            "syntax",
        ),
        (
            with_grammar(6, "Hi", 4, "root ::= root \"a\""),
            "left recursion",
        ),
        (
            with_grammar(7, "Hi", 4, "root ::= undefined"),
            "undefined rule",
        ),
    ] {
        match run(h, request).error {
            Some(RequestError::InvalidParam { param, .. }) => assert_eq!(param, "grammar"),
            other => panic!("{what}: expected InvalidParam, got {other:?}"),
        }
    }
    assert_eq!(run(h, greedy(8, "Hello", 3)).tokens.len(), 3);
    assert_eq!(h.stats().unwrap().free_ids, 2);
    engine.stop(true);
}

#[test]
fn the_prompt_cache_reuses_prefixes_without_changing_greedy_output() {
    let first = "The history of the printing press begins in the fifteenth century, when";
    let second = format!("{first} Johannes Gutenberg built a press in Mainz. Describe how");
    let fresh = |prompt: &str| {
        let engine = engine(2, 2048, 256);
        let out = run(&engine.handle, greedy(1, prompt, 24));
        engine.stop(true);
        out
    };
    let (fresh_first, fresh_second) = (fresh(first), fresh(&second));

    let engine = engine(2, 2048, 256);
    let h = &engine.handle;
    let cold = run(h, greedy(1, first, 24));
    let usage = |o: &Outcome| o.finish.as_ref().expect("finished").usage;
    assert_eq!(usage(&cold).cached_tokens, 0);
    let again = run(h, greedy(2, first, 24));
    let extended = run(h, greedy(3, &second, 24));
    for (got, want) in [
        (&cold, &fresh_first),
        (&again, &fresh_first),
        (&extended, &fresh_second),
    ] {
        assert_eq!(
            got.tokens, want.tokens,
            "the prompt cache changed greedy output"
        );
        assert_eq!(got.text, want.text);
    }
    let n_first = smollm2().tokenize(first, true).len() as u32;
    assert_eq!(usage(&again).cached_tokens, n_first - 1);
    assert!(usage(&extended).cached_tokens >= n_first - 1);
    assert!(usage(&extended).cached_tokens < usage(&extended).prompt_tokens);
    let stats = h.stats().unwrap();
    assert_eq!(stats.free_ids, 2);
    engine.stop(true);
}

#[test]
fn an_ambiguous_grammar_ends_its_generation_instead_of_stalling_the_engine() {
    // Every "a" doubles llama.cpp's parse stacks for this grammar, and the time of a step
    // with them; a logit bias makes the model write "a"s.
    let engine = engine(2, 1024, 256);
    let h = &engine.handle;
    let a = smollm2().tokenize("a", false);
    let mut r = greedy(1, "Write the letter a many times:", 40);
    r.sampling.grammar = Some("root ::= r\nr ::= \"a\" r \"b\" | \"a\" r \"c\" | \"d\"\n".into());
    r.sampling.logit_bias = vec![(a[0], 100.0)];
    let start = Instant::now();
    let out = run(h, r);
    let took = start.elapsed();
    eprintln!("ambiguous grammar: {:?} in {took:?}", out.text);
    assert_eq!(
        out.finish.as_ref().unwrap().reason,
        FinishReason::Stop,
        "{out:?}"
    );
    assert!(
        out.text.starts_with("aaaa") && out.text.len() < 30,
        "{out:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The engine goes on serving.
    let next = run(h, greedy(2, "Hello", 4));
    assert_eq!(next.tokens.len(), 4);
}
