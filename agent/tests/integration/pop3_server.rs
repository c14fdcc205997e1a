//! The local POP3 server driven by a real client (Python `poplib`, as a legacy device would be)
//! and by raw sockets for the session rules and every malformed-input case, against a real
//! maildrop on disk, with an argon2 device table as the `Pop3Auth`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::PasswordVerifier as _;
use argon2::{Argon2, PasswordHasher as _};
use tokenfleet_agent::ingress::Password;
use tokenfleet_agent::maildrop::{Maildrop, MaildropId, StoreOutcome};
use tokenfleet_agent::pop3_server::{Pop3Auth, Pop3Server, Pop3ServerConfig};
use tokio::sync::oneshot;

const DEVICE: &str = "mfd-1";
const USER: &str = "mfd1";
const PASSWORD: &str = "printer pass 1";
const IO: Duration = Duration::from_secs(20);

fn phc(password: &str) -> String {
    Argon2::default()
        .hash_password(password.as_bytes())
        .unwrap()
        .to_string()
}

/// The device table as the runtime would implement it: one device, an argon2 PHC hash.
struct Devices {
    hash: String,
}

impl Pop3Auth for Devices {
    async fn authenticate(
        &self,
        _peer: SocketAddr,
        user: String,
        password: Password,
    ) -> Option<String> {
        if user != USER {
            return None;
        }
        let hash = self.hash.clone();
        let ok = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.expose().as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .unwrap_or(false);
        ok.then(|| DEVICE.to_owned())
    }
}

/// A running POP3 server on 127.0.0.1 with its own runtime and maildrop; shut down on drop.
struct Server {
    addr: SocketAddr,
    maildrop: Arc<Maildrop>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    fn start(config: Pop3ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let maildrop = Arc::new(Maildrop::open(dir.path().join("maildrop")).unwrap());
        let auth = Arc::new(Devices {
            hash: phc(PASSWORD),
        });
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
        let md = Arc::clone(&maildrop);
        runtime.spawn(async move {
            Pop3Server::serve(listener, config, auth, md, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let _ = done_tx.send(());
        });
        Self {
            addr,
            maildrop,
            _dir: dir,
            stop: Some(stop),
            done: Some(done),
            runtime: Some(runtime),
        }
    }

    fn config() -> Pop3ServerConfig {
        Pop3ServerConfig {
            hostname: "agent.test".into(),
            command_timeout: Duration::from_secs(10),
            ..Pop3ServerConfig::default()
        }
    }

    fn store(&self, upstream: &str, bytes: &[u8]) -> MaildropId {
        match self.maildrop.store(DEVICE, Some(upstream), bytes).unwrap() {
            StoreOutcome::Stored(id) => id,
            StoreOutcome::Duplicate => panic!("duplicate"),
        }
    }

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

/// A raw POP3 client.
struct Raw {
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO)).unwrap();
        let mut raw = Self {
            r: BufReader::new(s),
        };
        let greeting = raw.line();
        assert!(greeting.starts_with("+OK"), "{greeting}");
        raw
    }

    fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.r.read_until(b'\n', &mut buf).unwrap();
        String::from_utf8_lossy(&buf).trim_end().to_owned()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.line()
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
    }

    /// A multi-line body after `+OK`, lines without CRLF (still dot-stuffed).
    fn multiline(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line();
            if l == "." {
                return out;
            }
            out.push(l);
        }
    }

    fn login(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr);
        assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
        let reply = c.cmd(&format!("PASS {PASSWORD}"));
        assert!(reply.starts_with("+OK"), "{reply}");
        c
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.r.read(&mut buf), Ok(0))
    }
}

/// Logs in as soon as the previous session's lock is gone (the server notices a dropped
/// connection asynchronously), within a deadline.
fn login_when_unlocked(addr: SocketAddr) -> Raw {
    let end = Instant::now() + IO;
    loop {
        let mut c = Raw::connect(addr);
        c.cmd(&format!("USER {USER}"));
        let reply = c.cmd(&format!("PASS {PASSWORD}"));
        if reply.starts_with("+OK") {
            return c;
        }
        assert!(reply.contains("[IN-USE]"), "{reply}");
        assert!(Instant::now() < end, "the maildrop stayed locked");
        std::thread::yield_now();
    }
}

