//! Step-by-step engine tests against the scripted fake backend.

use std::sync::mpsc::{self, Receiver};
use std::time::{Instant, SystemTime};

use super::*;
use crate::backend::fake::FakeBackend;

fn limits(n_batch: usize, n_seq_max: usize, n_ctx_per_seq: usize) -> BackendLimits {
    BackendLimits {
        n_batch,
        n_seq_max,
        n_ctx_per_seq,
        n_vocab: 100,
    }
}

fn request(id: u64, prompt: Vec<Token>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        id: RequestId(id),
        prompt,
        sampling: SamplingParams::greedy(),
        stopping: StoppingParams {
            max_tokens: Some(max_tokens),
            ..StoppingParams::default()
        },
        resumed: 0,
        report_progress: false,
        special_tokens: Vec::new(),
    }
}

struct Harness {
    engine: Engine<FakeBackend>,
}

impl Harness {
    fn new(limits: BackendLimits) -> Self {
        Self {
            engine: Engine::new(FakeBackend::new(limits)),
        }
    }

    fn submit(&mut self, r: EngineRequest) -> Receiver<GenerationEvent> {
        let (tx, rx) = mpsc::channel();
        self.engine.submit(r, tx.into(), Instant::now());
        rx
    }

    fn run_until_idle(&mut self) -> usize {
        let mut steps = 0;
        while !self.engine.is_idle() {
            self.engine.step();
            steps += 1;
            assert!(steps < 10_000, "the engine made no progress");
        }
        steps
    }
}

fn collect(
    rx: &Receiver<GenerationEvent>,
) -> (Vec<Token>, String, Option<Finish>, Option<RequestError>) {
    let (mut tokens, mut text, mut finish, mut error) = (Vec::new(), String::new(), None, None);
    for event in rx.try_iter() {
        match event {
            GenerationEvent::Output(o) => {
                tokens.extend(o.tokens);
                text.push_str(&o.text);
                if o.finish.is_some() {
                    finish = o.finish;
                }
            }
            GenerationEvent::Rejected { error: e, .. } => error = Some(e),
            GenerationEvent::Accepted { .. } => {}
        }
    }
    (tokens, text, finish, error)
}

#[test]
fn generates_exactly_max_tokens_and_frees_ids() {
    let mut h = Harness::new(limits(16, 4, 64));
    let rxs: Vec<_> = (0..6)
        .map(|i| h.submit(request(i, vec![1, 2, 3], 5 + i as u32)))
        .collect();
    h.run_until_idle();
    for (i, rx) in rxs.iter().enumerate() {
        let (tokens, _, finish, _) = collect(rx);
        let finish = finish.unwrap();
        assert_eq!(tokens.len(), 5 + i);
        assert_eq!(finish.reason, FinishReason::Length);
        assert_eq!(finish.usage.completion_tokens as usize, 5 + i);
        assert_eq!(finish.usage.prompt_tokens, 3);
    }
    assert_eq!(h.engine.ids.free_count(), 4);
}

#[test]
fn every_step_respects_n_batch_and_decodes_running_sequences() {
    let mut h = Harness::new(limits(8, 4, 128));
    let _a = h.submit(request(1, (1..=20).collect(), 3));
    let _b = h.submit(request(2, (1..=20).collect(), 3));
    h.run_until_idle();
    let history = &h.engine.backend.history;
    assert!(history.iter().all(|b| b.len() <= 8));
    // The first prompt is chunked: 8 + 8 + 4 tokens, with the second one joining in step 3.
    assert_eq!(history[0].len(), 8);
    assert!(history[0].iter().all(|e| e.seq == history[0][0].seq));
    assert_eq!(
        history[2]
            .iter()
            .filter(|e| e.seq == history[0][0].seq)
            .count(),
        4
    );
    assert_eq!(
        history[2]
            .iter()
            .filter(|e| e.seq != history[0][0].seq)
            .count(),
        4
    );
    // Logits only where a token is sampled.
    for batch in history {
        for e in batch.iter().filter(|e| e.logits) {
            let seq_entries = batch.iter().filter(|x| x.seq == e.seq).count();
            assert!(seq_entries >= 1);
        }
    }
}

