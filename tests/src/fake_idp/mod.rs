//! A fake identity provider that reproduces the documented behaviour of Microsoft Entra ID and
//! Google's OAuth endpoints (see `FACTS.md`), plus RFC 7662 introspection for Dovecot's `oauth2`
//! passdb. The real providers are unreachable here; every other component in the tests is real.
//!
//! ```text
//! Microsoft  /{tenant}/oauth2/v2.0/devicecode   POST  device authorization (RFC 8628)
//!            /{tenant}/oauth2/v2.0/token        POST  device_code, authorization_code (+PKCE),
//!                                                     refresh_token (rotating), client_credentials
//!            /{tenant}/oauth2/v2.0/authorize    GET   302 to redirect_uri for the default user
//!            /devicelogin                       GET/POST  a small page to approve a user code by hand
//! Google     /o/oauth2/v2/auth                  GET   302 to redirect_uri for the default user
//!            /token                             POST  authorization_code (+PKCE), refresh_token,
//!                                                     urn:ietf:params:oauth:grant-type:jwt-bearer
//!            /revoke                            POST  RFC 7009
//! Both       /introspect                        POST  RFC 7662 (`token=`; answers `aud`; `?audience=` → inactive for others)
//! ```
//!
//! Token answers of user grants whose request asked for `openid` carry an ID token naming the
//! user who signed in (Microsoft: `preferred_username`, `oid`, `tid`; Google: `email`,
//! `email_verified`), as the real providers send; the test chooses that user in
//! [`FakeIdp::approve_device_code`] and [`FakeIdp::authorize_url`].
//!
//! Tests script it ([`FakeIdp::script`], [`FakeIdp::set_outage`], [`FakeIdp::set_hang`],
//! [`FakeIdp::fail_next_refresh`], …, and per client [`RefreshRotation`]: single-use refresh
//! tokens with RFC 9700 reuse detection), drive the person's side ([`FakeIdp::approve_device_code`], [`FakeIdp::authorize`]), move its
//! clock ([`FakeIdp::advance`]) and inspect what it saw ([`FakeIdp::requests`],
//! [`FakeIdp::assert_no_violations`]). Requests to unknown paths or with the wrong method are
//! violations: strict by default.

mod server;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use time::OffsetDateTime;
use tokenfleet_domain::ProviderEndpoints;

use state::{DeviceStatus, State};

/// The private key (PKCS#8 PEM) of every fake service account. Test-only.
pub const SERVICE_ACCOUNT_KEY_PEM: &str = include_str!("../../fixtures/service-account-key.pem");
/// Public half of [`SERVICE_ACCOUNT_KEY_PEM`].
pub const SERVICE_ACCOUNT_PUBLIC_PEM: &str =
    include_str!("../../fixtures/service-account-key.pub.pem");
/// Another RSA key, for "signed with the wrong key" tests. Test-only.
pub const OTHER_RSA_KEY_PEM: &str = include_str!("../../fixtures/other-rsa-key.pem");
/// The key the fake signs ID tokens with (RS256, like both real providers). Test-only.
pub const ID_TOKEN_SIGNING_KEY_PEM: &str = OTHER_RSA_KEY_PEM;
/// Lifetime of refresh tokens of Google apps in "Testing" publishing status.
pub const GOOGLE_TESTING_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The audience Google requires in service-account assertions.
pub const GOOGLE_TOKEN_AUDIENCE: &str = "https://oauth2.googleapis.com/token";

/// An endpoint of the fake, for scripting and recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/{tenant}/oauth2/v2.0/devicecode`
    MicrosoftDeviceCode,
    /// `/{tenant}/oauth2/v2.0/token`
    MicrosoftToken,
    /// `/{tenant}/oauth2/v2.0/authorize`
    MicrosoftAuthorize,
    /// `/o/oauth2/v2/auth`
    GoogleAuthorize,
    /// `/token`
    GoogleToken,
    /// `/revoke`
    GoogleRevoke,
    /// `/introspect`
    Introspect,
    /// `/devicelogin`
    DeviceLogin,
}

