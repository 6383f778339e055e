//! One worker connection: the task that owns the socket and the in-flight map.
//!
//! The pool talks to it with [`ConnCommand`]s; the worker's frames arrive through the shared
//! codec ([`llamapool_common::codec::FrameCodec`]). Each loop turn handles one command, one
//! frame or one ping tick: events are routed to each request's channel; a finished, rejected
//! or aborted request leaves the map (and its [`LoadTicket`] gives the worker's load back);
//! `Progress` and `Pong` update the worker's [`Vitals`]. When the worker goes away, whatever
//! is still in flight is handed back to the caller (the supervisor), who moves it to another
//! worker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use llamapool_common::codec::{CodecError, FrameCodec};
use llamapool_common::protocol::{
    ControlCall, ControlReply, FromWorker, GenerateRequest, Prompt, ToWorker, WorkerInfo,
    PROTOCOL_VERSION,
};
use llamapool_common::{GenerationEvent, RequestId, SeqOutput, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::affinity::PrefixChain;
use super::rebalance::Candidate;
use super::vitals::Vitals;
use super::{CurrentWorker, DispatchError, LoadTicket, StreamEvent};
use crate::metrics::Metrics;

/// The router's side of the protocol: reads [`FromWorker`], writes [`ToWorker`].
pub type RouterCodec = FrameCodec<FromWorker, ToWorker>;

/// A request on its way to, or running on, a worker.
#[derive(Debug)]
pub struct InFlight {
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<StreamEvent>,
    /// Every token generated so far, on any worker.
    pub generated: Vec<Token>,
    pub current: CurrentWorker,
    /// How many dead workers this request has already been moved off.
    pub moves: u32,
    /// The unit of load it holds on the worker it was sent to.
    pub ticket: Option<LoadTicket>,
    /// Only workers whose sequences hold this many tokens may take it (0: any).
    pub min_ctx: u32,
    /// The prompt's block hashes for prefix affinity (empty: affinity is off).
    pub prefix: PrefixChain,
    /// While on probation after a worker's death (`super::poison`): told when the request
    /// produces its first token or ends; `Some` means it has not yet.
    pub probation: Option<mpsc::Sender<()>>,
    /// How often the pool moved it between live workers (`super::rebalance`).
    pub rebalanced: u32,
}

impl InFlight {
    /// What decides whether it is worth moving to another live worker.
    pub fn rebalance_candidate(&self) -> Candidate {
        let prompt_tokens = match &self.request.prompt {
            Prompt::Tokens(tokens) => tokens.len(),
            Prompt::Text(text) => text.len() / 4,
            Prompt::Chat(chat) => chat.messages.iter().map(|m| m.content.len()).sum::<usize>() / 4,
        };
        Candidate {
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            generated: u32::try_from(self.generated.len()).unwrap_or(u32::MAX),
            max_tokens: self.request.stopping.max_tokens,
            rebalanced: self.rebalanced,
        }
    }

    /// The request is known fine on its worker: it produced a token or ended.
    pub fn pass_probation(&mut self) {
        if let Some(tx) = self.probation.take() {
            let _ = tx.try_send(());
        }
    }
}

#[derive(Debug)]
pub enum ConnCommand {
    /// Boxed: a request is far larger than the other commands.
    Generate(Box<InFlight>),
    Abort(RequestId),
    Control {
        body: ControlCall,
        reply: oneshot::Sender<ControlReply>,
    },
    /// Hand back up to `count` running requests worth moving to another worker (see
    /// `super::rebalance`): the connection forgets them and aborts them on its worker.
    Release {
        count: usize,
        reply: oneshot::Sender<Vec<InFlight>>,
    },
}

/// Says `Hello` and waits for `Ready`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<WorkerInfo, String> {
    let mut framed = tokio_util::codec::Framed::new(stream, RouterCodec::new());
    framed
        .send(ToWorker::Hello {
            version: PROTOCOL_VERSION,
        })
        .await
        .map_err(|e| format!("sending Hello: {e}"))?;
    match tokio::time::timeout(timeout, framed.next()).await {
        Err(_) => Err("no Ready in time".into()),
        Ok(Some(Err(e))) => Err(format!("reading Ready: {e}")),
        Ok(None) => Err("the worker closed the connection during the handshake".into()),
        Ok(Some(Ok(FromWorker::Ready(info)))) if info.version == PROTOCOL_VERSION => Ok(info),
        Ok(Some(Ok(FromWorker::Ready(info)))) => Err(format!(
            "protocol version {} (router speaks {PROTOCOL_VERSION})",
            info.version
        )),
        Ok(Some(Ok(FromWorker::Fatal { message }))) => Err(message),
        Ok(Some(Ok(other))) => Err(format!("unexpected first message {other:?}")),
    }
}

