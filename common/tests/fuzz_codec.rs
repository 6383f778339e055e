//! Fuzz target for the IPC frame decoder (`llamapool_common::codec`): arbitrary byte streams,
//! and valid frames of both directions with mutated bytes and length prefixes, fed to the
//! async [`FrameCodec`] (in chunks, as a socket delivers them) and the blocking
//! [`read_frame`]. The properties: nothing panics, every outcome is a frame or a typed
//! error, and decoding never allocates more than the frame cap, whatever a length prefix
//! claims (a prefix of 4 GiB is refused before anything is reserved).
//!
//! These are property tests (proptest) named `fuzz_*`: `cargo test` runs a few hundred cases
//! each; `scripts/fuzz` runs them for a fixed time (`LLAMAPOOL_FUZZ_SECONDS`) or case count
//! (`LLAMAPOOL_FUZZ_CASES`). A crasher found becomes a plain `#[test]` below.

// The counting allocator below is the only unsafe code: `GlobalAlloc` is an unsafe trait, and
// each method only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use llamapool_common::codec::{encode_into, read_frame, CodecError, FrameCodec, MAX_FRAME_BYTES};
use llamapool_common::protocol::*;
use llamapool_common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use serde::de::DeserializeOwned;
use tokio_util::codec::Decoder;

mod fuzz_support;
use fuzz_support::fuzz;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: a per-thread count of live bytes and its peak.

struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(bytes);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(bytes)));
}

// SAFETY: every method forwards to `System` with the arguments it was given.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Both blocks exist for a moment.
            note_alloc(new_size);
            note_free(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes it held allocated at once (on this
/// thread, beyond what was live before).
fn peak_bytes<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, peak.saturating_sub(before))
}

/// What decoding may hold at once: one frame at the cap, its bytes copied once more, and
/// serde's cautious pre-allocation (at most 1 MiB per sequence being filled).
fn allocation_bound(input_len: usize) -> usize {
    MAX_FRAME_BYTES + 3 * input_len + (4 << 20)
}

// ---------------------------------------------------------------------------------------------
// Decoding as the router and the worker do.

#[derive(Debug, Default)]
struct Decoded {
    frames: usize,
    error: Option<String>,
}

/// Feeds `wire` to a `FrameCodec` in chunks of the given sizes, as `FramedRead` does: decode
/// until it needs more bytes, stop at the first error, `decode_eof` at the end.
fn decode_async<In: DeserializeOwned>(wire: &[u8], chunks: &[usize]) -> Decoded {
    let mut codec = FrameCodec::<In, ()>::new();
    let mut buf = BytesMut::new();
    let mut out = Decoded::default();
    let mut rest = wire;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => out.frames += 1,
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    return out;
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(_)) => out.frames += 1,
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        }
    }
}

/// Reads `wire` with the blocking `read_frame` until the end or the first error.
fn decode_blocking<In: DeserializeOwned>(wire: &[u8]) -> Decoded {
    let mut reader = wire;
    let mut scratch = Vec::new();
    let mut out = Decoded::default();
    loop {
        match read_frame::<In>(&mut reader, &mut scratch) {
            Ok(Some(_)) => out.frames += 1,
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        }
    }
}

