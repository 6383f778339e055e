//! The server around the route table: binds `server.listen` (each of its addresses), starts
//! the pool, builds the
//! shared [`AppState`], accepts client connections within bounds, and on SIGINT/SIGTERM (or
//! `POST /admin/drain`) drains: `/health` 503 at once, new requests still served for the
//! notice period (not after SIGINT), then it stops accepting, lets the requests in flight
//! finish and stops the workers. Called by `main` once the configuration is loaded.
//!
//! What keeps one client, or a thousand, from holding the server (each a `server.*` key):
//!
//! - `max_connections`: the accept loop takes a slot before it accepts, so at the cap it stops
//!   accepting and new connections wait in the kernel's listen backlog until one closes. (Not
//!   accept-and-close: that answers nothing useful either, costs an accept and a close per
//!   attempt, and throws away clients that a moment later could have been served.)
//! - Accept errors (EMFILE, ENFILE, ENOBUFS: they repeat until something is freed) back off
//!   from 10 ms doubling to 1 s, logged once per burst ([`AcceptBackoff`]).
//! - `header_read_timeout_secs`: hyper's HTTP/1 timer for each request head. hyper starts it
//!   whenever it waits for a head, so it also bounds the wait for the next request of a
//!   keep-alive connection. It does not cover the bytes hyper-util reads first to tell HTTP/1
//!   from HTTP/2, nor HTTP/2, so the [`Activity`] watchdog also closes a connection that has
//!   not started its first request within that time.
//! - `idle_timeout_secs`: the [`Activity`] watchdog closes a connection with no request in
//!   flight (from the request head to the end of its response body) for that long.
//! - `body_read_timeout_secs`: a request body must arrive whole within that time of the
//!   handler starting to read it, else 408 and the connection is closed (`http::LimitedBody`);
//!   `max_buffered_body_bytes` bounds the bytes of bodies held at once, over all connections.
//! - `max_h2_streams`: HTTP/2 streams open at once on one connection (hyper's default: 200).
//! - `write_timeout_secs`: [`WriteGuard`] fails the connection's writes once they have been
//!   refused that long; hyper then drops the connection and its responses, which aborts their
//!   requests. `TCP_NOTSENT_LOWAT` keeps the kernel from buffering megabytes on behalf of a
//!   client that does not read, so a refused write means that the client stopped taking bytes.

use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use llamapool_common::settings::{LogFormat, ModelPlan, ServerSettings, Settings, WorkerPlan};
use llamapool_router::config;
use llamapool_router::dispatch::poison::PoisonPolicy;
use llamapool_router::dispatch::{LaunchConfig, Pool, RoutingPolicy, SupervisionPolicy};
use llamapool_router::drain::{self, Drain};
use llamapool_router::http::access::ConnInfo;
use llamapool_router::http::Models;
use llamapool_router::http::{self, AppState};
use llamapool_router::metrics::Metrics;
use llamapool_router::models::{default_memory_budget, LoadPolicy, Replan, Starter};
use llamapool_router::openai::request::ServedModel;
use llamapool_router::reload::{ConfigReload, ConfigSource};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Unsent bytes the kernel may hold for one connection before a write is refused
/// (`TCP_NOTSENT_LOWAT`). Without it Linux buffers up to `tcp_wmem` (4 MiB) per connection:
/// thousands of stream chunks, more than a whole generation, so a client that never reads
/// would never be noticed. 16 KiB is well above one write of any response the router sends
/// in a round trip on loopback or a LAN.
const NOTSENT_LOWAT: u32 = 16 * 1024;