/// How a client's refresh tokens rotate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefreshRotation {
    /// As the provider documents it (`FACTS.md`): Microsoft returns a new refresh token on every
    /// refresh and the old ones stay valid; Google returns none (the old one stays).
    #[default]
    Provider,
    /// Every refresh returns a new refresh token and the presented one is spent: presenting it
    /// again answers `invalid_grant` ("already used"), the grant itself stays alive.
    SingleUse,
    /// [`RefreshRotation::SingleUse`] with reuse detection as RFC 9700 §4.14.2 describes it
    /// (Okta, Auth0, Keycloak's "revoke refresh token"): a spent token presented again revokes
    /// the whole grant, newest refresh token included.
    SingleUseRevokeOnReuse,
}

/// A registered app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// OAuth client id.
    pub client_id: String,
    /// Client secret; `None` = public client.
    pub client_secret: Option<String>,
    /// "Allow public client flows" (needed for device code on Microsoft).
    pub public_client_flows: bool,
    /// Allowed redirect URIs; empty = any.
    pub redirect_uris: Vec<String>,
    /// The secret has expired (Microsoft answers AADSTS7000222).
    pub secret_expired: bool,
    /// For app-only tokens: the `username` introspection reports (the mailbox the app acts on).
    pub app_only_mailbox: Option<String>,
    /// Lifetime of the refresh tokens of this client's user grants, as Google gives apps left in
    /// "Testing" publishing status (7 days, see [`ClientSpec::google_testing`]): Google token
    /// answers carry the remaining lifetime as `refresh_token_expires_in`, and refreshing after
    /// it fails with `invalid_grant` "Token has been expired or revoked.". `None`: no expiry.
    pub refresh_token_lifetime: Option<Duration>,
    /// Scopes an admin consented the app for tenant-wide: a user's refresh token may also be
    /// redeemed for these (e.g. `https://graph.microsoft.com/Mail.Send` next to the SMTP scope
    /// the person consented to). Empty: only what the person consented to.
    pub consented_scopes: Vec<String>,
    /// How refresh tokens rotate (default: as the provider documents it).
    pub refresh_rotation: RefreshRotation,
}

impl ClientSpec {
    /// A public client (no secret) with public client flows allowed.
    pub fn public(client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: None,
            public_client_flows: true,
            redirect_uris: Vec::new(),
            secret_expired: false,
            app_only_mailbox: None,
            refresh_token_lifetime: None,
            consented_scopes: Vec::new(),
            refresh_rotation: RefreshRotation::Provider,
        }
    }

    /// This client as a Google app in "Testing" publishing status: refresh tokens live 7 days.
    #[must_use]
    pub fn google_testing(self) -> Self {
        Self {
            refresh_token_lifetime: Some(GOOGLE_TESTING_REFRESH_TOKEN_LIFETIME),
            ..self
        }
    }

    /// A confidential client with a secret; public client flows allowed too.
    pub fn confidential(client_id: &str, client_secret: &str) -> Self {
        Self {
            client_secret: Some(client_secret.to_owned()),
            ..Self::public(client_id)
        }
    }
}

/// A canned answer served instead of the normal behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedResponse {
    /// HTTP status.
    pub status: u16,
    /// Body (JSON unless a `Content-Type` header says otherwise).
    pub body: String,
    /// Extra headers (`Retry-After`, `Content-Type`, …).
    pub headers: Vec<(String, String)>,
    /// Delay before answering.
    pub delay: Duration,
    /// Serve only to requests with this `grant_type` (others pass it by).
    pub only_grant_type: Option<String>,
}

