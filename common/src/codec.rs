//! Framing and encoding of protocol messages: one codec for both sides of the socket.
//!
//! A frame is tokio-util's [`LengthDelimitedCodec`] framing (a 4-byte big-endian length, at
//! most [`MAX_FRAME_BYTES`]) around a [postcard] body (its documented, stable wire format:
//! varint integers and lengths, varint enum tags; replaced bincode 1.3.3, unmaintained
//! upstream, at protocol version 15 — docs/PERFORMANCE.md, "Frame codec"). [`FrameCodec`] is
//! the async side (the router's `FramedRead`/`FramedWrite`); [`write_frame`], [`read_frame`]
//! and [`encode_into`] are the blocking twin (the worker's IPC threads, the benchmark), built
//! from the same [`encode_frame`]/[`decode_frame`] pair. The only module that names postcard
//! (keep it swappable).
//!
//! A hostile body cannot make decoding allocate beyond the frame: postcard reads a string or
//! byte string by borrowing that many bytes of the frame (too few is an error), and offers a
//! sequence's claimed length as a pre-allocation hint only when the frame still holds that
//! many bytes (serde caps the hint at 1 MiB besides).

use std::io::{Read, Write};
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Frames larger than this are refused on both sides.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix.
const HEADER_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn length_delimited() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(HEADER_BYTES)
        .big_endian()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

/// Appends one whole frame (header and body) of `message` to `dst`; on error nothing is
/// appended, so a message too large for a frame leaves no stray header behind.
///
/// Two passes, as bincode's did: the body's size first (a message too large for a frame is
/// refused before its body is allocated), then the body into a buffer of exactly that size
/// (cheaper than growing one: docs/PERFORMANCE.md, "Frame codec").
pub fn encode_frame<T: Serialize>(
    framing: &mut LengthDelimitedCodec,
    message: &T,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let malformed = |e: postcard::Error| CodecError::Malformed(e.to_string());
    let size = postcard::serialize_with_flavor(message, postcard::ser_flavors::Size::default())
        .map_err(malformed)?;
    if size > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge(size));
    }
    let mut body = vec![0; size];
    postcard::to_slice(message, &mut body).map_err(malformed)?;
    framing
        .encode(Bytes::from(body), dst)
        .map_err(CodecError::Io)
}

/// Takes one whole frame off the front of `src` and decodes it; `None` until a whole frame
/// is buffered. An oversized length prefix is an error before its body arrives.
pub fn decode_frame<T: DeserializeOwned>(
    framing: &mut LengthDelimitedCodec,
    src: &mut BytesMut,
) -> Result<Option<T>, CodecError> {
    let Some(body) = framing.decode(src).map_err(|e| too_large_or_io(e, src))? else {
        return Ok(None);
    };
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

/// LengthDelimitedCodec reports an oversized prefix as `InvalidData`; say which size.
fn too_large_or_io(e: std::io::Error, src: &BytesMut) -> CodecError {
    if e.kind() == std::io::ErrorKind::InvalidData && src.len() >= HEADER_BYTES {
        let mut header = [0u8; HEADER_BYTES];
        header.copy_from_slice(&src[..HEADER_BYTES]);
        return CodecError::TooLarge(u32::from_be_bytes(header) as usize);
    }
    CodecError::Io(e)
}

/// The async codec: decodes `In` frames, encodes `Out` frames (for `FramedRead`/`FramedWrite`).
pub struct FrameCodec<In, Out> {
    framing: LengthDelimitedCodec,
    _messages: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        Self {
            framing: length_delimited(),
            _messages: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In, Out> std::fmt::Debug for FrameCodec<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCodec").finish_non_exhaustive()
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        decode_frame(&mut self.framing, src)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, message: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(&mut self.framing, &message, dst)
    }
}

/// Appends one whole frame to `out` (blocking writers batch several frames per write).
pub fn encode_into<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut frame = BytesMut::new();
    encode_frame(&mut length_delimited(), message, &mut frame)?;
    out.extend_from_slice(&frame);
    Ok(())
}

