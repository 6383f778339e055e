//! `x-request-id`: every request gets one and every response carries it back.
//!
//! A client's id is kept when it is printable ASCII (spaces included) and 1 to
//! [`MAX_REQUEST_ID_BYTES`] bytes long; anything else (too long, empty, control characters,
//! bytes beyond ASCII, several values of which the first is bad) is replaced with a fresh UUID
//! v4. tower-http does the work ([`SetRequestIdLayer`] makes the missing ids,
//! [`PropagateRequestIdLayer`] copies the id to the response); [`with_request_ids`] wraps the
//! whole route table, fallbacks included, so 404s, 405s, 401s and 429s carry it too.
//!
//! Handlers read it with the [`XRequestId`] extractor. Generation handlers put it in their
//! `request` span and in the `GenerateRequest`, so the router's and the worker's log lines
//! about a request both carry it (`crate::http::request_log`, `worker/src/ipc.rs`).

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request};
use axum::http::header::HeaderName;
use axum::http::request::Parts;
use axum::middleware;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

/// The header, lower case as HTTP/2 wants it.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-chosen id kept.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Whether a client's id is kept: 1 to [`MAX_REQUEST_ID_BYTES`] bytes of printable ASCII
/// (`' '` to `'~'`).
pub fn is_valid_request_id(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&value.len())
        && value.iter().all(|b| (b' '..=b'~').contains(b))
}

/// `router` with request ids on every request and response. Call it last, so that the id
/// layers wrap every route, fallback and middleware.
pub fn with_request_ids<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    // `Router::layer` wraps what is already there: the last layer added runs first. In
    // request order: drop an invalid id, make one where none is left, copy it to the response.
    router
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(
            X_REQUEST_ID.clone(),
            MakeRequestUuid,
        ))
        .layer(middleware::map_request(drop_invalid_id))
}

/// Keeps the first `x-request-id` if it is valid and removes every other value.
async fn drop_invalid_id(mut request: Request) -> Request {
    let headers = request.headers_mut();
    let valid = headers
        .get(&X_REQUEST_ID)
        .filter(|v| is_valid_request_id(v.as_bytes()))
        .cloned();
    headers.remove(&X_REQUEST_ID);
    if let Some(value) = valid {
        headers.insert(X_REQUEST_ID.clone(), value);
    }
    request
}

/// The request's id, as [`with_request_ids`] left it in the headers; `-` for a request that
/// did not pass through it (never, in the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XRequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for XRequestId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        let id = parts
            .headers
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        Ok(Self(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{HeaderValue, Method, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use tower_service::Service;

    use super::*;

    #[test]
    fn valid_ids_are_printable_ascii_of_at_most_128_bytes() {
        for ok in [
            "test-123",
            "a",
            "with space",
            "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
        ] {
            assert!(is_valid_request_id(ok.as_bytes()), "{ok:?}");
        }
        assert!(is_valid_request_id(&[b'x'; MAX_REQUEST_ID_BYTES]));
        for bad in [
            &b""[..],
            &[b'x'; MAX_REQUEST_ID_BYTES + 1],
            b"tab\there",
            b"bell\x07",
            b"del\x7f",
            "caf\u{e9}".as_bytes(),
        ] {
            assert!(!is_valid_request_id(bad), "{bad:?}");
        }
    }

    /// A route table like the real one: a route, a 404 fallback, a 405 fallback; each
    /// answer's body is the id its handler saw.
    fn app() -> Router {
        let seen = |XRequestId(id): XRequestId| async move { id };
        let router = Router::new()
            .route("/ok", get(seen))
            .fallback(|XRequestId(id): XRequestId| async move {
                (StatusCode::NOT_FOUND, id).into_response()
            })
            .method_not_allowed_fallback(|XRequestId(id): XRequestId| async move {
                (StatusCode::METHOD_NOT_ALLOWED, id).into_response()
            });
        with_request_ids(router)
    }

    /// The status, the response's `x-request-id` and the id the handler saw.
    async fn call(method: Method, path: &str, ids: &[&[u8]]) -> (StatusCode, String, String) {
        let mut request = Request::builder().method(method).uri(path);
        for id in ids {
            request = request.header("x-request-id", HeaderValue::from_bytes(id).unwrap());
        }
        let response = app()
            .call(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let echoed = response
            .headers()
            .get("x-request-id")
            .expect("every response has an x-request-id")
            .to_str()
            .unwrap()
            .to_string();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, echoed, String::from_utf8(body.to_vec()).unwrap())
    }

    fn is_uuid(id: &str) -> bool {
        id.len() == 36 && id.bytes().filter(|&b| b == b'-').count() == 4
    }

    #[tokio::test]
    async fn a_valid_id_is_kept_and_returned_on_routes_and_fallbacks() {
        for (method, path, status) in [
            (Method::GET, "/ok", StatusCode::OK),
            (Method::GET, "/nowhere", StatusCode::NOT_FOUND),
            (Method::POST, "/ok", StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let (got, echoed, seen) = call(method, path, &[b"test-123"]).await;
            assert_eq!(
                (got, echoed.as_str(), seen.as_str()),
                (status, "test-123", "test-123")
            );
        }
    }

    #[tokio::test]
    async fn a_missing_or_invalid_id_is_replaced_by_a_fresh_uuid() {
        let too_long = [b'x'; MAX_REQUEST_ID_BYTES + 1];
        let cases: [&[&[u8]]; 4] = [&[], &[b"tab\there"], &[&too_long], &[b"caf\xe9"]];
        let mut ids = Vec::new();
        for ids_sent in cases {
            let (status, echoed, seen) = call(Method::GET, "/nowhere", ids_sent).await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(is_uuid(&echoed), "{echoed:?}");
            assert_eq!(echoed, seen, "the handler sees the id the client gets");
            ids.push(echoed);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4, "each request gets its own id");
    }

    #[tokio::test]
    async fn of_several_ids_only_a_valid_first_one_counts() {
        let (_, echoed, _) = call(Method::GET, "/ok", &[b"first", b"second"]).await;
        assert_eq!(echoed, "first");
        let (_, echoed, seen) = call(Method::GET, "/ok", &[b"\xff", b"second"]).await;
        assert!(is_uuid(&echoed), "{echoed:?}");
        assert_eq!(echoed, seen);
    }
}
