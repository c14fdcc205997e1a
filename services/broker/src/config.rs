//! Broker configuration: built-in defaults, overlaid by a TOML file (`--config PATH`), overlaid by
//! environment variables `TOKENFLEET_*` (nested keys joined with `__`, e.g.
//! `TOKENFLEET_GRPC__LISTEN=0.0.0.0:50051`).
//!
//! [`RawConfig`] is what the sources say (every field documented, unknown keys rejected);
//! [`RawConfig::validate`] turns it into a [`BrokerConfig`] whose values are parsed, checked and
//! whose secrets (sealing keys) are read from their files or variables. Raw key material never
//! appears in the configuration itself, only paths and variable names.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::redis_store::RedisConfig;

use crate::tokens::lifecycle::TokenConfig;

mod error;
mod tls;
pub use tls::{AgentsConfig, AgentsSection, TlsConfig, TlsSection};
mod alerts;
pub use alerts::AlertsSection;
mod limits;
pub use limits::{LimitsSection, ListenerLimits};
mod admin;
pub use admin::{AdminConfig, AdminSection, AuditSection};
mod metrics;
pub use metrics::{MetricsConfig, MetricsSection};

/// Prefix of the environment variables that overlay the configuration.
pub const ENV_PREFIX: &str = "TOKENFLEET_";

/// Separator of nested keys in environment variable names (`TOKENFLEET_STORE__BACKEND`).
pub const ENV_SEPARATOR: &str = "__";

/// `TOKENFLEET_*` variables that belong to `tokenfleetctl` (the operator CLI), not to the broker's
/// configuration; the broker ignores them so one shell can serve both.
pub const CLIENT_ENV_VARS: &[&str] = &[
    "TOKENFLEET_BROKER",
    "TOKENFLEET_API_KEY",
    "TOKENFLEET_API_KEY_FILE",
    "TOKENFLEET_CA_FILE",
    "TOKENFLEET_TENANT",
];

/// Name of the embedded database file inside `state_dir` unless `store.embedded.path` says otherwise.
pub const EMBEDDED_DB_FILE: &str = "tokenfleet.redb";

pub use error::ConfigError;

// ---------------------------------------------------------------------------------------------
// Raw configuration (what the sources say)
// ---------------------------------------------------------------------------------------------

/// The configuration as read from defaults, the TOML file and the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The gRPC listener (Admin, TokenBroker, health, reflection).
    pub grpc: GrpcSection,
    /// The HTTP listener (`/healthz`, `/readyz`, `/metrics`).
    pub http: HttpSection,
    /// Directory for local state: the embedded database and, in `--dev` mode, the generated key
    /// files. Created with mode 0700 when the broker needs it.
    pub state_dir: PathBuf,
    /// Where all persistent state lives.
    pub store: StoreSection,
    /// Sealing keys that encrypt secrets before they reach the store.
    pub seal: SealSection,
    /// Logging.
    pub log: LogSection,
    /// Token lifecycle: refresh timing, per-mailbox leases, the refresh scheduler.
    pub tokens: TokensSection,
    /// TLS of the gRPC listener (needed by agents: they authenticate with client certificates).
    pub tls: TlsSection,
    /// Agent identity: the agent CA and the lifetime of agent certificates.
    pub agents: AgentsSection,
    /// Alerts about mailboxes that need a person: signed webhook and/or e-mail.
    pub alerts: AlertsSection,
    /// Limits of the gRPC and HTTP listeners (connections, HTTP/2 streams, header timeouts).
    pub limits: LimitsSection,
    /// Who may point providers where (endpoint and proxy host allowlist for tenant admins).
    pub admin: AdminSection,
    /// Audit log retention per kind (changes, refused attempts, issuances).
    pub audit: AuditSection,
    /// What `/metrics` shows (tenant labels) and how often the fleet gauges are computed.
    pub metrics: MetricsSection,
    /// OpenTelemetry traces (OTLP over gRPC); off unless `otlp_endpoint` is set.
    pub tracing: RawTracing,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before connections are cut.
    pub shutdown_grace_seconds: u64,
}

/// The broker as a traced program: its default `service.name`.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerProgram;

impl tokenfleet_telemetry::Program for BrokerProgram {
    const SERVICE_NAME: &'static str = "tokenfleet-broker";
}

/// `[tracing]` of the broker.
pub type RawTracing = tokenfleet_telemetry::RawTracing<BrokerProgram>;

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            grpc: GrpcSection::default(),
            http: HttpSection::default(),
            state_dir: PathBuf::from("./tokenfleet-data"),
            store: StoreSection::default(),
            seal: SealSection::default(),
            log: LogSection::default(),
            tokens: TokensSection::default(),
            tls: TlsSection::default(),
            agents: AgentsSection::default(),
            alerts: AlertsSection::default(),
            limits: LimitsSection::default(),
            admin: AdminSection::default(),
            audit: AuditSection::default(),
            metrics: MetricsSection::default(),
            tracing: RawTracing::default(),
            shutdown_grace_seconds: 20,
        }
    }
}

/// `[grpc]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSection {
    /// Socket address the gRPC server binds (`host:port`; `0.0.0.0:50051` for all IPv4 interfaces).
    pub listen: String,
}