#[test]
fn a_late_request_starts_before_earlier_ones_finish() {
    let mut h = Harness::new(limits(32, 4, 256));
    let early = h.submit(request(1, vec![1, 2], 50));
    for _ in 0..5 {
        h.engine.step();
    }
    let late = h.submit(request(2, vec![3, 4], 5));
    h.engine.step();
    h.engine.step();
    let (late_tokens, ..) = collect(&late);
    assert!(
        !late_tokens.is_empty(),
        "the late request produced no token while the early one ran"
    );
    let (early_tokens, _, early_finish, _) = collect(&early);
    assert!(early_finish.is_none());
    assert!(early_tokens.len() < 50);
    h.run_until_idle();
}

#[test]
fn cancel_in_every_state_frees_the_id() {
    let mut h = Harness::new(limits(4, 2, 64));
    let decoding = h.submit(request(1, vec![1], 40));
    h.engine.step();
    h.engine.step();
    let prefilling = h.submit(request(2, (1..=30).collect(), 5));
    h.engine.step();
    let waiting = h.submit(request(3, vec![1], 5));
    assert_eq!(h.engine.ids.free_count(), 0);
    for id in [3, 2, 1] {
        h.engine.cancel(RequestId(id));
    }
    assert_eq!(h.engine.ids.free_count(), 2);
    assert!(h.engine.is_idle());
    for rx in [&decoding, &prefilling, &waiting] {
        let (_, _, finish, _) = collect(rx);
        assert_eq!(finish.unwrap().reason, FinishReason::Cancelled);
    }
    // Cancel is idempotent and unknown ids are ignored.
    h.engine.cancel(RequestId(1));
    h.engine.cancel(RequestId(99));
}

#[test]
fn acceptance_comes_first_and_a_rejected_request_is_never_accepted() {
    let mut h = Harness::new(limits(16, 2, 64));
    let ok = h.submit(request(1, vec![1, 2], 3));
    let bad = h.submit(request(2, vec![], 3));
    h.run_until_idle();
    let events: Vec<_> = ok.try_iter().collect();
    assert_eq!(events[0], GenerationEvent::Accepted { id: RequestId(1) });
    assert!(events[1..]
        .iter()
        .all(|e| matches!(e, GenerationEvent::Output(_))));
    assert!(events.last().unwrap().is_final());
    let events: Vec<_> = bad.try_iter().collect();
    assert_eq!(
        events,
        vec![GenerationEvent::Rejected {
            id: RequestId(2),
            error: RequestError::EmptyPrompt
        }]
    );
}

#[test]
fn end_of_generation_stops_unless_ignored() {
    let mut h = Harness::new(limits(16, 2, 256));
    // Tokens count up from the last prompt token; 99 is end-of-generation.
    let stops = h.submit(request(1, vec![95], 20));
    let ignores = h.submit(EngineRequest {
        stopping: StoppingParams {
            max_tokens: Some(20),
            ignore_eos: true,
            ..StoppingParams::default()
        },
        ..request(2, vec![95], 20)
    });
    h.run_until_idle();
    let (tokens, _, finish, _) = collect(&stops);
    assert_eq!(tokens, vec![96, 97, 98, 99]);
    assert_eq!(finish.unwrap().reason, FinishReason::Stop);
    let (tokens, _, finish, _) = collect(&ignores);
    assert_eq!(tokens.len(), 20);
    assert!(!tokens.contains(&99));
    assert_eq!(finish.unwrap().reason, FinishReason::Length);
}

#[test]
fn stop_string_spanning_tokens_ends_generation_without_emitting_it() {
    let mut h = Harness::new(limits(16, 1, 256));
    h.engine.backend.pieces.insert(11, b"he".to_vec());
    h.engine.backend.pieces.insert(12, b"llo wo".to_vec());
    h.engine.backend.pieces.insert(13, b"rld".to_vec());
    let rx = h.submit(EngineRequest {
        stopping: StoppingParams {
            max_tokens: Some(20),
            stop: vec!["o world".into()],
            ignore_eos: false,
            cache_prompt: true,
        },
        ..request(1, vec![10], 20)
    });
    h.run_until_idle();
    let (tokens, text, finish, _) = collect(&rx);
    assert_eq!(tokens, vec![11, 12, 13]);
    assert_eq!(text, "hell");
    assert_eq!(finish.unwrap().reason, FinishReason::Stop);
}

