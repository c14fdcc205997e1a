//! The Redis backend: standalone, Sentinel or Cluster, async and reconnecting.
//!
//! Key layout (`tf` is [`RedisConfig::key_prefix`]); every key of one [`Scope`] carries the same
//! hash tag, so the scripts below touch one Cluster slot:
//! - record: `tf:{t:acme}:rec:mailbox:m1`, a hash `{v: version, d: data}`;
//! - collection index: `tf:{t:acme}:idx:mailbox`, a sorted set of ids, all with score 0, paged
//!   with `ZRANGEBYLEX`;
//! - stream: `tf:{t:acme}:stream:audit`, a Redis stream with one field `d`, trimmed exactly;
//! - global scope: tag `{g}`;
//! - lease: `tf:{lease:<name>}:owner` (owner, expiring) and `tf:{lease:<name>}:fence` (counter
//!   that survives the owner key, so fences only grow);
//! - schedule: `tf:{sched:refresh}`, a sorted set of members scored by due time (Unix ms); one key,
//!   so one slot per schedule.
//!
//! Durability across failover: with [`RedisConfig::min_replicas_acked`] above 0 (the default in
//! Sentinel mode) every mutation shares a pipeline with `WAIT` and is acknowledged only once that
//! many replicas hold it, else it fails as [`StoreError::Unavailable`]; in Sentinel mode a master
//! connection is trusted only while it answers `ROLE` master (checked on connect, on an interval,
//! and dropped after any error or a `+switch-master` announcement). README: "Store durability
//! across Redis failover".
//!
//! Every conditional write and delete is one Lua script covering record and index, so it is atomic
//! on any topology. Stream ids are Redis ids re-printed zero-padded (`<ms:15>-<seq:10>`) so that
//! string order is append order.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, Script, ScriptInvocation, TlsCertificates, TlsMode, Value,
};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    Lease, Notice, Precondition, Record, RecordKey, Scope, ScopeRead, Store, StoreError,
    StoreResult, StreamEntry,
};

/// Which Redis deployment [`RedisConfig::urls`] points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server (`urls` holds exactly one URL).
    #[default]
    Standalone,
    /// A master found through Sentinel (`urls` are the sentinels; `sentinel_master` names it).
    Sentinel,
    /// Redis Cluster (`urls` are seed nodes; the rest is discovered).
    Cluster,
}

/// How to reach Redis. Deserialized from the broker configuration (`deny_unknown_fields`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `standalone` (default), `sentinel` or `cluster`.
    #[serde(default)]
    pub mode: RedisMode,
    /// `redis://host:port` URLs (`rediss://` with TLS): the server (standalone), the seed nodes
    /// (cluster) or the sentinels (sentinel; their URLs may carry the sentinels' own credentials).
    pub urls: Vec<String>,
    /// Name of the master the sentinels watch (required in `sentinel` mode).
    #[serde(default)]
    pub sentinel_master: Option<String>,
    /// ACL user name for the Redis servers (overrides one given in a URL).
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the Redis servers (overrides one given in a URL). Never printed.
    #[serde(default)]
    pub password: Option<String>,
    /// Connect to the Redis servers with TLS. In `standalone` and `cluster` mode every URL must
    /// then be `rediss://` (and without it `redis://`); in `sentinel` mode it applies to the
    /// master, and each sentinel URL's scheme decides for that sentinel.
    #[serde(default)]
    pub tls: bool,
    /// PEM file with the CA certificates that sign the servers' certificates (default: the
    /// platform's trust store).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every key, so several deployments can share one Redis (default `tf`; no braces,
    /// no whitespace).
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Time allowed to open one connection, in milliseconds (default 2000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for one command's answer, in milliseconds (default 2000).
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// How many replicas must confirm every write (`WAIT`) before the store acknowledges it;
    /// a write that fewer confirm within `replication_timeout_ms` fails as unavailable instead.
    /// Default: 1 in `sentinel` mode (a failover promotes a replica, so a write only the master
    /// holds can be discarded), 0 in `standalone` and `cluster` mode (set it to 1 or more for a
    /// Cluster whose masters have replicas). See the README, "Store durability across Redis
    /// failover".
    #[serde(default)]
    pub min_replicas_acked: Option<u32>,
    /// How long a write waits for its replicas, in milliseconds (default 500; less than
    /// `command_timeout_ms`).
    #[serde(default = "default_replication_timeout_ms")]
    pub replication_timeout_ms: u64,
    /// Sentinel mode: how often the master connection is checked with `ROLE` (besides after
    /// every error and on Sentinel's `+switch-master`), in milliseconds (default 1000).
    #[serde(default = "default_role_check_interval_ms")]
    pub role_check_interval_ms: u64,
}

fn default_key_prefix() -> String {
    "tf".to_owned()
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_command_timeout_ms() -> u64 {
    2000
}
fn default_replication_timeout_ms() -> u64 {
    500
}
fn default_role_check_interval_ms() -> u64 {
    1000
}

impl RedisConfig {
    /// A standalone configuration for one URL with every other field at its default.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self::with_urls(RedisMode::Standalone, vec![url.into()])
    }

    /// A cluster configuration for these seed URLs with every other field at its default.
    pub fn cluster(seeds: Vec<String>) -> Self {
        Self::with_urls(RedisMode::Cluster, seeds)
    }

    /// A sentinel configuration with every other field at its default.
    pub fn sentinel(sentinels: Vec<String>, master: impl Into<String>) -> Self {
        Self {
            sentinel_master: Some(master.into()),
            ..Self::with_urls(RedisMode::Sentinel, sentinels)
        }
    }

    fn with_urls(mode: RedisMode, urls: Vec<String>) -> Self {
        Self {
            mode,
            urls,
            sentinel_master: None,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            key_prefix: default_key_prefix(),
            connect_timeout_ms: default_connect_timeout_ms(),
            command_timeout_ms: default_command_timeout_ms(),
            min_replicas_acked: None,
            replication_timeout_ms: default_replication_timeout_ms(),
            role_check_interval_ms: default_role_check_interval_ms(),
        }
    }

    /// Replicas every write waits for: [`min_replicas_acked`](Self::min_replicas_acked), or the
    /// mode's default.
    pub fn replicas_to_wait(&self) -> u32 {
        self.min_replicas_acked
            .unwrap_or(u32::from(self.mode == RedisMode::Sentinel))
    }

    /// Checks the configuration without connecting; errors name the field at fault.
    pub fn validate(&self) -> StoreResult<()> {
        let bad = |field: &str, problem: String| {
            Err(StoreError::Config(format!("redis.{field}: {problem}")))
        };
        if self.urls.is_empty() {
            return bad("urls", "at least one URL is required".into());
        }
        if self.mode == RedisMode::Standalone && self.urls.len() != 1 {
            return bad(
                "urls",
                format!(
                    "standalone mode takes exactly one URL, got {}",
                    self.urls.len()
                ),
            );
        }
        for (i, url) in self.urls.iter().enumerate() {
            let field = format!("urls[{i}]");
            let secure = url.starts_with("rediss://");
            if !secure && !url.starts_with("redis://") {
                return bad(
                    &field,
                    format!(
                        "`{}` must start with redis:// or rediss://",
                        redact_url(url)
                    ),
                );
            }
            if self.mode != RedisMode::Sentinel && secure != self.tls {
                return bad(
                    &field,
                    if self.tls {
                        format!("`{}` must use rediss:// because tls is on", redact_url(url))
                    } else {
                        format!(
                            "`{}` uses rediss://; set tls = true to connect with TLS",
                            redact_url(url)
                        )
                    },
                );
            }
            if let Err(e) = url.as_str().into_connection_info() {
                return bad(
                    &field,
                    format!("`{}` is not a valid Redis URL: {e}", redact_url(url)),
                );
            }
        }
        match (&self.mode, &self.sentinel_master) {
            (RedisMode::Sentinel, None) => {
                return bad("sentinel_master", "required in sentinel mode".into());
            }
            (RedisMode::Sentinel, Some(m)) if m.trim().is_empty() => {
                return bad("sentinel_master", "must not be empty".into());
            }
            (RedisMode::Standalone | RedisMode::Cluster, Some(_)) => {
                return bad("sentinel_master", "only used in sentinel mode".into());
            }
            _ => {}
        }
        if self.tls_ca_file.is_some() && !self.tls {
            return bad("tls_ca_file", "set, but tls is off".into());
        }
        if self.key_prefix.is_empty() || self.key_prefix.len() > 64 {
            return bad("key_prefix", "must be 1 to 64 characters".into());
        }
        if self
            .key_prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return bad(
                "key_prefix",
                format!(
                    "`{}` must not contain braces or whitespace",
                    self.key_prefix.escape_debug()
                ),
            );
        }
        if self.connect_timeout_ms == 0 {
            return bad("connect_timeout_ms", "must be greater than 0".into());
        }
        if self.command_timeout_ms == 0 {
            return bad("command_timeout_ms", "must be greater than 0".into());
        }
        if self.replication_timeout_ms == 0 {
            return bad("replication_timeout_ms", "must be greater than 0".into());
        }
        if self.replicas_to_wait() > 0 && self.replication_timeout_ms >= self.command_timeout_ms {
            return bad(
                "replication_timeout_ms",
                format!(
                    "{} must be less than command_timeout_ms ({}): the wait for replicas is \
                     part of a write's answer",
                    self.replication_timeout_ms, self.command_timeout_ms
                ),
            );
        }
        if self.role_check_interval_ms == 0 {
            return bad("role_check_interval_ms", "must be greater than 0".into());
        }
        Ok(())
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }

    /// Connection info of URL `i` with the configured credentials applied.
    fn connection_info(&self, i: usize) -> StoreResult<ConnectionInfo> {
        let url = self.urls.get(i).map(String::as_str).unwrap_or_default();
        let info = url.into_connection_info().map_err(|e| {
            StoreError::Config(format!(
                "redis.urls[{i}]: `{}` is not a valid Redis URL: {e}",
                redact_url(url)
            ))
        })?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        Ok(info.set_redis_settings(settings))
    }

    fn certificates(&self) -> StoreResult<Option<TlsCertificates>> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path).map_err(|e| {
            StoreError::Config(format!(
                "redis.tls_ca_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        Ok(Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field("urls", &urls)
            .field("sentinel_master", &self.sentinel_master)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("min_replicas_acked", &self.min_replicas_acked)
            .field("replication_timeout_ms", &self.replication_timeout_ms)
            .field("role_check_interval_ms", &self.role_check_interval_ms)
            .finish()
    }
}

/// A URL with any password in it replaced by `[redacted]`, for messages.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:[redacted]{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// One connection handle of whichever topology; cheap to clone.
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
    Plain(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
        }
    }
}

