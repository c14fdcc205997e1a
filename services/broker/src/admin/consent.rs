//! Consent RPCs: `StartConsent` and `CompleteConsent` (the flows themselves are in
//! [`crate::tokens::consent`]), and the wire form of a mailbox with its grant's state.

use tokenfleet_domain::{Mailbox, TokenStatus};
use tokenfleet_proto::v1 as pb;
use tonic::Status;

use super::{Change, audited, invalid, object_path, seal_status, span_object, store_status};
use crate::authz::{Access, Principal, Target, authorize};
use crate::config::DEFAULT_PUBLIC_URL;
use crate::convert;
use crate::state::BrokerState;
use crate::tokens::consent::{self, Challenge, ConsentError};
use crate::tokens::grant::{GrantRecord, PendingConsent};

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

fn change(action: &'static str, tenant: &str, mailbox: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "mailboxes", mailbox),
        tenant: tenant.to_owned(),
    }
}

/// The one mapping from consent errors to gRPC status.
fn consent_status(err: ConsentError) -> Status {
    match err {
        ConsentError::NotFound(m) => Status::not_found(m),
        ConsentError::InvalidArgument(m) => Status::invalid_argument(m),
        ConsentError::FailedPrecondition(m) => Status::failed_precondition(m),
        ConsentError::Unavailable(m) => Status::unavailable(m),
        ConsentError::Conflict(m) => Status::aborted(m),
        ConsentError::Store(e) => store_status(e),
        ConsentError::Seal { record, source } => seal_status(&source, &record),
    }
}

/// A redirect URI from the request: an absolute `http`/`https` URL without a fragment.
fn check_redirect_uri(value: &str) -> Result<(), Status> {
    let bad = |problem: &str| Status::invalid_argument(format!("redirect_uri: {problem}"));
    if value.len() > 2048 {
        return Err(bad("longer than 2048 characters"));
    }
    let url = url::Url::parse(value).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("needs a host"));
    }
    if url.fragment().is_some() {
        return Err(bad("must not have a fragment (`#…`)"));
    }
    Ok(())
}

fn check_names(tenant: &str, mailbox: &str) -> Result<(), Status> {
    tokenfleet_domain::name("tenant", tenant).map_err(invalid)?;
    tokenfleet_domain::name("mailbox", mailbox).map_err(invalid)?;
    Ok(())
}

pub(super) async fn start(
    state: &BrokerState,
    principal: &Principal,
    req: pb::StartConsentRequest,
    settings: &ConsentSettings,
) -> Result<pb::StartConsentResponse, Status> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("consent.start", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            let redirect = req.redirect_uri.trim();
            if !redirect.is_empty() {
                check_redirect_uri(redirect)?;
            }
            let outcome = consent::start(
                state,
                &req.tenant,
                &req.mailbox,
                (!redirect.is_empty()).then_some(redirect),
                &settings.public_url,
            )
            .await
            .map_err(consent_status)?;
            let mailbox = mailbox_with_grant(
                &outcome.mailbox.value,
                outcome.mailbox.version,
                Some(&outcome.grant),
            );
            use pb::start_consent_response::Challenge as Wire;
            let (challenge, detail) = match outcome.challenge {
                Challenge::None => (
                    None,
                    format!(
                        "token obtained without a person ({})",
                        outcome.mailbox.value.grant_type
                    ),
                ),
                Challenge::DeviceCode {
                    user_code,
                    verification_uri,
                    message,
                    expires,
                    interval_secs,
                } => (
                    Some(Wire::DeviceCode(pb::DeviceCodeChallenge {
                        user_code,
                        verification_uri,
                        expire_time: Some(convert::timestamp(expires)),
                        message,
                        interval_seconds: u32::try_from(interval_secs).unwrap_or(u32::MAX),
                    })),
                    "device code issued; waiting for the person".to_owned(),
                ),
                Challenge::Authorization {
                    url,
                    state: oauth_state,
                    redirect_uri,
                    expires,
                } => {
                    let detail = format!("authorization URL issued; redirect to {redirect_uri}");
                    (
                        Some(Wire::Authorization(pb::AuthorizationChallenge {
                            authorization_url: url,
                            state: oauth_state,
                            redirect_uri,
                            expire_time: Some(convert::timestamp(expires)),
                        })),
                        detail,
                    )
                }
            };
            Ok((
                pb::StartConsentResponse {
                    mailbox: Some(mailbox),
                    challenge,
                },
                detail,
            ))
        },
    )
    .await
}

pub(super) async fn complete(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CompleteConsentRequest,
) -> Result<pb::Mailbox, Status> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("consent.complete", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            if req.code.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "code: is required: paste the authorization code or the whole address the browser ended on",
                ));
            }
            let done = consent::complete(
                state,
                &req.tenant,
                &req.mailbox,
                &req.code,
                &principal.actor(),
            )
            .await
            .map_err(consent_status)?;
            Ok((
                mailbox_with_grant(&done.mailbox.value, done.mailbox.version, Some(&done.grant)),
                "authorization code redeemed".to_owned(),
            ))
        },
    )
    .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_checked() {
        assert!(check_redirect_uri("http://127.0.0.1:8080/oauth/callback").is_ok());
        assert!(check_redirect_uri("https://broker.example/oauth/callback?x=1").is_ok());
        for bad in [
            "ftp://x/cb",
            "not a url",
            "https://broker.example/cb#frag",
            "/oauth/callback",
        ] {
            let e = check_redirect_uri(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("redirect_uri:"), "{}", e.message());
        }
    }
}
