//! A Responses body as clients send it, and its translation into the chat request every
//! generating route validates the same way: `instructions` become a first `system` message,
//! `input` the conversation, `max_output_tokens` the token limit. Errors name the Responses
//! field at fault.

use llamapool_common::protocol::{ChatPrompt, Prompt};
use llamapool_common::{ChatMessage, RequestId};
use serde::Deserialize;
use serde_json::Value;

use crate::openai::request::{chat_prompt, GenerationBody, ServedModel};
use crate::openai::{Endpoint, InvalidRequest, ValidRequest};

/// `POST /v1/responses`' body. Unknown fields are ignored (`store`, `metadata`, `user`, ...).
#[derive(Debug, Default, Deserialize)]
pub struct ResponsesBody {
    pub model: Option<String>,
    pub input: Option<InputIn>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    /// llama-server: `response.in_progress` events carry `prompt_progress`.
    pub return_progress: Option<bool>,
    /// llama-server: text deltas carry the `timings` so far.
    pub timings_per_token: Option<bool>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub previous_response_id: Option<String>,
}

/// `input`: a user message's text, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of input items")]
pub enum InputIn {
    Text(String),
    Items(Vec<ItemIn>),
}

/// An input item; only messages are served.
#[derive(Debug, Deserialize)]
pub struct ItemIn {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Option<String>,
    pub content: Option<ItemContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum ItemContent {
    Text(String),
    Parts(Vec<PartIn>),
}

/// A content part; only text parts (`input_text`, `output_text`) are served.
#[derive(Debug, Deserialize)]
pub struct PartIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl ResponsesBody {
    /// The body validated into the chat request the pool runs.
    pub fn into_valid(
        self,
        served: &ServedModel,
        id: RequestId,
    ) -> Result<ValidRequest, InvalidRequest> {
        let chat = self.chat()?;
        let body = GenerationBody {
            model: self.model,
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.stream,
            return_progress: self.return_progress,
            timings_per_token: self.timings_per_token,
            ..GenerationBody::default()
        };
        body.check_common(served)?;
        let sampling = body.sampling(&served.defaults)?;
        body.finish_valid(Endpoint::Chat, served, id, Prompt::Chat(chat), sampling)
            .map_err(named_as_sent)
    }

    /// The conversation: what is not served refused, the instructions first, every message.
    fn chat(&self) -> Result<ChatPrompt, InvalidRequest> {
        refuse("tools", self.tools.as_ref())?;
        refuse("tool_choice", self.tool_choice.as_ref())?;
        if self.previous_response_id.is_some() {
            return Err(InvalidRequest::Unsupported {
                param: "previous_response_id",
                detail: " (responses are not stored: send the whole conversation)".into(),
            });
        }
        let mut chat = Vec::new();
        if let Some(instructions) = &self.instructions {
            chat.push(message("system", instructions.clone()));
        }
        match &self.input {
            None => return Err(InvalidRequest::field("input", "input is required")),
            Some(InputIn::Text(text)) => chat.push(message("user", text.clone())),
            Some(InputIn::Items(items)) => {
                for (i, item) in items.iter().enumerate() {
                    chat.push(item_message(i, item)?);
                }
            }
        }
        chat_prompt(chat, None, None)
    }
}

/// The chat checks name the token limit `max_tokens`; this API calls it `max_output_tokens`.
fn named_as_sent(error: InvalidRequest) -> InvalidRequest {
    match error {
        InvalidRequest::Field { param, message } if param == "max_tokens" => {
            InvalidRequest::Field {
                param: "max_output_tokens".into(),
                message: message.replace("max_tokens", "max_output_tokens"),
            }
        }
        other => other,
    }
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage::text(role, content)
}

/// Tools are not served yet: any value but `null`, `"none"` or an empty list is refused.
fn refuse(param: &'static str, value: Option<&Value>) -> Result<(), InvalidRequest> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(Value::String(s)) if s == "none" => Ok(()),
        Some(_) => Err(InvalidRequest::Unsupported {
            param,
            detail: " on /v1/responses yet (tool calling is not served)".into(),
        }),
    }
}

