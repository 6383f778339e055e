//! Anthropic's response shapes, as types serialized once: the whole `message`
//! ([`MessageBody`]) and the stream's events ([`StreamEvent`], each sent as an SSE event named
//! by its `type`), in llama-server's `to_json_anthropic` / `to_json_anthropic_stream` order:
//! `message_start` with the first output, a text block's `content_block_start` with its first
//! text, `content_block_delta`s, then `content_block_stop`, `message_delta` (stop reason and
//! output tokens) and `message_stop`.

use llamapool_common::{Finish, FinishReason, ToolCall, Usage};
use serde::Serialize;
use serde_json::Value;

use crate::openai::parsed::ParsedMessage;

/// A whole message (non-streamed), or the `message` of `message_start` (no content yet).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageBody<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub content: Vec<ContentBlock<'a>>,
    pub model: &'a str,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<&'a str>,
    pub usage: MessageUsage,
}

/// A content block of a message: the model's reasoning (`thinking`, with the empty
/// `signature` llama-server sends), text, or a tool call (`tool_use`, its arguments parsed
/// into `input`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'static str,
    },
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
}

impl<'a> ContentBlock<'a> {
    /// A tool call as a `tool_use` block: its arguments parsed (`{}` when they are not JSON).
    pub fn tool_use(call: &'a ToolCall) -> Self {
        Self::ToolUse {
            id: &call.id,
            name: &call.name,
            input: serde_json::from_str(&call.arguments)
                .unwrap_or_else(|_| Value::Object(Default::default())),
        }
    }

    /// The blocks of an answer: thinking, text (unless empty), then each tool call.
    fn of_answer(text: &'a str, parsed: Option<&'a ParsedMessage>) -> Vec<Self> {
        let Some(parsed) = parsed else {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Self::Text { text }]
            };
        };
        let mut blocks = Vec::new();
        if !parsed.reasoning.is_empty() {
            blocks.push(Self::Thinking {
                thinking: &parsed.reasoning,
                signature: "",
            });
        }
        if !parsed.content.is_empty() {
            blocks.push(Self::Text {
                text: &parsed.content,
            });
        }
        blocks.extend(parsed.tool_calls.iter().map(Self::tool_use));
        blocks
    }
}

/// A message's `usage`: prompt tokens evaluated (`input_tokens`) and reused from the cache
/// (`cache_read_input_tokens`) counted apart, as Anthropic and llama-server count them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MessageUsage {
    pub input_tokens: u32,
    pub cache_read_input_tokens: u32,
    pub output_tokens: u32,
}

impl MessageUsage {
    pub fn of(usage: &Usage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens.saturating_sub(usage.cached_tokens),
            cache_read_input_tokens: usage.cached_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

/// `stop_reason`: `tool_use` for a stopped answer that made tool calls, `end_turn` for an
/// end-of-generation token, `stop_sequence` for a stop string, `max_tokens` for the token
/// limit (and a full context).
pub fn stop_reason(finish: &Finish, made_calls: bool) -> &'static str {
    match (finish.reason, &finish.stop_word) {
        (FinishReason::Stop, _) if made_calls => "tool_use",
        (FinishReason::Stop, Some(_)) => "stop_sequence",
        (FinishReason::Stop, None) => "end_turn",
        (FinishReason::Length | FinishReason::Cancelled, _) => "max_tokens",
    }
}

/// The identity every body of one message shares.
#[derive(Debug, Clone)]
pub struct MessageHead {
    pub id: String,
    pub model: String,
}

impl MessageHead {
    pub fn new(model: &str) -> Self {
        let random: u64 = rand::random();
        Self {
            id: format!("msg_{random:016x}"),
            model: model.to_owned(),
        }
    }

    /// The whole message ended by `finish`: the parsed answer's blocks when the worker parsed
    /// it, else one text block (none for empty text).
    pub fn message<'a>(
        &'a self,
        text: &'a str,
        parsed: Option<&'a ParsedMessage>,
        finish: &'a Finish,
    ) -> MessageBody<'a> {
        let made_calls = parsed.is_some_and(ParsedMessage::made_calls);
        MessageBody {
            id: &self.id,
            kind: "message",
            role: "assistant",
            content: ContentBlock::of_answer(text, parsed),
            model: &self.model,
            stop_reason: Some(stop_reason(finish, made_calls)),
            stop_sequence: finish.stop_word.as_deref(),
            usage: MessageUsage::of(&finish.usage),
        }
    }

    /// `message_start`: the message without content, its prompt's tokens (`prompt` in all,
    /// `cached` of them reused) and no output yet.
    pub fn start(&self, prompt: u32, cached: u32) -> StreamEvent<'_> {
        StreamEvent::MessageStart {
            message: MessageBody {
                id: &self.id,
                kind: "message",
                role: "assistant",
                content: Vec::new(),
                model: &self.model,
                stop_reason: None,
                stop_sequence: None,
                usage: MessageUsage {
                    input_tokens: prompt.saturating_sub(cached),
                    cache_read_input_tokens: cached,
                    output_tokens: 0,
                },
            },
        }
    }
}

