//! Consent-link RPCs on the wire: `CreateConsentLink`, `ListConsentLinks`, `RevokeConsentLink`.
//! The operations (authorization, audit, storage of the hash only) are the core's
//! [`crate::consent_links`]; this file only converts. The token is in the create response once.

use time::OffsetDateTime;
use tokenfleet_proto::v1 as pb;

use super::ConsentSettings;
use crate::authz::Principal;
use crate::consent_links::{self, ConsentLink};
use crate::convert;
use crate::ops::Error;
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
    let ttl = consent_links::ttl_from_seconds(req.ttl_seconds.into())?;
    let new = consent_links::create(state, principal, &req.tenant, &req.mailbox, ttl).await?;
    Ok(pb::CreateConsentLinkResponse {
        url: new.url(&settings.public_url),
        token: new.token.expose().to_owned(),
        link: Some(link_to_proto(&new.link, state.clock.now())),
    })
}

pub(crate) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListConsentLinksRequest,
) -> Result<pb::ListConsentLinksResponse, Error> {
    let links = consent_links::list(state, principal, &req.tenant, &req.mailbox).await?;
    let now = state.clock.now();
    Ok(pb::ListConsentLinksResponse {
        links: links.iter().map(|l| link_to_proto(l, now)).collect(),
    })
}

pub(crate) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeConsentLinkRequest,
) -> Result<pb::ConsentLink, Error> {
    let link = consent_links::revoke(state, principal, &req.tenant, &req.id).await?;
    Ok(link_to_proto(&link, state.clock.now()))
}
