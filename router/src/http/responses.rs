//! OpenAI's Responses API, `POST /v1/responses` (and `/responses`): the request adapter
//! [`plan`] and the response adapter [`ResponsesReply`] on the one generation path
//! (`super::pipeline`). The bodies are [`crate::responses`]'s.
//!
//! A stream is SSE events named by their `type`, each with its `sequence_number`:
//! `response.created` and `response.in_progress` once the first output arrives (more
//! `response.in_progress` events with `prompt_progress` for `return_progress`), the message's
//! `output_item.added` and `content_part.added` with the first text, an `output_text.delta`
//! per piece (with `timings` for `timings_per_token`), then the `.done` events and
//! `response.completed` (with the request's `timings`, as llama-server).

use std::borrow::Cow;

use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::{Finish, SeqOutput};

use super::choices::Collected;
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::stream::{named, StreamFormat};
use super::SharedState;
use crate::error::ApiError;
use crate::openai::parsed::ParsedMessage;
use crate::openai::request::{parse_json, StreamReports};
use crate::openai::timings::{ProgressBody, RunningTimings, TimingsBody};
use crate::openai::Endpoint;
use crate::responses::request::ResponsesBody;
use crate::responses::response::{
    EventKind, FunctionCallItem, OutputItem, OutputText, ResponseHead, StreamEvent,
};

/// `POST /v1/responses`, logged as a chat request.
pub async fn responses(call: GenerationCall) -> Answer {
    let plan = async { plan(&call.state, &call.body) };
    serve(&call.state, &call.request_id, Endpoint::Chat, plan).await
}

/// The request adapter: the Responses body validated into one chat request.
fn plan(state: &SharedState, body: &[u8]) -> Result<Plan<ResponsesReply>, ApiError> {
    let body: ResponsesBody = parse_json(body)?;
    let valid = body.into_valid(&state.served, state.next_request_id())?;
    Ok(Plan {
        requests: vec![valid.generate],
        per_prompt: 1,
        stream: valid.stream,
        reply: ResponsesReply {
            head: ResponseHead::new(&state.served.alias),
            reports: valid.reports,
        },
    })
}

/// The response adapter of `/v1/responses`.
struct ResponsesReply {
    head: ResponseHead,
    reports: StreamReports,
}

impl Reply for ResponsesReply {
    type Stream = ResponsesStream;

    fn stream(self, _choices: usize) -> ResponsesStream {
        ResponsesStream {
            head: self.head,
            reports: self.reports,
            timings: RunningTimings::default(),
            numbers: Numbering::default(),
            started: false,
            text: None,
            parsed: None,
        }
    }

    async fn respond(self, collected: Vec<Collected>) -> Answer {
        let only = &collected[0];
        let body = self
            .head
            .completed(&only.text, only.parsed.as_ref(), &only.finish);
        Ok(Json(body).into_response())
    }
}

/// One streamed response's progress: whether it was announced, and the message's text so
/// far (`None` before its first text).
struct ResponsesStream {
    head: ResponseHead,
    reports: StreamReports,
    timings: RunningTimings,
    numbers: Numbering,
    started: bool,
    text: Option<String>,
    /// The answer as the worker parsed it (a chat format with reasoning or tool calls): the
    /// text streamed is its content; its calls are sent as items at the end.
    parsed: Option<ParsedMessage>,
}

/// The events' `sequence_number`s: 0, 1, … in the order they are sent.
#[derive(Default)]
struct Numbering(u64);

impl Numbering {
    /// `kind` as the next event, named by its type, with llama-server's extras.
    fn event(
        &mut self,
        kind: EventKind,
        timings: Option<TimingsBody>,
        prompt_progress: Option<ProgressBody>,
    ) -> Event {
        let name = kind.name();
        let event = StreamEvent {
            kind,
            sequence_number: self.0,
            timings,
            prompt_progress,
        };
        self.0 += 1;
        named(name, &event)
    }

