//! The SMTP ingress driven by a real client (Python `smtplib`, as a printer would be) and by raw
//! sockets for every malformed-input case, against a real spool on disk; and its limits over real
//! sockets from several loopback source addresses: session caps (total, per source, known
//! sources exempt), failed-login slowdown and lockout per source and user, messages streamed to
//! disk, the spool quota (`452 4.3.1`) and the sender binding of LOGIN_USER devices (`553`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use argon2::{Argon2, PasswordHasher as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokenfleet_agent::ingress::{
    IngressConfig, IngressServer, IngressTls, LocalDevice, LocalDevices, LoginLimits, SenderPolicy,
    SessionLimits, parse_source,
};
use tokenfleet_agent::spool::{Spool, SpoolLimits};
use tokio::sync::oneshot;

const USER: &str = "mfd1";
const PASSWORD: &str = "printer-pass-1";
const FIXED_ADDRESS: &str = "scan-admin@contoso.example";

fn fixed_mailbox() -> SenderPolicy {
    SenderPolicy::FixedMailbox {
        mailbox: "scan-admin".into(),
        address: FIXED_ADDRESS.into(),
        display_name: "Scanner 2nd floor".into(),
    }
}

/// `mfd-1`, logging in with [`USER`]/[`PASSWORD`], and allowed to send as any user of
/// `example.com`.
fn login_device(sender: SenderPolicy) -> LocalDevice {
    let mut d = LocalDevice::new("mfd-1", sender);
    d.username = Some(USER.into());
    d.password_hash = Some(phc(PASSWORD));
    d.user_addresses = vec!["@example.com".into()];
    d
}

fn phc(password: &str) -> String {
    Argon2::default()
        .hash_password(password.as_bytes())
        .unwrap()
        .to_string()
}

/// A running ingress on 127.0.0.1 with its own runtime and spool; shut down on drop.
struct Server {
    addr: SocketAddr,
    spool: Arc<Spool>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// The usual devices: `mfd-1` logs in (sender mode LOGIN_USER); `mfd-allowlisted` sends
    /// from 127.0.0.1 (an exact address) without logging in, as a fixed mailbox.
    fn start(config: IngressConfig, allow_loopback: bool) -> Self {
        let mut allowlisted = LocalDevice::new("mfd-allowlisted", fixed_mailbox());
        if allow_loopback {
            allowlisted.allowed_addresses = vec![parse_source("127.0.0.1").unwrap()];
        }
        Self::start_with(
            config,
            vec![login_device(SenderPolicy::LoginUser), allowlisted],
        )
    }

    fn start_with(config: IngressConfig, devices: Vec<LocalDevice>) -> Self {
        Self::start_limited(config, devices, SpoolLimits::default())
    }

    fn start_limited(config: IngressConfig, devices: Vec<LocalDevice>, quota: SpoolLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open_with(dir.path().join("spool"), quota).unwrap());
        let handler = Arc::new(LocalDevices::new(devices, Arc::clone(&spool)));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            IngressServer::serve(listener, config, handler, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let _ = done_tx.send(());
        });
        Self {
            addr,
            spool,
            _dir: dir,
            stop: Some(stop),
            done: Some(done),
            runtime: Some(runtime),
        }
    }

    fn config() -> IngressConfig {
        IngressConfig {
            hostname: "agent.test".into(),
            max_message_size: 1024 * 1024,
            command_timeout: Duration::from_secs(10),
            ..IngressConfig::default()
        }
    }

    /// Stops the server and waits until every session has ended.
    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            done.recv_timeout(Duration::from_secs(30))
                .expect("server did not drain");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

struct Client {
    reader: BufReader<TcpStream>,
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8).
fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            socket.connect(addr).await
        })
        .unwrap();
    let std = stream.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

/// The first line the server sends on a new connection from `source`.
fn greeting_from(source: [u8; 4], addr: SocketAddr) -> (TcpStream, String) {
    let stream = connect_from(source, addr);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (stream, line)
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect(addr).unwrap())
    }

    fn connect_from(source: [u8; 4], addr: SocketAddr) -> Self {
        Self::from_stream(connect_from(source, addr))
    }

    fn from_stream(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = Client {
            reader: BufReader::new(stream),
        };
        assert_eq!(c.reply().0, 220);
        c
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// Reads one (possibly multi-line) reply: code and full text.
    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "connection closed while waiting for a reply; got {all:?}"
            );
            all.push_str(&line);
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                return (line[..3].parse().unwrap(), all);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.write(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    fn expect(&mut self, line: &str, code: u16, enhanced: &str) -> String {
        let (got, text) = self.cmd(line);
        assert_eq!(got, code, "{line:?} → {text:?}");
        assert!(
            text.contains(enhanced),
            "{line:?} → {text:?}, expected {enhanced}"
        );
        text
    }

    fn login(&mut self) {
        self.expect("EHLO printer", 250, "AUTH PLAIN LOGIN");
        let plain = STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
        self.expect(&format!("AUTH PLAIN {plain}"), 235, "2.7.0");
    }

    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        let n = self.reader.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "expected the server to close, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

const SMTPLIB_PRINTER: &str = r#"
import email.policy, smtplib, sys
from email.message import EmailMessage
port, user, password, out = sys.argv[1:5]
m = EmailMessage()
m["From"] = "scanner@example.com"
m["To"] = "alice@example.com"
m["Subject"] = "Scan from MFD"
m.set_content("Scanned document attached.\n.leading dot\n..two dots\n.\nend\n", cte="7bit")
m.add_attachment(bytes(range(256)) * 300, maintype="application", subtype="pdf", filename="scan.pdf")
data = m.as_bytes(policy=email.policy.SMTP)
with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as s:
    s.ehlo("mfd-1")
    s.login(user, password)
    s.sendmail("scanner@example.com", ["alice@example.com", "bob@example.com"], data)
open(out, "wb").write(data)
"#;

#[test]
fn smtplib_printer_message_with_attachment_is_spooled_exactly() {
    let server = Server::start(Server::config(), false);
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("python3")
        .args([
            "-c",
            SMTPLIB_PRINTER,
            &server.addr.port().to_string(),
            USER,
            PASSWORD,
        ])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "smtplib failed: {status}");
    let sent = std::fs::read(out.path()).unwrap();
    assert!(
        sent.windows(14).any(|w| w == b"\r\n.leading dot"),
        "the test must exercise dot-stuffing"
    );

    // 250 was sent, so the message is already on disk.
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1);
    let mut expected = sent.clone();
    if !expected.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    let spooled = server.spool.message(&ids[0]).unwrap();
    assert_eq!(spooled.len(), expected.len());
    assert!(
        spooled == expected,
        "spooled bytes differ from what smtplib sent"
    );
    let meta = server.spool.entry(&ids[0]).unwrap();
    assert_eq!(meta.envelope.device, "mfd-1");
    assert_eq!(meta.envelope.from, "scanner@example.com");
    assert_eq!(
        meta.envelope.rcpts,
        vec!["alice@example.com", "bob@example.com"]
    );
    // LOGIN_USER: the From address is the user; the message is untouched.
    assert_eq!(meta.envelope.user_address, "scanner@example.com");
    assert_eq!(meta.envelope.mailbox, "");
}

