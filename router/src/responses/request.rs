//! A Responses body as clients send it, and its translation into the OpenAI chat body every
//! generating route validates the same way, as llama-server converts it: `instructions`
//! become a first `system` message, `input` the conversation (message items;
//! `function_call` items an assistant's tool calls, `function_call_output` items tool
//! results; `reasoning` items an assistant's reasoning), function `tools` OpenAI's, and
//! `max_output_tokens` the token limit. Errors name the Responses field at fault.

use llamapool_common::protocol::{ChatPrompt, Prompt};
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::RequestId;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::openai::request::{
    function_tool, translate_tools, ContentBody, ContentPart, FunctionCallBody, GenerationBody,
    MessageBody, ServedModel, ToolCallBody,
};
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
    /// `[{"type": "function", "name", "description", "parameters"}]`.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub previous_response_id: Option<String>,
}

/// `input`: a user message's text, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of input items")]
pub enum InputIn {
    Text(String),
    Items(Vec<ItemIn>),
}

/// An input item: a message (`type` absent or `message`), a `function_call` the assistant
/// made, its `function_call_output`, or a `reasoning` item.
#[derive(Debug, Deserialize)]
pub struct ItemIn {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Option<String>,
    pub content: Option<ItemContent>,
    pub call_id: Option<String>,
    pub name: Option<String>,
    pub arguments: Option<Value>,
    pub output: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum ItemContent {
    Text(String),
    Parts(Vec<PartIn>),
}

/// A content part; only text parts (`input_text`, `output_text`, `reasoning_text`) are served.
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
        let mut body = self.openai_body()?;
        let chat = body.chat(&served.defaults)?;
        body.check_common(served)?;
        let sampling = body.sampling(&served.defaults)?;
        body.finish_valid(Endpoint::Chat, served, id, Prompt::Chat(chat), sampling)
            .map_err(named_as_sent)
    }

    /// The conversation as a worker renders it.
    pub fn chat(self, defaults: &GenerationDefaults) -> Result<ChatPrompt, InvalidRequest> {
        self.openai_body()?.chat(defaults)
    }

    /// The OpenAI chat body this Responses body is.
    fn openai_body(self) -> Result<GenerationBody, InvalidRequest> {
        if self.previous_response_id.is_some() {
            return Err(InvalidRequest::Unsupported {
                param: "previous_response_id",
                detail: " (responses are not stored: send the whole conversation)".into(),
            });
        }
        let mut chat = Vec::new();
        if let Some(instructions) = &self.instructions {
            chat.push(MessageBody::text("system", instructions.clone()));
        }
        match &self.input {
            None => return Err(InvalidRequest::field("input", "input is required")),
            Some(InputIn::Text(text)) => chat.push(MessageBody::text("user", text.clone())),
            Some(InputIn::Items(items)) => {
                for (i, item) in items.iter().enumerate() {
                    item_in(i, item, &mut chat)?;
                }
            }
        }
        Ok(GenerationBody {
            model: self.model,
            messages: Some(chat),
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.stream,
            return_progress: self.return_progress,
            timings_per_token: self.timings_per_token,
            tools: openai_tools(self.tools.as_ref())?,
            tool_choice: openai_tool_choice(self.tool_choice),
            parallel_tool_calls: self.parallel_tool_calls,
            ..GenerationBody::default()
        })
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

/// One input item as OpenAI messages. A `function_call` joins the assistant message before
/// it (or starts one); `developer` is passed as `system`, as on the chat route.
fn item_in(index: usize, item: &ItemIn, out: &mut Vec<MessageBody>) -> Result<(), InvalidRequest> {
    let param = format!("input[{index}]");
    match item.kind.as_deref() {
        None | Some("message") => out.push(message_item(&param, item)?),
        Some("function_call") => {
            let call = function_call(&param, item)?;
            match out.last_mut() {
                Some(last) if last.role == "assistant" => {
                    last.tool_calls.get_or_insert_with(Vec::new).push(call);
                }
                _ => {
                    let mut message = MessageBody::text("assistant", String::new());
                    message.content = None;
                    message.tool_calls = Some(vec![call]);
                    out.push(message);
                }
            }
        }
        Some("function_call_output") => {
            let call_id = item.call_id.clone().ok_or_else(|| {
                InvalidRequest::field(format!("{param}.call_id"), format!("{param}: call_id is required"))
            })?;
            let output = match &item.output {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
            };
            out.push(MessageBody::tool_result(call_id, output));
        }
        Some("reasoning") => {
            let text = match &item.content {
                Some(ItemContent::Parts(parts)) => parts_text(&format!("{param}.content"), parts)?,
                Some(ItemContent::Text(text)) => text.clone(),
                None => String::new(),
            };
            let mut message = MessageBody::text("assistant", String::new());
            message.reasoning_content = Some(text);
            out.push(message);
        }
        Some(kind) => {
            return Err(InvalidRequest::field(
                format!("{param}.type"),
                format!("{param}: {kind:?} items are not supported (message, function_call, function_call_output, reasoning)"),
            ))
        }
    }
    Ok(())
}

fn message_item(param: &str, item: &ItemIn) -> Result<MessageBody, InvalidRequest> {
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
        Some(ItemContent::Parts(parts)) => {
            let parts = parts_text(&format!("{param}.content"), parts)?;
            return Ok(MessageBody {
                content: Some(ContentBody::Parts(vec![ContentPart {
                    kind: "text".into(),
                    text: Some(parts),
                }])),
                ..MessageBody::text(role, String::new())
            });
        }
    };
    Ok(MessageBody::text(role, content))
}