fn message_with_dots() -> Vec<u8> {
    let mut m = b"From: fax@contoso.example\r\nTo: mfd1@contoso.example\r\nSubject: fax 17\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nmiddle\r\n"
        .to_vec();
    for i in 0..200 {
        m.extend_from_slice(format!("line {i} of a longer body, with some text\r\n").as_bytes());
    }
    m
}

const POPLIB_DEVICE: &str = r#"
import poplib, sys
port, user, password, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
p = poplib.POP3("127.0.0.1", port, timeout=30)
p.user(user)
p.pass_(password)
count, size = p.stat()
listing = [l.decode() for l in p.list()[1]]
uidls = [l.decode() for l in p.uidl()[1]]
with open(out + ".meta", "w") as f:
    f.write(f"{count} {size}\n")
    f.write("\n".join(listing) + "\n")
    f.write("\n".join(uidls) + "\n")
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    open(f"{out}.{i}", "wb").write(b"\r\n".join(lines) + b"\r\n")
    p.dele(i)
p.quit()
"#;

#[test]
fn poplib_collects_byte_identical_messages_and_dele_quit_removes_them() {
    let server = Server::start(Server::config());
    let m1 = message_with_dots();
    let m2 = b"Subject: second\r\n\r\nshort\r\n".to_vec();
    let id1 = server.store("up-1", &m1);
    let id2 = server.store("up-2", &m2);

    let out = tempfile::tempdir().unwrap();
    let base = out.path().join("msg");
    let status = Command::new("python3")
        .args([
            "-c",
            POPLIB_DEVICE,
            &server.addr.port().to_string(),
            USER,
            PASSWORD,
        ])
        .arg(&base)
        .status()
        .unwrap();
    assert!(status.success(), "poplib failed: {status}");

    let meta = std::fs::read_to_string(base.with_extension("meta")).unwrap();
    let lines: Vec<&str> = meta.lines().collect();
    assert_eq!(lines[0], format!("2 {}", m1.len() + m2.len()));
    assert_eq!(lines[1], format!("1 {}", m1.len()));
    assert_eq!(lines[2], format!("2 {}", m2.len()));
    assert_eq!(lines[3], format!("1 {id1}"));
    assert_eq!(lines[4], format!("2 {id2}"));
    assert_eq!(
        std::fs::read(out.path().join("msg.1")).unwrap(),
        m1,
        "byte-identical"
    );
    assert_eq!(
        std::fs::read(out.path().join("msg.2")).unwrap(),
        m2,
        "byte-identical"
    );

    // DELE + QUIT removed them; the upstream ids are still remembered.
    assert!(server.maildrop.list(DEVICE).unwrap().is_empty());
    assert!(server.maildrop.contains_upstream(DEVICE, "up-1").unwrap());
}

#[test]
fn dropping_the_connection_without_quit_deletes_nothing() {
    let server = Server::start(Server::config());
    server.store("up-1", b"Subject: keep me\r\n\r\nbody\r\n");
    let mut c = Raw::login(server.addr);
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert_eq!(
        c.cmd("STAT"),
        "+OK 0 0",
        "deleted messages are hidden in the session"
    );
    drop(c);
    // The next session (once the lock is released) still sees it.
    let mut c = login_when_unlocked(server.addr);
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert_eq!(server.maildrop.list(DEVICE).unwrap().len(), 1);
}

