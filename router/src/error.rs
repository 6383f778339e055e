//! The router's errors and their one mapping to HTTP: every error a client sees is JSON in
//! the OpenAI shape `{"error":{"message","type","param","code"}}` with the right status.

use bytes::Bytes;
use hyper::{header, Response, StatusCode};
use llamapool_common::RequestError;
use serde_json::json;

use crate::server::Body;

/// An error answer to one HTTP request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Extra fields of the error object (llama-server adds `n_prompt_tokens`, `n_ctx`).
    pub extra: Option<serde_json::Value>,
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
            extra: None,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::invalid(message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn method_not_allowed(method: &hyper::Method, path: &str) -> Self {
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

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key",
        )
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

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The `{"error": {...}}` body.
    pub fn body_json(&self) -> serde_json::Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (&self.extra, error.as_object_mut())
        {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        json!({ "error": error })
    }

    pub fn into_response(self) -> Response<Body> {
        let body = Bytes::from(self.body_json().to_string());
        let mut response = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(secs) = self.retry_after {
            response = response.header(header::RETRY_AFTER, secs.to_string());
        }
        response.body(Body::full(body)).expect("a valid response")
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
                extra: Some(json!({ "n_prompt_tokens": n_prompt_tokens, "n_ctx": n_ctx })),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "exceed_context_size_error",
                    message,
                )
            },
            RequestError::InvalidParam { param, .. } => Self {
                param: Some(param),
                ..Self::invalid(message)
            },
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
        let body = e.body_json();
        assert_eq!(body["error"]["type"], "exceed_context_size_error");
        assert_eq!(body["error"]["n_prompt_tokens"], 900);
        assert_eq!(body["error"]["n_ctx"], 512);
        assert!(body["error"]["message"].as_str().unwrap().contains("900"));
    }

    #[test]
    fn shape_has_all_four_fields() {
        let body = ApiError::invalid_param("n", "only n=1 is supported").body_json();
        for key in ["message", "type", "param", "code"] {
            assert!(body["error"].get(key).is_some(), "{key} missing");
        }
        assert_eq!(body["error"]["param"], "n");
    }
}