/// The master's connection in Sentinel mode. A connection is trusted only while the server
/// behind it says `ROLE` master: checked when it is opened, every
/// [`RedisConfig::role_check_interval_ms`], and dropped (so the next call asks the sentinels
/// again) after any error, a `READONLY` answer, a write its replicas did not confirm, or
/// Sentinel's `+switch-master` for this master.
struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
    master: String,
    command_timeout: Duration,
}

impl SentinelLink {
    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let mut client = self.client.lock().await;
        // Another task may have connected while this one waited for the lock.
        if let Some(conn) = self.cached() {
            return Ok(conn);
        }
        let mut conn = client
            .get_async_connection_with_config(&self.config)
            .await
            .map_err(|e| e.to_string())?;
        // The sentinels may still name a master that a failover has just demoted.
        if !self.is_master(&mut conn).await {
            return Err(format!(
                "the server the sentinels name as master `{}` is not (yet) a master",
                self.master
            ));
        }
        if let Ok(mut current) = self.current.lock() {
            *current = Some(conn.clone());
        }
        Ok(conn)
    }

    /// Whether the server behind `conn` answers `ROLE` with `master` in time.
    async fn is_master(&self, conn: &mut MultiplexedConnection) -> bool {
        let role =
            tokio::time::timeout(self.command_timeout, redis::cmd("ROLE").query_async(conn)).await;
        matches!(role, Ok(Ok(Value::Array(items)))
            if items.first().and_then(|v| bytes_of(v.clone())).as_deref() == Some(b"master"))
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    fn forget(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }
}

/// Checks the trusted master connection's `ROLE` every `interval` until the link is dropped.
async fn watch_role(link: std::sync::Weak<SentinelLink>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(link) = link.upgrade() else { return };
        let Some(mut conn) = link.cached() else {
            continue;
        };
        if !link.is_master(&mut conn).await {
            tracing::warn!(
                master = %link.master,
                "redis master connection no longer answers ROLE master; asking the sentinels again"
            );
            link.forget();
        }
    }
}

