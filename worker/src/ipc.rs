//! The worker's side of the router connection: three threads.
//!
//! - The reader (the caller of [`serve`]) reads frames and does only what takes no time:
//!   `Hello`, `Ping` (answered with `Pong` at once), `Abort` (see `Preparing`); everything
//!   else goes, in order, to the prepare thread.
//! - The prepare thread (`ipc-prepare`) renders chat templates, tokenizes prompts of up to a
//!   frame's size, parses grammars (llama.cpp's parser, on a large stack), submits to the engine, answers `Tokenize`/`Detokenize`, and passes `Drain`
//!   on after the requests that came before it. Nothing it does can delay an `Abort` or a
//!   `Ping`.
//! - The writer thread (`ipc-writer`) owns the socket's send half and turns engine events,
//!   progress and replies into frames. Generation events are held until the engine says its
//!   loop iteration ended ([`iteration_hook`]), so one iteration's acceptances, outputs and
//!   rejections become one `Events` frame, followed by that iteration's `Progress` (when it
//!   stepped or its load changed), in one write. Other frames (replies, `Pong`, rejections
//!   made before a request reaches the engine) go out at once and leave held events held.
//!
//! Logs: each request is prepared inside a `request` span carrying its `request_id` (the
//! HTTP `x-request-id` the router forwards) and protocol `id`, and its end (finish with usage
//! and timings, or rejection) is one `info` line in that span, from whichever thread sees it.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use llamapool_common::codec::{self, CodecError};
use llamapool_common::protocol::{
    ChatEnding, ChatPrompt, ControlCall, ControlReply, EmbedInput, FromWorker, GenerateRequest,
    Prompt, ToWorker, WorkerInfo, WorkerStats, PROTOCOL_VERSION,
};
use llamapool_common::{
    ChatDelta, Finish, FinishReason, GenerationEvent, GrammarTrigger, RequestError, RequestId,
    SamplingParams, SeqOutput, Timings, Token, ToolCallDelta, Usage,
};

use crate::backend::chat::{ChatParser, ParsedDiff, ParserParams, Rendered};
use crate::backend::Backend;
use crate::embed::{EmbedHandle, EmbedJob};
use crate::engine::{
    Disconnected, EngineHooks, EngineRequest, EngineStats, EventSender, IterationHook,
};
use crate::shape::{ShapeNow, Shaper};
use crate::{EngineHandle, Model, RunningEngine};

/// What the writer thread sends.
pub enum Outgoing {
    Event(GenerationEvent),
    /// A chat request's output parser, sent before the request reaches the engine: the writer
    /// parses that request's outputs until its final event.
    Parse(RequestId, ChatParser),
    /// Written at once; events held for the current iteration stay held.
    Frame(FromWorker),
    /// The engine finished a loop iteration: write the events it produced, then its progress
    /// (if it stepped or its load changed).
    IterationEnd(Option<WorkerStats>),
    /// The engine thread has ended, so no iteration end will come again: write what is held,
    /// and from now on each event at once (only `EngineHandle::submit`'s rejections remain).
    EngineStopped,
}

/// The writer's queue, as [`outbox`] makes it and [`serve`] takes it.
pub type Outbox = (Sender<Outgoing>, Receiver<Outgoing>);

/// The writer's queue; create it before the engine so the engine can be given
/// [`iteration_hook`] (as [`spawn_engine`] does).
pub fn outbox() -> Outbox {
    mpsc::channel()
}

/// Starts the engine thread over `backend` with this writer's [`iteration_hook`]; returns it
/// and the outbox to give [`serve`].
pub fn spawn_engine<B>(
    backend: B,
    shaper: Option<Shaper>,
) -> std::io::Result<(RunningEngine, Outbox)>
where
    B: Backend + Send + 'static,
{
    let outbox = outbox();
    let engine = RunningEngine::spawn_with(
        backend,
        EngineHooks {
            on_start: None,
            on_iteration_end: Some(iteration_hook(&outbox.0, shaper)),
        },
    )?;
    Ok((engine, outbox))
}

/// The engine's `on_iteration_end` hook for this writer: lets an adaptive worker's `shaper`
/// adjust its width and say whether it is packable, ends the iteration's batch of events, and
/// pushes `Progress` after every iteration that stepped or changed the load (running or
/// waiting) or shape, so also after the one in which the last request left. The engine
/// drops it when its thread ends, which tells the writer to stop holding events.
pub fn iteration_hook(out: &Sender<Outgoing>, mut shaper: Option<Shaper>) -> IterationHook {
    let hook = StopNotice(out.clone());
    // A fixed worker that has done nothing has nothing to report.
    let mut last = (0, 0, 0, ShapeNow::default());
    Box::new(move |stats: &EngineStats| {
        let shape = shaper
            .as_mut()
            .map(|s| s.tick(std::time::Instant::now()))
            .unwrap_or_default();
        let now = (stats.steps, stats.running, stats.waiting, shape);
        let progress = (now != last).then(|| progress(stats, shape));
        last = now;
        let _ = hook.0.send(Outgoing::IterationEnd(progress));
    })
}

/// Sends `EngineStopped` when the hook holding it is dropped.
struct StopNotice(Sender<Outgoing>);

impl Drop for StopNotice {
    fn drop(&mut self) {
        let _ = self.0.send(Outgoing::EngineStopped);
    }
}