/// One event of a streamed message; its `type` is also the SSE event's name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent<'a> {
    MessageStart {
        message: MessageBody<'a>,
    },
    ContentBlockStart {
        index: usize,
        content_block: ContentBlock<'a>,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: MessageDeltaBody<'a>,
        usage: OutputUsage,
    },
    MessageStop,
}

impl StreamEvent<'_> {
    /// The SSE event name: the `type`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop => "message_stop",
        }
    }
}

/// A block's piece of text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    ThinkingDelta { thinking: &'a str },
    SignatureDelta { signature: &'static str },
    InputJsonDelta { partial_json: &'a str },
}

/// `message_delta`'s `delta`: how the message ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageDeltaBody<'a> {
    pub stop_reason: &'static str,
    pub stop_sequence: Option<&'a str>,
}

/// `message_delta`'s `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutputUsage {
    pub output_tokens: u32,
}

impl<'a> StreamEvent<'a> {
    /// `message_delta` for a message ended by `finish` (`made_calls`: it made tool calls).
    pub fn message_delta(finish: &'a Finish, made_calls: bool) -> Self {
        Self::MessageDelta {
            delta: MessageDeltaBody {
                stop_reason: stop_reason(finish, made_calls),
                stop_sequence: finish.stop_word.as_deref(),
            },
            usage: OutputUsage {
                output_tokens: finish.usage.completion_tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use llamapool_common::Timings;
    use serde_json::{json, Value};

    use super::*;

    fn json_of(value: impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

    fn finish(stop_word: Option<&str>) -> Finish {
        Finish {
            reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 9,
                completion_tokens: 3,
                cached_tokens: 2,
            },
            timings: Timings::default(),
            stop_word: stop_word.map(str::to_owned),
        }
    }

    #[test]
    fn a_message_has_anthropics_shape() {
        let head = MessageHead::new("m");
        let end = finish(None);
        let body = json_of(head.message("Hi", None, &end));
        assert_eq!(
            body,
            json!({"id": head.id, "type": "message", "role": "assistant",
                   "content": [{"type": "text", "text": "Hi"}], "model": "m",
                   "stop_reason": "end_turn", "stop_sequence": null,
                   "usage": {"input_tokens": 7, "cache_read_input_tokens": 2, "output_tokens": 3}})
        );
        assert!(head.id.starts_with("msg_"));
        let stopped = finish(Some("END"));
        let body = json_of(head.message("", None, &stopped));
        assert_eq!(body["content"], json!([]));
        assert_eq!(body["stop_reason"], "stop_sequence");
        assert_eq!(body["stop_sequence"], "END");
    }

    #[test]
    fn stream_events_are_typed_and_named() {
        let head = MessageHead::new("m");
        let start = head.start(9, 2);
        assert_eq!(start.name(), "message_start");
        let start = json_of(start);
        assert_eq!(start["type"], "message_start");
        assert_eq!(start["message"]["content"], json!([]));
        assert_eq!(start["message"]["stop_reason"], Value::Null);
        assert_eq!(start["message"]["usage"]["input_tokens"], 7);
        let block = StreamEvent::ContentBlockStart {
            index: 0,
            content_block: ContentBlock::Text { text: "" },
        };
        assert_eq!(
            json_of(block),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        );
        let delta = StreamEvent::ContentBlockDelta {
            index: 0,
            delta: BlockDelta::TextDelta { text: "Hi" },
        };
        assert_eq!(
            json_of(delta),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})
        );
        let end = finish(None);
        assert_eq!(
            json_of(StreamEvent::message_delta(&end, false)),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": 3}})
        );
        assert_eq!(
            json_of(StreamEvent::MessageStop),
            json!({"type": "message_stop"})
        );
        assert_eq!(
            StreamEvent::ContentBlockStop { index: 0 }.name(),
            "content_block_stop"
        );
    }
}