#[test]
fn requests_over_the_context_are_rejected_and_others_continue() {
    let mut h = Harness::new(limits(16, 2, 32));
    let too_long = h.submit(request(1, (1..=40).collect(), 1));
    let no_room = h.submit(request(2, (1..=30).collect(), 5));
    let bad_token = h.submit(request(3, vec![1, 500], 1));
    let empty = h.submit(request(4, vec![], 1));
    let fine = h.submit(request(5, (1..=30).collect(), 2));
    let unbounded = h.submit(EngineRequest {
        stopping: StoppingParams::default(),
        ..request(6, vec![1], 1)
    });
    h.run_until_idle();
    assert!(matches!(
        collect(&too_long).3,
        Some(RequestError::ExceedsContext {
            n_prompt_tokens: 40,
            n_ctx: 32,
            ..
        })
    ));
    assert!(matches!(
        collect(&no_room).3,
        Some(RequestError::ExceedsContext { n_requested: 5, .. })
    ));
    assert!(matches!(
        collect(&bad_token).3,
        Some(RequestError::InvalidToken { token: 500, .. })
    ));
    assert_eq!(collect(&empty).3, Some(RequestError::EmptyPrompt));
    assert_eq!(collect(&fine).0.len(), 2);
    // No max_tokens: generation runs to the sequence's context limit, finish reason length.
    let (tokens, _, finish, _) = collect(&unbounded);
    let finish = finish.unwrap();
    assert_eq!(finish.reason, FinishReason::Length);
    // ignore_eos is off, so it may hit EOG (token 99) only after 98 tokens; the context is 32.
    assert_eq!(tokens.len(), 31);
}

#[test]
fn a_full_kv_cache_evicts_only_the_newest_sequence() {
    let mut h = Harness::new(limits(16, 3, 64));
    let first = h.submit(request(1, vec![1, 2], 4));
    let second = h.submit(request(2, vec![3, 4], 4));
    h.engine.backend.inject.push(DecodeFailure::NoKvSlot);
    h.run_until_idle();
    assert_eq!(collect(&first).0.len(), 4);
    assert_eq!(collect(&second).3, Some(RequestError::KvCacheFull));
    assert_eq!(h.engine.ids.free_count(), 3);
}

#[test]
fn a_failed_decode_fails_its_sequences_and_the_engine_goes_on() {
    let mut h = Harness::new(limits(16, 3, 64));
    let a = h.submit(request(1, vec![1, 2], 4));
    h.engine
        .backend
        .inject
        .push(DecodeFailure::Other("boom".into()));
    h.run_until_idle();
    assert_eq!(
        collect(&a).3,
        Some(RequestError::DecodeFailed("boom".into()))
    );
    let b = h.submit(request(2, vec![1, 2], 4));
    h.run_until_idle();
    assert_eq!(collect(&b).0.len(), 4);
    assert_eq!(h.engine.ids.free_count(), 3);
}

#[test]
fn a_dropped_receiver_frees_the_sequence() {
    let mut h = Harness::new(limits(16, 1, 64));
    let rx = h.submit(request(1, vec![1], 30));
    h.engine.step();
    drop(rx);
    h.engine.step();
    assert!(h.engine.is_idle());
    assert_eq!(h.engine.ids.free_count(), 1);
}

#[test]
fn duplicate_ids_are_rejected_and_the_thread_api_works() {
    let engine = RunningEngine::spawn(FakeBackend::new(limits(16, 2, 64))).unwrap();
    let (tx, rx) = mpsc::channel();
    engine.handle.submit(request(7, vec![1], 10), tx.clone());
    engine.handle.submit(request(7, vec![1], 10), tx);
    // The rejection may come before, among or after the first request's events; the channel
    // closes once both requests have ended.
    assert!(rx.iter().any(|e| matches!(
        e,
        GenerationEvent::Rejected {
            error: RequestError::DuplicateId(_),
            ..
        }
    )));
    let stats = engine.handle.stats().unwrap();
    assert_eq!(stats.slots, 2);
    engine.stop(true);
}

