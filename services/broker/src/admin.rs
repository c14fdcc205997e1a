//! The `Admin` gRPC service: tenants, providers, mailboxes, devices and agents (create, get,
//! list, update, delete), consent and tokens, enrollment codes and agent revocation, API keys,
//! consent links, the audit log, fleet status, connection tests and `WhoAmI`.
//!
//! Every RPC is the edge's three steps: authenticate the API key ([`crate::api_keys`]) and decode
//! the request (the `admin/<topic>.rs` files and [`crate::convert`] read it off the wire), call
//! one operation of the core, encode its answer (`WhoAmI` answers the authenticated caller). Authorization before anything is read,
//! validation of the whole input and every cross-reference, the single write and the audit
//! record (refused attempts included) are the core operation's; nothing is half-written after
//! an error.
//!
//! Errors: invalid input → INVALID_ARGUMENT naming the field; another tenant's objects →
//! PERMISSION_DENIED (never NOT_FOUND, so existence is not revealed). Operations return
//! [`crate::ops::Error`]; the one mapping to gRPC status is [`crate::edge::grpc_status`].
//!
//! The five resources (tenants, providers, mailboxes, devices, agents) run the generic
//! operations of [`crate::ops::resource`], described per resource in the core
//! ([`tokenfleet_core::resources`], with domain types); `admin/<resource>.rs` only converts the
//! messages.
//!
//! The other RPCs call the core's operations in domain types the same way: consent and tokens
//! ([`crate::tokens::operator`], from `admin/consent.rs`, `admin/tokens.rs`; they answer with
//! the mailbox as [`tokenfleet_core::resources::mailboxes`] shows it), enrollment
//! ([`crate::identity::enrollment`], `admin/enrollment.rs`), API keys ([`crate::api_keys`],
//! `admin/keys.rs`), consent links ([`crate::consent_links`], `admin/consent_links.rs`), the
//! audit log ([`crate::audit::list_events`]), fleet status and connection tests
//! ([`tokenfleet_core::fleet`], through [`crate::fleet`]). The web console calls the same
//! operations without the wire (see `admin/in_process.rs` for the resource reads it uses).

mod agents;
mod consent;
pub mod consent_links;
mod devices;
mod enrollment;
mod in_process;
mod keys;
mod mailboxes;
mod providers;
mod tenants;
mod tokens;

use futures::FutureExt as _;
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::auth_failures::AuthFailures;
use crate::authz::Principal;
use crate::convert::{self, UpdateMask};
use crate::edge::grpc_status::bearer;
use crate::ops::Error;
use crate::ops::resource::{self, Id};
use crate::rate_limit::{Rate, RateLimiter};
use crate::state::BrokerState;
use crate::{api_keys, audit};

pub use crate::ops::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
pub use crate::ops::provider_policy::{ProviderPolicy, WELL_KNOWN_PROVIDER_HOSTS};
use agents::Agents;
pub use consent::ConsentSettings;
use devices::Devices;
use mailboxes::Mailboxes;
pub use mailboxes::mailbox_with_grant;
use providers::Providers;
use tenants::Tenants;

/// Implementation of `tokenfleet.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: BrokerState,
    consent: ConsentSettings,
    /// The provider resource: the destination policy and the token service (also used by the
    /// token RPCs).
    providers: Providers,
    /// Calls per API key (`[admin] call_rate_per_minute`, `call_burst`).
    call_limit: RateLimiter,
    /// Failed authentications per client address (shared with the console's sign-in).
    auth_failures: AuthFailures,
}

/// Default Admin API calls per API key (`[admin] call_rate_per_minute`, `call_burst`).
pub const DEFAULT_CALL_RATE: Rate = Rate {
    per_minute: 3000,
    burst: 500,
};

impl AdminService {
    /// A service over `state`.
    pub fn new(state: BrokerState) -> Self {
        let tokens = crate::tokens::lifecycle::TokenService::new(
            state.clone(),
            crate::tokens::lifecycle::TokenConfig::default(),
        );
        Self {
            state,
            consent: ConsentSettings::default(),
            providers: Providers {
                policy: ProviderPolicy::default(),
                tokens,
            },
            call_limit: RateLimiter::new(DEFAULT_CALL_RATE),
            auth_failures: AuthFailures::default(),
        }
    }