#[test]
fn rset_undoes_deletions_and_raw_retr_is_dot_stuffed() {
    let server = Server::start(Server::config());
    let m = b"Subject: dots\r\n\r\n.a\r\nb\r\n".to_vec();
    let id = server.store("up-1", &m);
    let mut c = Raw::login(server.addr);
    assert_eq!(c.cmd("LIST 1"), format!("+OK 1 {}", m.len()));
    assert_eq!(c.cmd("UIDL 1"), format!("+OK 1 {id}"));
    assert_eq!(c.cmd("RETR 1"), format!("+OK {} octets", m.len()));
    assert_eq!(c.multiline(), vec!["Subject: dots", "", "..a", "b"]);
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("-ERR"), "already deleted");
    assert!(
        c.cmd("RETR 1").starts_with("-ERR"),
        "deleted messages cannot be retrieved"
    );
    assert!(c.cmd("RSET").starts_with("+OK"));
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("NOOP").starts_with("+OK"));
    assert_eq!(c.cmd("TOP 1 1"), "+OK");
    assert_eq!(c.multiline(), vec!["Subject: dots", "", "..a"]);
    assert!(c.cmd("TOP 1").starts_with("-ERR"));
    assert_eq!(c.cmd("QUIT"), "+OK bye");
    assert_eq!(server.maildrop.list(DEVICE).unwrap().len(), 1);
}

#[test]
fn wrong_password_and_unknown_user_get_err_and_no_access() {
    let server = Server::start(Server::config());
    server.store("up-1", b"Subject: x\r\n\r\ny\r\n");
    let mut c = Raw::connect(server.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert_eq!(
        c.cmd("PASS wrong"),
        "-ERR [AUTH] invalid user name or password"
    );
    assert_eq!(c.cmd("STAT"), "-ERR not logged in");
    assert!(c.cmd("USER nobody").starts_with("+OK"));
    assert_eq!(
        c.cmd(&format!("PASS {PASSWORD}")),
        "-ERR [AUTH] invalid user name or password"
    );
    assert_eq!(c.cmd(&format!("PASS {PASSWORD}")), "-ERR USER first");
    assert_eq!(c.cmd("QUIT"), "+OK bye");
    assert_eq!(server.maildrop.list(DEVICE).unwrap().len(), 1);
}

#[test]
fn a_second_session_for_the_same_device_gets_in_use() {
    let server = Server::start(Server::config());
    let mut first = Raw::login(server.addr);
    let mut second = Raw::connect(server.addr);
    second.cmd(&format!("USER {USER}"));
    let reply = second.cmd(&format!("PASS {PASSWORD}"));
    assert!(reply.starts_with("-ERR [IN-USE]"), "{reply}");
    assert!(first.cmd("QUIT").starts_with("+OK"));
    // After QUIT the lock is free again.
    let mut third = login_when_unlocked(server.addr);
    assert!(third.cmd("QUIT").starts_with("+OK"));
}

#[test]
fn malformed_commands_get_err_and_never_break_the_server() {
    let server = Server::start(Pop3ServerConfig {
        max_errors: 14,
        ..Server::config()
    });
    server.store("up-1", b"Subject: x\r\n\r\ny\r\n");
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.cmd(""), "-ERR unknown command");
    assert_eq!(c.cmd("RETR 1"), "-ERR not logged in");
    assert_eq!(c.cmd("USER"), "-ERR USER needs a name");
    assert_eq!(c.cmd("STLS"), "-ERR STLS not available");
    c.send_raw(&[0xff, 0xfe, 0x00, b'\r', b'\n']);
    assert_eq!(c.line(), "-ERR unknown command");
    let long = "X".repeat(5000);
    assert_eq!(c.cmd(&long), "-ERR line too long");
    assert!(
        c.cmd(&format!("user {USER}")).starts_with("+OK"),
        "case-insensitive"
    );
    assert!(c.cmd(&format!("pass {PASSWORD}")).starts_with("+OK"));
    for bad in [
        "RETR",
        "RETR abc",
        "RETR 0",
        "RETR 99",
        "LIST -1",
        "DELE 18446744073709551616",
    ] {
        assert!(c.cmd(bad).starts_with("-ERR"), "{bad}");
    }
    assert_eq!(c.cmd("PASS again"), "-ERR already logged in");
    // The error budget (14) is used up by now: the server says so and closes.
    let last = c.cmd("BOGUS");
    assert!(last.starts_with("-ERR"), "{last}");
    let bye = c.line();
    assert_eq!(bye, "-ERR too many errors, closing connection");
    assert!(c.closed());
    // Nothing was deleted, and the server still serves.
    let mut c = login_when_unlocked(server.addr);
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    c.cmd("QUIT");
}

