//! A Messages body as clients send it, and its translation into the chat request every
//! generating route validates the same way (`GenerationBody`'s checks): the system prompt
//! becomes a first `system` message, text blocks are joined, `stop_sequences` become stop
//! strings. Errors name the Messages field at fault.

use llamapool_common::protocol::{ChatPrompt, Prompt};
use llamapool_common::ChatMessage;
use llamapool_common::RequestId;
use serde::Deserialize;
use serde_json::Value;

use crate::openai::request::{chat_prompt, GenerationBody, ServedModel, StopBody};
use crate::openai::{Endpoint, InvalidRequest, ValidRequest};

/// `POST /v1/messages`' body (and, without `max_tokens`, `count_tokens`'). Unknown fields are
/// ignored, as Anthropic's SDKs send fields a server may not know.
#[derive(Debug, Default, Deserialize)]
pub struct MessagesBody {
    pub model: Option<String>,
    /// Required by Anthropic; the server's default when absent, as llama-server does.
    pub max_tokens: Option<i64>,
    pub messages: Option<Vec<MessageIn>>,
    pub system: Option<SystemIn>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub stream: Option<bool>,
    /// Accepted and not used (a user id for abuse tracking).
    pub metadata: Option<Value>,
    /// Accepted: `{"type": "enabled", "budget_tokens": N}` or `disabled`.
    pub thinking: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
}

/// One message: `user` or `assistant`, its content a string or a list of blocks.
#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: ContentIn,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content blocks")]
pub enum ContentIn {
    Text(String),
    Blocks(Vec<BlockIn>),
}

/// A content block; only `text` blocks are served.
#[derive(Debug, Deserialize)]
pub struct BlockIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `system`: a string or a list of text blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of text blocks")]
pub enum SystemIn {
    Text(String),
    Blocks(Vec<BlockIn>),
}

impl MessagesBody {
    /// The body validated into the chat request the pool runs. A stream asks the worker for
    /// progress reports, so that `message_start` can say how long the prompt is.
    pub fn into_valid(
        self,
        served: &ServedModel,
        id: RequestId,
    ) -> Result<ValidRequest, InvalidRequest> {
        let chat = self.chat()?;
        let body = GenerationBody {
            model: self.model,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.map(StopBody::Many),
            stream: self.stream,
            ..GenerationBody::default()
        };
        body.check_common(served)?;
        let sampling = body.sampling(&served.defaults)?;
        let mut valid =
            body.finish_valid(Endpoint::Chat, served, id, Prompt::Chat(chat), sampling)?;
        valid.generate.report_progress |= valid.stream;
        Ok(valid)
    }

    /// The conversation: tools refused, the system prompt first, every message's text.
    pub fn chat(&self) -> Result<ChatPrompt, InvalidRequest> {
        refuse_tools("tools", self.tools.as_ref())?;
        refuse_tools("tool_choice", self.tool_choice.as_ref())?;
        let Some(messages) = &self.messages else {
            return Err(InvalidRequest::field("messages", "messages is required"));
        };
        let mut chat = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = &self.system {
            let text = match system {
                SystemIn::Text(text) => text.clone(),
                SystemIn::Blocks(blocks) => blocks_text("system", blocks)?,
            };
            if !text.is_empty() {
                chat.push(ChatMessage {
                    role: "system".into(),
                    content: text,
                    ..ChatMessage::default()
                });
            }
        }
        for (i, message) in messages.iter().enumerate() {
            chat.push(message_in(i, message)?);
        }
        chat_prompt(chat, None, None)
    }
}

/// Tool use is not served yet: any value but `null` or an empty list is refused by name.
fn refuse_tools(param: &'static str, value: Option<&Value>) -> Result<(), InvalidRequest> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(_) => Err(InvalidRequest::Unsupported {
            param,
            detail: " on /v1/messages yet (tool use is not served)".into(),
        }),
    }
}

fn message_in(index: usize, message: &MessageIn) -> Result<ChatMessage, InvalidRequest> {
    let param = format!("messages[{index}]");
    if !matches!(message.role.as_str(), "user" | "assistant") {
        return Err(InvalidRequest::field(
            format!("{param}.role"),
            format!(
                "{param}.role must be \"user\" or \"assistant\", got {:?}",
                message.role
            ),
        ));
    }
    let content = match &message.content {
        ContentIn::Text(text) => text.clone(),
        ContentIn::Blocks(blocks) => blocks_text(&format!("{param}.content"), blocks)?,
    };
    Ok(ChatMessage::text(message.role.clone(), content))
}

