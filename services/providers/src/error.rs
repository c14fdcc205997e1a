//! Errors of provider calls, classified by what has to happen next.
//!
//! The classification branches on the OAuth `error` and on Microsoft's numeric `error_codes`
//! (AADSTS…), never on `error_description`: the descriptions are prose that Microsoft and Google
//! reword without notice. The description is kept only to show it to a person.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::TokenStatus;

/// Placeholder in [`ProviderError::fix`] for the mailbox name; replace it with
/// [`ProviderError::for_mailbox`].
pub const MAILBOX_PLACEHOLDER: &str = "<mailbox>";

/// What kind of failure a provider call met, which decides what the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The grant (refresh token, consent) is dead: a person must consent again
    /// (token status `REAUTH_REQUIRED`).
    GrantDead,
    /// The app registration or provider settings are wrong (secret wrong or expired, public client
    /// flows off, client unknown, missing admin consent or delegation): an administrator must fix
    /// the app; consenting again does not help.
    AppMisconfigured,
    /// Network trouble, timeouts, HTTP 5xx or 429: retry later (honour
    /// [`ProviderError::retry_after`]); the grant is still good.
    Transient,
    /// Device code flow: the person has not finished signing in yet.
    Pending,
    /// Device code flow: polling too fast; add 5 s to the interval.
    SlowDown,
    /// The person declined the consent.
    Declined,
    /// The consent attempt (device code, authorization code) expired; start it again.
    Expired,
    /// The request itself is wrong (bad input, unsupported flow, state mismatch, provider said
    /// `invalid_request`/`invalid_scope`/`unsupported_grant_type`).
    InvalidRequest,
}

impl ErrorClass {
    /// The name used in logs and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GrantDead => "grant_dead",
            Self::AppMisconfigured => "app_misconfigured",
            Self::Transient => "transient",
            Self::Pending => "pending",
            Self::SlowDown => "slow_down",
            Self::Declined => "declined",
            Self::Expired => "expired",
            Self::InvalidRequest => "invalid_request",
        }
    }

    /// Whether retrying the same request later may succeed without anyone changing anything.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Transient | Self::Pending | Self::SlowDown)
    }

    /// The token status a failed *refresh* of this class leads to: `REAUTH_REQUIRED` when the
    /// grant is dead, `REFRESH_FAILING` otherwise (the grant may still be good; the last access
    /// token may still be valid).
    pub fn refresh_status(self) -> TokenStatus {
        match self {
            Self::GrantDead | Self::Declined | Self::Expired => TokenStatus::ReauthRequired,
            _ => TokenStatus::RefreshFailing,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which call failed; the same OAuth error means different things in different calls
/// (`invalid_grant` kills a refresh token but only spoils one authorization code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Device authorization request (`/devicecode`).
    DeviceStart,
    /// One poll of the token endpoint with a device code.
    DevicePoll,
    /// Authorization code redemption.
    CodeExchange,
    /// Refresh token redemption.
    Refresh,
    /// Client credentials (app-only).
    ClientCredentials,
    /// JWT bearer (Google service account).
    JwtBearer,
    /// Token revocation (RFC 7009).
    Revoke,
    /// Parsing what a person pasted (code or redirect URL).
    PastedCode,
}

impl Operation {
    fn describe(self) -> &'static str {
        match self {
            Self::DeviceStart => "starting the device code sign-in",
            Self::DevicePoll => "polling the device code sign-in",
            Self::CodeExchange => "redeeming the authorization code",
            Self::Refresh => "refreshing the token",
            Self::ClientCredentials => "getting an app-only token",
            Self::JwtBearer => "getting a service-account token",
            Self::Revoke => "revoking the token",
            Self::PastedCode => "reading the pasted code",
        }
    }
}

