//! `tokenfleetctl mailbox consent` end to end: the real binary against an in-process broker whose
//! provider is the fake identity provider; the test plays the person at the fake.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::broker::{TestAdminClient, TestBroker, TestStore};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

const TENANT: &str = "acme";
const ENTRA: &str = "contoso.example";
const USER: &str = "scanner@contoso.example";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "s3cret-client-value";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn command(broker: &TestBroker, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"));
    cmd.args(args)
        .env("TOKENFLEET_BROKER", format!("http://{}", broker.grpc_addr))
        .env("TOKENFLEET_API_KEY", broker.admin_key.expose())
        .env_remove("TOKENFLEET_API_KEY_FILE")
        .env_remove("TOKENFLEET_TENANT")
        .env_remove("TOKENFLEET_CA_FILE")
        // No operator config file of this machine: contexts only where a test writes one.
        .env(
            "TOKENFLEETCTL_CONFIG",
            "/nonexistent/tokenfleetctl/config.yaml",
        )
        .env_remove("TOKENFLEETCTL_CONTEXT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn setup(admin: &mut TestAdminClient, fake: &FakeIdp, mailboxes: &[(&str, pb::GrantType)]) {
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
    let e = fake.microsoft_endpoints(ENTRA);
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
    for (name, grant_type) in mailboxes {
        admin
            .create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(pb::Mailbox {
                    tenant: TENANT.into(),
                    name: (*name).into(),
                    address: USER.into(),
                    provider: "m365".into(),
                    grant_type: *grant_type as i32,
                    kind: pb::MailboxKind::Bulk as i32,
                    purposes: vec![pb::MailPurpose::Send as i32],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
}

async fn start() -> (FakeIdp, TestBroker) {
    let fake = FakeIdp::start().await.unwrap();
    fake.add_user(USER);
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    fake.set_device_interval(1);
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let mut admin = broker.admin_client();
    setup(
        &mut admin,
        &fake,
        &[
            ("scan", pb::GrantType::DelegatedDeviceCode),
            ("fax", pb::GrantType::DelegatedDeviceCode),
            ("browser", pb::GrantType::DelegatedAuthCode),
        ],
    )
    .await;
    (fake, broker)
}

/// Runs `consent` for `mailbox`, reads the user code it prints, lets the fake's person act on it
/// with `act`, and returns the exit code, all of stdout and stderr.
async fn consent_with(
    broker: &TestBroker,
    fake: &FakeIdp,
    mailbox: &str,
    act: impl FnOnce(&str),
) -> (i32, String, String) {
    let mut child = command(
        broker,
        &[
            "mailbox",
            "consent",
            mailbox,
            "--tenant",
            TENANT,
            "--wait-timeout",
            "60",
        ],
    )
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let user_code = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if let Some(code) = line.trim().strip_prefix("code  ") {
                return code.trim().to_owned();
            }
        }
        panic!("stdout ended before a user code was printed:\n{seen}");
    })
    .await
    .unwrap_or_else(|_| panic!("no user code printed within 20 s:\n{seen}"));
    // The person acts once the broker polls (a second in): the command is waiting by then.
    tokio::time::timeout(Duration::from_secs(20), async {
        while fake.token_requests(DEVICE_GRANT) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the broker never polled the device code");
    act(&user_code);
    let mut stderr = String::new();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
        }
        stderr_pipe.read_to_string(&mut stderr).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("tokenfleetctl did not finish");
    (status.code().unwrap_or(-1), seen, stderr)
}

#[tokio::test]
async fn consent_prints_the_code_and_ends_active_once_the_person_approves() {
    let (fake, broker) = start().await;
    let (code, stdout, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, USER).unwrap();
    })
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(&fake.device_login_url()), "{stdout}");
    // The QR code of the verification URL is drawn with Unicode blocks.
    assert!(stdout.contains('█') || stdout.contains('▀'), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .ends_with("(scanner@contoso.example, tenant acme): ACTIVE"),
        "{stdout}"
    );
    assert!(stderr.contains("waiting for the sign-in"), "{stderr}");
    assert_eq!(fake.live_refresh_tokens(USER).len(), 1);
}

#[tokio::test]
async fn a_declined_consent_exits_non_zero_with_the_reason() {
    let (fake, broker) = start().await;
    let (code, stdout, stderr) = consent_with(&broker, &fake, "fax", |user_code| {
        fake.decline_device_code(user_code).unwrap();
    })
    .await;
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("NOT_RETRIEVED"), "{stdout}");
    assert!(stderr.contains("declined"), "{stderr}");
    assert!(
        stderr.contains("tokenfleetctl mailbox consent fax --tenant acme"),
        "{stderr}"
    );
}

