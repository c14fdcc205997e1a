//! The tokenfleet store: versioned records with compare-and-set, bounded event streams (audit),
//! and leases with fencing tokens (single-flight refresh, consent polling ownership).
//!
//! Records are opaque bytes to the store; the broker serializes domain records and seals secrets
//! before they reach it. Every record and stream lives in a [`Scope`]: global, or one tenant. In
//! Redis every key of one scope carries the same hash tag, so multi-key operations on a scope work
//! in Cluster.
//!
//! Dependency direction: depends on no other tokenfleet crate (it sees only bytes); the broker
//! depends on it. Backends: [`embedded::EmbeddedStore`] (redb, one file) and
//! [`redis_store::RedisStore`] (standalone, Sentinel or Cluster).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

/// Where a record lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Broker-wide objects: tenants, API keys, global audit.
    Global,
    /// Objects of one tenant (the tenant's name).
    Tenant(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Tenant(t) => write!(f, "tenant:{t}"),
        }
    }
}

/// Identity of one record: scope, collection (`provider`, `mailbox`, …) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub scope: Scope,
    pub collection: &'static str,
    pub id: String,
}

impl RecordKey {
    /// A record in a tenant.
    pub fn tenant(tenant: &str, collection: &'static str, id: &str) -> Self {
        Self {
            scope: Scope::Tenant(tenant.to_owned()),
            collection,
            id: id.to_owned(),
        }
    }
    /// A broker-wide record.
    pub fn global(collection: &'static str, id: &str) -> Self {
        Self {
            scope: Scope::Global,
            collection,
            id: id.to_owned(),
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.scope, self.collection, self.id)
    }
}

/// A stored record and its version (starts at 1, +1 on every write).
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub version: u64,
    pub data: Vec<u8>,
}

impl fmt::Debug for Record {
    // Record bytes may hold sealed secrets; never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("version", &self.version)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Condition a write must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write unconditionally (create or overwrite).
    Any,
    /// The record must not exist (create).
    Absent,
    /// The record must exist (any version).
    Exists,
    /// The record must exist at exactly this version.
    Version(u64),
}

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// Ordered id: larger ids are newer. Opaque to callers beyond ordering.
    pub id: String,
    pub data: Vec<u8>,
}

/// A held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Name of the leased thing.
    pub name: String,
    /// Owner token given at acquisition.
    pub owner: String,
    /// Strictly increasing per name across all owners: writes guarded by a lease carry it so a
    /// stale owner's late write can be recognised.
    pub fence: u64,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Precondition `Absent` failed.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Precondition `Exists`/`Version` failed because the record is missing.
    #[error("{0} not found")]
    NotFound(String),
    /// Precondition `Version` failed: someone else wrote first.
    #[error("{key} was changed concurrently (expected version {expected}, found {found})")]
    Conflict {
        key: String,
        expected: u64,
        found: u64,
    },
    /// The backend is unreachable or failed; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data is not what this version of tokenfleet expects.
    #[error("store data corrupt at {key}: {problem}")]
    Corrupt { key: String, problem: String },
    /// The store configuration is invalid.
    #[error("store configuration: {0}")]
    Config(String),
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// What [`Store::get_many_since`] found.
#[derive(Debug)]
pub enum ScopeRead {
    /// No record of the scope changed since the generation the caller knew.
    Unchanged,
    /// The records, one per key in the order asked, and the scope's generation read with them
    /// (`None`: not to be remembered).
    Read {
        /// The scope's generation, read no later than the records.
        generation: Option<u64>,
        /// The records as [`Store::get_many`] reads them.
        records: Vec<Option<Record>>,
    },
}

/// Refuses keys of another scope than `scope` (see [`Store::get_many_since`]).
pub fn check_one_scope(scope: &Scope, keys: &[RecordKey]) -> StoreResult<()> {
    match keys.iter().find(|k| &k.scope != scope) {
        Some(other) => Err(StoreError::Config(format!(
            "a read by generation of scope {scope} cannot read {other}, a record of another scope"
        ))),
        None => Ok(()),
    }
}

/// The generation that follows `last` at the wall-clock time `now_us` (microseconds since the
/// Unix epoch): the time, or `last + 1` when the time is not larger (see
/// [`Store::get_many_since`]).
pub fn next_generation(last: u64, now_us: u64) -> u64 {
    now_us.max(last.saturating_add(1))
}

