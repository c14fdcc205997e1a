//! The provider client (`tokenfleet-providers`) against the fake identity provider: every flow,
//! the documented error answers, and their classification.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{
    GrantType, MailPurpose, Provider, ProviderEndpoints, ProviderKind, Stamps,
};
use tokenfleet_providers::{
    DevicePoll, ErrorClass, GOOGLE_MAIL, MS_APP_ONLY, ProviderClient, ProviderSettings, TokenGrant,
    next_poll_interval, parse_pasted_code, skew,
};
use tokenfleet_seal::Secret;
use tokenfleet_testkit::fake_idp::{
    ClientSpec, Endpoint, FakeIdp, OTHER_RSA_KEY_PEM, SERVICE_ACCOUNT_KEY_PEM, ScriptedResponse,
};

const USER: &str = "scanner@contoso.example";
const TENANT: &str = "contoso.example";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";

fn provider(kind: ProviderKind, endpoints: ProviderEndpoints, client_id: &str) -> Provider {
    Provider {
        tenant: "acme".into(),
        name: "p".into(),
        kind,
        authority: if kind == ProviderKind::Microsoft {
            TENANT.into()
        } else {
            String::new()
        },
        client_id: client_id.into(),
        client_secret: None,
        endpoints,
        http_proxy: String::new(),
        http_proxy_password: None,
        extra_ca_pem: String::new(),
        scopes: vec![],
        service_account_key: None,
        stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
    }
}

fn client(p: &Provider, secret: Option<&str>) -> ProviderClient {
    let settings = ProviderSettings::from_provider(p, secret.map(Secret::new))
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    ProviderClient::new(settings).unwrap()
}

/// A fake with one user and a Microsoft client; returns the fake and the provider client.
async fn microsoft(spec: ClientSpec) -> (FakeIdp, ProviderClient) {
    let fake = FakeIdp::start().await.unwrap();
    fake.add_user(USER);
    let secret = spec.client_secret.clone();
    let id = spec.client_id.clone();
    fake.register_client(spec);
    let p = provider(
        ProviderKind::Microsoft,
        fake.microsoft_endpoints(TENANT),
        &id,
    );
    let c = client(&p, secret.as_deref());
    (fake, c)
}

fn delegated_scopes(c: &ProviderClient) -> Vec<String> {
    c.scopes_for(
        GrantType::DelegatedDeviceCode,
        &[MailPurpose::Send, MailPurpose::Pop],
    )
    .unwrap()
}

