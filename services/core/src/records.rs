//! Typed repository of domain records over the [`Store`]: every record is the JSON of a
//! `tokenfleet_domain` struct, in a fixed collection and scope. Bad stored data decodes to
//! [`StoreError::Corrupt`], and so does a record whose content names another id than its key (a
//! record copied to another key must not be taken for the other object).
//!
//! Also home of the helpers that open a provider's sealed secrets, and of the error of a re-seal
//! ([`crate::reseal`]).

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokenfleet_domain::{Agent, ApiKey, Device, Mailbox, Provider, Tenant};
use tokenfleet_seal::{Keyring, SealError, Secret};
use tokenfleet_store::{Precondition, RecordKey, Scope, ScopeRead, Store, StoreError, StoreResult};

use crate::kept::Kept;

/// Collection of [`Tenant`] records (global scope).
pub const TENANTS: &str = "tenant";
/// Collection of [`Provider`] records (tenant scope).
pub const PROVIDERS: &str = "provider";
/// Collection of [`Mailbox`] records (tenant scope).
pub const MAILBOXES: &str = "mailbox";
/// Collection of [`Device`] records (tenant scope).
pub const DEVICES: &str = "device";
/// Collection of [`Agent`] records (tenant scope).
pub const AGENTS: &str = "agent";
/// Collection of [`ApiKey`] records (global scope).
pub const API_KEYS: &str = "apikey";

/// Page size used when a caller wants a whole collection.
const SCAN_PAGE: usize = 500;
/// How often a compare-and-set write is retried after a concurrent change before giving up.
pub const CAS_ATTEMPTS: usize = 5;

/// A domain record that lives in the store.
pub trait StoredRecord: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Collection name in the store.
    const COLLECTION: &'static str;
    /// Where this record is stored.
    fn key(&self) -> RecordKey;
}

impl StoredRecord for Tenant {
    const COLLECTION: &'static str = TENANTS;
    fn key(&self) -> RecordKey {
        tenant_key(&self.name)
    }
}

impl StoredRecord for Provider {
    const COLLECTION: &'static str = PROVIDERS;
    fn key(&self) -> RecordKey {
        provider_key(&self.tenant, &self.name)
    }
}

impl StoredRecord for Mailbox {
    const COLLECTION: &'static str = MAILBOXES;
    fn key(&self) -> RecordKey {
        mailbox_key(&self.tenant, &self.name)
    }
}

impl StoredRecord for Device {
    const COLLECTION: &'static str = DEVICES;
    fn key(&self) -> RecordKey {
        device_key(&self.tenant, &self.name)
    }
}

impl StoredRecord for Agent {
    const COLLECTION: &'static str = AGENTS;
    fn key(&self) -> RecordKey {
        agent_key(&self.tenant, &self.name)
    }
}

impl StoredRecord for ApiKey {
    const COLLECTION: &'static str = API_KEYS;
    fn key(&self) -> RecordKey {
        api_key_key(&self.id)
    }
}

/// Key of a tenant record.
pub fn tenant_key(name: &str) -> RecordKey {
    RecordKey::global(TENANTS, name)
}
/// Key of a provider record.
pub fn provider_key(tenant: &str, name: &str) -> RecordKey {
    RecordKey::tenant(tenant, PROVIDERS, name)
}
/// Key of a mailbox record.
pub fn mailbox_key(tenant: &str, name: &str) -> RecordKey {
    RecordKey::tenant(tenant, MAILBOXES, name)
}
/// Key of a device record.
pub fn device_key(tenant: &str, name: &str) -> RecordKey {
    RecordKey::tenant(tenant, DEVICES, name)
}
/// Key of an agent record.
pub fn agent_key(tenant: &str, name: &str) -> RecordKey {
    RecordKey::tenant(tenant, AGENTS, name)
}
/// Key of an API key record.
pub fn api_key_key(id: &str) -> RecordKey {
    RecordKey::global(API_KEYS, id)
}

/// A record together with its store version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// Store version (1 after creation, +1 per write).
    pub version: u64,
    /// The record.
    pub value: T,
}

/// Serializes a record for `key`.
pub fn encode<T: Serialize>(key: &RecordKey, value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode record: {e}"),
    })
}

/// Deserializes the record stored at `key` and checks it belongs there.
pub fn decode<T: StoredRecord>(key: &RecordKey, data: &[u8]) -> StoreResult<T> {
    let value: T = serde_json::from_slice(data).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        // serde_json errors name the position and the expected type, never the data.
        problem: format!("not a valid {} record: {e}", T::COLLECTION),
    })?;
    let own = value.key();
    if own != *key {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("record content belongs to {own}"),
        });
    }
    Ok(value)
}

