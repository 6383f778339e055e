//! CORS, answered as llama-server answers it (its `set_pre_routing_handler`, checked by its
//! `tests/unit/test_security.py`), with the origins limited by `server.cors_origins`.
//!
//! [`cors`] wraps the API-key check and the `Host`/admin gate, so it sees every request
//! before them (only the response recorder and the `x-request-id` layer are outside it):
//!
//! - Every `OPTIONS` request (a preflight: browsers send no credentials on it) is answered
//!   here, before the API-key check and before routing: 200, empty body,
//!   `Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS`, `Access-Control-Allow-Headers: *`
//!   (or, when the preflight asks for `Authorization`, the header names it asked for), and
//!   for an allowed origin `Access-Control-Allow-Origin: <the Origin>` and
//!   `Access-Control-Allow-Credentials: true`.
//! - The admin routes (`/admin/...`) are never granted: a preflight to one is a 403, and their
//!   answers carry no `Access-Control-*` header whatever the origin (see [`super::access`]).
//! - Any other response (401s included, so that a page can read why it was refused) to a
//!   request from an allowed origin gets `Access-Control-Allow-Origin: <the Origin>` and
//!   `Access-Control-Allow-Credentials: true`.
//! - A request from an origin that is not allowed, or without `Origin`, gets no
//!   `Access-Control-Allow-Origin`, so the browser keeps the answer from the page.
//!
//! Which origins are allowed is [`CorsPolicy`]: every origin when `server.cors_origins` is
//! empty (llama-server has no setting and echoes any `Origin`) or lists `*`, else exactly the
//! listed ones (scheme, host and port; ASCII case does not matter), and with llama-server's
//! special entry `localhost`, every origin on this machine (`localhost`, `127.0.0.1`,
//! `[::1]`, any port). Responses that echo an
//! origin also carry `Vary: Origin`, for caches.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use llamapool_common::settings::{is_local_origin, parse_cors_origin, LOCALHOST_ORIGINS};

use super::SharedState;
use crate::error::ApiError;

/// llama-server's `Access-Control-Allow-Methods`.
pub const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// llama-server's `Access-Control-Allow-Headers`. Browsers take `*` as "any header" on
/// requests without cookies (what API clients send), but never as covering `Authorization`:
/// a preflight that asks for `Authorization` gets the names it asked for instead
/// ([`allow_headers`]).
pub const ALLOW_HEADERS: &str = "*";

/// Which origins may call the API from a web page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsPolicy {
    /// Every origin (no `server.cors_origins`, or `*` among them).
    #[default]
    AnyOrigin,
    /// These origins only, normalized by [`parse_cors_origin`].
    Origins(Vec<String>),
}

impl CorsPolicy {
    /// The policy of `server.cors_origins` (checked when the settings were loaded; an entry
    /// that is not an origin here allows nothing).
    pub fn new(origins: &[String]) -> Self {
        if origins.is_empty() || origins.iter().any(|o| o == "*") {
            return Self::AnyOrigin;
        }
        Self::Origins(
            origins
                .iter()
                .filter_map(|o| parse_cors_origin(o).ok())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Whether a page from `origin` (the `Origin` header) may read the answers.
    pub fn allows(&self, origin: &[u8]) -> bool {
        match self {
            Self::AnyOrigin => true,
            Self::Origins(list) => list.iter().any(|o| {
                o.as_bytes().eq_ignore_ascii_case(origin)
                    || (o == LOCALHOST_ORIGINS && is_local_origin(origin))
            }),
        }
    }

    /// The `Origin` of `request_headers`, if present and allowed.
    fn allowed_origin(&self, request_headers: &HeaderMap) -> Option<HeaderValue> {
        request_headers
            .get(header::ORIGIN)
            .filter(|o| !o.is_empty() && self.allows(o.as_bytes()))
            .cloned()
    }
}

/// The `Access-Control-Allow-Headers` of a preflight whose `Access-Control-Request-Headers`
/// is `requested`: [`ALLOW_HEADERS`] (`*`), unless the page asks for `Authorization`, which
/// the Fetch standard never lets `*` cover: then the requested names, echoed.
fn allow_headers(requested: Option<&HeaderValue>) -> HeaderValue {
    let asks_authorization = requested.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',')
            .any(|name| name.trim().eq_ignore_ascii_case("authorization"))
    });
    match requested {
        Some(names) if asks_authorization => names.clone(),
        _ => HeaderValue::from_static(ALLOW_HEADERS),
    }
}

/// The middleware; see the module doc.
pub async fn cors(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if super::access::is_admin_path(request.uri().path()) {
        // The admin routes are the operator's: no page of another origin may call them, so
        // a preflight grants nothing and no answer says who may read it.
        if request.method() == Method::OPTIONS {
            return ApiError::admin_forbidden(
                "the admin routes do not answer cross-origin requests",
            )
            .into_response();
        }
        return next.run(request).await;
    }
    let origin = state.cors.allowed_origin(request.headers());
    let mut response = if request.method() == Method::OPTIONS {
        let mut preflight = Response::new(Body::empty());
        *preflight.status_mut() = StatusCode::OK;
        let allow = allow_headers(
            request
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS),
        );
        let h = preflight.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow);
        preflight
    } else {
        next.run(request).await
    };
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preflight_asking_for_authorization_gets_it_listed() {
        assert_eq!(allow_headers(None), "*");
        assert_eq!(
            allow_headers(Some(&HeaderValue::from_static("content-type, x-api-key"))),
            "*"
        );
        for asked in [
            "Authorization",
            "content-type,authorization",
            "x, AUTHORIZATION ",
        ] {
            assert_eq!(
                allow_headers(Some(&HeaderValue::from_static(asked))),
                asked,
                "{asked}"
            );
        }
    }

    fn list(origins: &[&str]) -> Vec<String> {
        origins.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_origins_or_a_star_allow_every_origin() {
        for origins in [list(&[]), list(&["http://a.example", "*"])] {
            let policy = CorsPolicy::new(&origins);
            assert_eq!(policy, CorsPolicy::AnyOrigin);
            for o in ["localhost", "https://evil.example", "null"] {
                assert!(policy.allows(o.as_bytes()));
            }
        }
    }

    #[test]
    fn the_localhost_entry_allows_every_local_origin() {
        let policy = CorsPolicy::new(&list(&["localhost"]));
        assert!(policy.allows(b"http://localhost:5173"));
        assert!(policy.allows(b"http://127.0.0.1"));
        assert!(!policy.allows(b"https://web.example"));
    }

    #[test]
    fn listed_origins_only() {
        let policy = CorsPolicy::new(&list(&["https://web.example/", "http://localhost:3000"]));
        for o in [
            "https://web.example",
            "HTTPS://Web.Example",
            "http://localhost:3000",
        ] {
            assert!(policy.allows(o.as_bytes()), "{o}");
        }
        for o in [
            "https://web.example:443",
            "http://web.example",
            "https://web.example.evil",
            "http://localhost",
            "http://localhost:30001",
            "null",
            "",
        ] {
            assert!(!policy.allows(o.as_bytes()), "{o}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(policy.allowed_origin(&headers), None);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:3000"),
        );
        assert_eq!(
            policy.allowed_origin(&headers),
            Some(HeaderValue::from_static("http://localhost:3000"))
        );
    }
}
