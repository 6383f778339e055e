//! The engine: continuous batching over one backend context, on a thread of its own.
//!
//! The engine thread owns the backend, the sequence-ID pool, the waiting queue and every
//! running sequence; other threads talk to it only through [`EngineHandle`] commands, and it
//! answers each request on the event channel the request came with. One loop iteration
//! applies the queued commands, then runs at most one step: `schedule` (the pure
//! [`scheduler`] decides, the engine admits) → `execute` (one `decode`) →
//! `update_from_output` (sample, stop, emit).
//!
//! Finished sequences leave their KV cells on their free ids: the [`seq_ids`] pool is also
//! the prompt cache, and a new request prefills only what its prompt does not share with one.
//! Where the backend can share cells, a new sequence also takes the prefix it shares with a
//! running one, and [`sharing`] decides when a queued request waits a step for it.
//!
//! Failures stay local: a request that cannot fit is rejected, a failed decode fails the
//! sequences it carried (a full KV cache evicts only the newest), and the others go on.

pub mod logprobs;
pub mod scheduler;
pub mod seq_ids;
pub mod sharing;
pub mod text;

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use llamapool_common::{
    Candidate, Finish, FinishReason, GenerationEvent, PromptProgress, RequestError, RequestId,
    SamplingParams, SeqOutput, StoppingParams, Timings, Token, TokenLogprob, Usage,
};

use crate::backend::{Backend, BackendLimits, BatchEntry, DecodeFailure};
use scheduler::{plan_step, StepView};
use seq_ids::{SeqId, SeqIdPool};
use sharing::{Prefilling, Queued};
use text::TextAssembler;

/// A tokenized generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt: Vec<Token>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// How many of the prompt's last tokens were generated for this request by a worker that
    /// died (0 for a new request). Their text was already sent; it is fed through the
    /// stop-string and UTF-8 state again so that the continuation is exactly what one worker
    /// would have produced.
    pub resumed: usize,
    /// Send a progress report ([`SeqOutput::progress`]) when the request gets its sequence and
    /// after each step that evaluated part of its prompt, before its first token.
    pub report_progress: bool,
    /// Special tokens whose text is part of the output (a chat format's markers, such as
    /// `<tool_call>`, that its parser reads); other special tokens have no text.
    pub special_tokens: Vec<Token>,
}

/// Where the engine sends one request's events: a channel of its own, or a shared sink such
/// as the worker's IPC writer. A failed send means nobody listens any more.
pub struct EventSender(Box<dyn FnMut(GenerationEvent) -> Result<(), Disconnected> + Send>);

/// The receiving side of an [`EventSender`] is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected;

impl EventSender {
    pub fn new(
        send: impl FnMut(GenerationEvent) -> Result<(), Disconnected> + Send + 'static,
    ) -> Self {
        Self(Box::new(send))
    }

    pub fn send(&mut self, event: GenerationEvent) -> Result<(), Disconnected> {
        (self.0)(event)
    }
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSender")
    }
}

impl From<Sender<GenerationEvent>> for EventSender {
    fn from(tx: Sender<GenerationEvent>) -> Self {
        Self::new(move |event| tx.send(event).map_err(|_| Disconnected))
    }
}

/// A snapshot of the engine's progress and load, taken between loop iterations: answered to
/// [`EngineHandle::stats`] and given to the `on_iteration_end` hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Sequence ids in all (`n_seq_max`).
    pub slots: usize,
    pub free_ids: usize,
    /// Sequences holding an id (prefilling or decoding).
    pub running: usize,
    /// Requests queued for a free id.
    pub waiting: usize,
    /// `decode` calls since the engine started.
    pub decode_calls: u64,
    /// Steps (loop iterations that decoded) since the engine started. Grows at every step
    /// while the engine has work: the router's hang watchdog reads it.
    pub steps: u64,
    /// When the last step ran; `None` before the first.
    pub last_step: Option<SystemTime>,
    /// KV cells held by the running sequences: the sum of their decoded tokens.
    pub kv_cells: usize,
}

