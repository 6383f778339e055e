//! The HTTP layer: the route table (axum on hyper 1.x), the shared [`AppState`], API-key
//! checks, and request bodies read with a size limit and parsed into typed structs.
//!
//! Handlers live in [`generate`] (chat and text completions, streamed or not) and [`info`]
//! (models, health, workers, metrics, tokenize). Every failure is an [`ApiError`], turned into
//! a response in one place (`crate::error`).

pub mod generate;
pub mod info;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::dispatch::Pool;
use crate::error::ApiError;
use crate::openai::request::parse_json;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    /// The one model name served.
    pub alias: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Idle time after which a quiet stream gets an SSE comment.
    pub keepalive: Duration,
    /// Slots of the whole pool plus the allowed queue; a request holds a permit until it ends.
    pub admission: Arc<Semaphore>,
    pub next_id: AtomicU64,
    /// Unix time the router started (`created` of `/v1/models`).
    pub started: u64,
}

pub type SharedState = Arc<AppState>;

/// The route table. `/health` is open; every other route needs the API key when one is set.
pub fn router(state: SharedState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/completions", post(generate::completions))
        .route("/tokenize", post(info::tokenize))
        .route("/detokenize", post(info::detokenize))
        .route("/v1/models", get(info::models))
        .route("/models", get(info::models))
        .route("/workers", get(info::workers))
        .route("/metrics", get(info::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(info::health))
        .merge(protected)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

async fn require_api_key(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(next.run(request).await)
}

/// A request body of at most `server.max_body_bytes` (413 beyond).
#[derive(Debug)]
pub struct LimitedBody(pub Bytes);

impl FromRequest<SharedState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        let limit = state.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(ApiError::too_large(limit));
        }
        match axum::body::to_bytes(request.into_body(), limit).await {
            Ok(bytes) => Ok(Self(bytes)),
            Err(e) if is_length_limit(&e) => Err(ApiError::too_large(limit)),
            Err(e) => Err(ApiError::unreadable_body(e)),
        }
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A JSON body parsed into `T`; a field of the wrong type is named in the 400.
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        let LimitedBody(bytes) = LimitedBody::from_request(request, state).await?;
        Ok(Self(parse_json(&bytes)?))
    }
}
