//! Anthropic's Messages API: `POST /v1/messages` (the request adapter [`plan`] and the
//! response adapter [`MessagesReply`] on the one generation path, `super::pipeline`) and
//! `POST /v1/messages/count_tokens`. The bodies are [`crate::anthropic`]'s.
//!
//! A stream is SSE events named by their `type`: `message_start` once the first output
//! arrives (the worker's first progress report tells the prompt's length), a text block
//! (`content_block_start`, `content_block_delta`s, `content_block_stop`) once there is text,
//! then `message_delta` and `message_stop`. An error after the start is the one error event.

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::{Finish, SeqOutput};
use serde::Serialize;

use super::choices::Collected;
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::stream::{named, StreamFormat};
use super::template::count_chat_tokens;
use super::{LimitedBody, SharedState};
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
            text_block: false,
        }
    }

    async fn respond(self, collected: Vec<Collected>) -> Answer {
        let only = &collected[0];
        Ok(Json(self.head.message(&only.text, &only.finish)).into_response())
    }
}

/// One streamed message's progress: whether `message_start` and the text block were sent.
struct MessagesStream {
    head: MessageHead,
    started: bool,
    text_block: bool,
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
        if !o.text.is_empty() {
            if !self.text_block {
                self.text_block = true;
                events.push(sse(&StreamEvent::ContentBlockStart {
                    index: 0,
                    content_block: ContentBlock::Text { text: "" },
                }));
            }
            events.push(sse(&StreamEvent::ContentBlockDelta {
                index: 0,
                delta: BlockDelta::TextDelta { text: &o.text },
            }));
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
        if self.text_block {
            events.push(sse(&StreamEvent::ContentBlockStop { index: 0 }));
        }
        events.push(sse(&StreamEvent::message_delta(total)));
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
    State(state): State<SharedState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<TokenCountBody>, ApiError> {
    let _permit = state.admit_control()?;
    let body: MessagesBody = parse_json(&body)?;
    let input_tokens = count_chat_tokens(&state, body.chat()?).await?;
    Ok(Json(TokenCountBody { input_tokens }))
}
