//! The agent's own certificate operations, the `TokenBroker` service's `Enroll` and `Renew`:
//! [`enroll`] turns a one-time code ([`super::codes::redeem`]) and a CSR into a client
//! certificate of the agent CA and makes it the agent's only current certificate; [`renew`]
//! issues a fresh certificate to an authenticated agent and keeps the one it called with next to
//! it (connections still use it). Both record the certificate's expiry, the software version and
//! `last_seen` on the agent record (compare-and-set) and audit the outcome on the agent
//! (`agent.enroll`, `agent.re_enroll`, `agent.renew`; serial and expiry, or the refusal).
//! Requests refused before any work (an unusable CSR or version, an unknown code) are not
//! audited, so a bad CSR does not burn the code.

use time::OffsetDateTime;
use tokenfleet_domain::Agent;
use tokenfleet_store::{Precondition, StoreError};

use super::ca::{IssuedCertificate, check_csr};
use super::codes;
use super::peer::{self, AgentPeer, PeerError};
use super::{AgentCertificates, AgentId, AgentIdentity};
use crate::ops::{Error, stored};
use crate::records::{CAS_ATTEMPTS, agent_key};
use crate::state::BrokerState;

/// Longest software version string kept.
pub const MAX_VERSION_LEN: usize = 100;

/// Audit action of a renewal (and of its refusals).
pub const RENEW_ACTION: &str = "agent.renew";

/// A certificate issued at enrollment, to the agent the code was made for.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The agent the code was bound to.
    pub id: AgentId,
    /// Its new certificate.
    pub certificate: IssuedCertificate,
}

/// The software version an agent reports, trimmed; at most [`MAX_VERSION_LEN`] printable
/// characters.
pub fn software_version(value: &str) -> Result<&str, Error> {
    let value = value.trim();
    if value.chars().count() > MAX_VERSION_LEN || value.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "software_version: must be at most {MAX_VERSION_LEN} printable characters"
        )));
    }
    Ok(value)
}

/// `Enroll`: redeems `code` and issues the agent it was made for a certificate for `csr_der`,
/// replacing every earlier certificate of the agent (see the module documentation).
/// `accepted` runs once the code is redeemed — the caller has proved who it is — before the
/// certificate is written (the edge keeps the call's connection from being closed from then
/// on: a code cut off after its redemption would be spent for nothing).
pub async fn enroll(
    state: &BrokerState,
    identity: &AgentIdentity,
    code: &str,
    csr_der: &[u8],
    version: &str,
    accepted: impl FnOnce() + Send,
) -> Result<Enrolled, Error> {
    // Check the request before the code is spent, so a bad CSR does not burn it.
    check_csr(csr_der)?;
    let version = software_version(version)?;
    let (code, agent) = codes::redeem(state, code).await.map_err(|e| {
        tracing::info!(error = %e, "enrollment refused");
        Error::from(e)
    })?;
    let id = AgentId {
        tenant: code.tenant.clone(),
        name: code.agent.clone(),
    };
    tracing::Span::current().record("agent", id.to_string().as_str());
    accepted();
    let result = enroll_agent(state, identity, &id, &agent.value, csr_der, version).await;
    let action = if code.re_enroll {
        "agent.re_enroll"
    } else {
        "agent.enroll"
    };
    audit_certificate(state, action, &id, &result).await;
    result.map(|certificate| Enrolled { id, certificate })
}

/// Issues the certificate for an agent whose code [`codes::redeem`] accepted (so the agent
/// record `agent` exists, is the one the code was made for, and is not revoked).
async fn enroll_agent(
    state: &BrokerState,
    identity: &AgentIdentity,
    id: &AgentId,
    agent: &Agent,
    csr_der: &[u8],
    version: &str,
) -> Result<IssuedCertificate, Error> {
    let issued = identity.ca.issue(
        csr_der,
        id,
        state.clock.now(),
        identity.certificate_lifetime,
    )?;
    // Enrollment replaces every earlier certificate of the agent.
    let certificates = AgentCertificates {
        tenant: id.tenant.clone(),
        agent: id.name.clone(),
        agent_created: agent.stamps.created,
        serials: vec![issued.serial.clone()],
    };
    peer::write_certificates(state, &certificates, Precondition::Any).await?;
    record_certificate(state, id, &issued, version).await?;
    Ok(issued)
}

/// `Renew`: a fresh certificate for `csr_der` to the authenticated `peer` (see the module
/// documentation).
pub async fn renew(
    state: &BrokerState,
    identity: &AgentIdentity,
    peer: &AgentPeer,
    csr_der: &[u8],
    version: &str,
) -> Result<IssuedCertificate, Error> {
    let version = software_version(version)?;
    let result = renew_agent(state, identity, peer, csr_der, version).await;
    audit_certificate(state, RENEW_ACTION, &peer.id, &result).await;
    result
}

