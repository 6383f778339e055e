//! Request bodies as typed structs, and their validation into what the pool runs.
//!
//! Bodies are deserialized with `serde` through `serde_path_to_error`, so a field of the wrong
//! type is reported with its path (`messages[0].content`, `max_tokens`). Unknown fields are
//! ignored, as OpenAI's and llama-server's servers do; fields this server cannot honour yet
//! (`functions`, `echo`, …) are named in a 400 instead of being silently dropped. Nothing past
//! [`parse_generation`] sees JSON.
//!
//! One step per submodule, each used through the re-exports below:
//!
//! - `body`: the body types as clients send them;
//! - `invalid`: [`InvalidRequest`] and [`parse_json`];
//! - `validate`: a generation body into a [`ValidRequest`] ([`parse_generation`]);
//! - `sampling`: the sampling parameters over the server's defaults;
//! - `prompt`: messages and prompts into what the worker renders or tokenizes;
//! - `grammar_choice`: which structured-output field becomes the request's grammar or JSON
//!   schema;
//! - `tools`: tools, `tool_choice`, template arguments and reasoning, for chat.
//!
//! They depend on each other in one direction only: `body` and `invalid` on no sibling;
//! `prompt` and `grammar_choice` on those two; `sampling` also on `grammar_choice` (the grammar
//! is a sampling parameter); `validate` also on `prompt` and `sampling`.

mod body;
mod grammar_choice;
mod invalid;
mod model_name;
mod prompt;
mod sampling;
mod tools;
mod validate;

pub use body::{
    BiasBody, ContentBody, ContentPart, DetokenizeBody, FunctionCallBody, GenerationBody,
    LogitBiasBody, MessageBody, PromptBody, PromptObject, StopBody, StreamOptions, TokenOrText,
    TokenizeBody, ToolCallBody, UnsupportedFields, MAX_CHOICES,
};
pub use invalid::{parse_json, InvalidRequest};
pub use model_name::requested_model;
pub use prompt::{has_media, native_prompt, native_prompts, NativePrompt, PromptPart};
pub use tools::{function_tool, translate_tools};
pub use validate::{parse_generation, Endpoint, ServedModel, StreamReports, ValidRequest};

#[cfg(test)]
mod tests;