/// Device code sign-in approved by USER; returns the grant.
async fn consent_by_device_code(fake: &FakeIdp, c: &ProviderClient) -> TokenGrant {
    let auth = c.start_device_code(&delegated_scopes(c)).await.unwrap();
    fake.approve_device_code(&auth.user_code, USER).unwrap();
    match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Granted(g) => *g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn device_code_sign_in_succeeds() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let auth = c.start_device_code(&delegated_scopes(&c)).await.unwrap();
    assert_eq!(auth.verification_uri, fake.device_login_url());
    assert_eq!(auth.interval, Duration::from_secs(5));
    assert_eq!(auth.expires_in, Duration::from_secs(900));
    assert!(auth.message.contains(&auth.user_code), "{}", auth.message);
    assert!(
        !format!("{auth:?}").contains(auth.device_code.expose()),
        "device code leaked in Debug"
    );

    assert!(matches!(
        c.poll_device_code(&auth.device_code).await,
        DevicePoll::Pending
    ));
    fake.approve_device_code(&auth.user_code, USER).unwrap();
    fake.advance(auth.interval);
    let grant = match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Granted(g) => g,
        other => panic!("expected a grant, got {other:?}"),
    };
    assert!(
        grant.refresh_token.is_some(),
        "offline_access was requested"
    );
    assert!(fake.access_token_is_live(grant.access_token.expose()));
    assert_eq!(grant.expires_in, Duration::from_secs(3599));
    assert!(
        grant
            .scope
            .as_deref()
            .unwrap_or_default()
            .contains("SMTP.Send")
    );

    // The device flow is a public-client flow: no secret, scope with offline_access.
    let start = &fake.requests_to(Endpoint::MicrosoftDeviceCode)[0];
    assert!(start.param("scope").unwrap().contains("offline_access"));
    let polls = fake.requests_to(Endpoint::MicrosoftToken);
    assert_eq!(polls.len(), 2);
    assert!(
        polls
            .iter()
            .all(|r| r.param("client_secret").is_none() && r.param("client_id") == Some("app-1"))
    );
    assert_eq!(
        fake.token_requests("urn:ietf:params:oauth:grant-type:device_code"),
        2
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn no_refresh_token_without_offline_access() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let auth = c
        .start_device_code(&["https://outlook.office.com/SMTP.Send".to_owned()])
        .await
        .unwrap();
    fake.approve_device_code(&auth.user_code, USER).unwrap();
    match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Granted(g) => assert!(g.refresh_token.is_none()),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn slow_down_grows_the_interval_by_five_seconds_for_later_polls() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let auth = c.start_device_code(&delegated_scopes(&c)).await.unwrap();
    let mut interval = auth.interval;

    let first = c.poll_device_code(&auth.device_code).await;
    assert!(matches!(first, DevicePoll::Pending), "{first:?}");
    interval = next_poll_interval(interval, &first);
    // Polled again at once: too fast.
    let second = c.poll_device_code(&auth.device_code).await;
    assert!(matches!(second, DevicePoll::SlowDown), "{second:?}");
    interval = next_poll_interval(interval, &second);
    assert_eq!(interval, Duration::from_secs(10));

    // Waiting the grown interval is accepted…
    fake.advance(interval);
    let third = c.poll_device_code(&auth.device_code).await;
    assert!(matches!(third, DevicePoll::Pending), "{third:?}");
    interval = next_poll_interval(interval, &third);
    assert_eq!(
        interval,
        Duration::from_secs(10),
        "the increase stays for later polls"
    );
    // …and the old 5 s no longer is.
    fake.advance(Duration::from_secs(5));
    let fourth = c.poll_device_code(&auth.device_code).await;
    assert!(matches!(fourth, DevicePoll::SlowDown), "{fourth:?}");
    assert_eq!(
        next_poll_interval(interval, &fourth),
        Duration::from_secs(15)
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn device_code_expires() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let auth = c.start_device_code(&delegated_scopes(&c)).await.unwrap();
    fake.advance(auth.expires_in + Duration::from_secs(1));
    match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Denied(e) => {
            assert_eq!(e.class, ErrorClass::Expired, "{e}");
            assert_eq!(e.code, "AADSTS70019");
            assert!(e.fix.contains("tokenfleetctl mailbox consent"), "{e}");
        }
        other => panic!("expected expiry, got {other:?}"),
    }
}

#[tokio::test]
async fn device_code_declined() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let auth = c.start_device_code(&delegated_scopes(&c)).await.unwrap();
    fake.decline_device_code(&auth.user_code).unwrap();
    match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Denied(e) => {
            assert_eq!(e.class, ErrorClass::Declined, "{e}");
            assert_eq!(e.oauth_error(), Some("authorization_declined"));
        }
        other => panic!("expected a decline, got {other:?}"),
    }
}

#[tokio::test]
async fn device_code_without_public_client_flows_is_an_app_problem() {
    let mut spec = ClientSpec::public("app-1");
    spec.public_client_flows = false;
    let (fake, c) = microsoft(spec).await;
    let auth = c.start_device_code(&delegated_scopes(&c)).await.unwrap();
    fake.approve_device_code(&auth.user_code, USER).unwrap();
    match c.poll_device_code(&auth.device_code).await {
        DevicePoll::Denied(e) => {
            assert_eq!(
                (e.class, e.code.as_str()),
                (ErrorClass::AppMisconfigured, "AADSTS7000218"),
                "{e}"
            );
            assert!(e.fix.contains("Allow public client flows"), "{e}");
        }
        other => panic!("expected AADSTS7000218, got {other:?}"),
    }
}