/// The storage every broker replica shares.
///
/// Implementations must be safe for concurrent use from many tasks and many processes: every
/// precondition is checked atomically with its write.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Reads one record.
    async fn get(&self, key: &RecordKey) -> StoreResult<Option<Record>>;

    /// Reads several records in one round trip (Redis: one pipeline; embedded: one read
    /// transaction); the answer has one entry per key, in the order of `keys`. Keys may be of
    /// any scopes and collections and may repeat. Each record is as [`Store::get`] would read it;
    /// Redis reads the keys one after the other within the pipeline, so records written
    /// concurrently may be seen at different moments (as with separate `get`s), while the
    /// embedded store reads them all at one snapshot.
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<Record>>>;

    /// Reads `keys`, all of `scope`, unless no record of `scope` was written or deleted since
    /// the scope's generation was `known` (then [`ScopeRead::Unchanged`], and nothing else is
    /// read). Embedded: the generation is in memory; Redis: one `GET` of the generation when one
    /// is known, and one pipeline of the generation and the records when none is known or it
    /// changed. Every put or delete of a record of a scope that takes effect gives
    /// the scope a new generation (the embedded store also gives one after a refused write: a
    /// needless re-read, never a missed change), atomically with the write (Redis: in the write's script;
    /// embedded: before the write returns). A generation is a microsecond timestamp, or one more
    /// than the last when that is not larger, so one that was answered is never given to other
    /// contents of the scope again, not after a restart, a Redis failover that lost writes, or a
    /// flush. The answer's generation was read no later than its records, so a write between
    /// the two shows up as another generation on the next call. `None` (Redis: the scope has
    /// not been written since this version of tokenfleet first ran on it) tells the caller the
    /// records cannot be remembered by generation. Keys of another scope are refused
    /// ([`StoreError::Config`]).
    async fn get_many_since(
        &self,
        scope: &Scope,
        keys: &[RecordKey],
        known: Option<u64>,
    ) -> StoreResult<ScopeRead>;

    /// Writes one record if `pre` holds; returns the new version.
    async fn put(&self, key: &RecordKey, data: Vec<u8>, pre: Precondition) -> StoreResult<u64>;

    /// Deletes one record if `pre` holds (`Any` on a missing record is not an error); returns
    /// whether a record was removed.
    async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool>;

    /// Lists a collection in id order: up to `limit` records with ids strictly greater than
    /// `start_after`.
    async fn list(
        &self,
        scope: &Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Record)>>;

    /// Counts the records of a collection.
    async fn count(&self, scope: &Scope, collection: &'static str) -> StoreResult<u64>;

    /// Appends to a bounded stream (oldest entries beyond `max_len` are dropped); returns the id.
    /// Ids grow with the append time. Across the streams of one scope the embedded store's ids
    /// also follow the order of the appends; Redis stream ids are per stream (`<ms>-<n>`), so
    /// entries of two streams appended in the same millisecond may compare either way.
    async fn append(
        &self,
        scope: &Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> StoreResult<String>;

    /// Removes the entries of a stream appended before `before_ms` (unix milliseconds by the
    /// store's clock: the Redis server's, or this host's for the embedded store); returns how many
    /// were removed. Stream ids grow with the append time in both backends, so this is a cut at
    /// one id, as cheap as the length bound.
    async fn trim_stream(
        &self,
        scope: &Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> StoreResult<u64>;

    /// Reads a stream newest first: up to `limit` entries with ids strictly smaller than `before`.
    async fn read_back(
        &self,
        scope: &Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StreamEntry>>;

    /// Takes the lease `name` for `owner` for `ttl` if nobody else holds it (re-acquiring one's own
    /// lease extends it and keeps the fence). `None` when another owner holds it.
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration)
    -> StoreResult<Option<Lease>>;

    /// Releases a lease if `owner` still holds it; returns whether it did.
    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<bool>;

    /// Extends a lease `owner` still holds to expire `ttl` from now, keeping its fence; returns
    /// whether it did. Unlike [`Store::try_lease`] it never acquires: once the lease expired (or
    /// went to another owner) the holder's tenure is over and renewing answers `false`, so a
    /// holder that stalled past its TTL learns it lost the lease instead of silently starting a
    /// new tenure under a new fence.
    async fn renew_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool>;

    /// Sets when `member` of schedule `name` is next due (unix ms), replacing any earlier entry.
    ///
    /// A schedule is an index of when things (e.g. the refresh of each mailbox, member
    /// `<tenant>/<mailbox>`) are due, not a queue: [`Store::due`] does not remove entries, so a
    /// caller re-schedules (or unschedules) a member after doing its work. Members are any UTF-8
    /// (`/` included); `name` must be non-empty and free of `:`, and `due_ms` within ±2^53
    /// (Redis keeps due times as doubles), else [`StoreError::Config`] naming the bad input.
    async fn schedule(&self, name: &'static str, member: &str, due_ms: i64) -> StoreResult<()>;

    /// Removes `member` from schedule `name` (absent is not an error).
    async fn unschedule(&self, name: &'static str, member: &str) -> StoreResult<()>;

    /// Members of `name` due at or before `now_ms`, earliest first, at most `limit`.
    ///
    /// Each comes with its due time. Members due at the same time come in member order.
    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>>;

    /// Checks the backend answers (for health endpoints).
    async fn ping(&self) -> StoreResult<()>;

    /// Publishes `message` on `channel` to the subscribers of every process sharing this store
    /// (Redis `PUBLISH`, which a Cluster carries to every node and a master to its replicas; the
    /// embedded store has one process and delivers in memory). A notification is a hint to look
    /// at records, never the only copy of anything: subscribers may miss one while reconnecting.
    async fn publish(&self, channel: &'static str, message: &str) -> StoreResult<()>;

    /// Subscribes to `channel` (see [`Store::publish`]). The receiver yields
    /// [`Notice::Subscribed`] once the subscription holds and again after every reconnect (or
    /// lag), since messages published in between are lost and the subscriber must catch up from
    /// the records; then the messages. It keeps reconnecting by itself and ends when the receiver
    /// is dropped. `channel` must be non-empty and free of `:`.
    fn subscribe(&self, channel: &'static str) -> tokio::sync::mpsc::Receiver<Notice>;

    /// Checks the store can take writes now (for readiness probes): reachable, and the node that
    /// would take a write is a master with the replicas writes wait for. Redis: `ROLE`/`INFO
    /// replication` say master with at least `min_replicas_acked` replicas online (Cluster: the
    /// cluster state is ok and every master serving slots has them); embedded: a write transaction
    /// commits. The error says what is missing. Default: [`Store::ping`].
    async fn ready(&self) -> StoreResult<()> {
        self.ping().await
    }
}

/// What a subscription ([`Store::subscribe`]) yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The subscription holds (first, and after a reconnect or lag): whatever was published while
    /// it did not is lost, so the subscriber catches up from the records.
    Subscribed,
    /// A message published on the channel.
    Message(String),
}

/// Messages a subscriber may fall behind by before it is told to catch up from the records.
pub const NOTICE_BUFFER: usize = 1024;

/// Largest magnitude of a schedule due time: Redis keeps sorted-set scores as doubles, which hold
/// every integer up to 2^53 exactly (unix milliseconds reach that in the year 287,396).
pub const MAX_DUE_MS: i64 = 1 << 53;

/// Checks a schedule name and due time the same way on every backend.
fn check_schedule(name: &str, due_ms: Option<i64>) -> StoreResult<()> {
    if name.is_empty() || name.contains(':') {
        return Err(StoreError::Config(format!(
            "schedule name `{}` must be non-empty and free of `:`",
            name.escape_debug()
        )));
    }
    if let Some(due) = due_ms
        && !(-MAX_DUE_MS..=MAX_DUE_MS).contains(&due)
    {
        return Err(StoreError::Config(format!(
            "schedule {name}: due time {due} ms is outside ±2^53"
        )));
    }
    Ok(())
}

/// Checks a notification channel name (see [`Store::publish`]).
fn check_channel(name: &str) -> StoreResult<()> {
    if name.is_empty() || name.contains(':') {
        return Err(StoreError::Config(format!(
            "notification channel `{}` must be non-empty and free of `:`",
            name.escape_debug()
        )));
    }
    Ok(())
}

pub mod embedded;
mod journal;
pub mod redis_store;

/// Which backend the broker uses, as it appears in the broker configuration: a table with one
/// key, `embedded` or `redis`, e.g. `[store.embedded] path = "/var/lib/tokenfleet/store.redb"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// One redb file on this node (single broker replica).
    Embedded(EmbeddedConfig),
    /// Redis standalone, Sentinel or Cluster (any number of broker replicas).
    Redis(redis_store::RedisConfig),
}

/// Configuration of the embedded store.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// The database file; created (mode 0600, parent directories 0700) if missing.
    pub path: std::path::PathBuf,
}

/// Opens the store `config` describes.
///
/// Errors: [`StoreError::Config`] for a bad configuration (naming the field), and
/// [`StoreError::Unavailable`] when the backend cannot be reached or the file is in use.
pub async fn connect(config: &StoreConfig) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(match config {
        StoreConfig::Embedded(c) => {
            std::sync::Arc::new(embedded::EmbeddedStore::open(&c.path).await?)
        }
        StoreConfig::Redis(c) => std::sync::Arc::new(redis_store::RedisStore::connect(c).await?),
    })
}

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