#[test]
fn capa_lists_user_uidl_and_stls_only_with_tls() {
    let server = Server::start(Server::config());
    let mut c = Raw::connect(server.addr);
    assert!(c.cmd("CAPA").starts_with("+OK"));
    let caps = c.multiline();
    assert!(caps.contains(&"USER".to_owned()), "{caps:?}");
    assert!(caps.contains(&"UIDL".to_owned()), "{caps:?}");
    assert!(!caps.contains(&"STLS".to_owned()), "{caps:?}");
}

#[test]
fn shutdown_ends_sessions_without_deleting() {
    let mut server = Server::start(Server::config());
    server.store("up-1", b"Subject: x\r\n\r\ny\r\n");
    let mut c = Raw::login(server.addr);
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    server.shutdown();
    let reply = c.line();
    assert!(reply.starts_with("-ERR [SYS/TEMP]"), "{reply}");
    assert_eq!(server.maildrop.list(DEVICE).unwrap().len(), 1);
}

const POPLIB_STLS: &str = r#"
import poplib, ssl, sys
port, user, password, ca, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3("127.0.0.1", port, timeout=30)
assert "STLS" in p.capa(), p.capa()
p.stls(context=ctx)
assert "STLS" not in p.capa()
p.user(user)
p.pass_(password)
resp, lines, octets = p.retr(1)
open(out, "wb").write(b"\r\n".join(lines) + b"\r\n")
p.quit()
"#;

/// A self-signed certificate for 127.0.0.1: the server's rustls configuration and the PEM a
/// client trusts.
fn self_signed_tls() -> (Arc<rustls::ServerConfig>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (Arc::new(tls), cert.pem())
}

/// Runs [`POPLIB_STLS`] against `server` and returns the message it retrieved.
fn poplib_over_stls(server: &Server, ca_pem: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let out = dir.path().join("msg");
    let status = Command::new("python3")
        .args([
            "-c",
            POPLIB_STLS,
            &server.addr.port().to_string(),
            USER,
            PASSWORD,
        ])
        .arg(&ca)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "poplib over STLS failed: {status}");
    std::fs::read(&out).unwrap()
}

#[test]
fn poplib_over_stls_collects_the_message() {
    let (tls, ca) = self_signed_tls();
    let server = Server::start(Pop3ServerConfig {
        tls: Some(tls),
        ..Server::config()
    });
    let m = message_with_dots();
    server.store("up-1", &m);
    assert_eq!(poplib_over_stls(&server, &ca), m);
}

#[test]
fn with_require_tls_passwords_are_refused_until_stls() {
    let (tls, ca) = self_signed_tls();
    let server = Server::start(Pop3ServerConfig {
        tls: Some(tls),
        require_tls: true,
        ..Server::config()
    });
    let m = message_with_dots();
    server.store("up-1", &m);

    let mut c = Raw::connect(server.addr);
    assert!(c.cmd("CAPA").starts_with("+OK"));
    let caps = c.multiline();
    assert!(!caps.contains(&"USER".to_owned()), "{caps:?}");
    assert!(caps.contains(&"STLS".to_owned()), "{caps:?}");
    let refused = "-ERR [AUTH] this server takes passwords only over TLS: STLS first";
    assert_eq!(c.cmd(&format!("USER {USER}")), refused);
    // The right password in clear is refused too, and opens nothing.
    assert_eq!(c.cmd(&format!("PASS {PASSWORD}")), refused);
    assert_eq!(c.cmd("STAT"), "-ERR not logged in");
    assert_eq!(c.cmd("QUIT"), "+OK bye");
    assert_eq!(server.maildrop.list(DEVICE).unwrap().len(), 1);

    // Over STLS the same device logs in and collects its message (poplib asserts USER works).
    assert_eq!(poplib_over_stls(&server, &ca), m);
}

/// A connection from the loopback address `source` and the server's first line.
fn greeting_from(source: [u8; 4], addr: SocketAddr) -> (BufReader<TcpStream>, String) {
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
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(IO)).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (reader, line)
}

