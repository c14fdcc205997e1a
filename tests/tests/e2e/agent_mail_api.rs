//! The agent's Microsoft Graph and Gmail API upstreams against the test kit's fake mail API,
//! which checks every request exactly: the message arrives byte-identical, throttling answers
//! become transient failures with the `Retry-After` delay, 401 is an auth rejection, 400 is
//! permanent with the API's message, and a wrong token is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenfleet_agent::sasl::AccessToken;
use tokenfleet_agent::upstream::api::{ApiSettings, GmailDelivery, GraphDelivery};
use tokenfleet_agent::upstream::{Credentials, Delivery, FailureKind, OutgoingMessage};
use tokenfleet_testkit::fake_mail_api::{FakeMailApi, MailApi, Scripted};

const MAILBOX: &str = "scanner+floor2@contoso.example";
const TOKEN: &str = "graph-access-token-0123456789abcdef";
const GMAIL_MAILBOX: &str = "printer@example-google.test";
const GMAIL_TOKEN: &str = "ya29.gmail-access-token-0123456789";

/// A message with 8-bit text, a long binary-ish attachment line and both recipients in headers.
fn message() -> Vec<u8> {
    let mut m = b"From: \"Scanner\" <scanner+floor2@contoso.example>\r\n\
To: alice@contoso.example,\r\n bob@contoso.example\r\n\
Subject: Scan =?utf-8?q?f=C3=BCr?= you\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n"
        .to_vec();
    m.extend_from_slice("Grüße aus dem Drucker\r\n.leading dot\r\n".as_bytes());
    for i in 0..2000u32 {
        m.extend_from_slice(format!("line {i} {}\r\n", "x".repeat((i % 70) as usize)).as_bytes());
    }
    m
}

fn rcpts() -> Vec<String> {
    vec![
        "alice@contoso.example".to_owned(),
        "bob@contoso.example".to_owned(),
    ]
}

fn creds(user: &str, token: &str) -> Credentials {
    Credentials {
        username: user.to_owned(),
        token: AccessToken::new(token),
    }
}

async fn fake() -> FakeMailApi {
    let fake = FakeMailApi::start().await.unwrap();
    fake.expect_token(MAILBOX, TOKEN);
    fake.expect_token(GMAIL_MAILBOX, GMAIL_TOKEN);
    fake
}

fn graph(fake: &FakeMailApi) -> GraphDelivery {
    GraphDelivery::new(&ApiSettings {
        base_url: Some(fake.graph_base_url()),
        timeout: Some(Duration::from_secs(20)),
        ..ApiSettings::default()
    })
    .unwrap()
}

fn gmail(fake: &FakeMailApi) -> GmailDelivery {
    GmailDelivery::new(&ApiSettings {
        base_url: Some(fake.gmail_base_url()),
        timeout: Some(Duration::from_secs(20)),
        ..ApiSettings::default()
    })
    .unwrap()
}

#[tokio::test]
async fn graph_and_gmail_deliver_byte_identical_mime() {
    let fake = fake().await;
    let data = message();
    fake.expect_mime(&data);
    let rcpts = rcpts();
    let msg = OutgoingMessage {
        from: MAILBOX,
        rcpts: &rcpts,
        data: &data,
    };

    let receipt = graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap();
    assert_eq!(receipt.final_reply, "HTTP 202 Accepted");

    let receipt = gmail(&fake)
        .send(msg, &creds(GMAIL_MAILBOX, GMAIL_TOKEN))
        .await
        .unwrap();
    assert!(
        receipt.final_reply.starts_with("HTTP 200 OK id="),
        "{}",
        receipt.final_reply
    );

    // Over the simple-send limit: the media upload endpoint, the message as is.
    let receipt = gmail(&fake)
        .with_simple_send_limit(1024)
        .send(msg, &creds(GMAIL_MAILBOX, GMAIL_TOKEN))
        .await
        .unwrap();
    assert!(
        receipt.final_reply.starts_with("HTTP 200 OK id="),
        "{}",
        receipt.final_reply
    );

    assert_eq!(fake.violations(), Vec::<String>::new());
    let requests = fake.requests();
    let apis: Vec<MailApi> = requests.iter().map(|r| r.api).collect();
    assert_eq!(
        apis,
        vec![MailApi::Graph, MailApi::Gmail, MailApi::GmailUpload]
    );
    for r in &requests {
        assert!(r.authorized, "{r:?}");
        assert!(r.mime == data, "{:?}: message not byte-identical", r.api);
    }
    assert_eq!(
        requests[0].user, MAILBOX,
        "the + in the address survives the path"
    );
    assert_eq!(requests[1].user, GMAIL_MAILBOX);
}

