//! The model's chat template, rendered by a worker: `POST /apply-template` (the prompt a chat
//! request's `messages` become) and `POST /chat/completions/input_tokens` (how many tokens
//! that prompt is), and the prompt text of a request's `__verbose`.

use axum::Json;
use llamapool_common::protocol::{ChatPrompt, ControlCall, ControlReply, Prompt};

use super::{LimitedBody, Scoped, SharedState};
use crate::dispatch::DispatchError;
use crate::error::ApiError;
use crate::openai::llama_server::{InputTokensBody, RenderedBody};
use crate::openai::request::{parse_json, GenerationBody};

/// `POST /apply-template`: `{"messages"}` rendered with the model's chat template by a worker,
/// as a chat request's prompt would be → `{"prompt"}`. Holds a tokenize-call permit.
pub async fn apply_template(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Json<RenderedBody>, ApiError> {
    let _permit = state.admit_control()?;
    let mut body: GenerationBody = parse_json(&body)?;
    let chat = body.chat(&state.served.defaults)?;
    let prompt = apply_template_call(&state, chat).await?;
    Ok(Json(RenderedBody { prompt }))
}

/// `POST /chat/completions/input_tokens` (also under `/v1`), llama-server's token count: how
/// many prompt tokens a chat request with these `messages` would have (the template rendered
/// and tokenized by a worker, as for generation) → `{"input_tokens"}`. The rest of the chat
/// body is ignored. Holds a tokenize-call permit.
pub async fn chat_input_tokens(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Json<InputTokensBody>, ApiError> {
    let _permit = state.admit_control()?;
    let mut body: GenerationBody = parse_json(&body)?;
    let chat = body.chat(&state.served.defaults)?;
    let input_tokens = count_chat_tokens(&state, chat).await?;
    Ok(Json(InputTokensBody { input_tokens }))
}

/// How many prompt tokens `chat` is: rendered with the chat template and tokenized by a
/// worker, as for generation (two control calls; the caller holds a control permit).
pub(super) async fn count_chat_tokens(
    state: &SharedState,
    chat: ChatPrompt,
) -> Result<usize, ApiError> {
    let call = ControlCall::Tokenize {
        content: apply_template_call(state, chat).await?,
        add_special: true,
        with_pieces: false,
    };
    match state.pool.control(call).await? {
        ControlReply::Tokenized { tokens, .. } => Ok(tokens.len()),
        ControlReply::Failed { message } => Err(ApiError::refused("messages", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// A prompt as text for `__verbose`: a text prompt as given, a chat rendered by a worker (one
/// control call; `None` if it fails), token ids not at all.
pub(super) async fn prompt_text(state: &SharedState, prompt: Prompt) -> Option<String> {
    match prompt {
        Prompt::Text(text) => Some(text),
        Prompt::Tokens(_) => None,
        Prompt::Chat(chat) => apply_template_call(state, chat).await.ok(),
    }
}

/// `chat` rendered by a worker with the chat template (the `ApplyTemplate` control call).
async fn apply_template_call(state: &SharedState, chat: ChatPrompt) -> Result<String, ApiError> {
    match state
        .pool
        .control(ControlCall::ApplyTemplate { chat })
        .await?
    {
        ControlReply::Rendered { prompt } => Ok(prompt),
        ControlReply::Failed { message } => Err(ApiError::refused("messages", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}
