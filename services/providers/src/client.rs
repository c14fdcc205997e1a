//! [`ProviderClient`]: one app registration's OAuth calls.
//!
//! The `oauth2` crate builds the authorization URL (PKCE S256) and runs the device authorization,
//! code redemption, refresh and client-credentials requests, through [`crate::http::Exchange`] so
//! that the HTTP status, `Date` and `Retry-After` survive and Microsoft's error body
//! ([`OAuthErrorBody`]: `error_codes`, `trace_id`, `correlation_id`) is parsed whole. Three calls
//! are made by hand:
//! - one device-code poll: the crate only offers a loop that polls until done, and the broker must
//!   schedule each poll itself (one replica at a time, surviving restarts);
//! - the JWT bearer grant (RFC 7523): the crate has no helper for it;
//! - revocation (RFC 7009): the crate refuses non-`https` revocation URLs, which rules out the
//!   loopback test double; the settings allow `http` for loopback hosts only.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{BasicTokenIntrospectionResponse, BasicTokenType};
use oauth2::http;
use oauth2::url::{Url, form_urlencoded};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::{
    Clock, GrantType, MailPurpose, ProviderKind, SystemClock, ValidationError,
};
use tokenfleet_seal::Secret;

use crate::error::{
    ErrorClass, OAuthErrorBody, Operation, ProviderError, classify, classify_unparsable,
};
use crate::http::{Exchange, ResponseMeta, TransportError, build_client};
use crate::jwt::{JWT_BEARER_GRANT, ServiceAccountKey};
use crate::scopes::{check_single_resource, google_device_code_refused, scopes_for};
use crate::settings::{GOOGLE_TOKEN_URL, ProviderSettings};

/// `grant_type` of a device code poll (RFC 8628).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Seconds RFC 8628 adds to the polling interval on `slow_down`.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Clock skew worth reporting to an operator.
pub const SKEW_REPORT_THRESHOLD: Duration = Duration::from_secs(60);
/// Lifetime assumed when a token response has no `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// Token response fields beyond RFC 6749 that tokenfleet reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ExtraTokenFields {
    /// Google: remaining lifetime of the refresh token in seconds (apps in "Testing" publishing
    /// status get 7-day refresh tokens). A number or a numeric string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_in: Option<serde_json::Value>,
    /// OpenID Connect ID token (when `openid` was requested): who signed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}
impl oauth2::ExtraTokenFields for ExtraTokenFields {}

type TokenResponseBody = StandardTokenResponse<ExtraTokenFields, BasicTokenType>;

/// Seconds as a JSON number or numeric string (providers send both).
fn seconds(value: Option<&serde_json::Value>) -> Option<Duration> {
    match value? {
        serde_json::Value::Number(n) => n.as_u64().map(Duration::from_secs),
        serde_json::Value::String(s) => s.trim().parse().ok().map(Duration::from_secs),
        _ => None,
    }
}

type OAuthClient = oauth2::Client<
    OAuthErrorBody,
    TokenResponseBody,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    OAuthErrorBody,
    EndpointMaybeSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A granted token. `Debug` redacts the tokens.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// The access token.
    pub access_token: Secret,
    /// A new refresh token, if the provider sent one. `None` on a refresh means: keep the old one
    /// (RFC 6749 §6).
    pub refresh_token: Option<Secret>,
    /// Lifetime of the access token.
    pub expires_in: Duration,
    /// Remaining lifetime of the refresh token, when the provider says (Google's
    /// `refresh_token_expires_in`: apps in "Testing" publishing status get 7-day refresh tokens).
    pub refresh_token_expires_in: Option<Duration>,
    /// Granted scopes (space-separated), if the provider said.
    pub scope: Option<String>,
    /// The provider's `Date` header, for clock-skew checks (see [`skew`]).
    pub server_date: Option<OffsetDateTime>,
    /// The OpenID Connect ID token, when the request asked for `openid` (read it with
    /// [`crate::signed_in_account`]).
    pub id_token: Option<Secret>,
}

/// The start of a device code sign-in.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    /// Secret the broker polls with.
    pub device_code: Secret,
    /// Code the person types at [`DeviceAuthorization::verification_uri`].
    pub user_code: String,
    /// Where the person signs in.
    pub verification_uri: String,
    /// How long the codes are valid.
    pub expires_in: Duration,
    /// `expires_in` from now on the client's clock.
    pub expires_at: OffsetDateTime,
    /// Minimum time between polls.
    pub interval: Duration,
    /// Instructions to show the person (the provider's, or built from the fields above).
    pub message: String,
}

