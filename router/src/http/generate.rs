//! Chat and text completions: admit against a bounded capacity (429 when full), then parse,
//! dispatch to the pool, and wait for the worker to accept or reject before committing to a
//! status. After that, a non-streamed request collects its text; a streamed one is fed to an
//! SSE response by a producer task, and errors become an SSE `{"error": ...}` event.
//!
//! A stream whose client stops taking events is aborted after `server.write_timeout_secs`
//! ([`StreamSink`]), so a client that never reads cannot keep a slot and a permit forever.
//!
//! Each request runs in its `request` span ([`RequestLog`]), a stream's producer task too; the
//! request's `x-request-id` goes to the worker in the `GenerateRequest`.
//!
//! Several choices (`n` > 1) fan out here, in the router: `n` independent `GenerateRequest`s
//! ([`choice_requests`]: the same prompt, ids of their own, a seeded request's seed + the
//! choice's index), each holding one admission permit (a choice occupies a sequence like any
//! request; 429 when the pool cannot take all `n`), each submitted through `Pool::submit`, so
//! they may run on different workers. The response is committed once every choice was
//! accepted; their outputs are merged as they come ([`Choices`]), and the first failure ends
//! the whole request (the other choices are aborted).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{Stream, StreamExt};
use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::{Finish, RequestId, SeqOutput};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::native;
use super::request_id::XRequestId;
use super::request_log::RequestLog;
use super::{LimitedBody, SharedState};
use crate::dispatch::{RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::logprobs::Logprobs;
use crate::openai::request::{parse_generation, StreamReports};
use crate::openai::response::{sum_usage, with_index, RunningTimings};
use crate::openai::{Endpoint, Envelope};

/// `POST /v1/chat/completions` (and `/chat/completions`).
pub async fn chat(
    State(state): State<SharedState>,
    XRequestId(request_id): XRequestId,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    generate(&state, request_id, &body, Endpoint::Chat).await
}

/// `POST /v1/completions` (and `/completions`).
pub async fn completions(
    State(state): State<SharedState>,
    XRequestId(request_id): XRequestId,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    generate(&state, request_id, &body, Endpoint::Completions).await
}

/// [`respond`] in the request's span; an error response ends the request's log.
async fn generate(
    state: &SharedState,
    request_id: String,
    body: &[u8],
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let log = RequestLog::start(endpoint, &request_id);
    let span = log.span().clone();
    let mut log = Some(log);
    let result = respond(state, request_id, body, endpoint, &mut log)
        .instrument(span)
        .await;
    if let (Err(error), Some(log)) = (&result, log.as_mut()) {
        log.failed(error);
    }
    result
}

/// Admits, parses, dispatches and answers. A stream takes `log` to its producer task; else
/// it stays with the caller, who drops it (writing its line) when the handler ends or is
/// dropped.
async fn respond(
    state: &SharedState,
    request_id: String,
    body: &[u8],
    endpoint: Endpoint,
    log: &mut Option<RequestLog>,
) -> Result<Response, ApiError> {
    let timer = RequestTimer::start(state.pool.metrics().clone());
    // The permit first: parsing a large body (a token array) costs many times its size.
    let mut permit = state.admit()?;
    let id = RequestId(state.next_id.fetch_add(1, Ordering::Relaxed));
    let mut valid = parse_generation(body, endpoint, &state.served, id)?;
    valid.generate.request_id = request_id;
    let total = valid.total_choices();
    // One permit per choice: each takes a sequence of its own.
    state.admit_more(&mut permit, total - 1)?;
    let wants_logprobs = valid.generate.sampling.logprobs.is_some();
    let mut logprobs: Vec<Logprobs> = (0..total)
        .map(|_| Logprobs::new(endpoint, wants_logprobs))
        .collect();
    let verbose = valid.verbose.then(|| {
        let stopping = &valid.generate.stopping;
        let settings = native::generation_settings(
            &valid.generate.sampling,
            stopping,
            false,
            &native::ignored_eog(state, stopping),
        );
        (settings, valid.generate.prompt.clone())
    });
    let requests = choice_requests(valid.generate, valid.n, valid.more_prompts, &state.next_id);
    // Committed to a status only once a worker accepted every choice; a refusal drops (and
    // so aborts) the choices already accepted.
    let handles = state.pool.submit_all(requests).await?;
    let timers = choice_timers(state, timer, handles.len());
    let served_by = workers_header(&handles);
    let mut choices = Choices::new(handles, timers, valid.n as usize);
    let envelope = Envelope::new(endpoint, &state.served.alias);
    if valid.stream {
        let (sink, body) = sse_channel(state);
        let mut log = log.take().expect("only a stream takes the log");
        log.on_worker(choices.first_worker);
        log.committed(200);
        tokio::spawn(
            feed_stream(
                choices,
                envelope,
                StreamExtras {
                    include_usage: valid.include_usage,
                    reports: valid.reports,
                },
                logprobs,
                sink,
                permit,
                log,
            )
            .instrument(tracing::Span::current()),
        );
        Ok((served_by, body).into_response())
    } else {
        let log = log.as_mut().expect("a non-streamed request keeps its log");
        log.on_worker(choices.first_worker);
        let texts = collect(&mut choices, &mut logprobs, log).await?;
        log.finished(&choices.total());
        drop(permit);
        let served_by = workers_header_of(&choices.last_workers);
        let body: Vec<(String, Finish)> = texts.into_iter().zip(choices.finishes()).collect();
        let mut json = envelope.response_choices(&body, choices.per_prompt);
        if wants_logprobs {
            for (index, lp) in logprobs.iter_mut().enumerate() {
                json["choices"][index]["logprobs"] = lp.take();
            }
        }
        if let (Some((settings, prompt)), Some((text, finish))) = (verbose, body.first()) {
            let worker = choices.last_workers.first().copied().unwrap_or(0);
            let slot = native::first_slot_of(state, worker).unwrap_or(0);
            let prompt = native::prompt_text(state, prompt).await;
            json["__verbose"] =
                native::verbose_result(&state.served.alias, settings, prompt, slot, text, finish);
        }
        Ok((served_by, Json(json)).into_response())
    }
}

/// The requests of one HTTP request, prompt-major: `n` for `first`'s prompt, then `n` for
/// each of `more_prompts` (OpenAI's batch). The first is `first`; the others are copies with
/// their prompt, ids of their own (taken from `next_id` in one block) and, when seeded, the
/// seed + the choice's index within its prompt, so that a seeded request is reproducible
/// (alone or in a batch) and its choices still differ when sampling.
pub(super) fn choice_requests(
    first: GenerateRequest,
    n: u32,
    more_prompts: Vec<Prompt>,
    next_id: &AtomicU64,
) -> Vec<GenerateRequest> {
    let total = n as usize * (1 + more_prompts.len());
    let mut requests = Vec::with_capacity(total);
    if total > 1 {
        let mut next = next_id.fetch_add(total as u64 - 1, Ordering::Relaxed);
        let prompts = std::iter::once(None).chain(more_prompts.into_iter().map(Some));
        for (p, prompt) in prompts.enumerate() {
            for index in 0..n {
                if p == 0 && index == 0 {
                    continue;
                }
                let mut request = first.clone();
                if let Some(prompt) = &prompt {
                    request.prompt = prompt.clone();
                }
                request.id = RequestId(next);
                next += 1;
                request.sampling.seed = first.sampling.seed.map(|s| s.wrapping_add(index));
                requests.push(request);
            }
        }
    }
    requests.insert(0, first);
    requests
}

/// One metrics timer per choice: `first` (started when the request came in), then fresh ones.
pub(super) fn choice_timers(
    state: &SharedState,
    first: RequestTimer,
    choices: usize,
) -> Vec<RequestTimer> {
    std::iter::once(first)
        .chain((1..choices).map(|_| RequestTimer::start(state.pool.metrics().clone())))
        .collect()
}

/// One output of one choice, or the error that ended it.
struct ChoiceEvent {
    index: usize,
    worker: usize,
    output: Result<SeqOutput, ApiError>,
}

/// One choice's outputs until its finish or error; dropping it unfinished aborts the request.
fn choice_events(index: usize, handle: RequestHandle) -> BoxStream<'static, ChoiceEvent> {
    futures_util::stream::unfold(Some(handle), move |handle| async move {
        let mut handle = handle?;
        let output = next_output(&mut handle).await;
        let worker = handle.worker();
        let more = match &output {
            Ok(o) if o.finish.is_some() => {
                handle.guard.finished();
                false
            }
            Ok(_) => true,
            Err(_) => false,
        };
        let event = ChoiceEvent {
            index,
            worker,
            output,
        };
        Some((event, more.then_some(handle)))
    })
    .boxed()
}

