//! Several models in one pool: the `[[models]]` entries ([`ModelEntry`]), the models found in
//! `server.models_dir`, and the checks that turn them, or the one model of `[model]`, into one
//! [`ModelPlan`] each (its names, its file, its worker plans and its load policy).
//!
//! Pure but for reading `server.models_dir`'s listing: nothing here loads a model. A model's
//! file is looked for when it loads, so a missing or broken file makes that model `failed`
//! and leaves the others serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, list_or_commas, split_commas, ModelSettings, Settings, SettingsError};
use super::{WorkerDefaults, WorkerPlan, WorkerSettings};
use crate::cpus::CpuList;
use crate::worker::Pooling;

/// One `[[models]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEntry {
    /// The names clients use, comma-separated (as `model.alias`); the first in alphabetical
    /// order is the one responses report. Default: the file name without `.gguf`.
    #[serde(alias = "name")]
    pub alias: String,
    /// More names, as a list (added to `alias`'s).
    #[serde(deserialize_with = "list_or_commas")]
    pub aliases: Vec<String>,
    /// The GGUF file; relative paths are looked up as `model.path` is.
    pub path: PathBuf,
    #[serde(deserialize_with = "list_or_commas")]
    pub tags: Vec<String>,
    pub chat_template: Option<String>,
    pub pooling: Pooling,
    /// False: this model also answers requests naming a model that no model is called (at
    /// most one model may say so). Default true.
    pub strict_name: Option<bool>,
    /// Loaded when the router starts (else on the first request, or `POST /models/load`).
    pub load_on_startup: bool,
    /// Unloaded after this many seconds without requests; 0: kept until evicted.
    #[serde(alias = "ttl")]
    pub ttl_secs: u64,
    /// Never unloaded to make room for another model (only `POST /models/unload` unloads it).
    #[serde(alias = "pinned")]
    pub pin: bool,
    /// When models must make room, those of lower priority go first (then the least recently
    /// used); default 0.
    pub priority: i32,
    /// Keys of `[worker_defaults]` this model sets otherwise (the rest come from there).
    pub worker_defaults: Option<serde_json::Map<String, serde_json::Value>>,
    /// This model's worker layout (default: the top-level `[[workers]]`, else the default
    /// layout).
    pub workers: Option<Vec<WorkerSettings>>,
}

/// One model, resolved: what the router serves it as and how it starts its workers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    /// Its position: the order of `/v1/models`; the first model answers requests that name
    /// none.
    pub index: usize,
    /// Sorted, without duplicates; `names[0]` is the name responses report.
    pub names: Vec<String>,
    /// As configured; resolved when the model loads ([`Settings::resolve_model_path`]).
    pub path: PathBuf,
    /// This model's view of the settings: `model.*`, `worker_defaults.*` and `workers` are
    /// its own; everything else is the router's.
    pub settings: Settings,
    pub workers: Vec<WorkerPlan>,
    /// Answers names no model is called.
    pub catch_all: bool,
    pub load_on_startup: bool,
    pub ttl: Option<Duration>,
    pub pinned: bool,
    /// Lower goes first when models must make room.
    pub priority: i32,
}

impl ModelPlan {
    /// The name responses report.
    pub fn alias(&self) -> &str {
        &self.names[0]
    }
}

impl Settings {
    /// Whether several models are configured (`[[models]]`, `server.models_dir` or
    /// `server.models_preset`): then requests are routed by name and models load on demand.
    pub fn serves_several_models(&self) -> bool {
        !self.models.is_empty()
            || self.server.models_dir.is_some()
            || self.server.models_preset.is_some()
    }