/// The engine's stats as the router sees them.
fn progress(stats: &EngineStats, shape: ShapeNow) -> WorkerStats {
    let unix_ms = stats
        .last_step
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    WorkerStats {
        steps: stats.steps,
        last_step_unix_ms: unix_ms,
        running: u32::try_from(stats.running).unwrap_or(u32::MAX),
        waiting: u32::try_from(stats.waiting).unwrap_or(u32::MAX),
        decode_calls: stats.decode_calls,
        kv_cells_used: u32::try_from(stats.kv_cells).unwrap_or(u32::MAX),
        packable: shape.packable,
        wide: shape.wide,
        threads_in_use: shape.threads,
        shape_changes: shape.changes,
    }
}

/// What this worker serves requests with: its generation engine, or (an embedding worker)
/// its embedder.
#[derive(Debug, Clone)]
pub enum Service {
    Generation(EngineHandle),
    Embedding(EmbedHandle),
}

impl Service {
    /// Stops taking work; with `drain`, after what it has.
    pub fn shutdown(&self, drain: bool) {
        match self {
            Self::Generation(engine) => engine.shutdown(drain),
            Self::Embedding(embedder) => embedder.shutdown(drain),
        }
    }

    /// Cancels a generation request (an embedding call runs to its end: it is short).
    fn cancel(&self, id: RequestId) {
        if let Self::Generation(engine) = self {
            engine.cancel(id);
        }
    }
}

/// Serves one router connection until it closes. Returns how it ended.
pub fn serve<R, W>(
    recv: R,
    send: W,
    (out_tx, out_rx): Outbox,
    model: Model,
    service: &Service,
    info: &WorkerInfo,
) -> Result<(), CodecError>
where
    R: std::io::Read,
    W: Write + Send + 'static,
{
    let writer = std::thread::Builder::new()
        .name("ipc-writer".into())
        .spawn(move || write_loop(send, &out_rx))?;
    let preparing = Arc::new(Preparing::default());
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let preparer = Preparer {
        out: out_tx.clone(),
        service: service.clone(),
        preparing: preparing.clone(),
    };
    let prepare = std::thread::Builder::new()
        .name("ipc-prepare".into())
        .stack_size(PREPARE_STACK_BYTES)
        .spawn(move || preparer.run(&jobs_rx, model))?;
    let result = read_loop(recv, &out_tx, &jobs_tx, &preparing, service, info);
    // The router is gone or said goodbye: stop generating, skip what is still queued for
    // preparation, let the writer finish.
    service.shutdown(false);
    preparing.close();
    drop(jobs_tx);
    let _ = prepare.join();
    drop(out_tx);
    let _ = writer.join();
    result
}

/// The prepare thread's stack: it runs llama.cpp's grammar parser on clients' grammars, which
/// recurses once per nested group (bounded by `gbnf::MAX_NESTING`, with room to spare), and
/// which is better run out of stack here than on the engine thread.
pub const PREPARE_STACK_BYTES: usize = 64 << 20;

/// Set only by the poison-containment tests: a worker that gets a text prompt containing this
/// variable's value aborts, as a native crash (a GGML assert) would. Unset, nothing happens.
pub const TEST_POISON_ENV: &str = "LLAMAPOOL_TEST_POISON";

fn abort_on_test_poison(prompt: &Prompt) {
    static MARKER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let marker = MARKER.get_or_init(|| {
        std::env::var(TEST_POISON_ENV)
            .ok()
            .filter(|m| !m.is_empty())
    });
    if let (Some(marker), Prompt::Text(text)) = (marker, prompt) {
        if text.contains(marker.as_str()) {
            eprintln!("{TEST_POISON_ENV}: the prompt holds the test poison; aborting");
            std::process::abort();
        }
    }
}

/// What the reader hands to the prepare thread, in the order the frames came. (A job lives
/// only in that channel: boxing the large `Generate` would cost an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Job {
    Generate(GenerateRequest),
    Control { call: u64, body: ControlCall },
    Drain,
}

fn read_loop<R: std::io::Read>(
    recv: R,
    out: &Sender<Outgoing>,
    jobs: &Sender<Job>,
    preparing: &Preparing,
    service: &Service,
    info: &WorkerInfo,
) -> Result<(), CodecError> {
    let mut reader = BufReader::new(recv);
    let mut buf = Vec::new();
    let mut greeted = false;
    while let Some(message) = codec::read_frame::<ToWorker>(&mut reader, &mut buf)? {
        // The prepare thread outlives this loop, so sending to it cannot fail.
        match message {
            ToWorker::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    let message = format!("protocol version mismatch: router speaks {version}, worker speaks {PROTOCOL_VERSION}");
                    let _ = out.send(Outgoing::Frame(FromWorker::Fatal {
                        message: message.clone(),
                    }));
                    return Err(CodecError::Malformed(message));
                }
                greeted = true;
                let _ = out.send(Outgoing::Frame(FromWorker::Ready(info.clone())));
            }
            _ if !greeted => {
                return Err(CodecError::Malformed(
                    "the first message must be Hello".into(),
                ))
            }
            ToWorker::Ping { nonce } => {
                let _ = out.send(Outgoing::Frame(FromWorker::Pong { nonce }));
            }
            ToWorker::Abort { ids } => ids.into_iter().for_each(|id| preparing.abort(id, service)),
            ToWorker::Generate(request) => {
                preparing.insert(request.id);
                let _ = jobs.send(Job::Generate(request));
            }
            ToWorker::Control { call, body } => {
                let _ = jobs.send(Job::Control { call, body });
            }
            ToWorker::Drain => {
                let _ = jobs.send(Job::Drain);
            }
        }
    }
    Ok(())
}

