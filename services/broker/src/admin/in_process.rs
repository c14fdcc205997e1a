//! The resource reads of the web console ([`crate::console`]): tenants, mailboxes, devices and
//! agents, every page of a list or one object, read with the core's domain-typed resource
//! operations themselves — the ones the gRPC RPCs call, so the same authorization — with the
//! principal the console resolved from its session instead of from a bearer header. No wire
//! form, no gRPC handler in between; nothing here reads or writes the store on its own.
//!
//! Consent, the token buttons, consent links, enrollment, agent revocation, the audit log, fleet
//! status and connection tests need no method here: the console calls the core's operations
//! for them directly, in domain types ([`crate::tokens::operator`], [`crate::consent_links`],
//! [`crate::identity::enrollment`], [`crate::audit::list_events`], [`tokenfleet_core::fleet`]),
//! with what this service was configured with ([`AdminService::tokens`],
//! [`AdminService::public_url`], [`AdminService::broker_state`]).

use tokenfleet_core::records::Versioned;
use tokenfleet_core::resources::mailboxes::MailboxView;
use tokenfleet_domain::{Agent, Device, Tenant};

use super::{AdminService, Agents, Devices, Mailboxes};
use crate::authz::Principal;
use crate::ops::Error;
use crate::ops::resource::{self, Id};

/// Page size the console reads lists with (the API's largest).
const PAGE: i32 = super::MAX_PAGE_SIZE as i32;

/// Every page of a list: `page` reads the one after a page token (empty: the first) and
/// answers its items and the next token (empty: no more).
async fn every_page<T, F, Fut>(mut page: F) -> Result<Vec<T>, Error>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Error>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

impl AdminService {
    /// The tenants the caller may see (every page), as the core's tenant resource lists them:
    /// domain records, no wire form in between.
    pub async fn console_tenants(&self, p: &Principal) -> Result<Vec<Versioned<Tenant>>, Error> {
        every_page(|token| async move {
            tokenfleet_core::resources::tenants::list(&self.state, p, PAGE, &token).await
        })
        .await
    }

    /// The mailboxes of one tenant (every page), as the core's mailbox resource lists them:
    /// domain records with their grants' token state, no wire form in between.
    pub async fn console_mailboxes(
        &self,
        p: &Principal,
        tenant: &str,
    ) -> Result<Vec<MailboxView>, Error> {
        every_page(|token| async move {
            resource::list(&Mailboxes, &self.state, p, tenant, PAGE, &token).await
        })
        .await
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
        every_page(|token| async move {
            resource::list(&Devices, &self.state, p, tenant, PAGE, &token).await
        })
        .await
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
        every_page(|token| async move {
            resource::list(&Agents, &self.state, p, tenant, PAGE, &token).await
        })
        .await
    }

    /// The broker state (for the console's session checks).
    pub fn broker_state(&self) -> &crate::state::BrokerState {
        &self.state
    }

    /// The token service the token operations run on
    /// ([`crate::tokens::operator::refresh_now`], [`crate::tokens::operator::delete_token`]).
    pub fn tokens(&self) -> &crate::tokens::lifecycle::TokenService {
        &self.providers.tokens
    }

    /// The broker's public URL.
    pub fn public_url(&self) -> &str {
        &self.consent.public_url
    }
}
