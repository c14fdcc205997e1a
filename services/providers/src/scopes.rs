//! Which scopes to request for a mailbox, per provider kind, grant type, purposes and the
//! resource (API) the token is for ([`TokenResource`]).
//!
//! Microsoft issues every access token for one resource: a token for Exchange Online's mail
//! protocols (`outlook.office.com`) is refused by Microsoft Graph and the other way round. One
//! grant (one refresh token, or one app registration) mints a token per resource, so callers
//! cache tokens per resource too.

use tokenfleet_domain::{GrantType, MailPurpose, ProviderKind};

use crate::error::{ErrorClass, ProviderError};

/// Microsoft delegated scope for SMTP AUTH submission.
pub const MS_SMTP_SEND: &str = "https://outlook.office.com/SMTP.Send";
/// Microsoft delegated scope for POP3.
pub const MS_POP: &str = "https://outlook.office.com/POP.AccessAsUser.All";
/// Microsoft delegated scope for IMAP.
pub const MS_IMAP: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
/// Asks Microsoft for a refresh token.
pub const MS_OFFLINE_ACCESS: &str = "offline_access";
/// Microsoft app-only (client credentials) scope for Exchange Online.
pub const MS_APP_ONLY: &str = "https://outlook.office365.com/.default";
/// Microsoft Graph delegated scope for `sendMail`.
pub const MS_GRAPH_MAIL_SEND: &str = "https://graph.microsoft.com/Mail.Send";
/// Microsoft Graph app-only (client credentials) scope (the app needs the Mail.Send application
/// permission).
pub const MS_GRAPH_APP_ONLY: &str = "https://graph.microsoft.com/.default";
/// Google's full mail scope (the only one that covers SMTP, POP3 and IMAP).
pub const GOOGLE_MAIL: &str = "https://mail.google.com/";

/// The API an access token is for. One grant mints a token per resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenResource {
    /// SMTP, POP3 and IMAP: Exchange Online (`outlook.office.com`) for Microsoft, the mail scope
    /// for Google (which the Gmail API takes as well), the configured scopes for generic
    /// providers. What consents ask for.
    #[default]
    MailProtocols,
    /// Microsoft Graph (`graph.microsoft.com`), for `sendMail`.
    MicrosoftGraph,
}

impl TokenResource {
    /// Every resource.
    pub const ALL: [TokenResource; 2] = [Self::MailProtocols, Self::MicrosoftGraph];

    /// Stable short name (store keys, logs, audit).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MailProtocols => "mail",
            Self::MicrosoftGraph => "graph",
        }
    }

    /// The resource of a short name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for TokenResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Scopes for a token request for `resource`: [`scopes_for`] for the mail protocols; Graph's
/// `Mail.Send` (delegated, with `offline_access`) or `.default` (app-only) for Microsoft Graph,
/// which only Microsoft providers have.
pub fn scopes_for_resource(
    kind: ProviderKind,
    grant_type: GrantType,
    purposes: &[MailPurpose],
    configured: &[String],
    resource: TokenResource,
) -> Result<Vec<String>, ProviderError> {
    match resource {
        TokenResource::MailProtocols => scopes_for(kind, grant_type, purposes, configured),
        TokenResource::MicrosoftGraph => match (kind, grant_type) {
            (
                ProviderKind::Microsoft,
                GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode,
            ) => Ok(vec![
                MS_GRAPH_MAIL_SEND.to_owned(),
                MS_OFFLINE_ACCESS.to_owned(),
            ]),
            (ProviderKind::Microsoft, GrantType::AppOnly) => Ok(vec![MS_GRAPH_APP_ONLY.to_owned()]),
            (ProviderKind::Microsoft, GrantType::ServiceAccount) => Err(invalid(
                "grant_type",
                "service_account is Google's domain-wide delegation; Microsoft Graph needs a Microsoft grant",
            )),
            (ProviderKind::Google | ProviderKind::Generic, _) => Err(invalid(
                "smtp.method",
                "Microsoft Graph needs a Microsoft provider; use smtp or gmail_api for this mailbox",
            )),
        },
    }
}

