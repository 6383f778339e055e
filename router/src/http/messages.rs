//! Anthropic's Messages API: `POST /v1/messages` (the request adapter [`plan`] and the
//! response adapter [`MessagesReply`] on the one generation path, `super::pipeline`) and
//! `POST /v1/messages/count_tokens`. The bodies are [`crate::anthropic`]'s.
//!
//! A stream is SSE events named by their `type`: `message_start` once the first output
//! arrives (the worker's first progress report tells the prompt's length), then the answer's
//! blocks as they start (`thinking`, `text`, one `tool_use` per call, each opened by
//! `content_block_start` and fed by `content_block_delta`s), every block's
//! `content_block_stop` at the end, then `message_delta` and `message_stop`, as llama-server
//! orders them. An error after the start is the one error event.

use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::{ChatDelta, Finish, SeqOutput, ToolCallDelta};
use serde::Serialize;
use serde_json::Value;

use super::choices::Collected;
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::stream::{named, StreamFormat};
use super::template::count_chat_tokens;
use super::{LimitedBody, Scoped, SharedState};
use crate::anthropic::request::MessagesBody;
use crate::anthropic::response::{BlockDelta, ContentBlock, MessageHead, StreamEvent};
use crate::error::ApiError;
use crate::openai::request::parse_json;
use crate::openai::Endpoint;

/// `POST /v1/messages`, logged as a chat request.
pub async fn messages(call: GenerationCall) -> Answer {
    let plan = async { plan(&call.state, &call.body) };
    serve(&call.state, &call.request_id, Endpoint::Chat, plan).await
}

/// The request adapter: the Messages body validated into one chat request.
fn plan(state: &SharedState, body: &[u8]) -> Result<Plan<MessagesReply>, ApiError> {
    let body: MessagesBody = parse_json(body)?;
    let valid = body.into_valid(&state.served, state.next_request_id())?;
    Ok(Plan {
        requests: vec![valid.generate],
        per_prompt: 1,
        stream: valid.stream,
        reply: MessagesReply {
            head: MessageHead::new(&state.served.alias),
        },
    })
}

/// The response adapter of `/v1/messages`.
struct MessagesReply {
    head: MessageHead,
}

impl Reply for MessagesReply {
    type Stream = MessagesStream;

    fn stream(self, _choices: usize) -> MessagesStream {
        MessagesStream {
            head: self.head,
            started: false,
            blocks: Blocks::default(),
        }
    }

    async fn respond(self, collected: Vec<Collected>) -> Answer {
        let only = &collected[0];
        let body = self
            .head
            .message(&only.text, only.parsed.as_ref(), &only.finish);
        Ok(Json(body).into_response())
    }
}

/// One streamed message's progress: whether `message_start` was sent, and its blocks.
struct MessagesStream {
    head: MessageHead,
    started: bool,
    blocks: Blocks,
}

/// The content blocks a stream opened, by the index each got in the order they started
/// (they are all closed at the end, as llama-server does).
#[derive(Default)]
struct Blocks {
    opened: usize,
    thinking: Option<usize>,
    text: Option<usize>,
    /// Per tool call (by its index in the message): its block.
    tools: Vec<usize>,
}

impl Blocks {
    fn open(&mut self) -> usize {
        self.opened += 1;
        self.opened - 1
    }

    /// The events of some `text`: the text block's start the first time, then the delta.
    fn text(&mut self, text: &str, events: &mut Vec<Event>) {
        let index = match self.text {
            Some(index) => index,
            None => {
                let index = self.open();
                self.text = Some(index);
                events.push(sse(&StreamEvent::ContentBlockStart {
                    index,
                    content_block: ContentBlock::Text { text: "" },
                }));
                index
            }
        };
        events.push(sse(&StreamEvent::ContentBlockDelta {
            index,
            delta: BlockDelta::TextDelta { text },
        }));
    }

