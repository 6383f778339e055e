//! The IPC frame codec's cost: bytes and nanoseconds per encode and per decode of whole frames
//! (header and body, through `codec::encode_into` and `codec::read_frame`) of the real
//! protocol messages, the hot ones per token and per step included.
//!
//! `cargo run --release -p llamapool-common --example frame_codec` prints a Markdown table. To
//! compare another encoding, add it to [`codecs`]: the codecs are measured interleaved in one
//! process (round after round, each codec timed on the same message in turn), so a machine busy
//! with something else slows them alike and the `×` columns (time over the first codec's)
//! hold. The commit that added this example measured bincode 1.3.3 against postcard that way
//! (docs/PERFORMANCE.md, "Frame codec"). `FRAME_CODEC_ROUNDS` sets the rounds (default 25).

use std::hint::black_box;
use std::time::{Duration, Instant};

use llamapool_common::codec::{encode_into, read_frame};
use llamapool_common::protocol::*;
use llamapool_common::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One codec's encode and decode of a whole frame of a message type.
struct Codec<T> {
    name: &'static str,
    encode: fn(&T) -> Vec<u8>,
    decode: fn(&[u8]) -> T,
}

fn codecs<T: Serialize + DeserializeOwned>() -> Vec<Codec<T>> {
    vec![Codec {
        name: "frame codec",
        encode: |m| {
            let mut wire = Vec::new();
            encode_into(m, &mut wire).expect("encodes");
            wire
        },
        decode: |mut b| {
            read_frame(&mut b, &mut Vec::new())
                .expect("decodes")
                .expect("a frame")
        },
    }]
}

/// Nanoseconds per call of `f`, over a batch of `iters` calls.
fn ns_per_call(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

/// Calls of `f` that take about `batch` (at least one).
fn calibrate(batch: Duration, mut f: impl FnMut()) -> u32 {
    let ns = ns_per_call(64, &mut f).max(1.0);
    ((batch.as_nanos() as f64 / ns) as u32).max(1)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One message type's figures, one entry per codec (in [`codecs`]' order).
struct Row {
    what: &'static str,
    bytes: Vec<usize>,
    encode_ns: Vec<f64>,
    decode_ns: Vec<f64>,
}

fn measure<T>(what: &'static str, message: &T, rounds: usize) -> Row
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let codecs = codecs::<T>();
    let wires: Vec<Vec<u8>> = codecs.iter().map(|c| (c.encode)(message)).collect();
    for (c, wire) in codecs.iter().zip(&wires) {
        assert_eq!(
            &(c.decode)(wire),
            message,
            "{} round trip of {what}",
            c.name
        );
    }
    let batch = Duration::from_micros(500);
    let iters: Vec<(u32, u32)> = codecs
        .iter()
        .zip(&wires)
        .map(|(c, wire)| {
            (
                calibrate(batch, || drop(black_box((c.encode)(black_box(message))))),
                calibrate(batch, || drop(black_box((c.decode)(black_box(wire))))),
            )
        })
        .collect();
    let mut encode = vec![Vec::new(); codecs.len()];
    let mut decode = vec![Vec::new(); codecs.len()];
    for _ in 0..rounds {
        for (i, (c, wire)) in codecs.iter().zip(&wires).enumerate() {
            encode[i].push(ns_per_call(iters[i].0, || {
                drop(black_box((c.encode)(black_box(message))))
            }));
            decode[i].push(ns_per_call(iters[i].1, || {
                drop(black_box((c.decode)(black_box(wire))))
            }));
        }
    }
    Row {
        what,
        bytes: wires.iter().map(Vec::len).collect(),
        encode_ns: encode.into_iter().map(median).collect(),
        decode_ns: decode.into_iter().map(median).collect(),
    }
}

fn generate(prompt: Prompt) -> ToWorker {
    ToWorker::Generate(GenerateRequest {
        id: RequestId(1_234_567),
        request_id: "9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b".into(),
        prompt,
        sampling: SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        },
        stopping: StoppingParams {
            max_tokens: Some(256),
            stop: vec!["\n\n".into()],
            ignore_eos: false,
            cache_prompt: true,
        },
        resumed: Vec::new(),
        report_progress: false,
    })
}

/// A 4096-token prompt with ids spread over a 49152-token vocabulary (varints of 1 to 3 bytes).
fn prompt_4096() -> Prompt {
    Prompt::Tokens((0..4096).map(|i| (i * 7919) % 49_152).collect())
}