#[test]
fn auth_login_pipelining_and_dot_unstuffing() {
    let server = Server::start(Server::config(), false);
    let mut c = Client::connect(server.addr);
    let ehlo = c.expect("EHLO printer", 250, "SIZE 1048576");
    for ext in ["8BITMIME", "PIPELINING", "AUTH PLAIN LOGIN"] {
        assert!(ehlo.contains(ext), "{ehlo}");
    }
    assert!(
        !ehlo.contains("STARTTLS"),
        "no TLS acceptor configured: {ehlo}"
    );
    c.expect("AUTH LOGIN", 334, "VXNlcm5hbWU6");
    c.expect(&STANDARD.encode(USER), 334, "UGFzc3dvcmQ6");
    c.expect(&STANDARD.encode(PASSWORD), 235, "2.7.0");
    c.expect("AUTH LOGIN", 503, "5.5.1");
    // Everything in one write, as a pipelining client sends it.
    c.write(b"MAIL FROM:<scan@example.com> SIZE=40 BODY=8BITMIME\r\nRCPT TO:<a@example.com>\r\nDATA\r\n");
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 250);
    assert_eq!(c.reply().0, 354);
    c.write(b"Subject: x\r\n\r\n..dot\r\n..\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    let id = text.trim_end().rsplit(' ').next().unwrap().to_owned();
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].as_str(), id);
    assert_eq!(
        server.spool.message(&ids[0]).unwrap(),
        b"Subject: x\r\n\r\n.dot\r\n.\r\n"
    );
    c.expect("RSET", 250, "2.0.0");
    c.expect("NOOP", 250, "2.0.0");
    c.expect("VRFY someone", 252, "2.5.0");
    c.expect("QUIT", 221, "2.0.0");
    c.assert_closed();
}

/// SMTP smuggling: only `<CR><LF>.<CR><LF>` ends a message. A bare-LF dot line (`\n.\n`,
/// `\r\n.\n`, `\n.\r\n`) followed by what looks like a second transaction is content of the
/// first message, which is queued once, whole, with CRLF line ends.
#[test]
fn a_bare_lf_dot_never_ends_a_message() {
    let server = Server::start(Server::config(), false);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    c.expect("AUTH LOGIN", 334, "VXNlcm5hbWU6");
    c.expect(&STANDARD.encode(USER), 334, "UGFzc3dvcmQ6");
    c.expect(&STANDARD.encode(PASSWORD), 235, "2.7.0");
    c.expect("MAIL FROM:<scan@example.com>", 250, "2.1.0");
    c.expect("RCPT TO:<a@example.com>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.write(
        b"Subject: x\r\n\r\none\n.\nMAIL FROM:<ceo@example.com>\r\n.\nRCPT TO:<b@example.com>\n.\r\nDATA\r\nend\r\n.\r\n",
    );
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1, "one message, not a smuggled second one");
    assert_eq!(
        server.spool.message(&ids[0]).unwrap(),
        b"Subject: x\r\n\r\none\r\n.\r\nMAIL FROM:<ceo@example.com>\r\n\r\nRCPT TO:<b@example.com>\r\n.\r\nDATA\r\nend\r\n".to_vec()
    );
    // The session is still in step: the next command is a command.
    c.expect("NOOP", 250, "2.0.0");
    c.expect("QUIT", 221, "2.0.0");
}

