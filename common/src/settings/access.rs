//! Access rules in the settings: which API keys and admin keys open the server (with the
//! key files read at start-up), which CORS origins and `Host` names are well-formed, and
//! which origins are local. Pure functions and checks over [`ServerSettings`]; the HTTP
//! layer (`router/src/http/auth.rs`, `access.rs`, `cors.rs`) enforces them per request.

use std::path::Path;

use super::{bad, ServerSettings, SettingsError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpus::CpuList;
    use crate::settings::Settings;

    fn allowed() -> CpuList {
        CpuList::parse("0-3").unwrap()
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
}
