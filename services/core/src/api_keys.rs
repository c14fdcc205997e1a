//! Admin API keys.
//!
//! A key reads `tfk_<id>_<secret>`: `id` is 12 characters `[a-z0-9]` (public, names the key in
//! logs and the audit log), `secret` is 32 random bytes, base64url without padding. The store
//! keeps only the hex SHA-256 of the whole key string (the secret has 256 bits of entropy, so a
//! fast hash is enough); authentication compares hashes in constant time.
//!
//! Keys are managed offline (`tokenfleet-broker create-api-key`) or by an operator through the
//! operations [`create_by`], [`list_visible`] and [`revoke_by`] (the Admin API's `CreateApiKey`,
//! `ListApiKeys`, `RevokeApiKey`). Revoking deletes the record, and every call looks the key up
//! again, so a revoked key fails its next call.
//!
//! Who manages which key ([`may_manage`]): a fleet admin manages every key. A tenant admin
//! manages only keys bound to its own tenant, and only with roles up to its own (`tenant-admin`,
//! `viewer`), so it can neither mint a fleet-wide key nor reach another tenant. Viewers manage
//! none. A key outside the caller's reach answers NOT_FOUND, like one that does not exist, so ids
//! of other tenants' keys reveal nothing. Each change is audited (in the key's tenant's stream
//! when it is bound to one); the key itself is returned once and never logged or audited.
//!
//! A tenant-bound key stops working when its tenant is deleted, and stays dead if a tenant of
//! the same name is created later (the key predates the tenant record).

use crate::audit;
use crate::authz::Principal;
use crate::ops::Error;
use crate::ops::change::{Change, audited, refusal_audited};
use crate::ops::names::{shown, span_object};
use crate::records::{Records, api_key_key, tenant_key};
use crate::state::BrokerState;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokenfleet_domain::{ApiKey, AuditEvent, Role, Tenant, ValidationError};
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, Scope, StoreError};

/// Prefix of every key.
pub const PREFIX: &str = "tfk_";
/// Length of the public id.
pub const ID_LEN: usize = 12;
/// Random bytes in the secret part.
const SECRET_BYTES: usize = 32;

/// Errors of [`create`].
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The role/tenant combination or the description is not acceptable.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The tenant the key should be bound to does not exist.
    #[error("tenant `{0}` not found")]
    TenantNotFound(String),
    /// The operating system's random source failed.
    #[error("random number generator failed")]
    Random,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ApiKeyError> for Error {
    fn from(e: ApiKeyError) -> Self {
        match e {
            ApiKeyError::Invalid(v) => v.into(),
            ApiKeyError::TenantNotFound(t) => {
                Self::NotFound(format!("tenant `{}` not found", shown(&t)))
            }
            ApiKeyError::Random => Self::internal(
                "random number generator failed",
                "random number generator failed",
            ),
            ApiKeyError::Store(s) => s.into(),
        }
    }
}

/// Creates a key with `role`, bound to `tenant` (required for `tenant-admin`, optional for
/// `viewer`, not allowed for `fleet-admin`). Returns the stored record and the key itself, which
/// is shown once and never stored. Recorded in the global audit log with actor `system`.
pub async fn create(
    state: &BrokerState,
    role: Role,
    tenant: Option<&str>,
    description: impl Into<String>,
) -> Result<(ApiKey, Secret), ApiKeyError> {
    create_as(state, "system", role, tenant, &description.into()).await
}

/// Number of stored API keys (a broker with none needs a bootstrap key).
pub async fn count(state: &BrokerState) -> Result<u64, StoreError> {
    Records::new(state.store.as_ref())
        .count::<ApiKey>(&Scope::Global)
        .await
}

/// [`create`] on behalf of `actor` (as the audit log names it).
pub async fn create_as(
    state: &BrokerState,
    actor: &str,
    role: Role,
    tenant: Option<&str>,
    description: &str,
) -> Result<(ApiKey, Secret), ApiKeyError> {
    let (record, key) = create_unaudited(state, role, tenant, description).await?;
    let id = &record.id;
    audit::record(
        state,
        &Scope::Global,
        AuditEvent {
            time: state.clock.now(),
            actor: actor.to_owned(),
            action: "apikey.create".to_owned(),
            target: format!("apikeys/{id}"),
            tenant: record.tenant.clone().unwrap_or_default(),
            result: "ok".to_owned(),
            detail: format!("role {role}"),
        },
    )
    .await;
    Ok((record, key))
}