#[test]
fn allowlisted_source_address_needs_no_auth() {
    let server = Server::start(Server::config(), true);
    let mut c = Client::connect(server.addr);
    c.expect("HELO printer", 250, "agent.test");
    c.expect("MAIL FROM:<>", 250, "2.1.0");
    c.expect("RCPT TO:<ops@example.com>", 250, "2.1.5");
    c.expect("DATA", 354, "");
    c.write(b"Subject: status\r\n\r\ntoner low\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let ids = server.spool.queued().unwrap();
    let meta = server.spool.entry(&ids[0]).unwrap();
    // The device sends as its fixed mailbox: envelope sender and From are the mailbox's.
    assert_eq!(
        (
            meta.envelope.device.as_str(),
            meta.envelope.from.as_str(),
            meta.envelope.mailbox.as_str()
        ),
        ("mfd-allowlisted", FIXED_ADDRESS, "scan-admin")
    );
    assert_eq!(
        server.spool.message(&ids[0]).unwrap(),
        b"From: \"Scanner 2nd floor\" <scan-admin@contoso.example>\r\nSubject: status\r\n\r\ntoner low\r\n"
    );
}

#[test]
fn malformed_input_gets_the_exact_reply_codes() {
    let server = Server::start(Server::config(), false);
    let mut c = Client::connect(server.addr);
    c.expect("FROBNICATE", 500, "5.5.1");
    c.expect("EHLO printer", 250, "PIPELINING");
    c.expect("MAIL FROM:<scan@example.com>", 530, "5.7.0");
    c.expect("AUTH PLAIN !!!not-base64!!!", 501, "5.5.2");
    c.expect("AUTH PLAIN", 334, "");
    c.expect("%%%", 501, "5.5.2");
    c.expect("AUTH LOGIN", 334, "VXNlcm5hbWU6");
    c.expect("bm9w@@", 501, "5.5.2");
    c.expect("AUTH PLAIN", 334, "");
    c.expect("*", 501, "5.0.0");
    c.expect("AUTH CRAM-MD5", 504, "5.5.4");
    let wrong = STANDARD.encode(format!("\0{USER}\0wrong"));
    c.expect(&format!("AUTH PLAIN {wrong}"), 535, "5.7.8");
    // Too many errors in one session would close it: start again for the rest.
    drop(c);

    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("RCPT TO:<a@example.com>", 503, "5.5.1");
    c.expect("DATA", 503, "5.5.1");
    c.expect("MAIL FROM:<scan@example.com>", 250, "2.1.0");
    c.expect("DATA", 503, "5.5.1");
    c.expect("MAIL FROM:<scan@example.com>", 503, "5.5.1");
    c.expect("RSET", 250, "2.0.0");
    c.expect("MAIL FROM:<scan@example.com> SIZE=999999999", 552, "5.3.4");
    c.expect("MAIL FROM:scan@example.com", 501, "5.5.4");
    // An over-long line: one 500 5.5.2 and the rest of the line is discarded, not run.
    let mut long = vec![b'X'; 5000];
    long.extend_from_slice(b" QUIT\r\n");
    c.write(&long);
    let (code, text) = c.reply();
    assert_eq!((code, text.contains("5.5.2")), (500, true), "{text}");
    c.expect("NOOP", 250, "2.0.0");
    // Non-UTF-8 garbage never panics the server.
    c.write(b"\xff\xfe\x00\x01\r\n");
    assert_eq!(c.reply().0, 500);
    c.expect("NOOP", 250, "2.0.0");
    drop(c);

    let mut c = Client::connect(server.addr);
    c.login();
    // DATA over the size limit: read to the end, answered 552, nothing queued.
    c.expect("MAIL FROM:<scan@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    let line = vec![b'y'; 998];
    for _ in 0..1100 {
        c.write(&line);
        c.write(b"\r\n");
    }
    c.expect(".", 552, "5.3.4");
    // A data line over the line limit.
    c.expect("MAIL FROM:<scan@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(&[b'z'; 3000]);
    c.write(b"\r\n");
    c.expect(".", 500, "5.5.2");
    c.expect("STARTTLS", 502, "5.5.1");
    assert!(server.spool.queued().unwrap().is_empty());
}

#[test]
fn too_many_errors_close_with_421() {
    let config = IngressConfig {
        max_errors: 3,
        ..Server::config()
    };
    let server = Server::start(config, false);
    let mut c = Client::connect(server.addr);
    c.expect("BAD1", 500, "5.5.1");
    c.expect("BAD2", 500, "5.5.1");
    c.write(b"BAD3\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 500, "{text}");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.7.0"), "{text}");
    c.assert_closed();
}

#[test]
fn idle_client_times_out_with_421() {
    let config = IngressConfig {
        command_timeout: Duration::from_millis(300),
        ..Server::config()
    };
    let server = Server::start(config, false);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.4.2"), "{text}");
    c.assert_closed();
}

#[test]
fn abrupt_disconnect_mid_data_queues_nothing() {
    let mut server = Server::start(Server::config(), false);
    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("MAIL FROM:<scan@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(b"Subject: cut off\r\n\r\nhalf a scan\r\n");
    c.reader
        .get_ref()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drop(c);
    // Draining waits for every session to end, so the cut-off one has finished.
    server.shutdown();
    assert!(server.spool.queued().unwrap().is_empty());
    let reopened = Spool::open(server._dir.path().join("spool")).unwrap();
    assert_eq!(reopened.recovery().queued, 0);
    assert_eq!(reopened.recovery().removed_temp, 0);
}

#[test]
fn shutdown_tells_idle_sessions_421() {
    let mut server = Server::start(Server::config(), false);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    if let Some(stop) = server.stop.take() {
        stop.send(()).unwrap();
    }
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.contains("4.3.2"), "{text}");
    c.assert_closed();
    server.shutdown();
}

#[test]
fn random_garbage_never_breaks_the_server() {
    let server = Server::start(Server::config(), false);
    for round in 0..20 {
        let mut garbage = vec![0u8; 4096];
        getrandom::fill(&mut garbage).unwrap();
        // Some rounds look like a session that went wrong half-way.
        let prefix: &[u8] = match round % 4 {
            0 => b"EHLO x\r\nAUTH PLAIN\r\n",
            1 => b"EHLO x\r\nAUTH LOGIN\r\n",
            2 => b"EHLO \xff\r\x00\r\n",
            _ => b"",
        };
        let mut stream = TcpStream::connect(server.addr).unwrap();
        let _ = stream.write_all(prefix);
        let _ = stream.write_all(&garbage);
        let _ = stream.write_all(b"\r\nQUIT\r\n");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut replies = Vec::new();
        let _ = stream.read_to_end(&mut replies);
        for line in String::from_utf8_lossy(&replies).split_terminator("\r\n") {
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            assert!(
                code.is_some_and(|c| (200..600).contains(&c)),
                "bad reply line {line:?}"
            );
        }
    }
    // Still serving, nothing queued.
    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("QUIT", 221, "2.0.0");
    assert!(server.spool.queued().unwrap().is_empty());
}

/// A test CA and a leaf for 127.0.0.1 signed by it, as PEM files in `dir`: (ca, cert, key).
fn ca_signed_files(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ingress test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "agent.test");
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    (ca_file, cert_file, key_file)
}

/// Python's smtplib: EHLO, STARTTLS verifying against `cafile`, EHLO, AUTH, send. Prints the
/// features seen before and after TLS (one line each, sorted).
const SMTPLIB_STARTTLS: &str = r#"
import smtplib, ssl, sys
port, user, password, cafile = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=cafile)
ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
data = b"From: Jane Doe <jane@example.com>\r\nTo: ops@example.com\r\nSubject: over tls\r\n\r\nsecret scan\r\n"
with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as s:
    s.ehlo("mfd-1")
    print(" ".join(sorted(s.esmtp_features)))
    code, msg = s.mail("jane@example.com")
    print("MAIL", code, msg.decode())
    s.starttls(context=ctx)
    s.ehlo("mfd-1")
    print(" ".join(sorted(s.esmtp_features)))
    s.login(user, password)
    s.sendmail("jane@example.com", ["ops@example.com"], data)
