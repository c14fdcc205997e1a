//! The `Admin` gRPC service: CRUD of tenants, providers, mailboxes, devices and agents, the audit
//! log and `WhoAmI`.
//!
//! Every RPC runs the same steps: authenticate the API key ([`crate::api_keys`]), authorize the
//! target ([`crate::authz`]) before anything is read, validate the whole input
//! ([`crate::convert`]) and every cross-reference, and only then write one record. Nothing is
//! half-written after an error. Changes (including refused attempts) are audited
//! ([`crate::audit`]).
//!
//! Errors: invalid input → INVALID_ARGUMENT naming the field; another tenant's objects →
//! PERMISSION_DENIED (never NOT_FOUND, so existence is not revealed); store errors through the
//! single mapping [`store_status`].

mod agents;
mod consent;
mod devices;
mod enrollment;
mod keys;
mod mailboxes;
mod providers;
mod tenants;
mod tokens;

use std::future::Future;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use tokenfleet_domain::{AuditEvent, ValidationError};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_server::{Admin, AdminServer};
use tokenfleet_seal::SealError;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::audit::AuditKind;
use crate::authz::{self, Access, Principal, Target};
use crate::records::{CAS_ATTEMPTS, Records, StoredRecord, Versioned};
use crate::state::BrokerState;
use crate::{api_keys, audit, convert};

pub use consent::{ConsentSettings, mailbox_with_grant};
pub use providers::{ProviderPolicy, WELL_KNOWN_PROVIDER_HOSTS};

/// Default page size of `List*` RPCs.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of `List*` RPCs.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Implementation of `tokenfleet.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: BrokerState,
    consent: ConsentSettings,
    tokens: crate::tokens::lifecycle::TokenService,
    providers: ProviderPolicy,
}

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
            tokens,
            providers: ProviderPolicy::default(),
        }
    }

    /// Uses `policy` for where non-fleet-admin callers may point providers (`[admin]` section).
    #[must_use]
    pub fn with_provider_policy(mut self, policy: ProviderPolicy) -> Self {
        self.providers = policy;
        self
    }

    /// Uses `tokens` for the token RPCs (`DeleteToken`, `RefreshNow`): the server shares one
    /// [`crate::tokens::lifecycle::TokenService`] with its refresh scheduler.
    #[must_use]
    pub fn with_token_service(mut self, tokens: crate::tokens::lifecycle::TokenService) -> Self {
        self.tokens = tokens;
        self
    }

    /// Uses `consent` (the broker's public URL) for consent flows.
    #[must_use]
    pub fn with_consent_settings(mut self, consent: ConsentSettings) -> Self {
        self.consent = consent;
        self
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let key = authz::bearer(request.metadata())?;
        let principal = api_keys::authenticate(&self.state, key).await;
        if let Err(status) = &principal {
            tracing::info!(code = ?status.code(), "admin call not authenticated");
        }
        principal
    }
}

/// The `Admin` service ready to add to a tonic server.
pub fn admin_server(state: BrokerState) -> AdminServer<AdminService> {
    AdminServer::new(AdminService::new(state))
}

/// The one mapping from store errors to gRPC status. Details of internal failures are logged,
/// never sent to the client.
pub fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::AlreadyExists(_) => Status::already_exists(err.to_string()),
        StoreError::NotFound(_) => Status::not_found(err.to_string()),
        StoreError::Conflict { .. } => Status::aborted(format!("{err}; read it again and retry")),
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %err, "store unavailable");
            Status::unavailable("the store is unavailable; retry later")
        }
        StoreError::Corrupt { .. } | StoreError::Config(_) => {
            tracing::error!(error = %err, "store failure");
            Status::internal("internal store error (details in the broker log)")
        }
    }
}

/// Sealing failures are internal; the log names the record, never the secret.
pub(crate) fn seal_status(err: &SealError, record: &str) -> Status {
    tracing::error!(error = %err, record, "sealing failed");
    Status::internal("internal error while sealing a secret (details in the broker log)")
}

/// INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(err: ValidationError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// FAILED_PRECONDITION naming the field.
pub(crate) fn precondition(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!("{field}: {problem}"))
}

pub(crate) fn records(state: &BrokerState) -> Records<'_> {
    Records::new(state.store.as_ref())
}

/// Reads a record; NOT_FOUND with `what` (e.g. "provider `m365` in tenant `acme`") when missing.
pub(crate) async fn must_get<T: StoredRecord>(
    state: &BrokerState,
    key: &RecordKey,
    what: &str,
) -> Result<Versioned<T>, Status> {
    records(state)
        .get::<T>(key)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("{what} not found")))
}

/// NOT_FOUND unless the tenant exists.
pub(crate) async fn require_tenant(state: &BrokerState, tenant: &str) -> Result<(), Status> {
    must_get::<tokenfleet_domain::Tenant>(
        state,
        &crate::records::tenant_key(tenant),
        &format!("tenant `{tenant}`"),
    )
    .await
    .map(|_| ())
}

/// Checks the caller's `version` (0 = unconditional) against what was read.
pub(crate) fn check_version(what: &str, expected: u64, stored: u64) -> Result<(), Status> {
    if expected != 0 && expected != stored {
        return Err(changed_concurrently(what, expected, stored));
    }
    Ok(())
}

fn changed_concurrently(what: &str, expected: u64, stored: u64) -> Status {
    Status::aborted(format!(
        "{what} was changed concurrently: the request carries version {expected}, the stored version is {stored}; read it again and retry"
    ))
}

/// Writes an updated record with compare-and-set on the version it was read at. `Ok(None)` means
/// someone else wrote first and the caller (who gave no version) should re-read and retry.
pub(crate) async fn commit<T: StoredRecord>(
    state: &BrokerState,
    what: &str,
    value: &T,
    read_version: u64,
    expected: u64,
    attempt: usize,
) -> Result<Option<u64>, Status> {
    match records(state)
        .put(value, Precondition::Version(read_version))
        .await
    {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::Conflict { found, .. }) => {
            if expected == 0 && attempt + 1 < CAS_ATTEMPTS {
                Ok(None)
            } else {
                Err(changed_concurrently(
                    what,
                    if expected == 0 {
                        read_version
                    } else {
                        expected
                    },
                    found,
                ))
            }
        }
        Err(StoreError::NotFound(_)) => Err(Status::not_found(format!(
            "{what} not found (deleted concurrently)"
        ))),
        Err(e) => Err(store_status(e)),
    }
}

/// Deletes a record, conditionally on `version` when non-zero.
/// Refuses to delete `what` while records of kind `T` in `tenant` still refer to it: answers
/// FAILED_PRECONDITION naming them (`"{what} {blocked} {names}; {fix}"`).
pub(crate) async fn refuse_if_referenced<T: StoredRecord>(
    state: &BrokerState,
    tenant: &str,
    what: &str,
    refers: impl Fn(&T) -> bool,
    name_of: impl Fn(&T) -> &str,
    blocked: &str,
    fix: &str,
) -> Result<(), Status> {
    let all = records(state)
        .list_all::<T>(&Scope::Tenant(tenant.to_owned()))
        .await
        .map_err(store_status)?;
    let referring: Vec<&str> = all
        .iter()
        .filter(|r| refers(&r.value))
        .map(|r| name_of(&r.value))
        .collect();
    if referring.is_empty() {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "{what} {blocked} {}; {fix}",
        name_list(referring)
    )))
}

pub(crate) async fn delete_record(
    state: &BrokerState,
    key: &RecordKey,
    what: &str,
    version: u64,
) -> Result<(), Status> {
    let pre = if version == 0 {
        Precondition::Exists
    } else {
        Precondition::Version(version)
    };
    match records(state).delete(key, pre).await {
        Ok(true) => Ok(()),
        Ok(false) | Err(StoreError::NotFound(_)) => {
            Err(Status::not_found(format!("{what} not found")))
        }
        Err(StoreError::Conflict {
            expected, found, ..
        }) => Err(changed_concurrently(what, expected, found)),
        Err(e) => Err(store_status(e)),
    }
}