/// The outcome of one device code poll.
#[derive(Debug, Clone)]
pub enum DevicePoll {
    /// Not signed in yet; poll again after the interval.
    Pending,
    /// Polling too fast: add 5 s to the interval for this and every later poll
    /// (see [`next_poll_interval`]).
    SlowDown,
    /// Signed in and consented.
    Granted(Box<TokenGrant>),
    /// A transient failure (network, 5xx, 429): poll again after the interval, or after
    /// `retry_after` if longer. The sign-in is still in progress.
    Retry(ProviderError),
    /// The sign-in is over without a grant: declined, expired, or the app is misconfigured.
    Denied(ProviderError),
}

impl DevicePoll {
    /// Whether polling should stop.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Granted(_) | Self::Denied(_))
    }
}

/// The interval before the next poll: +5 s on `slow_down` (and it stays: the caller keeps the
/// returned value as its new `current`), at least `retry_after` on a transient failure.
pub fn next_poll_interval(current: Duration, poll: &DevicePoll) -> Duration {
    match poll {
        DevicePoll::SlowDown => current + SLOW_DOWN_STEP,
        DevicePoll::Retry(e) => e.retry_after.map_or(current, |r| r.max(current)),
        _ => current,
    }
}

/// How far the provider's clock is from ours (absolute), if the provider sent a `Date`. Report
/// values above [`SKEW_REPORT_THRESHOLD`]: assertions and token lifetimes depend on it.
pub fn skew(server_date: Option<OffsetDateTime>, now: OffsetDateTime) -> Option<Duration> {
    let d = server_date? - now;
    Some(d.unsigned_abs())
}

/// The browser step of the authorization code flow.
#[derive(Debug, Clone)]
pub struct AuthorizationUrl {
    /// Where to send the person.
    pub url: String,
    /// PKCE verifier to keep (sealed) until the code comes back.
    pub pkce_verifier: Secret,
}

/// Extra fields of Microsoft's device authorization answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DeviceExtra {
    #[serde(default)]
    message: Option<String>,
}
impl oauth2::ExtraDeviceAuthorizationFields for DeviceExtra {}

/// A token response as read by hand (device poll, JWT bearer).
#[derive(Deserialize)]
struct RawToken {
    access_token: Secret,
    #[serde(default)]
    refresh_token: Option<Secret>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token_expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    id_token: Option<Secret>,
}