"#;

fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn starttls_with_pem_files_then_auth_then_send() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_signed_files(certs.path());
    let config = IngressConfig {
        tls: Some(IngressTls::from_pem_files(&cert, &key).unwrap()),
        allow_plaintext_auth: false,
        ..Server::config()
    };
    let server = Server::start(config, false);

    // Without TLS: STARTTLS offered, AUTH neither offered nor accepted.
    let mut c = Client::connect(server.addr);
    let ehlo = c.expect("EHLO printer", 250, "STARTTLS");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let plain = STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    c.expect(&format!("AUTH PLAIN {plain}"), 538, "5.7.11");
    c.expect("STARTTLS now", 501, "5.5.4");
    drop(c);

    let port = server.addr.port().to_string();
    let out = run_python(
        SMTPLIB_STARTTLS,
        &[&port, USER, PASSWORD, ca.to_str().unwrap()],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("starttls") && !lines[0].contains("auth"),
        "{out}"
    );
    // require_tls is off: MAIL before STARTTLS is refused only for want of AUTH.
    assert!(lines[1].starts_with("MAIL 530"), "{out}");
    assert!(
        lines[2].contains("auth") && !lines[2].contains("starttls"),
        "{out}"
    );
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        server.spool.message(&ids[0]).unwrap(),
        b"From: Jane Doe <jane@example.com>\r\nTo: ops@example.com\r\nSubject: over tls\r\n\r\nsecret scan\r\n"
    );
    let meta = server.spool.entry(&ids[0]).unwrap();
    assert_eq!(
        (
            meta.envelope.device.as_str(),
            meta.envelope.user_address.as_str()
        ),
        ("mfd-1", "jane@example.com")
    );
    assert!(IngressTls::from_pem_files(&key, &key).is_err());
    let err = IngressTls::from_pem_files(&cert, &certs.path().join("missing.pem")).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn require_tls_refuses_auth_and_mail_before_starttls() {
    let tls = IngressTls::self_signed(&["127.0.0.1".to_owned()]).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = certs.path().join("self-signed.pem");
    std::fs::write(&ca, tls.certificate_pem()).unwrap();
    let config = IngressConfig {
        tls: Some(tls),
        require_tls: true,
        ..Server::config()
    };
    // Even an allowlisted source must use TLS first.
    let server = Server::start(config, true);
    let mut c = Client::connect(server.addr);
    let ehlo = c.expect("EHLO printer", 250, "STARTTLS");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    c.expect(
        "MAIL FROM:<scan@example.com>",
        530,
        "5.7.0 Must issue a STARTTLS command first",
    );
    let plain = STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    c.expect(
        &format!("AUTH PLAIN {plain}"),
        530,
        "5.7.0 Must issue a STARTTLS command first",
    );
    c.expect("STARTTLS", 220, "2.0.0");
    drop(c);
    assert!(server.spool.queued().unwrap().is_empty());

    // The self-signed certificate, trusted by the client: the whole submission works.
    let port = server.addr.port().to_string();
    let out = run_python(
        SMTPLIB_STARTTLS,
        &[&port, USER, PASSWORD, ca.to_str().unwrap()],
    );
    assert!(out.lines().nth(1).unwrap().starts_with("MAIL 530"), "{out}");
    assert_eq!(server.spool.queued().unwrap().len(), 1);

    // require_tls without a certificate is a configuration error, not a silent downgrade.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handler = Arc::new(LocalDevices::new(vec![], Arc::clone(&server.spool)));
        let config = IngressConfig {
            require_tls: true,
            ..Server::config()
        };
        IngressServer::serve(listener, config, handler, async {})
            .await
            .unwrap_err()
    });
    assert!(err.to_string().contains("require_tls"), "{err}");
}

#[test]
fn cidr_allowlist_admits_the_range_only() {
    let mut inside = LocalDevice::new("mfd-lan", fixed_mailbox());
    inside.allowed_addresses = vec![parse_source("127.0.0.0/8").unwrap()];
    let server = Server::start_with(Server::config(), vec![inside]);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    c.expect("MAIL FROM:<>", 250, "2.1.0");
    drop(c);

    let mut outside = LocalDevice::new("mfd-elsewhere", fixed_mailbox());
    outside.allowed_addresses = vec![
        parse_source("10.20.0.0/16").unwrap(),
        parse_source("::1").unwrap(),
        parse_source("127.0.0.2").unwrap(),
    ];
    let server = Server::start_with(Server::config(), vec![outside]);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    c.expect("MAIL FROM:<>", 530, "5.7.0");
    assert!(parse_source("printer.lan").is_err());
    assert_eq!(
        parse_source("192.168.7.9/24").unwrap().to_string(),
        "192.168.7.0/24"
    );
}

