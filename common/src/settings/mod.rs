//! The configuration as plain data: deserialized by the router from TOML, environment and
//! flags through the `config` crate, and read by the workers only for [`LogFormat`].
//!
//! Keys: `server.*`, `model.*`, `worker_defaults.*`, `generation.*`, and one `[[workers]]`
//! table per worker (each key of `worker_defaults` may be overridden per worker). Without
//! `[[workers]]`, the pool is one worker per allowed CPU, pinned to it, with one thread.
//!
//! This module owns the setting types, their defaults and [`SettingsError`]. The pure
//! functions over them live beside it: [`access`] (API and admin keys, CORS origins, allowed
//! hosts) and [`plan`] (the checks that turn the settings into one [`WorkerPlan`] per worker).
//! Their public items are re-exported here, so `settings::X` names every one.

pub mod access;
pub mod models;
pub mod plan;

pub use access::{is_local_origin, parse_api_key_file, parse_cors_origin, LOCALHOST_ORIGINS};
pub use models::{ModelEntry, ModelPlan};
pub use plan::WorkerPlan;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::worker::{ContextConfig, FlashAttention, Pooling};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub worker_defaults: WorkerDefaults,
    pub workers: Vec<WorkerSettings>,
    /// Server-wide defaults for generation requests that leave a field out.
    pub generation: GenerationDefaults,
    /// Several models in one pool (`[[models]]`), routed by a request's `model`, loaded on
    /// demand; empty: the one model of `[model]`, `[worker_defaults]` and `[[workers]]`.
    pub models: Vec<ModelEntry>,
    /// Not a configuration key: the cgroup CPU quota in whole CPUs, read by the router when it
    /// loads the configuration (`crate::cpus::cgroup_cpu_quota`). A container with a CPU limit
    /// but no CPU set of its own (Kubernetes without the static CPU manager, `docker run
    /// --cpus`) may run on every CPU of the machine and use only this many.
    #[serde(skip)]
    pub cpu_quota: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP server binds (`HOST:PORT`); several separated by commas are all
    /// bound and served alike ([`ServerSettings::listen_addresses`]).
    pub listen: String,
    /// An API key; with any key configured (this, `api_keys` or `api_key_file`), every route
    /// but `/health` and the web page needs one of them (`Authorization: Bearer <key>` or
    /// `X-Api-Key: <key>`).
    pub api_key: Option<String>,
    /// More API keys. From the environment or `--set`, one comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line; blank lines and lines starting with `#` are ignored.
    /// Read at start-up (see [`ServerSettings::api_keys`]).
    pub api_key_file: Option<PathBuf>,
    /// Keys of the admin routes (`/admin/...`: drain, restart, reload), separate from the
    /// API keys: with any admin key set (this or `admin_api_key_file`), an admin route takes
    /// only an admin key, and an API key does not open it. An admin key also opens every other
    /// route. Without one, the admin routes are served to loopback clients only, and only to
    /// requests a web page cannot send without a preflight (see `docs/API.md`). From the
    /// environment or `--set`, one comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub admin_api_keys: Vec<String>,
    /// A file of admin keys, in the format of `api_key_file`. Read at start-up.
    pub admin_api_key_file: Option<PathBuf>,
    /// Host names (the `Host` header, port optional: `name` or `name:port`) that requests to a
    /// loopback address may name, beyond `localhost`, `127.0.0.1`, `[::1]` and the listen
    /// addresses; `"*"` allows any. A request to a loopback address naming another host is a
    /// 403 (DNS rebinding: a web page whose name resolves to 127.0.0.1). Requests to other
    /// addresses are not checked. From the environment or `--set`, one comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose web pages may call the API (CORS). Empty, the
    /// default, allows every origin, as llama-server does; `"*"` in the list does too. From the
    /// environment or `--set`, one comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub cors_origins: Vec<String>,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// Requests allowed to wait beyond the pool's slots before 429.
    pub max_queued: usize,
    /// How long a worker may take from spawn to `Ready`.
    pub ready_timeout_secs: u64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub drain_timeout_secs: u64,
    /// On SIGTERM (or `POST /admin/drain`), how long the server goes on accepting and serving
    /// new requests while `/health` already answers 503, so that a load balancer or gateway
    /// polling `/health` stops sending before the listeners close. Ends early once a probe has
    /// been answered 503 and no request has been in flight for a second since. SIGINT (Ctrl-C)
    /// skips it. 0: close at once.
    pub drain_notice_secs: u64,
    /// `GET /metrics` without an API key even when keys are set: for an endpoint picker (the
    /// Inference Extension's scrapes `/metrics` and sends no key) or a Prometheus inside the
    /// cluster, while inference keeps its keys. The metrics hold counts and model names only.
    pub public_metrics: bool,
    /// Idle time after which an SSE comment keeps a quiet stream alive.
    pub keepalive_secs: u64,
    /// tokio worker threads of the router; 0: one per allowed CPU, at most 2 (the router's
    /// work is light, and every busy router thread takes a core from a worker).
    pub runtime_threads: usize,
    /// The worker executable (default: `llamapool-worker` next to the router's).
    pub worker_binary: Option<PathBuf>,
    /// Where worker sockets live (default: a fresh private directory under $XDG_RUNTIME_DIR or /tmp).
    pub runtime_dir: Option<PathBuf>,
    /// Most tokens `/tokenize` returns (and `/detokenize` takes); a bigger result is a 400
    /// naming the field, refused before any JSON is built. 131072 is 128 Ki tokens, more than
    /// any context served, about 4 MB of `with_pieces` JSON.
    pub max_tokenize_tokens: usize,
    /// A client must send a complete request head within this many seconds of connecting, or
    /// of the end of its previous response (HTTP/1 keep-alive); else the connection is closed
    /// (slowloris).
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this many seconds is closed (HTTP/1 and
    /// HTTP/2). An idle HTTP/1 connection is also waiting for a request head, so it is closed
    /// after the smaller of this and `header_read_timeout_secs`.
    pub idle_timeout_secs: u64,
    /// Open client connections at most; at the cap the router stops accepting (new
    /// connections wait in the kernel's listen backlog) until one closes.
    pub max_connections: usize,
    /// A request body must be read whole within this many seconds of the handler starting to
    /// read it; else 408 and the connection is closed (a body trickled byte by byte).
    pub body_read_timeout_secs: u64,
    /// Most HTTP/2 streams (requests) open at once on one connection (h2c).
    pub max_h2_streams: u32,
    /// Most bytes of request bodies being read or held at once, over every connection; a body
    /// that would go beyond gets 503 with `Retry-After`. At least `max_body_bytes`.
    pub max_buffered_body_bytes: usize,
    /// A response whose client accepts no bytes for this many seconds is aborted: a stream
    /// stops its generation and frees its slot and admission permit, and the connection is
    /// closed.
    pub write_timeout_secs: u64,
    /// A worker that has work but completes no engine step for this long, or answers nothing
    /// (no progress, no ping reply) for this long, is hung: it is killed and its requests
    /// move on. The default covers the longest legal step with a wide margin: a full 512-token
    /// prefill of a 7–8B Q4 model on one slow core runs at ~20 tokens/s, about 25 s.
    pub hang_timeout_secs: u64,
    /// This many failed starts in a row (a worker that exits before `Ready`, or dies before
    /// it served: no step and up less than 5 s), within `crash_loop_window_secs`, mark the
    /// worker `failed`; it is then retried every `failed_retry_secs`. A worker that served is
    /// restarted at once however often it is killed, and kills from outside (SIGKILL, the OOM
    /// killer) never count.
    pub crash_loop_deaths: usize,
    pub crash_loop_window_secs: u64,
    pub failed_retry_secs: u64,
    /// A request the poison policy blames for workers' deaths is ended with a 500, and
    /// requests identical to it (same prompt and parameters) are refused for this long.
    pub poison_ttl_secs: u64,
    /// How the router and its workers write their log lines to stderr: `text` or `json`.
    /// Read at start-up only (`/admin/reload` does not change it).
    pub log_format: LogFormat,
    /// Prefix-affinity routing: a request goes to the worker whose prompt cache most likely
    /// holds the longest prefix of its prompt (multi-turn chats keep hitting their cache);
    /// false: always the least-loaded worker.
    pub prefix_affinity: bool,
    /// With `prefix_affinity`, the worker holding a prefix is passed over for the
    /// least-loaded one when it has more than this many requests in flight beyond it.
    pub affinity_max_load_gap: usize,
    /// Running requests move between live adaptive workers when the machine changes under
    /// them: onto the first worker when the CPUs are quiet again (so it runs wide), shared
    /// over the narrow workers when a neighbour crowds them. They continue from the tokens
    /// they generated. False: a request stays where it was placed until it ends.
    pub rebalance: bool,
    /// `GET /slots` is served; false answers it 501, as llama-server started with `--no-slots`.
    pub slots_endpoint: bool,
    /// With several models (`[[models]]`, `models_dir`, `models_preset`): most models loaded at
    /// once (llama-server's `--models-max`); loading another first unloads the least recently
    /// used idle one. 0: no limit but the memory budget.
    pub models_max: usize,
    /// With several models: the memory (MiB) the loaded models' weights and KV caches may
    /// take, estimated from each GGUF before it loads; loading one that does not fit first
    /// unloads least recently used idle models. 0: 90% of this machine's memory.
    pub models_memory_mib: u64,
    /// With several models: a request for a model that is not loaded loads it (false:
    /// llama-server's `--no-models-autoload`, only `POST /models/load` does).
    pub models_autoload: bool,
    /// With several models: how long a request waits for its model to load (including
    /// waiting for a busy model to finish so that it can be unloaded) before a 503 with
    /// `Retry-After`; the load itself goes on.
    pub model_load_timeout_secs: u64,
    /// Every `*.gguf` file in this directory is a model named after its file without the
    /// extension (llama-server's `--models-dir`).
    pub models_dir: Option<PathBuf>,
    /// llama-server's `--models-preset`: an INI file, one section per model (see
    /// docs/CONFIGURATION.md).
    pub models_preset: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            api_key: None,
            api_keys: Vec::new(),
            api_key_file: None,
            admin_api_keys: Vec::new(),
            admin_api_key_file: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
            max_queued: 256,
            ready_timeout_secs: 300,
            drain_timeout_secs: 30,
            drain_notice_secs: 5,
            public_metrics: false,
            keepalive_secs: 10,
            runtime_threads: 0,
            worker_binary: None,
            runtime_dir: None,
            max_tokenize_tokens: 128 * 1024,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 1024,
            body_read_timeout_secs: 30,
            max_h2_streams: 32,
            max_buffered_body_bytes: 64 * 1024 * 1024,
            write_timeout_secs: 60,
            hang_timeout_secs: 60,
            crash_loop_deaths: 5,
            crash_loop_window_secs: 300,
            failed_retry_secs: 60,
            poison_ttl_secs: 600,
            log_format: LogFormat::Text,
            prefix_affinity: true,
            slots_endpoint: true,
            affinity_max_load_gap: 2,
            rebalance: true,
            models_max: 4,
            models_memory_mib: 0,
            models_autoload: true,
            model_load_timeout_secs: 120,
            models_dir: None,
            models_preset: None,
        }
    }
}

