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

use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::{Finish, SeqOutput};

use super::choices::Collected;
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::stream::StreamFormat;
use super::SharedState;
use crate::error::ApiError;
use crate::openai::request::{parse_json, StreamReports};
use crate::openai::timings::{RunningTimings, TimingsBody};
use crate::openai::Endpoint;
use crate::responses::request::ResponsesBody;
use crate::responses::response::{EventKind, OutputText, ResponseHead, StreamEvent};

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
            next_sequence: 0,
            started: false,
            text: None,
        }
    }

    async fn respond(self, collected: Vec<Collected>) -> Answer {
        let only = &collected[0];
        Ok(Json(self.head.completed(&only.text, &only.finish)).into_response())
    }
}

/// One streamed response's progress: the next sequence number, whether it was announced,
/// and the message's text so far (`None` before its first text).
struct ResponsesStream {
    head: ResponseHead,
    reports: StreamReports,
    timings: RunningTimings,
    next_sequence: u64,
    started: bool,
    text: Option<String>,
}

impl ResponsesStream {
    /// `kind` as the next event, named by its type.
    fn event(&mut self, kind: EventKind, timings: Option<TimingsBody>) -> Event {
        let event = StreamEvent {
            kind,
            sequence_number: self.next_sequence,
            timings,
            prompt_progress: None,
        };
        self.next_sequence += 1;
        named(&event)
    }

    /// `response.created` and `response.in_progress`, once.
    fn announce(&mut self, events: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        let head = self.head.clone();
        events.push(self.event(
            EventKind::Created {
                response: head.in_progress(),
            },
            None,
        ));
        events.push(self.event(
            EventKind::InProgress {
                response: head.in_progress(),
            },
            None,
        ));
    }
}

fn named(event: &StreamEvent) -> Event {
    let json = serde_json::to_string(event).expect("response bodies serialize");
    Event::default().event(event.kind.name()).data(json)
}

impl StreamFormat for ResponsesStream {
    fn output(&mut self, _index: usize, _worker: usize, o: &SeqOutput) -> Vec<Event> {
        let mut events = Vec::new();
        self.announce(&mut events);
        let head = self.head.clone();
        if o.is_progress() {
            if let Some((progress, running)) = self.timings.report(o, self.reports) {
                let event = StreamEvent {
                    kind: EventKind::InProgress {
                        response: head.in_progress(),
                    },
                    sequence_number: self.next_sequence,
                    timings: running,
                    prompt_progress: Some(progress),
                };
                self.next_sequence += 1;
                events.push(named(&event));
            }
            return events;
        }
        self.timings.on_output(o);
        if o.text.is_empty() {
            return events;
        }
        if self.text.is_none() {
            self.text = Some(String::new());
            let item = head.message(None, "in_progress");
            events.push(self.event(
                EventKind::ItemAdded {
                    output_index: 0,
                    item,
                },
                None,
            ));
            let part = EventKind::PartAdded {
                item_id: &head.message_id,
                output_index: 0,
                content_index: 0,
                part: OutputText::new(""),
            };
            events.push(self.event(part, None));
        }
        if let Some(text) = self.text.as_mut() {
            text.push_str(&o.text);
        }
        let running = self.reports.timings.then(|| self.timings.body());
        let delta = EventKind::TextDelta {
            item_id: &head.message_id,
            output_index: 0,
            content_index: 0,
            delta: &o.text,
        };
        events.push(self.event(delta, running));
        events
    }

    fn closing(&mut self, total: &Finish) -> Vec<Event> {
        let mut events = Vec::new();
        self.announce(&mut events);
        let head = self.head.clone();
        let text = self.text.take();
        if let Some(text) = &text {
            let ids = (&head.message_id, 0, 0);
            events.push(self.event(
                EventKind::TextDone {
                    item_id: ids.0,
                    output_index: ids.1,
                    content_index: ids.2,
                    text,
                },
                None,
            ));
            events.push(self.event(
                EventKind::PartDone {
                    item_id: ids.0,
                    output_index: ids.1,
                    content_index: ids.2,
                    part: OutputText::new(text),
                },
                None,
            ));
            let item = head.message(Some(text), "completed");
            events.push(self.event(
                EventKind::ItemDone {
                    output_index: 0,
                    item,
                },
                None,
            ));
        }
        let response = head.completed(text.as_deref().unwrap_or(""), total);
        let timings = TimingsBody::finished(&total.usage, &total.timings);
        events.push(self.event(EventKind::Completed { response }, Some(timings)));
        events
    }
}
