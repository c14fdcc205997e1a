//! Tenant boundaries and roles through what an operator runs: the broker executable and
//! `tokenfleetctl`, with keys made by `tokenfleetctl api-key create` and read from the table it
//! prints by default (a key cut short there would be one nobody can use or get again).

use tokenfleet_testkit::broker::{TestBroker, TestStore};

/// `tokenfleetctl` with the words of `line` (none holds a space) as the API key `key`.
async fn ctl_as(broker: &TestBroker, key: &str, line: &str) -> (i32, String, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    broker.ctl_with_key(key, &words).await
}

/// Asserts a `tokenfleetctl` run succeeded; its stdout.
fn ok((code, stdout, stderr): (i32, String, String), what: &str) -> String {
    assert_eq!(code, 0, "{what}: {stderr}");
    stdout
}

/// Asserts a `tokenfleetctl` run failed with `needle` in its error.
fn refused((code, stdout, stderr): (i32, String, String), what: &str, needle: &str) {
    assert_ne!(code, 0, "{what} was allowed: {stdout}");
    assert!(
        stderr.contains("permission denied") && stderr.contains(needle),
        "{what}: {stderr}"
    );
}

/// The API key in the table `api-key create` prints by default (`tfk_<id>_<secret>`), whole.
fn key_in_table(stdout: &str) -> String {
    let key = stdout
        .split(|c: char| c.is_whitespace() || c == '│' || c == '┆')
        .find(|word| word.starts_with("tfk_"))
        .unwrap_or_else(|| panic!("no key in the output:\n{stdout}"))
        .to_owned();
    assert!(
        !key.contains('…'),
        "the key was cut in the table:\n{stdout}"
    );
    key
}

/// The id of an API key (`tfk_<id>_…`).
fn key_id(key: &str) -> &str {
    key.split('_').nth(1).unwrap_or_default()
}

/// The refused-attempt records whose actor is API key `key`, as `tokenfleetctl audit --kind
/// refused -o json` run with the key `admin` shows them.
async fn refusals_of(broker: &TestBroker, admin: &str, key: &str) -> Vec<serde_json::Value> {
    let line = "audit --kind refused -o json";
    let text = ok(ctl_as(broker, admin, line).await, line);
    let all: Vec<serde_json::Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{line} printed no JSON list ({e}):\n{text}"));
    let actor = format!("apikey:{}", key_id(key));
    all.into_iter()
        .filter(|e| e["actor"] == actor.as_str())
        .collect()
}