impl Default for GrpcSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_owned(),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Socket address the HTTP server (health, readiness, metrics) binds.
    pub listen: String,
    /// The broker's externally reachable HTTP base URL (`http(s)://host[:port][/path]`), as a
    /// browser reaches it: consent redirects come back to `<public_url>/oauth/callback`.
    pub public_url: String,
    /// Reverse proxies in front of the HTTP listener (addresses or CIDR ranges, at most /8 for
    /// IPv4 and /16 for IPv6) whose `X-Forwarded-For` names the client: limits per source (the
    /// console's failed sign-ins) then count the client, not the proxy. Empty: the header is
    /// never read.
    pub trusted_proxies: Vec<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            public_url: DEFAULT_PUBLIC_URL.to_owned(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Most entries of `http.trusted_proxies`.
const MAX_TRUSTED_PROXIES: usize = 64;

/// Checks `http.trusted_proxies`: the networks, and a problem for each entry that is wrong,
/// named by its index.
fn parse_trusted_proxies(values: &[String]) -> (Vec<tokenfleet_listen::IpNet>, Vec<ConfigError>) {
    let field = "http.trusted_proxies";
    if values.len() > MAX_TRUSTED_PROXIES {
        let problem = format!(
            "{} entries; at most {MAX_TRUSTED_PROXIES} (use CIDR ranges)",
            values.len()
        );
        return (Vec::new(), vec![ConfigError::invalid(field, problem)]);
    }
    let mut problems = Vec::new();
    let mut networks = Vec::with_capacity(values.len());
    for (n, value) in values.iter().enumerate() {
        match tokenfleet_listen::parse_network(value) {
            Ok(net) => networks.push(net),
            Err(error) => problems.push(ConfigError::invalid(
                format!("{field}[{n}]"),
                match error {
                    tokenfleet_listen::NetworkError::TooWide(_) => format!(
                        "{error}: any client could then name itself any address; list your proxies' addresses or their subnet"
                    ),
                    tokenfleet_listen::NetworkError::NotANetwork(_) => error.to_string(),
                },
            )),
        }
    }
    (networks, problems)
}

/// Default of `http.public_url`.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

/// Checks `http.public_url` and returns it without a trailing `/`.
fn parse_public_url(value: &str) -> Result<String, ConfigError> {
    let field = "http.public_url";
    let value = value.trim().trim_end_matches('/');
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(ConfigError::invalid(
            field,
            format!("`{value}` is not a URL (expected e.g. `https://tokenfleet.example.com`)"),
        ));
    };
    if !matches!(scheme, "http" | "https") {
        return Err(ConfigError::invalid(
            field,
            format!("scheme must be http or https, not `{scheme}`"),
        ));
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(ConfigError::invalid(
            field,
            "needs a host and no user name or password",
        ));
    }
    if value.contains(['?', '#']) || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            field,
            "must be a base URL without query, fragment or spaces",
        ));
    }
    Ok(value.to_owned())
}

/// Which store backend holds the broker's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A single-file database in `state_dir` (one broker replica).
    #[default]
    Embedded,
    /// Redis standalone, Sentinel or Cluster (any number of replicas).
    Redis,
}

impl StoreBackend {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Redis => "redis",
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `embedded` (default) or `redis`.
    pub backend: StoreBackend,
    /// Settings of the embedded backend.
    pub embedded: EmbeddedSection,
    /// Settings of the Redis backend (required when `backend = "redis"`); see [`RedisSection`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSection>,
}

/// `[store.redis]`: the keys of the store's [`RedisConfig`] (`mode`, `urls`, `sentinel_master`,
/// `username`, `password`, `tls`, `tls_ca_file`, `key_prefix`, `connect_timeout_ms`,
/// `command_timeout_ms`, `min_replicas_acked`, `replication_timeout_ms`, `role_check_interval_ms`;
/// unknown keys are rejected) plus `password_file`, a file holding the
/// Redis password — the way to give it without writing it into the configuration.
///
/// Kept as a table until validation so the store crate's type stays the one definition of the
/// Redis settings. `Debug` redacts the password.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RedisSection(pub toml::Table);

impl fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = toml::Value::Table(self.0.clone());
        redact(&mut shown);
        write!(f, "RedisSection({shown})")
    }
}

impl RedisSection {
    /// The section for a standalone server at `url`.
    pub fn standalone(url: &str) -> Self {
        let mut table = toml::Table::new();
        table.insert("urls".into(), toml::Value::Array(vec![url.into()]));
        Self(table)
    }

    /// The section for a Redis Cluster with these seed nodes.
    pub fn cluster(seeds: &[String]) -> Self {
        let mut table = toml::Table::new();
        table.insert("mode".into(), "cluster".into());
        table.insert(
            "urls".into(),
            toml::Value::Array(seeds.iter().map(|s| s.as_str().into()).collect()),
        );
        Self(table)
    }

    /// Checks the keys against the store's schema without reading `password_file`.
    fn check_keys(&self) -> Result<(), ConfigError> {
        let mut table = self.0.clone();
        if table.remove(PASSWORD_FILE).is_some() {
            table.insert("password".into(), "[checked later]".into());
        }
        parse_redis_table(table).map(drop)
    }

    /// The store's Redis settings, with the password read from `password_file` if given.
    pub fn to_redis_config(&self) -> Result<RedisConfig, ConfigError> {
        let mut table = self.0.clone();
        if let Some(file) = table.remove(PASSWORD_FILE) {
            let field = "store.redis.password_file";
            if table.contains_key("password") {
                return Err(ConfigError::invalid(
                    field,
                    "give either `password` or `password_file`, not both",
                ));
            }
            let Some(path) = file.as_str() else {
                return Err(ConfigError::invalid(field, "must be a file path"));
            };
            let password = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::invalid(field, format!("reading {path}: {e}")))?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(ConfigError::invalid(field, format!("{path} is empty")));
            }
            table.insert("password".into(), password.into());
        }
        let config = parse_redis_table(table)?;
        config
            .validate()
            .map_err(|e| ConfigError::Source(format!("store.{}", store_problem(&e))))?;
        Ok(config)
    }
}

const PASSWORD_FILE: &str = "password_file";

