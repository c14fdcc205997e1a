//! The agent-facing `tokenfleet.v1.TokenBroker` service: the edge in front of the core's agent
//! operations. Each RPC takes the client certificate from the TLS connection and decodes the
//! request, calls one operation of `tokenfleet-core`, and encodes the answer; the core's errors
//! become gRPC statuses through the one map ([`crate::edge::grpc_status::status`]).
//!
//! - `Enroll` (the only RPC without a client certificate):
//!   [`crate::identity::certificates::enroll`] (one-time code and CSR → a client certificate
//!   of the agent CA, recorded on the agent, audited).
//! - Every other RPC authenticates the caller from its TLS client certificate alone, on every
//!   call ([`crate::identity::peer::admit`]: the listener trusts only the agent CA for client
//!   certificates, so the handshake verified chain and signature; each call checks validity by
//!   the broker's clock, the identity, and in the store revocation and whether the certificate
//!   is still current; refusals of known agents are audited).
//! - `Renew`: [`crate::identity::certificates::renew`].
//! - `IssueAccessToken`: the authentication reads the agent, its certificate list, the device,
//!   the mailbox and its grant in one store round trip ([`crate::records::Snapshot`]); then
//!   [`crate::tokens::issue::issue_to_agent`] decides who may get the token (rate limit,
//!   purpose, device hosted by the agent, sender mode, tenant; audited there).
//! - `GetAgentConfig` and `StatusStream`: the fleet's operations ([`crate::fleet`]).
//!
//! Without TLS (`[tls]` not configured) there are no client certificates, so every RPC answers
//! FAILED_PRECONDITION.

use std::sync::Arc;

use tokenfleet_core::ops::choice::Choice;
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenfleet_store::RecordKey;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::auth_failures::AuthFailures;
use crate::convert::{self, timestamp};
use crate::edge::grpc_status::status;
use crate::identity::ca::IssuedCertificate;
use crate::identity::certificates::{self, RENEW_ACTION};
use crate::identity::peer::{self, AgentPeer, PeerError};
use crate::identity::{AgentId, AgentIdentity};
use crate::ops::names::shown;
use crate::rate_limit::{Rate, RateLimiter};
use crate::records::{Snapshot, SnapshotCache};
use crate::state::BrokerState;
use crate::tokens::issue::{AgentRequest, ISSUE_ACTION, Issued, issue_keys, issue_to_agent};
use crate::tokens::lifecycle::TokenService;

