//! The agent-facing `tokenfleet.v1.TokenBroker` service.
//!
//! - `Enroll` (the only RPC without a client certificate): a one-time code and a CSR become a
//!   client certificate of the agent CA ([`crate::identity`]).
//! - Every other RPC authenticates the caller from its TLS client certificate alone, on every
//!   call ([`crate::identity::peer::authenticate_handshake_verified`]): the listener trusts only
//!   the agent CA for client certificates, so the handshake verified chain and signature; each
//!   call checks validity by the broker's clock, the identity, and in the store revocation and
//!   whether the certificate is still current.
//! - `IssueAccessToken` reads the agent, its certificate list, the device, the mailbox and its
//!   grant in one store round trip ([`crate::records::Snapshot`]).
//! - `Renew` issues a fresh certificate to the caller's identity.
//! - `IssueAccessToken` checks that the calling agent hosts the device, then hands over to the
//!   token lifecycle's [`crate::tokens::issue::issue_for_agent`] (device in the agent's tenant,
//!   sender mode, purpose; user mailboxes created on demand and answered with a consent to
//!   complete when they have no grant; audited there). The tenant is always the agent's own, so no call reaches across
//!   tenants.
//!
//! Without TLS (`[tls]` not configured) there are no client certificates, so every RPC answers
//! FAILED_PRECONDITION.

use tokenfleet_domain::{Agent, AuditEvent, Device};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::audit;
use crate::convert::{self, timestamp};
use crate::edge::grpc_status::result_of;
use crate::edge::grpc_status::status;
use crate::identity::ca::IssuedCertificate;
use crate::identity::codes;
use crate::identity::peer::{self, AgentPeer, PeerError};
use crate::identity::{AgentCertificates, AgentId, AgentIdentity};
use crate::ops::Error;
use crate::ops::names::shown;
use crate::rate_limit::{Rate, RateLimiter};
use crate::records::{CAS_ATTEMPTS, Records, Snapshot, agent_key, device_key};
use crate::state::BrokerState;
use crate::tokens::issue::{ISSUE_ACTION, IssueRequest, Issued, issue_for_agent_via, issue_keys};
use crate::tokens::lifecycle::TokenService;

/// What every RPC answers when the broker serves without TLS.
pub const NO_TLS: &str = "this broker serves gRPC without TLS, so agents cannot authenticate; \
     configure `[tls] cert_file` and `key_file` (or run `tokenfleet-broker serve --dev`)";

/// Longest software version string kept.
const MAX_VERSION_LEN: usize = 100;

/// Default per-agent `IssueAccessToken` rate (`[agents] issue_rate_per_minute`, `issue_burst`).
pub const DEFAULT_ISSUE_RATE: Rate = Rate {
    per_minute: 600,
    burst: 60,
};

/// `tokenfleet.v1.TokenBroker` implementation.
#[derive(Debug, Clone)]
pub struct TokenBrokerService {
    state: BrokerState,
    identity: Option<AgentIdentity>,
    tokens: TokenService,
    issue_limit: RateLimiter,
    fleet: crate::fleet::FleetSettings,
    /// `http.public_url`: auth-code consents of user mailboxes redirect to
    /// `<public_url>/oauth/callback`.
    public_url: String,
    /// Turns the store's fleet notifications into wakes of the status streams this service
    /// holds; stops with the service.
    _fleet_listener: std::sync::Arc<crate::fleet::wake::Listener>,
}

impl TokenBrokerService {
    /// A service over the shared broker state. `identity` is `None` when the broker serves
    /// without TLS (then every call is refused).
    pub fn new(state: BrokerState, identity: Option<AgentIdentity>, tokens: TokenService) -> Self {
        Self {
            identity,
            tokens,
            issue_limit: RateLimiter::new(DEFAULT_ISSUE_RATE),
            fleet: crate::fleet::FleetSettings::default(),
            public_url: crate::config::DEFAULT_PUBLIC_URL.to_owned(),
            _fleet_listener: std::sync::Arc::new(crate::fleet::wake::Listener::start(&state.store)),
            state,
        }
    }

    /// Sets the broker's externally reachable HTTP base URL (`http.public_url`), where
    /// auth-code consents started for user mailboxes redirect to.
    #[must_use]
    pub fn with_public_url(mut self, public_url: impl Into<String>) -> Self {
        self.public_url = public_url.into();
        self
    }