/// One input item as a chat message: a message item (`type` absent or `message`) of a known
/// role; `developer` is passed as `system`, as on the chat route.
fn item_message(index: usize, item: &ItemIn) -> Result<ChatMessage, InvalidRequest> {
    let param = format!("input[{index}]");
    if let Some(kind) = item.kind.as_deref().filter(|k| *k != "message") {
        return Err(InvalidRequest::field(
            format!("{param}.type"),
            format!("{param}: {kind:?} items are not supported, only messages"),
        ));
    }
    let role = match item.role.as_deref() {
        Some("developer") => "system",
        Some(role @ ("user" | "system" | "assistant")) => role,
        other => {
            return Err(InvalidRequest::field(
                format!("{param}.role"),
                format!("{param}.role must be user, system, developer or assistant, got {other:?}"),
            ))
        }
    };
    let content = match &item.content {
        None => String::new(),
        Some(ItemContent::Text(text)) => text.clone(),
        Some(ItemContent::Parts(parts)) => parts_text(&format!("{param}.content"), parts)?,
    };
    Ok(message(role, content))
}

/// The text of text parts, joined; any other part is refused, naming it.
fn parts_text(param: &str, parts: &[PartIn]) -> Result<String, InvalidRequest> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (part.kind.as_str(), &part.text) {
            ("input_text" | "output_text", Some(t)) => text.push_str(t),
            (kind, _) => {
                return Err(InvalidRequest::field(
                    format!("{param}[{j}].type"),
                    format!("{param}[{j}]: {kind:?} parts are not supported, only input_text and output_text with text"),
                ))
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::parse_json;

    fn valid(body: &str) -> Result<ValidRequest, InvalidRequest> {
        let body: ResponsesBody = parse_json(body.as_bytes())?;
        body.into_valid(&ServedModel::new("m"), RequestId(1))
    }

    #[test]
    fn instructions_and_input_become_the_chat() {
        let v = valid(
            r#"{"model":"gpt-4.1","instructions":"Be brief.","max_output_tokens":8,"temperature":0.8,
                "input":[{"role":"developer","content":"Book"},
                         {"role":"user","content":[{"type":"input_text","text":"What is"},{"type":"input_text","text":" best?"}]},
                         {"type":"message","role":"assistant","content":[{"type":"output_text","text":"Dune"}]},
                         {"role":"user","content":"Why?"}],
                "store":false,"stream":true,"timings_per_token":true}"#,
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
                ("system", "Book"),
                ("user", "What is best?"),
                ("assistant", "Dune"),
                ("user", "Why?")
            ]
        );
        assert_eq!(v.generate.stopping.max_tokens, Some(8));
        assert!(v.stream && v.reports.timings);
        let text = valid(r#"{"input":"Hi"}"#).unwrap();
        let Prompt::Chat(chat) = &text.generate.prompt else {
            panic!()
        };
        assert_eq!(chat.messages, [message("user", "Hi".into())]);
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        let refused = |body: &str| match valid(body).unwrap_err() {
            InvalidRequest::Field { param, .. } => param,
            InvalidRequest::Unsupported { param, .. } => param.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(r#"{}"#), "input");
        assert_eq!(
            refused(r#"{"input":"x","tools":[{"type":"function","name":"f"}]}"#),
            "tools"
        );
        assert_eq!(
            refused(r#"{"input":"x","previous_response_id":"resp_1"}"#),
            "previous_response_id"
        );
        assert_eq!(
            refused(r#"{"input":[{"type":"function_call_output","call_id":"c","output":"x"}]}"#),
            "input[0].type"
        );
        assert_eq!(
            refused(
                r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"u"}]}]}"#
            ),
            "input[0].content[0].type"
        );
        assert_eq!(
            refused(r#"{"input":[{"role":"tool","content":"x"}]}"#),
            "input[0].role"
        );
        assert_eq!(
            refused(r#"{"input":"x","max_output_tokens":-3}"#),
            "max_output_tokens"
        );
        assert!(valid(r#"{"input":"x","tools":[],"tool_choice":"none"}"#).is_ok());
    }
}