/// Scopes for a token request. `configured` are the provider's own scopes, used by generic
/// providers. The list never spans two resources (Microsoft refuses that with AADSTS700022).
pub fn scopes_for(
    kind: ProviderKind,
    grant_type: GrantType,
    purposes: &[MailPurpose],
    configured: &[String],
) -> Result<Vec<String>, ProviderError> {
    match (kind, grant_type) {
        (
            ProviderKind::Microsoft,
            GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode,
        ) => {
            if purposes.is_empty() {
                return Err(invalid(
                    "purposes",
                    "a delegated mailbox needs at least one purpose (send, pop, imap)",
                ));
            }
            let mut out: Vec<String> = Vec::new();
            for p in MailPurpose::ALL {
                if purposes.contains(p) {
                    out.push(
                        match p {
                            MailPurpose::Send => MS_SMTP_SEND,
                            MailPurpose::Pop => MS_POP,
                            MailPurpose::Imap => MS_IMAP,
                        }
                        .to_owned(),
                    );
                }
            }
            out.push(MS_OFFLINE_ACCESS.to_owned());
            Ok(out)
        }
        (ProviderKind::Microsoft, GrantType::AppOnly) => Ok(vec![MS_APP_ONLY.to_owned()]),
        (ProviderKind::Microsoft, GrantType::ServiceAccount) => Err(invalid(
            "grant_type",
            "service_account is Google's domain-wide delegation; for Microsoft app-only access use app_only",
        )),
        (ProviderKind::Google, GrantType::DelegatedDeviceCode) => Err(google_device_code_refused()),
        (ProviderKind::Google, GrantType::AppOnly) => Err(invalid(
            "grant_type",
            "Google has no client-credentials grant for mail; use service_account (domain-wide delegation)",
        )),
        (ProviderKind::Google, GrantType::DelegatedAuthCode | GrantType::ServiceAccount) => {
            Ok(vec![GOOGLE_MAIL.to_owned()])
        }
        (ProviderKind::Generic, _) => {
            if configured.is_empty() {
                return Err(invalid(
                    "scopes",
                    "a generic provider needs its scopes listed",
                ));
            }
            Ok(configured.to_vec())
        }
    }
}

/// The error for Google + device code.
pub fn google_device_code_refused() -> ProviderError {
    ProviderError::new(
        ErrorClass::InvalidRequest,
        "device_flow_unsupported",
        "Google does not allow the device code flow for Gmail scopes (https://mail.google.com/)",
        "use grant type delegated_auth_code (browser sign-in with PKCE; the code can be pasted) or \
         service_account (Workspace domain-wide delegation)",
    )
}

fn invalid(field: &str, problem: &str) -> ProviderError {
    ProviderError::new(
        ErrorClass::InvalidRequest,
        "invalid_settings",
        format!("{field}: {problem}"),
        "change the mailbox or provider settings",
    )
}