#[tokio::test]
async fn auth_code_with_pkce_succeeds_and_a_wrong_verifier_is_rejected() {
    let (fake, c) = microsoft(ClientSpec::confidential("web-app", "right-secret")).await;
    let scopes = c
        .scopes_for(GrantType::DelegatedAuthCode, &[MailPurpose::Send])
        .unwrap();

    let auth = c
        .authorization_url(&scopes, REDIRECT, "state-1", Some(USER))
        .unwrap();
    assert!(
        auth.url
            .starts_with(&fake.microsoft_endpoints(TENANT).authorize_url),
        "{}",
        auth.url
    );
    assert!(
        auth.url.contains("code_challenge_method=S256") && auth.url.contains("state=state-1"),
        "{}",
        auth.url
    );
    assert!(
        !auth.url.contains(auth.pkce_verifier.expose()),
        "the verifier must not travel in the URL"
    );
    let redirect = fake.authorize_url(&auth.url, USER).unwrap();
    // The person pastes the whole redirect URL.
    let code = parse_pasted_code(&redirect, "state-1").unwrap();
    let grant = c
        .exchange_code(&code, &auth.pkce_verifier, REDIRECT)
        .await
        .unwrap();
    assert!(grant.refresh_token.is_some());
    assert!(fake.access_token_is_live(grant.access_token.expose()));
    let redeem = fake.requests_to(Endpoint::MicrosoftToken).pop().unwrap();
    assert_eq!(redeem.grant_type.as_deref(), Some("authorization_code"));
    assert_eq!(redeem.param("client_secret"), Some("right-secret"));
    assert_eq!(
        redeem.param("code_verifier"),
        Some(auth.pkce_verifier.expose())
    );

    // Same flow, wrong verifier.
    let auth = c
        .authorization_url(&scopes, REDIRECT, "state-2", None)
        .unwrap();
    let redirect = fake.authorize_url(&auth.url, USER).unwrap();
    let code = parse_pasted_code(&redirect, "state-2").unwrap();
    let wrong = Secret::new("x".repeat(43));
    let e = c.exchange_code(&code, &wrong, REDIRECT).await.unwrap_err();
    assert_eq!(e.oauth_error(), Some("invalid_grant"), "{e}");
    assert_eq!(e.code, "AADSTS501481");
    assert_eq!(
        e.class,
        ErrorClass::Expired,
        "the consent attempt must be started again: {e}"
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn pasted_redirect_url_of_another_attempt_is_refused() {
    let (fake, c) = microsoft(ClientSpec::confidential("web-app", "s")).await;
    let scopes = c
        .scopes_for(GrantType::DelegatedAuthCode, &[MailPurpose::Send])
        .unwrap();
    let auth = c
        .authorization_url(&scopes, REDIRECT, "attempt-A", None)
        .unwrap();
    let redirect = fake.authorize_url(&auth.url, USER).unwrap();
    let e = parse_pasted_code(&redirect, "attempt-B").unwrap_err();
    assert_eq!(e.code, "state_mismatch", "{e}");
    // The bare code (copied out of the URL) is accepted.
    let bare = url_param(&redirect, "code");
    assert_eq!(
        parse_pasted_code(&bare, "attempt-B").unwrap().expose(),
        bare
    );
}

fn url_param(url: &str, name: &str) -> String {
    let q = url.split_once('?').unwrap().1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn client_credentials_get_an_app_only_token() {
    let mut spec = ClientSpec::confidential("daemon-app", "right-secret");
    spec.app_only_mailbox = Some(USER.into());
    let (fake, c) = microsoft(spec).await;
    let scopes = c
        .scopes_for(GrantType::AppOnly, &[MailPurpose::Send])
        .unwrap();
    assert_eq!(scopes, vec![MS_APP_ONLY.to_owned()]);
    let grant = c.client_credentials(&scopes).await.unwrap();
    assert!(
        grant.refresh_token.is_none(),
        "client credentials never return a refresh token"
    );
    assert!(fake.access_token_is_live(grant.access_token.expose()));
    let req = fake.requests_to(Endpoint::MicrosoftToken).pop().unwrap();
    assert_eq!(req.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(req.param("scope"), Some(MS_APP_ONLY));
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn wrong_client_secret_is_an_app_problem_not_a_network_problem() {
    let fake = FakeIdp::start().await.unwrap();
    fake.register_client(ClientSpec::confidential("daemon-app", "right-secret"));
    let p = provider(
        ProviderKind::Microsoft,
        fake.microsoft_endpoints(TENANT),
        "daemon-app",
    );
    let c = client(&p, Some("wrong-secret"));
    let e = c
        .client_credentials(&[MS_APP_ONLY.to_owned()])
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::AppMisconfigured, "{e}");
    assert_eq!(e.code, "AADSTS7000215");
    assert_eq!(e.http_status, Some(401));
    assert!(e.trace_id().is_some() && e.correlation_id().is_some());
    let text = format!("{e} {e:?}");
    assert!(
        !text.to_lowercase().contains("network") && !text.contains("internet"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-secret") && !text.contains("right-secret"),
        "secret leaked: {text}"
    );
}

#[tokio::test]
async fn google_service_account_gets_a_token_with_jwt_bearer() {
    let fake = FakeIdp::start().await.unwrap();
    fake.add_user("printer@acme.example");
    let p = provider(
        ProviderKind::Google,
        fake.google_endpoints(),
        "unused-for-jwt",
    );
    let c = client(&p, None);
    let key = Secret::new(fake.service_account_json("relay@acme-project.iam.gserviceaccount.com"));
    let scopes = c
        .scopes_for(GrantType::ServiceAccount, &[MailPurpose::Send])
        .unwrap();
    assert_eq!(scopes, vec![GOOGLE_MAIL.to_owned()]);

    let grant = c
        .jwt_bearer(&key, "printer@acme.example", &scopes)
        .await
        .unwrap();
    assert!(grant.refresh_token.is_none());
    assert!(fake.access_token_is_live(grant.access_token.expose()));
    let req = fake.requests_to(Endpoint::GoogleToken).pop().unwrap();
    assert_eq!(
        req.grant_type.as_deref(),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );

    // Unknown mailbox, wrong key, missing delegation: the admin must fix something.
    let e = c
        .jwt_bearer(&key, "nobody@acme.example", &scopes)
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::AppMisconfigured, "{e}");
    assert_eq!(e.provider_message(), Some("Invalid email or User ID"));
    let mut json: serde_json::Value = serde_json::from_str(key.expose()).unwrap();
    assert_eq!(json["private_key"], SERVICE_ACCOUNT_KEY_PEM);
    json["private_key"] = OTHER_RSA_KEY_PEM.into();
    let wrong_key = Secret::new(json.to_string());
    assert_ne!(wrong_key.expose(), key.expose());
    let e = c
        .jwt_bearer(&wrong_key, "printer@acme.example", &scopes)
        .await
        .unwrap_err();
    assert_eq!(e.provider_message(), Some("Invalid JWT Signature."), "{e}");
    fake.set_service_account_scopes("relay@acme-project.iam.gserviceaccount.com", &[]);
    let e = c
        .jwt_bearer(&key, "printer@acme.example", &scopes)
        .await
        .unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::AppMisconfigured, "unauthorized_client"),
        "{e}"
    );
    assert!(e.fix.contains("Domain-wide delegation"), "{e}");
    assert!(!format!("{e:?}").contains("PRIVATE KEY"));
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn refresh_rotates_and_a_missing_refresh_token_is_surfaced() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let first = consent_by_device_code(&fake, &c).await;
    let rt1 = first.refresh_token.unwrap();
    let scopes = delegated_scopes(&c);

    let second = c.refresh(&rt1, &scopes).await.unwrap();
    let rt2 = second
        .refresh_token
        .expect("Microsoft rotates refresh tokens");
    assert_ne!(rt1.expose(), rt2.expose());
    assert_ne!(first.access_token.expose(), second.access_token.expose());
    // The old refresh token is not revoked by use.
    c.refresh(&rt1, &scopes).await.unwrap();

    fake.omit_refresh_token_next(1);
    let third = c.refresh(&rt2, &scopes).await.unwrap();
    assert!(
        third.refresh_token.is_none(),
        "no refresh token in the answer → keep the old one"
    );
    assert!(fake.access_token_is_live(third.access_token.expose()));
    assert_eq!(fake.token_requests("refresh_token"), 3);
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn refresh_token_dead_after_90_days_is_grant_dead() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let grant = consent_by_device_code(&fake, &c).await;
    let rt = grant.refresh_token.unwrap();
    fake.fail_next_refresh(rt.expose(), 700082);
    let e = c.refresh(&rt, &delegated_scopes(&c)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::GrantDead, "{e}");
    assert_eq!(e.code, "AADSTS700082");
    assert!(
        e.reason
            .contains("the refresh token expired after 90 days without use"),
        "{e}"
    );
    let e = e.for_mailbox("scanner");
    assert!(
        e.fix.contains("tokenfleetctl mailbox consent scanner"),
        "{e}"
    );
    assert!(
        !format!("{e} {e:?}").contains(rt.expose()),
        "refresh token leaked"
    );

    // A revoked grant (password change) is dead too.
    fake.revoke_grant(rt.expose()).unwrap();
    let e = c.refresh(&rt, &delegated_scopes(&c)).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::GrantDead, "AADSTS50173"),
        "{e}"
    );
}

