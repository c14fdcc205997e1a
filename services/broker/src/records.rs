//! Typed repository of domain records over the [`Store`]: every record is the JSON of a
//! `tokenfleet_domain` struct, in a fixed collection and scope. Bad stored data decodes to
//! [`StoreError::Corrupt`], and so does a record whose content names another id than its key (a
//! record copied to another key must not be taken for the other object).
//!
//! Also home of [`reseal_all`], which re-seals every sealed field with the keyring's current key
//! after a key rotation, and of the helpers that open a provider's sealed secrets.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokenfleet_domain::{Agent, ApiKey, Device, Mailbox, Provider, Tenant};
use tokenfleet_seal::{Keyring, SealError, Sealed, Secret};
use tokenfleet_store::{Precondition, RecordKey, Scope, Store, StoreError, StoreResult};

use crate::state::BrokerState;
use crate::tokens::grant::{GrantField, GrantRecord, PendingConsent, grant_aad};

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

/// Outcome of [`reseal_all`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Sealed values looked at.
    pub examined: u64,
    /// Sealed values re-sealed with the current key (the others already used it).
    pub resealed: u64,
}

impl std::fmt::Display for ResealReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "examined {} sealed values, re-sealed {}",
            self.examined, self.resealed
        )
    }
}

/// Why [`reseal_all`] stopped. Values re-sealed before the error stay re-sealed (each record is
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

/// Re-seals every sealed value in the store (provider secrets and keys, grant tokens and pending
/// consent secrets) with the keyring's current key, so old keys can be retired after a rotation. Each record is rewritten with compare-and-set on the version it was
/// read at; a record changed concurrently is re-read and retried.
pub async fn reseal_all(state: &BrokerState) -> Result<ResealReport, ResealError> {
    let records = Records::new(state.store.as_ref());
    let mut report = ResealReport::default();
    for tenant in records.list_all::<Tenant>(&Scope::Global).await? {
        let scope = Scope::Tenant(tenant.value.name.clone());
        for provider in records.list_all::<Provider>(&scope).await? {
            let (examined, resealed) = reseal_provider(&records, &state.keyring, provider).await?;
            report.examined += examined;
            report.resealed += resealed;
        }
        for grant in records.list_all::<GrantRecord>(&scope).await? {
            let (examined, resealed) = reseal_grant(&records, &state.keyring, grant).await?;
            report.examined += examined;
            report.resealed += resealed;
        }
    }
    let (examined, resealed) = crate::identity::ca::reseal(state).await?;
    report.examined += examined;
    report.resealed += resealed;
    tracing::info!(
        examined = report.examined,
        resealed = report.resealed,
        key_id = state.keyring.current_key_id(),
        "re-seal finished"
    );
    Ok(report)
}

/// Re-seals one sealed field if needed; returns whether it changed.
fn reseal_field(
    keyring: &Keyring,
    aad: &str,
    field: &mut Option<Sealed>,
) -> Result<bool, ResealError> {
    let Some(sealed) = field.as_ref() else {
        return Ok(false);
    };
    if !keyring.needs_reseal(sealed) {
        return Ok(false);
    }
    let seal_err = |source| ResealError::Seal {
        record: aad.to_owned(),
        source,
    };
    let plain = keyring.open(aad, sealed).map_err(seal_err)?;
    *field = Some(keyring.seal(aad, &plain).map_err(seal_err)?);
    Ok(true)
}

/// Re-seals the sealed fields of a mailbox's grant (refresh and access token, a pending device
/// code or PKCE verifier).
async fn reseal_grant(
    records: &Records<'_>,
    keyring: &Keyring,
    mut current: Versioned<GrantRecord>,
) -> Result<(u64, u64), ResealError> {
    let key = current.value.key();
    for _ in 0..CAS_ATTEMPTS {
        let mut grant = current.value.clone();
        let (tenant, mailbox) = (grant.tenant.clone(), grant.mailbox.clone());
        let aad = |field| grant_aad(&tenant, &mailbox, field);
        let mut examined = 0;
        let mut resealed = 0;
        let mut count = |field: &mut Option<Sealed>, f: GrantField| -> Result<(), ResealError> {
            examined += u64::from(field.is_some());
            if reseal_field(keyring, &aad(f), field)? {
                resealed += 1;
            }
            Ok(())
        };
        count(&mut grant.refresh_token, GrantField::RefreshToken)?;
        count(&mut grant.access_token, GrantField::AccessToken)?;
        match &mut grant.pending {
            Some(PendingConsent::DeviceCode { device_code, .. }) => {
                let mut field = Some(device_code.clone());
                count(&mut field, GrantField::DeviceCode)?;
                if let Some(v) = field {
                    *device_code = v;
                }
            }
            Some(PendingConsent::AuthCode { pkce_verifier, .. }) => {
                let mut field = Some(pkce_verifier.clone());
                count(&mut field, GrantField::PkceVerifier)?;
                if let Some(v) = field {
                    *pkce_verifier = v;
                }
            }
            None => {}
        }
        if resealed == 0 {
            return Ok((examined, 0));
        }
        match records
            .put(&grant, Precondition::Version(current.version))
            .await
        {
            Ok(_) => return Ok((examined, resealed)),
            Err(StoreError::Conflict { .. }) => match records.get::<GrantRecord>(&key).await? {
                Some(fresh) => current = fresh,
                None => return Ok((0, 0)),
            },
            Err(StoreError::NotFound(_)) => return Ok((0, 0)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Contended(key.to_string()))
}

async fn reseal_provider(
    records: &Records<'_>,
    keyring: &Keyring,
    mut current: Versioned<Provider>,
) -> Result<(u64, u64), ResealError> {
    let key = current.value.key();
    for _ in 0..CAS_ATTEMPTS {
        let mut provider = current.value.clone();
        let (tenant, name) = (provider.tenant.clone(), provider.name.clone());
        let mut examined = u64::from(provider.client_secret.is_some())
            + u64::from(provider.service_account_key.is_some())
            + u64::from(provider.http_proxy_password.is_some());
        let mut resealed = 0;
        // Records from before proxy passwords were sealed keep the password in the URL: move it
        // out and seal it.
        if let (url, Some(password)) = tokenfleet_domain::split_url_password(&provider.http_proxy)
            && provider.http_proxy_password.is_none()
        {
            let aad = Provider::http_proxy_password_aad(&tenant, &name);
            let sealed = keyring
                .seal_secret(&aad, &Secret::new(password))
                .map_err(|source| ResealError::Seal {
                    record: aad.clone(),
                    source,
                })?;
            provider.http_proxy = url;
            provider.http_proxy_password = Some(sealed);
            examined += 1;
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::client_secret_aad(&tenant, &name),
            &mut provider.client_secret,
        )? {
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::service_account_key_aad(&tenant, &name),
            &mut provider.service_account_key,
        )? {
            resealed += 1;
        }
        if reseal_field(
            keyring,
            &Provider::http_proxy_password_aad(&tenant, &name),
            &mut provider.http_proxy_password,
        )? {
            resealed += 1;
        }
        if resealed == 0 {
            return Ok((examined, 0));
        }
        match records
            .put(&provider, Precondition::Version(current.version))
            .await
        {
            Ok(_) => return Ok((examined, resealed)),
            Err(StoreError::Conflict { .. }) => match records.get::<Provider>(&key).await? {
                Some(fresh) => current = fresh,
                None => return Ok((0, 0)),
            },
            Err(StoreError::NotFound(_)) => return Ok((0, 0)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Contended(key.to_string()))
}
