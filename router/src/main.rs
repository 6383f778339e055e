//! `llamapool-router`: loads the configuration, starts the worker pool, serves HTTP, and on
//! SIGINT/SIGTERM stops accepting, lets in-flight requests finish (up to
//! `server.drain_timeout_secs`), then stops the workers.
//!
//! Exit statuses ([`EXIT_OK`], [`EXIT_FAILURE`], [`EXIT_USAGE`], [`EXIT_CONFIG`]) tell
//! `scripts/serve` whether a restart can help.

mod serve;

use llamapool_router::reload::ConfigSource;
use std::path::PathBuf;

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Parser;
use llamapool_common::cpus::CpuList;
use llamapool_common::settings::{LogFormat, LOG_FORMAT_ENV};
use llamapool_router::config;

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
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    set: Vec<(String, String)>,
    /// Validate the configuration, print the worker plan, and exit.
    #[arg(long)]
    check: bool,
}

/// Stopped on request (SIGINT/SIGTERM, after draining), or `--check`, `--help`, `--version`.
pub const EXIT_OK: u8 = 0;
/// Failed for a reason other than the command line or the configuration (`scripts/serve`
/// restarts the router after this status and after a death by signal).
pub const EXIT_FAILURE: u8 = 1;
/// The command line is wrong: an unknown flag, a missing value, `--set` without `=`
/// (clap's status for usage errors).
pub const EXIT_USAGE: u8 = 2;
/// The configuration cannot work: an unknown key or a bad value, a missing configuration
/// file, model file or worker binary, a listen address that cannot be bound. `EX_CONFIG` of
/// sysexits.h; restarting cannot help, so `scripts/serve` stops with it.
pub const EXIT_CONFIG: u8 = 78;

fn main() -> std::process::ExitCode {
    let status = match Args::try_parse() {
        Ok(args) => match run(args) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("error: {}", describe(&e));
                exit_status(&e)
            }
        },
        Err(e) => {
            // Help and version print to stdout and succeed; usage errors go to stderr.
            let _ = e.print();
            if e.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            }
        }
    };
    std::process::ExitCode::from(status)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in `server.log_format`: text
/// (colours only on a terminal) or JSON (none; one object per line, the event's fields at the
/// top level, the current span's, such as a request's `request_id`, under `span`). Nothing is
/// logged before the configuration is loaded; its errors are printed by `main`.
///
/// Also sets [`LOG_FORMAT_ENV`], which every worker inherits: call it before any thread exists.
fn init_logging(format: LogFormat) {
    std::env::set_var(LOG_FORMAT_ENV, format.as_str());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// [`EXIT_CONFIG`] when the error is, or wraps, a configuration error; else [`EXIT_FAILURE`].
fn exit_status(error: &anyhow::Error) -> u8 {
    let is_config = error.chain().any(|e| {
        e.is::<config::ConfigError>() || e.is::<llamapool_common::settings::SettingsError>()
    });
    if is_config {
        EXIT_CONFIG
    } else {
        EXIT_FAILURE
    }
}

/// The error and its causes on one line, each once: many errors here already repeat their
/// source in their own message.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// `--set KEY=VALUE`.
fn parse_key_value(kv: &str) -> Result<(String, String), String> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {kv:?}")),
    }
}

/// Loads and checks the configuration, then serves until SIGINT/SIGTERM. Every configuration
/// problem is found before anything starts.
fn run(args: Args) -> Result<()> {
    let mut overrides = args.set;
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
    init_logging(settings.server.log_format);
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
    config::check_host(&settings.server)?;
    // The router's own work is light (HTTP, framing); a few runtime threads suffice and leave
    // the cores to the pinned workers.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(match settings.server.runtime_threads {
            0 => allowed.len().clamp(1, 2),
            n => n,
        })
        .enable_all()
        .build()?;
    let source = ConfigSource {
        file: args.config.clone(),
        overrides,
    };
    runtime.block_on(serve(settings, model_path, plans, source))
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
    source: ConfigSource,
) -> Result<()> {
    serve::run(settings, model_path, plans, private_runtime_dir, source).await
}
