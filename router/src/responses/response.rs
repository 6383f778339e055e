//! The Responses API's shapes, as types serialized once: the `response` object
//! ([`ResponseBody`]) and the stream's events ([`StreamEvent`], each sent as an SSE event
//! named by its `type`), in llama-server's order: `response.created` and
//! `response.in_progress` with the first output, `response.output_item.added` and
//! `response.content_part.added` with the first text, one `response.output_text.delta` per
//! piece, then `response.output_text.done`, `response.content_part.done`,
//! `response.output_item.done` and `response.completed`. Every event has OpenAI's
//! `sequence_number`.

use llamapool_common::{Finish, ToolCall, Usage};
use serde::Serialize;

use crate::openai::parsed::ParsedMessage;
use crate::openai::timings::{ProgressBody, TimingsBody};

/// The `response` object: whole (non-streamed, `response.completed`) or, while a stream
/// runs, without output and usage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseBody<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created_at: u64,
    /// `in_progress`, then `completed` (also for a generation ended by its token limit, as
    /// llama-server reports it).
    pub status: &'static str,
    pub model: &'a str,
    pub output: Vec<OutputItem<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<ResponseUsage>,
}

/// An output item: the model's reasoning, the assistant's message, or a tool call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OutputItem<'a> {
    Message(MessageItem<'a>),
    FunctionCall(FunctionCallItem<'a>),
    Reasoning(ReasoningItem<'a>),
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageItem<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: &'a str,
    pub status: &'static str,
    pub role: &'static str,
    pub content: Vec<OutputText<'a>>,
}

/// A tool call: `{"type": "function_call", "id": "fc_…", "call_id", "name", "arguments"}`;
/// the client answers it with a `function_call_output` item naming `call_id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCallItem<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub status: &'static str,
    pub call_id: &'a str,
    pub name: &'a str,
    pub arguments: &'a str,
}

impl<'a> FunctionCallItem<'a> {
    pub fn new(call: &'a ToolCall) -> Self {
        Self {
            kind: "function_call",
            id: format!("fc_{}", call.id),
            status: "completed",
            call_id: &call.id,
            name: &call.name,
            arguments: &call.arguments,
        }
    }
}

/// The model's reasoning, when the chat format separates it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasoningItem<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub summary: [(); 0],
    pub content: [ReasoningText<'a>; 1],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasoningText<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: &'a str,
}

/// A message's text part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputText<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: &'a str,
    pub annotations: [(); 0],
    pub logprobs: [(); 0],
}

impl<'a> OutputText<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: [],
            logprobs: [],
        }
    }
}

/// The response's `usage`, OpenAI's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub total_tokens: u32,
    pub input_tokens_details: InputDetails,
    pub output_tokens_details: OutputDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InputDetails {
    pub cached_tokens: u32,
}

/// Always 0: reasoning is not separated yet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutputDetails {
    pub reasoning_tokens: u32,
}

impl From<&Usage> for ResponseUsage {
    fn from(u: &Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            total_tokens: u.total_tokens(),
            input_tokens_details: InputDetails {
                cached_tokens: u.cached_tokens,
            },
            output_tokens_details: OutputDetails {
                reasoning_tokens: 0,
            },
        }
    }
}

/// What every body of one response shares: its id, its message's id, model and time.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub id: String,
    pub message_id: String,
    pub model: String,
    pub created_at: u64,
}

impl ResponseHead {
    pub fn new(model: &str) -> Self {
        let (response, message): (u64, u64) = (rand::random(), rand::random());
        Self {
            id: format!("resp_{response:016x}"),
            message_id: format!("msg_{message:016x}"),
            model: model.to_owned(),
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// The assistant's message holding `text` (no part while there is no text yet).
    pub fn message<'a>(&'a self, text: Option<&'a str>, status: &'static str) -> OutputItem<'a> {
        OutputItem::Message(MessageItem {
            kind: "message",
            id: &self.message_id,
            status,
            role: "assistant",
            content: text.map(OutputText::new).into_iter().collect(),
        })
    }