#[tokio::test]
async fn unavailable_and_throttled_are_transient_and_retry_after_is_honoured() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let grant = consent_by_device_code(&fake, &c).await;
    let rt = grant.refresh_token.unwrap();
    let scopes = delegated_scopes(&c);

    fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::status(503).retry_after(7),
    );
    let e = c.refresh(&rt, &scopes).await.unwrap_err();
    assert_eq!(
        (e.class, e.http_status),
        (ErrorClass::Transient, Some(503)),
        "{e}"
    );
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));

    fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::microsoft_error(
            429,
            "temporarily_unavailable",
            90033,
            "Too many requests.",
        )
        .retry_after(30),
    );
    let e = c.refresh(&rt, &scopes).await.unwrap_err();
    assert_eq!(
        (e.class, e.http_status),
        (ErrorClass::Transient, Some(429)),
        "{e}"
    );
    assert_eq!(e.retry_after, Some(Duration::from_secs(30)));

    fake.set_outage(true);
    let e = c.refresh(&rt, &scopes).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    fake.set_outage(false);
    // The grant survived all of it.
    c.refresh(&rt, &scopes).await.unwrap();

    // During a device code poll a transient failure keeps the sign-in going.
    let auth = c.start_device_code(&scopes).await.unwrap();
    fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::status(503).retry_after(20),
    );
    let poll = c.poll_device_code(&auth.device_code).await;
    assert!(matches!(poll, DevicePoll::Retry(_)), "{poll:?}");
    assert_eq!(
        next_poll_interval(auth.interval, &poll),
        Duration::from_secs(20)
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn redirects_are_not_followed_and_timeouts_name_the_host() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::status(302).header("location", &fake.introspection_url()),
    );
    let e = c.refresh(&Secret::new("rt"), &[]).await.unwrap_err();
    assert_eq!(e.http_status, Some(302), "{e}");
    assert!(
        fake.requests_to(Endpoint::Introspect).is_empty(),
        "the redirect was followed"
    );

    let p = provider(
        ProviderKind::Microsoft,
        fake.microsoft_endpoints(TENANT),
        "app-1",
    );
    let settings = ProviderSettings::from_provider(&p, None)
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    let slow = ProviderClient::new(settings).unwrap();
    fake.set_latency(Duration::from_secs(2));
    let e = slow.refresh(&Secret::new("rt"), &[]).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Transient, "timeout"),
        "{e}"
    );
    assert!(e.reason.contains(&fake.addr().to_string()), "{e}");
}

