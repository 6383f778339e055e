//! API keys: the [`ApiKeys`] accepted (`server.api_key`, `server.api_keys` and the lines of
//! `server.api_key_file`, resolved once at start-up) and [`require_api_key`], the one
//! middleware that checks them, in front of every route.
//!
//! Which requests need a key is decided on the method and path alone ([`needs_key`]), before
//! routing, so a path that matches no route is a 401 like any other when keys are set (as in
//! llama-server) and a new route is protected unless it is added to the list of open ones.
//! A key is accepted as `Authorization: Bearer <key>` (OpenAI's clients) or `X-Api-Key: <key>`
//! (Anthropic's, which llama-server also takes), compared in constant time.

use std::fmt;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::SharedState;
use crate::error::ApiError;

/// The keys a request may present; empty, nothing is checked. Its `Debug` shows only how many
/// there are, so that logging the state never shows a key.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Box<[u8]>>);

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self(
            keys.into_iter()
                .map(|k| k.into_bytes().into_boxed_slice())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is one of the keys. Every key is compared, each in time that depends
    /// only on the lengths, so the time taken tells nothing about which bytes matched.
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(given)
            })
            .into()
    }

    /// Whether the request's headers carry an accepted key, as `Authorization: Bearer <key>`
    /// (the scheme in any case) or as `X-Api-Key: <key>`. Both are looked at.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        self.which(headers).is_some()
    }

    /// Which key (its place in the list) the request's headers carry, as in
    /// [`ApiKeys::admits`]: for logs, which must never show the key itself. Every key is
    /// compared with both candidates, each in constant time.
    pub fn which(&self, headers: &HeaderMap) -> Option<usize> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()));
        let x_api_key = headers.get("x-api-key").map(|v| v.as_bytes());
        let mut found = None;
        for (i, key) in self.0.iter().enumerate() {
            // `|` rather than `||`: both candidates are compared whatever the first gave.
            let hit = bearer.map_or(subtle::Choice::from(0), |k| key.ct_eq(k))
                | x_api_key.map_or(subtle::Choice::from(0), |k| key.ct_eq(k));
            if bool::from(hit) && found.is_none() {
                found = Some(i);
            }
        }
        found
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750: the scheme is
/// case-insensitive); `None` for another scheme.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = &value[SCHEME.len()..];
    let start = token.iter().position(|&b| b != b' ').unwrap_or(token.len());
    Some(&token[start..])
}

/// Whether a request needs a key (when keys are set). Open: `/health`, `/v1/health`,
/// `/ready` (probes) and `/v1/loads` (a gateway's load poll: counts, no content), CORS
/// preflights (`OPTIONS`: browsers never send credentials on them), and `GET`/`HEAD` of the
/// web page: `/`, `/ui` and everything under `/ui/` (it holds no data; its script sends the
/// user's key with each API call).
pub fn needs_key(method: &Method, path: &str) -> bool {
    if matches!(path, "/health" | "/v1/health" | "/ready" | "/v1/loads")
        || method == Method::OPTIONS
    {
        return false;
    }
    let web_page = path == "/" || path == "/ui" || path.starts_with("/ui/");
    !(web_page && (method == Method::GET || method == Method::HEAD))
}

/// The middleware: 401 in the OpenAI error shape ([`ApiError::unauthorized`]) unless the
/// request is open ([`needs_key`], or `GET /metrics` with `server.public_metrics`) or carries
/// an accepted key (an admin key is accepted too).
/// The admin routes are left to [`super::access::guard`], which has their own keys.
pub async fn require_api_key(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let public_metrics = state.public_metrics
        && request.method() == Method::GET
        && request.uri().path() == "/metrics";
    if !state.api_keys.is_empty()
        && !public_metrics
        && needs_key(request.method(), request.uri().path())
        && !super::access::is_admin_path(request.uri().path())
        && !state.api_keys.admits(request.headers())
        && !state.admin_keys.admits(request.headers())
    {
        tracing::debug!(
            method = %request.method(),
            path = request.uri().path(),
            "refused: missing or invalid API key"
        );
        return Err(ApiError::unauthorized());
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn keys() -> ApiKeys {
        ApiKeys::new(["sk-one".to_string(), "sk-two".to_string()])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn every_key_is_accepted_in_either_header() {
        let keys = keys();
        for key in ["sk-one", "sk-two"] {
            assert!(keys.admits(&headers(&[("authorization", &format!("Bearer {key}"))])));
            assert!(keys.admits(&headers(&[("authorization", &format!("bearer  {key}"))])));
            assert!(keys.admits(&headers(&[("x-api-key", key)])));
        }
        // One good header is enough, whatever the other says.
        assert!(keys.admits(&headers(&[
            ("authorization", "Bearer wrong"),
            ("x-api-key", "sk-two")
        ])));
    }

    #[test]
    fn anything_else_is_refused() {
        let keys = keys();
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer sk-on")]),
            headers(&[("authorization", "Bearer sk-one2")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "sk-one")]),
            headers(&[("authorization", "Basic sk-one")]),
            headers(&[("authorization", "Bearersk-one")]),
            headers(&[("x-api-key", "SK-ONE")]),
            headers(&[("x-api-key", "")]),
            headers(&[("api-key", "sk-one")]),
        ] {
            assert!(!keys.admits(&h), "{h:?} was admitted");
        }
        assert!(!ApiKeys::default().accepts(b""));
    }

    #[test]
    fn which_names_the_place_of_the_key() {
        let keys = keys();
        assert_eq!(keys.which(&headers(&[("x-api-key", "sk-one")])), Some(0));
        assert_eq!(
            keys.which(&headers(&[("authorization", "Bearer sk-two")])),
            Some(1)
        );
        assert_eq!(keys.which(&headers(&[("x-api-key", "sk-three")])), None);
        assert_eq!(
            ApiKeys::default().which(&headers(&[("x-api-key", "")])),
            None
        );
    }

    #[test]
    fn keys_do_not_show_in_debug_output() {
        let text = format!("{:?}", keys());
        assert_eq!(text, "ApiKeys(2 keys)");
    }

    #[test]
    fn only_health_preflights_and_the_web_page_are_open() {
        for (method, path) in [
            (Method::GET, "/health"),
            (Method::POST, "/health"),
            (Method::GET, "/ready"),
            (Method::GET, "/v1/loads"),
            (Method::OPTIONS, "/v1/chat/completions"),
            (Method::OPTIONS, "/anything"),
            (Method::GET, "/"),
            (Method::HEAD, "/"),
            (Method::GET, "/ui"),
            (Method::GET, "/ui/app.js"),
            (Method::GET, "/ui/a/b.css"),
        ] {
            assert!(!needs_key(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::POST, "/v1/chat/completions"),
            (Method::GET, "/v1/models"),
            (Method::GET, "/models"),
            (Method::GET, "/metrics"),
            (Method::GET, "/workers"),
            (Method::POST, "/admin/reload"),
            (Method::POST, "/"),
            (Method::POST, "/ui/x"),
            (Method::GET, "/uix"),
            (Method::GET, "/health/x"),
            (Method::GET, "/nothing"),
            (Method::GET, "//ui/x"),
        ] {
            assert!(needs_key(&method, path), "{method} {path}");
        }
    }
}
