//! One worker connection: the task that owns the socket and the in-flight map.
//!
//! The pool talks to it with [`ConnCommand`]s; a reader task turns the socket's frames into
//! [`FromWorker`] messages. Outputs are routed to each request's channel; a finished,
//! rejected or aborted request leaves the map and the worker's load. When the worker goes
//! away, whatever is still in flight is handed back to the caller (the supervisor), who
//! re-dispatches it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use llamapool_common::codec::{self, CodecError};
use llamapool_common::protocol::{
    ControlCall, ControlReply, FromWorker, GenerateRequest, ToWorker, WorkerInfo, PROTOCOL_VERSION,
};
use llamapool_common::{RequestId, Token};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{CurrentWorker, StreamEvent};
use crate::metrics::Metrics;

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
}

#[derive(Debug)]
pub enum ConnCommand {
    Generate(InFlight),
    Abort(RequestId),
    Control {
        body: ControlCall,
        reply: oneshot::Sender<ControlReply>,
    },
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<FromWorker>, CodecError> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = codec::body_len(header)?;
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    codec::decode(buf).map(Some)
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &ToWorker,
) -> Result<(), CodecError> {
    let mut buf = Vec::new();
    codec::encode_into(message, &mut buf)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Says `Hello` and waits for `Ready`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<WorkerInfo, String> {
    write_frame(
        stream,
        &ToWorker::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await
    .map_err(|e| format!("sending Hello: {e}"))?;
    let mut buf = Vec::new();
    match tokio::time::timeout(timeout, read_frame(stream, &mut buf)).await {
        Err(_) => Err("no Ready in time".into()),
        Ok(Err(e)) => Err(format!("reading Ready: {e}")),
        Ok(Ok(None)) => Err("the worker closed the connection during the handshake".into()),
        Ok(Ok(Some(FromWorker::Ready(info)))) if info.version == PROTOCOL_VERSION => Ok(info),
        Ok(Ok(Some(FromWorker::Ready(info)))) => Err(format!(
            "protocol version {} (router speaks {PROTOCOL_VERSION})",
            info.version
        )),
        Ok(Ok(Some(FromWorker::Fatal { message }))) => Err(message),
        Ok(Ok(Some(other))) => Err(format!("unexpected first message {other:?}")),
    }
}

/// Per-request bookkeeping of this connection.
struct Running {
    flight: InFlight,
    /// Tokens sent as `resume` to this worker: usage counts them as generated, not prompt.
    resumed: u32,
}

/// Serves one connection until the worker goes away or the pool drops its sender. Returns the
/// requests still in flight.
pub async fn run<S>(
    stream: S,
    mut commands: mpsc::UnboundedReceiver<ConnCommand>,
    load: &std::sync::atomic::AtomicUsize,
    metrics: &Metrics,
) -> Vec<InFlight>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (frames_tx, mut frames) = mpsc::unbounded_channel();
    let reader_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match read_frame(&mut reader, &mut buf).await {
                Ok(Some(frame)) => {
                    if frames_tx.send(frame).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "worker connection broke");
                    break;
                }
            }
        }
    });
    let mut running: HashMap<RequestId, Running> = HashMap::new();
    let mut calls: HashMap<u64, oneshot::Sender<ControlReply>> = HashMap::new();
    let mut next_call = 0u64;
    let finish = |running: &mut HashMap<RequestId, Running>, id: RequestId| {
        if running.remove(&id).is_some() {
            load.fetch_sub(1, Ordering::AcqRel);
        }
    };
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { break };
                let message = match command {
                    ConnCommand::Generate(flight) => {
                        if flight.events.is_closed() {
                            // Its client left while it was being (re)dispatched.
                            load.fetch_sub(1, Ordering::AcqRel);
                            continue;
                        }
                        let mut request = flight.request.clone();
                        request.resume = flight.generated.clone();
                        let resumed = u32::try_from(request.resume.len()).unwrap_or(u32::MAX);
                        running.insert(request.id, Running { flight, resumed });
                        ToWorker::Generate(request)
                    }
                    ConnCommand::Abort(id) => {
                        if !running.contains_key(&id) {
                            continue;
                        }
                        finish(&mut running, id);
                        ToWorker::Abort { ids: vec![id] }
                    }
                    ConnCommand::Control { body, reply } => {
                        next_call += 1;
                        calls.insert(next_call, reply);
                        ToWorker::Control { call: next_call, body }
                    }
                };
                let mut wire = Vec::new();
                if let Err(e) = codec::encode_into(&message, &mut wire) {
                    // Only this request is at fault (a body too large for a frame, say).
                    if let ToWorker::Generate(request) = &message {
                        if let Some(r) = running.remove(&request.id) {
                            load.fetch_sub(1, Ordering::AcqRel);
                            let _ = r.flight.events.send(StreamEvent::Failed(llamapool_common::RequestError::InvalidParam {
                                param: "prompt".into(),
                                message: format!("the request is too large to send to a worker: {e}"),
                            }));
                        }
                    }
                    continue;
                }
                if let Err(e) = writer.write_all(&wire).await {
                    tracing::warn!(error = %e, "writing to the worker failed");
                    break;
                }
            }
            frame = frames.recv() => {
                let Some(frame) = frame else { break };
                match frame {
                    FromWorker::Outputs(outputs) => {
                        let mut gone = Vec::new();
                        for mut output in outputs {
                            let id = output.id;
                            let Some(r) = running.get_mut(&id) else { continue };
                            r.flight.generated.extend_from_slice(&output.tokens);
                            let done = output.finish.is_some();
                            if let Some(finish) = &mut output.finish {
                                finish.usage.prompt_tokens = finish.usage.prompt_tokens.saturating_sub(r.resumed);
                                finish.usage.completion_tokens += r.resumed;
                                metrics.record_finish(finish);
                            }
                            let delivered = r.flight.events.send(StreamEvent::Output(output)).is_ok();
                            if done {
                                finish(&mut running, id);
                            } else if !delivered {
                                gone.push(id); // the client went away without the guard noticing yet
                            }
                        }
                        for id in gone {
                            finish(&mut running, id);
                            if write_frame(&mut writer, &ToWorker::Abort { ids: vec![id] }).await.is_err() {
                                break;
                            }
                        }
                    }
                    FromWorker::Rejected { id, error } => {
                        if let Some(r) = running.get(&id) {
                            let _ = r.flight.events.send(StreamEvent::Failed(error));
                        }
                        finish(&mut running, id);
                    }
                    FromWorker::Control { call, reply } => {
                        if let Some(tx) = calls.remove(&call) {
                            let _ = tx.send(reply);
                        }
                    }
                    FromWorker::Fatal { message } => tracing::error!(%message, "worker reported a fatal error"),
                    FromWorker::Ready(_) => {}
                }
            }
        }
    }
    reader_task.abort();
    // Requests queued for this connection but never sent move on with the running ones.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        if let ConnCommand::Generate(flight) = command {
            running.insert(flight.request.id, Running { flight, resumed: 0 });
        }
    }
    load.fetch_sub(
        running.len().min(load.load(Ordering::Acquire)),
        Ordering::AcqRel,
    );
    running.into_values().map(|r| r.flight).collect()
}
