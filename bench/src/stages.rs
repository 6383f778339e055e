//! The stages. Each runs the same prompts and returns per-request records.
//!
//! - Stage 0: a raw batched-decode loop straight over the llama.cpp backend, no engine: keep
//!   `concurrency` sequences in flight, prefill each new prompt whole in the next batch,
//!   argmax-sample, no detokenization, no channels.
//! - Stage 1: the engine in-process, one client thread reading every request's events.
//! - Stage 2: a worker process over its Unix socket (the real protocol), no HTTP.
//! - Stages 3 and 4, and `--url`: streaming `/v1/completions` requests with token-id prompts
//!   from `concurrency` client threads.

use std::io::BufReader;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{ConnectOptions, GenericFilePath};
use llamapool_bench::metrics::{summarize, RequestRecord, StageReport};
use llamapool_common::codec;
use llamapool_common::protocol::{FromWorker, GenerateRequest, Prompt, ToWorker, PROTOCOL_VERSION};
use llamapool_common::worker::{ContextConfig, WorkerArgs};
use llamapool_common::{GenerationEvent, RequestId, SamplingParams, StoppingParams, Token};
use llamapool_testkit::http::{self, SseReader};
use llamapool_testkit::scratch_dir;
use llamapool_worker::backend::{Backend, BatchEntry};
use llamapool_worker::engine::seq_ids::SeqIdPool;
use llamapool_worker::engine::EngineHooks;
use llamapool_worker::{
    EngineHandle, EngineRequest, LlamaCppBackend, Model, ModelOptions, RunningEngine,
};
use serde_json::json;

use crate::procs;
use crate::{completion_body, Args};

/// The model and one exactly-`prompt_tokens`-long prompt per request.
pub struct Workload {
    pub model: Model,
    pub prompts: Vec<Vec<Token>>,
}

impl Workload {
    pub fn new(args: &Args) -> Result<Self> {
        let model = Model::load(&args.model_path(), &ModelOptions::default())?;
        let most = if args.sweep {
            args.levels
                .iter()
                .map(|c| 4 * c)
                .max()
                .unwrap_or(0)
                .max(args.requests)
        } else {
            args.requests
        };
        let prompts = (0..most)
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

/// What to measure.
#[derive(Debug, Clone)]
pub enum Target {
    Stage(u8),
    Url(String),
}

impl Target {
    pub fn label(&self) -> String {
        match self {
            Self::Stage(s) => format!("stage {s}"),
            Self::Url(u) => format!("url {u}"),
        }
    }
}

/// One measurement setting: the workload at one concurrency level.
pub struct Run<'a> {
    pub args: &'a Args,
    pub workload: &'a Workload,
    pub concurrency: usize,
    pub requests: usize,
}

impl Run<'_> {
    fn prompts(&self) -> &[Vec<Token>] {
        &self.workload.prompts[..self.requests]
    }

    /// Slots of the single context of Stages 0 to 3.
    fn slots(&self) -> u32 {
        self.args
            .slots
            .unwrap_or(u32::try_from(self.concurrency.max(8)).unwrap_or(u32::MAX))
    }

    /// Tokens per compute pass: `--n-ubatch`, else `--n-batch`.
    fn n_ubatch(&self) -> u32 {
        self.args.n_ubatch.unwrap_or(self.args.n_batch)
    }

    /// An in-process context of the workload's shape.
    fn context_config(&self, slots: u32, threads: u32) -> ContextConfig {
        ContextConfig {
            slots,
            context: self.context_for(slots),
            threads,
            n_batch: self.args.n_batch,
            n_ubatch: self.n_ubatch(),
            flash_attention: self.args.flash_attention,
            kv_unified: self.args.kv_unified,
        }
    }

    /// KV cells for `slots` sequences of this workload.
    fn context_for(&self, slots: u32) -> u32 {
        let per_seq =
            (self.args.prompt_tokens + self.args.max_tokens as usize + 8).div_ceil(256) * 256;
        u32::try_from(per_seq)
            .unwrap_or(u32::MAX)
            .saturating_mul(slots)
    }