async fn renew_agent(
    state: &BrokerState,
    identity: &AgentIdentity,
    peer: &AgentPeer,
    csr_der: &[u8],
    version: &str,
) -> Result<IssuedCertificate, Error> {
    let id = &peer.id;
    let issued = identity.ca.issue(
        csr_der,
        id,
        state.clock.now(),
        identity.certificate_lifetime,
    )?;
    // Keep the certificate this call came with (connections still use it) and the new one.
    for _ in 0..CAS_ATTEMPTS {
        let Some((stored_version, mut certificates)) = peer::read_certificates(state, id).await?
        else {
            return Err(PeerError::Superseded(id.clone()).into());
        };
        if !certificates.serials.contains(&peer.certificate.serial) {
            return Err(PeerError::Superseded(id.clone()).into());
        }
        certificates.serials = vec![issued.serial.clone(), peer.certificate.serial.clone()];
        match peer::write_certificates(state, &certificates, Precondition::Version(stored_version))
            .await
        {
            Ok(_) => {
                record_certificate(state, id, &issued, version).await?;
                return Ok(issued);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Aborted(format!(
        "the certificates of agent `{id}` changed concurrently; retry"
    )))
}

/// Writes the new certificate's expiry, the software version and `last_seen` to the agent.
async fn record_certificate(
    state: &BrokerState,
    id: &AgentId,
    issued: &IssuedCertificate,
    version: &str,
) -> Result<(), Error> {
    let key = agent_key(&id.tenant, &id.name);
    let what = format!("agent `{id}`");
    for attempt in 0..CAS_ATTEMPTS {
        let Some(stored) = stored::records(state).get::<Agent>(&key).await? else {
            return Err(Error::FailedPrecondition(format!(
                "{what} was deleted meanwhile"
            )));
        };
        let mut agent = stored.value;
        let now = state.clock.now();
        agent.certificate_expires = Some(issued.not_after);
        agent.last_seen = Some(now);
        if !version.is_empty() {
            agent.software_version = version.to_owned();
        }
        agent.stamps.updated = now;
        if stored::commit(state, &what, &agent, stored.version, 0, attempt)
            .await?
            .is_some()
        {
            return Ok(());
        }
    }
    Err(stored::still_contended(&what))
}

async fn audit_certificate(
    state: &BrokerState,
    action: &str,
    id: &AgentId,
    result: &Result<IssuedCertificate, Error>,
) {
    let (outcome, detail) = match result {
        Ok(issued) => {
            tracing::info!(
                action,
                agent = %id,
                serial = %issued.serial,
                expires = %rfc3339(issued.not_after),
                "agent certificate issued"
            );
            (
                "ok",
                format!(
                    "certificate serial {} valid until {}",
                    issued.serial,
                    rfc3339(issued.not_after)
                ),
            )
        }
        Err(e) => {
            tracing::info!(action, agent = %id, result = e.result(), message = %e, "agent certificate refused");
            (e.result(), crate::audit::detail(e.to_string()))
        }
    };
    peer::audit(state, action, id, id.path(), outcome, detail).await;
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokenfleet_domain::Role;
    use tokenfleet_store::Scope;

    use super::*;
    use crate::identity::ca::first_cert_der;
    use crate::identity::enrollment::{CodeRequest, create_code, revoke_agent};

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    /// Enrollment issues a certificate the agent then calls with; renewal keeps both; once the
    /// agent is revoked, its next call is refused and audited, with either certificate.
    #[tokio::test]
    async fn enrolled_agents_renew_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path()).await;
        crate::testing::put_tenant(&state, "acme").await;
        let identity = AgentIdentity {
            ca: Arc::new(super::super::AgentCa::load_or_create(&state).await.unwrap()),
            certificate_lifetime: Duration::from_secs(3600),
        };
        let admin = crate::testing::principal(Role::TenantAdmin, Some("acme"));
        let req = CodeRequest {
            tenant: "acme".into(),
            agent: "site-a".into(),
            ..CodeRequest::default()
        };
        let code = create_code(&state, &admin, &req).await.unwrap().code;

        // `accepted` runs only when the code is redeemed.
        let accepted = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let err = enroll(&state, &identity, code.expose(), b"not a csr", "1.0", count)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        let enrolled = enroll(&state, &identity, code.expose(), &csr(), "1.0", count)
            .await
            .unwrap();
        assert_eq!(enrolled.id, AgentId::new("acme", "site-a").unwrap());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let err = enroll(&state, &identity, code.expose(), &csr(), "1.0", count)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        let leaf = first_cert_der(&enrolled.certificate.cert_pem).unwrap();
        // One cache across the revocation: the kept snapshot must not outlive it.
        let snapshots = crate::records::SnapshotCache::default();
        let (peer, _) = peer::admit(
            &state,
            &identity.ca,
            &snapshots,
            Some(&leaf),
            RENEW_ACTION,
            |_| Vec::new(),
        )
        .await
        .unwrap();
        let renewed = renew(&state, &identity, &peer, &csr(), "2.0")
            .await
            .unwrap();
        let agent = stored::records(&state)
            .get::<Agent>(&agent_key("acme", "site-a"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(agent.software_version, "2.0");
        assert_eq!(agent.certificate_expires, Some(renewed.not_after));

        revoke_agent(&state, &admin, "acme", "site-a")
            .await
            .unwrap();
        let renewed_leaf = first_cert_der(&renewed.cert_pem).unwrap();
        for leaf in [&leaf, &renewed_leaf] {
            let err = peer::admit(
                &state,
                &identity.ca,
                &snapshots,
                Some(leaf),
                RENEW_ACTION,
                |_| Vec::new(),
            )
            .await
            .unwrap_err();
            assert!(matches!(err, PeerError::Revoked(_)), "{err:?}");
        }
        let events = crate::audit::list(&state, &Scope::Tenant("acme".into()), None, 20)
            .await
            .unwrap();
        let actions: Vec<(&str, &str)> = events
            .iter()
            .filter(|(_, e)| e.actor == "agent:acme/site-a")
            .map(|(_, e)| (e.action.as_str(), e.result.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                (RENEW_ACTION, "permission_denied"),
                (RENEW_ACTION, "permission_denied"),
                (RENEW_ACTION, "ok"),
                ("agent.enroll", "ok"),
            ]
        );
    }

    #[test]
    fn software_versions_are_short_and_printable() {
        assert_eq!(software_version("  1.2.3 ").unwrap(), "1.2.3");
        assert_eq!(software_version("").unwrap(), "");
        for bad in ["a\nb".to_owned(), "x".repeat(MAX_VERSION_LEN + 1)] {
            let err = software_version(&bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        }
    }
}