#[tokio::test]
async fn connection_refused_is_transient_and_names_the_host() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoints = ProviderEndpoints {
        token_url: format!("http://127.0.0.1:{port}/{TENANT}/oauth2/v2.0/token"),
        ..Default::default()
    };
    let c = client(&provider(ProviderKind::Microsoft, endpoints, "app-1"), None);
    let e = c.refresh(&Secret::new("rt"), &[]).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert_eq!(e.code, "network");
    assert!(e.reason.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(e.reason.contains("connection refused"), "{e}");
}

#[tokio::test]
async fn google_refuses_device_code_with_an_explanation() {
    let fake = FakeIdp::start().await.unwrap();
    let c = client(
        &provider(ProviderKind::Google, fake.google_endpoints(), "g-app"),
        Some("g-secret"),
    );
    assert!(
        c.scopes_for(GrantType::DelegatedDeviceCode, &[MailPurpose::Send])
            .is_err()
    );
    let e = c
        .start_device_code(&[GOOGLE_MAIL.to_owned()])
        .await
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
    assert!(fake.requests().is_empty(), "nothing should have been sent");
}

#[tokio::test]
async fn google_auth_code_refresh_and_revocation() {
    let fake = FakeIdp::start().await.unwrap();
    fake.add_user(USER);
    fake.register_client(ClientSpec::confidential("g-app", "g-secret"));
    let c = client(
        &provider(ProviderKind::Google, fake.google_endpoints(), "g-app"),
        Some("g-secret"),
    );
    let scopes = c
        .scopes_for(GrantType::DelegatedAuthCode, &[MailPurpose::Send])
        .unwrap();
    let auth = c.authorization_url(&scopes, REDIRECT, "st", None).unwrap();
    assert!(auth.url.contains("access_type=offline"), "{}", auth.url);
    let redirect = fake.authorize_url(&auth.url, USER).unwrap();
    let code = parse_pasted_code(&redirect, "st").unwrap();
    let grant = c
        .exchange_code(&code, &auth.pkce_verifier, REDIRECT)
        .await
        .unwrap();
    let rt = grant
        .refresh_token
        .expect("offline access gives a refresh token");

    // Google does not rotate: the refresh answer has no refresh token.
    let refreshed = c.refresh(&rt, &scopes).await.unwrap();
    assert!(refreshed.refresh_token.is_none());

    c.revoke(&rt).await.unwrap();
    assert!(!fake.access_token_is_live(refreshed.access_token.expose()));
    let e = c.refresh(&rt, &scopes).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::GrantDead, "invalid_grant"),
        "{e}"
    );
    assert!(
        e.reason.contains("7 days") && e.reason.contains("6 months"),
        "{e}"
    );
    assert_eq!(
        e.provider_message(),
        Some("Token has been expired or revoked.")
    );
    // Revoking again is not an error (already gone).
    c.revoke(&rt).await.unwrap();
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn microsoft_has_no_revocation_endpoint() {
    let (_fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let e = c.revoke(&Secret::new("rt")).await.unwrap_err();
    assert_eq!(e.code, "revocation_unsupported");
    assert!(e.fix.contains("Revoke sessions"), "{e}");
}

#[tokio::test]
async fn server_date_reveals_clock_skew() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    fake.advance(Duration::from_secs(300));
    let grant = consent_by_device_code(&fake, &c).await;
    let s = skew(grant.server_date, OffsetDateTime::now_utc()).expect("the fake sends Date");
    assert!(
        s >= Duration::from_secs(290) && s <= Duration::from_secs(310),
        "{s:?}"
    );
}