/// The environment variable through which the router gives its workers `server.log_format`
/// (they inherit it; a worker started by hand may set it too).
pub const LOG_FORMAT_ENV: &str = "LLAMAPOOL_LOG_FORMAT";

/// How log lines are written (`server.log_format`). Text has colours only on a terminal;
/// JSON is one object per line, never coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A log format that is not `text` or `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log_format must be text or json, got {0:?}")]
pub struct UnknownLogFormat(pub String);

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(UnknownLogFormat(other.to_string())),
        }
    }
}

impl TryFrom<String> for LogFormat {
    type Error = UnknownLogFormat;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LogFormat> for &'static str {
    fn from(format: LogFormat) -> Self {
        format.as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A GGUF file; a relative path not found from the working directory is looked up in
    /// the setup cache (`$LLAMAPOOL_MODELS`, default `~/.cache/llamapool/models`).
    pub path: PathBuf,
    /// The model name clients use and `/v1/models` lists; several names separated by commas
    /// (llama-server's `--alias a,b`), of which the first in alphabetical order is the one
    /// responses report ([`ModelSettings::names`]).
    pub alias: String,
    /// Informational labels `/v1/models` lists (llama-server's `--tags`); a list or a
    /// comma-separated string.
    #[serde(deserialize_with = "list_or_commas")]
    pub tags: Vec<String>,
    /// A llama.cpp built-in template name or template text, for models without one.
    pub chat_template: Option<String>,
    /// When true, a request's `model` must equal `alias` (404 otherwise); when false (the
    /// default, llama-server's behaviour) any name is accepted and answered as `alias`.
    pub strict_name: bool,
    /// How embedding workers pool a sequence's token embeddings (llama-server's `--pooling`):
    /// `model` (the GGUF's choice), `none`, `mean`, `cls`, `last` or `rank`.
    pub pooling: Pooling,
}

impl ModelSettings {
    /// The names the model is served under: `alias` split at commas, trimmed, sorted and
    /// without duplicates, as llama-server keeps its aliases; the first is the name responses
    /// report. Empty only for an empty alias, which [`Settings::plan_workers`] refuses.
    pub fn names(&self) -> Vec<String> {
        let mut names = split_commas(&self.alias);
        names.sort();
        names.dedup();
        names
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("SmolLM2-135M-Instruct.Q4_1.gguf"),
            alias: "smollm2-135m-instruct".into(),
            tags: Vec::new(),
            chat_template: None,
            strict_name: false,
            pooling: Pooling::Model,
        }
    }
}

