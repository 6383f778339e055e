//! The configuration as plain data (deserialized by the router from TOML, environment and
//! flags through the `config` crate), and the pure checks that turn it into a pool plan.
//!
//! Keys: `server.*`, `model.*`, `worker_defaults.*`, and one `[[workers]]` table per worker
//! (each key of `worker_defaults` may be overridden per worker). Without `[[workers]]`, the
//! pool is one worker per allowed CPU, pinned to it, with one thread.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpus::CpuList;
use crate::worker::{ContextConfig, FlashAttention, WorkerArgs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub worker_defaults: WorkerDefaults,
    pub workers: Vec<WorkerSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the HTTP server binds.
    pub listen: String,
    /// When set, requests need `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
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
    /// A response whose client accepts no bytes for this many seconds is aborted: a stream
    /// stops its generation and frees its slot and admission permit, and the connection is
    /// closed.
    pub write_timeout_secs: u64,
    /// A worker that has work but completes no engine step for this long, or answers nothing
    /// (no progress, no ping reply) for this long, is hung: it is killed and its requests
    /// move on. The default covers the longest legal step with a wide margin: a full 512-token
    /// prefill of a 7–8B Q4 model on one slow core runs at ~20 tokens/s, about 25 s.
    pub hang_timeout_secs: u64,
    /// This many worker deaths (or hang kills, or failed starts) within
    /// `crash_loop_window_secs` mark the worker `failed`; it is then retried every
    /// `failed_retry_secs` instead of within a second.
    pub crash_loop_deaths: usize,
    pub crash_loop_window_secs: u64,
    pub failed_retry_secs: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            api_key: None,
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
            write_timeout_secs: 60,
            hang_timeout_secs: 60,
            crash_loop_deaths: 5,
            crash_loop_window_secs: 300,
            failed_retry_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A GGUF file; a relative path not found from the working directory is looked up in
    /// the setup cache (`$LLAMAPOOL_MODELS`, default `~/.cache/llamapool/models`).
    pub path: PathBuf,
    /// The model name clients use and `/v1/models` lists.
    pub alias: String,
    /// A llama.cpp built-in template name or template text, for models without one.
    pub chat_template: Option<String>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("SmolLM2-135M-Instruct.Q4_1.gguf"),
            alias: "smollm2-135m-instruct".into(),
            chat_template: None,
        }
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
}

/// One worker, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub index: usize,
    pub cpus: CpuList,
    pub context: ContextConfig,
    pub gpu: Option<u32>,
    pub gpu_layers: u32,
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
        if self.model.alias.trim().is_empty() {
            return Err(bad("model.alias", "must not be empty"));
        }
        if self.server.max_body_bytes < 1024 {
            return Err(bad("server.max_body_bytes", "must be at least 1024"));
        }
        let entries = self.worker_entries(allowed);
        if entries.is_empty() {
            return Err(bad("workers", "no CPU is available to run a worker on"));
        }
        let plans = self.resolve_workers(&entries, allowed)?;
        validate_workers(&entries, &plans, allowed)?;
        Ok(plans)
    }

    /// The `[[workers]]` entries; without any, one single-thread worker per allowed CPU.
    fn worker_entries(&self, allowed: &CpuList) -> Vec<WorkerSettings> {
        if !self.workers.is_empty() {
            return self.workers.clone();
        }
        allowed
            .cpus()
            .iter()
            .map(|c| WorkerSettings {
                cpus: Some(c.to_string()),
                threads: Some(1),
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> CpuList {
        CpuList::parse("0-3").unwrap()
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
        let s = Settings {
            workers: vec![
                WorkerSettings {
                    cpus: Some("0-1".into()),
                    ..WorkerSettings::default()
                },
                WorkerSettings {
                    cpus: Some("2".into()),
                    slots: Some(4),
                    ..WorkerSettings::default()
                },
            ],
            ..Settings::default()
        };
        let plans = s.plan_workers(&allowed()).unwrap();
        assert_eq!(plans[0].context.threads, 2);
        assert_eq!(plans[0].context.slots, 8);
        assert_eq!(plans[1].context.slots, 4);
    }

    #[test]
    fn errors_name_the_key() {
        let with = |w: WorkerSettings| Settings {
            workers: vec![w],
            ..Settings::default()
        };
        let cases = [
            (
                WorkerSettings {
                    cpus: Some("9".into()),
                    ..Default::default()
                },
                "workers[0].cpus",
            ),
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
            let err = with(worker).plan_workers(&allowed()).unwrap_err();
            assert_eq!(err.key, key);
        }
        let overlapping = Settings {
            workers: vec![
                WorkerSettings {
                    cpus: Some("0-1".into()),
                    ..Default::default()
                },
                WorkerSettings {
                    cpus: Some("1-2".into()),
                    ..Default::default()
                },
            ],
            ..Settings::default()
        };
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
}
