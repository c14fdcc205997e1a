//! Connection tests ("test this device's upstream now"): run the real protocol step by step
//! against the upstream, time every step, and end with one [`ConnectionVerdict`] — the first
//! thing that failed — plus a one-line summary and the fix, as a [`ConnectionTestResult`].
//!
//! [`smtp`] tests the send profile. The parts every protocol shares live here, so the POP3/IMAP
//! test (`probe::fetch`) is written the same way:
//!
//! - [`ProbeRun`]: the result under construction. [`ProbeRun::new`] takes the target, the
//!   endpoint and the deadline of the whole test; [`ProbeRun::step_timeout`] gives the time a
//!   step may take (the profile's timeout, clamped to what is left); [`ProbeRun::record`] appends
//!   a step (`name`, ok, detail, started-at); [`ProbeRun::finish`] returns the result with a
//!   [`Finding`] (verdict, summary, fix), [`ProbeRun::succeed`] with verdict OK.
//! - [`resolve`] (step `dns`) and [`connect_tcp`] (step `tcp`): name resolution and the TCP
//!   connection, failures classified as DNS_FAILED / CONNECTION_REFUSED / TIMEOUT.
//! - [`tls_handshake`] (step `tls`): the handshake with the profile's [`TlsSettings`]; on
//!   success it records the negotiated version and cipher and sets the certificate info; on
//!   failure it returns the [`Finding`] from [`classify_tls_error`] (name mismatch, untrusted,
//!   expired, version refused, other).
//! - [`inspect_certificate`]: after a failed handshake, a second handshake with verification
//!   off over a fresh stream (the caller re-does the protocol's plain-text part, e.g. STARTTLS,
//!   STLS), ONLY to read the server's certificate for the report: nothing is sent over it and it
//!   is closed at once. [`refine_tls_finding`] then puts the names/expiry into the summary and
//!   turns an unexplained handshake failure into TLS_VERSION_REFUSED when the server only
//!   speaks a version the profile excludes (OpenSSL servers often just close the connection).
//! - [`certificate_info`]: a DER certificate → [`CertificateInfo`] (subject, issuer, DNS names,
//!   validity, SHA-256 fingerprint).
//! - [`timeout_finding`], [`protocol_finding`]: the generic findings.
//!
//! A probe never logs or reports a token: details carry server replies and TLS parameters only.

/// Runs one step of a test: sets the step timeout on `$client`, awaits `$call` and records it as
/// `$name` (detail `$detail(&value)` or the error); on failure the enclosing function returns
/// `Err($finding(error))`. A macro because `$detail` may borrow `$client` again once `$call` is
/// done.
macro_rules! probe_step {
    ($run:expr, $client:ident, $timeout:expr, $name:expr, $call:expr, $detail:expr, $finding:expr) => {{
        $client.set_timeout($run.step_timeout($timeout));
        let started = ::tokio::time::Instant::now();
        match $call.await {
            Ok(v) => {
                $run.record($name, true, $detail(&v), started);
                v
            }
            Err(e) => {
                $run.record($name, false, e.to_string(), started);
                return Err($finding(e));
            }
        }
    }};
}

pub mod fetch;
pub mod smtp;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use rustls::{CertificateError, Error as RustlsError};
use sha2::{Digest as _, Sha256};
use tokenfleet_proto::v1::{
    CertificateInfo, ConnectionTarget, ConnectionTestResult, ConnectionTestStep, ConnectionVerdict,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::upstream::smtp::Security;
use crate::upstream::tls::{TlsError, TlsSettings, TlsVersion};

/// The verdict of a failed test: what, in one line, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The verdict.
    pub verdict: ConnectionVerdict,
    /// One line: what was found (server reply, error).
    pub summary: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    /// A finding.
    pub fn new(
        verdict: ConnectionVerdict,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            verdict,
            summary: summary.into(),
            fix: fix.into(),
        }
    }
}

/// A connection test in progress.
#[derive(Debug)]
pub struct ProbeRun {
    result: ConnectionTestResult,
    deadline: Instant,
}

impl ProbeRun {
    /// Starts a test of `target` at `endpoint` (`host:port`) that must end by `deadline`.
    pub fn new(target: ConnectionTarget, endpoint: impl Into<String>, deadline: Instant) -> Self {
        let mut result = ConnectionTestResult {
            endpoint: endpoint.into(),
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            ..ConnectionTestResult::default()
        };
        result.set_target(target);
        Self { result, deadline }
    }

