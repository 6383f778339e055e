//! The worker's command line: the clap parser of what [`WorkerArgs::to_args`] writes (the
//! router and the bench build worker command lines only through it), with its defaults taken
//! from [`ContextConfig::default`]. `main` parses it and turns it into a [`WorkerArgs`].

use std::ffi::OsStr;
use std::path::PathBuf;

use clap::Parser;
use llamapool_common::cpus::CpuList;
use llamapool_common::worker::{ContextConfig, FlashAttention, Pooling, WideShape, WorkerArgs};

/// The environment variable in which the router gives a worker its own pid, so that the
/// worker can tell whether its parent is still the router (see [`check_parent`]).
pub const ROUTER_PID_ENV: &str = "LLAMAPOOL_ROUTER_PID";

/// The router died before the worker's parent-death signal was set: it would never come.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParentError {
    #[error("{ROUTER_PID_ENV}={0:?} is not a process id")]
    BadPid(String),
    #[error(
        "the router (pid {router}) is gone: this worker's parent is now pid {parent}; exiting"
    )]
    RouterGone { router: i32, parent: i32 },
}

/// Checks, after `PR_SET_PDEATHSIG`, that the parent is still the router whose pid is in
/// [`ROUTER_PID_ENV`] (`expected`); without the variable (a worker started by hand or by the
/// bench) anything goes.
pub fn check_parent(expected: Option<&OsStr>, parent: i32) -> Result<(), ParentError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let text = expected.to_string_lossy();
    let router: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| ParentError::BadPid(text.clone().into_owned()))?;
    if router == parent {
        Ok(())
    } else {
        Err(ParentError::RouterGone { router, parent })
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "llamapool-worker",
    version,
    about = "A llamapool worker process (normally started by llamapool-router)"
)]
pub struct Cli {
    /// Unix socket path to listen on once ready.
    #[arg(long)]
    pub socket: PathBuf,
    /// GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Chat template name or text, for models without one.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// CPUs to pin to, e.g. "0-3,8".
    #[arg(long, value_parser = CpuList::parse)]
    pub cpus: Option<CpuList>,
    /// GPU index: sets CUDA_VISIBLE_DEVICES for this process (needs a `cuda` build).
    #[arg(long)]
    pub gpu: Option<u32>,
    /// Layers offloaded to the GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu_layers: u32,
    /// ggml threads (default: the number of pinned CPUs).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Concurrent sequences.
    #[arg(long, default_value_t = ContextConfig::default().slots)]
    pub slots: u32,
    /// KV cells in total.
    #[arg(long, default_value_t = ContextConfig::default().context)]
    pub context: u32,
    /// Most tokens per decode call.
    #[arg(long, default_value_t = ContextConfig::default().n_batch)]
    pub n_batch: u32,
    /// Most tokens per compute pass.
    #[arg(long, default_value_t = ContextConfig::default().n_ubatch)]
    pub n_ubatch: u32,
    /// auto, on or off.
    #[arg(long, default_value_t = ContextConfig::default().flash_attention)]
    pub flash_attention: FlashAttention,
    /// One KV buffer shared by all sequences (true) or one stream per sequence (false).
    #[arg(long, default_value_t = ContextConfig::default().kv_unified, action = clap::ArgAction::Set)]
    pub kv_unified: bool,
    /// Adaptive width: the CPUs to spread over while nothing else keeps them busy (`--cpus` is
    /// then the one CPU to narrow to, with one thread).
    #[arg(long, value_parser = CpuList::parse)]
    pub wide_cpus: Option<CpuList>,
    /// Threads while wide (default: the number of wide CPUs).
    #[arg(long, requires = "wide_cpus")]
    pub wide_threads: Option<u32>,
    /// Serve embeddings with this pooling instead of generating.
    #[arg(long, conflicts_with = "wide_cpus")]
    pub embedding: Option<Pooling>,
}