/// Serves until SIGINT/SIGTERM: binds, starts the pool, accepts, then drains and stops the
/// workers. `runtime_dir` is the private socket directory to create (see `main`).
pub async fn run(
    settings: Settings,
    served: Served,
    runtime_dir: impl FnOnce(Option<&PathBuf>) -> Result<PathBuf>,
    source: ConfigSource,
) -> Result<()> {
    let server_settings = &settings.server;
    let worker_binary = config::worker_binary(server_settings)?;
    if !worker_binary.is_file() {
        bail!(
            "configuration key server.worker_binary: {} does not exist",
            worker_binary.display()
        );
    }
    let runtime_dir = runtime_dir(server_settings.runtime_dir.as_ref())?;
    let mut listeners = Vec::new();
    for address in server_settings.listen_addresses() {
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("configuration key server.listen: cannot bind {address}"))?;
        listeners.push(listener);
    }
    let locals = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<SocketAddr>>>()?;
    if locals.is_empty() {
        bail!("configuration key server.listen: no address given");
    }
    let limits = ConnLimits::from_settings(server_settings);
    let inference_keys = server_settings.api_keys()?;
    let admin_keys = server_settings.admin_api_keys()?;
    if inference_keys.is_empty() && locals.iter().any(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            listen = server_settings.listen.as_str(),
            admin_keys = !admin_keys.is_empty(),
            "listening beyond loopback without an API key (server.api_keys): anyone who can \
             reach this address can use the model; the admin routes {}",
            if admin_keys.is_empty() {
                "answer clients on this machine only (no server.admin_api_keys)"
            } else {
                "need an admin key"
            }
        );
    }
    let shared = SharedParts {
        api_keys: http::auth::ApiKeys::new(inference_keys),
        admin_keys: http::auth::ApiKeys::new(admin_keys),
        body_budget: Arc::new(Semaphore::new(
            server_settings
                .max_buffered_body_bytes
                .max(server_settings.max_body_bytes),
        )),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        worker_binary: worker_binary.clone(),
        runtime_dir: runtime_dir.clone(),
        drain: Drain::default(),
    };
    let (state, n_workers) = match served {
        Served::One { model_path, plans } => {
            let n_workers = plans.len();
            let pool = start_pool(
                &settings,
                &shared,
                plans,
                model_path.clone(),
                Arc::new(Metrics::default()),
                runtime_dir.clone(),
            );
            let reloader: http::admin::Reloader = Arc::new(ConfigReload {
                source,
                worker_binary,
                runtime_dir: runtime_dir.clone(),
            });
            let state = model_state(&settings, &shared, pool, model_path, Some(reloader));
            (Arc::new(state), n_workers)
        }
        Served::Several(plans) => {
            let n_workers = plans.iter().map(|p| p.workers.len()).max().unwrap_or(0);
            let registry = several_models(&settings, &shared, plans, source);
            let pool = start_pool(
                &settings,
                &shared,
                Vec::new(),
                PathBuf::new(),
                Arc::new(Metrics::default()),
                runtime_dir.clone(),
            );
            let mut state = model_state(&settings, &shared, pool, PathBuf::new(), None);
            state.models = Some(registry.clone());
            registry.start();
            (Arc::new(state), n_workers)
        }
    };
    // The line tests and scripts wait for. Written without `println!`, which panics when
    // stdout is closed: a reader that stops after the first line must not stop the server.
    let banner = banner(
        server_settings.log_format,
        &locals.iter().map(ToString::to_string).collect::<Vec<_>>(),
        n_workers,
    );
    let mut stdout = io::stdout().lock();
    let _ = stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);
    let graceful = GracefulShutdown::new();
    serve_until_drained(
        &listeners,
        &state,
        &shared.drain,
        limits,
        &graceful,
        Duration::from_secs(server_settings.drain_notice_secs),
    )
    .await?;
    tracing::info!("shutting down: finishing in-flight requests");
    drop(listeners);
    let drain = Duration::from_secs(server_settings.drain_timeout_secs);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {drain:?}");
    }
    if let Some(registry) = &state.models {
        registry.shutdown(Duration::from_secs(10)).await;
    }
    state.pool.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&runtime_dir);
    tracing::info!("stopped");
    Ok(())
}

/// What the router serves: one model (its file and workers), or several.
pub enum Served {
    One {
        model_path: PathBuf,
        plans: Vec<WorkerPlan>,
    },
    Several(Vec<ModelPlan>),
}

