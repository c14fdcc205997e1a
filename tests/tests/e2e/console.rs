//! The web console and consent links through the real `tokenfleet-broker` binary (one process on
//! a real Redis, its HTTP listener on loopback), the fake identity provider for the sign-ins,
//! and plain HTTP/1.1 over TCP as the browser: session cookie flags, CSRF refusals, security
//! headers, a viewer's forged POST refused by the operation, consent-link expiry, single use
//! and revocation. The browser test (Chromium driven by chromedriver) is in
//! [`super::console_browser`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokenfleet_broker::config::RedisSection;
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;
use tokenfleet_store::redis_store::RedisStore;
use tokenfleet_store::{Precondition, RecordKey, Store as _};
use tokenfleet_testkit::broker::TestAdminClient;
use tokenfleet_testkit::chaos::brokers::{BrokerReplicas, ChaosStore, ReplicaSettings};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokenfleet_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const TENANT: &str = "acme";
const ENTRA: &str = "contoso.example";
pub const DEAD_USER: &str = "dead@contoso.example";
pub const SCAN_USER: &str = "scan@contoso.example";
pub const WEB_USER: &str = "web@contoso.example";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "s3cret-client-value";

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client: what a browser sends, nothing hidden.

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header names in lower case; repeated headers in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// The value of cookie `name` set by this answer.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies().into_iter().find_map(|c| {
            let first = c.split(';').next()?;
            let (k, v) = first.split_once('=')?;
            (k.trim() == name).then(|| v.to_owned())
        })
    }
}

/// Sends one request (`Connection: close`) and reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    request_from(None, addr, method, path, headers, body).await
}

/// [`request`] from the loopback address `source` (default: the system's choice).
pub async fn request_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = match source {
        Some(source) => tokenfleet_testkit::silent::connect_from(source, addr)
            .await
            .unwrap(),
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    // Read to the end of the body: the connection's end, or Content-Length bytes after the
    // head (some servers, chromedriver among them, keep the connection open anyway).
    let read = async {
        let mut raw = Vec::new();
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return raw;
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|len| raw.len() >= end + 4 + len) {
                    return raw;
                }
            }
        }
    };
    let raw = tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("answer within 90 s");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n.min(after.len())]);
        rest = after.get(n + 2..).unwrap_or_default();
    }
    out
}

/// `application/x-www-form-urlencoded` of pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The value of the hidden `csrf` field in a page.
pub fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no csrf field in {page}"))
        + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// A signed-in console session (its cookie and CSRF token).
#[derive(Debug, Clone)]
pub struct Browser {
    pub addr: SocketAddr,
    pub cookie: String,
    pub csrf: String,
}