fn parse_redis_table(table: toml::Table) -> Result<RedisConfig, ConfigError> {
    toml::Value::Table(table)
        .try_into::<RedisConfig>()
        .map_err(|e| {
            let message = e.message().to_owned();
            let mut line = format!("`store.redis`: {message}");
            if let Some(field) = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
            {
                line = format!(
                    "unknown key `store.redis.{field}` (expected one of: {PASSWORD_FILE}, {})",
                    message
                        .split_once("expected ")
                        .map(|(_, rest)| rest.replace('`', ""))
                        .unwrap_or_default()
                        .trim_start_matches("one of ")
                );
                let var = format!("{ENV_PREFIX}STORE__REDIS__{}", field.to_ascii_uppercase());
                if std::env::var_os(&var).is_some() {
                    line.push_str(&format!(" (from environment variable {var})"));
                }
            }
            ConfigError::Source(line)
        })
}

/// The message of a store configuration error without the store's own prefix.
fn store_problem(error: &tokenfleet_store::StoreError) -> String {
    match error {
        tokenfleet_store::StoreError::Config(message) => message.clone(),
        other => other.to_string(),
    }
}

/// `[store.embedded]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSection {
    /// Database file. Default: `<state_dir>/tokenfleet.redb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// `[seal]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SealSection {
    /// Id of the key that seals new secrets. May be left out when exactly one key is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_key_id: Option<String>,
    /// All keys that may have sealed stored secrets (older keys stay readable after rotation).
    pub keys: Vec<SealKeySource>,
}

/// One entry of `seal.keys`: an id and where its base64 key is read from — a file
/// (`key_file`) or an environment variable (`key_env`), exactly one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealKeySource {
    /// Key id (1-32 characters of `A-Z a-z 0-9 - _`), stored with every sealed secret.
    pub id: String,
    /// File holding the base64 key (as written by `tokenfleet-broker generate-key`); mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Name of an environment variable holding the base64 key (not starting with `TOKENFLEET_`:
    /// those are configuration keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Filter in `tracing` `EnvFilter` syntax: `info`, `debug`, `info,tokenfleet_broker=debug`.
    pub level: String,
    /// `text` (default) or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[tokens]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensSection {
    /// An agent's request refreshes the mailbox's token when the cached one has less than this
    /// many seconds left.
    pub refresh_margin_seconds: u64,
    /// Delegated grants are refreshed at least this often, used or not (Microsoft refresh tokens
    /// die after 90 days without use; Google's after 6 months).
    pub max_refresh_interval_seconds: u64,
    /// Timeout of one request to the identity provider.
    pub provider_timeout_seconds: u64,
    /// TTL of a mailbox's refresh lease (2–300). The holder renews it every third of this while
    /// it refreshes, so it need not outlast a provider call: it is how long a replica that died
    /// mid-refresh blocks the mailbox.
    pub lease_ttl_seconds: u64,
    /// Longest a request waits for a refresh lease another replica holds before it answers
    /// UNAVAILABLE with retry advice (1–300); keep it below the clients' deadlines.
    pub lease_wait_seconds: u64,
    /// Retry delay after the first failed refresh; doubles per failure (with jitter).
    pub backoff_min_seconds: u64,
    /// Longest retry delay (a provider's `Retry-After` may ask for more and is honoured).
    pub backoff_max_seconds: u64,
    /// How often each replica looks for mailboxes due for a refresh, in milliseconds.
    pub scheduler_interval_ms: u64,
    /// Most due mailboxes taken per look.
    pub scheduler_batch: usize,
    /// Ceiling of the refreshes one replica runs at once: below it the scheduler adapts the
    /// limit to the provider (grows while due work waits, halves when the provider throttles).
    pub scheduler_concurrency: usize,
    /// Consecutive transient failures (network, timeouts, HTTP 5xx/429) of one provider token
    /// endpoint, across its grants, that open the endpoint's breaker; 0 = no breaker.
    pub breaker_failures: u32,
    /// While a breaker is open, one probe refresh goes to the provider at most this often
    /// (milliseconds), and never before the provider's `Retry-After`.
    pub breaker_probe_interval_ms: u64,
    /// When a probe gets an answer, the grants held back are refreshed, each starting at a
    /// random moment within this window (milliseconds)…
    pub breaker_release_spread_ms: u64,
    /// …at most this many at once per replica.
    pub breaker_release_concurrency: usize,
    /// Tokens of `user`-kind mailboxes (the signed-in people of `login_user` devices) are deleted
    /// after this many days without an issuance instead of being refreshed; 0 = never.
    pub user_token_idle_days: u64,
    /// Most user mailboxes (created on demand for the people of `login_user` /
    /// `allow_user_change` devices) that one device's ingress user addresses admit; a further
    /// user gets no mailbox (RESOURCE_EXHAUSTED naming the setting).
    pub max_user_mailboxes_per_device: u64,
    /// Most user mailboxes in one tenant.
    pub max_user_mailboxes_per_tenant: u64,
}

impl Default for TokensSection {
    fn default() -> Self {
        Self {
            refresh_margin_seconds: 300,
            max_refresh_interval_seconds: 86_400,
            provider_timeout_seconds: 30,
            lease_ttl_seconds: 5,
            lease_wait_seconds: 10,
            backoff_min_seconds: 30,
            backoff_max_seconds: 1800,
            scheduler_interval_ms: 2000,
            scheduler_batch: 256,
            scheduler_concurrency: crate::tokens::scheduler::DEFAULT_CONCURRENCY_CEILING,
            breaker_failures: 2,
            breaker_probe_interval_ms: 5000,
            breaker_release_spread_ms: 3000,
            breaker_release_concurrency: 8,
            user_token_idle_days: 30,
            max_user_mailboxes_per_device: 500,
            max_user_mailboxes_per_tenant: 5000,
        }
    }
}

