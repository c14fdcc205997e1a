//! Authenticating a `TokenBroker` caller from its TLS client certificate, on every call.
//!
//! The TLS layer already refuses certificates of other CAs and expired ones; [`authenticate`]
//! repeats both (with the broker's clock), [`authenticate_handshake_verified`] only the validity
//! (the signature check cost 29% of the broker's CPU under issuance load and told nothing new);
//! both read the identity from the certificate and then consult the store, so revocation and re-enrollment take effect on the next call without a restart:
//! the agent record must exist and not be revoked, and the certificate's serial must be one of
//! the agent's current certificates ([`super::AgentCertificates`]).
//!
//! [`admit`] is the check every `TokenBroker` call runs: [`authenticate_handshake_verified`],
//! with a refused caller logged and, when it presented a certificate of this CA but may not
//! call (revoked, deleted, superseded), audited as the call's action with result
//! `permission_denied`. [`audit`] records an agent's call on the agent's tenant.

use std::sync::Arc;

use time::OffsetDateTime;
use tokenfleet_domain::{Agent, AuditEvent};
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use super::ca::{CertificateProblem, VerifiedCert};
use super::{AgentCa, AgentCertificates, AgentId, certificates_key};
use crate::records::{Records, Snapshot, SnapshotCache, Versioned, agent_key};
use crate::state::BrokerState;

/// `last_seen` is written at most this often per agent (every call would be a write otherwise).
pub const LAST_SEEN_GRANULARITY: time::Duration = time::Duration::seconds(30);

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct AgentPeer {
    /// Who it is.
    pub id: AgentId,
    /// The certificate it called with.
    pub certificate: VerifiedCert,
    /// Its agent record as read for this call.
    pub agent: Versioned<Agent>,
}

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No client certificate on the connection.
    #[error(
        "a client certificate is required: enroll the agent (`tokenfleet-agent enroll`) and call with the certificate it received"
    )]
    NoCertificate,
    /// The certificate is not acceptable.
    #[error(transparent)]
    Certificate(#[from] CertificateProblem),
    /// The agent does not exist (any more).
    #[error("agent `{0}` does not exist; enroll it again")]
    UnknownAgent(AgentId),
    /// The agent has been revoked.
    #[error("agent `{0}` has been revoked")]
    Revoked(AgentId),
    /// The certificate has been replaced (re-enrollment, or an older renewal).
    #[error(
        "this certificate of agent `{0}` has been replaced by a newer enrollment; use the current certificate or enroll again"
    )]
    Superseded(AgentId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The gRPC answer to a refused caller; store failures map as everywhere.
impl From<PeerError> for crate::ops::Error {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Store(e) => e.into(),
            PeerError::NoCertificate | PeerError::Certificate(_) => {
                Self::Unauthenticated(e.to_string())
            }
            PeerError::UnknownAgent(_) | PeerError::Revoked(_) | PeerError::Superseded(_) => {
                Self::PermissionDenied(e.to_string())
            }
        }
    }
}

/// Verifies `leaf_der` and checks the agent against the store; records `last_seen`.
pub async fn authenticate(
    state: &BrokerState,
    ca: &AgentCa,
    leaf_der: Option<&[u8]>,
) -> Result<AgentPeer, PeerError> {
    let leaf = leaf_der.ok_or(PeerError::NoCertificate)?;
    let now = state.clock.now();
    let certificate = ca.verify(leaf, now)?;
    let snapshot = Snapshot::read(state.store.as_ref(), identity_keys(&certificate.id)).await?;
    check_current(state, certificate, &snapshot, now).await
}

/// [`authenticate`] for a certificate the TLS handshake verified against `ca` (a `TokenBroker`
/// call on the broker's listener): the signature is not verified again
/// ([`AgentCa::identify_handshake_verified`]), and the agent record and its certificate list
/// are read in one round trip together with the `also` keys the call needs next (named from
/// the caller's identity), which the returned [`Snapshot`] holds, through `snapshots` (the
/// records as the store holds them on this call: a kept snapshot only while their scope has
/// not changed). The per-call check is unchanged: the agent must exist, not be revoked, and the
/// certificate must be one of its current ones, so revocation and re-enrollment take effect on
/// the next call on every replica.
pub async fn authenticate_handshake_verified(
    state: &BrokerState,
    ca: &AgentCa,
    snapshots: &SnapshotCache,
    leaf_der: Option<&[u8]>,
    also: impl FnOnce(&AgentId) -> Vec<RecordKey>,
) -> Result<(AgentPeer, Arc<Snapshot>), PeerError> {
    let leaf = leaf_der.ok_or(PeerError::NoCertificate)?;
    let now = state.clock.now();
    let certificate = ca.identify_handshake_verified(leaf, now)?;
    let mut keys = identity_keys(&certificate.id);
    keys.extend(also(&certificate.id));
    let snapshot = snapshots.read(state.store.as_ref(), keys).await?;
    let peer = check_current(state, certificate, &snapshot, now).await?;
    Ok((peer, snapshot))
}