impl Browser {
    pub async fn sign_in(addr: SocketAddr, key: &str) -> Browser {
        let page = request(addr, "GET", "/console/sign-in", &[], "").await;
        assert_eq!(page.status, 200, "{}", page.body);
        let pre = page.cookie("tf_signin").expect("sign-in cookie");
        let body = form(&[("csrf", &csrf_of(&page.body)), ("api_key", key)]);
        let cookie = format!("tf_signin={pre}");
        let done = request(
            addr,
            "POST",
            "/console/sign-in",
            &[
                ("Cookie", &cookie),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &body,
        )
        .await;
        assert_eq!(done.status, 303, "{}", done.body);
        let session = done.cookie("tf_console").expect("session cookie");
        tokenfleet_testkit::logs::secret(&session);
        let cookie = format!("tf_console={session}");
        let overview = request(addr, "GET", "/console/", &[("Cookie", &cookie)], "").await;
        assert_eq!(overview.status, 200, "{}", overview.body);
        Browser {
            addr,
            csrf: csrf_of(&overview.body),
            cookie,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        request(self.addr, "GET", path, &[("Cookie", &self.cookie)], "").await
    }

    pub async fn post(&self, path: &str, pairs: &[(&str, &str)]) -> Answer {
        request(
            self.addr,
            "POST",
            path,
            &[
                ("Cookie", &self.cookie),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form(pairs),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet: one broker process on Redis, the fake identity provider, three mailboxes.

pub struct Fleet {
    pub fake: FakeIdp,
    pub brokers: BrokerReplicas,
    pub redis: RedisServer,
}

impl Fleet {
    pub fn http(&self) -> SocketAddr {
        self.brokers.replicas[0].http
    }
    pub fn admin(&self) -> TestAdminClient {
        self.brokers.admin(0)
    }
    pub fn admin_key(&self) -> &Secret {
        &self.brokers.admin_key
    }

    pub async fn key(&self, role: &str, tenant: &str) -> String {
        let key = self
            .admin()
            .create_api_key(pb::CreateApiKeyRequest {
                role: role.into(),
                tenant: tenant.into(),
                description: "console test".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .key;
        // The log scan fails if the key reaches any broker log.
        tokenfleet_testkit::logs::secret(&key);
        key
    }

    pub async fn status(&self, name: &str) -> i32 {
        self.admin()
            .get_mailbox(pb::GetMailboxRequest {
                tenant: TENANT.into(),
                name: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap_or_default()
            .status
    }

    pub async fn wait_status(&self, name: &str, status: pb::TokenStatus) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.status(name).await;
            if now == status as i32 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mailbox {name} did not become {status:?} (is {now})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The store the broker uses (to age a link past its expiry, as time would).
    pub async fn store(&self) -> Arc<RedisStore> {
        let config = RedisSection::standalone(&self.redis.url())
            .to_redis_config()
            .unwrap();
        Arc::new(RedisStore::connect(&config).await.unwrap())
    }
}

/// Tenant `acme` with provider `m365` on the fake; mailboxes `dead` (REAUTH_REQUIRED: consented,
/// then its grant revoked at the provider and refreshed), `scan` (device code, NOT_RETRIEVED),
/// `web` (auth code, NOT_RETRIEVED); device `mfp-1` using `scan` and `web`.
/// The console test broker's `http.trusted_proxies`.
const TRUSTED_PROXIES: &str = "127.0.9.0/24";

pub async fn fleet() -> Fleet {
    let fake = FakeIdp::start().await.unwrap();
    for user in [DEAD_USER, SCAN_USER, WEB_USER, "intruder@contoso.example"] {
        fake.add_user(user);
    }
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    fake.set_device_interval(1);
    let redis = RedisServer::start().await.unwrap();
    let brokers = BrokerReplicas::start(
        1,
        ChaosStore::Standalone(redis.url()),
        ReplicaSettings {
            // A reverse proxy's addresses: its X-Forwarded-For names the client.
            http: format!("trusted_proxies = [\"{TRUSTED_PROXIES}\"]\n"),
            ..ReplicaSettings::default()
        },
    )
    .await
    .unwrap();
    let f = Fleet {
        fake,
        brokers,
        redis,
    };
    let mut admin = f.admin();
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: TENANT.into(),
                display_name: "Acme".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let e = f.fake.microsoft_endpoints(ENTRA);
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: TENANT.into(),
                name: "m365".into(),
                kind: pb::ProviderKind::Microsoft as i32,
                authority: ENTRA.into(),
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                endpoints: Some(pb::ProviderEndpoints {
                    authorize_url: e.authorize_url,
                    token_url: e.token_url,
                    device_code_url: e.device_code_url,
                    revoke_url: e.revoke_url,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for (name, user, grant) in [
        ("dead", DEAD_USER, pb::GrantType::DelegatedDeviceCode),
        ("scan", SCAN_USER, pb::GrantType::DelegatedDeviceCode),
        ("web", WEB_USER, pb::GrantType::DelegatedAuthCode),
    ] {
        admin
            .create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(pb::Mailbox {
                    tenant: TENANT.into(),
                    name: name.into(),
                    address: user.into(),
                    provider: "m365".into(),
                    grant_type: grant as i32,
                    kind: pb::MailboxKind::Bulk as i32,
                    purposes: vec![pb::MailPurpose::Send as i32],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    // An agent that never connected hosts the device: its connection test answers
    // AGENT_UNREACHABLE.
    admin
        .create_agent(pb::CreateAgentRequest {
            agent: Some(pb::Agent {
                tenant: TENANT.into(),
                name: "site-b".into(),
                display_name: "Branch office".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                tenant: TENANT.into(),
                name: "mfp-1".into(),
                display_name: "Reception printer".into(),
                agent: "site-b".into(),
                sender_mode: pb::SenderMode::Bulk as i32,
                bulk_mailbox: "scan".into(),
                allowed_mailboxes: vec!["web".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // `dead`: a grant, then killed at the provider.
    let started = admin
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: "dead".into(),
            redirect_uri: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::start_consent_response::Challenge::DeviceCode(code)) = started.challenge else {
        panic!("device code expected");
    };
    f.fake
        .approve_device_code(&code.user_code, DEAD_USER)
        .unwrap();
    f.wait_status("dead", pb::TokenStatus::Active).await;
    f.fake.revoke_user_grants(DEAD_USER);
    let _ = admin
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: "dead".into(),
        })
        .await;
    f.wait_status("dead", pb::TokenStatus::ReauthRequired).await;
    f
}

fn assert_security_headers(a: &Answer, what: &str) {
    assert_eq!(
        a.header("content-security-policy"),
        Some(tokenfleet_broker::console::CSP),
        "{what}"
    );
    let csp = a.header("content-security-policy").unwrap();
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{what}: {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(
        a.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(a.header("referrer-policy"), Some("no-referrer"), "{what}");
    assert_eq!(a.header("x-frame-options"), Some("DENY"), "{what}");
}

fn assert_no_inline_script(page: &str) {
    let mut rest = page;
    while let Some(i) = rest.find("<script") {
        let tag_end = rest[i..].find('>').unwrap() + i;
        assert!(
            rest[i..tag_end].contains(" src=\""),
            "inline script in page: {}",
            &rest[i..tag_end]
        );
        rest = &rest[tag_end..];
    }
    assert!(!page.contains(" onclick="), "inline handler");
    assert!(!page.contains(" style=\""), "inline style");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_csrf_headers_and_roles() {
    let f = fleet().await;
    let addr = f.http();

    // Not signed in: every page sends the browser to the sign-in page, with the headers.
    let a = request(addr, "GET", "/console/", &[], "").await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/console/sign-in"));
    assert_security_headers(&a, "redirect");
    let a = request(addr, "GET", "/", &[], "").await;
    assert_eq!(a.header("location"), Some("/console/"));

    // The sign-in form: a double-submit cookie with the session cookie's flags.
    let page = request(addr, "GET", "/console/sign-in", &[], "").await;
    assert_eq!(page.status, 200);
    assert_security_headers(&page, "sign-in page");
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert_no_inline_script(&page.body);
    assert!(page.body.contains("<label for=\"api_key\">API key</label>"));
    let pre_cookie = page.set_cookies()[0].to_owned();
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(pre_cookie.contains(flag), "{pre_cookie}");
    }
    let pre = page.cookie("tf_signin").unwrap();
    let csrf = csrf_of(&page.body);
    let key = f.admin_key().expose().to_owned();
    let post_from = |source: Option<std::net::IpAddr>, cookie: String, body: String| async move {
        request_from(
            source,
            addr,
            "POST",
            "/console/sign-in",
            &[
                ("Cookie", &cookie),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &body,
        )
        .await
    };
    // Without the form's token (a cross-site sign-in) → 403, no session.
    let a = post_from(
        None,
        format!("tf_signin={pre}"),
        form(&[("csrf", "forged"), ("api_key", &key)]),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.cookie("tf_console").is_none());
    // A wrong key → 401 naming the problem, no session.
    let a = post_from(
        None,
        format!("tf_signin={pre}"),
        form(&[("csrf", &csrf), ("api_key", "tfk_nothing_real")]),
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("API key not recognised"), "{}", a.body);
    assert!(a.cookie("tf_console").is_none());
    // A sign-in with the form's token from `source`, with `X-Forwarded-For: forwarded_for`
    // when given.
    let sign_in_via = |source: &str, forwarded_for: Option<&str>, api_key: &str| {
        let source = Some(source.parse().unwrap());
        let (cookie, body) = (
            format!("tf_signin={pre}"),
            form(&[("csrf", &csrf), ("api_key", api_key)]),
        );
        let forwarded_for = forwarded_for.map(str::to_owned);
        async move {
            let mut headers = vec![
                ("Cookie", cookie.as_str()),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ];
            headers.extend(forwarded_for.as_deref().map(|f| ("X-Forwarded-For", f)));
            request_from(source, addr, "POST", "/console/sign-in", &headers, &body).await
        }
    };
    let sign_in_from = |source: &str, api_key: &str| sign_in_via(source, None, api_key);
    // Failed sign-ins are limited per source: one address that spent its 20 in a minute is
    // answered 429 even with the right key, while the others still sign in (the old limit per
    // replica kept everybody out).
    for n in 0..20 {
        let a = sign_in_from("127.0.7.1", &format!("tfk_guess_{n}")).await;
        assert_eq!(a.status, 401, "guess {n}: {}", a.body);
    }
    for api_key in ["tfk_guess_more", &key] {
        let a = sign_in_from("127.0.7.1", api_key).await;
        assert_eq!(a.status, 429, "{}", a.body);
        assert!(
            a.body
                .contains("Too many failed sign-ins from your address"),
            "{}",
            a.body
        );
        assert!(a.cookie("tf_console").is_none());
    }
    let a = sign_in_from("127.0.7.2", &key).await;
    assert_eq!(a.status, 303, "another address was kept out: {}", a.body);
    // From a client that is not a trusted proxy, X-Forwarded-For is what the client wrote: the
    // spent address does not get a new budget by naming another.
    let a = sign_in_via("127.0.7.1", Some("203.0.113.99"), &key).await;
    assert_eq!(
        a.status, 429,
        "an untrusted X-Forwarded-For was believed: {}",
        a.body
    );
    // Behind the trusted proxy (127.0.9.1), each client it names has its own budget: one that
    // spent its 20 is answered 429 — also when it writes another address to the left of the
    // proxy's entry — while another client behind the same proxy signs in.
    let via_proxy =
        |forwarded_for: &str, api_key: &str| sign_in_via("127.0.9.1", Some(forwarded_for), api_key);
    for n in 0..20 {
        let a = via_proxy("203.0.113.5", &format!("tfk_guess_{n}")).await;
        assert_eq!(a.status, 401, "guess {n} via the proxy: {}", a.body);
    }
    // What the client wrote before the proxy's entry — another address, or bytes that are not
    // text (the proxy appends to the same field) — does not hide the entry.
    for forwarded_for in [
        "203.0.113.5",
        "198.51.100.1, 203.0.113.5",
        "\u{e9}\u{ff}, 203.0.113.5",
    ] {
        let a = via_proxy(forwarded_for, &key).await;
        assert_eq!(a.status, 429, "{forwarded_for}: {}", a.body);
        assert!(a.cookie("tf_console").is_none());
    }
    let a = via_proxy("203.0.113.5, 203.0.113.6", &key).await;
    assert_eq!(
        a.status, 303,
        "another client behind the proxy was kept out: {}",
        a.body
    );
    // Every sign-in so far is counted by its result.
    let metrics = request(addr, "GET", "/metrics", &[], "").await;
    for (result, count) in [
        ("ok", 2.0),
        ("unauthenticated", 41.0),
        ("rate_limited", 6.0),
        ("csrf_failed", 1.0),
    ] {
        let series = format!("tokenfleet_console_sign_ins_total{{result=\"{result}\"}}");
        assert_eq!(
            crate::agent_metrics::must(&metrics.body, &series),
            count,
            "{series}"
        );
    }
    // The right key → a session cookie: random, flagged, and not the key.
    let a = post_from(
        None,
        format!("tf_signin={pre}"),
        form(&[("csrf", &csrf), ("api_key", &key)]),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let set = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("tf_console="))
        .unwrap()
        .to_owned();
    for flag in [
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=28800",
    ] {
        assert!(set.contains(flag), "{set}");
    }
    let sid = a.cookie("tf_console").unwrap();
    tokenfleet_testkit::logs::secret(&sid);
    assert!(sid.len() >= 43, "256-bit session id: {sid}");
    assert!(!set.contains(&key) && !key.contains(&sid));
    let admin = Browser::sign_in(addr, &key).await;
    assert_ne!(
        admin.cookie,
        format!("tf_console={sid}"),
        "a new id per sign-in"
    );

    // The overview: REAUTH_REQUIRED first, with the headers and no inline script.
    let page = admin.get("/console/").await;
    assert_eq!(page.status, 200);
    assert_security_headers(&page, "overview");
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert_no_inline_script(&page.body);
    let problems = page.body.split("id=\"problems\"").nth(1).unwrap();
    let first_row = problems.split("<tr>").nth(2).unwrap();
    assert!(
        first_row.contains("REAUTH_REQUIRED") && first_row.contains("mailbox dead"),
        "first problem: {first_row}"
    );
    // Search narrows the lists.
    let page = admin.get("/console/?q=web").await;
    let mailboxes = page.body.split("id=\"mailboxes\"").nth(1).unwrap();
    assert!(mailboxes.contains(">web<") && !mailboxes.contains(">dead<"));
    // The mailbox page links the troubleshooting anchor of its error.
    let page = admin.get("/console/t/acme/mailboxes/dead").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("/console/help/troubleshooting#"),
        "{}",
        page.body
    );
    let help = admin.get("/console/help/troubleshooting").await;
    assert!(help.body.contains("<tr id=\"reauth-required\">"));
    assert!(page.body.contains("Delete token") && page.body.contains("Start consent"));
    // Static files: right types, the same headers.
    let css = request(addr, "GET", "/console/static/console.css", &[], "").await;
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_security_headers(&css, "css");
    let js = request(addr, "GET", "/console/static/console.js", &[], "").await;
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );

    // CSRF: a POST without the token, or with another session's, is refused before anything.
    let a = admin
        .post("/console/t/acme/mailboxes/scan/consent", &[])
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("CSRF"), "{}", a.body);
    let other = Browser::sign_in(addr, &key).await;
    let a = admin
        .post(
            "/console/t/acme/mailboxes/scan/consent",
            &[("csrf", &other.csrf)],
        )
        .await;
    assert_eq!(a.status, 403);
    assert_eq!(f.status("scan").await, pb::TokenStatus::NotRetrieved as i32);
    // No session at all: back to sign-in, nothing done.
    let a = request(
        addr,
        "POST",
        "/console/t/acme/mailboxes/scan/consent",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "csrf=x",
    )
    .await;
    assert_eq!(a.status, 303);

    // A viewer: no change buttons, and a forged POST (with its own valid CSRF token) is refused
    // by the operation's authorization and audited as refused.
    let viewer_key = f.key("viewer", TENANT).await;
    let viewer = Browser::sign_in(addr, &viewer_key).await;
    let page = viewer.get("/console/t/acme/mailboxes/dead").await;
    assert_eq!(page.status, 200);
    for action in ["/consent\"", "/delete-token\"", "/refresh\"", "/links\""] {
        assert!(!page.body.contains(action), "viewer sees {action}");
    }
    let page = viewer.get("/console/agents").await;
    assert!(!page.body.contains("/console/agents/enroll"));
    let page = viewer.get("/console/t/acme/devices/mfp-1").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("/test\""));
    let a = viewer
        .post(
            "/console/t/acme/mailboxes/web/links",
            &[("csrf", &viewer.csrf)],
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("read-only"), "{}", a.body);
    let a = viewer
        .post(
            "/console/t/acme/mailboxes/dead/delete-token",
            &[("csrf", &viewer.csrf)],
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = viewer
        .post(
            "/console/t/acme/devices/mfp-1/test",
            &[("csrf", &viewer.csrf)],
        )
        .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(
        f.status("dead").await,
        pb::TokenStatus::ReauthRequired as i32
    );
    let events = f
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: TENANT.into(),
            kind: "refused".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.action == "consent_link.create" && e.result == "permission_denied"),
        "{events:?}"
    );
    // The JSON status endpoint answers the viewer too (read access).
    let a = viewer
        .get("/console/t/acme/mailboxes/dead/status.json")
        .await;
    assert_eq!(a.status, 200);
    assert!(
        a.body.contains("\"status\":\"REAUTH_REQUIRED\""),
        "{}",
        a.body
    );

    // Sign-out ends the session on the server (the old cookie no longer works).
    let a = other
        .post("/console/sign-out", &[("csrf", &other.csrf)])
        .await;
    assert_eq!(a.status, 303);
    assert!(
        a.set_cookies()
            .iter()
            .any(|c| c.starts_with("tf_console=;") && c.contains("Max-Age=0"))
    );
    assert_eq!(other.get("/console/").await.status, 303);
    // Revoking the API key ends its sessions at once.
    let ids = f
        .admin()
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let viewer_id = ids
        .iter()
        .find(|k| viewer_key.contains(&k.id))
        .unwrap()
        .id
        .clone();
    f.admin()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: viewer_id })
        .await
        .unwrap();
    assert_eq!(viewer.get("/console/").await.status, 303);
    assert_eq!(admin.get("/console/").await.status, 200);
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The token of a consent link's address, registered with the log scan: a link is a bearer
/// credential and must never reach a log.
fn token_of(url: &str) -> String {
    let token = url.rsplit('/').next().unwrap().to_owned();
    tokenfleet_testkit::logs::secret(&token);
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_links_single_use_expiry_revocation() {
    let f = fleet().await;
    let addr = f.http();
    let mut admin = f.admin();
    let create = |mailbox: &'static str| {
        let mut admin = f.admin();
        async move {
            admin
                .create_consent_link(pb::CreateConsentLinkRequest {
                    tenant: TENANT.into(),
                    mailbox: mailbox.into(),
                    ttl_seconds: 0,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };

    // Created through the Admin API: the URL under the public URL, shown once, stored hashed.
    let made = create("web").await;
    let token = token_of(&made.url);
    assert_eq!(made.url, format!("http://{addr}/consent/{token}"));
    assert_eq!(made.token, token);
    let link = made.link.unwrap();
    assert_eq!(link.state, "pending");
    assert_eq!(link.id, hash(&token)[..16]);
    let store = f.store().await;
    let stored = store
        .get(&RecordKey::global("consent_link", &hash(&token)))
        .await
        .unwrap()
        .expect("stored under its hash");
    assert!(!String::from_utf8_lossy(&stored.data).contains(&token));

    // The owner's page: what is granted, in plain words, and which devices use it.
    let page = request(addr, "GET", &format!("/consent/{token}"), &[], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_security_headers(&page, "link page");
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert_no_inline_script(&page.body);
    // Everything it loads or posts to is under the prefixes the chart's Ingress routes.
    let local: Vec<&str> = ["href=\"/", "src=\"/", "action=\"/"]
        .iter()
        .flat_map(|attr| {
            page.body
                .match_indices(attr)
                .map(move |(at, _)| at + attr.len() - 1)
        })
        .filter_map(|start| page.body[start..].split('"').next())
        .collect();
    assert!(local.len() >= 2, "no stylesheet or script: {}", page.body);
    for url in &local {
        assert!(
            crate::OWNER_PAGE_PREFIXES
                .iter()
                .any(|p| url.starts_with(p)),
            "the owner's page uses {url}, which the chart's Ingress does not route"
        );
    }
    for text in [
        WEB_USER,
        "Microsoft 365",
        "Send e-mail as",
        "Reception printer",
        "Sign in with Microsoft 365",
    ] {
        assert!(page.body.contains(text), "{text} missing: {}", page.body);
    }
    // Opening it does not consume it.
    assert_eq!(
        request(addr, "GET", &format!("/consent/{token}"), &[], "")
            .await
            .status,
        200
    );
    // Unknown and malformed links answer 404.
    let unknown = format!("tfc_{}", "0".repeat(40));
    assert_eq!(
        request(addr, "GET", &format!("/consent/{unknown}"), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        request(addr, "GET", "/consent/garbage", &[], "")
            .await
            .status,
        404
    );

    // Start: the browser goes to the provider (auth code + PKCE), the link is used up.
    let a = request(addr, "POST", &format!("/consent/{token}/start"), &[], "").await;
    assert_eq!(a.status, 303, "{}", a.body);
    let authorize = a.header("location").unwrap().to_owned();
    assert!(authorize.starts_with(&f.fake.base_url()), "{authorize}");
    assert!(
        authorize.contains("code_challenge_method=S256"),
        "{authorize}"
    );
    let again = request(addr, "POST", &format!("/consent/{token}/start"), &[], "").await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("used already"), "{}", again.body);
    assert_eq!(
        request(addr, "GET", &format!("/consent/{token}"), &[], "")
            .await
            .status,
        409
    );
    // Another account signs in: refused by the consent's account check, nothing stored.
    let callback = f
        .fake
        .authorize_url(&authorize, "intruder@contoso.example")
        .unwrap();
    let path = callback.split_once(&addr.to_string()).unwrap().1.to_owned();
    let a = request(addr, "GET", &path, &[], "").await;
    assert_ne!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("intruder@contoso.example"), "{}", a.body);
    assert_ne!(f.status("web").await, pb::TokenStatus::Active as i32);

    // A second link; the owner signs in as the mailbox: ACTIVE.
    let made = create("web").await;
    let token = token_of(&made.url);
    let a = request(addr, "POST", &format!("/consent/{token}/start"), &[], "").await;
    assert_eq!(a.status, 303);
    let callback = f
        .fake
        .authorize_url(a.header("location").unwrap(), WEB_USER)
        .unwrap();
    let path = callback.split_once(&addr.to_string()).unwrap().1.to_owned();
    let a = request(addr, "GET", &path, &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("Consent recorded"), "{}", a.body);
    f.wait_status("web", pb::TokenStatus::Active).await;
    let s = request(
        addr,
        "GET",
        &format!("/consent/{token}/status.json"),
        &[],
        "",
    )
    .await;
    assert!(s.body.contains("\"status\":\"ACTIVE\""), "{}", s.body);

    // Device code through a link: the page shows the code; the status follows to ACTIVE.
    let made = create("scan").await;
    let token = token_of(&made.url);
    let a = request(addr, "POST", &format!("/consent/{token}/start"), &[], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let code = f
        .fake
        .pending_device_codes()
        .last()
        .unwrap()
        .user_code
        .clone();
    assert!(a.body.contains(&code), "{}", a.body);
    assert!(a.body.contains("data-poll=\"/consent/"), "{}", a.body);
    f.fake.approve_device_code(&code, SCAN_USER).unwrap();
    f.wait_status("scan", pb::TokenStatus::Active).await;

    // Revoked: the page says so (410); listing shows it; revoking twice changes nothing.
    let made = create("dead").await;
    let token = token_of(&made.url);
    let id = made.link.unwrap().id;
    let revoked = admin
        .revoke_consent_link(pb::RevokeConsentLinkRequest {
            tenant: TENANT.into(),
            id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.state, "revoked");
    let a = request(addr, "GET", &format!("/consent/{token}"), &[], "").await;
    assert_eq!(a.status, 410);
    assert!(a.body.contains("withdrawn"), "{}", a.body);
    assert_eq!(
        request(addr, "POST", &format!("/consent/{token}/start"), &[], "")
            .await
            .status,
        410
    );
    let list = admin
        .list_consent_links(pb::ListConsentLinksRequest {
            tenant: TENANT.into(),
            mailbox: "dead".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .links;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "revoked");

    // Expired: the same record with its expiry in the past (as time would make it) → 410.
    let made = create("dead").await;
    let token = token_of(&made.url);
    let key = RecordKey::global("consent_link", &hash(&token));
    let record = store.get(&key).await.unwrap().unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&record.data).unwrap();
    json["expires"] = serde_json::Value::String("2020-01-01T00:00:00Z".into());
    store
        .put(
            &key,
            serde_json::to_vec(&json).unwrap(),
            Precondition::Version(record.version),
        )
        .await
        .unwrap();
    let a = request(addr, "GET", &format!("/consent/{token}"), &[], "").await;
    assert_eq!(a.status, 410, "{}", a.body);
    assert!(a.body.contains("expired"), "{}", a.body);
    assert_eq!(
        request(addr, "POST", &format!("/consent/{token}/start"), &[], "")
            .await
            .status,
        410
    );
    assert_eq!(
        f.status("dead").await,
        pb::TokenStatus::ReauthRequired as i32
    );

    // Authorization: a viewer may list but not create or revoke; another tenant's admin neither.
    let viewer = f.key("viewer", TENANT).await;
    let mut as_viewer = f.brokers.replicas[0].admin(&Secret::new(viewer));
    let err = as_viewer
        .create_consent_link(pb::CreateConsentLinkRequest {
            tenant: TENANT.into(),
            mailbox: "dead".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        as_viewer
            .list_consent_links(pb::ListConsentLinksRequest {
                tenant: TENANT.into(),
                mailbox: String::new(),
            })
            .await
            .is_ok()
    );
    let err = as_viewer
        .revoke_consent_link(pb::RevokeConsentLinkRequest {
            tenant: TENANT.into(),
            id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Bad input names the field.
    let err = admin
        .create_consent_link(pb::CreateConsentLinkRequest {
            tenant: TENANT.into(),
            mailbox: "dead".into(),
            ttl_seconds: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("ttl_seconds:"),
        "{}",
        err.message()
    );
}

/// `http.trusted_proxies` is checked when the broker reads its configuration: an entry that is
/// not an address or range, or one so wide that any client could name itself, is named by its
/// index and the broker refuses to start.
#[tokio::test]
async fn trusted_proxies_that_are_wrong_or_too_wide_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[http]\ntrusted_proxies = [\"10.0.0.0/24\", \"0.0.0.0/0\", \"proxy.example\"]\n",
    )
    .unwrap();
    let (code, err) = tokenfleet_testkit::agent_site::broker_print_config(
        &config,
        "TOKENFLEET_HTTP__TRUSTED_PROXIES",
    )
    .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("http.trusted_proxies[1]") && err.contains("\"0.0.0.0/0\" is too wide"),
        "{err}"
    );
    assert!(
        err.contains("http.trusted_proxies[2]")
            && err.contains("\"proxy.example\" is not an IP address or CIDR range"),
        "{err}"
    );
    assert!(!err.contains("http.trusted_proxies[0]"), "{err}");
}

/// A console session is held to its key's call rate (`[admin] call_rate_per_minute`,
/// `call_burst`), the same bucket as the key's Admin API calls: pages within it are served,
/// the next is `429` naming the key and the setting, with `Retry-After`.
#[tokio::test]
async fn a_console_session_is_held_to_its_keys_call_rate() {
    use tokenfleet_testkit::broker::{TestBroker, TestOptions, TestStore};
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions::binary("[admin]\ncall_rate_per_minute = 1\ncall_burst = 3\n"),
    )
    .await
    .unwrap();
    let addr = broker.http_addr;
    let page = request(addr, "GET", "/console/sign-in", &[], "").await;
    let pre = page.cookie("tf_signin").unwrap();
    let key = broker.admin_key.expose().to_owned();
    let a = request(
        addr,
        "POST",
        "/console/sign-in",
        &[
            ("Cookie", &format!("tf_signin={pre}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &form(&[("csrf", &csrf_of(&page.body)), ("api_key", &key)]),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let cookie = format!("tf_console={}", a.cookie("tf_console").unwrap());
    // One call of the burst through the API, two pages: the bucket is shared.
    let mut admin = broker.admin_client();
    admin.who_am_i(pb::WhoAmIRequest::default()).await.unwrap();
    for path in ["/console/", "/console/audit"] {
        let a = request(addr, "GET", path, &[("Cookie", &cookie)], "").await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    let a = request(addr, "GET", "/console/", &[("Cookie", &cookie)], "").await;
    assert_eq!(a.status, 429, "{}", a.body);
    let id = key.split('_').nth(1).unwrap();
    assert!(
        a.body
            .contains(&format!("API key `{id}` is over its call rate"))
            && a.body.contains("call_rate_per_minute"),
        "{}",
        a.body
    );
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_security_headers(&a, "rate-limited page");
    // The API call after it is refused too.
    let err = admin
        .who_am_i(pb::WhoAmIRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
}
