//! The one path every generating route takes ([`serve`]): the request's log and span,
//! admission (429 when full), the route's request adapter ([`Plan`]), dispatch of every
//! choice, then either the route's streamed shape fed by a producer task ([`super::stream`])
//! or the collected outputs handed to the route's response adapter ([`Reply`]).
//!
//! A route is thus two adapters: a function that turns a body into a [`Plan`] (the
//! `GenerateRequest`s to run and a [`Reply`]), and that [`Reply`]: how a finished request's
//! outputs become a body, and how a stream's outputs become events. Admission, dispatch,
//! the request log, metrics timers, aborts and client disconnects are handled here alike.
//!
//! Several choices (`n` > 1, or a batch of prompts: [`super::choices`]) each hold one
//! admission permit (a choice occupies a sequence like any request; 429 when the pool cannot
//! take them all) and are submitted together, so they may run on different workers. The
//! response is committed once every choice was accepted.

use std::future::Future;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use llamapool_common::protocol::GenerateRequest;
use tracing::Instrument;

use super::choices::{choice_timers, collect, Choices, Collected};
use super::request_id::XRequestId;
use super::request_log::RequestLog;
use super::stream::{feed, sse_channel, StreamFormat};
use super::{LimitedBody, SharedState};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::Endpoint;

/// What a route's request adapter makes of a body.
pub(super) struct Plan<R> {
    /// The generations to run, prompt-major: `per_prompt` choices for each prompt.
    pub requests: Vec<GenerateRequest>,
    pub per_prompt: usize,
    pub stream: bool,
    /// How the outputs are answered.
    pub reply: R,
}

/// What every generating route takes from its request: the shared state, the request's
/// `x-request-id`, and its body (read with the size limit, [`LimitedBody`], not parsed yet).
pub struct GenerationCall {
    pub state: SharedState,
    pub request_id: String,
    pub body: Bytes,
}

impl FromRequest<SharedState> for GenerationCall {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let Ok(XRequestId(request_id)) = XRequestId::from_request_parts(&mut parts, state).await;
        let Ok(super::Scoped(state)) = super::Scoped::from_request_parts(&mut parts, state).await;
        let LimitedBody(body) =
            LimitedBody::from_request(Request::from_parts(parts, body), &state).await?;
        Ok(Self {
            state,
            request_id,
            body,
        })
    }
}

/// A whole response, or the error that replaces it.
pub(super) type Answer = Result<Response, ApiError>;

/// A route's response adapter.
pub(super) trait Reply: Send + 'static {
    type Stream: StreamFormat;

    /// The streamed shape, for a request of `choices` choices.
    fn stream(self, choices: usize) -> Self::Stream;

    /// The whole response to a request whose choices finished with `collected`.
    fn respond(self, collected: Vec<Collected>) -> impl Future<Output = Answer> + Send;
}

/// Serves one generating request: [`run`] in the request's span, logged as `logged_as`; an
/// error response ends the request's log. `plan` is the route's request adapter: a future
/// polled only once a permit is held (a future does nothing until then), which takes the
/// request's id from [`SharedState`]'s counter itself.
pub(super) async fn serve<R: Reply>(
    state: &SharedState,
    request_id: &str,
    logged_as: Endpoint,
    plan: impl Future<Output = Result<Plan<R>, ApiError>>,
) -> Result<Response, ApiError> {
    let log = RequestLog::start(logged_as, request_id);
    let span = log.span().clone();
    let mut log = Some(log);
    let result = run(state, request_id, plan, &mut log)
        .instrument(span)
        .await;
    if let (Err(error), Some(log)) = (&result, log.as_mut()) {
        log.failed(error);
    }
    result
}

/// Admits, plans, dispatches and answers. A stream takes `log` to its producer task; else it
/// stays with the caller, who drops it (writing its line) when the handler ends or is
/// dropped.
async fn run<R: Reply>(
    state: &SharedState,
    request_id: &str,
    plan: impl Future<Output = Result<Plan<R>, ApiError>>,
    log: &mut Option<RequestLog>,
) -> Result<Response, ApiError> {
    if !state.pool.generates() {
        return Err(ApiError::not_supported(
            "This server does not support completions. Start it without `--embeddings`",
        ));
    }
    let timer = RequestTimer::start(state.pool.metrics().clone());
    // The permit first: parsing a large body (a token array) costs many times its size.
    let mut permit = state.admit()?;
    let Plan {
        mut requests,
        per_prompt,
        stream,
        reply,
    } = plan.await?;
    for request in &mut requests {
        request_id.clone_into(&mut request.request_id);
    }
    // One permit per choice: each takes a sequence of its own.
    let more = u32::try_from(requests.len() - 1).unwrap_or(u32::MAX);
    state.admit_more(&mut permit, more)?;
    // Committed to a status only once a worker accepted every choice; a refusal drops (and
    // so aborts) the choices already accepted.
    let handles = state.pool.submit_all(requests).await?;
    let timers = choice_timers(state, timer, handles.len());
    let mut choices = Choices::new(handles, timers, per_prompt);
    let served_by = workers_header(&choices.last_workers);
    if stream {
        let (sink, body) = sse_channel(state);
        let mut log = log.take().expect("only a stream takes the log");
        log.on_worker(choices.first_worker);
        log.committed(200);
        let format = reply.stream(choices.len());
        tokio::spawn(feed(choices, format, sink, permit, log).instrument(tracing::Span::current()));
        Ok((served_by, body).into_response())
    } else {
        let log = log.as_mut().expect("a non-streamed request keeps its log");
        log.on_worker(choices.first_worker);
        let collected = collect(&mut choices, log).await?;
        log.finished(&choices.total());
        drop(permit);
        // A moved request ends on another worker than it started on.
        let served_by = workers_header(&choices.last_workers);
        let body = reply.respond(collected).await?;
        Ok((served_by, body).into_response())
    }
}

/// `x-llamapool-worker`: the workers of the choices (where they were accepted, or where
/// they finished), one id or several joined by commas.
fn workers_header(workers: &[usize]) -> [(&'static str, String); 1] {
    let ids: Vec<String> = workers.iter().map(usize::to_string).collect();
    [("x-llamapool-worker", ids.join(","))]
}