/// `[generation]`: values a generation request gets for the fields it leaves out, on every
/// endpoint (OpenAI's and llama-server's native ones), and shown by `/props` as
/// `default_generation_settings`. A key left out keeps the built-in default
/// (`SamplingParams::default()`; no token limit). llama-server's flags map onto them:
/// `-n` → `n_predict`, `--temp` → `temperature`, `--seed` → `seed`, `--top-k` → `top_k`,
/// `--top-p` → `top_p`, `--min-p` → `min_p`, `--repeat-penalty` → `repeat_penalty`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Tokens to generate (`max_tokens`, `n_predict`); -1 or absent: until the context is full.
    pub n_predict: Option<i64>,
    pub temperature: Option<f32>,
    /// -1 or absent: a random seed per request.
    pub seed: Option<i64>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// Where a chat answer's reasoning goes (llama-server's `--reasoning-format`): `none`
    /// (left in the content), `auto` or `deepseek` (`reasoning_content`, the default), or
    /// `deepseek-legacy`. A request's `reasoning_format` decides over it.
    pub reasoning_format: Option<String>,
    /// Whether templates that can think are asked to (llama-server's `--reasoning`): `on`,
    /// `off`, or `auto` (the default: the template's own default). A request's
    /// `chat_template_kwargs.enable_thinking` decides over it.
    pub reasoning: Option<String>,
    /// Whether earlier assistant turns keep their reasoning in the prompt (llama-server's
    /// `--reasoning-preserve`, default `true`): the template argument `preserve_reasoning`.
    pub reasoning_preserve: Option<bool>,
    /// The default of a request's `verbose` (llama-server's `--verbose`): a non-streamed
    /// OpenAI-shaped result also carries `__verbose`.
    pub verbose: Option<bool>,
}