/// Follows one sentinel's `+switch-master` announcements for the link's master, dropping the
/// master connection at once when it moves; reconnects to the sentinel until the link is dropped.
async fn watch_switch_master(link: std::sync::Weak<SentinelLink>, sentinel: Client) {
    use futures::StreamExt;
    const RETRY: Duration = Duration::from_secs(1);
    loop {
        let Some(master) = link.upgrade().map(|l| l.master.clone()) else {
            return;
        };
        let subscribed = async {
            let mut pubsub = sentinel.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(RETRY * 2, subscribed).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { break };
                    // `<master name> <old ip> <old port> <new ip> <new port>`
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if payload.split(' ').next() == Some(master.as_str()) {
                        let Some(link) = link.upgrade() else { return };
                        tracing::warn!(%master, switch = %payload, "sentinel announced a new redis master");
                        link.forget();
                    }
                }
                () = tokio::time::sleep(RETRY) => {
                    if link.strong_count() == 0 {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

enum Backend {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelLink>),
}

/// Where a subscription connects. Pub/sub messages reach every node: a Cluster carries `PUBLISH`
/// over its bus to all nodes, and a master passes it to its replicas; so any node that answers
/// will do, and a subscriber tries them in turn.
enum SubscribeVia {
    /// Standalone: the server; Cluster: every seed node.
    Nodes(Vec<Client>),
    /// Sentinel: the master the sentinels name now.
    Sentinel(Arc<SentinelLink>),
}

impl SubscribeVia {
    /// A client for the `attempt`-th try.
    async fn client(&self, attempt: usize) -> Result<Client, String> {
        match self {
            Self::Nodes(nodes) if nodes.is_empty() => Err("no redis node configured".into()),
            Self::Nodes(nodes) => Ok(nodes[attempt % nodes.len()].clone()),
            Self::Sentinel(link) => link
                .client
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// Keeps one subscription to `channel` (the full Redis channel name) alive, forwarding to `tx`
/// until the receiver is dropped: [`Notice::Subscribed`] after every (re)subscribe, then the
/// messages. Reconnects after any error, one node after the other, pausing between rounds.
async fn keep_subscribed(via: Arc<SubscribeVia>, channel: String, tx: mpsc::Sender<Notice>) {
    use futures::StreamExt;
    const PAUSE: Duration = Duration::from_millis(500);
    let mut attempt = 0usize;
    while !tx.is_closed() {
        let this_attempt = attempt;
        attempt = attempt.wrapping_add(1);
        let subscribed = async {
            let client = via.client(this_attempt).await?;
            let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
            pubsub
                .subscribe(channel.as_str())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let pubsub = match tokio::time::timeout(PAUSE * 10, subscribed).await {
            Ok(Ok(p)) => p,
            Ok(Err(error)) => {
                tracing::debug!(%error, channel, "redis subscription failed; retrying");
                tokio::time::sleep(PAUSE).await;
                continue;
            }
            Err(_) => {
                tracing::debug!(channel, "redis subscription timed out; retrying");
                continue;
            }
        };
        if tx.send(Notice::Subscribed).await.is_err() {
            return;
        }
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                () = tx.closed() => return,
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Ok(text) = message.get_payload::<String>() else { continue };
                    match tx.try_send(Notice::Message(text)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                        // The subscriber fell behind: drop the message, tell it to catch up.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            if tx.send(Notice::Subscribed).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        tracing::info!(channel, "redis subscription lost; resubscribing");
        tokio::time::sleep(PAUSE).await;
    }
}

/// The Redis store. Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    backend: Arc<Backend>,
    subscribe_via: Arc<SubscribeVia>,
    prefix: Arc<str>,
    mode: RedisMode,
    /// Where it connects, without credentials, for Debug and messages.
    target: Arc<str>,
    op_timeout: Duration,
    /// Replicas every write waits for (`WAIT`); 0: none.
    replicas: u32,
    /// How long a write waits for them.
    replication_timeout: Duration,
    /// Stream appends waiting for the next grouped pipeline (see [`RedisStore::commit_appends`]).
    appends: Arc<std::sync::Mutex<AppendQueue>>,
}

/// Most appends one grouped pipeline carries.
const MAX_APPEND_GROUP: usize = 512;

/// Appends waiting to be sent, and whether a committer task is running.
#[derive(Default)]
struct AppendQueue {
    pending: Vec<PendingAppend>,
    /// A committer is running and takes `pending` before it stops.
    committing: bool,
}

/// One `append` waiting for its pipeline; `done` gets its id once Redis (and, with replicas to
/// wait for, enough replicas) acknowledged it.
struct PendingAppend {
    key: String,
    shown: String,
    data: Vec<u8>,
    max_len: usize,
    done: tokio::sync::oneshot::Sender<StoreResult<String>>,
}

fn lock_appends(queue: &std::sync::Mutex<AppendQueue>) -> std::sync::MutexGuard<'_, AppendQueue> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lets the next append start a committer again if one ends by a panic (the appends it had not
/// taken then fail instead of waiting for ever).
struct AppendCommitterGuard(Arc<std::sync::Mutex<AppendQueue>>);

impl Drop for AppendCommitterGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queue = lock_appends(&self.0);
            queue.committing = false;
            queue.pending.clear();
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("mode", &self.mode)
            .field("target", &self.target)
            .field("key_prefix", &self.prefix)
            .finish()
    }
}

/// The Lua function that gives a scope (its generation key) the next generation, in every
/// script that writes a record: the server's time in microseconds, or one more than the last
/// (see `Store::get_many_since`).
macro_rules! bump_generation_lua {
    () => {
        r"
local function bump_generation(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', key) or '0') or 0
  redis.call('SET', key, string.format('%d', math.max(now, last + 1)))
end
"
    };
}

const PUT: &str = concat!(
    bump_generation_lua!(),
    r"
local cur = redis.call('HGET', KEYS[1], 'v')
local mode = ARGV[1]
if mode == 'absent' and cur then return {1, tonumber(cur)} end
if (mode == 'exists' or mode == 'version') and not cur then return {2, 0} end
if mode == 'version' and cur ~= ARGV[2] then return {3, tonumber(cur)} end
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'd', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[4])
bump_generation(KEYS[3])
return {0, v}
"
);

const DELETE: &str = concat!(
    bump_generation_lua!(),
    r"
local cur = redis.call('HGET', KEYS[1], 'v')
local mode = ARGV[1]
if mode == 'absent' and cur then return {1, tonumber(cur)} end
if (mode == 'exists' or mode == 'version') and not cur then return {2, 0} end
if mode == 'version' and cur ~= ARGV[2] then return {3, tonumber(cur)} end
if not cur then return {0, 0} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
bump_generation(KEYS[3])
return {0, 1}
"
);

// The record keys are built from the index key's scope prefix, so they share its hash tag.
static LIST: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[3] .. id, 'v', 'd')
  out[#out + 1] = id
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
end
return out
",
    )
});

const TRY_LEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local f = redis.call('GET', KEYS[2])
  if f then return tonumber(f) end
  return redis.call('INCR', KEYS[2])
end
if cur then return 0 end
local f = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return f
";

const RENEW_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The record a `HMGET v d` found: none without a version, corrupt with a version but no data.
fn record_of(
    key: &RecordKey,
    version: Option<u64>,
    data: Option<Vec<u8>>,
) -> StoreResult<Option<Record>> {
    match (version, data) {
        (None, _) => Ok(None),
        (Some(version), Some(data)) => Ok(Some(Record { version, data })),
        (Some(_), None) => Err(StoreError::Corrupt {
            key: key.to_string(),
            problem: "record has a version but no data".into(),
        }),
    }
}

/// Escapes what would end or confuse a hash tag.
fn escape_tag(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

fn precondition_args(pre: Precondition) -> (&'static str, u64) {
    match pre {
        Precondition::Any => ("any", 0),
        Precondition::Absent => ("absent", 0),
        Precondition::Exists => ("exists", 0),
        Precondition::Version(v) => ("version", v),
    }
}

/// Maps a script's `{status, version}` answer to the precondition error it reports.
fn precondition_result(key: &RecordKey, pre: Precondition, answer: (i64, i64)) -> StoreResult<u64> {
    let (status, n) = answer;
    let n = u64::try_from(n).map_err(|_| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("negative version {n}"),
    })?;
    match status {
        0 => Ok(n),
        1 => Err(StoreError::AlreadyExists(key.to_string())),
        2 => Err(StoreError::NotFound(key.to_string())),
        3 => Err(StoreError::Conflict {
            key: key.to_string(),
            expected: match pre {
                Precondition::Version(v) => v,
                _ => 0,
            },
            found: n,
        }),
        other => Err(StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("unexpected script status {other}"),
        }),
    }
}

/// Redis stream id `ms-seq` → the store's zero-padded form.
fn store_stream_id(redis_id: &str) -> Option<String> {
    let (ms, seq) = redis_id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    Some(format!("{ms:015}-{seq:010}"))
}

/// The store's zero-padded stream id → Redis form.
fn redis_stream_id(store_id: &str) -> Option<String> {
    let (ms, seq) = store_id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    Some(format!("{ms}-{seq}"))
}

/// A sorted-set score back as the due time it was written as (every one this store writes is a
/// whole number within ±2^53, which a double holds exactly).
fn due_of_score(score: f64) -> Option<i64> {
    let limit = crate::MAX_DUE_MS as f64;
    (score.fract() == 0.0 && (-limit..=limit).contains(&score)).then_some(score as i64)
}

fn limit_arg(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

impl RedisStore {
    /// Connects according to `config` (validated first). Fails with [`StoreError::Config`] for a
    /// bad configuration and [`StoreError::Unavailable`] when Redis cannot be reached; once
    /// connected, the store reconnects by itself.
    pub async fn connect(config: &RedisConfig) -> StoreResult<Self> {
        config.validate()?;
        let target = config
            .urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let certs = config.certificates()?;
        let unavailable = |e: RedisError| {
            StoreError::Unavailable(format!("cannot connect to redis at {target}: {e}"))
        };
        let connect_timeout = config.connect_timeout();
        let command_timeout = config.command_timeout();
        let mut subscribe_nodes = Vec::new();
        let backend = match config.mode {
            RedisMode::Standalone => {
                let info = config.connection_info(0)?;
                let client = match certs {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                }
                .map_err(|e| StoreError::Config(format!("redis.urls[0]: {e}")))?;
                subscribe_nodes.push(client.clone());
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(command_timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let manager = tokio::time::timeout(
                    connect_timeout * 4,
                    ConnectionManager::new_with_config(client, manager_config),
                )
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "cannot connect to redis at {target}: timed out"
                    ))
                })?
                .map_err(unavailable)?;
                Backend::Standalone(manager)
            }
            RedisMode::Cluster => {
                let infos = (0..config.urls.len())
                    .map(|i| config.connection_info(i))
                    .collect::<StoreResult<Vec<_>>>()?;
                for (i, info) in infos.iter().enumerate() {
                    let node = match &certs {
                        Some(certs) => Client::build_with_tls(info.clone(), certs.clone()),
                        None => Client::open(info.clone()),
                    }
                    .map_err(|e| StoreError::Config(format!("redis.urls[{i}]: {e}")))?;
                    subscribe_nodes.push(node);
                }
                let mut builder = ClusterClientBuilder::new(infos)
                    .connection_timeout(connect_timeout)
                    .response_timeout(command_timeout)
                    .retries(3);
                if let Some(user) = &config.username {
                    builder = builder.username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.password(password);
                }
                if config.tls {
                    builder = builder.tls(TlsMode::Secure);
                }
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| StoreError::Config(format!("redis.urls: {e}")))?;
                let conn = tokio::time::timeout(connect_timeout * 4, client.get_async_connection())
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "cannot connect to redis cluster at {target}: timed out"
                        ))
                    })?
                    .map_err(unavailable)?;
                Backend::Cluster(conn)
            }
            RedisMode::Sentinel => {
                let master = config.sentinel_master.clone().unwrap_or_default();
                let mut sentinels = Vec::with_capacity(config.urls.len());
                let mut sentinel_auth = None;
                let mut sentinel_infos = Vec::with_capacity(config.urls.len());
                for (i, url) in config.urls.iter().enumerate() {
                    let info = url
                        .as_str()
                        .into_connection_info()
                        .map_err(|e| StoreError::Config(format!("redis.urls[{i}]: {e}")))?;
                    let settings = info.redis_settings();
                    if settings.password().is_some() || settings.username().is_some() {
                        sentinel_auth = Some((
                            settings.username().map(str::to_owned),
                            settings.password().map(str::to_owned),
                        ));
                    }
                    sentinels.push(info.addr().clone());
                    sentinel_infos.push(info);
                }
                let sentinel_certs = certs.clone();
                let sentinel_tls = config.urls.iter().any(|u| u.starts_with("rediss://"));
                let mut builder =
                    SentinelClientBuilder::new(sentinels, &master, SentinelServerType::Master)
                        .map_err(|e| StoreError::Config(format!("redis.urls: {e}")))?;
                if let Some(user) = &config.username {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some((user, password)) = sentinel_auth {
                    if let Some(user) = user {
                        builder = builder.set_client_to_sentinel_username(user);
                    }
                    if let Some(password) = password {
                        builder = builder.set_client_to_sentinel_password(password);
                    }
                }
                if config.tls {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                }
                if sentinel_tls {
                    builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(certs) = certs {
                    if config.tls {
                        builder = builder.set_client_to_redis_certificates(certs.clone());
                    }
                    if sentinel_tls {
                        builder = builder.set_client_to_sentinel_certificates(certs);
                    }
                }
                let client = builder
                    .build()
                    .map_err(|e| StoreError::Config(format!("redis.urls: {e}")))?;
                let link = Arc::new(SentinelLink {
                    client: tokio::sync::Mutex::new(client),
                    current: std::sync::Mutex::new(None),
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(connect_timeout))
                        .set_response_timeout(Some(command_timeout)),
                    master: master.clone(),
                    command_timeout,
                });
                tokio::spawn(watch_role(
                    Arc::downgrade(&link),
                    Duration::from_millis(config.role_check_interval_ms),
                ));
                for (i, info) in sentinel_infos.into_iter().enumerate() {
                    let sentinel = match (&sentinel_certs, config.urls[i].starts_with("rediss://"))
                    {
                        (Some(certs), true) => Client::build_with_tls(info, certs.clone()),
                        _ => Client::open(info),
                    }
                    .map_err(|e| StoreError::Config(format!("redis.urls[{i}]: {e}")))?;
                    tokio::spawn(watch_switch_master(Arc::downgrade(&link), sentinel));
                }
                tokio::time::timeout(connect_timeout * 4, link.connection())
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "cannot reach redis master `{master}` through sentinels {target}: \
                             timed out"
                        ))
                    })?
                    .map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot reach redis master `{master}` through sentinels {target}: {e}"
                        ))
                    })?;
                Backend::Sentinel(link)
            }
        };
        let subscribe_via = match &backend {
            Backend::Sentinel(link) => SubscribeVia::Sentinel(Arc::clone(link)),
            Backend::Standalone(_) | Backend::Cluster(_) => SubscribeVia::Nodes(subscribe_nodes),
        };
        Ok(Self {
            backend: Arc::new(backend),
            subscribe_via: Arc::new(subscribe_via),
            prefix: config.key_prefix.as_str().into(),
            mode: config.mode,
            target: target.into(),
            // Room for a reconnect plus a script's EVALSHA/EVAL round trips.
            op_timeout: connect_timeout + command_timeout * 2,
            replicas: config.replicas_to_wait(),
            replication_timeout: Duration::from_millis(config.replication_timeout_ms),
            appends: Arc::default(),
        })
    }

    async fn conn(&self) -> StoreResult<Conn> {
        match &*self.backend {
            Backend::Standalone(m) => Ok(Conn::Manager(m.clone())),
            Backend::Cluster(c) => Ok(Conn::Cluster(c.clone())),
            Backend::Sentinel(link) => {
                match tokio::time::timeout(self.op_timeout, link.connection()).await {
                    Ok(Ok(c)) => Ok(Conn::Plain(c)),
                    Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                        "redis at {}: {e}",
                        self.target
                    ))),
                    Err(_) => Err(StoreError::Unavailable(format!(
                        "redis at {}: no master connection within {} ms",
                        self.target,
                        self.op_timeout.as_millis()
                    ))),
                }
            }
        }
    }

    fn unavailable(&self, e: &RedisError) -> StoreError {
        StoreError::Unavailable(format!("redis at {}: {e}", self.target))
    }

    /// Maps a failed command; in Sentinel mode the connection is no longer trusted after any
    /// error (a broken or demoted master is looked up again, and a new connection must answer
    /// `ROLE` master).
    fn failed(&self, e: &RedisError) -> StoreError {
        if let Backend::Sentinel(link) = &*self.backend {
            link.forget();
        }
        self.unavailable(e)
    }

    /// Runs one mutation. With replicas to wait for, it is pipelined with `WAIT` on the same
    /// connection (in Cluster the pipeline goes to the key's master): the store acknowledges it
    /// only if enough replicas confirm it in time, and otherwise fails as unavailable, since a
    /// failover could discard a write only the master holds. The write may still have been
    /// applied (and may survive): callers retry with their preconditions, as after any
    /// unavailable answer.
    async fn write(&self, cmd: &Cmd) -> StoreResult<Value> {
        if self.replicas == 0 {
            return self.query(cmd).await;
        }
        let value = self
            .write_many(std::slice::from_ref(cmd))
            .await?
            .pop()
            .ok_or_else(|| {
                StoreError::Unavailable(format!("redis at {}: a write got no answer", self.target))
            })?;
        if let Value::ServerError(e) = value {
            return Err(StoreError::Unavailable(format!(
                "redis at {}: {e:?}",
                self.target
            )));
        }
        Ok(value)
    }

    /// Runs mutations of one key (one Cluster slot) in one pipeline on one connection, with one
    /// `WAIT` after them when there are replicas to wait for (see [`RedisStore::write`]): all or
    /// none are acknowledged. Returns each command's answer, server errors included as values.
    async fn write_many(&self, cmds: &[Cmd]) -> StoreResult<Vec<Value>> {
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd.clone());
        }
        let mut limit = self.op_timeout;
        if self.replicas > 0 {
            pipe.add_command(
                redis::cmd("WAIT")
                    .arg(self.replicas)
                    .arg(u64::try_from(self.replication_timeout.as_millis()).unwrap_or(u64::MAX))
                    .clone(),
            );
            limit += self.replication_timeout;
        }
        let mut conn = self.conn().await?;
        let answer = tokio::time::timeout(limit, pipe.query_async::<Vec<Value>>(&mut conn)).await;
        let mut answers = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(self.failed(&e)),
            Err(_) => return Err(self.timed_out()),
        };
        if self.replicas > 0 {
            let acked = match answers.pop() {
                Some(Value::Int(n)) => n,
                Some(Value::ServerError(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "redis at {}: WAIT failed: {e:?}",
                        self.target
                    )));
                }
                other => {
                    return Err(StoreError::Unavailable(format!(
                        "redis at {}: WAIT answered {other:?}",
                        self.target
                    )));
                }
            };
            if acked < i64::from(self.replicas) {
                // The master may have lost its replicas to a failover: look it up again.
                if let Backend::Sentinel(link) = &*self.backend {
                    link.forget();
                }
                return Err(StoreError::Unavailable(format!(
                    "redis at {}: write confirmed by {acked} of the {} replicas required within \
                     {} ms; not acknowledged, as a failover could discard it",
                    self.target,
                    self.replicas,
                    self.replication_timeout.as_millis()
                )));
            }
        }
        if answers.len() != cmds.len() {
            return Err(StoreError::Unavailable(format!(
                "redis at {}: {} writes got {} answers",
                self.target,
                cmds.len(),
                answers.len()
            )));
        }
        Ok(answers)
    }

    /// Group commit of stream appends (the audit log): the first append that finds no
    /// committer running starts this task; it takes everything pending, sends each stream's
    /// appends as one pipeline (one `WAIT` for all of them when replicas must confirm), answers
    /// each append with its id or the pipeline's error, and repeats while appends keep
    /// arriving. Without it, every audited call paid its own `WAIT`, and `WAIT` holds the shared
    /// connection until the replicas answer, so audited calls queued one replication round trip
    /// each. An append is still answered only after its record is acknowledged.
    async fn commit_appends(self) {
        let guard = AppendCommitterGuard(Arc::clone(&self.appends));
        loop {
            let batch: Vec<PendingAppend> = {
                let mut queue = lock_appends(&self.appends);
                if queue.pending.is_empty() {
                    // The next append starts a committer of its own.
                    queue.committing = false;
                    break;
                }
                let n = queue.pending.len().min(MAX_APPEND_GROUP);
                queue.pending.drain(..n).collect()
            };
            let mut by_key: std::collections::BTreeMap<String, Vec<PendingAppend>> =
                std::collections::BTreeMap::new();
            for pending in batch {
                by_key.entry(pending.key.clone()).or_default().push(pending);
            }
            futures::future::join_all(by_key.into_values().map(|group| self.send_appends(group)))
                .await;
        }
        drop(guard);
    }

    /// One stream's appends in one pipeline (see [`RedisStore::commit_appends`]).
    async fn send_appends(&self, group: Vec<PendingAppend>) {
        let cmds: Vec<Cmd> = group
            .iter()
            .map(|p| {
                redis::cmd("XADD")
                    .arg(&p.key)
                    .arg("MAXLEN")
                    .arg("=")
                    .arg(p.max_len.max(1))
                    .arg("*")
                    .arg("d")
                    .arg(&p.data)
                    .clone()
            })
            .collect();
        match self.write_many(&cmds).await {
            Ok(answers) => {
                for (pending, answer) in group.into_iter().zip(answers) {
                    let id = match answer {
                        Value::ServerError(e) => Err(StoreError::Unavailable(format!(
                            "redis at {}: {e:?}",
                            self.target
                        ))),
                        other => self.decode::<String>(&pending.shown, other).and_then(|id| {
                            store_stream_id(&id).ok_or_else(|| StoreError::Corrupt {
                                key: pending.shown.clone(),
                                problem: format!("unexpected stream id `{id}`"),
                            })
                        }),
                    };
                    let _ = pending.done.send(id);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for pending in group {
                    let _ = pending
                        .done
                        .send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }

    /// The start of a script's `EVAL` command with `keys` keys (so a write script can share a
    /// pipeline with `WAIT`); the caller adds the keys, then the arguments.
    fn eval(source: &str, keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(source).arg(keys);
        cmd
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "redis at {}: no answer within {} ms",
            self.target,
            self.op_timeout.as_millis()
        ))
    }

    async fn query(&self, cmd: &Cmd) -> StoreResult<Value> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.op_timeout, cmd.query_async::<Value>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn invoke(&self, script: &ScriptInvocation<'_>) -> StoreResult<Value> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(self.op_timeout, script.invoke_async::<Value>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn tag(scope: &Scope) -> String {
        match scope {
            Scope::Global => "{g}".to_owned(),
            Scope::Tenant(t) => format!("{{t:{}}}", escape_tag(t)),
        }
    }

    fn check_name(kind: &str, name: &str) -> StoreResult<()> {
        if name.is_empty() || name.contains(':') {
            return Err(StoreError::Config(format!(
                "{kind} name `{}` must be non-empty and free of `:`",
                name.escape_debug()
            )));
        }
        Ok(())
    }

    fn record_prefix(&self, scope: &Scope, collection: &str) -> String {
        format!("{}:{}:rec:{collection}:", self.prefix, Self::tag(scope))
    }

    fn index_key(&self, scope: &Scope, collection: &str) -> String {
        format!("{}:{}:idx:{collection}", self.prefix, Self::tag(scope))
    }

    /// The key of a scope's generation (see [`Store::get_many_since`]).
    fn generation_key(&self, scope: &Scope) -> String {
        format!("{}:{}:gen", self.prefix, Self::tag(scope))
    }

    fn stream_key(&self, scope: &Scope, stream: &str) -> String {
        format!("{}:{}:stream:{stream}", self.prefix, Self::tag(scope))
    }

    fn lease_keys(&self, name: &str) -> (String, String) {
        let base = format!("{}:{{lease:{}}}", self.prefix, escape_tag(name));
        (format!("{base}:owner"), format!("{base}:fence"))
    }

    /// The Redis channel of notification channel `name` (see [`Store::publish`]).
    fn notify_channel(&self, name: &str) -> String {
        format!("{}:notify:{name}", self.prefix)
    }

    fn schedule_key(&self, name: &str) -> String {
        format!("{}:{{sched:{}}}", self.prefix, escape_tag(name))
    }

    /// `HMGET v d` of each key in one pipeline (all keys of one scope: one Cluster slot).
    async fn read_pipeline<'k>(
        &self,
        keys: impl Iterator<Item = &'k RecordKey>,
    ) -> StoreResult<Vec<Option<Record>>> {
        self.read_pipeline_after(None, keys)
            .await
            .map(|(_, records)| records)
    }

    /// [`RedisStore::read_pipeline`], led by a `GET` of `first` when given (its answer first).
    async fn read_pipeline_after<'k>(
        &self,
        first: Option<String>,
        keys: impl Iterator<Item = &'k RecordKey>,
    ) -> StoreResult<(Option<Value>, Vec<Option<Record>>)> {
        let keys: Vec<&RecordKey> = keys.collect();
        let mut pipe = redis::pipe();
        let led = first.is_some();
        if let Some(first) = first {
            pipe.add_command(redis::cmd("GET").arg(first).clone());
        }
        for key in &keys {
            let rec = format!(
                "{}{}",
                self.record_prefix(&key.scope, key.collection),
                key.id
            );
            pipe.add_command(redis::cmd("HMGET").arg(rec).arg("v").arg("d").clone());
        }
        let mut conn = self.conn().await?;
        let mut answers =
            match tokio::time::timeout(self.op_timeout, pipe.query_async::<Vec<Value>>(&mut conn))
                .await
            {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.failed(&e)),
                Err(_) => return Err(self.timed_out()),
            };
        let lead = (led && !answers.is_empty()).then(|| answers.remove(0));
        if answers.len() != keys.len() {
            return Err(StoreError::Unavailable(format!(
                "redis at {}: {} reads got {} answers",
                self.target,
                keys.len(),
                answers.len()
            )));
        }
        keys.into_iter()
            .zip(answers)
            .map(|(key, answer)| {
                let (version, data): (Option<u64>, Option<Vec<u8>>) = self.decode(key, answer)?;
                record_of(key, version, data)
            })
            .collect::<StoreResult<Vec<_>>>()
            .map(|records| (lead, records))
    }

    /// A scope's generation as stored (`None`: the scope has none yet).
    /// The generation stored at `key` (the scope's [`Self::generation_key`]) as `answer` gave it.
    fn generation_of(&self, key: &str, answer: Option<Value>) -> StoreResult<Option<u64>> {
        let text: Option<String> = match answer {
            Some(answer) => self.decode(&key, answer)?,
            None => None,
        };
        text.map(|g| {
            g.parse::<u64>().map_err(|_| StoreError::Corrupt {
                key: key.to_owned(),
                problem: "the scope's generation is not a number".into(),
            })
        })
        .transpose()
    }

    fn decode<T: redis::FromRedisValue>(
        &self,
        what: &dyn fmt::Display,
        v: Value,
    ) -> StoreResult<T> {
        redis::from_redis_value(v).map_err(|e| StoreError::Corrupt {
            key: what.to_string(),
            problem: format!("unexpected answer from redis: {e}"),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &RecordKey) -> StoreResult<Option<Record>> {
        Self::check_name("collection", key.collection)?;
        let rec = format!(
            "{}{}",
            self.record_prefix(&key.scope, key.collection),
            key.id
        );
        let answer = self
            .query(redis::cmd("HMGET").arg(&rec).arg("v").arg("d"))
            .await?;
        let (version, data): (Option<u64>, Option<Vec<u8>>) = self.decode(key, answer)?;
        record_of(key, version, data)
    }

    async fn get_many_since(
        &self,
        scope: &Scope,
        keys: &[RecordKey],
        known: Option<u64>,
    ) -> StoreResult<ScopeRead> {
        crate::check_one_scope(scope, keys)?;
        for key in keys {
            Self::check_name("collection", key.collection)?;
        }
        let generation = self.generation_key(scope);
        // Known: one `GET` (Redis's cheapest command, no script) answers the common case.
        if let Some(known) = known {
            let answer = self.query(redis::cmd("GET").arg(&generation)).await?;
            if self.generation_of(&generation, Some(answer))? == Some(known) {
                return Ok(ScopeRead::Unchanged);
            }
        }
        // The generation is read before the records in one pipeline (one Cluster slot).
        let (lead, records) = self
            .read_pipeline_after(Some(generation.clone()), keys.iter())
            .await?;
        Ok(ScopeRead::Read {
            generation: self.generation_of(&generation, lead)?,
            records,
        })
    }

    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<Record>>> {
        for key in keys {
            Self::check_name("collection", key.collection)?;
        }
        // One pipeline per scope: the keys of a scope share a hash tag, so each pipeline stays
        // in one Cluster slot (a pipeline across slots is refused there). The pipelines of
        // different scopes run at the same time.
        let mut scopes: Vec<&Scope> = Vec::new();
        for key in keys {
            if !scopes.contains(&&key.scope) {
                scopes.push(&key.scope);
            }
        }
        let groups = scopes.iter().map(|scope| {
            let members: Vec<(usize, &RecordKey)> = keys
                .iter()
                .enumerate()
                .filter(|(_, k)| &k.scope == *scope)
                .collect();
            async move {
                let answers = self.read_pipeline(members.iter().map(|(_, k)| *k)).await?;
                Ok::<_, StoreError>(members.into_iter().map(|(i, _)| i).zip(answers))
            }
        });
        let mut out: Vec<Option<Record>> = vec![None; keys.len()];
        for group in futures::future::try_join_all(groups).await? {
            for (i, record) in group {
                out[i] = record;
            }
        }
        Ok(out)
    }

    async fn put(&self, key: &RecordKey, data: Vec<u8>, pre: Precondition) -> StoreResult<u64> {
        Self::check_name("collection", key.collection)?;
        let rec = format!(
            "{}{}",
            self.record_prefix(&key.scope, key.collection),
            key.id
        );
        let idx = self.index_key(&key.scope, key.collection);
        let (mode, expected) = precondition_args(pre);
        let answer = self
            .write(
                Self::eval(PUT, 3)
                    .arg(&rec)
                    .arg(&idx)
                    .arg(self.generation_key(&key.scope))
                    .arg(mode)
                    .arg(expected)
                    .arg(data)
                    .arg(&key.id),
            )
            .await?;
        precondition_result(key, pre, self.decode(key, answer)?)
    }

    async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool> {
        Self::check_name("collection", key.collection)?;
        let rec = format!(
            "{}{}",
            self.record_prefix(&key.scope, key.collection),
            key.id
        );
        let idx = self.index_key(&key.scope, key.collection);
        let (mode, expected) = precondition_args(pre);
        let answer = self
            .write(
                Self::eval(DELETE, 3)
                    .arg(&rec)
                    .arg(&idx)
                    .arg(self.generation_key(&key.scope))
                    .arg(mode)
                    .arg(expected)
                    .arg(&key.id),
            )
            .await?;
        Ok(precondition_result(key, pre, self.decode(key, answer)?)? == 1)
    }

    async fn list(
        &self,
        scope: &Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Record)>> {
        Self::check_name("collection", collection)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let idx = self.index_key(scope, collection);
        let min = match start_after {
            Some(after) => {
                let mut m = b"(".to_vec();
                m.extend_from_slice(after.as_bytes());
                m
            }
            None => b"-".to_vec(),
        };
        let mut inv = LIST.prepare_invoke();
        inv.key(&idx)
            .arg(min)
            .arg(limit_arg(limit))
            .arg(self.record_prefix(scope, collection));
        let answer = self.invoke(&inv).await?;
        let shown = format!("{scope}/{collection}");
        let Value::Array(items) = answer else {
            return Err(StoreError::Corrupt {
                key: shown,
                problem: "list script answered with a non-array".into(),
            });
        };
        let mut out = Vec::with_capacity(items.len() / 3);
        let mut items = items.into_iter();
        while let (Some(id), Some(version), Some(data)) = (items.next(), items.next(), items.next())
        {
            let id = bytes_of(id)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: shown.clone(),
                    problem: "index holds an id that is not UTF-8".into(),
                })?;
            // A record missing behind its index entry cannot happen with the scripts above;
            // skip it rather than fail the whole page.
            let Some(version) = bytes_of(version) else {
                continue;
            };
            let version = std::str::from_utf8(&version)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("{shown}/{id}"),
                    problem: "version is not a number".into(),
                })?;
            let data = bytes_of(data).ok_or_else(|| StoreError::Corrupt {
                key: format!("{shown}/{id}"),
                problem: "record has a version but no data".into(),
            })?;
            out.push((id, Record { version, data }));
        }
        Ok(out)
    }

    async fn count(&self, scope: &Scope, collection: &'static str) -> StoreResult<u64> {
        Self::check_name("collection", collection)?;
        let answer = self
            .query(redis::cmd("ZCARD").arg(self.index_key(scope, collection)))
            .await?;
        self.decode(&format!("{scope}/{collection}"), answer)
    }

    async fn append(
        &self,
        scope: &Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> StoreResult<String> {
        Self::check_name("stream", stream)?;
        let (done, answer) = tokio::sync::oneshot::channel();
        let start_committer = {
            let mut queue = lock_appends(&self.appends);
            queue.pending.push(PendingAppend {
                key: self.stream_key(scope, stream),
                shown: format!("{scope}/stream/{stream}"),
                data,
                max_len,
                done,
            });
            !std::mem::replace(&mut queue.committing, true)
        };
        if start_committer {
            tokio::spawn(self.clone().commit_appends());
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "redis at {}: the append's committer ended without an answer",
                self.target
            )))
        })
    }

    async fn trim_stream(
        &self,
        scope: &Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> StoreResult<u64> {
        Self::check_name("stream", stream)?;
        // Redis stream ids are `<ms>-<seq>` from the server's clock: MINID drops every older one.
        let answer = self
            .write(
                redis::cmd("XTRIM")
                    .arg(self.stream_key(scope, stream))
                    .arg("MINID")
                    .arg("=")
                    .arg(before_ms),
            )
            .await?;
        self.decode(&format!("{scope}/stream/{stream}"), answer)
    }

    async fn read_back(
        &self,
        scope: &Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StreamEntry>> {
        Self::check_name("stream", stream)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let shown = format!("{scope}/stream/{stream}");
        let end = match before {
            Some(b) => {
                let id = redis_stream_id(b).ok_or_else(|| StoreError::Corrupt {
                    key: shown.clone(),
                    problem: format!("`{}` is not a stream id of this store", b.escape_debug()),
                })?;
                format!("({id}")
            }
            None => "+".to_owned(),
        };
        let answer = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(self.stream_key(scope, stream))
                    .arg(end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit_arg(limit)),
            )
            .await?;
        let entries: Vec<(String, Vec<Vec<u8>>)> = self.decode(&shown, answer)?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let store_id = store_stream_id(&id).ok_or_else(|| StoreError::Corrupt {
                    key: shown.clone(),
                    problem: format!("unexpected stream id `{id}`"),
                })?;
                let data = fields
                    .chunks_exact(2)
                    .find(|kv| kv[0] == b"d")
                    .map(|kv| kv[1].clone())
                    .ok_or_else(|| StoreError::Corrupt {
                        key: format!("{shown}/{store_id}"),
                        problem: "stream entry has no data field".into(),
                    })?;
                Ok(StreamEntry { id: store_id, data })
            })
            .collect()
    }

    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<Lease>> {
        if owner.is_empty() {
            return Err(StoreError::Config("lease owner must not be empty".into()));
        }
        let (owner_key, fence_key) = self.lease_keys(name);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let answer = self
            .write(
                Self::eval(TRY_LEASE, 2)
                    .arg(&owner_key)
                    .arg(&fence_key)
                    .arg(owner)
                    .arg(ttl_ms),
            )
            .await?;
        let fence: i64 = self.decode(&format!("lease {name}"), answer)?;
        Ok(u64::try_from(fence)
            .ok()
            .filter(|f| *f > 0)
            .map(|fence| Lease {
                name: name.to_owned(),
                owner: owner.to_owned(),
                fence,
            }))
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<bool> {
        let (owner_key, _) = self.lease_keys(name);
        let answer = self
            .write(Self::eval(RELEASE_LEASE, 1).arg(&owner_key).arg(owner))
            .await?;
        let released: i64 = self.decode(&format!("lease {name}"), answer)?;
        Ok(released == 1)
    }

    async fn renew_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let (owner_key, _) = self.lease_keys(name);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let answer = self
            .write(
                Self::eval(RENEW_LEASE, 1)
                    .arg(&owner_key)
                    .arg(owner)
                    .arg(ttl_ms),
            )
            .await?;
        let renewed: i64 = self.decode(&format!("lease {name}"), answer)?;
        Ok(renewed == 1)
    }

    async fn schedule(&self, name: &'static str, member: &str, due_ms: i64) -> StoreResult<()> {
        crate::check_schedule(name, Some(due_ms))?;
        self.write(
            redis::cmd("ZADD")
                .arg(self.schedule_key(name))
                .arg(due_ms)
                .arg(member),
        )
        .await?;
        Ok(())
    }

    async fn unschedule(&self, name: &'static str, member: &str) -> StoreResult<()> {
        crate::check_schedule(name, None)?;
        self.write(redis::cmd("ZREM").arg(self.schedule_key(name)).arg(member))
            .await?;
        Ok(())
    }

    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>> {
        crate::check_schedule(name, None)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let answer = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.schedule_key(name))
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit_arg(limit)),
            )
            .await?;
        let shown = format!("schedule {name}");
        let entries: Vec<(String, f64)> = self.decode(&shown, answer)?;
        entries
            .into_iter()
            .map(|(member, score)| {
                due_of_score(score)
                    .map(|due| (member, due))
                    .ok_or_else(|| StoreError::Corrupt {
                        key: shown.clone(),
                        problem: format!("due time {score} is not a whole number of milliseconds"),
                    })
            })
            .collect()
    }

    async fn publish(&self, channel: &'static str, message: &str) -> StoreResult<()> {
        crate::check_channel(channel)?;
        self.query(
            redis::cmd("PUBLISH")
                .arg(self.notify_channel(channel))
                .arg(message),
        )
        .await
        .map(|_| ())
    }

    fn subscribe(&self, channel: &'static str) -> mpsc::Receiver<Notice> {
        let (tx, rx) = mpsc::channel(crate::NOTICE_BUFFER);
        if let Err(error) = crate::check_channel(channel) {
            tracing::error!(%error, "subscription refused");
            return rx;
        }
        tokio::spawn(keep_subscribed(
            Arc::clone(&self.subscribe_via),
            self.notify_channel(channel),
            tx,
        ));
        rx
    }

    async fn ping(&self) -> StoreResult<()> {
        let answer = self.query(&redis::cmd("PING")).await?;
        match answer {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            Value::Okay => Ok(()),
            other => Err(StoreError::Unavailable(format!(
                "redis at {} answered PING with {other:?}",
                self.target
            ))),
        }
    }

    async fn ready(&self) -> StoreResult<()> {
        let not_ready = |problem: String| StoreError::Unavailable(format!("redis: {problem}"));
        if let Backend::Cluster(_) = &*self.backend {
            let info = self.query(redis::cmd("CLUSTER").arg("INFO")).await?;
            let info = String::from_utf8_lossy(&bytes_of(info).unwrap_or_default()).into_owned();
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(not_ready("cluster state is not ok".into()));
            }
            let nodes = self.query(redis::cmd("CLUSTER").arg("NODES")).await?;
            let nodes = String::from_utf8_lossy(&bytes_of(nodes).unwrap_or_default()).into_owned();
            return cluster_readiness(&nodes, self.replicas).map_err(not_ready);
        }
        // Standalone and Sentinel: the connection a write would take (in Sentinel mode one that
        // answered `ROLE` master when it was made) must be a master now, with the replicas writes
        // wait for online.
        let info = self.query(redis::cmd("INFO").arg("replication")).await?;
        let info = String::from_utf8_lossy(&bytes_of(info).unwrap_or_default()).into_owned();
        match info_field(&info, "role") {
            Some("master") => {}
            Some(role) => {
                if let Backend::Sentinel(link) = &*self.backend {
                    link.forget();
                }
                return Err(not_ready(format!("the server is a {role}, not a master")));
            }
            None => return Err(not_ready("INFO replication names no role".into())),
        }
        let online = online_replicas(&info);
        if online < u64::from(self.replicas) {
            return Err(not_ready(format!(
                "{online} of the {} replicas writes wait for (min_replicas_acked) are online",
                self.replicas
            )));
        }
        Ok(())
    }
}

