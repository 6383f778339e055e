//! The HTTP server: routing, the handlers, request bodies with a size limit, and the response
//! body type (a whole buffer, or a channel of SSE events fed by a producer task).
//!
//! Handlers parse at the edge ([`crate::openai`]), admit against a bounded capacity (429 when
//! full), dispatch to the pool, and wait for the worker to accept or reject before committing
//! to a status; after that, a stream reports errors as an SSE `{"error": ...}` event.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{header, Method, Request, Response, StatusCode};
use llamapool_common::protocol::{ControlCall, ControlReply};
use llamapool_common::{Finish, RequestId, SeqOutput};
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::dispatch::{Pool, RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::Gauges;
use crate::openai::{self, Endpoint, Envelope, ValidRequest};

/// A response body: all at once, or streamed from a channel.
#[derive(Debug)]
pub enum Body {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Channel(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Channel(_) => SizeHint::default(),
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    pub alias: String,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub keepalive: Duration,
    /// Slots of the whole pool plus the allowed queue; a request holds a permit until it ends.
    pub admission: Arc<Semaphore>,
    pub next_id: AtomicU64,
    pub started: u64,
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::full(value.to_string()))
        .expect("a valid response")
}

/// Routes one request; every failure becomes an OpenAI-shaped error.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(route(&state, req)
        .await
        .unwrap_or_else(ApiError::into_response))
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let allowed: &[Method] = match path.as_str() {
        "/v1/chat/completions"
        | "/chat/completions"
        | "/v1/completions"
        | "/completions"
        | "/tokenize"
        | "/detokenize" => &[Method::POST],
        "/v1/models" | "/models" | "/health" | "/workers" | "/metrics" => &[Method::GET],
        _ => return Err(ApiError::not_found(format!("no route for {method} {path}"))),
    };
    if !allowed.contains(&method) {
        return Err(ApiError::method_not_allowed(&method, &path));
    }
    if path != "/health" {
        authorize(state, &req)?;
    }
    match path.as_str() {
        "/v1/chat/completions" | "/chat/completions" => generate(state, req, Endpoint::Chat).await,
        "/v1/completions" | "/completions" => generate(state, req, Endpoint::Completions).await,
        "/v1/models" | "/models" => Ok(models(state)),
        "/health" => health(state),
        "/workers" => Ok(json_response(
            StatusCode::OK,
            &json!({ "workers": state.pool.views().await }),
        )),
        "/metrics" => Ok(metrics(state).await),
        "/tokenize" => tokenize(state, req).await,
        "/detokenize" => detokenize(state, req).await,
        _ => unreachable!("routes are matched above"),
    }
}

fn authorize(state: &AppState, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = state.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(limit))
        }
        Err(e) => Err(ApiError::invalid(format!("reading the body failed: {e}"))),
    }
}

fn health(state: &AppState) -> Result<Response<Body>, ApiError> {
    if state.pool.ready_count() > 0 {
        Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
    } else {
        Err(ApiError::unavailable("no worker is ready"))
    }
}

fn models(state: &AppState) -> Response<Body> {
    let meta = state.pool.worker_info().map(|info| {
        json!({
            "n_ctx_train": info.model.n_ctx_train,
            "n_params": info.model.n_params,
            "n_vocab": info.model.n_vocab,
            "size": info.model.size,
            "n_ctx_per_seq": info.n_ctx_per_seq,
        })
    });
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{
                "id": state.alias,
                "object": "model",
                "created": state.started,
                "owned_by": "llamapool",
                "meta": meta,
            }],
        }),
    )
}

async fn metrics(state: &AppState) -> Response<Body> {
    let processing = state.pool.in_flight();
    let gauges = Gauges {
        processing,
        deferred: processing.saturating_sub(state.pool.total_slots()),
        decode_calls: state.pool.decode_calls().await,
        ready_workers: state.pool.ready_count(),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::full(state.pool.metrics().render(gauges)))
        .expect("a valid response")
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::invalid("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn flag(o: &serde_json::Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid_param(
            name,
            format!("{name} must be true or false"),
        )),
    }
}

async fn tokenize(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let o = json_object(&read_body(state, req).await?)?;
    let content = match o.get("content") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(ApiError::invalid_param(
                "content",
                "content must be a string",
            ))
        }
    };
    let with_pieces = flag(&o, "with_pieces")?;
    let body = ControlCall::Tokenize {
        content,
        add_special: flag(&o, "add_special")?,
        with_pieces,
    };
    match state.pool.control(body).await? {
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
            Ok(json_response(StatusCode::OK, &json!({ "tokens": items })))
        }
        ControlReply::Tokenized {
            tokens,
            pieces: None,
        } => Ok(json_response(StatusCode::OK, &json!({ "tokens": tokens }))),
        other => Err(ApiError::internal(format!(
            "unexpected worker reply {other:?}"
        ))),
    }
}

