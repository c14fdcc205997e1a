//! The SMTP ingress driven by a real client (Python `smtplib`, as a printer would be) and by raw
//! sockets for every malformed-input case, against a real spool on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use argon2::{Argon2, PasswordHasher as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokenfleet_agent::ingress::{IngressConfig, IngressServer, LocalDevice, LocalDevices};
use tokenfleet_agent::spool::Spool;
use tokio::sync::oneshot;

const USER: &str = "mfd1";
const PASSWORD: &str = "printer-pass-1";

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
    fn start(config: IngressConfig, allow_loopback: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path().join("spool")).unwrap());
        let devices = vec![
            LocalDevice {
                device: "mfd-1".into(),
                username: Some(USER.into()),
                password_hash: Some(phc(PASSWORD)),
                allowed_addresses: vec![],
            },
            LocalDevice {
                device: "mfd-allowlisted".into(),
                username: None,
                password_hash: None,
                allowed_addresses: if allow_loopback {
                    vec!["127.0.0.1".parse().unwrap()]
                } else {
                    vec![]
                },
            },
        ];
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

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
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
    assert_eq!(
        (meta.envelope.device.as_str(), meta.envelope.from.as_str()),
        ("mfd-allowlisted", "")
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
