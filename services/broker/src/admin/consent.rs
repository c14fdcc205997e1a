//! Consent RPCs: `StartConsent` and `CompleteConsent` (the flows themselves are in
//! [`crate::tokens::consent`]).

use tokenfleet_proto::v1 as pb;

use super::mailboxes::{check_names, mailbox_with_grant};
use crate::authz::{Access, Principal, Target, authorize};
use crate::config::DEFAULT_PUBLIC_URL;
use crate::convert;
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{object_path, span_object};
use crate::state::BrokerState;
use crate::tokens::consent::{self, Challenge};

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

/// A redirect URI from the request: an absolute `http`/`https` URL without a fragment.
fn check_redirect_uri(value: &str) -> Result<(), Error> {
    let bad = |problem: &str| Error::invalid("redirect_uri", problem);
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

pub(super) async fn start(
    state: &BrokerState,
    principal: &Principal,
    req: pb::StartConsentRequest,
    settings: &ConsentSettings,
) -> Result<pb::StartConsentResponse, Error> {
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
            .await?;
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
) -> Result<pb::Mailbox, Error> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("consent.complete", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            if req.code.trim().is_empty() {
                return Err(Error::invalid(
                    "code",
                    "is required: paste the authorization code or the whole address the browser ended on",
                ));
            }
            let done = consent::complete(
                state,
                &req.tenant,
                &req.mailbox,
                &req.code,
                &principal.actor(),
            )
            .await?;
            Ok((
                mailbox_with_grant(&done.mailbox.value, done.mailbox.version, Some(&done.grant)),
                "authorization code redeemed".to_owned(),
            ))
        },
    )
    .await
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
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.starts_with("redirect_uri:")),
                "{e}"
            );
        }
    }
}
