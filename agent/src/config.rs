//! The agent's local configuration file: what only the site knows (listen addresses, the spool,
//! retry policy). Device configuration comes from the broker (`GetAgentConfig`).
//!
//! Layers, later ones win: built-in defaults → the TOML file given with `--config` →
//! `TOKENFLEET_AGENT_*` environment variables (nested keys joined with `__`). Every unknown key,
//! value of the wrong type and invalid value is reported at once, each naming its key and, for
//! the first two, where it came from (the file, or the environment variable); the binary exits
//! with 64 (`EX_USAGE`) on a bad configuration. [`DEFAULT_CONFIG_TOML`] (`tokenfleet-agent
//! default-config`) documents every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// How the environment names keys (`TOKENFLEET_AGENT_` + `INGRESS_LIMITS__MAX_SESSIONS`).
const ENV: tokenfleet_configkit::EnvNaming<'static> = tokenfleet_configkit::EnvNaming {
    prefix: ENV_PREFIX,
    separator: "__",
};

/// `line` (a problem starting with its key: `key = value: …` or `key: …`) with where the key's
/// value came from, when that is a file or an environment variable.
fn with_source(line: String, figment: &Figment) -> String {
    let key = line
        .split([' ', ':'])
        .next()
        .unwrap_or_default()
        .trim_matches('`');
    match tokenfleet_configkit::source(figment, key, ENV) {
        Some(source) => format!("{line} ({source})"),
        None => line,
    }
}

/// Every key with its default and a comment (`tokenfleet-agent default-config`); parses back to
/// [`RawAgentConfig::default`].
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "TOKENFLEET_AGENT_";

/// A bad configuration: the message names the key or file.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// One error for several problems: the only one, or `N problems:` and one per line.
    pub fn all(problems: Vec<String>) -> Self {
        match problems.as_slice() {
            [one] => Self(one.clone()),
            _ => Self(format!(
                "{} problems:\n  {}",
                problems.len(),
                problems.join("\n  ")
            )),
        }
    }
}

/// The configuration as written (file and environment); see the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
    /// Limits of the SMTP ingress and the local POP3 server.
    pub ingress_limits: RawIngressLimits,
    /// The metrics and health listener.
    pub metrics: RawMetrics,
    /// Logging.
    pub log: RawLog,
    /// OpenTelemetry traces (OTLP over gRPC); off unless `otlp_endpoint` is set.
    pub tracing: RawTracing,
}

/// `[metrics]`: the HTTP listener serving `/metrics` (Prometheus) and `/healthz`, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Listen address; empty = no metrics listener.
    pub listen: String,
    /// Connections at once, all sources together.
    pub max_connections: u32,
    /// Connections at once from one IPv4 address or IPv6 /64.
    pub max_connections_per_source: u32,
    /// Longest a connection may stay open, in seconds.
    pub max_connection_seconds: u64,
    /// Longest wait for a complete request header, in seconds.
    pub header_read_timeout_seconds: u64,
    /// Largest request header in bytes (request line and fields); larger ones get 431.
    pub max_request_header_bytes: u64,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9465".to_owned(),
            max_connections: 16,
            max_connections_per_source: 8,
            max_connection_seconds: 60,
            header_read_timeout_seconds: 10,
            max_request_header_bytes: 8192,
        }
    }
}

impl RawMetrics {
    /// The validated section, or every problem (each naming its `metrics.*` key).
    fn validate(&self) -> Result<MetricsSettings, Vec<String>> {
        let mut problems = Vec::new();
        let mut range = |key: &str, value: u64, min: u64, max: u64| {
            if !(min..=max).contains(&value) {
                problems.push(format!("metrics.{key} = {value}: must be {min} to {max}"));
            }
        };
        range("max_connections", self.max_connections.into(), 1, 10_000);
        range(
            "max_connections_per_source",
            self.max_connections_per_source.into(),
            1,
            u64::from(self.max_connections.max(1)),
        );
        range(
            "max_connection_seconds",
            self.max_connection_seconds,
            1,
            3600,
        );
        range(
            "header_read_timeout_seconds",
            self.header_read_timeout_seconds,
            1,
            300,
        );
        range(
            "max_request_header_bytes",
            self.max_request_header_bytes,
            crate::metrics::server::MIN_HEADER_BYTES as u64,
            1 << 20,
        );
        let listen = match self.listen.trim() {
            "" => None,
            value => match value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    problems.push(format!(
                        "metrics.listen = {value:?}: not an address like 127.0.0.1:9465 ({e}); \"\" turns the listener off"
                    ));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(MetricsSettings {
            listen,
            limits: crate::metrics::MetricsLimits {
                connections: crate::line_server::SessionLimits {
                    max_sessions: usize_of(self.max_connections.into()),
                    max_sessions_per_source: usize_of(self.max_connections_per_source.into()),
                    max_session: Duration::from_secs(self.max_connection_seconds),
                },
                header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds),
                max_header_bytes: usize_of(self.max_request_header_bytes),
            },
        })
    }
}