impl TokensSection {
    /// The validated token settings (the error names the `tokens.*` field at fault).
    pub fn to_config(&self) -> Result<TokenConfig, ConfigError> {
        let config = TokenConfig {
            refresh_margin: Duration::from_secs(self.refresh_margin_seconds),
            max_refresh_interval: Duration::from_secs(self.max_refresh_interval_seconds),
            provider_timeout: Duration::from_secs(self.provider_timeout_seconds),
            lease_ttl: Duration::from_secs(self.lease_ttl_seconds),
            lease_wait: Duration::from_secs(self.lease_wait_seconds),
            backoff: crate::tokens::backoff::Backoff {
                min: Duration::from_secs(self.backoff_min_seconds),
                max: Duration::from_secs(self.backoff_max_seconds),
            },
            scheduler: crate::tokens::scheduler::SchedulerConfig {
                interval: Duration::from_millis(self.scheduler_interval_ms),
                batch: self.scheduler_batch,
                concurrency: self.scheduler_concurrency,
            },
            breaker: crate::tokens::breaker::BreakerConfig {
                failures: self.breaker_failures,
                probe_interval: Duration::from_millis(self.breaker_probe_interval_ms),
                release_spread: Duration::from_millis(self.breaker_release_spread_ms),
                release_concurrency: self.breaker_release_concurrency,
            },
            user_token_idle: match self.user_token_idle_days {
                0 => None,
                days => Some(Duration::from_secs(days.saturating_mul(86_400))),
            },
            max_user_mailboxes_per_device: usize::try_from(self.max_user_mailboxes_per_device)
                .unwrap_or(usize::MAX),
            max_user_mailboxes_per_tenant: usize::try_from(self.max_user_mailboxes_per_tenant)
                .unwrap_or(usize::MAX),
            ..TokenConfig::default()
        };
        for (field, value) in [
            (
                "tokens.max_user_mailboxes_per_device",
                self.max_user_mailboxes_per_device,
            ),
            (
                "tokens.max_user_mailboxes_per_tenant",
                self.max_user_mailboxes_per_tenant,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(
                    field,
                    "must be at least 1 (devices without user addresses create no user mailboxes)",
                ));
            }
        }
        config
            .check()
            .map_err(|e| ConfigError::invalid(e.field, e.problem))?;
        if self.refresh_margin_seconds > 1800 {
            return Err(ConfigError::invalid(
                "tokens.refresh_margin_seconds",
                "must be at most 1800 (access tokens usually live one hour)",
            ));
        }
        Ok(config)
    }
}

impl RawConfig {
    /// The layered sources: defaults, then the TOML file (if any), then `TOKENFLEET_*` variables.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        let client_keys: Vec<&str> = CLIENT_ENV_VARS
            .iter()
            .filter_map(|var| var.strip_prefix(ENV_PREFIX))
            .collect();
        figment.merge(
            Env::prefixed(ENV_PREFIX)
                .ignore(&client_keys)
                .split(ENV_SEPARATOR),
        )
    }

    /// Loads the configuration from defaults, `file` and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = file
            && !path.is_file()
        {
            return Err(ConfigError::Source(format!(
                "configuration file {} does not exist or is not a file",
                path.display()
            )));
        }
        let raw = extract_reporting_all(&Self::figment(file))?;
        raw.check_schema()?;
        Ok(raw)
    }

    /// Schema checks figment cannot do itself (the Redis section's keys).
    fn check_schema(&self) -> Result<(), ConfigError> {
        match &self.store.redis {
            Some(redis) => redis.check_keys(),
            None => Ok(()),
        }
    }

    /// Parses a TOML document alone (no environment), as `load` would read it from a file.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let raw = extract_reporting_all(&Figment::new().merge(Toml::string(text)))?;
        raw.check_schema()?;
        Ok(raw)
    }

    /// The embedded database path: `store.embedded.path`, or `<state_dir>/tokenfleet.redb`.
    pub fn embedded_path(&self) -> PathBuf {
        self.store
            .embedded
            .path
            .clone()
            .unwrap_or_else(|| self.state_dir.join(EMBEDDED_DB_FILE))
    }

    /// The configuration as `print-config` shows it: computed defaults filled in, secrets
    /// (passwords, credentials inside URLs) replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        let mut effective = self.clone();
        if effective.store.backend == StoreBackend::Embedded {
            effective.store.embedded.path = Some(self.embedded_path());
        }
        let mut value = toml::Value::try_from(&effective)
            .map_err(|e| ConfigError::Source(format!("rendering the configuration: {e}")))?;
        redact(&mut value);
        toml::to_string_pretty(&value)
            .map_err(|e| ConfigError::Source(format!("rendering the configuration: {e}")))
    }

    /// Checks every value and reads the sealing keys.
    pub fn validate(&self) -> Result<BrokerConfig, ConfigError> {
        // Every check runs; all problems are reported at once.
        let mut problems = Vec::new();
        let mut check = |result: Result<(), ConfigError>| {
            if let Err(e) = result {
                problems.push(e);
            }
        };
        let grpc_listen = parse_listen("grpc.listen", &self.grpc.listen);
        let http_listen = parse_listen("http.listen", &self.http.listen);
        if let (Ok(grpc), Ok(http)) = (&grpc_listen, &http_listen)
            && grpc.port() != 0
            && grpc == http
        {
            check(Err(ConfigError::invalid(
                "http.listen",
                format!("{http} is already `grpc.listen`; pick another port"),
            )));
        }
        if self.state_dir.as_os_str().is_empty() {
            check(Err(ConfigError::invalid("state_dir", "must not be empty")));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            check(Err(ConfigError::invalid(
                "log.level",
                format!(
                    "`{}` is not a log filter (use e.g. `info`, `debug` or `info,tokenfleet_broker=debug`)",
                    self.log.level
                ),
            )));
        }
        let metrics = self.metrics.to_config().unwrap_or_else(|e| {
            check(Err(e));
            MetricsConfig::default()
        });
        let (trusted_proxies, proxy_problems) = parse_trusted_proxies(&self.http.trusted_proxies);
        for problem in proxy_problems {
            check(Err(problem));
        }
        let tracing = self.tracing.check().unwrap_or_else(|invalid| {
            for p in invalid {
                check(Err(ConfigError::invalid(
                    p.key,
                    format!("`{}`: {}", p.value, p.problem),
                )));
            }
            tokenfleet_telemetry::TracingSettings::off("tokenfleet-broker")
        });
        if self.shutdown_grace_seconds > 3600 {
            check(Err(ConfigError::invalid(
                "shutdown_grace_seconds",
                "must be at most 3600",
            )));
        }
        let store = match self.store.backend {
            StoreBackend::Embedded => Ok(StoreConfig::Embedded {
                path: self.embedded_path(),
            }),
            StoreBackend::Redis => match &self.store.redis {
                Some(redis) => redis
                    .to_redis_config()
                    .map(|r| StoreConfig::Redis(Box::new(r))),
                None => Err(ConfigError::invalid(
                    "store.redis",
                    "missing: `store.backend = \"redis\"` needs a `[store.redis]` section",
                )),
            },
        };
        let results = (
            grpc_listen,
            http_listen,
            parse_public_url(&self.http.public_url),
            store,
            self.seal.load_keyring(),
            self.tokens.to_config(),
            self.tls.load(),
            self.agents.load(),
            self.alerts.to_config(),
            self.limits.to_limits(),
            self.admin.load(),
            self.audit.to_retention(),
        );
        match results {
            (
                Ok(grpc_listen),
                Ok(http_listen),
                Ok(public_url),
                Ok(store),
                Ok(keyring),
                Ok(tokens),
                Ok(tls),
                Ok(agents),
                Ok(alerts),
                Ok(limits),
                Ok(admin),
                Ok(audit),
            ) if problems.is_empty() => Ok(BrokerConfig {
                grpc_listen,
                http_listen,
                public_url,
                trusted_proxies,
                state_dir: self.state_dir.clone(),
                store,
                keyring: keyring.map(Arc::new),
                log: LogConfig {
                    level: self.log.level.clone(),
                    format: self.log.format,
                },
                shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
                tokens,
                tls,
                agents,
                alerts,
                limits,
                providers: admin.providers,
                admin_call_rate: admin.call_rate,
                bootstrap_key_file: self.admin.bootstrap_key_file.clone(),
                audit,
                metrics,
                tracing,
            }),
            (a, b, c, d, e, f, g, h, i, j, k, l) => {
                let errors = [
                    a.err(),
                    b.err(),
                    c.err(),
                    d.err(),
                    e.err(),
                    f.err(),
                    g.err(),
                    h.err(),
                    i.err(),
                    j.err(),
                    k.err(),
                    l.err(),
                ];
                problems.extend(errors.into_iter().flatten());
                Err(ConfigError::all(problems))
            }
        }
    }
}

