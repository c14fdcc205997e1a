//! Fetch jobs: mail waiting in a device's upstream mailbox (POP3 with `AUTH XOAUTH2`, IMAP with
//! `AUTHENTICATE XOAUTH2`) is copied into the local [`Maildrop`] and removed upstream only after
//! the local copy is fsynced. The device then collects it from the agent's local POP3 server
//! ([`crate::pop3_server`]).
//!
//! [`fetch_once`] is one run for one device; the runtime calls it at the device's check interval
//! with a fresh token (purpose POP or IMAP).
//!
//! Crash safety: the order is always *store (fsync) → delete upstream*. A crash before the
//! upstream delete commits (POP3 `QUIT`, IMAP `EXPUNGE`) leaves the message upstream; the next
//! run sees its upstream id in the maildrop ([`Maildrop::contains_upstream`]), does not download
//! or store it again, and deletes it upstream. So nothing is lost and nothing is duplicated.

pub mod imap;
pub mod pop3;

use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::TcpStream;

use crate::maildrop::{Maildrop, MaildropError};
use crate::sasl::{self, Mechanism};
use crate::upstream::tls::{TlsError, TlsSettings};
use crate::upstream::{Credentials, FailureKind};

/// How the connection to the upstream mail server is secured: the same choice as for sending
/// (`Starttls` means `STLS` for POP3 and `STARTTLS` for IMAP; refusing it is an error).
pub use crate::upstream::smtp::Security;

/// The mail access protocol of a fetch profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchProtocol {
    /// POP3 (RFC 1939) with `AUTH XOAUTH2` (RFC 5034 exchange, Exchange style).
    Pop3,
    /// IMAP4rev1 (RFC 3501) with `AUTHENTICATE XOAUTH2`.
    Imap,
}

/// A device's fetch profile.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// POP3 or IMAP.
    pub protocol: FetchProtocol,
    /// Server host name (also the TLS server name).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// STARTTLS, implicit TLS or none.
    pub security: Security,
    /// TLS verification and versions.
    pub tls: TlsSettings,
    /// Limit for connecting and for each server reply (a message body may take
    /// [`FetchSettings::message_timeout`]).
    pub timeout: Duration,
    /// Limit for downloading one message.
    pub message_timeout: Duration,
    /// Most messages fetched per run (the rest wait for the next run).
    pub max_messages: usize,
    /// Largest message fetched; larger ones are left upstream and counted in
    /// [`FetchReport::skipped_too_large`].
    pub max_message_size: usize,
    /// IMAP folder (default `INBOX`).
    pub folder: String,
    /// Keep the upstream copy (IMAP: flag it `\Seen`; POP3: no `DELE`). Default: delete.
    pub keep_upstream: bool,
}

impl FetchSettings {
    /// Settings with the defaults: 30 s replies, 10 min per message, 100 messages per run,
    /// 50 MiB per message, folder `INBOX`, delete upstream.
    pub fn new(
        protocol: FetchProtocol,
        host: impl Into<String>,
        port: u16,
        security: Security,
    ) -> Self {
        Self {
            protocol,
            host: host.into(),
            port,
            security,
            tls: TlsSettings::default(),
            timeout: Duration::from_secs(30),
            message_timeout: Duration::from_secs(600),
            max_messages: 100,
            max_message_size: 50 * 1024 * 1024,
            folder: "INBOX".to_owned(),
            keep_upstream: false,
        }
    }

    /// `host:port`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What one fetch run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchReport {
    /// Messages downloaded and stored in the maildrop.
    pub fetched: usize,
    /// Upstream copies whose deletion the server confirmed (POP3 `QUIT`, IMAP `EXPUNGE`);
    /// with `keep_upstream`, messages flagged `\Seen`.
    pub deleted_upstream: usize,
    /// Messages the maildrop already held (an earlier run stored them but did not get to delete
    /// them upstream): not downloaded again, deleted upstream.
    pub skipped_duplicates: usize,
    /// Messages above `max_message_size`, left upstream.
    pub skipped_too_large: usize,
    /// Bytes stored.
    pub bytes: u64,
}

/// A failed fetch run. Messages stored before the failure stay stored (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{final_reply}")]
pub struct FetchError {
    /// How the scheduler should treat it (`AuthRejected`: get a fresh token and retry once).
    pub kind: FailureKind,
    /// The server's last reply (`-ERR …`, `a1 NO …`) or the local error. Never a token.
    pub final_reply: String,
    /// The decoded JSON of the server's SASL error challenge, if it sent one.
    pub auth_challenge_json: Option<String>,
    /// The part of the run that completed before the failure.
    pub partial: FetchReport,
}