/// Records one call read together in one store round trip ([`Store::get_many`]), so the steps
/// of the call that need them do not each go to the store (an agent's `IssueAccessToken` reads
/// its agent, certificate list, device, mailbox and grant this way). Writes still go to the store
/// with compare-and-set on the versions read here. A snapshot read through a [`SnapshotCache`]
/// serves every later call that reads the same keys until a record of their scope changes; it
/// decodes each record once and remembers what [`Snapshot::memo`] computed from its records.
#[derive(Default)]
pub struct Snapshot {
    records: Vec<(RecordKey, Option<tokenfleet_store::Record>)>,
    /// Each record decoded, by the first [`Snapshot::get`] of it.
    decoded: Vec<OnceLock<Arc<dyn Any + Send + Sync>>>,
    /// What [`Snapshot::memo`] computed, at most [`MAX_MEMOS`].
    memos: Mutex<Vec<Memo>>,
}

/// Most values one snapshot remembers through [`Snapshot::memo`] (a call computes one or two).
const MAX_MEMOS: usize = 16;

/// One value [`Snapshot::memo`] remembers: what it is, of which record, computed from `input`.
struct Memo {
    what: String,
    input: Box<dyn Any + Send + Sync>,
    value: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Snapshot {
    // Records may hold sealed secrets and memos opened ones: only the keys are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field(
                "keys",
                &self.records.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    fn new(keys: Vec<RecordKey>, records: Vec<Option<tokenfleet_store::Record>>) -> Self {
        let decoded = keys.iter().map(|_| OnceLock::new()).collect();
        Self {
            records: keys.into_iter().zip(records).collect(),
            decoded,
            memos: Mutex::default(),
        }
    }

    /// Reads `keys` in one round trip.
    pub async fn read(store: &dyn Store, keys: Vec<RecordKey>) -> StoreResult<Self> {
        let records = store.get_many(&keys).await?;
        Ok(Self::new(keys, records))
    }

    fn position(&self, key: &RecordKey) -> Option<usize> {
        self.records.iter().position(|(k, _)| k == key)
    }

    /// The record at `key` as read, decoded (once per snapshot, through [`decode_kept`]);
    /// `None` when the snapshot did not read `key`.
    pub fn get<T: StoredRecord + Clone>(
        &self,
        key: &RecordKey,
    ) -> Option<StoreResult<Option<Versioned<T>>>> {
        self.decoded(key, decode::<T>)
    }

    /// [`Snapshot::get`] for records that are not [`StoredRecord`]s (an agent's certificate
    /// list), decoded by `decode`: once per snapshot and type, through [`decode_kept`].
    pub fn decoded<T: Clone + Send + Sync + 'static>(
        &self,
        key: &RecordKey,
        decode: impl FnOnce(&RecordKey, &[u8]) -> StoreResult<T>,
    ) -> Option<StoreResult<Option<Versioned<T>>>> {
        let i = self.position(key)?;
        let Some(record) = &self.records[i].1 else {
            return Some(Ok(None));
        };
        let cell = &self.decoded[i];
        if let Some(value) = cell.get().and_then(|v| v.downcast_ref::<T>()) {
            return Some(Ok(Some(Versioned {
                version: record.version,
                value: value.clone(),
            })));
        }
        Some(decode_kept(key, &record.data, decode).map(|value| {
            // A record decoded as another type first keeps that decoding.
            let _ = cell.set(Arc::new(value.clone()));
            Some(Versioned {
                version: record.version,
                value,
            })
        }))
    }

    /// `compute()`, remembered for this snapshot's lifetime under `what` (which must name the
    /// record and the derivation, e.g. `<grant key>#access_token@mail`) and `input` (the exact
    /// data of the record it is computed from): a later call asking for the same `what` with an
    /// equal `input` gets the remembered value. Only for values that are a function of `what`
    /// and `input` (opening a sealed field: the ciphertext and the record it belongs to).
    /// Errors are never remembered.
    pub fn memo<I, T, E>(
        &self,
        what: &str,
        input: &I,
        compute: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E>
    where
        I: PartialEq + Clone + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        let found = self.lock_memos().iter().find_map(|m| {
            (m.what == what && m.input.downcast_ref::<I>() == Some(input))
                .then(|| Arc::clone(&m.value))
        });
        if let Some(value) = found.as_deref().and_then(|v| v.downcast_ref::<T>()) {
            return Ok(value.clone());
        }
        let value = compute()?;
        let mut memos = self.lock_memos();
        if memos.len() < MAX_MEMOS {
            memos.push(Memo {
                what: what.to_owned(),
                input: Box::new(input.clone()),
                value: Arc::new(value.clone()),
            });
        }
        Ok(value)
    }

