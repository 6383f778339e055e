//! The embedding routes: `POST /v1/embeddings` (OpenAI), llama-server's `/embedding` and
//! `/embeddings`, and `/v1/rerank` (also `/rerank`, `/reranking`, `/v1/reranking`).
//!
//! A request takes one admission permit per 64 inputs (per 16 with pooling `none`), so the
//! vectors held at once are bounded; its inputs go to the embedding workers one `Embed` call
//! each, at most as many in flight as those workers have slots (each call to the least loaded
//! one, so one request's inputs spread over the pool and its workers batch them with other
//! requests'). Served only by a pool with embedding workers (`--embedding`, or `[[workers]]`
//! with `embedding = true`); else 501, as llama-server started without `--embeddings`.

use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use llamapool_common::protocol::{ControlCall, ControlReply, EmbedInput};
use llamapool_common::worker::Pooling;

use super::{LimitedBody, Scoped, SharedState};
use crate::dispatch::DispatchError;
use crate::error::ApiError;
use crate::openai::embeddings::{
    embeddings_response, Embedded, EmbeddingsRequest, EmbeddingsShape, RerankRequest,
};
use crate::openai::InvalidRequest;

/// `POST /v1/embeddings`.
pub async fn openai(state: Scoped, body: LimitedBody) -> Result<Response, ApiError> {
    embeddings(state, body, true).await
}

/// `POST /embedding`, `/embeddings`: llama-server's own shape.
pub async fn native(state: Scoped, body: LimitedBody) -> Result<Response, ApiError> {
    embeddings(state, body, false).await
}

async fn embeddings(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
    openai: bool,
) -> Result<Response, ApiError> {
    let pooling = served_pooling(&state, "embeddings", "--embeddings")?;
    // The permit first, as for generation: parsing a large body costs many times its size.
    let mut permit = state.admit()?;
    let request = EmbeddingsRequest::parse(&body, openai)?;
    state.served.check_name(request.model.as_deref())?;
    if pooling == Some(Pooling::None) && matches!(request.shape, EmbeddingsShape::OpenAi { .. }) {
        return Err(InvalidRequest::field(
            "input",
            "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
        )
        .into());
    }
    let per_permit = if pooling == Some(Pooling::None) {
        TOKEN_VECTOR_INPUTS_PER_PERMIT
    } else {
        INPUTS_PER_PERMIT
    };
    state.admit_more(&mut permit, more_permits(request.inputs.len(), per_permit))?;
    let results = embed_all(&state, request.inputs, request.normalize).await?;
    let body = embeddings_response(request.shape, &state.served.alias, results);
    Ok(Json(body).into_response())
}

/// `POST /v1/rerank`: each document's score from a ranking model (pooling `rank`).
pub async fn rerank(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let pooling = served_pooling(&state, "reranking", "--reranking")?;
    if pooling.is_some_and(|p| p != Pooling::Rank) {
        return Err(not_served("reranking", "--reranking"));
    }
    let mut permit = state.admit()?;
    let request = RerankRequest::parse(&body)?;
    state.served.check_name(request.model.as_deref())?;
    let more = more_permits(request.documents.len(), INPUTS_PER_PERMIT);
    state.admit_more(&mut permit, more)?;
    // A score is the raw output of the ranking head, never normalised.
    let results = embed_all(&state, request.inputs(), -1).await?;
    let scored: Vec<(f32, u32)> = results
        .iter()
        .map(|r| {
            let score = r.vectors.first().and_then(|v| v.first()).copied();
            (score.unwrap_or(0.0), r.n_tokens)
        })
        .collect();
    Ok(Json(request.response(&state.served.alias, &scored)).into_response())
}

/// Pooled inputs one admission permit covers. A request's results are held until its
/// response is written, so the permits bound the vectors held at once: at most
/// `max_queued + slots` permits of this many vectors each. The largest request (2048 inputs)
/// takes 32 permits, well within the pool's.
const INPUTS_PER_PERMIT: usize = 64;

/// The same with pooling `none`, whose inputs have a vector per token (up to `n_batch`): the
/// largest request takes 128 permits, still within the default pool's 256 + slots.
const TOKEN_VECTOR_INPUTS_PER_PERMIT: usize = 16;

/// The permits beyond the first that `inputs` inputs take at `per_permit` each.
fn more_permits(inputs: usize, per_permit: usize) -> u32 {
    u32::try_from(inputs.div_ceil(per_permit).saturating_sub(1)).unwrap_or(u32::MAX)
}

/// The pool's embedding pooling (from a ready embedding worker; `None` while none is
/// ready), or 501 when no worker serves embeddings.
fn served_pooling(
    state: &SharedState,
    what: &str,
    flag: &str,
) -> Result<Option<Pooling>, ApiError> {
    if !state.pool.embeds() {
        return Err(not_served(what, flag));
    }
    Ok(state.pool.embedding_pooling())
}

fn not_served(what: &str, flag: &str) -> ApiError {
    ApiError::not_supported(format!(
        "This server does not support {what}. Start it with `{flag}`"
    ))
}

/// Embeds every input, in order, with at most the embedding workers' slots in flight; the
/// first input refused or failed fails the request (the calls still running are dropped).
async fn embed_all(
    state: &SharedState,
    inputs: Vec<EmbedInput>,
    normalize: i32,
) -> Result<Vec<Embedded>, ApiError> {
    let in_flight = state.pool.embedding_slots().max(1);
    stream::iter(inputs)
        .map(|input| embed_one(state, input, normalize))
        .buffered(in_flight)
        .try_collect()
        .await
}

async fn embed_one(
    state: &SharedState,
    input: EmbedInput,
    normalize: i32,
) -> Result<Embedded, ApiError> {
    match state
        .pool
        .embed(ControlCall::Embed { input, normalize })
        .await?
    {
        ControlReply::Embedded { vectors, n_tokens } => {
            state.pool.metrics().record_embedded(n_tokens);
            Ok(Embedded { vectors, n_tokens })
        }
        ControlReply::Refused(error) => Err(error.into()),
        ControlReply::Failed { message } => Err(ApiError::refused("input", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}
