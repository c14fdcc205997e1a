//! Consent-link RPCs of the admin API: `CreateConsentLink`, `ListConsentLinks`,
//! `RevokeConsentLink`. The operations (authorization, audit, storage of the hash only) are in
//! [`crate::consent_links`]; this file only converts.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_proto::v1 as pb;

use super::ConsentSettings;
use crate::authz::Principal;
use crate::consent_links::{self, ConsentLink};
use crate::convert;
use crate::ops::Error;
use crate::ops::names::span_object;
use crate::state::BrokerState;

/// A link record as the API shows it (never the token).
pub fn link_to_proto(link: &ConsentLink, now: OffsetDateTime) -> pb::ConsentLink {
    pb::ConsentLink {
        id: link.id().to_owned(),
        tenant: link.tenant.clone(),
        mailbox: link.mailbox.clone(),
        created_by: link.created_by.clone(),
        create_time: Some(convert::timestamp(link.created)),
        expire_time: Some(convert::timestamp(link.expires)),
        state: link.shown_state(now).to_owned(),
        use_time: link.used.map(convert::timestamp),
    }
}

pub(crate) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateConsentLinkRequest,
    settings: &ConsentSettings,
) -> Result<pb::CreateConsentLinkResponse, Error> {
    span_object(&req.tenant, &req.mailbox);
    let ttl = match req.ttl_seconds {
        0 => None,
        s if s < 0 => {
            return Err(Error::invalid(
                "ttl_seconds",
                "must not be negative (0 = 7 days)",
            ));
        }
        s => Some(Duration::from_secs(s.unsigned_abs().into())),
    };
    let new = consent_links::create(state, principal, &req.tenant, &req.mailbox, ttl).await?;
    Ok(pb::CreateConsentLinkResponse {
        url: consent_links::link_url(&settings.public_url, new.token.expose()),
        token: new.token.expose().to_owned(),
        link: Some(link_to_proto(&new.link, state.clock.now())),
    })
}

pub(crate) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListConsentLinksRequest,
) -> Result<pb::ListConsentLinksResponse, Error> {
    span_object(&req.tenant, &req.mailbox);
    let now = state.clock.now();
    let links = consent_links::list(state, principal, &req.tenant, &req.mailbox).await?;
    Ok(pb::ListConsentLinksResponse {
        links: links.iter().map(|l| link_to_proto(l, now)).collect(),
    })
}

pub(crate) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeConsentLinkRequest,
) -> Result<pb::ConsentLink, Error> {
    span_object(&req.tenant, "");
    let link = consent_links::revoke(state, principal, &req.tenant, &req.id).await?;
    Ok(link_to_proto(&link, state.clock.now()))
}
