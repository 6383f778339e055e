//! `llamapool-worker`: one pinned process, one model, one llama.cpp context.
//!
//! Started by the router (one per `[[workers]]` entry). Pins itself before any thread exists,
//! loads the model, starts the engine, and only then binds its Unix socket, so a socket that
//! exists means a worker that is ready. It serves exactly one router connection and exits
//! when that connection closes (or its parent dies).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use llamapool_common::cpus::CpuList;
use llamapool_common::protocol::{WorkerInfo, PROTOCOL_VERSION};
use llamapool_worker::engine::EngineHooks;
use llamapool_worker::{
    ipc, pin, ContextConfig, FlashAttention, Model, ModelOptions, RunningEngine,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A llamapool worker process (normally started by llamapool-router)"
)]
struct Args {
    /// Unix socket path to listen on once ready.
    #[arg(long)]
    socket: PathBuf,
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// Chat template name or text, for models without one.
    #[arg(long)]
    chat_template: Option<String>,
    /// CPUs to pin to, e.g. "0-3,8".
    #[arg(long)]
    cpus: Option<String>,
    /// ggml threads (default: the number of pinned CPUs).
    #[arg(long)]
    threads: Option<u32>,
    #[arg(long, default_value_t = ContextConfig::default().slots)]
    slots: u32,
    /// KV cells in total.
    #[arg(long, default_value_t = ContextConfig::default().context)]
    context: u32,
    #[arg(long, default_value_t = ContextConfig::default().n_batch)]
    n_batch: u32,
    #[arg(long, default_value_t = ContextConfig::default().n_ubatch)]
    n_ubatch: u32,
    #[arg(long, default_value = "auto")]
    flash_attention: FlashAttention,
    /// One KV buffer shared by all sequences (true) or one stream per sequence (false).
    #[arg(long, default_value_t = ContextConfig::default().kv_unified, action = clap::ArgAction::Set)]
    kv_unified: bool,
    #[arg(long, default_value_t = 0)]
    gpu_layers: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Pin first: every thread started from here on (tracing, llama.cpp's) inherits the mask.
    let pinned = match &args.cpus {
        Some(list) => match CpuList::parse(list)
            .map_err(anyhow::Error::from)
            .and_then(|cpus| {
                pin::pin_to(&cpus).with_context(|| format!("pinning to CPUs {cpus}"))?;
                Ok(cpus)
            }) {
            Ok(cpus) => cpus,
            Err(e) => {
                eprintln!("llamapool-worker: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => CpuList::allowed(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,llamapool_worker=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A panic is a bug in an invariant; a worker with a dead engine thread would accept and
    // never answer, so end the process: the router sees EOF, moves the requests, respawns.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    // Die with the router: no orphan workers even if it is killed with SIGKILL.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    match run(&args, &pinned) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("llamapool-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn run(args: &Args, pinned: &CpuList) -> Result<()> {
    let threads = args.threads.unwrap_or(u32::try_from(pinned.len().max(1))?);
    let model = Model::load(
        &args.model,
        &ModelOptions {
            gpu_layers: args.gpu_layers,
            chat_template: args.chat_template.clone(),
        },
    )?;
    let config = ContextConfig {
        slots: args.slots,
        context: args.context,
        n_batch: args.n_batch,
        n_ubatch: args.n_ubatch,
        threads,
        kv_unified: args.kv_unified,
        flash_attention: args.flash_attention,
    };
    let backend = model.new_backend(&config)?;
    let outbox = ipc::outbox();
    let engine = RunningEngine::spawn_with(
        backend,
        EngineHooks {
            on_start: None,
            on_iteration_end: Some(ipc::flush_hook(&outbox.0)),
        },
    )?;
    let limits = engine.handle.limits();
    let info = WorkerInfo {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        cpus: pinned.cpus().to_vec(),
        threads,
        slots: args.slots,
        n_ctx_per_seq: u32::try_from(limits.n_ctx_per_seq)?,
        model: model.info().clone(),
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
    tracing::info!(socket = %args.socket.display(), cpus = %pinned, threads, slots = args.slots, "worker ready");
    let conn = listener
        .accept()
        .context("accepting the router's connection")?;
    drop(listener); // one router, one connection: nobody else may connect
    let conn = Arc::new(conn);
    let result = ipc::serve(
        SharedStream(conn.clone()),
        SharedStream(conn),
        outbox,
        model,
        &engine.handle,
        &info,
    );
    engine.stop(false);
    let _ = std::fs::remove_file(&args.socket);
    result.context("serving the router connection")
}