/// Every stored key (hashes included: for the broker only), in id order.
pub async fn list_all(state: &BrokerState) -> Result<Vec<ApiKey>, StoreError> {
    Ok(Records::new(state.store.as_ref())
        .list_all::<ApiKey>(&Scope::Global)
        .await?
        .into_iter()
        .map(|v| v.value)
        .collect())
}

/// Reads one key record.
pub async fn get(state: &BrokerState, id: &str) -> Result<Option<ApiKey>, StoreError> {
    if !valid_id(id) {
        return Ok(None);
    }
    Ok(Records::new(state.store.as_ref())
        .get::<ApiKey>(&api_key_key(id))
        .await?
        .map(|v| v.value))
}

/// Deletes a key record; the key fails authentication from its next call on. Returns whether it
/// existed.
pub async fn revoke(state: &BrokerState, id: &str) -> Result<bool, StoreError> {
    if !valid_id(id) {
        return Ok(false);
    }
    let removed = Records::new(state.store.as_ref())
        .delete(&api_key_key(id), Precondition::Any)
        .await?;
    if removed {
        tracing::info!(key_id = %id, "API key revoked");
    }
    Ok(removed)
}

fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Creates a key without writing an audit event (the caller audits).
pub async fn create_unaudited(
    state: &BrokerState,
    role: Role,
    tenant: Option<&str>,
    description: &str,
) -> Result<(ApiKey, Secret), ApiKeyError> {
    let tenant = tenant.filter(|t| !t.is_empty());
    match (role, tenant) {
        (Role::TenantAdmin, None) => {
            return Err(ValidationError::new(
                "api_key.tenant",
                "a tenant-admin key needs a tenant",
            )
            .into());
        }
        (Role::FleetAdmin, Some(_)) => {
            return Err(ValidationError::new(
                "api_key.tenant",
                "a fleet-admin key is fleet-wide and cannot be bound to a tenant",
            )
            .into());
        }
        _ => {}
    }
    tokenfleet_domain::text(
        "api_key.description",
        description,
        tokenfleet_domain::MAX_TEXT_LEN,
    )?;
    let records = Records::new(state.store.as_ref());
    if let Some(t) = tenant {
        tokenfleet_domain::name("api_key.tenant", t)?;
        if records.get::<Tenant>(&tenant_key(t)).await?.is_none() {
            return Err(ApiKeyError::TenantNotFound(t.to_owned()));
        }
    }
    let mut attempts = 0;
    loop {
        let id = random_id()?;
        let secret = random_secret()?;
        let key = Secret::new(format!("{PREFIX}{id}_{secret}"));
        let record = ApiKey {
            id: id.clone(),
            role,
            tenant: tenant.map(str::to_owned),
            hash: hash_hex(key.expose()),
            description: description.to_owned(),
            created: state.clock.now(),
        };
        match records.put(&record, Precondition::Absent).await {
            Ok(_) => {
                tracing::info!(key_id = %id, %role, tenant = tenant.unwrap_or(""), "API key created");
                return Ok((record, key));
            }
            // 36^12 ids make a collision practically impossible; retry anyway rather than fail.
            Err(StoreError::AlreadyExists(_)) if attempts < 3 => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A new random key, not stored: for `[admin] bootstrap_key_file` (`tokenfleet-broker
/// generate-api-key`).
pub fn generate() -> Result<Secret, ApiKeyError> {
    Ok(Secret::new(format!(
        "{PREFIX}{}_{}",
        random_id()?,
        random_secret()?
    )))
}

/// What [`bootstrap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The key was stored as a new fleet-admin key.
    Stored,
    /// The same key was already stored (a restart, another replica): nothing changed.
    AlreadyStored,
}

/// Errors of [`bootstrap`]; none contains the key.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The file's content is not a key of the form `tfk_<id>_<secret>`.
    #[error(
        "not an API key: expected `{PREFIX}<12 characters a-z0-9>_<32 random bytes, base64url without padding>`"
    )]
    Malformed,
    /// Another key is stored under the same id.
    #[error(
        "a different key with id `{0}` is already stored; revoke it (`tokenfleetctl api-key revoke {0}`) or bootstrap with a new key"
    )]
    Conflict(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stores `key` (read from `[admin] bootstrap_key_file`) as a fleet-admin key unless a key with
/// its id is already stored, audited as `apikey.bootstrap`. Used for the first admin key of a
/// deployment the operator cannot reach otherwise (the Helm chart generates the key into a
/// Secret; the embedded store is held open by the running broker). The secret part must be 32
/// random bytes, as [`create`] makes them, so a hand-made weak key is refused.
pub async fn bootstrap(state: &BrokerState, key: &Secret) -> Result<Bootstrap, BootstrapError> {
    let text = key.expose().trim();
    let id = parse_id(text).ok_or(BootstrapError::Malformed)?;
    let secret = &text[PREFIX.len() + ID_LEN + 1..];
    let decoded = zeroize::Zeroizing::new(
        B64URL
            .decode(secret)
            .map_err(|_| BootstrapError::Malformed)?,
    );
    if decoded.len() != SECRET_BYTES {
        return Err(BootstrapError::Malformed);
    }
    let record = ApiKey {
        id: id.to_owned(),
        role: Role::FleetAdmin,
        tenant: None,
        hash: hash_hex(text),
        description: "bootstrap key ([admin] bootstrap_key_file)".to_owned(),
        created: state.clock.now(),
    };
    let records = Records::new(state.store.as_ref());
    match records.put(&record, Precondition::Absent).await {
        Ok(_) => {}
        Err(StoreError::AlreadyExists(_)) => {
            let stored = records
                .get::<ApiKey>(&api_key_key(id))
                .await?
                .map(|v| v.value.hash);
            return match stored {
                Some(hash) if bool::from(hash.as_bytes().ct_eq(record.hash.as_bytes())) => {
                    Ok(Bootstrap::AlreadyStored)
                }
                _ => Err(BootstrapError::Conflict(id.to_owned())),
            };
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(key_id = %id, "bootstrap API key stored (fleet-admin)");
    audit::record(
        state,
        &Scope::Global,
        AuditEvent {
            time: state.clock.now(),
            actor: "system".to_owned(),
            action: "apikey.bootstrap".to_owned(),
            target: format!("apikeys/{id}"),
            tenant: String::new(),
            result: "ok".to_owned(),
            detail: "role fleet-admin, from [admin] bootstrap_key_file".to_owned(),
        },
    )
    .await;
    Ok(Bootstrap::Stored)
}

/// Resolves a bearer key to its principal. UNAUTHENTICATED for a malformed, unknown or stale key
/// (the message never contains the key); store failures map as everywhere else.
pub async fn authenticate(state: &BrokerState, bearer: &str) -> Result<Principal, Error> {
    let unknown = || Error::Unauthenticated("API key not recognised".to_owned());
    let id = parse_id(bearer).ok_or_else(unknown)?;
    let records = Records::new(state.store.as_ref());
    let stored = records
        .get::<ApiKey>(&api_key_key(id))
        .await?
        .ok_or_else(unknown)?
        .value;
    let presented = hash_hex(bearer);
    if !bool::from(presented.as_bytes().ct_eq(stored.hash.as_bytes())) {
        return Err(unknown());
    }
    if let Some(t) = &stored.tenant {
        let tenant = records.get::<Tenant>(&tenant_key(t)).await?;
        match tenant {
            Some(t) if t.value.stamps.created <= stored.created => {}
            _ => {
                tracing::warn!(key_id = %stored.id, tenant = %t, "API key's tenant no longer exists");
                return Err(Error::Unauthenticated(
                    "API key not recognised (its tenant no longer exists)".to_owned(),
                ));
            }
        }
    }
    Ok(Principal {
        key_id: stored.id,
        role: stored.role,
        tenant: stored.tenant,
    })
}

// ---------------------------------------------------------------------------------------------
// The operator's operations

/// Whether `principal` may manage a key with `role` bound to `tenant`.
pub fn may_manage(principal: &Principal, role: Role, tenant: Option<&str>) -> bool {
    match principal.role {
        Role::FleetAdmin => true,
        Role::TenantAdmin => {
            role != Role::FleetAdmin && tenant.is_some() && tenant == principal.tenant.as_deref()
        }
        Role::Viewer => false,
    }
}

fn no_key_rights(principal: &Principal) -> Result<(), Error> {
    if principal.role == Role::Viewer {
        return Err(Error::PermissionDenied(format!(
            "API key `{}` is a viewer and may not manage API keys",
            principal.key_id
        )));
    }
    Ok(())
}

/// `principal` creates a key with the role named `role`, bound to `tenant` (empty: fleet-wide),
/// described by `description`. Returns the record and the key itself, which is shown once and
/// never stored. The role is read here, inside the audited change, so an attempt with an
/// unknown role is audited like any refusal.
pub async fn create_by(
    state: &BrokerState,
    principal: &Principal,
    role: &str,
    tenant: &str,
    description: &str,
) -> Result<(ApiKey, Secret), Error> {
    span_object(tenant, "");
    let change = Change {
        action: "apikey.create",
        target: "apikeys".to_owned(),
        tenant: tenant.to_owned(),
    };
    audited(state, principal, change, async {
        no_key_rights(principal)?;
        let role = Role::parse(role).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            Error::InvalidArgument(format!(
                "role: unknown role `{}` (expected one of: {})",
                shown(role),
                names.join(", ")
            ))
        })?;
        let tenant = (!tenant.is_empty()).then_some(tenant);
        if !may_manage(principal, role, tenant) {
            return Err(Error::PermissionDenied(format!(
                "API key `{}` ({}) may create only tenant-admin or viewer keys bound to its own \
                 tenant, not a {role} key{}",
                principal.key_id,
                principal.role,
                tenant
                    .map(|t| format!(" for tenant `{}`", shown(t)))
                    .unwrap_or_default()
            )));
        }
        let (record, key) = create_unaudited(state, role, tenant, description).await?;
        let detail = format!("id {}, role {role}", record.id);
        Ok(((record, key), detail))
    })
    .await
}

/// The keys `principal` may manage (of `tenant` only, when not empty), in id order, hashes
/// included: the edge shows only the public fields.
pub async fn list_visible(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
) -> Result<Vec<ApiKey>, Error> {
    span_object(tenant, "");
    let checked = no_key_rights(principal).and_then(|()| {
        if principal.role == Role::TenantAdmin
            && !tenant.is_empty()
            && Some(tenant) != principal.tenant.as_deref()
        {
            return Err(Error::PermissionDenied(format!(
                "API key `{}` may not access tenant `{}`",
                principal.key_id,
                shown(tenant)
            )));
        }
        Ok(())
    });
    // Target `apikeys`, as every API-key event (the tenant is the event's).
    let read = || Change {
        action: "apikey.list",
        target: "apikeys".to_owned(),
        tenant: tenant.to_owned(),
    };
    refusal_audited(state, principal, read, checked).await?;
    Ok(list_all(state)
        .await?
        .into_iter()
        .filter(|k| may_manage(principal, k.role, k.tenant.as_deref()))
        .filter(|k| tenant.is_empty() || k.tenant.as_deref() == Some(tenant))
        .collect())
}

/// `principal` revokes the key with id `id`; NOT_FOUND for a key it may not manage.
pub async fn revoke_by(state: &BrokerState, principal: &Principal, id: &str) -> Result<(), Error> {
    span_object("", id);
    // The audit stream is the key's tenant's, once the caller is known to reach it.
    let stored = if principal.role == Role::Viewer {
        None
    } else {
        get(state, id).await?
    };
    let visible = stored
        .as_ref()
        .filter(|k| may_manage(principal, k.role, k.tenant.as_deref()));
    let change = Change {
        action: "apikey.revoke",
        target: format!("apikeys/{}", shown(id)),
        tenant: visible.and_then(|k| k.tenant.clone()).unwrap_or_default(),
    };
    audited(state, principal, change, async {
        no_key_rights(principal)?;
        let Some(key) = visible else {
            return Err(Error::NotFound(format!(
                "API key `{}` not found",
                shown(id)
            )));
        };
        if !revoke(state, &key.id).await? {
            return Err(Error::NotFound(format!(
                "API key `{}` not found (revoked concurrently)",
                shown(id)
            )));
        }
        Ok(((), format!("role {}", key.role)))
    })
    .await
}

/// The id part of a well-formed key.
fn parse_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN..)?.strip_prefix('_')?;
    let id_ok = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = !secret.is_empty()
        && secret.len() <= 128
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(id)
}

