//! What one worker process is: the shape of its llama.cpp context ([`ContextConfig`], checked
//! by [`ContextConfig::validate`]) and its command line ([`WorkerArgs`]).
//!
//! The router plans workers into these (`settings::WorkerPlan::worker_args`) and starts each
//! with [`WorkerArgs::to_args`]; the worker parses that command line back (its clap parser
//! takes its defaults from [`ContextConfig::default`]) and validates the context before
//! creating it. The bench starts workers the same way. Plain data; nothing here names
//! llama.cpp.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cpus::CpuList;

/// Flash-attention policy of the context (llama-server's `-fa`); `auto`, `on` or `off` in
/// configuration files and on the worker's command line.
///
/// (De)serialized as that text through [`FromStr`](std::str::FromStr), so a bad value reads
/// the same from a file, the environment or a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum FlashAttention {
    /// llama.cpp decides per device (on for CPU); llama-server's default.
    #[default]
    Auto,
    On,
    Off,
}

/// A flash-attention policy that is not `auto`, `on` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flash_attention must be auto, on or off, got {0:?}")]
pub struct UnknownFlashAttention(pub String);

impl FlashAttention {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = UnknownFlashAttention;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(UnknownFlashAttention(other.to_string())),
        }
    }
}

impl TryFrom<String> for FlashAttention {
    type Error = UnknownFlashAttention;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<FlashAttention> for &'static str {
    fn from(policy: FlashAttention) -> Self {
        policy.as_str()
    }
}

impl fmt::Display for FlashAttention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an embedding worker turns a sequence's token embeddings into its result (llama-server's
/// `--pooling`): `none` (one vector per token), `mean`, `cls` (the first token's), `last`, or
/// `rank` (a ranking model's score, for `/v1/rerank`); `model` keeps the GGUF's own choice.
/// In configuration files and on the worker's command line as that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Pooling {
    /// What the model's metadata says (`<arch>.pooling_type`); llama-server's default.
    #[default]
    Model,
    None,
    Mean,
    Cls,
    Last,
    Rank,
}

/// A pooling name that is not one of [`Pooling`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pooling must be model, none, mean, cls, last or rank, got {0:?}")]
pub struct UnknownPooling(pub String);

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::None => "none",
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Last => "last",
            Self::Rank => "rank",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = UnknownPooling;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "model" | "unspecified" => Ok(Self::Model),
            "none" => Ok(Self::None),
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            "last" => Ok(Self::Last),
            "rank" => Ok(Self::Rank),
            other => Err(UnknownPooling(other.to_string())),
        }
    }
}

impl TryFrom<String> for Pooling {
    type Error = UnknownPooling;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Pooling> for &'static str {
    fn from(pooling: Pooling) -> Self {
        pooling.as_str()
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape of one worker's context. Its `Default` is the default of every configuration
/// layer: `worker_defaults` in the router's settings and the worker's own flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextConfig {
    /// Concurrent sequences (`n_seq_max`).
    pub slots: u32,
    /// KV cells in total; each sequence may hold `context / slots` of them.
    pub context: u32,
    /// Most tokens per decode call.
    pub n_batch: u32,
    /// Most tokens per physical compute step (the backend uses at most `n_batch`).
    pub n_ubatch: u32,
    /// ggml threads for decoding and prompt processing.
    pub threads: u32,
    /// One KV buffer for all sequences instead of one stream per sequence. Measured 1.5× the
    /// decode throughput of split streams with 8 sequences (docs/PERFORMANCE.md).
    pub kv_unified: bool,
    pub flash_attention: FlashAttention,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            slots: 16,
            context: 16384,
            n_batch: 512,
            n_ubatch: 512,
            threads: 1,
            kv_unified: true,
            flash_attention: FlashAttention::Auto,
        }
    }
}

/// Most sequences of one context.
pub const MAX_SLOTS: u32 = 256;

/// Most ggml threads of one context (llama.cpp takes them as an `i32`).
pub const MAX_THREADS: u32 = i32::MAX as u32;

/// A [`ContextConfig`] that cannot work; [`ContextError::field`] names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("threads must be between 1 and {MAX_THREADS}, got {0}")]
    Threads(u32),
    #[error("slots must be between 1 and {MAX_SLOTS}, got {0}")]
    Slots(u32),
    #[error("context ({context}) must hold at least one cell per slot ({slots})")]
    Context { context: u32, slots: u32 },
    #[error("n_batch ({n_batch}) must be at least slots ({slots}) so every sequence can decode each step")]
    NBatch { n_batch: u32, slots: u32 },
    #[error("n_ubatch must be at least 1")]
    NUbatch,
}

impl ContextError {
    /// The [`ContextConfig`] field (and configuration key) at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Threads(_) => "threads",
            Self::Slots(_) => "slots",
            Self::Context { .. } => "context",
            Self::NBatch { .. } => "n_batch",
            Self::NUbatch => "n_ubatch",
        }
    }
}

impl ContextConfig {
    /// The only check of these fields: the router's plan and the worker both call it.
    pub fn validate(&self) -> Result<(), ContextError> {
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(ContextError::Threads(self.threads));
        }
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return Err(ContextError::Slots(self.slots));
        }
        if self.context < self.slots {
            return Err(ContextError::Context {
                context: self.context,
                slots: self.slots,
            });
        }
        if self.n_batch < self.slots {
            return Err(ContextError::NBatch {
                n_batch: self.n_batch,
                slots: self.slots,
            });
        }
        if self.n_ubatch == 0 {
            return Err(ContextError::NUbatch);
        }
        Ok(())
    }
}