#[test]
fn fixed_mailbox_rewrites_from_and_keeps_the_body_identical() {
    let server = Server::start(Server::config(), true);
    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    c.expect("MAIL FROM:<device@printer.lan>", 250, "");
    c.expect("RCPT TO:<ops@example.com>", 250, "");
    c.expect("DATA", 354, "");
    let headers = "Subject: scan\r\nFrom: \"Front\r\n Desk\" <frontdesk@example.com>\r\nTo: ops@example.com\r\n";
    let body =
        "\r\nFrom: in the body, not a header\r\n\r\nFrom: also body\r\n\u{e9}t\u{e9} bytes\r\n";
    c.write(format!("{headers}{body}.\r\n").as_bytes());
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{text}");
    let ids = server.spool.queued().unwrap();
    let spooled = server.spool.message(&ids[0]).unwrap();
    let expected = format!(
        "Subject: scan\r\nFrom: \"Scanner 2nd floor\" <{FIXED_ADDRESS}>\r\nReply-To: \"Front Desk\" <frontdesk@example.com>\r\nTo: ops@example.com\r\n{body}"
    );
    assert_eq!(String::from_utf8_lossy(&spooled), expected);
    assert!(spooled.ends_with(body.as_bytes()), "body bytes changed");
    let meta = server.spool.entry(&ids[0]).unwrap();
    assert_eq!(
        (
            meta.envelope.from.as_str(),
            meta.envelope.mailbox.as_str(),
            meta.envelope.user_address.as_str()
        ),
        (FIXED_ADDRESS, "scan-admin", "")
    );
}

#[test]
fn login_user_mode_sets_the_user_or_refuses_with_550() {
    let policy = SenderPolicy::AllowUserChange {
        allowed: vec![("frontdesk".into(), "frontdesk@example.com".into())],
    };
    let mut changer = LocalDevice::new("mfd-change", policy);
    changer.username = Some("mfd2".into());
    changer.password_hash = Some(phc("printer-pass-2"));
    changer.user_addresses = vec!["bob@example.com".into()];
    let server = Server::start_with(
        Server::config(),
        vec![login_device(SenderPolicy::LoginUser), changer],
    );
    let send = |c: &mut Client, from: &str, data: &str| {
        c.expect(&format!("MAIL FROM:<{from}>"), 250, "");
        c.expect("RCPT TO:<ops@example.com>", 250, "");
        c.expect("DATA", 354, "");
        c.write(format!("{data}.\r\n").as_bytes());
        c.reply()
    };
    let mut c = Client::connect(server.addr);
    c.login();
    // The From header decides, over MAIL FROM.
    let (code, text) = send(
        &mut c,
        "device@printer.lan",
        "From: Jane <Jane@Example.com>\r\n\r\nhi\r\n",
    );
    assert_eq!(code, 250, "{text}");
    // No From header and an empty MAIL FROM: nobody to send as.
    let (code, text) = send(&mut c, "", "Subject: anonymous\r\n\r\nhi\r\n");
    assert_eq!(code, 550, "{text}");
    assert!(
        text.contains("5.7.1") && text.contains("no From header"),
        "{text}"
    );
    assert!(text.contains("\"mfd-1\""), "{text}");
    // A From that is no address.
    let (code, text) = send(&mut c, "jane@example.com", "From: Jane Doe\r\n\r\nhi\r\n");
    assert_eq!(code, 550, "{text}");
    assert!(
        text.starts_with("550 5.7.1 Sender <jane doe> is not allowed for device \"mfd-1\": "),
        "{text}"
    );
    // Sender binding: a user outside the device's user addresses is refused, naming the login.
    let (code, text) = send(
        &mut c,
        "jane@example.com",
        "From: The CEO <ceo@contoso.example>\r\n\r\nwire the money\r\n",
    );
    assert_eq!(code, 553, "{text}");
    assert!(
        text.starts_with("553 5.7.1 Sender <ceo@contoso.example> is not an address login \"mfd1\" (device \"mfd-1\") may send as"),
        "{text}"
    );
    // The session goes on after a refusal.
    c.expect("NOOP", 250, "2.0.0");
    drop(c);

    let mut c = Client::connect(server.addr);
    c.expect("EHLO printer", 250, "");
    let plain = STANDARD.encode("\0mfd2\0printer-pass-2");
    c.expect(&format!("AUTH PLAIN {plain}"), 235, "2.7.0");
    let (code, text) = send(&mut c, "", "From: frontdesk@example.com\r\n\r\nhi\r\n");
    assert_eq!(code, 250, "{text}");
    let (code, text) = send(&mut c, "", "From: bob@example.com\r\n\r\nhi\r\n");
    assert_eq!(code, 250, "{text}");
    // An exact list: another user of the same domain is refused.
    let (code, text) = send(&mut c, "", "From: carol@example.com\r\n\r\nhi\r\n");
    assert_eq!(code, 553, "{text}");
    assert!(text.contains("login \"mfd2\""), "{text}");

    // Only the three accepted messages were spooled.
    let mut seen: Vec<(String, String, String)> = server
        .spool
        .queued()
        .unwrap()
        .iter()
        .map(|id| {
            let e = server.spool.entry(id).unwrap().envelope;
            (e.device, e.mailbox, e.user_address)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "mfd-1".to_owned(),
                String::new(),
                "jane@example.com".to_owned()
            ),
            (
                "mfd-change".to_owned(),
                String::new(),
                "bob@example.com".to_owned()
            ),
            (
                "mfd-change".to_owned(),
                "frontdesk".to_owned(),
                String::new()
            ),
        ]
    );
}

