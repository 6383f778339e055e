//! Everything but generation: `/v1/models`, `/health`, `/workers`, `/metrics` (and the
//! middleware that counts every response for it), and `/tokenize` / `/detokenize`, answered
//! by a worker's control call.
//!
//! Tokenize and detokenize hold a permit of their own small limit
//! ([`super::control_call_limit`]) from before their body is parsed until their reply is
//! serialized, and their token counts are bounded by `server.max_tokenize_tokens`: a 4 MiB
//! text can be a million tokens, and each `with_pieces` entry is a JSON object.

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llamapool_common::protocol::{ControlCall, ControlReply};
use llamapool_common::Token;
use serde::Serialize;

use super::{LimitedBody, Scoped, SharedState};
use crate::dispatch::{DispatchError, WorkerView};
use crate::error::ApiError;
use crate::metrics;
use crate::metrics::model_server::NodeLoad;
use crate::metrics::Gauges;
use crate::openai::request::{parse_json, DetokenizeBody, TokenizeBody};
use crate::openai::InvalidRequest;

/// `GET /health`'s body.
#[derive(Debug, Serialize)]
pub struct HealthBody {
    pub status: &'static str,
}

/// `GET /health` (and `/v1/health`, `/ready`): 503 from the moment the node drains
/// ([`crate::drain`]); else 200 while a worker is ready (and, at start-up, the others have had
/// their first start: [`crate::dispatch::Pool::is_healthy`]), else 503.
pub async fn health(State(state): State<SharedState>) -> Result<Json<HealthBody>, ApiError> {
    // With several models the router is healthy while it runs: models load on demand, and
    // each one's state is in `/v1/models`.
    if state.drain.is_started() {
        state.drain.record_refused_probe();
        Err(ApiError::draining())
    } else if state.models.is_some() || state.pool.is_healthy() {
        Ok(Json(HealthBody { status: "ok" }))
    } else {
        Err(ApiError::no_worker_ready())
    }
}

/// `GET /v1/models`' body: OpenAI's list.
#[derive(Debug, Serialize)]
pub struct ModelsBody<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

/// One served model, with its other names (`aliases`, `tags`) and llama-server's `meta`.
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub aliases: &'a [String],
    pub tags: &'a [String],
    /// `null` while no worker is ready.
    pub meta: Option<ModelMeta>,
}

/// llama-server's `meta` of a model.
#[derive(Debug, Serialize)]
pub struct ModelMeta {
    pub n_ctx_train: u32,
    pub n_params: u64,
    pub n_vocab: u32,
    pub size: u64,
    pub n_ctx_per_seq: u32,
}

impl ModelMeta {
    pub fn of(info: &llamapool_common::protocol::WorkerInfo) -> Self {
        Self {
            n_ctx_train: info.model.n_ctx_train,
            n_params: info.model.n_params,
            n_vocab: info.model.n_vocab,
            size: info.model.size,
            n_ctx_per_seq: info.n_ctx_per_seq,
        }
    }
}

/// `GET /v1/models`: the one model served, with llama-server's `meta`; with several, every
/// model with its status ([`super::models::list`]).
pub async fn models(
    State(state): State<SharedState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    if let Some(registry) = &state.models {
        // llama-server's `?reload=1` (any value): read the list of models again first.
        if super::models::query_param(uri.query(), "reload").is_some_and(|v| !v.is_empty()) {
            registry.reload()?;
        }
        return Ok(super::models::list(&state, registry));
    }
    let meta = state.pool.worker_info().map(|info| ModelMeta::of(&info));
    let card = ModelCard {
        id: &state.served.alias,
        object: "model",
        created: state.started,
        owned_by: "llamapool",
        aliases: &state.served.names,
        tags: &state.served.tags,
        meta,
    };
    Ok(Json(ModelsBody {
        object: "list",
        data: vec![card],
    })
    .into_response())
}

/// `GET /workers`' body (also the admin routes' answers).
#[derive(Debug, Serialize)]
pub struct WorkersBody {
    pub workers: Vec<WorkerView>,
}

/// `GET /workers`: each worker's state and load.
pub async fn workers(Scoped(state): Scoped) -> Json<WorkersBody> {
    Json(WorkersBody {
        workers: state.pool.views(),
    })
}

/// `GET /metrics`: Prometheus text (llama-server's `llamacpp:` names and llamapool's own;
/// `crate::metrics`), with llama-server's `Process-Start-Time-Unix` header.
pub async fn metrics(
    State(state): State<SharedState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let text = match &state.models {
        Some(registry) => several_models_metrics(&state, registry, uri.query())?,
        None => {
            let gauges = state.pool.gauges();
            let mut text = state.pool.metrics().render(&gauges);
            text.push_str(&NodeLoad::of([&gauges]).render());
            text
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, metrics::CONTENT_TYPE.to_string()),
            (
                header::HeaderName::from_static("process-start-time-unix"),
                state.started.to_string(),
            ),
        ],
        text,
    )
        .into_response())
}

