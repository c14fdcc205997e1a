//! Named contexts for operators with several brokers, and how the connection settings of one run
//! are resolved: flags and environment first, then the context in use, then the defaults.
//!
//! The file is YAML at `$TOKENFLEETCTL_CONFIG`, else `$XDG_CONFIG_HOME/tokenfleetctl/config.yaml`,
//! else `~/.config/tokenfleetctl/config.yaml`; it is written owner-only (0600) in a 0700 directory,
//! through a temporary file and a rename so a crash never leaves half a file. It names key files;
//! it never holds a key.
//!
//! ```yaml
//! current-context: east
//! contexts:
//!   east:
//!     broker: https://broker-east.example:50051
//!     ca-file: /etc/tokenfleet/east-ca.pem
//!     key-file: /home/op/.config/tokenfleet/east.key
//!     tenant: acme
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::CtlError;

/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "TOKENFLEETCTL_CONFIG";

/// Broker address used when no flag, environment variable or context names one.
/// (`https://localhost`: the broker serves TLS, and `serve --dev` issues its certificate for
/// `localhost`; the dev CA is found in `./tokenfleet-data/`.)
pub const DEFAULT_BROKER: &str = "https://localhost:50051";

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// Context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// The contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One broker and how to talk to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Context {
    /// Admin API URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// CA certificate (PEM) of an `https://` broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// File holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Default tenant of the scoped commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// What the flags and the environment say (each `None` when neither does).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub broker: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub api_key_file: Option<PathBuf>,
    pub context: Option<String>,
    pub timeout: u64,
}

/// The settings of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    /// `--api-key-file` (wins over the environment).
    pub api_key_file: Option<PathBuf>,
    /// The context's key file (used when neither the flag nor the environment gives a key).
    pub context_key_file: Option<PathBuf>,
    /// The context's default tenant.
    pub tenant: Option<String>,
    pub timeout: u64,
    /// Name of the context in use, if any.
    pub context: Option<String>,
}

/// Where the config file is: `$TOKENFLEETCTL_CONFIG`, the XDG config directory, or
/// `~/.config`. `env` reads an environment variable (injected for tests).
pub fn config_path(env: impl Fn(&str) -> Option<String>) -> Result<PathBuf, CtlError> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(path) = set(ENV_CONFIG) {
        return Ok(PathBuf::from(path));
    }
    let dir = match (set("XDG_CONFIG_HOME"), set("HOME")) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => PathBuf::from(home).join(".config"),
        (None, None) => {
            return Err(CtlError::usage(format!(
                "no place for the config file: set {ENV_CONFIG}, XDG_CONFIG_HOME or HOME"
            )));
        }
    };
    Ok(dir.join("tokenfleetctl").join("config.yaml"))
}

/// Reads the config file; a missing file is an empty config.
pub fn load(path: &Path) -> Result<ConfigFile, CtlError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => {
            return Err(CtlError::usage(format!(
                "cannot read config file {}: {}",
                path.display(),
                crate::input::io_problem(&e)
            )));
        }
    };
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_norway::from_str(&text)
        .map_err(|e| CtlError::usage(format!("config file {}: {e}", path.display())))
}

/// Writes the config file owner-only (0600), atomically.
pub fn save(path: &Path, config: &ConfigFile) -> Result<(), CtlError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let problem = |what: &str, e: std::io::Error| {
        CtlError::usage(format!(
            "cannot write config file {} ({what}): {}",
            path.display(),
            crate::input::io_problem(&e)
        ))
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| problem("creating its directory", e))?;
    let text = serde_norway::to_string(config)
        .map_err(|e| CtlError::Output(format!("encoding the config file: {e}")))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.yaml".to_owned());
    let temp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| {
            // A leftover temporary file of the same name may have had other permissions.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(problem("writing", e));
    }
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        problem("replacing", e)
    })
}