    pub fn measure(&self, target: &Target) -> Result<StageReport> {
        let progress = Progress::start(self.requests);
        let result = match target {
            Target::Stage(0) => self.stage0(&progress),
            Target::Stage(1) => self.stage1(&progress),
            Target::Stage(2) => self.stage2(&progress),
            Target::Stage(3) => self.stage3(&progress),
            Target::Stage(4) => self.stage4(&progress),
            Target::Stage(5) => self.stage5(&progress),
            Target::Stage(s) => Err(anyhow::anyhow!("there is no stage {s} (stages: 0 to 5)")),
            Target::Url(url) => {
                let addr = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string();
                let (records, wall) = http_load(
                    &addr,
                    &self.args.served_model,
                    self.prompts(),
                    self.concurrency,
                    self.args.max_tokens,
                    &progress,
                );
                Ok(summarize(
                    "url",
                    &format!("{url}, over HTTP"),
                    &records,
                    wall,
                ))
            }
        };
        progress.finish();
        result
    }

    fn in_process_backend(&self) -> Result<LlamaCppBackend> {
        let slots = self.slots();
        Ok(self
            .workload
            .model
            .new_backend(&self.context_config(slots, self.args.threads))?)
    }

    fn stage0(&self, progress: &Progress) -> Result<StageReport> {
        let mut backend = self.in_process_backend()?;
        // On a thread of its own, like the engine: llama.cpp's OpenMP pool belongs to the
        // calling thread, and a pool left on the main thread slows the next stage's.
        let (records, wall) = std::thread::scope(|s| {
            s.spawn(|| {
                let start = Instant::now();
                let records = raw_loop(
                    &mut backend,
                    self.prompts(),
                    self.concurrency,
                    self.args.max_tokens,
                    progress,
                );
                (records, start.elapsed())
            })
            .join()
            .expect("the raw loop does not panic")
        });
        Ok(summarize(
            "0",
            &format!(
                "raw llama.cpp batched decode, in-process, {} threads",
                self.args.threads
            ),
            &records,
            wall,
        ))
    }

    fn stage1(&self, progress: &Progress) -> Result<StageReport> {
        let engine = RunningEngine::spawn(self.in_process_backend()?)?;
        let start = Instant::now();
        let records = drive_engine(
            std::slice::from_ref(&engine.handle),
            self.prompts(),
            self.concurrency,
            self.args.max_tokens,
            progress,
        );
        let wall = start.elapsed();
        engine.stop(false);
        Ok(summarize(
            "1",
            &format!("engine, in-process, {} threads", self.args.threads),
            &records,
            wall,
        ))
    }

    /// The Stage 2 worker: the in-process context's shape, unpinned, listening on `socket`.
    fn worker_args(&self, socket: &std::path::Path, slots: u32) -> WorkerArgs {
        WorkerArgs {
            socket: socket.to_path_buf(),
            model: self.args.model_path(),
            chat_template: None,
            cpus: None,
            gpu: None,
            gpu_layers: 0,
            context: self.context_config(slots, self.args.threads),
            wide: None,
            embedding: None,
        }
    }

    fn stage2(&self, progress: &Progress) -> Result<StageReport> {
        let scratch = scratch_dir("bench-ipc")?;
        let socket = scratch.path().join("worker.sock");
        let _worker = procs::start_worker(&self.worker_args(&socket, self.slots()))?;
        let conn = connect_to_worker(&socket)?;
        let start = Instant::now();
        let records = ipc_load(
            &conn,
            self.prompts(),
            self.concurrency,
            self.args.max_tokens,
            progress,
        )?;
        let wall = start.elapsed();
        Ok(summarize(
            "2",
            &format!(
                "one worker over IPC, {} threads, no HTTP",
                self.args.threads
            ),
            &records,
            wall,
        ))
    }

