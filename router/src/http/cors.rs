//! CORS, answered as llama-server answers it (its `set_pre_routing_handler`, checked by its
//! `tests/unit/test_security.py`), with the origins limited by `server.cors_origins`.
//!
//! [`cors`] is the outermost layer of the route table:
//!
//! - Every `OPTIONS` request (a preflight: browsers send no credentials on it) is answered
//!   here, before the API-key check and before routing: 200, empty body,
//!   `Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS`, `Access-Control-Allow-Headers: *`, and for an
//!   allowed origin `Access-Control-Allow-Origin: <the Origin>` and
//!   `Access-Control-Allow-Credentials: true`.
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
use axum::response::Response;
use llamapool_common::settings::{is_local_origin, parse_cors_origin, LOCALHOST_ORIGINS};

use super::SharedState;

/// llama-server's `Access-Control-Allow-Methods`.
pub const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// llama-server's `Access-Control-Allow-Headers`. Browsers take `*` as "any header" on
/// requests without cookies (what API clients send), but never as covering `Authorization`:
/// a page that sends `Authorization` needs its preflight to list it, so pages should send the
/// key as `X-Api-Key`, which `*` covers.
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

/// The middleware; see the module doc.
pub async fn cors(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let origin = state.cors.allowed_origin(request.headers());
    let mut response = if request.method() == Method::OPTIONS {
        let mut preflight = Response::new(Body::empty());
        *preflight.status_mut() = StatusCode::OK;
        let h = preflight.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
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