#[test]
fn resumed_tokens_restore_stop_string_state_after_a_move() {
    let mut h = Harness::new(limits(16, 1, 256));
    h.engine.backend.pieces.insert(11, b"he".to_vec());
    h.engine.backend.pieces.insert(12, b"llo".to_vec());
    let stopping = StoppingParams {
        max_tokens: Some(5),
        stop: vec!["hello".into()],
        ignore_eos: false,
        cache_prompt: true,
    };
    // Token 11 was generated (and "he" held back) by a worker that died; this one resumes.
    let moved = h.submit(EngineRequest {
        stopping: stopping.clone(),
        resumed: 1,
        ..request(1, vec![10, 11], 5)
    });
    h.run_until_idle();
    let (tokens, text, finish, _) = collect(&moved);
    assert_eq!(tokens, vec![12]);
    assert_eq!(text, "", "the stop string spanning the move was found");
    assert_eq!(finish.unwrap().reason, FinishReason::Stop);
    // Had token 11 been prompt, not resumed, the same continuation would have leaked "llo".
    let fresh = h.submit(EngineRequest {
        stopping: StoppingParams {
            max_tokens: Some(1),
            ..stopping
        },
        ..request(2, vec![10, 11], 1)
    });
    h.run_until_idle();
    assert_eq!(collect(&fresh).1, "llo");
}

#[test]
fn the_iteration_hook_sees_steps_grow_and_the_load_change() {
    let (commands, inbox) = mpsc::channel();
    let (seen_tx, seen) = mpsc::channel();
    let mut engine = Engine::new(FakeBackend::new(limits(16, 2, 64)));
    engine.on_iteration_end = Some(Box::new(move |stats: &EngineStats| {
        let _ = seen_tx.send(*stats);
    }));
    // Three requests for two sequence ids, then a drain: all queued before the loop starts,
    // so the first iteration applies them all and the run is deterministic.
    let (tx, rx) = mpsc::channel();
    for id in 1..=3 {
        commands
            .send(Command::Submit {
                request: request(id, vec![1, 2], 3),
                events: tx.clone().into(),
                submitted: Instant::now(),
            })
            .unwrap();
    }
    commands.send(Command::Shutdown { drain: true }).unwrap();
    let start = SystemTime::now();
    engine.run(&inbox);
    let seen: Vec<EngineStats> = seen.try_iter().collect();

    let first = seen[0];
    assert_eq!((first.running, first.waiting, first.steps), (2, 1, 1));
    assert_eq!(first.kv_cells, 4, "two prompts of two tokens decoded");
    assert!(first.last_step.is_some_and(|t| t >= start));
    let last = *seen.last().unwrap();
    assert_eq!(
        (last.running, last.waiting),
        (0, 0),
        "the last request left"
    );
    assert_eq!(last.kv_cells, 0, "no sequence holds cells");
    assert_eq!(
        last.steps,
        seen.len() as u64,
        "every iteration had work to step"
    );
    assert_eq!(last.steps, last.decode_calls);
    for pair in seen.windows(2) {
        assert_eq!(pair[1].steps, pair[0].steps + 1);
        assert!(pair[1].last_step >= pair[0].last_step);
    }
    assert!(
        seen.iter().any(|s| (s.running, s.waiting) == (1, 0)),
        "the third request ran alone at the end: {seen:?}"
    );
    let finals = rx.try_iter().filter(GenerationEvent::is_final).count();
    assert_eq!(finals, 3);
}