    /// Uses `fleet` (heartbeat, replica id, shutdown signal) for `GetAgentConfig` and
    /// `StatusStream` (default: [`crate::fleet::FleetSettings::default`]).
    #[must_use]
    pub fn with_fleet_settings(mut self, fleet: crate::fleet::FleetSettings) -> Self {
        self.fleet = fleet;
        self
    }

    /// Limits each agent's `IssueAccessToken` calls to `rate` (in this replica; default
    /// [`DEFAULT_ISSUE_RATE`]).
    #[must_use]
    pub fn with_issue_rate(mut self, rate: Rate) -> Self {
        self.issue_limit = RateLimiter::new(rate);
        self
    }

    fn identity(&self) -> Result<&AgentIdentity, Status> {
        self.identity
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(NO_TLS))
    }

    /// Authenticates the caller of `request` from its client certificate.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<AgentPeer, PeerError> {
        let Some(identity) = &self.identity else {
            return Err(PeerError::NoCertificate);
        };
        let leaf = crate::edge::peer_certificate(request);
        let peer = peer::authenticate_handshake_verified(
            &self.state,
            &identity.ca,
            leaf.as_deref(),
            |_| Vec::new(),
        )
        .await
        .map(|(peer, _)| peer);
        match &peer {
            Ok(p) => {
                let span = tracing::Span::current();
                span.record("agent", p.id.to_string().as_str());
            }
            Err(error) => tracing::info!(%error, "agent call not authenticated"),
        }
        peer
    }

    async fn enroll(&self, req: pb::EnrollRequest) -> Result<pb::AgentCertificate, Status> {
        let identity = self.identity()?;
        // Check the request before the code is spent, so a bad CSR does not burn it.
        crate::identity::ca::check_csr(&req.csr_der).map_err(status)?;
        let version = software_version(&req.software_version)?;
        let (code, agent) = codes::redeem(&self.state, &req.code).await.map_err(|e| {
            tracing::info!(error = %e, "enrollment refused");
            status(e)
        })?;
        let id = AgentId {
            tenant: code.tenant.clone(),
            name: code.agent.clone(),
        };
        tracing::Span::current().record("agent", id.to_string().as_str());
        let result = self
            .enroll_agent(identity, &id, &agent.value, &req.csr_der, version)
            .await;
        self.audit_certificate(
            if code.re_enroll {
                "agent.re_enroll"
            } else {
                "agent.enroll"
            },
            &id,
            &result,
        )
        .await;
        result.map(|issued| certificate_response(identity, &id, &issued))
    }

    /// Issues the certificate for an agent whose code [`codes::redeem`] accepted (so the agent
    /// record `agent` exists, is the one the code was made for, and is not revoked).
    async fn enroll_agent(
        &self,
        identity: &AgentIdentity,
        id: &AgentId,
        agent: &Agent,
        csr_der: &[u8],
        version: &str,
    ) -> Result<IssuedCertificate, Status> {
        let issued = identity
            .ca
            .issue(
                csr_der,
                id,
                self.state.clock.now(),
                identity.certificate_lifetime,
            )
            .map_err(status)?;
        // Enrollment replaces every earlier certificate of the agent.
        let certificates = AgentCertificates {
            tenant: id.tenant.clone(),
            agent: id.name.clone(),
            agent_created: agent.stamps.created,
            serials: vec![issued.serial.clone()],
        };
        peer::write_certificates(&self.state, &certificates, Precondition::Any)
            .await
            .map_err(status)?;
        self.record_certificate(id, &issued, version).await?;
        Ok(issued)
    }

    async fn renew(
        &self,
        peer: AgentPeer,
        req: pb::RenewRequest,
    ) -> Result<pb::AgentCertificate, Status> {
        let identity = self.identity()?;
        let version = software_version(&req.software_version)?;
        let id = peer.id.clone();
        let result = self
            .renew_agent(identity, &peer, &req.csr_der, version)
            .await;
        self.audit_certificate("agent.renew", &id, &result).await;
        result.map(|issued| certificate_response(identity, &id, &issued))
    }

    async fn renew_agent(
        &self,
        identity: &AgentIdentity,
        peer: &AgentPeer,
        csr_der: &[u8],
        version: &str,
    ) -> Result<IssuedCertificate, Status> {
        let id = &peer.id;
        let issued = identity
            .ca
            .issue(
                csr_der,
                id,
                self.state.clock.now(),
                identity.certificate_lifetime,
            )
            .map_err(status)?;
        // Keep the certificate this call came with (connections still use it) and the new one.
        let mut committed = false;
        for _ in 0..CAS_ATTEMPTS {
            let Some((stored_version, mut certificates)) = peer::read_certificates(&self.state, id)
                .await
                .map_err(status)?
            else {
                return Err(status(PeerError::Superseded(id.clone())));
            };
            if !certificates.serials.contains(&peer.certificate.serial) {
                return Err(status(PeerError::Superseded(id.clone())));
            }
            certificates.serials = vec![issued.serial.clone(), peer.certificate.serial.clone()];
            match peer::write_certificates(
                &self.state,
                &certificates,
                Precondition::Version(stored_version),
            )
            .await
            {
                Ok(_) => {
                    committed = true;
                    break;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(status(e)),
            }
        }
        if !committed {
            return Err(Status::aborted(format!(
                "the certificates of agent `{id}` changed concurrently; retry"
            )));
        }
        self.record_certificate(id, &issued, version).await?;
        Ok(issued)
    }

    /// Writes the new certificate's expiry, the software version and `last_seen` to the agent.
    async fn record_certificate(
        &self,
        id: &AgentId,
        issued: &IssuedCertificate,
        version: &str,
    ) -> Result<(), Status> {
        let records = Records::new(self.state.store.as_ref());
        let key = agent_key(&id.tenant, &id.name);
        for _ in 0..CAS_ATTEMPTS {
            let Some(stored) = records.get::<Agent>(&key).await.map_err(status)? else {
                return Err(Status::failed_precondition(format!(
                    "agent `{id}` was deleted meanwhile"
                )));
            };
            let mut agent = stored.value.clone();
            let now = self.state.clock.now();
            agent.certificate_expires = Some(issued.not_after);
            agent.last_seen = Some(now);
            if !version.is_empty() {
                agent.software_version = version.to_owned();
            }
            agent.stamps.updated = now;
            match records
                .put(&agent, Precondition::Version(stored.version))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(status(e)),
            }
        }
        Err(Status::aborted(format!(
            "agent `{id}` changed concurrently; retry"
        )))
    }

    async fn audit_certificate(
        &self,
        action: &str,
        id: &AgentId,
        result: &Result<IssuedCertificate, Status>,
    ) {
        let (outcome, detail) = match result {
            Ok(issued) => (
                "ok",
                format!(
                    "certificate serial {} valid until {}",
                    issued.serial,
                    rfc3339(issued.not_after)
                ),
            ),
            Err(status) => (
                result_of(status.code()),
                status.message().chars().take(300).collect(),
            ),
        };
        match result {
            Ok(issued) => tracing::info!(
                action,
                agent = %id,
                serial = %issued.serial,
                expires = %rfc3339(issued.not_after),
                "agent certificate issued"
            ),
            Err(status) => {
                tracing::info!(action, agent = %id, code = ?status.code(), message = status.message(), "agent certificate refused")
            }
        }
        self.audit(action, id, id.path(), outcome, detail).await;
    }

    async fn audit(
        &self,
        action: &str,
        id: &AgentId,
        target: String,
        result: &str,
        detail: String,
    ) {
        let event = AuditEvent {
            time: self.state.clock.now(),
            actor: id.actor(),
            action: action.to_owned(),
            target,
            tenant: id.tenant.clone(),
            result: result.to_owned(),
            detail,
        };
        audit::record(&self.state, &Scope::Tenant(id.tenant.clone()), event).await;
    }

    /// Audits a refused call of an agent that presented a certificate of this CA but may not call
    /// (revoked, deleted, superseded).
    async fn audit_refused_peer(&self, action: &str, error: &PeerError) {
        let id = match error {
            PeerError::Revoked(id) | PeerError::UnknownAgent(id) | PeerError::Superseded(id) => id,
            _ => return,
        };
        self.audit(
            action,
            id,
            id.path(),
            result_of(tonic::Code::PermissionDenied),
            error.to_string(),
        )
        .await;
    }

    async fn issue_access_token(
        &self,
        peer: AgentPeer,
        snapshot: &Snapshot,
        req: pb::IssueAccessTokenRequest,
    ) -> Result<pb::IssueAccessTokenResponse, Status> {
        let id = &peer.id;
        let actor = id.actor();
        if let Err(wait) = self
            .issue_limit
            .check(&id.to_string(), std::time::Instant::now())
        {
            return Err(rate_limited(id, wait));
        }
        let purpose = convert::mail_purpose_in("purpose", req.purpose)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .ok_or_else(|| {
                Status::invalid_argument("purpose: must be set (UNSPECIFIED is not a value)")
            })?;
        // The agent must host the device. A missing device (or bad names) is left to `issue`,
        // which refuses and audits it.
        if tokenfleet_domain::name("device", &req.device).is_ok()
            && let Some(device) = Records::new(self.state.store.as_ref())
                .get_via::<Device>(Some(snapshot), &device_key(&id.tenant, &req.device))
                .await
                .map_err(status)?
            && device.value.agent != id.name
        {
            let message = format!(
                "device `{}` is not hosted by agent `{id}`",
                shown(&req.device)
            );
            tracing::info!(agent = %id, device = %shown(&req.device), mailbox = %shown(&req.mailbox), "access token refused: device hosted elsewhere");
            self.audit(
                ISSUE_ACTION,
                id,
                crate::ops::names::object_path(
                    &id.tenant,
                    "mailboxes",
                    if req.mailbox.is_empty() {
                        &req.user_address
                    } else {
                        &req.mailbox
                    },
                ),
                result_of(tonic::Code::PermissionDenied),
                format!(
                    "device `{}`, purpose {purpose}: {message}",
                    shown(&req.device)
                ),
            )
            .await;
            return Err(Status::permission_denied(message));
        }
        let request = IssueRequest {
            device: &req.device,
            mailbox: &req.mailbox,
            user_address: &req.user_address,
            purpose,
        };
        let issued = issue_for_agent_via(
            Some(snapshot),
            &self.tokens,
            &actor,
            &id.tenant,
            &request,
            &self.public_url,
        )
        .await
        .map_err(status)?;
        Ok(match issued {
            Issued::Token { mailbox, token } => pb::IssueAccessTokenResponse {
                access_token: token.access_token.expose().to_owned(),
                expire_time: Some(timestamp(token.expires)),
                sasl_username: token.sasl_username,
                mailbox,
                consent_required: None,
            },
            Issued::ConsentRequired(c) => pb::IssueAccessTokenResponse {
                access_token: String::new(),
                expire_time: None,
                sasl_username: String::new(),
                mailbox: c.mailbox.clone(),
                consent_required: Some(pb::ConsentRequired {
                    mailbox: c.mailbox,
                    user_code: c.user_code,
                    verification_uri: c.verification_uri,
                    expire_time: Some(timestamp(c.expires)),
                    message: c.message,
                    authorization_url: c.authorization_url,
                }),
            },
        })
    }
}