/// Replicas are counted as online up to this replication lag (seconds since their last ack);
/// a stalled replica would make every `WAIT` time out.
const READY_MAX_REPLICA_LAG_SECS: u64 = 5;

/// The value of `name` in an `INFO` or `CLUSTER INFO` answer (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end().split_once(':')?;
        (key == name).then_some(value)
    })
}

/// Replicas in `INFO replication` (`slaveN:ip=…,port=…,state=online,offset=…,lag=…`) that are
/// online with a lag of at most [`READY_MAX_REPLICA_LAG_SECS`].
fn online_replicas(info: &str) -> u64 {
    let mut online = 0;
    for line in info.lines() {
        let Some((key, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        if !key.starts_with("slave") || key[5..].parse::<u32>().is_err() {
            continue;
        }
        let field = |name: &str| {
            value.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then_some(v)
            })
        };
        let lag_ok = field("lag")
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l <= READY_MAX_REPLICA_LAG_SECS);
        if field("state") == Some("online") && lag_ok {
            online += 1;
        }
    }
    online
}

/// Checks a `CLUSTER NODES` answer: every master that serves slots is up and has at least
/// `replicas` connected replicas that are not failing. The error names the first master short.
fn cluster_readiness(nodes: &str, replicas: u32) -> Result<(), String> {
    struct Node<'a> {
        id: &'a str,
        addr: &'a str,
        flags: &'a str,
        master: &'a str,
        link: &'a str,
        slots: usize,
    }
    let parsed: Vec<Node<'_>> = nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 8).then(|| Node {
                id: f[0],
                addr: f[1].split('@').next().unwrap_or(f[1]),
                flags: f[2],
                master: f[3],
                link: f[7],
                slots: f.len() - 8,
            })
        })
        .collect();
    let failing = |n: &Node<'_>| n.flags.split(',').any(|f| f == "fail" || f == "fail?");
    let masters: Vec<&Node<'_>> = parsed
        .iter()
        .filter(|n| n.flags.split(',').any(|f| f == "master") && n.slots > 0)
        .collect();
    if masters.is_empty() {
        return Err("no master serves slots".into());
    }
    for master in masters {
        if failing(master) {
            return Err(format!("master {} is failing", master.addr));
        }
        let healthy = parsed
            .iter()
            .filter(|n| n.master == master.id && !failing(n) && n.link == "connected")
            .count();
        if healthy < replicas as usize {
            return Err(format!(
                "master {} has {healthy} of the {replicas} replicas writes wait for \
                 (min_replicas_acked)",
                master.addr
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_counts_online_replicas_and_cluster_masters() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
                    slave0:ip=127.0.0.1,port=7001,state=online,offset=10,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
                    slave2:ip=127.0.0.1,port=7003,state=online,offset=10,lag=9\r\n\
                    slave_read_only:1\r\n";
        assert_eq!(info_field(info, "role"), Some("master"));
        assert_eq!(online_replicas(info), 1);
        let nodes = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                     b1 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                     c1 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383\n\
                     a2 127.0.0.1:7003@17003 slave a1 0 0 1 connected\n\
                     b2 127.0.0.1:7004@17004 slave b1 0 0 2 connected\n\
                     c2 127.0.0.1:7005@17005 slave,fail c1 0 0 3 disconnected\n";
        assert_eq!(cluster_readiness(nodes, 0), Ok(()));
        let short = cluster_readiness(nodes, 1).unwrap_err();
        assert!(short.contains("127.0.0.1:7002 has 0 of the 1"), "{short}");
        let failing = nodes.replace(
            "b1 127.0.0.1:7001@17001 master",
            "b1 127.0.0.1:7001@17001 master,fail",
        );
        let err = cluster_readiness(&failing, 0).unwrap_err();
        assert!(err.contains("master 127.0.0.1:7001 is failing"), "{err}");
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("redis://user:hunter2@127.0.0.1:6379/0"),
            "redis://user:[redacted]@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://:hunter2@127.0.0.1"),
            "rediss://:[redacted]@127.0.0.1"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let mut config = RedisConfig::standalone("redis://u:hunter2@127.0.0.1:1");
        config.password = Some("s3cret".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |c: RedisConfig| c.validate().unwrap_err().to_string();
        assert!(err(RedisConfig::cluster(vec![])).contains("redis.urls"));
        assert!(err(RedisConfig::standalone("http://127.0.0.1")).contains("redis.urls[0]"),);
        let mut c = RedisConfig::standalone("redis://127.0.0.1");
        c.tls = true;
        assert!(err(c).contains("rediss://"));
        let mut c = RedisConfig::standalone("redis://127.0.0.1");
        c.key_prefix = "a{b}".into();
        assert!(err(c).contains("redis.key_prefix"));
        let c = RedisConfig {
            mode: RedisMode::Sentinel,
            ..RedisConfig::standalone("redis://127.0.0.1:26379")
        };
        assert!(err(c).contains("redis.sentinel_master"));
        let mut c = RedisConfig::standalone("redis://127.0.0.1");
        c.command_timeout_ms = 0;
        assert!(err(c).contains("redis.command_timeout_ms"));
        // The wait for replicas must fit in a command's answer.
        let mut c = RedisConfig::sentinel(vec!["redis://127.0.0.1:26379".into()], "m");
        c.replication_timeout_ms = 2000;
        assert!(err(c).contains("redis.replication_timeout_ms"));
        let mut c = RedisConfig::standalone("redis://127.0.0.1");
        c.role_check_interval_ms = 0;
        assert!(err(c).contains("redis.role_check_interval_ms"));
    }

    #[test]
    fn writes_wait_for_a_replica_by_default_only_in_sentinel_mode() {
        let sentinel = RedisConfig::sentinel(vec!["redis://127.0.0.1:26379".into()], "m");
        assert_eq!(sentinel.replicas_to_wait(), 1);
        assert_eq!(RedisConfig::standalone("redis://x").replicas_to_wait(), 0);
        let mut cluster = RedisConfig::cluster(vec!["redis://127.0.0.1:1".into()]);
        assert_eq!(cluster.replicas_to_wait(), 0);
        cluster.min_replicas_acked = Some(2);
        assert_eq!(cluster.replicas_to_wait(), 2);
        let c: RedisConfig = serde_json::from_str(
            r#"{"mode":"sentinel","urls":["redis://127.0.0.1:1"],"sentinel_master":"m",
                "min_replicas_acked":0,"replication_timeout_ms":250}"#,
        )
        .unwrap();
        assert_eq!((c.replicas_to_wait(), c.replication_timeout_ms), (0, 250));
    }

    #[test]
    fn config_deserializes_and_rejects_unknown_fields() {
        let c: RedisConfig = serde_json::from_str(
            r#"{"mode":"cluster","urls":["redis://127.0.0.1:1","redis://127.0.0.1:2"]}"#,
        )
        .unwrap();
        assert_eq!(c.mode, RedisMode::Cluster);
        assert_eq!(c.key_prefix, "tf");
        c.validate().unwrap();
        let e = serde_json::from_str::<RedisConfig>(r#"{"urls":["redis://x"],"pasword":"x"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("pasword"), "{e}");
    }

    #[test]
    fn stream_ids_sort_as_strings() {
        let a = store_stream_id("999-9").unwrap();
        let b = store_stream_id("999-10").unwrap();
        let c = store_stream_id("1000-0").unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(redis_stream_id(&b).unwrap(), "999-10");
    }

    #[test]
    fn hash_tags_cannot_be_broken_out_of() {
        assert_eq!(
            RedisStore::tag(&Scope::Tenant("a}b{c%".into())),
            "{t:a%7Db%7Bc%25}"
        );
        assert_eq!(RedisStore::tag(&Scope::Global), "{g}");
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable_without_password() {
        // Port 1 on loopback: nothing listens there.
        let mut config = RedisConfig::standalone("redis://:hunter2@127.0.0.1:1");
        config.connect_timeout_ms = 200;
        let err = RedisStore::connect(&config).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
