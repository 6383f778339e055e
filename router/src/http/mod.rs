//! The HTTP layer: the route table (axum on hyper 1.x), the shared [`AppState`], API-key
//! checks, admission, and request bodies read with a size limit.
//!
//! Bodies are read by the [`LimitedBody`] extractor (bounded by `server.max_body_bytes`, and
//! in number by `server.max_connections`), but parsed only by the handler once it holds a
//! permit ([`AppState::admit`], [`AppState::admit_control`]): parsing is where one request can
//! cost memory many times its size (a JSON array of token ids), so it happens under the same
//! bound as the work.
//!
//! Every generating route goes one way, `pipeline` (log, admission, dispatch, answer), with
//! `choices` (fan-out and merge) and `stream` (SSE) under it; a route is a request adapter and
//! a response adapter: [`generate`] (OpenAI's chat and text completions) and [`native`]
//! (llama-server's `/completion`). The other handlers: [`info`] (models, health, workers,
//! metrics, tokenize), [`slots`] (`/props`, `/slots`), [`template`] (`/apply-template`, token
//! counts) and [`admin`]. Every failure is an [`ApiError`], turned into a response in one place
//! (`crate::error`).

pub mod access;
pub mod admin;
pub mod auth;
mod choices;
pub mod cors;
pub mod embeddings;
pub mod gateway;
pub mod generate;
pub mod info;
pub mod messages;
pub mod models;
pub mod native;
mod pipeline;
pub mod request_id;
pub mod request_log;
pub mod responses;
pub mod slots;
mod stream;
pub mod template;
pub mod ui;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, Method, Uri};
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use bytes::BytesMut;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use llamapool_common::RequestId;

use crate::dispatch::Pool;
use crate::error::ApiError;
use crate::openai::request::ServedModel;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    /// The one model served (its alias), the model-name rule and the `[generation]` defaults.
    pub served: ServedModel,
    /// `model.path` as resolved at start-up (`/props`' `model_path`).
    pub model_path: String,
    /// Accepted API keys (none: nothing is checked); see [`auth`].
    pub api_keys: auth::ApiKeys,
    /// Keys of the admin routes (`server.admin_api_keys`); see [`access`].
    pub admin_keys: auth::ApiKeys,
    /// The `Host` names requests to a loopback address may carry; see [`access`].
    pub hosts: access::HostPolicy,
    /// Origins allowed to call from a web page; see [`cors`].
    pub cors: cors::CorsPolicy,
    pub max_body_bytes: usize,
    /// How long reading one request body may take (`server.body_read_timeout_secs`).
    pub body_read_timeout: Duration,
    /// Bytes of request bodies being read or held at once (`server.max_buffered_body_bytes`):
    /// one permit per byte, held by the body's [`Bytes`] until the last of them is dropped.
    pub body_budget: Arc<Semaphore>,
    /// Idle time after which a quiet stream gets an SSE comment.
    pub keepalive: Duration,
    /// Slots of the whole pool plus the allowed queue; a request holds a permit until it ends.
    pub admission: Arc<Semaphore>,
    /// `/tokenize` and `/detokenize` calls at once ([`control_call_limit`]).
    pub control_calls: Arc<Semaphore>,
    /// Most tokens `/tokenize` returns and `/detokenize` takes (`server.max_tokenize_tokens`).
    pub max_tokenize_tokens: usize,
    /// How long a stream waits for its client to take more events before it is aborted
    /// (`server.write_timeout_secs`).
    pub write_timeout: Duration,
    pub next_id: AtomicU64,
    /// Unix time the router started (`created` of `/v1/models`).
    pub started: u64,
    /// How long an operator's restart waits for a worker's requests to finish.
    pub drain_timeout: Duration,
    /// Re-reads the configuration for `POST /admin/reload`.
    pub reloader: Option<admin::Reloader>,
    /// `server.slots_endpoint`: whether `GET /slots` is served (501 otherwise).
    pub slots_endpoint: bool,
    /// With several models: every model and its state. The router's own state then has an
    /// empty pool, and each loaded model has a state of its own, which [`Scoped`] gives the
    /// handlers of model-bound routes. `None` with one model: this state is its state.
    pub models: Option<Arc<Models>>,
    /// Set when the node starts draining; `/health` and `/ready` answer 503 from then on.
    pub drain: crate::drain::Drain,
    /// `server.public_metrics`: `GET /metrics` needs no API key.
    pub public_metrics: bool,
}