/// Two tenants with the same objects, made by the fleet admin through the CLI.
async fn two_tenants(broker: &TestBroker, admin: &str, dir: &std::path::Path) {
    for t in ["alpha", "bravo"] {
        let secret = dir.join(format!("{t}.secret"));
        std::fs::write(&secret, format!("client-secret-of-{t}"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", secret.display()));
        for line in [
            format!("tenant create --name {t}"),
            format!(
                "provider create m365 --tenant {t} --kind microsoft --client-id 11111111-2222-3333-4444-555555555555 --client-secret-file {}",
                secret.display()
            ),
            format!(
                "mailbox create scan --tenant {t} --address scan@{t}.example --provider m365 --grant-type app_only --kind bulk --purpose send"
            ),
            format!("agent create site-1 --tenant {t}"),
            format!(
                "device create mfp --tenant {t} --agent site-1 --sender-mode bulk --bulk-mailbox scan --smtp-server smtp.office365.com --smtp-port 587 --smtp-security starttls"
            ),
        ] {
            ok(ctl_as(broker, admin, &line).await, &line);
        }
    }
}

/// A tenant-admin key made with `tokenfleetctl` for tenant alpha manages alpha and cannot see,
/// change or take over tenant bravo, nor make keys beyond its own tenant; an alpha viewer reads
/// and changes nothing; every refusal names why, is audited, and bravo is unchanged afterwards.
#[tokio::test]
async fn keys_made_by_the_cli_see_and_change_only_their_own_tenant() {
    let broker = TestBroker::start_tls(TestStore::Embedded).await.unwrap();
    let admin = broker.admin_key.expose().to_owned();
    let dir = tempfile::tempdir().unwrap();
    two_tenants(&broker, &admin, dir.path()).await;

    // Keys as an operator makes them, read from the default output.
    let line = "api-key create --role tenant-admin --tenant alpha --description alpha-admin";
    let ta = key_in_table(&ok(ctl_as(&broker, &admin, line).await, line));
    tokenfleet_testkit::logs::secret(&ta);
    let line = "api-key create --role viewer --tenant alpha";
    let viewer = key_in_table(&ok(ctl_as(&broker, &admin, line).await, line));
    tokenfleet_testkit::logs::secret(&viewer);
    let me = ok(ctl_as(&broker, &ta, "whoami -o json").await, "whoami");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    assert_eq!(
        (
            me["key_id"].as_str(),
            me["role"].as_str(),
            me["tenant"].as_str()
        ),
        (Some(key_id(&ta)), Some("tenant-admin"), Some("alpha")),
        "{me}"
    );

    // Its own tenant: read and change.
    for line in [
        "mailbox show scan --tenant alpha",
        "device update mfp --tenant alpha --display-name front-desk",
        "agent enroll-code site-2 --tenant alpha",
        "audit --tenant alpha",
    ] {
        ok(ctl_as(&broker, &ta, line).await, line);
    }

    // Every kind of object of the other tenant, read or changed: refused, naming the tenant.
    let other = [
        "tenant show bravo",
        "provider show m365 --tenant bravo",
        "provider update m365 --tenant bravo --client-id 99999999-2222-3333-4444-555555555555",
        "provider list --tenant bravo",
        "mailbox list --tenant bravo",
        "mailbox show scan --tenant bravo",
        "mailbox update scan --tenant bravo --disabled",
        "mailbox delete scan --tenant bravo --yes",
        "mailbox create scan2 --tenant bravo --address scan2@bravo.example --provider m365 --grant-type app_only --kind bulk --purpose send",
        "device list --tenant bravo",
        "device show mfp --tenant bravo",
        "device update mfp --tenant bravo --display-name taken",
        "device delete mfp --tenant bravo --yes",
        "agent list --tenant bravo",
        "agent show site-1 --tenant bravo",
        "agent enroll-code site-9 --tenant bravo",
        "agent revoke site-1 --tenant bravo --yes",
        "consent-link create scan --tenant bravo",
        "consent-link list --tenant bravo",
        "audit --tenant bravo",
        "fleet status --tenant bravo",
    ];
    for line in other {
        refused(
            ctl_as(&broker, &ta, line).await,
            line,
            "may not access tenant `bravo`",
        );
    }

    for line in [
        "tenant update bravo --display-name taken",
        "tenant delete bravo --yes",
    ] {
        refused(
            ctl_as(&broker, &ta, line).await,
            line,
            "may not create, change or delete tenants (fleet-admin only)",
        );
    }

    // Lists that span tenants hold only its own.
    let tenants = ok(ctl_as(&broker, &ta, "tenant list -o name").await, "tenants");
    assert_eq!(tenants.trim(), "alpha");
    let mailboxes = ok(
        ctl_as(&broker, &ta, "mailbox list --all-tenants -o name").await,
        "mailboxes",
    );
    assert_eq!(mailboxes.trim(), "alpha/scan");
    for kind in ["provider", "device", "agent"] {
        let line = format!("{kind} list --all-tenants -o name");
        let names = ok(ctl_as(&broker, &ta, &line).await, &line);
        assert!(
            !names.trim().is_empty() && names.lines().all(|n| n.starts_with("alpha/")),
            "{line}: {names}"
        );
    }
    let export = ok(ctl_as(&broker, &ta, "export").await, "export");
    assert!(
        export.contains("tenant: alpha") && !export.contains("bravo"),
        "{export}"
    );
    let keys = ok(ctl_as(&broker, &ta, "api-key list -o json").await, "keys");
    let keys: Vec<serde_json::Value> = serde_json::from_str(&keys).unwrap();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k["tenant"] == "alpha"),
        "{keys:?}"
    );

    // No key beyond its own tenant, and no revoking the fleet admin's.
    for (line, needle) in [
        ("api-key create --role fleet-admin", "not a fleet-admin key"),
        (
            "api-key create --role tenant-admin --tenant bravo",
            "for tenant `bravo`",
        ),
        ("api-key create --role viewer", "not a viewer key"),
    ] {
        refused(ctl_as(&broker, &ta, line).await, line, needle);
    }
    // A key of another scope is not even said to exist.
    let line = format!("api-key revoke --id {} --yes", key_id(&admin));
    let (code, _, stderr) = ctl_as(&broker, &ta, &line).await;
    assert_ne!(code, 0, "{line} was allowed");
    assert!(
        stderr.contains(&format!(
            "not found: API key `{}` not found",
            key_id(&admin)
        )),
        "{stderr}"
    );

    // A manifest that also names the other tenant is refused whole: nothing of it is written.
    let manifest = dir.path().join("both.yaml");
    std::fs::write(
        &manifest,
        "kind: device\ntenant: alpha\nname: mfp-new\nspec:\n  agent: site-1\n  sender_mode: bulk\n  bulk_mailbox: scan\n  smtp: {server: smtp.office365.com, port: 587, security: starttls}\n---\nkind: device\ntenant: bravo\nname: mfp-new\nspec:\n  agent: site-1\n  sender_mode: bulk\n  bulk_mailbox: scan\n  smtp: {server: smtp.office365.com, port: 587, security: starttls}\n",
    )
    .unwrap();
    let line = format!("apply -f {}", manifest.display());
    refused(
        ctl_as(&broker, &ta, &line).await,
        &line,
        "document 2 (device bravo/mfp-new)",
    );

    // The viewer reads its tenant and changes nothing.
    ok(
        ctl_as(&broker, &viewer, "device show mfp --tenant alpha").await,
        "viewer show",
    );
    for line in [
        "mailbox update scan --tenant alpha --disabled",
        "device delete mfp --tenant alpha --yes",
        "consent-link create scan --tenant alpha",
        "agent enroll-code site-3 --tenant alpha",
    ] {
        refused(
            ctl_as(&broker, &viewer, line).await,
            line,
            "is read-only and may not change anything",
        );
    }
    refused(
        ctl_as(
            &broker,
            &viewer,
            "api-key create --role viewer --tenant alpha",
        )
        .await,
        "viewer api-key create",
        "may not manage API keys",
    );
    refused(
        ctl_as(&broker, &viewer, "mailbox show scan --tenant bravo").await,
        "viewer of alpha reading bravo",
        "may not access tenant `bravo`",
    );

    // Bravo is as the fleet admin made it; alpha got only what its admin did.
    let show = |line: &'static str| {
        let broker = &broker;
        let admin = admin.clone();
        async move {
            let text = ok(ctl_as(broker, &admin, line).await, line);
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        }
    };
    let tenant = show("tenant show bravo -o json").await;
    assert_eq!(tenant["display_name"], "", "{tenant}");
    let provider = show("provider show m365 --tenant bravo -o json").await;
    assert_eq!(
        provider["client_id"], "11111111-2222-3333-4444-555555555555",
        "{provider}"
    );
    let mailbox = show("mailbox show scan --tenant bravo -o json").await;
    assert_eq!(mailbox["disabled"], false, "{mailbox}");
    let device = show("device show mfp --tenant bravo -o json").await;
    assert_eq!(device["display_name"], "", "{device}");
    let agent = show("agent show site-1 --tenant bravo -o json").await;
    assert_eq!(agent["revoked"], false, "{agent}");
    let bravo_agents = show("agent list --tenant bravo -o json").await;
    assert_eq!(
        bravo_agents.as_array().map(Vec::len),
        Some(1),
        "{bravo_agents}"
    );
    let devices = ok(
        ctl_as(&broker, &admin, "device list --tenant alpha -o name").await,
        "alpha devices",
    );
    assert_eq!(devices.trim(), "mfp", "the refused manifest wrote mfp-new");
    let device = show("device show mfp --tenant alpha -o json").await;
    assert_eq!(device["display_name"], "front-desk", "{device}");
    ok(
        ctl_as(&broker, &admin, "whoami").await,
        "the fleet admin's key still works",
    );

    // Every refusal of the tenant admin is in the (global) audit log, with its key as the
    // actor: reads of the other tenant as well as changes.
    let actor = format!("apikey:{}", key_id(&ta));
    let by_ta: Vec<serde_json::Value> = refusals_of(&broker, &admin, &ta)
        .await
        .into_iter()
        .filter(|e| e["result"] == "permission_denied")
        .collect();
    // The other tenant's objects, the two tenant changes and the three keys.
    let made = other.len() + 2 + 3;
    assert!(
        by_ta.len() >= made,
        "{} refusals of {actor} audited, {made} made: {by_ta:#?}",
        by_ta.len()
    );
    for (action, target) in [
        ("tenant.get", "tenants/bravo"),
        ("provider.get", "tenants/bravo/providers/m365"),
        ("provider.list", "tenants/bravo/providers"),
        ("mailbox.list", "tenants/bravo/mailboxes"),
        ("mailbox.get", "tenants/bravo/mailboxes/scan"),
        ("mailbox.update", "tenants/bravo/mailboxes/scan"),
        ("device.list", "tenants/bravo/devices"),
        ("device.get", "tenants/bravo/devices/mfp"),
        ("agent.list", "tenants/bravo/agents"),
        ("agent.get", "tenants/bravo/agents/site-1"),
        ("consent_link.list", "tenants/bravo/consent_links"),
        ("audit.list", "tenants/bravo/audit"),
        ("fleet_status.get", "tenants/bravo/fleet_status"),
        ("apikey.create", "apikeys"),
    ] {
        assert!(
            by_ta
                .iter()
                .any(|e| e["action"] == action && e["target"] == target),
            "no refused {action} of {target} audited: {by_ta:#?}"
        );
    }
    // Nothing of it went into the other tenant's own log.
    let bravo = ok(
        ctl_as(&broker, &admin, "audit --tenant bravo -o json").await,
        "bravo audit",
    );
    assert!(!bravo.contains(&actor), "{bravo}");
}