/// The `on_iteration_end` hook: called on the engine thread after every loop iteration with
/// the snapshot of that moment.
pub type IterationHook = Box<dyn FnMut(&EngineStats) + Send>;

// A command lives only in the engine's channel; boxing the large `Submit` would add an
// allocation per request to save memory that a few queued commands hold.
#[allow(clippy::large_enum_variant)]
enum Command {
    Submit {
        request: EngineRequest,
        events: EventSender,
        submitted: Instant,
    },
    Cancel(RequestId),
    Stats(Sender<EngineStats>),
    Shutdown {
        drain: bool,
    },
}

/// Talks to a running engine. Cheap to clone; the engine stops when every handle is gone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: Sender<Command>,
    limits: BackendLimits,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Submit { request, .. } => write!(f, "Submit({})", request.id),
            Self::Cancel(id) => write!(f, "Cancel({id})"),
            Self::Stats(_) => f.write_str("Stats"),
            Self::Shutdown { drain } => write!(f, "Shutdown {{ drain: {drain} }}"),
        }
    }
}

impl EngineHandle {
    /// Queues a request; its events arrive on `events`, the last one final. A request whose id
    /// is already queued or running is rejected.
    pub fn submit(&self, request: EngineRequest, events: impl Into<EventSender>) {
        let id = request.id;
        let command = Command::Submit {
            request,
            events: events.into(),
            submitted: Instant::now(),
        };
        if let Err(mpsc::SendError(Command::Submit { mut events, .. })) =
            self.commands.send(command)
        {
            let _ = events.send(GenerationEvent::Rejected {
                id,
                error: RequestError::ShuttingDown,
            });
        }
    }

    /// Cancels a request in any state; idempotent. Its sequence is freed before the next step.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }

    /// The engine's load, or `None` once it has stopped.
    pub fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Stats(tx)).ok()?;
        rx.recv().ok()
    }

    /// Stops accepting requests; with `drain`, finishes the ones it has, else cancels them.
    pub fn shutdown(&self, drain: bool) {
        let _ = self.commands.send(Command::Shutdown { drain });
    }

    pub fn limits(&self) -> BackendLimits {
        self.limits
    }
}

/// How often an idle engine runs its iteration hook.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// How long a woken engine waits for the next command of a wave, and at most in all
/// (see `Engine::gather`).
const GATHER_GAP: Duration = Duration::from_millis(3);
const GATHER_MAX: Duration = Duration::from_millis(15);

/// Code the engine thread runs at fixed points.
#[derive(Default)]
pub struct EngineHooks {
    /// Runs first on the engine thread (e.g. to pin it, so that llama.cpp's threads, started
    /// from it, inherit its CPU mask).
    pub on_start: Option<Box<dyn FnOnce() + Send>>,
    /// Runs after each loop iteration (commands applied, at most one step), when every event
    /// of that iteration has been sent, with the engine's stats at that point: the IPC writer
    /// flushes the events as one frame and pushes the progress. Dropped when the engine thread
    /// ends, after its last iteration.
    pub on_iteration_end: Option<IterationHook>,
}

impl std::fmt::Debug for EngineHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHooks").finish_non_exhaustive()
    }
}

/// A started engine: its handle and its thread.
#[derive(Debug)]
pub struct RunningEngine {
    pub handle: EngineHandle,
    thread: JoinHandle<()>,
}

impl RunningEngine {
    /// Starts the engine thread over `backend`.
    pub fn spawn<B>(backend: B) -> std::io::Result<Self>
    where
        B: Backend + Send + 'static,
    {
        Self::spawn_with(backend, EngineHooks::default())
    }