    fn router_config(&self, workers: &str, slots: u32) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued = 4096\nruntime_threads = {rt}\n[model]\npath = {path}\nalias = \"bench\"\n\
             [worker_defaults]\nslots = {slots}\ncontext = {context}\nn_batch = {n_batch}\nn_ubatch = {n_ubatch}\n\
             flash_attention = \"{fa}\"\nkv_unified = {kv}\n{workers}",
            path = json!(self.args.model_path()),
            rt = self.args.router_threads,
            context = self.context_for(slots),
            n_batch = self.args.n_batch,
            n_ubatch = self.n_ubatch(),
            fa = self.args.flash_attention.as_str(),
            kv = self.args.kv_unified,
        )
    }

    /// Starts a router with `config` and runs the HTTP load against it.
    fn over_http(
        &self,
        stage: &str,
        name: &str,
        config: &str,
        progress: &Progress,
    ) -> Result<StageReport> {
        let router = procs::start_router(config)?;
        let (records, wall) = http_load(
            &router.addr,
            "bench",
            self.prompts(),
            self.concurrency,
            self.args.max_tokens,
            progress,
        );
        Ok(summarize(stage, name, &records, wall))
    }

    fn stage3(&self, progress: &Progress) -> Result<StageReport> {
        let cpus = llamapool_common::cpus::CpuList::allowed();
        let workers = format!(
            "[[workers]]\ncpus = \"{cpus}\"\nthreads = {}\n",
            self.args.threads
        );
        let name = format!("router + 1 worker ({} threads), HTTP", self.args.threads);
        self.over_http(
            "3",
            &name,
            &self.router_config(&workers, self.slots()),
            progress,
        )
    }

    fn stage4(&self, progress: &Progress) -> Result<StageReport> {
        let n_workers = llamapool_common::cpus::CpuList::allowed().len().max(1);
        let slots = self.pool_slots(n_workers);
        let name = format!(
            "router + pool ({n_workers} pinned 1-thread workers, {slots} slots each), HTTP"
        );
        self.over_http("4", &name, &self.router_config("", slots), progress)
    }
}

impl Run<'_> {
    /// Slots per pool worker: the concurrency spread over the workers, at least 4.
    fn pool_slots(&self, n_workers: usize) -> u32 {
        self.args.pool_slots.unwrap_or(
            u32::try_from(self.concurrency.div_ceil(n_workers).max(4)).unwrap_or(u32::MAX),
        )
    }

    /// Stage 5: the pool's shape in-process: one engine per CPU, each pinned to it with one
    /// thread, least-loaded dispatch; what Stage 4 adds to it is IPC and HTTP.
    fn stage5(&self, progress: &Progress) -> Result<StageReport> {
        let cpus = llamapool_common::cpus::CpuList::allowed();
        let slots = self.pool_slots(cpus.len().max(1));
        let mut engines = Vec::new();
        for &cpu in cpus.cpus() {
            let backend = self
                .workload
                .model
                .new_backend(&self.context_config(slots, 1))?;
            let pin = llamapool_common::cpus::CpuList::from_cpus(vec![cpu]);
            engines.push(RunningEngine::spawn_with(
                backend,
                EngineHooks {
                    on_start: Some(Box::new(move || {
                        if let Err(e) = llamapool_worker::pin::pin_to(&pin) {
                            eprintln!("pinning an engine to CPU {pin} failed: {e}");
                        }
                    })),
                    on_iteration_end: None,
                },
            )?);
        }
        let handles: Vec<EngineHandle> = engines.iter().map(|e| e.handle.clone()).collect();
        let start = Instant::now();
        let records = drive_engine(
            &handles,
            self.prompts(),
            self.concurrency,
            self.args.max_tokens,
            progress,
        );
        let wall = start.elapsed();
        drop(handles);
        for engine in engines {
            engine.stop(false);
        }
        Ok(summarize(
            "5",
            &format!(
                "pool in-process ({} pinned 1-thread engines, {slots} slots each)",
                cpus.len()
            ),
            &records,
            wall,
        ))
    }
}