#[test]
fn log_probabilities_come_only_when_asked_and_skip_end_of_generation() {
    let mut h = Harness::new(limits(16, 2, 256));
    // Probabilities 0.1, 0.2, 0.3, 0.4 on tokens 0..4, nothing on the others.
    let mut logits = vec![f32::NEG_INFINITY; 100];
    for (i, p) in [0.1f32, 0.2, 0.3, 0.4].into_iter().enumerate() {
        logits[i] = p.ln() + 7.0;
    }
    h.engine.backend.logits = logits;
    h.engine.backend.pieces.insert(3, "é".as_bytes().to_vec());
    let plain = h.submit(request(1, vec![1], 3));
    let asked = h.submit(EngineRequest {
        sampling: SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        },
        // Generates 97, 98, then 99: end-of-generation, which has none.
        ..request(2, vec![96], 5)
    });
    let asked_low = h.submit(EngineRequest {
        sampling: SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy()
        },
        ..request(3, vec![1], 2)
    });
    h.run_until_idle();
    let outputs = |rx: &Receiver<GenerationEvent>| -> Vec<SeqOutput> {
        rx.try_iter()
            .filter_map(|e| match e {
                GenerationEvent::Output(o) => Some(o),
                _ => None,
            })
            .collect()
    };
    assert!(outputs(&plain).iter().all(|o| o.logprobs.is_empty()));
    let asked = outputs(&asked);
    let lps: Vec<&TokenLogprob> = asked.iter().flat_map(|o| &o.logprobs).collect();
    assert_eq!(lps.len(), 2, "97 and 98, not the end-of-generation token");
    for (lp, token) in lps.iter().zip([97, 98]) {
        assert_eq!(lp.sampled.token, token);
        // Banned by the scripted logits: no probability, still its bytes.
        assert_eq!(lp.sampled.logprob, f32::NEG_INFINITY);
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].token, lp.top[1].token), (3, 2));
        assert!((lp.top[0].logprob - 0.4f32.ln()).abs() < 1e-5);
        assert!((lp.top[1].logprob - 0.3f32.ln()).abs() < 1e-5);
        assert_eq!(lp.top[0].bytes, "é".as_bytes());
        assert_eq!(lp.top[1].bytes, b"c");
    }
    assert_eq!(lps[0].sampled.bytes, vec![b'a' + 97 % 26]);
    let low = outputs(&asked_low);
    let lps: Vec<&TokenLogprob> = low.iter().flat_map(|o| &o.logprobs).collect();
    assert_eq!(lps.len(), 2);
    assert_eq!(lps[0].sampled.token, 2);
    assert!((lps[0].sampled.logprob - 0.3f32.ln()).abs() < 1e-5);
    assert!(lps.iter().all(|lp| lp.top.is_empty()));
}

/// The positions of every entry one decode carried.
fn positions(batch: &[BatchEntry]) -> Vec<i32> {
    batch.iter().map(|e| e.pos).collect()
}

#[test]
fn a_prompt_extending_a_finished_one_prefills_only_the_rest() {
    let mut h = Harness::new(limits(64, 2, 64));
    let first = h.submit(request(1, (1..=10).collect(), 3));
    h.run_until_idle();
    assert_eq!(collect(&first).0, vec![11, 12, 13]);
    // The first sequence holds 12 cells: its prompt and the two sampled tokens it fed back.
    let decodes = h.engine.backend.history.len();
    let mut prompt: Vec<Token> = (1..=10).collect();
    prompt.extend([50, 51]);
    let second = h.submit(request(2, prompt.clone(), 3));
    h.run_until_idle();
    let history = &h.engine.backend.history;
    assert_eq!(positions(&history[decodes]), vec![10, 11]);
    // Same output as a fresh engine's.
    let mut fresh = Harness::new(limits(64, 2, 64));
    let alone = fresh.submit(request(2, prompt, 3));
    fresh.run_until_idle();
    assert_eq!(positions(&fresh.engine.backend.history[0]).len(), 12);
    assert_eq!(collect(&second).0, collect(&alone).0);
    assert_eq!(h.engine.ids.free_count(), 2);
}