    /// Every model served, checked: `[[models]]`, then the preset's sections (`preset`, already
    /// read), then `server.models_dir`'s files; or the one model of `[model]`, loaded at start
    /// and never unloaded (exactly the single-model server).
    pub fn plan_models(
        &self,
        allowed: &CpuList,
        preset: &[ModelEntry],
    ) -> Result<Vec<ModelPlan>, SettingsError> {
        if !self.serves_several_models() {
            let workers = self.plan_workers(allowed)?;
            return Ok(vec![ModelPlan {
                index: 0,
                names: self.model.names(),
                path: self.model.path.clone(),
                settings: self.clone(),
                workers,
                catch_all: !self.model.strict_name,
                load_on_startup: true,
                ttl: None,
                pinned: true,
                priority: 0,
            }]);
        }
        let mut entries: Vec<(String, ModelEntry)> = self
            .models
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("models[{i}]"), e.clone()))
            .collect();
        entries.extend(
            preset
                .iter()
                .map(|e| (format!("models_preset[{}]", e.alias), e.clone())),
        );
        if let Some(dir) = &self.server.models_dir {
            entries.extend(models_in_dir(dir)?.into_iter().map(|path| {
                (
                    format!("models_dir[{}]", path.display()),
                    ModelEntry {
                        path,
                        ..ModelEntry::default()
                    },
                )
            }));
        }
        if entries.is_empty() {
            return Err(bad(
                "models",
                "no model: give [[models]] tables, or models_dir a folder with .gguf files",
            ));
        }
        let plans = entries
            .iter()
            .enumerate()
            .map(|(index, (key, entry))| self.plan_model(index, key, entry, allowed))
            .collect::<Result<Vec<_>, _>>()?;
        check_names(&plans, &entries)?;
        let on_startup = plans.iter().filter(|p| p.load_on_startup).count();
        if self.server.models_max > 0 && on_startup > self.server.models_max {
            return Err(bad(
                "server.models_max",
                format!(
                    "{on_startup} models load on startup, more than models_max ({}) allows",
                    self.server.models_max
                ),
            ));
        }
        Ok(plans)
    }

    /// One `[[models]]` entry (`key` names it in errors) as a plan.
    fn plan_model(
        &self,
        index: usize,
        key: &str,
        entry: &ModelEntry,
        allowed: &CpuList,
    ) -> Result<ModelPlan, SettingsError> {
        if entry.path.as_os_str().is_empty() {
            return Err(bad(format!("{key}.path"), "must name a GGUF file"));
        }
        let mut names = split_commas(&entry.alias);
        names.extend(entry.aliases.iter().cloned());
        let alias = if names.is_empty() {
            default_alias(&entry.path)
        } else {
            names.join(",")
        };
        let mut settings = self.clone();
        settings.models = Vec::new();
        settings.model = ModelSettings {
            path: entry.path.clone(),
            alias,
            tags: entry.tags.clone(),
            chat_template: entry.chat_template.clone(),
            strict_name: entry.strict_name.unwrap_or(true),
            pooling: entry.pooling,
        };
        if let Some(overrides) = &entry.worker_defaults {
            settings.worker_defaults = overlay(&self.worker_defaults, overrides)
                .map_err(|e| bad(format!("{key}.worker_defaults"), e))?;
        }
        if let Some(workers) = &entry.workers {
            settings.workers = workers.clone();
        }
        let workers = settings.plan_workers(allowed).map_err(|e| SettingsError {
            key: format!("{key}.{}", e.key),
            message: e.message,
        })?;
        Ok(ModelPlan {
            index,
            names: settings.model.names(),
            path: entry.path.clone(),
            catch_all: !settings.model.strict_name,
            workers,
            settings,
            load_on_startup: entry.load_on_startup,
            ttl: (entry.ttl_secs > 0).then(|| Duration::from_secs(entry.ttl_secs)),
            pinned: entry.pin,
            priority: entry.priority,
        })
    }
}

/// A model's default name: its file name without `.gguf`, as llama-server's router names the
/// files of `--models-dir`.
pub fn default_alias(path: &Path) -> String {
    let file = path
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    file.strip_suffix(".gguf").unwrap_or(&file).to_string()
}