/// Decodes `wire` both ways in both directions, checking the allocation bound.
fn decode_everywhere(wire: &[u8], chunks: &[usize]) -> TestCaseResult {
    let bound = allocation_bound(wire.len());
    for (what, run) in [
        (
            "async ToWorker",
            decode_async::<ToWorker> as fn(&[u8], &[usize]) -> Decoded,
        ),
        ("async FromWorker", decode_async::<FromWorker>),
    ] {
        let (_, peak) = peak_bytes(|| run(wire, chunks));
        prop_assert!(
            peak <= bound,
            "{what}: {peak} bytes held for {} input",
            wire.len()
        );
    }
    for (what, run) in [
        (
            "blocking ToWorker",
            decode_blocking::<ToWorker> as fn(&[u8]) -> Decoded,
        ),
        ("blocking FromWorker", decode_blocking::<FromWorker>),
    ] {
        let (_, peak) = peak_bytes(|| run(wire));
        prop_assert!(
            peak <= bound,
            "{what}: {peak} bytes held for {} input",
            wire.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Valid frames to mutate: one of each message, both directions.

fn sample_sampling() -> SamplingParams {
    SamplingParams {
        seed: Some(3),
        logit_bias: vec![(5, -1.5)],
        logit_bias_text: vec![("hello".into(), 2.0)],
        grammar: Some("root ::= \"yes\" | \"no\"".into()),
        logprobs: Some(3),
        ..SamplingParams::default()
    }
}

fn to_worker_samples() -> Vec<ToWorker> {
    let chat = ChatPrompt {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "x ☕".into(),
            ..ChatMessage::default()
        }],
        ending: ChatEnding::ContinueFinal,
        ..ChatPrompt::default()
    };
    let mut out = vec![ToWorker::Hello {
        version: PROTOCOL_VERSION,
    }];
    for prompt in [
        Prompt::Text("hi ☕".into()),
        Prompt::Tokens(vec![1, 2, 300_000]),
        Prompt::Chat(chat.clone()),
    ] {
        out.push(ToWorker::Generate(GenerateRequest {
            id: RequestId(7),
            request_id: "client-chosen id".into(),
            prompt,
            sampling: sample_sampling(),
            stopping: StoppingParams {
                max_tokens: Some(9),
                stop: vec!["\n".into(), "END".into()],
                ignore_eos: true,
                cache_prompt: false,
            },
            resumed: vec![4, 5],
            report_progress: true,
        }));
    }
    out.extend([
        ToWorker::Abort {
            ids: vec![RequestId(1), RequestId(u64::MAX)],
        },
        ToWorker::Ping { nonce: 9 },
        ToWorker::Control {
            call: 2,
            body: ControlCall::Tokenize {
                content: "a b".into(),
                add_special: true,
                with_pieces: true,
            },
        },
        ToWorker::Control {
            call: 3,
            body: ControlCall::Detokenize {
                tokens: vec![1, -1],
            },
        },
        ToWorker::Control {
            call: 4,
            body: ControlCall::ApplyTemplate { chat },
        },
        ToWorker::Drain,
    ]);
    out
}

fn from_worker_samples() -> Vec<FromWorker> {
    let finish = Finish {
        reason: FinishReason::Length,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 2,
        },
        timings: Timings {
            queue_ms: 0.5,
            prompt_ms: 1.5,
            predicted_ms: 2.5,
        },
        stop_word: Some("END".into()),
    };
    vec![
        FromWorker::Ready(WorkerInfo {
            version: PROTOCOL_VERSION,
            pid: 42,
            cpus: vec![0, 1],
            threads: 2,
            slots: 8,
            n_ctx_per_seq: 1024,
            model: ModelInfo {
                n_ctx_train: 8192,
                n_params: 135,
                n_vocab: 49152,
                size: 98,
                has_chat_template: true,
                chat_template: "chatml".into(),
                eog_tokens: vec![2],
            },
            embedding: None,
        }),
        FromWorker::Events(vec![
            GenerationEvent::Accepted { id: RequestId(1) },
            GenerationEvent::Output(SeqOutput {
                id: RequestId(1),
                tokens: vec![5, 6],
                text: "é".into(),
                finish: None,
                logprobs: vec![TokenLogprob {
                    sampled: Candidate {
                        token: 5,
                        bytes: vec![0xc3],
                        logprob: -0.25,
                    },
                    top: vec![Candidate {
                        token: 6,
                        bytes: b"x".to_vec(),
                        logprob: -1.5,
                    }],
                }],
                progress: None,
                parsed: false,
                chat: Vec::new(),
            }),
            GenerationEvent::Output(SeqOutput::progress(
                RequestId(1),
                PromptProgress {
                    total: 9,
                    cache: 2,
                    processed: 6,
                    time_ms: 1.25,
                },
            )),
            GenerationEvent::Output(SeqOutput {
                id: RequestId(2),
                tokens: vec![],
                text: String::new(),
                logprobs: Vec::new(),
                progress: None,
                parsed: false,
                chat: Vec::new(),
                finish: Some(finish),
            }),
            GenerationEvent::Rejected {
                id: RequestId(3),
                error: RequestError::ExceedsContext {
                    n_prompt_tokens: 10,
                    n_requested: 5,
                    n_ctx: 12,
                },
            },
            GenerationEvent::Rejected {
                id: RequestId(4),
                error: RequestError::ChatTemplate("no template".into()),
            },
        ]),
        FromWorker::Progress(WorkerStats {
            steps: 7,
            last_step_unix_ms: 1_700_000_000_000,
            running: 2,
            waiting: 1,
            decode_calls: 99,
            kv_cells_used: 1234,
            packable: true,
            wide: true,
            threads_in_use: 2,
            shape_changes: 3,
        }),
        FromWorker::Pong { nonce: 9 },
        FromWorker::Control {
            call: 2,
            reply: ControlReply::Tokenized {
                tokens: vec![1, 2],
                pieces: Some(vec![b"a".to_vec(), vec![0xe2]]),
            },
        },
        FromWorker::Control {
            call: 3,
            reply: ControlReply::Rendered {
                prompt: "<|user|>x".into(),
            },
        },
        FromWorker::Fatal {
            message: "bye".into(),
        },
    ]
}