/// The validated `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Where `/metrics` and `/healthz` are served (`None` = nowhere).
    pub listen: Option<SocketAddr>,
    /// The listener's limits.
    pub limits: crate::metrics::MetricsLimits,
}
/// The agent as a traced program: its default `service.name`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentProgram;

impl tokenfleet_telemetry::Program for AgentProgram {
    const SERVICE_NAME: &'static str = "tokenfleet-agent";
}

/// `[tracing]` of the agent.
pub type RawTracing = tokenfleet_telemetry::RawTracing<AgentProgram>;

/// `[log]`: what the agent logs, and how (to stderr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// Filter in tracing's EnvFilter syntax (`info`, `debug`, `info,tokenfleet_agent=debug`);
    /// `RUST_LOG` wins when set.
    pub level: String,
    /// `text` (for a person) or `json` (one object per line, for a log pipeline).
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: "text".to_owned(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[ingress_limits]`: what one device, or anyone who can reach the listeners, may use. See the
/// module documentation for the defaults; the README's "Agent listener limits" section explains
/// how they bound the agent's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIngressLimits {
    /// Sessions at once per listener, all sources together.
    pub max_sessions: u32,
    /// Sessions at once per listener from one IPv4 address or IPv6 /64.
    pub max_sessions_per_source: u32,
    /// Longest a session may last, in seconds.
    pub max_session_seconds: u64,
    /// Longest wait for a command or a DATA line, in seconds.
    pub idle_timeout_seconds: u64,
    /// POP3: longest wait for a command, in seconds (RFC 1939 asks for at least 600).
    pub pop3_idle_timeout_seconds: u64,
    /// Bytes of an arriving message kept in memory (the header block must fit).
    pub message_memory_bytes: u64,
    /// Largest message accepted, in bytes.
    pub max_message_bytes: u64,
    /// Password (argon2) checks running at once; 0 = one per core.
    pub password_hash_concurrency: u32,
    /// Largest argon2 memory cost, in KiB, accepted in a stored password hash.
    pub password_hash_max_memory_kib: u32,
    /// Seconds a verified login is remembered (as a keyed hash); 0 = always check.
    pub verified_login_cache_seconds: u64,
    /// Failed logins per source or user name before answers are delayed.
    pub login_slowdown_after: u32,
    /// Longest delay of one failed-login answer, in seconds.
    pub login_max_delay_seconds: u64,
    /// Failed logins per source or user name within the window that lock it.
    pub login_lockout_after: u32,
    /// Window in which failed logins are counted, in seconds.
    pub login_failure_window_seconds: u64,
    /// How long a lock lasts, in seconds.
    pub login_lockout_seconds: u64,
    /// Spool quota: bytes of queued messages.
    pub spool_max_bytes: u64,
    /// Spool quota: queued messages.
    pub spool_max_messages: u64,
}

impl Default for RawIngressLimits {
    fn default() -> Self {
        Self {
            max_sessions: 100,
            max_sessions_per_source: 10,
            max_session_seconds: 1800,
            idle_timeout_seconds: 300,
            pop3_idle_timeout_seconds: 600,
            message_memory_bytes: 64 * 1024,
            max_message_bytes: 35 * 1024 * 1024,
            password_hash_concurrency: 0,
            password_hash_max_memory_kib: 64 * 1024,
            verified_login_cache_seconds: 300,
            login_slowdown_after: 3,
            login_max_delay_seconds: 5,
            login_lockout_after: 10,
            login_failure_window_seconds: 900,
            login_lockout_seconds: 900,
            spool_max_bytes: 1 << 30,
            spool_max_messages: 10_000,
        }
    }
}

/// The validated `[ingress_limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressLimits {
    /// Session caps (per listener).
    pub sessions: crate::line_server::SessionLimits,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// POP3 idle timeout.
    pub pop3_idle_timeout: Duration,
    /// Bytes of a message in memory.
    pub message_memory: usize,
    /// Largest message.
    pub max_message_size: usize,
    /// Password checking.
    pub passwords: crate::ingress::PasswordSettings,
    /// Failed-login throttling.
    pub logins: crate::ingress::LoginLimits,
    /// Spool quota.
    pub spool: crate::spool::SpoolLimits,
}

impl RawIngressLimits {
    fn validate(&self) -> Result<IngressLimits, ConfigError> {
        let range = |key: &str, value: u64, min: u64, max: u64| -> Result<(), ConfigError> {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError(format!(
                    "ingress_limits.{key} = {value}: must be {min} to {max}"
                )))
            }
        };
        range("max_sessions", self.max_sessions.into(), 1, 100_000)?;
        range(
            "max_sessions_per_source",
            self.max_sessions_per_source.into(),
            1,
            u64::from(self.max_sessions),
        )?;
        range("idle_timeout_seconds", self.idle_timeout_seconds, 5, 3600)?;
        range("max_session_seconds", self.max_session_seconds, 10, 86_400)?;
        range(
            "pop3_idle_timeout_seconds",
            self.pop3_idle_timeout_seconds,
            5,
            3600,
        )?;
        range("max_message_bytes", self.max_message_bytes, 1024, 1 << 30)?;
        range(
            "message_memory_bytes",
            self.message_memory_bytes,
            4096,
            self.max_message_bytes.max(4096),
        )?;
        range(
            "password_hash_concurrency",
            self.password_hash_concurrency.into(),
            0,
            64,
        )?;
        range(
            "password_hash_max_memory_kib",
            self.password_hash_max_memory_kib.into(),
            8,
            4 * 1024 * 1024,
        )?;
        range(
            "verified_login_cache_seconds",
            self.verified_login_cache_seconds,
            0,
            86_400,
        )?;
        range(
            "login_lockout_after",
            self.login_lockout_after.into(),
            1,
            1_000_000,
        )?;
        range(
            "login_max_delay_seconds",
            self.login_max_delay_seconds,
            0,
            60,
        )?;
        range(
            "login_failure_window_seconds",
            self.login_failure_window_seconds,
            1,
            7 * 86_400,
        )?;
        range(
            "login_lockout_seconds",
            self.login_lockout_seconds,
            1,
            7 * 86_400,
        )?;
        range("spool_max_bytes", self.spool_max_bytes, 1024, u64::MAX)?;
        range("spool_max_messages", self.spool_max_messages, 1, 10_000_000)?;
        let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(IngressLimits {
            sessions: crate::line_server::SessionLimits {
                max_sessions: usize_of(self.max_sessions.into()),
                max_sessions_per_source: usize_of(self.max_sessions_per_source.into()),
                max_session: Duration::from_secs(self.max_session_seconds),
            },
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
            pop3_idle_timeout: Duration::from_secs(self.pop3_idle_timeout_seconds),
            message_memory: usize_of(self.message_memory_bytes),
            max_message_size: usize_of(self.max_message_bytes),
            passwords: crate::ingress::PasswordSettings {
                concurrency: usize_of(self.password_hash_concurrency.into()),
                max_memory_kib: self.password_hash_max_memory_kib,
                cache_for: Duration::from_secs(self.verified_login_cache_seconds),
                ..crate::ingress::PasswordSettings::default()
            },
            logins: crate::ingress::LoginLimits {
                slowdown_after: self.login_slowdown_after,
                max_delay: Duration::from_secs(self.login_max_delay_seconds),
                lockout_after: self.login_lockout_after,
                failure_window: Duration::from_secs(self.login_failure_window_seconds),
                lockout: Duration::from_secs(self.login_lockout_seconds),
                ..crate::ingress::LoginLimits::default()
            },
            spool: crate::spool::SpoolLimits {
                max_bytes: self.spool_max_bytes,
                max_messages: usize_of(self.spool_max_messages),
            },
        })
    }
}

