//! Mailboxes as a [`Resource`]. A mailbox's provider must exist in its tenant, fit its grant type
//! and hold the credential the grant type needs. The token state is the grant record's: reads show
//! it, an update that changes what the grant belongs to discards it, a delete takes it along. A
//! mailbox that devices use is not deleted. Agents of the tenant learn about every change.

use std::collections::HashMap;

use tokenfleet_domain::{GrantType, Mailbox, Provider, TokenState, TokenStatus};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::Scope;

use crate::authz::Principal;
use crate::convert::{self, UpdateMask};
use crate::ops::Error;
use crate::ops::paging::PageRequest;
use crate::ops::resource::{Id, Resource, resource_basics};
use crate::ops::stored::{Reference, Referrer, records};
use crate::records::{Versioned, mailbox_key, provider_key};
use crate::state::BrokerState;
use crate::tokens::grant::{GrantRecord, PendingConsent, grant_key};
use crate::tokens::lifecycle::discard_grant;

/// The mailbox resource.
pub(crate) struct Mailboxes;

/// Whether an update keeps the grant (decided per attempt, used for the answer).
#[derive(Debug, Default)]
pub(crate) struct SameGrant(bool);

/// The provider exists in the mailbox's tenant, fits the grant type, and holds the credential the
/// grant type needs.
async fn check_provider(state: &BrokerState, m: &Mailbox) -> Result<(), Error> {
    let provider = records(state)
        .get::<Provider>(&provider_key(&m.tenant, &m.provider))
        .await?
        .ok_or_else(|| {
            Error::precondition(
                "mailbox.provider",
                format!(
                    "no provider `{}` in tenant `{}`; create it first",
                    m.provider, m.tenant
                ),
            )
        })?
        .value;
    convert::check_grant_fits(provider.kind, m.grant_type)?;
    match m.grant_type {
        GrantType::AppOnly if provider.client_secret.is_none() => Err(Error::precondition(
            "mailbox.grant_type",
            format!(
                "app_only needs a client secret, and provider `{}` has none; set provider.client_secret first",
                m.provider
            ),
        )),
        GrantType::ServiceAccount if provider.service_account_key.is_none() => {
            Err(Error::precondition(
                "mailbox.grant_type",
                format!(
                    "service_account needs a service-account key, and provider `{}` has none; set provider.service_account_key first",
                    m.provider
                ),
            ))
        }
        _ => Ok(()),
    }
}

async fn grant_of(state: &BrokerState, m: &Mailbox) -> Result<Option<GrantRecord>, Error> {
    let grant = records(state)
        .get::<GrantRecord>(&grant_key(&m.tenant, &m.name))
        .await?;
    Ok(grant.map(|g| g.value))
}

/// Wire form of a mailbox whose token state comes from its grant record (when there is one): a
/// disabled mailbox shows DISABLED; a pending device-code consent shows its user code.
pub fn mailbox_with_grant(
    mailbox: &Mailbox,
    version: u64,
    grant: Option<&GrantRecord>,
) -> pb::Mailbox {
    let mut out = convert::mailbox_to_proto(mailbox, version);
    let Some(g) = grant else {
        return out;
    };
    let status = if mailbox.disabled {
        TokenStatus::Disabled
    } else {
        g.state.status
    };
    let pending_device_code = match &g.pending {
        Some(PendingConsent::DeviceCode {
            user_code,
            verification_uri,
            message,
            expires,
            interval_secs,
            ..
        }) => Some(pb::DeviceCodeChallenge {
            user_code: user_code.clone(),
            verification_uri: verification_uri.clone(),
            expire_time: Some(convert::timestamp(*expires)),
            message: message.clone(),
            interval_seconds: u32::try_from(*interval_secs).unwrap_or(u32::MAX),
        }),
        _ => None,
    };
    out.token = Some(pb::TokenState {
        status: convert::token_status_out(status),
        last_refresh_time: g.state.last_refresh.map(convert::timestamp),
        access_token_expire_time: g.state.access_token_expires.map(convert::timestamp),
        last_error: g.state.last_error.as_ref().map(|e| pb::TokenError {
            code: e.code.clone(),
            reason: e.reason.clone(),
            fix: e.fix.clone(),
            time: Some(convert::timestamp(e.time)),
        }),
        pending_device_code,
        refresh_token_expire_time: g.refresh_token_expires.map(convert::timestamp),
        next_refresh_time: g.next_refresh.map(convert::timestamp),
        consecutive_failures: g.consecutive_failures,
        clock_skew_seconds: g.clock_skew_secs,
    });
    out
}