/// Names of the first few referrers, for FAILED_PRECONDITION messages.
pub(crate) fn name_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let mut shown: Vec<String> = names.iter().take(10).map(|n| format!("`{n}`")).collect();
    if names.len() > 10 {
        shown.push(format!("and {} more", names.len() - 10));
    }
    shown.join(", ")
}

/// A name from the request, shortened and escaped for log fields, audit targets and messages.
pub(crate) fn shown(value: &str) -> String {
    let mut s: String = value
        .chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Resource path of an object inside a tenant, for audit targets.
pub(crate) fn object_path(tenant: &str, collection: &str, name: &str) -> String {
    format!("tenants/{}/{collection}/{}", shown(tenant), shown(name))
}

/// Records which tenant and object the current RPC concerns in its tracing span.
pub(crate) fn span_object(tenant: &str, name: &str) {
    let span = tracing::Span::current();
    span.record("tenant", shown(tenant).as_str());
    span.record("object", shown(name).as_str());
}

/// One page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageRequest {
    pub size: usize,
    /// Decoded page token: list entries after (records) or before (audit) this id.
    pub cursor: Option<String>,
}

/// Validates `page_size` and decodes `page_token`.
pub(crate) fn page_request(page_size: i32, page_token: &str) -> Result<PageRequest, Status> {
    let size = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => {
            return Err(Status::invalid_argument(format!(
                "page_size: must be 0-{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), got {page_size}"
            )));
        }
    };
    let cursor = if page_token.is_empty() {
        None
    } else {
        let malformed = || {
            Status::invalid_argument(
                "page_token: malformed (pass `next_page_token` back unchanged)",
            )
        };
        let bytes = B64URL.decode(page_token).map_err(|_| malformed())?;
        let text = String::from_utf8(bytes).map_err(|_| malformed())?;
        if text.is_empty() || text.len() > 128 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed());
        }
        Some(text)
    };
    Ok(PageRequest { size, cursor })
}

/// The opaque page token for a cursor id.
pub(crate) fn page_token(id: &str) -> String {
    B64URL.encode(id.as_bytes())
}

