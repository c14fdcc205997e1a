//! Consent RPCs on the wire: `StartConsent` and `CompleteConsent`. The operations
//! (authorization, validation, the flows, audit) are the core's
//! [`crate::tokens::operator::start_consent`] and [`crate::tokens::operator::complete_consent`];
//! this file converts, and holds the consent settings the service is configured with.

use tokenfleet_proto::v1 as pb;

use super::mailboxes::mailbox_with_grant;
use crate::authz::Principal;
use crate::config::DEFAULT_PUBLIC_URL;
use crate::convert;
use crate::ops::Error;
use crate::state::BrokerState;
use crate::tokens::consent::Challenge;
use crate::tokens::operator;

/// What the consent RPCs take from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentSettings {
    /// The broker's externally reachable HTTP base URL (`http.public_url`), without a trailing
    /// `/`; auth-code consents redirect to `<public_url>/oauth/callback` by default.
    pub public_url: String,
}

impl Default for ConsentSettings {
    fn default() -> Self {
        Self {
            public_url: DEFAULT_PUBLIC_URL.to_owned(),
        }
    }
}

/// The wire form of what a person must do to finish a consent.
fn challenge_out(challenge: Challenge) -> Option<pb::start_consent_response::Challenge> {
    use pb::start_consent_response::Challenge as Wire;
    match challenge {
        Challenge::None => None,
        Challenge::DeviceCode {
            user_code,
            verification_uri,
            message,
            expires,
            interval_secs,
        } => Some(Wire::DeviceCode(pb::DeviceCodeChallenge {
            user_code,
            verification_uri,
            expire_time: Some(convert::timestamp(expires)),
            message,
            interval_seconds: u32::try_from(interval_secs).unwrap_or(u32::MAX),
        })),
        Challenge::Authorization {
            url,
            state,
            redirect_uri,
            expires,
        } => Some(Wire::Authorization(pb::AuthorizationChallenge {
            authorization_url: url,
            state,
            redirect_uri,
            expire_time: Some(convert::timestamp(expires)),
        })),
    }
}

pub(super) async fn start(
    state: &BrokerState,
    principal: &Principal,
    req: pb::StartConsentRequest,
    settings: &ConsentSettings,
) -> Result<pb::StartConsentResponse, Error> {
    let outcome = operator::start_consent(
        state,
        principal,
        &req.tenant,
        &req.mailbox,
        &req.redirect_uri,
        &settings.public_url,
    )
    .await?;
    let mailbox = mailbox_with_grant(
        &outcome.mailbox.value,
        outcome.mailbox.version,
        Some(&outcome.grant),
    );
    Ok(pb::StartConsentResponse {
        mailbox: Some(mailbox),
        challenge: challenge_out(outcome.challenge),
    })
}

pub(super) async fn complete(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CompleteConsentRequest,
) -> Result<pb::Mailbox, Error> {
    let done =
        operator::complete_consent(state, principal, &req.tenant, &req.mailbox, &req.code).await?;
    Ok(mailbox_with_grant(
        &done.mailbox.value,
        done.mailbox.version,
        Some(&done.grant),
    ))
}
