//! Loading [`Settings`]: the TOML file, then `LLAMAPOOL__SECTION__KEY` environment variables,
//! then command-line overrides, through the `config` crate; and [`check_host`], what start-up
//! needs from the machine beyond the settings themselves.
//!
//! Values from the environment and from overrides stay strings until a typed field asks for
//! a number or a boolean (`config`'s deserializer parses them then), so a string field keeps
//! exactly what was given: `LLAMAPOOL__SERVER__API_KEY=000123` is `"000123"`, not `123`.

use std::path::{Path, PathBuf};

use llamapool_common::settings::models::parse_preset;
pub use llamapool_common::settings::models_dir;
use llamapool_common::settings::{ModelEntry, ServerSettings, Settings, SettingsError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

/// The prefix of configuration variables: `LLAMAPOOL__SERVER__LISTEN` is `server.listen`.
pub const ENV_PREFIX: &str = "LLAMAPOOL";

/// Reads the layers in order (the file, this process's environment, `overrides`); later ones
/// win. `overrides` are `key=value` pairs with dotted keys.
pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Settings, ConfigError> {
    let mut settings = load_with_env(file, std::env::vars(), overrides)?;
    settings.cpu_quota = llamapool_common::cpus::cgroup_cpu_quota();
    Ok(settings)
}

/// [`load`] with `env` in place of the process environment (every variable; those without
/// the `LLAMAPOOL__` prefix are ignored).
pub fn load_with_env(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.to_path_buf()));
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    // No `try_parsing`: it would turn every value that looks like a number into one, so a
    // string field would get `000123` back as "123" and a 20-digit key rounded through f64.
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .source(Some(env.into_iter().collect())),
    );
    for (key, value) in overrides {
        builder = builder.set_override(key.as_str(), value.as_str())?;
    }
    Ok(builder.build()?.try_deserialize()?)
}

/// The models of `server.models_preset`, if one is set (llama-server's INI file).
pub fn read_preset(settings: &Settings) -> Result<Vec<ModelEntry>, SettingsError> {
    let Some(path) = &settings.server.models_preset else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError {
        key: "server.models_preset".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse_preset(&text)
}

/// The worker executable: `server.worker_binary`, else `llamapool-worker` next to this
/// executable.
pub fn worker_binary(server: &ServerSettings) -> std::io::Result<PathBuf> {
    match &server.worker_binary {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("llamapool-worker")),
    }
}