impl SealSection {
    /// Reads every key; `None` when no key is configured at all.
    fn load_keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        if self.keys.is_empty() {
            if let Some(id) = &self.current_key_id {
                return Err(ConfigError::invalid(
                    "seal.current_key_id",
                    format!("`{id}` is set but `seal.keys` is empty"),
                ));
            }
            return Ok(None);
        }
        let mut material: Vec<(String, Secret)> = Vec::with_capacity(self.keys.len());
        for (i, key) in self.keys.iter().enumerate() {
            let field = format!("seal.keys[{i}]");
            let text = match (&key.key_file, &key.key_env) {
                (Some(path), None) => Keyring::read_key_file(path).map_err(|e| {
                    ConfigError::invalid(format!("{field}.key_file"), e.to_string())
                })?,
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    ConfigError::invalid(
                        format!("{field}.key_env"),
                        format!("environment variable `{var}` is not set or not UTF-8"),
                    )
                })?,
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        field,
                        "give either `key_file` or `key_env`, not both",
                    ));
                }
                (None, None) => {
                    return Err(ConfigError::invalid(
                        field,
                        "needs `key_file` (a file holding the base64 key) or `key_env` (a variable holding it)",
                    ));
                }
            };
            material.push((key.id.clone(), Secret::new(text.trim())));
        }
        let current = match (&self.current_key_id, self.keys.as_slice()) {
            (Some(id), _) => id.clone(),
            (None, [only]) => only.id.clone(),
            (None, _) => {
                return Err(ConfigError::invalid(
                    "seal.current_key_id",
                    "required when more than one key is configured",
                ));
            }
        };
        let pairs = material.iter().map(|(id, key)| (id.as_str(), key.expose()));
        Keyring::from_base64(&current, pairs)
            .map(Some)
            .map_err(|e| ConfigError::invalid("seal", e.to_string()))
    }
}

fn parse_listen(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::invalid(
            field,
            format!("`{value}` is not a socket address (expected `host:port` with an IP address, e.g. `127.0.0.1:50051` or `[::]:50051`)"),
        )
    })
}

/// Turns figment's error into one line that names the key and where it came from.
/// Extracts the configuration, reporting every unknown key and ill-typed value at once, each
/// with its source ([`tokenfleet_configkit::extract_reporting_all`]).
fn extract_reporting_all(figment: &Figment) -> Result<RawConfig, ConfigError> {
    tokenfleet_configkit::extract_reporting_all(
        figment,
        tokenfleet_configkit::EnvNaming {
            prefix: ENV_PREFIX,
            separator: ENV_SEPARATOR,
        },
    )
    .map_err(|problems| {
        let mut all: Vec<ConfigError> = problems
            .lines
            .into_iter()
            .map(ConfigError::Source)
            .collect();
        // The values that did extract are checked too: one run reports everything.
        if let Some(Err(invalid)) = problems.repaired.map(|raw: RawConfig| raw.validate()) {
            match invalid {
                ConfigError::Many(more) => all.extend(more),
                one => all.push(one),
            }
        }
        ConfigError::all(all)
    })
}