/// What every RPC answers when the broker serves without TLS.
pub const NO_TLS: &str = "this broker serves gRPC without TLS, so agents cannot authenticate; \
     configure `[tls] cert_file` and `key_file` (or run `tokenfleet-broker serve --dev`)";

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
    /// The records each agent's calls read, kept while their tenant's records do not change.
    snapshots: Arc<SnapshotCache>,
    /// Failed enrollments per client address (the budget shared with the Admin API and the
    /// console: [`crate::auth_failures`]).
    auth_failures: AuthFailures,
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
            snapshots: Arc::default(),
            issue_limit: RateLimiter::new(DEFAULT_ISSUE_RATE),
            auth_failures: AuthFailures::default(),
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

    /// Counts failed enrollments in `failures` (the Admin API's budget).
    #[must_use]
    pub fn with_auth_failures(mut self, failures: AuthFailures) -> Self {
        self.auth_failures = failures;
        self
    }

    fn identity(&self) -> Result<&AgentIdentity, Status> {
        self.identity
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(NO_TLS))
    }

    /// Authenticates the caller of `request` from its client certificate
    /// ([`peer::admit`]; refusals of known agents audited as `action`), reading the `also`
    /// keys with its own records.
    async fn authenticate<T>(
        &self,
        request: &Request<T>,
        action: &str,
        also: impl FnOnce(&AgentId) -> Vec<RecordKey>,
    ) -> Result<(AgentPeer, Arc<Snapshot>), Status> {
        let Some(identity) = &self.identity else {
            return Err(status(PeerError::NoCertificate));
        };
        let leaf = crate::edge::peer_certificate(request);
        peer::admit(
            &self.state,
            &identity.ca,
            &self.snapshots,
            leaf.as_deref().map(|leaf| leaf.as_ref()),
            action,
            also,
        )
        .await
        .map_err(status)
    }

    async fn issue_access_token(
        &self,
        request: Request<pb::IssueAccessTokenRequest>,
    ) -> Result<pb::IssueAccessTokenResponse, Status> {
        self.identity()?;
        // The agent's own records and the ones this request needs, in one store round trip.
        let (peer, snapshot) = {
            let req = request.get_ref();
            self.authenticate(&request, ISSUE_ACTION, |id| {
                issue_keys(&id.tenant, &req.device, &req.mailbox, &req.user_address)
            })
            .await?
        };
        let req = request.into_inner();
        // Device and purpose only: mailbox names and user addresses stay out of traces.
        let issuance = tracing::info_span!(
            "issue_access_token",
            device = %shown(&req.device),
            purpose = req.purpose,
            result = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let purpose: Choice<_> = convert::mail_purpose_choice(req.purpose);
        let agent_request = AgentRequest {
            device: &req.device,
            mailbox: &req.mailbox,
            user_address: &req.user_address,
            purpose,
        };
        let answer = issue_to_agent(
            &snapshot,
            &self.tokens,
            &self.issue_limit,
            &peer.id,
            &agent_request,
            &self.public_url,
        )
        .instrument(issuance.clone())
        .await
        .map_err(status);
        match &answer {
            Ok(Issued::ConsentRequired(_)) => {
                issuance.record("result", "consent_required");
            }
            Ok(Issued::Token { .. }) => {
                issuance.record("result", "issued");
            }
            Err(status) => {
                issuance.record("result", format!("{:?}", status.code()).as_str());
                issuance.record("otel.status_code", "ERROR");
            }
        }
        answer.map(issued_response)
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

/// The wire answer of an issuance.
fn issued_response(issued: Issued) -> pb::IssueAccessTokenResponse {
    match issued {
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
    }
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
        // Boxed before it is instrumented: the call's future (~5 KB) was otherwise held twice
        // in the boxed trait future (~10 KB, measured in a release build), and all of it was
        // moved into the box on every call.
        Box::pin(TokenBrokerService::issue_access_token(self, request))
            .instrument(span("IssueAccessToken"))
            .await
            .map(Response::new)
    }

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        async {
            let identity = self.identity()?;
            // A source that keeps failing is refused before its request is even checked.
            let peer = crate::listener::client_ip(&request);
            self.auth_failures
                .check(peer)
                .map_err(|wait| status(crate::auth_failures::refused(wait)))?;
            // Proven (its connection kept) once the code is redeemed.
            let proven = crate::listener::call_proof(&request);
            let req = request.into_inner();
            let enrolled = certificates::enroll(
                &self.state,
                identity,
                &req.code,
                &req.csr_der,
                &req.software_version,
                proven,
            )
            .await
            .map_err(|e| {
                if matches!(e, crate::ops::Error::Unauthenticated(_)) {
                    self.auth_failures.record(peer);
                }
                status(e)
            })?;
            Ok(Response::new(certificate_response(
                identity,
                &enrolled.id,
                &enrolled.certificate,
            )))
        }
        .instrument(span("Enroll"))
        .await
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::AgentCertificate>, Status> {
        async {
            let identity = self.identity()?;
            let (peer, _) = self
                .authenticate(&request, RENEW_ACTION, |_| Vec::new())
                .await?;
            let req = request.into_inner();
            let issued = certificates::renew(
                &self.state,
                identity,
                &peer,
                &req.csr_der,
                &req.software_version,
            )
            .await
            .map_err(status)?;
            Ok(Response::new(certificate_response(
                identity, &peer.id, &issued,
            )))
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
            let (peer, _) = self
                .authenticate(&request, "agent.config", |_| Vec::new())
                .await?;
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
            let (peer, _) = self
                .authenticate(&request, "agent.status", |_| Vec::new())
                .await?;
            crate::fleet::status_stream(&self.state, &self.fleet, peer, request.into_inner())
                .await
                .map(Response::new)
        }
        .instrument(span("StatusStream"))
        .await
    }
}