impl Resource for Mailboxes {
    type Plan = SameGrant;
    resource_basics!(scoped "mailbox" in "mailboxes": Mailbox as pb::Mailbox, key mailbox_key, to_wire convert::mailbox_to_proto, from_wire convert::mailbox_from_proto, merge convert::merge_mailbox);
    const REFERENCES: &'static [Reference] = &[Reference::new(
        Referrer::DeviceMailbox,
        "is still used by devices",
        "change or delete them first",
    )];

    async fn prepare_new(
        &self,
        state: &BrokerState,
        record: &mut Mailbox,
        _: (),
    ) -> Result<String, Error> {
        check_provider(state, record).await?;
        Ok(String::new())
    }

    /// A grant belongs to one address, app registration, flow and signed-in account: changing
    /// any of them means a new consent, so the token state starts over.
    async fn prepare_update(
        &self,
        state: &BrokerState,
        _: &Principal,
        same: &mut SameGrant,
        old: &Mailbox,
        next: &mut Mailbox,
        _: (),
    ) -> Result<(), Error> {
        same.0 = next.address == old.address
            && next.provider == old.provider
            && next.grant_type == old.grant_type
            && next
                .consent_account
                .eq_ignore_ascii_case(&old.consent_account);
        next.token = if same.0 {
            old.token.clone()
        } else {
            TokenState::default()
        };
        check_provider(state, next).await
    }

    async fn updated(
        &self,
        state: &BrokerState,
        same: SameGrant,
        next: &Mailbox,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(pb::Mailbox, String), Error> {
        let grant = if same.0 {
            grant_of(state, next).await?
        } else {
            // The grant belongs to the old address, app, flow or account.
            discard_grant(state, &next.tenant, &next.name).await?;
            None
        };
        Ok((
            mailbox_with_grant(next, version, grant.as_ref()),
            format!("fields: {}", mask.describe()),
        ))
    }

    /// Its tokens must not outlive it.
    async fn deleted(&self, state: &BrokerState, id: &Id) -> Result<(), Error> {
        discard_grant(state, &id.tenant, &id.name).await?;
        Ok(())
    }

    async fn view(&self, state: &BrokerState, m: Versioned<Mailbox>) -> Result<pb::Mailbox, Error> {
        let grant = grant_of(state, &m.value).await?;
        Ok(mailbox_with_grant(&m.value, m.version, grant.as_ref()))
    }

    /// The grant records of a page of mailboxes. Grants share their mailbox's id, so one listing
    /// from the same cursor finds them; mailboxes beyond a full listing (possible only with
    /// orphaned grants) are read one by one.
    async fn view_page(
        &self,
        state: &BrokerState,
        scope: &Scope,
        page: &PageRequest,
        items: &[Versioned<Mailbox>],
    ) -> Result<Vec<pb::Mailbox>, Error> {
        let limit = page.size + 1;
        let listed = records(state)
            .list::<GrantRecord>(scope, page.cursor.as_deref(), limit)
            .await?;
        let complete_up_to = (listed.len() >= limit)
            .then(|| listed.last().map(|g| g.value.mailbox.clone()))
            .flatten();
        let mut grants: HashMap<String, GrantRecord> = listed
            .into_iter()
            .map(|g| (g.value.mailbox.clone(), g.value))
            .collect();
        if let Some(last) = complete_up_to {
            for m in items.iter().filter(|m| m.value.name > last) {
                if let Some(g) = grant_of(state, &m.value).await? {
                    grants.insert(m.value.name.clone(), g);
                }
            }
        }
        Ok(items
            .iter()
            .map(|m| mailbox_with_grant(&m.value, m.version, grants.get(&m.value.name)))
            .collect())
    }

    async fn changed(&self, state: &BrokerState, tenant: &str) {
        crate::fleet::config_changed(state, tenant).await;
    }
}
