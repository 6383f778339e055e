//! The configuration as plain data (deserialized by the router from TOML, environment and
//! flags through the `config` crate), and the pure checks that turn it into a pool plan.
//!
//! Keys: `server.*`, `model.*`, `worker_defaults.*`, and one `[[workers]]` table per worker
//! (each key of `worker_defaults` may be overridden per worker). Without `[[workers]]`, the
//! pool is one worker per allowed CPU, pinned to it, with one thread.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpus::CpuList;
use crate::worker::{ContextConfig, FlashAttention, WideShape, WorkerArgs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub worker_defaults: WorkerDefaults,
    pub workers: Vec<WorkerSettings>,
    /// Server-wide defaults for generation requests that leave a field out.
    pub generation: GenerationDefaults,
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
}

impl GenerationDefaults {
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
}

/// One worker, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub index: usize,
    pub cpus: CpuList,
    pub context: ContextConfig,
    pub gpu: Option<u32>,
    pub gpu_layers: u32,
    pub wide: Option<WideShape>,
}

impl WorkerPlan {
    /// The command line of this worker, pinned to its CPUs and listening on `socket`.
    pub fn worker_args(
        &self,
        socket: PathBuf,
        model: PathBuf,
        chat_template: Option<String>,
    ) -> WorkerArgs {
        WorkerArgs {
            socket,
            model,
            chat_template,
            cpus: Some(self.cpus.clone()),
            gpu: self.gpu,
            gpu_layers: self.gpu_layers,
            context: self.context,
            wide: self.wide.clone(),
        }
    }
}

/// A setting that cannot work, with the key that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key {key}: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

fn bad(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.into(),
        message: message.into(),
    }
}

/// A list of strings given as a list, or as one comma-separated string (what the environment
/// and `--set` can give): `"a, b,,c"` is `["a", "b", "c"]`.
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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

fn split_commas(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The keys of an `api_key_file`: one per line, surrounding whitespace dropped, blank lines
/// and lines whose first non-blank character is `#` ignored.
pub fn parse_api_key_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Why `key` cannot be an API key: a client could never send it in a header.
fn check_api_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("an API key must not be empty (leave the key out for none)".into());
    }
    if key.trim() != key {
        return Err("an API key must not start or end with whitespace".into());
    }
    if key.chars().any(char::is_control) {
        return Err("an API key must not contain control characters".into());
    }
    Ok(())
}

/// `origin` as [`ServerSettings::cors_origins`] takes it: `*`, llama-server's special value
/// `localhost` (any origin whose host is `localhost`, `127.0.0.1` or `[::1]`, any scheme and
/// port), or `scheme://host[:port]` with at most a trailing `/`, which is dropped. Returns the
/// normalized origin.
pub fn parse_cors_origin(origin: &str) -> Result<&str, String> {
    if origin == "*" || origin == LOCALHOST_ORIGINS {
        return Ok(origin);
    }
    let normalized = origin.strip_suffix('/').unwrap_or(origin);
    let valid = normalized.split_once("://").is_some_and(|(scheme, host)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !host.is_empty()
            && !host.contains('/')
            && host.chars().all(|c| c.is_ascii_graphic())
    });
    if valid {
        Ok(normalized)
    } else {
        Err(format!(
            "{origin:?} is not an origin: expected scheme://host[:port] (as browsers send in \
             the Origin header) or \"*\""
        ))
    }
}

/// The `cors_origins` entry that allows every local origin, as llama-server's
/// `--cors-origins localhost`.
pub const LOCALHOST_ORIGINS: &str = "localhost";

/// Whether an `Origin` header value names this machine: `scheme://host[:port]` with host
/// `localhost`, `127.0.0.1` or `[::1]` (ASCII case ignored).
pub fn is_local_origin(origin: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some((_, authority)) = origin.split_once("://") else {
        return false;
    };
    let host = if authority.starts_with('[') {
        authority.split_inclusive(']').next().unwrap_or(authority)
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|local| host.eq_ignore_ascii_case(local))
}