/// The state a request is served with: its model's when the router serves several (set by
/// [`models::route_to_model`]), else the router's.
#[derive(Debug, Clone)]
pub struct Scoped(pub SharedState);

impl axum::extract::FromRequestParts<SharedState> for Scoped {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(scoped(&parts.extensions, state)))
    }
}

/// The model's state a request was routed to, else `state`.
fn scoped(extensions: &axum::http::Extensions, state: &SharedState) -> SharedState {
    extensions
        .get::<models::ModelScope>()
        .map_or_else(|| state.clone(), |scope| scope.0.clone())
}

pub type SharedState = Arc<AppState>;

/// The registry of several models, each loaded model served with an [`AppState`] of its own.
pub type Models = crate::models::ModelRegistry<AppState>;

impl crate::models::ModelState for AppState {
    fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// Tokenize and detokenize calls in flight per worker. They get their own small limit rather
/// than generation permits: a worker answers them one at a time on the thread that also
/// prepares its generation requests, so more than a couple per worker only wait in the router
/// holding bodies and replies (up to `server.max_tokenize_tokens` pieces each); and a burst
/// of them should neither take generation's permits nor be refused because generation is full.
pub const CONTROL_CALLS_PER_WORKER: usize = 2;

/// The size of [`AppState::control_calls`] for a pool of `workers`.
pub fn control_call_limit(workers: usize) -> usize {
    workers.max(1) * CONTROL_CALLS_PER_WORKER
}

impl AppState {
    /// A generation permit, held until the response ends; none free is a 429 at once.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::queue_full())
    }

    /// `more` generation permits merged into `permit`, one for each further sequence a request
    /// takes (its other choices or prompts); not all free is a 429 at once.
    pub fn admit_more(&self, permit: &mut OwnedSemaphorePermit, more: u32) -> Result<(), ApiError> {
        if more > 0 {
            let more = self
                .admission
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| ApiError::queue_full())?;
            permit.merge(more);
        }
        Ok(())
    }

    /// A fresh request id (the first of a request's choices; the others take theirs in one
    /// block, `choices::choice_requests`).
    pub fn next_request_id(&self) -> RequestId {
        RequestId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// A tokenize/detokenize permit, held until the reply is serialized; none free is a 429.
    pub fn admit_control(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.control_calls
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::queue_full())
    }
}

/// The route table. `/health` (`/v1/health`, `/ready`), `/v1/loads` and the web page ([`ui`])
/// are open; every other route needs the
/// API key when one is set ([`auth::needs_key`]).
pub fn router(state: SharedState) -> Router {
    // Routes that serve a model: with several models, each request goes to the one it names.
    let model_routes = Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        // llama-server's native API; `/completions` is its native one too (OpenAI's is
        // `/v1/completions` only).
        .route("/completion", post(native::completion))
        .route("/completions", post(native::completion))
        .route("/props", get(slots::props))
        .route("/slots", get(slots::slots))
        .route("/apply-template", post(template::apply_template))
        .route(
            "/chat/completions/input_tokens",
            post(template::chat_input_tokens),
        )
        .route(
            "/v1/chat/completions/input_tokens",
            post(template::chat_input_tokens),
        )
        // Anthropic's Messages API.
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        // OpenAI's Responses API; `/responses` too, as llama-server.
        .route("/v1/responses", post(responses::responses))
        .route("/responses", post(responses::responses))
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embeddings", post(embeddings::native))
        .route("/embedding", post(embeddings::native))
        .route("/v1/rerank", post(embeddings::rerank))
        .route("/rerank", post(embeddings::rerank))
        .route("/v1/reranking", post(embeddings::rerank))
        .route("/reranking", post(embeddings::rerank))
        .route("/tokenize", post(info::tokenize))
        .route("/detokenize", post(info::detokenize))
        .route("/workers", get(info::workers))
        .route("/admin/workers/{id}/drain", post(admin::drain))
        .route("/admin/workers/{id}/restart", post(admin::restart))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            models::route_to_model,
        ));
    let api = Router::new()
        .route("/v1/models", get(info::models))
        .route("/models", get(info::models))
        .route("/models/load", post(models::load))
        .route("/models/unload", post(models::unload))
        .route("/metrics", get(info::metrics))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/drain", post(admin::drain_node))
        .merge(model_routes);
    let routes = Router::new()
        .route("/health", get(info::health))
        .route("/v1/health", get(info::health))
        .route("/ready", get(info::health))
        .route("/v1/loads", get(gateway::loads))
        // The web page (`/`, `/ui`, `/ui/{file}`) is open: it holds no data, and its script
        // sends the user's key with every API call.
        .merge(ui::routes())
        .merge(api)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Keys are checked by path before routing (auth::needs_key), 404s included; CORS is
        // outside it, so preflights need no key and 401s carry the CORS headers.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        // The Host check and the admin gate: inside CORS, so that the admin routes' answers
        // get no CORS headers and a preflight never reaches them.
        .layer(middleware::from_fn_with_state(state.clone(), access::guard))
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            info::record_response,
        ))
        .with_state(state);
    // Outermost, so that every answer has an `x-request-id`, also those of the layers above.
    request_id::with_request_ids(routes)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// A request body of at most `server.max_body_bytes` (413 beyond), read whole within
