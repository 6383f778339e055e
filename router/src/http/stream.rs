//! A streamed response's plumbing, shared by every generating route: the SSE channel and
//! its [`StreamSink`], the [`StreamFormat`] a route's response adapter implements, and the
//! [`feed`] loop that turns a request's outputs into events until it finishes, fails, or its
//! client goes away.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use llamapool_common::{Finish, SeqOutput};
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;

use super::choices::Choices;
use super::request_log::RequestLog;
use super::SharedState;

/// An SSE `data:` event holding `body` as JSON.
pub(super) fn data(body: &impl Serialize) -> Event {
    let json = serde_json::to_string(body).expect("response bodies serialize");
    Event::default().data(json)
}

/// An SSE event named `name` holding `body` as JSON, its `event:` line before its `data:`
/// line: the APIs whose clients read events by name (Anthropic's, OpenAI's Responses).
pub(super) fn named(name: &'static str, body: &impl Serialize) -> Event {
    let json = serde_json::to_string(body).expect("response bodies serialize");
    Event::default().event(name).data(json)
}

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

/// The producer's end of a stream's event channel. The channel is full only while hyper
/// does not take events, that is while the client does not take bytes (the socket's buffers
/// are full, or its HTTP/2 window is closed): a send that waits `write_timeout` gives up. SSE
/// keep-alive comments come from axum's `Sse` body, not from this channel, so a quiet stream
/// never times out here.
pub(super) struct StreamSink {
    tx: mpsc::Sender<Event>,
    write_timeout: Duration,
}

impl StreamSink {
    /// Whether the event was queued; false when the client went away or took nothing for
    /// `write_timeout`.
    async fn send(&self, event: Event) -> bool {
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

    /// Whether every event was queued, in order (see [`StreamSink::send`]).
    async fn send_all(&self, events: Vec<Event>) -> bool {
        for event in events {
            if !self.send(event).await {
                return false;
            }
        }
        true
    }
}

/// A route's streamed response shape: the events it sends for each output of a request's
/// choices. Errors are sent by [`feed`] alike for every route (the error body as an event).
pub(super) trait StreamFormat: Send + 'static {
    /// Events before any output (a chat stream's role chunks).
    fn opening(&mut self) -> Vec<Event> {
        Vec::new()
    }

    /// The events for one output of choice `index`, which came from `worker`.
    fn output(&mut self, index: usize, worker: usize, output: &SeqOutput) -> Vec<Event>;

    /// The events once every choice finished; `total` is the whole request's finish.
    fn closing(&mut self, total: &Finish) -> Vec<Event>;
}

/// Feeds one stream: `format`'s events for the choices' outputs as they come, then its
/// closing events once every choice finished. The first error of any choice is sent as an
/// error event and ends the stream. Ends early (the requests are aborted as `choices` drops,
/// the permit is released) when the client goes away or stops reading for `write_timeout`:
/// then `log` ends as cancelled.
pub(super) async fn feed(
    mut choices: Choices,
    mut format: impl StreamFormat,
    sink: StreamSink,
    _permit: OwnedSemaphorePermit,
    mut log: RequestLog,
) {
    if !sink.send_all(format.opening()).await {
        return;
    }
    loop {
        let event = tokio::select! {
            event = choices.next(&mut log) => event,
            () = sink.tx.closed() => return,
        };
        match event {
            Some(Ok(o)) => {
                if !sink
                    .send_all(format.output(o.index, o.worker, &o.output))
                    .await
                {
                    return;
                }
            }
            Some(Err(error)) => {
                log.failed(&error);
                sink.send(data(&error.body())).await;
                return;
            }
            None => {
                let total = choices.total();
                log.finished(&total);
                sink.send_all(format.closing(&total)).await;
                return;
            }
        }
    }
}
