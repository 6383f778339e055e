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

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use llamapool_common::{Finish, RequestId, SeqOutput};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::request_id::XRequestId;
use super::request_log::RequestLog;
use super::{LimitedBody, SharedState};
use crate::dispatch::{RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::request::parse_generation;
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
    let permit = state.admit()?;
    let id = RequestId(state.next_id.fetch_add(1, Ordering::Relaxed));
    let mut valid = parse_generation(body, endpoint, &state.served, id)?;
    valid.generate.request_id = request_id;
    // Committed to a status only once a worker accepted the request.
    let mut handle = state.pool.submit(valid.generate).await?;
    let envelope = Envelope::new(endpoint, &state.served.alias);
    if valid.stream {
        let (tx, rx) = mpsc::channel(64);
        let sink = StreamSink {
            tx,
            write_timeout: state.write_timeout,
        };
        let mut log = log.take().expect("only a stream takes the log");
        log.on_worker(handle.worker());
        let served_by = worker_header(handle.worker());
        log.committed(200);
        tokio::spawn(
            feed_stream(
                handle,
                envelope,
                valid.include_usage,
                sink,
                permit,
                timer,
                log,
            )
            .instrument(tracing::Span::current()),
        );
        let events = ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
        let keepalive = KeepAlive::new().interval(state.keepalive).text("ping");
        Ok((served_by, Sse::new(events).keep_alive(keepalive)).into_response())
    } else {
        let log = log.as_mut().expect("a non-streamed request keeps its log");
        log.on_worker(handle.worker());
        let (text, finish) = collect(&mut handle, timer, log).await?;
        log.finished(&finish);
        drop(permit);
        let served_by = worker_header(handle.worker());
        Ok((served_by, Json(envelope.response(&text, &finish))).into_response())
    }
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

/// A non-streamed request's whole text and its finish.
async fn collect(
    handle: &mut RequestHandle,
    mut timer: RequestTimer,
    log: &mut RequestLog,
) -> Result<(String, Finish), ApiError> {
    let mut text = String::new();
    loop {
        let output = next_output(handle).await?;
        timer.on_output(output.tokens.len());
        log.on_output(&output, handle.worker());
        text.push_str(&output.text);
        if let Some(finish) = output.finish {
            handle.guard.finished();
            timer.finish();
            return Ok((text, finish));
        }
    }
}

pub(super) fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// The producer's end of a stream's event channel. The channel is full only while hyper
/// does not take events, that is while the client does not take bytes (the socket's buffers
/// are full, or its HTTP/2 window is closed): a send that waits `write_timeout` gives up. SSE
/// keep-alive comments come from axum's `Sse` body, not from this channel, so a quiet stream
/// never times out here.
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

/// Feeds one stream: role chunk, text chunks, finish chunk, optional usage chunk, `[DONE]`.
/// Ends early (and the guard aborts the request, the permit is released) when the client
/// goes away or stops reading for `write_timeout`: then `log` ends as cancelled.
async fn feed_stream(
    mut handle: RequestHandle,
    envelope: Envelope,
    include_usage: bool,
    sink: StreamSink,
    _permit: OwnedSemaphorePermit,
    mut timer: RequestTimer,
    mut log: RequestLog,
) {
    if envelope.endpoint == Endpoint::Chat && !sink.send(data(&envelope.role_chunk())).await {
        return;
    }
    loop {
        let output = tokio::select! {
            output = next_output(&mut handle) => output,
            () = sink.tx.closed() => return,
        };
        match output {
            Ok(o) => {
                timer.on_output(o.tokens.len());
                log.on_output(&o, handle.worker());
                if !o.text.is_empty() && !sink.send(data(&envelope.text_chunk(&o.text))).await {
                    return;
                }
                if let Some(finish) = o.finish {
                    handle.guard.finished();
                    timer.finish();
                    log.finished(&finish);
                    finish_stream(&envelope, &finish, include_usage, &sink).await;
                    return;
                }
            }
            Err(error) => {
                log.failed(&error);
                sink.send(data(&error.body_json())).await;
                return;
            }
        }
    }
}

async fn finish_stream(
    envelope: &Envelope,
    finish: &Finish,
    include_usage: bool,
    sink: &StreamSink,
) {
    if !sink.send(data(&envelope.finish_chunk(finish))).await {
        return;
    }
    if include_usage && !sink.send(data(&envelope.usage_chunk(&finish.usage))).await {
        return;
    }
    sink.send(Event::default().data("[DONE]")).await;
}