impl ServerSettings {
    /// The addresses of `listen`, split at commas (llama-server's `--host a,b`), in order; the
    /// first is the one the start-up line names.
    pub fn listen_addresses(&self) -> Vec<String> {
        split_commas(&self.listen)
    }

    /// The pure checks of the access settings: every key in `api_key` and `api_keys` could
    /// be sent in a header, every entry of `cors_origins` is an origin.
    pub fn check_access(&self) -> Result<(), SettingsError> {
        if let Some(key) = &self.api_key {
            check_api_key(key).map_err(|e| bad("server.api_key", e))?;
        }
        for (i, key) in self.api_keys.iter().enumerate() {
            check_api_key(key).map_err(|e| bad(format!("server.api_keys[{i}]"), e))?;
        }
        for (i, key) in self.admin_api_keys.iter().enumerate() {
            check_api_key(key).map_err(|e| bad(format!("server.admin_api_keys[{i}]"), e))?;
        }
        for (i, host) in self.allowed_hosts.iter().enumerate() {
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_graphic()) || host.contains('/')
            {
                return Err(bad(
                    format!("server.allowed_hosts[{i}]"),
                    format!("{host:?} is not a host name (name, name:port or \"*\")"),
                ));
            }
        }
        for (i, origin) in self.cors_origins.iter().enumerate() {
            parse_cors_origin(origin).map_err(|e| bad(format!("server.cors_origins[{i}]"), e))?;
        }
        Ok(())
    }

    /// Every accepted API key: `api_key`, `api_keys`, then the keys of `api_key_file`, which
    /// is read now; duplicates are dropped. Empty: no key is needed. A key file that cannot be
    /// read, or holds no key, is an error (a file meant to protect the server must not leave
    /// it open).
    pub fn api_keys(&self) -> Result<Vec<String>, SettingsError> {
        self.check_access()?;
        let keys: Vec<String> = self.api_key.iter().chain(&self.api_keys).cloned().collect();
        with_key_file(keys, self.api_key_file.as_deref(), "server.api_key_file")
    }

    /// Every admin key: `admin_api_keys`, then the keys of `admin_api_key_file` (read now, as
    /// in [`ServerSettings::api_keys`]); duplicates dropped. Empty: see `admin_api_keys`.
    pub fn admin_api_keys(&self) -> Result<Vec<String>, SettingsError> {
        self.check_access()?;
        with_key_file(
            self.admin_api_keys.clone(),
            self.admin_api_key_file.as_deref(),
            "server.admin_api_key_file",
        )
    }
}