/// The wire bytes of every sample message, one frame each.
fn sample_frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for m in to_worker_samples() {
        let mut wire = Vec::new();
        encode_into(&m, &mut wire).expect("a sample message encodes");
        out.push(wire);
    }
    for m in from_worker_samples() {
        let mut wire = Vec::new();
        encode_into(&m, &mut wire).expect("a sample message encodes");
        out.push(wire);
    }
    out
}

/// Length prefixes worth trying: around zero, around the cap, and the largest.
fn length_prefix() -> impl Strategy<Value = u32> {
    let cap = MAX_FRAME_BYTES as u32;
    prop_oneof![
        0u32..64,
        Just(cap - 1),
        Just(cap),
        Just(cap + 1),
        Just(u32::MAX),
        Just(1 << 31),
        any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
    /// Overwrites four bytes with a big-endian length (a frame's prefix, or anything).
    Length(prop::sample::Index, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), length_prefix()).prop_map(|(i, n)| Mutation::Length(i, n)),
    ]
}

fn apply(wire: &mut Vec<u8>, m: &Mutation) {
    if wire.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, bit) => {
            let at = i.index(wire.len());
            wire[at] ^= 1 << bit;
        }
        Mutation::Set(i, b) => {
            let at = i.index(wire.len());
            wire[at] = *b;
        }
        Mutation::Insert(i, bytes) => {
            let at = i.index(wire.len() + 1);
            wire.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let at = i.index(wire.len());
            wire.drain(at..(at + n).min(wire.len()));
        }
        Mutation::Truncate(i) => wire.truncate(i.index(wire.len())),
        Mutation::Length(i, len) => {
            let at = i.index(wire.len());
            for (k, b) in len.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = wire.get_mut(at + k) {
                    *slot = b;
                }
            }
        }
    }
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..8, 1usize..4096], 1..8)
}

// ---------------------------------------------------------------------------------------------
// The targets.

#[test]
fn fuzz_frame_decoder_arbitrary_bytes() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..4096),
        // A small length prefix followed by arbitrary bytes: reaches the body's decoder.
        (0u32..512, prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(len, body)| {
            let mut wire = len.to_be_bytes().to_vec();
            wire.extend(body);
            wire
        }),
    ];
    fuzz(
        "frame_decoder_arbitrary_bytes",
        2048,
        (bytes, chunk_sizes()),
        |(wire, chunks)| decode_everywhere(&wire, &chunks),
    );
}

#[test]
fn fuzz_frame_decoder_mutated_frames() {
    let frames = sample_frames();
    let n = frames.len();
    let stream = (
        prop::collection::vec(0..n, 1..5),
        prop::collection::vec(mutation(), 0..6),
        chunk_sizes(),
    );
    fuzz(
        "frame_decoder_mutated_frames",
        2048,
        stream,
        move |(picks, mutations, chunks)| {
            let mut wire: Vec<u8> = picks.iter().flat_map(|&i| frames[i].clone()).collect();
            for m in &mutations {
                apply(&mut wire, m);
            }
            decode_everywhere(&wire, &chunks)
        },
    );
}

