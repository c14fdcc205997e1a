//! OAuth 2.0 clients for the identity providers tokenfleet gets mail tokens from: Microsoft Entra
//! ID, Google, and generic OAuth servers.
//!
//! - [`ProviderSettings`]: a provider record resolved into endpoints (defaults per kind, overrides
//!   win), credentials and HTTP options (proxy, extra trusted CAs, timeout).
//! - [`scopes_for`]: which scopes a mailbox needs, per kind, grant type and purposes;
//!   [`scopes_for_resource`] per [`TokenResource`] (Exchange Online mail protocols or Graph).
//! - [`ProviderClient`]: device code (start + one poll; the caller schedules polls with
//!   [`next_poll_interval`]), authorization code + PKCE ([`ProviderClient::authorization_url`],
//!   [`parse_pasted_code`], [`ProviderClient::exchange_code`]), refresh, client credentials, Google
//!   service accounts (JWT bearer), revocation.
//! - [`signed_in_account`]: who signed in at a delegated consent, from the ID token
//!   ([`identity_scopes`] make the provider send one).
//! - [`ProviderError`]: every failure classified ([`ErrorClass`]) from the OAuth `error` and
//!   Microsoft's AADSTS codes, with a reason and a fix in plain words, `Retry-After` and the
//!   provider's `Date` (see [`skew`]).
//!
//! Secrets (tokens, client secret, device code, PKCE verifier, private key) travel only in
//! [`tokenfleet_seal::Secret`] and never appear in errors, `Debug` output or logs. HTTP goes
//! through reqwest with rustls (ring), no redirects.
//!
//! Dependency direction: depends on `tokenfleet-domain` and `tokenfleet-seal` only (no store, no
//! tonic); the broker depends on this crate.

mod client;
mod error;
mod http;
mod id_token;
mod jwt;
mod pasted;
mod scopes;
mod settings;

pub use client::{
    AuthorizationUrl, DEVICE_CODE_GRANT, DeviceAuthorization, DevicePoll, ProviderClient,
    SKEW_REPORT_THRESHOLD, SLOW_DOWN_STEP, TokenGrant, new_state, next_poll_interval, skew,
};
pub use error::{
    ErrorClass, MAILBOX_PLACEHOLDER, OAuthErrorBody, Operation, ProviderDiagnostics, ProviderError,
    classify,
};
pub use http::TransportError;
pub use id_token::{
    GOOGLE_IDENTITY_SCOPES, MICROSOFT_IDENTITY_SCOPES, SignedInAccount, identity_scopes,
    signed_in_account,
};
pub use jwt::{JWT_BEARER_GRANT, MAX_ASSERTION_LIFETIME, ServiceAccountKey};
pub use pasted::parse_pasted_code;
pub use scopes::{
    GOOGLE_MAIL, MS_APP_ONLY, MS_GRAPH_APP_ONLY, MS_GRAPH_MAIL_SEND, MS_IMAP, MS_OFFLINE_ACCESS,
    MS_POP, MS_SMTP_SEND, TokenResource, check_single_resource, google_device_code_refused,
    scopes_for, scopes_for_resource,
};
pub use settings::{
    DEFAULT_TIMEOUT, Endpoints, GOOGLE_AUTHORIZE_URL, GOOGLE_REVOKE_URL, GOOGLE_TOKEN_URL,
    MICROSOFT_DEFAULT_AUTHORITY, MICROSOFT_LOGIN_HOST, ProviderSettings,
};