impl GenerationDefaults {
    /// `reasoning_format`, the default `deepseek` when absent.
    pub fn reasoning_format(&self) -> crate::protocol::ReasoningFormat {
        self.reasoning_format
            .as_deref()
            .and_then(crate::protocol::ReasoningFormat::from_name)
            .unwrap_or(crate::protocol::ReasoningFormat::Deepseek)
    }

    /// `reasoning` as the template argument it sets: `Some(true)` for `on`, `Some(false)` for
    /// `off`, `None` for `auto`.
    pub fn enable_thinking(&self) -> Option<bool> {
        match self.reasoning.as_deref() {
            Some("on") => Some(true),
            Some("off") => Some(false),
            _ => None,
        }
    }

    /// `n_predict` as a token limit: `None` for no limit (absent, or negative as in
    /// llama-server's `-n -1`).
    pub fn max_tokens(&self) -> Option<u32> {
        self.n_predict
            .filter(|&n| n >= 0)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// `seed` as llama.cpp takes it (its low 32 bits); `None` (absent or -1) draws one per
    /// request.
    pub fn seed(&self) -> Option<u32> {
        self.seed
            .filter(|&s| s != -1)
            .map(|s| (s as u64 & 0xffff_ffff) as u32)
    }

    /// The sampling parameters a request that gives none gets.
    pub fn sampling(&self) -> crate::SamplingParams {
        let d = crate::SamplingParams::default();
        crate::SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            seed: self.seed(),
            ..d
        }
    }