/// `[admin] call_rate_per_minute` / `call_burst` through the executables: a key over its rate is
/// refused with RESOURCE_EXHAUSTED naming the setting and the wait, before its call touches
/// anything (a refused change within the rate is audited, the same change over it is not);
/// other keys have buckets of their own; a burst of 0 stops the broker naming the entry.
#[tokio::test]
async fn each_api_key_is_held_to_its_call_rate() {
    use tokenfleet_testkit::broker::TestOptions;
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions {
            tls: true,
            ..TestOptions::binary("[admin]\ncall_rate_per_minute = 1\ncall_burst = 4\n")
        },
    )
    .await
    .unwrap();
    let admin = broker.admin_key.expose().to_owned();
    // The admin's calls: 1 of its 4.
    let line = "api-key create --role viewer --description flood";
    let viewer = key_in_table(&ok(ctl_as(&broker, &admin, line).await, line));
    tokenfleet_testkit::logs::secret(&viewer);

    // Within the viewer's burst: three reads and one refused change (audited).
    for line in ["whoami", "tenant list", "whoami"] {
        ok(ctl_as(&broker, &viewer, line).await, line);
    }
    let change = "tenant create --name flood";
    refused(
        ctl_as(&broker, &viewer, change).await,
        "viewer tenant create",
        "is read-only",
    );
    // Over it: refused for the rate, whatever the call, with the setting and the wait named.
    for line in [change, "whoami"] {
        let (code, stdout, stderr) = ctl_as(&broker, &viewer, line).await;
        assert_ne!(code, 0, "{line} over the rate was served: {stdout}");
        assert!(
            stderr.contains(&format!(
                "API key `{}` is over its call rate",
                key_id(&viewer)
            )) && stderr.contains("call_rate_per_minute")
                && stderr.contains("retry after"),
            "{line}: {stderr}"
        );
        assert!(!stderr.contains("permission denied"), "{line}: {stderr}");
    }

    // The fleet admin's own bucket (calls 2 and 3): one refused record of the viewer's, from the
    // change within its rate; the one over it was refused before anything was written.
    ok(ctl_as(&broker, &admin, "whoami").await, "the admin's key");
    let by_viewer = refusals_of(&broker, &admin, &viewer).await;
    assert_eq!(by_viewer.len(), 1, "{by_viewer:#?}");
    assert_eq!(by_viewer[0]["action"], "tenant.create", "{by_viewer:#?}");
    // Call 4 of the admin's burst, then its fifth is over the rate too.
    ok(
        ctl_as(&broker, &admin, "whoami").await,
        "the admin's fourth call",
    );
    let (code, _, stderr) = ctl_as(&broker, &admin, "whoami").await;
    assert!(
        code != 0 && stderr.contains("is over its call rate"),
        "{stderr}"
    );

    // A burst of 0 is refused at start, naming the entry.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[admin]\ncall_burst = 0\n").unwrap();
    let (code, err) = tokenfleet_testkit::agent_site::broker_print_config(
        &config,
        "TOKENFLEET_ADMIN__CALL_BURST",
    )
    .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("admin.call_burst") && err.contains("must be at least 1"),
        "{err}"
    );
}

