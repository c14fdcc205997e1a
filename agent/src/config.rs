//! The agent's local configuration file: what only the site knows (listen addresses, the spool,
//! retry policy). Device configuration comes from the broker (`GetAgentConfig`).
//!
//! Layers, later ones win: built-in defaults → the TOML file given with `--config` →
//! `TOKENFLEET_AGENT_*` environment variables (nested keys joined with `__`). Unknown keys are
//! refused with their name; the binary exits with 64 (`EX_USAGE`) on a bad configuration.
//!
//! ```toml
//! state_dir = "/var/lib/tokenfleet-agent"   # key, certificate, counters, cached config
//! # broker_url = "https://broker.example.com:50051"  # default: the one stored by `enroll`
//! # spool_dir = "/var/lib/tokenfleet-agent/spool"    # default: <state_dir>/spool
//! smtp_listen = "127.0.0.1:2525"
//! pop3_listen = "127.0.0.1:1110"             # "" = no local POP3 server
//! # ingress_tls_cert_file = "/etc/tokenfleet-agent/ingress.pem"  # STARTTLS for devices
//! # ingress_tls_key_file = "/etc/tokenfleet-agent/ingress.key"
//! ingress_require_tls = false                # true: no AUTH/MAIL (SMTP), USER/PASS (POP3) before TLS
//! delivery_concurrency = 4
//! retry_base_seconds = 30
//! retry_max_seconds = 3600
//! max_attempts = 0                           # 0 = no limit (max_age_seconds still applies)
//! max_age_seconds = 432000                   # 5 days, then the message is dead-lettered
//! token_renew_margin_seconds = 300
//! bounce = false                             # DSN to the sender on a permanent failure
//! shutdown_grace_seconds = 30
//! # heartbeat_seconds = 2                    # overrides the broker's value (tests)
//! connection_test_interval_seconds = 3600    # periodic connection tests; 0 = off
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "TOKENFLEET_AGENT_";

/// A bad configuration: the message names the key or file.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The configuration as written (file and environment); see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    /// State directory (mode 0700, created): identity, counters, cached broker configuration.
    pub state_dir: PathBuf,
    /// Broker URL; empty = the one `enroll` stored in the state directory.
    pub broker_url: String,
    /// Spool directory; empty = `<state_dir>/spool`.
    pub spool_dir: String,
    /// SMTP ingress listen address.
    pub smtp_listen: String,
    /// Local POP3 server listen address; empty = none.
    pub pop3_listen: String,
    /// Certificate chain (PEM) for STARTTLS on the ingress; empty = no STARTTLS.
    pub ingress_tls_cert_file: String,
    /// Private key (PEM) for STARTTLS on the ingress.
    pub ingress_tls_key_file: String,
    /// Refuse logins and mail from devices until they have started TLS (SMTP `STARTTLS`, POP3
    /// `STLS`); needs the ingress certificate.
    pub ingress_require_tls: bool,
    /// Deliveries running at once.
    pub delivery_concurrency: u32,
    /// First retry delay in seconds (doubled per attempt, with jitter).
    pub retry_base_seconds: u64,
    /// Longest retry delay in seconds.
    pub retry_max_seconds: u64,
    /// Attempts after which a message is dead-lettered; 0 = no limit.
    pub max_attempts: u32,
    /// Age in seconds after which an undelivered message is dead-lettered.
    pub max_age_seconds: u64,
    /// Access tokens are renewed this many seconds before they expire.
    pub token_renew_margin_seconds: u64,
    /// Send a delivery status notification to the sender when a message is dead-lettered.
    pub bounce: bool,
    /// Longest wait for running deliveries at shutdown, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Seconds between status reports, overriding the broker's `heartbeat_seconds`; 0 = the
    /// broker's value.
    pub heartbeat_seconds: u32,
    /// Seconds between periodic connection tests of each device's send and fetch profiles;
    /// 0 = no periodic tests (on-demand tests still work).
    pub connection_test_interval_seconds: u64,
}

