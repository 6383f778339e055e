//! The stages. Each runs the same prompts and returns per-request records.
//!
//! - Stage 0: a raw batched-decode loop straight over the llama.cpp backend, no engine: keep
//!   `concurrency` sequences in flight, prefill each new prompt whole in the next batch,
//!   argmax-sample, no detokenization, no channels.
//! - Stage 1: the engine in-process, `concurrency` client threads submitting over channels.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use llamapool_common::{GenerationEvent, RequestId, SamplingParams, StoppingParams, Token};
use llamapool_worker::backend::{Backend, BatchEntry};
use llamapool_worker::engine::seq_ids::SeqIdPool;
use llamapool_worker::{
    ContextConfig, EngineHandle, EngineRequest, LlamaCppBackend, Model, ModelOptions, RunningEngine,
};

use crate::metrics::{summarize, RequestRecord, StageReport};
use crate::Args;

/// The model and one exactly-`prompt_tokens`-long prompt per request.
pub struct Workload {
    pub model: Model,
    pub prompts: Vec<Vec<Token>>,
}

impl Workload {
    pub fn new(args: &Args) -> Result<Self> {
        let model = Model::load(&args.model_path(), &ModelOptions::default())?;
        let prompts = (0..args.requests)
            .map(|i| exact_prompt(&model, i, args.prompt_tokens))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { model, prompts })
    }
}

/// A prompt of exactly `n` tokens, different per request.
fn exact_prompt(model: &Model, i: usize, n: usize) -> Result<Vec<Token>> {
    let mut text =
        format!("Request {i}. Write a long story about a lighthouse keeper and the sea.");
    loop {
        let tokens = model.tokenize(&text, true);
        if tokens.len() >= n {
            return Ok(tokens[..n].to_vec());
        }
        if text.len() > 100 * n + 1000 {
            bail!("could not build a {n}-token prompt");
        }
        text.push_str(" The waves rolled in again and again under a grey sky.");
    }
}

pub fn run(stage: u8, args: &Args, workload: &Workload) -> Result<StageReport> {
    match stage {
        0 => {
            let mut backend = in_process_backend(args, workload)?;
            // On a thread of its own, like the engine: llama.cpp's OpenMP pool belongs to the
            // calling thread, and a pool left on the main thread slows the next stage's.
            let (records, wall) = std::thread::scope(|s| {
                s.spawn(|| {
                    let start = Instant::now();
                    let records = raw_loop(
                        &mut backend,
                        &workload.prompts,
                        args.concurrency,
                        args.max_tokens,
                    );
                    (records, start.elapsed())
                })
                .join()
                .expect("the raw loop does not panic")
            });
            Ok(summarize(
                0,
                "raw llama.cpp batched decode, in-process",
                &records,
                wall,
            ))
        }
        1 => {
            let engine = RunningEngine::spawn(in_process_backend(args, workload)?)?;
            let start = Instant::now();
            let records = drive_engine(
                &engine.handle,
                &workload.prompts,
                args.concurrency,
                args.max_tokens,
            );
            let wall = start.elapsed();
            if let Some(stats) = engine.handle.stats() {
                eprintln!(
                    "stage 1: {} decode calls, {:.2} s in decode, {:.2} s in steps, wall {:.2} s",
                    stats.decode_calls,
                    stats.decode_seconds,
                    stats.step_seconds,
                    wall.as_secs_f64()
                );
            }
            engine.stop(false);
            Ok(summarize(1, "engine, in-process", &records, wall))
        }
        other => bail!("stage {other} is not available yet (stages: 0, 1)"),
    }
}

fn in_process_backend(args: &Args, workload: &Workload) -> Result<LlamaCppBackend> {
    let slots = args.slots();
    let per_seq = (args.prompt_tokens + args.max_tokens as usize + 8).div_ceil(256) * 256;
    let config = ContextConfig {
        slots,
        context: u32::try_from(per_seq)? * slots,
        threads: args.threads,
        n_batch: args.n_batch,
        n_ubatch: args.n_ubatch.unwrap_or(args.n_batch),
        flash_attention: args.flash_attention,
        kv_unified: args.kv_unified,
    };
    Ok(workload.model.new_backend(&config)?)
}

struct RawSeq {
    request: usize,
    seq: llamapool_worker::engine::seq_ids::SeqId,
    n_kv: usize,
    last: Token,
    record: RequestRecord,
    started: Instant,
    last_token_at: Instant,
}

