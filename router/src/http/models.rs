//! The HTTP side of several models ([`crate::models`]): the middleware that sends each
//! model-bound request to its model's state ([`route_to_model`]), `GET /v1/models` with every
//! model's status, and the admin routes `POST /models/load` and `POST /models/unload`.
//!
//! A model-bound request names its model by `?model=` or by its JSON body's `model`; the body
//! is read here (with the same limits as everywhere) and handed to the handler as it is
//! ([`PreRead`]). The model is loaded if it must be, and held by a [`Lease`] until the
//! response ends (a stream's last byte), so it is never unloaded under its requests.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{read_limited, AppState, HeldBody, Models, SharedState};
use crate::error::ApiError;
use crate::models::{Lease, ModelId, Status};
use crate::openai::request::{parse_json, requested_model};

/// The model a request is served with: set by [`route_to_model`], read by
/// [`super::Scoped`].
#[derive(Debug, Clone)]
pub struct ModelScope(pub SharedState);

/// A body [`route_to_model`] read already; [`super::LimitedBody`] takes it from here.
#[derive(Debug, Clone)]
pub struct PreRead(pub Bytes);

/// `?model=NAME` of a query string; an empty `?model=` names no model.
pub fn query_model(query: Option<&str>) -> Option<String> {
    query_param(query, "model").filter(|name| !name.is_empty())
}

pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Middleware of the model-bound routes; a no-op with one model.
pub async fn route_to_model(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(registry) = state.models.clone() else {
        return next.run(request).await;
    };
    // `GET /props` without a model is the router's own (llama-server's `role: router`).
    let router_props = is_read(request.method())
        && request.uri().path() == "/props"
        && query_model(request.uri().query()).is_none();
    if router_props {
        return next.run(request).await;
    }
    match scope(&state, &registry, request).await {
        Ok((request, lease)) => next
            .run(request)
            .await
            .map(|body| Body::new(HeldBody::new(body, lease))),
        Err(error) => error.into_response(),
    }
}

/// GET and HEAD: reading a model's data, which never loads it unless the request names it.
fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// llama-server's per-request `?autoload=`: `true` or `1` loads, any other value does not;
/// absent, `server.models_autoload` decides.
fn autoload_param(query: Option<&str>) -> Option<bool> {
    query_param(query, "autoload").map(|v| v == "true" || v == "1")
}

/// The request with its model's state attached, and the lease on that model.
async fn scope(
    state: &SharedState,
    registry: &std::sync::Arc<Models>,
    request: Request,
) -> Result<(Request, Lease<AppState>), ApiError> {
    let mut name = query_model(request.uri().query());
    let autoload = autoload_param(request.uri().query());
    let (mut parts, body) = request.into_parts();
    let mut pre_read = None;
    if name.is_none() && parts.method == Method::POST {
        let bytes = read_limited(&parts.headers, body, state).await?;
        // A body-less POST (the worker admin routes) names no model.
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            name = requested_model(&bytes)?;
        }
        pre_read = Some(PreRead(bytes));
    }
    let (index, autoload) = match name {
        Some(name) => (registry.find(Some(&name))?, autoload),
        // A GET that names no model (the web page's polling, a dashboard) reads a loaded
        // model and never loads one.
        None if is_read(&parts.method) => (
            registry
                .first_loaded()
                .ok_or_else(ApiError::model_missing)?,
            Some(false),
        ),
        None => (registry.find(None)?, autoload),
    };
    let (model_state, lease) = registry.lease(index, autoload).await?;
    parts.extensions.insert(ModelScope(model_state));
    if let Some(pre_read) = pre_read {
        parts.extensions.insert(pre_read);
    }
    Ok((Request::from_parts(parts, Body::empty()), lease))
}

/// `POST /models/load` and `/models/unload`'s body.
#[derive(Debug, Deserialize)]
pub struct ModelAction {
    model: String,
}

/// Their answer.
#[derive(Debug, Serialize)]
pub struct ActionDone {
    success: bool,
}

fn registry_of(state: &SharedState) -> Result<&std::sync::Arc<Models>, ApiError> {
    state.models.as_ref().ok_or_else(|| {
        ApiError::not_supported(
            "this server serves one model; configure [[models]] or start it with \
             --models-dir to load and unload models",
        )
    })
}

/// The registry and the model a `/models/load` or `/models/unload` body names.
fn named_model(
    state: &SharedState,
    body: &[u8],
) -> Result<(std::sync::Arc<Models>, ModelId, String), ApiError> {
    let registry = registry_of(state)?;
    let action: ModelAction = parse_json(body)?;
    let id = registry.find_exact(&action.model)?;
    Ok((registry.clone(), id, action.model))
}

/// `POST /models/load`: loads a model and answers once it is loaded (or failed, or the load
/// timeout passed: 503, the load goes on).
pub async fn load(
    State(state): State<SharedState>,
    body: super::LimitedBody,
) -> Result<Json<ActionDone>, ApiError> {
    let (registry, id, _) = named_model(&state, &body.0)?;
    registry.load(id).await?;
    Ok(Json(ActionDone { success: true }))
}

/// `POST /models/unload`: unloads a loaded model once its requests have finished; 400 when it
/// is not loaded.
pub async fn unload(
    State(state): State<SharedState>,
    body: super::LimitedBody,
) -> Result<Json<ActionDone>, ApiError> {
    let (registry, id, name) = named_model(&state, &body.0)?;
    if !registry.unload(id) {
        return Err(ApiError::model_not_loaded(&name));
    }
    Ok(Json(ActionDone { success: true }))
}

/// One model of `GET /v1/models` when the router serves several: the one-model card (its
/// `meta` while loaded and a worker is ready), its file and its status.
#[derive(Debug, Serialize)]
pub struct ListedModel<'a> {
    #[serde(flatten)]
    pub card: super::info::ModelCard<'a>,
    pub path: String,
    pub status: ModelStatus,
}

/// A model's status, in llama-server's shape (`{"value": "loaded"}`), with the error of a
/// failed load.
#[derive(Debug, Serialize)]
pub struct ModelStatus {
    pub value: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/models` with several models: each with its status.
pub fn list(state: &SharedState, registry: &Models) -> Response {
    let listing = registry.listing();
    let data: Vec<ListedModel<'_>> = listing
        .iter()
        .map(|entry| {
            let plan = &entry.plan;
            let meta = entry
                .state
                .as_ref()
                .and_then(|s| s.pool.worker_info())
                .map(|info| super::info::ModelMeta::of(&info));
            ListedModel {
                card: super::info::ModelCard {
                    id: plan.alias(),
                    object: "model",
                    created: state.started,
                    owned_by: "llamapool",
                    aliases: &plan.names,
                    tags: &plan.settings.model.tags,
                    meta,
                },
                path: plan.path.display().to_string(),
                status: ModelStatus {
                    value: entry.status,
                    failed: entry.error.is_some().then_some(true),
                    error: entry.error.clone(),
                },
            }
        })
        .collect();
    Json(serde_json::json!({ "object": "list", "data": data })).into_response()
}