    /// Time left until the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// How long the next step may take: `configured`, but never past the deadline.
    pub fn step_timeout(&self, configured: Duration) -> Duration {
        configured.min(self.remaining())
    }

    /// Appends a step that started at `started`.
    pub fn record(&mut self, name: &str, ok: bool, detail: impl Into<String>, started: Instant) {
        let ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
        self.result.steps.push(ConnectionTestStep {
            name: name.to_owned(),
            ok,
            detail: detail.into(),
            duration_ms: ms,
        });
    }

    /// Appends step `quit` (best effort, at the end of a test or after a failure): `quit` gets
    /// the connection's timeout to set, at most [`QUIT_GRACE`], and returns whether the reply is
    /// the expected one and the detail.
    pub(crate) async fn quit<F, E>(&mut self, quit: impl FnOnce(Duration) -> F)
    where
        F: Future<Output = Result<(bool, String), E>>,
        E: std::fmt::Display,
    {
        let quit = quit(self.step_timeout(QUIT_GRACE));
        let started = Instant::now();
        match quit.await {
            Ok((ok, detail)) => self.record("quit", ok, detail, started),
            Err(e) => self.record("quit", false, e.to_string(), started),
        }
    }

    /// The server certificate seen.
    pub fn set_certificate(&mut self, info: CertificateInfo) {
        self.result.certificate = Some(info);
    }

    /// The certificate recorded so far.
    pub fn certificate(&self) -> Option<&CertificateInfo> {
        self.result.certificate.as_ref()
    }

    /// The steps recorded so far.
    pub fn steps(&self) -> &[ConnectionTestStep] {
        &self.result.steps
    }

    /// Ends the test with `finding`.
    pub fn finish(mut self, finding: Finding) -> ConnectionTestResult {
        self.result.set_verdict(finding.verdict);
        self.result.summary = finding.summary;
        self.result.fix = finding.fix;
        self.result
    }

    /// Ends the test with verdict OK.
    pub fn succeed(self, summary: impl Into<String>) -> ConnectionTestResult {
        self.finish(Finding::new(ConnectionVerdict::Ok, summary, ""))
    }
}

/// No answer within `after` while doing `what`.
pub fn timeout_finding(what: &str, endpoint: &str, after: Duration) -> Finding {
    Finding::new(
        ConnectionVerdict::Timeout,
        format!(
            "{what} at {endpoint}: no answer within {} ms",
            after.as_millis()
        ),
        "check the host and port of the profile and that a firewall between the agent and the \
         server lets the connection through",
    )
}

/// The server said something the protocol does not allow (or refused a basic command).
pub fn protocol_finding(summary: impl Into<String>) -> Finding {
    Finding::new(
        ConnectionVerdict::ProtocolError,
        summary,
        "check that the port speaks the protocol and security mode of the profile (e.g. 587 = \
         SMTP with STARTTLS, 465 = SMTP with implicit TLS)",
    )
}

/// Step `dns`: resolves `host` (an IP address resolves to itself).
pub async fn resolve(
    run: &mut ProbeRun,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, Finding> {
    let started = Instant::now();
    let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await;
    match lookup {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                run.record("dns", false, format!("{host}: no addresses"), started);
                return Err(dns_failed(host, "no addresses"));
            }
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            run.record("dns", true, shown.join(", "), started);
            Ok(addrs)
        }
        Ok(Err(e)) => {
            run.record("dns", false, format!("{host}: {e}"), started);
            Err(dns_failed(host, &e.to_string()))
        }
        Err(_) => {
            run.record("dns", false, format!("{host}: timed out"), started);
            Err(dns_failed(
                host,
                &format!("no answer within {} ms", timeout.as_millis()),
            ))
        }
    }
}

fn dns_failed(host: &str, why: &str) -> Finding {
    Finding::new(
        ConnectionVerdict::DnsFailed,
        format!("DNS lookup of {host} failed: {why}"),
        "check the server name in the profile (e.g. smtp.office365.com, smtp.gmail.com) and the \
         DNS resolver of the machine the agent runs on",
    )
}

