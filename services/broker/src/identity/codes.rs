//! One-time enrollment codes. A code is `tfe_` and 40 hex digits (160 random bits); the store
//! keeps only its SHA-256 (record id), the agent it enrolls and its expiry, in the global scope
//! (an enrolling agent names no tenant). A code is consumed by deleting its record on the version
//! it was read at, so of two concurrent enrollments with one code exactly one succeeds.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use super::IdentityError;
use super::ca::hex;
use crate::state::BrokerState;

/// Collection of enrollment code records (global scope, id = hex SHA-256 of the code).
pub const CODES: &str = "enrollment_code";
/// Prefix of every code.
pub const CODE_PREFIX: &str = "tfe_";
/// Default lifetime of a code.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Shortest lifetime of a code.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest lifetime of a code.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A stored enrollment code (its hash, never the code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentCode {
    /// Hex SHA-256 of the code (also the record id).
    pub hash: String,
    /// Tenant of the agent the code enrolls.
    pub tenant: String,
    /// Name of the agent the code enrolls.
    pub agent: String,
    /// Audit actor that created the code.
    pub created_by: String,
    /// When the code was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// When the code stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

/// Why a code was not accepted. The messages do not tell an unknown code from a used one.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// No such code, or it was used already.
    #[error(
        "the enrollment code is unknown or has been used already (a code works once); create a new one with `tokenfleetctl agent enroll-code`"
    )]
    Unknown,
    /// The code expired.
    #[error(
        "the enrollment code has expired; create a new one with `tokenfleetctl agent enroll-code`"
    )]
    Expired,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Store key of the code with hash `hash`.
pub fn code_key(hash: &str) -> RecordKey {
    RecordKey::global(CODES, hash)
}

/// Hex SHA-256 of a code as typed (surrounding white space removed).
pub fn hash_code(code: &str) -> String {
    hex(&Sha256::digest(code.trim().as_bytes()))
}

/// A fresh random code.
pub fn generate() -> Result<Secret, IdentityError> {
    let mut bytes = [0_u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(Secret::new(format!("{CODE_PREFIX}{}", hex(&bytes))))
}

/// Whether `code` has the shape of a code (so garbage is refused without a store lookup).
pub fn well_formed(code: &str) -> bool {
    code.trim().strip_prefix(CODE_PREFIX).is_some_and(|rest| {
        rest.len() == 40
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Creates and stores a code for agent `agent` of `tenant`, valid for `ttl` from now. Expired
/// codes are removed on the way. Returns the code (show it once) and its record.
pub async fn create(
    state: &BrokerState,
    tenant: &str,
    agent: &str,
    ttl: Duration,
    created_by: &str,
) -> Result<(Secret, EnrollmentCode), IdentityError> {
    let now = state.clock.now();
    purge_expired(state, now).await?;
    let code = generate()?;
    let record = EnrollmentCode {
        hash: hash_code(code.expose()),
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        created_by: created_by.to_owned(),
        created: now,
        expires: now + ttl,
    };
    let key = code_key(&record.hash);
    let data = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode enrollment code: {e}"),
    })?;
    state.store.put(&key, data, Precondition::Absent).await?;
    Ok((code, record))
}

/// Consumes `code`: returns what it enrolls if it exists and has not expired, and removes it so
/// it cannot be used again. An expired code is removed too.
pub async fn consume(state: &BrokerState, code: &str) -> Result<EnrollmentCode, CodeError> {
    if !well_formed(code) {
        return Err(CodeError::Unknown);
    }
    let key = code_key(&hash_code(code));
    let Some(stored) = state.store.get(&key).await? else {
        return Err(CodeError::Unknown);
    };
    let record: EnrollmentCode =
        serde_json::from_slice(&stored.data).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("not a valid enrollment code record: {e}"),
        })?;
    let removed = match state
        .store
        .delete(&key, Precondition::Version(stored.version))
        .await
    {
        Ok(removed) => removed,
        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => false,
        Err(e) => return Err(e.into()),
    };
    if state.clock.now() >= record.expires {
        return Err(CodeError::Expired);
    }
    if !removed {
        // Someone else consumed it between our read and our delete.
        return Err(CodeError::Unknown);
    }
    Ok(record)
}

/// Removes expired codes.
async fn purge_expired(state: &BrokerState, now: OffsetDateTime) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list(&Scope::Global, CODES, after.as_deref(), 200)
            .await?;
        let full = page.len() == 200;
        for (id, record) in &page {
            let expired = serde_json::from_slice::<EnrollmentCode>(&record.data)
                .map(|code| code.expires <= now)
                .unwrap_or(true);
            if expired {
                // A concurrent change (consumed meanwhile) is fine.
                match state
                    .store
                    .delete(&code_key(id), Precondition::Version(record.version))
                    .await
                {
                    Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        after = page.last().map(|(id, _)| id.clone());
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_random_well_formed_and_hash_stably() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(well_formed(a.expose()));
        assert!(well_formed(&format!(" {} \n", a.expose())));
        assert_eq!(
            hash_code(a.expose()),
            hash_code(&format!("{}\n", a.expose()))
        );
        assert_eq!(hash_code(a.expose()).len(), 64);
        for bad in ["", "tfe_", "tfe_xyz", "abc", &a.expose().to_uppercase()] {
            assert!(!well_formed(bad), "{bad}");
        }
    }
}
