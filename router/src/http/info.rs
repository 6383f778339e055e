//! Everything but generation: `/v1/models`, `/health`, `/workers`, `/metrics` (llama-server's
//! names), and `/tokenize` / `/detokenize`, answered by a worker's control call.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llamapool_common::protocol::{ControlCall, ControlReply};
use serde_json::{json, Value};

use super::{SharedState, ValidJson};
use crate::dispatch::DispatchError;
use crate::error::ApiError;
use crate::metrics::Gauges;
use crate::openai::request::{DetokenizeBody, TokenizeBody};
use crate::openai::InvalidRequest;

/// `GET /health`: 200 while any worker is ready, else 503.
pub async fn health(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    if state.pool.ready_count() > 0 {
        Ok(Json(json!({"status": "ok"})))
    } else {
        Err(ApiError::no_worker_ready())
    }
}

/// `GET /v1/models`: the one model served, with llama-server's `meta`.
pub async fn models(State(state): State<SharedState>) -> Json<Value> {
    let meta = state.pool.worker_info().map(|info| {
        json!({
            "n_ctx_train": info.model.n_ctx_train,
            "n_params": info.model.n_params,
            "n_vocab": info.model.n_vocab,
            "size": info.model.size,
            "n_ctx_per_seq": info.n_ctx_per_seq,
        })
    });
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.alias,
            "object": "model",
            "created": state.started,
            "owned_by": "llamapool",
            "meta": meta,
        }],
    }))
}

/// `GET /workers`: each worker's state and load.
pub async fn workers(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({ "workers": state.pool.views().await }))
}

/// `GET /metrics`: Prometheus text under llama-server's `llamacpp:` names.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let processing = state.pool.in_flight();
    let gauges = Gauges {
        processing,
        deferred: processing.saturating_sub(state.pool.total_slots()),
        decode_calls: state.pool.decode_calls().await,
        ready_workers: state.pool.ready_count(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.pool.metrics().render(gauges),
    )
        .into_response()
}

/// `POST /tokenize`: `{"content", "add_special"?, "with_pieces"?}` → token ids, or
/// `{id, piece}` objects (a piece that is not UTF-8 is given as its bytes).
pub async fn tokenize(
    State(state): State<SharedState>,
    ValidJson(body): ValidJson<TokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let content = required(body.content, "content", "content must be a string")?;
    let call = ControlCall::Tokenize {
        content,
        add_special: body.add_special.unwrap_or(false),
        with_pieces: body.with_pieces.unwrap_or(false),
    };
    match state.pool.control(call).await? {
        ControlReply::Tokenized {
            tokens,
            pieces: Some(pieces),
        } => {
            let items: Vec<Value> = tokens
                .iter()
                .zip(pieces)
                .map(|(id, piece)| match String::from_utf8(piece) {
                    Ok(text) => json!({"id": id, "piece": text}),
                    Err(e) => json!({"id": id, "piece": e.into_bytes()}),
                })
                .collect();
            Ok(Json(json!({ "tokens": items })))
        }
        ControlReply::Tokenized {
            tokens,
            pieces: None,
        } => Ok(Json(json!({ "tokens": tokens }))),
        ControlReply::Failed { message } => Err(ApiError::refused("content", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"content"}`.
pub async fn detokenize(
    State(state): State<SharedState>,
    ValidJson(body): ValidJson<DetokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let tokens = required(
        body.tokens,
        "tokens",
        "tokens must be an array of token ids",
    )?;
    match state
        .pool
        .control(ControlCall::Detokenize { tokens })
        .await?
    {
        ControlReply::Detokenized { content } => Ok(Json(json!({ "content": content }))),
        ControlReply::Failed { message } => Err(ApiError::refused("tokens", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// A field the body must have.
fn required<T>(value: Option<T>, param: &str, message: &str) -> Result<T, InvalidRequest> {
    value.ok_or_else(|| InvalidRequest::Field {
        param: param.into(),
        message: message.into(),
    })
}