    /// Starts the engine thread with hooks.
    pub fn spawn_with<B>(backend: B, hooks: EngineHooks) -> std::io::Result<Self>
    where
        B: Backend + Send + 'static,
    {
        let limits = backend.limits();
        let (commands, inbox) = mpsc::channel();
        let EngineHooks {
            on_start,
            on_iteration_end,
        } = hooks;
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                if let Some(start) = on_start {
                    start();
                }
                let mut engine = Engine::new(backend);
                engine.on_iteration_end = on_iteration_end;
                engine.run(&inbox);
            })?;
        Ok(Self {
            handle: EngineHandle { commands, limits },
            thread,
        })
    }

    /// Shuts the engine down (draining or not) and waits for its thread.
    pub fn stop(self, drain: bool) {
        self.handle.shutdown(drain);
        drop(self.handle);
        if self.thread.join().is_err() {
            tracing::error!("the engine thread panicked");
        }
    }
}

struct Waiting<S> {
    request: EngineRequest,
    /// Built at submission, so that a grammar the backend refuses is a rejection.
    sampler: S,
    events: EventSender,
    submitted: Instant,
    max_new: u32,
}

/// A request that holds a sequence id.
struct Active<S> {
    id: RequestId,
    seq: SeqId,
    prompt: Vec<Token>,
    /// Prompt tokens already decoded.
    prefilled: usize,
    /// Tokens of this sequence in the KV cache; the next token's position.
    n_kv: usize,
    /// The last sampled token, to feed at the next step.
    pending: Option<Token>,
    /// Every sampled token: with the prompt, what the sequence's KV cells hold (up to `n_kv`).
    sampled: Vec<Token>,
    /// Prompt tokens found in the prompt cache: never decoded for this request.
    cached: usize,
    generated: u32,
    max_new: u32,
    ignore_eos: bool,
    /// `SamplingParams::logprobs`: how many alternatives to report with each token, if any.
    logprobs: Option<u8>,
    /// `EngineRequest::report_progress`.
    report_progress: bool,
    /// `EngineRequest::special_tokens`.
    special_tokens: Vec<Token>,
    sampler: S,
    text: TextAssembler,
    events: EventSender,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    done: bool,
}

impl<S> Active<S> {
    fn pos(&self) -> i32 {
        i32::try_from(self.n_kv).expect("positions fit in i32")
    }

    /// The tokens whose KV cells the sequence holds, at positions `0..n_kv`.
    fn cells(&self) -> Vec<Token> {
        self.prompt
            .iter()
            .chain(&self.sampled)
            .take(self.n_kv)
            .copied()
            .collect()
    }

