//! The fake's state and protocol logic (no I/O): clients, users, grants, codes and tokens, and the
//! answers Microsoft and Google give.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{
    AuthorizeRequest, ClientSpec, Endpoint, GOOGLE_TOKEN_AUDIENCE, RecordedRequest,
    SERVICE_ACCOUNT_PUBLIC_PEM, ScriptedResponse,
};

pub(super) const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
pub(super) const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const AUTH_CODE_LIFETIME: Duration = Duration::from_secs(600);

/// An answer, before it becomes HTTP.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub status: u16,
    pub body: ReplyBody,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

#[derive(Debug, Clone)]
pub(super) enum ReplyBody {
    Json(Value),
    Html(String),
    Text(String),
    Redirect(String),
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: ReplyBody::Json(body),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn html(status: u16, body: String) -> Self {
        Self {
            status,
            body: ReplyBody::Html(body),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            body: ReplyBody::Text(body.to_owned()),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn redirect(location: String) -> Self {
        Self {
            status: 302,
            body: ReplyBody::Redirect(location),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn scripted(s: ScriptedResponse) -> Self {
        let json = s
            .headers
            .iter()
            .all(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
        let body = match (json, serde_json::from_str::<Value>(&s.body)) {
            (true, Ok(v)) => ReplyBody::Json(v),
            _ => ReplyBody::Text(s.body),
        };
        Self {
            status: s.status,
            body,
            headers: s.headers,
            delay: s.delay,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    Microsoft,
    Google,
}

/// The error body Microsoft's identity platform sends.
pub(super) fn microsoft_error_body(
    error: &str,
    aadsts: u64,
    description: &str,
    base: &str,
) -> Value {
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    let ts = OffsetDateTime::now_utc();
    let timestamp = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        ts.year(),
        u8::from(ts.month()),
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second()
    );
    json!({
        "error": error,
        "error_description": format!(
            "AADSTS{aadsts}: {description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"
        ),
        "error_codes": [aadsts],
        "timestamp": timestamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("{base}/error?code={aadsts}"),
    })
}

/// The `error` Microsoft pairs with an AADSTS code in token answers.
fn microsoft_error_for(aadsts: u64) -> (&'static str, u16) {
    match aadsts {
        50076 | 50079 | 50078 => ("interaction_required", 400),
        7000215 | 7000222 | 7000218 | 7000216 | 700025 => ("invalid_client", 401),
        50196 | 90033 => ("temporarily_unavailable", 400),
        _ => ("invalid_grant", 400),
    }
}

fn microsoft_description(aadsts: u64) -> &'static str {
    match aadsts {
        700082 => {
            "The refresh token has expired due to inactivity. The token was issued on 2024-01-01T00:00:00.0000000Z and was inactive for 90.00:00:00."
        }
        70008 => {
            "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource."
        }
        50173 => {
            "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password."
        }
        65001 => {
            "The user or administrator has not consented to use the application. Send an interactive authorization request for this user and resource."
        }
        50076 => {
            "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access 'Office 365 Exchange Online'."
        }
        50079 => {
            "Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access 'Office 365 Exchange Online'."
        }
        70043 => {
            "The refresh token has expired or is invalid due to sign-in frequency checks by conditional access."
        }
        50057 => "The user account is disabled.",
        53003 => {
            "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance."
        }
        7000215 => {
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app."
        }
        7000222 => {
            "The provided client secret keys for app are expired. Visit the Azure portal to create new keys for your app."
        }
        7000218 => {
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
        }
        50196 => {
            "The server terminated an operation because it encountered a client request loop. Please contact your app vendor."
        }
        _ => "The request failed.",
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct UserState {
    pub disabled: bool,
}

#[derive(Debug, Clone)]
pub(super) struct ServiceAccount {
    pub client_id: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceStatus {
    Pending,
    Approved(String),
    Declined,
    Redeemed,
}

#[derive(Debug, Clone)]
pub(super) struct DeviceCode {
    pub user_code: String,
    pub client_id: String,
    pub scope: String,
    pub expires_at: OffsetDateTime,
    pub interval: u64,
    pub last_poll: Option<OffsetDateTime>,
    pub status: DeviceStatus,
}

#[derive(Debug, Clone)]
struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scope: String,
    user: String,
    offline: bool,
    expires_at: OffsetDateTime,
    used: bool,
}

#[derive(Debug, Clone)]
struct Grant {
    client_id: String,
    /// `None` for app-only grants.
    user: Option<String>,
    scope: String,
    revoked: bool,
    /// When the grant's refresh tokens stop working (Google "Testing" apps).
    refresh_expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
struct AccessToken {
    grant: usize,
    expires_at: OffsetDateTime,
    /// The scopes this token was issued for (a grant's refresh token may be redeemed for
    /// another resource than the grant's first token).
    scope: String,
    /// The resource the token is for (`https://<host>` of its scopes, e.g.
    /// `https://outlook.office.com` or `https://graph.microsoft.com`); the client id when no
    /// scope names a resource. Reported by introspection, which refuses a token for another
    /// audience than the resource server asks about.
    aud: String,
}

/// The audience of a token issued for `scope` to `client_id` (see [`AccessToken::aud`]).
fn audience(scope: &str, client_id: &str) -> String {
    scopes(scope)
        .into_iter()
        .find_map(resource)
        .map_or_else(|| client_id.to_owned(), |r| format!("https://{r}"))
}

#[derive(Debug, Clone)]
pub(super) enum RefreshMatch {
    Token(String),
    User(String),
}

#[derive(Debug)]
pub(super) struct State {
    pub base: String,
    pub clock_offset: Duration,
    pub clients: HashMap<String, ClientSpec>,
    pub users: BTreeMap<String, UserState>,
    pub default_user: Option<String>,
    pub service_accounts: HashMap<String, ServiceAccount>,
    pub device_codes: HashMap<String, DeviceCode>,
    auth_codes: HashMap<String, AuthCode>,
    grants: Vec<Grant>,
    /// Refresh token → grant, in issue order.
    refresh_tokens: Vec<(String, usize)>,
    /// Refresh token → grant (the lookup of [`Self::refresh_tokens`], which keeps the order).
    refresh_token_grant: HashMap<String, usize>,
    /// `refresh_token` requests that presented a token of each grant (index = grant), whatever
    /// the answer.
    pub refresh_requests_per_grant: Vec<usize>,
    /// Token-endpoint requests per `grant_type` (counted even when requests are not recorded).
    pub token_request_counts: HashMap<String, usize>,
    /// Whether every request is kept in [`Self::requests`] (off for benchmarks at scale).
    pub recording: bool,
    /// Refresh tokens already redeemed, for clients whose tokens are single-use
    /// ([`super::RefreshRotation`]).
    used_refresh_tokens: HashSet<String>,
    /// Single-use refresh tokens presented again.
    pub refresh_token_reuses: usize,
    /// Token requests are held (not processed) while this is on (a hanging provider).
    pub hang: bool,
    /// The next this-many token requests are held until [`super::FakeIdp::release_held`].
    pub hold_next: usize,
    /// Token requests held right now.
    pub held_now: usize,
    /// Token requests held since the start (answered later or given up by their client).
    pub held_total: usize,
    /// Bumped to let held requests go.
    pub release: tokio::sync::watch::Sender<u64>,
    access_tokens: HashMap<String, AccessToken>,
    pub scripts: HashMap<Endpoint, VecDeque<ScriptedResponse>>,
    pub outage: bool,
    pub outage_retry_after: Option<u64>,
    pub latency: Duration,
    pub forced_refresh_failures: Vec<(RefreshMatch, u64)>,
    pub omit_refresh_token: usize,
    pub access_token_lifetime: Duration,
    pub device_code_lifetime: Duration,
    pub device_interval: u64,
    pub strict: bool,
    pub requests: Vec<RecordedRequest>,
    pub violations: Vec<String>,
}

/// A new token or code; registered as a secret the logs must never show.
fn random(prefix: &str) -> String {
    let value = format!(
        "{prefix}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    crate::logs::secret(&value);
    value
}

fn get<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn scopes(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// Scopes that are not resource permissions.
fn is_oidc(scope: &str) -> bool {
    matches!(scope, "offline_access" | "openid" | "profile" | "email")
}

fn resource(scope: &str) -> Option<&str> {
    let rest = scope
        .strip_prefix("https://")
        .or_else(|| scope.strip_prefix("http://"))?;
    rest.split('/').next()
}

pub(super) fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Client authentication from the form or an HTTP Basic header.
pub(super) struct ClientAuth {
    pub client_id: Option<String>,
    pub secret: Option<String>,
}

impl State {
    pub fn new(base: String) -> Self {
        Self {
            base,
            clock_offset: Duration::ZERO,
            clients: HashMap::new(),
            users: BTreeMap::new(),
            default_user: None,
            service_accounts: HashMap::new(),
            device_codes: HashMap::new(),
            auth_codes: HashMap::new(),
            grants: Vec::new(),
            refresh_tokens: Vec::new(),
            refresh_token_grant: HashMap::new(),
            refresh_requests_per_grant: Vec::new(),
            token_request_counts: HashMap::new(),
            recording: true,
            used_refresh_tokens: HashSet::new(),
            refresh_token_reuses: 0,
            hang: false,
            hold_next: 0,
            held_now: 0,
            held_total: 0,
            release: tokio::sync::watch::channel(0).0,
            access_tokens: HashMap::new(),
            scripts: HashMap::new(),
            outage: false,
            outage_retry_after: None,
            latency: Duration::ZERO,
            forced_refresh_failures: Vec::new(),
            omit_refresh_token: 0,
            access_token_lifetime: Duration::from_secs(3599),
            device_code_lifetime: Duration::from_secs(900),
            device_interval: 5,
            strict: true,
            requests: Vec::new(),
            violations: Vec::new(),
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + self.clock_offset
    }

    fn error(
        &self,
        flavor: Flavor,
        status: u16,
        error: &str,
        aadsts: u64,
        description: &str,
    ) -> Reply {
        match flavor {
            Flavor::Microsoft => Reply::json(
                status,
                microsoft_error_body(error, aadsts, description, &self.base),
            ),
            Flavor::Google => Reply::json(
                status,
                json!({ "error": error, "error_description": description }),
            ),
        }
    }

    fn ms_aadsts(&self, aadsts: u64) -> Reply {
        let (error, status) = microsoft_error_for(aadsts);
        self.error(
            Flavor::Microsoft,
            status,
            error,
            aadsts,
            microsoft_description(aadsts),
        )
    }

    /// The first queued script for `endpoint` that matches `grant_type`.
    pub fn take_script(
        &mut self,
        endpoint: Endpoint,
        grant_type: Option<&str>,
    ) -> Option<ScriptedResponse> {
        let queue = self.scripts.get_mut(&endpoint)?;
        let i = queue.iter().position(|s| {
            s.only_grant_type
                .as_deref()
                .is_none_or(|g| Some(g) == grant_type)
        })?;
        queue.remove(i)
    }

    // ---- clients ---------------------------------------------------------------------------

    /// Checks the client. `secret_rule`: what this grant needs from a confidential client.
    fn check_client(
        &self,
        flavor: Flavor,
        tenant: &str,
        auth: &ClientAuth,
        grant: &str,
    ) -> Result<ClientSpec, Reply> {
        // Whatever secret the broker sends (right or wrong) must stay out of its logs.
        if let Some(secret) = &auth.secret {
            crate::logs::secret(secret);
        }
        let Some(id) = auth.client_id.as_deref() else {
            return Err(match flavor {
                Flavor::Microsoft => self.error(
                    flavor,
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_id'.",
                ),
                Flavor::Google => self.error(
                    flavor,
                    400,
                    "invalid_request",
                    0,
                    "Could not determine client ID from request.",
                ),
            });
        };
        let Some(client) = self.clients.get(id).cloned() else {
            return Err(match flavor {
                Flavor::Microsoft => self.error(
                    flavor,
                    400,
                    "unauthorized_client",
                    700016,
                    &format!("Application with identifier '{id}' was not found in the directory '{tenant}'."),
                ),
                Flavor::Google => self.error(flavor, 401, "invalid_client", 0, "The OAuth client was not found."),
            });
        };
        match (&client.client_secret, &auth.secret) {
            (Some(expected), Some(given)) => {
                if given != expected {
                    return Err(match flavor {
                        Flavor::Microsoft => self.ms_aadsts(7000215),
                        Flavor::Google => {
                            self.error(flavor, 401, "invalid_client", 0, "Unauthorized")
                        }
                    });
                }
                if client.secret_expired {
                    return Err(match flavor {
                        Flavor::Microsoft => self.ms_aadsts(7000222),
                        Flavor::Google => {
                            self.error(flavor, 401, "invalid_client", 0, "Unauthorized")
                        }
                    });
                }
            }
            (None, Some(_)) => {
                return Err(match flavor {
                    Flavor::Microsoft => self.error(
                        flavor,
                        401,
                        "invalid_client",
                        700025,
                        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
                    ),
                    Flavor::Google => self.error(flavor, 401, "invalid_client", 0, "Unauthorized"),
                });
            }
            (Some(_), None) => {
                // A confidential client may use public flows (device code, and the refresh of
                // their tokens) only with "Allow public client flows".
                let public_ok = flavor == Flavor::Microsoft
                    && client.public_client_flows
                    && grant != "client_credentials";
                if !public_ok {
                    return Err(match flavor {
                        Flavor::Microsoft if grant == "client_credentials" => self.error(
                            flavor,
                            401,
                            "invalid_client",
                            7000216,
                            "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
                        ),
                        Flavor::Microsoft => self.ms_aadsts(7000218),
                        Flavor::Google => self.error(flavor, 400, "invalid_request", 0, "client_secret is missing."),
                    });
                }
            }
            (None, None) => {}
        }
        if grant == DEVICE_CODE_GRANT && !client.public_client_flows {
            return Err(self.ms_aadsts(7000218));
        }
        Ok(client)
    }

    // ---- tokens ----------------------------------------------------------------------------

    fn new_grant(&mut self, client_id: &str, user: Option<&str>, scope: &str) -> usize {
        let lifetime = self
            .clients
            .get(client_id)
            .and_then(|c| c.refresh_token_lifetime)
            .filter(|_| user.is_some());
        let refresh_expires_at = lifetime.map(|l| self.now() + l);
        self.grants.push(Grant {
            client_id: client_id.to_owned(),
            user: user.map(str::to_owned),
            scope: scope.to_owned(),
            revoked: false,
            refresh_expires_at,
        });
        self.refresh_requests_per_grant.push(0);
        self.grants.len() - 1
    }

    fn issue(
        &mut self,
        flavor: Flavor,
        grant: usize,
        with_refresh: bool,
        scope_out: &str,
    ) -> Reply {
        let lifetime = self.access_token_lifetime;
        let at = random("fake-at-");
        let client_id = self
            .grants
            .get(grant)
            .map(|g| g.client_id.clone())
            .unwrap_or_default();
        self.access_tokens.insert(
            at.clone(),
            AccessToken {
                grant,
                expires_at: self.now() + lifetime,
                scope: scope_out.to_owned(),
                aud: audience(scope_out, &client_id),
            },
        );
        let mut body = json!({
            "token_type": "Bearer",
            "scope": scope_out,
            "expires_in": lifetime.as_secs(),
            "access_token": at,
        });
        if flavor == Flavor::Microsoft {
            body["ext_expires_in"] = json!(lifetime.as_secs());
        }
        if flavor == Flavor::Google
            && let Some(at) = self.grants.get(grant).and_then(|g| g.refresh_expires_at)
        {
            let left = (at - self.now()).whole_seconds().max(0);
            body["refresh_token_expires_in"] = json!(left);
        }
        if with_refresh {
            let rt = random("fake-rt-");
            self.refresh_token_grant.insert(rt.clone(), grant);
            self.refresh_tokens.push((rt.clone(), grant));
            body["refresh_token"] = json!(rt);
        }
        if let Some(id_token) = self.id_token(flavor, grant) {
            body["id_token"] = json!(id_token);
        }
        Reply::json(200, body)
    }

    /// The OpenID Connect ID token of a user grant whose request asked for `openid`, with the
    /// claims the real providers put in (Microsoft v2.0: `preferred_username`, `oid`, `tid`,
    /// `name`, `email` with the `email` scope; Google: `email`, `email_verified`), naming the
    /// user who signed in at the fake (the test chooses who). Signed RS256 with
    /// [`super::ID_TOKEN_SIGNING_KEY_PEM`].
    fn id_token(&self, flavor: Flavor, grant: usize) -> Option<String> {
        let g = self.grants.get(grant)?;
        let user = g.user.as_deref()?;
        let requested = scopes(&g.scope);
        if !requested.contains(&"openid") {
            return None;
        }
        let now = self.now().unix_timestamp();
        let id_of = |what: &str| {
            let digest = Sha256::digest(what.to_ascii_lowercase().as_bytes());
            let mut bytes = [0_u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Uuid::from_bytes(bytes).to_string()
        };
        let claims = match flavor {
            Flavor::Microsoft => {
                let tid = id_of(user.rsplit_once('@').map_or(user, |(_, domain)| domain));
                let mut claims = json!({
                    "ver": "2.0",
                    "iss": format!("{}/{tid}/v2.0", self.base),
                    "aud": g.client_id,
                    "iat": now,
                    "nbf": now,
                    "exp": now + 3600,
                    "sub": id_of(&format!("{}:{user}", g.client_id)),
                    "oid": id_of(user),
                    "tid": tid,
                });
                if requested.contains(&"profile") {
                    claims["preferred_username"] = json!(user);
                    claims["name"] = json!(user.split('@').next().unwrap_or(user));
                }
                if requested.contains(&"email") {
                    claims["email"] = json!(user);
                }
                claims
            }
            Flavor::Google => {
                let mut claims = json!({
                    "iss": self.base,
                    "aud": g.client_id,
                    "azp": g.client_id,
                    "iat": now,
                    "exp": now + 3600,
                    "sub": id_of(user).replace('-', ""),
                });
                if requested.contains(&"email") {
                    claims["email"] = json!(user);
                    claims["email_verified"] = json!(true);
                }
                claims
            }
        };
        let key =
            jsonwebtoken::EncodingKey::from_rsa_pem(super::ID_TOKEN_SIGNING_KEY_PEM.as_bytes())
                .ok()?;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .ok()
    }

    fn granted_scope(flavor: Flavor, scope: &str) -> String {
        match flavor {
            Flavor::Microsoft => scopes(scope)
                .into_iter()
                .filter(|s| !is_oidc(s))
                .collect::<Vec<_>>()
                .join(" "),
            Flavor::Google => scope.to_owned(),
        }
    }

    pub fn live_refresh_tokens(&self, user: &str) -> Vec<String> {
        self.refresh_tokens
            .iter()
            .filter(|(_, g)| {
                let g = &self.grants[*g];
                !g.revoked && g.user.as_deref() == Some(user)
            })
            .map(|(t, _)| t.clone())
            .collect()
    }

    pub fn revoke_grant_of(&mut self, token: &str) -> Result<(), String> {
        let grant = self
            .refresh_token_grant
            .get(token)
            .copied()
            .or_else(|| self.access_tokens.get(token).map(|a| a.grant))
            .ok_or_else(|| "no such token".to_owned())?;
        self.grants[grant].revoked = true;
        Ok(())
    }

    pub fn revoke_user(&mut self, user: &str) {
        for g in &mut self.grants {
            if g.user.as_deref() == Some(user) {
                g.revoked = true;
            }
        }
    }

    /// `Some((username, scope, exp, client_id, aud))` for a live access token.
    pub fn introspect(&self, token: &str) -> Option<(Option<String>, String, i64, String, String)> {
        let at = self.access_tokens.get(token)?;
        if at.expires_at <= self.now() {
            return None;
        }
        let g = &self.grants[at.grant];
        if g.revoked {
            return None;
        }
        if let Some(u) = &g.user
            && self.users.get(u).is_some_and(|s| s.disabled)
        {
            return None;
        }
        let username = match &g.user {
            Some(u) => Some(u.clone()),
            None => self
                .clients
                .get(&g.client_id)
                .and_then(|c| c.app_only_mailbox.clone()),
        };
        Some((
            username,
            at.scope.clone(),
            at.expires_at.unix_timestamp(),
            g.client_id.clone(),
            at.aud.clone(),
        ))
    }

    /// RFC 7662 answer. A resource server that names the audiences it accepts
    /// (`?audience=…`, repeatable) gets `active: false` for a token of another audience, as
    /// RFC 7662 §2.2 lets an authorization server answer for tokens not meant for the asker.
    pub fn introspection_reply(
        &self,
        form: &[(String, String)],
        query: &[(String, String)],
    ) -> Reply {
        let Some(token) = get(form, "token") else {
            return Reply::json(
                400,
                json!({"error": "invalid_request", "error_description": "token is required"}),
            );
        };
        let accepted: Vec<&str> = query
            .iter()
            .filter(|(k, _)| k == "audience")
            .flat_map(|(_, v)| v.split_whitespace())
            .collect();
        match self.introspect(token) {
            Some((_, _, _, _, aud))
                if !accepted.is_empty() && !accepted.contains(&aud.as_str()) =>
            {
                Reply::json(200, json!({"active": false}))
            }
            Some((username, scope, exp, client_id, aud)) => {
                let mut body = json!({
                    "active": true,
                    "scope": scope,
                    "exp": exp,
                    "client_id": client_id,
                    "aud": aud,
                    "token_type": "Bearer",
                });
                if let Some(u) = username {
                    body["username"] = json!(u);
                    body["sub"] = json!(u);
                }
                Reply::json(200, body)
            }
            None => Reply::json(200, json!({"active": false})),
        }
    }

    // ---- device code -----------------------------------------------------------------------

    pub fn ms_device_authorization(
        &mut self,
        tenant: &str,
        auth: &ClientAuth,
        form: &[(String, String)],
    ) -> Reply {
        let Some(id) = auth.client_id.as_deref() else {
            return self.error(
                Flavor::Microsoft,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            );
        };
        if !self.clients.contains_key(id) {
            return self.error(
                Flavor::Microsoft,
                400,
                "unauthorized_client",
                700016,
                &format!(
                    "Application with identifier '{id}' was not found in the directory '{tenant}'."
                ),
            );
        }
        let Some(scope) = get(form, "scope") else {
            return self.error(
                Flavor::Microsoft,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            );
        };
        if let Some(r) = two_resources(scope) {
            return self.error(Flavor::Microsoft, 400, "invalid_scope", 70011, &r);
        }
        let device_code = random("fake-dc-");
        let user_code: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .to_ascii_uppercase()
            .chars()
            .take(9)
            .collect();
        let verification_uri = format!("{}/devicelogin", self.base);
        let expires_in = self.device_code_lifetime.as_secs();
        let interval = self.device_interval;
        self.device_codes.insert(
            device_code.clone(),
            DeviceCode {
                user_code: user_code.clone(),
                client_id: id.to_owned(),
                scope: scope.to_owned(),
                expires_at: self.now() + self.device_code_lifetime,
                interval,
                last_poll: None,
                status: DeviceStatus::Pending,
            },
        );
        // Exactly Microsoft's fields: no verification_uri_complete.
        Reply::json(
            200,
            json!({
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": verification_uri,
                "expires_in": expires_in,
                "interval": interval,
                "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
            }),
        )
    }

    pub fn decide_device_code(
        &mut self,
        user_code: &str,
        user: Option<&str>,
    ) -> Result<(), String> {
        let user = user.map(str::to_ascii_lowercase);
        if let Some(u) = &user
            && !self.users.contains_key(u)
        {
            return Err(format!("unknown user {u}; add it with add_user"));
        }
        let now = self.now();
        let code = self
            .device_codes
            .values_mut()
            .find(|d| d.user_code.eq_ignore_ascii_case(user_code.trim()))
            .ok_or_else(|| format!("no device code sign-in with user code {user_code}"))?;
        if code.expires_at <= now {
            return Err(format!("user code {user_code} has expired"));
        }
        if code.status != DeviceStatus::Pending {
            return Err(format!("user code {user_code} was already used"));
        }
        code.status = match user {
            Some(u) => DeviceStatus::Approved(u),
            None => DeviceStatus::Declined,
        };
        Ok(())
    }

    fn ms_device_poll(&mut self, client: &ClientSpec, form: &[(String, String)]) -> Reply {
        let Some(dc) = get(form, "device_code") else {
            return self.error(
                Flavor::Microsoft,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'device_code'.",
            );
        };
        let now = self.now();
        let Some(code) = self
            .device_codes
            .get_mut(dc)
            .filter(|c| c.client_id == client.client_id)
        else {
            return self.error(
                Flavor::Microsoft,
                400,
                "bad_verification_code",
                70000,
                "The provided value for the input parameter 'device_code' is not valid.",
            );
        };
        if code.expires_at <= now {
            return self.error(
                Flavor::Microsoft,
                400,
                "expired_token",
                70019,
                "Verification code expired.",
            );
        }
        let too_fast = code.interval > 0
            && code
                .last_poll
                .is_some_and(|last| (now - last) < time::Duration::seconds(code.interval as i64));
        code.last_poll = Some(now);
        if too_fast {
            // RFC 8628 §3.5: the interval grows by 5 s for this and all later polls.
            code.interval += 5;
            let interval = code.interval;
            return self.error(
                Flavor::Microsoft,
                400,
                "slow_down",
                70016,
                &format!("Polling too frequently; wait {interval} seconds between polls."),
            );
        }
        match code.status.clone() {
            DeviceStatus::Pending => self.error(
                Flavor::Microsoft,
                400,
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            ),
            DeviceStatus::Declined => self.error(Flavor::Microsoft, 400, "authorization_declined", 70000, "The user declined the sign-in."),
            DeviceStatus::Redeemed => self.error(
                Flavor::Microsoft,
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
            ),
            DeviceStatus::Approved(user) => {
                code.status = DeviceStatus::Redeemed;
                let scope = code.scope.clone();
                let grant = self.new_grant(&client.client_id, Some(&user), &scope);
                let offline = scopes(&scope).contains(&"offline_access");
                self.issue(Flavor::Microsoft, grant, offline, &Self::granted_scope(Flavor::Microsoft, &scope))
            }
        }
    }

    // ---- authorization code ----------------------------------------------------------------

    pub fn authorize(&mut self, r: &AuthorizeRequest) -> Result<String, String> {
        let client = self
            .clients
            .get(&r.client_id)
            .ok_or_else(|| format!("AADSTS700016: unknown client {}", r.client_id))?;
        if !client.redirect_uris.is_empty() && !client.redirect_uris.contains(&r.redirect_uri) {
            return Err(format!(
                "AADSTS50011: The redirect URI '{}' specified in the request does not match the redirect URIs configured for the application.",
                r.redirect_uri
            ));
        }
        let user = r.user.to_ascii_lowercase();
        if !self.users.contains_key(&user) {
            return Err(format!("unknown user {user}; add it with add_user"));
        }
        let mut url = url::Url::parse(&r.redirect_uri).map_err(|e| format!("redirect_uri: {e}"))?;
        let code = random("fake-code-");
        let offline = r.offline || scopes(&r.scope).contains(&"offline_access");
        self.auth_codes.insert(
            code.clone(),
            AuthCode {
                client_id: r.client_id.clone(),
                redirect_uri: r.redirect_uri.clone(),
                challenge: r.code_challenge.clone(),
                scope: r.scope.clone(),
                user,
                offline,
                expires_at: self.now() + AUTH_CODE_LIFETIME,
                used: false,
            },
        );
        url.query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", &r.state);
        Ok(url.to_string())
    }

    /// `GET /authorize` (both flavors): signs in the default user.
    pub fn authorize_get(&mut self, query: &[(String, String)]) -> Reply {
        let q = |n: &str| get(query, n).map(str::to_owned);
        let (Some(client_id), Some(redirect_uri)) = (q("client_id"), q("redirect_uri")) else {
            return Reply::html(
                400,
                page(
                    "Sign in",
                    "<p>The request has no client_id or no redirect_uri.</p>",
                ),
            );
        };
        if q("response_type").as_deref() != Some("code") {
            return Reply::html(400, page("Sign in", "<p>response_type must be code.</p>"));
        }
        let state = q("state").unwrap_or_default();
        if q("code_challenge").is_some() && q("code_challenge_method").as_deref() != Some("S256") {
            return match url::Url::parse(&redirect_uri) {
                Ok(mut u) => {
                    u.query_pairs_mut()
                        .append_pair("error", "invalid_request")
                        .append_pair("error_description", "code_challenge_method must be S256")
                        .append_pair("state", &state);
                    Reply::redirect(u.to_string())
                }
                Err(_) => Reply::html(400, page("Sign in", "<p>Bad redirect_uri.</p>")),
            };
        }
        let Some(user) = self.default_user.clone() else {
            return Reply::html(
                400,
                page(
                    "Sign in",
                    "<p>No user is signed in to the fake identity provider (set_default_user).</p>",
                ),
            );
        };
        let request = AuthorizeRequest {
            client_id,
            redirect_uri,
            state,
            code_challenge: q("code_challenge"),
            scope: q("scope").unwrap_or_default(),
            user,
            offline: q("access_type").as_deref() == Some("offline"),
        };
        match self.authorize(&request) {
            Ok(location) => Reply::redirect(location),
            Err(e) => Reply::html(400, page("Sign in", &format!("<p>{}</p>", escape(&e)))),
        }
    }

    fn redeem_code(
        &mut self,
        flavor: Flavor,
        client: &ClientSpec,
        form: &[(String, String)],
    ) -> Reply {
        let Some(code) = get(form, "code") else {
            return self.error(
                flavor,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'code'.",
            );
        };
        let now = self.now();
        let bad = |st: &Self, aadsts: u64, ms: &str, google: &str| match flavor {
            Flavor::Microsoft => st.error(flavor, 400, "invalid_grant", aadsts, ms),
            Flavor::Google => st.error(flavor, 400, "invalid_grant", 0, google),
        };
        let Some(entry) = self.auth_codes.get(code).cloned() else {
            return bad(
                self,
                70000,
                "The provided value for the 'code' parameter is not valid.",
                "Malformed auth code.",
            );
        };
        if entry.client_id != client.client_id {
            return bad(
                self,
                70000,
                "The provided authorization code was issued to a different client.",
                "Bad Request",
            );
        }
        if entry.used {
            return bad(
                self,
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                "Bad Request",
            );
        }
        if entry.expires_at <= now {
            return bad(
                self,
                70008,
                "The provided authorization code or refresh token has expired due to inactivity.",
                "Bad Request",
            );
        }
        if get(form, "redirect_uri") != Some(entry.redirect_uri.as_str()) {
            return match flavor {
                Flavor::Microsoft => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    50148,
                    "The redirect_uri does not match the one used in the authorization request.",
                ),
                Flavor::Google => {
                    self.error(flavor, 400, "redirect_uri_mismatch", 0, "Bad Request")
                }
            };
        }
        if let Some(challenge) = &entry.challenge {
            match get(form, "code_verifier") {
                None => {
                    return bad(
                        self,
                        501481,
                        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                        "Missing code verifier.",
                    );
                }
                Some(v) if s256(v) != *challenge => {
                    return bad(
                        self,
                        501481,
                        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                        "Invalid code verifier.",
                    );
                }
                Some(_) => {}
            }
        }
        if let Some(e) = self.auth_codes.get_mut(code) {
            e.used = true;
        }
        let grant = self.new_grant(&client.client_id, Some(&entry.user), &entry.scope);
        self.issue(
            flavor,
            grant,
            entry.offline,
            &Self::granted_scope(flavor, &entry.scope),
        )
    }

    // ---- refresh ---------------------------------------------------------------------------

    fn refresh(&mut self, flavor: Flavor, client: &ClientSpec, form: &[(String, String)]) -> Reply {
        let Some(rt) = get(form, "refresh_token") else {
            return self.error(
                flavor,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'refresh_token'.",
            );
        };
        let grant_id = self.refresh_token_grant.get(rt).copied();
        if let Some(count) = grant_id.and_then(|g| self.refresh_requests_per_grant.get_mut(g)) {
            *count += 1;
        }
        // Forced failures (tests) come first.
        let forced = self
            .forced_refresh_failures
            .iter()
            .position(|(m, _)| match m {
                RefreshMatch::Token(t) => t == rt,
                RefreshMatch::User(u) => {
                    grant_id.and_then(|g| self.grants[g].user.as_deref()) == Some(u.as_str())
                }
            });
        if let Some(i) = forced {
            let (_, aadsts) = self.forced_refresh_failures.remove(i);
            return match flavor {
                Flavor::Microsoft => self.ms_aadsts(aadsts),
                Flavor::Google => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    0,
                    "Token has been expired or revoked.",
                ),
            };
        }
        let Some(grant_id) = grant_id else {
            return match flavor {
                Flavor::Microsoft => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                ),
                Flavor::Google => self.error(flavor, 400, "invalid_grant", 0, "Bad Request"),
            };
        };
        let grant = self.grants[grant_id].clone();
        if grant.client_id != client.client_id {
            return match flavor {
                Flavor::Microsoft => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    70000,
                    "The refresh token was issued to a different client.",
                ),
                Flavor::Google => self.error(flavor, 401, "unauthorized_client", 0, "Unauthorized"),
            };
        }
        let rotation = client.refresh_rotation;
        if rotation != super::RefreshRotation::Provider && self.used_refresh_tokens.contains(rt) {
            // RFC 9700 §4.14.2: a single-use refresh token presented again. The server cannot
            // tell the legitimate client from an attacker; with reuse detection it revokes the
            // grant (all its refresh and access tokens).
            self.refresh_token_reuses += 1;
            if rotation == super::RefreshRotation::SingleUseRevokeOnReuse {
                self.grants[grant_id].revoked = true;
            }
            return self.error(
                Flavor::Google,
                400,
                "invalid_grant",
                0,
                "The refresh token has already been used.",
            );
        }
        let expired = grant.refresh_expires_at.is_some_and(|at| at <= self.now());
        if grant.revoked || expired {
            return match flavor {
                Flavor::Microsoft => self.ms_aadsts(if expired { 700082 } else { 50173 }),
                Flavor::Google => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    0,
                    "Token has been expired or revoked.",
                ),
            };
        }
        if let Some(u) = &grant.user
            && self.users.get(u).is_some_and(|s| s.disabled)
        {
            return match flavor {
                Flavor::Microsoft => self.ms_aadsts(50057),
                Flavor::Google => self.error(
                    flavor,
                    400,
                    "invalid_grant",
                    0,
                    "Token has been expired or revoked.",
                ),
            };
        }
        let requested = get(form, "scope").unwrap_or(&grant.scope).to_owned();
        let granted = scopes(&grant.scope);
        // Microsoft redeems a refresh token for any resource the app has consent for: what the
        // person consented to, or what an admin consented tenant-wide.
        if scopes(&requested).iter().any(|s| {
            !is_oidc(s) && !granted.contains(s) && !client.consented_scopes.iter().any(|c| c == s)
        }) {
            return match flavor {
                Flavor::Microsoft => self.ms_aadsts(65001),
                Flavor::Google => self.error(
                    flavor,
                    400,
                    "invalid_scope",
                    0,
                    "Some requested scopes were invalid.",
                ),
            };
        }
        // Microsoft rotates (old refresh tokens stay valid); Google sends none on refresh.
        if rotation != super::RefreshRotation::Provider {
            // Redeemed: this token may not be used again.
            self.used_refresh_tokens.insert(rt.to_owned());
        }
        let with_refresh = match flavor {
            _ if rotation != super::RefreshRotation::Provider => true,
            Flavor::Microsoft if self.omit_refresh_token > 0 => {
                self.omit_refresh_token -= 1;
                false
            }
            Flavor::Microsoft => true,
            Flavor::Google => false,
        };
        self.issue(
            flavor,
            grant_id,
            with_refresh,
            &Self::granted_scope(flavor, &requested),
        )
    }

    // ---- client credentials ----------------------------------------------------------------

    fn client_credentials(&mut self, client: &ClientSpec, form: &[(String, String)]) -> Reply {
        let scope = get(form, "scope").unwrap_or_default().to_owned();
        let list = scopes(&scope);
        if list.len() != 1 || !list[0].ends_with("/.default") {
            return self.error(
                Flavor::Microsoft,
                400,
                "invalid_scope",
                1002012,
                &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            );
        }
        let grant = self.new_grant(&client.client_id, None, &scope);
        self.issue(Flavor::Microsoft, grant, false, &scope)
    }

    // ---- JWT bearer (Google service accounts) ----------------------------------------------

    fn jwt_bearer(&mut self, form: &[(String, String)]) -> Reply {
        let g = Flavor::Google;
        let Some(assertion) = get(form, "assertion") else {
            return self.error(
                g,
                400,
                "invalid_request",
                0,
                "Missing required parameter: assertion",
            );
        };
        // A signed assertion is a credential for an hour: the broker must not log it either.
        crate::logs::secret(assertion);
        let Ok(header) = jsonwebtoken::decode_header(assertion) else {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid JWT: malformed assertion.",
            );
        };
        if header.alg != jsonwebtoken::Algorithm::RS256 {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid JWT: unsupported algorithm, expected RS256.",
            );
        }
        #[derive(serde::Deserialize)]
        struct Claims {
            iss: String,
            #[serde(default)]
            sub: Option<String>,
            #[serde(default)]
            scope: Option<String>,
            aud: String,
            iat: i64,
            exp: i64,
        }
        let mut insecure = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        insecure.insecure_disable_signature_validation();
        insecure.validate_exp = false;
        insecure.validate_aud = false;
        insecure.required_spec_claims.clear();
        let Ok(unverified) = jsonwebtoken::decode::<Claims>(
            assertion,
            &jsonwebtoken::DecodingKey::from_secret(&[]),
            &insecure,
        ) else {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid JWT: claims missing or malformed (iss, aud, iat, exp).",
            );
        };
        let Some(sa) = self.service_accounts.get(&unverified.claims.iss).cloned() else {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid grant: account not found",
            );
        };
        let Ok(key) =
            jsonwebtoken::DecodingKey::from_rsa_pem(SERVICE_ACCOUNT_PUBLIC_PEM.as_bytes())
        else {
            return Reply::json(500, json!({"error": "server_error"}));
        };
        let mut strict = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        strict.validate_exp = false;
        strict.validate_aud = false;
        strict.required_spec_claims.clear();
        let Ok(token) = jsonwebtoken::decode::<Claims>(assertion, &key, &strict) else {
            return self.error(g, 400, "invalid_grant", 0, "Invalid JWT Signature.");
        };
        let c = token.claims;
        let own_token_url = format!("{}/token", self.base);
        if c.aud != GOOGLE_TOKEN_AUDIENCE && c.aud != own_token_url {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                &format!("Invalid JWT: Failed audience check. The expected value was {GOOGLE_TOKEN_AUDIENCE}"),
            );
        }
        let now = self.now().unix_timestamp();
        if c.exp - c.iat > 3600 || c.exp <= now || c.iat > now + 60 {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
            );
        }
        let Some(sub) = c.sub.map(|s| s.to_ascii_lowercase()) else {
            return self.error(
                g,
                400,
                "invalid_grant",
                0,
                "Invalid grant: a subject (sub) is required for domain-wide delegation.",
            );
        };
        if !self.users.contains_key(&sub) {
            return self.error(g, 400, "invalid_grant", 0, "Invalid email or User ID");
        }
        let scope = c.scope.unwrap_or_default();
        if scope.is_empty() {
            return self.error(
                g,
                400,
                "invalid_scope",
                0,
                "Invalid OAuth scope or ID token audience provided.",
            );
        }
        if scopes(&scope)
            .iter()
            .any(|s| !sa.scopes.iter().any(|a| a == s))
        {
            return self.error(
                g,
                401,
                "unauthorized_client",
                0,
                "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            );
        }
        let grant = self.new_grant(&sa.client_id, Some(&sub), &scope);
        self.issue(g, grant, false, &scope)
    }

    // ---- token endpoints -------------------------------------------------------------------

    pub fn ms_token(
        &mut self,
        tenant: &str,
        auth: &ClientAuth,
        form: &[(String, String)],
    ) -> Reply {
        let Some(grant_type) = get(form, "grant_type") else {
            return self.error(
                Flavor::Microsoft,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            );
        };
        let grant_type = grant_type.to_owned();
        if !matches!(
            grant_type.as_str(),
            DEVICE_CODE_GRANT | "authorization_code" | "refresh_token" | "client_credentials"
        ) {
            return self.error(
                Flavor::Microsoft,
                400,
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{grant_type}'."),
            );
        }
        if let Some(scope) = get(form, "scope")
            && let Some(r) = two_resources(scope)
        {
            return self.error(Flavor::Microsoft, 400, "invalid_scope", 70011, &r);
        }
        let client = match self.check_client(Flavor::Microsoft, tenant, auth, &grant_type) {
            Ok(c) => c,
            Err(reply) => return reply,
        };
        match grant_type.as_str() {
            DEVICE_CODE_GRANT => self.ms_device_poll(&client, form),
            "authorization_code" => self.redeem_code(Flavor::Microsoft, &client, form),
            "refresh_token" => self.refresh(Flavor::Microsoft, &client, form),
            _ => self.client_credentials(&client, form),
        }
    }

    pub fn google_token(&mut self, auth: &ClientAuth, form: &[(String, String)]) -> Reply {
        let grant_type = get(form, "grant_type").unwrap_or_default().to_owned();
        match grant_type.as_str() {
            JWT_BEARER_GRANT => self.jwt_bearer(form),
            "authorization_code" | "refresh_token" => {
                let client = match self.check_client(Flavor::Google, "", auth, &grant_type) {
                    Ok(c) => c,
                    Err(reply) => return reply,
                };
                if grant_type == "authorization_code" {
                    self.redeem_code(Flavor::Google, &client, form)
                } else {
                    self.refresh(Flavor::Google, &client, form)
                }
            }
            other => self.error(
                Flavor::Google,
                400,
                "unsupported_grant_type",
                0,
                &format!("Invalid grant_type: {other}"),
            ),
        }
    }

    pub fn google_revoke(&mut self, params: &[(String, String)]) -> Reply {
        let Some(token) = get(params, "token") else {
            return self.error(
                Flavor::Google,
                400,
                "invalid_request",
                0,
                "Missing required parameter: token",
            );
        };
        match self.revoke_grant_of(token) {
            Ok(()) => Reply::json(200, json!({})),
            Err(_) => self.error(
                Flavor::Google,
                400,
                "invalid_token",
                0,
                "Token expired or revoked",
            ),
        }
    }

    // ---- device login page -----------------------------------------------------------------

    pub fn device_login_page(&self) -> Reply {
        Reply::html(
            200,
            page(
                "Enter code",
                r#"<form method="post">
<p><label>Code <input name="user_code" autofocus></label></p>
<p><label>Account <input name="user" type="email"></label></p>
<p><button name="action" value="approve">Sign in and accept</button>
<button name="action" value="decline">Decline</button></p>
</form>"#,
            ),
        )
    }

    pub fn device_login_post(&mut self, form: &[(String, String)]) -> Reply {
        let code = get(form, "user_code").unwrap_or_default().to_owned();
        let user = get(form, "user").map(str::to_owned);
        let decline = get(form, "action") == Some("decline");
        let result = self.decide_device_code(
            &code,
            if decline {
                None
            } else {
                user.as_deref().or(Some(""))
            },
        );
        match result {
            Ok(()) if decline => {
                Reply::html(200, page("Declined", "<p>You declined the sign-in.</p>"))
            }
            Ok(()) => Reply::html(
                200,
                page(
                    "Signed in",
                    "<p>You have signed in. You may now close this window.</p>",
                ),
            ),
            Err(e) => Reply::html(400, page("Enter code", &format!("<p>{}</p>", escape(&e)))),
        }
    }
}

fn two_resources(scope: &str) -> Option<String> {
    let mut first: Option<&str> = None;
    for s in scopes(scope) {
        if let Some(r) = resource(s) {
            match first {
                None => first = Some(r),
                Some(f) if f != r => {
                    return Some(format!(
                        "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid. Scopes of more than one resource ({f}, {r}) cannot be requested together."
                    ));
                }
                Some(_) => {}
            }
        }
    }
    None
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><title>{title} - fake identity provider</title></head><body><h1>{title}</h1>{body}</body></html>"
    )
}