    /// `response.created` and `response.in_progress`.
    fn announce(&mut self, head: &ResponseHead, events: &mut Vec<Event>) {
        let created = EventKind::Created {
            response: head.in_progress(),
        };
        events.push(self.event(created, None, None));
        let in_progress = EventKind::InProgress {
            response: head.in_progress(),
        };
        events.push(self.event(in_progress, None, None));
    }
}

impl StreamFormat for ResponsesStream {
    fn output(&mut self, _index: usize, _worker: usize, o: &SeqOutput) -> Vec<Event> {
        let (head, numbers) = (&self.head, &mut self.numbers);
        let mut events = Vec::new();
        if !std::mem::replace(&mut self.started, true) {
            numbers.announce(head, &mut events);
        }
        if o.is_progress() {
            if let Some((progress, running)) = self.timings.report(o, self.reports) {
                let in_progress = EventKind::InProgress {
                    response: head.in_progress(),
                };
                events.push(numbers.event(in_progress, running, Some(progress)));
            }
            return events;
        }
        self.timings.on_output(o);
        let piece = if o.parsed {
            let parsed = self.parsed.get_or_insert_with(ParsedMessage::default);
            o.chat.iter().for_each(|d| parsed.apply(d));
            Cow::Owned(
                o.chat
                    .iter()
                    .map(|d| d.content.as_str())
                    .collect::<String>(),
            )
        } else {
            Cow::Borrowed(o.text.as_str())
        };
        if piece.is_empty() {
            return events;
        }
        let text = self.text.get_or_insert_with(|| {
            let item = head.message(None, "in_progress");
            let added = EventKind::ItemAdded {
                output_index: 0,
                item,
            };
            events.push(numbers.event(added, None, None));
            let part = EventKind::PartAdded {
                item_id: &head.message_id,
                output_index: 0,
                content_index: 0,
                part: OutputText::new(""),
            };
            events.push(numbers.event(part, None, None));
            String::new()
        });
        text.push_str(&piece);
        let running = self.reports.timings.then(|| self.timings.body());
        let delta = EventKind::TextDelta {
            item_id: &head.message_id,
            output_index: 0,
            content_index: 0,
            delta: &piece,
        };
        events.push(numbers.event(delta, running, None));
        events
    }

    fn closing(&mut self, total: &Finish) -> Vec<Event> {
        let (head, numbers) = (&self.head, &mut self.numbers);
        let mut events = Vec::new();
        if !self.started {
            numbers.announce(head, &mut events);
        }
        let text = self.text.take();
        if let Some(text) = &text {
            let item_id = &head.message_id;
            let done = EventKind::TextDone {
                item_id,
                output_index: 0,
                content_index: 0,
                text,
            };
            events.push(numbers.event(done, None, None));
            let part = EventKind::PartDone {
                item_id,
                output_index: 0,
                content_index: 0,
                part: OutputText::new(text),
            };
            events.push(numbers.event(part, None, None));
            let item = head.message(Some(text), "completed");
            let item_done = EventKind::ItemDone {
                output_index: 0,
                item,
            };
            events.push(numbers.event(item_done, None, None));
        }
        let parsed = self.parsed.as_ref();
        for (i, call) in parsed.iter().flat_map(|p| &p.tool_calls).enumerate() {
            let output_index = i + usize::from(text.is_some());
            let added = EventKind::ItemAdded {
                output_index,
                item: OutputItem::FunctionCall(FunctionCallItem::new(call)),
            };
            events.push(numbers.event(added, None, None));
            let done = EventKind::ItemDone {
                output_index,
                item: OutputItem::FunctionCall(FunctionCallItem::new(call)),
            };
            events.push(numbers.event(done, None, None));
        }
        let response = head.completed(text.as_deref().unwrap_or(""), parsed, total);
        let timings = TimingsBody::finished(&total.usage, &total.timings);
        events.push(numbers.event(EventKind::Completed { response }, Some(timings), None));
        events
    }
}