impl ScriptedResponse {
    /// A JSON answer.
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            body: body.to_string(),
            headers: Vec::new(),
            delay: Duration::ZERO,
            only_grant_type: None,
        }
    }

    /// A Microsoft error body with `error`, `error_description` (`AADSTS<code>: …`),
    /// `error_codes`, `trace_id`, `correlation_id`, `timestamp`.
    pub fn microsoft_error(status: u16, error: &str, aadsts: u64, description: &str) -> Self {
        Self::json(
            status,
            state::microsoft_error_body(error, aadsts, description, "http://127.0.0.1"),
        )
    }

    /// An HTTP status with a plain-text body (for example a 503 from a load balancer).
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: format!("HTTP {status}"),
            headers: vec![("content-type".into(), "text/plain".into())],
            delay: Duration::ZERO,
            only_grant_type: None,
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds `Retry-After: <seconds>`.
    #[must_use]
    pub fn retry_after(self, seconds: u64) -> Self {
        self.header("retry-after", &seconds.to_string())
    }

    /// Delays the answer.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Serves only requests with this `grant_type`.
    #[must_use]
    pub fn for_grant_type(mut self, grant_type: &str) -> Self {
        self.only_grant_type = Some(grant_type.to_owned());
        self
    }
}

/// The browser step of an authorization code flow, done by [`FakeIdp::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Client id.
    pub client_id: String,
    /// Where the browser is sent back to.
    pub redirect_uri: String,
    /// The client's state, echoed back.
    pub state: String,
    /// PKCE S256 challenge (`None` = no PKCE).
    pub code_challenge: Option<String>,
    /// Space-separated scopes.
    pub scope: String,
    /// The person who signs in (must be a known user).
    pub user: String,
    /// Google `access_type=offline` (Microsoft uses the `offline_access` scope instead).
    pub offline: bool,
}

/// One request the fake received. Secrets in `form` and `query` are visible: tests only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Which endpoint (`None` for an unknown path).
    pub endpoint: Option<Endpoint>,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Form parameters.
    pub form: Vec<(String, String)>,
    /// The form's `grant_type`, if any.
    pub grant_type: Option<String>,
    /// HTTP status the fake answered.
    pub status: u16,
    /// When (on the fake's clock).
    pub time: OffsetDateTime,
}

impl RecordedRequest {
    /// A form parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .chain(self.query.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a device code sign-in looks like from the person's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDeviceCode {
    /// The code shown to the person.
    pub user_code: String,
    /// The client that started it.
    pub client_id: String,
    /// Requested scopes.
    pub scope: String,
}

/// The running fake. Stops when dropped.
pub struct FakeIdp {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIdp")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

impl FakeIdp {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts the fake on a given loopback address.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        crate::logs::capture();
        crate::logs::secret(SERVICE_ACCOUNT_KEY_PEM);
        crate::logs::secret(OTHER_RSA_KEY_PEM);
        if !addr.ip().is_loopback() {
            bail!("the fake identity provider listens on loopback addresses only, not {addr}");
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::new(format!("http://{addr}"))));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = server::router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock poisons it; the state is still usable for inspection.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces `https://login.microsoftonline.com`: `{base}/{tenant}/oauth2/v2.0/token` etc.
    pub fn microsoft_authority_base(&self) -> String {
        self.base_url()
    }

    /// Endpoint overrides for a Microsoft provider with authority `tenant`.
    pub fn microsoft_endpoints(&self, tenant: &str) -> ProviderEndpoints {
        let base = format!("{}/{tenant}/oauth2/v2.0", self.base_url());
        ProviderEndpoints {
            authorize_url: format!("{base}/authorize"),
            token_url: format!("{base}/token"),
            device_code_url: format!("{base}/devicecode"),
            revoke_url: String::new(),
        }
    }

    /// Endpoint overrides for a Google provider.
    pub fn google_endpoints(&self) -> ProviderEndpoints {
        ProviderEndpoints {
            authorize_url: self.google_authorize_url(),
            token_url: self.google_token_url(),
            device_code_url: String::new(),
            revoke_url: self.revoke_url(),
        }
    }

    /// Google's authorization endpoint on the fake.
    pub fn google_authorize_url(&self) -> String {
        format!("{}/o/oauth2/v2/auth", self.base_url())
    }

    /// Google's token endpoint on the fake.
    pub fn google_token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    /// Google's revocation endpoint on the fake.
    pub fn revoke_url(&self) -> String {
        format!("{}/revoke", self.base_url())
    }