/// What the router needs from this machine before it starts anything: the worker executable
/// exists, `server.api_key_file` (if set) can be read and holds keys, and `server.listen` can
/// be bound (it is bound and released at once). A failure here is a configuration error like
/// a bad key: restarting does not help.
pub fn check_host(server: &ServerSettings) -> Result<(), SettingsError> {
    server.api_keys()?;
    let binary = worker_binary(server).map_err(|e| SettingsError {
        key: "server.worker_binary".into(),
        message: format!("cannot locate the default (next to this executable): {e}"),
    })?;
    if !binary.is_file() {
        return Err(SettingsError {
            key: "server.worker_binary".into(),
            message: format!("{} does not exist", binary.display()),
        });
    }
    let addresses = server.listen_addresses();
    if addresses.is_empty() {
        return Err(SettingsError {
            key: "server.listen".into(),
            message: "no address given".into(),
        });
    }
    for address in addresses {
        std::net::TcpListener::bind(&address).map_err(|e| SettingsError {
            key: "server.listen".into(),
            message: format!("cannot bind {address}: {e}"),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9\"\n[model]\nalias = \"a\"\n[[workers]]\ncpus = \"0\"\nslots = 2\n",
        )
        .unwrap();
        let s = load_with_env(Some(&file), [], &[("model.alias".into(), "b".into())]).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:9");
        assert_eq!(s.model.alias, "b");
        assert_eq!(s.workers[0].slots, Some(2));
        std::fs::write(&file, "[server]\nlisten_typo = 1\n").unwrap();
        assert!(
            load_with_env(Some(&file), [], &[]).is_err(),
            "unknown keys are errors"
        );
        assert!(matches!(
            load_with_env(Some(&dir.path().join("none.toml")), [], &[]),
            Err(ConfigError::MissingFile(_))
        ));
    }

    #[test]
    fn environment_strings_stay_strings() {
        for key in [
            "000123",
            "12345678901234567890",
            "98765432109876543210123",
            "1e3",
            "true",
        ] {
            let s = load_with_env(None, env(&[("LLAMAPOOL__SERVER__API_KEY", key)]), &[]).unwrap();
            assert_eq!(s.server.api_key.as_deref(), Some(key));
        }
        let s = load_with_env(None, env(&[("LLAMAPOOL__MODEL__ALIAS", "007")]), &[]).unwrap();
        assert_eq!(s.model.alias, "007");
        // Overrides were strings already; they stay so.
        let s = load_with_env(None, [], &[("server.api_key".into(), "000123".into())]).unwrap();
        assert_eq!(s.server.api_key.as_deref(), Some("000123"));
    }

    #[test]
    fn environment_strings_parse_into_typed_fields() {
        let s = load_with_env(
            None,
            env(&[
                ("LLAMAPOOL__SERVER__MAX_QUEUED", "16"),
                ("LLAMAPOOL__SERVER__KEEPALIVE_SECS", "0003"),
                ("LLAMAPOOL__WORKER_DEFAULTS__KV_UNIFIED", "false"),
                ("LLAMAPOOL__WORKER_DEFAULTS__FLASH_ATTENTION", "off"),
                ("LLAMAPOOL__SERVER__LISTEN", "0.0.0.0:8081"),
                ("OTHER__SERVER__MAX_QUEUED", "1"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.server.max_queued, 16);
        assert_eq!(s.server.keepalive_secs, 3);
        assert!(!s.worker_defaults.kv_unified);
        assert_eq!(
            s.worker_defaults.flash_attention,
            llamapool_common::worker::FlashAttention::Off
        );
        assert_eq!(s.server.listen, "0.0.0.0:8081");
        let s = load_with_env(
            None,
            env(&[("LLAMAPOOL__WORKER_DEFAULTS__KV_UNIFIED", "true")]),
            &[],
        )
        .unwrap();
        assert!(s.worker_defaults.kv_unified);
        for bad in [
            ("LLAMAPOOL__SERVER__MAX_QUEUED", "sixteen"),
            ("LLAMAPOOL__SERVER__MAX_QUEUED", "-1"),
            ("LLAMAPOOL__SERVER__NO_SUCH_KEY", "1"),
        ] {
            let err = load_with_env(None, env(&[bad]), &[]).unwrap_err();
            assert!(matches!(err, ConfigError::Load(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn access_lists_are_comma_separated_in_the_environment_and_overrides() {
        let s = load_with_env(
            None,
            env(&[
                ("LLAMAPOOL__SERVER__API_KEYS", "k1, k2"),
                ("LLAMAPOOL__SERVER__ADMIN_API_KEYS", "a1,a2"),
                ("LLAMAPOOL__SERVER__ALLOWED_HOSTS", "llm.example"),
                ("LLAMAPOOL__SERVER__CORS_ORIGINS", "http://a.example"),
            ]),
            &[(
                "server.cors_origins".into(),
                "http://b.example,https://c.example".into(),
            )],
        )
        .unwrap();
        assert_eq!(s.server.api_keys, ["k1", "k2"]);
        assert_eq!(s.server.admin_api_keys, ["a1", "a2"]);
        assert_eq!(s.server.allowed_hosts, ["llm.example"]);
        assert_eq!(
            s.server.cors_origins,
            ["http://b.example", "https://c.example"]
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\napi_keys = [\"a\", \"b,c\"]\ncors_origins = [\"*\"]\n",
        )
        .unwrap();
        let s = load_with_env(Some(&file), [], &[]).unwrap();
        assert_eq!(
            s.server.api_keys,
            ["a", "b,c"],
            "a TOML list is taken as is"
        );
        assert_eq!(s.server.cors_origins, ["*"]);
    }

    #[test]
    fn the_environment_sits_between_the_file_and_the_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nmax_queued = 1\nmax_body_bytes = 2048\n").unwrap();
        let vars = env(&[
            ("LLAMAPOOL__SERVER__MAX_QUEUED", "16"),
            ("LLAMAPOOL__SERVER__MAX_BODY_BYTES", "4096"),
        ]);
        let s = load_with_env(
            Some(&file),
            vars,
            &[("server.max_body_bytes".into(), "8192".into())],
        )
        .unwrap();
        assert_eq!(s.server.max_queued, 16);
        assert_eq!(s.server.max_body_bytes, 8192);
    }

    #[test]
    fn check_host_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let worker = dir.path().join("llamapool-worker");
        std::fs::write(&worker, "").unwrap();
        let ok = ServerSettings {
            listen: "127.0.0.1:0".into(),
            worker_binary: Some(worker),
            ..ServerSettings::default()
        };
        check_host(&ok).unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = ServerSettings {
            listen: taken.local_addr().unwrap().to_string(),
            ..ok.clone()
        };
        assert_eq!(check_host(&busy).unwrap_err().key, "server.listen");
        let nonsense = ServerSettings {
            listen: "not an address".into(),
            ..ok.clone()
        };
        assert_eq!(check_host(&nonsense).unwrap_err().key, "server.listen");
        let missing = ServerSettings {
            worker_binary: Some(dir.path().join("none")),
            ..ok
        };
        assert_eq!(
            check_host(&missing).unwrap_err().key,
            "server.worker_binary"
        );
    }
}
