//! The router's errors and their one mapping to HTTP: every error a client sees is JSON in
//! the OpenAI shape `{"error":{"message","type","param","code"}}` with the right status.
//!
//! Each layer has its typed error ([`InvalidRequest`] from parsing, [`DispatchError`] from the
//! pool, [`RequestError`] from a worker); this module alone decides their status and type.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llamapool_common::RequestError;
use serde::Serialize;

use crate::dispatch::{AdminError, DispatchError, Refusal};
use crate::models::ModelError;
use crate::openai::InvalidRequest;

/// An error answer to one HTTP request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// A context overflow's numbers, which llama-server adds to the error object.
    pub context: Option<ContextLimits>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            context: None,
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::invalid(message)
        }
    }

    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route for {method} {path}"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("method {method} is not allowed on {path}"),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn unreadable_body(reason: impl std::fmt::Display) -> Self {
        Self::invalid(format!("reading the body failed: {reason}"))
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key",
        )
    }

    /// An admin route without an admin key while admin keys are configured.
    pub fn admin_unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid admin key (server.admin_api_keys); an API key does not open \
             the admin routes",
        )
    }

    /// An admin route refused for `reason` (who may call it: see `http::access`).
    pub fn admin_forbidden(reason: impl Into<String>) -> Self {
        Self {
            code: Some("admin_forbidden".into()),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", reason)
        }
    }

    /// A request to a loopback address naming a host this server does not answer to (DNS
    /// rebinding; see `http::access::HostPolicy`).
    pub fn host_not_allowed(host: &str) -> Self {
        Self {
            code: Some("host_not_allowed".into()),
            ..Self::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "Host {host:?} is not a name of this server; add it to server.allowed_hosts \
                     to serve it"
                ),
            )
        }
    }

    /// The request body was not read whole within `server.body_read_timeout_secs`; the
    /// response closes the connection (every 408 does, see `into_response`).
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        Self {
            code: Some("body_timeout".into()),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body was not received within {timeout:?}"),
            )
        }
    }

    /// Reading this body would take the bytes of bodies held at once beyond
    /// `server.max_buffered_body_bytes`.
    pub fn bodies_over_budget() -> Self {
        Self::unavailable("the server is holding too many request bodies; retry shortly")
    }

    pub fn queue_full() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server is at capacity; retry shortly",
            )
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
        }
    }

    /// `POST /admin/reload` with a configuration that does not load or plan.
    pub fn reload_failed(reason: impl std::fmt::Display) -> Self {
        Self::invalid(format!("the configuration could not be reloaded: {reason}"))
    }

    /// A route this server was started without (llama-server's 501 `not_supported_error`).
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "not_supported_error", message)
    }

    /// A GET of a model's data that names no model while none is loaded.
    pub fn model_missing() -> Self {
        Self::invalid_param(
            "model",
            "model name is missing from the request, and no model is loaded: name one with ?model=",
        )
    }

    /// `POST /models/unload` of a model that is not loaded.
    pub fn model_not_loaded(name: &str) -> Self {
        Self::invalid_param("model", format!("model {name:?} is not loaded"))
    }

    /// `/health` and `/ready` while the node drains (503): it finishes what it has and
    /// closes soon, so a load balancer should send elsewhere.
    pub fn draining() -> Self {
        Self::unavailable(
            "this server is draining: it finishes the requests it has and stops; send new ones elsewhere",
        )
    }

    pub fn no_worker_ready() -> Self {
        Self::from(DispatchError::NoWorkerReady)
    }

    /// A worker answered a call with a refusal of the given field (e.g. an unknown token id).
    pub fn refused(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_param(param, message)
    }

    /// A request the poison policy blames for workers' deaths (500, `poison_request_error`).
    fn poison(message: String, retry_after: Option<u32>) -> Self {
        Self {
            retry_after,
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "poison_request_error",
                message,
            )
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
                context: self.context,
            },
        }
    }
}

/// Every error's body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
    #[serde(flatten)]
    pub context: Option<ContextLimits>,
}

/// llama-server's numbers of an `exceed_context_size_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ContextLimits {
    pub n_prompt_tokens: u32,
    pub n_ctx: u32,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be on its way: the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        let message = e.to_string();
        match e {
            ModelError::NotFound { .. } => Self {
                code: Some("model_not_found".into()),
                param: Some("model".into()),
                ..Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
            },
            // llama-server's 400 "model is not loaded" (autoload off).
            ModelError::NotLoaded(_) => Self {
                code: Some("model_not_loaded".into()),
                param: Some("model".into()),
                ..Self::invalid(message)
            },
            ModelError::LoadTimeout(_) => Self {
                code: Some("model_loading".into()),
                retry_after: Some(5),
                ..Self::unavailable(message)
            },
            ModelError::Reload(_) => Self::invalid(message),
            ModelError::TooManyWaiting(_) => Self {
                code: Some("model_queue_full".into()),
                message,
                ..Self::queue_full()
            },
            // llama-server's 500 "failed to load": retrying soon does not help.
            ModelError::Failed { .. } => Self {
                code: Some("model_load_failed".into()),
                ..Self::internal(message)
            },
        }
    }
}