#[tokio::test]
async fn json_and_no_wait_print_the_challenge_and_return() {
    let (fake, broker) = start().await;
    let output = command(
        &broker,
        &[
            "-o",
            "json",
            "mailbox",
            "consent",
            "scan",
            "--tenant",
            TENANT,
            "--no-wait",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let challenge: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(challenge["challenge"], "device_code");
    assert_eq!(challenge["mailbox"], "scan");
    assert_eq!(challenge["verification_uri"], fake.device_login_url());
    let pending = fake.pending_device_codes();
    assert_eq!(pending.len(), 1);
    assert_eq!(challenge["user_code"], pending[0].user_code.as_str());

    // An auth-code mailbox prints the authorization URL.
    let output = start_browser_consent(&broker).await;
    assert_eq!(output.status.code(), Some(0));
    let challenge: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(challenge["challenge"], "authorization");
    let url = challenge["authorization_url"].as_str().unwrap();
    assert!(url.starts_with(&fake.base_url()), "{url}");
    assert!(url.contains("code_challenge_method=S256"), "{url}");

    // ... and `--code` completes it with the redirect URL.
    let redirected = fake.authorize_url(url, USER).unwrap();
    let output = complete_browser_consent(&broker, &redirected).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.trim_end().ends_with(": ACTIVE"), "{stdout}");
}

const OTHER: &str = "someone-else@contoso.example";

/// `tokenfleetctl -o json mailbox consent browser --no-wait`: prints the authorization URL.
async fn start_browser_consent(broker: &TestBroker) -> std::process::Output {
    command(
        broker,
        &[
            "-o",
            "json",
            "mailbox",
            "consent",
            "browser",
            "--tenant",
            TENANT,
            "--no-wait",
        ],
    )
    .output()
    .await
    .unwrap()
}

/// `tokenfleetctl mailbox consent browser --code <redirect URL>`: completes the consent.
async fn complete_browser_consent(broker: &TestBroker, redirected: &str) -> std::process::Output {
    command(
        broker,
        &[
            "mailbox", "consent", "browser", "--tenant", TENANT, "--code", redirected,
        ],
    )
    .output()
    .await
    .unwrap()
}

async fn mailbox_state(broker: &TestBroker, name: &str) -> pb::Mailbox {
    broker
        .admin_client()
        .get_mailbox(pb::GetMailboxRequest {
            tenant: TENANT.into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_consent_signed_in_as_another_account_fails_and_stores_nothing() {
    let (fake, broker) = start().await;
    fake.add_user(OTHER);

    // Device code: the person signs in as someone else.
    let (code, stdout, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, OTHER).unwrap();
    })
    .await;
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("NOT_RETRIEVED"), "{stdout}");
    assert!(
        stderr.contains(&format!("the sign-in was made as {OTHER}"))
            && stderr.contains(USER)
            && stderr.contains("--consent-account"),
        "{stderr}"
    );
    let m = mailbox_state(&broker, "scan").await;
    let token = m.token.unwrap();
    assert_eq!(token.status, pb::TokenStatus::NotRetrieved as i32);
    assert_eq!(token.last_error.unwrap().code, "account_mismatch");

    // Auth code: the same, through `--code` with the redirect of the wrong account.
    let output = start_browser_consent(&broker).await;
    let challenge: Value = serde_json::from_slice(&output.stdout).unwrap();
    let url = challenge["authorization_url"].as_str().unwrap();
    assert!(url.contains("openid"), "{url}");
    let redirected = fake.authorize_url(url, OTHER).unwrap();
    let output = complete_browser_consent(&broker, &redirected).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("the sign-in was made as {OTHER}")),
        "{stderr}"
    );
    let token = mailbox_state(&broker, "browser").await.token.unwrap();
    assert_ne!(token.status, pb::TokenStatus::Active as i32);
    assert_eq!(token.last_error.unwrap().code, "account_mismatch");

    // Once the mailbox says that account is intended (Send As), its consent binds.
    let output = command(
        &broker,
        &[
            "mailbox",
            "update",
            "--tenant",
            TENANT,
            "--name",
            "scan",
            "--consent-account",
            OTHER,
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (code, stdout, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, OTHER).unwrap();
    })
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(mailbox_state(&broker, "scan").await.consent_account, OTHER);
    // ...and then the mailbox's own address no longer does.
    let (code, _, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, USER).unwrap();
    })
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("expects someone-else@contoso.example"),
        "{stderr}"
    );
}

#[tokio::test]
async fn refresh_exits_non_zero_with_the_reason_when_the_grant_is_dead() {
    let (fake, broker) = start().await;
    let (code, stdout, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, USER).unwrap();
    })
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let ok = command(&broker, &["mailbox", "refresh", "scan", "--tenant", TENANT])
        .output()
        .await
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    fake.revoke_user_grants(USER);
    let dead = command(&broker, &["mailbox", "refresh", "scan", "--tenant", TENANT])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&dead.stderr);
    assert_eq!(dead.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not succeed") && stderr.contains("REAUTH_REQUIRED"),
        "{stderr}"
    );
    assert!(stderr.contains("fix:"), "{stderr}");
}