    /// The events of one parsed change: thinking, text or a tool call's part.
    fn delta(&mut self, delta: &ChatDelta, events: &mut Vec<Event>) {
        if !delta.reasoning.is_empty() {
            let index = match self.thinking {
                Some(index) => index,
                None => {
                    let index = self.open();
                    self.thinking = Some(index);
                    events.push(sse(&StreamEvent::ContentBlockStart {
                        index,
                        content_block: ContentBlock::Thinking {
                            thinking: "",
                            signature: "",
                        },
                    }));
                    index
                }
            };
            events.push(sse(&StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::ThinkingDelta {
                    thinking: &delta.reasoning,
                },
            }));
        }
        if !delta.content.is_empty() {
            self.text(&delta.content, events);
        }
        if let Some(call) = &delta.tool_call {
            self.tool_call(call, events);
        }
    }

    fn tool_call(&mut self, call: &ToolCallDelta, events: &mut Vec<Event>) {
        let at = call.index as usize;
        let index = match self.tools.get(at) {
            Some(&index) => index,
            // Calls come in order; a gap would be a worker's bug, not a client's.
            None if at == self.tools.len() => {
                let index = self.open();
                self.tools.push(index);
                events.push(sse(&StreamEvent::ContentBlockStart {
                    index,
                    content_block: ContentBlock::ToolUse {
                        id: &call.id,
                        name: &call.name,
                        input: Value::Object(Default::default()),
                    },
                }));
                index
            }
            None => return,
        };
        if !call.arguments.is_empty() {
            events.push(sse(&StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta {
                    partial_json: &call.arguments,
                },
            }));
        }
    }

    /// The end of every block, the thinking block's (empty) signature first.
    fn close(&self, events: &mut Vec<Event>) {
        if let Some(index) = self.thinking {
            events.push(sse(&StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::SignatureDelta { signature: "" },
            }));
        }
        for index in 0..self.opened {
            events.push(sse(&StreamEvent::ContentBlockStop { index }));
        }
    }
}

/// A Messages event as an SSE event named by its `type`.
fn sse(event: &StreamEvent) -> Event {
    named(event.name(), event)
}

impl StreamFormat for MessagesStream {
    fn output(&mut self, _index: usize, _worker: usize, o: &SeqOutput) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            // The first output is the worker's first progress report (the stream asked for
            // them), unless a resumed request's worker, which sends none, gives a token first.
            let (prompt, cached) = o.progress.map_or((0, 0), |p| (p.total, p.cache));
            events.push(sse(&self.head.start(prompt, cached)));
        }
        if o.parsed {
            for delta in &o.chat {
                self.blocks.delta(delta, &mut events);
            }
        } else if !o.text.is_empty() {
            self.blocks.text(&o.text, &mut events);
        }
        events
    }

    fn closing(&mut self, total: &Finish) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.started {
            events.push(sse(&self
                .head
                .start(total.usage.prompt_tokens, total.usage.cached_tokens)));
        }
        self.blocks.close(&mut events);
        let made_calls = !self.blocks.tools.is_empty();
        events.push(sse(&StreamEvent::message_delta(total, made_calls)));
        events.push(sse(&StreamEvent::MessageStop));
        events
    }
}

/// `POST /v1/messages/count_tokens`' answer.
#[derive(Debug, Serialize)]
pub struct TokenCountBody {
    pub input_tokens: usize,
}

/// `POST /v1/messages/count_tokens`: the prompt tokens a Messages request with this `system`
/// and these `messages` would have (rendered and tokenized by a worker, as for generation);
/// `max_tokens` is not needed. Holds a tokenize-call permit.
pub async fn count_tokens(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Json<TokenCountBody>, ApiError> {
    let _permit = state.admit_control()?;
    let body: MessagesBody = parse_json(&body)?;
    let chat = body.chat(&state.served.defaults)?;
    let input_tokens = count_chat_tokens(&state, chat).await?;
    Ok(Json(TokenCountBody { input_tokens }))
}