impl FetchError {
    /// A transient failure (network, timeout, temporary server error).
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::new(FailureKind::Transient, reason)
    }

    /// A failure that will not go away by itself (protocol violation, missing capability).
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::new(FailureKind::Permanent, reason)
    }

    /// The server refused the token.
    pub fn auth_rejected(reason: impl Into<String>, challenge_json: Option<String>) -> Self {
        Self {
            auth_challenge_json: challenge_json,
            ..Self::new(FailureKind::AuthRejected, reason)
        }
    }

    fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            final_reply: reason.into(),
            auth_challenge_json: None,
            partial: FetchReport::default(),
        }
    }

    pub(crate) fn with_partial(mut self, partial: FetchReport) -> Self {
        self.partial = partial;
        self
    }

    pub(crate) fn from_tls(e: &TlsError) -> Self {
        match e {
            TlsError::Timeout { .. } => Self::transient(e.to_string()),
            TlsError::Handshake { .. } if e.rustls_error().is_none() => {
                Self::transient(e.to_string())
            }
            _ => Self::permanent(e.to_string()),
        }
    }

    pub(crate) fn from_maildrop(e: &MaildropError) -> Self {
        Self::transient(format!("local maildrop: {e}"))
    }
}

/// Fetches new mail of `device` from the upstream mailbox in `settings` into `maildrop`, as
/// `credentials` (XOAUTH2). At most `settings.max_messages` per run. Run at most one fetch per
/// device at a time (the duplicate check and the store are not atomic across two runs).
///
/// Errors: `AuthRejected` (the server refused the token: `final_reply` is its `-ERR`/`NO`
/// line, `auth_challenge_json` the decoded `+ <base64>` challenge) — get a fresh token and
/// retry once; `Transient` (network, timeouts, `[IN-USE]`/`[SYS/TEMP]`, local disk) — retry at
/// the next interval; `Permanent` (TLS verification, missing STLS/UIDL/XOAUTH2, protocol
/// violations) — report to the operator. Messages stored before a failure stay stored.
pub async fn fetch_once(
    settings: &FetchSettings,
    credentials: &Credentials,
    maildrop: &Maildrop,
    device: &str,
) -> Result<FetchReport, FetchError> {
    let result = match settings.protocol {
        FetchProtocol::Pop3 => pop3::fetch(settings, credentials, maildrop, device).await,
        FetchProtocol::Imap => imap::fetch(settings, credentials, maildrop, device).await,
    };
    match &result {
        Ok(report) => tracing::info!(
            device,
            endpoint = %settings.endpoint(),
            fetched = report.fetched,
            deleted_upstream = report.deleted_upstream,
            skipped_duplicates = report.skipped_duplicates,
            skipped_too_large = report.skipped_too_large,
            bytes = report.bytes,
            "fetch run done"
        ),
        Err(e) => tracing::warn!(
            device,
            endpoint = %settings.endpoint(),
            kind = ?e.kind,
            reply = %e.final_reply,
            challenge = e.auth_challenge_json.as_deref().unwrap_or(""),
            fetched = e.partial.fetched,
            "fetch run failed"
        ),
    }
    result
}

/// A byte stream to a mail server: TCP or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// A line-oriented client connection with timeouts and line limits.
pub(crate) struct Conn {
    reader: BufReader<Box<dyn Io>>,
    host: String,
    timeout: Duration,
    max_line: usize,
}

/// Stores one downloaded message in the maildrop (off the async threads).
pub(crate) async fn store(
    maildrop: &Maildrop,
    device: &str,
    upstream_id: &str,
    bytes: Vec<u8>,
) -> Result<crate::maildrop::StoreOutcome, FetchError> {
    let maildrop = maildrop.clone();
    let device = device.to_owned();
    let upstream_id = upstream_id.to_owned();
    tokio::task::spawn_blocking(move || maildrop.store(&device, Some(&upstream_id), &bytes))
        .await
        .map_err(|e| FetchError::transient(format!("local maildrop task failed: {e}")))?
        .map_err(|e| FetchError::from_maildrop(&e))
}

/// Whether the maildrop already holds this upstream message.
pub(crate) async fn already_stored(
    maildrop: &Maildrop,
    device: &str,
    upstream_id: &str,
) -> Result<bool, FetchError> {
    let maildrop = maildrop.clone();
    let device = device.to_owned();
    let upstream_id = upstream_id.to_owned();
    tokio::task::spawn_blocking(move || maildrop.contains_upstream(&device, &upstream_id))
        .await
        .map_err(|e| FetchError::transient(format!("local maildrop task failed: {e}")))?
        .map_err(|e| FetchError::from_maildrop(&e))
}