/// What every model's state shares with the router's.
#[derive(Clone)]
struct SharedParts {
    /// Read once at start-up (a key file is not read again when a model loads).
    api_keys: http::auth::ApiKeys,
    admin_keys: http::auth::ApiKeys,
    body_budget: Arc<Semaphore>,
    started: u64,
    worker_binary: PathBuf,
    runtime_dir: PathBuf,
    /// One flag for the router and every model: `/health` reads the router's.
    drain: Drain,
}

/// What ended the serving: SIGINT skips the drain's notice period, the others keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    /// SIGTERM: a supervisor, a container runtime, Kubernetes.
    Terminate,
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
    /// `POST /admin/drain`.
    AdminDrain,
}

/// Accepts and serves until SIGTERM, SIGINT or `POST /admin/drain`, starts the drain
/// (`/health` 503 from then on), and, but after SIGINT, goes on accepting and serving for the
/// notice period ([`drain::notice`]). Returns when the listeners may close.
async fn serve_until_drained(
    listeners: &[TcpListener],
    state: &Arc<AppState>,
    drain: &Drain,
    limits: ConnLimits,
    graceful: &GracefulShutdown,
    notice: Duration,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let accepting = accept_loop(listeners, http::router(state.clone()), limits, graceful);
    tokio::pin!(accepting);
    let cause = tokio::select! {
        // The accept loop never returns; were it to, the drain would start at once.
        () = &mut accepting => StopCause::Terminate,
        _ = sigterm.recv() => StopCause::Terminate,
        _ = sigint.recv() => StopCause::Interrupt,
        () = drain.started() => StopCause::AdminDrain,
    };
    drain.start();
    if cause == StopCause::Interrupt || notice.is_zero() {
        return Ok(());
    }
    tracing::info!(
        ?cause,
        ?notice,
        "draining: /health answers 503; still serving new requests for the notice period"
    );
    tokio::select! {
        () = &mut accepting => {}
        () = drain::notice(notice, || requests_in_flight(state), || drain.has_told()) => {}
        // Ctrl-C during the notice: stop waiting.
        _ = sigint.recv() => {}
    }
    Ok(())
}

/// Requests the node has dispatched and not finished, over every loaded model.
fn requests_in_flight(state: &Arc<AppState>) -> usize {
    http::gateway::node_pools(state)
        .iter()
        .map(Pool::in_flight)
        .sum()
}

/// Starts a pool of `plans` on `model_path`, its sockets in `socket_dir`.
fn start_pool(
    settings: &Settings,
    shared: &SharedParts,
    plans: Vec<WorkerPlan>,
    model_path: PathBuf,
    metrics: Arc<Metrics>,
    socket_dir: PathBuf,
) -> Pool {
    let server_settings = &settings.server;
    Pool::start(
        plans,
        LaunchConfig {
            worker_binary: shared.worker_binary.clone(),
            runtime_dir: socket_dir,
            model_path,
            chat_template: settings.model.chat_template.clone(),
            ready_timeout: Duration::from_secs(server_settings.ready_timeout_secs),
        },
        SupervisionPolicy {
            hang_timeout: Duration::from_secs(server_settings.hang_timeout_secs.max(1)),
            crash_deaths: server_settings.crash_loop_deaths.max(1),
            crash_window: Duration::from_secs(server_settings.crash_loop_window_secs),
            failed_retry: Duration::from_secs(server_settings.failed_retry_secs),
            poison: PoisonPolicy {
                ttl: Duration::from_secs(server_settings.poison_ttl_secs),
                strike_window: Duration::from_secs(server_settings.poison_ttl_secs.max(60)),
            },
        },
        RoutingPolicy {
            prefix_affinity: server_settings.prefix_affinity,
            max_load_gap: server_settings.affinity_max_load_gap,
            rebalance: server_settings.rebalance,
        },
        metrics,
    )
}

