//! The agent's fetch side against a real Dovecot validating XOAUTH2 tokens at the fake identity
//! provider: POP3 and IMAP fetch into the maildrop, the device collecting the same bytes from the
//! agent's local POP3 server (Python `poplib`), the upstream copy gone afterwards, a bad token
//! reported with the server's challenge JSON and final reply, and a real SIGKILL between the
//! local fsync and the upstream delete losing nothing and duplicating nothing.
//!
//! The crash test re-executes this test binary as a child (`child_fetch_and_die`), whose
//! maildrop hook kills the process with SIGKILL right after the message is committed — before
//! the fetcher sends `DELE`/`QUIT` (POP3) or `STORE \Deleted`/`EXPUNGE` (IMAP).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_agent::fetch::imap::ImapClient;
use tokenfleet_agent::fetch::pop3::Pop3Client;
use tokenfleet_agent::fetch::{FetchProtocol, FetchSettings, Security, fetch_once};
use tokenfleet_agent::ingress::Password;
use tokenfleet_agent::maildrop::{Maildrop, StoreHook, StoreStage};
use tokenfleet_agent::pop3_server::{Pop3Auth, Pop3Server, Pop3ServerConfig};
use tokenfleet_agent::probe::fetch::test_fetch;
use tokenfleet_agent::sasl::AccessToken;
use tokenfleet_agent::upstream::tls::TlsSettings;
use tokenfleet_agent::upstream::{Credentials, FailureKind};
use tokenfleet_proto::v1::ConnectionVerdict;
use tokenfleet_testkit::agent_site::{TestPki, dovecot_with_app_token};
use tokenfleet_testkit::dovecot::{Dovecot, DovecotFeatures};
use tokenfleet_testkit::fake_idp::FakeIdp;

const MAILBOX: &str = "printer@contoso.example";
const DEVICE: &str = "mfd-1";
const LOCAL_USER: &str = "mfd1";
const LOCAL_PASSWORD: &str = "local-device-pass";

const CHILD_DIR: &str = "TF_FETCH_CHILD_DIR";
const CHILD_PORT: &str = "TF_FETCH_CHILD_PORT";
const CHILD_PROTOCOL: &str = "TF_FETCH_CHILD_PROTOCOL";
const CHILD_TOKEN: &str = "TF_FETCH_CHILD_TOKEN";

/// The fake IdP, an app-only access token for [`MAILBOX`] and a Dovecot validating tokens at
/// the fake's `/introspect`.
async fn setup() -> (FakeIdp, String, Dovecot) {
    setup_with(DovecotFeatures::default()).await
}

/// [`setup`] with Dovecot `features` (TLS, mechanisms).
async fn setup_with(features: DovecotFeatures) -> (FakeIdp, String, Dovecot) {
    dovecot_with_app_token(MAILBOX, features).await
}

fn credentials(token: &str) -> Credentials {
    Credentials {
        username: MAILBOX.into(),
        token: AccessToken::new(token),
    }
}

fn settings(protocol: FetchProtocol, addr: SocketAddr) -> FetchSettings {
    let mut s = FetchSettings::new(protocol, "127.0.0.1", addr.port(), Security::None);
    s.timeout = Duration::from_secs(15);
    s
}

fn pop3_settings(dovecot: &Dovecot) -> FetchSettings {
    settings(FetchProtocol::Pop3, dovecot.pop3_addr())
}

fn imap_settings(dovecot: &Dovecot) -> FetchSettings {
    settings(FetchProtocol::Imap, dovecot.imap_addr())
}

/// A scan with a base64 attachment and body lines starting with dots.
fn scan_message(n: u32) -> Vec<u8> {
    let mut m = format!(
        "From: scanner@contoso.example\r\nTo: {MAILBOX}\r\nSubject: fax {n}\r\n\
         Message-ID: <fax-{n}@contoso.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: text/plain\r\n\r\n.a line with a leading dot\r\n..two\r\n.\r\nend\r\n\
         --b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    );
    for i in 0..300u32 {
        m.push_str(&format!(
            "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5{i:08}\r\n"
        ));
    }
    m.push_str("--b1--\r\n");
    m.into_bytes()
}

/// The messages waiting upstream, as POP3 `RETR` returns them (nothing deleted).
async fn upstream_pop3(dovecot: &Dovecot, token: &str) -> Vec<Vec<u8>> {
    let s = pop3_settings(dovecot);
    let mut c = Pop3Client::connect(&s).await.unwrap();
    c.authenticate(&credentials(token)).await.unwrap();
    let (n, _) = c.stat().await.unwrap();
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            c.retr(u32::try_from(i).unwrap(), 1 << 24, Duration::from_secs(15))
                .await
                .unwrap(),
        );
    }
    c.quit().await.unwrap();
    out
}

