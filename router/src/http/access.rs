//! Who may reach the server, beyond the API keys of [`super::auth`]: the `Host` check against
//! DNS rebinding ([`HostPolicy`]) and the gate of the admin routes ([`guard`]), which logs
//! every admin action with who asked. `serve` gives each request its connection's addresses
//! ([`ConnInfo`]); the route table puts [`guard`] inside CORS and outside the key check.
//!
//! The rules (also in `docs/API.md`):
//!
//! - **Host.** A request that arrived on a loopback address must name this machine in `Host`
//!   (or HTTP/2's `:authority`): `localhost` (or `*.localhost`), `127.0.0.1`, `[::1]`, the
//!   address it arrived on, a host of `server.listen`, or an entry of `server.allowed_hosts`
//!   (`*` allows any). Anything else is a 403: a web page on `evil.example` whose name the
//!   attacker re-points at 127.0.0.1 (DNS rebinding) sends `Host: evil.example`. A request
//!   that arrived on another address (a server listening on `0.0.0.0` or a LAN address,
//!   reached by whatever name) is not checked; a request without `Host` (HTTP/1.0) neither.
//! - **Admin routes** (`/admin/...`) with admin keys (`server.admin_api_keys`,
//!   `server.admin_api_key_file`): an admin key is needed (401 otherwise); API keys do not
//!   count.
//! - **Admin routes without admin keys**: loopback clients only, and only requests that a
//!   web page cannot send without a CORS preflight (which [`super::cors`] refuses for admin
//!   routes): `Content-Type: application/json` or an [`ADMIN_HEADER`] header, and no
//!   `Origin` other than the server's own. With API keys set, one of them is needed too.
//!   Anything else is a 403 (`permission_error`, code `admin_forbidden`).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::request_id::X_REQUEST_ID;
use super::SharedState;
use crate::error::ApiError;

/// The header that marks a request to an admin route as not coming from a plain web form
/// (any value); `Content-Type: application/json` does the same.
pub const ADMIN_HEADER: &str = "x-llamapool-admin";

/// The addresses of the connection a request came on; a request extension set by `serve`.
/// Absent (a request not from a socket), the client is taken as not local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}

/// Which `Host` names requests to a loopback address may carry; see the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// `*` in `server.allowed_hosts`.
    any: bool,
    /// Lower-case names of `server.allowed_hosts` and `server.listen`, each with its port if
    /// the entry gave one (then only that port matches).
    names: Vec<(String, Option<u16>)>,
}

impl HostPolicy {
    /// The policy of `server.allowed_hosts` and the addresses of `server.listen`.
    pub fn new(allowed_hosts: &[String], listen: &[String]) -> Self {
        let any = allowed_hosts.iter().any(|h| h == "*");
        let mut names: Vec<(String, Option<u16>)> =
            allowed_hosts.iter().filter_map(|h| split_host(h)).collect();
        // A listen address's host (a name or an address) with any port: the listen port may
        // be 0, and the port is not what a rebinding attack changes.
        names.extend(
            listen
                .iter()
                .filter_map(|a| split_host(a))
                .map(|(name, _)| (name, None)),
        );
        Self { any, names }
    }

    /// Whether a request naming `host` (the `Host` value, if any) that arrived on `local` may
    /// be served.
    pub fn allows(&self, host: Option<&str>, local: Option<SocketAddr>) -> bool {
        let (Some(host), Some(local)) = (host, local) else {
            return true;
        };
        // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`.
        let ip = local.ip().to_canonical();
        if self.any || !ip.is_loopback() {
            return true;
        }
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        let own = match ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        ["localhost", "127.0.0.1", "[::1]", own.as_str()].contains(&name.as_str())
            || name.ends_with(".localhost")
            || self
                .names
                .iter()
                .any(|(n, p)| *n == name && (p.is_none() || *p == port))
    }
}

/// `name[:port]` (`[v6]:port` for IPv6) split, the name in lower case; `None` if the port is
/// not a number or the name is empty.
fn split_host(text: &str) -> Option<(String, Option<u16>)> {
    let text = text.trim();
    let (name, port) = if text.starts_with('[') {
        let end = text.find(']')?;
        let rest = &text[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return None,
        };
        (&text[..=end], port)
    } else {
        match text.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    (!name.is_empty()).then(|| (name.to_ascii_lowercase(), port))
}

/// The host a request names: HTTP/2's `:authority` (in the URI), else `Host`.
fn host_of(request: &Request) -> Option<&str> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
}