    fn lock_memos(&self) -> std::sync::MutexGuard<'_, Vec<Memo>> {
        self.memos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The snapshots of the calls that read the same keys again and again (each agent's
/// `IssueAccessToken` reads the same five records), each with the generation of the scope it
/// was read at ([`Store::get_many_since`]): a call whose keys were read before asks the store
/// only whether their scope changed since, and gets the kept snapshot when it did not (the
/// embedded store answers from memory; Redis with one `GET` of the generation instead of the
/// records). Any write of a record of the scope (a revocation, a re-enrollment, a device
/// change, a refreshed token) gives the scope a new generation, so the next call reads afresh:
/// what the store holds takes effect on the next call, on every replica, as with a plain read.
/// At most `max` snapshots are kept per cache (emptied at once when full).
#[derive(Debug)]
pub struct SnapshotCache {
    kept: Kept<Vec<RecordKey>, (u64, Arc<Snapshot>)>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl SnapshotCache {
    /// A cache of at most `max` snapshots.
    #[must_use]
    pub const fn new(max: usize) -> Self {
        Self {
            kept: Kept::new(max),
        }
    }

    /// The records at `keys`: the kept snapshot of these keys when their scope has not changed
    /// since it was read, else a new read (kept when the store gives it a generation). Keys of
    /// several scopes are read without the cache.
    pub async fn read(
        &self,
        store: &dyn Store,
        keys: Vec<RecordKey>,
    ) -> StoreResult<Arc<Snapshot>> {
        let Some(scope) = keys.first().map(|k| k.scope.clone()) else {
            return Ok(Arc::new(Snapshot::default()));
        };
        if keys.iter().any(|k| k.scope != scope) {
            return Snapshot::read(store, keys).await.map(Arc::new);
        }
        let known = self.kept.find(&keys, |(generation, snapshot)| {
            Some((*generation, Arc::clone(snapshot)))
        });
        match store
            .get_many_since(&scope, &keys, known.as_ref().map(|(g, _)| *g))
            .await?
        {
            ScopeRead::Unchanged => known.map(|(_, snapshot)| snapshot).ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "the store answered `unchanged` to a read of scope {scope} that named no generation"
                ))
            }),
            ScopeRead::Read {
                generation,
                records,
            } => {
                let snapshot = Arc::new(Snapshot::new(keys.clone(), records));
                if let Some(generation) = generation {
                    self.kept.put(keys, (generation, Arc::clone(&snapshot)));
                }
                Ok(snapshot)
            }
        }
    }
}

/// A decoded record and the stored bytes it was decoded from.
struct KeptDecoded {
    data: Vec<u8>,
    value: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

/// Decoded records by type and key, at most 2,048 ([`decode_kept`]).
static DECODED: Kept<(std::any::TypeId, RecordKey), KeptDecoded> = Kept::new(2048);

/// `decode(key, data)`, from a per-process memory of earlier decodings when the very same bytes
/// were decoded as the same type at the same key before. Decoding is a function of type, key
/// and bytes only, so a kept value is exactly what decoding again would give; a record that
/// changed has other bytes and is decoded afresh. This takes JSON decoding off the calls that
/// read the same few records again and again (an agent's `IssueAccessToken` reads its agent,
/// certificate list, device, mailbox and grant each time: their decoding was ~10% of the
/// broker's CPU under issuance load). Errors are never kept.
pub fn decode_kept<T: Clone + Send + Sync + 'static>(
    key: &RecordKey,
    data: &[u8],
    decode: impl FnOnce(&RecordKey, &[u8]) -> StoreResult<T>,
) -> StoreResult<T> {
    let id = (std::any::TypeId::of::<T>(), key.clone());
    // Only the `Arc` is cloned under the lock; the value outside it.
    let hit = DECODED.find(&id, |kept| {
        (kept.data == data).then(|| std::sync::Arc::clone(&kept.value))
    });
    if let Some(value) = hit.as_deref().and_then(|v| v.downcast_ref::<T>()) {
        return Ok(value.clone());
    }
    let value = decode(key, data)?;
    DECODED.put(
        id,
        KeptDecoded {
            data: data.to_vec(),
            value: std::sync::Arc::new(value.clone()),
        },
    );
    Ok(value)
}

