//! Prompt building: a body's `messages` into a chat prompt with its ending (as llama-server
//! decides it), and its `prompt` into text or token ids: OpenAI's batches of
//! `/v1/completions`, and llama-server's native forms (prompt objects, lists mixing text and
//! token ids, batches) as [`NativePrompt`]s.

use llamapool_common::protocol::{ChatEnding, ChatPrompt, Prompt};
use llamapool_common::{ChatMessage, Token, ToolCall};
use serde_json::Value;

use super::body::{ContentBody, MessageBody, PromptBody, PromptObject, ToolCallBody, MAX_CHOICES};
use super::invalid::InvalidRequest;

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

/// The conversation with its ending, as llama-server decides it from `add_generation_prompt`
/// (default true) and `continue_final_message` (default false): a final assistant message is
/// continued even when not asked (llama-server's assistant prefill, on by default), unless the
/// one before it is an assistant's too; both flags true is refused, and so is continuing a
/// final message that is not an assistant's (llama-server renders nonsense there).
pub(crate) fn chat_prompt(
    messages: Vec<ChatMessage>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
) -> Result<ChatPrompt, InvalidRequest> {
    let is_assistant = |m: Option<&ChatMessage>| m.is_some_and(|m| m.role == "assistant");
    let last_is_assistant = is_assistant(messages.last());
    let mut add_generation_prompt = add_generation_prompt.unwrap_or(true);
    let mut continue_final = continue_final_message.unwrap_or(false);
    if !continue_final && last_is_assistant {
        if is_assistant(messages.iter().rev().nth(1)) {
            return Err(InvalidRequest::field(
                "messages",
                "Cannot have 2 or more assistant messages at the end of the list.",
            ));
        }
        continue_final = true;
        add_generation_prompt = false;
    }
    if continue_final && add_generation_prompt {
        return Err(InvalidRequest::field(
            "continue_final_message",
            "Cannot set both add_generation_prompt and continue_final_message to true.",
        ));
    }
    if continue_final && messages.last().is_some_and(|m| !m.tool_calls.is_empty()) {
        return Err(InvalidRequest::field(
            "messages",
            "Cannot continue an assistant message that contains tool calls.",
        ));
    }
    if continue_final && !last_is_assistant {
        return Err(InvalidRequest::field(
            "continue_final_message",
            "continue_final_message needs the last message to be the assistant's",
        ));
    }
    let ending = if continue_final {
        ChatEnding::ContinueFinal
    } else if add_generation_prompt {
        ChatEnding::OpenAssistant
    } else {
        ChatEnding::AsRendered
    };
    Ok(ChatPrompt {
        messages,
        ending,
        ..ChatPrompt::default()
    })
}

pub(crate) fn chat_messages(
    messages: Option<Vec<MessageBody>>,
) -> Result<Vec<ChatMessage>, InvalidRequest> {
    let messages =
        messages.ok_or_else(|| InvalidRequest::field("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(InvalidRequest::field(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect()
}

fn chat_message(index: usize, message: MessageBody) -> Result<ChatMessage, InvalidRequest> {
    let param = format!("messages[{index}]");
    if !ROLES.contains(&message.role.as_str()) {
        return Err(InvalidRequest::field(
            &param,
            format!("{param}.role {:?} is not a known role", message.role),
        ));
    }
    let mut text_parts = Vec::new();
    let content = match message.content {
        None => String::new(),
        Some(ContentBody::Text(text)) => text,
        Some(ContentBody::Parts(parts)) => {
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text_parts.push(t),
                    _ => {
                        return Err(InvalidRequest::field(
                            format!("{param}.content"),
                            format!("{param}.content: only text parts are supported"),
                        ))
                    }
                }
            }
            text_parts.concat()
        }
    };
    let tool_calls = message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, call)| tool_call(&param, i, call))
        .collect::<Result<Vec<_>, _>>()?;
    if !tool_calls.is_empty() && message.role != "assistant" {
        return Err(InvalidRequest::field(
            format!("{param}.tool_calls"),
            format!("{param}: only assistant messages make tool calls"),
        ));
    }
    // OpenAI's newer name for the system role; chat templates know only `system`.
    let role = match message.role.as_str() {
        "developer" => "system".to_string(),
        _ => message.role,
    };
    Ok(ChatMessage {
        role,
        content,
        text_parts,
        tool_calls,
        tool_call_id: message.tool_call_id.unwrap_or_default(),
        name: message.name.unwrap_or_default(),
        reasoning_content: message.reasoning_content.unwrap_or_default(),
    })
}

/// One call of an assistant message; `arguments` as JSON text (an object given as such is
/// written out, as llama-server does).
fn tool_call(param: &str, index: usize, call: ToolCallBody) -> Result<ToolCall, InvalidRequest> {
    let at = format!("{param}.tool_calls[{index}]");
    if call.kind.as_deref().is_some_and(|k| k != "function") {
        return Err(InvalidRequest::field(
            &at,
            format!("{at}.type must be \"function\""),
        ));
    }
    let arguments = match call.function.arguments {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
    };
    Ok(ToolCall {
        id: call.id.unwrap_or_default(),
        name: call.function.name,
        arguments,
    })
}

fn completion_prompt(prompt: Option<PromptBody>) -> Result<Prompt, InvalidRequest> {
    let bad = || {
        InvalidRequest::field(
            "prompt",
            "prompt must be a string, an array of one string, or an array of token ids",
        )
    };
    let items = match prompt {
        None => return Err(InvalidRequest::field("prompt", "prompt is required")),
        Some(PromptBody::Text(text)) => return Ok(Prompt::Text(text)),
        Some(PromptBody::Object(object)) => return object_prompt(object),
        Some(PromptBody::List(items)) => items,
    };
    match items.as_slice() {
        [] => Err(InvalidRequest::field("prompt", "prompt must not be empty")),
        [Value::String(text)] => Ok(Prompt::Text(text.clone())),
        _ if items.iter().all(Value::is_number) => {
            token_ids(&items).map(Prompt::Tokens).ok_or_else(bad)
        }
        _ if items.iter().all(Value::is_string) => Err(InvalidRequest::field(
            "prompt",
            "the native endpoint takes one prompt per request (/v1/completions takes several)",
        )),
        _ => Err(bad()),
    }
}