/// The state requests to one model are served with (`settings` is that model's view).
fn model_state(
    settings: &Settings,
    shared: &SharedParts,
    pool: Pool,
    model_path: PathBuf,
    reloader: Option<http::admin::Reloader>,
) -> AppState {
    let server_settings = &settings.server;
    // plan_workers refused an empty alias: there is at least one name.
    let served_names = settings.model.names();
    let n_workers = pool.views().len();
    AppState {
        slots_endpoint: server_settings.slots_endpoint,
        drain: shared.drain.clone(),
        public_metrics: server_settings.public_metrics,
        served: ServedModel {
            alias: served_names.first().cloned().unwrap_or_default(),
            names: served_names,
            tags: settings.model.tags.clone(),
            strict_name: settings.model.strict_name,
            defaults: settings.generation.clone(),
        },
        model_path: model_path.display().to_string(),
        api_keys: shared.api_keys.clone(),
        admin_keys: shared.admin_keys.clone(),
        hosts: http::access::HostPolicy::new(
            &server_settings.allowed_hosts,
            &server_settings.listen_addresses(),
        ),
        cors: http::cors::CorsPolicy::new(&server_settings.cors_origins),
        max_body_bytes: server_settings.max_body_bytes,
        body_read_timeout: Duration::from_secs(server_settings.body_read_timeout_secs.max(1)),
        body_budget: shared.body_budget.clone(),
        keepalive: Duration::from_secs(server_settings.keepalive_secs.max(1)),
        admission: Arc::new(Semaphore::new(
            pool.total_slots() + server_settings.max_queued,
        )),
        control_calls: Arc::new(Semaphore::new(http::control_call_limit(n_workers))),
        max_tokenize_tokens: server_settings.max_tokenize_tokens,
        write_timeout: Duration::from_secs(server_settings.write_timeout_secs.max(1)),
        next_id: AtomicU64::new(1),
        started: shared.started,
        drain_timeout: Duration::from_secs(server_settings.drain_timeout_secs),
        reloader,
        pool,
        models: None,
    }
}

/// The registry of several models, each started with its own pool and state, its sockets in
/// a directory of its own per load (an unloading pool may still hold its sockets).
fn several_models(
    settings: &Settings,
    shared: &SharedParts,
    plans: Vec<ModelPlan>,
    source: ConfigSource,
) -> Arc<Models> {
    let s = &settings.server;
    let policy = LoadPolicy {
        models_max: s.models_max,
        memory_budget: match s.models_memory_mib {
            0 => default_memory_budget(),
            mib => mib.saturating_mul(1024 * 1024),
        },
        autoload: s.models_autoload,
        load_timeout: Duration::from_secs(s.model_load_timeout_secs.max(1)),
        ready_timeout: Duration::from_secs(s.ready_timeout_secs.max(1)),
        failed_retry: Duration::from_secs(s.failed_retry_secs),
        drain_timeout: Duration::from_secs(s.drain_timeout_secs),
    };
    let shared = shared.clone();
    let loads = AtomicU64::new(0);
    let starter: Starter<AppState> = Box::new(move |plan: &ModelPlan, path: PathBuf, metrics| {
        let load = loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket_dir = shared
            .runtime_dir
            .join(format!("model-{}-{load}", plan.index));
        std::fs::create_dir_all(&socket_dir).map_err(|e| {
            format!(
                "cannot create the socket directory {}: {e}",
                socket_dir.display()
            )
        })?;
        let pool = start_pool(
            &plan.settings,
            &shared,
            plan.workers.clone(),
            path.clone(),
            metrics,
            socket_dir,
        );
        Ok(Arc::new(model_state(
            &plan.settings,
            &shared,
            pool,
            path,
            None,
        )))
    });
    // `GET /v1/models?reload=1` reads the same sources again (file, environment, flags, the
    // models directory and the preset).
    let replan: Replan = Box::new(move || {
        let settings =
            config::load(source.file.as_deref(), &source.overrides).map_err(|e| e.to_string())?;
        let preset = config::read_preset(&settings).map_err(|e| e.to_string())?;
        settings
            .plan_models(&llamapool_common::cpus::CpuList::allowed(), &preset)
            .map_err(|e| e.to_string())
    });
    Models::new(plans, policy, starter, Some(replan), config::models_dir())
}