impl RawAgentConfig {
    /// Reads defaults → `file` (if given; it must exist) → environment, every unknown key and
    /// ill-typed value reported at once; `state_dir` (from the command line) wins when given.
    pub fn load_raw(file: Option<&Path>, state_dir: Option<&Path>) -> Result<Self, ConfigError> {
        Self::extract(&Self::figment(file, state_dir)?)
    }

    /// The layered sources: defaults, `file`, the environment, `state_dir`.
    fn figment(file: Option<&Path>, state_dir: Option<&Path>) -> Result<Figment, ConfigError> {
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
        Ok(figment)
    }

    /// [`RawAgentConfig::load_raw`] from built sources.
    fn extract(figment: &Figment) -> Result<Self, ConfigError> {
        tokenfleet_configkit::extract_reporting_all(figment, ENV).map_err(|problems| {
            // The values that did extract are checked too: one run reports everything.
            let mut lines = problems.lines;
            if let Some(Err(invalid)) = problems.repaired.map(AgentSettings::check) {
                lines.extend(invalid.into_iter().map(|line| with_source(line, figment)));
            }
            ConfigError::all(lines)
        })
    }

    /// The configuration as TOML (`tokenfleet-agent print-config`; it holds no secrets).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError(format!("printing the configuration: {e}")))
    }
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
            delivery_concurrency: 16,
            retry_base_seconds: 30,
            retry_max_seconds: 3600,
            max_attempts: 0,
            max_age_seconds: 5 * 24 * 3600,
            token_renew_margin_seconds: 300,
            bounce: false,
            shutdown_grace_seconds: 30,
            heartbeat_seconds: 0,
            connection_test_interval_seconds: 3600,
            ingress_limits: RawIngressLimits::default(),
            metrics: RawMetrics::default(),
            log: RawLog::default(),
            tracing: RawTracing::default(),
        }
    }
}