fn chat_prompt() -> Prompt {
    let message = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
        ..ChatMessage::default()
    };
    Prompt::Chat(ChatPrompt {
        messages: vec![
            message("system", "You are a helpful assistant. Answer briefly."),
            message(
                "user",
                "Summarize the plot of Hamlet in three sentences, then name its three most \
                 quoted lines and who speaks them.",
            ),
        ],
        ending: ChatEnding::OpenAssistant,
        ..ChatPrompt::default()
    })
}

/// One decode step's output for one sequence: one token and its text.
fn token_output(id: u64, logprobs: usize) -> GenerationEvent {
    let candidate = |token: Token, text: &str, logprob: f32| Candidate {
        token,
        bytes: text.as_bytes().to_vec(),
        logprob,
    };
    let logprobs = if logprobs == 0 {
        Vec::new()
    } else {
        vec![TokenLogprob {
            sampled: candidate(11_034, " the", -0.31),
            top: (0..logprobs)
                .map(|i| candidate(11_034 + i as Token * 97, " the", -0.31 - i as f32))
                .collect(),
        }]
    };
    GenerationEvent::Output(SeqOutput {
        id: RequestId(id),
        tokens: vec![11_034],
        text: " the".into(),
        finish: None,
        logprobs,
        progress: None,
        parsed: false,
        chat: Vec::new(),
    })
}

fn finish_output() -> GenerationEvent {
    GenerationEvent::Output(SeqOutput::finished(
        RequestId(1_234_567),
        Finish {
            reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 4096,
                completion_tokens: 256,
                cached_tokens: 1024,
            },
            timings: Timings {
                queue_ms: 1.25,
                prompt_ms: 2_345.5,
                predicted_ms: 9_876.25,
            },
            stop_word: Some("\n\n".into()),
        },
    ))
}

fn stats() -> FromWorker {
    FromWorker::Progress(WorkerStats {
        steps: 1_234_567,
        last_step_unix_ms: 1_760_000_000_000,
        running: 8,
        waiting: 3,
        decode_calls: 1_300_000,
        kv_cells_used: 12_345,
        packable: true,
        wide: false,
        threads_in_use: 2,
        shape_changes: 17,
    })
}

fn main() {
    let rounds = std::env::var("FRAME_CODEC_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let rows = [
        measure(
            "Generate, 4096-token prompt",
            &generate(prompt_4096()),
            rounds,
        ),
        measure("Generate, chat prompt", &generate(chat_prompt()), rounds),
        measure(
            "Events: 1 token (per token)",
            &FromWorker::Events(vec![token_output(1_234_567, 0)]),
            rounds,
        ),
        measure(
            "Events: 1 token, top-5 logprobs",
            &FromWorker::Events(vec![token_output(1_234_567, 5)]),
            rounds,
        ),
        measure(
            "Events: 8 sequences × 1 token",
            &FromWorker::Events((0..8).map(|i| token_output(1_234_560 + i, 0)).collect()),
            rounds,
        ),
        measure("Progress (per step)", &stats(), rounds),
        measure(
            "Events: finish",
            &FromWorker::Events(vec![finish_output()]),
            rounds,
        ),
        measure("Ping", &ToWorker::Ping { nonce: 987_654 }, rounds),
    ];
    let names: Vec<&str> = codecs::<ToWorker>().iter().map(|c| c.name).collect();
    let others = &names[1..];
    let mut header = format!("| message | bytes {}", names[0]);
    let mut rule = String::from("|---|--:");
    let per_codec = |prefix: &str| -> String {
        let mut s = format!(" | {prefix} {}", names[0]);
        for n in others {
            s += &format!(" | {n} | ×");
        }
        s
    };
    header += &names[1..]
        .iter()
        .map(|n| format!(" / {n}"))
        .collect::<String>();
    header += &per_codec("encode ns");
    header += &per_codec("decode ns");
    rule += &"|--:".repeat(2 * names.len() + 2 * others.len());
    println!("{header} |\n{rule}|");
    for r in &rows {
        let bytes: Vec<String> = r.bytes.iter().map(usize::to_string).collect();
        let mut line = format!("| {} | {}", r.what, bytes.join(" / "));
        for ns in [&r.encode_ns, &r.decode_ns] {
            line += &format!(" | {:.0}", ns[0]);
            for x in &ns[1..] {
                line += &format!(" | {x:.0} | {:.2}", x / ns[0]);
            }
        }
        println!("{line} |");
    }
    println!("\nns: median of {rounds} rounds of ~0.5 ms batches per codec and operation.");
    if !others.is_empty() {
        println!("×: that codec's time over {}'s.", names[0]);
    }
}