impl Cli {
    /// What the worker was asked to be; `threads` defaults to `pinned_cpus`, the number of
    /// CPUs it runs on.
    pub fn into_worker_args(self, pinned_cpus: usize) -> WorkerArgs {
        let threads = self
            .threads
            .unwrap_or_else(|| u32::try_from(pinned_cpus.max(1)).unwrap_or(u32::MAX));
        let wide = self.wide_cpus.map(|cpus| WideShape {
            threads: self
                .wide_threads
                .unwrap_or_else(|| u32::try_from(cpus.len().max(1)).unwrap_or(u32::MAX)),
            cpus,
        });
        WorkerArgs {
            wide,
            embedding: self.embedding,
            socket: self.socket,
            model: self.model,
            chat_template: self.chat_template,
            cpus: self.cpus,
            gpu: self.gpu,
            gpu_layers: self.gpu_layers,
            context: ContextConfig {
                slots: self.slots,
                context: self.context,
                n_batch: self.n_batch,
                n_ubatch: self.n_ubatch,
                threads,
                kv_unified: self.kv_unified,
                flash_attention: self.flash_attention,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[std::ffi::OsString]) -> WorkerArgs {
        let argv = std::iter::once("llamapool-worker".into()).chain(args.iter().cloned());
        Cli::try_parse_from(argv)
            .expect("the worker parses what to_args writes")
            .into_worker_args(1)
    }

    #[test]
    fn to_args_round_trips_through_the_parser() {
        let full = WorkerArgs {
            socket: "/run/llamapool/worker-3.sock".into(),
            model: "/models/a model.gguf".into(),
            chat_template: Some("-{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            cpus: Some(CpuList::parse("0-3,8").unwrap()),
            gpu: Some(1),
            gpu_layers: 999,
            context: ContextConfig {
                slots: 3,
                context: 3000,
                n_batch: 64,
                n_ubatch: 32,
                threads: 5,
                kv_unified: false,
                flash_attention: FlashAttention::Off,
            },
            wide: Some(WideShape {
                cpus: CpuList::parse("0-9").unwrap(),
                threads: 7,
            }),
            embedding: None,
        };
        assert_eq!(parse(&full.to_args()), full);
        let minimal = WorkerArgs {
            chat_template: None,
            cpus: None,
            gpu: None,
            gpu_layers: 0,
            context: ContextConfig {
                flash_attention: FlashAttention::On,
                ..ContextConfig::default()
            },
            wide: None,
            ..full
        };
        assert_eq!(parse(&minimal.to_args()), minimal);
        let embedding = WorkerArgs {
            embedding: Some(Pooling::Mean),
            ..minimal
        };
        assert_eq!(parse(&embedding.to_args()), embedding);
    }

    #[test]
    fn flag_defaults_are_the_context_defaults() {
        let cli = Cli::try_parse_from(["llamapool-worker", "--socket", "s", "--model", "m"])
            .expect("socket and model are enough");
        let args = cli.into_worker_args(1);
        assert_eq!(args.context, ContextConfig::default());
        assert_eq!((args.gpu, args.gpu_layers, args.cpus), (None, 0, None));
        let threads = Cli::try_parse_from(["llamapool-worker", "--socket=s", "--model=m"])
            .unwrap()
            .into_worker_args(6)
            .context
            .threads;
        assert_eq!(threads, 6, "threads default to the pinned CPUs");
    }

    #[test]
    fn the_parent_must_be_the_router_named_in_the_environment() {
        let env = |v: &str| Some(OsStr::new(v).to_owned());
        assert_eq!(check_parent(None, 1), Ok(()), "no router named: any parent");
        assert_eq!(check_parent(env("4242").as_deref(), 4242), Ok(()));
        assert_eq!(
            check_parent(env("4242").as_deref(), 1),
            Err(ParentError::RouterGone {
                router: 4242,
                parent: 1
            })
        );
        for bad in ["", "x", "-3", "0"] {
            assert_eq!(
                check_parent(env(bad).as_deref(), 1),
                Err(ParentError::BadPid(bad.into()))
            );
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in ["--flash-attention=maybe", "--cpus=3-1", "--kv-unified=yes"] {
            assert!(
                Cli::try_parse_from(["llamapool-worker", "--socket=s", "--model=m", bad]).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