/// Everything a worker process is started with: the one description of its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// Unix socket the worker binds once ready.
    pub socket: PathBuf,
    /// GGUF model file.
    pub model: PathBuf,
    /// Chat template name or text, for models without one.
    pub chat_template: Option<String>,
    /// CPUs the worker pins itself to; none: wherever it was started.
    pub cpus: Option<CpuList>,
    /// The GPU the worker may see (it sets `CUDA_VISIBLE_DEVICES` for itself).
    pub gpu: Option<u32>,
    /// Layers offloaded to the GPU.
    pub gpu_layers: u32,
    pub context: ContextConfig,
    /// Set for an adaptive worker: the shape it takes while it has its CPUs to itself.
    pub wide: Option<WideShape>,
    /// Set for an embedding worker (its context computes embeddings with this pooling, and
    /// it generates nothing).
    pub embedding: Option<Pooling>,
}

/// An adaptive worker's wide shape: while nothing else keeps its CPUs busy, it runs
/// `threads` threads over `cpus`; as soon as something does (a neighbour process, another
/// worker), it narrows to one thread on its own [`WorkerArgs::cpus`], and widens again once
/// the CPUs are free. The worker's `shape` module measures and switches; the router packs
/// requests onto a wide worker while it has free slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WideShape {
    pub cpus: CpuList,
    pub threads: u32,
}

impl WorkerArgs {
    /// The worker's arguments (without the program name), every value as `--flag=value` so
    /// that none is taken for a flag (a template text may start with `-`).
    pub fn to_args(&self) -> Vec<OsString> {
        fn flag(name: &str, value: impl Into<OsString>) -> OsString {
            let mut arg = OsString::from(format!("--{name}="));
            arg.push(value.into());
            arg
        }
        let c = &self.context;
        let mut args = vec![flag("socket", &self.socket), flag("model", &self.model)];
        if let Some(template) = &self.chat_template {
            args.push(flag("chat-template", template));
        }
        if let Some(cpus) = &self.cpus {
            args.push(flag("cpus", cpus.to_string()));
        }
        if let Some(gpu) = self.gpu {
            args.push(flag("gpu", gpu.to_string()));
        }
        args.extend([
            flag("gpu-layers", self.gpu_layers.to_string()),
            flag("threads", c.threads.to_string()),
            flag("slots", c.slots.to_string()),
            flag("context", c.context.to_string()),
            flag("n-batch", c.n_batch.to_string()),
            flag("n-ubatch", c.n_ubatch.to_string()),
            flag("flash-attention", c.flash_attention.as_str()),
            flag("kv-unified", c.kv_unified.to_string()),
        ]);
        if let Some(pooling) = self.embedding {
            args.push(flag("embedding", pooling.as_str()));
        }
        if let Some(wide) = &self.wide {
            args.push(flag("wide-cpus", wide.cpus.to_string()));
            args.push(flag("wide-threads", wide.threads.to_string()));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_attention_round_trips_through_text() {
        for fa in [
            FlashAttention::Auto,
            FlashAttention::On,
            FlashAttention::Off,
        ] {
            assert_eq!(fa.to_string().parse::<FlashAttention>(), Ok(fa));
        }
        assert_eq!(
            "maybe".parse::<FlashAttention>(),
            Err(UnknownFlashAttention("maybe".into()))
        );
    }

    #[test]
    fn validate_names_the_field() {
        let ok = ContextConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let field = |c: ContextConfig| c.validate().unwrap_err().field();
        assert_eq!(field(ContextConfig { threads: 0, ..ok }), "threads");
        assert_eq!(field(ContextConfig { slots: 0, ..ok }), "slots");
        assert_eq!(field(ContextConfig { slots: 257, ..ok }), "slots");
        assert_eq!(field(ContextConfig { context: 4, ..ok }), "context");
        assert_eq!(field(ContextConfig { n_batch: 4, ..ok }), "n_batch");
        assert_eq!(field(ContextConfig { n_ubatch: 0, ..ok }), "n_ubatch");
        // n_ubatch above n_batch is fine: the backend clamps it.
        assert_eq!(
            ContextConfig {
                n_ubatch: 4096,
                ..ok
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn to_args_writes_every_field_as_flag_equals_value() {
        let args = WorkerArgs {
            socket: "/run/w.sock".into(),
            model: "m.gguf".into(),
            chat_template: Some("-{{ odd }}".into()),
            cpus: Some(CpuList::parse("0-3,8").unwrap()),
            gpu: Some(1),
            gpu_layers: 99,
            context: ContextConfig {
                flash_attention: FlashAttention::Off,
                kv_unified: false,
                ..ContextConfig::default()
            },
            wide: None,
            embedding: Some(Pooling::Last),
        }
        .to_args();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--socket=/run/w.sock",
                "--model=m.gguf",
                "--chat-template=-{{ odd }}",
                "--cpus=0-3,8",
                "--gpu=1",
                "--gpu-layers=99",
                "--threads=1",
                "--slots=16",
                "--context=16384",
                "--n-batch=512",
                "--n-ubatch=512",
                "--flash-attention=off",
                "--kv-unified=false",
                "--embedding=last",
            ]
        );
    }
}