/// Per-request bookkeeping of this connection.
#[derive(Debug)]
struct Running {
    flight: InFlight,
    /// Tokens sent as `resumed` to this worker: usage counts them as generated, not prompt.
    resumed: u32,
}

/// Whether the connection goes on after a command or a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// The state the connection task owns.
struct Connection<'a, W> {
    writer: FramedWrite<WriteHalf<W>, RouterCodec>,
    running: HashMap<RequestId, Running>,
    calls: HashMap<u64, oneshot::Sender<ControlReply>>,
    next_call: u64,
    metrics: &'a Metrics,
    vitals: &'a Vitals,
}

/// What one connection reports to and how often it pings its worker.
#[derive(Debug, Clone, Copy)]
pub struct Watch<'a> {
    pub metrics: &'a Metrics,
    pub vitals: &'a Vitals,
    /// A `Ping` goes out this often, busy or idle; the answer (or any `Progress`) is the
    /// worker's sign of life for the hang watchdog.
    pub ping_interval: Duration,
}

/// Serves one connection until the worker goes away or the pool drops its sender. Returns the
/// requests still in flight, and those queued for this worker but never sent.
pub async fn run<S>(
    stream: S,
    mut commands: mpsc::UnboundedReceiver<ConnCommand>,
    watch: Watch<'_>,
) -> Vec<InFlight>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut frames: FramedRead<ReadHalf<S>, RouterCodec> =
        FramedRead::new(reader, RouterCodec::new());
    let mut conn = Connection {
        writer: FramedWrite::new(writer, RouterCodec::new()),
        running: HashMap::new(),
        calls: HashMap::new(),
        next_call: 0,
        metrics: watch.metrics,
        vitals: watch.vitals,
    };
    watch.vitals.reset(Instant::now());
    let start = tokio::time::Instant::now() + watch.ping_interval;
    let mut pings = tokio::time::interval_at(start, watch.ping_interval);
    let mut nonce = 0u64;
    loop {
        // Every branch is cancel-safe: a frame is either whole in FramedRead's buffer or not
        // taken; a command is either received or left in the channel; a tick is not lost.
        let flow = tokio::select! {
            _ = pings.tick() => {
                nonce += 1;
                conn.send(ToWorker::Ping { nonce }).await
            }
            command = commands.recv() => match command {
                Some(command) => conn.on_command(command).await,
                None => Flow::Close,
            },
            frame = frames.next() => match frame {
                Some(Ok(frame)) => conn.on_frame(frame).await,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "worker connection broke");
                    Flow::Close
                }
                None => Flow::Close,
            },
        };
        if flow == Flow::Close {
            break;
        }
    }
    conn.close(commands)
}