/// Lists one page of `T` in `scope`; returns the records and the next page token.
pub(crate) async fn list_page<T: StoredRecord>(
    state: &BrokerState,
    scope: &Scope,
    page: &PageRequest,
) -> Result<(Vec<Versioned<T>>, String), Status> {
    if let Some(cursor) = &page.cursor {
        tokenfleet_domain::name("page_token", cursor).map_err(|_| {
            Status::invalid_argument(
                "page_token: malformed (pass `next_page_token` back unchanged)",
            )
        })?;
    }
    let mut items = records(state)
        .list::<T>(scope, page.cursor.as_deref(), page.size + 1)
        .await
        .map_err(store_status)?;
    let next = if items.len() > page.size {
        items.truncate(page.size);
        items
            .last()
            .map(|v| page_token(&v.value.key().id))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((items, next))
}

/// What an audited change concerns.
pub(crate) struct Change {
    /// `provider.create`, ...
    pub action: &'static str,
    /// `tenants/acme/providers/m365`, ...
    pub target: String,
    /// Tenant of the object; empty for global objects (tenant records themselves).
    pub tenant: String,
}

/// Runs a change and records its outcome (success, refusal or failure) in the audit log.
/// The change's future returns the response and a detail line for the audit event.
pub(crate) async fn audited<T>(
    state: &BrokerState,
    principal: &Principal,
    change: Change,
    run: impl Future<Output = Result<(T, String), Status>>,
) -> Result<T, Status> {
    let outcome = run.await;
    let (result, detail) = match &outcome {
        Ok((_, detail)) => ("ok", detail.clone()),
        Err(status) => (
            audit::result_of(status.code()),
            status.message().chars().take(300).collect(),
        ),
    };
    // A tenant's stream gets what happened in it, as far as the caller is allowed to look at the
    // tenant; attempts on other tenants go to the global stream, so a caller cannot write into a
    // foreign tenant's log.
    let scope = if change.tenant.is_empty()
        || tokenfleet_domain::name("tenant", &change.tenant).is_err()
        || !principal.may_access_tenant(&change.tenant, Access::Read)
    {
        Scope::Global
    } else {
        Scope::Tenant(change.tenant.clone())
    };
    match &outcome {
        Ok(_) => tracing::info!(action = change.action, target = %change.target, "admin change"),
        Err(status) => tracing::info!(
            action = change.action,
            target = %change.target,
            code = ?status.code(),
            message = status.message(),
            "admin change refused"
        ),
    }
    let event = AuditEvent {
        time: state.clock.now(),
        actor: principal.actor(),
        action: change.action.to_owned(),
        target: change.target,
        tenant: shown(&change.tenant),
        result: result.to_owned(),
        detail,
    };
    audit::record(state, &scope, event).await;
    outcome.map(|(value, _)| value)
}

async fn list_audit_events(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    let scope = if req.tenant.is_empty() {
        authz::authorize(principal, Target::GlobalAudit, Access::Read)?;
        Scope::Global
    } else {
        authz::authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
        tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
        Scope::Tenant(req.tenant.clone())
    };
    span_object(&req.tenant, "");
    let kinds: Vec<AuditKind> = if req.kind.trim().is_empty() || req.kind.trim() == "all" {
        AuditKind::ALL.to_vec()
    } else {
        vec![AuditKind::parse(&req.kind).ok_or_else(|| {
            Status::invalid_argument(format!(
                "kind: unknown audit kind `{}` (expected changes, refused, issuance or all)",
                shown(&req.kind)
            ))
        })?]
    };
    // Page tokens are per-kind cursors; only the page size is checked the common way.
    let size = page_request(req.page_size, "")?.size;
    let cursor = if req.page_token.is_empty() {
        audit::Cursor::start(&kinds)
    } else {
        audit::Cursor::parse(&req.page_token, &kinds).ok_or_else(|| {
            Status::invalid_argument(
                "page_token: malformed (pass `next_page_token` back unchanged, with the same kind)",
            )
        })?
    };
    let (entries, next) = audit::list_merged(state, &scope, &cursor, size)
        .await
        .map_err(store_status)?;
    Ok(pb::ListAuditEventsResponse {
        events: entries
            .iter()
            .map(|(id, e)| convert::audit_event_to_proto(id, e))
            .collect(),
        next_page_token: next.map(|c| c.token()).unwrap_or_default(),
    })
}

/// Runs one RPC: a tracing span, authentication, then the handler with the principal (and an
/// optional extra argument, e.g. the consent settings).
macro_rules! rpc {
    ($self:ident, $request:ident, $method:literal, $handler:path $(, $extra:expr)?) => {{
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
            $handler(&$self.state, &principal, $request.into_inner() $(, $extra)?)
                .await
                .map(Response::new)
        }
        .instrument(span)
        .await
    }};
}