/// Step `tcp`: connects to the first address that accepts, within `timeout` in all.
pub async fn connect_tcp(
    run: &mut ProbeRun,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, Finding> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last: Option<(SocketAddr, std::io::Error)> = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                run.record("tcp", true, format!("connected to {addr}"), started);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some((*addr, e)),
            Err(_) => {
                run.record("tcp", false, format!("{addr}: timed out"), started);
                return Err(timeout_finding("connecting", &addr.to_string(), timeout));
            }
        }
    }
    let Some((addr, e)) = last else {
        run.record("tcp", false, "no address to connect to", started);
        return Err(dns_failed("the host", "no addresses"));
    };
    run.record("tcp", false, format!("{addr}: {e}"), started);
    Err(match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Finding::new(
            ConnectionVerdict::ConnectionRefused,
            format!("connection to {addr} refused"),
            format!(
                "nothing accepts connections on port {} there: check the port (587 for SMTP \
                 with STARTTLS, 465 for implicit TLS, 995 POP3S, 993 IMAPS) and that the \
                 server is running",
                addr.port()
            ),
        ),
        std::io::ErrorKind::TimedOut => timeout_finding("connecting", &addr.to_string(), timeout),
        _ => Finding::new(
            ConnectionVerdict::Timeout,
            format!("connecting to {addr} failed: {e}"),
            "check the network route from the agent to the server (firewall, proxy, VPN)",
        ),
    })
}

/// `TLSv1.3` for a rustls protocol version.
fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        other => format!("{other:?}"),
    }
}

fn allowed_versions(settings: &TlsSettings) -> String {
    let min = settings.min_version.unwrap_or(TlsVersion::Tls12);
    let max = settings.max_version.unwrap_or(TlsVersion::Tls13);
    if min == max {
        min.as_str().to_owned()
    } else {
        format!("{}–{}", min.as_str(), max.as_str())
    }
}

/// Classifies a failed TLS setup or handshake with `host`.
pub fn classify_tls_error(host: &str, error: &TlsError, settings: &TlsSettings) -> Finding {
    match error {
        TlsError::Timeout { after, .. } => timeout_finding("TLS handshake", host, *after),
        TlsError::Settings(_) | TlsError::ServerName(_) => Finding::new(
            ConnectionVerdict::TlsFailed,
            error.to_string(),
            "correct the TLS settings of the profile",
        ),
        TlsError::Handshake { .. } => match error.rustls_error() {
            Some(RustlsError::InvalidCertificate(cert)) => classify_certificate_error(host, cert),
            Some(
                RustlsError::PeerIncompatible(_)
                | RustlsError::AlertReceived(rustls::AlertDescription::ProtocolVersion),
            ) => Finding::new(
                ConnectionVerdict::TlsVersionRefused,
                format!(
                    "{host} refused the TLS versions the profile allows ({}): {}",
                    allowed_versions(settings),
                    error
                ),
                TLS_VERSION_FIX,
            ),
            _ => Finding::new(
                ConnectionVerdict::TlsFailed,
                error.to_string(),
                "check that the port uses the profile's security mode (STARTTLS on 587, \
                 implicit TLS on 465) and the server's TLS configuration",
            ),
        },
    }
}