impl<W: AsyncWrite> Connection<'_, W> {
    async fn on_command(&mut self, command: ConnCommand) -> Flow {
        match command {
            ConnCommand::Generate(flight) => self.start(*flight).await,
            ConnCommand::Abort(id) => self.abort(id).await,
            ConnCommand::Release { count, reply } => {
                let (released, flow) = self.release(count).await;
                if let Err(released) = reply.send(released) {
                    // The pool stopped waiting: it cannot be lost, so it runs here again.
                    for flight in released {
                        if self.start(flight).await == Flow::Close {
                            return Flow::Close;
                        }
                    }
                }
                flow
            }
            ConnCommand::Control { body, reply } => {
                self.next_call += 1;
                self.calls.insert(self.next_call, reply);
                let call = self.next_call;
                self.send(ToWorker::Control { call, body }).await
            }
        }
    }

    /// Sends a request to the worker, continuing from what it generated elsewhere.
    async fn start(&mut self, flight: InFlight) -> Flow {
        if flight.events.is_closed() {
            return Flow::Continue; // its client left while it was being (re)dispatched
        }
        let mut request = flight.request.clone();
        request.resumed = flight.generated.clone();
        let id = request.id;
        let resumed = u32::try_from(request.resumed.len()).unwrap_or(u32::MAX);
        self.running.insert(id, Running { flight, resumed });
        match self.writer.send(ToWorker::Generate(request)).await {
            Ok(()) => Flow::Continue,
            Err(CodecError::Io(e)) => {
                tracing::warn!(error = %e, "writing to the worker failed");
                Flow::Close
            }
            Err(e) => {
                // Nothing was written: only this request is at fault (too large for a frame).
                if let Some(r) = self.running.remove(&id) {
                    let error = DispatchError::TooLargeToSend(e.to_string());
                    let _ = r.flight.events.send(StreamEvent::Unavailable(error));
                }
                Flow::Continue
            }
        }
    }

    /// Takes up to `count` running requests worth moving, those with the most left to
    /// generate first, and aborts them on the worker. Tokens the worker produced for them
    /// after this are dropped (their ids are gone) and generated again where they go.
    async fn release(&mut self, count: usize) -> (Vec<InFlight>, Flow) {
        let mut movable: Vec<(u32, RequestId)> = self
            .running
            .iter()
            .filter(|(_, r)| r.flight.probation.is_none() && !r.flight.events.is_closed())
            .map(|(id, r)| (r.flight.rebalance_candidate(), *id))
            .filter(|(c, _)| c.worth_moving())
            .map(|(c, id)| (c.tokens_left(), id))
            .collect();
        movable.sort_by_key(|&(left, id)| (std::cmp::Reverse(left), id.0));
        let ids: Vec<RequestId> = movable.into_iter().take(count).map(|(_, id)| id).collect();
        if ids.is_empty() {
            return (Vec::new(), Flow::Continue);
        }
        let released = ids
            .iter()
            .filter_map(|id| self.running.remove(id))
            .map(|r| r.flight)
            .collect();
        let flow = self.send(ToWorker::Abort { ids }).await;
        (released, flow)
    }

    async fn abort(&mut self, id: RequestId) -> Flow {
        if self.running.remove(&id).is_none() {
            return Flow::Continue;
        }
        self.send(ToWorker::Abort { ids: vec![id] }).await
    }

    async fn send(&mut self, message: ToWorker) -> Flow {
        match self.writer.send(message).await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::warn!(error = %e, "writing to the worker failed");
                Flow::Close
            }
        }
    }

    async fn on_frame(&mut self, frame: FromWorker) -> Flow {
        match frame {
            FromWorker::Events(events) => {
                let mut gone = Vec::new();
                for event in events {
                    if let Some(id) = self.deliver(event) {
                        gone.push(id);
                    }
                }
                for id in gone {
                    if self.abort(id).await == Flow::Close {
                        return Flow::Close;
                    }
                }
            }
            FromWorker::Progress(stats) => self.vitals.on_progress(stats, Instant::now()),
            FromWorker::Pong { .. } => self.vitals.on_pong(Instant::now()),
            FromWorker::Control { call, reply } => {
                if let Some(tx) = self.calls.remove(&call) {
                    let _ = tx.send(reply);
                }
            }
            FromWorker::Fatal { message } => {
                tracing::error!(%message, "worker reported a fatal error");
            }
            FromWorker::Ready(_) => {}
        }
        Flow::Continue
    }

    /// Routes one event to its request. Returns the id of a request whose client went away
    /// without its guard noticing yet (it must be aborted on the worker).
    fn deliver(&mut self, event: GenerationEvent) -> Option<RequestId> {
        match event {
            GenerationEvent::Accepted { id } => {
                let r = self.running.get(&id)?;
                let _ = r.flight.events.send(StreamEvent::Accepted);
                None
            }
            GenerationEvent::Output(output) => self.deliver_output(output),
            GenerationEvent::Rejected { id, error } => {
                if let Some(r) = self.running.remove(&id) {
                    let _ = r.flight.events.send(StreamEvent::Failed(error));
                }
                None
            }
        }
    }

    fn deliver_output(&mut self, mut output: SeqOutput) -> Option<RequestId> {
        let id = output.id;
        let r = self.running.get_mut(&id)?;
        r.flight.generated.extend_from_slice(&output.tokens);
        let done = output.finish.is_some();
        if done || !output.tokens.is_empty() {
            r.flight.pass_probation();
        }
        if let Some(finish) = &mut output.finish {
            finish.usage.prompt_tokens = finish.usage.prompt_tokens.saturating_sub(r.resumed);
            finish.usage.completion_tokens += r.resumed;
            self.metrics.record_finish(finish);
        }
        let delivered = r.flight.events.send(StreamEvent::Output(output)).is_ok();
        if done {
            self.running.remove(&id);
        }
        (!done && !delivered).then_some(id)
    }

    /// Hands back every request this connection still owns: those running, and those queued
    /// for it but never sent.
    fn close(self, mut commands: mpsc::UnboundedReceiver<ConnCommand>) -> Vec<InFlight> {
        commands.close();
        let mut orphans: Vec<InFlight> = self.running.into_values().map(|r| r.flight).collect();
        while let Ok(command) = commands.try_recv() {
            if let ConnCommand::Generate(flight) = command {
                orphans.push(*flight);
            }
        }
        orphans
    }
}

#[cfg(test)]
mod tests;