/// `keys` followed by those of the key file at `path`, if any (named `key` in errors), without
/// duplicates. A file that cannot be read or holds no key is an error.
fn with_key_file(
    mut keys: Vec<String>,
    path: Option<&Path>,
    key: &str,
) -> Result<Vec<String>, SettingsError> {
    if let Some(path) = path {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
        let from_file = parse_api_key_file(&text);
        if from_file.is_empty() {
            return Err(bad(
                key,
                format!(
                    "{} holds no key (only blank lines and # comments)",
                    path.display()
                ),
            ));
        }
        for (i, k) in from_file.iter().enumerate() {
            check_api_key(k).map_err(|e| bad(key, format!("key {}: {e}", i + 1)))?;
        }
        keys.extend(from_file);
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    Ok(keys)
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

impl Settings {
    /// Resolves `model.path` against the working directory, then the models directory.
    pub fn resolve_model_path(&self, models_dir: &Path) -> Result<PathBuf, SettingsError> {
        let path = &self.model.path;
        let expanded = match path.strip_prefix("~") {
            Ok(rest) => std::env::var_os("HOME")
                .map_or_else(|| path.clone(), |h| PathBuf::from(h).join(rest)),
            Err(_) => path.clone(),
        };
        if expanded.is_file() {
            return Ok(expanded);
        }
        if expanded.is_relative() && models_dir.join(&expanded).is_file() {
            return Ok(models_dir.join(expanded));
        }
        Err(bad(
            "model.path",
            format!(
                "{} is not a file (also looked in {}; run scripts/setup to fetch the default models)",
                path.display(),
                models_dir.display()
            ),
        ))
    }

    /// The workers to start, checked against the CPUs this process may use.
    pub fn plan_workers(&self, allowed: &CpuList) -> Result<Vec<WorkerPlan>, SettingsError> {
        if self.model.names().is_empty() {
            return Err(bad("model.alias", "must not be empty"));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(bad("server.max_body_bytes", "must be at least 1024"));
        }
        if self.server.max_buffered_body_bytes < self.server.max_body_bytes {
            return Err(bad(
                "server.max_buffered_body_bytes",
                "must be at least server.max_body_bytes",
            ));
        }
        self.server.check_access()?;
        self.generation.check()?;
        let entries = self.worker_entries(allowed);
        if entries.is_empty() {
            return Err(bad("workers", "no CPU is available to run a worker on"));
        }
        let plans = self.resolve_workers(&entries, allowed)?;
        validate_workers(&entries, &plans, allowed)?;
        Ok(plans)
    }

    /// The `[[workers]]` entries; without any, one single-thread worker per allowed CPU,
    /// adaptive (wide over every allowed CPU) when `worker_defaults.adaptive` and there is more
    /// than one CPU.
    fn worker_entries(&self, allowed: &CpuList) -> Vec<WorkerSettings> {
        if !self.workers.is_empty() {
            return self.workers.clone();
        }
        let wide =
            (self.worker_defaults.adaptive && allowed.len() > 1).then(|| allowed.to_string());
        allowed
            .cpus()
            .iter()
            .map(|c| WorkerSettings {
                cpus: Some(c.to_string()),
                threads: Some(1),
                wide_cpus: wide.clone(),
                ..WorkerSettings::default()
            })
            .collect()
    }

    /// Applies the defaults: CPU lists parsed (none: all of `allowed`), threads defaulting
    /// to the number of CPUs, every other key taken from `worker_defaults` when left out.
    /// Checks nothing but the syntax of CPU lists; [`validate_workers`] does the rest.
    fn resolve_workers(
        &self,
        entries: &[WorkerSettings],
        allowed: &CpuList,
    ) -> Result<Vec<WorkerPlan>, SettingsError> {
        let d = &self.worker_defaults;
        entries
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let cpus = match &w.cpus {
                    Some(list) => CpuList::parse(list)
                        .map_err(|e| bad(format!("workers[{index}].cpus"), e.to_string()))?,
                    None => allowed.clone(),
                };
                let threads = w.threads.unwrap_or(u32::try_from(cpus.len()).unwrap_or(1));
                let wide = match &w.wide_cpus {
                    Some(list) => {
                        let wide_cpus = CpuList::parse(list).map_err(|e| {
                            bad(format!("workers[{index}].wide_cpus"), e.to_string())
                        })?;
                        let threads = w
                            .wide_threads
                            .unwrap_or(u32::try_from(wide_cpus.len()).unwrap_or(1));
                        Some(WideShape {
                            cpus: wide_cpus,
                            threads,
                        })
                    }
                    None => None,
                };
                let context = ContextConfig {
                    slots: w.slots.unwrap_or(d.slots),
                    context: w.context.unwrap_or(d.context),
                    n_batch: w.n_batch.unwrap_or(d.n_batch),
                    n_ubatch: w.n_ubatch.unwrap_or(d.n_ubatch),
                    threads,
                    kv_unified: w.kv_unified.unwrap_or(d.kv_unified),
                    flash_attention: w.flash_attention.unwrap_or(d.flash_attention),
                };
                Ok(WorkerPlan {
                    index,
                    cpus,
                    context,
                    gpu: w.gpu,
                    gpu_layers: w.gpu_layers.unwrap_or(d.gpu_layers),
                    wide,
                })
            })
            .collect()
    }
}

