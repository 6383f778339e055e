//! `llamapool-router`: loads the configuration, starts the worker pool, serves HTTP, and on
//! SIGINT/SIGTERM drains (SIGTERM first turns `/health` 503 and serves on for
//! `server.drain_notice_secs`), stops accepting, lets in-flight requests finish (up to
//! `server.drain_timeout_secs`), then stops the workers.
//!
//! Exit statuses ([`EXIT_OK`], [`EXIT_FAILURE`], [`EXIT_USAGE`], [`EXIT_CONFIG`]) tell
//! `scripts/serve` whether a restart can help.

mod serve;

use llamapool_router::reload::ConfigSource;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use llamapool_common::cpus::CpuList;
use llamapool_common::settings::{LogFormat, ModelSettings, Settings, WorkerPlan, LOG_FORMAT_ENV};
use llamapool_router::config;
use llamapool_router::llama_flags::{self, FlagError, LlamaFlags, OwnFlag};
use serve::Served;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "OpenAI-compatible LLM server over a pool of pinned llama.cpp workers",
    after_help = llama_flags::help()
)]
struct Args {
    /// TOML configuration file (then LLAMAPOOL__SECTION__KEY variables, then these flags);
    /// `-c` with a number is llama-server's --ctx-size.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides server.listen.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides model.path.
    #[arg(long, short)]
    model: Option<String>,
    /// Overrides model.alias.
    #[arg(long, short)]
    alias: Option<String>,
    /// Any key: --set server.max_queued=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    set: Vec<(String, String)>,
    /// Validate the configuration, print the worker plan, and exit.
    #[arg(long)]
    check: bool,
    /// llama-server's flags, taken out of the command line before clap parses it.
    #[arg(skip)]
    llama: LlamaFlags,
}

impl Args {
    /// Parses the command line: llama-server's flags first ([`llama_flags::extract`]), then
    /// the router's own through clap.
    fn parse_command_line() -> Result<Self, ParseError> {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Self::command();
        command.build();
        let own: Vec<OwnFlag> = command
            .get_arguments()
            .flat_map(|a| {
                let takes_value = a.get_action().takes_values();
                a.get_long()
                    .map(|l| format!("--{l}"))
                    .into_iter()
                    .chain(a.get_short().map(|s| format!("-{s}")))
                    .map(move |name| OwnFlag { name, takes_value })
            })
            .collect();
        let (rest, llama) = llama_flags::extract(std::env::args_os(), &own)?;
        let matches = command.try_get_matches_from(rest)?;
        let mut args = Self::from_arg_matches(&matches)?;
        args.llama = llama;
        Ok(args)
    }
}

/// Why the command line was not taken.
#[derive(Debug)]
enum ParseError {
    /// A llama-server flag that is not supported, or a bad value of one.
    Flag(FlagError),
    /// clap's: a usage error, or `--help`/`--version`.
    Clap(clap::Error),
}

impl From<FlagError> for ParseError {
    fn from(e: FlagError) -> Self {
        Self::Flag(e)
    }
}

impl From<clap::Error> for ParseError {
    fn from(e: clap::Error) -> Self {
        Self::Clap(e)
    }
}

/// Stopped on request (SIGINT/SIGTERM, after draining), or `--check`, `--help`, `--version`.
pub const EXIT_OK: u8 = 0;
/// Failed for a reason other than the command line or the configuration (`scripts/serve`
/// restarts the router after this status and after a death by signal).
pub const EXIT_FAILURE: u8 = 1;
/// The command line is wrong: an unknown flag, a missing value, `--set` without `=`
/// (clap's status for usage errors), llama-server flags that do not fit the configuration
/// ([`FlagError`]).
pub const EXIT_USAGE: u8 = 2;
/// The configuration cannot work: an unknown key or a bad value, a missing configuration
/// file, model file or worker binary, a listen address that cannot be bound. `EX_CONFIG` of
/// sysexits.h; restarting cannot help, so `scripts/serve` stops with it.
pub const EXIT_CONFIG: u8 = 78;