/// OAuth calls for one app registration.
pub struct ProviderClient {
    settings: ProviderSettings,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ProviderClient {
    /// A client for these settings (builds the HTTP client: TLS roots, proxy, timeouts).
    pub fn new(settings: ProviderSettings) -> Result<Self, ValidationError> {
        let http = build_client(&settings)?;
        Ok(Self {
            settings,
            http,
            clock: Arc::new(SystemClock),
        })
    }

    /// Uses `clock` for assertion times and expiry instants.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The settings.
    pub fn settings(&self) -> &ProviderSettings {
        &self.settings
    }

    /// Scopes for a mailbox of this provider (see [`scopes_for`]).
    pub fn scopes_for(
        &self,
        grant_type: GrantType,
        purposes: &[MailPurpose],
    ) -> Result<Vec<String>, ProviderError> {
        scopes_for(
            self.settings.kind,
            grant_type,
            purposes,
            &self.settings.scopes,
        )
    }

    /// Scopes for a token of `resource` (see [`crate::scopes_for_resource`]).
    pub fn scopes_for_resource(
        &self,
        grant_type: GrantType,
        purposes: &[MailPurpose],
        resource: crate::TokenResource,
    ) -> Result<Vec<String>, ProviderError> {
        crate::scopes_for_resource(
            self.settings.kind,
            grant_type,
            purposes,
            &self.settings.scopes,
            resource,
        )
    }

    fn oauth(&self, with_secret: bool) -> Result<OAuthClient, ProviderError> {
        let e = &self.settings.endpoints;
        let bad = |what: &str, err: oauth2::url::ParseError| {
            ProviderError::new(
                ErrorClass::InvalidRequest,
                "invalid_settings",
                format!("{what} URL: {err}"),
                "fix the provider's endpoints",
            )
        };
        let mut client = oauth2::Client::new(ClientId::new(self.settings.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_auth_uri_option(e.authorize.as_ref().map(|u| AuthUrl::from_url(u.clone())))
            .set_device_authorization_url_option(
                e.device_code
                    .as_ref()
                    .map(|u| DeviceAuthorizationUrl::from_url(u.clone())),
            )
            .set_token_uri(TokenUrl::new(e.token.to_string()).map_err(|err| bad("token", err))?);
        if with_secret && let Some(secret) = &self.settings.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
        }
        Ok(client)
    }

    fn exchange(&self) -> Exchange<'_> {
        Exchange::new(&self.http, self.settings.timeout)
    }

    fn host(&self) -> String {
        self.settings
            .endpoints
            .token
            .host_str()
            .unwrap_or("the provider")
            .to_owned()
    }

    /// Maps a failed `oauth2` request.
    fn oauth_error(
        &self,
        op: Operation,
        err: RequestTokenError<TransportError, OAuthErrorBody>,
        meta: ResponseMeta,
        host: &str,
    ) -> ProviderError {
        let e = match err {
            RequestTokenError::Request(t) => {
                t.into_provider_error(self.settings.http_proxy.is_some())
            }
            RequestTokenError::ServerResponse(body) => classify(op, meta.status, &body),
            RequestTokenError::Parse(parse, _body) => {
                // The body may hold tokens and serde's message may quote it: name only the field.
                let mut e = classify_unparsable(op, meta.status.unwrap_or(200), host);
                if meta.status == Some(200) {
                    e.reason.push_str(&format!(" (field `{}`)", parse.path()));
                }
                e
            }
            RequestTokenError::Other(_) => {
                classify_unparsable(op, meta.status.unwrap_or(200), host)
            }
        };
        self.finish(op, e, &meta)
    }

    fn grant_from(resp: &TokenResponseBody, meta: &ResponseMeta) -> TokenGrant {
        TokenGrant {
            refresh_token_expires_in: seconds(
                resp.extra_fields().refresh_token_expires_in.as_ref(),
            ),
            access_token: Secret::new(resp.access_token().secret().clone()),
            refresh_token: resp
                .refresh_token()
                .map(|r| Secret::new(r.secret().clone())),
            expires_in: resp.expires_in().unwrap_or(DEFAULT_EXPIRES_IN),
            scope: resp
                .scopes()
                .map(|s| s.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
            server_date: meta.server_date,
            id_token: resp
                .extra_fields()
                .id_token
                .as_ref()
                .filter(|t| !t.is_empty())
                .map(|t| Secret::new(t.clone())),
        }
    }

    /// Starts a device code sign-in. Refused for Google (no device flow for Gmail scopes).
    pub async fn start_device_code(
        &self,
        scopes: &[String],
    ) -> Result<DeviceAuthorization, ProviderError> {
        if self.settings.kind == ProviderKind::Google {
            return Err(google_device_code_refused());
        }
        check_single_resource(self.settings.kind, scopes)?;
        // Device code is a public-client flow: never send the client secret.
        let client = self.oauth(false)?;
        let request = client.exchange_device_code().map_err(|_| {
            ProviderError::new(
                ErrorClass::InvalidRequest,
                "device_flow_unsupported",
                "this provider has no device authorization endpoint",
                "set the provider's device_code_url, or use grant type delegated_auth_code",
            )
        })?;
        let host = client
            .device_authorization_url()
            .and_then(|u| u.url().host_str())
            .unwrap_or("the provider")
            .to_owned();
        let ex = self.exchange();
        let result: Result<oauth2::DeviceAuthorizationResponse<DeviceExtra>, _> = request
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&ex)
            .await;
        let details =
            result.map_err(|e| self.oauth_error(Operation::DeviceStart, e, ex.meta(), &host))?;
        let user_code = details.user_code().secret().clone();
        let verification_uri = details.verification_uri().to_string();
        let message = details.extra_fields().message.clone().unwrap_or_else(|| {
            format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate.")
        });
        Ok(DeviceAuthorization {
            device_code: Secret::new(details.device_code().secret().clone()),
            expires_at: self.clock.now() + details.expires_in(),
            expires_in: details.expires_in(),
            interval: details.interval(),
            user_code,
            verification_uri,
            message,
        })
    }

    /// Polls the token endpoint once with a device code.
    pub async fn poll_device_code(&self, device_code: &Secret) -> DevicePoll {
        let form = [
            ("grant_type", DEVICE_CODE_GRANT),
            ("client_id", self.settings.client_id.as_str()),
            ("device_code", device_code.expose()),
        ];
        match self.token_by_hand(Operation::DevicePoll, &form).await {
            Ok(grant) => DevicePoll::Granted(Box::new(grant)),
            Err(e) => match e.class {
                ErrorClass::Pending => DevicePoll::Pending,
                ErrorClass::SlowDown => DevicePoll::SlowDown,
                ErrorClass::Transient => DevicePoll::Retry(e),
                _ => DevicePoll::Denied(e),
            },
        }
    }

    /// Builds the authorization URL (PKCE S256) for the browser step. `state` is the caller's
    /// (see [`new_state`]); `login_hint` pre-fills the account.
    pub fn authorization_url(
        &self,
        scopes: &[String],
        redirect_uri: &str,
        state: &str,
        login_hint: Option<&str>,
    ) -> Result<AuthorizationUrl, ProviderError> {
        check_single_resource(self.settings.kind, scopes)?;
        let client = self.oauth(false)?;
        let redirect = redirect_url(redirect_uri)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = state.to_owned();
        let mut request = client
            .authorize_url(move || CsrfToken::new(state))
            .map_err(|_| {
                ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "auth_code_unsupported",
                    "this provider has no authorization endpoint",
                    "set the provider's authorize_url",
                )
            })?
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .set_redirect_uri(Cow::Owned(redirect));
        if self.settings.kind == ProviderKind::Google {
            // Google returns a refresh token only for offline access, and a new one on re-consent
            // only when the consent screen is shown.
            request = request
                .add_extra_param("access_type", "offline")
                .add_extra_param("prompt", "consent");
        }
        if let Some(hint) = login_hint {
            request = request.add_extra_param("login_hint", hint);
        }
        let (url, _state) = request.url();
        Ok(AuthorizationUrl {
            url: url.to_string(),
            pkce_verifier: Secret::new(verifier.secret().clone()),
        })
    }