impl Conn {
    /// Opens TCP (and TLS for [`Security::ImplicitTls`]) to `settings`' server.
    pub(crate) async fn connect(
        settings: &FetchSettings,
        max_line: usize,
    ) -> Result<Self, FetchError> {
        // Every fetch connection logs in with a token: refuse before connecting. Transient, so
        // the schedule keeps trying (and reporting) until the profile is fixed.
        settings
            .tls
            .check_token_transport(
                "fetch",
                &settings.host,
                settings.port,
                settings.security != Security::None,
            )
            .map_err(FetchError::transient)?;
        let tcp = Self::connect_tcp(settings).await?;
        let mut conn = Self {
            reader: BufReader::new(Box::new(tcp)),
            host: settings.host.clone(),
            timeout: settings.timeout,
            max_line,
        };
        if settings.security == Security::ImplicitTls {
            conn = conn.start_tls(&settings.tls).await?;
        }
        Ok(conn)
    }

    /// Only the TCP connection (the connection test times each step).
    pub(crate) async fn connect_tcp(settings: &FetchSettings) -> Result<TcpStream, FetchError> {
        let endpoint = settings.endpoint();
        match tokio::time::timeout(
            settings.timeout,
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(FetchError::transient(format!("connect to {endpoint}: {e}"))),
            Err(_) => Err(FetchError::transient(format!(
                "connect to {endpoint}: timed out after {:?}",
                settings.timeout
            ))),
        }
    }

    /// Wraps an established stream (plain or TLS).
    pub(crate) fn from_stream(
        stream: Box<dyn Io>,
        settings: &FetchSettings,
        max_line: usize,
    ) -> Self {
        Self {
            reader: BufReader::new(stream),
            host: settings.host.clone(),
            timeout: settings.timeout,
            max_line,
        }
    }

    /// The underlying stream, for a TLS handshake run elsewhere (the connection test). Refuses
    /// when the server already sent bytes past the command reply.
    pub(crate) fn into_io(self) -> Result<Box<dyn Io>, FetchError> {
        if !self.reader.buffer().is_empty() {
            return Err(FetchError::permanent(format!(
                "{} sent data before the TLS handshake (possible STARTTLS injection)",
                self.host
            )));
        }
        Ok(self.reader.into_inner())
    }

    /// Runs the TLS handshake on this connection (after `STLS`/`STARTTLS`, or at once). Refuses
    /// when the server already sent bytes past the command reply (STARTTLS response injection).
    pub(crate) async fn start_tls(self, tls: &TlsSettings) -> Result<Self, FetchError> {
        let host = self.host.clone();
        let timeout = self.timeout;
        let max_line = self.max_line;
        let stream = self.into_io()?;
        let tls_stream = tls
            .connect(&host, stream, timeout)
            .await
            .map_err(|e| FetchError::from_tls(&e))?;
        Ok(Self {
            reader: BufReader::new(Box::new(tls_stream)),
            host,
            timeout,
            max_line,
        })
    }

    /// Changes the reply timeout (the connection test clamps it to its deadline).
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads one line (without CRLF) within the reply timeout.
    pub(crate) async fn line(&mut self) -> Result<Vec<u8>, FetchError> {
        let timeout = self.timeout;
        self.line_within(timeout).await
    }

    /// Reads one line (without its CRLF or bare LF) of at most `max_line` bytes.
    pub(crate) async fn line_within(&mut self, timeout: Duration) -> Result<Vec<u8>, FetchError> {
        let limit = self.max_line;
        match tokio::time::timeout(timeout, read_line(&mut self.reader, limit)).await {
            Ok(Ok(Some(mut line))) => {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(line)
            }
            Ok(Ok(None)) => Err(FetchError::transient(format!(
                "{} closed the connection",
                self.host
            ))),
            Ok(Err(e)) => Err(e.with_host(&self.host)),
            Err(_) => Err(FetchError::transient(format!(
                "{} did not answer within {timeout:?}",
                self.host
            ))),
        }
    }

