//! The worker's side of the router connection.
//!
//! The IPC thread (the caller of [`serve`]) reads frames, renders chat templates, tokenizes and
//! hands requests to the engine; a writer thread owns the socket's send half and turns engine
//! events and control replies into frames. Generation events are held until the engine says
//! its loop iteration ended ([`flush_hook`]), so one iteration's acceptances, outputs and
//! rejections become one `Events` frame and one write, in the order the engine sent them.
//! Control replies, and rejections made here before a request reaches the engine, go out at
//! once.

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
    /// The engine thread has ended, so no iteration end will come again: write what is held,
    /// and from now on each event at once (only `EngineHandle::submit`'s rejections remain).
    EngineStopped,
}

/// The writer's queue; create it before the engine so the engine can be given [`flush_hook`].
pub fn outbox() -> (Sender<Outgoing>, Receiver<Outgoing>) {
    mpsc::channel()
}

/// The engine's `on_iteration_end` hook for this writer. The engine drops it when its thread
/// ends, which tells the writer to stop holding events.
pub fn flush_hook(out: &Sender<Outgoing>) -> Box<dyn FnMut() + Send> {
    let hook = FlushHook(out.clone());
    Box::new(move || {
        let _ = hook.0.send(Outgoing::IterationEnd);
    })
}

struct FlushHook(Sender<Outgoing>);

impl Drop for FlushHook {
    fn drop(&mut self) {
        let _ = self.0.send(Outgoing::EngineStopped);
    }
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
            let rejected = GenerationEvent::Rejected { id, error };
            let _ = out.send(Outgoing::Frame(FromWorker::Events(vec![rejected])));
            return;
        }
    };
    let mut stopping = request.stopping;
    let resumed = request.resumed.len();
    if resumed > 0 {
        // Continue a generation another worker started: what it produced becomes prompt, and
        // counts against max_tokens.
        let done = u32::try_from(resumed).unwrap_or(u32::MAX);
        stopping.max_tokens = stopping.max_tokens.map(|m| m.saturating_sub(done).max(1));
        prompt.extend(request.resumed);
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
            resumed,
        },
        events,
    );
}

fn control(call: ControlCall, model: Model, engine: &EngineHandle) -> ControlReply {
    match call {
        ControlCall::Stats => match engine.stats() {
            Some(s) => ControlReply::Stats(WorkerStats {
                running: u32::try_from(s.running).unwrap_or(u32::MAX),
                waiting: u32::try_from(s.waiting).unwrap_or(u32::MAX),
                decode_calls: s.decode_calls,
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
    let mut events = Vec::new();
    // While the engine runs, its events wait for the end of their iteration.
    let mut batching = true;
    while let Ok(item) = rx.recv() {
        match item {
            Outgoing::Event(event) => {
                events.push(event);
                if batching {
                    continue;
                }
                flush_events(&mut events, &mut wire);
            }
            Outgoing::Frame(frame) => {
                flush_events(&mut events, &mut wire);
                encode(&frame, &mut wire);
            }
            Outgoing::IterationEnd => flush_events(&mut events, &mut wire),
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
    use llamapool_common::{RequestId, SeqOutput};

    use super::*;

    fn output(id: u64, text: &str) -> GenerationEvent {
        GenerationEvent::Output(SeqOutput {
            id: RequestId(id),
            tokens: vec![1],
            text: text.into(),
            finish: None,
        })
    }

    #[test]
    fn events_are_held_until_the_iteration_ends_and_sent_at_once_after_the_engine_stopped() {
        let accepted = |id| GenerationEvent::Accepted { id: RequestId(id) };
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
        let (tx, rx) = outbox();
        for item in [
            Outgoing::Event(accepted(1)),
            Outgoing::Event(output(1, "a")),
            Outgoing::IterationEnd,
            Outgoing::Event(output(1, "b")),
            // A reply in the middle of an iteration goes out after what came before it.
            Outgoing::Frame(reply.clone()),
            Outgoing::Event(accepted(2)),
            Outgoing::IterationEnd,
            Outgoing::IterationEnd,
            Outgoing::EngineStopped,
            Outgoing::Event(rejected.clone()),
        ] {
            tx.send(item).unwrap();
        }
        drop(tx);
        let mut wire = Vec::new();
        write_loop(&mut wire, &rx);

        let mut reader = wire.as_slice();
        let mut frames = Vec::new();
        while let Some(frame) = codec::read_frame::<FromWorker>(&mut reader, &mut Vec::new())
            .expect("the writer writes whole frames")
        {
            frames.push(frame);
        }
        assert_eq!(
            frames,
            vec![
                FromWorker::Events(vec![accepted(1), output(1, "a")]),
                FromWorker::Events(vec![output(1, "b")]),
                reply,
                FromWorker::Events(vec![accepted(2)]),
                FromWorker::Events(vec![rejected]),
            ]
        );
    }

    #[test]
    fn the_flush_hook_says_when_the_engine_is_gone() {
        let (tx, rx) = outbox();
        let mut hook = flush_hook(&tx);
        hook();
        drop(hook);
        assert!(matches!(rx.try_recv(), Ok(Outgoing::IterationEnd)));
        assert!(matches!(rx.try_recv(), Ok(Outgoing::EngineStopped)));
    }
}