    /// Redeems an authorization code with its PKCE verifier.
    pub async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenGrant, ProviderError> {
        let client = self.oauth(true)?;
        let redirect = redirect_url(redirect_uri)?;
        let ex = self.exchange();
        let result = client
            .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().to_owned()))
            .set_redirect_uri(Cow::Owned(redirect))
            .request_async(&ex)
            .await;
        let meta = ex.meta();
        result
            .map(|r| Self::grant_from(&r, &meta))
            .map_err(|e| self.oauth_error(Operation::CodeExchange, e, meta, &self.host()))
    }

    /// Redeems a refresh token. A response without `refresh_token` comes back as
    /// `refresh_token: None`: keep the old one (RFC 6749 §6).
    pub async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: &[String],
    ) -> Result<TokenGrant, ProviderError> {
        check_single_resource(self.settings.kind, scopes)?;
        let client = self.oauth(true)?;
        let ex = self.exchange();
        let rt = RefreshToken::new(refresh_token.expose().to_owned());
        let result = client
            .exchange_refresh_token(&rt)
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&ex)
            .await;
        let meta = ex.meta();
        result
            .map(|r| Self::grant_from(&r, &meta))
            .map_err(|e| self.oauth_error(Operation::Refresh, e, meta, &self.host()))
    }

    /// Client credentials (Microsoft app-only). Needs the client secret.
    pub async fn client_credentials(&self, scopes: &[String]) -> Result<TokenGrant, ProviderError> {
        if self.settings.kind == ProviderKind::Google {
            return Err(ProviderError::new(
                ErrorClass::InvalidRequest,
                "unsupported_grant_type",
                "Google has no client-credentials grant for mail",
                "use grant type service_account (domain-wide delegation)",
            ));
        }
        if self.settings.client_secret.is_none() {
            return Err(ProviderError::new(
                ErrorClass::AppMisconfigured,
                "client_secret_missing",
                "app-only access needs a client secret, and the provider has none",
                "create a client secret in the app registration and store it with `tokenfleetctl provider update`",
            ));
        }
        check_single_resource(self.settings.kind, scopes)?;
        let client = self.oauth(true)?;
        let ex = self.exchange();
        let result = client
            .exchange_client_credentials()
            .add_scopes(scopes.iter().cloned().map(Scope::new))
            .request_async(&ex)
            .await;
        let meta = ex.meta();
        result
            .map(|r| Self::grant_from(&r, &meta))
            .map_err(|e| self.oauth_error(Operation::ClientCredentials, e, meta, &self.host()))
    }

    /// JWT bearer grant with a Google service-account key, acting for `subject` (the mailbox).
    pub async fn jwt_bearer(
        &self,
        service_account_json: &Secret,
        subject: &str,
        scopes: &[String],
    ) -> Result<TokenGrant, ProviderError> {
        let audience = match self.settings.kind {
            ProviderKind::Google => GOOGLE_TOKEN_URL.to_owned(),
            ProviderKind::Generic => self.settings.endpoints.token.to_string(),
            ProviderKind::Microsoft => {
                return Err(ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "unsupported_grant_type",
                    "service accounts (JWT bearer) are a Google Workspace feature",
                    "for Microsoft app-only access use grant type app_only",
                ));
            }
        };
        let key = ServiceAccountKey::parse(service_account_json)?;
        let assertion = key.assertion(subject, scopes, &audience, self.clock.now())?;
        let form = [
            ("grant_type", JWT_BEARER_GRANT),
            ("assertion", assertion.expose()),
        ];
        self.token_by_hand(Operation::JwtBearer, &form).await
    }

    /// Revokes a token (RFC 7009; sent with the hint `refresh_token`, which revokes the whole grant
    /// at Google). A token the provider no longer knows counts as revoked.
    ///
    /// Sent by hand: the `oauth2` crate refuses revocation URLs that are not `https`, which rules
    /// out the loopback test double (the settings allow `http` only for loopback hosts).
    pub async fn revoke(&self, token: &Secret) -> Result<(), ProviderError> {
        let Some(url) = self.settings.endpoints.revoke.clone() else {
            return Err(match self.settings.kind {
                ProviderKind::Microsoft => ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "revocation_unsupported",
                    "Microsoft has no OAuth token revocation endpoint",
                    "revoke the user's sessions (Entra admin center → Users → the user → Revoke sessions) or remove the app's consent (Enterprise applications → the app → Permissions)",
                ),
                _ => ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "revocation_unsupported",
                    "this provider has no revocation endpoint",
                    "set the provider's revoke_url, or revoke the grant in the provider's console",
                ),
            });
        };
        let mut form = vec![
            ("token", token.expose()),
            ("token_type_hint", "refresh_token"),
            ("client_id", self.settings.client_id.as_str()),
        ];
        if let Some(secret) = &self.settings.client_secret {
            form.push(("client_secret", secret.expose()));
        }
        let (status, body, meta) = self.post_form(&url, &form).await?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        match serde_json::from_slice::<OAuthErrorBody>(&body) {
            // RFC 7009 §2.2: an invalid token is not an error for the client; Google says so with 400.
            Ok(b) if b.error == "invalid_token" => Ok(()),
            Ok(b) if !b.error.is_empty() => Err(self.finish(
                Operation::Revoke,
                classify(Operation::Revoke, Some(status), &b),
                &meta,
            )),
            _ => Err(self.finish(
                Operation::Revoke,
                classify_unparsable(
                    Operation::Revoke,
                    status,
                    url.host_str().unwrap_or("the provider"),
                ),
                &meta,
            )),
        }
    }

    fn finish(&self, op: Operation, mut e: ProviderError, meta: &ResponseMeta) -> ProviderError {
        e.retry_after = meta.retry_after.or(e.retry_after);
        e.server_date = meta.server_date;
        tracing::debug!(operation = ?op, class = %e.class, code = %e.code, status = ?e.http_status, "provider call failed");
        e
    }

    /// A form POST, answered with status, body and metadata.
    async fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
    ) -> Result<(u16, Vec<u8>, ResponseMeta), ProviderError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish()
            .into_bytes();
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(url.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body)
            .map_err(|e| {
                ProviderError::new(
                    ErrorClass::InvalidRequest,
                    "invalid_settings",
                    format!("endpoint URL: {e}"),
                    "fix the provider's endpoints",
                )
            })?;
        let ex = self.exchange();
        let response = ex
            .send(request)
            .await
            .map_err(|t| t.into_provider_error(self.settings.http_proxy.is_some()))?;
        let status = response.status().as_u16();
        Ok((status, response.into_body(), ex.meta()))
    }

    /// A form POST to the token endpoint, read by hand (see the module comment for why).
    async fn token_by_hand(
        &self,
        op: Operation,
        form: &[(&str, &str)],
    ) -> Result<TokenGrant, ProviderError> {
        let host = self.host();
        let (status, body, meta) = self.post_form(&self.settings.endpoints.token, form).await?;
        if status == 200 {
            let raw: RawToken = serde_json::from_slice(&body).map_err(|err| {
                let mut e = classify_unparsable(op, status, &host);
                // serde's message may quote token values; keep only where it failed.
                e.reason
                    .push_str(&format!(" (line {} column {})", err.line(), err.column()));
                self.finish(op, e, &meta)
            })?;
            let expires_in = seconds(raw.expires_in.as_ref());
            return Ok(TokenGrant {
                access_token: raw.access_token,
                refresh_token: raw.refresh_token.filter(|r| !r.is_empty()),
                expires_in: expires_in.unwrap_or(DEFAULT_EXPIRES_IN),
                refresh_token_expires_in: seconds(raw.refresh_token_expires_in.as_ref()),
                scope: raw.scope,
                server_date: meta.server_date,
                id_token: raw.id_token,
            });
        }
        match serde_json::from_slice::<OAuthErrorBody>(&body) {
            Ok(b) if !b.error.is_empty() => {
                Err(self.finish(op, classify(op, Some(status), &b), &meta))
            }
            _ => Err(self.finish(op, classify_unparsable(op, status, &host), &meta)),
        }
    }
}