/// With several models: the router's HTTP counts, then each model's series (labelled
/// `model`; its workers' only while it is loaded), or only the model of `?model=`.
fn several_models_metrics(
    state: &SharedState,
    registry: &super::Models,
    query: Option<&str>,
) -> Result<String, ApiError> {
    let only = super::models::query_model(query)
        .map(|name| registry.find(Some(&name)))
        .transpose()?;
    let mut texts = vec![state.pool.metrics().render_http()];
    // The gateways' load is the whole node's (every loaded model), whatever `?model=` selects.
    let mut loaded = Vec::new();
    for model in registry.listing() {
        let gauges = model.state.as_ref().map(|s| s.pool.gauges());
        if only.is_none_or(|o| o == model.id) {
            texts.push(
                model
                    .metrics
                    .render(gauges.as_ref().unwrap_or(&Gauges::default())),
            );
        }
        loaded.extend(gauges);
    }
    texts.push(NodeLoad::of(&loaded).render());
    Ok(metrics::merge_expositions(&texts))
}

/// Middleware on the whole route table: counts every response by its matched route (not the
/// raw path, which a client chooses) and status, 4xx and 5xx included. A stream counts when
/// its headers go out.
pub async fn record_response(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(metrics::UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let response = next.run(request).await;
    state
        .pool
        .metrics()
        .record_response(&endpoint, response.status().as_u16());
    response
}

/// `POST /tokenize`: `{"content", "add_special"?, "with_pieces"?}` → token ids, or
/// `{id, piece}` objects (a piece that is not UTF-8 is given as its bytes). More than
/// `server.max_tokenize_tokens` tokens is a 400 naming `content`.
pub async fn tokenize(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    let _permit = state.admit_control()?;
    let body: TokenizeBody = parse_json(&body)?;
    let content = required(body.content, "content", "content must be a string")?;
    let call = ControlCall::Tokenize {
        content,
        add_special: body.add_special.unwrap_or(false),
        with_pieces: body.with_pieces.unwrap_or(false),
    };
    match state.pool.control(call).await? {
        ControlReply::Tokenized { tokens, pieces } => {
            check_token_count(tokens.len(), state.max_tokenize_tokens, "content")?;
            // Serialized here, under the permit, straight from the reply.
            Ok(match pieces {
                Some(pieces) => Json(Tokens {
                    tokens: tokens
                        .iter()
                        .zip(&pieces)
                        .map(|(&id, piece)| TokenPiece::new(id, piece))
                        .collect::<Vec<_>>(),
                })
                .into_response(),
                None => Json(Tokens { tokens }).into_response(),
            })
        }
        ControlReply::Failed { message } => Err(ApiError::refused("content", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// `/tokenize`'s answer: `tokens` holds ids or [`TokenPiece`]s.
#[derive(Serialize)]
struct Tokens<T: Serialize> {
    tokens: Vec<T>,
}

/// One `with_pieces` entry (keys in alphabetical order, like every response object).
#[derive(Serialize)]
struct TokenPiece<'a> {
    id: Token,
    piece: Piece<'a>,
}

/// A piece as text, or as its bytes when it is not UTF-8 (part of a multi-byte character).
#[derive(Serialize)]
#[serde(untagged)]
enum Piece<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl<'a> TokenPiece<'a> {
    fn new(id: Token, piece: &'a [u8]) -> Self {
        let piece = match std::str::from_utf8(piece) {
            Ok(text) => Piece::Text(text),
            Err(_) => Piece::Bytes(piece),
        };
        Self { id, piece }
    }
}

/// `POST /detokenize`'s body.
#[derive(Debug, Serialize)]
pub struct DetokenizedBody {
    pub content: String,
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"content"}`. More than
/// `server.max_tokenize_tokens` ids is a 400 naming `tokens`.
pub async fn detokenize(
    Scoped(state): Scoped,
    LimitedBody(body): LimitedBody,
) -> Result<Json<DetokenizedBody>, ApiError> {
    let _permit = state.admit_control()?;
    let body: DetokenizeBody = parse_json(&body)?;
    let tokens = required(
        body.tokens,
        "tokens",
        "tokens must be an array of token ids",
    )?;
    check_token_count(tokens.len(), state.max_tokenize_tokens, "tokens")?;
    match state
        .pool
        .control(ControlCall::Detokenize { tokens })
        .await?
    {
        ControlReply::Detokenized { content } => Ok(Json(DetokenizedBody { content })),
        ControlReply::Failed { message } => Err(ApiError::refused("tokens", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// Refuses more than `max` tokens (`server.max_tokenize_tokens`), naming `param`.
fn check_token_count(n: usize, max: usize, param: &str) -> Result<(), InvalidRequest> {
    if n <= max {
        return Ok(());
    }
    Err(InvalidRequest::Field {
        param: param.into(),
        message: format!(
            "{param} has {n} tokens, more than this server's limit of {max} (server.max_tokenize_tokens)"
        ),
    })
}

/// A field the body must have.
fn required<T>(value: Option<T>, param: &str, message: &str) -> Result<T, InvalidRequest> {
    value.ok_or_else(|| InvalidRequest::Field {
        param: param.into(),
        message: message.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_text_or_bytes_and_counts_are_bounded() {
        let body = Tokens {
            tokens: vec![TokenPiece::new(7, b"Hi"), TokenPiece::new(8, b"\xe2\x82")],
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"tokens":[{"id":7,"piece":"Hi"},{"id":8,"piece":[226,130]}]}"#
        );
        check_token_count(1000, 1000, "content").unwrap();
        let e = check_token_count(1001, 1000, "content").unwrap_err();
        assert!(
            matches!(&e, InvalidRequest::Field { param, message } if param == "content" && message.contains("1001")),
            "{e:?}"
        );
    }
}