/// Hex SHA-256.
fn hash_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_id() -> Result<String, ApiKeyError> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::with_capacity(ID_LEN);
    let mut buf = [0u8; 32];
    while id.len() < ID_LEN {
        getrandom::fill(&mut buf).map_err(|_| ApiKeyError::Random)?;
        // Rejection sampling keeps every character equally likely.
        for b in buf.iter().filter(|b| **b < 252) {
            if id.len() == ID_LEN {
                break;
            }
            id.push(char::from(ALPHABET[usize::from(*b % 36)]));
        }
    }
    Ok(id)
}

fn random_secret() -> Result<String, ApiKeyError> {
    let mut bytes = zeroize::Zeroizing::new([0u8; SECRET_BYTES]);
    getrandom::fill(bytes.as_mut_slice()).map_err(|_| ApiKeyError::Random)?;
    Ok(B64URL.encode(bytes.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse() {
        let id = random_id().unwrap();
        assert_eq!(id.len(), ID_LEN);
        let key = format!("{PREFIX}{id}_{}", random_secret().unwrap());
        assert_eq!(parse_id(&key), Some(id.as_str()));
        assert!(key.len() > 50);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "tfk_",
            "tfk_abc_def",
            "tfk_ABCDEFGHIJKL_secret",
            "tfk_abcdefghijkl",
            "tfk_abcdefghijkl_",
            "tfk_abcdefghijklsecret",
            "xyz_abcdefghijkl_secret",
            "tfk_abcdefghijkl_sec ret",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
        // Non-ASCII input must not panic on a char boundary.
        assert_eq!(parse_id("tfk_ééééééééééé_x"), None);
    }

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    use crate::testing::principal as p;

    #[test]
    fn key_rights_follow_role_and_tenant() {
        let fleet = p(Role::FleetAdmin, None);
        assert!(may_manage(&fleet, Role::FleetAdmin, None));
        assert!(may_manage(&fleet, Role::Viewer, Some("b")));
        let ta = p(Role::TenantAdmin, Some("a"));
        assert!(may_manage(&ta, Role::TenantAdmin, Some("a")));
        assert!(may_manage(&ta, Role::Viewer, Some("a")));
        assert!(!may_manage(&ta, Role::Viewer, None), "fleet-wide viewer");
        assert!(!may_manage(&ta, Role::FleetAdmin, None));
        assert!(!may_manage(&ta, Role::TenantAdmin, Some("b")));
        let viewer = p(Role::Viewer, None);
        assert!(!may_manage(&viewer, Role::Viewer, None));
    }

    /// The operations apply the rights: viewers manage nothing, a tenant admin mints only keys
    /// of its tenant and sees (and revokes) only those, another tenant's key is NOT_FOUND.
    #[tokio::test]
    async fn operations_apply_the_key_rights() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path()).await;
        for t in ["a", "b"] {
            crate::testing::put_tenant(&state, t).await;
        }
        let fleet = p(Role::FleetAdmin, None);
        let ta = p(Role::TenantAdmin, Some("a"));
        let viewer = p(Role::Viewer, None);

        let (b_key, _) = create_by(&state, &fleet, "viewer", "b", "").await.unwrap();
        let (a_key, secret) = create_by(&state, &ta, "viewer", "a", "scanner")
            .await
            .unwrap();
        assert!(secret.expose().starts_with(PREFIX));
        assert_eq!(a_key.tenant.as_deref(), Some("a"));

        let err = create_by(&state, &ta, "fleet-admin", "", "")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let err = create_by(&state, &ta, "viewer", "b", "").await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let err = create_by(&state, &ta, "root", "a", "").await.unwrap_err();
        assert!(err.to_string().starts_with("role: unknown role"), "{err}");
        let err = create_by(&state, &viewer, "viewer", "", "")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");

        let seen: Vec<_> = list_visible(&state, &ta, "").await.unwrap();
        assert_eq!(seen.iter().map(|k| &k.id).collect::<Vec<_>>(), [&a_key.id]);
        assert_eq!(list_visible(&state, &fleet, "").await.unwrap().len(), 2);
        let err = list_visible(&state, &ta, "b").await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let err = list_visible(&state, &viewer, "").await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");

        let err = revoke_by(&state, &ta, &b_key.id).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        revoke_by(&state, &ta, &a_key.id).await.unwrap();
        let err = revoke_by(&state, &ta, &a_key.id).await.unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        assert!(get(&state, &b_key.id).await.unwrap().is_some());
    }
}
