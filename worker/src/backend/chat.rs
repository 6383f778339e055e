//! llama.cpp's own chat code (`common/chat.h`, through `cpp/chat_shim.cpp`): what llama-server
//! runs with `--jinja`.
//!
//! - [`ChatTemplates`]: the model's Jinja template (or the configured one), rendered with
//!   messages in OpenAI's shape, tools and template arguments, into a prompt plus what the
//!   generation needs: the tool-call grammar and its lazy triggers, tokens to keep as text,
//!   extra stop strings, and the output parser.
//! - [`ChatParser`]: one request's output parser, fed the generated text and answering what
//!   changed in content, reasoning and tool calls (llama-server's diffs).
//!
//! Everything crosses the boundary as JSON text; no C++ exception does.

// The one FFI module of the worker besides llama-cpp-2 itself: every unsafe block is a call
// into cpp/chat_shim.cpp with pointers this module owns.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr::NonNull;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[repr(C)]
struct LpChat {
    _private: [u8; 0],
}

#[repr(C)]
struct LpChatParser {
    _private: [u8; 0],
}

extern "C" {
    fn lp_chat_string_free(ptr: *mut c_char);
    fn lp_chat_init(
        model: *const llama_cpp_sys_2::llama_model,
        template_override: *const c_char,
        chat: *mut *mut LpChat,
        out: *mut *mut c_char,
    ) -> c_int;
    fn lp_chat_free(chat: *mut LpChat);
    fn lp_chat_source(chat: *const LpChat, out: *mut *mut c_char) -> c_int;
    fn lp_chat_apply(chat: *const LpChat, inputs: *const c_char, out: *mut *mut c_char) -> c_int;
    fn lp_chat_parser_new(
        params: *const c_char,
        parser: *mut *mut LpChatParser,
        out: *mut *mut c_char,
    ) -> c_int;
    fn lp_chat_parser_free(parser: *mut LpChatParser);
    fn lp_chat_parser_feed(
        parser: *mut LpChatParser,
        text: *const c_char,
        len: usize,
        is_partial: bool,
        out: *mut *mut c_char,
    ) -> c_int;
}

/// Takes a string the shim allocated: its text (lossy) and frees it.
fn take_string(ptr: *mut c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc, freed once, here.
    let text = unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned();
    unsafe { lp_chat_string_free(ptr) };
    text
}

/// A C string of `text`, or an error naming the NUL byte.
fn c_string(text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| "the text contains a NUL byte".to_string())
}

/// A loaded chat template. llama.cpp's rendering keeps no state between calls, but the lock
/// makes that no concern of the callers (the prepare thread renders, rarely anything else).
pub struct ChatTemplates {
    chat: Mutex<NonNull<LpChat>>,
    source: String,
}

// SAFETY: the handle is only used under the mutex, and llama.cpp's templates are plain data.
unsafe impl Send for ChatTemplates {}
unsafe impl Sync for ChatTemplates {}

impl Drop for ChatTemplates {
    fn drop(&mut self) {
        let chat = self
            .chat
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: created by lp_chat_init, freed once.
        unsafe { lp_chat_free(chat.as_ptr()) };
    }
}

/// What rendering a conversation produced (`common_chat_params`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Rendered {
    pub prompt: String,
    pub format: i64,
    pub grammar: String,
    pub grammar_lazy: bool,
    pub grammar_triggers: Vec<RenderedTrigger>,
    pub preserved_tokens: Vec<String>,
    pub additional_stops: Vec<String>,
    pub generation_prompt: String,
    pub parser: String,
    pub supports_thinking: bool,
}

/// A lazy grammar's trigger (`common_grammar_trigger`): `type` 0 a token, 1 a word, 2 a
/// pattern matched anywhere, 3 a pattern the whole output must match.
#[derive(Debug, Clone, Deserialize)]
pub struct RenderedTrigger {
    #[serde(rename = "type")]
    pub kind: i64,
    pub value: String,
    pub token: i64,
}

impl ChatTemplates {
    /// The templates of `model`, or `template` (a Jinja text or a llama.cpp built-in name).
    ///
    /// # Safety
    /// `model` must be a live model that outlives the templates.
    pub unsafe fn new(
        model: *const llama_cpp_sys_2::llama_model,
        template: Option<&str>,
    ) -> Result<Self, String> {
        let template = c_string(template.unwrap_or(""))?;
        let mut chat = std::ptr::null_mut();
        let mut out = std::ptr::null_mut();
        // SAFETY: valid pointers; the shim catches every exception.
        let status = unsafe { lp_chat_init(model, template.as_ptr(), &mut chat, &mut out) };
        let message = take_string(out);
        let chat = match NonNull::new(chat) {
            Some(chat) if status == 0 => chat,
            _ => return Err(message),
        };
        let mut out = std::ptr::null_mut();
        // SAFETY: `chat` is live.
        let status = unsafe { lp_chat_source(chat.as_ptr(), &mut out) };
        let source = take_string(out);
        let templates = Self {
            chat: Mutex::new(chat),
            source: if status == 0 { source } else { String::new() },
        };
        Ok(templates)
    }