/// Failed authentications are limited per client address, one budget for the Admin API and the
/// console's sign-in (broker binary): after 20 wrong keys from one address, even the right key
/// from it is refused (`RESOURCE_EXHAUSTED` with the wait, and the console's sign-in `429`),
/// while another address is served.
#[tokio::test]
async fn failed_authentications_are_limited_per_address() {
    use tokenfleet_proto::v1 as pb;
    use tokenfleet_seal::Secret;
    use tokenfleet_testkit::broker::{BearerAuth, TestOptions};
    let broker = TestBroker::start_with(TestStore::Embedded, TestOptions::binary(""))
        .await
        .unwrap();
    let from = |source: &str, key: &Secret| {
        let endpoint = tonic::transport::Endpoint::from_shared(broker.grpc_url())
            .unwrap()
            .local_address(Some(source.parse().unwrap()));
        let auth = BearerAuth::new(key);
        async move {
            pb::admin_client::AdminClient::with_interceptor(endpoint.connect().await.unwrap(), auth)
                .who_am_i(pb::WhoAmIRequest::default())
                .await
        }
    };
    let wrong = Secret::new("tfk_0123456789abcdef_not-the-key");
    for n in 0..20 {
        let err = from("127.0.0.1", &wrong).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "attempt {n}: {err}"
        );
    }
    let err = from("127.0.0.1", &broker.admin_key).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains("too many failed authentications from your address"),
        "{err}"
    );
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The console's sign-in from that address: the same budget, spent.
    let addr = broker.http_addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = "csrf=x&api_key=y";
    let request = format!(
        "POST /console/sign-in HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Cookie: tf_signin=x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    // Another address is served.
    let me = from("127.0.0.2", &broker.admin_key)
        .await
        .unwrap()
        .into_inner();
    assert!(!me.key_id.is_empty(), "{me:?}");
}