/// Whether `path` is an admin route's: its first segment is `admin`, or it loads or unloads a
/// model (`/models/load`, `/models/unload`).
pub fn is_admin_path(path: &str) -> bool {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    matches!(
        (segments.next(), segments.next(), segments.next()),
        (Some("admin"), _, _) | (Some("models"), Some("load" | "unload"), None)
    )
}

/// Whether a web page could have sent a request with these headers without a CORS
/// preflight, as far as the admin routes are concerned: it has none of
/// `Content-Type: application/json`, [`ADMIN_HEADER`], `Authorization` or `X-Api-Key`.
pub fn is_simple(headers: &HeaderMap) -> bool {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    !(json
        || headers.contains_key(ADMIN_HEADER)
        || headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key("x-api-key"))
}

/// Whether `Origin` (if any) names another site than `host`: a page from elsewhere.
fn foreign_origin(headers: &HeaderMap, host: Option<&str>) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, authority)| authority);
    match (authority, host) {
        (Some(a), Some(h)) => !a.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// The action and worker an admin path names: `("drain", Some(0))`, `("reload", None)`.
fn admin_action(path: &str) -> (&str, Option<&str>) {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match parts.as_slice() {
        ["admin", "workers", id, action] => (action, Some(id)),
        ["admin", action] | ["models", action] => (action, None),
        _ => (path, None),
    }
}

/// Logs a refused admin request at info: who tried what, and why.
fn log_refusal(conn: Option<ConnInfo>, path: &str, reason: &str) {
    let (action, worker) = admin_action(path);
    tracing::info!(
        peer = %conn.map_or_else(|| "unknown".to_string(), |c| c.peer.to_string()),
        action = %action,
        worker = %worker.unwrap_or("-"),
        reason,
        "admin request refused"
    );
}

/// Who asked for an admin action, as its log line names them: which key, by its place in
/// the configured list (0 first), never the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCaller {
    /// The admin key at this place in `server.admin_api_keys` (then `admin_api_key_file`).
    AdminKey(usize),
    /// No admin keys are configured: a loopback client with the API key at this place.
    ApiKey(usize),
    /// No admin keys and no API keys are configured: a loopback client.
    NoKey,
}

impl std::fmt::Display for AdminCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AdminKey(i) => write!(f, "admin#{i}"),
            Self::ApiKey(i) => write!(f, "api#{i}"),
            Self::NoKey => f.write_str("none"),
        }
    }
}

/// An admin request that got through the gate, and how it ended: one log line.
#[derive(Debug)]
struct AdminAction<'a> {
    peer: Option<SocketAddr>,
    caller: AdminCaller,
    action: &'a str,
    worker: Option<&'a str>,
    request_id: &'a str,
    status: StatusCode,
}

/// Logs an admin action: at info when it succeeded, at warn when it failed (its status and
/// the answer's error say why; the line is written once the action is done).
fn log_action(a: &AdminAction<'_>) {
    let peer = a
        .peer
        .map_or_else(|| "unknown".to_string(), |p| p.to_string());
    let worker = a.worker.unwrap_or("-");
    let status = a.status.as_u16();
    if a.status.is_success() {
        tracing::info!(
            peer = %peer,
            key = %a.caller,
            action = %a.action,
            worker = %worker,
            request_id = %a.request_id,
            status,
            "admin action"
        );
    } else {
        tracing::warn!(
            peer = %peer,
            key = %a.caller,
            action = %a.action,
            worker = %worker,
            request_id = %a.request_id,
            status,
            "admin action"
        );
    }
}