/// The validated local configuration.
#[derive(Debug, Clone, PartialEq)]
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
    /// Limits of the SMTP ingress, the local POP3 server and the spool.
    pub ingress_limits: IngressLimits,
    /// The metrics and health listener (`[metrics]`).
    pub metrics: MetricsSettings,
    /// Log filter (`[log] level`).
    pub log_level: String,
    /// Log line format (`[log] format`).
    pub log_format: LogFormat,
    /// OpenTelemetry traces (`[tracing]`).
    pub tracing: tokenfleet_telemetry::TracingSettings,
}

impl AgentSettings {
    /// Loads defaults → `file` (if given; it must exist) → environment, and validates.
    /// `state_dir` (from the command line) wins over both when given.
    pub fn load(file: Option<&Path>, state_dir: Option<&Path>) -> Result<Self, ConfigError> {
        let figment = RawAgentConfig::figment(file, state_dir)?;
        let raw = RawAgentConfig::extract(&figment)?;
        Self::check(raw).map_err(|invalid| {
            ConfigError::all(
                invalid
                    .into_iter()
                    .map(|line| with_source(line, &figment))
                    .collect(),
            )
        })
    }

    /// Checks and converts a raw configuration.
    pub fn validate(raw: RawAgentConfig) -> Result<Self, ConfigError> {
        Self::check(raw).map_err(ConfigError::all)
    }