#[test]
fn fuzz_frame_decoder_length_prefixes() {
    // Any claimed length, any (short) body: over the cap is `TooLarge` with nothing reserved;
    // under it, at most the claimed length is.
    let input = (length_prefix(), prop::collection::vec(any::<u8>(), 0..256));
    fuzz(
        "frame_decoder_length_prefixes",
        256,
        input,
        |(len, body)| {
            let mut wire = len.to_be_bytes().to_vec();
            wire.extend_from_slice(&body);
            let (decoded, peak) = peak_bytes(|| decode_async::<FromWorker>(&wire, &[wire.len()]));
            let (blocking, blocking_peak) = peak_bytes(|| decode_blocking::<ToWorker>(&wire));
            if len as usize > MAX_FRAME_BYTES {
                prop_assert!(decoded
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("exceeds")));
                prop_assert!(blocking
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("exceeds")));
                prop_assert!(peak < 64 * 1024, "{peak} bytes held for a refused prefix");
                prop_assert!(blocking_peak < 64 * 1024, "{blocking_peak} bytes held");
            } else {
                // A frame's bytes are reserved when its header arrives, and any four bytes
                // after the first frame may be the next header (found by this target: a
                // 4-byte frame followed by a header claiming 4 MiB held 4 MiB).
                let claimed = wire
                    .windows(4)
                    .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]) as usize)
                    .filter(|&n| n <= MAX_FRAME_BYTES)
                    .max()
                    .unwrap_or(0);
                let bound = claimed + 3 * wire.len() + (4 << 20);
                prop_assert!(peak <= bound, "{peak} bytes held, {claimed} claimed");
                prop_assert!(blocking_peak <= bound, "{blocking_peak} bytes held");
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests: each a crasher or a property found once, with its minimal input.

#[test]
fn a_length_prefix_of_4_gib_reserves_nothing() {
    let wire = [0xff, 0xff, 0xff, 0xff, 0, 0];
    let (decoded, peak) = peak_bytes(|| decode_async::<ToWorker>(&wire, &[6]));
    assert!(decoded.error.unwrap().contains("exceeds"));
    assert!(peak < 64 * 1024, "{peak} bytes");
    let err = read_frame::<FromWorker>(&mut &wire[..], &mut Vec::new()).unwrap_err();
    assert!(matches!(err, CodecError::TooLarge(n) if n == u32::MAX as usize));
}

/// Found by `fuzz_frame_decoder_length_prefixes` (a property of the test, not a decoder bug):
/// a whole 4-byte frame (a `Pong`) followed by a header claiming 4 MiB holds those 4 MiB as
/// soon as the header arrives; a claim is bounded by the frame cap, never by the input.
#[test]
fn a_header_after_a_frame_reserves_its_claim_within_the_cap() {
    let wire = [0, 0, 0, 4, 3, 0, 0, 0, 0, 64, 0, 0];
    let (decoded, peak) = peak_bytes(|| decode_async::<FromWorker>(&wire, &[wire.len()]));
    assert_eq!((decoded.frames, decoded.error), (1, None));
    assert!(peak >= 4 << 20, "{peak} bytes");
    assert!(peak <= allocation_bound(wire.len()), "{peak} bytes");
}

#[test]
fn the_allocation_count_sees_a_frame_at_the_cap_reserved() {
    // The accounting itself: a prefix claiming the cap reserves about that much.
    let wire = (MAX_FRAME_BYTES as u32).to_be_bytes();
    let (decoded, peak) = peak_bytes(|| decode_async::<ToWorker>(&wire, &[4]));
    assert_eq!(decoded.frames, 0);
    assert!(peak >= MAX_FRAME_BYTES, "{peak} bytes");
    assert!(peak <= allocation_bound(wire.len()), "{peak} bytes");
}

/// A body claiming a sequence of u64::MAX ids (`Abort`) or a 4 GiB string (`Fatal`) in a
/// frame of a few bytes: refused, with nothing reserved for the claim.
#[test]
fn a_body_claiming_a_huge_length_reserves_nothing_for_it() {
    let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    let four_gib = [0xff, 0xff, 0xff, 0xff, 0x0f];
    for claim in [&huge[..], &four_gib[..]] {
        for (tag, to_worker) in [(2u8, true), (5, false)] {
            let body = [&[tag][..], claim, &[1, 2, 3]].concat();
            let mut wire = (body.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&body);
            let (decoded, peak) = peak_bytes(|| {
                if to_worker {
                    decode_async::<ToWorker>(&wire, &[wire.len()])
                } else {
                    decode_async::<FromWorker>(&wire, &[wire.len()])
                }
            });
            assert_eq!(decoded.frames, 0);
            assert!(decoded.error.unwrap().contains("malformed"));
            assert!(peak < 64 * 1024, "{peak} bytes");
        }
    }
}

#[test]
fn every_sample_frame_decodes_whole_and_in_one_byte_chunks() {
    let to_worker = to_worker_samples().len();
    for (i, frame) in sample_frames().iter().enumerate() {
        let decoded = if i < to_worker {
            decode_async::<ToWorker>(frame, &[1])
        } else {
            decode_async::<FromWorker>(frame, &[1])
        };
        assert_eq!((decoded.frames, decoded.error), (1, None), "sample {i}");
    }
}