/// Field names whose values are secrets wherever they appear.
const SECRET_FIELDS: &[&str] = &["password", "secret", "token", "api_key"];

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                if SECRET_FIELDS.contains(&key.as_str()) {
                    *v = toml::Value::String("[redacted]".to_owned());
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        toml::Value::String(s) => {
            if let Some(clean) = redact_url_password(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// `redis://user:pw@host` → `redis://user:[redacted]@host`.
fn redact_url_password(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let (userinfo, host) = rest.split_once('@')?;
    if userinfo.contains('/') {
        return None;
    }
    let (user, _password) = userinfo.split_once(':')?;
    Some(format!("{scheme}://{user}:[redacted]@{host}"))
}

// ---------------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration the broker runs with. `Debug` shows no key material.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// Externally reachable HTTP base URL, without a trailing `/` (consent redirect URIs).
    pub public_url: String,
    /// Reverse proxies whose `X-Forwarded-For` names the HTTP client (`http.trusted_proxies`).
    pub trusted_proxies: Vec<tokenfleet_listen::IpNet>,
    /// Local state directory.
    pub state_dir: PathBuf,
    /// Store backend and its settings.
    pub store: StoreConfig,
    /// Sealing keys, read from their files/variables; `None` when none is configured (serving
    /// refuses to start then, see [`BrokerConfig::require_keyring`]).
    pub keyring: Option<Arc<Keyring>>,
    /// Logging.
    pub log: LogConfig,
    /// How long draining may take after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Token lifecycle settings.
    pub tokens: TokenConfig,
    /// TLS of the gRPC listener; `None` serves plaintext (agents cannot authenticate then).
    pub tls: Option<TlsConfig>,
    /// Agent identity settings.
    pub agents: AgentsConfig,
    /// Alert settings (off unless a webhook or e-mail is configured).
    pub alerts: crate::alerts::AlertsConfig,
    /// Listener limits.
    pub limits: ListenerLimits,
    /// Where non-fleet-admin callers may point providers.
    pub providers: crate::ops::provider_policy::ProviderPolicy,
    /// `[admin] call_rate_per_minute` and `call_burst`: Admin API calls and console requests
    /// per API key.
    pub admin_call_rate: crate::rate_limit::Rate,
    /// `[admin] bootstrap_key_file`: a fleet-admin key to store at start (see
    /// [`crate::api_keys::bootstrap`]).
    pub bootstrap_key_file: Option<PathBuf>,
    /// Audit log retention.
    pub audit: crate::audit::AuditRetention,
    /// `/metrics` settings.
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces (`[tracing]`).
    pub tracing: tokenfleet_telemetry::TracingSettings,
}

impl BrokerConfig {
    /// The keyring, or the error that explains how to create a key.
    pub fn require_keyring(&self) -> Result<Arc<Keyring>, ConfigError> {
        self.keyring.clone().ok_or(ConfigError::NoSealingKey)
    }
}

/// Validated store settings. `Debug` redacts credentials.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Embedded single-file database.
    Embedded {
        /// Database file.
        path: PathBuf,
    },
    /// Redis (boxed: it is much larger than the other variant).
    Redis(Box<RedisConfig>),
}

impl StoreConfig {
    /// The backend's name as a metric label: `embedded` or `redis`.
    pub fn backend_label(&self) -> &'static str {
        match self {
            Self::Embedded { .. } => "embedded",
            Self::Redis(_) => "redis",
        }
    }

    /// A log-safe one-line description (no credentials).
    pub fn describe(&self) -> String {
        match self {
            Self::Embedded { path } => format!("embedded ({})", path.display()),
            Self::Redis(_) => "redis".to_owned(),
        }
    }
}

/// Validated log settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `EnvFilter` directive.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
}

/// A commented TOML file holding every default, as `tokenfleet-broker default-config` prints it.
/// It parses back to [`RawConfig::default`].
pub const DEFAULT_CONFIG_TOML: &str = r#"# tokenfleet-broker configuration.
#
# Sources, later ones win: built-in defaults < this file (--config PATH) < environment variables
# TOKENFLEET_<SECTION>__<KEY>, e.g. TOKENFLEET_GRPC__LISTEN=0.0.0.0:50051,
# TOKENFLEET_STORE__BACKEND=redis. Unknown keys are errors. Secrets are never written here: they
# are read from files (`*_file`) or environment variables (`key_env`).

# Directory for local state: the embedded database and, in --dev mode, generated key files.
# Created with mode 0700 when needed.
state_dir = "./tokenfleet-data"

# Seconds in-flight requests get to finish after SIGTERM/SIGINT before connections are cut.
shutdown_grace_seconds = 20

[grpc]
# Address of the gRPC server (Admin, TokenBroker, health, reflection).
listen = "127.0.0.1:50051"

[http]
# Address of the HTTP server (/healthz, /readyz, /metrics, /oauth/callback).
listen = "127.0.0.1:8080"
# The broker's HTTP base URL as a browser reaches it (behind a proxy or ingress: the public
# address). Consent redirects come back to <public_url>/oauth/callback; register that URL as a
# redirect URI in the app registration.
public_url = "http://127.0.0.1:8080"
# Reverse proxies in front of this listener whose X-Forwarded-For header names the client
# (addresses or CIDR ranges, at most /8 for IPv4 and /16 for IPv6), so limits per source (the
# console's failed sign-ins) count the client and not the proxy. Empty: the header is ignored.
trusted_proxies = []

[store]
# "embedded" (one file, one broker replica) or "redis" (standalone, Sentinel or Cluster).
backend = "embedded"

[store.embedded]
# Database file; default "<state_dir>/tokenfleet.redb".
# path = "/var/lib/tokenfleet/tokenfleet.redb"