    /// [`AgentSettings::validate`] with every problem as a line of its own (key first).
    fn check(raw: RawAgentConfig) -> Result<Self, Vec<String>> {
        // Every check runs; all problems are reported at once.
        let mut problems: Vec<String> = Vec::new();
        let addr = |key: &str, value: &str| -> Result<SocketAddr, String> {
            value
                .parse()
                .map_err(|e| format!("{key} = {value:?}: not an address like 127.0.0.1:2525 ({e})"))
        };
        if raw.state_dir.as_os_str().is_empty() {
            problems.push("state_dir: must not be empty".to_owned());
        }
        let broker_url = match raw.broker_url.trim() {
            "" => None,
            url if url.starts_with("https://") => Some(url.to_owned()),
            url => {
                problems.push(format!("broker_url = {url:?}: must be an https:// URL"));
                None
            }
        };
        let spool_dir = if raw.spool_dir.is_empty() {
            raw.state_dir.join("spool")
        } else {
            PathBuf::from(&raw.spool_dir)
        };
        let smtp_listen = addr("smtp_listen", &raw.smtp_listen).map_err(|e| problems.push(e));
        let pop3_listen = match raw.pop3_listen.trim() {
            "" => None,
            value => addr("pop3_listen", value)
                .map_err(|e| problems.push(e))
                .ok(),
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
                problems.push(
                    "ingress_tls_key_file: must be set together with ingress_tls_cert_file"
                        .to_owned(),
                );
                None
            }
            (true, false) => {
                problems.push(
                    "ingress_tls_cert_file: must be set together with ingress_tls_key_file"
                        .to_owned(),
                );
                None
            }
        };
        if raw.ingress_require_tls
            && (raw.ingress_tls_cert_file.is_empty() || raw.ingress_tls_key_file.is_empty())
        {
            problems.push(
                "ingress_require_tls: needs ingress_tls_cert_file and ingress_tls_key_file"
                    .to_owned(),
            );
        }
        if raw.delivery_concurrency == 0 || raw.delivery_concurrency > 256 {
            problems.push(format!(
                "delivery_concurrency = {}: must be 1 to 256",
                raw.delivery_concurrency
            ));
        }
        if raw.retry_base_seconds == 0 {
            problems.push("retry_base_seconds: must be at least 1".to_owned());
        }
        if raw.retry_max_seconds < raw.retry_base_seconds {
            problems.push(format!(
                "retry_max_seconds = {}: must not be less than retry_base_seconds ({})",
                raw.retry_max_seconds, raw.retry_base_seconds
            ));
        }
        if raw.max_age_seconds == 0 {
            problems.push("max_age_seconds: must be at least 1".to_owned());
        }
        let log_format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                problems.push(format!(
                    "log.format = {other:?}: must be \"text\" or \"json\""
                ));
                LogFormat::Text
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            problems.push(format!(
                "log.level = {:?}: not a log filter (use e.g. \"info\", \"debug\" or \"info,tokenfleet_agent=debug\")",
                raw.log.level
            ));
        }
        let tracing = raw.tracing.check().unwrap_or_else(|invalid| {
            problems.extend(invalid.iter().map(ToString::to_string));
            tokenfleet_telemetry::TracingSettings::off("tokenfleet-agent")
        });
        let ingress_limits = raw
            .ingress_limits
            .validate()
            .map_err(|e| problems.push(e.0));
        let metrics = raw
            .metrics
            .validate()
            .map_err(|lines| problems.extend(lines));
        if let (Ok(metrics), Ok(smtp)) = (&metrics, &smtp_listen)
            && let Some(listen) = metrics.listen
        {
            let taken = [("smtp_listen", Some(*smtp)), ("pop3_listen", pop3_listen)];
            for (key, addr) in taken {
                if addr == Some(listen) && listen.port() != 0 {
                    problems.push(format!(
                        "metrics.listen = \"{listen}\": the same address as {key}"
                    ));
                }
            }
        }
        let (Ok(smtp_listen), Ok(ingress_limits), Ok(metrics), true) =
            (smtp_listen, ingress_limits, metrics, problems.is_empty())
        else {
            return Err(problems);
        };
        Ok(Self {
            ingress_limits,
            metrics,
            smtp_listen,
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
            log_level: raw.log.level,
            log_format,
            tracing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_back_to_the_defaults() {
        let raw: RawAgentConfig = Figment::new()
            .merge(Toml::string(DEFAULT_CONFIG_TOML))
            .extract()
            .unwrap();
        assert_eq!(raw, RawAgentConfig::default());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = AgentSettings::validate(RawAgentConfig {
            smtp_listen: "nope".into(),
            delivery_concurrency: 0,
            log: RawLog {
                level: "info".into(),
                format: "xml".into(),
            },
            ..RawAgentConfig::default()
        })
        .unwrap_err()
        .0;
        assert!(err.starts_with("3 problems:"), "{err}");
        for key in [
            "smtp_listen = \"nope\"",
            "delivery_concurrency = 0",
            "log.format = \"xml\"",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = AgentSettings::validate(RawAgentConfig::default()).unwrap();
        assert_eq!(s.smtp_listen.to_string(), "127.0.0.1:2525");
        assert_eq!(s.pop3_listen.unwrap().to_string(), "127.0.0.1:1110");
        assert_eq!(s.spool_dir, PathBuf::from("./tokenfleet-agent-data/spool"));
        assert_eq!(s.delivery_concurrency, 16);
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
        bad(
            |r| r.ingress_limits.max_sessions_per_source = 1000,
            "ingress_limits.max_sessions_per_source",
        );
        bad(
            |r| r.ingress_limits.password_hash_concurrency = 65,
            "ingress_limits.password_hash_concurrency",
        );
        bad(
            |r| r.ingress_limits.message_memory_bytes = 10,
            "ingress_limits.message_memory_bytes",
        );
    }

    #[test]
    fn the_metrics_listener_is_on_loopback_by_default_and_checked() {
        let s = AgentSettings::validate(RawAgentConfig::default()).unwrap();
        assert_eq!(
            s.metrics.listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9465")
        );
        assert_eq!(s.metrics.limits, crate::metrics::MetricsLimits::default());
        let off = AgentSettings::validate(RawAgentConfig {
            metrics: RawMetrics {
                listen: String::new(),
                ..RawMetrics::default()
            },
            ..RawAgentConfig::default()
        })
        .unwrap();
        assert_eq!(off.metrics.listen, None);
        let err = AgentSettings::validate(RawAgentConfig {
            metrics: RawMetrics {
                listen: "127.0.0.1:2525".into(),
                max_request_header_bytes: 100,
                max_connections_per_source: 17,
                ..RawMetrics::default()
            },
            ..RawAgentConfig::default()
        })
        .unwrap_err()
        .0;
        for key in [
            "metrics.max_request_header_bytes = 100: must be 8192 to 1048576",
            "metrics.max_connections_per_source = 17: must be 1 to 16",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = AgentSettings::validate(RawAgentConfig {
            metrics: RawMetrics {
                listen: "127.0.0.1:2525".into(),
                ..RawMetrics::default()
            },
            ..RawAgentConfig::default()
        })
        .unwrap_err()
        .0;
        assert!(
            err.contains("metrics.listen = \"127.0.0.1:2525\": the same address as smtp_listen"),
            "{err}"
        );
        let err = AgentSettings::validate(RawAgentConfig {
            metrics: RawMetrics {
                listen: "metrics-port".into(),
                ..RawMetrics::default()
            },
            ..RawAgentConfig::default()
        })
        .unwrap_err()
        .0;
        assert!(
            err.starts_with("metrics.listen = \"metrics-port\""),
            "{err}"
        );
    }

    #[test]
    fn tracing_is_off_by_default_and_checked() {
        let s = AgentSettings::validate(RawAgentConfig::default()).unwrap();
        assert_eq!(s.tracing.otlp_endpoint, None);
        assert_eq!(s.tracing.service_name, "tokenfleet-agent");
        let mut raw = RawAgentConfig::default();
        raw.tracing.otlp_endpoint = "127.0.0.1:4317".into();
        raw.tracing.sample_ratio = 2.0;
        let e = AgentSettings::validate(raw).unwrap_err().to_string();
        assert!(e.contains("2 problems"), "{e}");
        assert!(
            e.contains("tracing.otlp_endpoint = \"127.0.0.1:4317\""),
            "{e}"
        );
        assert!(e.contains("tracing.sample_ratio = 2: must be"), "{e}");
        // A partial table keeps the agent's service name.
        let raw: RawAgentConfig = Figment::new()
            .merge(Toml::string(
                "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
            ))
            .extract()
            .unwrap();
        let s = AgentSettings::validate(raw).unwrap();
        assert_eq!(
            s.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(s.tracing.service_name, "tokenfleet-agent");
    }

    #[test]
    fn ingress_limit_defaults() {
        let s = AgentSettings::validate(RawAgentConfig::default()).unwrap();
        let l = &s.ingress_limits;
        assert_eq!(l.sessions.max_sessions, 100);
        assert_eq!(l.sessions.max_sessions_per_source, 10);
        assert_eq!(l.passwords.concurrency, 0, "0 = one check per core");
        assert_eq!(l.logins.lockout_after, 10);
        assert_eq!(l.spool.max_bytes, 1 << 30);
        assert_eq!(l.idle_timeout, Duration::from_secs(300));
        assert_eq!(l.pop3_idle_timeout, Duration::from_secs(600));
    }
}