/// Whether this caller should make a periodic bookkeeping write of `key` (an agent's
/// `last_seen`, a grant's `last_issued`) at `now`: `true` for the first caller in this process
/// since the last claim at least `every` ago. Under load every concurrent call of one agent
/// sees the same stale time at once; without the claim they would all try the same
/// compare-and-set write (on the embedded store one fsync each) and all but one lose.
/// Per store object, so brokers sharing a process keep apart, and per record version read, so a
/// record that changed since (re-created, refreshed) is not held back by an older claim.
pub fn claim_periodic_write(
    store: &dyn Store,
    key: &RecordKey,
    version: u64,
    now: time::OffsetDateTime,
    every: time::Duration,
) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    /// Entries beyond this are dropped all at once (the cost: some repeated writes).
    const MAX_CLAIMS: usize = 100_000;
    static CLAIMS: OnceLock<Mutex<HashMap<String, time::OffsetDateTime>>> = OnceLock::new();
    let id = format!(
        "{:p}/{key}@{version}",
        std::ptr::from_ref(store).cast::<()>()
    );
    let mut claims = CLAIMS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if claims
        .get(&id)
        .is_some_and(|claimed| now >= *claimed && now - *claimed < every)
    {
        return false;
    }
    if claims.len() >= MAX_CLAIMS {
        claims.clear();
    }
    claims.insert(id, now);
    true
}

/// Typed access to the domain records of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Records<'a> {
    store: &'a dyn Store,
}

impl<'a> Records<'a> {
    /// Repository over `store`.
    pub fn new(store: &'a dyn Store) -> Self {
        Self { store }
    }