/// The choices of one request as they progress: their outputs merged in arrival order, each
/// choice's metrics timer, and the finishes so far. Dropping it aborts the unfinished ones.
struct Choices {
    events: SelectAll<BoxStream<'static, ChoiceEvent>>,
    timers: Vec<Option<RequestTimer>>,
    finishes: Vec<Option<Finish>>,
    /// The worker of each choice's last output (or where it was accepted).
    last_workers: Vec<usize>,
    first_worker: usize,
    /// Choices for each prompt (`n`): a batch of prompts is prompt-major.
    per_prompt: usize,
}

impl Choices {
    fn new(handles: Vec<RequestHandle>, timers: Vec<RequestTimer>, per_prompt: usize) -> Self {
        let last_workers: Vec<usize> = handles.iter().map(RequestHandle::worker).collect();
        Self {
            per_prompt,
            first_worker: last_workers[0],
            finishes: vec![None; handles.len()],
            timers: timers.into_iter().map(Some).collect(),
            events: futures_util::stream::select_all(
                handles
                    .into_iter()
                    .enumerate()
                    .map(|(index, handle)| choice_events(index, handle)),
            ),
            last_workers,
        }
    }

    fn len(&self) -> usize {
        self.finishes.len()
    }

    /// The next output of any choice, as (choice index, output); `None` once every choice
    /// finished. Cancel-safe: the merged streams keep their state between calls.
    async fn next(&mut self, log: &mut RequestLog) -> Option<Result<(usize, SeqOutput), ApiError>> {
        let event = self.events.next().await?;
        let output = match event.output {
            Ok(output) => output,
            Err(error) => return Some(Err(error)),
        };
        self.last_workers[event.index] = event.worker;
        log.on_output(&output, event.worker);
        if let Some(timer) = self.timers[event.index].as_mut() {
            timer.on_output(&output);
        }
        if let Some(finish) = &output.finish {
            if let Some(timer) = self.timers[event.index].take() {
                timer.finish();
            }
            self.finishes[event.index] = Some(finish.clone());
        }
        Some(Ok((event.index, output)))
    }