/// The messages waiting upstream, as IMAP `BODY.PEEK[]` returns them.
async fn upstream_imap(dovecot: &Dovecot, token: &str) -> Vec<Vec<u8>> {
    let s = imap_settings(dovecot);
    let mut c = ImapClient::connect(&s).await.unwrap();
    c.authenticate(&credentials(token)).await.unwrap();
    c.select("INBOX").await.unwrap();
    let mut out = Vec::new();
    for uid in c.search_all().await.unwrap() {
        out.push(c.fetch_body(uid).await.unwrap().unwrap().unwrap());
    }
    c.logout().await.unwrap();
    out
}

/// The device table of the local POP3 server: one device.
struct OneDevice;

impl Pop3Auth for OneDevice {
    async fn authenticate(
        &self,
        _peer: SocketAddr,
        user: String,
        password: Password,
    ) -> Option<String> {
        (user == LOCAL_USER && password.expose() == LOCAL_PASSWORD).then(|| DEVICE.to_owned())
    }
}

const POPLIB_DEVICE: &str = r#"
import poplib, sys
port, user, password, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
p = poplib.POP3("127.0.0.1", port, timeout=30)
p.user(user)
p.pass_(password)
count, size = p.stat()
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    open(f"{out}.{i}", "wb").write(b"\r\n".join(lines) + b"\r\n")
    p.dele(i)
p.quit()
print(count)
"#;