/// Checks resolved workers in order: their CPUs exist and are allowed, explicit CPU lists
/// (`entries[i].cpus`) do not overlap an earlier worker's, and each context is valid. The
/// error names the key as `workers[i].KEY`.
fn validate_workers(
    entries: &[WorkerSettings],
    plans: &[WorkerPlan],
    allowed: &CpuList,
) -> Result<(), SettingsError> {
    for (index, (w, plan)) in entries.iter().zip(plans).enumerate() {
        let key = |k: &str| format!("workers[{index}].{k}");
        let missing = plan.cpus.outside(allowed);
        if !missing.is_empty() {
            return Err(bad(
                key("cpus"),
                format!("CPUs {missing:?} do not exist or are not available to this process (available: {allowed})"),
            ));
        }
        if w.cpus.is_some() {
            for other in &plans[..index] {
                let shared = plan.cpus.overlaps(&other.cpus);
                if !shared.is_empty() {
                    return Err(bad(
                        key("cpus"),
                        format!(
                            "CPUs {shared:?} are also pinned by workers[{}]",
                            other.index
                        ),
                    ));
                }
            }
        }
        plan.context
            .validate()
            .map_err(|e| bad(key(e.field()), e.to_string()))?;
        if let Some(wide) = &plan.wide {
            validate_wide(wide, plan, allowed, &key)?;
        }
    }
    Ok(())
}