fn classify_certificate_error(host: &str, error: &CertificateError) -> Finding {
    let untrusted_fix = "add the CA that issued the server's certificate to the profile's extra \
                         trusted CA (PEM), or give the server a certificate from a public CA";
    match error {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let presented = match error {
                CertificateError::NotValidForNameContext { presented, .. }
                    if !presented.is_empty() =>
                {
                    format!(" (it names: {})", presented.join(", "))
                }
                _ => String::new(),
            };
            Finding::new(
                ConnectionVerdict::CertificateNameMismatch,
                format!("the server certificate is not valid for {host}{presented}"),
                format!(
                    "set the profile's server to a name the certificate lists, or have the \
                     server's certificate reissued to include {host}"
                ),
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => Finding::new(
            ConnectionVerdict::CertificateUntrusted,
            format!("the server certificate of {host} has expired"),
            "renew the server's certificate (or correct the clock of the agent's machine)",
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Finding::new(
                ConnectionVerdict::CertificateUntrusted,
                format!("the server certificate of {host} is not valid yet"),
                "correct the clock of the agent's machine, or the certificate's validity",
            )
        }
        CertificateError::UnknownIssuer => Finding::new(
            ConnectionVerdict::CertificateUntrusted,
            format!(
                "the server certificate of {host} is not issued by a trusted CA (unknown issuer)"
            ),
            untrusted_fix,
        ),
        other => Finding::new(
            ConnectionVerdict::CertificateUntrusted,
            format!("the server certificate of {host} is not trusted: {other:?}"),
            untrusted_fix,
        ),
    }
}

/// Puts what the certificate says (its names, its expiry) into a certificate finding.
pub fn refine_with_certificate(mut finding: Finding, info: &CertificateInfo) -> Finding {
    match finding.verdict {
        ConnectionVerdict::CertificateNameMismatch if !finding.summary.contains("(it names:") => {
            let names = if info.dns_names.is_empty() {
                format!("subject {}", info.subject)
            } else {
                info.dns_names.join(", ")
            };
            finding.summary.push_str(&format!(" (it names: {names})"));
        }
        ConnectionVerdict::CertificateUntrusted => {
            if finding.summary.ends_with("has expired")
                && let Some(t) = &info.not_after
                && let Ok(when) = time::OffsetDateTime::from_unix_timestamp(t.seconds)
            {
                finding.summary.push_str(&format!(" (not after {when})"));
            } else if finding.summary.contains("unknown issuer") {
                finding
                    .summary
                    .push_str(&format!(" (issuer: {})", info.issuer));
            }
        }
        _ => {}
    }
    finding
}

/// [`refine_with_certificate`], and: when the verified handshake failed without a clear reason
/// (many OpenSSL servers just close the connection on a version mismatch) but the look-only
/// handshake negotiated a version outside the profile's range, the verdict becomes
/// TLS_VERSION_REFUSED. `info` must come from [`inspect_certificate`].
pub fn refine_tls_finding(
    finding: Finding,
    info: &CertificateInfo,
    host: &str,
    settings: &TlsSettings,
) -> Finding {
    let mut finding = refine_with_certificate(finding, info);
    if finding.verdict == ConnectionVerdict::TlsFailed
        && !version_allowed(&info.tls_version, settings)
    {
        finding = Finding::new(
            ConnectionVerdict::TlsVersionRefused,
            format!(
                "{host} speaks {} but the profile allows only {} ({})",
                info.tls_version,
                allowed_versions(settings),
                finding.summary
            ),
            TLS_VERSION_FIX,
        );
    }
    finding
}

const TLS_VERSION_FIX: &str = "allow the TLS version the server supports in the profile (TLS \
    minimum/maximum; Exchange Online and Gmail need TLS 1.2 or 1.3), or update the server";

fn version_allowed(version: &str, settings: &TlsSettings) -> bool {
    let v = match version {
        "TLSv1.2" => TlsVersion::Tls12,
        "TLSv1.3" => TlsVersion::Tls13,
        _ => return false,
    };
    settings.min_version.unwrap_or(TlsVersion::Tls12) <= v
        && v <= settings.max_version.unwrap_or(TlsVersion::Tls13)
}

/// `QUIT`/`LOGOUT` after a test gets at most this long.
pub(crate) const QUIT_GRACE: Duration = Duration::from_secs(2);

/// The fix when the broker gave no token (every target).
pub const NO_TOKEN_FIX: &str = "check the mailbox's token status in the broker \
    (tokenfleetctl or the console): NOT_RETRIEVED or REAUTH_REQUIRED means a person must consent \
    (again); also check that the device may use the mailbox";

/// The finding when the broker gave no token: NO_TOKEN with the broker's reason as summary.
pub fn no_token_finding(summary: &str) -> Finding {
    Finding::new(ConnectionVerdict::NoToken, summary, NO_TOKEN_FIX)
}

/// After a failed verified handshake (a certificate or TLS `finding`): reconnects to `peer`,
/// lets `plain_part` re-do the protocol's plain-text part for [`Security::Starttls`] (it gets
/// the TCP stream and the step timeout and returns the stream to hand to TLS), reads the
/// certificate with verification off ([`inspect_certificate`]) and `refine`s the finding with
/// it, for the report only. Other findings, or no peer, are returned as they are.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn with_certificate<IO, P, F>(
    run: &mut ProbeRun,
    peer: Option<SocketAddr>,
    finding: Finding,
    security: Security,
    host: &str,
    tls: &TlsSettings,
    configured_timeout: Duration,
    plain_part: P,
    refine: impl FnOnce(Finding, &CertificateInfo) -> Finding,
) -> Finding
where
    IO: AsyncRead + AsyncWrite + Unpin,
    P: FnOnce(TcpStream, Duration) -> F,
    F: Future<Output = Option<IO>>,
{
    let looks_at_cert = matches!(
        finding.verdict,
        ConnectionVerdict::CertificateNameMismatch
            | ConnectionVerdict::CertificateUntrusted
            | ConnectionVerdict::TlsFailed
            | ConnectionVerdict::TlsVersionRefused
    );
    let Some(peer) = peer.filter(|_| looks_at_cert) else {
        return finding;
    };
    let timeout = run.step_timeout(configured_timeout);
    let info = async {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(peer))
            .await
            .ok()?
            .ok()?;
        match security {
            Security::ImplicitTls => inspect_certificate(host, tcp, tls, timeout).await,
            Security::Starttls => {
                let io = plain_part(tcp, timeout).await?;
                inspect_certificate(host, io, tls, timeout).await
            }
            Security::None => None,
        }
    }
    .await;
    match info {
        Some(info) => {
            let refined = refine(finding, &info);
            run.set_certificate(info);
            refined
        }
        None => finding,
    }
}

