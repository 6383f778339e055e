//! A chat answer as the worker's output parser (llama.cpp's chat parser) reported it: the
//! content, the reasoning and the tool calls, put together from the [`ChatDelta`]s of a
//! choice's outputs; and the OpenAI bodies of its tool calls, whole and as stream deltas.

use llamapool_common::{ChatDelta, ToolCall, ToolCallDelta};
use serde::Serialize;

/// The most tool calls one answer may hold: a delta naming a later index is dropped.
const MAX_TOOL_CALLS: usize = 256;

/// One choice's parsed answer so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMessage {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedMessage {
    /// Adds one delta: text appended, a tool call started or its arguments extended.
    pub fn apply(&mut self, delta: &ChatDelta) {
        self.reasoning.push_str(&delta.reasoning);
        self.content.push_str(&delta.content);
        let Some(call) = &delta.tool_call else {
            return;
        };
        let index = call.index as usize;
        if index >= MAX_TOOL_CALLS {
            return;
        }
        if self.tool_calls.len() <= index {
            self.tool_calls.resize_with(index + 1, ToolCall::default);
        }
        let into = &mut self.tool_calls[index];
        if !call.id.is_empty() {
            into.id.clone_from(&call.id);
        }
        if !call.name.is_empty() {
            into.name.clone_from(&call.name);
        }
        into.arguments.push_str(&call.arguments);
    }

    /// The finish reason a stopped answer gets: `tool_calls` when it made any.
    pub fn made_calls(&self) -> bool {
        !self.tool_calls.is_empty()
    }
}

/// A whole tool call: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallReply<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionReply<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionReply<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

impl<'a> From<&'a ToolCall> for ToolCallReply<'a> {
    fn from(call: &'a ToolCall) -> Self {
        Self {
            id: &call.id,
            kind: "function",
            function: FunctionReply {
                name: &call.name,
                arguments: &call.arguments,
            },
        }
    }
}

/// A tool call's stream delta, as llama-server sends it: `index` always; `id` and `type` with
/// the call's first delta; `name` and `arguments` when not empty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDeltaReply<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDeltaReply<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionDeltaReply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a str>,
}

impl<'a> From<&'a ToolCallDelta> for ToolCallDeltaReply<'a> {
    fn from(call: &'a ToolCallDelta) -> Self {
        let some = |s: &'a String| (!s.is_empty()).then_some(s.as_str());
        Self {
            index: call.index,
            id: some(&call.id),
            kind: some(&call.id).map(|_| "function"),
            function: FunctionDeltaReply {
                name: some(&call.name),
                arguments: some(&call.arguments),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(index: u32, id: &str, name: &str, arguments: &str) -> ChatDelta {
        ChatDelta {
            tool_call: Some(ToolCallDelta {
                index,
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            }),
            ..ChatDelta::default()
        }
    }

    #[test]
    fn deltas_build_the_message() {
        let mut m = ParsedMessage::default();
        m.apply(&ChatDelta {
            reasoning: "think".into(),
            ..ChatDelta::default()
        });
        m.apply(&ChatDelta {
            content: "Hi".into(),
            ..ChatDelta::default()
        });
        m.apply(&call(0, "a1", "f", "{\"x\""));
        m.apply(&call(0, "", "", ": 1}"));
        m.apply(&call(1, "b2", "g", "{}"));
        m.apply(&call(MAX_TOOL_CALLS as u32, "c", "h", "{}"));
        assert_eq!(m.reasoning, "think");
        assert_eq!(m.content, "Hi");
        assert_eq!(
            m.tool_calls,
            vec![
                ToolCall {
                    id: "a1".into(),
                    name: "f".into(),
                    arguments: "{\"x\": 1}".into()
                },
                ToolCall {
                    id: "b2".into(),
                    name: "g".into(),
                    arguments: "{}".into()
                },
            ]
        );
        assert!(m.made_calls());
    }

    #[test]
    fn a_delta_body_names_only_what_it_carries() {
        let first = ToolCallDelta {
            index: 0,
            id: "a1".into(),
            name: "f".into(),
            arguments: String::new(),
        };
        assert_eq!(
            serde_json::to_value(ToolCallDeltaReply::from(&first)).unwrap(),
            serde_json::json!({"index": 0, "id": "a1", "type": "function", "function": {"name": "f"}})
        );
        let more = ToolCallDelta {
            index: 0,
            arguments: "{}".into(),
            ..ToolCallDelta::default()
        };
        assert_eq!(
            serde_json::to_value(ToolCallDeltaReply::from(&more)).unwrap(),
            serde_json::json!({"index": 0, "function": {"arguments": "{}"}})
        );
    }
}
