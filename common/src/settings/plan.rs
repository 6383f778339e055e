//! Worker planning: the checks that turn [`Settings`] into one [`WorkerPlan`] per worker
//! (CPU lists resolved against the CPUs this process may use, `worker_defaults` applied,
//! overlaps and adaptive shapes refused with the key that names them), and where the model
//! file is. Pure: nothing here starts a process; the router's supervisor starts the plans.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{bad, Settings, SettingsError, WorkerSettings};
use crate::cpus::CpuList;
use crate::worker::{ContextConfig, Pooling, WideShape, WorkerArgs};

/// One worker, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub index: usize,
    pub cpus: CpuList,
    pub context: ContextConfig,
    pub gpu: Option<u32>,
    pub gpu_layers: u32,
    pub wide: Option<WideShape>,
    /// Set for an embedding worker: it computes embeddings with this pooling (the model's
    /// `model.pooling`) and generates nothing; the router sends it only embedding and
    /// reranking inputs.
    pub embedding: Option<Pooling>,
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
            embedding: self.embedding,
        }
    }
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

    /// How many workers the default layout starts: one per allowed CPU, or as many as a
    /// smaller CPU quota allows ([`Settings::cpu_quota`]).
    pub fn default_worker_count(&self, allowed: &CpuList) -> usize {
        self.quota_below(allowed).unwrap_or(allowed.len())
    }

    /// The CPU quota when it allows fewer CPUs than the affinity mask holds.
    fn quota_below(&self, allowed: &CpuList) -> Option<usize> {
        self.cpu_quota.filter(|&n| n < allowed.len())
    }

    /// The `[[workers]]` entries; without any, one single-thread worker per allowed CPU,
    /// adaptive (wide over every allowed CPU) when `worker_defaults.adaptive` and there is more
    /// than one CPU. Under a smaller CPU quota, that many one-thread workers, neither pinned
    /// to one CPU nor adaptive: the CPUs are shared with whatever else the machine runs (every
    /// container on a node would otherwise pin its workers to the same first CPUs).
    fn worker_entries(&self, allowed: &CpuList) -> Vec<WorkerSettings> {
        if !self.workers.is_empty() {
            return self.workers.clone();
        }
        if let Some(n) = self.quota_below(allowed) {
            let unpinned = WorkerSettings {
                threads: Some(1),
                ..WorkerSettings::default()
            };
            return vec![unpinned; n];
        }
        // An embedding worker has no adaptive shape: its decodes are short and independent.
        let adaptive = self.worker_defaults.adaptive && !self.worker_defaults.embedding;
        let wide = (adaptive && allowed.len() > 1).then(|| allowed.to_string());
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
                let embedding = w
                    .embedding
                    .unwrap_or(d.embedding)
                    .then_some(self.model.pooling);
                Ok(WorkerPlan {
                    index,
                    cpus,
                    context,
                    gpu: w.gpu,
                    gpu_layers: w.gpu_layers.unwrap_or(d.gpu_layers),
                    wide,
                    embedding,
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
            if plan.embedding.is_some() {
                return Err(bad(
                    key("wide_cpus"),
                    "an embedding worker has no adaptive shape",
                ));
            }
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
    use crate::settings::ModelSettings;
    use crate::worker::FlashAttention;

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
    fn no_workers_means_one_per_cpu() {
        let plans = Settings::default().plan_workers(&allowed()).unwrap();
        assert_eq!(plans.len(), 4);
        assert!(plans
            .iter()
            .all(|p| p.context.threads == 1 && p.cpus.len() == 1));
        assert_eq!(plans[2].cpus.cpus(), &[2]);
    }

    #[test]
    fn a_smaller_cpu_quota_means_that_many_unpinned_workers() {
        let quota = |n| Settings {
            cpu_quota: Some(n),
            ..Settings::default()
        };
        let plans = quota(2).plan_workers(&allowed()).unwrap();
        assert_eq!(plans.len(), 2);
        for plan in &plans {
            assert_eq!(plan.cpus, allowed(), "not pinned to one CPU");
            assert_eq!(plan.context.threads, 1);
            assert!(plan.wide.is_none(), "not adaptive");
        }
        // A quota as large as the CPU set changes nothing.
        assert_eq!(
            quota(4).plan_workers(&allowed()).unwrap(),
            Settings::default().plan_workers(&allowed()).unwrap()
        );
        // Explicit workers are as configured, on any allowed CPU.
        let explicit = Settings {
            cpu_quota: Some(1),
            ..with_workers(vec![on_cpus("2"), on_cpus("3")])
        };
        assert_eq!(explicit.plan_workers(&allowed()).unwrap().len(), 2);
        assert_eq!(quota(2).default_worker_count(&allowed()), 2);
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
            ("default", include_str!("../../../configs/default.toml")),
            (
                "gemma-bench",
                include_str!("../../../configs/gemma-bench.toml"),
            ),
            (
                "gpu.example",
                include_str!("../../../configs/gpu.example.toml"),
            ),
            (
                "models.example",
                include_str!("../../../configs/models.example.toml"),
            ),
        ] {
            let s: Settings = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let allowed = CpuList::parse("0-7").unwrap();
            s.plan_models(&allowed, &[])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