/// The resource (scheme + host) of a URL-shaped scope; `None` for plain scopes like
/// `offline_access`.
fn resource_of(scope: &str) -> Option<&str> {
    let rest = scope
        .strip_prefix("https://")
        .or_else(|| scope.strip_prefix("http://"))?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Refuses a Microsoft scope list that spans two resources before it reaches the provider.
pub fn check_single_resource(kind: ProviderKind, scopes: &[String]) -> Result<(), ProviderError> {
    if kind != ProviderKind::Microsoft {
        return Ok(());
    }
    let mut first: Option<&str> = None;
    for s in scopes {
        if let Some(r) = resource_of(s) {
            match first {
                None => first = Some(r),
                Some(f) if !f.eq_ignore_ascii_case(r) => {
                    return Err(ProviderError::new(
                        ErrorClass::InvalidRequest,
                        "multiple_resources",
                        format!(
                            "the scopes span two resources ({f} and {r}); Microsoft issues a token for one resource at a time"
                        ),
                        "request the scopes of each resource in separate token requests",
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn microsoft_delegated_scopes_follow_purposes_and_ask_for_offline_access() {
        let got = scopes_for(
            ProviderKind::Microsoft,
            GrantType::DelegatedDeviceCode,
            &[MailPurpose::Send],
            &[],
        )
        .unwrap();
        assert_eq!(got, s(&[MS_SMTP_SEND, MS_OFFLINE_ACCESS]));
        let got = scopes_for(
            ProviderKind::Microsoft,
            GrantType::DelegatedAuthCode,
            &[
                MailPurpose::Imap,
                MailPurpose::Send,
                MailPurpose::Pop,
                MailPurpose::Send,
            ],
            &[],
        )
        .unwrap();
        assert_eq!(got, s(&[MS_SMTP_SEND, MS_POP, MS_IMAP, MS_OFFLINE_ACCESS]));
        check_single_resource(ProviderKind::Microsoft, &got).unwrap();
        let e = scopes_for(
            ProviderKind::Microsoft,
            GrantType::DelegatedAuthCode,
            &[],
            &[],
        )
        .unwrap_err();
        assert!(e.reason.contains("purposes"), "{e}");
    }

    #[test]
    fn microsoft_app_only_uses_default_scope() {
        let got = scopes_for(
            ProviderKind::Microsoft,
            GrantType::AppOnly,
            &[MailPurpose::Send, MailPurpose::Pop],
            &[],
        )
        .unwrap();
        assert_eq!(got, s(&[MS_APP_ONLY]));
        assert!(
            scopes_for(
                ProviderKind::Microsoft,
                GrantType::ServiceAccount,
                &[MailPurpose::Send],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn google_uses_the_mail_scope_and_refuses_device_code() {
        for g in [GrantType::DelegatedAuthCode, GrantType::ServiceAccount] {
            assert_eq!(
                scopes_for(ProviderKind::Google, g, &[MailPurpose::Send], &[]).unwrap(),
                s(&[GOOGLE_MAIL])
            );
        }
        let e = scopes_for(
            ProviderKind::Google,
            GrantType::DelegatedDeviceCode,
            &[MailPurpose::Send],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        assert!(
            e.reason
                .contains("Google does not allow the device code flow"),
            "{e}"
        );
        assert!(
            e.fix.contains("delegated_auth_code") && e.fix.contains("service_account"),
            "{e}"
        );
        assert!(
            scopes_for(
                ProviderKind::Google,
                GrantType::AppOnly,
                &[MailPurpose::Send],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn generic_uses_configured_scopes() {
        let conf = s(&["mail.send", "offline"]);
        assert_eq!(
            scopes_for(
                ProviderKind::Generic,
                GrantType::DelegatedAuthCode,
                &[],
                &conf
            )
            .unwrap(),
            conf
        );
        assert!(
            scopes_for(
                ProviderKind::Generic,
                GrantType::DelegatedAuthCode,
                &[],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn graph_tokens_use_the_graph_resource_and_only_microsoft_has_it() {
        let delegated = scopes_for_resource(
            ProviderKind::Microsoft,
            GrantType::DelegatedDeviceCode,
            &[MailPurpose::Send],
            &[],
            TokenResource::MicrosoftGraph,
        )
        .unwrap();
        assert_eq!(delegated, s(&[MS_GRAPH_MAIL_SEND, MS_OFFLINE_ACCESS]));
        check_single_resource(ProviderKind::Microsoft, &delegated).unwrap();
        let app = scopes_for_resource(
            ProviderKind::Microsoft,
            GrantType::AppOnly,
            &[MailPurpose::Send],
            &[],
            TokenResource::MicrosoftGraph,
        )
        .unwrap();
        assert_eq!(app, s(&[MS_GRAPH_APP_ONLY]));
        // The mail protocols keep the Exchange Online scopes.
        assert_eq!(
            scopes_for_resource(
                ProviderKind::Microsoft,
                GrantType::AppOnly,
                &[MailPurpose::Send],
                &[],
                TokenResource::MailProtocols,
            )
            .unwrap(),
            s(&[MS_APP_ONLY])
        );
        let e = scopes_for_resource(
            ProviderKind::Google,
            GrantType::DelegatedAuthCode,
            &[MailPurpose::Send],
            &[],
            TokenResource::MicrosoftGraph,
        )
        .unwrap_err();
        assert!(
            e.reason
                .contains("Microsoft Graph needs a Microsoft provider"),
            "{e}"
        );
        for r in TokenResource::ALL {
            assert_eq!(TokenResource::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn two_resources_are_refused() {
        let e = check_single_resource(
            ProviderKind::Microsoft,
            &s(&[
                MS_SMTP_SEND,
                "https://graph.microsoft.com/Mail.Send",
                MS_OFFLINE_ACCESS,
            ]),
        )
        .unwrap_err();
        assert_eq!(e.code, "multiple_resources");
        check_single_resource(ProviderKind::Microsoft, &s(&[MS_APP_ONLY])).unwrap();
        check_single_resource(ProviderKind::Generic, &s(&["https://a/x", "https://b/y"])).unwrap();
    }
}