/// The start-up lines on stdout, which tests and scripts wait for: `llamapool listening on
/// http://ADDR (N workers starting)`, then one `llamapool also listening on http://ADDR` per
/// other address; with `log_format = "json"`, each is a JSON object whose `message` is that
/// text, like every other line the router writes.
fn banner(format: LogFormat, addresses: &[String], n_workers: usize) -> String {
    let mut lines = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let message = if i == 0 {
            format!("llamapool listening on http://{address} ({n_workers} workers starting)")
        } else {
            format!("llamapool also listening on http://{address}")
        };
        tracing::info!(address = %address, "{message}");
        lines.push(match format {
            LogFormat::Json => serde_json::json!({
                "level": "INFO",
                "target": "llamapool_router",
                "message": message,
                "address": address,
            })
            .to_string(),
            LogFormat::Text => message,
        });
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The per-connection bounds, from `server.*` (each at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    /// HTTP/2 streams open at once per connection (`server.max_h2_streams`).
    pub max_h2_streams: u32,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl ConnLimits {
    pub fn from_settings(s: &ServerSettings) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(s.header_read_timeout_secs.max(1)),
            max_h2_streams: s.max_h2_streams.max(1),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs.max(1)),
            write_timeout: Duration::from_secs(s.write_timeout_secs.max(1)),
            max_connections: s.max_connections.max(1),
        }
    }
}

/// Accepts connections on every listener and serves each on its own task, until dropped.
/// Never returns.
async fn accept_loop(
    listeners: &[TcpListener],
    app: Router,
    limits: ConnLimits,
    graceful: &GracefulShutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Header names go out as `Content-Type`, as llama-server (cpp-httplib) writes them:
        // HTTP says case does not matter, but clients that look headers up in a plain dict
        // (llama.cpp's own test suite does) expect its spelling.
        .title_case_headers(true);
    // hyper's default is 200 streams per connection, each with its own body being read.
    builder
        .http2()
        .max_concurrent_streams(limits.max_h2_streams);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut at_cap = false;
    let mut backoff = AcceptBackoff::default();
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                if std::mem::take(&mut at_cap) {
                    tracing::info!("below server.max_connections again: accepting");
                }
                slot
            }
            Err(_) => {
                if !std::mem::replace(&mut at_cap, true) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "server.max_connections reached: not accepting until a connection closes"
                    );
                }
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the connection semaphore is never closed")
            }
        };
        let (stream, peer) = match accept_any(listeners).await {
            Ok((stream, peer)) => {
                if let Some(errors) = backoff.succeeded() {
                    tracing::info!(errors, "accepting connections again");
                }
                (stream, peer)
            }
            Err(error) => {
                let (delay, first) = backoff.failed();
                if first {
                    tracing::warn!(%error, "accept failed; retrying with back-off (10 ms doubling to 1 s) until it succeeds");
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        serve_connection(stream, peer, &app, &builder, limits, graceful, slot);
    }
}

/// The next connection of any of `listeners` (at least one).
async fn accept_any(listeners: &[TcpListener]) -> io::Result<(TcpStream, SocketAddr)> {
    if let [only] = listeners {
        return only.accept().await;
    }
    let accepts = listeners.iter().map(|l| Box::pin(l.accept()));
    futures_util::future::select_all(accepts).await.0
}

/// Serves one connection on its own task, which holds the connection's `slot`.
fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: &Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: ConnLimits,
    graceful: &GracefulShutdown,
    slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    if let Err(error) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
    }
    let activity = Arc::new(Activity::new());
    let service = Tracked {
        inner: TowerToHyperService::new(app.clone()),
        activity: activity.clone(),
        conn: ConnInfo {
            peer,
            local: stream.local_addr().unwrap_or(peer),
        },
    };
    let io = TokioIo::new(WriteGuard::new(stream, limits.write_timeout));
    let conn = graceful.watch(builder.serve_connection(io, service).into_owned());
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            result = conn => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
            }
            () = activity.expired(limits.header_read_timeout, limits.idle_timeout) => {
                tracing::debug!("closing an idle connection");
            }
        }
    });
}