impl Default for RawAgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("./tokenfleet-agent-data"),
            broker_url: String::new(),
            spool_dir: String::new(),
            smtp_listen: "127.0.0.1:2525".to_owned(),
            pop3_listen: "127.0.0.1:1110".to_owned(),
            ingress_tls_cert_file: String::new(),
            ingress_tls_key_file: String::new(),
            ingress_require_tls: false,
            delivery_concurrency: 4,
            retry_base_seconds: 30,
            retry_max_seconds: 3600,
            max_attempts: 0,
            max_age_seconds: 5 * 24 * 3600,
            token_renew_margin_seconds: 300,
            bounce: false,
            shutdown_grace_seconds: 30,
            heartbeat_seconds: 0,
            connection_test_interval_seconds: 3600,
        }
    }
}

/// The validated local configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// State directory.
    pub state_dir: PathBuf,
    /// Broker URL override (`None` = from the stored identity).
    pub broker_url: Option<String>,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// SMTP ingress listen address.
    pub smtp_listen: SocketAddr,
    /// POP3 server listen address, if any.
    pub pop3_listen: Option<SocketAddr>,
    /// Ingress STARTTLS certificate and key files, if configured (SMTP `STARTTLS` and POP3
    /// `STLS`).
    pub ingress_tls: Option<(PathBuf, PathBuf)>,
    /// Devices must start TLS before logging in or sending.
    pub ingress_require_tls: bool,
    /// Deliveries at once (at least 1).
    pub delivery_concurrency: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Attempts before dead-lettering (`None` = no limit).
    pub max_attempts: Option<u32>,
    /// Age before dead-lettering.
    pub max_age: Duration,
    /// Renew tokens this long before expiry.
    pub token_renew_margin: Duration,
    /// Bounce dead-lettered messages to the sender.
    pub bounce: bool,
    /// Longest wait for running deliveries at shutdown.
    pub shutdown_grace: Duration,
    /// Heartbeat override.
    pub heartbeat: Option<Duration>,
    /// Interval of the periodic connection tests (`None` = off).
    pub connection_test_interval: Option<Duration>,
}