    /// Reads a line as text (lossy UTF-8), for replies.
    pub(crate) async fn text_line(&mut self) -> Result<String, FetchError> {
        let line = self.line().await?;
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Reads exactly `n` bytes (an IMAP literal) within `timeout`.
    pub(crate) async fn exact(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, FetchError> {
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(timeout, self.reader.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Ok(buf),
            Ok(Err(e)) => Err(self.read_failed(&e)),
            Err(_) => Err(self.short_read(n as u64, timeout)),
        }
    }

    /// Reads and discards exactly `n` bytes within `timeout`.
    pub(crate) async fn discard(&mut self, n: u64, timeout: Duration) -> Result<(), FetchError> {
        let mut sink = tokio::io::sink();
        let mut limited = (&mut self.reader).take(n);
        match tokio::time::timeout(timeout, tokio::io::copy(&mut limited, &mut sink)).await {
            Ok(Ok(copied)) if copied == n => Ok(()),
            Ok(Ok(_)) => Err(FetchError::transient(format!(
                "{} closed the connection inside a literal",
                self.host
            ))),
            Ok(Err(e)) => Err(self.read_failed(&e)),
            Err(_) => Err(self.short_read(n, timeout)),
        }
    }

    /// A read of a counted block ([`Conn::exact`], [`Conn::discard`]) failed.
    fn read_failed(&self, e: &std::io::Error) -> FetchError {
        FetchError::transient(format!("reading from {}: {e}", self.host))
    }

    /// A counted block of `n` bytes did not arrive within `timeout`.
    fn short_read(&self, n: u64, timeout: Duration) -> FetchError {
        FetchError::transient(format!(
            "{} did not send {n} bytes within {timeout:?}",
            self.host
        ))
    }

    /// Answers an XOAUTH2 error challenge (the empty response after which the server sends its
    /// final reply).
    pub(crate) async fn answer_challenge(&mut self) -> Result<(), FetchError> {
        self.send(sasl::challenge_answer(Mechanism::XOAuth2)).await
    }

    /// Sends `text` followed by CRLF.
    pub(crate) async fn send(&mut self, text: &str) -> Result<(), FetchError> {
        let mut out = Vec::with_capacity(text.len() + 2);
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        let timeout = self.timeout;
        let writer = self.reader.get_mut();
        let write = async {
            writer.write_all(&out).await?;
            writer.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FetchError::transient(format!(
                "writing to {}: {e}",
                self.host
            ))),
            Err(_) => Err(FetchError::transient(format!(
                "writing to {} timed out after {timeout:?}",
                self.host
            ))),
        }
    }
}

/// An XOAUTH2 error challenge (`+ <base64 JSON>`, RFC 7628 §3.2.2): the server's JSON when it
/// decodes, else the raw text for the report.
#[derive(Debug, Default)]
pub(crate) struct ErrorChallenge {
    json: Option<String>,
    raw: String,
}

impl ErrorChallenge {
    /// Reads `text`, the challenge after the `+`.
    pub(crate) fn parse(text: &str) -> Self {
        Self {
            json: sasl::decode_error_challenge(text).map(|v| v.to_string()),
            raw: text.to_owned(),
        }
    }

    /// The rejection: `"{what}: {reply}"` (with the raw challenge appended when it was not
    /// JSON) and the JSON.
    pub(crate) fn rejection(self, what: &str, reply: &str) -> (String, Option<String>) {
        let mut text = format!("{what}: {reply}");
        if self.json.is_none() && !self.raw.is_empty() {
            text.push_str(&format!(" (challenge {:?})", self.raw));
        }
        (text, self.json)
    }
}

/// A read error before the host is known to the message.
#[derive(Debug)]
struct LineError(String);

impl LineError {
    fn with_host(self, host: &str) -> FetchError {
        FetchError::transient(format!("reading from {host}: {}", self.0))
    }
}

/// Reads one line including its `\n`; `None` at EOF before any byte. Lines longer than `limit`
/// are an error (a server must not send them; reading on would be unbounded).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = reader
            .fill_buf()
            .await
            .map_err(|e| LineError(e.to_string()))?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(LineError("connection closed inside a line".to_owned()))
            };
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        if line.len() + chunk.len() > limit {
            return Err(LineError(format!("line longer than {limit} bytes")));
        }
        line.extend_from_slice(chunk);
        let n = chunk.len();
        reader.consume(n);
        if done {
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let data: &[u8] = b"short\r\nabcdefghijklmnop\r\n";
        let mut r = tokio::io::BufReader::new(data);
        assert_eq!(
            read_line(&mut r, 10).await.ok().flatten().unwrap(),
            b"short\r\n"
        );
        assert!(read_line(&mut r, 10).await.is_err());
        let mut r = tokio::io::BufReader::new(&b"partial"[..]);
        assert!(read_line(&mut r, 100).await.is_err());
        let mut r = tokio::io::BufReader::new(&b""[..]);
        assert!(read_line(&mut r, 100).await.unwrap().is_none());
    }
}
