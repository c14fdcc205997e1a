//! Connection tests end to end: one site — the real agent binary enrolled at a TLS broker, a
//! real Dovecot (plain ports and TLS ports whose certificate comes from a CA of this test) — and
//! the device reconfigured between the cases. Every verdict is asked for twice: with the real
//! `tokenfleetctl device test` (exit code 0 for OK, 1 otherwise, the verdict printed) and with
//! the admin API (`Admin.TestConnection`):
//!
//! - a good setup → OK (send and fetch);
//! - a closed loopback port → CONNECTION_REFUSED;
//! - Dovecot's TLS port with a CA the profile does not trust → CERTIFICATE_UNTRUSTED;
//! - a token the identity provider's introspection calls inactive → TOKEN_REJECTED.
//!
//! The periodic tests run too (every 2 s here): the fleet status shows their result as
//! `last_connection_test`, and a failing one makes the device DEGRADED with the verdict.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    AGENT, AgentSite, DEVICE, MAILBOX, SiteOptions, TENANT, TestPki, eventually, free_port,
    plain_fetch, plain_smtp,
};
use tokenfleet_testkit::dovecot::Dovecot;

fn verdict_name(v: i32) -> String {
    pb::ConnectionVerdict::try_from(v)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("CONNECTION_VERDICT_")
        .to_owned()
}