    /// RFC 7662 introspection (for Dovecot: `introspection_mode = post`).
    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.base_url())
    }

    /// The device login page (the `verification_uri` the fake hands out).
    pub fn device_login_url(&self) -> String {
        format!("{}/devicelogin", self.base_url())
    }

    // ---- registration -------------------------------------------------------------------

    /// Registers (or replaces) an app.
    pub fn register_client(&self, spec: ClientSpec) {
        if let Some(secret) = &spec.client_secret {
            crate::logs::secret(secret);
        }
        self.st().clients.insert(spec.client_id.clone(), spec);
    }

    /// Adds a user (mailbox) that can sign in.
    pub fn add_user(&self, address: &str) {
        self.st()
            .users
            .insert(address.to_ascii_lowercase(), state::UserState::default());
    }

    /// Disables a user: refreshes answer AADSTS50057, introspection reports their tokens inactive.
    pub fn disable_user(&self, address: &str) {
        if let Some(u) = self.st().users.get_mut(&address.to_ascii_lowercase()) {
            u.disabled = true;
        }
    }

    /// The user the `/authorize` pages sign in without asking (demos, browser tests).
    pub fn set_default_user(&self, address: Option<&str>) {
        self.st().default_user = address.map(str::to_ascii_lowercase);
    }

    /// Registers a Google service account (signing key: [`SERVICE_ACCOUNT_KEY_PEM`]) allowed to
    /// act for users with `https://mail.google.com/` (domain-wide delegation), and returns its
    /// JSON key file.
    pub fn service_account_json(&self, email: &str) -> String {
        let client_id = {
            let mut st = self.st();
            let n = st.service_accounts.len() + 1;
            st.service_accounts
                .entry(email.to_owned())
                .or_insert_with(|| state::ServiceAccount {
                    client_id: format!("1000000000000000000{n:02}"),
                    scopes: vec!["https://mail.google.com/".to_owned()],
                })
                .client_id
                .clone()
        };
        let project = email
            .split('@')
            .nth(1)
            .and_then(|d| d.split('.').next())
            .unwrap_or("fake-project");
        serde_json::json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": "fake0000000000000000000000000000000000kid",
            "private_key": SERVICE_ACCOUNT_KEY_PEM,
            "client_email": email,
            "client_id": client_id,
            "auth_uri": self.google_authorize_url(),
            "token_uri": self.google_token_url(),
        })
        .to_string()
    }

    /// Sets the scopes a service account is delegated (empty = none: `unauthorized_client`).
    pub fn set_service_account_scopes(&self, email: &str, scopes: &[&str]) {
        if let Some(sa) = self.st().service_accounts.get_mut(email) {
            sa.scopes = scopes.iter().map(|s| s.to_string()).collect();
        }
    }

    // ---- the person's side ---------------------------------------------------------------

    /// Device code sign-ins waiting for a person.
    pub fn pending_device_codes(&self) -> Vec<PendingDeviceCode> {
        self.st()
            .device_codes
            .values()
            .filter(|d| d.status == DeviceStatus::Pending)
            .map(|d| PendingDeviceCode {
                user_code: d.user_code.clone(),
                client_id: d.client_id.clone(),
                scope: d.scope.clone(),
            })
            .collect()
    }

    /// The person signs in as `user` and consents.
    pub fn approve_device_code(&self, user_code: &str, user: &str) -> anyhow::Result<()> {
        self.st()
            .decide_device_code(user_code, Some(user))
            .map_err(|e| anyhow!(e))
    }

    /// The person declines.
    pub fn decline_device_code(&self, user_code: &str) -> anyhow::Result<()> {
        self.st()
            .decide_device_code(user_code, None)
            .map_err(|e| anyhow!(e))
    }

    /// The browser step: signs `user` in and returns the redirect URL (`…?code=…&state=…`).
    pub fn authorize(&self, request: AuthorizeRequest) -> anyhow::Result<String> {
        self.st().authorize(&request).map_err(|e| anyhow!(e))
    }

    /// The browser step for a whole authorization URL (as a client built it): signs `user` in
    /// and returns the redirect URL.
    pub fn authorize_url(&self, authorization_url: &str, user: &str) -> anyhow::Result<String> {
        let url = url::Url::parse(authorization_url).context("authorization URL")?;
        let q = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        if let Some(m) = q("code_challenge_method")
            && m != "S256"
        {
            bail!("code_challenge_method is {m}, the fake supports S256 only");
        }
        self.authorize(AuthorizeRequest {
            client_id: q("client_id").context("authorization URL has no client_id")?,
            redirect_uri: q("redirect_uri").context("authorization URL has no redirect_uri")?,
            state: q("state").unwrap_or_default(),
            code_challenge: q("code_challenge"),
            scope: q("scope").unwrap_or_default(),
            user: user.to_owned(),
            offline: q("access_type").as_deref() == Some("offline"),
        })
    }

    // ---- scripting -----------------------------------------------------------------------

    /// Queues a canned answer for `endpoint`, served before normal behaviour (first in, first out).
    pub fn script(&self, endpoint: Endpoint, response: ScriptedResponse) {
        self.st()
            .scripts
            .entry(endpoint)
            .or_default()
            .push_back(response);
    }

    /// While on, every endpoint answers 503 (with `Retry-After` if `retry_after` is set).
    pub fn set_outage(&self, on: bool) {
        self.st().outage = on;
    }

    /// While on, token requests (both token endpoints and device authorization) hang: they are
    /// recorded on arrival and not answered; when the hang ends they are processed as if they
    /// had just arrived (a stalled network path delivering late), which may rotate a refresh
    /// token for a client that has long given up.
    pub fn set_hang(&self, on: bool) {
        let mut st = self.st();
        st.hang = on;
        if !on {
            st.release.send_modify(|n| *n += 1);
        }
    }

    /// Holds the next `n` token requests (not processed) until [`Self::release_held`].
    pub fn hold_next_token_requests(&self, n: usize) {
        self.st().hold_next = n;
    }

    /// Lets every held token request go on (processed now).
    pub fn release_held(&self) {
        self.st().release.send_modify(|n| *n += 1);
    }

    /// Token requests held (or hanging) right now.
    pub fn held_requests(&self) -> usize {
        self.st().held_now
    }

    /// Token requests held (or hanging) since the start, including those whose client gave up
    /// (they are recorded in [`Self::requests`] only if and when they are processed).
    pub fn held_total(&self) -> usize {
        self.st().held_total
    }

    /// How many spent single-use refresh tokens were presented again.
    pub fn refresh_token_reuses(&self) -> usize {
        self.st().refresh_token_reuses
    }

    /// `Retry-After` seconds sent with outage answers.
    pub fn set_outage_retry_after(&self, seconds: Option<u64>) {
        self.st().outage_retry_after = seconds;
    }

    /// Delay added to every answer (token endpoint included: a provider 200 ms away is
    /// `set_latency(Duration::from_millis(200))`). Requests are processed at once and answered
    /// after the delay, so any number can be in flight, as at a real provider.
    pub fn set_latency(&self, latency: Duration) {
        self.st().latency = latency;
    }

    /// Whether every request is kept for [`Self::requests`] (default on). Benchmarks with
    /// hundreds of thousands of requests turn it off; the counters
    /// ([`Self::token_requests`], [`Self::refresh_requests_per_grant`]) still count.
    pub fn set_recording(&self, on: bool) {
        self.st().recording = on;
    }

    /// For every grant the fake issued (in issue order: authorization codes, device codes,
    /// client credentials), how many `refresh_token` requests presented one of its refresh
    /// tokens, whatever the answer. "Never more than once per grant" is `max() <= 1`.
    pub fn refresh_requests_per_grant(&self) -> Vec<usize> {
        self.st().refresh_requests_per_grant.clone()
    }

    /// The next refresh with this refresh token fails with `AADSTS<aadsts>` (Microsoft) and the
    /// `error` Microsoft uses with that code (`invalid_grant`, `interaction_required`,
    /// `invalid_client`).
    pub fn fail_next_refresh(&self, refresh_token: &str, aadsts: u64) {
        self.st()
            .forced_refresh_failures
            .push((state::RefreshMatch::Token(refresh_token.to_owned()), aadsts));
    }

    /// The next refresh of any of this user's refresh tokens fails with `AADSTS<aadsts>`.
    pub fn fail_next_refresh_for_user(&self, user: &str, aadsts: u64) {
        self.st()
            .forced_refresh_failures
            .push((state::RefreshMatch::User(user.to_ascii_lowercase()), aadsts));
    }

    /// The next `n` Microsoft refresh answers carry no `refresh_token` (RFC 6749 §6: the client
    /// keeps the old one).
    pub fn omit_refresh_token_next(&self, n: usize) {
        self.st().omit_refresh_token = n;
    }

    /// Lifetime of issued access tokens (`expires_in`). Default 3599 s, as Microsoft.
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.st().access_token_lifetime = lifetime;
    }

    /// Lifetime of device codes. Default 900 s.
    pub fn set_device_code_lifetime(&self, lifetime: Duration) {
        self.st().device_code_lifetime = lifetime;
    }

    /// `interval` handed out with device codes (seconds; 0 = polls are never too fast). Default 5.
    pub fn set_device_interval(&self, seconds: u64) {
        self.st().device_interval = seconds;
    }

    /// Revokes the grant behind a refresh token or access token (all its tokens die; Microsoft
    /// answers AADSTS50173, Google "Token has been expired or revoked.").
    pub fn revoke_grant(&self, token: &str) -> anyhow::Result<()> {
        self.st().revoke_grant_of(token).map_err(|e| anyhow!(e))
    }

    /// Revokes every grant of a user.
    pub fn revoke_user_grants(&self, user: &str) {
        self.st().revoke_user(&user.to_ascii_lowercase());
    }

    /// Moves the fake's clock forward (device code expiry, token lifetimes, poll intervals, the
    /// `Date` header).
    pub fn advance(&self, by: Duration) {
        self.st().clock_offset += by;
    }

    /// The fake's clock.
    pub fn now(&self) -> OffsetDateTime {
        self.st().now()
    }

    /// Turns strict mode off (unknown paths are then only recorded).
    pub fn set_strict(&self, strict: bool) {
        self.st().strict = strict;
    }

    // ---- inspection ------------------------------------------------------------------------

    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.st().requests.clone()
    }

    /// Requests to one endpoint.
    pub fn requests_to(&self, endpoint: Endpoint) -> Vec<RecordedRequest> {
        self.st()
            .requests
            .iter()
            .filter(|r| r.endpoint == Some(endpoint))
            .cloned()
            .collect()
    }

    /// How many token requests (both token endpoints) had this `grant_type` (counted when
    /// processed, recorded or not).
    pub fn token_requests(&self, grant_type: &str) -> usize {
        self.st()
            .token_request_counts
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// Refresh tokens issued to a user that are still valid (newest last).
    pub fn live_refresh_tokens(&self, user: &str) -> Vec<String> {
        self.st().live_refresh_tokens(&user.to_ascii_lowercase())
    }

    /// Whether an access token is live (issued, not expired on the fake's clock, not revoked).
    pub fn access_token_is_live(&self, token: &str) -> bool {
        self.st().introspect(token).is_some()
    }

    /// The audience (`aud`: the resource, e.g. `https://graph.microsoft.com`) of a live access
    /// token, as introspection reports it.
    pub fn token_audience(&self, token: &str) -> Option<String> {
        self.st().introspect(token).map(|(_, _, _, _, aud)| aud)
    }

    /// Protocol violations seen (unknown paths, wrong methods, wrong content types).
    pub fn violations(&self) -> Vec<String> {
        self.st().violations.clone()
    }

    /// Fails (returns an error) if there were violations.
    pub fn assert_no_violations(&self) -> anyhow::Result<()> {
        let v = self.violations();
        if v.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "the fake identity provider saw {} violation(s):\n  {}",
                v.len(),
                v.join("\n  ")
            ))
        }
    }
}