    /// The ranges requests are held to; `n_predict` 0 is refused (a request cannot ask for
    /// zero tokens either).
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.n_predict == Some(0) || self.n_predict.is_some_and(|n| n < -1) {
            return Err(bad(
                "generation.n_predict",
                "must be at least 1, or -1 for no limit",
            ));
        }
        if let Some(format) = &self.reasoning_format {
            if crate::protocol::ReasoningFormat::from_name(format).is_none() {
                return Err(bad(
                    "generation.reasoning_format",
                    "must be none, auto, deepseek or deepseek-legacy",
                ));
            }
        }
        if let Some(mode) = &self.reasoning {
            if !["on", "off", "auto"].contains(&mode.as_str()) {
                return Err(bad("generation.reasoning", "must be on, off or auto"));
            }
        }
        self.sampling()
            .validate()
            .map_err(|e| bad(format!("generation.{}", e.param), e.message))
    }
}

/// Per-worker settings that `[[workers]]` entries inherit: the [`ContextConfig`] fields except
/// `threads` (which defaults per worker to its number of CPUs), plus `gpu_layers`. The values
/// default to [`ContextConfig::default`]'s.
///
/// The keys are spelled out rather than a flattened `ContextConfig`: serde's `flatten` does
/// not work with `deny_unknown_fields`, and would make `threads` a key here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerDefaults {
    pub slots: u32,
    /// KV cells of the worker; each sequence gets `context / slots`.
    pub context: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub flash_attention: FlashAttention,
    pub kv_unified: bool,
    pub gpu_layers: u32,
    /// The default layout (no `[[workers]]`) makes each one-per-core worker adaptive: it
    /// spreads over every allowed CPU while the machine is otherwise idle (one wide context
    /// batches best) and narrows to its own core when anything else runs (independent
    /// workers keep their throughput under a noisy neighbour). docs/PERFORMANCE.md has the
    /// measurements. False: fixed one-thread pinned workers.
    pub adaptive: bool,
    /// Workers serve embeddings (`/v1/embeddings`, and `/v1/rerank` with `model.pooling =
    /// "rank"`) instead of generating: their contexts run in embedding mode, so generation
    /// and embeddings never share a batch. llama-server's `--embedding`. Set per worker in
    /// `[[workers]]` to give embeddings a pool of their own beside the generation workers.
    pub embedding: bool,
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        let c = ContextConfig::default();
        Self {
            slots: c.slots,
            context: c.context,
            n_batch: c.n_batch,
            n_ubatch: c.n_ubatch,
            flash_attention: c.flash_attention,
            kv_unified: c.kv_unified,
            gpu_layers: 0,
            adaptive: true,
            embedding: false,
        }
    }
}

/// One `[[workers]]` entry: every key left out is taken from `worker_defaults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// CPUs to pin to, as `"0-3,8"`; none means the router's whole allowed set.
    pub cpus: Option<String>,
    /// ggml threads; default: the number of pinned CPUs.
    pub threads: Option<u32>,
    pub slots: Option<u32>,
    pub context: Option<u32>,
    pub n_batch: Option<u32>,
    pub n_ubatch: Option<u32>,
    pub flash_attention: Option<FlashAttention>,
    pub kv_unified: Option<bool>,
    /// GPU index (needs a build with the `cuda` feature).
    pub gpu: Option<u32>,
    pub gpu_layers: Option<u32>,
    /// CPUs this one-thread worker may spread over (with `wide_threads` threads) while it has
    /// them to itself; it narrows back to its own `cpus` when another process or worker keeps
    /// them busy. The default layout sets it to every allowed CPU (`worker_defaults.adaptive`).
    pub wide_cpus: Option<String>,
    /// Threads in the wide shape; default: the number of `wide_cpus`.
    pub wide_threads: Option<u32>,
    /// This worker serves embeddings, not generation (see `worker_defaults.embedding`).
    pub embedding: Option<bool>,
}

/// A setting that cannot work, with the key that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key {key}: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

pub(crate) fn bad(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.into(),
        message: message.into(),
    }
}