impl From<InvalidRequest> for ApiError {
    fn from(e: InvalidRequest) -> Self {
        let message = e.to_string();
        match e {
            InvalidRequest::Body(_) => Self::invalid(message),
            InvalidRequest::Field { param, .. } => Self::invalid_param(param, message),
            InvalidRequest::Unsupported { param, .. } => Self {
                code: Some("unsupported_parameter".into()),
                ..Self::invalid_param(param, message)
            },
            InvalidRequest::UnknownModel { .. } => Self {
                code: Some("model_not_found".into()),
                param: Some("model".into()),
                ..Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
            },
        }
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        let message = e.to_string();
        match e {
            DispatchError::NoWorkerReady
            | DispatchError::ShuttingDown
            | DispatchError::WorkerGone
            | DispatchError::NoAnswer
            | DispatchError::TooManyMoves(_) => Self::unavailable(message),
            DispatchError::TooLargeToSend(_) => Self::invalid_param("prompt", message),
            DispatchError::UnexpectedReply(_) => Self::internal(message),
            DispatchError::PoisonKilled(_) => Self::poison(message, None),
            DispatchError::PoisonRefused {
                retry_after_secs, ..
            } => Self::poison(
                message,
                Some(u32::try_from(retry_after_secs.max(1)).unwrap_or(u32::MAX)),
            ),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(e: Refusal) -> Self {
        match e {
            Refusal::Request(e) => e.into(),
            Refusal::Dispatch(e) => e.into(),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let message = e.to_string();
        match e {
            AdminError::NoSuchWorker(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
            }
            AdminError::WorkerCountChanged { .. } => Self::invalid(message),
            AdminError::NotBack(..) | AdminError::ShuttingDown => Self::unavailable(message),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let message = e.to_string();
        match e {
            RequestError::ExceedsContext {
                n_prompt_tokens,
                n_ctx,
                ..
            } => Self {
                context: Some(ContextLimits {
                    n_prompt_tokens,
                    n_ctx,
                }),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "exceed_context_size_error",
                    message,
                )
            },
            RequestError::InvalidParam { param, .. } => Self::invalid_param(param, message),
            RequestError::EmptyPrompt
            | RequestError::InvalidToken { .. }
            | RequestError::ChatTemplate(_) => Self::invalid(message),
            RequestError::KvCacheFull | RequestError::ShuttingDown => Self::unavailable(message),
            RequestError::DecodeFailed(_) | RequestError::DuplicateId(_) => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_errors_say_both_numbers() {
        let e = ApiError::from(RequestError::ExceedsContext {
            n_prompt_tokens: 900,
            n_requested: 10,
            n_ctx: 512,
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(body["error"]["type"], "exceed_context_size_error");
        assert_eq!(body["error"]["n_prompt_tokens"], 900);
        assert_eq!(body["error"]["n_ctx"], 512);
        assert!(body["error"]["message"].as_str().unwrap().contains("900"));
    }

    #[test]
    fn shape_has_all_four_fields() {
        let body = ApiError::from(InvalidRequest::Field {
            param: "n".into(),
            message: "n must be between 1 and 16, got 17".into(),
        });
        let body = serde_json::to_value(body.body()).unwrap();
        for key in ["message", "type", "param", "code"] {
            assert!(body["error"].get(key).is_some(), "{key} missing");
        }
        assert_eq!(body["error"]["param"], "n");
    }

    #[test]
    fn each_layer_maps_to_its_status() {
        let unknown = ApiError::from(InvalidRequest::UnknownModel {
            requested: "x".into(),
            served: "m".into(),
        });
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.code.as_deref(), Some("model_not_found"));
        let unsupported = ApiError::from(InvalidRequest::Unsupported {
            param: "tools",
            detail: String::new(),
        });
        assert_eq!(unsupported.status, StatusCode::BAD_REQUEST);
        assert_eq!(unsupported.param.as_deref(), Some("tools"));
        let down = ApiError::from(DispatchError::NoWorkerReady);
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.retry_after, Some(1));
        let full = ApiError::from(RequestError::KvCacheFull);
        assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
        let response = ApiError::queue_full().into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