# Required when the backend is "redis".
# [store.redis]
# mode = "standalone"                 # "standalone", "sentinel" or "cluster"
# urls = ["redis://127.0.0.1:6379"]   # the server, the cluster seed nodes, or the sentinels
# sentinel_master = "mymaster"        # sentinel mode only
# username = "tokenfleet"             # ACL user
# password_file = "/etc/tokenfleet/redis.password"   # or `password` (prefer the file)
# tls = false                         # true: every URL must be rediss://
# tls_ca_file = "/etc/tokenfleet/redis-ca.pem"
# key_prefix = "tf"                   # lets several deployments share one Redis
# connect_timeout_ms = 2000
# command_timeout_ms = 2000
# min_replicas_acked = 1              # replicas each write waits for (WAIT); default 1 in
#                                     # sentinel mode, 0 otherwise (README: "Store durability")
# replication_timeout_ms = 500        # how long a write waits for them
# role_check_interval_ms = 1000       # sentinel mode: ROLE check of the master connection

[seal]
# Sealing keys encrypt secrets (client secrets, refresh tokens) before they reach the store.
# Create one with:  tokenfleet-broker generate-key > /etc/tokenfleet/seal.key; chmod 600 it.
# Keep old keys listed after a rotation so older secrets stay readable; then run
# `tokenfleet-broker reseal`.
# current_key_id = "k1"
keys = []
# keys = [
#   { id = "k1", key_file = "/etc/tokenfleet/seal.key" },
#   { id = "k0", key_env = "SEAL_KEY_K0" },
# ]

[log]
# Filter in tracing EnvFilter syntax: "info", "debug", "info,tokenfleet_broker=debug".
level = "info"
# "text" or "json".
format = "text"

[tracing]
# OpenTelemetry traces over OTLP/gRPC, e.g. "http://127.0.0.1:4317" (https: checked against the
# system's CA roots). An empty endpoint turns it off. Spans: gRPC requests (continuing an agent's W3C traceparent),
# access-token issuance, refreshes, store operations, identity-provider calls.
otlp_endpoint = ""
# Share of new traces recorded, 0.0 to 1.0. Requests that carry a traceparent follow the
# caller's sampling decision.
sample_ratio = 1.0
# service.name of the spans.
service_name = "tokenfleet-broker"

[tokens]
# An agent's request refreshes a mailbox's token when the cached one has less than this left.
refresh_margin_seconds = 300
# Delegated grants are refreshed at least this often, used or not (Microsoft refresh tokens die
# after 90 days without use). Otherwise refreshes come at ~75 % of each access token's lifetime.
max_refresh_interval_seconds = 86400
# Timeout of one request to the identity provider.
provider_timeout_seconds = 30
# A mailbox's refresh lease (one refresh at a time across replicas) lasts this long and is
# renewed every third of it while the refresh runs, so a replica that dies mid-refresh blocks
# the mailbox for at most this long (2-300).
lease_ttl_seconds = 5
# A request that finds the lease held waits at most this long for the holder, then answers
# UNAVAILABLE with retry advice (1-300; keep it below your clients' deadlines).
lease_wait_seconds = 10
# Retry delays after failed refreshes: doubling from min to max, with jitter, never shorter than
# the provider's Retry-After.
backoff_min_seconds = 30
backoff_max_seconds = 1800
# How often each replica looks for mailboxes due for a refresh (milliseconds), how many it takes
# per look, and the ceiling of refreshes it runs at once (below it the limit adapts: it grows while
# due work waits for a slow provider and halves when the provider throttles or fails).
scheduler_interval_ms = 2000
scheduler_batch = 256
scheduler_concurrency = 128
# While a provider's token endpoint fails transiently (network, timeouts, HTTP 5xx/429), its grants
# stop calling it after this many consecutive failures (0 turns it off: each grant backs off alone);
# one probe refresh goes through every breaker_probe_interval_ms (never before a Retry-After), and
# when a probe gets an answer every held grant is refreshed at once, spread over
# breaker_release_spread_ms, at most breaker_release_concurrency at a time per replica.
breaker_failures = 2
breaker_probe_interval_ms = 5000
breaker_release_spread_ms = 3000
breaker_release_concurrency = 8
# Tokens of user mailboxes (created on demand for the people who sign in at login_user devices)
# are deleted, instead of refreshed, after this many days without an issuance; 0 means never.
user_token_idle_days = 30
# User mailboxes are created on demand only for addresses a device's ingress user addresses
# admit; at most this many per device (counting the tenant's user mailboxes its addresses admit)
# and per tenant. Over a limit the token request is refused (RESOURCE_EXHAUSTED).
max_user_mailboxes_per_device = 500
max_user_mailboxes_per_tenant = 5000

[admin]
# Hosts ("host" or "host:port") that tenant-admin keys may use in provider endpoint overrides and
# as a provider's HTTP proxy, besides the well-known Microsoft and Google sign-in hosts. Where a
# provider's requests go decides who receives its client secret and refresh tokens, so anything
# else (and extra trusted CAs) needs a fleet-admin key.
provider_hosts = []
# A file holding a fleet-admin API key (tfk_<id>_<secret>) stored at start when no key with its id
# exists, for the first admin key of a deployment (the Helm chart generates one into a Secret).
# Only its hash is stored; a different key already stored under that id stops the broker.
# bootstrap_key_file = "/run/tokenfleet/bootstrap/key"
# Admin API calls (and console requests) per API key: a token bucket refilling
# call_rate_per_minute (0 means unlimited) and holding up to call_burst. A key over it gets
# RESOURCE_EXHAUSTED (console: 429) with a retry-after before the call touches anything. Kept in
# each replica's memory, so N replicas allow up to N times it.
call_rate_per_minute = 3000
call_burst = 500