/// OpenAI's `prompt` of `/v1/completions`: one prompt as [`completion_prompt`] reads it, or a
/// batch: a list of strings, or a list of token-id lists (at least one either way).
pub(super) fn completion_prompts(
    prompt: Option<PromptBody>,
) -> Result<Vec<Prompt>, InvalidRequest> {
    let Some(PromptBody::List(items)) = &prompt else {
        return Ok(vec![completion_prompt(prompt)?]);
    };
    if items.len() > 1 && items.iter().all(Value::is_string) {
        return Ok(items
            .iter()
            .filter_map(|t| t.as_str().map(|t| Prompt::Text(t.to_owned())))
            .collect());
    }
    if !items.is_empty() && items.iter().all(Value::is_array) {
        return items
            .iter()
            .map(|list| {
                let ids = list.as_array().map(Vec::as_slice).unwrap_or_default();
                if ids.is_empty() {
                    return Err(InvalidRequest::field(
                        "prompt",
                        "a prompt must not be empty",
                    ));
                }
                token_ids(ids).map(Prompt::Tokens).ok_or_else(|| {
                    InvalidRequest::field("prompt", "a token-id prompt holds only token ids")
                })
            })
            .collect();
    }
    Ok(vec![completion_prompt(prompt)?])
}

/// A list of token ids; `None` if any element is not one.
fn token_ids(items: &[Value]) -> Option<Vec<Token>> {
    items
        .iter()
        .map(|t| t.as_i64().and_then(|t| Token::try_from(t).ok()))
        .collect()
}

/// Whether llama-server's `multimodal_data` (of a `{"prompt_string", "multimodal_data"}`
/// prompt) holds any media: absent, null, an empty list and an empty string hold none.
pub fn has_media(multimodal_data: Option<&Value>) -> bool {
    match multimodal_data {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::String(data)) => !data.is_empty(),
        Some(_) => true,
    }
}

/// `{"prompt_string": …}` is its text; media in `multimodal_data` are refused (no projector).
fn object_prompt(object: PromptObject) -> Result<Prompt, InvalidRequest> {
    if has_media(object.multimodal_data.as_ref()) {
        return Err(InvalidRequest::field(
            "prompt.multimodal_data",
            "multimodal input is not supported: the served model has no multimodal projector",
        ));
    }
    object
        .prompt_string
        .map(Prompt::Text)
        .ok_or_else(|| InvalidRequest::field("prompt.prompt_string", "prompt_string is required"))
}

/// A prompt of llama-server's native `/completion`: ready to send, or a list mixing text
/// and token ids whose text parts still have to be tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum NativePrompt {
    Ready(Prompt),
    Mixed(Vec<PromptPart>),
}

/// One element of a mixed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    Text(String),
    Token(Token),
}

/// The native `prompt` as llama-server reads it: one prompt ([`native_prompt`]), or a batch
/// of at most [`MAX_CHOICES`]: a list of several strings, or a list holding token-id lists or
/// prompt objects, each element then one prompt (a string, token ids, a list mixing both, or
/// `{"prompt_string"}`).
pub fn native_prompts(prompt: Option<PromptBody>) -> Result<Vec<NativePrompt>, InvalidRequest> {
    let is_nested = |item: &Value| item.is_array() || item.is_object();
    let items = match prompt {
        Some(PromptBody::List(items))
            if items.iter().any(is_nested)
                || (items.len() > 1 && items.iter().all(Value::is_string)) =>
        {
            items
        }
        other => return Ok(vec![native_prompt(other)?]),
    };
    if items.len() > MAX_CHOICES as usize {
        return Err(InvalidRequest::field(
            "prompt",
            format!("a batch holds at most {MAX_CHOICES} prompts"),
        ));
    }
    items
        .into_iter()
        .map(|item| {
            let bad = || {
                InvalidRequest::field(
                    "prompt",
                    "each prompt of a batch is a string, token ids, a list mixing both, or an \
                     object with prompt_string",
                )
            };
            let body: PromptBody = serde_json::from_value(item).map_err(|_| bad())?;
            if matches!(&body, PromptBody::List(inner) if inner.iter().any(is_nested)) {
                return Err(bad());
            }
            native_prompt(Some(body))
        })
        .collect()
}

/// The native `prompt`: a string, token ids, one string in a list, or a list mixing strings
/// and token ids (one prompt, as llama-server reads it). Several strings are a batch
/// ([`native_prompts`]), refused here.
pub fn native_prompt(prompt: Option<PromptBody>) -> Result<NativePrompt, InvalidRequest> {
    if let Some(PromptBody::List(items)) = &prompt {
        let has_text = items.iter().any(Value::is_string);
        let has_number = items.iter().any(Value::is_number);
        if has_text && has_number {
            return items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(PromptPart::Text(text.clone())),
                    other => other
                        .as_i64()
                        .and_then(|t| Token::try_from(t).ok())
                        .map(PromptPart::Token)
                        .ok_or_else(|| {
                            InvalidRequest::field(
                                "prompt",
                                "a mixed prompt holds only strings and token ids",
                            )
                        }),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(NativePrompt::Mixed);
        }
    }
    completion_prompt(prompt).map(NativePrompt::Ready)
}
