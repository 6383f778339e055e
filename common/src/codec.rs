//! Framing and encoding of protocol messages: a 4-byte big-endian length, then the message in
//! bincode. The only module that names bincode (unmaintained upstream; keep it swappable).

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Frames larger than this are refused on both sides.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_limit(MAX_FRAME_BYTES as u64)
        .allow_trailing_bytes()
}

/// Appends one whole frame (header and body) to `out`.
pub fn encode_into<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    use bincode::Options;
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = options().serialize_into(&mut *out, message) {
        out.truncate(start);
        return Err(CodecError::Malformed(e.to_string()));
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(CodecError::TooLarge(len));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads a frame header's body length, refusing oversized frames.
pub fn body_len(header: [u8; 4]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    use bincode::Options;
    options()
        .deserialize(body)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Writes one frame to a blocking writer.
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), CodecError> {
    let mut buf = Vec::new();
    encode_into(message, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame from a blocking reader; `None` at a clean end of stream.
pub fn read_frame<T: DeserializeOwned>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, CodecError> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(header)?;
    buf.resize(len, 0);
    r.read_exact(buf)?;
    decode(buf).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;
    use crate::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(message: T) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &message).unwrap();
        let mut reader = wire.as_slice();
        let mut buf = Vec::new();
        let back: T = read_frame(&mut reader, &mut buf).unwrap().unwrap();
        assert_eq!(back, message);
        assert!(read_frame::<T>(&mut reader, &mut buf).unwrap().is_none());
    }

    #[test]
    fn every_router_message_round_trips() {
        round_trip(ToWorker::Hello {
            version: PROTOCOL_VERSION,
        });
        for prompt in [
            Prompt::Text("hi ☕".into()),
            Prompt::Tokens(vec![1, 2, 3]),
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "x".into(),
            }]),
        ] {
            round_trip(ToWorker::Generate(GenerateRequest {
                id: RequestId(7),
                prompt,
                sampling: SamplingParams {
                    seed: Some(3),
                    logit_bias: vec![(5, -1.5)],
                    ..SamplingParams::default()
                },
                stopping: StoppingParams {
                    max_tokens: Some(9),
                    stop: vec!["\n".into()],
                    ignore_eos: true,
                },
                resume: vec![4],
            }));
        }
        round_trip(ToWorker::Abort {
            ids: vec![RequestId(1), RequestId(2)],
        });
        round_trip(ToWorker::Control {
            call: 1,
            body: ControlCall::Stats,
        });
        round_trip(ToWorker::Control {
            call: 2,
            body: ControlCall::Tokenize {
                content: "a b".into(),
                add_special: true,
                with_pieces: true,
            },
        });
        round_trip(ToWorker::Control {
            call: 3,
            body: ControlCall::Detokenize { tokens: vec![1] },
        });
        round_trip(ToWorker::Drain);
    }

    #[test]
    fn every_worker_message_round_trips() {
        round_trip(FromWorker::Ready(WorkerInfo {
            version: PROTOCOL_VERSION,
            pid: 42,
            cpus: vec![0, 1],
            threads: 2,
            slots: 8,
            n_ctx_per_seq: 1024,
            model: ModelInfo {
                n_ctx_train: 8192,
                n_params: 135,
                n_vocab: 49152,
                size: 98,
                has_chat_template: true,
            },
        }));
        round_trip(FromWorker::Outputs(vec![
            SeqOutput {
                id: RequestId(1),
                tokens: vec![5],
                text: "é".into(),
                finish: None,
            },
            SeqOutput {
                id: RequestId(2),
                tokens: vec![],
                text: String::new(),
                finish: Some(Finish {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: 3,
                        completion_tokens: 4,
                    },
                    timings: Timings {
                        queue_ms: 0.5,
                        prompt_ms: 1.5,
                        predicted_ms: 2.5,
                    },
                }),
            },
        ]));
        round_trip(FromWorker::Rejected {
            id: RequestId(3),
            error: RequestError::ExceedsContext {
                n_prompt_tokens: 10,
                n_requested: 5,
                n_ctx: 12,
            },
        });
        round_trip(FromWorker::Control {
            call: 1,
            reply: ControlReply::Stats(WorkerStats {
                slots: 2,
                ..WorkerStats::default()
            }),
        });
        round_trip(FromWorker::Control {
            call: 2,
            reply: ControlReply::Tokenized {
                tokens: vec![1, 2],
                pieces: Some(vec![b"a".to_vec(), vec![0xe2]]),
            },
        });
        round_trip(FromWorker::Control {
            call: 3,
            reply: ControlReply::Detokenized {
                content: "x".into(),
            },
        });
        round_trip(FromWorker::Control {
            call: 4,
            reply: ControlReply::Failed {
                message: "no".into(),
            },
        });
        round_trip(FromWorker::Fatal {
            message: "bye".into(),
        });
    }

    #[test]
    fn a_message_too_large_to_encode_leaves_nothing_behind() {
        let mut out = vec![7u8];
        let huge = FromWorker::Control {
            call: 1,
            reply: ControlReply::Detokenized {
                content: "x".repeat(MAX_FRAME_BYTES + 1),
            },
        };
        assert!(encode_into(&huge, &mut out).is_err());
        assert_eq!(out, vec![7u8]);
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let header = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(body_len(header), Err(CodecError::TooLarge(_))));
        let mut wire = header.to_vec();
        wire.extend_from_slice(&[0; 8]);
        assert!(read_frame::<ToWorker>(&mut wire.as_slice(), &mut Vec::new()).is_err());
        let mut wire = 2u32.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff]);
        assert!(matches!(
            read_frame::<ToWorker>(&mut wire.as_slice(), &mut Vec::new()),
            Err(CodecError::Malformed(_))
        ));
    }
}
