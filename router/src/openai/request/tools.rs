//! A chat body's agent fields: `tools`, `tool_choice` and `parallel_tool_calls` into the
//! [`ChatTools`] the worker renders and constrains with, `chat_template_kwargs`, and how
//! reasoning is handled (`reasoning_format`, the server's `[generation]` defaults). The tools'
//! JSON schemas are not read here: llama.cpp's chat code turns them into the template's tool
//! list and the tool-call grammar, as llama-server does.

use llamapool_common::protocol::{ChatPrompt, ChatTools, Reasoning, ReasoningFormat, ToolChoice};
use llamapool_common::settings::GenerationDefaults;
use serde_json::Value;

use super::body::{is_neutral, GenerationBody};
use super::grammar_choice::check_schema_size;
use super::invalid::InvalidRequest;
use super::prompt::{chat_messages, chat_prompt};

/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 512;

impl GenerationBody {
    /// The chat the body asks for, as a worker renders it: its `messages` ending as
    /// `add_generation_prompt` and `continue_final_message` say, its tools, template
    /// arguments and reasoning (over the server's `defaults`). Takes the messages.
    pub fn chat(&mut self, defaults: &GenerationDefaults) -> Result<ChatPrompt, InvalidRequest> {
        let mut chat = chat_prompt(
            chat_messages(self.messages.take())?,
            self.add_generation_prompt,
            self.continue_final_message,
        )?;
        chat.tools = self.chat_tools()?;
        chat.template_kwargs = self.template_kwargs()?;
        chat.reasoning = self.reasoning(defaults)?;
        Ok(chat)
    }

    /// `tools` (OpenAI's function tools), `tool_choice` (`auto`, `none`, `required`, or a
    /// named function, which offers only that tool and requires a call) and
    /// `parallel_tool_calls` (absent: what the template supports, as llama-server).
    pub(super) fn chat_tools(&self) -> Result<ChatTools, InvalidRequest> {
        let mut tools = match self.tools.as_ref().filter(|v| !is_neutral(v)) {
            None => Vec::new(),
            Some(Value::Array(tools)) => tools.clone(),
            Some(_) => return Err(InvalidRequest::field("tools", "tools must be an array")),
        };
        if tools.len() > MAX_TOOLS {
            return Err(InvalidRequest::field(
                "tools",
                format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
            ));
        }
        for (i, tool) in tools.iter().enumerate() {
            check_tool(i, tool)?;
        }
        let choice = match self.tool_choice.as_ref() {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => {
                    return Err(InvalidRequest::field(
                        "tool_choice",
                        format!("Invalid tool_choice: {other}"),
                    ))
                }
            },
            Some(named) => {
                let name = named
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        InvalidRequest::field(
                            "tool_choice",
                            "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
                        )
                    })?;
                tools.retain(|t| tool_name(t) == Some(name));
                if tools.is_empty() {
                    return Err(InvalidRequest::field(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not one of the tools"),
                    ));
                }
                ToolChoice::Required
            }
        };
        if choice != ToolChoice::Auto && choice != ToolChoice::None && tools.is_empty() {
            return Err(InvalidRequest::field(
                "tool_choice",
                "tool_choice requires tools",
            ));
        }
        Ok(ChatTools {
            tools: if tools.is_empty() {
                String::new()
            } else {
                Value::Array(tools).to_string()
            },
            choice,
            parallel: self.parallel_tool_calls,
        })
    }

    /// `chat_template_kwargs`: an object (each value a template variable), whose
    /// `enable_thinking`, if given, is a boolean.
    pub(super) fn template_kwargs(&self) -> Result<String, InvalidRequest> {
        match self.chat_template_kwargs.as_ref() {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::Object(map)) => {
                if let Some(v) = map.get("enable_thinking").filter(|v| !v.is_boolean()) {
                    return Err(InvalidRequest::field(
                        "chat_template_kwargs",
                        format!(
                            "invalid type for \"enable_thinking\" (expected boolean, got {})",
                            json_type(v)
                        ),
                    ));
                }
                Ok(if map.is_empty() {
                    String::new()
                } else {
                    Value::Object(map.clone()).to_string()
                })
            }
            Some(_) => Err(InvalidRequest::field(
                "chat_template_kwargs",
                "chat_template_kwargs must be an object",
            )),
        }
    }

    /// `reasoning_format` over the server's, and whether thinking is asked for.
    pub(super) fn reasoning(
        &self,
        defaults: &GenerationDefaults,
    ) -> Result<Reasoning, InvalidRequest> {
        let format = match self.reasoning_format.as_deref() {
            None => defaults.reasoning_format(),
            Some(name) => ReasoningFormat::from_name(name).ok_or_else(|| {
                InvalidRequest::field(
                    "reasoning_format",
                    format!(
                        "Unknown reasoning format: {name} (none, auto, deepseek, deepseek-legacy)"
                    ),
                )
            })?,
        };
        Ok(Reasoning {
            format,
            enable_thinking: defaults.enable_thinking() != Some(false),
            preserve: defaults.reasoning_preserve != Some(false),
        })
    }
}

/// One tool as llama.cpp reads it: `{"type": "function", "function": {"name": …}}`, with
/// optional `description` (a string) and `parameters` (an object).
fn check_tool(index: usize, tool: &Value) -> Result<(), InvalidRequest> {
    let param = format!("tools[{index}]");
    let bad = |message: &str| InvalidRequest::field(&param, format!("{param}: {message}"));
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("only tools of \"type\": \"function\" are supported"));
    }
    let function = tool
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| bad("function must be an object"))?;
    match tool_name(tool) {
        Some(name) if !name.is_empty() => {}
        _ => return Err(bad("function.name must be a non-empty string")),
    }
    if function
        .get("description")
        .is_some_and(|d| !d.is_string() && !d.is_null())
    {
        return Err(bad("function.description must be a string"));
    }
    match function.get("parameters") {
        None | Some(Value::Null) => {}
        Some(parameters @ Value::Object(_)) => check_schema_size(&param, parameters)?,
        Some(_) => return Err(bad("function.parameters must be a JSON schema object")),
    }
    Ok(())
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Another API's tool list (Anthropic's, the Responses API's) as OpenAI's function tools:
/// absent or `null` is none, anything but an array a 400 naming `tools`, and each tool turned
/// into a function tool by `one` (given its index), which names what it refuses.
pub fn translate_tools(
    tools: Option<&Value>,
    one: impl Fn(usize, &Value) -> Result<Value, InvalidRequest>,
) -> Result<Option<Value>, InvalidRequest> {
    match tools {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(i, tool)| one(i, tool))
            .collect::<Result<Vec<_>, _>>()
            .map(|t| Some(Value::Array(t))),
        Some(_) => Err(InvalidRequest::field("tools", "tools must be an array")),
    }
}

/// An OpenAI function tool: `{"type": "function", "function": {"name", "parameters"
/// (default `{}`), "description" (when given)}}`.
pub fn function_tool(
    name: Value,
    description: Option<&Value>,
    parameters: Option<&Value>,
) -> Value {
    let mut function = serde_json::json!({
        "name": name,
        "parameters": parameters.cloned().unwrap_or_else(|| serde_json::json!({})),
    });
    if let Some(description) = description {
        function["description"] = description.clone();
    }
    serde_json::json!({"type": "function", "function": function})
}