fn redirect_url(redirect_uri: &str) -> Result<RedirectUrl, ProviderError> {
    RedirectUrl::new(redirect_uri.to_owned()).map_err(|e| {
        ProviderError::new(
            ErrorClass::InvalidRequest,
            "invalid_redirect_uri",
            format!("redirect_uri is not a valid URL ({e})"),
            "fix the broker's public callback URL",
        )
    })
}

/// A fresh random `state` for an authorization request (128 bits, base64url).
pub fn new_state() -> String {
    CsrfToken::new_random().secret().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(class: ErrorClass, retry: Option<u64>) -> ProviderError {
        let mut e = ProviderError::new(class, "x", "r", "f");
        e.retry_after = retry.map(Duration::from_secs);
        e
    }

    #[test]
    fn slow_down_adds_five_seconds_and_it_stays() {
        let mut interval = Duration::from_secs(5);
        interval = next_poll_interval(interval, &DevicePoll::SlowDown);
        assert_eq!(interval, Duration::from_secs(10));
        interval = next_poll_interval(interval, &DevicePoll::Pending);
        assert_eq!(interval, Duration::from_secs(10));
        interval = next_poll_interval(interval, &DevicePoll::SlowDown);
        assert_eq!(interval, Duration::from_secs(15));
    }

    #[test]
    fn transient_poll_failures_wait_at_least_retry_after() {
        let five = Duration::from_secs(5);
        assert_eq!(
            next_poll_interval(
                five,
                &DevicePoll::Retry(err(ErrorClass::Transient, Some(30)))
            ),
            Duration::from_secs(30)
        );
        assert_eq!(
            next_poll_interval(
                five,
                &DevicePoll::Retry(err(ErrorClass::Transient, Some(1)))
            ),
            five
        );
        assert_eq!(
            next_poll_interval(five, &DevicePoll::Retry(err(ErrorClass::Transient, None))),
            five
        );
        assert!(DevicePoll::Denied(err(ErrorClass::Declined, None)).is_terminal());
        assert!(!DevicePoll::Retry(err(ErrorClass::Transient, None)).is_terminal());
    }

    #[test]
    fn refresh_token_lifetimes_parse_from_numbers_and_strings() {
        let body: TokenResponseBody = serde_json::from_value(serde_json::json!({
            "access_token": "at", "token_type": "Bearer", "expires_in": 3599,
            "refresh_token_expires_in": 604799
        }))
        .unwrap();
        let grant = ProviderClient::grant_from(&body, &ResponseMeta::default());
        assert_eq!(
            grant.refresh_token_expires_in,
            Some(Duration::from_secs(604_799))
        );
        assert_eq!(
            seconds(Some(&serde_json::json!("120"))),
            Some(Duration::from_secs(120))
        );
        assert_eq!(seconds(Some(&serde_json::json!(-1))), None);
        assert_eq!(seconds(None), None);
        let plain: TokenResponseBody = serde_json::from_value(serde_json::json!({
            "access_token": "at", "token_type": "Bearer"
        }))
        .unwrap();
        assert_eq!(
            ProviderClient::grant_from(&plain, &ResponseMeta::default()).refresh_token_expires_in,
            None
        );
    }

    #[test]
    fn skew_is_absolute_and_needs_a_date() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(skew(None, now), None);
        assert_eq!(
            skew(Some(now + Duration::from_secs(90)), now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            skew(Some(now - Duration::from_secs(90)), now),
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn states_are_random_and_url_safe() {
        let (a, b) = (new_state(), new_state());
        assert_ne!(a, b);
        assert!(
            a.len() >= 22
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