/// An adaptive worker narrows to exactly one thread (the mechanism turns llama.cpp's OpenMP
/// team off), so its own shape must be one thread; its wide CPUs must be allowed and include
/// its own.
fn validate_wide(
    wide: &WideShape,
    plan: &WorkerPlan,
    allowed: &CpuList,
    key: &dyn Fn(&str) -> String,
) -> Result<(), SettingsError> {
    let missing = wide.cpus.outside(allowed);
    if !missing.is_empty() {
        return Err(bad(
            key("wide_cpus"),
            format!("CPUs {missing:?} do not exist or are not available to this process (available: {allowed})"),
        ));
    }
    if !plan.cpus.outside(&wide.cpus).is_empty() {
        return Err(bad(key("wide_cpus"), "must include the worker's own cpus"));
    }
    if plan.context.threads != 1 {
        return Err(bad(
            key("threads"),
            "an adaptive worker (wide_cpus set) runs one thread in its own shape",
        ));
    }
    if wide.threads == 0 || wide.threads > 1024 {
        return Err(bad(key("wide_threads"), "must be between 1 and 1024"));
    }
    if plan.gpu.is_some() {
        return Err(bad(key("wide_cpus"), "adaptive width is for CPU workers"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> CpuList {
        CpuList::parse("0-3").unwrap()
    }

    /// A `[[workers]]` entry with only `cpus` set.
    fn on_cpus(cpus: &str) -> WorkerSettings {
        WorkerSettings {
            cpus: Some(cpus.into()),
            ..WorkerSettings::default()
        }
    }

    /// Settings with these `[[workers]]` entries.
    fn with_workers(workers: Vec<WorkerSettings>) -> Settings {
        Settings {
            workers,
            ..Settings::default()
        }
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
    fn no_workers_means_one_per_cpu() {
        let plans = Settings::default().plan_workers(&allowed()).unwrap();
        assert_eq!(plans.len(), 4);
        assert!(plans
            .iter()
            .all(|p| p.context.threads == 1 && p.cpus.len() == 1));
        assert_eq!(plans[2].cpus.cpus(), &[2]);
    }

    #[test]
    fn explicit_workers_inherit_defaults() {
        let s = with_workers(vec![
            on_cpus("0-1"),
            WorkerSettings {
                slots: Some(4),
                ..on_cpus("2")
            },
        ]);
        let plans = s.plan_workers(&allowed()).unwrap();
        assert_eq!(plans[0].context.threads, 2);
        assert_eq!(plans[0].context.slots, ContextConfig::default().slots);
        assert_eq!(plans[1].context.slots, 4);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (on_cpus("9"), "workers[0].cpus"),
            (
                WorkerSettings {
                    slots: Some(0),
                    ..Default::default()
                },
                "workers[0].slots",
            ),
            (
                WorkerSettings {
                    n_batch: Some(4),
                    ..Default::default()
                },
                "workers[0].n_batch",
            ),
        ];
        for (worker, key) in cases {
            let err = with_workers(vec![worker])
                .plan_workers(&allowed())
                .unwrap_err();
            assert_eq!(err.key, key);
        }
        let overlapping = with_workers(vec![on_cpus("0-1"), on_cpus("1-2")]);
        let err = overlapping.plan_workers(&allowed()).unwrap_err();
        assert_eq!(err.key, "workers[1].cpus");
        assert!(err.message.contains("[1]"));
        let missing = Settings {
            model: ModelSettings {
                path: "nope.gguf".into(),
                ..Default::default()
            },
            ..Settings::default()
        };
        assert_eq!(
            missing
                .resolve_model_path(Path::new("/nonexistent"))
                .unwrap_err()
                .key,
            "model.path"
        );
    }

    #[test]
    fn flash_attention_parses_from_toml() {
        let s: Settings = toml::from_str(
            "[worker_defaults]\nflash_attention = \"off\"\n[[workers]]\nflash_attention = \"on\"\n[[workers]]\n",
        )
        .unwrap();
        assert_eq!(s.worker_defaults.flash_attention, FlashAttention::Off);
        let plans = s.plan_workers(&allowed()).unwrap();
        assert_eq!(plans[0].context.flash_attention, FlashAttention::On);
        assert_eq!(plans[1].context.flash_attention, FlashAttention::Off);
        for bad in [
            "[worker_defaults]\nflash_attention = \"maybe\"\n",
            "[[workers]]\nflash_attention = \"yes\"\n",
            "[[workers]]\nflash_attention = true\n",
        ] {
            let err = toml::from_str::<Settings>(bad).unwrap_err().to_string();
            assert!(err.contains("flash_attention"), "{bad:?}: {err}");
        }
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
    fn admin_keys_hosts_and_body_bounds() {
        let dir = std::env::temp_dir().join(format!("llamapool-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("admin");
        std::fs::write(&file, "# operators\na2\na1\n").unwrap();
        let s: Settings = toml::from_str(&format!(
            "[server]\napi_key = \"k\"\nadmin_api_keys = \"a1, a3\"\nadmin_api_key_file = {:?}\nallowed_hosts = [\"llm.example\", \"box:8080\"]\n",
            file.display().to_string()
        ))
        .unwrap();
        assert_eq!(s.server.admin_api_keys().unwrap(), ["a1", "a3", "a2"]);
        assert_eq!(
            s.server.api_keys().unwrap(),
            ["k"],
            "separate from the API keys"
        );
        assert_eq!(s.server.allowed_hosts, ["llm.example", "box:8080"]);
        assert!(ServerSettings::default()
            .admin_api_keys()
            .unwrap()
            .is_empty());
        let defaults = ServerSettings::default();
        assert_eq!(defaults.body_read_timeout_secs, 30);
        assert_eq!(defaults.max_h2_streams, 32);
        assert_eq!(defaults.max_buffered_body_bytes, 64 * 1024 * 1024);
        s.plan_workers(&allowed()).unwrap();
        for (server, key) in [
            (
                ServerSettings {
                    admin_api_keys: vec![" a".into()],
                    ..ServerSettings::default()
                },
                "server.admin_api_keys[0]",
            ),
            (
                ServerSettings {
                    allowed_hosts: vec!["http://x/".into()],
                    ..ServerSettings::default()
                },
                "server.allowed_hosts[0]",
            ),
        ] {
            assert_eq!(server.check_access().unwrap_err().key, key);
        }
        let small_budget = Settings {
            server: ServerSettings {
                max_buffered_body_bytes: 1024,
                ..ServerSettings::default()
            },
            ..Settings::default()
        };
        assert_eq!(
            small_budget.plan_workers(&allowed()).unwrap_err().key,
            "server.max_buffered_body_bytes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn api_keys_come_from_all_three_keys_and_must_be_sendable() {
        let dir = std::env::temp_dir().join(format!("llamapool-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# operators\n\n  k3  \r\n#k4\nk1\n").unwrap();
        let server = ServerSettings {
            api_key: Some("k1".into()),
            api_keys: vec!["k2".into()],
            api_key_file: Some(file.clone()),
            ..ServerSettings::default()
        };
        assert_eq!(server.api_keys().unwrap(), ["k1", "k2", "k3"]);
        assert_eq!(
            ServerSettings::default().api_keys().unwrap(),
            Vec::<String>::new()
        );
        std::fs::write(&file, "# nothing\n\n").unwrap();
        let err = server.api_keys().unwrap_err();
        assert_eq!(err.key, "server.api_key_file");
        assert!(err.message.contains("no key"), "{err}");
        let missing = ServerSettings {
            api_key_file: Some(dir.join("none")),
            ..ServerSettings::default()
        };
        assert_eq!(missing.api_keys().unwrap_err().key, "server.api_key_file");
        std::fs::remove_dir_all(&dir).unwrap();
        for (server, key) in [
            (
                ServerSettings {
                    api_key: Some(String::new()),
                    ..ServerSettings::default()
                },
                "server.api_key",
            ),
            (
                ServerSettings {
                    api_keys: vec!["ok".into(), " padded".into()],
                    ..ServerSettings::default()
                },
                "server.api_keys[1]",
            ),
            (
                ServerSettings {
                    api_keys: vec!["a\u{7}b".into()],
                    ..ServerSettings::default()
                },
                "server.api_keys[0]",
            ),
            (
                ServerSettings {
                    cors_origins: vec!["https://a.example/path".into()],
                    ..ServerSettings::default()
                },
                "server.cors_origins[0]",
            ),
        ] {
            assert_eq!(server.check_access().unwrap_err().key, key);
            let settings = Settings {
                server,
                ..Settings::default()
            };
            assert_eq!(settings.plan_workers(&allowed()).unwrap_err().key, key);
        }
    }

    #[test]
    fn cors_origins_are_scheme_host_and_port() {
        for (given, normalized) in [
            ("*", "*"),
            ("localhost", "localhost"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("https://web.example/", "https://web.example"),
            ("chrome-extension://abcdef", "chrome-extension://abcdef"),
        ] {
            assert_eq!(parse_cors_origin(given), Ok(normalized));
        }
        for bad in [
            "",
            "web.example",
            "https://",
            "https://a.example/x",
            "https://a b",
            "1http://a",
            "ht tp://a",
        ] {
            assert!(parse_cors_origin(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn local_origins_are_localhost_and_loopback_on_any_port() {
        for local in [
            "http://localhost",
            "http://LOCALHOST:8080",
            "https://127.0.0.1:3000",
            "http://[::1]:5173",
        ] {
            assert!(is_local_origin(local.as_bytes()), "{local}");
        }
        for remote in [
            "http://localhost.evil.example",
            "http://127.0.0.2",
            "https://web.example",
            "localhost",
            "null",
        ] {
            assert!(!is_local_origin(remote.as_bytes()), "{remote}");
        }
    }

    #[test]
    fn defaults_are_the_context_defaults() {
        let plans = Settings::default().plan_workers(&allowed()).unwrap();
        assert_eq!(
            plans[0].context,
            ContextConfig {
                threads: 1,
                ..ContextConfig::default()
            }
        );
    }

    #[test]
    fn shipped_configs_parse_and_plan() {
        for (name, text) in [
            ("default", include_str!("../../configs/default.toml")),
            (
                "gemma-bench",
                include_str!("../../configs/gemma-bench.toml"),
            ),
            (
                "gpu.example",
                include_str!("../../configs/gpu.example.toml"),
            ),
        ] {
            let s: Settings = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let allowed = CpuList::parse("0-7").unwrap();
            s.plan_workers(&allowed)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
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