/// The tonic server for [`TokenBrokerService`].
pub fn token_broker_server(
    state: BrokerState,
    identity: Option<AgentIdentity>,
    tokens: TokenService,
) -> TokenBrokerServer<TokenBrokerService> {
    TokenBrokerServer::new(TokenBrokerService::new(state, identity, tokens))
}

/// RESOURCE_EXHAUSTED for an agent over its issue rate, with the wait in the message and in a
/// `retry-after` metadata entry (whole seconds, at least 1).
fn rate_limited(id: &AgentId, wait: std::time::Duration) -> Status {
    let secs = wait.as_secs_f64().ceil().max(1.0);
    tracing::info!(agent = %id, retry_after_seconds = secs, "access token refused: rate limited");
    status(Error::ResourceExhausted {
        message: format!(
            "agent `{id}` is over its IssueAccessToken rate (`[agents] issue_rate_per_minute`); \
             retry after {secs} s"
        ),
        retry_after: Some(wait),
    })
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn software_version(value: &str) -> Result<&str, Status> {
    let value = value.trim();
    if value.chars().count() > MAX_VERSION_LEN || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "software_version: must be at most {MAX_VERSION_LEN} printable characters"
        )));
    }
    Ok(value)
}

fn certificate_response(
    identity: &AgentIdentity,
    id: &AgentId,
    issued: &IssuedCertificate,
) -> pb::AgentCertificate {
    pb::AgentCertificate {
        tenant: id.tenant.clone(),
        agent: id.name.clone(),
        identity_uri: id.uri(),
        certificate_pem: issued.cert_pem.clone(),
        ca_chain_pem: identity.ca.cert_pem().to_owned(),
        not_before: Some(timestamp(issued.not_before)),
        expire_time: Some(timestamp(issued.not_after)),
    }
}