/// The delay after each failed `accept` of a burst: 10 ms doubling to 1 s.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Failures since the last success.
    errors: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// After a failure: how long to wait, and whether it is the first of its burst (to log).
    fn failed(&mut self) -> (Duration, bool) {
        self.errors = self.errors.saturating_add(1);
        let factor = 1u32.checked_shl(self.errors - 1).unwrap_or(u32::MAX);
        (
            Self::FIRST.saturating_mul(factor).min(Self::MAX),
            self.errors == 1,
        )
    }

    /// After a success: how many failures the burst it ends had, if there was one.
    fn succeeded(&mut self) -> Option<u32> {
        (self.errors > 0).then(|| std::mem::take(&mut self.errors))
    }
}

/// A connection's requests in flight, watched by [`Activity::expired`].
#[derive(Debug)]
struct Activity {
    state: Mutex<Idle>,
    changed: Notify,
}

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Idle {
    in_flight: usize,
    /// Whether any request has started (before that, the header read timeout applies).
    started: bool,
    /// When the last request ended, or when the connection was accepted.
    since: Instant,
}

impl Idle {
    /// When the connection is to be closed if nothing changes; `None` while a request is in
    /// flight. Before its first request a connection gets `first`, between requests `idle`.
    fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        (self.in_flight == 0).then(|| self.since + if self.started { idle } else { first })
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(Idle {
                in_flight: 0,
                started: false,
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Idle)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }

    fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline(first, idle)
    }

    /// A request started; it is in flight until the guard drops (with its response body).
    fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.update(|s| {
            s.in_flight += 1;
            s.started = true;
        });
        InFlightGuard(self.clone())
    }

    /// Completes when the connection has been idle past its deadline (see [`Idle::deadline`]).
    async fn expired(&self, first: Duration, idle: Duration) {
        loop {
            // Registered before the state is read, so no change between the two is missed.
            let changed = self.changed.notified();
            match self.deadline(first, idle) {
                None => changed.await,
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
struct InFlightGuard(Arc<Activity>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.since = Instant::now();
            }
        });
    }
}

/// The route table as a hyper service that counts a connection's requests in flight: from
/// the call to the end (or drop) of the response body, so a stream is a request in flight.
/// Each request gets the connection's addresses as a [`ConnInfo`] extension.
#[derive(Debug, Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    conn: ConnInfo,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<http::HeldBody<InFlightGuard>>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.conn);
        let guard = self.activity.begin();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| http::HeldBody::new(body, guard)))
        })
    }
}

/// A client's TCP stream whose writes fail with `TimedOut` once they have been refused for
/// `timeout` without a byte accepted in between. Reads are untouched.
#[derive(Debug)]
struct WriteGuard {
    stream: TcpStream,
    timeout: Duration,
    /// Running while writes are refused; cleared when a write makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl WriteGuard {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// Called when a write or flush is refused: the error once the stall lasted `timeout`.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.timeout;
        let stall = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        stall.as_mut().poll(cx).map(|()| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no bytes for {timeout:?}"),
            )
        })
    }

    fn on_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Pending => self.poll_stall(cx).map(Err),
            Poll::Ready(Ok(n)) if n > 0 => {
                self.stalled = None;
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }

    fn on_other(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        match result {
            Poll::Pending => self.poll_stall(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncRead for WriteGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.on_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.on_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_flush(cx);
        this.on_other(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.on_other(cx, result)
    }
}

#[cfg(test)]
mod tests;