/// Stage 0: the plainest continuous batching loop over the backend.
fn raw_loop(
    backend: &mut LlamaCppBackend,
    prompts: &[Vec<Token>],
    concurrency: usize,
    max_tokens: u32,
) -> Vec<RequestRecord> {
    let mut ids = SeqIdPool::new(backend.limits().n_seq_max);
    let greedy = SamplingParams::greedy();
    let mut sampler = backend.new_sampler(&greedy, true, &[]);
    let mut records = vec![RequestRecord::default(); prompts.len()];
    let mut running: Vec<RawSeq> = Vec::new();
    let mut next = 0;
    let mut batch: Vec<BatchEntry> = Vec::new();
    let (mut decode_seconds, mut decode_calls) = (0.0, 0u64);
    while next < prompts.len() || !running.is_empty() {
        let step_start = Instant::now();
        batch.clear();
        let mut sample_at = Vec::new();
        for (i, s) in running.iter().enumerate() {
            sample_at.push((i, batch.len()));
            batch.push(BatchEntry {
                token: s.last,
                pos: s.n_kv as i32,
                seq: s.seq,
                logits: true,
            });
        }
        let mut admitted = Vec::new();
        while running.len() + admitted.len() < concurrency && next < prompts.len() {
            let seq = ids
                .acquire(|id| backend.clear_sequence(id, 0))
                .expect("a free sequence id");
            let prompt = &prompts[next];
            for (p, &t) in prompt.iter().enumerate() {
                batch.push(BatchEntry {
                    token: t,
                    pos: p as i32,
                    seq,
                    logits: p + 1 == prompt.len(),
                });
            }
            admitted.push((next, seq, batch.len() - 1));
            next += 1;
        }
        let decode_start = Instant::now();
        backend.decode(&batch).expect("raw decode");
        decode_seconds += decode_start.elapsed().as_secs_f64();
        decode_calls += 1;
        let now = Instant::now();
        for s in &mut running {
            s.n_kv += 1;
        }
        for (request, seq, at) in admitted {
            let token = backend.sample(&mut sampler, at);
            let now = Instant::now();
            running.push(RawSeq {
                request,
                seq,
                n_kv: prompts[request].len(),
                last: token,
                record: RequestRecord {
                    ok: true,
                    tokens: 1,
                    ttft: now - step_start,
                    ..RequestRecord::default()
                },
                started: step_start,
                last_token_at: now,
            });
        }
        for (i, at) in sample_at {
            let s = &mut running[i];
            s.last = backend.sample(&mut sampler, at);
            s.record.tokens += 1;
            s.record.itls.push(now - s.last_token_at);
            s.last_token_at = now;
        }
        running.retain_mut(|s| {
            if s.record.tokens < max_tokens {
                return true;
            }
            s.record.e2e = s.last_token_at - s.started;
            records[s.request] = std::mem::take(&mut s.record);
            ids.release(s.seq);
            backend.clear_sequence(s.seq, 0);
            false
        });
    }
    eprintln!("stage 0: {decode_calls} decode calls, {decode_seconds:.2} s in decode");
    records
}

/// Stage 1: one client thread keeps `concurrency` requests in flight, reading every request's
/// events from one channel (as the worker's IPC thread does) and submitting the next request
/// when one ends.
fn drive_engine(
    handle: &EngineHandle,
    prompts: &[Vec<Token>],
    concurrency: usize,
    max_tokens: u32,
) -> Vec<RequestRecord> {
    let (tx, rx) = mpsc::channel();
    let mut records = vec![RequestRecord::default(); prompts.len()];
    let mut started = vec![None; prompts.len()];
    let mut last_chunk: Vec<Option<Instant>> = vec![None; prompts.len()];
    let submit = |i: usize, started: &mut Vec<Option<Instant>>| {
        started[i] = Some(Instant::now());
        handle.submit(
            EngineRequest {
                id: RequestId(i as u64),
                prompt: prompts[i].clone(),
                sampling: SamplingParams::greedy(),
                stopping: StoppingParams {
                    max_tokens: Some(max_tokens),
                    stop: Vec::new(),
                    ignore_eos: true,
                },
            },
            tx.clone(),
        );
    };
    let mut next = 0;
    while next < prompts.len().min(concurrency) {
        submit(next, &mut started);
        next += 1;
    }
    let mut finished = 0;
    while finished < prompts.len() {
        let Ok(event) = rx.recv_timeout(Duration::from_secs(600)) else {
            break;
        };
        let now = Instant::now();
        let i = usize::try_from(event.id().0).expect("ids are indices");
        let start = started[i].expect("submitted");
        let record = &mut records[i];
        match event {
            GenerationEvent::Output(o) => {
                if !o.tokens.is_empty() {
                    match last_chunk[i] {
                        None => record.ttft = now - start,
                        Some(prev) => record.itls.push(now - prev),
                    }
                    last_chunk[i] = Some(now);
                    record.tokens += o.tokens.len() as u32;
                }
                if o.finish.is_none() {
                    continue;
                }
                record.ok = record.tokens == max_tokens;
                record.e2e = now - start;
            }
            GenerationEvent::Rejected { .. } => {}
        }
        finished += 1;
        if next < prompts.len() {
            submit(next, &mut started);
            next += 1;
        }
    }
    records
}