fn function_call(param: &str, item: &ItemIn) -> Result<ToolCallBody, InvalidRequest> {
    let name = item.name.clone().ok_or_else(|| {
        InvalidRequest::field(
            format!("{param}.name"),
            format!("{param}: name is required"),
        )
    })?;
    Ok(ToolCallBody {
        id: item.call_id.clone(),
        kind: Some("function".into()),
        function: FunctionCallBody {
            name,
            arguments: item.arguments.clone(),
        },
    })
}

/// The text of text parts, joined; any other part is refused, naming it.
fn parts_text(param: &str, parts: &[PartIn]) -> Result<String, InvalidRequest> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (part.kind.as_str(), &part.text) {
            ("input_text" | "output_text" | "reasoning_text", Some(t)) => text.push_str(t),
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

/// The Responses API's function tools (flat: `name`, `parameters` beside `type`) as OpenAI
/// chat's; other tool types (web search, file search, …) are refused by name.
fn openai_tools(tools: Option<&Value>) -> Result<Option<Value>, InvalidRequest> {
    translate_tools(tools, |i, tool| {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(InvalidRequest::field(
                format!("tools[{i}].type"),
                format!("tools[{i}]: {kind:?} tools are not supported, only function tools"),
            ));
        }
        Ok(function_tool(
            tool.get("name").cloned().unwrap_or(Value::Null),
            tool.get("description"),
            tool.get("parameters"),
        ))
    })
}

/// `tool_choice`: the strings pass as they are; `{"type": "function", "name"}` names a tool.
fn openai_tool_choice(choice: Option<Value>) -> Option<Value> {
    match choice {
        Some(Value::Object(map)) if map.get("type").and_then(Value::as_str) == Some("function") => {
            let name = map.get("name").cloned().unwrap_or(Value::Null);
            Some(json!({"type": "function", "function": {"name": name}}))
        }
        other => other,
    }
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
        assert_eq!(
            chat.messages,
            [llamapool_common::ChatMessage::text("user", "Hi")]
        );
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
            refused(r#"{"input":"x","tools":[{"type":"web_search"}]}"#),
            "tools[0].type"
        );
        assert_eq!(
            refused(r#"{"input":"x","previous_response_id":"resp_1"}"#),
            "previous_response_id"
        );
        assert_eq!(
            refused(r#"{"input":[{"type":"file_search_call","id":"c"}]}"#),
            "input[0].type"
        );
        assert_eq!(
            refused(r#"{"input":[{"type":"function_call_output","output":"x"}]}"#),
            "input[0].call_id"
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

    #[test]
    fn function_tools_calls_and_outputs_become_the_chat() {
        let v = valid(
            r#"{"tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],
                "tool_choice":{"type":"function","name":"f"},
                "input":[{"role":"user","content":"x"},
                         {"type":"function_call","call_id":"c1","name":"f","arguments":"{\"a\":1}"},
                         {"type":"function_call_output","call_id":"c1","output":"42"}]}"#,
        )
        .unwrap();
        let Prompt::Chat(chat) = &v.generate.prompt else {
            panic!("{:?}", v.generate.prompt)
        };
        assert_eq!(
            chat.tools.tools,
            r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#
        );
        assert_eq!(
            chat.tools.choice,
            llamapool_common::protocol::ToolChoice::Required
        );
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool"]);
        assert_eq!(chat.messages[1].tool_calls[0].arguments, r#"{"a":1}"#);
        assert_eq!(chat.messages[2].tool_call_id, "c1");
        assert_eq!(chat.messages[2].content, "42");
    }
}
