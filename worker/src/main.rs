//! `llamapool-worker`: one pinned process, one model, one llama.cpp context.
//!
//! Started by the router (one per `[[workers]]` entry). Pins itself before any thread exists,
//! loads the model, starts the engine, and only then binds its Unix socket, so a socket that
//! exists means a worker that is ready. It serves exactly one router connection and exits
//! when that connection closes (or its parent dies). Only its parent, the router, may be that
//! connection: others are refused ([`peer`]).
//!
//! Signals: SIGINT and SIGTERM are ignored. Ctrl-C in a terminal and systemd's
//! `KillMode=control-group` signal every process of the group or cgroup, but a worker must
//! outlive its router's drain: the router stops it by closing the connection, and SIGKILLs
//! one that does not go. The parent-death signal is SIGKILL for the same reason.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use llamapool_common::cpus::CpuList;
use llamapool_common::logging;
use llamapool_common::protocol::{WorkerInfo, PROTOCOL_VERSION};
use llamapool_common::settings::{LogFormat, LOG_FORMAT_ENV};
use llamapool_common::worker::{Pooling, WorkerArgs};
use llamapool_worker::cli::{check_parent, Cli, ROUTER_PID_ENV};
use llamapool_worker::embed::{Embedder, FrameSink, RunningEmbedder};
use llamapool_worker::shape::Shaper;
use llamapool_worker::{ipc, peer, pin, ContextConfig, Model, ModelOptions, RunningEngine};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(gpu) = cli.gpu {
        // Before llama.cpp initialises CUDA, and while this is the only thread.
        std::env::set_var("CUDA_VISIBLE_DEVICES", gpu.to_string());
    }
    // Pin first: every thread started from here on (tracing, llama.cpp's) inherits the mask.
    // An adaptive worker starts wide; its engine thread narrows to `--cpus` when it must.
    let pin_cpus = cli.wide_cpus.as_ref().or(cli.cpus.as_ref());
    let pinned = match pin_cpus {
        Some(cpus) => {
            if let Err(e) = pin::pin_to(cpus) {
                eprintln!("llamapool-worker: pinning to CPUs {cpus}: {e:#}");
                return ExitCode::FAILURE;
            }
            cpus.clone()
        }
        None => CpuList::allowed(),
    };
    if let Err(e) = detach_from_signals() {
        eprintln!("llamapool-worker: {e:#}");
        return ExitCode::FAILURE;
    }
    let args = cli.into_worker_args(pinned.len());
    init_logging();
    // A panic is a bug in an invariant; a worker with a dead engine thread would accept and
    // never answer, so end the process: the router sees EOF, moves the requests, respawns.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    match run(&args, &pinned) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("llamapool-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (stdout under the router, see `logging::LOG_TO_STDOUT_ENV`), filtered by `RUST_LOG` (default: warnings, and this crate's info lines),
/// as text or JSON by [`LOG_FORMAT_ENV`] (the router sets it from `server.log_format`). Text
/// has colours only on a terminal; JSON has none, one object per line with the event's fields
/// at the top level and the current span's (a request's `request_id`) under `span`.
fn init_logging() {
    let format = std::env::var(LOG_FORMAT_ENV).ok();
    let format = format.as_deref().map(str::parse::<LogFormat>);
    let shown = match format {
        Some(Ok(format)) => format,
        _ => LogFormat::Text,
    };
    // Under the router, log lines go to stdout: stderr is left to native code's own prints.
    let to_stdout = std::env::var_os(logging::LOG_TO_STDOUT_ENV).is_some();
    logging::init_on(shown, "warn,llamapool_worker=info", to_stdout);
    if let Some(Err(e)) = format {
        tracing::warn!("{LOG_FORMAT_ENV}: {e}; writing text");
    }
}

/// Ignores SIGINT and SIGTERM, and dies with the router (SIGKILL, since SIGTERM is ignored)
/// even if it is killed with SIGKILL. If the router already died before `PR_SET_PDEATHSIG`
/// took effect, no signal will ever come: `LLAMAPOOL_ROUTER_PID` (set by the router) says who
/// the parent must be, and a worker that has another one exits now.
fn detach_from_signals() -> Result<()> {
    use nix::sys::signal::Signal;
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        ignore(signal).with_context(|| format!("ignoring {signal}"))?;
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    let expected = std::env::var_os(ROUTER_PID_ENV);
    let parent = nix::unistd::getppid().as_raw();
    check_parent(expected.as_deref(), parent)?;
    Ok(())
}

/// Sets `signal`'s disposition to "ignore".
#[allow(unsafe_code)]
fn ignore(signal: nix::sys::signal::Signal) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_IGN installs no handler, so no code runs in signal context; the only
    // concern `sigaction` is unsafe for (async-signal-safety of a handler) does not arise.
    unsafe { sigaction(signal, &action) }.map(|_| ())
}

