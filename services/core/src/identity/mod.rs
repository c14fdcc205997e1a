//! Agent identity: the broker's agent CA, one-time enrollment codes, certificate issuance, and the
//! check every `TokenBroker` call runs on the caller's client certificate.
//!
//! - An agent is identified only by the client certificate the agent CA issued it: the URI subject
//!   alternative name `spiffe://tokenfleet/tenants/<tenant>/agents/<agent>` ([`AgentId`]). No
//!   request field can name another identity.
//! - The agent CA ([`ca::AgentCa`]) is generated once and kept in the store with its key sealed
//!   (global record `agent_ca/current`), so every replica issues and trusts the same CA; or it is
//!   read from files (`[agents] ca_cert_file`, `ca_key_file`).
//! - Enrollment ([`codes`]): an operator creates a one-time code (stored as its SHA-256 hash, with
//!   an expiry); the agent sends it with a CSR. An agent has one live code, bound to its agent
//!   record; replacing a current certificate takes a re-enroll code. Consuming a code is a
//!   compare-and-set delete, so of two concurrent uses exactly one wins. The operator's side —
//!   creating a code, revoking an agent — is [`enrollment`] (authorized and audited).
//! - Every call ([`peer::authenticate`]; on the broker's TLS listener
//!   [`peer::authenticate_handshake_verified`], which leaves the signature to the handshake that
//!   already verified it against this CA) checks the certificate against the clock, then reads
//!   the agent record (revoked? still the same agent?) and the agent's certificate record (is
//!   this one of its current certificates?) from the store, in one round trip: revocation and
//!   re-enrollment take effect on the next call on every replica, without a restart and without
//!   a cache to invalidate. A refused caller that presented a certificate of this CA is audited
//!   ([`peer::admit`]).
//! - The agent's own certificate operations, `Enroll` and `Renew` ([`certificates`]): issue,
//!   record on the agent, audit.

pub mod ca;
pub mod certificates;
pub mod codes;
pub mod enrollment;
pub mod peer;
pub mod pki;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_seal::SealError;
use tokenfleet_store::{RecordKey, StoreError};

pub use ca::AgentCa;

/// Scheme and authority of agent identity URIs.
pub const URI_PREFIX: &str = "spiffe://tokenfleet/tenants/";

/// Default lifetime of agent client certificates (7 days).
pub const DEFAULT_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest configurable certificate lifetime.
pub const MIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(5);

/// Longest configurable certificate lifetime (one year).
pub const MAX_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Collection of [`AgentCertificates`] records (tenant scope, id = agent name).
pub const AGENT_CERTIFICATES: &str = "agent_cert";

/// Errors of the identity machinery. Messages never contain key material or codes.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The CA could not be created, read or used.
    #[error("agent CA: {0}")]
    Ca(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing or opening the CA key failed.
    #[error("agent CA key: {0}")]
    Seal(#[from] SealError),
    /// A certificate signing request is unusable.
    #[error("csr_der: {0}")]
    Csr(String),
    /// Building a certificate failed.
    #[error("generating a certificate: {0}")]
    Certificate(String),
    /// Random numbers were not available.
    #[error("random number generator: {0}")]
    Random(String),
}

/// The one mapping of identity errors: an unusable CSR is the caller's fault, a store failure
/// maps as everywhere, everything else is internal (details in the log, not in the answer).
impl From<IdentityError> for crate::ops::Error {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Csr(_) => Self::InvalidArgument(e.to_string()),
            IdentityError::Store(e) => e.into(),
            IdentityError::Ca(_)
            | IdentityError::Seal(_)
            | IdentityError::Certificate(_)
            | IdentityError::Random(_) => Self::internal(
                "internal error in the agent CA (details in the broker log)",
                format_args!("agent identity: {e}"),
            ),
        }
    }
}

/// Who an agent is: its tenant and name, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentId {
    /// Tenant of the agent.
    pub tenant: String,
    /// Name of the agent within the tenant.
    pub name: String,
}

impl AgentId {
    /// An identity from a tenant and an agent name; `None` when either is not a valid name.
    pub fn new(tenant: &str, name: &str) -> Option<Self> {
        tokenfleet_domain::name("tenant", tenant).ok()?;
        tokenfleet_domain::name("agent", name).ok()?;
        Some(Self {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The URI the certificate carries: `spiffe://tokenfleet/tenants/<tenant>/agents/<agent>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/agents/{}", self.tenant, self.name)
    }

    /// Reads an identity URI; `None` unless it is exactly the form [`AgentId::uri`] writes.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (tenant, rest) = rest.split_once('/')?;
        let name = rest.strip_prefix("agents/")?;
        Self::new(tenant, name)
    }

    /// The audit actor, `agent:<tenant>/<agent>`.
    pub fn actor(&self) -> String {
        format!("agent:{}/{}", self.tenant, self.name)
    }

    /// Resource path of the agent, for audit targets.
    pub fn path(&self) -> String {
        format!("tenants/{}/agents/{}", self.tenant, self.name)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// Which certificates of an agent are current. Enrollment replaces the list with the new
/// certificate; renewal keeps the certificate the renewal was made with next to the new one, so
/// connections still open with it keep working until it expires. A certificate whose serial is
/// not listed is refused, so re-enrolling (or deleting and re-creating the agent) retires every
/// older certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCertificates {
    /// Tenant of the agent.
    pub tenant: String,
    /// Name of the agent.
    pub agent: String,
    /// Creation time of the agent record these certificates belong to: a deleted and re-created
    /// agent of the same name does not inherit them.
    #[serde(with = "time::serde::rfc3339")]
    pub agent_created: OffsetDateTime,
    /// Serial numbers (lower-case hex) of the accepted certificates, newest first (at most two).
    pub serials: Vec<String>,
}

/// Store key of an agent's [`AgentCertificates`].
pub fn certificates_key(tenant: &str, agent: &str) -> RecordKey {
    RecordKey::tenant(tenant, AGENT_CERTIFICATES, agent)
}

/// Everything the `TokenBroker` service needs to issue and check agent certificates.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    /// The issuing CA.
    pub ca: Arc<AgentCa>,
    /// Lifetime of issued certificates.
    pub certificate_lifetime: Duration,
}
