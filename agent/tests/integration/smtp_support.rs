//! Test support for the SMTP upstream and probe tests: a throw-away PKI (rcgen) and a small
//! scripted SMTP submission server on 127.0.0.1 (plain, STARTTLS or implicit TLS, any
//! capabilities and AUTH answer), for the replies a real Dovecot cannot produce (Exchange's
//! `535 5.7.139`, partial recipient refusal, TLS 1.3-only, hostile lines).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A test CA.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and key.
#[derive(Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> ServerCert {
        self.issue_with(names, |_| {})
    }

    pub fn issue_with(
        &self,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> ServerCert {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        tweak(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// A rustls server config for `cert`, limited to `versions`.
pub fn server_config(
    cert: &ServerCert,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .unwrap();
    Arc::new(config)
}

/// How the scripted server answers AUTH.
#[derive(Clone)]
pub enum AuthAnswer {
    /// `235 2.7.0 Authentication successful`.
    Accept,
    /// Optionally a `334 <challenge>` first, then `final_reply`.
    Reject {
        challenge: Option<String>,
        final_reply: String,
    },
}

/// What the scripted server does.
#[derive(Clone)]
pub struct Script {
    /// TLS from the first byte.
    pub implicit_tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer STARTTLS with this config.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// The `AUTH` keyword line (e.g. `AUTH XOAUTH2 OAUTHBEARER`); empty = none.
    pub auth_line: String,
    /// Offer AUTH only after STARTTLS (like Exchange Online).
    pub auth_only_after_tls: bool,
    pub auth: AuthAnswer,
    /// Extra EHLO keyword lines (`SIZE 1000`, `8BITMIME`).
    pub extra_ehlo: Vec<String>,
    /// Recipients refused with this reply.
    pub refuse_rcpts: Vec<(String, String)>,
    /// Raw bytes sent instead of the greeting (hostile server tests).
    pub raw_greeting: Option<Vec<u8>>,
    /// Close the connection without a word after this many messages (a server dropping an
    /// idle session).
    pub close_after_messages: Option<usize>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            implicit_tls: None,
            starttls: None,
            auth_line: "AUTH XOAUTH2 OAUTHBEARER".into(),
            auth_only_after_tls: false,
            auth: AuthAnswer::Accept,
            extra_ehlo: vec!["SIZE 10485760".into(), "8BITMIME".into()],
            refuse_rcpts: vec![],
            raw_greeting: None,
            close_after_messages: None,
        }
    }
}

/// What the server saw in one session.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub commands: Vec<String>,
    pub mail_from: Option<String>,
    pub rcpts: Vec<String>,
    /// The message with dot-stuffing undone (every message of the session, one after another).
    pub data: Vec<u8>,
    pub tls: bool,
    /// Messages accepted in the session.
    pub messages: usize,
    /// Reads from the socket that returned more than one command line at once (pipelining).
    pub pipelined_groups: usize,
}

