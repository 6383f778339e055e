//! The worker's side of the router connection.
//!
//! The IPC thread (the caller of [`serve`]) reads frames, renders chat templates, tokenizes and
//! hands requests to the engine; a writer thread owns the socket's send half and turns engine
//! events and control replies into frames. Outputs are held until the engine says its loop
//! iteration ended ([`flush_hook`]), so one engine step's outputs become one `Outputs` frame
//! and one write; replies and rejections go out at once.

use std::io::{BufReader, Write};
use std::sync::mpsc::{self, Receiver, Sender};

use llamapool_common::codec::{self, CodecError};
use llamapool_common::protocol::{
    ControlCall, ControlReply, FromWorker, GenerateRequest, Prompt, ToWorker, WorkerInfo,
    WorkerStats, PROTOCOL_VERSION,
};
use llamapool_common::{GenerationEvent, RequestError};

use crate::engine::{Disconnected, EngineRequest, EventSender};
use crate::{EngineHandle, Model};

/// What the writer thread sends.
pub enum Outgoing {
    Event(GenerationEvent),
    Frame(FromWorker),
    /// The engine finished a loop iteration: write what it produced.
    IterationEnd,
}

/// The writer's queue; create it before the engine so the engine can be given [`flush_hook`].
pub fn outbox() -> (Sender<Outgoing>, Receiver<Outgoing>) {
    mpsc::channel()
}

/// The engine's `on_iteration_end` hook for this writer.
pub fn flush_hook(out: &Sender<Outgoing>) -> Box<dyn FnMut() + Send> {
    let out = out.clone();
    Box::new(move || {
        let _ = out.send(Outgoing::IterationEnd);
    })
}

/// Serves one router connection until it closes. Returns how it ended.
pub fn serve<R, W>(
    recv: R,
    send: W,
    (out_tx, out_rx): (Sender<Outgoing>, Receiver<Outgoing>),
    model: Model,
    engine: &EngineHandle,
    info: &WorkerInfo,
) -> Result<(), CodecError>
where
    R: std::io::Read,
    W: Write + Send + 'static,
{
    let writer = std::thread::Builder::new()
        .name("ipc-writer".into())
        .spawn(move || write_loop(send, &out_rx))?;
    let result = read_loop(recv, &out_tx, model, engine, info);
    // The router is gone or said goodbye: stop generating, let the writer finish.
    engine.shutdown(false);
    drop(out_tx);
    let _ = writer.join();
    result
}

fn read_loop<R: std::io::Read>(
    recv: R,
    out: &Sender<Outgoing>,
    model: Model,
    engine: &EngineHandle,
    info: &WorkerInfo,
) -> Result<(), CodecError> {
    let mut reader = BufReader::new(recv);
    let mut buf = Vec::new();
    let mut greeted = false;
    while let Some(message) = codec::read_frame::<ToWorker>(&mut reader, &mut buf)? {
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
            ToWorker::Generate(request) => generate(request, out, model, engine),
            ToWorker::Abort { ids } => ids.into_iter().for_each(|id| engine.cancel(id)),
            ToWorker::Control { call, body } => {
                let reply = control(body, model, engine);
                let _ = out.send(Outgoing::Frame(FromWorker::Control { call, reply }));
            }
            ToWorker::Drain => engine.shutdown(true),
        }
    }
    Ok(())
}

fn generate(request: GenerateRequest, out: &Sender<Outgoing>, model: Model, engine: &EngineHandle) {
    let id = request.id;
    let prompt = match request.prompt {
        Prompt::Text(text) => Ok(model.tokenize(&text, true)),
        Prompt::Tokens(tokens) => Ok(tokens),
        Prompt::Chat(messages) => model.chat_prompt(&messages),
    };
    let mut prompt = match prompt {
        Ok(tokens) => tokens,
        Err(error) => {
            let _ = out.send(Outgoing::Frame(FromWorker::Rejected { id, error }));
            return;
        }
    };
    let mut stopping = request.stopping;
    let replay = request.resume.len();
    if !request.resume.is_empty() {
        // Continue a generation another worker started: what it produced becomes prompt.
        let done = u32::try_from(request.resume.len()).unwrap_or(u32::MAX);
        stopping.max_tokens = stopping.max_tokens.map(|m| m.saturating_sub(done).max(1));
        prompt.extend(request.resume);
    }
    let tx = out.clone();
    let events =
        EventSender::new(move |event| tx.send(Outgoing::Event(event)).map_err(|_| Disconnected));
    engine.submit(
        EngineRequest {
            id,
            prompt,
            sampling: request.sampling,
            stopping,
            replay,
        },
        events,
    );
}

fn control(call: ControlCall, model: Model, engine: &EngineHandle) -> ControlReply {
    match call {
        ControlCall::Stats => match engine.stats() {
            Some(s) => ControlReply::Stats(WorkerStats {
                slots: s.slots as u32,
                free_slots: s.free_ids as u32,
                running: s.running as u32,
                waiting: s.waiting as u32,
                decode_calls: s.decode_calls,
                prompt_tokens: s.prompt_tokens,
                generated_tokens: s.generated_tokens,
            }),
            None => ControlReply::Failed {
                message: "the engine has stopped".into(),
            },
        },
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
    }
}

fn write_loop<W: Write>(mut send: W, rx: &Receiver<Outgoing>) {
    let mut wire = Vec::new();
    let mut outputs = Vec::new();
    while let Ok(item) = rx.recv() {
        match item {
            Outgoing::Event(GenerationEvent::Output(o)) => {
                outputs.push(o);
                continue;
            }
            Outgoing::Event(GenerationEvent::Rejected { id, error }) => {
                flush_outputs(&mut outputs, &mut wire);
                encode(&FromWorker::Rejected { id, error }, &mut wire);
            }
            Outgoing::Frame(frame) => {
                flush_outputs(&mut outputs, &mut wire);
                encode(&frame, &mut wire);
            }
            Outgoing::IterationEnd => flush_outputs(&mut outputs, &mut wire),
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

fn flush_outputs(outputs: &mut Vec<llamapool_common::SeqOutput>, wire: &mut Vec<u8>) {
    if !outputs.is_empty() {
        encode(&FromWorker::Outputs(std::mem::take(outputs)), wire);
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