/// Step `tls`: the handshake over `io` with the profile's settings. On success records the
/// negotiated version and cipher and sets the certificate info.
pub async fn tls_handshake<IO>(
    run: &mut ProbeRun,
    host: &str,
    io: IO,
    settings: &TlsSettings,
    timeout: Duration,
) -> Result<TlsStream<IO>, Finding>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    match settings.connect(host, io, timeout).await {
        Ok(stream) => {
            let info = negotiated_certificate(stream.get_ref().1);
            let detail = match &info {
                Some(i) => format!("{} {}", i.tls_version, i.cipher_suite),
                None => "handshake done".to_owned(),
            };
            run.record("tls", true, detail, started);
            if let Some(info) = info {
                run.set_certificate(info);
            }
            Ok(stream)
        }
        Err(e) => {
            run.record("tls", false, e.to_string(), started);
            Err(classify_tls_error(host, &e, settings))
        }
    }
}

/// The certificate info of an established connection.
fn negotiated_certificate(conn: &rustls::ClientConnection) -> Option<CertificateInfo> {
    let der = conn.peer_certificates()?.first()?;
    let version = conn
        .protocol_version()
        .map(version_name)
        .unwrap_or_default();
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    Some(certificate_info(der, &version, &cipher))
}

/// A handshake with verification off, only to read the certificate of a server whose
/// verified handshake failed. Nothing is sent over the connection; it is dropped at once.
/// Allows TLS 1.2–1.3 whatever the profile says, so a version mismatch still shows the
/// certificate.
pub async fn inspect_certificate<IO>(
    host: &str,
    io: IO,
    settings: &TlsSettings,
    timeout: Duration,
) -> Option<CertificateInfo>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let look_only = TlsSettings {
        skip_verification: true,
        extra_ca_pem: None,
        min_version: None,
        max_version: None,
        no_system_roots: settings.no_system_roots,
        // Only looks at the certificate: no token is sent on this connection.
        allow_cleartext_tokens: false,
    };
    let stream = look_only.connect(host, io, timeout).await.ok()?;
    negotiated_certificate(stream.get_ref().1)
}

/// Subject, issuer, DNS names, validity and SHA-256 fingerprint of a DER certificate, with the
/// negotiated `tls_version` and `cipher_suite`. An unparsable certificate still gets its
/// fingerprint.
pub fn certificate_info(der: &[u8], tls_version: &str, cipher_suite: &str) -> CertificateInfo {
    let fingerprint: String = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut info = CertificateInfo {
        sha256_fingerprint: fingerprint,
        tls_version: tls_version.to_owned(),
        cipher_suite: cipher_suite.to_owned(),
        ..CertificateInfo::default()
    };
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        info.subject = cert.subject().to_string();
        info.issuer = cert.issuer().to_string();
        info.not_before = Some(prost_types::Timestamp {
            seconds: cert.validity().not_before.timestamp(),
            nanos: 0,
        });
        info.not_after = Some(prost_types::Timestamp {
            seconds: cert.validity().not_after.timestamp(),
            nanos: 0,
        });
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                    info.dns_names.push((*dns).to_owned());
                }
            }
        }
    }
    info
}