    /// Uses `policy` for where non-fleet-admin callers may point providers (`[admin]` section).
    #[must_use]
    pub fn with_provider_policy(mut self, policy: ProviderPolicy) -> Self {
        self.providers.policy = policy;
        self
    }

    /// Limits each API key to `rate` calls (per replica).
    #[must_use]
    pub fn with_call_rate(mut self, rate: Rate) -> Self {
        self.call_limit = RateLimiter::new(rate);
        self
    }

    /// Uses `tokens` for the token RPCs (`DeleteToken`, `RefreshNow`): the server shares one
    /// [`crate::tokens::lifecycle::TokenService`] with its refresh scheduler.
    #[must_use]
    pub fn with_token_service(mut self, tokens: crate::tokens::lifecycle::TokenService) -> Self {
        self.providers.tokens = tokens;
        self
    }

    /// Uses `consent` (the broker's public URL) for consent flows.
    #[must_use]
    pub fn with_consent_settings(mut self, consent: ConsentSettings) -> Self {
        self.consent = consent;
        self
    }

    /// The budget of failed authentications per client address, shared with the console.
    pub fn auth_failures(&self) -> AuthFailures {
        self.auth_failures.clone()
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Error> {
        let peer = crate::listener::client_ip(request);
        // A source that keeps failing is refused before its key is looked up or logged.
        self.auth_failures
            .check(peer)
            .map_err(crate::auth_failures::refused)?;
        let principal = match bearer(request.metadata()) {
            Ok(key) => api_keys::authenticate(&self.state, key).await,
            Err(e) => Err(e),
        };
        match &principal {
            // Its connection is served from now on, not closed for a new one.
            Ok(_) => crate::listener::prove_call(request),
            Err(err) => {
                if matches!(err, Error::Unauthenticated(_)) {
                    self.auth_failures.record(peer);
                }
                tracing::info!(code = err.result(), "admin call not authenticated");
            }
        }
        let principal = principal?;
        // Before the call reads or writes anything.
        self.check_call_rate(&principal.key_id)?;
        Ok(principal)
    }

    /// Takes one call of API key `key_id` from its bucket (`[admin] call_rate_per_minute`,
    /// `call_burst`): every Admin API call and every request of a console session signed in
    /// with the key. Over the rate: RESOURCE_EXHAUSTED with the wait, so a key over it costs
    /// the broker one bucket update per call and writes no record (not even a refused one).
    pub fn check_call_rate(&self, key_id: &str) -> Result<(), Error> {
        let Err(wait) = self.call_limit.check(key_id, std::time::Instant::now()) else {
            return Ok(());
        };
        tracing::debug!(key_id, "call refused: rate limited");
        Err(Error::exhausted_for(
            format_args!(
                "API key `{key_id}` is over its call rate (`[admin] call_rate_per_minute`)"
            ),
            wait,
        ))
    }
}

/// The `Admin` service ready to add to a tonic server.
pub fn admin_server(state: BrokerState) -> AdminServer<AdminService> {
    AdminServer::new(AdminService::new(state))
}

async fn list_audit_events(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Error> {
    let query = audit::AuditQuery {
        tenant: req.tenant,
        kind: req.kind,
        page_size: req.page_size,
        page_token: req.page_token,
    };
    let page = audit::list_events(state, principal, &query).await?;
    Ok(pb::ListAuditEventsResponse {
        events: page
            .events
            .iter()
            .map(|(id, e)| convert::audit_event_to_proto(id, e))
            .collect(),
        next_page_token: page.next_page_token,
    })
}

/// Runs one RPC: a tracing span, authentication, then the handler with the principal (and an
/// optional extra argument, e.g. the consent settings), or an expression over `|state,
/// principal, request|`. Handlers answer [`Error`]; it becomes a [`Status`] here.
macro_rules! rpc {
    ($self:ident, $request:ident, $method:literal, $handler:path $(, $extra:expr)?) => {
        rpc!($self, $request, $method, |state, principal, req| {
            $handler(state, principal, req $(, $extra)?)
        })
    };
    ($self:ident, $request:ident, $method:literal, |$state:ident, $principal:ident, $req:ident| $body:expr) => {{
        let span = tracing::info_span!(
            "admin",
            method = $method,
            principal = tracing::field::Empty,
            tenant = tracing::field::Empty,
            object = tracing::field::Empty,
        );
        async {
            let principal = $self.authenticate(&$request).await?;
            tracing::Span::current().record("principal", principal.key_id.as_str());
            let ($state, $principal, $req) = (&$self.state, &principal, $request.into_inner());
            let out: Result<_, Error> = $body.await;
            out
        }
        .instrument(span)
        .await
        .map(Response::new)
        .map_err(crate::edge::grpc_status::status)
    }};
}

/// The update mask of a request, checked against the resource's field table.
fn mask(
    table: &convert::FieldTable,
    mask: Option<&prost_types::FieldMask>,
) -> Result<UpdateMask, tokenfleet_domain::ValidationError> {
    convert::update_mask(table, mask)
}

async fn who_am_i(
    _state: &BrokerState,
    principal: &Principal,
    _req: pb::WhoAmIRequest,
) -> Result<pb::WhoAmIResponse, Error> {
    Ok(pb::WhoAmIResponse {
        key_id: principal.key_id.clone(),
        role: principal.role.as_str().to_owned(),
        tenant: principal.tenant.clone().unwrap_or_default(),
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        rpc!(self, request, "CreateTenant", |s, p, r| {
            resource::create(&Tenants, s, p, tenants::tenant_in(r.tenant))
                .map(|out| out.map(tenants::tenant_out))
        })
    }
    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        rpc!(self, request, "GetTenant", |s, p, r| {
            resource::get(&Tenants, s, p, Id::global(&r.name))
                .map(|out| out.map(tenants::tenant_out))
        })
    }
    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        rpc!(self, request, "ListTenants", tenants::list)
    }
    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        rpc!(self, request, "UpdateTenant", |s, p, r| {
            let mask = mask(&convert::TENANT_FIELDS, r.update_mask.as_ref());
            resource::update(&Tenants, s, p, tenants::tenant_in(r.tenant), mask)
                .map(|out| out.map(tenants::tenant_out))
        })
    }
    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        rpc!(self, request, "DeleteTenant", |s, p, r| {
            resource::delete(&Tenants, s, p, Id::global(&r.name), r.version)
                .map(|out| out.map(|()| pb::DeleteTenantResponse {}))
        })
    }

    async fn create_provider(
        &self,
        request: Request<pb::CreateProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(self, request, "CreateProvider", |s, p, r| {
            resource::create(&self.providers, s, p, providers::provider_in(r.provider))
                .map(|out| out.map(providers::provider_out))
        })
    }
    async fn get_provider(
        &self,
        request: Request<pb::GetProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(self, request, "GetProvider", |s, p, r| {
            resource::get(&self.providers, s, p, Id::scoped(&r.tenant, &r.name))
                .map(|out| out.map(providers::provider_out))
        })
    }
    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        rpc!(self, request, "ListProviders", |s, p, r| {
            resource::list(&self.providers, s, p, &r.tenant, r.page_size, &r.page_token).map(
                |out| {
                    out.map(|(list, next_page_token)| pb::ListProvidersResponse {
                        providers: list.into_iter().map(providers::provider_out).collect(),
                        next_page_token,
                    })
                },
            )
        })
    }
    async fn update_provider(
        &self,
        request: Request<pb::UpdateProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(self, request, "UpdateProvider", |s, p, r| {
            let mask = mask(&convert::PROVIDER_FIELDS, r.update_mask.as_ref());
            resource::update(
                &self.providers,
                s,
                p,
                providers::provider_in(r.provider),
                mask,
            )
            .map(|out| out.map(providers::provider_out))
        })
    }
    async fn delete_provider(
        &self,
        request: Request<pb::DeleteProviderRequest>,
    ) -> Result<Response<pb::DeleteProviderResponse>, Status> {
        rpc!(self, request, "DeleteProvider", |s, p, r| {
            resource::delete(
                &self.providers,
                s,
                p,
                Id::scoped(&r.tenant, &r.name),
                r.version,
            )
            .map(|out| out.map(|()| pb::DeleteProviderResponse {}))
        })
    }

    async fn create_mailbox(
        &self,
        request: Request<pb::CreateMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "CreateMailbox", |s, p, r| {
            resource::create(&Mailboxes, s, p, mailboxes::mailbox_in(r.mailbox))
                .map(|out| out.map(mailboxes::mailbox_out))
        })
    }
    async fn get_mailbox(
        &self,
        request: Request<pb::GetMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "GetMailbox", |s, p, r| {
            resource::get(&Mailboxes, s, p, Id::scoped(&r.tenant, &r.name))
                .map(|out| out.map(mailboxes::mailbox_out))
        })
    }
    async fn list_mailboxes(
        &self,
        request: Request<pb::ListMailboxesRequest>,
    ) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        rpc!(self, request, "ListMailboxes", |s, p, r| {
            resource::list(&Mailboxes, s, p, &r.tenant, r.page_size, &r.page_token).map(|out| {
                out.map(|(list, next_page_token)| pb::ListMailboxesResponse {
                    mailboxs: list.into_iter().map(mailboxes::mailbox_out).collect(),
                    next_page_token,
                })
            })
        })
    }
    async fn update_mailbox(
        &self,
        request: Request<pb::UpdateMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "UpdateMailbox", |s, p, r| {
            let mask = mask(&convert::MAILBOX_FIELDS, r.update_mask.as_ref());
            resource::update(&Mailboxes, s, p, mailboxes::mailbox_in(r.mailbox), mask)
                .map(|out| out.map(mailboxes::mailbox_out))
        })
    }
    async fn delete_mailbox(
        &self,
        request: Request<pb::DeleteMailboxRequest>,
    ) -> Result<Response<pb::DeleteMailboxResponse>, Status> {
        rpc!(self, request, "DeleteMailbox", |s, p, r| {
            resource::delete(&Mailboxes, s, p, Id::scoped(&r.tenant, &r.name), r.version)
                .map(|out| out.map(|()| pb::DeleteMailboxResponse {}))
        })
    }

    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "CreateDevice", |s, p, r| {
            resource::create(&Devices, s, p, devices::device_in(r.device))
                .map(|out| out.map(devices::device_out))
        })
    }
    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "GetDevice", |s, p, r| {
            resource::get(&Devices, s, p, Id::scoped(&r.tenant, &r.name))
                .map(|out| out.map(devices::device_out))
        })
    }
    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        rpc!(self, request, "ListDevices", |s, p, r| {
            resource::list(&Devices, s, p, &r.tenant, r.page_size, &r.page_token).map(|out| {
                out.map(|(list, next_page_token)| pb::ListDevicesResponse {
                    devices: list.into_iter().map(devices::device_out).collect(),
                    next_page_token,
                })
            })
        })
    }
    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "UpdateDevice", |s, p, r| {
            let mask = mask(&convert::DEVICE_FIELDS, r.update_mask.as_ref());
            resource::update(&Devices, s, p, devices::device_in(r.device), mask)
                .map(|out| out.map(devices::device_out))
        })
    }
    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceResponse>, Status> {
        rpc!(self, request, "DeleteDevice", |s, p, r| {
            resource::delete(&Devices, s, p, Id::scoped(&r.tenant, &r.name), r.version)
                .map(|out| out.map(|()| pb::DeleteDeviceResponse {}))
        })
    }

    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "CreateAgent", |s, p, r| {
            resource::create(&Agents, s, p, agents::agent_in(r.agent))
                .map(|out| out.map(agents::agent_out))
        })
    }
    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "GetAgent", |s, p, r| {
            resource::get(&Agents, s, p, Id::scoped(&r.tenant, &r.name))
                .map(|out| out.map(agents::agent_out))
        })
    }
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        rpc!(self, request, "ListAgents", |s, p, r| {
            resource::list(&Agents, s, p, &r.tenant, r.page_size, &r.page_token).map(|out| {
                out.map(|(list, next_page_token)| pb::ListAgentsResponse {
                    agents: list.into_iter().map(agents::agent_out).collect(),
                    next_page_token,
                })
            })
        })
    }
    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "UpdateAgent", |s, p, r| {
            let mask = mask(&convert::AGENT_FIELDS, r.update_mask.as_ref());
            resource::update(&Agents, s, p, agents::agent_in(r.agent), mask)
                .map(|out| out.map(agents::agent_out))
        })
    }
    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        rpc!(self, request, "DeleteAgent", |s, p, r| {
            resource::delete(&Agents, s, p, Id::scoped(&r.tenant, &r.name), r.version)
                .map(|out| out.map(|()| pb::DeleteAgentResponse {}))
        })
    }
    async fn create_enrollment_code(
        &self,
        request: Request<pb::CreateEnrollmentCodeRequest>,
    ) -> Result<Response<pb::CreateEnrollmentCodeResponse>, Status> {
        rpc!(
            self,
            request,
            "CreateEnrollmentCode",
            enrollment::create_code
        )
    }
    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "RevokeAgent", enrollment::revoke)
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        rpc!(self, request, "ListAuditEvents", list_audit_events)
    }
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        rpc!(self, request, "WhoAmI", who_am_i)
    }
    async fn get_fleet_status(
        &self,
        request: Request<pb::GetFleetStatusRequest>,
    ) -> Result<Response<pb::GetFleetStatusResponse>, Status> {
        rpc!(
            self,
            request,
            "GetFleetStatus",
            crate::fleet::get_fleet_status
        )
    }
    async fn test_connection(
        &self,
        request: Request<pb::TestConnectionRequest>,
    ) -> Result<Response<pb::ConnectionTestResult>, Status> {
        rpc!(
            self,
            request,
            "TestConnection",
            crate::fleet::test_connection
        )
    }

    // Consent and token RPCs: the core's `tokens::operator`.
    async fn start_consent(
        &self,
        request: Request<pb::StartConsentRequest>,
    ) -> Result<Response<pb::StartConsentResponse>, Status> {
        rpc!(self, request, "StartConsent", consent::start, &self.consent)
    }
    async fn complete_consent(
        &self,
        request: Request<pb::CompleteConsentRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "CompleteConsent", consent::complete)
    }
    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(
            self,
            request,
            "DeleteToken",
            tokens::delete_token,
            &self.providers.tokens
        )
    }
    async fn refresh_now(
        &self,
        request: Request<pb::RefreshNowRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(
            self,
            request,
            "RefreshNow",
            tokens::refresh_now,
            &self.providers.tokens
        )
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        rpc!(self, request, "CreateApiKey", keys::create)
    }
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        rpc!(self, request, "ListApiKeys", keys::list)
    }
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        rpc!(self, request, "RevokeApiKey", keys::revoke)
    }

    async fn create_consent_link(
        &self,
        request: Request<pb::CreateConsentLinkRequest>,
    ) -> Result<Response<pb::CreateConsentLinkResponse>, Status> {
        rpc!(
            self,
            request,
            "CreateConsentLink",
            consent_links::create,
            &self.consent
        )
    }
    async fn list_consent_links(
        &self,
        request: Request<pb::ListConsentLinksRequest>,
    ) -> Result<Response<pb::ListConsentLinksResponse>, Status> {
        rpc!(self, request, "ListConsentLinks", consent_links::list)
    }
    async fn revoke_consent_link(
        &self,
        request: Request<pb::RevokeConsentLinkRequest>,
    ) -> Result<Response<pb::ConsentLink>, Status> {
        rpc!(self, request, "RevokeConsentLink", consent_links::revoke)
    }
}