async fn detokenize(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let o = json_object(&read_body(state, req).await?)?;
    let tokens = match o.get("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid_param("tokens", "tokens must be an array of token ids")
            })?,
        _ => {
            return Err(ApiError::invalid_param(
                "tokens",
                "tokens must be an array of token ids",
            ))
        }
    };
    match state
        .pool
        .control(ControlCall::Detokenize { tokens })
        .await?
    {
        ControlReply::Detokenized { content } => Ok(json_response(
            StatusCode::OK,
            &json!({ "content": content }),
        )),
        ControlReply::Failed { message } => Err(ApiError::invalid_param("tokens", message)),
        other => Err(ApiError::internal(format!(
            "unexpected worker reply {other:?}"
        ))),
    }
}

async fn generate(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(state, req).await?;
    let id = RequestId(state.next_id.fetch_add(1, Ordering::Relaxed));
    let valid = openai::parse(&body, endpoint, &state.alias, id)?;
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::queue_full())?;
    let ValidRequest {
        stream,
        include_usage,
        generate,
        ..
    } = valid;
    let mut handle = state.pool.dispatch(generate)?;
    // Commit to a status only once the worker accepted (or rejected) the request.
    let first = next_output(&mut handle).await?;
    let envelope = Envelope::new(endpoint, &state.alias);
    if stream {
        let (tx, rx) = mpsc::channel(64);
        let keepalive = state.keepalive;
        tokio::spawn(stream_events(
            handle,
            first,
            envelope,
            include_usage,
            keepalive,
            tx,
            permit,
        ));
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::Channel(rx))
            .expect("a valid response"))
    } else {
        let mut text = first.text;
        let mut finish = first.finish;
        while finish.is_none() {
            let o = next_output(&mut handle).await?;
            text.push_str(&o.text);
            finish = o.finish;
        }
        handle.guard.finished();
        drop(permit);
        let finish = finish.expect("loop ends with a finish");
        Ok(json_response(
            StatusCode::OK,
            &envelope.response(&text, &finish),
        ))
    }
}

/// The next output of a request, or the error that ended it (then nothing is left to abort).
/// Cancel-safe: nothing happens before the receive completes.
async fn next_output(handle: &mut RequestHandle) -> Result<SeqOutput, ApiError> {
    let error = match handle.events.recv().await {
        Some(StreamEvent::Output(o)) => return Ok(o),
        Some(StreamEvent::Failed(e)) => ApiError::from(e),
        Some(StreamEvent::Unavailable(m)) => ApiError::unavailable(m),
        None => ApiError::unavailable("the worker went away"),
    };
    handle.guard.finished();
    Err(error)
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Feeds one stream: role chunk, text chunks, finish chunk, optional usage chunk, `[DONE]`.
/// Ends early (and the guard aborts the request) when the client goes away.
async fn stream_events(
    mut handle: RequestHandle,
    first: SeqOutput,
    envelope: Envelope,
    include_usage: bool,
    keepalive: Duration,
    tx: mpsc::Sender<Bytes>,
    _permit: OwnedSemaphorePermit,
) {
    let send = |bytes: Bytes| {
        let tx = tx.clone();
        async move { tx.send(bytes).await.is_ok() }
    };
    if envelope.endpoint == Endpoint::Chat && !send(sse(&envelope.role_chunk())).await {
        return;
    }
    let mut next = Some(first);
    loop {
        let output = match next.take() {
            Some(o) => Ok(o),
            None => tokio::select! {
                r = next_output(&mut handle) => r,
                () = tokio::time::sleep(keepalive) => {
                    if !send(Bytes::from_static(b": ping\n\n")).await {
                        return;
                    }
                    continue;
                }
                () = tx.closed() => return,
            },
        };
        match output {
            Ok(o) => {
                if !o.text.is_empty() && !send(sse(&envelope.text_chunk(&o.text))).await {
                    return;
                }
                if let Some(finish) = o.finish {
                    handle.guard.finished();
                    finish_stream(&envelope, &finish, include_usage, &tx).await;
                    return;
                }
            }
            Err(error) => {
                let _ = tx.send(sse(&error.body_json())).await;
                return;
            }
        }
    }
}

async fn finish_stream(
    envelope: &Envelope,
    finish: &Finish,
    include_usage: bool,
    tx: &mpsc::Sender<Bytes>,
) {
    let _ = tx.send(sse(&envelope.finish_chunk(finish))).await;
    if include_usage {
        let _ = tx.send(sse(&envelope.usage_chunk(&finish.usage))).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