/// The device (Python `poplib`) collects everything from the agent's local POP3 server, with
/// DELE + QUIT; returns the messages in order.
async fn device_collects(maildrop: &Maildrop) -> Vec<Vec<u8>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Pop3Server::serve(
        listener,
        Pop3ServerConfig::default(),
        Arc::new(OneDevice),
        Arc::new(maildrop.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("msg");
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            POPLIB_DEVICE,
            &port.to_string(),
            LOCAL_USER,
            LOCAL_PASSWORD,
        ])
        .arg(&base)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "poplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    (1..=count)
        .map(|i| std::fs::read(dir.path().join(format!("msg.{i}"))).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_fetch_then_the_device_collects_the_same_bytes_and_the_upstream_copy_is_gone() {
    let (fake, token, dovecot) = setup().await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    dovecot.deliver(MAILBOX, &scan_message(2)).await.unwrap();
    let upstream = upstream_pop3(&dovecot, &token).await;
    assert_eq!(upstream.len(), 2, "{}", dovecot.log());
    assert!(upstream[0].ends_with(&scan_message(1)));

    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let report = fetch_once(
        &pop3_settings(&dovecot),
        &credentials(&token),
        &maildrop,
        DEVICE,
    )
    .await
    .unwrap();
    assert_eq!(report.fetched, 2, "{report:?}");
    assert_eq!(report.deleted_upstream, 2);
    assert_eq!(report.skipped_duplicates, 0);
    assert_eq!(
        report.bytes,
        upstream.iter().map(|m| m.len() as u64).sum::<u64>()
    );
    // The upstream copies are gone once the local ones are on disk.
    assert!(upstream_pop3(&dovecot, &token).await.is_empty());
    assert_eq!(maildrop.list(DEVICE).unwrap().len(), 2);

    // The device collects exactly the bytes Dovecot served.
    let collected = device_collects(&maildrop).await;
    assert_eq!(collected, upstream);
    assert!(maildrop.list(DEVICE).unwrap().is_empty(), "DELE + QUIT");

    // A second run finds nothing.
    let again = fetch_once(
        &pop3_settings(&dovecot),
        &credentials(&token),
        &maildrop,
        DEVICE,
    )
    .await
    .unwrap();
    assert_eq!(again.fetched, 0);
    fake.assert_no_violations().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_fetch_then_the_device_collects_the_same_bytes_and_the_upstream_copy_is_gone() {
    let (fake, token, dovecot) = setup().await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    dovecot.deliver(MAILBOX, &scan_message(2)).await.unwrap();
    dovecot.deliver(MAILBOX, &scan_message(3)).await.unwrap();
    let upstream = upstream_imap(&dovecot, &token).await;
    assert_eq!(upstream.len(), 3, "{}", dovecot.log());

    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let mut s = imap_settings(&dovecot);
    s.max_messages = 2;
    let report = fetch_once(&s, &credentials(&token), &maildrop, DEVICE)
        .await
        .unwrap();
    assert_eq!(report.fetched, 2, "max_messages per run: {report:?}");
    assert_eq!(report.deleted_upstream, 2);
    assert_eq!(
        upstream_imap(&dovecot, &token).await,
        upstream[2..].to_vec()
    );
    let report = fetch_once(&s, &credentials(&token), &maildrop, DEVICE)
        .await
        .unwrap();
    assert_eq!(report.fetched, 1, "{report:?}");
    assert!(upstream_imap(&dovecot, &token).await.is_empty());

    let collected = device_collects(&maildrop).await;
    assert_eq!(collected, upstream, "byte-identical, in order");
    fake.assert_no_violations().unwrap();
}

/// Another IMAP client (Python's `imaplib`, XOAUTH2) creates `folder` — given in modified UTF-7,
/// as it goes on the wire — and appends `message` to it.
const IMAPLIB_APPEND: &str = r#"
import imaplib, os, sys
port, user, folder, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
token = os.environ["TF_TOKEN"]
m = imaplib.IMAP4("127.0.0.1", port, timeout=30)
m.authenticate("XOAUTH2", lambda _: f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
quoted = '"' + folder + '"'
typ, data = m.create(quoted)
assert typ == "OK", data
typ, data = m.append(quoted, None, None, open(path, "rb").read())
assert typ == "OK", data
m.logout()
"#;

async fn imaplib_append(dovecot: &Dovecot, token: &str, folder_mutf7: &str, message: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("message.eml");
    std::fs::write(&path, message).unwrap();
    let out = tokio::process::Command::new("python3")
        .args(["-c", IMAPLIB_APPEND])
        .arg(dovecot.imap_addr().port().to_string())
        .arg(MAILBOX)
        .arg(folder_mutf7)
        .arg(&path)
        .env("TF_TOKEN", token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "imaplib APPEND failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dovecot.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_fetch_from_a_folder_with_a_non_ascii_name() {
    let (fake, token, dovecot) = setup().await;
    let scan = scan_message(7);
    imaplib_append(&dovecot, &token, "Scans B&APw-ro &- Fax", &scan).await;
    dovecot.deliver(MAILBOX, &scan_message(8)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let mut s = imap_settings(&dovecot);
    // Configured as the operator writes it; the agent sends it in modified UTF-7.
    s.folder = "Scans Büro & Fax".into();
    let report = fetch_once(&s, &credentials(&token), &maildrop, DEVICE)
        .await
        .unwrap();
    assert_eq!(report.fetched, 1, "{report:?}");
    assert_eq!(device_collects(&maildrop).await, vec![scan]);
    // INBOX is another folder: untouched (LMTP put its trace headers in front).
    let inbox = upstream_imap(&dovecot, &token).await;
    assert!(
        inbox.len() == 1 && inbox[0].ends_with(&scan_message(8)),
        "INBOX holds {} messages",
        inbox.len()
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_auth_rejected_with_the_challenge_json_and_the_final_reply() {
    let (_fake, token, dovecot) = setup().await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let bad = credentials("not-a-valid-token");

    let e = fetch_once(&pop3_settings(&dovecot), &bad, &maildrop, DEVICE)
        .await
        .unwrap_err();
    eprintln!("POP3: {e:?}");
    assert_eq!(e.kind, FailureKind::AuthRejected, "{e:?}");
    assert!(e.final_reply.contains("-ERR"), "{e:?}");
    let json: serde_json::Value =
        serde_json::from_str(e.auth_challenge_json.as_deref().unwrap()).unwrap();
    assert_eq!(json["status"], "401", "{json}");

    let e = fetch_once(&imap_settings(&dovecot), &bad, &maildrop, DEVICE)
        .await
        .unwrap_err();
    eprintln!("IMAP: {e:?}");
    assert_eq!(e.kind, FailureKind::AuthRejected, "{e:?}");
    assert!(e.final_reply.contains(" NO "), "{e:?}");
    let json: serde_json::Value =
        serde_json::from_str(e.auth_challenge_json.as_deref().unwrap()).unwrap();
    assert_eq!(json["status"], "401", "{json}");

    // Nothing fetched, nothing lost, and no token in the error.
    assert!(maildrop.list(DEVICE).unwrap().is_empty());
    assert_eq!(upstream_pop3(&dovecot, &token).await.len(), 1);
    assert!(!format!("{e:?}").contains("not-a-valid-token"));
}

/// Fetches in a child process that SIGKILLs itself right after the maildrop committed the first
/// message; then checks that the next run in this process loses nothing and stores no
/// duplicate.
async fn sigkill_between_local_fsync_and_upstream_delete(protocol: FetchProtocol) {
    let (_fake, token, dovecot) = setup().await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    dovecot.deliver(MAILBOX, &scan_message(2)).await.unwrap();
    let (settings, upstream) = match protocol {
        FetchProtocol::Pop3 => (
            pop3_settings(&dovecot),
            upstream_pop3(&dovecot, &token).await,
        ),
        FetchProtocol::Imap => (
            imap_settings(&dovecot),
            upstream_imap(&dovecot, &token).await,
        ),
    };
    assert_eq!(upstream.len(), 2);
    let dir = tempfile::tempdir().unwrap();

    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &crate::libtest_name(module_path!(), "child_fetch_and_die"),
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_PORT, settings.port.to_string())
        .env(
            CHILD_PROTOCOL,
            if protocol == FetchProtocol::Pop3 {
                "pop3"
            } else {
                "imap"
            },
        )
        .env(CHILD_TOKEN, &token)
        .status()
        .await
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child dies by SIGKILL at the hook: {status}"
    );

    // The first message is on disk; upstream still has both (no delete was committed).
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let stored = maildrop.list(DEVICE).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(maildrop.read(DEVICE, &stored[0].id).unwrap(), upstream[0]);
    let still_upstream = match protocol {
        FetchProtocol::Pop3 => upstream_pop3(&dovecot, &token).await,
        FetchProtocol::Imap => upstream_imap(&dovecot, &token).await,
    };
    assert_eq!(still_upstream, upstream, "nothing was deleted upstream");

    // The next run: the first message is recognised (not downloaded, not stored again) and
    // deleted upstream; the second is fetched.
    let report = fetch_once(&settings, &credentials(&token), &maildrop, DEVICE)
        .await
        .unwrap();
    assert_eq!(report.skipped_duplicates, 1, "{report:?}");
    assert_eq!(report.fetched, 1, "{report:?}");
    assert_eq!(report.deleted_upstream, 2, "{report:?}");
    let left = match protocol {
        FetchProtocol::Pop3 => upstream_pop3(&dovecot, &token).await,
        FetchProtocol::Imap => upstream_imap(&dovecot, &token).await,
    };
    assert!(left.is_empty());
    let collected = device_collects(&maildrop).await;
    assert_eq!(
        collected, upstream,
        "each message exactly once, byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_sigkill_between_local_fsync_and_upstream_delete_loses_and_duplicates_nothing() {
    sigkill_between_local_fsync_and_upstream_delete(FetchProtocol::Pop3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_sigkill_between_local_fsync_and_upstream_delete_loses_and_duplicates_nothing() {
    sigkill_between_local_fsync_and_upstream_delete(FetchProtocol::Imap).await;
}

/// Not a test by itself: the child of the crash tests (does nothing without its environment).
#[tokio::test]
#[ignore = "run as a child process by the crash tests"]
async fn child_fetch_and_die() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let port: u16 = std::env::var(CHILD_PORT).unwrap().parse().unwrap();
    let protocol = match std::env::var(CHILD_PROTOCOL).unwrap().as_str() {
        "pop3" => FetchProtocol::Pop3,
        _ => FetchProtocol::Imap,
    };
    let token = std::env::var(CHILD_TOKEN).unwrap();
    let hook: StoreHook = Arc::new(|stage| {
        if stage == StoreStage::Committed {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            loop {
                std::thread::park();
            }
        }
    });
    let maildrop = Maildrop::open_with_hook(&dir, Some(hook)).unwrap();
    let settings = settings(protocol, SocketAddr::from(([127, 0, 0, 1], port)));
    let _ = fetch_once(&settings, &credentials(&token), &maildrop, DEVICE).await;
    unreachable!("the hook kills the process");
}

fn secured(
    protocol: FetchProtocol,
    addr: SocketAddr,
    security: Security,
    ca_pem: Option<&str>,
) -> FetchSettings {
    let mut s = settings(protocol, addr);
    s.security = security;
    s.tls = TlsSettings {
        extra_ca_pem: ca_pem.map(str::to_owned),
        no_system_roots: true,
        ..TlsSettings::default()
    };
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_over_stls_starttls_and_implicit_tls_with_a_private_ca() {
    let pki = TestPki::new("tokenfleet fetch test CA");
    let (fake, token, dovecot) = setup_with(pki.dovecot_features()).await;
    for n in 1..=4 {
        dovecot.deliver(MAILBOX, &scan_message(n)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    let ca = Some(pki.ca_pem.as_str());
    let profiles = [
        secured(
            FetchProtocol::Pop3,
            dovecot.pop3_addr(),
            Security::Starttls,
            ca,
        ),
        secured(
            FetchProtocol::Pop3,
            dovecot.pop3s_addr().unwrap(),
            Security::ImplicitTls,
            ca,
        ),
        secured(
            FetchProtocol::Imap,
            dovecot.imap_addr(),
            Security::Starttls,
            ca,
        ),
        secured(
            FetchProtocol::Imap,
            dovecot.imaps_addr().unwrap(),
            Security::ImplicitTls,
            ca,
        ),
    ];
    for mut profile in profiles {
        profile.max_messages = 1;
        let report = fetch_once(&profile, &credentials(&token), &maildrop, DEVICE)
            .await
            .unwrap_or_else(|e| panic!("{profile:?}: {e:?}\n{}", dovecot.log()));
        assert_eq!(report.fetched, 1, "{profile:?}: {report:?}");
        assert_eq!(report.deleted_upstream, 1, "{profile:?}: {report:?}");
    }
    assert_eq!(maildrop.list(DEVICE).unwrap().len(), 4);
    assert!(upstream_pop3(&dovecot, &token).await.is_empty());
    let collected = device_collects(&maildrop).await;
    for (n, m) in collected.iter().enumerate() {
        assert!(
            m.ends_with(&scan_message(u32::try_from(n).unwrap() + 1)),
            "in order"
        );
    }
    fake.assert_no_violations().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_the_fetch_before_any_token_is_sent() {
    let pki = TestPki::new("tokenfleet fetch test CA");
    let (fake, token, dovecot) = setup_with(pki.dovecot_features()).await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    for profile in [
        secured(
            FetchProtocol::Pop3,
            dovecot.pop3_addr(),
            Security::Starttls,
            None,
        ),
        secured(
            FetchProtocol::Imap,
            dovecot.imaps_addr().unwrap(),
            Security::ImplicitTls,
            None,
        ),
    ] {
        let e = fetch_once(&profile, &credentials(&token), &maildrop, DEVICE)
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Permanent, "{e:?}");
        assert!(e.final_reply.contains("tls handshake"), "{e:?}");
    }
    assert!(
        fake.requests_to(tokenfleet_testkit::fake_idp::Endpoint::Introspect)
            .is_empty(),
        "no token reached the server"
    );
    assert!(maildrop.list(DEVICE).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_test_verdicts_for_fetch_profiles() {
    let pki = TestPki::new("tokenfleet fetch test CA");
    let (_fake, token, dovecot) = setup_with(pki.dovecot_features()).await;
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    let ca = Some(pki.ca_pem.as_str());
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(30);
    let good = credentials(&token);

    // Good setups: every step, verdict OK, the mailbox looked at, nothing fetched.
    let pop3 = secured(
        FetchProtocol::Pop3,
        dovecot.pop3_addr(),
        Security::Starttls,
        ca,
    );
    let r = test_fetch(&pop3, Some(&good), "", deadline()).await;
    eprintln!("POP3 STLS: {r:?}");
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dns", "tcp", "greeting", "capa", "stls", "tls", "capa", "auth", "stat", "quit"
        ]
    );
    assert!(r.summary.contains("1 messages"), "{}", r.summary);
    let imaps = secured(
        FetchProtocol::Imap,
        dovecot.imaps_addr().unwrap(),
        Security::ImplicitTls,
        ca,
    );
    let r = test_fetch(&imaps, Some(&good), "", deadline()).await;
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dns",
            "tcp",
            "tls",
            "greeting",
            "capability",
            "auth",
            "select",
            "quit"
        ]
    );
    assert!(r.summary.contains("INBOX has 1 messages"), "{}", r.summary);
    assert_eq!(
        upstream_pop3(&dovecot, &token).await.len(),
        1,
        "the test fetches nothing"
    );

    // A bad token: TOKEN_REJECTED with the server's reply and challenge JSON.
    let bad = credentials("not-a-valid-token");
    for profile in [&pop3, &imaps] {
        let r = test_fetch(profile, Some(&bad), "", deadline()).await;
        assert_eq!(r.verdict(), ConnectionVerdict::TokenRejected, "{r:?}");
        assert!(r.summary.contains("\"status\":\"401\""), "{}", r.summary);
        assert!(r.fix.contains("IMAP.AccessAsUser.All"), "{}", r.fix);
        assert!(!format!("{r:?}").contains("not-a-valid-token"));
    }

    // No token from the broker.
    let r = test_fetch(&pop3, None, "grant needs consent", deadline()).await;
    assert_eq!(r.verdict(), ConnectionVerdict::NoToken, "{r:?}");
    assert_eq!(r.summary, "grant needs consent");

    // A wrong port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap();
    drop(closed);
    let wrong = secured(FetchProtocol::Pop3, port, Security::ImplicitTls, ca);
    let r = test_fetch(&wrong, Some(&good), "", deadline()).await;
    assert_eq!(r.verdict(), ConnectionVerdict::ConnectionRefused, "{r:?}");

    // An untrusted certificate, with what the certificate says.
    for profile in [
        secured(
            FetchProtocol::Pop3,
            dovecot.pop3_addr(),
            Security::Starttls,
            None,
        ),
        secured(
            FetchProtocol::Imap,
            dovecot.imaps_addr().unwrap(),
            Security::ImplicitTls,
            None,
        ),
    ] {
        let r = test_fetch(&profile, Some(&good), "", deadline()).await;
        assert_eq!(
            r.verdict(),
            ConnectionVerdict::CertificateUntrusted,
            "{r:?}"
        );
        let cert = r.certificate.as_ref().expect("certificate details");
        assert_eq!(cert.subject, "O=tokenfleet, CN=127.0.0.1", "{cert:?}");
        assert!(
            r.summary.contains("tokenfleet fetch test CA"),
            "{}",
            r.summary
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_test_says_when_xoauth2_is_not_offered() {
    let (_fake, token, dovecot) = setup_with(DovecotFeatures {
        auth_mechanisms: Some("oauthbearer".into()),
        ..DovecotFeatures::default()
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for profile in [pop3_settings(&dovecot), imap_settings(&dovecot)] {
        let r = test_fetch(&profile, Some(&credentials(&token)), "", deadline).await;
        eprintln!("{r:?}");
        assert_eq!(r.verdict(), ConnectionVerdict::MechanismNotOffered, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_the_size_limit_stay_upstream_and_are_not_downloaded() {
    let (_fake, token, dovecot) = setup().await;
    dovecot
        .deliver(MAILBOX, b"Subject: small\r\n\r\nok\r\n")
        .await
        .unwrap();
    dovecot.deliver(MAILBOX, &scan_message(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let maildrop = Maildrop::open(dir.path()).unwrap();
    for protocol in [FetchProtocol::Pop3, FetchProtocol::Imap] {
        let mut s = match protocol {
            FetchProtocol::Pop3 => pop3_settings(&dovecot),
            FetchProtocol::Imap => imap_settings(&dovecot),
        };
        s.max_message_size = 4096;
        let report = fetch_once(&s, &credentials(&token), &maildrop, DEVICE)
            .await
            .unwrap();
        assert_eq!(report.skipped_too_large, 1, "{protocol:?}: {report:?}");
    }
    assert_eq!(
        maildrop.list(DEVICE).unwrap().len(),
        1,
        "the small one, once"
    );
    let left = upstream_pop3(&dovecot, &token).await;
    assert_eq!(left.len(), 1);
    assert!(left[0].ends_with(&scan_message(1)));
}
