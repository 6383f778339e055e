//! Where `POST /admin/reload` gets its new configuration: the same file, environment and
//! command-line overrides the router started with, loaded and planned again. Only what a
//! worker is started with changes (model, chat template, per-worker settings); the server's
//! own settings (listen address, limits) need a restart of the router.

use std::path::PathBuf;
use std::time::Duration;

use llamapool_common::cpus::CpuList;
use llamapool_common::settings::WorkerPlan;

use crate::config;
use crate::dispatch::LaunchConfig;
use crate::http::admin::ReloadSource;

/// The configuration layers the router was started with: the file, then the environment
/// (read again at each load), then the command line's `key=value` overrides.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ConfigReload {
    pub source: ConfigSource,
    pub worker_binary: PathBuf,
    pub runtime_dir: PathBuf,
}

impl ReloadSource for ConfigReload {
    fn reload(&self) -> Result<(Vec<WorkerPlan>, LaunchConfig), String> {
        let settings = config::load(self.source.file.as_deref(), &self.source.overrides)
            .map_err(|e| e.to_string())?;
        let model_path = settings
            .resolve_model_path(&config::models_dir())
            .map_err(|e| e.to_string())?;
        let plans = settings
            .plan_workers(&CpuList::allowed())
            .map_err(|e| e.to_string())?;
        let launch = LaunchConfig {
            worker_binary: self.worker_binary.clone(),
            runtime_dir: self.runtime_dir.clone(),
            model_path,
            chat_template: settings.model.chat_template.clone(),
            ready_timeout: Duration::from_secs(settings.server.ready_timeout_secs),
        };
        Ok((plans, launch))
    }
}