/// A list of strings given as a list, or as one comma-separated string (what the environment
/// and `--set` can give): `"a, b,,c"` is `["a", "b", "c"]`.
pub(crate) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    struct ListOrCommas;
    impl<'de> serde::de::Visitor<'de> for ListOrCommas {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of strings or a comma-separated string")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(split_commas(text))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                items.push(item);
            }
            Ok(items)
        }
    }
    d.deserialize_any(ListOrCommas)
}

pub(crate) fn split_commas(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl ServerSettings {
    /// The addresses of `listen`, split at commas (llama-server's `--host a,b`), in order; the
    /// first is the one the start-up line names.
    pub fn listen_addresses(&self) -> Vec<String> {
        split_commas(&self.listen)
    }
}

/// Where `scripts/setup` keeps models: `$LLAMAPOOL_MODELS`, else `~/.cache/llamapool/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("LLAMAPOOL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache/llamapool/models")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpus::CpuList;

    fn allowed() -> CpuList {
        CpuList::parse("0-3").unwrap()
    }

    #[test]
    fn aliases_are_comma_separated_sorted_names() {
        let model = ModelSettings {
            alias: "tinyllama-2, fim,code,fim".into(),
            ..ModelSettings::default()
        };
        assert_eq!(model.names(), ["code", "fim", "tinyllama-2"]);
        let blank = ModelSettings {
            alias: " , ".into(),
            ..ModelSettings::default()
        };
        assert!(blank.names().is_empty());
    }

    #[test]
    fn settings_serialize_back_to_the_same_toml_keys() {
        let s = Settings {
            worker_defaults: WorkerDefaults {
                flash_attention: FlashAttention::Off,
                ..WorkerDefaults::default()
            },
            ..Settings::default()
        };
        let text = toml::to_string(&s).unwrap();
        assert!(text.contains("flash_attention = \"off\""), "{text}");
        assert_eq!(toml::from_str::<Settings>(&text).unwrap(), s);
    }

    #[test]
    fn access_lists_take_a_list_or_a_comma_separated_string() {
        let s: Settings = toml::from_str(
            "[server]\napi_keys = [\"k1\", \"k2\"]\ncors_origins = \"http://a.example, https://b.example:8443/,\"\n",
        )
        .unwrap();
        assert_eq!(s.server.api_keys, ["k1", "k2"]);
        assert_eq!(
            s.server.cors_origins,
            ["http://a.example", "https://b.example:8443/"]
        );
        s.plan_workers(&allowed()).unwrap();
        assert!(toml::from_str::<Settings>("[server]\napi_keys = 3\n").is_err());
    }

    #[test]
    fn log_format_is_text_or_json() {
        let parse = |text: &str| toml::from_str::<Settings>(text).map(|s| s.server.log_format);
        assert_eq!(parse("").unwrap(), LogFormat::Text);
        assert_eq!(
            parse("[server]\nlog_format = \"json\"").unwrap(),
            LogFormat::Json
        );
        let err = parse("[server]\nlog_format = \"yaml\"").unwrap_err();
        assert!(err.to_string().contains("text or json"), "{err}");
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.as_str().parse::<LogFormat>(), Ok(format));
        }
    }

    #[test]
    fn generation_defaults_fill_sampling_and_are_checked() {
        let g: GenerationDefaults =
            toml::from_str("n_predict = 5\ntemperature = 0.0\nseed = -1\ntop_k = 3").unwrap();
        assert_eq!(g.max_tokens(), Some(5));
        let s = g.sampling();
        assert_eq!((s.temperature, s.top_k, s.seed), (0.0, 3, None));
        assert_eq!(s.top_p, crate::SamplingParams::default().top_p);
        g.check().unwrap();
        let unlimited = GenerationDefaults {
            n_predict: Some(-1),
            seed: Some(7),
            ..GenerationDefaults::default()
        };
        assert_eq!((unlimited.max_tokens(), unlimited.seed()), (None, Some(7)));
        for (bad_one, key) in [
            ("n_predict = 0", "generation.n_predict"),
            ("temperature = 5.0", "generation.temperature"),
            ("top_p = 0.0", "generation.top_p"),
        ] {
            let g: GenerationDefaults = toml::from_str(bad_one).unwrap();
            assert_eq!(g.check().unwrap_err().key, key, "{bad_one}");
        }
        assert!(toml::from_str::<GenerationDefaults>("max_tokens = 3").is_err());
    }
}
