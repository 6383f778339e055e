//! Loading [`Settings`]: the TOML file, then `LLAMAPOOL__SECTION__KEY` environment variables,
//! then command-line overrides, through the `config` crate.

use std::path::{Path, PathBuf};

pub use llamapool_common::settings::models_dir;
use llamapool_common::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

/// Reads the layers in order; later ones win. `overrides` are `key=value` pairs with dotted keys.
pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.to_path_buf()));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("LLAMAPOOL")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    for (key, value) in overrides {
        builder = builder.set_override(key.as_str(), value.as_str())?;
    }
    Ok(builder.build()?.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9\"\n[model]\nalias = \"a\"\n[[workers]]\ncpus = \"0\"\nslots = 2\n",
        )
        .unwrap();
        let s = load(Some(&file), &[("model.alias".into(), "b".into())]).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:9");
        assert_eq!(s.model.alias, "b");
        assert_eq!(s.workers[0].slots, Some(2));
        std::fs::write(&file, "[server]\nlisten_typo = 1\n").unwrap();
        assert!(load(Some(&file), &[]).is_err(), "unknown keys are errors");
        assert!(matches!(
            load(Some(&dir.path().join("none.toml")), &[]),
            Err(ConfigError::MissingFile(_))
        ));
    }
}
