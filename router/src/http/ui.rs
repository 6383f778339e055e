//! The web page: `GET /` and `GET /ui` answer `index.html`, `GET /ui/{file}` its script and
//! style sheet. The files live in `router/ui/` and are compiled into the binary
//! (`include_str!`), so the page needs nothing at run time: no file on disk, nothing from the
//! internet.
//!
//! These routes need no API key: the page holds no data of its own. Its script asks the API
//! (`/workers`, `/metrics`, `/v1/models`, `/v1/chat/completions`, `/admin/...`) for
//! everything, sending the key the user typed (see `router/ui/app.js`).
//!
//! Caching: every answer carries an `ETag` (a hash of the file, computed at compile time) and
//! `Cache-Control: no-cache`, so a browser revalidates each time and gets a 304 until the
//! binary changes. The HTML page also gets a Content-Security-Policy that allows only this
//! origin's script, style and connections.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;

/// One embedded file.
#[derive(Debug)]
struct Asset {
    /// Its name under `/ui/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// `ETag` value, quotes included.
    etag: &'static str,
}

/// FNV-1a, 64 bits: stable for a given file, so the `ETag` changes exactly when it does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 hex digits + `"`, built at compile time.
const fn etag_bytes(body: &str) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = fnv1a(body.as_bytes());
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($name:literal, $type:literal) => {{
        const BODY: &str = include_str!(concat!("../../ui/", $name));
        const ETAG: [u8; 18] = etag_bytes(BODY);
        Asset {
            name: $name,
            content_type: $type,
            body: BODY,
            etag: match std::str::from_utf8(&ETAG) {
                Ok(s) => s,
                Err(_) => panic!("an ETag is ASCII"),
            },
        }
    }};
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
const ASSETS: [Asset; 2] = [
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
];

/// Only this origin: the page loads its own script and style and talks to its own API.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes, to be merged outside the API-key check.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/ui", get(index))
        // The page's relative links assume it is at `/` or `/ui`.
        .route("/ui/", get(|| async { Redirect::permanent("/ui") }))
        .route("/ui/{file}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset, &headers),
        None => ApiError::no_route("GET", &format!("/ui/{name}")).into_response(),
    }
}

/// The file, or 304 when the client's `If-None-Match` names its current `ETag`.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == asset.etag
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.name == INDEX.name {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(asset: &Asset, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(tag).unwrap());
        }
        serve(asset, &headers)
    }

    #[test]
    fn files_have_their_type_an_etag_and_revalidate() {
        for asset in ASSETS.iter().chain([&INDEX]) {
            let r = get(asset, None);
            assert_eq!(r.status(), StatusCode::OK, "{}", asset.name);
            assert_eq!(r.headers()[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
            let etag = r.headers()[header::ETAG].to_str().unwrap().to_string();
            assert_eq!(etag.len(), 18, "{etag}");
            assert!(etag.starts_with('"') && etag.ends_with('"'));
            assert_eq!(
                get(asset, Some(&etag)).status(),
                StatusCode::NOT_MODIFIED,
                "a matching If-None-Match is a 304"
            );
            assert_eq!(
                get(asset, Some(&format!("\"x\", W/{etag}"))).status(),
                StatusCode::NOT_MODIFIED
            );
            assert_eq!(get(asset, Some("\"0\"")).status(), StatusCode::OK);
        }
        let tags: Vec<&str> = ASSETS.iter().chain([&INDEX]).map(|a| a.etag).collect();
        assert!(tags
            .iter()
            .all(|t| tags.iter().filter(|u| *u == t).count() == 1));
        assert!(get(&INDEX, None)
            .headers()
            .contains_key(header::CONTENT_SECURITY_POLICY));
    }

    #[test]
    fn the_page_links_only_files_that_are_embedded() {
        let mut linked = 0;
        for part in INDEX.body.split("\"ui/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "index.html links ui/{name}, which is not embedded"
            );
            linked += 1;
        }
        assert_eq!(linked, ASSETS.len(), "index.html links each embedded file");
    }

    #[test]
    fn etags_follow_the_content() {
        assert_ne!(etag_bytes("a"), etag_bytes("b"));
        assert_eq!(&etag_bytes(""), b"\"cbf29ce484222325\"");
    }
}