/// `message()` padded with body lines to `size` bytes.
fn message_of_size(size: usize) -> Vec<u8> {
    let mut m = message();
    let line = format!("{}\r\n", "y".repeat(76));
    while m.len() + line.len() <= size {
        m.extend_from_slice(line.as_bytes());
    }
    m.resize(size - 2, b'z');
    m.extend_from_slice(b"\r\n");
    m
}

#[tokio::test]
async fn graph_takes_up_to_4_mb_per_request_and_refuses_larger_without_sending() {
    let fake = fake().await;
    let rcpts = rcpts();
    let send = |data: Vec<u8>| {
        let graph = graph(&fake);
        let rcpts = &rcpts;
        async move {
            let message = OutgoingMessage {
                from: MAILBOX,
                rcpts,
                data: &data,
            };
            graph.send(message, &creds(MAILBOX, TOKEN)).await
        }
    };
    // 3 MiB of MIME is exactly 4 MiB of base64: the largest message Graph takes.
    let fits = message_of_size(3 * 1024 * 1024);
    fake.expect_mime(&fits);
    let receipt = send(fits.clone()).await.unwrap();
    assert!(
        receipt.final_reply.starts_with("HTTP 202"),
        "{}",
        receipt.final_reply
    );
    assert_eq!(fake.requests().len(), 1);
    assert!(fake.requests()[0].mime == fits);

    // Three bytes more is one base64 quantum over: refused here, nothing is posted.
    let err = send(message_of_size(3 * 1024 * 1024 + 3))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Permanent);
    assert!(
        err.final_reply.contains("3145731 bytes, 4194308 as base64")
            && err.final_reply.contains("at most 4194304 bytes"),
        "{}",
        err.final_reply
    );
    assert_eq!(fake.requests().len(), 1, "nothing was posted");
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn envelope_only_recipients_become_bcc_and_header_only_ones_are_refused() {
    let fake = fake().await;
    let data = message();
    let mut rcpts = rcpts();
    rcpts.push("archive@contoso.example".to_owned());
    let msg = OutgoingMessage {
        from: MAILBOX,
        rcpts: &rcpts,
        data: &data,
    };
    graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap();
    let sent = &fake.requests()[0].mime;
    assert!(sent.starts_with(b"Bcc: archive@contoso.example\r\n"));
    assert!(
        sent[30..] == data[..],
        "the rest of the message is unchanged"
    );

    let only_alice = vec!["alice@contoso.example".to_owned()];
    let err = gmail(&fake)
        .send(
            OutgoingMessage {
                from: MAILBOX,
                rcpts: &only_alice,
                data: &data,
            },
            &creds(GMAIL_MAILBOX, GMAIL_TOKEN),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Permanent);
    assert!(
        err.final_reply.contains("<bob@contoso.example>"),
        "{}",
        err.final_reply
    );
    assert_eq!(fake.requests().len(), 1, "nothing was sent");
}