async fn who_am_i(
    _state: &BrokerState,
    principal: &Principal,
    _req: pb::WhoAmIRequest,
) -> Result<pb::WhoAmIResponse, Status> {
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
        rpc!(self, request, "CreateTenant", tenants::create)
    }
    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        rpc!(self, request, "GetTenant", tenants::get)
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
        rpc!(self, request, "UpdateTenant", tenants::update)
    }
    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        rpc!(self, request, "DeleteTenant", tenants::delete)
    }

    async fn create_provider(
        &self,
        request: Request<pb::CreateProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(
            self,
            request,
            "CreateProvider",
            providers::create,
            &self.providers
        )
    }
    async fn get_provider(
        &self,
        request: Request<pb::GetProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(self, request, "GetProvider", providers::get)
    }
    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        rpc!(self, request, "ListProviders", providers::list)
    }
    async fn update_provider(
        &self,
        request: Request<pb::UpdateProviderRequest>,
    ) -> Result<Response<pb::Provider>, Status> {
        rpc!(
            self,
            request,
            "UpdateProvider",
            providers::update,
            (&self.tokens, &self.providers)
        )
    }
    async fn delete_provider(
        &self,
        request: Request<pb::DeleteProviderRequest>,
    ) -> Result<Response<pb::DeleteProviderResponse>, Status> {
        rpc!(self, request, "DeleteProvider", providers::delete)
    }

    async fn create_mailbox(
        &self,
        request: Request<pb::CreateMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "CreateMailbox", mailboxes::create)
    }
    async fn get_mailbox(
        &self,
        request: Request<pb::GetMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "GetMailbox", mailboxes::get)
    }
    async fn list_mailboxes(
        &self,
        request: Request<pb::ListMailboxesRequest>,
    ) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        rpc!(self, request, "ListMailboxes", mailboxes::list)
    }
    async fn update_mailbox(
        &self,
        request: Request<pb::UpdateMailboxRequest>,
    ) -> Result<Response<pb::Mailbox>, Status> {
        rpc!(self, request, "UpdateMailbox", mailboxes::update)
    }
    async fn delete_mailbox(
        &self,
        request: Request<pb::DeleteMailboxRequest>,
    ) -> Result<Response<pb::DeleteMailboxResponse>, Status> {
        rpc!(self, request, "DeleteMailbox", mailboxes::delete)
    }

    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "CreateDevice", devices::create)
    }
    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "GetDevice", devices::get)
    }
    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        rpc!(self, request, "ListDevices", devices::list)
    }
    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        rpc!(self, request, "UpdateDevice", devices::update)
    }
    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceResponse>, Status> {
        rpc!(self, request, "DeleteDevice", devices::delete)
    }

    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "CreateAgent", agents::create)
    }
    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "GetAgent", agents::get)
    }
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        rpc!(self, request, "ListAgents", agents::list)
    }
    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        rpc!(self, request, "UpdateAgent", agents::update)
    }
    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        rpc!(self, request, "DeleteAgent", agents::delete)
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

    // Token lifecycle RPCs: being built (issue 3); answer UNIMPLEMENTED until then.
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
            &self.tokens
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
            &self.tokens
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests() {
        assert_eq!(page_request(0, "").unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(page_request(1000, "").unwrap().size, 1000);
        for bad in [-1, 1001] {
            let err = page_request(bad, "").unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("page_size:"), "{}", err.message());
        }
        let token = page_token("acme-2");
        assert_eq!(
            page_request(5, &token).unwrap().cursor.as_deref(),
            Some("acme-2")
        );
        for bad in [
            "!!!",
            "%%",
            &B64URL.encode([0xff, 0xfe]),
            &B64URL.encode("a b"),
        ] {
            let err = page_request(5, bad).unwrap_err();
            assert!(
                err.message().starts_with("page_token:"),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn store_errors_map_to_codes_without_leaking_internals() {
        use tonic::Code;
        let cases = [
            (StoreError::AlreadyExists("k".into()), Code::AlreadyExists),
            (StoreError::NotFound("k".into()), Code::NotFound),
            (
                StoreError::Conflict {
                    key: "k".into(),
                    expected: 1,
                    found: 2,
                },
                Code::Aborted,
            ),
            (
                StoreError::Unavailable("redis://10.0.0.1 refused".into()),
                Code::Unavailable,
            ),
            (
                StoreError::Corrupt {
                    key: "k".into(),
                    problem: "bad json at 12".into(),
                },
                Code::Internal,
            ),
            (StoreError::Config("password=x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = store_status(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("10.0.0.1"));
            assert!(!status.message().contains("bad json"));
            assert!(!status.message().contains("password"));
        }
        assert!(
            store_status(StoreError::Conflict {
                key: "k".into(),
                expected: 1,
                found: 2
            })
            .message()
            .contains("changed concurrently")
        );
    }
}