/// A minimal HTTP/1.1 form POST, so the test does not need another HTTP client.
async fn post_form(url: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.split_once("\r\n\r\n").unwrap().1.to_owned())
}

async fn introspect(fake: &FakeIdp, token: &str) -> serde_json::Value {
    let (status, body) = post_form(&fake.introspection_url(), &format!("token={token}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn introspection_reports_issued_tokens_active_and_others_inactive() {
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let grant = consent_by_device_code(&fake, &c).await;
    let body = introspect(&fake, grant.access_token.expose()).await;
    assert_eq!(body["active"], true);
    assert_eq!(body["username"], USER);
    assert!(body["scope"].as_str().unwrap().contains("SMTP.Send"));
    assert!(body["exp"].as_i64().unwrap() > OffsetDateTime::now_utc().unix_timestamp());

    let body = introspect(&fake, "garbage").await;
    assert_eq!(body, serde_json::json!({"active": false}));

    // Expired tokens are inactive.
    fake.advance(Duration::from_secs(3600));
    let body = introspect(&fake, grant.access_token.expose()).await;
    assert_eq!(body["active"], false);
    fake.assert_no_violations().unwrap();
}

/// Tokens carry their resource as `aud`: one refresh token redeemed for Graph gives a token whose
/// audience is Graph (only with consent for it), and a resource server that names its audiences
/// in the introspection request gets `active: false` for a token of another resource.
#[tokio::test]
async fn tokens_carry_their_audience_and_resource_servers_get_only_theirs() {
    use tokenfleet_providers::{MS_GRAPH_MAIL_SEND, MS_OFFLINE_ACCESS, TokenResource};
    let (fake, c) = microsoft(ClientSpec::public("app-1")).await;
    let grant = consent_by_device_code(&fake, &c).await;
    let mail = introspect(&fake, grant.access_token.expose()).await;
    assert_eq!(mail["aud"], "https://outlook.office.com", "{mail}");
    let rt = grant.refresh_token.clone().unwrap();
    let graph_scopes = c
        .scopes_for_resource(
            GrantType::DelegatedDeviceCode,
            &[MailPurpose::Send],
            TokenResource::MicrosoftGraph,
        )
        .unwrap();
    assert_eq!(graph_scopes, [MS_GRAPH_MAIL_SEND, MS_OFFLINE_ACCESS]);
    // Without consent for Graph (the person consented to the mail protocols only): 65001.
    let e = c.refresh(&rt, &graph_scopes).await.unwrap_err();
    assert_eq!(e.code, "AADSTS65001", "{e}");

    // An admin consented the app for Graph's Mail.Send: the same refresh token now mints it.
    let mut spec = ClientSpec::public("app-1");
    spec.consented_scopes = vec![MS_GRAPH_MAIL_SEND.to_owned()];
    fake.register_client(spec);
    let graph = c.refresh(&rt, &graph_scopes).await.unwrap();
    let body = introspect(&fake, graph.access_token.expose()).await;
    assert_eq!(body["aud"], "https://graph.microsoft.com", "{body}");
    assert_eq!(body["scope"], MS_GRAPH_MAIL_SEND);
    assert_eq!(body["username"], USER);

    // Asked as a resource server: only tokens of the audiences it names are active.
    let as_server = |audience: &'static str, token: String| {
        let url = format!("{}?audience={audience}", fake.introspection_url());
        async move {
            let (status, body) = post_form(&url, &format!("token={token}")).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["active"].clone()
        }
    };
    let (mail_token, graph_token) = (
        grant.access_token.expose().to_owned(),
        graph.access_token.expose().to_owned(),
    );
    assert_eq!(
        as_server("https://graph.microsoft.com", graph_token.clone()).await,
        true
    );
    assert_eq!(
        as_server("https://graph.microsoft.com", mail_token.clone()).await,
        false
    );
    assert_eq!(
        as_server("https://outlook.office.com", mail_token).await,
        true
    );
    assert_eq!(
        as_server("https://outlook.office.com", graph_token).await,
        false
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn strict_mode_records_unexpected_requests() {
    let fake = FakeIdp::start().await.unwrap();
    let (status, _) = post_form(&format!("{}/common/oauth2/token", fake.base_url()), "x=1").await;
    assert_eq!(status, 404);
    let err = fake.assert_no_violations().unwrap_err();
    assert!(err.to_string().contains("/common/oauth2/token"), "{err}");
}
