//! The admin operations called in-process by the web console ([`crate::console`]): the very
//! handlers the gRPC RPCs run (same authorization, validation and audit), with the principal the
//! console resolved from its session instead of from a bearer header. Tenants, mailboxes,
//! devices and agents are read with the core's domain-typed resource operations themselves (no
//! wire form, no gRPC handler in between); the other operations still in their wire form.
//! Nothing here reads or writes the store on its own.

use tokenfleet_core::records::Versioned;
use tokenfleet_core::resources::mailboxes::MailboxView;
use tokenfleet_domain::{Agent, Device, Tenant};
use tokenfleet_proto::v1 as pb;

use super::{AdminService, Agents, Devices, Mailboxes, consent, consent_links, enrollment, tokens};
use crate::authz::Principal;
use crate::ops::Error;
use crate::ops::resource::{self, Id};

/// Page size the console reads lists with (the API's largest).
const PAGE: i32 = super::MAX_PAGE_SIZE as i32;

impl AdminService {
    /// The tenants the caller may see (every page), as the core's tenant resource lists them:
    /// domain records, no wire form in between.
    pub async fn console_tenants(&self, p: &Principal) -> Result<Vec<Versioned<Tenant>>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) =
                tokenfleet_core::resources::tenants::list(&self.state, p, PAGE, &token).await?;
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// The mailboxes of one tenant (every page), as the core's mailbox resource lists them:
    /// domain records with their grants' token state, no wire form in between.
    pub async fn console_mailboxes(
        &self,
        p: &Principal,
        tenant: &str,
    ) -> Result<Vec<MailboxView>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) =
                resource::list(&Mailboxes, &self.state, p, tenant, PAGE, &token).await?;
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// One mailbox, as the core's mailbox resource shows it.
    pub async fn console_mailbox(
        &self,
        p: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<MailboxView, Error> {
        resource::get(&Mailboxes, &self.state, p, Id::scoped(tenant, name)).await
    }

    /// The devices of one tenant (every page), as the core's device resource lists them:
    /// domain records, no wire form in between.
    pub async fn console_devices(
        &self,
        p: &Principal,
        tenant: &str,
    ) -> Result<Vec<Versioned<Device>>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) =
                resource::list(&Devices, &self.state, p, tenant, PAGE, &token).await?;
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// One device, as the core's device resource shows it.
    pub async fn console_device(
        &self,
        p: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<Versioned<Device>, Error> {
        resource::get(&Devices, &self.state, p, Id::scoped(tenant, name)).await
    }

    /// The agents of one tenant (every page), as the core's agent resource lists them: domain
    /// records, no wire form in between.
    pub async fn console_agents(
        &self,
        p: &Principal,
        tenant: &str,
    ) -> Result<Vec<Versioned<Agent>>, Error> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) =
                resource::list(&Agents, &self.state, p, tenant, PAGE, &token).await?;
            out.extend(items);
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// `GetFleetStatus`.
    pub async fn console_fleet_status(
        &self,
        p: &Principal,
        tenant: &str,
    ) -> Result<pb::GetFleetStatusResponse, Error> {
        crate::fleet::get_fleet_status(
            &self.state,
            p,
            pb::GetFleetStatusRequest {
                tenant: tenant.to_owned(),
            },
        )
        .await
    }

    /// `TestConnection`.
    pub async fn console_test_connection(
        &self,
        p: &Principal,
        req: pb::TestConnectionRequest,
    ) -> Result<pb::ConnectionTestResult, Error> {
        crate::fleet::test_connection(&self.state, p, req).await
    }

    /// `StartConsent` (redirecting to the broker's own callback).
    pub async fn console_start_consent(
        &self,
        p: &Principal,
        tenant: &str,
        mailbox: &str,
    ) -> Result<pb::StartConsentResponse, Error> {
        consent::start(
            &self.state,
            p,
            pb::StartConsentRequest {
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
                ..Default::default()
            },
            &self.consent,
        )
        .await
    }

    /// `DeleteToken`.
    pub async fn console_delete_token(
        &self,
        p: &Principal,
        tenant: &str,
        mailbox: &str,
    ) -> Result<pb::Mailbox, Error> {
        tokens::delete_token(
            &self.state,
            p,
            pb::DeleteTokenRequest {
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
            },
            &self.providers.tokens,
        )
        .await
    }

    /// `RefreshNow`.
    pub async fn console_refresh_now(
        &self,
        p: &Principal,
        tenant: &str,
        mailbox: &str,
    ) -> Result<pb::Mailbox, Error> {
        tokens::refresh_now(
            &self.state,
            p,
            pb::RefreshNowRequest {
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
            },
            &self.providers.tokens,
        )
        .await
    }

    /// `CreateEnrollmentCode`.
    pub async fn console_enroll(
        &self,
        p: &Principal,
        req: pb::CreateEnrollmentCodeRequest,
    ) -> Result<pb::CreateEnrollmentCodeResponse, Error> {
        enrollment::create_code(&self.state, p, req).await
    }

    /// `RevokeAgent`.
    pub async fn console_revoke_agent(
        &self,
        p: &Principal,
        tenant: &str,
        name: &str,
    ) -> Result<pb::Agent, Error> {
        enrollment::revoke(
            &self.state,
            p,
            pb::RevokeAgentRequest {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
            },
        )
        .await
    }

    /// `ListAuditEvents` (one page).
    pub async fn console_audit(
        &self,
        p: &Principal,
        req: pb::ListAuditEventsRequest,
    ) -> Result<pb::ListAuditEventsResponse, Error> {
        super::list_audit_events(&self.state, p, req).await
    }

    /// `CreateConsentLink`.
    pub async fn console_create_link(
        &self,
        p: &Principal,
        req: pb::CreateConsentLinkRequest,
    ) -> Result<pb::CreateConsentLinkResponse, Error> {
        consent_links::create(&self.state, p, req, &self.consent).await
    }

    /// `ListConsentLinks`.
    pub async fn console_links(
        &self,
        p: &Principal,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Vec<pb::ConsentLink>, Error> {
        consent_links::list(
            &self.state,
            p,
            pb::ListConsentLinksRequest {
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
            },
        )
        .await
        .map(|r| r.links)
    }

    /// `RevokeConsentLink`.
    pub async fn console_revoke_link(
        &self,
        p: &Principal,
        tenant: &str,
        id: &str,
    ) -> Result<pb::ConsentLink, Error> {
        consent_links::revoke(
            &self.state,
            p,
            pb::RevokeConsentLinkRequest {
                tenant: tenant.to_owned(),
                id: id.to_owned(),
            },
        )
        .await
    }

    /// The broker state (for the console's session checks).
    pub fn broker_state(&self) -> &crate::state::BrokerState {
        &self.state
    }

    /// The broker's public URL.
    pub fn public_url(&self) -> &str {
        &self.consent.public_url
    }
}