/// A failed provider call: what happened in plain words and what fixes it. Never holds secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} [{code}]. Fix: {fix}")]
pub struct ProviderError {
    /// What happens next.
    pub class: ErrorClass,
    /// Machine-readable code: `AADSTS700082` when Microsoft sent a numeric code, else the OAuth
    /// `error` (`invalid_grant`), else a tokenfleet code (`network`, `http_503`, `state_mismatch`).
    pub code: String,
    /// What went wrong, in plain words.
    pub reason: String,
    /// What to do about it. May contain [`MAILBOX_PLACEHOLDER`]; see [`ProviderError::for_mailbox`].
    pub fix: String,
    /// How long to wait before retrying (from `Retry-After`, or the flow's own rules).
    pub retry_after: Option<Duration>,
    /// HTTP status of the provider's answer, when there was one.
    pub http_status: Option<u16>,
    /// The provider's `Date` header, for clock-skew checks.
    pub server_date: Option<OffsetDateTime>,
    /// What the provider said, when it sent an OAuth error body (boxed: errors travel in
    /// `Result`s and should stay small).
    pub diagnostics: Option<Box<ProviderDiagnostics>>,
}

/// The provider's own words about an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderDiagnostics {
    /// The OAuth `error` value.
    pub oauth_error: Option<String>,
    /// The provider's description (shown to people; never branched on).
    pub provider_message: Option<String>,
    /// Microsoft `trace_id`, for support cases.
    pub trace_id: Option<String>,
    /// Microsoft `correlation_id`, for support cases.
    pub correlation_id: Option<String>,
}

impl ProviderError {
    /// An error with the given class, code, reason and fix and nothing else.
    pub fn new(
        class: ErrorClass,
        code: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            class,
            code: code.into(),
            reason: reason.into(),
            fix: fix.into(),
            retry_after: None,
            http_status: None,
            server_date: None,
            diagnostics: None,
        }
    }

    /// The OAuth `error` the provider sent (`invalid_grant`, …).
    pub fn oauth_error(&self) -> Option<&str> {
        self.diagnostics.as_ref()?.oauth_error.as_deref()
    }

    /// The provider's description of the error (for people; never branch on it).
    pub fn provider_message(&self) -> Option<&str> {
        self.diagnostics.as_ref()?.provider_message.as_deref()
    }

    /// Microsoft's `trace_id`.
    pub fn trace_id(&self) -> Option<&str> {
        self.diagnostics.as_ref()?.trace_id.as_deref()
    }

    /// Microsoft's `correlation_id`.
    pub fn correlation_id(&self) -> Option<&str> {
        self.diagnostics.as_ref()?.correlation_id.as_deref()
    }

    /// Fills the mailbox name into the fix (`tokenfleetctl mailbox consent <mailbox>`).
    #[must_use]
    pub fn for_mailbox(mut self, mailbox: &str) -> Self {
        self.fix = self.fix.replace(MAILBOX_PLACEHOLDER, mailbox);
        self
    }

    /// The fix with the mailbox name filled in, leaving `self` as it is.
    pub fn fix_for(&self, mailbox: &str) -> String {
        self.fix.replace(MAILBOX_PLACEHOLDER, mailbox)
    }

    /// Whether the grant is dead and a person must consent again.
    pub fn needs_consent(&self) -> bool {
        self.class == ErrorClass::GrantDead
    }

    /// A domain [`tokenfleet_domain::TokenError`] for the mailbox's status record.
    pub fn to_token_error(
        &self,
        mailbox: &str,
        time: OffsetDateTime,
    ) -> tokenfleet_domain::TokenError {
        let mut reason = self.reason.clone();
        if let Some(message) = self.provider_message() {
            reason.push_str(" (provider said: ");
            reason.push_str(message);
            reason.push(')');
        }
        tokenfleet_domain::TokenError {
            code: self.code.clone(),
            reason,
            fix: self.fix_for(mailbox),
            time,
        }
    }

    pub(crate) fn with_status(mut self, status: Option<u16>) -> Self {
        self.http_status = status;
        self
    }
}

/// An OAuth error body as Microsoft and Google send it (RFC 6749 §5.2 plus Microsoft's fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OAuthErrorBody {
    /// RFC 6749 error code (`invalid_grant`, `authorization_pending`, …).
    pub error: String,
    /// Human-readable text (Microsoft: starts with `AADSTS<code>:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    /// Microsoft's numeric AADSTS codes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_codes: Vec<u64>,
    /// Microsoft request trace id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Microsoft correlation id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Microsoft timestamp of the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Link to documentation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_uri: Option<String>,
}