/// The requests the reader has handed to the prepare thread that have not reached the engine
/// yet, each with whether an `Abort` came for it meanwhile.
///
/// The reader handles `Abort` at once, so an abort can overtake its own `Generate` while that
/// waits for or undergoes preparation; the abort must still win. The reader flags such an id
/// here instead of cancelling it in the engine, and the prepare thread checks the flag and
/// submits under the same lock: either it sees the flag (the request never reaches the
/// engine) or its `Submit` is already in the engine's command queue when the reader's `Cancel`
/// follows it, which the engine applies in order. The other design, the engine remembering
/// cancelled ids it did not know, would need a memory of every such id: the router also
/// aborts requests that already finished, and nothing says when an id may be forgotten. Here
/// an entry lives exactly as long as its preparation.
#[derive(Debug, Default)]
struct Preparing {
    ids: Mutex<HashMap<RequestId, bool>>,
    /// The connection has ended: nothing still queued for the prepare thread is wanted.
    closed: AtomicBool,
}

impl Preparing {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, bool>> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reader, before queuing a `Generate`.
    fn insert(&self, id: RequestId) {
        self.lock().entry(id).or_insert(false);
    }

    /// The reader, for each id of an `Abort`: flags a request still being prepared, cancels
    /// any other in the engine (which ignores ids it does not know).
    fn abort(&self, id: RequestId, service: &Service) {
        let mut preparing = self.lock();
        match preparing.get_mut(&id) {
            Some(aborted) => *aborted = true,
            None => service.cancel(id),
        }
    }

    /// The connection ended: every request still being prepared counts as aborted, and
    /// queued control calls are skipped (their replies could not be delivered).
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.lock().values_mut().for_each(|aborted| *aborted = true);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn is_aborted(&self, id: RequestId) -> bool {
        self.lock().get(&id).copied().unwrap_or(false)
    }

    /// The prepare thread: forgets `id` and runs `submit` unless it was aborted, under the
    /// lock (see the type's doc). Returns whether `submit` ran.
    fn submit_unless_aborted(&self, id: RequestId, submit: impl FnOnce()) -> bool {
        let mut preparing = self.lock();
        if preparing.remove(&id).unwrap_or(false) {
            return false;
        }
        submit();
        true
    }

    fn forget(&self, id: RequestId) {
        self.lock().remove(&id);
    }
}

/// The prepare thread's state.
struct Preparer {
    out: Sender<Outgoing>,
    service: Service,
    preparing: Arc<Preparing>,
}

impl Preparer {
    fn run(self, jobs: &Receiver<Job>, model: Model) {
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Generate(request) => {
                    let id = request.id;
                    let span = tracing::info_span!(
                        "request",
                        request_id = request.request_id.as_str(),
                        id = %id
                    );
                    let _in_span = span.enter();
                    // Aborted while it waited in the queue: skip the work.
                    let prepared = (!self.preparing.is_aborted(id)).then(|| match self.service {
                        Service::Generation(_) => engine_request(request, model),
                        Service::Embedding(_) => Err(RequestError::InvalidParam {
                            param: "model".into(),
                            message: "this worker serves embeddings, not generation".into(),
                        }),
                    });
                    self.hand_over(id, prepared);
                }
                Job::Control { .. } if self.preparing.is_closed() => {}
                Job::Control {
                    call,
                    body: ControlCall::Embed { input, normalize },
                } => self.embed(call, &input, normalize, model),
                Job::Control { call, body } => {
                    let reply = control(body, model);
                    let _ = self
                        .out
                        .send(Outgoing::Frame(FromWorker::Control { call, reply }));
                }
                Job::Drain => self.service.shutdown(true),
            }
        }
    }

    /// Gives a prepared generation request to the engine.
    fn submit(&self, request: EngineRequest, events: EventSender) {
        match &self.service {
            Service::Generation(engine) => engine.submit(request, events),
            Service::Embedding(_) => {
                unreachable!("an embedding worker refuses generation requests while preparing them")
            }
        }
    }

    /// Tokenizes and checks an embedding input and hands it to the embedder, which answers
    /// the call; a bad input is answered here.
    fn embed(&self, call: u64, input: &EmbedInput, normalize: i32, model: Model) {
        let refused = match &self.service {
            Service::Embedding(embedder) => match model
                .embedding_tokens(input)
                .and_then(|tokens| embedder.limits().check(tokens.len()).map(|()| tokens))
            {
                Ok(tokens) => {
                    let job = EmbedJob {
                        call,
                        tokens,
                        normalize,
                    };
                    match embedder.submit(job) {
                        Ok(()) => return,
                        Err(_) => RequestError::ShuttingDown,
                    }
                }
                Err(error) => error,
            },
            Service::Generation(_) => RequestError::InvalidParam {
                param: "input".into(),
                message: "this worker does not serve embeddings".into(),
            },
        };
        let reply = ControlReply::Refused(refused);
        let _ = self
            .out
            .send(Outgoing::Frame(FromWorker::Control { call, reply }));
    }

    /// Submits a prepared request unless it was aborted meanwhile. A request that does not
    /// reach the engine still gets its final event, in a frame of its own: `Rejected` when it
    /// could not be prepared, `Accepted` then a `Cancelled` finish when it was aborted (what
    /// the engine answers for a request cancelled while queued). The request's end is logged
    /// in the current span (`run` enters the request's).
    fn hand_over(
        &self,
        id: RequestId,
        prepared: Option<Result<(EngineRequest, Option<ChatParser>), RequestError>>,
    ) {
        let span = tracing::Span::current();
        let events = match prepared {
            Some(Ok((request, parser))) => {
                if let Some(parser) = parser {
                    // Before the request can produce an event; the writer drops it with the
                    // request's final event, wherever that comes from.
                    let _ = self.out.send(Outgoing::Parse(id, parser));
                }
                let tx = self.out.clone();
                let span = span.clone();
                let events = EventSender::new(move |event| {
                    if event.is_final() {
                        span.in_scope(|| log_end(&event));
                    }
                    tx.send(Outgoing::Event(event)).map_err(|_| Disconnected)
                });
                if self
                    .preparing
                    .submit_unless_aborted(id, || self.submit(request, events))
                {
                    return;
                }
                cancelled_before_start(id)
            }
            Some(Err(error)) => {
                self.preparing.forget(id);
                vec![GenerationEvent::Rejected { id, error }]
            }
            None => {
                self.preparing.forget(id);
                cancelled_before_start(id)
            }
        };
        span.in_scope(|| events.iter().filter(|e| e.is_final()).for_each(log_end));
        let _ = self.out.send(Outgoing::Frame(FromWorker::Events(events)));
    }
}