fn span(method: &'static str) -> tracing::Span {
    tracing::info_span!("token_broker", method, agent = tracing::field::Empty)
}

#[tonic::async_trait]
impl TokenBroker for TokenBrokerService {
    async fn issue_access_token(
        &self,
        request: Request<pb::IssueAccessTokenRequest>,
    ) -> Result<Response<pb::IssueAccessTokenResponse>, Status> {
        async {
            let identity = self.identity()?;
            // The agent's own records and the ones this request needs, in one store round
            // trip; the certificate's signature was verified by the TLS handshake.
            let leaf = crate::edge::peer_certificate(&request);
            let req = request.get_ref();
            let authenticated = peer::authenticate_handshake_verified(
                &self.state,
                &identity.ca,
                leaf.as_deref(),
                |id| issue_keys(&id.tenant, &req.device, &req.mailbox, &req.user_address),
            )
            .await;
            let (peer, snapshot) = match authenticated {
                Ok(authenticated) => authenticated,
                Err(error) => {
                    tracing::info!(%error, "agent call not authenticated");
                    self.audit_refused_peer(ISSUE_ACTION, &error).await;
                    return Err(status(error));
                }
            };
            tracing::Span::current().record("agent", peer.id.to_string().as_str());
            let request = request.into_inner();
            // Device and purpose only: mailbox names and user addresses stay out of traces.
            let issuance = tracing::info_span!(
                "issue_access_token",
                device = %shown(&request.device),
                purpose = request.purpose,
                result = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let answer = TokenBrokerService::issue_access_token(self, peer, &snapshot, request)
                .instrument(issuance.clone())
                .await;
            match &answer {
                Ok(a) if a.consent_required.is_some() => {
                    issuance.record("result", "consent_required");
                }
                Ok(_) => {
                    issuance.record("result", "issued");
                }
                Err(status) => {
                    issuance.record("result", format!("{:?}", status.code()).as_str());
                    issuance.record("otel.status_code", "ERROR");
                }
            }
            answer.map(Response::new)
        }
        .instrument(span("IssueAccessToken"))
        .await
    }

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        async {
            TokenBrokerService::enroll(self, request.into_inner())
                .await
                .map(Response::new)
        }
        .instrument(span("Enroll"))
        .await
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        async {
            self.identity()?;
            let peer = match self.authenticate(&request).await {
                Ok(peer) => peer,
                Err(error) => {
                    self.audit_refused_peer("agent.renew", &error).await;
                    return Err(status(error));
                }
            };
            TokenBrokerService::renew(self, peer, request.into_inner())
                .await
                .map(Response::new)
        }
        .instrument(span("Renew"))
        .await
    }

    async fn get_agent_config(
        &self,
        request: Request<pb::GetAgentConfigRequest>,
    ) -> Result<Response<pb::AgentConfig>, Status> {
        async {
            self.identity()?;
            let peer = match self.authenticate(&request).await {
                Ok(peer) => peer,
                Err(error) => {
                    self.audit_refused_peer("agent.config", &error).await;
                    return Err(status(error));
                }
            };
            crate::fleet::agent_config(&self.state, &self.fleet, &peer, request.into_inner())
                .await
                .map(Response::new)
        }
        .instrument(span("GetAgentConfig"))
        .await
    }

    type StatusStreamStream = crate::fleet::CommandStream;

    async fn status_stream(
        &self,
        request: Request<tonic::Streaming<pb::AgentReport>>,
    ) -> Result<Response<Self::StatusStreamStream>, Status> {
        async {
            self.identity()?;
            let peer = match self.authenticate(&request).await {
                Ok(peer) => peer,
                Err(error) => {
                    self.audit_refused_peer("agent.status", &error).await;
                    return Err(status(error));
                }
            };
            crate::fleet::status_stream(&self.state, &self.fleet, peer, request.into_inner())
                .await
                .map(Response::new)
        }
        .instrument(span("StatusStream"))
        .await
    }
}
