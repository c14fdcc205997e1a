//! The operator's operations on a mailbox's token: start a consent ([`start_consent`]), complete
//! an auth-code consent with a pasted code ([`complete_consent`]), refresh now ([`refresh_now`])
//! and delete the token ([`delete_token`]) — the Admin API's `StartConsent`, `CompleteConsent`,
//! `RefreshNow`, `DeleteToken` and the console's mailbox buttons.
//!
//! Each one authorizes (write access to the mailbox's tenant), checks the names, runs the flow
//! ([`super::consent`], [`super::lifecycle`]) and is audited on the mailbox
//! (`consent.start`, `consent.complete`, `mailbox.refresh_now`, `mailbox.delete_token`), refusals
//! included. Refresh and delete answer with the mailbox as reads show it ([`MailboxView`], from
//! [`crate::resources::mailboxes::read`]: the grant record's token state); the consent
//! operations with the flow's outcome (the mailbox, its grant record, what the person must do). Tokens, device codes and verifiers are never in an audit detail or the log.

use std::future::Future;

use super::consent::{self, Challenge, CompleteOutcome, StartOutcome};
use super::lifecycle::{TokenError, TokenService};
use crate::authz::{Access, Principal, Target, authorize};
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::span_object;
use crate::resources::mailboxes::{self, MailboxView, check_names};
use crate::state::BrokerState;

/// Write access to `tenant`, then valid tenant and mailbox names.
fn authorize_mailbox(principal: &Principal, tenant: &str, mailbox: &str) -> Result<(), Error> {
    authorize(principal, Target::Tenant(tenant), Access::Write)?;
    check_names(tenant, mailbox)
}

/// A redirect URI a caller asked for: an absolute `http`/`https` URL without a fragment.
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

/// The audit detail of a started consent (never the user code or the `state`).
fn started_detail(outcome: &StartOutcome) -> String {
    match &outcome.challenge {
        Challenge::None => format!(
            "token obtained without a person ({})",
            outcome.mailbox.value.grant_type
        ),
        Challenge::DeviceCode { .. } => "device code issued; waiting for the person".to_owned(),
        Challenge::Authorization { redirect_uri, .. } => {
            format!("authorization URL issued; redirect to {redirect_uri}")
        }
    }
}

/// Runs `work` (which answers its result and the audit detail) as a change of `mailbox`'s token
/// by `principal`: authorized first, audited with its outcome.
async fn mailbox_change<T, F>(
    state: &BrokerState,
    principal: &Principal,
    action: &'static str,
    tenant: &str,
    mailbox: &str,
    work: impl FnOnce() -> F,
) -> Result<T, Error>
where
    F: Future<Output = Result<(T, String), Error>>,
{
    span_object(tenant, mailbox);
    audited(
        state,
        principal,
        Change::of_object(action, tenant, "mailboxes", mailbox),
        async {
            authorize_mailbox(principal, tenant, mailbox)?;
            work().await
        },
    )
    .await
}

/// `principal` starts obtaining a grant for `mailbox` of `tenant` (by its grant type, see
/// [`consent::start`]). `redirect_uri` (auth code only; empty: `<public_url>/oauth/callback`)
/// is where the provider sends the browser back.
pub async fn start_consent(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
    redirect_uri: &str,
    public_url: &str,
) -> Result<StartOutcome, Error> {
    mailbox_change(
        state,
        principal,
        "consent.start",
        tenant,
        mailbox,
        || async {
            let redirect = redirect_uri.trim();
            if !redirect.is_empty() {
                check_redirect_uri(redirect)?;
            }
            let redirect = (!redirect.is_empty()).then_some(redirect);
            let outcome = consent::start(state, tenant, mailbox, redirect, public_url).await?;
            let detail = started_detail(&outcome);
            Ok((outcome, detail))
        },
    )
    .await
}

/// `principal` completes an auth-code consent with what a person pasted: the code or the whole
/// address the browser ended on (see [`consent::complete`]).
pub async fn complete_consent(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
    code: &str,
) -> Result<CompleteOutcome, Error> {
    mailbox_change(state, principal, "consent.complete", tenant, mailbox, || async {
        if code.trim().is_empty() {
            return Err(Error::invalid(
                "code",
                "is required: paste the authorization code or the whole address the browser ended on",
            ));
        }
        let done = consent::complete(state, tenant, mailbox, code, &principal.actor()).await?;
        Ok((done, "authorization code redeemed".to_owned()))
    })
    .await
}

/// Runs `work` on the token of `mailbox` (it answers the audit detail) as [`mailbox_change`]
/// does, and answers with the mailbox as reads show it afterwards.
async fn token_change<F>(
    tokens: &TokenService,
    principal: &Principal,
    action: &'static str,
    tenant: &str,
    mailbox: &str,
    work: impl FnOnce() -> F,
) -> Result<MailboxView, Error>
where
    F: Future<Output = Result<String, Error>>,
{
    let state = tokens.state();
    mailbox_change(state, principal, action, tenant, mailbox, || async {
        let detail = work().await?;
        Ok((mailboxes::read(state, tenant, mailbox).await?, detail))
    })
    .await
}

/// `principal` deletes the token of `mailbox` (revoked at the provider where possible, wiped
/// anyway, see [`TokenService::delete_token`]); what happened at the provider is the audit
/// detail.
pub async fn delete_token(
    tokens: &TokenService,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
) -> Result<MailboxView, Error> {
    token_change(
        tokens,
        principal,
        "mailbox.delete_token",
        tenant,
        mailbox,
        || async { Ok(tokens.delete_token(tenant, mailbox).await?.to_string()) },
    )
    .await
}

/// `principal` refreshes the token of `mailbox` now. A provider failure is not an error: it is
/// recorded in the grant, and the answer shows it (status, reason, fix, next attempt); only
/// what kept the refresh from being attempted is.
pub async fn refresh_now(
    tokens: &TokenService,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
) -> Result<MailboxView, Error> {
    token_change(
        tokens,
        principal,
        "mailbox.refresh_now",
        tenant,
        mailbox,
        || async {
            match tokens.refresh_now(tenant, mailbox).await {
                Ok(token) => Ok(format!(
                    "refreshed; access token expires {}",
                    token
                        .expires
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                )),
                Err(
                    e @ (TokenError::RefreshFailing { .. } | TokenError::ReauthRequired { .. }),
                ) => Ok(crate::audit::detail(e.to_string())),
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use tokenfleet_domain::Role;

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

    use crate::testing::principal as p;

    /// Token operations need write access to the mailbox's tenant, decided before the names
    /// are read (so another tenant's caller learns nothing from a bad name either).
    #[test]
    fn token_operations_need_write_access_to_the_tenant() {
        let ta = p(Role::TenantAdmin, Some("acme"));
        assert!(authorize_mailbox(&ta, "acme", "scan").is_ok());
        let err = authorize_mailbox(&ta, "acme", "Bad Name").unwrap_err();
        assert!(err.to_string().starts_with("mailbox: "), "{err}");
        for (who, tenant, mailbox) in [
            (p(Role::TenantAdmin, Some("beta")), "acme", "scan"),
            (p(Role::TenantAdmin, Some("beta")), "acme", "Bad Name"),
            (p(Role::Viewer, None), "acme", "scan"),
            (p(Role::Viewer, Some("acme")), "acme", "scan"),
        ] {
            let err = authorize_mailbox(&who, tenant, mailbox).unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        }
        assert!(authorize_mailbox(&p(Role::FleetAdmin, None), "acme", "scan").is_ok());
    }
}