#[tokio::test]
async fn the_fleet_wide_list_finds_the_mailbox_that_needs_a_person() {
    let (fake, broker) = start().await;
    let (code, stdout, stderr) = consent_with(&broker, &fake, "scan", |user_code| {
        fake.approve_device_code(user_code, USER).unwrap();
    })
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    fake.revoke_user_grants(USER);
    let dead = command(&broker, &["mailbox", "refresh", "scan", "--tenant", TENANT])
        .output()
        .await
        .unwrap();
    assert_eq!(dead.status.code(), Some(1));
    let list = |key: String, args: &'static [&'static str]| {
        let mut cmd = command(&broker, args);
        cmd.env("TOKENFLEET_API_KEY", key);
        async move {
            let out = cmd.output().await.unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let admin_key = broker.admin_key.expose().to_owned();
    let needing = list(
        admin_key.clone(),
        &[
            "mailbox",
            "list",
            "--all-tenants",
            "--status",
            "reauth_required",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(needing, "acme/scan\n");
    let table = list(
        admin_key.clone(),
        &[
            "mailbox",
            "list",
            "--all-tenants",
            "--status",
            "reauth_required",
        ],
    )
    .await;
    assert!(
        table.contains("REAUTH_REQUIRED") && table.contains("scan"),
        "{table}"
    );
    assert!(!table.contains("fax"), "{table}");
    // Another tenant's key sees none of acme's mailboxes, whatever it asks for.
    let mut admin = broker.admin_client();
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: "beta".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let beta = broker
        .create_key(tokenfleet_domain::Role::TenantAdmin, Some("beta"))
        .await;
    let seen = list(
        beta.expose().to_owned(),
        &["mailbox", "list", "--all-tenants", "-o", "json"],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&seen).unwrap(),
        serde_json::json!([])
    );
}

/// `consent-link create|list|revoke` through the binary: the link is printed once (its token
/// never again), listed with its state, revoked only with `--yes` when nobody can answer, and a
/// lifetime outside the broker's range is refused before anything is sent.
#[tokio::test]
async fn consent_links_are_created_once_listed_and_revoked() {
    let (_fake, broker) = start().await;
    let run = async |args: &[&str]| command(&broker, args).output().await.unwrap();

    let created = run(&[
        "consent-link",
        "create",
        "browser",
        "--tenant",
        TENANT,
        "--ttl-seconds",
        "3600",
        "-o",
        "json",
    ])
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let link: Value = serde_json::from_slice(&created.stdout).unwrap();
    let (id, url) = (link["id"].as_str().unwrap(), link["url"].as_str().unwrap());
    assert_eq!(link["mailbox"], "browser");
    assert_eq!(link["state"], "pending");
    assert!(url.contains("/consent/"), "{url}");
    let token = url.rsplit('/').next().unwrap();
    assert!(token.len() > 20, "{url}");
    // A consent link is a bearer credential: the log scan fails if it reaches a log.
    tokenfleet_testkit::logs::secret(token);
    assert!(String::from_utf8_lossy(&created.stderr).contains("shown this once"));

    let listed = run(&["consent-link", "list", "--tenant", TENANT, "-o", "json"]).await;
    assert!(listed.status.success());
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !text.contains(token),
        "a listed link shows its token: {text}"
    );
    let links: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(links.as_array().unwrap().len(), 1, "{text}");
    assert_eq!(links[0]["id"], id);
    assert_eq!(links[0]["state"], "pending");
    let table = run(&[
        "consent-link",
        "list",
        "--tenant",
        TENANT,
        "--mailbox",
        "scan",
    ])
    .await;
    assert!(table.status.success());
    assert!(
        !String::from_utf8_lossy(&table.stdout).contains(id),
        "the filter by mailbox kept another mailbox's link"
    );

    // Nobody at a terminal: refused without --yes, and the link stays usable.
    let refused = run(&["consent-link", "revoke", id, "--tenant", TENANT]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let still = run(&["consent-link", "list", "--tenant", TENANT, "-o", "json"]).await;
    let still: Value = serde_json::from_slice(&still.stdout).unwrap();
    assert_eq!(still[0]["state"], "pending");

    let revoked = run(&[
        "consent-link",
        "revoke",
        "--name",
        id,
        "--tenant",
        TENANT,
        "--yes",
        "-o",
        "json",
    ])
    .await;
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let revoked: Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(revoked["state"], "revoked");

    let bad = run(&[
        "consent-link",
        "create",
        "browser",
        "--tenant",
        TENANT,
        "--ttl-seconds",
        "10",
    ])
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--ttl-seconds"));
}