    /// The response while it runs: no output, no usage.
    pub fn in_progress(&self) -> ResponseBody<'_> {
        ResponseBody {
            id: &self.id,
            object: "response",
            created_at: self.created_at,
            status: "in_progress",
            model: &self.model,
            output: Vec::new(),
            usage: None,
        }
    }

    /// The finished response and its usage: the parsed answer's reasoning, message and tool
    /// calls when the worker parsed it, else the message; a message only for text.
    pub fn completed<'a>(
        &'a self,
        text: &'a str,
        parsed: Option<&'a ParsedMessage>,
        finish: &Finish,
    ) -> ResponseBody<'a> {
        let mut output = Vec::new();
        let content = parsed.map_or(text, |p| p.content.as_str());
        if let Some(parsed) = parsed.filter(|p| !p.reasoning.is_empty()) {
            output.push(OutputItem::Reasoning(ReasoningItem {
                kind: "reasoning",
                id: format!("rs_{}", &self.message_id[4..]),
                summary: [],
                content: [ReasoningText {
                    kind: "reasoning_text",
                    text: &parsed.reasoning,
                }],
            }));
        }
        if !content.is_empty() {
            output.push(self.message(Some(content), "completed"));
        }
        if let Some(parsed) = parsed {
            output.extend(
                parsed
                    .tool_calls
                    .iter()
                    .map(|c| OutputItem::FunctionCall(FunctionCallItem::new(c))),
            );
        }
        ResponseBody {
            status: "completed",
            output,
            usage: Some(ResponseUsage::from(&finish.usage)),
            ..self.in_progress()
        }
    }
}

/// One event of a streamed response, with the numbers OpenAI's events carry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamEvent<'a> {
    #[serde(flatten)]
    pub kind: EventKind<'a>,
    pub sequence_number: u64,
    /// llama-server's: the `timings` so far (`timings_per_token`, and `response.completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsBody>,
    /// llama-server's: a progress report (`return_progress`), on `response.in_progress`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_progress: Option<ProgressBody>,
}

/// What an event says, by `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum EventKind<'a> {
    #[serde(rename = "response.created")]
    Created { response: ResponseBody<'a> },
    #[serde(rename = "response.in_progress")]
    InProgress { response: ResponseBody<'a> },
    #[serde(rename = "response.output_item.added")]
    ItemAdded {
        output_index: usize,
        item: OutputItem<'a>,
    },
    #[serde(rename = "response.content_part.added")]
    PartAdded {
        item_id: &'a str,
        output_index: usize,
        content_index: usize,
        part: OutputText<'a>,
    },
    #[serde(rename = "response.output_text.delta")]
    TextDelta {
        item_id: &'a str,
        output_index: usize,
        content_index: usize,
        delta: &'a str,
    },
    #[serde(rename = "response.output_text.done")]
    TextDone {
        item_id: &'a str,
        output_index: usize,
        content_index: usize,
        text: &'a str,
    },
    #[serde(rename = "response.content_part.done")]
    PartDone {
        item_id: &'a str,
        output_index: usize,
        content_index: usize,
        part: OutputText<'a>,
    },
    #[serde(rename = "response.output_item.done")]
    ItemDone {
        output_index: usize,
        item: OutputItem<'a>,
    },
    #[serde(rename = "response.completed")]
    Completed { response: ResponseBody<'a> },
}

impl EventKind<'_> {
    /// The SSE event name: the `type`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::ItemAdded { .. } => "response.output_item.added",
            Self::PartAdded { .. } => "response.content_part.added",
            Self::TextDelta { .. } => "response.output_text.delta",
            Self::TextDone { .. } => "response.output_text.done",
            Self::PartDone { .. } => "response.content_part.done",
            Self::ItemDone { .. } => "response.output_item.done",
            Self::Completed { .. } => "response.completed",
        }
    }
}

#[cfg(test)]
mod tests {
    use llamapool_common::{FinishReason, Timings};
    use serde_json::{json, Value};

    use super::*;

    fn json_of(value: impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn a_response_has_openais_shape() {
        let head = ResponseHead::new("m");
        let finish = Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 9,
                completion_tokens: 3,
                cached_tokens: 2,
            },
            timings: Timings::default(),
            stop_word: None,
        };
        let body = json_of(head.completed("Hi", None, &finish));
        assert_eq!(
            body,
            json!({"id": head.id, "object": "response", "created_at": head.created_at,
                   "status": "completed", "model": "m",
                   "output": [{"type": "message", "id": head.message_id, "status": "completed",
                               "role": "assistant",
                               "content": [{"type": "output_text", "text": "Hi",
                                            "annotations": [], "logprobs": []}]}],
                   "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12,
                             "input_tokens_details": {"cached_tokens": 2},
                             "output_tokens_details": {"reasoning_tokens": 0}}})
        );
        assert!(head.id.starts_with("resp_") && head.message_id.starts_with("msg_"));
        let event = StreamEvent {
            kind: EventKind::TextDelta {
                item_id: &head.message_id,
                output_index: 0,
                content_index: 0,
                delta: "Hi",
            },
            sequence_number: 4,
            timings: None,
            prompt_progress: None,
        };
        assert_eq!(event.kind.name(), "response.output_text.delta");
        assert_eq!(
            json_of(event),
            json!({"type": "response.output_text.delta", "item_id": head.message_id,
                   "output_index": 0, "content_index": 0, "delta": "Hi", "sequence_number": 4})
        );
        let started = json_of(head.in_progress());
        assert_eq!(started["output"], json!([]));
        assert!(started.get("usage").is_none());
    }
}