/// `server.body_read_timeout_secs` (408 and the connection closed otherwise), its bytes
/// counted against `server.max_buffered_body_bytes` from the first chunk until the returned
/// [`Bytes`] (and every slice of them) is dropped (503 with `Retry-After` when over).
#[derive(Debug)]
pub struct LimitedBody(pub Bytes);

impl FromRequest<SharedState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        if let Some(models::PreRead(bytes)) = request.extensions().get::<models::PreRead>() {
            return Ok(Self(bytes.clone()));
        }
        let (parts, body) = request.into_parts();
        read_limited(&parts.headers, body, state).await.map(Self)
    }
}

/// A body read whole within the limits [`LimitedBody`] describes.
async fn read_limited(
    headers: &axum::http::HeaderMap,
    body: Body,
    state: &SharedState,
) -> Result<Bytes, ApiError> {
    let limit = state.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::too_large(limit));
    }
    let read = read_body(body, limit, &state.body_budget);
    match tokio::time::timeout(state.body_read_timeout, read).await {
        Ok(body) => body,
        Err(_) => {
            tracing::debug!(timeout = ?state.body_read_timeout, "refused: body read timed out");
            Err(ApiError::body_timeout(state.body_read_timeout))
        }
    }
}

/// Reads `body` whole (at most `limit` bytes), taking one permit of `budget` per byte as the
/// chunks arrive; the permits go with the returned bytes.
async fn read_body(body: Body, limit: usize, budget: &Arc<Semaphore>) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt as _;

    let mut body = body;
    let mut buffer = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ApiError::unreadable_body)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buffer.len() + data.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        let n = u32::try_from(data.len()).map_err(|_| ApiError::too_large(limit))?;
        let more = budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| ApiError::bodies_over_budget())?;
        match &mut held {
            Some(permit) => permit.merge(more),
            None => held = Some(more),
        }
        buffer.extend_from_slice(&data);
    }
    Ok(match held {
        Some(permit) => Bytes::from_owner(Budgeted {
            bytes: buffer.freeze(),
            _permit: permit,
        }),
        None => Bytes::new(),
    })
}

/// A response body that holds something until it is dropped (after its last byte, or when
/// the client goes away): a connection's in-flight count (`serve.rs`), a model's lease
/// ([`models::route_to_model`]).
#[derive(Debug)]
pub struct HeldBody<G> {
    inner: Body,
    _held: G,
}

impl<G> HeldBody<G> {
    pub fn new(inner: Body, held: G) -> Self {
        Self { inner, _held: held }
    }
}

impl<G: Unpin + Send + 'static> hyper::body::Body for HeldBody<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Body bytes with their share of `server.max_buffered_body_bytes`.
struct Budgeted {
    bytes: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}
