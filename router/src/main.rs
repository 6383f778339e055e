//! `llamapool-router`: loads the configuration, starts the worker pool, serves HTTP, and on
//! SIGINT/SIGTERM stops accepting, lets in-flight requests finish (up to
//! `server.drain_timeout_secs`), then stops the workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use llamapool_common::cpus::CpuList;
use llamapool_router::config;
use llamapool_router::dispatch::pool::LaunchConfig;
use llamapool_router::dispatch::Pool;
use llamapool_router::http::{self, AppState};
use llamapool_router::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "OpenAI-compatible LLM server over a pool of pinned llama.cpp workers"
)]
struct Args {
    /// TOML configuration file (then LLAMAPOOL__SECTION__KEY variables, then these flags).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides server.listen.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides model.path.
    #[arg(long)]
    model: Option<String>,
    /// Overrides model.alias.
    #[arg(long)]
    alias: Option<String>,
    /// Any key: --set server.max_queued=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Validate the configuration, print the worker plan, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let mut overrides = Vec::new();
    for kv in &args.set {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--set takes KEY=VALUE, got {kv:?}")
        };
        overrides.push((k.to_string(), v.to_string()));
    }
    for (key, value) in [
        ("server.listen", &args.listen),
        ("model.path", &args.model),
        ("model.alias", &args.alias),
    ] {
        if let Some(v) = value {
            overrides.push((key.to_string(), v.clone()));
        }
    }
    let settings = config::load(args.config.as_deref(), &overrides)?;
    let model_path = settings.resolve_model_path(&config::models_dir())?;
    let allowed = CpuList::allowed();
    let plans = settings.plan_workers(&allowed)?;
    if args.check {
        println!(
            "model: {} (alias {})",
            model_path.display(),
            settings.model.alias
        );
        for p in &plans {
            let c = &p.context;
            let gpu = p.gpu.map(|g| format!(" gpu {g}")).unwrap_or_default();
            println!(
                "worker {}: cpus {} threads {} slots {} context {} n_batch {} n_ubatch {} flash_attention {} kv_unified {} gpu_layers {}{gpu}",
                p.index,
                p.cpus,
                c.threads,
                c.slots,
                c.context,
                c.n_batch,
                c.n_ubatch,
                c.flash_attention,
                c.kv_unified,
                p.gpu_layers
            );
        }
        return Ok(());
    }
    // The router's own work is light (HTTP, framing); a few runtime threads suffice and leave
    // the cores to the pinned workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match settings.server.runtime_threads {
            0 => allowed.len().clamp(1, 2),
            n => n,
        })
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings, model_path, plans))
}

/// Removes socket directories left by routers that were killed (SIGKILL skips the cleanup):
/// `llamapool-<pid>-<random>` whose pid no longer exists.
fn remove_stale_runtime_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("llamapool-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn private_runtime_dir(configured: Option<&PathBuf>) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = configured
        .cloned()
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    remove_stale_runtime_dirs(&base);
    let dir = base.join(format!(
        "llamapool-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the runtime directory {}", dir.display()))?;
    Ok(dir)
}

async fn serve(
    settings: llamapool_common::settings::Settings,
    model_path: PathBuf,
    plans: Vec<llamapool_common::settings::WorkerPlan>,
) -> Result<()> {
    let server_settings = &settings.server;
    let worker_binary = match &server_settings.worker_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("llamapool-worker"),
    };
    if !worker_binary.is_file() {
        bail!(
            "configuration key server.worker_binary: {} does not exist",
            worker_binary.display()
        );
    }
    let runtime_dir = private_runtime_dir(server_settings.runtime_dir.as_ref())?;
    let listener = TcpListener::bind(&server_settings.listen)
        .await
        .with_context(|| {
            format!(
                "configuration key server.listen: cannot bind {}",
                server_settings.listen
            )
        })?;
    let local: SocketAddr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let n_workers = plans.len();
    let pool = Pool::start(
        plans,
        LaunchConfig {
            worker_binary,
            runtime_dir: runtime_dir.clone(),
            model_path,
            chat_template: settings.model.chat_template.clone(),
            ready_timeout: Duration::from_secs(server_settings.ready_timeout_secs),
        },
        metrics,
    );
    let state = Arc::new(AppState {
        pool: pool.clone(),
        alias: settings.model.alias.clone(),
        api_key: server_settings.api_key.clone(),
        max_body_bytes: server_settings.max_body_bytes,
        keepalive: Duration::from_secs(server_settings.keepalive_secs.max(1)),
        admission: Arc::new(Semaphore::new(
            pool.total_slots() + server_settings.max_queued,
        )),
        next_id: AtomicU64::new(1),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    // The line tests and scripts wait for.
    println!("llamapool listening on http://{local} ({n_workers} workers starting)");
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let app = http::router(state);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    drop(listener);
    let drain = Duration::from_secs(server_settings.drain_timeout_secs);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {drain:?}");
    }
    pool.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&runtime_dir);
    tracing::info!("stopped");
    Ok(())
}
