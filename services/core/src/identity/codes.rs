//! One-time enrollment codes. A code is `tfe_` and 40 hex digits (160 random bits); the store
//! keeps only its SHA-256 (record id), the agent it enrolls and its expiry, in the global scope
//! (an enrolling agent names no tenant).
//!
//! Leftover codes must not be able to take an agent over, so:
//! - An agent has at most one live code: its tenant holds a pointer record
//!   (`enrollment_code_current/<agent>`) naming the hash of the code made last. Creating a code
//!   moves the pointer and deletes the codes it replaces; a code the pointer does not name is
//!   refused (and removed) even if its record survived a race.
//! - Redeeming a code deletes the pointer on the version it was read at (of two concurrent
//!   enrollments exactly one wins) and every other code of the agent.
//! - A code is bound to the agent record it was made for (the record's creation time): deleting
//!   and re-creating the agent, or its tenant, leaves old codes useless.
//! - A code for an agent that holds a current certificate must be made as a re-enroll code
//!   (`re_enroll`), because enrolling replaces the certificate and cuts off the running agent.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokenfleet_domain::Agent;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use super::IdentityError;
use super::ca::hex;
use crate::records::{Records, Versioned, agent_key};
use crate::state::BrokerState;

/// Collection of enrollment code records (global scope, id = hex SHA-256 of the code).
pub const CODES: &str = "enrollment_code";
/// Collection of the per-agent pointer to its one live code (tenant scope, id = agent name).
pub const CURRENT_CODES: &str = "enrollment_code_current";
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
    /// Creation time of the agent record the code was made for (`None`: a code of an older
    /// broker, which is refused).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub agent_created: Option<OffsetDateTime>,
    /// Made to replace a current certificate (`agent enroll-code --re-enroll`).
    #[serde(default)]
    pub re_enroll: bool,
}

/// The pointer to an agent's one live code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentCode {
    /// Hash of the live code.
    pub hash: String,
}