#[tokio::test]
async fn throttling_is_transient_with_retry_after_in_both_forms() {
    let fake = fake().await;
    let data = message();
    let rcpts = rcpts();
    let msg = OutgoingMessage {
        from: MAILBOX,
        rcpts: &rcpts,
        data: &data,
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let clock = Arc::new(move || now);

    fake.script(
        MailApi::Graph,
        Scripted::Throttled {
            retry_after: "7".into(),
        },
    );
    let err = graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert!(
        err.final_reply.starts_with("HTTP 429 TooManyRequests"),
        "{}",
        err.final_reply
    );

    let date = httpdate_fmt(now + Duration::from_secs(7));
    fake.script(MailApi::Gmail, Scripted::Throttled { retry_after: date });
    let err = gmail(&fake)
        .with_clock(clock.clone())
        .send(msg, &creds(GMAIL_MAILBOX, GMAIL_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert!(
        err.final_reply.starts_with("HTTP 429 RESOURCE_EXHAUSTED"),
        "{}",
        err.final_reply
    );

    fake.script(
        MailApi::Graph,
        Scripted::Unavailable {
            retry_after: Some("30".into()),
        },
    );
    let err = graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind, err.retry_after),
        (FailureKind::Transient, Some(Duration::from_secs(30)))
    );
    assert!(
        err.final_reply.starts_with("HTTP 503"),
        "{}",
        err.final_reply
    );

    // The spool retries: the next attempt goes through.
    graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap();
    assert_eq!(fake.violations(), Vec::<String>::new());
}

fn httpdate_fmt(t: SystemTime) -> String {
    // RFC 7231 IMF-fixdate, as servers send it.
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let dt = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    dt.format(&format).unwrap()
}

#[tokio::test]
async fn unauthorized_bad_request_and_wrong_token() {
    let fake = fake().await;
    let data = message();
    let rcpts = rcpts();
    let msg = OutgoingMessage {
        from: MAILBOX,
        rcpts: &rcpts,
        data: &data,
    };

    fake.script(MailApi::Graph, Scripted::Unauthorized);
    let err = graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::AuthRejected);
    assert!(
        err.final_reply
            .starts_with("HTTP 401 InvalidAuthenticationToken: Access token validation failure"),
        "{}",
        err.final_reply
    );
    assert!(
        err.final_reply.contains("WWW-Authenticate: Bearer"),
        "{}",
        err.final_reply
    );
    assert!(
        err.auth_challenge_json
            .as_deref()
            .unwrap()
            .contains("InvalidAuthenticationToken")
    );

    fake.script(
        MailApi::Gmail,
        Scripted::BadRequest {
            message: "Invalid To header".into(),
        },
    );
    let err = gmail(&fake)
        .send(msg, &creds(GMAIL_MAILBOX, GMAIL_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Permanent);
    assert_eq!(
        err.final_reply,
        "HTTP 400 INVALID_ARGUMENT: Invalid To header"
    );

    fake.script(
        MailApi::Graph,
        Scripted::BadRequest {
            message: "At least one recipient is not valid.".into(),
        },
    );
    let err = graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Permanent);
    assert_eq!(
        err.final_reply,
        "HTTP 400 ErrorInvalidRecipients: At least one recipient is not valid."
    );

    // A wrong token: the fake refuses it (it really checks), as the API would.
    let wrong = "graph-access-token-WRONG-0000000000";
    tokenfleet_testkit::logs::secret(wrong);
    let err = graph(&fake)
        .send(msg, &creds(MAILBOX, wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::AuthRejected);
    let err = gmail(&fake)
        .send(msg, &creds(GMAIL_MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::AuthRejected);
    assert!(
        err.final_reply.starts_with("HTTP 401 UNAUTHENTICATED"),
        "{}",
        err.final_reply
    );
    assert!(
        err.final_reply.contains(r#"error="invalid_token""#),
        "{}",
        err.final_reply
    );
    assert!(!err.final_reply.contains(TOKEN));
    let last = fake.requests();
    assert!(!last[last.len() - 1].authorized && !last[last.len() - 2].authorized);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn unreachable_api_is_transient() {
    // A port that was just free: connection refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let delivery = GraphDelivery::new(&ApiSettings {
        base_url: Some(format!("http://127.0.0.1:{port}/v1.0")),
        timeout: Some(Duration::from_secs(5)),
        ..ApiSettings::default()
    })
    .unwrap();
    let data = message();
    let rcpts = rcpts();
    let err = delivery
        .send(
            OutgoingMessage {
                from: MAILBOX,
                rcpts: &rcpts,
                data: &data,
            },
            &creds(MAILBOX, TOKEN),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert!(
        err.final_reply.contains("connection failed"),
        "{}",
        err.final_reply
    );
    assert!(!err.final_reply.contains(TOKEN));
    assert!(
        GraphDelivery::new(&ApiSettings {
            base_url: Some("not a url".into()),
            ..ApiSettings::default()
        })
        .is_err()
    );
}

/// The agent's own delivery worker (production device factory, spool, token cache) over the Graph
/// and Gmail APIs: a `429` with `Retry-After: 7` holds the message for 7 s — the worker's base
/// backoff is only 1 s — and it goes out once that has passed, byte-identical.
#[tokio::test]
async fn the_delivery_worker_honours_retry_after_on_both_apis() {
    use std::sync::Mutex;
    use tokenfleet_agent::runtime::Clock;
    use tokenfleet_agent::runtime::devices::{DeviceRegistry, UpstreamDeliveries};
    use tokenfleet_agent::runtime::status::{Outcome, StatusBook};
    use tokenfleet_agent::runtime::tokens::{
        IssuedToken, TokenAnswer, TokenCache, TokenFailure, TokenKey, TokenSource,
    };
    use tokenfleet_agent::runtime::worker::{DeliveryWorker, WorkerSettings};
    use tokenfleet_agent::spool::{Envelope, Spool};
    use tokenfleet_proto::v1 as pb;

    #[derive(Debug)]
    struct SteppedClock(Mutex<SystemTime>);
    impl Clock for SteppedClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }
    /// The broker's answer: the token the fake API expects for the mailbox asked for.
    struct Tokens(Arc<SteppedClock>);
    #[async_trait::async_trait]
    impl TokenSource for Tokens {
        async fn issue(&self, key: &TokenKey) -> Result<TokenAnswer, TokenFailure> {
            let (address, token) = if key.mailbox == "graph-box" {
                (MAILBOX, TOKEN)
            } else {
                (GMAIL_MAILBOX, GMAIL_TOKEN)
            };
            Ok(TokenAnswer::Token(IssuedToken {
                token: AccessToken::new(token),
                expires: self.0.now() + Duration::from_secs(3600),
                sasl_username: address.to_owned(),
                mailbox: key.mailbox.clone(),
            }))
        }
    }
    fn device(
        name: &str,
        mailbox: &str,
        address: &str,
        method: pb::SendMethod,
        base: String,
    ) -> pb::AgentDevice {
        pb::AgentDevice {
            name: name.into(),
            sender_mode: pb::SenderMode::FixedAdmin as i32,
            admin_mailbox: Some(pb::MailboxRef {
                name: mailbox.into(),
                address: address.into(),
                kind: pb::MailboxKind::Admin as i32,
            }),
            smtp: Some(pb::SmtpProfile {
                method: method as i32,
                api_base_url: base,
                timeout_seconds: 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    tokenfleet_testkit::logs::secret(TOKEN);
    tokenfleet_testkit::logs::secret(GMAIL_TOKEN);
    let fake = fake().await;
    let data = message();
    fake.expect_mime(&data);
    fake.script(
        MailApi::Graph,
        Scripted::Throttled {
            retry_after: "7".into(),
        },
    );
    fake.script(
        MailApi::Gmail,
        Scripted::Throttled {
            retry_after: "7".into(),
        },
    );

    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let spool = Arc::new(Spool::open(&spool_dir).unwrap());
    let clock = Arc::new(SteppedClock(Mutex::new(
        SystemTime::now() + Duration::from_secs(1),
    )));
    let tokens = Arc::new(TokenCache::new(
        Arc::new(Tokens(Arc::clone(&clock))),
        Arc::clone(&clock) as Arc<dyn Clock>,
        Duration::from_secs(300),
    ));
    let registry = Arc::new(DeviceRegistry::new(Arc::new(UpstreamDeliveries)));
    registry.apply(pb::AgentConfig {
        tenant: "acme".into(),
        agent: "site".into(),
        devices: vec![
            device(
                "mfp-graph",
                "graph-box",
                MAILBOX,
                pb::SendMethod::Graph,
                fake.graph_base_url(),
            ),
            device(
                "mfp-gmail",
                "gmail-box",
                GMAIL_MAILBOX,
                pb::SendMethod::GmailApi,
                fake.gmail_base_url(),
            ),
        ],
        revision: "r1".into(),
        heartbeat_seconds: 30,
    });
    let worker = Arc::new(
        DeliveryWorker::new(
            Arc::clone(&spool),
            &spool_dir,
            registry,
            tokens,
            Arc::new(StatusBook::open(dir.path())),
            Arc::clone(&clock) as Arc<dyn Clock>,
            WorkerSettings {
                retry_base: Duration::from_secs(1),
                ..WorkerSettings::default()
            },
            Arc::new(tokio::sync::Notify::new()),
        )
        .with_jitter(Arc::new(|| 0.0)),
    );
    for device in ["mfp-graph", "mfp-gmail"] {
        let envelope = Envelope {
            device: device.into(),
            from: "scanner@contoso.example".into(),
            rcpts: rcpts(),
            mailbox: String::new(),
            user_address: String::new(),
        };
        spool.accept(&envelope, &data).unwrap();
    }
    let outcomes = |settled: &[tokenfleet_agent::runtime::worker::Settled]| {
        let mut o: Vec<Outcome> = settled.iter().map(|s| s.outcome).collect();
        o.sort_by_key(|o| o.as_str());
        o
    };

    let first = worker.run_once().await;
    assert_eq!(
        outcomes(&first),
        [Outcome::Retrying, Outcome::Retrying],
        "{first:?}"
    );
    assert_eq!(fake.requests().len(), 2);
    let start = clock.now();
    for id in spool.queued().unwrap() {
        let meta = spool.entry(&id).unwrap();
        let wait = Duration::from_millis(meta.next_attempt_ms)
            .saturating_sub(start.duration_since(std::time::UNIX_EPOCH).unwrap());
        assert!(
            wait >= Duration::from_secs(6) && wait <= Duration::from_secs(8),
            "Retry-After 7 s should decide the next attempt, not the 1 s base: {wait:?} ({meta:?})"
        );
        assert!(
            meta.last_error.as_deref().unwrap_or("").contains("429"),
            "{meta:?}"
        );
    }

    // Past the 1 s base backoff but before Retry-After: nothing is sent.
    *clock.0.lock().unwrap() = start + Duration::from_secs(3);
    assert!(worker.run_once().await.is_empty());
    assert_eq!(
        fake.requests().len(),
        2,
        "no request before Retry-After has passed"
    );

    *clock.0.lock().unwrap() = start + Duration::from_secs(8);
    let second = worker.run_once().await;
    assert_eq!(
        outcomes(&second),
        [Outcome::Delivered, Outcome::Delivered],
        "{second:?}"
    );
    assert!(spool.queued().unwrap().is_empty());
    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    for (api, ok) in [(MailApi::Graph, 202), (MailApi::Gmail, 200)] {
        let statuses: Vec<u16> = requests
            .iter()
            .filter(|r| r.api == api)
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [429, ok], "{api:?}");
    }
    assert!(requests.iter().all(|r| r.authorized && r.mime == data));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

/// End to end through the real broker and agent binaries: a Microsoft device that sends with
/// Graph (`smtp.method graph`) is handed a token for the Graph resource, minted from the same
/// app-only grant as the mailbox's Exchange Online token. The fake Graph validates every token at
/// the identity provider's introspection, audience included, as Graph does: a token for
/// `outlook.office365.com` (what the broker handed out before tokens were per resource) gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_device_gets_a_token_for_the_graph_audience_through_the_real_agent() {
    use tokenfleet_proto::v1 as pb;
    use tokenfleet_testkit::agent_site::{ADDRESS, AgentSite, SiteOptions, eventually};
    use tokenfleet_testkit::fake_idp::Endpoint;

    let api = FakeMailApi::start().await.unwrap();
    let base = api.graph_base_url();
    let mut site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        device: Box::new(move |_| pb::Device {
            smtp: Some(pb::SmtpProfile {
                method: pb::SendMethod::Graph as i32,
                api_base_url: base,
                timeout_seconds: 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..SiteOptions::default()
    })
    .await;
    api.validate_with_introspection(&site.fake.introspection_url());

    site.print(1, None).await;
    let request = eventually(
        "the message at the fake Graph",
        Duration::from_secs(40),
        || async {
            api.requests()
                .into_iter()
                .find(|r| r.api == MailApi::Graph && r.status == 202)
        },
    )
    .await;
    assert!(request.authorized);
    assert!(request.user.eq_ignore_ascii_case(ADDRESS), "{request:?}");
    let refused: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.status == 401)
        .collect();
    assert!(refused.is_empty(), "Graph refused a token: {refused:?}");
    assert!(api.violations().is_empty(), "{:?}", api.violations());

    // The broker asked the identity provider for the Graph resource (client credentials with
    // Graph's `.default`), and Graph checked the audience at the introspection endpoint.
    let scopes: Vec<String> = site
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .iter()
        .filter_map(|r| r.param("scope").map(str::to_owned))
        .collect();
    assert!(
        scopes
            .iter()
            .any(|s| s == tokenfleet_providers::MS_GRAPH_APP_ONLY),
        "no Graph token was requested: {scopes:?}"
    );
    let introspections = site.fake.requests_to(Endpoint::Introspect);
    assert!(
        introspections.iter().any(|r| r
            .query
            .iter()
            .any(|(k, v)| k == "audience" && v == "https://graph.microsoft.com")),
        "{introspections:?}"
    );
    assert_eq!(site.stop_agent(), Some(0));
    site.fake.assert_no_violations().unwrap();
}

/// The agent's own check, in front of every upstream: no token in clear text (no TLS, `http://`,
/// or verification off) to a host that is not loopback unless the profile allows it. Refused
/// before any connection is made (the `.invalid` hosts would fail DNS otherwise).
#[tokio::test]
async fn the_agent_refuses_to_send_tokens_in_clear_to_other_hosts() {
    use tokenfleet_agent::upstream::smtp::{Security, SmtpDelivery, SmtpSettings};
    use tokenfleet_agent::upstream::tls::TlsSettings;

    let rcpts = rcpts();
    let data = message();
    let msg = OutgoingMessage {
        from: MAILBOX,
        rcpts: &rcpts,
        data: &data,
    };
    let plain = SmtpDelivery::new(SmtpSettings::new("smtp.invalid", 25, Security::None));
    let err = plain.send(msg, &creds(MAILBOX, TOKEN)).await.unwrap_err();
    assert!(
        err.final_reply
            .contains("refusing to send the access token in clear text"),
        "{}",
        err.final_reply
    );
    assert!(err.final_reply.contains("insecure_allow_cleartext_tokens"));
    assert!(!err.final_reply.contains(TOKEN));

    let mut unverified = SmtpSettings::new("smtp.invalid", 465, Security::ImplicitTls);
    unverified.tls.skip_verification = true;
    let err = SmtpDelivery::new(unverified)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert!(
        err.final_reply
            .contains("smtp.skip_certificate_verification"),
        "{}",
        err.final_reply
    );

    // With the profile's explicit setting the check lets it through (and DNS then fails).
    let mut allowed = SmtpSettings::new("smtp.invalid", 25, Security::None);
    allowed.tls.allow_cleartext_tokens = true;
    let err = SmtpDelivery::new(allowed)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .unwrap_err();
    assert!(!err.final_reply.contains("refusing"), "{}", err.final_reply);

    // A Bearer token over http:// only to loopback.
    let err = GraphDelivery::new(&ApiSettings {
        base_url: Some("http://graph.invalid/v1.0".into()),
        ..ApiSettings::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("in clear text"), "{err}");
    GraphDelivery::new(&ApiSettings {
        base_url: Some("http://graph.invalid/v1.0".into()),
        tls: TlsSettings {
            allow_cleartext_tokens: true,
            ..TlsSettings::default()
        },
        ..ApiSettings::default()
    })
    .unwrap();
    let fake = fake().await;
    graph(&fake)
        .send(msg, &creds(MAILBOX, TOKEN))
        .await
        .expect("http:// to 127.0.0.1 stays allowed");
}