/// Completed-request counter, shown on a terminal while a stage runs.
pub struct Progress {
    done: std::sync::Arc<AtomicUsize>,
    stop: Option<mpsc::Sender<()>>,
    printer: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(total: usize) -> Self {
        use std::io::IsTerminal;
        let done = std::sync::Arc::new(AtomicUsize::new(0));
        if !std::io::stderr().is_terminal() {
            return Self {
                done,
                stop: None,
                printer: None,
            };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let counter = done.clone();
        let printer = std::thread::spawn(move || {
            let start = Instant::now();
            while stopped.recv_timeout(Duration::from_millis(250)).is_err() {
                eprint!(
                    "\r  {}/{total} requests, {:.0} s ",
                    counter.load(Ordering::Relaxed),
                    start.elapsed().as_secs_f64()
                );
            }
            eprint!("\r\x1b[K");
        });
        Self {
            done,
            stop: Some(stop),
            printer: Some(printer),
        }
    }

    fn tick(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish(self) {
        drop(self.stop);
        if let Some(p) = self.printer {
            let _ = p.join();
        }
    }
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
    progress: &Progress,
) -> Vec<RequestRecord> {
    let mut ids = SeqIdPool::new(backend.limits().n_seq_max);
    let greedy = SamplingParams::greedy();
    let mut sampler = backend
        .new_sampler(&greedy, true, &[], 0)
        .expect("a sampler without a grammar is always built");
    let mut records = vec![RequestRecord::default(); prompts.len()];
    let mut running: Vec<RawSeq> = Vec::new();
    let mut next = 0;
    let mut batch: Vec<BatchEntry> = Vec::new();
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
        let n_batch = backend.limits().n_batch;
        // Whole prompts only, within the decode budget (the engine chunks; this loop does not).
        while running.len() + admitted.len() < concurrency
            && next < prompts.len()
            && batch.len() + prompts[next].len() <= n_batch
        {
            // No prompt cache here: every id is cleared whole before it is handed out.
            let seq = ids
                .acquire(&[], false, |id, _| backend.clear_sequence(id, 0))
                .expect("a free sequence id")
                .id;
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
        backend.decode(&batch).expect("raw decode");
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
            progress.tick();
            ids.release(s.seq, Vec::new());
            backend.clear_sequence(s.seq, 0);
            false
        });
    }
    records
}

/// Keeps `concurrency` requests in flight over an event-driven transport (the engine's
/// channel, the worker's socket): records timings, says which request to submit next.
struct ClosedLoop<'p> {
    max_tokens: u32,
    records: Vec<RequestRecord>,
    started: Vec<Option<Instant>>,
    last_chunk: Vec<Option<Instant>>,
    next: usize,
    finished: usize,
    progress: &'p Progress,
}

impl<'p> ClosedLoop<'p> {
    fn new(n: usize, max_tokens: u32, progress: &'p Progress) -> Self {
        Self {
            max_tokens,
            records: vec![RequestRecord::default(); n],
            started: vec![None; n],
            last_chunk: vec![None; n],
            next: 0,
            finished: 0,
            progress,
        }
    }

    /// The next request to submit, if any; marks it started.
    fn take_next(&mut self) -> Option<usize> {
        let i = self.next;
        if i >= self.records.len() {
            return None;
        }
        self.next += 1;
        self.started[i] = Some(Instant::now());
        Some(i)
    }

    fn is_done(&self) -> bool {
        self.finished == self.records.len()
    }

    /// Records an output of request `i`; true when the request ended.
    fn on_output(&mut self, i: usize, tokens: usize, finished: bool) -> bool {
        let now = Instant::now();
        let start = self.started[i].expect("outputs come only for submitted requests");
        let record = &mut self.records[i];
        if tokens > 0 {
            match self.last_chunk[i] {
                None => record.ttft = now - start,
                Some(prev) => record.itls.push(now - prev),
            }
            self.last_chunk[i] = Some(now);
            record.tokens += u32::try_from(tokens).unwrap_or(u32::MAX);
        }
        if finished {
            record.ok = record.tokens == self.max_tokens;
            record.e2e = now - start;
            self.finished += 1;
            self.progress.tick();
        }
        finished
    }

    fn on_failure(&mut self, i: usize) {
        self.finished += 1;
        self.progress.tick();
        self.records[i].ok = false;
    }
}