/// [`authenticate_handshake_verified`] for a call audited as `action` (see the module
/// documentation); on success the caller's identity is recorded in the current span's `agent`.
pub async fn admit(
    state: &BrokerState,
    ca: &AgentCa,
    snapshots: &SnapshotCache,
    leaf_der: Option<&[u8]>,
    action: &str,
    also: impl FnOnce(&AgentId) -> Vec<RecordKey>,
) -> Result<(AgentPeer, Arc<Snapshot>), PeerError> {
    match authenticate_handshake_verified(state, ca, snapshots, leaf_der, also).await {
        Ok((peer, snapshot)) => {
            tracing::Span::current().record("agent", peer.id.to_string().as_str());
            Ok((peer, snapshot))
        }
        Err(error) => {
            tracing::info!(%error, "agent call not authenticated");
            if let PeerError::Revoked(id)
            | PeerError::UnknownAgent(id)
            | PeerError::Superseded(id) = &error
            {
                // What `From<PeerError> for Error` answers these with.
                let result = "permission_denied";
                audit(state, action, id, id.path(), result, error.to_string()).await;
            }
            Err(error)
        }
    }
}

/// Records `action` of agent `id` on `target` in the audit log of the agent's tenant.
pub async fn audit(
    state: &BrokerState,
    action: &str,
    id: &AgentId,
    target: String,
    result: &str,
    detail: String,
) {
    let event = AuditEvent {
        time: state.clock.now(),
        actor: id.actor(),
        action: action.to_owned(),
        target,
        tenant: id.tenant.clone(),
        result: result.to_owned(),
        detail,
    };
    crate::audit::record(state, &Scope::Tenant(id.tenant.clone()), event).await;
}

/// The agent record and its certificate list.
fn identity_keys(id: &AgentId) -> Vec<RecordKey> {
    vec![
        agent_key(&id.tenant, &id.name),
        certificates_key(&id.tenant, &id.name),
    ]
}

/// The checks only the store can answer, on records `snapshot` read: the agent exists, is not
/// revoked, and lists `certificate` among its current certificates.
async fn check_current(
    state: &BrokerState,
    certificate: VerifiedCert,
    snapshot: &Snapshot,
    now: OffsetDateTime,
) -> Result<AgentPeer, PeerError> {
    let id = certificate.id.clone();
    let records = Records::new(state.store.as_ref());
    let Some(agent) = records
        .get_via::<Agent>(Some(snapshot), &agent_key(&id.tenant, &id.name))
        .await?
    else {
        return Err(PeerError::UnknownAgent(id));
    };
    if agent.value.revoked {
        return Err(PeerError::Revoked(id));
    }
    let cert_key = certificates_key(&id.tenant, &id.name);
    let current = match snapshot.decoded(&cert_key, decode_certificates) {
        Some(read) => read?.map(|c| (c.version, c.value)),
        None => read_certificates(state, &id).await?,
    };
    let listed = current.as_ref().is_some_and(|(_, c)| {
        c.agent_created == agent.value.stamps.created && c.serials.contains(&certificate.serial)
    });
    if !listed {
        return Err(PeerError::Superseded(id));
    }
    let agent = touch_last_seen(state, agent, now).await;
    Ok(AgentPeer {
        id,
        certificate,
        agent,
    })
}

fn decode_certificates(key: &RecordKey, data: &[u8]) -> Result<AgentCertificates, StoreError> {
    serde_json::from_slice::<AgentCertificates>(data).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("not a valid agent certificate record: {e}"),
    })
}

/// Reads an agent's certificate record.
pub async fn read_certificates(
    state: &BrokerState,
    id: &AgentId,
) -> Result<Option<(u64, AgentCertificates)>, StoreError> {
    let key = certificates_key(&id.tenant, &id.name);
    let Some(record) = state.store.get(&key).await? else {
        return Ok(None);
    };
    crate::records::decode_kept(&key, &record.data, decode_certificates)
        .map(|value| Some((record.version, value)))
}

/// Writes an agent's certificate record if `pre` holds.
pub async fn write_certificates(
    state: &BrokerState,
    value: &AgentCertificates,
    pre: Precondition,
) -> Result<u64, StoreError> {
    let key = certificates_key(&value.tenant, &value.agent);
    let data = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode agent certificate record: {e}"),
    })?;
    state.store.put(&key, data, pre).await
}

/// Records that the agent was seen at `now`, unless that was recorded less than
/// [`LAST_SEEN_GRANULARITY`] ago. Best effort: a concurrent change wins and a failure is logged.
async fn touch_last_seen(
    state: &BrokerState,
    mut agent: Versioned<Agent>,
    now: OffsetDateTime,
) -> Versioned<Agent> {
    if agent
        .value
        .last_seen
        .is_some_and(|seen| now - seen < LAST_SEEN_GRANULARITY)
    {
        return agent;
    }
    if !crate::records::claim_periodic_write(
        state.store.as_ref(),
        &agent_key(&agent.value.tenant, &agent.value.name),
        agent.version,
        now,
        LAST_SEEN_GRANULARITY,
    ) {
        return agent;
    }
    let mut next = agent.value.clone();
    next.last_seen = Some(now);
    match Records::new(state.store.as_ref())
        .put(&next, Precondition::Version(agent.version))
        .await
    {
        Ok(version) => {
            agent = Versioned {
                version,
                value: next,
            };
        }
        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
        Err(error) => tracing::warn!(%error, agent = %next.name, "recording last_seen failed"),
    }
    agent
}