#[test]
fn starttls_discards_pipelined_plaintext_and_starts_over() {
    use tokenfleet_agent::upstream::tls::TlsSettings;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    let tls = IngressTls::self_signed(&["127.0.0.1".to_owned()]).unwrap();
    let pem = tls.certificate_pem().to_owned();
    let config = IngressConfig {
        tls: Some(tls),
        ..Server::config()
    };
    let server = Server::start(config, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tcp =
            tokio::io::BufReader::new(tokio::net::TcpStream::connect(server.addr).await.unwrap());
        let mut line = String::new();
        tcp.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220 "), "{line}");
        // An injection attempt: a command sent in clear right behind STARTTLS.
        tcp.get_mut()
            .write_all(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
            .await
            .unwrap();
        let mut seen = String::new();
        while !seen.contains("220 2.0.0") {
            line.clear();
            assert!(tcp.read_line(&mut line).await.unwrap() > 0, "{seen}");
            seen.push_str(&line);
        }
        assert!(tcp.buffer().is_empty());
        let settings = TlsSettings {
            extra_ca_pem: Some(pem),
            no_system_roots: true,
            ..TlsSettings::default()
        };
        let stream = settings
            .connect("127.0.0.1", tcp.into_inner(), Duration::from_secs(10))
            .await
            .unwrap();
        let mut tls = tokio::io::BufReader::new(stream);
        // The session started over: the pipelined MAIL was never run, EHLO is needed again.
        tls.get_mut()
            .write_all(b"MAIL FROM:<scan@example.com>\r\n")
            .await
            .unwrap();
        line.clear();
        tls.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("503 5.5.1"), "{line}");
        tls.get_mut().write_all(b"EHLO printer\r\n").await.unwrap();
        let mut ehlo = String::new();
        loop {
            line.clear();
            tls.read_line(&mut line).await.unwrap();
            ehlo.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        assert!(
            ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        tls.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
        line.clear();
        tls.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("503 5.5.1"), "{line}");
    });
    assert!(server.spool.queued().unwrap().is_empty());
}

fn limited(limits: SessionLimits) -> IngressConfig {
    IngressConfig {
        limits,
        ..Server::config()
    }
}