fn main() -> std::process::ExitCode {
    let status = match Args::parse_command_line() {
        Ok(args) => match run(args) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("error: {}", describe(&e));
                exit_status(&e)
            }
        },
        Err(ParseError::Flag(e)) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
        Err(ParseError::Clap(e)) => {
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
    llamapool_common::logging::init(format, "info");
}

/// [`EXIT_USAGE`] for llama-server flags that do not fit the configuration, [`EXIT_CONFIG`]
/// when the error is, or wraps, a configuration error; else [`EXIT_FAILURE`].
fn exit_status(error: &anyhow::Error) -> u8 {
    if error.chain().any(|e| e.is::<FlagError>()) {
        return EXIT_USAGE;
    }
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

/// A model given by `--model`/`-m` and named nowhere (no `--alias`, and the configuration
/// keeps the default model's alias) is served under its file name, as llama-server names it:
/// not under the default model's name.
fn alias_of_model_file(
    model: Option<&str>,
    alias: Option<&str>,
    settings: &Settings,
) -> Option<String> {
    let path = model?;
    let unnamed = alias.is_none() && settings.model.alias == ModelSettings::default().alias;
    let file = std::path::Path::new(path).file_name()?.to_str()?;
    (unnamed && file != ModelSettings::default().path.to_str()?).then(|| file.to_string())
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
    let allowed = CpuList::allowed();
    let mut settings = config::load(args.config.as_deref(), &overrides)?;
    if let Some(alias) =
        alias_of_model_file(args.model.as_deref(), args.alias.as_deref(), &settings)
    {
        overrides.push(("model.alias".into(), alias));
        settings = config::load(args.config.as_deref(), &overrides)?;
    }
    if !args.llama.is_empty() {
        if args.listen.is_some() && (args.llama.host.is_some() || args.llama.port.is_some()) {
            return Err(FlagError::Conflict(
                "--listen and --host/--port: give one or the other".into(),
            )
            .into());
        }
        // llama-server's flags come after --set; the pool's shape needs the settings without
        // them (the number of workers, the configured address).
        overrides.extend(llama_flags::overrides(&args.llama, &settings, &allowed)?);
        settings = config::load(args.config.as_deref(), &overrides)?;
    }
    init_logging(settings.server.log_format);
    if settings.workers.is_empty() && settings.default_worker_count(&allowed) < allowed.len() {
        tracing::info!(
            cpus = %allowed,
            quota = ?settings.cpu_quota,
            "the cgroup CPU quota allows fewer CPUs than this process may run on: the default \
             layout is one unpinned one-thread worker per CPU of the quota"
        );
    }
    if !args.llama.ignored.is_empty() {
        tracing::info!(
            flags = %args.llama.ignored.join(" "),
            "llama-server flags accepted and ignored"
        );
    }
    let served = if settings.serves_several_models() {
        let preset = config::read_preset(&settings)?;
        Served::Several(settings.plan_models(&allowed, &preset)?)
    } else {
        Served::One {
            model_path: settings.resolve_model_path(&config::models_dir())?,
            plans: settings.plan_workers(&allowed)?,
        }
    };
    if args.check {
        print_plan(&settings, &served, &args.llama.ignored);
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
    runtime.block_on(serve::run(settings, served, private_runtime_dir, source))
}

/// `--check`'s report: each model and its workers.
fn print_plan(settings: &Settings, served: &Served, ignored: &[String]) {
    if let Served::One { model_path, .. } = served {
        println!(
            "model: {} (alias {})",
            model_path.display(),
            settings.model.alias
        );
    }
    println!("listen: {}", settings.server.listen);
    if !ignored.is_empty() {
        println!("ignored: {}", ignored.join(" "));
    }
    match served {
        Served::One { plans, .. } => print_workers(plans),
        Served::Several(models) => {
            for model in models {
                println!(
                    "model {}: {} (names {}){}{}",
                    model.index,
                    model.path.display(),
                    model.names.join(", "),
                    if model.load_on_startup {
                        ", loaded at start"
                    } else {
                        ""
                    },
                    if model.pinned { ", pinned" } else { "" },
                );
                print_workers(&model.workers);
            }
        }
    }
}

fn print_workers(plans: &[WorkerPlan]) {
    for p in plans {
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