/// The one log line of a request's end, in its span: how it finished, its usage and the
/// worker's timings, or why it was rejected.
fn log_end(event: &GenerationEvent) {
    match event {
        GenerationEvent::Output(SeqOutput {
            finish: Some(finish),
            ..
        }) => tracing::info!(
            reason = match finish.reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "cancelled",
            },
            prompt_tokens = finish.usage.prompt_tokens,
            generated_tokens = finish.usage.completion_tokens,
            queue_ms = tenths(finish.timings.queue_ms),
            prompt_ms = tenths(finish.timings.prompt_ms),
            predicted_ms = tenths(finish.timings.predicted_ms),
            "request finished"
        ),
        GenerationEvent::Rejected { error, .. } => {
            tracing::info!(%error, "request rejected");
        }
        _ => {}
    }
}

/// Milliseconds to a tenth, for reading.
fn tenths(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// The events of a request aborted before it reached the engine.
fn cancelled_before_start(id: RequestId) -> Vec<GenerationEvent> {
    vec![
        GenerationEvent::Accepted { id },
        GenerationEvent::Output(SeqOutput::finished(
            id,
            Finish {
                reason: FinishReason::Cancelled,
                // Nothing of it was evaluated.
                usage: Usage::default(),
                timings: Timings::default(),
                stop_word: None,
            },
        )),
    ]
}

/// Turns the protocol's request into the engine's: the prompt tokenized (the slow part: a
/// chat template rendered, megabytes of text tokenized), a moved request's tokens appended.
/// A chat request also gets the parser of its output (see [`Parsers`]).
fn engine_request(
    request: GenerateRequest,
    model: Model,
) -> Result<(EngineRequest, Option<ChatParser>), RequestError> {
    abort_on_test_poison(&request.prompt);
    let mut sampling = request.sampling;
    let mut stopping = request.stopping;
    let mut special_tokens = Vec::new();
    let mut parser = None;
    let mut prompt = match request.prompt {
        Prompt::Text(text) => model.tokenize(&text, true),
        Prompt::Tokens(tokens) => tokens,
        Prompt::Chat(chat) => {
            // Converted here first, so that a schema llama.cpp cannot use is an error naming
            // its field; the chat code converts it again, with the format's grammar.
            let schema = sampling.json_schema.as_ref();
            if let Some(schema) = schema {
                model.schema_grammar(schema)?;
            }
            let rendered = model.render_chat(&chat, schema.map(|s| s.text.as_str()))?;
            let tokens = model.tokenize(&rendered.prompt, true);
            sampling.json_schema = None;
            special_tokens = chat_constraints(&rendered, model, &mut sampling)?;
            stopping
                .stop
                .extend(rendered.additional_stops.iter().cloned());
            parser = Some(output_parser(&rendered, &chat, &request.resumed, model)?);
            tokens
        }
    };
    if let Some(schema) = sampling.json_schema.take() {
        let grammar = model.schema_grammar(&schema)?;
        model.check_generated_grammar(&grammar, &[])?;
        sampling.grammar = Some(grammar);
    } else if let Some(grammar) = &sampling.grammar {
        // Parsed here first, so the engine thread (which parses it again to build the
        // request's sampler, while every sequence batched with it waits) sees only grammars
        // that parsed. A grammar the chat code made was checked with its triggers.
        if sampling.grammar_triggers.is_empty() && sampling.grammar_prefill.is_empty() {
            model.check_grammar(grammar)?;
        }
    }
    for (text, bias) in std::mem::take(&mut sampling.logit_bias_text) {
        let tokens = model.tokenize(&text, false);
        sampling
            .logit_bias
            .extend(tokens.into_iter().map(|t| (t, bias)));
    }
    let resumed = request.resumed.len();
    if resumed > 0 {
        // Continue a generation another worker started: what it produced becomes prompt, and
        // counts against max_tokens.
        let done = u32::try_from(resumed).unwrap_or(u32::MAX);
        stopping.max_tokens = stopping.max_tokens.map(|m| m.saturating_sub(done).max(1));
        prompt.extend(request.resumed);
    }
    let request = EngineRequest {
        id: request.id,
        prompt,
        sampling,
        stopping,
        resumed,
        // A resumed request is past its prompt for the client: its first tokens were sent.
        report_progress: request.report_progress && resumed == 0,
        special_tokens,
    };
    Ok((request, parser))
}

/// What a chat rendering asks of sampling, as llama-server applies it: its grammar (tool calls,
/// a schema) with the lazy triggers (a trigger word that is one token becomes a token trigger)
/// or, for an eager one, the assistant opening to prefill; returns the tokens to keep as text
/// (the preserved tokens that are one token each).
fn chat_constraints(
    rendered: &Rendered,
    model: Model,
    sampling: &mut SamplingParams,
) -> Result<Vec<Token>, RequestError> {
    let preserved = model.single_tokens(&rendered.preserved_tokens);
    if rendered.grammar.is_empty() {
        return Ok(preserved.into_iter().map(|(_, t)| t).collect());
    }
    if sampling.grammar.is_some() {
        return Err(RequestError::InvalidParam {
            param: "grammar".into(),
            message: "Cannot use custom grammar constraints with tools.".into(),
        });
    }
    let mut triggers = Vec::new();
    if rendered.grammar_lazy {
        for trigger in &rendered.grammar_triggers {
            triggers.push(match trigger.kind {
                TRIGGER_TOKEN => {
                    GrammarTrigger::Token(Token::try_from(trigger.token).unwrap_or_default())
                }
                TRIGGER_WORD => match preserved.iter().find(|(text, _)| *text == trigger.value) {
                    Some((_, token)) => GrammarTrigger::Token(*token),
                    None => GrammarTrigger::Pattern(regex_escape(&trigger.value)),
                },
                TRIGGER_PATTERN_FULL => GrammarTrigger::Pattern(anchored(&trigger.value)),
                _ => GrammarTrigger::Pattern(trigger.value.clone()),
            });
        }
    } else if !rendered.generation_prompt.is_empty() {
        sampling.grammar_prefill = prefill_tokens(&rendered.generation_prompt, model);
    }
    tracing::debug!(
        format = rendered.format,
        grammar_bytes = rendered.grammar.len(),
        lazy = rendered.grammar_lazy,
        triggers = triggers.len(),
        prefill = sampling.grammar_prefill.len(),
        "the chat format constrains the output"
    );
    tracing::trace!(grammar = %rendered.grammar, "the chat format's grammar");
    model.check_generated_grammar(&rendered.grammar, &triggers)?;
    sampling.grammar = Some(rendered.grammar.clone());
    sampling.grammar_triggers = triggers;
    Ok(preserved.into_iter().map(|(_, t)| t).collect())
}

/// `common_grammar_trigger`'s types.
const TRIGGER_TOKEN: i64 = 0;
const TRIGGER_WORD: i64 = 1;
const TRIGGER_PATTERN_FULL: i64 = 3;

/// A regular expression matching `word` literally (llama.cpp's `regex_escape`).
fn regex_escape(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if ".^$|()*+?[]{}\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A pattern the whole output must match (llama.cpp anchors it).
fn anchored(pattern: &str) -> String {
    if pattern.is_empty() {
        return "^$".into();
    }
    let start = if pattern.starts_with('^') { "" } else { "^" };
    let end = if pattern.ends_with('$') { "" } else { "$" };
    format!("{start}{pattern}{end}")
}

/// The assistant opening's tokens as llama-server prefills them into a grammar: special tokens
/// parsed, a first token that only adds a leading space dropped.
fn prefill_tokens(generation_prompt: &str, model: Model) -> Vec<Token> {
    let tokens = model.tokenize(generation_prompt, false);
    let starts_with_space = generation_prompt.starts_with(char::is_whitespace);
    tokens
        .into_iter()
        .enumerate()
        .filter(|&(i, t)| {
            let piece = model.piece(t);
            !(i == 0 && piece.first().is_some_and(u8::is_ascii_whitespace) && !starts_with_space)
        })
        .map(|(_, t)| t)
        .collect()
}

/// The parser of a chat request's output. A moved request's text so far is fed first, so it
/// reports only what comes after.
fn output_parser(
    rendered: &Rendered,
    chat: &ChatPrompt,
    resumed: &[Token],
    model: Model,
) -> Result<ChatParser, RequestError> {
    let mut parser = ChatParser::new(&ParserParams {
        format: rendered.format,
        reasoning_format: chat.reasoning.format.name().into(),
        reasoning_in_content: false,
        generation_prompt: rendered.generation_prompt.clone(),
        parse_tool_calls: true,
        is_continuation: chat.ending == ChatEnding::ContinueFinal,
        parser: rendered.parser.clone(),
    })
    .map_err(RequestError::ChatTemplate)?;
    if !resumed.is_empty() {
        let _already_sent = parser.feed(&model.detokenize(resumed), true);
    }
    Ok(parser)
}

fn control(call: ControlCall, model: Model) -> ControlReply {
    match call {
        ControlCall::Tokenize {
            content,
            add_special,
            with_pieces,
        } => {
            let tokens = model.tokenize(&content, add_special);
            let pieces = with_pieces.then(|| tokens.iter().map(|&t| model.piece(t)).collect());
            ControlReply::Tokenized { tokens, pieces }
        }
        ControlCall::Detokenize { tokens } => {
            match tokens.iter().find(|&&t| !model.is_valid_token(t)) {
                Some(&token) => ControlReply::Failed {
                    message: RequestError::InvalidToken {
                        token,
                        n_vocab: model.info().n_vocab,
                    }
                    .to_string(),
                },
                None => ControlReply::Detokenized {
                    content: model.detokenize(&tokens),
                },
            }
        }
        ControlCall::ApplyTemplate { chat } => match model.render_chat(&chat, None) {
            Ok(rendered) => ControlReply::Rendered {
                prompt: rendered.prompt,
            },
            Err(e) => ControlReply::Failed {
                message: e.to_string(),
            },
        },
        ControlCall::Embed { .. } => {
            unreachable!("the prepare thread hands embedding calls to Preparer::embed")
        }
    }
}

/// The output parsers of the chat requests in flight, owned by the writer thread: parsing
/// re-reads a request's whole text per output (llama.cpp's parser is not incremental), work
/// kept off the engine thread. A request's parser goes with its final event.
#[derive(Default)]
struct Parsers(HashMap<RequestId, Parsing>);

/// One request's parse: its parser, the raw text so far, whether the parser reported anything.
struct Parsing {
    parser: ChatParser,
    text: String,
    reported: bool,
}

impl Parsers {
    fn insert(&mut self, id: RequestId, parser: ChatParser) {
        let parsing = Parsing {
            parser,
            text: String::new(),
            reported: false,
        };
        self.0.insert(id, parsing);
    }

    /// Fills a parsed request's output with what its text changed; ends the parse with the
    /// request. Output the chat format's parser cannot read (a small model strays from the
    /// format) is the answer's plain content, unless part of it was already reported.
    fn parse(&mut self, event: &mut GenerationEvent) {
        let id = event.id();
        let Some(parsing) = self.0.get_mut(&id) else {
            return;
        };
        if let GenerationEvent::Output(output) = event {
            output.parsed = true;
            if output.progress.is_none() {
                let partial = output.finish.is_none();
                parsing.text.push_str(&output.text);
                match parsing.parser.feed(&output.text, partial) {
                    Ok(diffs) => {
                        parsing.reported |= !diffs.is_empty();
                        output.chat = diffs.into_iter().map(chat_delta).collect();
                    }
                    Err(message) if partial => {
                        tracing::debug!(%id, %message, "the output does not parse yet");
                    }
                    Err(message) => {
                        tracing::warn!(%id, %message, "the output does not match the chat format");
                        if !parsing.reported {
                            output.chat = vec![ChatDelta {
                                content: std::mem::take(&mut parsing.text),
                                ..ChatDelta::default()
                            }];
                        }
                    }
                }
            }
        }
        if event.is_final() {
            self.0.remove(&id);
        }
    }
}

/// llama.cpp's diff in the protocol's terms.
fn chat_delta(diff: ParsedDiff) -> ChatDelta {
    ChatDelta {
        reasoning: diff.reasoning_content_delta,
        content: diff.content_delta,
        tool_call: diff
            .tool_call_index
            .zip(diff.tool_call_delta)
            .map(|(index, call)| ToolCallDelta {
                index,
                id: call.id,
                name: call.name,
                arguments: call.arguments,
            }),
    }
}

fn write_loop<W: Write>(mut send: W, rx: &Receiver<Outgoing>) {
    let mut wire = Vec::new();
    let mut events = Vec::new();
    let mut parsers = Parsers::default();
    // While the engine runs, its events wait for the end of their iteration.
    let mut batching = true;
    while let Ok(item) = rx.recv() {
        match item {
            Outgoing::Event(mut event) => {
                parsers.parse(&mut event);
                events.push(event);
                if batching {
                    continue;
                }
                flush_events(&mut events, &mut wire);
            }
            Outgoing::Parse(id, parser) => parsers.insert(id, parser),
            Outgoing::Frame(FromWorker::Events(mut frame_events)) => {
                frame_events.iter_mut().for_each(|e| parsers.parse(e));
                encode(&FromWorker::Events(frame_events), &mut wire);
            }
            Outgoing::Frame(frame) => encode(&frame, &mut wire),
            Outgoing::IterationEnd(progress) => {
                flush_events(&mut events, &mut wire);
                if let Some(stats) = progress {
                    encode(&FromWorker::Progress(stats), &mut wire);
                }
            }
            Outgoing::EngineStopped => {
                batching = false;
                flush_events(&mut events, &mut wire);
            }
        }
        if wire.is_empty() {
            continue;
        }
        if send.write_all(&wire).and_then(|()| send.flush()).is_err() {
            return; // the router is gone; the reader sees EOF and shuts the engine down
        }
        wire.clear();
    }
}

fn flush_events(events: &mut Vec<GenerationEvent>, wire: &mut Vec<u8>) {
    if !events.is_empty() {
        encode(&FromWorker::Events(std::mem::take(events)), wire);
    }
}

fn encode(frame: &FromWorker, wire: &mut Vec<u8>) {
    let Err(e) = codec::encode_into(frame, wire) else {
        return;
    };
    // A control reply too large for a frame (say, detokenizing millions of tokens) still gets
    // an answer; anything else is a bug worth a log line, and the connection stays intact.
    if let FromWorker::Control { call, .. } = frame {
        let failed = FromWorker::Control {
            call: *call,
            reply: ControlReply::Failed {
                message: format!("the reply cannot be sent: {e}"),
            },
        };
        if codec::encode_into(&failed, wire).is_ok() {
            return;
        }
    }
    tracing::error!(error = %e, "dropping a frame that cannot be encoded");
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use llamapool_common::{SamplingParams, StoppingParams};

    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::backend::BackendLimits;

    fn output(id: u64, text: &str) -> GenerationEvent {
        GenerationEvent::Output(SeqOutput {
            id: RequestId(id),
            tokens: vec![1],
            text: text.into(),
            finish: None,
            logprobs: Vec::new(),
            progress: None,
            parsed: false,
            chat: Vec::new(),
        })
    }

    fn accepted(id: u64) -> GenerationEvent {
        GenerationEvent::Accepted { id: RequestId(id) }
    }

    fn stats(steps: u64, running: u32, waiting: u32) -> WorkerStats {
        WorkerStats {
            steps,
            last_step_unix_ms: 1_000 * steps,
            running,
            waiting,
            decode_calls: steps,
            kv_cells_used: 0,
            ..WorkerStats::default()
        }
    }

    /// The bytes of each `write_all` + `flush` the writer made.
    #[derive(Default)]
    struct Writes {
        current: Vec<u8>,
        done: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.current.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            let write = std::mem::take(&mut self.current);
            self.done.lock().unwrap().push(write);
            Ok(())
        }
    }

    fn frames_of(mut bytes: &[u8]) -> Vec<FromWorker> {
        let mut frames = Vec::new();
        while let Some(frame) = codec::read_frame::<FromWorker>(&mut bytes, &mut Vec::new())
            .expect("the writer writes whole frames")
        {
            frames.push(frame);
        }
        frames
    }

    /// Runs the writer over `items`; returns the frames of each write.
    fn written(items: Vec<Outgoing>) -> Vec<Vec<FromWorker>> {
        let (tx, rx) = outbox();
        for item in items {
            tx.send(item).unwrap();
        }
        drop(tx);
        let writes = Writes::default();
        let done = writes.done.clone();
        write_loop(writes, &rx);
        let done = done.lock().unwrap();
        done.iter().map(|w| frames_of(w)).collect()
    }

    #[test]
    fn an_iteration_is_one_write_its_events_then_its_progress_and_other_frames_go_at_once() {
        let rejected = GenerationEvent::Rejected {
            id: RequestId(3),
            error: RequestError::ShuttingDown,
        };
        let reply = FromWorker::Control {
            call: 9,
            reply: ControlReply::Detokenized {
                content: "x".into(),
            },
        };
        let pong = FromWorker::Pong { nonce: 5 };
        let writes = written(vec![
            Outgoing::Event(accepted(1)),
            Outgoing::Event(output(1, "a")),
            Outgoing::IterationEnd(Some(stats(1, 1, 0))),
            Outgoing::Event(output(1, "b")),
            // Mid-iteration frames go out at once; the held event stays held.
            Outgoing::Frame(reply.clone()),
            Outgoing::Frame(pong.clone()),
            Outgoing::Event(accepted(2)),
            Outgoing::IterationEnd(Some(stats(2, 1, 1))),
            // An iteration without a step or load change: events only; without events: nothing.
            Outgoing::Event(output(1, "c")),
            Outgoing::IterationEnd(None),
            Outgoing::IterationEnd(None),
            Outgoing::IterationEnd(Some(stats(3, 0, 0))),
            Outgoing::EngineStopped,
            Outgoing::Event(rejected.clone()),
        ]);
        assert_eq!(
            writes,
            vec![
                vec![
                    FromWorker::Events(vec![accepted(1), output(1, "a")]),
                    FromWorker::Progress(stats(1, 1, 0)),
                ],
                vec![reply],
                vec![pong],
                vec![
                    FromWorker::Events(vec![output(1, "b"), accepted(2)]),
                    FromWorker::Progress(stats(2, 1, 1)),
                ],
                vec![FromWorker::Events(vec![output(1, "c")])],
                vec![FromWorker::Progress(stats(3, 0, 0))],
                vec![FromWorker::Events(vec![rejected])],
            ]
        );
    }

    #[test]
    fn the_hook_pushes_progress_when_the_engine_stepped_or_its_load_changed() {
        let (tx, rx) = outbox();
        let mut hook = iteration_hook(&tx, None);
        let at = |steps: u64, running: usize, waiting: usize| EngineStats {
            steps,
            running,
            waiting,
            decode_calls: steps,
            last_step: (steps > 0)
                .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(1_000 * steps)),
            ..EngineStats::default()
        };
        // Idle (a rejection only); queued; a step; another; the last request cancelled; idle.
        for s in [
            at(0, 0, 0),
            at(0, 0, 1),
            at(1, 1, 0),
            at(2, 1, 0),
            at(2, 0, 0),
            at(2, 0, 0),
        ] {
            hook(&s);
        }
        drop(hook);
        let mut items: Vec<Outgoing> = rx.try_iter().collect();
        assert!(
            matches!(items.pop(), Some(Outgoing::EngineStopped)),
            "dropping the hook says the engine is gone"
        );
        let sent: Vec<Option<WorkerStats>> = items
            .into_iter()
            .map(|item| match item {
                Outgoing::IterationEnd(progress) => progress,
                _ => panic!("the hook sends iteration ends only"),
            })
            .collect();
        let mut queued = stats(0, 0, 1);
        queued.last_step_unix_ms = 0;
        assert_eq!(
            sent,
            vec![
                None,
                Some(queued),
                Some(stats(1, 1, 0)),
                Some(stats(2, 1, 0)),
                Some(stats(2, 0, 0)),
                None,
            ]
        );
    }

    fn fake_engine() -> RunningEngine {
        // Room for far more tokens than the engine can make before a test's abort lands (the
        // fake backend steps in microseconds).
        RunningEngine::spawn(FakeBackend::new(BackendLimits {
            n_batch: 16,
            n_seq_max: 2,
            n_ctx_per_seq: 1 << 20,
            n_vocab: 100,
        }))
        .unwrap()
    }

    const MANY_TOKENS: u32 = 1 << 19;

    fn prepared(id: u64) -> Option<Result<(EngineRequest, Option<ChatParser>), RequestError>> {
        let request = EngineRequest {
            id: RequestId(id),
            prompt: vec![1, 2, 3],
            sampling: SamplingParams::greedy(),
            stopping: StoppingParams {
                max_tokens: Some(MANY_TOKENS),
                ignore_eos: true,
                ..StoppingParams::default()
            },
            resumed: 0,
            report_progress: false,
            special_tokens: Vec::new(),
        };
        Some(Ok((request, None)))
    }

    /// Every event for `id` until its final one (engine events and whole frames alike).
    fn events_of(rx: &Receiver<Outgoing>, id: u64) -> Vec<GenerationEvent> {
        let mut events = Vec::new();
        while !events.last().is_some_and(GenerationEvent::is_final) {
            let item = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a final event");
            let batch = match item {
                Outgoing::Event(event) => vec![event],
                Outgoing::Frame(FromWorker::Events(batch)) => batch,
                _ => Vec::new(),
            };
            events.extend(batch.into_iter().filter(|e| e.id() == RequestId(id)));
        }
        events
    }

    #[test]
    fn an_abort_that_overtakes_its_request_during_preparation_wins() {
        let engine = fake_engine();
        let (out, rx) = outbox();
        let preparer = Preparer {
            out,
            service: Service::Generation(engine.handle.clone()),
            preparing: Arc::new(Preparing::default()),
        };
        let preparing = preparer.preparing.clone();
        let service = preparer.service.clone();
        let h = &engine.handle;

        // Aborted while being prepared: never submitted, answered as cancelled.
        preparing.insert(RequestId(1));
        preparing.abort(RequestId(1), &service);
        assert!(preparing.is_aborted(RequestId(1)));
        preparer.hand_over(RequestId(1), prepared(1));
        assert_eq!(events_of(&rx, 1), cancelled_before_start(RequestId(1)));
        let stats = h.stats().unwrap();
        assert_eq!(
            (stats.steps, stats.running, stats.waiting),
            (0, 0, 0),
            "the engine never saw it"
        );

        // Aborted while queued, so never prepared (`None`): the same.
        preparing.insert(RequestId(2));
        preparing.abort(RequestId(2), &service);
        preparer.hand_over(RequestId(2), None);
        assert_eq!(events_of(&rx, 2), cancelled_before_start(RequestId(2)));
        assert_eq!(h.stats().unwrap().steps, 0);

        // Aborted after its submission: the engine cancels it.
        preparing.insert(RequestId(3));
        preparer.hand_over(RequestId(3), prepared(3));
        preparing.abort(RequestId(3), &service);
        let events = events_of(&rx, 3);
        assert_eq!(events[0], accepted(3));
        match events.last() {
            Some(GenerationEvent::Output(SeqOutput {
                finish: Some(finish),
                ..
            })) => {
                assert_eq!(finish.reason, FinishReason::Cancelled);
                assert!(finish.usage.completion_tokens < MANY_TOKENS);
            }
            other => panic!("expected a cancelled finish, got {other:?}"),
        }

        // A request that could not be prepared is rejected; nothing is left behind.
        preparing.insert(RequestId(4));
        preparer.hand_over(RequestId(4), Some(Err(RequestError::EmptyPrompt)));
        assert_eq!(
            events_of(&rx, 4),
            vec![GenerationEvent::Rejected {
                id: RequestId(4),
                error: RequestError::EmptyPrompt
            }]
        );
        assert!(preparing.lock().is_empty());
        // Unknown ids go to the engine, which ignores them.
        preparing.abort(RequestId(99), &service);
        assert_eq!(h.stats().unwrap().running, 0);
        drop(preparer);
        engine.stop(false);
    }

    #[test]
    fn the_end_of_the_connection_aborts_what_is_still_being_prepared() {
        let preparing = Preparing::default();
        preparing.insert(RequestId(1));
        preparing.insert(RequestId(2));
        preparing.close();
        assert!(preparing.is_closed());
        assert!(preparing.is_aborted(RequestId(1)) && preparing.is_aborted(RequestId(2)));
        assert!(!preparing.submit_unless_aborted(RequestId(1), || panic!("submitted")));
        assert!(preparing.submit_unless_aborted(RequestId(7), || {}));
    }
}