/// Why a code was not accepted. The messages do not tell an unknown code from a used one.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// No such code, it was used already, or a newer code of its agent removed it.
    #[error(
        "the enrollment code is unknown, has been used already or was replaced by a newer code for the same agent (a code works once, and only an agent's newest code works); create a new one with `tokenfleetctl agent enroll-code`"
    )]
    Unknown,
    /// The code expired.
    #[error(
        "the enrollment code has expired; create a new one with `tokenfleetctl agent enroll-code`"
    )]
    Expired,
    /// A newer code was made for the agent, which replaced this one.
    #[error(
        "the enrollment code was replaced by a newer code for the same agent (an agent has one live code); use the newest code"
    )]
    Superseded,
    /// The agent record the code was made for no longer exists (deleted, maybe re-created).
    #[error(
        "agent `{0}` was deleted (or deleted and re-created) after the enrollment code was made, so the code no longer works; create a new one with `tokenfleetctl agent enroll-code`"
    )]
    AgentReplaced(String),
    /// The agent was revoked.
    #[error("agent `{0}` has been revoked")]
    Revoked(String),
    /// The agent holds a current certificate and the code is not a re-enroll code.
    #[error(
        "agent `{0}` holds a current certificate (valid until {1}); enrolling again would cut off the agent running with it, so it needs a re-enroll code: `tokenfleetctl agent enroll-code --re-enroll`"
    )]
    ReEnrollRequired(String, String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a refused enrollment code answers: unknown, expired and replaced codes as an unknown
/// credential, a revoked agent as a refusal, a changed agent record as a precondition.
impl From<CodeError> for crate::ops::Error {
    fn from(e: CodeError) -> Self {
        match e {
            CodeError::Store(e) => e.into(),
            CodeError::Unknown | CodeError::Expired | CodeError::Superseded => {
                Self::Unauthenticated(e.to_string())
            }
            CodeError::AgentReplaced(_) | CodeError::ReEnrollRequired(..) => {
                Self::FailedPrecondition(e.to_string())
            }
            CodeError::Revoked(_) => Self::PermissionDenied(e.to_string()),
        }
    }
}

/// Store key of the code with hash `hash`.
pub fn code_key(hash: &str) -> RecordKey {
    RecordKey::global(CODES, hash)
}

/// Store key of the pointer to the live code of agent `agent` of `tenant`.
pub fn current_code_key(tenant: &str, agent: &str) -> RecordKey {
    RecordKey::tenant(tenant, CURRENT_CODES, agent)
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

fn corrupt(key: &RecordKey, what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("{what}: {e}"),
    }
}

/// When the agent's current certificate expires, if it holds one: a certificate record of this
/// very agent record (same creation time) listing a serial, and an expiry in the future.
pub async fn current_certificate(
    state: &BrokerState,
    agent: &Agent,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, StoreError> {
    let Some(expires) = agent.certificate_expires.filter(|e| *e > now) else {
        return Ok(None);
    };
    let id = super::AgentId {
        tenant: agent.tenant.clone(),
        name: agent.name.clone(),
    };
    let held = super::peer::read_certificates(state, &id)
        .await?
        .is_some_and(|(_, c)| c.agent_created == agent.stamps.created && !c.serials.is_empty());
    Ok(held.then_some(expires))
}

/// Creates and stores a code for `agent` (as read now), valid for `ttl` from now, and makes it
/// the agent's one live code: the codes it replaces stop working. Expired codes are removed on
/// the way. Returns the code (show it once) and its record.
pub async fn create(
    state: &BrokerState,
    agent: &Agent,
    ttl: Duration,
    re_enroll: bool,
    created_by: &str,
) -> Result<(Secret, EnrollmentCode), IdentityError> {
    let now = state.clock.now();
    purge(state, now, None).await?;
    let code = generate()?;
    let record = EnrollmentCode {
        hash: hash_code(code.expose()),
        tenant: agent.tenant.clone(),
        agent: agent.name.clone(),
        created_by: created_by.to_owned(),
        created: now,
        expires: now + ttl,
        agent_created: Some(agent.stamps.created),
        re_enroll,
    };
    let key = code_key(&record.hash);
    let data = serde_json::to_vec(&record)
        .map_err(|e| corrupt(&key, "cannot encode enrollment code", &e))?;
    state.store.put(&key, data, Precondition::Absent).await?;
    let pointer_key = current_code_key(&agent.tenant, &agent.name);
    let pointer = serde_json::to_vec(&CurrentCode {
        hash: record.hash.clone(),
    })
    .map_err(|e| corrupt(&pointer_key, "cannot encode enrollment code pointer", &e))?;
    state
        .store
        .put(&pointer_key, pointer, Precondition::Any)
        .await?;
    // Every other code of the agent is void now; remove them.
    purge(
        state,
        now,
        Some((
            record.tenant.as_str(),
            record.agent.as_str(),
            record.hash.as_str(),
        )),
    )
    .await?;
    Ok((code, record))
}

/// Redeems `code`: checks it (exists, not expired, still the agent's live code, made for the
/// agent record that exists now, not revoked, a re-enroll code if the agent holds a current
/// certificate), consumes it and every other code of the agent, and returns it with the agent.
/// A code that fails a check is removed too, except when the agent needs a re-enroll code.
pub async fn redeem(
    state: &BrokerState,
    code: &str,
) -> Result<(EnrollmentCode, Versioned<Agent>), CodeError> {
    if !well_formed(code) {
        return Err(CodeError::Unknown);
    }
    let key = code_key(&hash_code(code));
    let Some(stored) = state.store.get(&key).await? else {
        return Err(CodeError::Unknown);
    };
    let record: EnrollmentCode = serde_json::from_slice(&stored.data)
        .map_err(|e| corrupt(&key, "not a valid enrollment code record", &e))?;
    let drop_code = || discard(state, &key, stored.version);
    let now = state.clock.now();
    if now >= record.expires {
        drop_code().await?;
        return Err(CodeError::Expired);
    }
    let pointer_key = current_code_key(&record.tenant, &record.agent);
    let pointer = state.store.get(&pointer_key).await?;
    let live = pointer.as_ref().is_some_and(|p| {
        serde_json::from_slice::<CurrentCode>(&p.data).is_ok_and(|c| c.hash == record.hash)
    });
    if !live {
        drop_code().await?;
        return Err(if pointer.is_some() {
            CodeError::Superseded
        } else {
            CodeError::Unknown
        });
    }
    let who = format!("{}/{}", record.tenant, record.agent);
    let agent = Records::new(state.store.as_ref())
        .get::<Agent>(&agent_key(&record.tenant, &record.agent))
        .await?;
    let agent = match agent {
        Some(a) if Some(a.value.stamps.created) == record.agent_created => a,
        _ => {
            drop_code().await?;
            return Err(CodeError::AgentReplaced(who));
        }
    };
    if agent.value.revoked {
        drop_code().await?;
        return Err(CodeError::Revoked(who));
    }
    if !record.re_enroll
        && let Some(expires) = current_certificate(state, &agent.value, now).await?
    {
        return Err(CodeError::ReEnrollRequired(
            who,
            expires
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        ));
    }
    // Consume: the pointer on the version it was read at (exactly one of two concurrent
    // enrollments gets past this), then the code and any other code of the agent.
    let pointer_version = pointer.map(|p| p.version).unwrap_or_default();
    match state
        .store
        .delete(&pointer_key, Precondition::Version(pointer_version))
        .await
    {
        Ok(true) => {}
        Ok(false) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {
            return Err(CodeError::Unknown);
        }
        Err(e) => return Err(e.into()),
    }
    drop_code().await?;
    purge(
        state,
        now,
        Some((record.tenant.as_str(), record.agent.as_str(), "")),
    )
    .await?;
    Ok((record, agent))
}

/// Deletes the code record `key` if it is still at `version`.
async fn discard(state: &BrokerState, key: &RecordKey, version: u64) -> Result<(), CodeError> {
    match state
        .store
        .delete(key, Precondition::Version(version))
        .await
    {
        Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(CodeError::Store(e)),
    }
}

/// Removes every code of agent `agent` of `tenant` and its pointer (the agent is being deleted).
pub async fn remove_all(state: &BrokerState, tenant: &str, agent: &str) -> Result<(), StoreError> {
    match state
        .store
        .delete(&current_code_key(tenant, agent), Precondition::Any)
        .await
    {
        Ok(_) | Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    purge(state, state.clock.now(), Some((tenant, agent, ""))).await
}

/// Removes expired codes and, with `agent` = (tenant, agent, keep), every code of that agent but
/// the one with hash `keep`.
async fn purge(
    state: &BrokerState,
    now: OffsetDateTime,
    agent: Option<(&str, &str, &str)>,
) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list(&Scope::Global, CODES, after.as_deref(), 200)
            .await?;
        let full = page.len() == 200;
        for (id, record) in &page {
            let remove = match serde_json::from_slice::<EnrollmentCode>(&record.data) {
                Ok(code) => {
                    let kept = agent.is_some_and(|(_, _, keep)| code.hash == keep);
                    let of_agent = agent.is_some_and(|(tenant, name, _)| {
                        code.tenant == tenant && code.agent == name
                    });
                    !kept && (code.expires <= now || of_agent)
                }
                Err(_) => true,
            };
            if remove {
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