/// Writes one frame to a blocking writer.
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), CodecError> {
    let mut buf = Vec::new();
    encode_into(message, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame from a blocking reader; `None` at a clean end of stream. Reads exactly one
/// frame's bytes (header, then body), so the reader keeps no state between calls; `buf` is
/// scratch space reused between calls.
pub fn read_frame<T: DeserializeOwned>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, CodecError> {
    let mut header = [0u8; HEADER_BYTES];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge(len));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(HEADER_BYTES + len, 0);
    r.read_exact(&mut buf[HEADER_BYTES..])?;
    let mut frame = BytesMut::from(&buf[..]);
    decode_frame(&mut length_delimited(), &mut frame)?
        .map(Some)
        .ok_or_else(|| CodecError::Malformed("a whole frame did not decode".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;
    use crate::*;

    /// Checks that `message` comes back whole through a frame, and that every shorter body (its
    /// header saying so) is a `Malformed` error, never a panic or another message.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(message: T) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &message).unwrap();
        let mut reader = wire.as_slice();
        let mut buf = Vec::new();
        let back: T = read_frame(&mut reader, &mut buf).unwrap().unwrap();
        assert_eq!(back, message);
        assert!(read_frame::<T>(&mut reader, &mut buf).unwrap().is_none());
        let body = &wire[HEADER_BYTES..];
        for cut in 0..body.len() {
            let mut short = (cut as u32).to_be_bytes().to_vec();
            short.extend_from_slice(&body[..cut]);
            let got = read_frame::<T>(&mut short.as_slice(), &mut buf);
            assert!(
                matches!(got, Err(CodecError::Malformed(_))),
                "{message:?} cut to {cut} bytes: {got:?}"
            );
        }
    }

    /// A frame of `body` as the other side would send it.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(body);
        wire
    }

    #[test]
    fn every_router_message_round_trips() {
        round_trip(ToWorker::Hello {
            version: PROTOCOL_VERSION,
        });
        for prompt in [
            Prompt::Text("hi ☕".into()),
            Prompt::Tokens(vec![1, 2, 3]),
            Prompt::Chat(ChatPrompt {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "x".into(),
                    ..ChatMessage::default()
                }],
                ending: ChatEnding::ContinueFinal,
                ..ChatPrompt::default()
            }),
        ] {
            round_trip(ToWorker::Generate(GenerateRequest {
                id: RequestId(7),
                request_id: "client-chosen id".into(),
                prompt,
                sampling: SamplingParams {
                    seed: Some(3),
                    logit_bias: vec![(5, -1.5)],
                    logprobs: Some(3),
                    ..SamplingParams::default()
                },
                stopping: StoppingParams {
                    max_tokens: Some(9),
                    stop: vec!["\n".into()],
                    ignore_eos: true,
                    cache_prompt: false,
                },
                resumed: vec![4],
                report_progress: true,
            }));
        }
        round_trip(ToWorker::Abort {
            ids: vec![RequestId(1), RequestId(2)],
        });
        round_trip(ToWorker::Ping { nonce: 9 });
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
        round_trip(ToWorker::Control {
            call: 4,
            body: ControlCall::Embed {
                input: EmbedInput::Parts(vec![
                    InputPart::Text("a".into()),
                    InputPart::Tokens(vec![1, 2]),
                ]),
                normalize: -1,
            },
        });
        round_trip(ToWorker::Control {
            call: 5,
            body: ControlCall::Embed {
                input: EmbedInput::Rerank {
                    query: "q".into(),
                    document: "d".into(),
                },
                normalize: 2,
            },
        });
        round_trip(ToWorker::Control {
            call: u64::MAX,
            body: ControlCall::ApplyTemplate {
                chat: ChatPrompt {
                    messages: vec![ChatMessage {
                        role: "system".into(),
                        content: "be brief".into(),
                        ..ChatMessage::default()
                    }],
                    ending: ChatEnding::AsRendered,
                    ..ChatPrompt::default()
                },
            },
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
                chat_template: "chatml".into(),
                eog_tokens: vec![2],
            },
            embedding: Some(crate::worker::Pooling::Mean),
        }));
        round_trip(FromWorker::Events(vec![
            GenerationEvent::Accepted { id: RequestId(1) },
            GenerationEvent::Output(SeqOutput {
                id: RequestId(1),
                tokens: vec![5],
                text: "é".into(),
                finish: None,
                logprobs: vec![TokenLogprob {
                    sampled: Candidate {
                        token: 5,
                        bytes: vec![0xc3],
                        logprob: -0.25,
                    },
                    top: vec![Candidate {
                        token: 6,
                        bytes: b"x".to_vec(),
                        logprob: -1.5,
                    }],
                }],
                progress: None,
                parsed: false,
                chat: Vec::new(),
            }),
            GenerationEvent::Output(SeqOutput::progress(
                RequestId(1),
                PromptProgress {
                    total: 9,
                    cache: 2,
                    processed: 6,
                    time_ms: 1.25,
                },
            )),
            GenerationEvent::Output(SeqOutput {
                id: RequestId(2),
                tokens: vec![],
                text: String::new(),
                logprobs: Vec::new(),
                progress: None,
                parsed: false,
                chat: Vec::new(),
                finish: Some(Finish {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: 3,
                        completion_tokens: 4,
                        cached_tokens: 2,
                    },
                    timings: Timings {
                        queue_ms: 0.5,
                        prompt_ms: 1.5,
                        predicted_ms: 2.5,
                    },
                    stop_word: None,
                }),
            }),
            GenerationEvent::Rejected {
                id: RequestId(3),
                error: RequestError::ExceedsContext {
                    n_prompt_tokens: 10,
                    n_requested: 5,
                    n_ctx: 12,
                },
            },
        ]));
        round_trip(FromWorker::Events(vec![GenerationEvent::Rejected {
            id: RequestId(4),
            error: RequestError::ChatTemplate("no template".into()),
        }]));
        round_trip(FromWorker::Progress(WorkerStats {
            steps: 7,
            last_step_unix_ms: 1_700_000_000_000,
            running: 2,
            waiting: 1,
            decode_calls: 99,
            kv_cells_used: 1234,
            packable: true,
            wide: true,
            threads_in_use: 2,
            shape_changes: 3,
        }));
        round_trip(FromWorker::Pong { nonce: 9 });
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
        round_trip(FromWorker::Control {
            call: 5,
            reply: ControlReply::Rendered {
                prompt: "<|im_start|>".into(),
            },
        });
        round_trip(FromWorker::Control {
            call: 6,
            reply: ControlReply::Embedded {
                vectors: vec![vec![0.5, -1.25], vec![]],
                n_tokens: 2,
            },
        });
        round_trip(FromWorker::Control {
            call: 7,
            reply: ControlReply::Refused(RequestError::DecodeFailed("x".into())),
        });
        for error in [
            RequestError::EmptyPrompt,
            RequestError::InvalidToken {
                token: -1,
                n_vocab: 49152,
            },
            RequestError::KvCacheFull,
            RequestError::DecodeFailed("ret -3".into()),
            RequestError::InvalidParam {
                param: "top_k".into(),
                message: "must be ≥ 0".into(),
            },
            RequestError::ShuttingDown,
            RequestError::DuplicateId(RequestId(u64::MAX)),
        ] {
            round_trip(FromWorker::Events(vec![GenerationEvent::Rejected {
                id: RequestId(5),
                error,
            }]));
        }
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

    /// The handshake survives a change of body encoding: `Hello` and the worker's `Fatal`
    /// refusal (a message under 128 bytes) are the same bytes in bincode 1.3.3, the encoding of
    /// protocol versions up to 14, and in postcard, so a router and a worker from either side of
    /// the change read each other's version and refuse each other by name, not as garbage.
    #[test]
    fn hello_and_fatal_read_as_bincode_1_wrote_them() {
        let hello_v14 = frame(&[0, 14]);
        let got: ToWorker = read_frame(&mut hello_v14.as_slice(), &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(got, ToWorker::Hello { version: 14 });
        let mut ours = Vec::new();
        write_frame(&mut ours, &ToWorker::Hello { version: 14 }).unwrap();
        assert_eq!(ours, hello_v14);

        let refusal = "protocol version mismatch: router speaks 15, worker speaks 14";
        let mut body = vec![5, refusal.len() as u8];
        body.extend_from_slice(refusal.as_bytes());
        let got: FromWorker = read_frame(&mut frame(&body).as_slice(), &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            FromWorker::Fatal {
                message: refusal.into()
            }
        );
    }

    /// A body that claims a sequence or string far longer than the frame is an error at once:
    /// the claim is never allocated for (tests/fuzz_codec.rs measures the allocations).
    #[test]
    fn a_claimed_length_beyond_the_frame_is_refused() {
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]; // u64::MAX
        let four_gib = [0xff, 0xff, 0xff, 0xff, 0x0f]; // u32::MAX
        for claim in [&huge[..], &four_gib[..]] {
            // `Abort { ids }`, `Control { Detokenize { tokens } }`, `Fatal { message }`.
            let abort = [&[2u8][..], claim, &[1, 2, 3]].concat();
            let detokenize = [&[3u8, 7, 1][..], claim, &[1]].concat();
            for body in [abort, detokenize] {
                let got = read_frame::<ToWorker>(&mut frame(&body).as_slice(), &mut Vec::new());
                assert!(matches!(got, Err(CodecError::Malformed(_))), "{got:?}");
            }
            let fatal = [&[5u8][..], claim, b"bye"].concat();
            let got = read_frame::<FromWorker>(&mut frame(&fatal).as_slice(), &mut Vec::new());
            assert!(matches!(got, Err(CodecError::Malformed(_))), "{got:?}");
        }
    }
}