impl fmt::Display for OAuthErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        for code in &self.error_codes {
            write!(f, " AADSTS{code}")?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for OAuthErrorBody {}

const CONSENT_FIX: &str = "run `tokenfleetctl mailbox consent <mailbox>` so the mailbox owner signs in and consents again";
const RETRY_FIX: &str = "nothing to do if it passes; tokenfleet retries with backoff. If it persists, check the provider's service status";

/// Classifies an OAuth error answer of the token (or device authorization, or revocation)
/// endpoint. `status` is the HTTP status.
pub fn classify(op: Operation, status: Option<u16>, body: &OAuthErrorBody) -> ProviderError {
    let mut err = classify_inner(op, status, body);
    err.diagnostics = Some(Box::new(ProviderDiagnostics {
        oauth_error: (!body.error.is_empty()).then(|| body.error.clone()),
        provider_message: body.error_description.clone(),
        trace_id: body.trace_id.clone(),
        correlation_id: body.correlation_id.clone(),
    }));
    err.http_status = status;
    err
}

fn classify_inner(op: Operation, status: Option<u16>, body: &OAuthErrorBody) -> ProviderError {
    use ErrorClass::*;
    let error = body.error.as_str();
    // Microsoft's numeric codes are more specific than `error`; the first one we know wins.
    for &n in &body.error_codes {
        if let Some(e) = classify_aadsts(op, n) {
            return e;
        }
    }
    let aad_code = body.error_codes.first().map(|n| format!("AADSTS{n}"));
    let code = aad_code.clone().unwrap_or_else(|| error.to_owned());

    // 5xx and 429 are transient whatever the body says.
    if let Some(s) = status
        && (s >= 500 || s == 429)
    {
        return transient_http(s, code);
    }

    match (op, error) {
        (_, "temporarily_unavailable" | "server_error") => ProviderError::new(
            Transient,
            code,
            format!(
                "the provider reported a temporary problem ({error}) while {}",
                op.describe()
            ),
            RETRY_FIX,
        ),
        (_, "authorization_pending") => ProviderError::new(
            Pending,
            code,
            "the person has not finished signing in yet",
            "keep polling at the given interval",
        ),
        (_, "slow_down") => ProviderError::new(
            SlowDown,
            code,
            "the provider asked to poll more slowly",
            "add 5 seconds to the polling interval for this and all later polls",
        ),
        (_, "authorization_declined" | "access_denied") => ProviderError::new(
            Declined,
            code,
            "the person declined the sign-in or the consent",
            "start the consent again with `tokenfleetctl mailbox consent <mailbox>` and accept the requested permissions",
        ),
        (_, "expired_token") => ProviderError::new(
            Expired,
            code,
            "the sign-in code expired before the person finished signing in",
            "start the consent again with `tokenfleetctl mailbox consent <mailbox>` and complete it within the time shown",
        ),
        (_, "bad_verification_code") => ProviderError::new(
            Expired,
            code,
            "the provider does not recognise the device code (it expired or belongs to another app)",
            "start the consent again with `tokenfleetctl mailbox consent <mailbox>`",
        ),
        (_, "interaction_required" | "consent_required" | "login_required") => ProviderError::new(
            GrantDead,
            code,
            "the provider requires the person to sign in interactively again (multi-factor authentication, Conditional Access or missing consent)",
            CONSENT_FIX,
        ),
        (Operation::Refresh, "invalid_grant") => {
            google_or_generic_dead_grant(code, aad_code.is_some())
        }
        (Operation::CodeExchange, "invalid_grant") => ProviderError::new(
            Expired,
            code,
            "the authorization code was rejected: it expired, was already used, or the PKCE verifier or redirect URI does not match the ones of this consent attempt",
            "start the consent again with `tokenfleetctl mailbox consent <mailbox>` and paste the new code promptly",
        ),
        (Operation::DevicePoll, "invalid_grant") => ProviderError::new(
            Expired,
            code,
            "the provider rejected the device code",
            "start the consent again with `tokenfleetctl mailbox consent <mailbox>`",
        ),
        (Operation::JwtBearer, "invalid_grant") => ProviderError::new(
            AppMisconfigured,
            code,
            "the provider rejected the service-account assertion: the key may have been deleted or rotated, the broker's clock may be wrong, or the mailbox does not exist in the Workspace domain",
            "check that the service-account key uploaded to the provider is current, that the broker's clock is correct, and that the mailbox address exists",
        ),
        (Operation::JwtBearer, "unauthorized_client") => ProviderError::new(
            AppMisconfigured,
            code,
            "the service account is not allowed to act for this mailbox with these scopes (domain-wide delegation missing)",
            "in the Google Admin console → Security → Access and data control → API controls → Domain-wide delegation, authorize the service account's client id for https://mail.google.com/",
        ),
        (Operation::ClientCredentials, "invalid_grant" | "unauthorized_client") => {
            ProviderError::new(
                AppMisconfigured,
                code,
                "the app is not allowed to get app-only tokens (application permission or admin consent missing)",
                "grant the app the application permissions for mail (SMTP.SendAsApp, POP.AccessAsApp, IMAP.AccessAsApp on Office 365 Exchange Online) and grant admin consent",
            )
        }
        (_, "invalid_client") => ProviderError::new(
            AppMisconfigured,
            code,
            "the provider rejected the app's credentials (client id unknown, or client secret wrong or expired)",
            "check the provider's client id and client secret (`tokenfleetctl provider update`); create a new secret in the app registration if it expired",
        ),
        (_, "unauthorized_client") => ProviderError::new(
            AppMisconfigured,
            code,
            "the app registration is not allowed to use this sign-in flow",
            "enable the flow in the app registration (for device code on Microsoft: Authentication → Allow public client flows = Yes)",
        ),
        (_, "invalid_scope") => ProviderError::new(
            InvalidRequest,
            code,
            "the provider rejected the requested scopes",
            "check the provider's scopes and the app registration's API permissions",
        ),
        (_, "unsupported_grant_type" | "unsupported_response_type") => ProviderError::new(
            InvalidRequest,
            code,
            format!("the provider does not support this flow ({error})"),
            "choose another grant type for the mailbox or check the provider's endpoints",
        ),
        (Operation::Revoke, "unsupported_token_type") => ProviderError::new(
            InvalidRequest,
            code,
            "the provider cannot revoke this kind of token",
            "revoke the grant in the provider's admin console",
        ),
        _ => {
            if status == Some(401) || status == Some(403) {
                ProviderError::new(
                    AppMisconfigured,
                    code,
                    format!(
                        "the provider refused the request ({}) while {}",
                        if error.is_empty() {
                            "no error code"
                        } else {
                            error
                        },
                        op.describe()
                    ),
                    "check the provider's client id, client secret and endpoints",
                )
            } else {
                ProviderError::new(
                    InvalidRequest,
                    code,
                    format!(
                        "the provider rejected the request ({}) while {}",
                        if error.is_empty() {
                            "no error code"
                        } else {
                            error
                        },
                        op.describe()
                    ),
                    "check the provider settings; if they are right, report this with the trace id",
                )
            }
        }
    }
}

fn google_or_generic_dead_grant(code: String, microsoft: bool) -> ProviderError {
    let reason = if microsoft {
        "the refresh token is no longer valid (expired, revoked, or the password changed)"
    } else {
        "the refresh token has expired or been revoked. With Google this happens when the OAuth app is in \
         \"Testing\" publishing status (refresh tokens die after 7 days), after 6 months without use, when the \
         password changes, when the person or an admin revokes access, or when more than about 100 \
         refresh tokens exist for the account and app"
    };
    ProviderError::new(ErrorClass::GrantDead, code, reason, CONSENT_FIX)
}

/// Known AADSTS codes. `None` = not one we treat specially; fall back to `error`.
fn classify_aadsts(op: Operation, n: u64) -> Option<ProviderError> {
    use ErrorClass::*;
    let code = format!("AADSTS{n}");
    let dead = |reason: &str| {
        Some(ProviderError::new(
            GrantDead,
            code.clone(),
            reason,
            CONSENT_FIX,
        ))
    };
    let app = |reason: &str, fix: &str| {
        Some(ProviderError::new(
            AppMisconfigured,
            code.clone(),
            reason,
            fix,
        ))
    };
    match n {
        70008 => dead("the refresh token or authorization code expired (it was issued too long ago or the session was revoked)"),
        700082 => dead("the refresh token expired after 90 days without use"),
        50173 => dead("the grant was revoked (the password was changed or an admin revoked the sessions)"),
        65001 if op == Operation::ClientCredentials => app(
            "the app has no admin consent for the requested application permissions",
            "grant admin consent for the app in the Entra admin center (Enterprise applications → the app → Permissions)",
        ),
        65001 => dead("the mailbox owner (or an admin) has not consented to the app's permissions, or the consent was withdrawn"),
        50076 | 50079 => dead("multi-factor authentication is now required for this account; the stored grant cannot satisfy it"),
        70043 => dead("a Conditional Access sign-in frequency policy ended the session"),
        50057 => dead("the user account is disabled"),
        53003 => dead("a Conditional Access policy blocked the sign-in"),
        50078 => dead("the multi-factor authentication of the grant expired"),
        7000215 => app(
            "the client secret is wrong (it does not match any secret of the app registration; maybe the secret id was entered instead of its value)",
            "create a client secret in the app registration (Certificates & secrets) and store its value with `tokenfleetctl provider update`",
        ),
        7000222 => app(
            "the client secret has expired",
            "create a new client secret in the app registration (Certificates & secrets) and store it with `tokenfleetctl provider update`",
        ),
        7000218 => app(
            "the app registration does not allow public client flows, which the device code flow needs",
            "in the Entra admin center → App registrations → the app → Authentication, set \"Allow public client flows\" to Yes (or store a client secret for the provider)",
        ),
        700016 => app(
            "the client id is not known in this tenant (wrong client id or authority, or the app was deleted)",
            "check the provider's client id and authority",
        ),
        7000112 => app("the app is disabled in the tenant", "enable the app (Enterprise applications → the app → Properties)"),
        90002 => app("the tenant named in the authority does not exist", "check the provider's authority (tenant id or domain)"),
        50011 => app(
            "the redirect URI does not match one registered for the app",
            "add the broker's callback URL as a redirect URI in the app registration (Authentication)",
        ),
        500011 => app(
            "the resource (Office 365 Exchange Online) has no service principal in the tenant",
            "make sure the tenant has Exchange Online, and for app-only access register the service principal (`New-ServicePrincipal`)",
        ),
        700022 | 70011 => Some(ProviderError::new(
            InvalidRequest,
            code.clone(),
            "the requested scopes are invalid (for example they span two resources)",
            "request scopes of one resource per token",
        )),
        700025 => app(
            "the app is a public client but a client secret was sent",
            "remove the client secret from the provider, or turn the app into a confidential client",
        ),
        50196 => Some(ProviderError::new(
            if op == Operation::DevicePoll { SlowDown } else { Transient },
            code.clone(),
            "the provider detected a request loop (too many identical requests in a short time)",
            "wait and poll more slowly",
        ).with_retry(Duration::from_secs(60))),
        90033 | 90006 => Some(ProviderError::new(
            Transient,
            code.clone(),
            "the provider reported a temporary internal error",
            RETRY_FIX,
        )),
        _ => None,
    }
}

impl ProviderError {
    pub(crate) fn with_retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

fn transient_http(status: u16, code: String) -> ProviderError {
    let (reason, code) = if status == 429 {
        (
            "the provider is throttling requests (HTTP 429)".to_owned(),
            if code.is_empty() {
                "http_429".to_owned()
            } else {
                code
            },
        )
    } else {
        (
            format!("the provider is unavailable (HTTP {status})"),
            if code.is_empty() {
                format!("http_{status}")
            } else {
                code
            },
        )
    };
    ProviderError::new(ErrorClass::Transient, code, reason, RETRY_FIX).with_status(Some(status))
}

/// Classifies an answer that is not an OAuth error body (empty, HTML from a proxy, wrong content
/// type). `status` is the HTTP status.
pub(crate) fn classify_unparsable(
    op: Operation,
    status: u16,
    endpoint_host: &str,
) -> ProviderError {
    if status >= 500 || status == 429 {
        return transient_http(status, String::new());
    }
    let (class, reason, fix) = match status {
        200..=299 => (
            ErrorClass::Transient,
            format!(
                "{endpoint_host} answered HTTP {status} while {} but not with a valid OAuth response (a proxy or captive portal in the way?)",
                op.describe()
            ),
            "check the HTTP proxy and the provider's endpoint URLs".to_owned(),
        ),
        404 | 405 => (
            ErrorClass::AppMisconfigured,
            format!(
                "{endpoint_host} answered HTTP {status} while {}: the endpoint URL is wrong",
                op.describe()
            ),
            "check the provider's authority and endpoint overrides".to_owned(),
        ),
        401 | 403 => (
            ErrorClass::AppMisconfigured,
            format!(
                "{endpoint_host} refused the request (HTTP {status}) while {}",
                op.describe()
            ),
            "check the provider's client id, client secret, endpoints and HTTP proxy".to_owned(),
        ),
        _ => (
            ErrorClass::InvalidRequest,
            format!(
                "{endpoint_host} answered HTTP {status} without an OAuth error while {}",
                op.describe()
            ),
            "check the provider's endpoint URLs and HTTP proxy".to_owned(),
        ),
    };
    ProviderError::new(class, format!("http_{status}"), reason, fix).with_status(Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(error: &str, code: u64) -> OAuthErrorBody {
        OAuthErrorBody {
            error: error.into(),
            error_description: Some(format!("AADSTS{code}: something")),
            error_codes: vec![code],
            trace_id: Some("t".into()),
            correlation_id: Some("c".into()),
            ..Default::default()
        }
    }

    fn plain(error: &str) -> OAuthErrorBody {
        OAuthErrorBody {
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn microsoft_codes_are_classified_by_number() {
        use ErrorClass::*;
        let table: &[(&str, u64, Operation, ErrorClass)] = &[
            ("invalid_grant", 70008, Operation::Refresh, GrantDead),
            ("invalid_grant", 700082, Operation::Refresh, GrantDead),
            ("invalid_grant", 50173, Operation::Refresh, GrantDead),
            ("invalid_grant", 65001, Operation::Refresh, GrantDead),
            (
                "invalid_grant",
                65001,
                Operation::ClientCredentials,
                AppMisconfigured,
            ),
            ("interaction_required", 50076, Operation::Refresh, GrantDead),
            ("interaction_required", 50079, Operation::Refresh, GrantDead),
            ("invalid_grant", 70043, Operation::Refresh, GrantDead),
            ("invalid_grant", 50057, Operation::Refresh, GrantDead),
            ("invalid_grant", 53003, Operation::Refresh, GrantDead),
            (
                "invalid_client",
                7000215,
                Operation::ClientCredentials,
                AppMisconfigured,
            ),
            (
                "invalid_client",
                7000215,
                Operation::Refresh,
                AppMisconfigured,
            ),
            (
                "invalid_client",
                7000222,
                Operation::Refresh,
                AppMisconfigured,
            ),
            (
                "invalid_client",
                7000218,
                Operation::DevicePoll,
                AppMisconfigured,
            ),
            (
                "unauthorized_client",
                700016,
                Operation::DeviceStart,
                AppMisconfigured,
            ),
            (
                "invalid_request",
                700022,
                Operation::Refresh,
                InvalidRequest,
            ),
            ("invalid_grant", 50196, Operation::DevicePoll, SlowDown),
            (
                "authorization_pending",
                70016,
                Operation::DevicePoll,
                Pending,
            ),
            ("expired_token", 70019, Operation::DevicePoll, Expired),
            (
                "authorization_declined",
                70020,
                Operation::DevicePoll,
                Declined,
            ),
            // Unknown code: falls back to `error`.
            ("invalid_grant", 9_999_999, Operation::Refresh, GrantDead),
            (
                "invalid_client",
                9_999_999,
                Operation::Refresh,
                AppMisconfigured,
            ),
        ];
        for &(error, code, op, class) in table {
            let e = classify(op, Some(400), &ms(error, code));
            assert_eq!(e.class, class, "{error} AADSTS{code} in {op:?}: {e}");
            assert_eq!(e.code, format!("AADSTS{code}"));
            assert_eq!(e.oauth_error(), Some(error));
            assert_eq!(e.trace_id(), Some("t"));
        }
    }

    #[test]
    fn the_90_day_inactivity_is_explained() {
        let e = classify(Operation::Refresh, Some(400), &ms("invalid_grant", 700082));
        assert!(e.reason.contains("90 days without use"), "{e}");
        assert!(
            e.fix.contains("tokenfleetctl mailbox consent <mailbox>"),
            "{e}"
        );
        let e = e.for_mailbox("scan-2nd-floor");
        assert!(
            e.fix
                .contains("tokenfleetctl mailbox consent scan-2nd-floor"),
            "{e}"
        );
        assert_eq!(e.class.refresh_status(), TokenStatus::ReauthRequired);
    }

    #[test]
    fn wrong_secret_is_an_app_problem_not_a_network_problem() {
        let e = classify(
            Operation::ClientCredentials,
            Some(401),
            &ms("invalid_client", 7000215),
        );
        assert_eq!(e.class, ErrorClass::AppMisconfigured);
        assert!(e.reason.contains("client secret is wrong"), "{e}");
        assert!(!e.to_string().to_lowercase().contains("network"), "{e}");
        assert_eq!(e.class.refresh_status(), TokenStatus::RefreshFailing);
    }

    #[test]
    fn description_is_never_branched_on() {
        // Same error and codes, different prose → same class.
        let mut a = ms("invalid_grant", 700082);
        let mut b = a.clone();
        a.error_description = Some("AADSTS700082: expired".into());
        b.error_description = Some("network timeout please retry".into());
        assert_eq!(
            classify(Operation::Refresh, Some(400), &a).class,
            classify(Operation::Refresh, Some(400), &b).class
        );
    }

    #[test]
    fn google_invalid_grant_explains_the_causes() {
        let mut body = plain("invalid_grant");
        body.error_description = Some("Token has been expired or revoked.".into());
        let e = classify(Operation::Refresh, Some(400), &body);
        assert_eq!(e.class, ErrorClass::GrantDead);
        assert_eq!(e.code, "invalid_grant");
        for needle in [
            "7 days", "Testing", "6 months", "password", "revokes", "100",
        ] {
            assert!(e.reason.contains(needle), "missing {needle}: {e}");
        }
        assert_eq!(
            e.provider_message(),
            Some("Token has been expired or revoked.")
        );
    }

    #[test]
    fn operation_changes_the_meaning_of_invalid_grant() {
        let body = plain("invalid_grant");
        assert_eq!(
            classify(Operation::Refresh, Some(400), &body).class,
            ErrorClass::GrantDead
        );
        assert_eq!(
            classify(Operation::CodeExchange, Some(400), &body).class,
            ErrorClass::Expired
        );
        assert_eq!(
            classify(Operation::JwtBearer, Some(400), &body).class,
            ErrorClass::AppMisconfigured
        );
        assert_eq!(
            classify(
                Operation::JwtBearer,
                Some(401),
                &plain("unauthorized_client")
            )
            .class,
            ErrorClass::AppMisconfigured
        );
    }

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for status in [500, 502, 503, 504, 429] {
            let e = classify(Operation::Refresh, Some(status), &plain("invalid_grant"));
            assert_eq!(e.class, ErrorClass::Transient, "{status}");
            assert_eq!(e.http_status, Some(status));
        }
        let e = classify(
            Operation::Refresh,
            Some(400),
            &plain("temporarily_unavailable"),
        );
        assert_eq!(e.class, ErrorClass::Transient);
        let e = classify_unparsable(Operation::Refresh, 503, "login.example");
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::Transient, "http_503")
        );
        let e = classify_unparsable(Operation::Refresh, 404, "login.example");
        assert_eq!(e.class, ErrorClass::AppMisconfigured);
    }

    #[test]
    fn device_flow_errors() {
        use ErrorClass::*;
        for (error, class) in [
            ("authorization_pending", Pending),
            ("slow_down", SlowDown),
            ("authorization_declined", Declined),
            ("access_denied", Declined),
            ("expired_token", Expired),
            ("bad_verification_code", Expired),
            ("interaction_required", GrantDead),
            ("invalid_request", InvalidRequest),
            ("invalid_scope", InvalidRequest),
            ("unsupported_grant_type", InvalidRequest),
        ] {
            assert_eq!(
                classify(Operation::DevicePoll, Some(400), &plain(error)).class,
                class,
                "{error}"
            );
        }
    }

    #[test]
    fn token_error_carries_reason_fix_and_provider_text() {
        let e = classify(Operation::Refresh, Some(400), &ms("invalid_grant", 50173));
        let t = e.to_token_error("front-desk", OffsetDateTime::UNIX_EPOCH);
        assert_eq!(t.code, "AADSTS50173");
        assert!(t.reason.contains("AADSTS50173: something"));
        assert!(t.fix.contains("consent front-desk"));
    }
}