impl AgentSettings {
    /// Loads defaults → `file` (if given; it must exist) → environment, and validates.
    /// `state_dir` (from the command line) wins over both when given.
    pub fn load(file: Option<&Path>, state_dir: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawAgentConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "--config {}: no such file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        if let Some(dir) = state_dir {
            figment = figment.merge(Serialized::default("state_dir", dir));
        }
        let raw: RawAgentConfig = figment.extract().map_err(|e| ConfigError(describe(e)))?;
        Self::validate(raw)
    }

    /// Checks and converts a raw configuration.
    pub fn validate(raw: RawAgentConfig) -> Result<Self, ConfigError> {
        let addr = |key: &str, value: &str| -> Result<SocketAddr, ConfigError> {
            value.parse().map_err(|e| {
                ConfigError(format!(
                    "{key} = {value:?}: not an address like 127.0.0.1:2525 ({e})"
                ))
            })
        };
        if raw.state_dir.as_os_str().is_empty() {
            return Err(ConfigError("state_dir: must not be empty".to_owned()));
        }
        let broker_url = match raw.broker_url.trim() {
            "" => None,
            url if url.starts_with("https://") => Some(url.to_owned()),
            url => {
                return Err(ConfigError(format!(
                    "broker_url = {url:?}: must be an https:// URL"
                )));
            }
        };
        let spool_dir = if raw.spool_dir.is_empty() {
            raw.state_dir.join("spool")
        } else {
            PathBuf::from(&raw.spool_dir)
        };
        let pop3_listen = match raw.pop3_listen.trim() {
            "" => None,
            value => Some(addr("pop3_listen", value)?),
        };
        let ingress_tls = match (
            raw.ingress_tls_cert_file.is_empty(),
            raw.ingress_tls_key_file.is_empty(),
        ) {
            (true, true) => None,
            (false, false) => Some((
                PathBuf::from(&raw.ingress_tls_cert_file),
                PathBuf::from(&raw.ingress_tls_key_file),
            )),
            (false, true) => {
                return Err(ConfigError(
                    "ingress_tls_key_file: must be set together with ingress_tls_cert_file"
                        .to_owned(),
                ));
            }
            (true, false) => {
                return Err(ConfigError(
                    "ingress_tls_cert_file: must be set together with ingress_tls_key_file"
                        .to_owned(),
                ));
            }
        };
        if raw.ingress_require_tls && ingress_tls.is_none() {
            return Err(ConfigError(
                "ingress_require_tls: needs ingress_tls_cert_file and ingress_tls_key_file"
                    .to_owned(),
            ));
        }
        if raw.delivery_concurrency == 0 || raw.delivery_concurrency > 256 {
            return Err(ConfigError(format!(
                "delivery_concurrency = {}: must be 1 to 256",
                raw.delivery_concurrency
            )));
        }
        if raw.retry_base_seconds == 0 {
            return Err(ConfigError(
                "retry_base_seconds: must be at least 1".to_owned(),
            ));
        }
        if raw.retry_max_seconds < raw.retry_base_seconds {
            return Err(ConfigError(format!(
                "retry_max_seconds = {}: must not be less than retry_base_seconds ({})",
                raw.retry_max_seconds, raw.retry_base_seconds
            )));
        }
        if raw.max_age_seconds == 0 {
            return Err(ConfigError(
                "max_age_seconds: must be at least 1".to_owned(),
            ));
        }
        Ok(Self {
            smtp_listen: addr("smtp_listen", &raw.smtp_listen)?,
            state_dir: raw.state_dir,
            broker_url,
            spool_dir,
            pop3_listen,
            ingress_tls,
            ingress_require_tls: raw.ingress_require_tls,
            delivery_concurrency: raw.delivery_concurrency as usize,
            retry_base: Duration::from_secs(raw.retry_base_seconds),
            retry_max: Duration::from_secs(raw.retry_max_seconds),
            max_attempts: (raw.max_attempts > 0).then_some(raw.max_attempts),
            max_age: Duration::from_secs(raw.max_age_seconds),
            token_renew_margin: Duration::from_secs(raw.token_renew_margin_seconds),
            bounce: raw.bounce,
            shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds),
            heartbeat: (raw.heartbeat_seconds > 0)
                .then(|| Duration::from_secs(u64::from(raw.heartbeat_seconds))),
            connection_test_interval: (raw.connection_test_interval_seconds > 0)
                .then(|| Duration::from_secs(raw.connection_test_interval_seconds)),
        })
    }
}

/// One line per figment error, naming the key and where its value came from.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", e.path.join("."))
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (in {} {source})", m.name),
                    None => format!(" (in {})", m.name),
                })
                .unwrap_or_default();
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = AgentSettings::validate(RawAgentConfig::default()).unwrap();
        assert_eq!(s.smtp_listen.to_string(), "127.0.0.1:2525");
        assert_eq!(s.pop3_listen.unwrap().to_string(), "127.0.0.1:1110");
        assert_eq!(s.spool_dir, PathBuf::from("./tokenfleet-agent-data/spool"));
        assert_eq!(s.delivery_concurrency, 4);
        assert_eq!(s.retry_base, Duration::from_secs(30));
        assert_eq!(s.max_age, Duration::from_secs(432_000));
        assert_eq!(s.token_renew_margin, Duration::from_secs(300));
        assert!(!s.bounce);
        assert_eq!(s.connection_test_interval, Some(Duration::from_secs(3600)));
        let off = AgentSettings::validate(RawAgentConfig {
            connection_test_interval_seconds: 0,
            ..RawAgentConfig::default()
        })
        .unwrap();
        assert_eq!(off.connection_test_interval, None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: fn(&mut RawAgentConfig), key: &str| {
            let mut raw = RawAgentConfig::default();
            f(&mut raw);
            let e = AgentSettings::validate(raw).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(|r| r.smtp_listen = "nope".into(), "smtp_listen");
        bad(|r| r.delivery_concurrency = 0, "delivery_concurrency");
        bad(|r| r.retry_max_seconds = 1, "retry_max_seconds");
        bad(|r| r.broker_url = "http://x".into(), "broker_url");
        bad(
            |r| r.ingress_tls_cert_file = "a.pem".into(),
            "ingress_tls_key_file",
        );
        bad(|r| r.ingress_require_tls = true, "ingress_require_tls");
    }
}