/// Enrollment codes that are not valid count in the same per-address budget (broker binary over
/// TLS, the agent's own enrollment): after 20 from one address, a valid code from it is refused
/// with the wait, and so is the Admin API from that address.
#[tokio::test]
async fn failed_enrollments_count_in_the_same_budget() {
    use tokenfleet_agent::identity::{EnrollmentCode, enroll};
    let broker = TestBroker::start_tls(TestStore::Embedded).await.unwrap();
    let admin = broker.admin_key.expose().to_owned();
    ok(
        ctl_as(&broker, &admin, "tenant create --name acme").await,
        "tenant create",
    );
    let code =
        tokenfleet_testkit::broker::enrollment_code(&mut broker.admin_client(), "acme", "site-1")
            .await;
    let ca = broker.tls_ca_pem();
    let dir = tempfile::tempdir().unwrap();
    let url = broker.grpc_url();
    for n in 0..20 {
        let bogus = EnrollmentCode::new(&format!("tfe_{n:040x}"));
        let err = enroll(&url, &bogus, ca.clone(), dir.path(), "test")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("enrollment code is unknown"),
            "attempt {n}: {err}"
        );
    }
    let err = enroll(
        &url,
        &EnrollmentCode::new(&code),
        ca.clone(),
        dir.path(),
        "test",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("too many failed authentications from your address"),
        "{err}"
    );
    let (code, _, stderr) = ctl_as(&broker, &admin, "whoami").await;
    assert!(
        code != 0 && stderr.contains("too many failed authentications from your address"),
        "{stderr}"
    );
}
