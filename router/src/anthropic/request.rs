//! A Messages body as clients send it, and its translation into the OpenAI chat body every
//! generating route validates the same way (`GenerationBody`'s checks), as llama-server
//! converts it: the system prompt becomes a first `system` message; text blocks become text
//! parts; `thinking` blocks an assistant's `reasoning_content`; `tool_use` blocks its
//! `tool_calls`; `tool_result` blocks `tool` messages; `tools` (`input_schema`) and
//! `tool_choice` (`auto`, `any`, `tool`, `none`) OpenAI's; `stop_sequences` stop strings.
//! Errors name the Messages field at fault.

use llamapool_common::protocol::{ChatPrompt, Prompt};
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::RequestId;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::openai::request::{
    function_tool, translate_tools, ContentBody, ContentPart, FunctionCallBody, GenerationBody,
    MessageBody, ServedModel, StopBody, ToolCallBody,
};
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
    /// Accepted: `{"type": "enabled", "budget_tokens": N}` or `disabled` (llama-server reads
    /// only a budget from it; the template decides whether the model thinks).
    pub thinking: Option<Value>,
    /// `[{"name", "description", "input_schema"}]`.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// llama-server's extension, passed to the chat template.
    pub chat_template_kwargs: Option<Value>,
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

/// A content block: `text`, `thinking`, `tool_use` or `tool_result` (images are refused: the
/// served model has no projector).
#[derive(Debug, Deserialize)]
pub struct BlockIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub thinking: Option<String>,
    /// `tool_use`: the call's id, tool name and input object.
    pub id: Option<String>,
    pub name: Option<String>,
    pub input: Option<Value>,
    /// `tool_result`: the call answered, and its content (a string or text blocks).
    pub tool_use_id: Option<String>,
    pub content: Option<Value>,
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
        let mut body = self.openai_body()?;
        let chat = body.chat(&served.defaults)?;
        body.check_common(served)?;
        let sampling = body.sampling(&served.defaults)?;
        let mut valid =
            body.finish_valid(Endpoint::Chat, served, id, Prompt::Chat(chat), sampling)?;
        valid.generate.report_progress |= valid.stream;
        Ok(valid)
    }

    /// The conversation as a worker renders it (for `count_tokens`).
    pub fn chat(self, defaults: &GenerationDefaults) -> Result<ChatPrompt, InvalidRequest> {
        self.openai_body()?.chat(defaults)
    }

    /// The OpenAI chat body this Messages body is.
    fn openai_body(self) -> Result<GenerationBody, InvalidRequest> {
        let Some(messages) = &self.messages else {
            return Err(InvalidRequest::field("messages", "messages is required"));
        };
        let mut chat = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = &self.system {
            let text = match system {
                SystemIn::Text(text) => text.clone(),
                SystemIn::Blocks(blocks) => system_text(blocks)?,
            };
            if !text.is_empty() {
                chat.push(MessageBody::text("system", text));
            }
        }
        for (i, message) in messages.iter().enumerate() {
            message_in(i, message, &mut chat)?;
        }
        Ok(GenerationBody {
            model: self.model,
            messages: Some(chat),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.map(StopBody::Many),
            stream: self.stream,
            tools: openai_tools(self.tools.as_ref())?,
            tool_choice: openai_tool_choice(self.tool_choice.as_ref())?,
            chat_template_kwargs: self.chat_template_kwargs,
            ..GenerationBody::default()
        })
    }
}

/// The system blocks' text, joined.
fn system_text(blocks: &[BlockIn]) -> Result<String, InvalidRequest> {
    let mut text = String::new();
    for (j, block) in blocks.iter().enumerate() {
        text.push_str(block_text(&format!("system[{j}]"), block)?);
    }
    Ok(text)
}

fn block_text<'a>(param: &str, block: &'a BlockIn) -> Result<&'a str, InvalidRequest> {
    match (block.kind.as_str(), &block.text) {
        ("text", Some(t)) => Ok(t),
        ("text", None) => Err(InvalidRequest::field(
            format!("{param}.text"),
            format!("{param} is a text block without text"),
        )),
        (kind, _) => Err(InvalidRequest::field(
            format!("{param}.type"),
            format!("{param}: {kind:?} blocks are not supported here, only text"),
        )),
    }
}

/// One Messages message as OpenAI messages: the message itself (unless it held only tool
/// results), preceded by a `tool` message per `tool_result` block.
fn message_in(
    index: usize,
    message: &MessageIn,
    out: &mut Vec<MessageBody>,
) -> Result<(), InvalidRequest> {
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
    let blocks = match &message.content {
        ContentIn::Text(text) => {
            out.push(MessageBody::text(&message.role, text.clone()));
            return Ok(());
        }
        ContentIn::Blocks(blocks) => blocks,
    };
    let assistant = message.role == "assistant";
    let mut parts = Vec::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    let mut results = 0;
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{param}.content[{j}]");
        match block.kind.as_str() {
            "text" => parts.push(ContentPart {
                kind: "text".into(),
                text: Some(block_text(&at, block)?.to_string()),
            }),
            "thinking" | "redacted_thinking" if assistant => {
                reasoning.push_str(block.thinking.as_deref().unwrap_or_default());
            }
            "tool_use" if assistant => calls.push(tool_use(&at, block)?),
            "tool_result" if !assistant => {
                out.push(tool_result(&at, block)?);
                results += 1;
            }
            kind => {
                return Err(InvalidRequest::field(
                    format!("{at}.type"),
                    format!(
                        "{at}: {kind:?} blocks are not supported in a {} message",
                        message.role
                    ),
                ))
            }
        }
    }
    if results > 0 && parts.is_empty() {
        return Ok(());
    }
    out.push(MessageBody {
        role: message.role.clone(),
        content: Some(ContentBody::Parts(parts)),
        tool_calls: (!calls.is_empty()).then_some(calls),
        tool_call_id: None,
        name: None,
        reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
    });
    Ok(())
}