fn request_for(
    i: usize,
    prompt: &[Token],
    max_tokens: u32,
) -> (RequestId, SamplingParams, StoppingParams, Vec<Token>) {
    (
        RequestId(i as u64),
        SamplingParams::greedy(),
        StoppingParams {
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos: true,
            // Like the raw loop of stage 0: every prompt evaluated in full.
            cache_prompt: false,
        },
        prompt.to_vec(),
    )
}

/// Stage 1: one client thread reads every request's events from one channel (as the worker's
/// IPC thread does) and submits the next request when one ends.
fn drive_engine(
    engines: &[EngineHandle],
    prompts: &[Vec<Token>],
    concurrency: usize,
    max_tokens: u32,
    progress: &Progress,
) -> Vec<RequestRecord> {
    let (tx, rx) = mpsc::channel();
    let mut lp = ClosedLoop::new(prompts.len(), max_tokens, progress);
    // Least-loaded dispatch over the engines, as the router does over workers.
    let load = std::cell::RefCell::new(vec![0usize; engines.len()]);
    let placed = std::cell::RefCell::new(vec![0usize; prompts.len()]);
    let submit = |i: usize| {
        let (id, sampling, stopping, prompt) = request_for(i, &prompts[i], max_tokens);
        let mut load = load.borrow_mut();
        let e = (0..engines.len())
            .min_by_key(|&e| load[e])
            .expect("at least one engine");
        load[e] += 1;
        placed.borrow_mut()[i] = e;
        engines[e].submit(
            EngineRequest {
                id,
                prompt,
                sampling,
                stopping,
                resumed: 0,
                report_progress: false,
                special_tokens: Vec::new(),
            },
            tx.clone(),
        );
    };
    for _ in 0..concurrency {
        if let Some(i) = lp.take_next() {
            submit(i);
        }
    }
    while !lp.is_done() {
        let Ok(event) = rx.recv_timeout(Duration::from_secs(600)) else {
            break;
        };
        let i = usize::try_from(event.id().0).expect("ids are indices");
        let ended = match event {
            GenerationEvent::Accepted { .. } => false,
            GenerationEvent::Output(o) => lp.on_output(i, o.tokens.len(), o.finish.is_some()),
            GenerationEvent::Rejected { .. } => {
                lp.on_failure(i);
                true
            }
        };
        if ended {
            load.borrow_mut()[placed.borrow()[i]] -= 1;
            if let Some(next) = lp.take_next() {
                submit(next);
            }
        }
    }
    lp.records
}

/// Stage 2: the worker protocol over its socket, one client thread.
fn ipc_load(
    conn: &interprocess::local_socket::Stream,
    prompts: &[Vec<Token>],
    concurrency: usize,
    max_tokens: u32,
    progress: &Progress,
) -> Result<Vec<RequestRecord>> {
    let mut writer = conn;
    let mut reader = BufReader::new(conn);
    let mut buf = Vec::new();
    codec::write_frame(
        &mut writer,
        &ToWorker::Hello {
            version: PROTOCOL_VERSION,
        },
    )?;
    match codec::read_frame::<FromWorker>(&mut reader, &mut buf)? {
        Some(FromWorker::Ready(_)) => {}
        other => bail!("expected Ready from the worker, got {other:?}"),
    }
    let mut lp = ClosedLoop::new(prompts.len(), max_tokens, progress);
    let submit = |i: usize, writer: &mut &interprocess::local_socket::Stream| {
        let (id, sampling, stopping, prompt) = request_for(i, &prompts[i], max_tokens);
        let request = GenerateRequest {
            id,
            request_id: id.to_string(),
            prompt: Prompt::Tokens(prompt),
            sampling,
            stopping,
            resumed: Vec::new(),
            report_progress: false,
        };
        codec::write_frame(writer, &ToWorker::Generate(request))
    };
    for _ in 0..concurrency {
        if let Some(i) = lp.take_next() {
            submit(i, &mut writer)?;
        }
    }
    while !lp.is_done() {
        let Some(frame) = codec::read_frame::<FromWorker>(&mut reader, &mut buf)? else {
            bail!("the worker closed the connection");
        };
        let mut ended = 0;
        match frame {
            FromWorker::Events(events) => {
                for event in events {
                    let i = usize::try_from(event.id().0)?;
                    match event {
                        GenerationEvent::Accepted { .. } => {}
                        GenerationEvent::Output(o) => {
                            let finished = o.finish.is_some();
                            ended += usize::from(lp.on_output(i, o.tokens.len(), finished));
                        }
                        GenerationEvent::Rejected { id, error } => {
                            eprintln!("request {id} rejected: {error}");
                            lp.on_failure(i);
                            ended += 1;
                        }
                    }
                }
            }
            FromWorker::Fatal { message } => bail!("the worker failed: {message}"),
            _ => {}
        }
        for _ in 0..ended {
            if let Some(next) = lp.take_next() {
                submit(next, &mut writer)?;
            }
        }
    }
    Ok(lp.records)
}