/// The `*.gguf` files of `dir`, sorted by name (multimodal projectors, `mmproj*`, left out).
fn models_in_dir(dir: &Path) -> Result<Vec<PathBuf>, SettingsError> {
    let listing = std::fs::read_dir(dir).map_err(|e| {
        bad(
            "server.models_dir",
            format!("cannot read {}: {e}", dir.display()),
        )
    })?;
    let mut files: Vec<PathBuf> = listing
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".gguf") && !name.starts_with("mmproj") && path.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `overrides` laid over `base`: each key replaces `base`'s; an unknown key or a bad value is
/// an error naming it.
fn overlay(
    base: &WorkerDefaults,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<WorkerDefaults, String> {
    let mut merged = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if let Some(object) = merged.as_object_mut() {
        for (key, value) in overrides {
            object.insert(key.clone(), value.clone());
        }
    }
    serde_json::from_value(merged).map_err(|e| e.to_string())
}

/// No name is two models', and at most one model answers unknown names.
fn check_names(plans: &[ModelPlan], entries: &[(String, ModelEntry)]) -> Result<(), SettingsError> {
    for (i, plan) in plans.iter().enumerate() {
        if plan.names.is_empty() {
            return Err(bad(format!("{}.alias", entries[i].0), "must not be empty"));
        }
        for earlier in &plans[..i] {
            if let Some(name) = plan.names.iter().find(|n| earlier.names.contains(n)) {
                return Err(bad(
                    format!("{}.alias", entries[i].0),
                    format!("the name {name:?} is also {}'s", entries[earlier.index].0),
                ));
            }
        }
    }
    if plans.iter().filter(|p| p.catch_all).count() > 1 {
        return Err(bad(
            "models",
            "at most one model may set strict_name = false (it answers unknown names)",
        ));
    }
    Ok(())
}

/// llama-server's `--models-preset` file: an INI file whose sections are models (the section
/// name is the model's name; `[*]` holds keys every model gets). Keys: `model` (the GGUF
/// path; required), `alias`, `load-on-startup`, `ttl`, `pin`, `chat-template`, `pooling`,
/// and the worker keys `ctx-size`/`c`, `parallel`/`np`, `batch-size`/`b`,
/// `ubatch-size`/`ub`, `flash-attn`/`fa`, `n-gpu-layers`/`ngl`. Other llama-server keys are
/// ignored, as its own flags are.
pub fn parse_preset(text: &str) -> Result<Vec<ModelEntry>, SettingsError> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(
                "server.models_preset",
                format!("line {}: expected KEY = VALUE or [SECTION]", n + 1),
            ));
        };
        let Some((_, keys)) = sections.last_mut() else {
            return Err(bad(
                "server.models_preset",
                format!("line {}: a key before any [section]", n + 1),
            ));
        };
        let value = value.trim().trim_matches('"').to_string();
        keys.push((key.trim().trim_start_matches('-').to_string(), value));
    }
    let common: Vec<(String, String)> = sections
        .iter()
        .filter(|(name, _)| name == "*")
        .flat_map(|(_, keys)| keys.clone())
        .collect();
    sections
        .iter()
        .filter(|(name, _)| name != "*")
        .map(|(name, keys)| {
            let all: Vec<&(String, String)> = common.iter().chain(keys).collect();
            preset_entry(name, &all)
        })
        .collect()
}