/// The text of text blocks, joined; any other block is refused, naming it.
fn blocks_text(param: &str, blocks: &[BlockIn]) -> Result<String, InvalidRequest> {
    let mut text = String::new();
    for (j, block) in blocks.iter().enumerate() {
        match (block.kind.as_str(), &block.text) {
            ("text", Some(t)) => text.push_str(t),
            ("text", None) => {
                return Err(InvalidRequest::field(
                    format!("{param}[{j}].text"),
                    format!("{param}[{j}] is a text block without text"),
                ))
            }
            (kind, _) => {
                return Err(InvalidRequest::field(
                    format!("{param}[{j}].type"),
                    format!("{param}[{j}]: {kind:?} blocks are not supported, only text"),
                ))
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use llamapool_common::protocol::ChatEnding;

    use super::*;
    use crate::openai::request::parse_json;

    fn valid(body: &str) -> Result<ValidRequest, InvalidRequest> {
        let body: MessagesBody = parse_json(body.as_bytes())?;
        body.into_valid(&ServedModel::new("m"), RequestId(1))
    }

    #[test]
    fn system_and_text_blocks_become_the_chat() {
        let v = valid(
            r#"{"model":"claude","max_tokens":7,"system":[{"type":"text","text":"Be brief."}],
                "messages":[{"role":"user","content":[{"type":"text","text":"What is"},{"type":"text","text":" 2+2?"}]},
                            {"role":"assistant","content":"4"},{"role":"user","content":"Sure?"}],
                "stop_sequences":["END"],"temperature":0.5,"top_k":40,"metadata":{"user_id":"u"},
                "thinking":{"type":"enabled","budget_tokens":50}}"#,
        )
        .unwrap();
        let Prompt::Chat(chat) = &v.generate.prompt else {
            panic!("{:?}", v.generate.prompt)
        };
        let turns: Vec<(&str, &str)> = chat
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            turns,
            [
                ("system", "Be brief."),
                ("user", "What is 2+2?"),
                ("assistant", "4"),
                ("user", "Sure?")
            ]
        );
        assert_eq!(chat.ending, ChatEnding::OpenAssistant);
        assert_eq!(v.generate.stopping.max_tokens, Some(7));
        assert_eq!(v.generate.stopping.stop, ["END"]);
        assert_eq!(v.generate.sampling.temperature, 0.5);
        assert_eq!(v.generate.sampling.top_k, 40);
        assert!(!v.stream && !v.generate.report_progress);
        let streamed =
            valid(r#"{"max_tokens":5,"stream":true,"messages":[{"role":"user","content":"x"}]}"#)
                .unwrap();
        assert!(streamed.stream && streamed.generate.report_progress);
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        let refused = |body: &str| match valid(body).unwrap_err() {
            InvalidRequest::Field { param, .. } => param,
            InvalidRequest::Unsupported { param, .. } => param.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(r#"{"max_tokens":5}"#), "messages");
        assert_eq!(
            refused(
                r#"{"tools":[{"name":"t","input_schema":{}}],"messages":[{"role":"user","content":"x"}]}"#
            ),
            "tools"
        );
        assert_eq!(
            refused(r#"{"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]}"#),
            "messages[0].content[0].type"
        );
        assert_eq!(
            refused(r#"{"messages":[{"role":"system","content":"x"}]}"#),
            "messages[0].role"
        );
        assert_eq!(
            refused(r#"{"max_tokens":-5,"messages":[{"role":"user","content":"x"}]}"#),
            "max_tokens"
        );
        assert!(matches!(
            parse_json::<MessagesBody>(br#"{"messages":[{"role":"user","content":5}]}"#),
            Err(InvalidRequest::Field { param, .. }) if param.starts_with("messages[0].content")
        ));
        // Empty tool lists ask for nothing.
        assert!(valid(r#"{"tools":[],"messages":[{"role":"user","content":"x"}]}"#).is_ok());
    }
}