fn say(reader: &mut BufReader<TcpStream>, line: &str) -> String {
    reader
        .get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    reply
}

#[test]
fn sessions_are_capped_and_failed_logins_locked_out() {
    use tokenfleet_agent::ingress::{LoginGuard, LoginLimits, SessionLimits};
    let guard = Arc::new(LoginGuard::new(LoginLimits {
        slowdown_after: 10,
        lockout_after: 3,
        ..LoginLimits::default()
    }));
    let server = Server::start(Pop3ServerConfig {
        limits: SessionLimits {
            max_sessions: 4,
            max_sessions_per_source: 2,
            ..SessionLimits::default()
        },
        login_guard: Arc::clone(&guard),
        ..Server::config()
    });
    // Per source, then in total (where idle sessions make room).
    let mut held = Vec::new();
    for source in [[127, 0, 0, 2], [127, 0, 0, 2]] {
        let (r, line) = greeting_from(source, server.addr);
        assert!(line.starts_with("+OK"), "{line}");
        held.push(r);
    }
    let (_, line) = greeting_from([127, 0, 0, 2], server.addr);
    assert!(
        line.starts_with("-ERR [SYS/TEMP]") && line.contains("from your address"),
        "{line}"
    );
    for _ in 0..2 {
        let (r, line) = greeting_from([127, 0, 0, 3], server.addr);
        assert!(line.starts_with("+OK"), "{line}");
        held.push(r);
    }
    // Over the total, a new connection closes the one that has waited longest without logging
    // in and takes its slot.
    let (r, line) = greeting_from([127, 0, 0, 4], server.addr);
    assert!(line.starts_with("+OK"), "{line}");
    held.push(r);
    let mut closed = String::new();
    held[0].read_line(&mut closed).unwrap();
    assert!(
        closed.starts_with("-ERR [SYS/TEMP] too many connections: closing this one"),
        "{closed}"
    );
    // A session that logged in is served and never closed for a new one: the next new
    // connection closes the oldest one still waiting (the first from 127.0.0.3).
    assert!(say(&mut held[1], &format!("USER {USER}")).starts_with("+OK"));
    let reply = say(&mut held[1], &format!("PASS {PASSWORD}"));
    assert!(reply.starts_with("+OK maildrop"), "{reply}");
    let (r, line) = greeting_from([127, 0, 0, 6], server.addr);
    assert!(line.starts_with("+OK"), "{line}");
    held.push(r);
    let mut closed = String::new();
    held[2].read_line(&mut closed).unwrap();
    assert!(
        closed.starts_with("-ERR [SYS/TEMP] too many connections"),
        "{closed}"
    );
    assert!(say(&mut held[1], "STAT").starts_with("+OK"));
    assert!(say(&mut held[1], "QUIT").starts_with("+OK"));
    held.clear();

    // Three wrong passwords from one source lock it, even for the right password.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut r, line) = loop {
        let (r, line) = greeting_from([127, 0, 0, 5], server.addr);
        if line.starts_with("+OK") || Instant::now() > deadline {
            break (r, line);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.starts_with("+OK"), "{line}");
    for _ in 0..3 {
        assert!(say(&mut r, &format!("USER {USER}")).starts_with("+OK"));
        let reply = say(&mut r, "PASS wrong");
        assert!(reply.starts_with("-ERR [AUTH] invalid"), "{reply}");
    }
    assert!(say(&mut r, &format!("USER {USER}")).starts_with("+OK"));
    let reply = say(&mut r, &format!("PASS {PASSWORD}"));
    assert!(
        reply.starts_with("-ERR [AUTH] too many failed logins") && reply.contains("try again in"),
        "{reply}"
    );
    // The session is closed after the refusal.
    let mut rest = String::new();
    assert_eq!(r.read_to_string(&mut rest).unwrap_or(0), 0, "{rest}");
    // The same guard refuses that source on the SMTP side too (shared by the runtime).
    assert!(matches!(
        guard.check([127, 0, 0, 5].into(), "anyone"),
        tokenfleet_agent::ingress::Admission::LockedOut { source: true, .. }
    ));
}