/// Runs the test through the ctl and the admin API; both must give `expected`.
async fn check(
    site: &AgentSite,
    target: pb::ConnectionTarget,
    expected: pb::ConnectionVerdict,
) -> pb::ConnectionTestResult {
    let want = verdict_name(expected as i32);
    let target_arg = match target {
        pb::ConnectionTarget::Fetch => "fetch",
        _ => "send",
    };
    let (code, stdout, stderr) = site
        .ctl(&[
            "device",
            "test",
            DEVICE,
            "--tenant",
            TENANT,
            "--target",
            target_arg,
            "--timeout",
            "20",
        ])
        .await;
    let printed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("verdict:"))
        .map(|v| v.trim().to_ascii_uppercase().replace('-', "_"))
        .unwrap_or_default();
    assert!(
        printed == want,
        "tokenfleetctl device test --target {target_arg}: expected {want}\nstdout:\n{stdout}\nstderr:\n{stderr}\nagent log:\n{}",
        site.log_text()
    );
    let expected_code = if expected == pb::ConnectionVerdict::Ok {
        0
    } else {
        1
    };
    assert_eq!(
        code, expected_code,
        "exit code of tokenfleetctl device test ({want})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let result = site
        .admin()
        .test_connection(pb::TestConnectionRequest {
            tenant: TENANT.into(),
            device: DEVICE.into(),
            target: target as i32,
            timeout_seconds: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verdict_name(result.verdict),
        want,
        "Admin.TestConnection {target:?}: {result:#?}\nagent log:\n{}",
        site.log_text()
    );
    assert_eq!(result.device, DEVICE);
    assert_eq!(result.target, target as i32);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_for_good_refused_untrusted_and_rejected_through_ctl_and_api() {
    // A CA of this test, never given to the agent.
    let pki = TestPki::new("tokenfleet connection test CA");
    let site = AgentSite::start(SiteOptions {
        dovecot: pki.dovecot_features(),
        // Interval 0: no fetching, only tests of the fetch profile.
        device: Box::new(|dovecot: &Dovecot| pb::Device {
            smtp: Some(plain_smtp(dovecot.submission_addr())),
            fetch: Some(plain_fetch(pb::FetchProtocol::Pop3, dovecot.pop3_addr(), 0)),
            ..Default::default()
        }),
        agent_config: "connection_test_interval_seconds = 2\n".into(),
        ..SiteOptions::default()
    })
    .await;
    let pop3 = site.dovecot.pop3_addr();

    // Good: both targets OK, with the authentication step done.
    let send = check(&site, pb::ConnectionTarget::Send, pb::ConnectionVerdict::Ok).await;
    assert!(
        send.steps.iter().any(|s| s.name == "auth" && s.ok),
        "{send:#?}"
    );
    let fetch = check(
        &site,
        pb::ConnectionTarget::Fetch,
        pb::ConnectionVerdict::Ok,
    )
    .await;
    assert_eq!(fetch.endpoint, format!("127.0.0.1:{}", pop3.port()));
    // The periodic tests report too.
    eventually(
        "a periodic test in the fleet status",
        Duration::from_secs(20),
        || async {
            let status = site.fleet_status().await?;
            let device = status.status?;
            (device.last_connection_test.is_some() && status.health == pb::DeviceHealth::Ok as i32)
                .then_some(())
        },
    )
    .await;

    // A closed port.
    let closed = free_port();
    site.update_device(|d| {
        d.fetch.as_mut().unwrap().port = u32::from(closed);
    })
    .await;
    let refused = check(
        &site,
        pb::ConnectionTarget::Fetch,
        pb::ConnectionVerdict::ConnectionRefused,
    )
    .await;
    assert!(
        refused.summary.contains(&closed.to_string()),
        "{refused:#?}"
    );
    // The periodic test notices it: DEGRADED with the verdict (nothing is fetched, so no mail
    // flows on this profile).
    let degraded = eventually(
        "the device DEGRADED by the periodic test",
        Duration::from_secs(20),
        || async {
            let status = site.fleet_status().await?;
            (status.health == pb::DeviceHealth::Degraded as i32
                && status.problem.contains("CONNECTION_REFUSED"))
            .then_some(status)
        },
    )
    .await;
    assert!(
        degraded.problem.contains("periodic"),
        "{}",
        degraded.problem
    );

    // TLS with a CA the profile does not trust.
    let pop3s = site.dovecot.pop3s_addr().expect("Dovecot serves POP3S");
    site.update_device(|d| {
        let fetch = d.fetch.as_mut().unwrap();
        fetch.port = u32::from(pop3s.port());
        fetch.security = pb::TlsMode::ImplicitTls as i32;
    })
    .await;
    let untrusted = check(
        &site,
        pb::ConnectionTarget::Fetch,
        pb::ConnectionVerdict::CertificateUntrusted,
    )
    .await;
    let cert = untrusted.certificate.clone().expect("the certificate seen");
    assert!(
        cert.issuer.contains("tokenfleet connection test CA"),
        "{cert:#?}"
    );
    assert_eq!(cert.sha256_fingerprint.len(), 64);

    // Back to the good profile; then every token issued so far is inactive at the identity
    // provider (its clock jumps past their lifetime) while the agent still holds them.
    site.update_device(|d| {
        d.fetch = Some(plain_fetch(pb::FetchProtocol::Pop3, pop3, 0));
    })
    .await;
    check(
        &site,
        pb::ConnectionTarget::Fetch,
        pb::ConnectionVerdict::Ok,
    )
    .await;
    site.fake.advance(Duration::from_secs(3 * 3600));
    let rejected = check(
        &site,
        pb::ConnectionTarget::Fetch,
        pb::ConnectionVerdict::TokenRejected,
    )
    .await;
    assert!(rejected.summary.contains("-ERR"), "{rejected:#?}");
    assert!(
        rejected.summary.contains("\"status\":\"401\""),
        "{rejected:#?}"
    );
    let rejected = check(
        &site,
        pb::ConnectionTarget::Send,
        pb::ConnectionVerdict::TokenRejected,
    )
    .await;
    assert!(rejected.summary.contains("535"), "{rejected:#?}");
}

// ---------------------------------------------------------------------------------------------
// Mail API send profiles (Graph, Gmail): the agent's tester in process against the fake mail API.

mod mail_api {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use tokenfleet_agent::runtime::devices::DeviceEntry;
    use tokenfleet_agent::runtime::tokens::{
        IssuedToken, TokenAnswer, TokenCache, TokenFailure, TokenKey, TokenSource,
    };
    use tokenfleet_agent::runtime::wiring::ProbeTester;
    use tokenfleet_agent::runtime::{ConnectionTester as _, SystemClock};
    use tokenfleet_agent::sasl::AccessToken;
    use tokenfleet_proto::v1 as pb;
    use tokenfleet_testkit::fake_mail_api::{FakeMailApi, MailApi};
    use tokenfleet_testkit::logs;

    const ADDRESS: &str = "printer@contoso.example";

    /// Hands out one fixed token.
    struct FixedToken(String);

    impl TokenSource for FixedToken {
        fn issue<'a, 'b, 'c>(
            &'a self,
            key: &'b TokenKey,
        ) -> Pin<Box<dyn Future<Output = Result<TokenAnswer, TokenFailure>> + Send + 'c>>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            Box::pin(async move {
                Ok(TokenAnswer::Token(IssuedToken {
                    token: AccessToken::new(self.0.clone()),
                    expires: SystemTime::now() + Duration::from_secs(3600),
                    sasl_username: ADDRESS.into(),
                    mailbox: key.mailbox.clone(),
                }))
            })
        }
    }

    async fn test(method: pb::SendMethod, base: String, token: &str) -> pb::ConnectionTestResult {
        logs::secret(token);
        let tokens = TokenCache::new(
            Arc::new(FixedToken(token.to_owned())),
            Arc::new(SystemClock),
            Duration::from_secs(60),
        );
        let device = DeviceEntry {
            spec: pb::AgentDevice {
                name: "mfp".into(),
                sender_mode: pb::SenderMode::FixedAdmin as i32,
                admin_mailbox: Some(pb::MailboxRef {
                    name: "scan".into(),
                    address: ADDRESS.into(),
                    kind: pb::MailboxKind::Admin as i32,
                }),
                smtp: Some(pb::SmtpProfile {
                    method: method as i32,
                    api_base_url: base,
                    timeout_seconds: 10,
                    ..Default::default()
                }),
                ..Default::default()
            },
            delivery: Err("not used".into()),
        };
        let command = pb::ConnectionTestCommand {
            device: "mfp".into(),
            target: pb::ConnectionTarget::Send as i32,
            timeout_seconds: 20,
        };
        ProbeTester.test(&device, &command, &tokens).await
    }

    #[tokio::test]
    async fn gmail_checks_the_token_with_the_profile_and_sends_nothing() {
        let api = FakeMailApi::start().await.unwrap();
        api.expect_token(ADDRESS, "gmail-good-token");
        let ok = test(
            pb::SendMethod::GmailApi,
            api.gmail_base_url(),
            "gmail-good-token",
        )
        .await;
        assert_eq!(ok.verdict, pb::ConnectionVerdict::Ok as i32, "{ok:#?}");
        assert!(ok.summary.contains("token is accepted"), "{ok:#?}");
        for step in ["dns", "tcp", "token", "http"] {
            assert!(
                ok.steps.iter().any(|s| s.name == step && s.ok),
                "{step}: {ok:#?}"
            );
        }
        let bad = test(
            pb::SendMethod::GmailApi,
            api.gmail_base_url(),
            "gmail-bad-token",
        )
        .await;
        assert_eq!(
            bad.verdict,
            pb::ConnectionVerdict::TokenRejected as i32,
            "{bad:#?}"
        );
        assert!(bad.summary.contains("401"), "{bad:#?}");
        let requests = api.requests();
        assert_eq!(requests.len(), 2, "{requests:#?}");
        assert!(
            requests.iter().all(|r| r.api == MailApi::GmailProfile),
            "nothing sent"
        );
        assert!(requests[0].authorized && !requests[1].authorized);
        assert!(api.violations().is_empty(), "{:?}", api.violations());
    }

    #[tokio::test]
    async fn graph_reports_reachability_and_says_the_token_is_checked_at_the_first_send() {
        let api = FakeMailApi::start().await.unwrap();
        let ok = test(pb::SendMethod::Graph, api.graph_base_url(), "graph-token").await;
        assert_eq!(ok.verdict, pb::ConnectionVerdict::Ok as i32, "{ok:#?}");
        assert!(
            ok.summary.contains("first checked at the first send"),
            "{ok:#?}"
        );
        let requests = api.requests();
        assert_eq!(requests.len(), 1, "{requests:#?}");
        assert_eq!(requests[0].api, MailApi::GraphRoot);
        assert!(api.violations().is_empty(), "{:?}", api.violations());
        // Nothing listens: the test says so.
        let closed = format!(
            "http://127.0.0.1:{}/v1.0",
            tokenfleet_testkit::agent_site::free_port()
        );
        let refused = test(pb::SendMethod::Graph, closed, "graph-token").await;
        assert_eq!(
            refused.verdict,
            pb::ConnectionVerdict::ConnectionRefused as i32,
            "{refused:#?}"
        );
    }
}