/// The running scripted server (aborted on drop).
pub struct ScriptedSmtp {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedSmtp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedSmtp {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let all = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let script = script.clone();
                let all = all.clone();
                tokio::spawn(async move {
                    let mut seen = Seen::default();
                    let _ = session(tcp, &script, &mut seen).await;
                    all.lock().unwrap().push(seen);
                });
            }
        });
        Self { addr, seen, task }
    }

    /// The sessions that ended so far.
    pub fn sessions(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (up to 5 s) until at least `n` sessions ended; returns them.
    pub async fn wait_sessions(&self, n: usize) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let seen = self.sessions();
            if seen.len() >= n || tokio::time::Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn session(
    tcp: tokio::net::TcpStream,
    script: &Script,
    seen: &mut Seen,
) -> std::io::Result<()> {
    let io: Box<dyn Io> = match &script.implicit_tls {
        Some(config) => {
            seen.tls = true;
            Box::new(
                tokio_rustls::TlsAcceptor::from(config.clone())
                    .accept(tcp)
                    .await?,
            )
        }
        None => Box::new(tcp),
    };
    let mut r = BufReader::new(io);
    if let Some(raw) = &script.raw_greeting {
        r.get_mut().write_all(raw).await?;
        r.get_mut().flush().await?;
        // Keep the connection open until the client gives up.
        let mut line = String::new();
        while r.read_line(&mut line).await? > 0 {
            line.clear();
        }
        return Ok(());
    }
    send(&mut r, "220 scripted ESMTP").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        // A whole command line already buffered behind this one: the client pipelined them.
        if r.buffer().contains(&b'\n') && !line.starts_with("AUTH") {
            seen.pipelined_groups += 1;
        }
        let text = line.trim_end().to_owned();
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        seen.commands.push(if verb == "AUTH" {
            // Record the mechanism only (and whether an initial response came along).
            let words: Vec<&str> = text.split_whitespace().collect();
            let head = words.iter().take(2).copied().collect::<Vec<_>>().join(" ");
            if words.len() > 2 {
                format!("{head} <initial response>")
            } else {
                head
            }
        } else {
            text.clone()
        });
        match verb.as_str() {
            "EHLO" => {
                let mut lines = vec!["scripted".to_owned()];
                if script.starttls.is_some() && !seen.tls {
                    lines.push("STARTTLS".into());
                }
                if !script.auth_line.is_empty() && (seen.tls || !script.auth_only_after_tls) {
                    lines.push(script.auth_line.clone());
                }
                lines.extend(script.extra_ehlo.iter().cloned());
                let n = lines.len();
                let mut out = String::new();
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    out.push_str(&format!("250{sep}{l}\r\n"));
                }
                r.get_mut().write_all(out.as_bytes()).await?;
            }
            "STARTTLS" => {
                let Some(config) = script.starttls.clone() else {
                    send(&mut r, "502 5.5.1 no").await?;
                    continue;
                };
                send(&mut r, "220 2.0.0 ready").await?;
                let inner = r.into_inner();
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(inner)
                    .await?;
                seen.tls = true;
                r = BufReader::new(Box::new(tls) as Box<dyn Io>);
            }
            "AUTH" => {
                let parts: Vec<&str> = text.split_whitespace().collect();
                if parts.len() == 2 {
                    send(&mut r, "334 ").await?;
                    line.clear();
                    r.read_line(&mut line).await?;
                }
                match &script.auth {
                    AuthAnswer::Accept => {
                        send(&mut r, "235 2.7.0 Authentication successful").await?
                    }
                    AuthAnswer::Reject {
                        challenge,
                        final_reply,
                    } => {
                        if let Some(c) = challenge {
                            send(&mut r, &format!("334 {c}")).await?;
                            line.clear();
                            r.read_line(&mut line).await?;
                            seen.commands
                                .push(format!("challenge answer {:?}", line.trim_end()));
                        }
                        send(&mut r, final_reply).await?;
                    }
                }
            }
            "MAIL" => {
                seen.mail_from = Some(text.clone());
                send(&mut r, "250 2.1.0 ok").await?;
            }
            "RCPT" => {
                let addr = text
                    .split_once('<')
                    .and_then(|(_, a)| a.split_once('>'))
                    .map(|(a, _)| a.to_owned())
                    .unwrap_or_default();
                if let Some((_, reply)) = script.refuse_rcpts.iter().find(|(a, _)| *a == addr) {
                    send(&mut r, reply).await?;
                } else {
                    seen.rcpts.push(addr);
                    send(&mut r, "250 2.1.5 ok").await?;
                }
            }
            "DATA" => {
                send(&mut r, "354 go ahead").await?;
                loop {
                    let mut buf = Vec::new();
                    if r.read_until(b'\n', &mut buf).await? == 0 {
                        return Ok(());
                    }
                    if buf == b".\r\n" {
                        break;
                    }
                    let unstuffed = buf.strip_prefix(b".").unwrap_or(&buf);
                    seen.data.extend_from_slice(unstuffed);
                }
                seen.messages += 1;
                send(&mut r, "250 2.0.0 queued as SCRIPTED1").await?;
                if script.close_after_messages == Some(seen.messages) {
                    return Ok(());
                }
            }
            "RSET" | "NOOP" => send(&mut r, "250 2.0.0 ok").await?,
            "QUIT" => {
                send(&mut r, "221 2.0.0 bye").await?;
                return Ok(());
            }
            _ => send(&mut r, "502 5.5.2 unknown command").await?,
        }
    }
}

async fn send(r: &mut BufReader<Box<dyn Io>>, line: &str) -> std::io::Result<()> {
    r.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await?;
    r.get_mut().flush().await
}