/// The middleware; see the module doc. Host refusals are logged at debug; admin refusals at
/// info with the client's address; admin actions (every admin request that got through) by
/// [`log_action`], with the client's address, which key it used ([`AdminCaller`]), the
/// request id and the answer's status.
pub async fn guard(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let conn = request.extensions().get::<ConnInfo>().copied();
    let host = host_of(&request).map(str::to_owned);
    let host = host.as_deref();
    if !state.hosts.allows(host, conn.map(|c| c.local)) {
        let host = host.unwrap_or_default();
        tracing::debug!(host, "refused: Host is not a name of this server");
        return Err(ApiError::host_not_allowed(host));
    }
    let path = request.uri().path().to_owned();
    let path = path.as_str();
    if !is_admin_path(path) {
        return Ok(next.run(request).await);
    }
    let headers = request.headers();
    let caller = if !state.admin_keys.is_empty() {
        match state.admin_keys.which(headers) {
            Some(i) => AdminCaller::AdminKey(i),
            None => {
                log_refusal(conn, path, "no admin key");
                return Err(ApiError::admin_unauthorized());
            }
        }
    } else {
        let refuse = |reason: &str| {
            log_refusal(conn, path, reason);
            Err(ApiError::admin_forbidden(reason))
        };
        if !conn.is_some_and(|c| c.peer.ip().to_canonical().is_loopback()) {
            return refuse(
                "without server.admin_api_keys, the admin routes answer clients on this \
                 machine only",
            );
        }
        if is_simple(headers) {
            return refuse(
                "an admin request must send Content-Type: application/json or an \
                 X-Llamapool-Admin header",
            );
        }
        if foreign_origin(headers, host) {
            return refuse("the admin routes do not answer web pages of other origins");
        }
        if state.api_keys.is_empty() {
            AdminCaller::NoKey
        } else {
            match state.api_keys.which(headers) {
                Some(i) => AdminCaller::ApiKey(i),
                None => {
                    log_refusal(conn, path, "no API key");
                    return Err(ApiError::unauthorized());
                }
            }
        }
    };
    let method = request.method().clone();
    let (action, worker) = admin_action(path);
    let (action, worker) = (action.to_string(), worker.map(str::to_string));
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let response = next.run(request).await;
    if method != Method::GET && method != Method::HEAD {
        log_action(&AdminAction {
            peer: conn.map(|c| c.peer),
            caller,
            action: &action,
            worker: worker.as_deref(),
            request_id: &request_id,
            status: response.status(),
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::Value;

    use crate::log_capture::LogBuffer;

    /// What is written while `f` runs, in the router's JSON or text format.
    fn captured(json: bool, f: impl FnOnce()) -> String {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        if json {
            let subscriber = builder.json().flatten_event(true).finish();
            tracing::subscriber::with_default(subscriber, f);
        } else {
            tracing::subscriber::with_default(builder.finish(), f);
        }
        buffer.text()
    }

    /// Every line written while `f` runs, as JSON the way the router writes it.
    fn json_lines(f: impl FnOnce()) -> Vec<Value> {
        crate::log_capture::json_lines(&captured(true, f))
    }

    #[test]
    fn callers_are_named_by_the_place_of_their_key() {
        assert_eq!(AdminCaller::AdminKey(0).to_string(), "admin#0");
        assert_eq!(AdminCaller::ApiKey(2).to_string(), "api#2");
        assert_eq!(AdminCaller::NoKey.to_string(), "none");
    }

    #[test]
    fn an_admin_action_is_one_line_saying_who_asked_what_and_how_it_ended() {
        let peer = addr("127.0.0.1:50000");
        let lines = json_lines(|| {
            log_action(&AdminAction {
                peer,
                caller: AdminCaller::AdminKey(1),
                action: "drain",
                worker: Some("0"),
                request_id: "req-1",
                status: StatusCode::OK,
            });
            log_action(&AdminAction {
                peer: None,
                caller: AdminCaller::NoKey,
                action: "restart",
                worker: Some("3"),
                request_id: "req-2",
                status: StatusCode::SERVICE_UNAVAILABLE,
            });
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let ok = &lines[0];
        assert_eq!(ok["level"], "INFO");
        assert_eq!(ok["message"], "admin action");
        assert_eq!(ok["peer"], "127.0.0.1:50000");
        assert_eq!(ok["key"], "admin#1");
        assert_eq!(ok["action"], "drain");
        assert_eq!(ok["worker"], "0");
        assert_eq!(ok["request_id"], "req-1");
        assert_eq!(ok["status"], 200);
        let failed = &lines[1];
        assert_eq!(failed["level"], "WARN");
        assert_eq!(failed["peer"], "unknown");
        assert_eq!(failed["key"], "none");
        assert_eq!(failed["action"], "restart");
        assert_eq!(failed["status"], 503);
        // The text format shows the values bare, as operators grep them.
        let text = captured(false, || {
            log_action(&AdminAction {
                peer,
                caller: AdminCaller::ApiKey(0),
                action: "drain",
                worker: Some("0"),
                request_id: "req-3",
                status: StatusCode::OK,
            });
        });
        for field in [
            "peer=127.0.0.1:50000",
            "key=api#0",
            "action=drain",
            "worker=0",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert!(text.contains("request_id=req-3 status=200"), "{text}");
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn loopback_requests_must_name_this_machine() {
        let policy = HostPolicy::new(&list(&["llm.example:8080", "box"]), &list(&["127.0.0.1:0"]));
        let local = addr("127.0.0.1:8080");
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1:8080",
            "[::1]:8080",
            "app.localhost:3000",
            "llm.example:8080",
            "box",
            "box:9",
        ] {
            assert!(policy.allows(Some(host), local), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "llm.example:8081",
            "llm.example",
            "localhost.evil.example",
            "127.0.0.2",
            "localhost:x",
            "",
        ] {
            assert!(!policy.allows(Some(host), local), "{host}");
        }
        let mapped = addr("[::ffff:127.0.0.1]:8080");
        assert!(policy.allows(Some("127.0.0.1:8080"), mapped));
        assert!(!policy.allows(Some("evil.example"), mapped));
        let v6 = addr("[::1]:8080");
        assert!(policy.allows(Some("[::1]:8080"), v6));
        assert!(!policy.allows(Some("evil.example"), v6));
        // Not checked: no Host, no connection, another address.
        assert!(policy.allows(None, local));
        assert!(policy.allows(Some("evil.example"), None));
        assert!(policy.allows(Some("llm.lan"), addr("192.168.1.5:8080")));
        let any = HostPolicy::new(&list(&["*"]), &[]);
        assert!(any.allows(Some("evil.example"), local));
        // A host named in server.listen.
        let named = HostPolicy::new(&[], &list(&["myhost.local:8080", "[::1]:0"]));
        assert!(named.allows(Some("myhost.local:8080"), local));
        assert!(!named.allows(Some("otherhost.local:8080"), local));
    }

    #[test]
    fn admin_paths_simple_requests_and_actions() {
        for p in [
            "/admin/reload",
            "/admin/workers/0/drain",
            "//admin/x",
            "/admin",
        ] {
            assert!(is_admin_path(p), "{p}");
        }
        for p in ["/administer", "/v1/admin", "/", "/workers"] {
            assert!(!is_admin_path(p), "{p}");
        }
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.append(*k, HeaderValue::from_str(v).unwrap());
            }
            map
        };
        for simple in [
            headers(&[]),
            headers(&[("content-type", "text/plain")]),
            headers(&[("content-type", "application/x-www-form-urlencoded")]),
            headers(&[("content-type", "multipart/form-data; boundary=x")]),
            headers(&[("content-type", "text/plain; x=application/json")]),
        ] {
            assert!(is_simple(&simple), "{simple:?}");
        }
        for not_simple in [
            headers(&[("content-type", "application/json")]),
            headers(&[("content-type", "Application/JSON; charset=utf-8")]),
            headers(&[("x-llamapool-admin", "1")]),
            headers(&[("authorization", "Bearer k")]),
            headers(&[("x-api-key", "k")]),
        ] {
            assert!(!is_simple(&not_simple), "{not_simple:?}");
        }
        let same = headers(&[("origin", "http://127.0.0.1:8080")]);
        assert!(!foreign_origin(&same, Some("127.0.0.1:8080")));
        assert!(foreign_origin(&same, Some("localhost:8080")));
        assert!(foreign_origin(&headers(&[("origin", "null")]), Some("x")));
        assert!(!foreign_origin(&headers(&[]), Some("x")));
        assert_eq!(admin_action("/admin/workers/3/drain"), ("drain", Some("3")));
        assert_eq!(admin_action("/admin/reload"), ("reload", None));
    }
}