    /// Every choice's finish, in index order (once [`Choices::next`] returned `None`).
    fn finishes(&self) -> Vec<Finish> {
        self.finishes
            .iter()
            .map(|f| f.clone().expect("every choice finished"))
            .collect()
    }

    /// The whole request's finish: the first choice's reason and timings, usage summed
    /// ([`sum_usage`]); a cancelled choice makes it cancelled.
    fn total(&self) -> Finish {
        let finishes = self.finishes();
        let mut total = finishes[0].clone();
        total.usage = sum_usage(finishes.iter().map(|f| &f.usage), self.per_prompt);
        if let Some(cancelled) = finishes
            .iter()
            .find(|f| f.reason == llamapool_common::FinishReason::Cancelled)
        {
            total.reason = cancelled.reason;
        }
        total
    }
}

/// `x-llamapool-worker` for the accepted choices: one id, or several joined by commas.
fn workers_header(handles: &[RequestHandle]) -> [(&'static str, String); 1] {
    let workers: Vec<usize> = handles.iter().map(RequestHandle::worker).collect();
    workers_header_of(&workers)
}

fn workers_header_of(workers: &[usize]) -> [(&'static str, String); 1] {
    let ids: Vec<String> = workers.iter().map(usize::to_string).collect();
    [("x-llamapool-worker", ids.join(","))]
}

/// `x-llamapool-worker`: the worker that accepted a stream, or finished a request (a moved
/// request ends on another worker than it started on).
pub(super) fn worker_header(worker: usize) -> [(&'static str, String); 1] {
    [("x-llamapool-worker", worker.to_string())]
}

/// The next output of a request, or the error that ended it (then nothing is left to abort).
/// A worker that takes over a moved request accepts it again: that is no output.
/// Cancel-safe: nothing happens before the receive completes.
pub(super) async fn next_output(handle: &mut RequestHandle) -> Result<SeqOutput, ApiError> {
    loop {
        match handle.events.recv().await {
            Some(StreamEvent::Output(o)) => return Ok(o),
            Some(StreamEvent::Accepted) => continue,
            other => return Err(ended_with(handle, other)),
        }
    }
}

/// The error a request ended with; its guard has nothing left to abort.
fn ended_with(handle: &mut RequestHandle, event: Option<StreamEvent>) -> ApiError {
    handle.guard.finished();
    match event {
        Some(StreamEvent::Failed(e)) => ApiError::from(e),
        Some(StreamEvent::Unavailable(e)) => ApiError::from(e),
        _ => ApiError::from(crate::dispatch::DispatchError::WorkerGone),
    }
}

/// A non-streamed request's whole text per choice, in index order (their finishes stay in
/// `choices`, their log probabilities in `logprobs`).
async fn collect(
    choices: &mut Choices,
    logprobs: &mut [Logprobs],
    log: &mut RequestLog,
) -> Result<Vec<String>, ApiError> {
    let mut texts = vec![String::new(); choices.len()];
    while let Some(event) = choices.next(log).await {
        let (index, output) = event?;
        texts[index].push_str(&output.text);
        logprobs[index].push(&output.logprobs);
    }
    Ok(texts)
}

pub(super) fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// The producer's end of a stream's event channel. The channel is full only while hyper
/// does not take events, that is while the client does not take bytes (the socket's buffers
/// are full, or its HTTP/2 window is closed): a send that waits `write_timeout` gives up. SSE
/// keep-alive comments come from axum's `Sse` body, not from this channel, so a quiet stream
/// never times out here.
/// A stream's two ends: the sink its producer task feeds, and the SSE response body (with
/// `: ping` comments after `server.keepalive_secs` of quiet).
pub(super) fn sse_channel(
    state: &SharedState,
) -> (
    StreamSink,
    Sse<impl Stream<Item = Result<Event, Infallible>>>,
) {
    let (tx, rx) = mpsc::channel(64);
    let sink = StreamSink {
        tx,
        write_timeout: state.write_timeout,
    };
    let events = ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    let keepalive = KeepAlive::new().interval(state.keepalive).text("ping");
    (sink, Sse::new(events).keep_alive(keepalive))
}

pub(super) struct StreamSink {
    pub(super) tx: mpsc::Sender<Event>,
    pub(super) write_timeout: Duration,
}

impl StreamSink {
    /// Whether the event was queued; false when the client went away or took nothing for
    /// `write_timeout`.
    pub(super) async fn send(&self, event: Event) -> bool {
        match tokio::time::timeout(self.write_timeout, self.tx.send(event)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::info!(
                    "aborting a stream: its client took nothing for {:?}",
                    self.write_timeout
                );
                false
            }
        }
    }
}

/// Feeds one stream: each choice's role chunk, then the choices' text chunks and finish
/// chunks (each with its `index`) as they come, then the optional usage chunk (summed over the
/// choices) and one `[DONE]` once every choice finished. With `reports`, a choice's progress
/// reports before its first token become `prompt_progress` chunks, and its text chunks carry
/// the `timings` so far. The first error of any choice is sent as an error event and ends the
/// stream. Ends early (the guards abort the requests, the permits are released) when the
/// client goes away or stops reading for `write_timeout`: then `log` ends as cancelled.
async fn feed_stream(
    mut choices: Choices,
    envelope: Envelope,
    StreamExtras {
        include_usage,
        reports,
    }: StreamExtras,
    mut logprobs: Vec<Logprobs>,
    sink: StreamSink,
    _permit: OwnedSemaphorePermit,
    mut log: RequestLog,
) {
    if envelope.endpoint == Endpoint::Chat {
        for index in 0..choices.len() {
            if !sink
                .send(data(&with_index(envelope.role_chunk(), index)))
                .await
            {
                return;
            }
        }
    }
    let mut timings = vec![RunningTimings::default(); choices.len()];
    loop {
        let event = tokio::select! {
            event = choices.next(&mut log) => event,
            () = sink.tx.closed() => return,
        };
        match event {
            Some(Ok((index, o))) if o.is_progress() => {
                if let Some(chunk) = progress_chunk(&envelope, reports, &mut timings[index], &o) {
                    if !sink.send(data(&with_index(chunk, index))).await {
                        return;
                    }
                }
            }
            Some(Ok((index, o))) => {
                timings[index].on_output(&o);
                // A chunk carries the log probabilities of the tokens since the last chunk
                // (text held back for a stop string or a partial character waits with them).
                let lp = &mut logprobs[index];
                lp.push(&o.logprobs);
                if !o.text.is_empty() {
                    let mut chunk = envelope.text_chunk(&o.text);
                    chunk["choices"][0]["logprobs"] = lp.take();
                    if reports.timings {
                        chunk["timings"] = timings[index].json();
                    }
                    if !sink.send(data(&with_index(chunk, index))).await {
                        return;
                    }
                }
                if let Some(finish) = &o.finish {
                    let mut chunk = envelope.finish_chunk(finish);
                    if lp.has_pending() {
                        chunk["choices"][0]["logprobs"] = lp.take();
                    }
                    if !sink.send(data(&with_index(chunk, index))).await {
                        return;
                    }
                }
            }
            Some(Err(error)) => {
                log.failed(&error);
                sink.send(data(&error.body_json())).await;
                return;
            }
            None => {
                let total = choices.total();
                log.finished(&total);
                if include_usage && !sink.send(data(&envelope.usage_chunk(&total))).await {
                    return;
                }
                sink.send(Event::default().data("[DONE]")).await;
                return;
            }
        }
    }
}

/// What a stream sends besides its text and finish chunks.
#[derive(Debug, Clone, Copy)]
struct StreamExtras {
    /// `stream_options.include_usage`: the usage chunk before `[DONE]`.
    include_usage: bool,
    /// Progress chunks and per-token timings.
    reports: StreamReports,
}

/// The chunk for a choice's progress report, if it is to be sent ([`RunningTimings::report`]).
fn progress_chunk(
    envelope: &Envelope,
    reports: StreamReports,
    timings: &mut RunningTimings,
    output: &SeqOutput,
) -> Option<serde_json::Value> {
    let (progress, running) = timings.report(output, reports)?;
    let mut chunk = envelope.progress_chunk(&progress);
    if let Some(running) = running {
        chunk["timings"] = running;
    }
    Some(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::ServedModel;

    fn request(seed: &str) -> GenerateRequest {
        let body = format!(r#"{{"prompt":"x","n":3{seed}}}"#);
        let served = ServedModel::new("m");
        parse_generation(
            body.as_bytes(),
            Endpoint::Completions,
            &served,
            RequestId(7),
        )
        .unwrap()
        .generate
    }

    #[test]
    fn choices_get_ids_of_their_own_and_seeds_offset_by_their_index() {
        let next_id = AtomicU64::new(8);
        let requests = choice_requests(request(r#","seed":41"#), 3, Vec::new(), &next_id);
        let ids: Vec<u64> = requests.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [7, 8, 9]);
        assert_eq!(next_id.load(Ordering::Relaxed), 10);
        let seeds: Vec<Option<u32>> = requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds, [Some(41), Some(42), Some(43)]);
        assert!(requests.iter().all(|r| r.prompt == requests[0].prompt));
        // Unseeded choices draw their own seeds; one choice is the request itself.
        let unseeded = choice_requests(request(""), 3, Vec::new(), &next_id);
        assert!(unseeded.iter().all(|r| r.sampling.seed.is_none()));
        let one = choice_requests(request(r#","seed":5"#), 1, Vec::new(), &next_id);
        assert_eq!(one, [request(r#","seed":5"#)]);
        assert_eq!(next_id.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_batch_of_prompts_is_prompt_major_with_n_choices_each() {
        let next_id = AtomicU64::new(8);
        let batch = vec![Prompt::Text("y".into()), Prompt::Tokens(vec![1, 2])];
        let requests = choice_requests(request(r#","seed":41"#), 3, batch, &next_id);
        assert_eq!(requests.len(), 9);
        let ids: Vec<u64> = requests.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(requests[0].prompt, Prompt::Text("x".into()));
        assert_eq!(requests[3].prompt, Prompt::Text("y".into()));
        assert_eq!(requests[8].prompt, Prompt::Tokens(vec![1, 2]));
        // Each prompt's choices are seeded as that prompt alone would be.
        let seeds: Vec<Option<u32>> = requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds[3..6], [Some(41), Some(42), Some(43)]);
    }
}