#[test]
fn sessions_are_capped_per_source_and_in_total_but_known_devices_get_in() {
    let server = Server::start(
        limited(SessionLimits {
            max_sessions: 6,
            max_sessions_per_source: 3,
            ..SessionLimits::default()
        }),
        true,
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let (stream, line) = greeting_from([127, 0, 0, 2], server.addr);
        assert!(line.starts_with("220 "), "{line}");
        held.push(stream);
    }
    let (_, line) = greeting_from([127, 0, 0, 2], server.addr);
    assert!(
        line.starts_with("421 4.7.0") && line.contains("from your address"),
        "{line}"
    );
    for _ in 0..3 {
        let (stream, line) = greeting_from([127, 0, 0, 3], server.addr);
        assert!(line.starts_with("220 "), "{line}");
        held.push(stream);
    }
    // Six sessions: the allowlisted device's address is known and served over the cap, closing
    // nobody...
    let (known, line) = greeting_from([127, 0, 0, 1], server.addr);
    assert!(line.starts_with("220 "), "{line}");
    // ...and a stranger closes the session that has waited longest without logging in (`421
    // 4.3.2`) and takes its slot.
    let (stranger, line) = greeting_from([127, 0, 0, 4], server.addr);
    assert!(line.starts_with("220 "), "{line}");
    let next = |stream: &TcpStream| {
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    let closed = next(&held[0]);
    assert!(
        closed.starts_with("421 4.3.2") && closed.contains("has not logged in"),
        "{closed}"
    );
    // The known device's session and the newer strangers' are untouched.
    for stream in [&known, &held[1]] {
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        let quiet = matches!(
            (&*stream).read(&mut buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut
        );
        assert!(quiet, "a session that did not wait longest was closed");
    }
    // A session that logged in is served: with the known device's session and five that logged
    // in, nothing waits and a stranger is refused.
    drop((stranger, held));
    let mut logged_in = Vec::new();
    for i in 0..5u8 {
        let mut c = Client::connect_from([127, 0, 1, 1 + i], server.addr);
        c.expect("EHLO printer", 250, "");
        let (code, text) = c.cmd(&plain(USER, PASSWORD));
        assert_eq!(code, 235, "{text}");
        logged_in.push(c);
    }
    let (_, line) = greeting_from([127, 0, 0, 4], server.addr);
    assert!(
        line.starts_with("421 4.7.0") && line.contains("Too many connections"),
        "{line}"
    );
}

/// A stranger that starts `STARTTLS` and never sends its hello cannot keep its slot: a new
/// connection over `max_sessions` closes it at once (it is dropped mid-handshake), not after the
/// 10 s handshake timeout.
#[test]
fn a_session_stalled_in_its_tls_handshake_makes_room_for_a_new_one() {
    let tls = IngressTls::self_signed(&["127.0.0.1".to_owned()]).unwrap();
    let server = Server::start(
        IngressConfig {
            tls: Some(tls),
            ..limited(SessionLimits {
                max_sessions: 2,
                max_sessions_per_source: 2,
                ..SessionLimits::default()
            })
        },
        true,
    );
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect_from([127, 0, 0, 2], server.addr);
        c.expect("EHLO stranger", 250, "STARTTLS");
        c.expect("STARTTLS", 220, "2.0.0");
        stalled.push(c);
    }
    let started = std::time::Instant::now();
    let (_newcomer, line) = greeting_from([127, 0, 0, 3], server.addr);
    assert!(line.starts_with("220 "), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the new connection waited {:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 64];
    let first = stalled[0].reader.get_mut();
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(
        matches!(first.read(&mut buf), Ok(0) | Err(_))
            && started.elapsed() < Duration::from_secs(4),
        "the stalled session that waited longest was not closed"
    );
    let second = stalled[1].reader.get_mut();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        matches!(second.read(&mut buf), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the newer stalled session was closed too"
    );
}

/// Without `require_auth` a stranger's session is served once its mail transaction starts: a new
/// connection over `max_sessions` closes the idle one, not the one sending.
#[test]
fn a_mail_transaction_without_a_login_is_not_closed_for_a_new_connection() {
    let server = Server::start(
        IngressConfig {
            require_auth: false,
            ..limited(SessionLimits {
                max_sessions: 2,
                max_sessions_per_source: 2,
                ..SessionLimits::default()
            })
        },
        false,
    );
    let mut sending = Client::connect_from([127, 0, 0, 2], server.addr);
    sending.expect("EHLO sender", 250, "");
    sending.expect("MAIL FROM:<scan@example.com>", 250, "2.1.0");
    let (idle, line) = greeting_from([127, 0, 0, 3], server.addr);
    assert!(line.starts_with("220 "), "{line}");
    let (_newcomer, line) = greeting_from([127, 0, 0, 4], server.addr);
    assert!(line.starts_with("220 "), "{line}");
    let mut closed = String::new();
    BufReader::new(&idle).read_line(&mut closed).unwrap();
    assert!(closed.starts_with("421 4.3.2"), "{closed}");
    sending.expect("RCPT TO:<someone@example.com>", 250, "");
    sending.expect("DATA", 354, "");
    sending.expect("Subject: kept\r\n\r\nbody\r\n.", 250, "");
    assert_eq!(server.spool.queued().unwrap().len(), 1);
}

fn plain(user: &str, password: &str) -> String {
    format!(
        "AUTH PLAIN {}",
        STANDARD.encode(format!("\0{user}\0{password}"))
    )
}

/// One login attempt from `source` on a new connection: the reply code and text.
fn try_login(server: &Server, source: [u8; 4], user: &str, password: &str) -> (u16, String) {
    let mut c = Client::connect_from(source, server.addr);
    c.expect("EHLO printer", 250, "");
    c.cmd(&plain(user, password))
}

#[test]
fn failed_logins_are_slowed_then_locked_out_per_source_and_user() {
    let guard = tokenfleet_agent::ingress::LoginGuard::new(LoginLimits {
        slowdown_after: 2,
        delay_step: Duration::from_millis(300),
        max_delay: Duration::from_millis(600),
        lockout_after: 4,
        lockout: Duration::from_secs(3),
        ..LoginLimits::default()
    });
    let server = Server::start(
        IngressConfig {
            login_guard: Arc::new(guard),
            ..Server::config()
        },
        false,
    );
    // The printer logs in once: its source is now trusted for its user.
    assert_eq!(try_login(&server, [127, 0, 0, 1], USER, PASSWORD).0, 235);

    // One attacker source: answers slow down, then the source is locked.
    let mut took = Vec::new();
    for _ in 0..4 {
        let started = std::time::Instant::now();
        let (code, text) = try_login(&server, [127, 0, 0, 5], "nobody", "guess");
        assert_eq!(code, 535, "{text}");
        took.push(started.elapsed());
    }
    // The first failures are not slowed and the fourth waits the 600 ms maximum. Compared with
    // each other rather than with a fixed bound, since every attempt also pays a password
    // verification whose time depends on the machine's load.
    assert!(took[3] >= Duration::from_millis(600), "{took:?}");
    assert!(
        took[3] >= took[0] + Duration::from_millis(450),
        "the first failure was slowed too: {took:?}"
    );
    let mut c = Client::connect_from([127, 0, 0, 5], server.addr);
    c.expect("EHLO printer", 250, "");
    let (code, text) = c.cmd(&plain(USER, PASSWORD));
    assert_eq!(code, 421, "locked even with the right password: {text}");
    assert!(
        text.contains("4.7.0") && text.contains("try again in"),
        "{text}"
    );
    c.assert_closed();

    // The user name guessed from four more sources: the user is locked for strangers...
    for i in 10..14 {
        assert_eq!(try_login(&server, [127, 0, 0, i], USER, "wrong").0, 535);
    }
    let (code, text) = try_login(&server, [127, 0, 0, 20], USER, PASSWORD);
    assert_eq!(code, 421, "{text}");
    // ...but not for the printer that logged in before from its own address.
    let (code, text) = try_login(&server, [127, 0, 0, 1], USER, PASSWORD);
    assert_eq!(code, 235, "{text}");

    // The lock ends.
    std::thread::sleep(Duration::from_secs(3));
    let (code, text) = try_login(&server, [127, 0, 0, 5], USER, PASSWORD);
    assert_eq!(code, 235, "{text}");
}

#[test]
fn large_messages_stream_to_disk_and_a_full_spool_answers_452() {
    let config = IngressConfig {
        message_memory: 8 * 1024,
        max_message_size: 4 * 1024 * 1024,
        ..Server::config()
    };
    let server = Server::start_limited(
        config,
        vec![login_device(fixed_mailbox())],
        SpoolLimits {
            max_bytes: 1536 * 1024,
            max_messages: 3,
        },
    );
    let body: String = (0..18_000)
        .map(|i| format!("line {i:06} of a scanned document .............................\r\n"))
        .collect();
    assert!(body.len() > 1024 * 1024);
    let message = format!("From: jane@example.com\r\nSubject: big scan\r\n\r\n{body}");
    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("MAIL FROM:<jane@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(message.as_bytes());
    c.expect(".", 250, "2.0.0");
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1);
    let stored = server.spool.message(&ids[0]).unwrap();
    // The From line is rewritten; every body byte arrives as sent.
    assert!(stored.ends_with(body.as_bytes()));
    assert_eq!(
        server.spool.entry(&ids[0]).unwrap().size,
        stored.len() as u64
    );
    // No temporary file is left behind.
    let tmp: Vec<_> = std::fs::read_dir(server._dir.path().join("spool/tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");

    // A second one does not fit the 1.5 MiB quota: announced with SIZE, refused at MAIL...
    c.expect(
        &format!("MAIL FROM:<jane@example.com> SIZE={}", message.len()),
        452,
        "4.3.1",
    );
    // ...unannounced, refused after DATA, and nothing is queued.
    c.expect("MAIL FROM:<jane@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(message.as_bytes());
    c.expect(".", 452, "4.3.1");
    assert_eq!(server.spool.queued().unwrap().len(), 1);
    // Small ones fit until the message count is reached, then MAIL itself gets 452.
    for _ in 0..2 {
        c.expect("MAIL FROM:<jane@example.com>", 250, "");
        c.expect("RCPT TO:<a@example.com>", 250, "");
        c.expect("DATA", 354, "");
        c.expect("Subject: small\r\n\r\nhi\r\n.", 250, "2.0.0");
    }
    c.expect("MAIL FROM:<jane@example.com>", 452, "4.3.1");
    // Delivered entries free the quota.
    for id in server.spool.queued().unwrap() {
        server.spool.complete(&id).unwrap();
    }
    c.expect("MAIL FROM:<jane@example.com>", 250, "2.1.0");
}

/// DATA is read in blocks: a message sent in pieces of odd sizes (lines cut anywhere, across
/// the session's read buffer, the memory limit and the tail file) with dot-stuffed lines, bare
/// LF line ends and lines at the length limit is stored exactly as line by line would store it;
/// a line one byte over the limit still refuses the message with `500 5.5.2`.
#[test]
fn a_message_cut_anywhere_is_stored_exactly() {
    let config = IngressConfig {
        message_memory: 4096,
        ..Server::config()
    };
    let server = Server::start_with(config, vec![login_device(fixed_mailbox())]);
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for i in 0..3000usize {
        let (sent, stored): (Vec<u8>, Vec<u8>) = match i % 6 {
            // Dot-stuffed by the client, unstuffed in the spool.
            0 => (
                format!("..dotted {i}\r\n").into_bytes(),
                format!(".dotted {i}\r\n").into_bytes(),
            ),
            // A bare LF line end is stored as CRLF (and a dot after it is content).
            1 => (
                format!("bare {i}\n.after\r\n").into_bytes(),
                format!("bare {i}\r\n.after\r\n").into_bytes(),
            ),
            // 1001 bytes with the stuffed dot: the longest line taken.
            2 => {
                let text = format!(".{}", "x".repeat(996));
                (
                    format!(".{text}\r\n").into_bytes(),
                    format!("{text}\r\n").into_bytes(),
                )
            }
            _ => {
                let line = format!("line {i} {}\r\n", "=".repeat(i % 90)).into_bytes();
                (line.clone(), line)
            }
        };
        wire.extend_from_slice(&sent);
        expected.extend_from_slice(&stored);
    }
    let head = b"From: jane@example.com\r\nSubject: cut\r\n\r\n";
    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("MAIL FROM:<jane@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(head);
    let sizes = [1, 7, 4093, 2, 16385, 999, 3, 65536, 13];
    let (mut at, mut n) = (0, 0);
    while at < wire.len() {
        let end = wire.len().min(at + sizes[n % sizes.len()]);
        c.write(&wire[at..end]);
        c.reader.get_mut().flush().unwrap();
        if n % 3 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        (at, n) = (end, n + 1);
    }
    c.expect(".", 250, "2.0.0");
    let ids = server.spool.queued().unwrap();
    assert_eq!(ids.len(), 1);
    let stored = server.spool.message(&ids[0]).unwrap();
    // The From line is rewritten; the body is exactly what line by line would have stored.
    assert!(stored.ends_with(&expected), "body changed");
    assert!(
        stored.len() > expected.len() + 20,
        "the header block is kept"
    );
    assert_eq!(
        server.spool.entry(&ids[0]).unwrap().size,
        stored.len() as u64
    );

    // One byte over the limit, in the middle of a large message: refused, session in step.
    c.expect("MAIL FROM:<jane@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    c.write(head);
    c.write(&wire[..wire.len() / 2]);
    c.write(format!("..{}\r\n", "y".repeat(998)).as_bytes());
    c.write(&wire[wire.len() / 2..]);
    c.expect(".", 500, "5.5.2");
    c.expect("NOOP", 250, "2.0.0");
    assert_eq!(server.spool.queued().unwrap().len(), 1);
}

#[test]
fn a_header_block_larger_than_the_message_memory_is_refused() {
    let config = IngressConfig {
        message_memory: 4096,
        ..Server::config()
    };
    let server = Server::start_with(config, vec![login_device(fixed_mailbox())]);
    let mut c = Client::connect(server.addr);
    c.login();
    c.expect("MAIL FROM:<jane@example.com>", 250, "");
    c.expect("RCPT TO:<a@example.com>", 250, "");
    c.expect("DATA", 354, "");
    for i in 0..100 {
        c.write(format!("X-Filler-{i}: {}\r\n", "x".repeat(60)).as_bytes());
    }
    c.expect("\r\nbody\r\n.", 552, "5.3.4");
    assert!(server.spool.queued().unwrap().is_empty());
}

#[test]
fn a_client_that_keeps_talking_is_closed_at_the_longest_session_time() {
    let server = Server::start(
        limited(SessionLimits {
            max_session: Duration::from_secs(1),
            ..SessionLimits::default()
        }),
        false,
    );
    let mut c = Client::connect(server.addr);
    let started = std::time::Instant::now();
    // A NOOP every 200 ms: never idle, but the session ends after a second.
    loop {
        c.write(b"NOOP\r\n");
        let mut line = String::new();
        match c.reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(line.starts_with("250"), "{line}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the session was not closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
}