    /// Reads one record.
    pub async fn get<T: StoredRecord>(&self, key: &RecordKey) -> StoreResult<Option<Versioned<T>>> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(record) => Ok(Some(Versioned {
                version: record.version,
                value: decode(key, &record.data)?,
            })),
        }
    }

    /// Reads one record from `snapshot` when it read `key`, else from the store.
    pub async fn get_via<T: StoredRecord + Clone>(
        &self,
        snapshot: Option<&Snapshot>,
        key: &RecordKey,
    ) -> StoreResult<Option<Versioned<T>>> {
        match snapshot.and_then(|s| s.get(key)) {
            Some(read) => read,
            None => self.get(key).await,
        }
    }

    /// Writes one record if `pre` holds; returns the new version.
    pub async fn put<T: StoredRecord>(&self, value: &T, pre: Precondition) -> StoreResult<u64> {
        let key = value.key();
        let data = encode(&key, value)?;
        self.store.put(&key, data, pre).await
    }

    /// Deletes one record if `pre` holds; returns whether one was removed.
    pub async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool> {
        self.store.delete(key, pre).await
    }

    /// Up to `limit` records of `T`'s collection with ids after `start_after`, in id order.
    pub async fn list<T: StoredRecord>(
        &self,
        scope: &Scope,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Versioned<T>>> {
        let rows = self
            .store
            .list(scope, T::COLLECTION, start_after, limit)
            .await?;
        rows.into_iter()
            .map(|(id, record)| {
                let key = RecordKey {
                    scope: scope.clone(),
                    collection: T::COLLECTION,
                    id,
                };
                Ok(Versioned {
                    version: record.version,
                    value: decode(&key, &record.data)?,
                })
            })
            .collect()
    }

    /// Every record of `T`'s collection in `scope`, read page by page.
    pub async fn list_all<T: StoredRecord>(&self, scope: &Scope) -> StoreResult<Vec<Versioned<T>>> {
        let mut all: Vec<Versioned<T>> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.list::<T>(scope, after.as_deref(), SCAN_PAGE).await?;
            let full = page.len() == SCAN_PAGE;
            if let Some(last) = page.last() {
                after = Some(last.value.key().id);
            }
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Number of records in `T`'s collection in `scope`.
    pub async fn count<T: StoredRecord>(&self, scope: &Scope) -> StoreResult<u64> {
        self.store.count(scope, T::COLLECTION).await
    }
}

/// Opens a provider's client secret (`None` when it has none). Fails with [`SealError::Open`] when
/// the ciphertext does not belong to this provider.
pub fn open_client_secret(
    keyring: &Keyring,
    provider: &Provider,
) -> Result<Option<Secret>, SealError> {
    provider
        .client_secret
        .as_ref()
        .map(|s| {
            keyring.open_secret(
                &Provider::client_secret_aad(&provider.tenant, &provider.name),
                s,
            )
        })
        .transpose()
}

/// Opens a provider's proxy password (`None` when it has none).
pub fn open_http_proxy_password(
    keyring: &Keyring,
    provider: &Provider,
) -> Result<Option<Secret>, SealError> {
    provider
        .http_proxy_password
        .as_ref()
        .map(|s| {
            keyring.open_secret(
                &Provider::http_proxy_password_aad(&provider.tenant, &provider.name),
                s,
            )
        })
        .transpose()
}

/// Opens a provider's service-account key (`None` when it has none).
pub fn open_service_account_key(
    keyring: &Keyring,
    provider: &Provider,
) -> Result<Option<Secret>, SealError> {
    provider
        .service_account_key
        .as_ref()
        .map(|s| {
            keyring.open_secret(
                &Provider::service_account_key_aad(&provider.tenant, &provider.name),
                s,
            )
        })
        .transpose()
}

/// Why [`crate::reseal::reseal_all`] stopped. Values re-sealed before the error stay re-sealed (each record is
/// written on its own, with compare-and-set); running it again continues where it stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed value could not be opened (unknown key id, or it belongs to another record).
    #[error("{record}: {source}")]
    Seal {
        /// Record and field, e.g. `tenants/acme/providers/m365#client_secret`.
        record: String,
        /// What went wrong (never the secret).
        source: SealError,
    },
    /// The record kept changing under the re-seal.
    #[error("{0} kept changing concurrently; run the re-seal again")]
    Contended(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(display: &str) -> Vec<u8> {
        let value = Tenant {
            name: "acme".into(),
            display_name: display.into(),
            stamps: tokenfleet_domain::Stamps::new(time::OffsetDateTime::UNIX_EPOCH),
        };
        serde_json::to_vec(&value).unwrap()
    }

    /// A snapshot remembers a computed value only for the same `what` and an equal input: another
    /// ciphertext of the same field (a refreshed token) is computed afresh, and a failure is
    /// never remembered.
    #[test]
    fn memos_answer_only_for_the_same_what_and_input() {
        let snapshot = Snapshot::default();
        let calls = std::cell::Cell::new(0);
        let open = |value: &str| {
            let value = value.to_owned();
            let calls = &calls;
            move || {
                calls.set(calls.get() + 1);
                Ok::<_, String>(value)
            }
        };
        let what = "tenants/acme/grants/scan#access_token@mail";
        assert_eq!(
            snapshot.memo(what, &"ct-1", open("token-1")),
            Ok("token-1".into())
        );
        assert_eq!(
            snapshot.memo(what, &"ct-1", open("other")),
            Ok("token-1".into())
        );
        assert_eq!(calls.get(), 1, "the same input was computed once");
        assert_eq!(
            snapshot.memo(what, &"ct-2", open("token-2")),
            Ok("token-2".into())
        );
        let other = "tenants/acme/grants/bulk#access_token@mail";
        assert_eq!(
            snapshot.memo(other, &"ct-1", open("token-3")),
            Ok("token-3".into())
        );
        assert_eq!(
            calls.get(),
            3,
            "another input or another field is computed afresh"
        );
        for _ in 0..2 {
            let failed: Result<String, String> =
                snapshot.memo(what, &"ct-bad", || Err("cannot open".to_owned()));
            assert_eq!(failed, Err("cannot open".into()));
        }
        assert_eq!(
            snapshot.memo(what, &"ct-bad", open("fixed")),
            Ok("fixed".into())
        );
    }

    /// A kept decoding is used only for the very same bytes at the same key as the same type;
    /// changed bytes are decoded afresh, and bad bytes are refused every time.
    #[test]
    fn kept_decodings_answer_only_for_the_same_bytes() {
        let key = tenant_key("acme");
        let calls = std::cell::Cell::new(0);
        let counted = |key: &RecordKey, data: &[u8]| {
            calls.set(calls.get() + 1);
            decode::<Tenant>(key, data)
        };
        let first = tenant("Acme Ltd");
        assert_eq!(
            decode_kept(&key, &first, counted).unwrap().display_name,
            "Acme Ltd"
        );
        assert_eq!(
            decode_kept(&key, &first, counted).unwrap().display_name,
            "Acme Ltd"
        );
        assert_eq!(calls.get(), 1, "the same bytes were decoded once");
        let changed = tenant("Acme Group");
        assert_eq!(
            decode_kept(&key, &changed, counted).unwrap().display_name,
            "Acme Group"
        );
        assert_eq!(calls.get(), 2, "changed bytes are decoded again");
        // The same bytes under another key are that key's record: the content check applies.
        let other = tenant_key("other");
        assert!(matches!(
            decode_kept(&other, &changed, counted),
            Err(StoreError::Corrupt { .. })
        ));
        for _ in 0..2 {
            assert!(matches!(
                decode_kept(&key, b"{not json", counted),
                Err(StoreError::Corrupt { .. })
            ));
        }
        assert_eq!(calls.get(), 5, "refusals are never kept");
    }
}