/// `tokenfleetctl device test <device>`: (exit code, printed verdict, stdout, stderr).
async fn ctl_test(site: &AgentSite, device: &str) -> (i32, String, String, String) {
    let (code, stdout, stderr) = site
        .ctl(&[
            "device",
            "test",
            device,
            "--tenant",
            TENANT,
            "--timeout",
            "20",
        ])
        .await;
    let verdict = stdout
        .lines()
        .find_map(|l| l.strip_prefix("verdict:"))
        .map(|v| v.trim().to_ascii_uppercase().replace('-', "_"))
        .unwrap_or_default();
    (code, verdict, stdout, stderr)
}

fn applied(site: &AgentSite) -> usize {
    site.log_text()
        .matches("agent configuration applied")
        .count()
}

/// With the agent's default-like heartbeat (30 s), a device created or changed through the real
/// `tokenfleetctl` reaches the running agent within a second, and a test right after the change
/// tests the device as changed; a device the agent does not run yet is tested as
/// DEVICE_NOT_LOADED. When the mailbox's token can no longer be refreshed, `mailbox refresh` exits
/// non-zero saying why, and `fleet status` shows the broker's grant status (not the agent's cached
/// token) with each token's purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_running_agent_at_once_and_status_tells_the_truth() {
    let site = AgentSite::start(SiteOptions {
        heartbeat_seconds: 30,
        ..SiteOptions::default()
    })
    .await;
    eventually(
        "the agent's status stream",
        Duration::from_secs(20),
        || async {
            site.fleet_status()
                .await
                .filter(|s| s.agent_connected)
                .map(|_| ())
        },
    )
    .await;
    let submission = site.dovecot.submission_addr().port().to_string();

    // A new device, tested at once: the agent runs it already.
    let (code, _, stderr) = site
        .ctl(&[
            "device",
            "create",
            "--tenant",
            TENANT,
            "--name",
            "mfp2",
            "--agent",
            AGENT,
            "--sender-mode",
            "fixed_admin",
            "--admin-mailbox",
            MAILBOX,
            "--smtp-server",
            "127.0.0.1",
            "--smtp-port",
            &submission,
            "--smtp-security",
            "none",
        ])
        .await;
    assert_eq!(code, 0, "device create: {stderr}");
    let (code, verdict, stdout, stderr) = ctl_test(&site, "mfp2").await;
    assert_eq!(
        (code, verdict.as_str()),
        (0, "OK"),
        "device test right after device create\nstdout:\n{stdout}\nstderr:\n{stderr}\nagent log:\n{}",
        site.log_text()
    );

    // A changed port, tested at once: the new port is tested.
    let closed = free_port().to_string();
    let (code, _, stderr) = site
        .ctl(&[
            "device",
            "update",
            "--tenant",
            TENANT,
            "--name",
            "mfp2",
            "--smtp-port",
            &closed,
        ])
        .await;
    assert_eq!(code, 0, "device update: {stderr}");
    let (code, verdict, stdout, stderr) = ctl_test(&site, "mfp2").await;
    assert_eq!(
        (code, verdict.as_str()),
        (1, "CONNECTION_REFUSED"),
        "device test right after device update --smtp-port\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(&closed), "{stdout}");

    // How long a change takes to reach the agent (no test waiting for it this time).
    let before = applied(&site);
    let (code, _, stderr) = site
        .ctl(&[
            "device",
            "update",
            "--tenant",
            TENANT,
            "--name",
            "mfp2",
            "--smtp-timeout",
            "17",
        ])
        .await;
    assert_eq!(code, 0, "device update: {stderr}");
    let changed = std::time::Instant::now();
    let took = loop {
        if applied(&site) > before {
            break changed.elapsed();
        }
        assert!(
            changed.elapsed() < Duration::from_secs(30),
            "the agent never applied the change:\n{}",
            site.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("device update reached the running agent {took:?} after tokenfleetctl returned");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // A device the agent does not run yet says so as its verdict. The agent is frozen while the
    // device is created and the test queued (the broker waits a few seconds for the agent to
    // apply the change, then sends the test anyway); resumed, it receives the reload and the
    // test together and answers the test before the new configuration is in.
    site.freeze_agent(true);
    let (code, _, stderr) = site
        .ctl(&[
            "device",
            "create",
            "--tenant",
            TENANT,
            "--name",
            "mfp3",
            "--agent",
            AGENT,
            "--sender-mode",
            "fixed_admin",
            "--admin-mailbox",
            MAILBOX,
            "--smtp-server",
            "127.0.0.1",
            "--smtp-port",
            &submission,
            "--smtp-security",
            "none",
        ])
        .await;
    if code != 0 {
        site.freeze_agent(false);
        panic!("device create: {stderr}");
    }
    let test = async { ctl_test(&site, "mfp3").await };
    let resume = async {
        tokio::time::sleep(Duration::from_secs(9)).await;
        site.freeze_agent(false);
    };
    let ((code, verdict, stdout, stderr), ()) = tokio::join!(test, resume);
    assert_eq!(
        (code, verdict.as_str()),
        (1, "DEVICE_NOT_LOADED"),
        "device test of a device the agent does not run yet
stdout:
{stdout}
stderr:
{stderr}"
    );
    assert!(
        stdout.contains("not in the configuration this agent runs"),
        "{stdout}"
    );
    // Once applied, it is tested like any other.
    let (_, verdict, stdout, _) = ctl_test(&site, "mfp3").await;
    assert_eq!(verdict, "OK", "{stdout}");

    // The agent caches a token of the mailbox (the OK test above fetched one) and reports it.
    eventually(
        "the agent's token in the fleet status",
        Duration::from_secs(40),
        || async {
            let status = site
                .admin()
                .get_fleet_status(pb::GetFleetStatusRequest {
                    tenant: TENANT.into(),
                })
                .await
                .ok()?
                .into_inner()
                .devices
                .into_iter()
                .find(|d| d.device == "mfp2")?;
            status
                .status?
                .tokens
                .iter()
                .any(|t| t.status == pb::TokenStatus::Active as i32)
                .then_some(())
        },
    )
    .await;

    // The grant dies at the provider (the app's secret expired): the refresh says so and fails.
    let mut spec = tokenfleet_testkit::fake_idp::ClientSpec::confidential(
        tokenfleet_testkit::agent_site::CLIENT_ID,
        tokenfleet_testkit::agent_site::CLIENT_SECRET,
    );
    spec.app_only_mailbox = Some(tokenfleet_testkit::agent_site::ADDRESS.into());
    spec.secret_expired = true;
    site.fake.register_client(spec);
    let (code, stdout, stderr) = site
        .ctl(&["mailbox", "refresh", MAILBOX, "--tenant", TENANT])
        .await;
    assert_ne!(
        code, 0,
        "mailbox refresh of a dead grant\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("did not succeed") && stderr.contains("client secret has expired"),
        "{stderr}"
    );

    // The fleet status goes by the broker's grant, at once, although the agent still holds a
    // valid access token; each token names its purpose.
    let (code, stdout, stderr) = site
        .ctl(&["-o", "json", "fleet", "status", "--tenant", TENANT])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let devices: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mfp = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "mfp2")
        .unwrap_or_else(|| panic!("{stdout}"));
    // The agent itself still says ok (it holds a token that has not expired); the broker's
    // grant status (REFRESH_FAILING for an app whose secret expired) makes the device DEGRADED.
    // A dead delegated grant (REAUTH_REQUIRED) makes it FAILING (see the unit tests of
    // `fleet::status`).
    assert_eq!(mfp["status"]["health"], "ok", "{mfp:#}");
    assert_eq!(mfp["health"], "degraded", "{mfp:#}");
    assert!(
        mfp["problem"].as_str().unwrap().contains(MAILBOX)
            && mfp["problem"]
                .as_str()
                .unwrap()
                .contains("client secret has expired"),
        "{mfp:#}"
    );
    assert_eq!(mfp["grants"][0]["mailbox"], MAILBOX, "{mfp:#}");
    assert_eq!(mfp["grants"][0]["status"], "refresh_failing", "{mfp:#}");
    let tokens = mfp["status"]["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty(), "{mfp:#}");
    for token in tokens {
        assert_eq!(token["status"], "refresh_failing", "{mfp:#}");
        assert_eq!(token["purpose"], "send", "{mfp:#}");
    }
    // Problems first.
    assert_ne!(devices[0]["health"], "ok", "{stdout}");
}