    /// The template's source text (for `/props`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `inputs` (the shim's input object, see [`RenderInputs`]).
    pub fn apply(&self, inputs: &RenderInputs<'_>) -> Result<Rendered, String> {
        let json = serde_json::to_string(inputs).map_err(|e| e.to_string())?;
        let json = c_string(&json)?;
        let chat = self
            .chat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = std::ptr::null_mut();
        // SAFETY: `chat` is live; the shim catches every exception.
        let status = unsafe { lp_chat_apply(chat.as_ptr(), json.as_ptr(), &mut out) };
        drop(chat);
        let text = take_string(out);
        if status != 0 {
            return Err(text);
        }
        serde_json::from_str(&text).map_err(|e| format!("unreadable rendering ({e})"))
    }
}

/// The inputs of one rendering, in the shim's JSON shape (`common_chat_templates_inputs`).
#[derive(Debug, Clone, Serialize)]
pub struct RenderInputs<'a> {
    /// OpenAI's messages.
    pub messages: serde_json::Value,
    /// OpenAI's tools.
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<&'a str>,
    /// `None`: what the template supports.
    pub parallel_tool_calls: Option<bool>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// False for a llama.cpp built-in template name, rendered by its template matcher.
    pub use_jinja: bool,
    /// An object; each value becomes the template variable of its key.
    pub chat_template_kwargs: Option<serde_json::Value>,
    pub reasoning_format: &'a str,
    /// Thinking is asked for (`--reasoning` not `off`): the template gets `enable_thinking`
    /// when it supports it, and `chat_template_kwargs.enable_thinking` decides over this.
    pub enable_thinking: bool,
    /// The default of the template argument `preserve_reasoning` (a request's
    /// `chat_template_kwargs` decides over it).
    pub preserve_reasoning: bool,
    pub json_schema: Option<&'a str>,
}

/// How a request's output is parsed (`common_chat_parser_params`).
#[derive(Debug, Clone, Serialize)]
pub struct ParserParams {
    pub format: i64,
    pub reasoning_format: String,
    pub reasoning_in_content: bool,
    pub generation_prompt: String,
    pub parse_tool_calls: bool,
    pub is_continuation: bool,
    pub parser: String,
}

/// What one feed changed (`common_chat_msg_diff`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ParsedDiff {
    pub reasoning_content_delta: String,
    pub content_delta: String,
    pub tool_call_index: Option<u32>,
    pub tool_call_delta: Option<ParsedToolCall>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ParsedToolCall {
    pub name: String,
    pub arguments: String,
    pub id: String,
}

#[derive(Deserialize)]
struct Fed {
    diffs: Vec<ParsedDiff>,
}

/// One request's output parser.
pub struct ChatParser(NonNull<LpChatParser>);

// SAFETY: used by one thread at a time (`&mut self`); it owns plain data.
unsafe impl Send for ChatParser {}

impl Drop for ChatParser {
    fn drop(&mut self) {
        // SAFETY: created by lp_chat_parser_new, freed once.
        unsafe { lp_chat_parser_free(self.0.as_ptr()) };
    }
}

impl std::fmt::Debug for ChatParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatParser")
    }
}

impl ChatParser {
    pub fn new(params: &ParserParams) -> Result<Self, String> {
        let json = serde_json::to_string(params).map_err(|e| e.to_string())?;
        let json = c_string(&json)?;
        let mut parser = std::ptr::null_mut();
        let mut out = std::ptr::null_mut();
        // SAFETY: valid pointers; the shim catches every exception.
        let status = unsafe { lp_chat_parser_new(json.as_ptr(), &mut parser, &mut out) };
        let message = take_string(out);
        match NonNull::new(parser) {
            Some(parser) if status == 0 => Ok(Self(parser)),
            _ => Err(message),
        }
    }

    /// Appends `text` to the output and parses it all again (`partial` while the generation
    /// goes on); returns what changed.
    pub fn feed(&mut self, text: &str, partial: bool) -> Result<Vec<ParsedDiff>, String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `self.0` is live; the text is passed with its length (it may hold NULs).
        let status = unsafe {
            lp_chat_parser_feed(
                self.0.as_ptr(),
                text.as_ptr().cast(),
                text.len(),
                partial,
                &mut out,
            )
        };
        let text = take_string(out);
        if status != 0 {
            return Err(text);
        }
        let fed: Fed =
            serde_json::from_str(&text).map_err(|e| format!("unreadable parse ({e})"))?;
        Ok(fed.diffs)
    }
}