/// One preset section as a `[[models]]` entry.
fn preset_entry(name: &str, keys: &[&(String, String)]) -> Result<ModelEntry, SettingsError> {
    let key_of = |k: &str| format!("models_preset[{name}].{k}");
    let mut entry = ModelEntry {
        alias: name.to_string(),
        ..ModelEntry::default()
    };
    let mut defaults = serde_json::Map::new();
    let number = |k: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| bad(key_of(k), format!("{v:?} is not a number")))
    };
    let flag = |v: &str| !matches!(v, "false" | "0" | "off" | "no");
    for (key, value) in keys {
        let v = value.as_str();
        match key.as_str() {
            "model" | "m" => entry.path = PathBuf::from(v),
            // Listed, but it cannot load: models are not downloaded here.
            "hf-repo" | "hf" | "hfr" if entry.path.as_os_str().is_empty() => {
                entry.path = PathBuf::from(format!("hf://{v}"));
            }
            "alias" | "a" => {
                let mut names = split_commas(v);
                names.push(name.to_string());
                entry.alias = names.join(",");
            }
            "load-on-startup" => entry.load_on_startup = flag(v),
            "ttl" => entry.ttl_secs = number(key, v)?,
            "pin" => entry.pin = flag(v),
            "chat-template" => entry.chat_template = Some(v.to_string()),
            "pooling" => {
                entry.pooling = v.parse().map_err(|e| bad(key_of(key), format!("{e}")))?;
            }
            "ctx-size" | "c" => drop(defaults.insert("context".into(), number(key, v)?.into())),
            "parallel" | "np" => drop(defaults.insert("slots".into(), number(key, v)?.into())),
            "batch-size" | "b" => drop(defaults.insert("n_batch".into(), number(key, v)?.into())),
            "ubatch-size" | "ub" => {
                drop(defaults.insert("n_ubatch".into(), number(key, v)?.into()));
            }
            "n-gpu-layers" | "ngl" | "gpu-layers" => {
                drop(defaults.insert("gpu_layers".into(), number(key, v)?.into()));
            }
            "flash-attn" | "fa" => {
                drop(defaults.insert("flash_attention".into(), v.into()));
            }
            _ => {}
        }
    }
    if entry.path.as_os_str().is_empty() {
        return Err(bad(
            key_of("model"),
            "every model needs `model = PATH` (or `hf-repo`, listed but not loadable)",
        ));
    }
    entry.worker_defaults = (!defaults.is_empty()).then_some(defaults);
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> CpuList {
        CpuList::parse("0-1").unwrap()
    }

    #[test]
    fn one_model_is_the_single_model_server() {
        let s = Settings::default();
        assert!(!s.serves_several_models());
        let plans = s.plan_models(&allowed(), &[]).unwrap();
        assert_eq!(plans.len(), 1);
        assert!(plans[0].pinned && plans[0].load_on_startup && plans[0].catch_all);
        assert_eq!(plans[0].alias(), "smollm2-135m-instruct");
    }

    #[test]
    fn models_get_their_own_worker_defaults_and_names() {
        let s: Settings = toml::from_str(
            r#"
            [worker_defaults]
            slots = 4
            [[models]]
            path = "a/SmolLM2.gguf"
            [[models]]
            name = "gemma"
            aliases = ["g3"]
            path = "gemma.gguf"
            ttl = 30
            worker_defaults = { context = 2048 }
            workers = [{ cpus = "0", threads = 1 }]
            "#,
        )
        .unwrap();
        let plans = s.plan_models(&allowed(), &[]).unwrap();
        assert_eq!(plans[0].names, ["SmolLM2"]);
        assert_eq!(plans[1].names, ["g3", "gemma"]);
        assert_eq!(plans[0].workers.len(), 2);
        assert_eq!(plans[1].workers.len(), 1);
        assert_eq!(plans[1].workers[0].context.context, 2048);
        assert_eq!(plans[1].workers[0].context.slots, 4, "inherited");
        assert_eq!(plans[1].ttl, Some(Duration::from_secs(30)));
        assert!(!plans[0].catch_all && !plans[0].load_on_startup);
    }

    #[test]
    fn bad_models_name_their_key() {
        let err = |text: &str| {
            let s: Settings = toml::from_str(text).unwrap();
            s.plan_models(&allowed(), &[]).unwrap_err().key
        };
        assert_eq!(
            err("[[models]]\npath = \"a.gguf\"\n[[models]]\npath = \"b/a.gguf\"\n"),
            "models[1].alias"
        );
        assert_eq!(err("[[models]]\nalias = \"x\"\n"), "models[0].path");
        assert_eq!(
            err("[[models]]\npath = \"a.gguf\"\nworker_defaults = { slots = \"many\" }\n"),
            "models[0].worker_defaults"
        );
        assert_eq!(
            err("[[models]]\npath = \"a.gguf\"\nworkers = [{ cpus = \"7\" }]\n"),
            "models[0].workers[0].cpus"
        );
        assert_eq!(
            err("[[models]]\npath = \"a.gguf\"\nstrict_name = false\n[[models]]\npath = \"b.gguf\"\nstrict_name = false\n"),
            "models"
        );
        assert_eq!(
            err("[server]\nmodels_max = 1\n[[models]]\npath = \"a.gguf\"\nload_on_startup = true\n[[models]]\npath = \"b.gguf\"\nload_on_startup = true\n"),
            "server.models_max"
        );
    }

    #[test]
    fn a_models_dir_lists_its_gguf_files() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["b.gguf", "a.gguf", "mmproj-a.gguf", "notes.txt"] {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        let mut s = Settings::default();
        s.server.models_dir = Some(dir.path().to_path_buf());
        let plans = s.plan_models(&allowed(), &[]).unwrap();
        let names: Vec<&str> = plans.iter().map(ModelPlan::alias).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_preset_file_becomes_models() {
        let text =
            "; comment\n[*]\nc = 1024\n\n[smol]\nmodel = /m/smol.gguf\nload-on-startup = true\n\
                    [gemma]\nmodel = \"/m/gemma.gguf\"\n--np = 2\nalias = g\njinja = true\n";
        let entries = parse_preset(text).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].path, PathBuf::from("/m/smol.gguf"));
        assert!(entries[0].load_on_startup);
        assert_eq!(entries[1].alias, "g,gemma");
        let mut s = Settings::default();
        s.server.models_preset = Some("p.ini".into());
        let plans = s.plan_models(&allowed(), &entries).unwrap();
        assert_eq!(plans[1].workers[0].context.slots, 2);
        assert_eq!(plans[1].workers[0].context.context, 1024);
        assert!(parse_preset("[x]\nc = 5\n").is_err(), "no model path");
        let hf = parse_preset("[a]\nhf-repo = org/repo:Q8_0\n").unwrap();
        assert_eq!(
            hf[0].path,
            PathBuf::from("hf://org/repo:Q8_0"),
            "listed, not loadable"
        );
        assert!(parse_preset("c = 5\n").is_err());
    }
}