#[test]
fn the_same_prompt_twice_decodes_only_its_last_token_again() {
    let mut h = Harness::new(limits(64, 2, 64));
    let first = h.submit(request(1, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    let decodes = h.engine.backend.history.len();
    let second = h.submit(request(2, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    assert_eq!(positions(&h.engine.backend.history[decodes]), vec![3]);
    assert_eq!(collect(&first).0, collect(&second).0);
}

#[test]
fn a_backend_that_cannot_keep_prefixes_gets_full_prefills() {
    let mut backend = FakeBackend::new(limits(64, 1, 64));
    backend.keeps_prefix = false;
    let mut h = Harness {
        engine: Engine::new(backend),
    };
    let _first = h.submit(request(1, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    let decodes = h.engine.backend.history.len();
    let _second = h.submit(request(2, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    assert_eq!(
        positions(&h.engine.backend.history[decodes]),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn a_cancelled_prefill_leaves_what_it_decoded_for_the_next_prompt() {
    let mut h = Harness::new(limits(4, 1, 64));
    let first = h.submit(request(1, (1..=10).collect(), 2));
    h.engine.step(); // positions 0..4
    h.engine.cancel(RequestId(1));
    assert_eq!(collect(&first).2.unwrap().reason, FinishReason::Cancelled);
    let second = h.submit(request(2, (1..=10).collect(), 2));
    h.run_until_idle();
    let history = &h.engine.backend.history;
    assert_eq!(positions(&history[1]), vec![4, 5, 6, 7]);
    assert_eq!(collect(&second).0, vec![11, 12]);
}

#[test]
fn a_full_kv_cache_drops_the_prompt_cache_before_evicting() {
    let mut h = Harness::new(limits(16, 3, 64));
    let _warm = h.submit(request(1, vec![9, 9, 9], 2));
    h.run_until_idle();
    let first = h.submit(request(2, vec![1, 2], 4));
    let second = h.submit(request(3, vec![3, 4], 4));
    h.engine.backend.inject.push(DecodeFailure::NoKvSlot);
    h.run_until_idle();
    assert_eq!(collect(&first).0.len(), 4);
    assert_eq!(collect(&second).0.len(), 4);
    // The dropped cache is not reused: a full prefill of the same prompt.
    let decodes = h.engine.backend.history.len();
    let _again = h.submit(request(4, vec![9, 9, 9], 1));
    h.run_until_idle();
    assert_eq!(positions(&h.engine.backend.history[decodes]).len(), 3);
}

#[test]
fn cache_prompt_false_evaluates_the_whole_prompt_and_reports_no_cached_tokens() {
    let mut h = Harness::new(limits(64, 1, 64));
    let first = h.submit(request(1, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    assert_eq!(collect(&first).2.unwrap().usage.cached_tokens, 0);
    let decodes = h.engine.backend.history.len();
    let mut off = request(2, vec![5, 6, 7, 8], 2);
    off.stopping.cache_prompt = false;
    let off = h.submit(off);
    h.run_until_idle();
    assert_eq!(
        positions(&h.engine.backend.history[decodes]),
        vec![0, 1, 2, 3]
    );
    assert_eq!(collect(&off).2.unwrap().usage.cached_tokens, 0);
    // What it left is cached for the next request that allows it.
    let on = h.submit(request(3, vec![5, 6, 7, 8], 2));
    h.run_until_idle();
    let finish = collect(&on).2.unwrap();
    assert_eq!(
        (finish.usage.cached_tokens, finish.usage.prompt_tokens),
        (3, 4)
    );
}

/// Each output of `rx` in order: a progress report as `Err`, a token output as `Ok` (its
/// tokens).
fn progress_and_tokens(rx: &Receiver<GenerationEvent>) -> Vec<Result<Vec<Token>, PromptProgress>> {
    rx.try_iter()
        .filter_map(|event| match event {
            GenerationEvent::Output(o) => Some(match o.progress {
                Some(p) => {
                    assert!(o.tokens.is_empty() && o.text.is_empty() && o.finish.is_none());
                    Err(p)
                }
                None => Ok(o.tokens),
            }),
            _ => None,
        })
        .collect()
}

#[test]
fn progress_reports_come_per_prefill_step_before_the_first_token() {
    let mut h = Harness::new(limits(8, 2, 128));
    let asked = h.submit(EngineRequest {
        report_progress: true,
        special_tokens: Vec::new(),
        ..request(1, (1..=20).collect(), 3)
    });
    let plain = h.submit(request(2, (30..=49).collect(), 3));
    h.run_until_idle();
    let outputs = progress_and_tokens(&asked);
    let first_token = outputs.iter().position(Result::is_ok).unwrap();
    let reports: Vec<PromptProgress> = outputs[..first_token]
        .iter()
        .map(|o| *o.as_ref().unwrap_err())
        .collect();
    // Admitted (nothing processed yet), then 8 + 8 + 4 prompt tokens over three steps.
    let processed: Vec<u32> = reports.iter().map(|p| p.processed).collect();
    assert_eq!(processed, [0, 8, 16, 20]);
    assert!(reports.iter().all(|p| p.total == 20 && p.cache == 0));
    assert!(reports.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    assert!(outputs[first_token..].iter().all(Result::is_ok));
    assert_eq!(outputs.len(), first_token + 3);
    // Without the flag: token outputs only.
    assert!(progress_and_tokens(&plain).iter().all(Result::is_ok));

    // A prompt cache hit starts at what was cached.
    let again = h.submit(EngineRequest {
        report_progress: true,
        special_tokens: Vec::new(),
        ..request(3, (1..=20).collect(), 1)
    });
    h.run_until_idle();
    let outputs = progress_and_tokens(&again);
    let reports: Vec<PromptProgress> = outputs.iter().filter_map(|o| o.clone().err()).collect();
    let cache = reports[0].cache;
    assert!(cache > 0);
    assert_eq!(reports[0].processed, cache);
    assert_eq!(reports.last().unwrap().processed, 20);
    assert!(outputs.last().unwrap().is_ok());
}

/// The sequence ids and positions one decode carried.
fn seqs_and_positions(batch: &[BatchEntry]) -> Vec<(i32, i32)> {
    batch.iter().map(|e| (e.seq.get(), e.pos)).collect()
}

#[test]
fn the_same_long_prompt_at_once_is_prefilled_once_and_shared() {
    let prompt: Vec<Token> = (1..=40).collect();
    let mut h = Harness::new(limits(64, 3, 64));
    let first = h.submit(request(1, prompt.clone(), 3));
    let second = h.submit(request(2, prompt.clone(), 3));
    let other = h.submit(request(3, (50..60).collect(), 2));
    h.run_until_idle();
    let history = &h.engine.backend.history;
    // Step 1: the first prompt whole and the unrelated one; the copy waits for the cells.
    let first_seq = history[0][0].seq.get();
    assert_eq!(
        history[0].len(),
        40 + 10,
        "{:?}",
        seqs_and_positions(&history[0])
    );
    assert!(history[0].iter().all(|e| e.pos < 40));
    // Step 2: the copy decodes only its last prompt token; its first 39 cells are shared.
    let copy: Vec<(i32, i32)> = seqs_and_positions(&history[1])
        .into_iter()
        .filter(|&(seq, pos)| seq != first_seq && pos == 39)
        .collect();
    assert_eq!(copy.len(), 1, "{:?}", seqs_and_positions(&history[1]));
    let decoded_prompt_tokens: usize = history
        .iter()
        .flatten()
        .filter(|e| e.seq.get() == copy[0].0 && e.pos < 40)
        .count();
    assert_eq!(decoded_prompt_tokens, 1);
    let (first, second) = (collect(&first), collect(&second));
    assert_eq!(first.0, vec![41, 42, 43]);
    assert_eq!(second.0, first.0, "shared cells give the same output");
    assert_eq!(second.2.unwrap().usage.cached_tokens, 39);
    assert_eq!(first.2.unwrap().usage.cached_tokens, 0);
    assert_eq!(collect(&other).0, vec![60, 61]);
    assert_eq!(h.engine.ids.free_count(), 3);
}

#[test]
fn a_request_joining_a_running_sequence_takes_its_cells() {
    let prompt: Vec<Token> = (1..=40).collect();
    let mut h = Harness::new(limits(64, 2, 64));
    let first = h.submit(request(1, prompt.clone(), 20));
    h.engine.step();
    h.engine.step();
    // The first sequence holds its prompt and one fed-back token; a longer prompt that
    // extends it shares all of those cells.
    let mut longer = prompt.clone();
    longer.extend([41, 7, 8]);
    let decodes = h.engine.backend.history.len();
    let second = h.submit(request(2, longer, 2));
    h.run_until_idle();
    let second_seq = h.engine.backend.history[decodes]
        .iter()
        .find(|e| e.pos >= 40 && e.token == 7)
        .map(|e| e.seq.get())
        .expect("the new prompt's own tokens");
    let own: Vec<i32> = h.engine.backend.history[decodes..]
        .iter()
        .flatten()
        .filter(|e| e.seq.get() == second_seq)
        .map(|e| e.pos)
        .collect();
    assert_eq!(
        &own[..2],
        &[41, 42],
        "only the tokens it does not share: {own:?}"
    );
    assert_eq!(collect(&second).2.unwrap().usage.cached_tokens, 41);
    assert_eq!(collect(&first).0.len(), 20);
}

#[test]
fn without_cell_sharing_copies_prefill_side_by_side() {
    let prompt: Vec<Token> = (1..=40).collect();
    let mut backend = FakeBackend::new(limits(128, 2, 64));
    backend.shares_cells = false;
    let mut h = Harness {
        engine: Engine::new(backend),
    };
    let first = h.submit(request(1, prompt.clone(), 2));
    let second = h.submit(request(2, prompt, 2));
    h.run_until_idle();
    assert_eq!(h.engine.backend.history[0].len(), 80);
    let second = collect(&second);
    assert_eq!(collect(&first).0, second.0);
    assert_eq!(second.2.unwrap().usage.cached_tokens, 0);
}