/// A `tool_use` block as an OpenAI tool call (its input as JSON text).
fn tool_use(param: &str, block: &BlockIn) -> Result<ToolCallBody, InvalidRequest> {
    let name = block.name.clone().ok_or_else(|| {
        InvalidRequest::field(
            format!("{param}.name"),
            format!("{param}: a tool_use block needs a name"),
        )
    })?;
    let input = block.input.clone().unwrap_or_else(|| json!({}));
    Ok(ToolCallBody {
        id: block.id.clone(),
        kind: Some("function".into()),
        function: FunctionCallBody {
            name,
            arguments: Some(Value::String(input.to_string())),
        },
    })
}

/// A `tool_result` block as a `tool` message; its content a string or text blocks.
fn tool_result(param: &str, block: &BlockIn) -> Result<MessageBody, InvalidRequest> {
    let id = block.tool_use_id.clone().ok_or_else(|| {
        InvalidRequest::field(
            format!("{param}.tool_use_id"),
            format!("{param}: a tool_result block needs a tool_use_id"),
        )
    })?;
    let text = match &block.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => {
            let mut text = String::new();
            for (k, item) in items.iter().enumerate() {
                match (
                    item.get("type").and_then(Value::as_str),
                    item.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(InvalidRequest::field(
                            format!("{param}.content[{k}]"),
                            format!(
                            "{param}.content[{k}]: only text blocks are supported in a tool result"
                        ),
                        ))
                    }
                }
            }
            text
        }
        Some(_) => {
            return Err(InvalidRequest::field(
                format!("{param}.content"),
                format!("{param}.content must be a string or text blocks"),
            ))
        }
    };
    Ok(MessageBody::tool_result(id, text))
}

/// Anthropic's tools as OpenAI's function tools: `input_schema` is the parameters. Client
/// tools have no `type` or `custom`; server tools (`web_search_…`, `bash_…`) run at Anthropic
/// and are refused.
fn openai_tools(tools: Option<&Value>) -> Result<Option<Value>, InvalidRequest> {
    translate_tools(tools, |i, tool| {
        if let Some(kind) = tool
            .get("type")
            .and_then(Value::as_str)
            .filter(|k| *k != "custom")
        {
            return Err(InvalidRequest::field(
                format!("tools[{i}]"),
                format!("tools[{i}]: {kind:?} tools run on Anthropic's servers and are not served; give client tools (name, input_schema)"),
            ));
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            InvalidRequest::field(
                format!("tools[{i}]"),
                format!("tools[{i}]: a tool needs a name"),
            )
        })?;
        Ok(function_tool(
            Value::from(name),
            tool.get("description"),
            tool.get("input_schema"),
        ))
    })
}

/// Anthropic's `tool_choice` as OpenAI's: `auto`, `any` (`required`), `tool` (that function),
/// `none`.
fn openai_tool_choice(choice: Option<&Value>) -> Result<Option<Value>, InvalidRequest> {
    let Some(choice) = choice.filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    let bad = || {
        InvalidRequest::field(
            "tool_choice",
            "tool_choice must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"} (with \"name\" for tool)",
        )
    };
    Ok(Some(match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice.get("name").and_then(Value::as_str).ok_or_else(bad)?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use llamapool_common::protocol::{ChatEnding, ToolChoice};

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
                r#"{"tools":[{"type":"bash_20250124"}],"messages":[{"role":"user","content":"x"}]}"#
            ),
            "tools[0]"
        );
        assert_eq!(
            refused(
                r#"{"tools":[{"name":"t"}],"tool_choice":{"type":"sometimes"},"messages":[{"role":"user","content":"x"}]}"#
            ),
            "tool_choice"
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
        // Tool use blocks only where they belong.
        assert_eq!(
            refused(
                r#"{"messages":[{"role":"user","content":[{"type":"tool_use","name":"t","input":{}}]}]}"#
            ),
            "messages[0].content[0].type"
        );
        // Empty tool lists ask for nothing.
        assert!(valid(r#"{"tools":[],"messages":[{"role":"user","content":"x"}]}"#).is_ok());
    }

    #[test]
    fn tools_tool_use_and_tool_results_become_the_chat() {
        let v = valid(
            r#"{"max_tokens":9,"tools":[{"name":"get_weather","description":"d","input_schema":{"type":"object"}}],
                "tool_choice":{"type":"tool","name":"get_weather"},
                "messages":[{"role":"user","content":"Weather?"},
                  {"role":"assistant","content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Let me look."},
                     {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
                  {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"20C"}]}]}]}"#,
        )
        .unwrap();
        let Prompt::Chat(chat) = &v.generate.prompt else {
            panic!("{:?}", v.generate.prompt)
        };
        assert_eq!(chat.tools.choice, ToolChoice::Required);
        assert_eq!(
            chat.tools.tools,
            r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"},"description":"d"}}]"#
        );
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool"]);
        let assistant = &chat.messages[1];
        assert_eq!(assistant.content, "Let me look.");
        assert_eq!(assistant.reasoning_content, "hmm");
        assert_eq!(assistant.tool_calls[0].id, "toolu_1");
        assert_eq!(assistant.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(chat.messages[2].tool_call_id, "toolu_1");
        assert_eq!(chat.messages[2].content, "20C");
    }
}