/// Stages 3, 4 and `--url`: `concurrency` client threads, each streaming one request at a
/// time; TTFT at the first chunk with content, ITL between content chunks.
pub fn http_load(
    addr: &str,
    model: &str,
    prompts: &[Vec<Token>],
    concurrency: usize,
    max_tokens: u32,
    progress: &Progress,
) -> (Vec<RequestRecord>, Duration) {
    let next = AtomicUsize::new(0);
    let records = std::sync::Mutex::new(vec![RequestRecord::default(); prompts.len()]);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= prompts.len() {
                    break;
                }
                let record =
                    http_request(addr, model, &prompts[i], max_tokens).unwrap_or_else(|e| {
                        eprintln!("request {i} failed: {e:#}");
                        RequestRecord::default()
                    });
                records.lock().expect("no client panicked")[i] = record;
                progress.tick();
            });
        }
    });
    let wall = start.elapsed();
    (records.into_inner().expect("no client panicked"), wall)
}

/// POSTs `body` to `path` and returns its event stream; an error unless the status is 200
/// (with the first event, which holds the error).
pub fn open_stream(addr: &str, path: &str, body: &serde_json::Value) -> Result<SseReader> {
    let stream = http::post_json(addr, path, body)?;
    let mut sse = SseReader::new(stream)?;
    if sse.status != 200 {
        let status = sse.status;
        bail!("HTTP {status}: {:?}", sse.next_data());
    }
    Ok(sse)
}

pub fn http_request(
    addr: &str,
    model: &str,
    prompt: &[Token],
    max_tokens: u32,
) -> Result<RequestRecord> {
    let body = completion_body(model, prompt, max_tokens, true);
    let start = Instant::now();
    let mut sse = open_stream(addr, "/v1/completions", &body)?;
    let mut record = RequestRecord::default();
    let mut last: Option<Instant> = None;
    let mut chunks = 0u32;
    let mut usage_tokens = None;
    while let Some(data) = sse.next_data() {
        let now = Instant::now();
        if data == "[DONE]" {
            record.e2e = now - start;
            record.tokens = usage_tokens.unwrap_or(chunks);
            record.ok = record.tokens == max_tokens;
            return Ok(record);
        }
        let chunk: serde_json::Value = serde_json::from_str(&data)?;
        if let Some(error) = chunk.get("error") {
            bail!("error event: {error}");
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            usage_tokens = u32::try_from(n).ok();
        }
        let has_text = chunk["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        if has_text {
            match last {
                None => record.ttft = now - start,
                Some(prev) => record.itls.push(now - prev),
            }
            last = Some(now);
            chunks += 1;
        }
    }
    bail!("the stream ended without [DONE]")
}

/// A connection to the worker listening on `socket`. The socket file appears when the worker
/// binds it, a moment before it listens: a connection refused in that moment is tried again
/// (for up to 5 s) rather than failing the run.
fn connect_to_worker(socket: &std::path::Path) -> Result<interprocess::local_socket::Stream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let name = socket.to_fs_name::<GenericFilePath>()?;
        match ConnectOptions::new().name(name).connect_sync() {
            Ok(conn) => return Ok(conn),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("connecting to the worker"),
        }
    }
}