[audit]
# Retention per kind of audit record, per scope (each tenant's log and the global one): the
# newest *_max_entries are kept, and with *_max_age_days > 0 nothing older than that many days.
# Kinds are separate streams, so refused attempts and token issuances never evict changes.
changes_max_entries = 100000
changes_max_age_days = 0
refused_max_entries = 10000
refused_max_age_days = 30
issuance_max_entries = 100000
issuance_max_age_days = 90

[metrics]
# /metrics serves no tenant or mailbox names by default. true adds a `tenant` label to the token,
# alert and fleet series (customer names in your monitoring, and series multiplied by tenants).
per_tenant_labels = false
# The fleet gauges (mailboxes by status, consents pending, earliest refresh-token expiry, agents,
# their queues) are computed from the store every this many seconds (1-3600) and scrapes read
# that snapshot. Each computation reads every mailbox, grant and agent record once: raise it for
# very large fleets.
inventory_interval_seconds = 30

[tls]
# TLS of the gRPC listener (Admin and TokenBroker; TLS 1.2 and 1.3). Agents need it: they
# authenticate with client certificates. Without both files the listener is plaintext.
# (--dev generates a local CA and a certificate for localhost in the state directory.)
# cert_file = "/etc/tokenfleet/tls/server.pem"   # certificate chain, leaf first (PEM)
# key_file = "/etc/tokenfleet/tls/server.key"    # its private key (PEM, mode 0600)

[agents]
# Lifetime of agent client certificates in seconds (default 7 days). Agents renew at about two
# thirds of it.
certificate_lifetime_seconds = 604800
# The CA that issues agent certificates. Default: generated on first start and kept in the store
# with its key sealed. To use your own CA, give both files:
# ca_cert_file = "/etc/tokenfleet/agent-ca.pem"
# ca_key_file = "/etc/tokenfleet/agent-ca.key"
# IssueAccessToken calls per agent: a token bucket refilling issue_rate_per_minute (0 means
# unlimited) and holding up to issue_burst. Kept in each replica's memory, so N replicas allow up
# to N times the rate. Over the limit an agent gets RESOURCE_EXHAUSTED with a retry-after hint.
issue_rate_per_minute = 600
issue_burst = 60
# Seconds between an agent's status reports (1-3600). A device whose last report is older than
# three heartbeats shows as UNKNOWN in `tokenfleetctl fleet status`.
heartbeat_seconds = 30

[alerts]
# Tell an operator when a mailbox needs a person: its grant is dead (REAUTH_REQUIRED) or its
# refresh token expires within expiry_horizon_hours (Google apps in "Testing" publishing status
# get 7-day refresh tokens). One problem is one alert, across all replicas. Off unless a webhook
# or e-mail is configured.
#
# Webhook: the event as JSON, POSTed with X-Tokenfleet-Signature: sha256=<hex HMAC-SHA256 of the
# body>, X-Tokenfleet-Timestamp and X-Tokenfleet-Event-Id (deduplicate by it: delivery is at least
# once). https only (http for loopback receivers); redirects are not followed.
# webhook_url = "https://hooks.example.com/tokenfleet"
# webhook_secret_file = "/etc/tokenfleet/alerts-webhook.key"   # the HMAC key, mode 0600
#
# E-mail: plain text, sent from a tokenfleet mailbox (<tenant>/<mailbox>) with its own access
# token (XOAUTH2), or without login through a local relay (smtp_auth "none").
# email_to = ["ops@example.com"]
# email_from_mailbox = "acme/alerts"
# smtp_host = "smtp.office365.com"
smtp_port = 587
# "starttls", "implicit_tls" (port 465) or "none" (a relay on the same host only).
smtp_security = "starttls"
# "xoauth2" or "none".
smtp_auth = "xoauth2"
expiry_horizon_hours = 48
# Timeout of one webhook request or SMTP session.
timeout_seconds = 10
# Each delivery round tries up to retry_attempts times, pausing retry_min_ms, doubling up to
# retry_max_ms (network errors, HTTP 408/429/5xx, SMTP 4xx; other refusals are not retried).
retry_attempts = 5
retry_min_ms = 1000
retry_max_ms = 60000
# What a round leaves undelivered (or a replica that died) is tried again this much later by any
# replica, for up to a day.
redeliver_after_seconds = 600

[limits]
# What a client may hold on the listeners before it has authenticated. Over a connection limit,
# new connections are accepted and closed at once — but only when no connection waits: a new one
# first closes the connection that has waited longest in its TLS handshake (gRPC with [tls]) or
# for a request (HTTP, also idle keep-alive), so idle clients cannot keep anyone out.
# gRPC: open connections (every agent holds one), concurrent HTTP/2 streams per connection
# (advertised in SETTINGS; more are refused with REFUSED_STREAM), largest request header list,
# keep-alive pings on idle connections, and how long a call may take to produce its response (a
# half-open call that never sends its request is ended then; StatusStream only needs to open).
grpc_max_connections = 10000
# Of those, how many may be open without a client certificate (API-key clients, enrolling
# agents, strangers); over it a new one closes the one that has waited longest without a call
# that proved its caller (an admin call with an accepted API key, an enrollment whose code was
# redeemed) in flight, and when every one
# has such a call in flight the new one's first call gets RESOURCE_EXHAUSTED naming this limit
# and it is closed, so they cannot take the slots agents need.
# With [tls] only.
grpc_max_anonymous_connections = 512
grpc_max_concurrent_streams = 100
grpc_max_header_list_bytes = 16384
grpc_keepalive_interval_seconds = 30
grpc_keepalive_timeout_seconds = 20
grpc_request_timeout_seconds = 60
# HTTP/1.1 (health, metrics, consent callback): open connections, and how long a client may take
# to send a complete request header (slow or idle clients are disconnected).
http_max_connections = 1024
http_header_read_timeout_seconds = 10
"#;