/// Resolves the settings of one run: flags and environment override the context (`--context`,
/// else the file's current context), which overrides the defaults.
pub fn resolve(overrides: Overrides, file: &ConfigFile) -> Result<Settings, CtlError> {
    let name = overrides.context.or_else(|| file.current_context.clone());
    let context = match &name {
        None => Context::default(),
        Some(name) => file.contexts.get(name).cloned().ok_or_else(|| {
            CtlError::usage(format!(
                "no context `{name}` in the config file (known: {}); see `tokenfleetctl config get-contexts`",
                known(file)
            ))
        })?,
    };
    Ok(Settings {
        broker: overrides
            .broker
            .or(context.broker)
            .unwrap_or_else(|| DEFAULT_BROKER.to_owned()),
        ca_file: overrides.ca_file.or(context.ca_file),
        api_key_file: overrides.api_key_file,
        context_key_file: context.key_file,
        tenant: context.tenant.filter(|t| !t.is_empty()),
        timeout: overrides.timeout,
        context: name,
    })
}

/// The context names, for messages.
pub fn known(file: &ConfigFile) -> String {
    if file.contexts.is_empty() {
        "none".to_owned()
    } else {
        file.contexts
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Accepts only `http://` and `https://` URLs with a host.
pub fn parse_broker_url(text: &str) -> Result<String, String> {
    let uri: tonic::transport::Uri = text
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. {DEFAULT_BROKER}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "must start with http:// or https://, e.g. {DEFAULT_BROKER}"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host; expected e.g. {DEFAULT_BROKER}"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> ConfigFile {
        let mut contexts = BTreeMap::new();
        contexts.insert(
            "east".to_owned(),
            Context {
                broker: Some("https://east.example:50051".into()),
                ca_file: Some("/ca/east.pem".into()),
                key_file: Some("/keys/east".into()),
                tenant: Some("acme".into()),
            },
        );
        contexts.insert(
            "west".to_owned(),
            Context {
                broker: Some("https://west.example:50051".into()),
                ..Default::default()
            },
        );
        ConfigFile {
            current_context: Some("east".into()),
            contexts,
        }
    }

    #[test]
    fn flags_override_the_context_which_overrides_defaults() {
        let s = resolve(Overrides::default(), &file()).unwrap();
        assert_eq!(s.broker, "https://east.example:50051");
        assert_eq!(s.tenant.as_deref(), Some("acme"));
        assert_eq!(s.context_key_file, Some(PathBuf::from("/keys/east")));
        let s = resolve(
            Overrides {
                broker: Some("http://127.0.0.1:1".into()),
                context: Some("west".into()),
                ..Default::default()
            },
            &file(),
        )
        .unwrap();
        assert_eq!(s.broker, "http://127.0.0.1:1");
        assert_eq!(s.ca_file, None);
        assert_eq!(s.context.as_deref(), Some("west"));
        let s = resolve(Overrides::default(), &ConfigFile::default()).unwrap();
        assert_eq!(s.broker, DEFAULT_BROKER);
    }

    #[test]
    fn an_unknown_context_names_the_known_ones() {
        let err = resolve(
            Overrides {
                context: Some("north".into()),
                ..Default::default()
            },
            &file(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("east, west"), "{err}");
    }

    #[test]
    fn the_file_round_trips_and_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.yaml");
        assert_eq!(load(&path).unwrap(), ConfigFile::default());
        save(&path, &file()).unwrap();
        assert_eq!(load(&path).unwrap(), file());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "contexts: {east: {brokr: x}}").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("brokr"));
    }

    #[test]
    fn the_path_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            config_path(env(&[(ENV_CONFIG, "/x/c.yaml"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x/c.yaml")
        );
        assert_eq!(
            config_path(env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/xdg/tokenfleetctl/config.yaml")
        );
        assert_eq!(
            config_path(env(&[("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.config/tokenfleetctl/config.yaml")
        );
        assert!(config_path(env(&[])).is_err());
    }
}