/// One socket read by the IPC thread and written by the writer thread (`&Stream` is both).
struct SharedStream(Arc<interprocess::local_socket::Stream>);

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// Accepts connections until one comes from the router ([`peer::check_peer`]: the parent
/// process, same uid, as `SO_PEERCRED` tells); any other is closed at once and logged with
/// its pid and uid.
fn accept_router(
    listener: &interprocess::local_socket::Listener,
    socket: &std::path::Path,
) -> Result<interprocess::local_socket::Stream> {
    let router = peer::Router {
        pid: nix::unistd::getppid().as_raw(),
        uid: nix::unistd::geteuid().as_raw(),
    };
    loop {
        let conn = listener
            .accept()
            .context("accepting the router's connection")?;
        let creds = conn
            .peer_creds()
            .map(|c| peer::Peer {
                pid: c.pid(),
                uid: c.euid(),
            })
            .map_err(|e| e.to_string());
        match peer::check_peer(creds, router) {
            Ok(()) => return Ok(conn),
            Err(refused) => tracing::warn!(
                socket = %socket.display(),
                "refused a connection: {refused}"
            ),
        }
    }
}

fn run(args: &WorkerArgs, pinned: &CpuList) -> Result<()> {
    // An adaptive worker's context has its wide thread count; narrow, OpenMP gives it one.
    let config = &match &args.wide {
        Some(wide) => ContextConfig {
            threads: wide.threads,
            ..args.context
        },
        None => args.context,
    };
    // Before the model load, which can take a while.
    config.validate().context("invalid context configuration")?;
    let bytes = std::fs::metadata(&args.model).map(|m| m.len()).ok();
    tracing::info!(model = %args.model.display(), bytes, "loading the model");
    let started = Instant::now();
    let model = Model::load(
        &args.model,
        &ModelOptions {
            gpu_layers: args.gpu_layers,
            chat_template: args.chat_template.clone(),
        },
    )?;
    tracing::info!(
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        n_params = model.info().n_params,
        "model loaded"
    );
    let (running, outbox) = start_service(args, config, model)?;
    let info = WorkerInfo {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        cpus: pinned.cpus().to_vec(),
        threads: config.threads,
        slots: config.slots,
        n_ctx_per_seq: u32::try_from(running.n_ctx_per_seq())?,
        model: model.info().clone(),
        embedding: running.pooling(),
    };

    if args.socket.exists() {
        bail!(
            "socket {} already exists: is another worker using it?",
            args.socket.display()
        );
    }
    let name = args.socket.as_path().to_fs_name::<GenericFilePath>()?;
    let listener = ListenerOptions::new()
        .name(name)
        .reclaim_name(true)
        .create_sync()
        .with_context(|| format!("binding {}", args.socket.display()))?;
    std::fs::set_permissions(
        &args.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    tracing::info!(
        socket = %args.socket.display(),
        cpus = %pinned,
        threads = config.threads,
        slots = config.slots,
        "worker ready"
    );
    let conn = accept_router(&listener, &args.socket)?;
    drop(listener); // one router, one connection: nobody else may connect
    let conn = Arc::new(conn);
    let result = ipc::serve(
        SharedStream(conn.clone()),
        SharedStream(conn),
        outbox,
        model,
        &running.service(),
        &info,
    );
    running.stop(false);
    let _ = std::fs::remove_file(&args.socket);
    result.context("serving the router connection")
}

/// What serves this worker's requests: the generation engine, or an embedding worker's
/// embedder.
enum Running {
    Generation(RunningEngine),
    Embedding(RunningEmbedder),
}

impl Running {
    fn service(&self) -> ipc::Service {
        match self {
            Self::Generation(engine) => ipc::Service::Generation(engine.handle.clone()),
            Self::Embedding(embedder) => ipc::Service::Embedding(embedder.handle.clone()),
        }
    }

    fn n_ctx_per_seq(&self) -> usize {
        match self {
            Self::Generation(engine) => engine.handle.limits().n_ctx_per_seq,
            Self::Embedding(embedder) => embedder.handle.limits().n_ctx_per_seq,
        }
    }

    fn pooling(&self) -> Option<Pooling> {
        match self {
            Self::Generation(_) => None,
            Self::Embedding(embedder) => Some(embedder.handle.pooling()),
        }
    }

    fn stop(self, drain: bool) {
        match self {
            Self::Generation(engine) => engine.stop(drain),
            Self::Embedding(embedder) => embedder.stop(drain),
        }
    }
}

/// Creates the context and starts the thread that owns it: the embedder for an embedding
/// worker, else the generation engine (an adaptive one with its shaper). Returns it with the
/// outbox its replies go to.
fn start_service(
    args: &WorkerArgs,
    config: &ContextConfig,
    model: Model,
) -> Result<(Running, ipc::Outbox)> {
    if let Some(pooling) = args.embedding {
        let embedder = model.new_embedder(config, pooling)?;
        tracing::info!(pooling = %embedder.pooling(), "serving embeddings");
        let outbox = ipc::outbox();
        let out = outbox.0.clone();
        let sink: FrameSink = Box::new(move |frame| {
            let _ = out.send(ipc::Outgoing::Frame(frame));
        });
        let running = RunningEmbedder::spawn(embedder, sink)?;
        return Ok((Running::Embedding(running), outbox));
    }
    let backend = model.new_backend(config)?;
    let shaper = args.wide.clone().map(|wide| {
        let home = args.cpus.clone().unwrap_or_else(CpuList::allowed);
        let router = u32::try_from(nix::unistd::getppid().as_raw()).unwrap_or(0);
        Shaper::new(home, wide, router)
    });
    let (engine, outbox) = ipc::spawn_engine(backend, shaper)?;
    Ok((Running::Generation(engine), outbox))
}