    /// Sends a progress report of the prompt processed so far, if the request asked for them;
    /// a request nobody listens to any more is marked done.
    fn send_progress(&mut self) {
        if !self.report_progress {
            return;
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let progress = PromptProgress {
            total: count(self.prompt.len()),
            cache: count(self.cached),
            processed: count(self.prefilled),
            // The first report (nothing evaluated yet) is the start: 0, as llama-server's.
            time_ms: if self.prefilled == self.cached {
                0.0
            } else {
                ms(self.admitted.elapsed())
            },
        };
        let output = SeqOutput::progress(self.id, progress);
        if self.events.send(GenerationEvent::Output(output)).is_err() {
            self.done = true;
        }
    }

    fn finish(&self, reason: FinishReason) -> Finish {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        Finish {
            reason,
            usage: Usage {
                prompt_tokens: u32::try_from(self.prompt.len()).unwrap_or(u32::MAX),
                completion_tokens: self.generated,
                cached_tokens: u32::try_from(self.cached).unwrap_or(u32::MAX),
            },
            timings: Timings {
                queue_ms: ms(self.admitted - self.submitted),
                prompt_ms: ms(first - self.admitted),
                predicted_ms: ms(now - first),
            },
            stop_word: None,
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prompt tokens that one active sequence adds to this step's batch.
#[derive(Debug, Clone, Copy)]
struct PrefillChunk {
    /// Index into `Engine::active`.
    active: usize,
    tokens: usize,
}

/// A batch entry whose logits give one active sequence its next token.
#[derive(Debug, Clone, Copy)]
struct SamplePoint {
    /// Index into `Engine::active`.
    active: usize,
    batch_index: usize,
}

struct Engine<B: Backend> {
    backend: B,
    limits: BackendLimits,
    ids: SeqIdPool,
    /// Whether finished sequences keep their KV cells for later prompts (the backend can
    /// remove a sequence's cells past a position).
    prompt_cache: bool,
    /// Whether a new sequence takes the prefix it shares with a running one from that one's
    /// cells (the prompt cache is on and the backend can share cells).
    share_cells: bool,
    waiting: VecDeque<Waiting<B::Sampler>>,
    /// In admission order.
    active: Vec<Active<B::Sampler>>,
    batch: Vec<BatchEntry>,
    piece: Vec<u8>,
    accepting: bool,
    decode_calls: u64,
    steps: u64,
    last_step: Option<SystemTime>,
    on_iteration_end: Option<IterationHook>,
}

impl<B: Backend> Engine<B> {
    fn new(backend: B) -> Self {
        let limits = backend.limits();
        let prompt_cache = backend.can_keep_prefix();
        let share_cells = prompt_cache && backend.can_share_cells();
        Self {
            backend,
            limits,
            ids: SeqIdPool::new(limits.n_seq_max),
            prompt_cache,
            share_cells,
            waiting: VecDeque::new(),
            active: Vec::new(),
            batch: Vec::with_capacity(limits.n_batch),
            piece: Vec::new(),
            accepting: true,
            decode_calls: 0,
            steps: 0,
            last_step: None,
            on_iteration_end: None,
        }
    }

    fn run(mut self, inbox: &Receiver<Command>) {
        loop {
            if self.is_idle() {
                if !self.accepting {
                    break;
                }
                // Idle, the hook still runs every tick (an adaptive worker keeps measuring
                // whether its CPUs are free, so that the router knows before work arrives).
                match inbox.recv_timeout(IDLE_TICK) {
                    Ok(command) => {
                        self.apply(command);
                        self.gather(inbox);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // Every handle is gone: cancel, unless a drain was already asked for.
                        if self.accepting {
                            self.shut_down(false);
                        }
                        break;
                    }
                }
            }
            if !self.is_idle() {
                self.step();
            }
            let stats = self.snapshot();
            if let Some(hook) = &mut self.on_iteration_end {
                hook(&stats);
            }
        }
        tracing::debug!("engine stopped");
    }

    /// A command that wakes an idle engine is often the first request of a wave: clients
    /// whose streams ended in the same step send their next requests together. Waiting a
    /// moment for the rest (until none came for [`GATHER_GAP`], at most [`GATHER_MAX`]) lets
    /// them prefill in one step; otherwise the first one's step runs alone, the others'
    /// prefill follows in the next, and the first stream stalls behind it.
    fn gather(&mut self, inbox: &Receiver<Command>) {
        let deadline = Instant::now() + GATHER_MAX;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match inbox.recv_timeout(GATHER_GAP.min(left)) {
                Ok(command) => self.apply(command),
                Err(_) => return,
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit {
                request,
                events,
                submitted,
            } => self.submit(request, events, submitted),
            Command::Cancel(id) => self.cancel(id),
            Command::Stats(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Shutdown { drain } => self.shut_down(drain),
        }
    }

    fn snapshot(&self) -> EngineStats {
        EngineStats {
            slots: self.limits.n_seq_max,
            free_ids: self.ids.free_count(),
            running: self.active.len(),
            waiting: self.waiting.len(),
            decode_calls: self.decode_calls,
            steps: self.steps,
            last_step: self.last_step,
            kv_cells: self.active.iter().map(|a| a.n_kv).sum(),
        }
    }

    fn shut_down(&mut self, drain: bool) {
        self.accepting = false;
        if !drain {
            let ids: Vec<RequestId> = self
                .waiting
                .iter()
                .map(|w| w.request.id)
                .chain(self.active.iter().map(|a| a.id))
                .collect();
            for id in ids {
                self.cancel(id);
            }
        }
    }

    /// Checks a request against the vocabulary and the per-sequence context, then queues it.
    fn submit(&mut self, request: EngineRequest, mut events: EventSender, submitted: Instant) {
        let id = request.id;
        let checked = self.admission_check(&request).and_then(|max_new| {
            let sampler = self.backend.new_sampler(
                &request.sampling,
                request.stopping.ignore_eos,
                &request.prompt,
                request.resumed,
            )?;
            Ok((max_new, sampler))
        });
        match checked {
            Ok((max_new, sampler)) => {
                if events.send(GenerationEvent::Accepted { id }).is_err() {
                    return; // nobody listens: do not queue it
                }
                self.waiting.push_back(Waiting {
                    request,
                    sampler,
                    events,
                    submitted,
                    max_new,
                });
            }
            Err(error) => {
                let _ = events.send(GenerationEvent::Rejected { id, error });
            }
        }
    }

    /// The most tokens the request may generate, or why it cannot run.
    fn admission_check(&self, request: &EngineRequest) -> Result<u32, RequestError> {
        if !self.accepting {
            return Err(RequestError::ShuttingDown);
        }
        if self.waiting.iter().any(|w| w.request.id == request.id)
            || self.active.iter().any(|a| a.id == request.id)
        {
            return Err(RequestError::DuplicateId(request.id));
        }
        request.sampling.validate()?;
        request.stopping.validate()?;
        let n_vocab = self.limits.n_vocab;
        let bad_token = request
            .prompt
            .iter()
            .chain(request.sampling.logit_bias.iter().map(|(t, _)| t))
            .find(|&&t| usize::try_from(t).map_or(true, |t| t >= n_vocab));
        if let Some(&token) = bad_token {
            return Err(RequestError::InvalidToken {
                token,
                n_vocab: u32::try_from(n_vocab).unwrap_or(u32::MAX),
            });
        }
        let n_prompt = request.prompt.len();
        if n_prompt == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        let n_ctx = self.limits.n_ctx_per_seq;
        let requested = request.stopping.max_tokens.map_or(1, |m| m as usize);
        if n_prompt + requested > n_ctx {
            return Err(RequestError::ExceedsContext {
                n_prompt_tokens: u32::try_from(n_prompt).unwrap_or(u32::MAX),
                n_requested: u32::try_from(requested).unwrap_or(u32::MAX),
                n_ctx: u32::try_from(n_ctx).unwrap_or(u32::MAX),
            });
        }
        let room = u32::try_from(n_ctx - n_prompt).unwrap_or(u32::MAX);
        Ok(request.stopping.max_tokens.map_or(room, |m| m.min(room)))
    }

    fn cancel(&mut self, id: RequestId) {
        if let Some(at) = self.waiting.iter().position(|w| w.request.id == id) {
            let mut w = self.waiting.remove(at).expect("position is in range");
            let finish = Finish {
                reason: FinishReason::Cancelled,
                usage: Usage {
                    prompt_tokens: u32::try_from(w.request.prompt.len()).unwrap_or(u32::MAX),
                    completion_tokens: 0,
                    cached_tokens: 0,
                },
                timings: Timings {
                    queue_ms: ms(w.submitted.elapsed()),
                    ..Timings::default()
                },
                stop_word: None,
            };
            let _ = w
                .events
                .send(GenerationEvent::Output(SeqOutput::finished(id, finish)));
        } else if let Some(at) = self.active.iter().position(|a| a.id == id) {
            let mut a = self.active.remove(at);
            let finish = a.finish(FinishReason::Cancelled);
            let _ = a
                .events
                .send(GenerationEvent::Output(SeqOutput::finished(id, finish)));
            self.retire(&a);
        }
    }

    /// Frees a sequence after a failure: its cells are cleared, nothing is cached.
    fn release(&mut self, seq: SeqId) {
        self.backend.clear_sequence(seq, 0);
        self.ids.release(seq, Vec::new());
    }

    /// Frees a sequence whose KV state matches its token history (between steps): with the
    /// prompt cache on, its cells stay for a later prompt that starts the same way.
    fn retire(&mut self, a: &Active<B::Sampler>) {
        if self.prompt_cache {
            self.ids.release(a.seq, a.cells());
        } else {
            self.release(a.seq);
        }
    }

    fn admit(&mut self, w: Waiting<B::Sampler>) {
        let backend = &mut self.backend;
        let reuse = self.prompt_cache && w.request.stopping.cache_prompt;
        let acquired = self
            .ids
            .acquire(&w.request.prompt, reuse, |id, from| {
                backend.clear_sequence(id, i32::try_from(from).expect("positions fit in i32"));
            })
            .expect("the scheduler admits only into free ids");
        let seq = acquired.id;
        let reused = if reuse && self.share_cells {
            self.share_from_running(seq, &w.request.prompt, acquired.reused)
        } else {
            acquired.reused
        };
        if reused > 0 {
            tracing::debug!(id = %w.request.id, reused, "prompt cache hit");
        }
        let mut text = TextAssembler::new(w.request.stopping.stop);
        let resumed = w.request.resumed.min(w.request.prompt.len());
        for &token in &w.request.prompt[w.request.prompt.len() - resumed..] {
            self.piece.clear();
            let special = w.request.special_tokens.contains(&token);
            self.backend.append_piece(token, &mut self.piece, special);
            let _already_sent = text.push(&self.piece);
        }
        self.active.push(Active {
            id: w.request.id,
            seq,
            prompt: w.request.prompt,
            prefilled: reused,
            n_kv: reused,
            pending: None,
            sampled: Vec::new(),
            cached: reused,
            generated: 0,
            max_new: w.max_new,
            ignore_eos: w.request.stopping.ignore_eos,
            logprobs: w.request.sampling.logprobs,
            report_progress: w.request.report_progress,
            special_tokens: w.request.special_tokens,
            sampler: w.sampler,
            text,
            events: w.events,
            submitted: w.submitted,
            admitted: Instant::now(),
            first_token: None,
            done: false,
        });
        // The request starts processing: llama-server's first report (`processed == cache`).
        self.active
            .last_mut()
            .expect("just admitted")
            .send_progress();
    }

    /// Gives `seq`, which holds the first `reused` tokens of `prompt`, the longer prefix a
    /// running sequence holds, if any, from that sequence's cells. Returns how many prompt
    /// tokens `seq` now holds.
    fn share_from_running(&mut self, seq: SeqId, prompt: &[Token], reused: usize) -> usize {
        let donor = self
            .active
            .iter()
            .filter(|a| !a.done)
            .map(|a| (sharing::shareable(prompt, &a.cells()), a.seq))
            .max();
        match donor {
            Some((shared, from)) if shared > reused => {
                let pos = |n: usize| i32::try_from(n).expect("positions fit in i32");
                self.backend
                    .share_prefix(from, seq, pos(reused), pos(shared));
                shared
            }
            _ => reused,
        }
    }

    /// The queued requests this step may admit (indices into the queue, in order): with cell
    /// sharing on, [`sharing::admissible`] holds back a request that shares a long prefix with
    /// a prompt not decoded that far yet.
    fn admissible(&self) -> Vec<usize> {
        let free_ids = self.ids.free_count();
        if !self.share_cells {
            return (0..self.waiting.len().min(free_ids)).collect();
        }
        let prefilling = self
            .active
            .iter()
            .filter(|a| !a.done && a.prefilled < a.prompt.len())
            .map(|a| Prefilling {
                prompt: &a.prompt,
                decoded: a.n_kv,
            })
            .collect();
        let queued: Vec<Queued<'_>> = self
            .waiting
            .iter()
            .map(|w| Queued {
                prompt: &w.request.prompt,
                may_share: w.request.stopping.cache_prompt,
            })
            .collect();
        sharing::admissible(prefilling, &queued, free_ids)
    }

    /// One step, vLLM-style: `schedule → execute → update_from_output`.
    fn step(&mut self) {
        let chunks = self.schedule();
        let samples = self.build_batch(&chunks);
        if self.batch.is_empty() {
            return;
        }
        self.steps += 1;
        self.last_step = Some(SystemTime::now());
        match self.execute() {
            Ok(()) => self.update_from_output(&chunks, &samples),
            Err(failure) => self.on_decode_failure(&failure),
        }
    }

    /// Asks the pure planner what this step carries and admits the queued requests it picks.
    /// Returns the prompt chunk of every sequence that prefills this step, in admission order.
    fn schedule(&mut self) -> Vec<PrefillChunk> {
        let decoding = self.active.iter().filter(|a| a.pending.is_some()).count();
        let prefilling: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].prefilled < self.active[i].prompt.len())
            .collect();
        let remaining: Vec<usize> = prefilling
            .iter()
            .map(|&i| self.active[i].prompt.len() - self.active[i].prefilled)
            .collect();
        let admissible = self.admissible();
        let waiting: Vec<usize> = admissible
            .iter()
            .map(|&i| self.waiting[i].request.prompt.len())
            .collect();
        let plan = plan_step(StepView {
            decoding,
            prefilling: &remaining,
            waiting: &waiting,
            free_ids: self.ids.free_count(),
            n_batch: self.limits.n_batch,
        });
        let mut chunks: Vec<PrefillChunk> = prefilling
            .into_iter()
            .zip(plan.prefill)
            .map(|(active, tokens)| PrefillChunk { active, tokens })
            .collect();
        for (admitted, tokens) in plan.admit.into_iter().enumerate() {
            // Each earlier admission removed one entry in front of this one.
            let w = self
                .waiting
                .remove(admissible[admitted] - admitted)
                .expect("the plan admits only queued requests");
            self.admit(w);
            let a = self.active.last().expect("just admitted");
            // The plan counted the whole prompt; a cache hit leaves less to prefill.
            let tokens = tokens.min(a.prompt.len() - a.prefilled);
            chunks.push(PrefillChunk {
                active: self.active.len() - 1,
                tokens,
            });
        }
        chunks
    }

    /// Fills `self.batch`: each decoding sequence's pending token first, then the prompt
    /// chunks. Returns the entries to sample from, one per sequence that gets a token.
    fn build_batch(&mut self, chunks: &[PrefillChunk]) -> Vec<SamplePoint> {
        self.batch.clear();
        let mut samples = Vec::new();
        for (i, a) in self.active.iter().enumerate() {
            if let Some(token) = a.pending {
                samples.push(SamplePoint {
                    active: i,
                    batch_index: self.batch.len(),
                });
                self.batch.push(BatchEntry {
                    token,
                    pos: a.pos(),
                    seq: a.seq,
                    logits: true,
                });
            }
        }
        for chunk in chunks {
            let a = &self.active[chunk.active];
            for at in a.prefilled..a.prefilled + chunk.tokens {
                // Only the prompt's last token yields the first generated one.
                let last = at + 1 == a.prompt.len();
                if last {
                    samples.push(SamplePoint {
                        active: chunk.active,
                        batch_index: self.batch.len(),
                    });
                }
                self.batch.push(BatchEntry {
                    token: a.prompt[at],
                    pos: i32::try_from(at).expect("positions fit in i32"),
                    seq: a.seq,
                    logits: last,
                });
            }
        }
        samples
    }

    /// The step's one `decode` call.
    fn execute(&mut self) -> Result<(), DecodeFailure> {
        self.decode_calls += 1;
        self.backend.decode(&self.batch)
    }

    /// After a successful decode: advances every sequence the batch carried, samples the next
    /// tokens and emits them, then frees the sequences that finished.
    fn update_from_output(&mut self, chunks: &[PrefillChunk], samples: &[SamplePoint]) {
        for a in &mut self.active {
            if a.pending.take().is_some() {
                a.n_kv += 1;
            }
        }
        for chunk in chunks {
            let a = &mut self.active[chunk.active];
            a.prefilled += chunk.tokens;
            a.n_kv += chunk.tokens;
            // Before this step's token, which the last chunk of a prompt yields.
            if chunk.tokens > 0 {
                a.send_progress();
            }
        }
        for sample in samples {
            let a = &mut self.active[sample.active];
            let token = self.backend.sample(&mut a.sampler, sample.batch_index);
            let (wanted, ignore_eos) = (a.logprobs, a.ignore_eos);
            let logprobs = wanted
                .filter(|_| ignore_eos || !self.backend.is_eog(token))
                .map(|n| self.token_logprob(sample.batch_index, token, usize::from(n)));
            self.on_token(sample.active, token, logprobs);
        }
        self.retire_done();
    }

    /// The log probability of `token` sampled at batch entry `batch_index`, with the `top_n`
    /// most likely tokens, each with its text bytes.
    fn token_logprob(&self, batch_index: usize, token: Token, top_n: usize) -> TokenLogprob {
        let (logprob, top) = logprobs::logprobs(self.backend.logits(batch_index), token, top_n);
        let candidate = |token: Token, logprob: f32| {
            let mut bytes = Vec::new();
            self.backend.append_piece(token, &mut bytes, false);
            Candidate {
                token,
                bytes,
                logprob,
            }
        };
        TokenLogprob {
            sampled: candidate(token, logprob),
            top: top.into_iter().map(|(t, l)| candidate(t, l)).collect(),
        }
    }

    /// Handles one sampled token: stop checks, text, emission.
    fn on_token(&mut self, i: usize, token: Token, logprob: Option<TokenLogprob>) {
        let a = &mut self.active[i];
        a.generated += 1;
        a.sampled.push(token);
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
        }
        let mut output = SeqOutput {
            id: a.id,
            tokens: vec![token],
            text: String::new(),
            finish: None,
            logprobs: logprob.into_iter().collect(),
            progress: None,
            parsed: false,
            chat: Vec::new(),
        };
        let mut stop_word = None;
        let reason = if !a.ignore_eos && self.backend.is_eog(token) {
            output.text = a.text.finish();
            Some(FinishReason::Stop)
        } else {
            self.piece.clear();
            let special = a.special_tokens.contains(&token);
            self.backend.append_piece(token, &mut self.piece, special);
            let released = a.text.push(&self.piece);
            output.text = released.text;
            if released.stopped {
                stop_word = a.text.stop_word().map(str::to_owned);
                Some(FinishReason::Stop)
            } else if a.generated >= a.max_new {
                output.text.push_str(&a.text.finish());
                Some(FinishReason::Length)
            } else {
                a.pending = Some(token);
                None
            }
        };
        if let Some(reason) = reason {
            output.finish = Some(Finish {
                stop_word,
                ..a.finish(reason)
            });
            a.done = true;
        }
        if a.events.send(GenerationEvent::Output(output)).is_err() {
            // Nobody listens any more: free the sequence now.
            a.done = true;
        }
    }

    fn retire_done(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done {
                let a = self.active.remove(i);
                self.retire(&a);
            } else {
                i += 1;
            }
        }
    }

    /// A failed decode changed nothing (the backend rolled back). A full KV cache evicts the
    /// newest sequence of the batch so the others can go on; any other failure fails every
    /// sequence the batch carried.
    fn on_decode_failure(&mut self, failure: &DecodeFailure) {
        let in_batch: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.batch.iter().any(|e| e.seq == self.active[i].seq))
            .collect();
        if *failure == DecodeFailure::NoKvSlot {
            // Cached cells of free ids come first: drop them and retry the same batch.
            let backend = &mut self.backend;
            let dropped = self.ids.drop_caches(|id| backend.clear_sequence(id, 0));
            if dropped > 0 {
                tracing::info!(dropped, "KV cache full: dropped the prompt cache");
                return;
            }
        }
        tracing::warn!(%failure, sequences = in_batch.len(), "decode failed");
        let (victims, error) = match failure {
            DecodeFailure::NoKvSlot => (
                in_batch.last().copied().into_iter().collect::<Vec<_>>(),
                RequestError::KvCacheFull,
            ),
            DecodeFailure::Other(msg) => (in_batch, RequestError::DecodeFailed(msg.clone())),
        };
        for &i in victims.iter().rev() {
            let mut a = self.active.remove(i);
            let _ = a.events.send(GenerationEvent::Rejected {
                id: a.id,
                error: error.clone(),
            });
            self.release(a.seq);
        }
    }
}

#[cfg(test)]
mod tests;
