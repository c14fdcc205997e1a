//! SMTP submission client: delivers a spooled message upstream (Exchange Online, Gmail, any
//! RFC 6409 submission server) with an OAuth bearer token over XOAUTH2 or OAUTHBEARER.
//!
//! Two layers:
//! - [`SmtpConnection`]: one SMTP client connection — bounded reply reader (lines of at most
//!   [`MAX_LINE`] octets, at most [`MAX_REPLY_LINES`] lines per reply, so a hostile server
//!   cannot exhaust memory), per-command timeouts, EHLO capabilities, the STARTTLS command and
//!   the SASL exchange including the error challenge. The connection test
//!   ([`crate::probe::smtp`]) drives it step by step.
//! - [`SmtpDelivery`]: the [`Delivery`] implementation: connect, greeting, EHLO, STARTTLS,
//!   EHLO, AUTH, MAIL/RCPT/DATA — and the next message of the same mailbox over the same
//!   session after `RSET` (pipelined where offered), up to [`MAX_MESSAGES_PER_SESSION`], `QUIT`
//!   after [`SESSION_IDLE`] without one.
//!
//! The token is only ever on the wire: never in logs, errors or `Debug` output.
//!
//! The grammar (replies, EHLO keywords, dot-stuffing) is [`crate::wire::smtp_client`], sans-IO;
//! this file is the session, hand-driven rather than lettre's: lettre's XOAUTH2 mechanism does
//! not answer the error challenge (`334 <base64 JSON>`) that Microsoft and Google send for a bad
//! token, so the server's reason would be lost — here the challenge is answered with an empty
//! line and both the JSON and the final `535` are reported.
//!
//! AUTH initial response: the one-line form `AUTH XOAUTH2 <payload>` is used only when the whole
//! command fits the RFC 5321 command line limit of 512 octets. Otherwise (every real Exchange or
//! Google token: they are 1–3 KB) the client sends `AUTH XOAUTH2`, waits for `334 `, and sends the
//! payload on its own line (RFC 4954 §4 requires this fallback; it is the exchange Microsoft
//! documents for Exchange Online, and servers with a short command line limit accept it too).
//!
//! How failures are classified for the spool ([`FailureKind`]):
//! - Anything about the connection or the server as a whole — network errors, timeouts, a
//!   greeting other than 220, EHLO refused, STARTTLS not offered, no OAuth mechanism offered, TLS
//!   failures, 4xx anywhere — is [`FailureKind::Transient`]: it is not this message's fault,
//!   the message stays queued and the status shows the reason until the operator fixes it.
//! - AUTH refused with 535/530/534 or an enhanced code `5.7.x` is [`FailureKind::AuthRejected`]
//!   (the worker fetches a fresh token once), except `5.7.139` ("SmtpClientAuthentication is
//!   disabled", Exchange Online): a new token cannot fix that, so it is
//!   [`FailureKind::Transient`] with the reply kept — an administrator must enable Authenticated
//!   SMTP, and until then messages keep queueing rather than bouncing.
//! - 5xx to MAIL FROM, to every RCPT TO, or to DATA is [`FailureKind::Permanent`]: the server
//!   will never take this message. When only some recipients are refused the message goes to the
//!   others and the refused ones are named in the receipt.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::tls::{TlsError, TlsSettings};
use super::{Credentials, Delivery, DeliveryError, DeliveryReceipt, FailureKind, OutgoingMessage};
use crate::sasl::{self, Mechanism};
#[cfg(test)]
use crate::wire::smtp_client::MAX_REPORTED;
pub use crate::wire::smtp_client::{
    Capabilities, DotStuffer, MAX_LINE, MAX_REPLY_LINES, Reply, ReplyReceiver, dot_stuff,
    parse_reply_line,
};
use crate::wire::smtp_client::{has_eight_bit, message_size, truncate};

/// Longest `AUTH <mechanism> <initial response>` line sent; longer payloads go on their own line
/// after `334 ` (RFC 5321 §4.5.3.1.4 command line limit).
pub const MAX_INITIAL_RESPONSE_LINE: usize = 512;
/// QUIT after the work is done gets at most this long.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// DATA is written in chunks of this size, each within the command timeout.
const WRITE_CHUNK: usize = 64 * 1024;

/// How the connection to the upstream is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (port 587). Refuses to go on if not offered.
    Starttls,
    /// TLS from the first byte (port 465).
    ImplicitTls,
    /// No TLS at all (lab servers on a trusted network only: the token crosses in clear).
    None,
}

impl Security {
    /// `starttls` / `implicit_tls` / `none`, as in the device profile.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starttls => "starttls",
            Self::ImplicitTls => "implicit_tls",
            Self::None => "none",
        }
    }
}

/// Where and how to submit (from a device's send profile).
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Server host name (also the TLS server name and OAUTHBEARER `host=`).
    pub host: String,
    /// Server port (587 STARTTLS, 465 implicit TLS).
    pub port: u16,
    /// How the connection is secured.
    pub security: Security,
    /// Limit for connecting, the TLS handshake and each command's reply.
    pub timeout: Duration,
    /// TLS settings (extra CA, versions, verification).
    pub tls: TlsSettings,
    /// The name sent with EHLO.
    pub helo_name: String,
    /// SASL mechanisms in order of preference; the first one the server offers is used.
    pub mechanisms: Vec<Mechanism>,
    /// Most messages a mailbox may send a minute through this server (`None`: no limit); set
    /// for Exchange Online by [`SmtpSettings::new`] (see [`super::messages_per_minute_for`]).
    pub messages_per_minute: Option<u32>,
}

impl SmtpSettings {
    /// Settings with the defaults: 60 s timeout, default TLS, EHLO `localhost`, XOAUTH2 before
    /// OAUTHBEARER.
    pub fn new(host: impl Into<String>, port: u16, security: Security) -> Self {
        let host = host.into();
        Self {
            messages_per_minute: super::messages_per_minute_for(&host),
            host,
            port,
            security,
            timeout: Duration::from_secs(60),
            tls: TlsSettings::default(),
            helo_name: "localhost".to_owned(),
            mechanisms: vec![Mechanism::XOAuth2, Mechanism::OAuthBearer],
        }
    }

    /// `host:port`.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why an SMTP exchange failed. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// TCP connection (or name resolution) failed.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No reply (or write progress) within the timeout.
    #[error("{what} at {peer}: no answer within {after:?}")]
    Timeout {
        /// What was waited for, e.g. `reply to EHLO`.
        what: String,
        /// `host:port`.
        peer: String,
        /// The timeout.
        after: Duration,
    },
    /// Reading or writing failed, or the server closed the connection.
    #[error("{what} at {peer}: {reason}")]
    Io {
        /// What was being done.
        what: String,
        /// `host:port`.
        peer: String,
        /// The error.
        reason: String,
    },
    /// The server sent something that is not SMTP (bad line, overlong line, data after the
    /// STARTTLS reply).
    #[error("protocol error from {peer}: {reason}")]
    Protocol {
        /// `host:port`.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// TLS setup or handshake failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The profile would send the token in clear text to a non-loopback host (see
    /// [`TlsSettings::check_token_transport`]); nothing was sent.
    #[error("{0}")]
    CleartextToken(String),
    /// The server answered a step with an unexpected reply.
    #[error("{step} refused by {peer}: {reply}")]
    Refused {
        /// The command or stage, e.g. `greeting`, `EHLO`, `MAIL FROM`.
        step: String,
        /// `host:port`.
        peer: String,
        /// The reply.
        reply: Reply,
    },
    /// STARTTLS is required by the profile but the server does not offer it.
    #[error("{peer} does not offer STARTTLS (offers: {offers}); the send profile requires it")]
    StartTlsNotOffered {
        /// `host:port`.
        peer: String,
        /// The EHLO keywords the server did offer.
        offers: String,
    },
    /// None of the configured OAuth mechanisms is offered.
    #[error("server offers no {wanted} (offers: {offered})")]
    NoMechanism {
        /// The configured mechanisms, e.g. `XOAUTH2/OAUTHBEARER`.
        wanted: String,
        /// What the server offers, e.g. `PLAIN LOGIN`.
        offered: String,
    },
    /// AUTH failed.
    #[error("AUTH {} refused by {peer}: {reply}{}", mechanism.as_str(),
        challenge_json.as_deref().map(|j| format!(" (challenge {j})")).unwrap_or_default())]
    AuthFailed {
        /// The mechanism used.
        mechanism: Mechanism,
        /// `host:port`.
        peer: String,
        /// The final reply (`535 5.7.3 …`).
        reply: Reply,
        /// The decoded JSON of the error challenge, if the server sent one.
        challenge_json: Option<String>,
    },
}

impl SmtpError {
    /// How the spool should treat this failure (see the module documentation).
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::AuthFailed { reply, .. } => auth_failure_kind(reply),
            // Queued messages wait (with backoff) until the operator fixes the profile.
            _ => FailureKind::Transient,
        }
    }

    /// The reply the server sent, if this error is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Self::Refused { reply, .. } | Self::AuthFailed { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// `5.7.139` (SMTP AUTH disabled for the mailbox or tenant) is [`FailureKind::Transient`]: a new
/// token does not help; 4xx is transient; other 5xx on AUTH means the token was refused.
fn auth_failure_kind(reply: &Reply) -> FailureKind {
    if reply.enhanced_code() == Some("5.7.139") || reply.is_transient() {
        FailureKind::Transient
    } else if matches!(reply.code, 530 | 534 | 535)
        || reply.enhanced_code().is_some_and(|c| c.starts_with("5.7."))
    {
        FailureKind::AuthRejected
    } else {
        // 501/504 and the like: the server and this client disagree about AUTH itself; no
        // message-specific reason to bounce.
        FailureKind::Transient
    }
}

impl From<SmtpError> for DeliveryError {
    fn from(e: SmtpError) -> Self {
        let kind = e.kind();
        let auth_challenge_json = match &e {
            SmtpError::AuthFailed { challenge_json, .. } => challenge_json.clone(),
            _ => None,
        };
        let final_reply = match &e {
            // The reply first, so status surfaces and tests see `535 …` at the start.
            SmtpError::AuthFailed {
                reply,
                mechanism,
                peer,
                ..
            } => format!("{reply} (AUTH {} at {peer})", mechanism.as_str()),
            other => other.to_string(),
        };
        DeliveryError {
            kind,
            final_reply: truncate(final_reply),
            auth_challenge_json,
            retry_after: None,
        }
    }
}

/// A byte stream an SMTP connection runs over (TCP, or TLS over TCP).
pub trait SmtpIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> SmtpIo for T {}

/// One SMTP client connection: bounded reply reading and commands with a timeout each.
pub struct SmtpConnection {
    io: Box<dyn SmtpIo>,
    buf: Vec<u8>,
    peer: String,
    timeout: Duration,
}

impl fmt::Debug for SmtpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConnection")
            .field("peer", &self.peer)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SmtpConnection {
    /// Wraps a connected stream to `peer` (`host:port`, for messages).
    pub fn new(io: impl SmtpIo + 'static, peer: impl Into<String>, timeout: Duration) -> Self {
        Self {
            io: Box::new(io),
            buf: Vec::new(),
            peer: peer.into(),
            timeout,
        }
    }

    /// Changes the per-command timeout (the connection test shrinks it to its deadline).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `host:port` of the server.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn io_error(&self, what: &str, e: impl fmt::Display) -> SmtpError {
        SmtpError::Io {
            what: what.to_owned(),
            peer: self.peer.clone(),
            reason: e.to_string(),
        }
    }

    fn timeout_error(&self, what: &str) -> SmtpError {
        SmtpError::Timeout {
            what: what.to_owned(),
            peer: self.peer.clone(),
            after: self.timeout,
        }
    }

    /// Reads one (possibly multi-line) reply; `what` names it in errors (`reply to EHLO`). The
    /// grammar and its bounds are [`ReplyReceiver`]'s; this loop only reads.
    pub async fn read_reply(&mut self, what: &str) -> Result<Reply, SmtpError> {
        let mut receiver = ReplyReceiver::new();
        loop {
            let (used, reply) = receiver.push(&self.buf).map_err(|e| SmtpError::Protocol {
                peer: self.peer.clone(),
                reason: format!("{what}: {e}"),
            })?;
            self.buf.drain(..used);
            if let Some(reply) = reply {
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let room = MAX_LINE
                .saturating_sub(self.buf.len())
                .clamp(1, chunk.len());
            let n = match tokio::time::timeout(self.timeout, self.io.read(&mut chunk[..room])).await
            {
                Err(_) => return Err(self.timeout_error(what)),
                Ok(Err(e)) => return Err(self.io_error(what, e)),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(self.io_error(what, "the server closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes `bytes` (in chunks, each within the timeout) and flushes.
    async fn write(&mut self, bytes: &[u8], what: &str) -> Result<(), SmtpError> {
        self.write_unflushed(bytes, what).await?;
        self.flush(what).await
    }

    /// Writes `bytes` in chunks, each within the timeout, without flushing.
    async fn write_unflushed(&mut self, bytes: &[u8], what: &str) -> Result<(), SmtpError> {
        for chunk in bytes.chunks(WRITE_CHUNK) {
            match tokio::time::timeout(self.timeout, self.io.write_all(chunk)).await {
                Err(_) => return Err(self.timeout_error(what)),
                Ok(Err(e)) => return Err(self.io_error(what, e)),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// Flushes what was written, within the timeout.
    async fn flush(&mut self, what: &str) -> Result<(), SmtpError> {
        match tokio::time::timeout(self.timeout, self.io.flush()).await {
            Err(_) => Err(self.timeout_error(what)),
            Ok(Err(e)) => Err(self.io_error(what, e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends `line` + CRLF and reads the reply. `verb` names the command in errors, so a line
    /// carrying a secret is never quoted.
    pub async fn command(&mut self, line: &str, verb: &str) -> Result<Reply, SmtpError> {
        // Zeroized: the line may carry a SASL payload.
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(line.len() + 2));
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, &format!("sending {verb}")).await?;
        self.read_reply(&format!("reply to {verb}")).await
    }

    /// Reads the greeting; anything but 220 is an error.
    pub async fn greeting(&mut self) -> Result<Reply, SmtpError> {
        let reply = self.read_reply("greeting").await?;
        if reply.code == 220 {
            Ok(reply)
        } else {
            Err(self.refused("greeting", reply))
        }
    }

    fn refused(&self, step: &str, reply: Reply) -> SmtpError {
        SmtpError::Refused {
            step: step.to_owned(),
            peer: self.peer.clone(),
            reply,
        }
    }

    /// EHLO. There is no HELO fallback: AUTH needs ESMTP, so a server refusing EHLO is an error.
    pub async fn ehlo(&mut self, name: &str) -> Result<Capabilities, SmtpError> {
        let reply = self.command(&format!("EHLO {name}"), "EHLO").await?;
        if reply.code == 250 {
            Ok(Capabilities::parse(&reply))
        } else {
            Err(SmtpError::Refused {
                step: "EHLO (ESMTP is required for AUTH, so HELO is no use)".to_owned(),
                peer: self.peer.clone(),
                reply,
            })
        }
    }

    /// Sends STARTTLS (refusing if `caps` does not offer it) and hands back the raw stream for
    /// the TLS handshake. Data the server sent after its 220 (a response-injection attempt) is
    /// a protocol error.
    pub async fn starttls(mut self, caps: &Capabilities) -> Result<Box<dyn SmtpIo>, SmtpError> {
        if !caps.starttls {
            return Err(SmtpError::StartTlsNotOffered {
                peer: self.peer.clone(),
                offers: if caps.lines.is_empty() {
                    "nothing".to_owned()
                } else {
                    caps.lines.join(", ")
                },
            });
        }
        let reply = self.command("STARTTLS", "STARTTLS").await?;
        if reply.code != 220 {
            return Err(self.refused("STARTTLS", reply));
        }
        if !self.buf.is_empty() {
            return Err(SmtpError::Protocol {
                peer: self.peer.clone(),
                reason: "data arrived after the STARTTLS reply, before the TLS handshake"
                    .to_owned(),
            });
        }
        Ok(self.io)
    }

    /// Authenticates with the first mechanism of `preference` that `caps` offers. On a
    /// rejected token the server's error challenge is answered and decoded, and the final reply
    /// returned in [`SmtpError::AuthFailed`].
    pub async fn authenticate(
        &mut self,
        caps: &Capabilities,
        preference: &[Mechanism],
        credentials: &Credentials,
        host: &str,
        port: u16,
    ) -> Result<(Mechanism, Reply), SmtpError> {
        let Some(mechanism) = preference.iter().copied().find(|m| caps.offers(*m)) else {
            return Err(SmtpError::NoMechanism {
                wanted: preference
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("/"),
                offered: caps.auth_list(),
            });
        };
        let payload = match mechanism {
            Mechanism::XOAuth2 => sasl::xoauth2_payload(&credentials.username, &credentials.token),
            Mechanism::OAuthBearer => {
                sasl::oauthbearer_payload(&credentials.username, host, port, &credentials.token)
            }
        };
        let verb = format!("AUTH {}", mechanism.as_str());
        let one_line = verb.len() + 1 + payload.expose().len() + 2 <= MAX_INITIAL_RESPONSE_LINE;
        let mut reply = if one_line {
            let line = zeroize::Zeroizing::new(format!("{verb} {}", payload.expose()));
            self.command(&line, &verb).await?
        } else {
            let reply = self.command(&verb, &verb).await?;
            if reply.code != 334 {
                return Err(self.auth_failed(mechanism, reply, None));
            }
            self.command(payload.expose(), &format!("{verb} response"))
                .await?
        };
        let mut challenge_json = None;
        if reply.code == 334 {
            // The error challenge: base64 JSON. Answer it so the server sends its final reply.
            let text = reply.lines.first().map(String::as_str).unwrap_or_default();
            challenge_json = Some(match sasl::decode_error_challenge(text) {
                Some(json) => json.to_string(),
                None => serde_json::Value::String(truncate(text.to_owned())).to_string(),
            });
            reply = self
                .command(
                    sasl::challenge_answer(mechanism),
                    &format!("{verb} challenge answer"),
                )
                .await?;
        }
        if reply.code == 235 {
            Ok((mechanism, reply))
        } else {
            Err(self.auth_failed(mechanism, reply, challenge_json))
        }
    }

    fn auth_failed(
        &self,
        mechanism: Mechanism,
        reply: Reply,
        challenge_json: Option<String>,
    ) -> SmtpError {
        SmtpError::AuthFailed {
            mechanism,
            peer: self.peer.clone(),
            reply,
            challenge_json,
        }
    }

    /// Sends QUIT and reads the reply (best effort: errors are returned but harmless).
    pub async fn quit(&mut self) -> Result<Reply, SmtpError> {
        let reply = self.command("QUIT", "QUIT").await;
        let _ = tokio::time::timeout(self.timeout, self.io.shutdown()).await;
        reply
    }

    /// MAIL, RCPT and DATA for one message on an authenticated connection.
    pub async fn send_message(
        &mut self,
        caps: &Capabilities,
        message: OutgoingMessage<'_>,
    ) -> Result<DeliveryReceipt, DeliveryError> {
        self.transaction(caps, message, false)
            .await
            .map_err(|failed| failed.error)
    }

    /// One mail transaction: `RSET` first when `reset` (a reused session), then `MAIL` and every
    /// `RCPT` — written as one group when the server offers `PIPELINING` (RFC 2920), else one
    /// command at a time — then, once the replies are in, `DATA` and the message, dot-stuffed a
    /// piece at a time (never a second copy of the whole message in memory).
    async fn transaction(
        &mut self,
        caps: &Capabilities,
        message: OutgoingMessage<'_>,
        reset: bool,
    ) -> Result<DeliveryReceipt, Failed> {
        let early = |error: DeliveryError| Failed {
            error,
            content_sent: false,
        };
        if message.rcpts.is_empty() {
            return Err(early(DeliveryError::permanent("message has no recipients")));
        }
        let size = message_size(message.data);
        let eight_bit = has_eight_bit(message.data);
        if let Some(limit) = caps.size.filter(|l| *l > 0 && size > *l) {
            return Err(early(DeliveryError::permanent(format!(
                "message of {size} octets exceeds {}'s limit (SIZE {limit})",
                self.peer
            ))));
        }
        let mut mail = format!("MAIL FROM:<{}>", message.from);
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit && caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        let mut commands: Vec<(String, String)> = Vec::with_capacity(message.rcpts.len() + 2);
        if reset {
            commands.push(("RSET".to_owned(), "RSET".to_owned()));
        }
        commands.push((mail, "MAIL FROM".to_owned()));
        for rcpt in message.rcpts {
            commands.push((format!("RCPT TO:<{rcpt}>"), format!("RCPT TO:<{rcpt}>")));
        }
        let replies = if caps.pipelining() {
            let mut group = Vec::new();
            for (line, _) in &commands {
                group.extend_from_slice(line.as_bytes());
                group.extend_from_slice(b"\r\n");
            }
            self.write(&group, "sending MAIL and RCPT")
                .await
                .map_err(|e| early(e.into()))?;
            let mut replies = Vec::with_capacity(commands.len());
            for (_, verb) in &commands {
                let reply = self
                    .read_reply(&format!("reply to {verb}"))
                    .await
                    .map_err(|e| early(e.into()))?;
                replies.push(reply);
            }
            replies
        } else {
            let mut replies = Vec::with_capacity(commands.len());
            for (line, verb) in &commands {
                let reply = self
                    .command(line, verb)
                    .await
                    .map_err(|e| early(e.into()))?;
                // Without pipelining, stop at a refused MAIL (the RCPTs would only be refused).
                let stop = verb == "MAIL FROM" && reply.code != 250;
                replies.push(reply);
                if stop {
                    break;
                }
            }
            replies
        };
        let mut replies = replies.into_iter();
        if reset {
            let reply = replies.next().unwrap_or_else(|| Reply {
                code: 0,
                lines: Vec::new(),
            });
            if reply.code != 250 {
                return Err(early(message_failure(&self.peer, "RSET", &reply)));
            }
        }
        let Some(reply) = replies.next() else {
            return Err(early(DeliveryError::transient("no reply to MAIL FROM")));
        };
        if reply.code != 250 {
            return Err(early(message_failure(&self.peer, "MAIL FROM", &reply)));
        }
        let mut accepted = 0usize;
        let mut refused = Vec::new();
        let mut temporary = None;
        for (rcpt, reply) in message.rcpts.iter().zip(replies) {
            if reply.code == 250 || reply.code == 251 {
                accepted += 1;
            } else if reply.is_transient() || !(500..600).contains(&reply.code) {
                // Keep it simple: any temporary refusal retries the whole message later.
                temporary.get_or_insert_with(|| {
                    message_failure(&self.peer, &format!("RCPT TO:<{rcpt}>"), &reply)
                });
            } else {
                refused.push(format!("<{rcpt}>: {reply}"));
            }
        }
        if let Some(error) = temporary {
            let _ = self.command("RSET", "RSET").await;
            return Err(early(error));
        }
        if accepted == 0 {
            let _ = self.command("RSET", "RSET").await;
            return Err(early(DeliveryError::permanent(truncate(format!(
                "every recipient refused by {}: {}",
                self.peer,
                refused.join("; ")
            )))));
        }
        let reply = self
            .command("DATA", "DATA")
            .await
            .map_err(|e| early(e.into()))?;
        if reply.code != 354 {
            return Err(early(message_failure(&self.peer, "DATA", &reply)));
        }
        let sent = |error: DeliveryError| Failed {
            error,
            content_sent: true,
        };
        let mut stuffer = DotStuffer::new();
        let mut piece = Vec::with_capacity(WRITE_CHUNK + WRITE_CHUNK / 32 + 8);
        let mut chunks = message.data.chunks(WRITE_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            piece.clear();
            stuffer.push(chunk, &mut piece);
            if chunks.peek().is_none() {
                stuffer.finish(&mut piece);
            }
            self.write_unflushed(&piece, "sending the message")
                .await
                .map_err(|e| sent(e.into()))?;
        }
        if message.data.is_empty() {
            piece.clear();
            stuffer.finish(&mut piece);
            self.write_unflushed(&piece, "sending the message")
                .await
                .map_err(|e| sent(e.into()))?;
        }
        self.flush("sending the message")
            .await
            .map_err(|e| sent(e.into()))?;
        let reply = self
            .read_reply("reply to the end of DATA")
            .await
            .map_err(|e| sent(e.into()))?;
        if reply.code != 250 {
            return Err(sent(message_failure(&self.peer, "message data", &reply)));
        }
        let mut final_reply = reply.to_string();
        if !refused.is_empty() {
            final_reply.push_str(&format!("; refused recipients: {}", refused.join("; ")));
        }
        Ok(DeliveryReceipt {
            final_reply: truncate(final_reply),
        })
    }
}

/// A failed transaction, and whether any of the message went out: a reused session that fails
/// before that (the server closed it while idle) is retried at once on a fresh one.
struct Failed {
    error: DeliveryError,
    content_sent: bool,
}

/// 4xx (and anything outside 5xx) → transient; 5xx → permanent.
fn message_failure(peer: &str, step: &str, reply: &Reply) -> DeliveryError {
    let text = truncate(format!("{reply} ({step} at {peer})"));
    if (500..600).contains(&reply.code) {
        DeliveryError::permanent(text)
    } else {
        DeliveryError::transient(text)
    }
}

/// Messages sent over one upstream session before it is closed and a new one opened.
pub const MAX_MESSAGES_PER_SESSION: u32 = 50;
/// How long an authenticated session is kept open without a message (then `QUIT`).
pub const SESSION_IDLE: Duration = Duration::from_secs(30);
/// Idle sessions kept per mailbox.
pub const MAX_IDLE_SESSIONS_PER_MAILBOX: usize = 16;

/// An authenticated session waiting for the next message of its mailbox.
struct IdleSession {
    id: u64,
    conn: SmtpConnection,
    caps: Capabilities,
    /// SHA-256 of the token it authenticated with: only a message with the same token reuses it.
    token: [u8; 32],
    sent: u32,
    since: tokio::time::Instant,
}

/// Idle sessions by mailbox (SASL user name).
#[derive(Default)]
struct SessionPool {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<IdleSession>>>,
    next_id: std::sync::atomic::AtomicU64,
    opened: std::sync::atomic::AtomicU64,
    reused: std::sync::atomic::AtomicU64,
}

impl SessionPool {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<IdleSession>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle session of `user` authenticated with `token`, if one is fresh enough; stale ones
    /// met on the way are closed.
    fn take(&self, user: &str, token: &[u8; 32]) -> Option<IdleSession> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.lock();
            let list = idle.get_mut(user)?;
            let mut found = None;
            while let Some(session) = list.pop() {
                if session.since.elapsed() < SESSION_IDLE && session.token == *token {
                    found = Some(session);
                    break;
                }
                stale.push(session);
            }
            if list.is_empty() {
                idle.remove(user);
            }
            found
        };
        for session in stale {
            close_in_background(session.conn);
        }
        found
    }

    /// Keeps `session` for the next message of `user` (closes it when the pool is full or the
    /// session has sent its share); it is closed after [`SESSION_IDLE`] unused.
    fn put(self: &std::sync::Arc<Self>, user: &str, mut session: IdleSession) {
        if session.sent >= MAX_MESSAGES_PER_SESSION {
            return close_in_background(session.conn);
        }
        session.id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        session.since = tokio::time::Instant::now();
        let id = session.id;
        {
            let mut idle = self.lock();
            let list = idle.entry(user.to_owned()).or_default();
            if list.len() >= MAX_IDLE_SESSIONS_PER_MAILBOX {
                drop(idle);
                return close_in_background(session.conn);
            }
            list.push(session);
        }
        // Closes it when nobody took it in time; the pool may be gone by then.
        let pool = std::sync::Arc::downgrade(self);
        let user = user.to_owned();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(SESSION_IDLE).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let expired = {
                    let mut idle = pool.lock();
                    let Some(list) = idle.get_mut(&user) else {
                        return;
                    };
                    let at = list.iter().position(|s| s.id == id);
                    let expired = at.map(|at| list.remove(at));
                    if list.is_empty() {
                        idle.remove(&user);
                    }
                    expired
                };
                if let Some(session) = expired {
                    quit_quietly(session.conn).await;
                }
            });
        }
    }

    fn drain(&self) -> Vec<IdleSession> {
        self.lock().drain().flat_map(|(_, list)| list).collect()
    }
}

async fn quit_quietly(mut conn: SmtpConnection) {
    conn.set_timeout(conn.timeout.min(QUIT_TIMEOUT));
    let _ = conn.quit().await;
}

/// `QUIT` on a task of its own (best effort; without a runtime the connection is just dropped).
fn close_in_background(conn: SmtpConnection) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(quit_quietly(conn));
    }
}

fn token_fingerprint(credentials: &Credentials) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(credentials.token.expose().as_bytes()).into()
}

/// Submits messages over SMTP with XOAUTH2/OAUTHBEARER.
///
/// Sessions are reused per mailbox: after a message, the authenticated session waits (up to
/// [`SESSION_IDLE`], at most [`MAX_IDLE_SESSIONS_PER_MAILBOX`] per mailbox) for the next message
/// of the same mailbox with the same token, which goes over it after `RSET` — `RSET`, `MAIL` and
/// `RCPT` in one write where the server offers `PIPELINING` — so a queue of scans pays for one
/// connection, TLS handshake and `AUTH` per [`MAX_MESSAGES_PER_SESSION`] messages instead of per
/// message. A reused session that fails before any of the message was sent (the server closed
/// it meanwhile) is replaced by a fresh one at once; a failure after that is the message's, as
/// on a fresh session. A session that failed is never reused. Dropping the delivery (a new
/// configuration) closes its idle sessions with `QUIT`.
///
/// How often a mailbox may send is the worker's business ([`Delivery::messages_per_minute`]).
pub struct SmtpDelivery {
    settings: SmtpSettings,
    pool: std::sync::Arc<SessionPool>,
}

impl fmt::Debug for SmtpDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpDelivery")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for SmtpDelivery {
    fn drop(&mut self) {
        for session in self.pool.drain() {
            close_in_background(session.conn);
        }
    }
}

impl SmtpDelivery {
    /// A delivery to the server `settings` describes.
    pub fn new(settings: SmtpSettings) -> Self {
        Self {
            settings,
            pool: std::sync::Arc::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &SmtpSettings {
        &self.settings
    }

    /// (sessions opened, messages sent over a reused session) since this delivery was made.
    pub fn session_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.pool.opened.load(Relaxed),
            self.pool.reused.load(Relaxed),
        )
    }

    /// Connects and secures the connection (greeting, EHLO, STARTTLS, EHLO): returns it ready
    /// for AUTH, with the capabilities the server announced.
    pub async fn connect(&self) -> Result<(SmtpConnection, Capabilities), SmtpError> {
        let s = &self.settings;
        let endpoint = s.endpoint();
        // Every connection opened here carries a token (AUTH follows): refuse before connecting.
        s.tls
            .check_token_transport("smtp", &s.host, s.port, s.security != Security::None)
            .map_err(SmtpError::CleartextToken)?;
        let tcp =
            match tokio::time::timeout(s.timeout, TcpStream::connect((s.host.as_str(), s.port)))
                .await
            {
                Err(_) => {
                    return Err(SmtpError::Timeout {
                        what: "connecting".to_owned(),
                        peer: endpoint,
                        after: s.timeout,
                    });
                }
                Ok(Err(source)) => return Err(SmtpError::Connect { endpoint, source }),
                Ok(Ok(tcp)) => tcp,
            };
        let _ = tcp.set_nodelay(true);
        let mut conn = match s.security {
            Security::ImplicitTls => {
                let tls = s.tls.connect(&s.host, tcp, s.timeout).await?;
                SmtpConnection::new(tls, endpoint.clone(), s.timeout)
            }
            Security::Starttls | Security::None => {
                SmtpConnection::new(tcp, endpoint.clone(), s.timeout)
            }
        };
        conn.greeting().await?;
        let mut caps = conn.ehlo(&s.helo_name).await?;
        if s.security == Security::Starttls {
            let io = conn.starttls(&caps).await?;
            let tls = s.tls.connect(&s.host, io, s.timeout).await?;
            conn = SmtpConnection::new(tls, endpoint, s.timeout);
            caps = conn.ehlo(&s.helo_name).await?;
        }
        Ok((conn, caps))
    }

    /// A fresh session: connect, secure, authenticate, one transaction.
    async fn send_fresh(
        &self,
        message: OutgoingMessage<'_>,
        credentials: &Credentials,
        token: [u8; 32],
    ) -> Result<DeliveryReceipt, DeliveryError> {
        let s = &self.settings;
        let (mut conn, caps) = self.connect().await?;
        self.pool
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = conn
            .authenticate(&caps, &s.mechanisms, credentials, &s.host, s.port)
            .await
        {
            quit_quietly(conn).await;
            return Err(e.into());
        }
        match conn.transaction(&caps, message, false).await {
            Ok(receipt) => {
                self.pool.put(
                    &credentials.username,
                    IdleSession {
                        id: 0,
                        conn,
                        caps,
                        token,
                        sent: 1,
                        since: tokio::time::Instant::now(),
                    },
                );
                Ok(receipt)
            }
            Err(failed) => {
                quit_quietly(conn).await;
                Err(failed.error)
            }
        }
    }
}

#[async_trait::async_trait]
impl Delivery for SmtpDelivery {
    async fn send(
        &self,
        message: OutgoingMessage<'_>,
        credentials: &Credentials,
    ) -> Result<DeliveryReceipt, DeliveryError> {
        let token = token_fingerprint(credentials);
        let result = match self.pool.take(&credentials.username, &token) {
            Some(mut session) => match session.conn.transaction(&session.caps, message, true).await
            {
                Ok(receipt) => {
                    self.pool
                        .reused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    session.sent += 1;
                    self.pool.put(&credentials.username, session);
                    Ok(receipt)
                }
                Err(failed)
                    if !failed.content_sent && failed.error.kind == FailureKind::Transient =>
                {
                    // Closed while idle (or refused the reset): nothing of the message went
                    // out, so it goes over a fresh session now.
                    tracing::debug!(upstream = %self.settings.endpoint(), reply = %failed.error.final_reply, "reused SMTP session failed before the message; opening a fresh one");
                    drop(session);
                    self.send_fresh(message, credentials, token).await
                }
                Err(failed) => {
                    quit_quietly(session.conn).await;
                    Err(failed.error)
                }
            },
            None => self.send_fresh(message, credentials, token).await,
        };
        if let Err(e) = &result {
            tracing::debug!(
                upstream = %self.settings.endpoint(),
                kind = ?e.kind,
                reply = %e.final_reply,
                "SMTP delivery failed"
            );
        }
        result
    }

    fn messages_per_minute(&self) -> Option<u32> {
        self.settings.messages_per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply {
            code,
            lines: lines.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn reply_lines_parse_and_hostile_ones_are_refused() {
        assert_eq!(
            parse_reply_line(b"250-SIZE 100"),
            Ok((250, false, "SIZE 100".to_owned()))
        );
        assert_eq!(
            parse_reply_line(b"250 OK"),
            Ok((250, true, "OK".to_owned()))
        );
        assert_eq!(parse_reply_line(b"334"), Ok((334, true, String::new())));
        assert_eq!(
            parse_reply_line(b"220 a\x1b[31mb\xff"),
            Ok((220, true, "a?[31mb\u{fffd}".to_owned()))
        );
        for bad in [
            &b""[..],
            b"25",
            b"abc hello",
            b"2x0 ok",
            b"650 too high",
            b"099 too low",
            b"250xOK",
            b"\xff\xfe\xfd",
        ] {
            assert!(parse_reply_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(
            reply(535, &["5.7.139 Authentication unsuccessful"]).enhanced_code(),
            Some("5.7.139")
        );
        assert_eq!(reply(535, &["5.7.3 x"]).enhanced_code(), Some("5.7.3"));
        assert_eq!(reply(535, &["Authentication failed"]).enhanced_code(), None);
        assert_eq!(reply(535, &["5.7.1234 x"]).enhanced_code(), None);
        assert_eq!(reply(535, &[]).enhanced_code(), None);
    }

    #[test]
    fn auth_failures_are_classified() {
        let k = |r: Reply| auth_failure_kind(&r);
        assert_eq!(
            k(reply(
                535,
                &[
                    "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
                ]
            )),
            FailureKind::Transient
        );
        assert_eq!(
            k(reply(535, &["5.7.3 Authentication unsuccessful"])),
            FailureKind::AuthRejected
        );
        assert_eq!(
            k(reply(535, &["Authentication failed"])),
            FailureKind::AuthRejected
        );
        assert_eq!(k(reply(454, &["4.7.0 try later"])), FailureKind::Transient);
        assert_eq!(k(reply(504, &["5.5.4 unknown"])), FailureKind::Transient);
    }

    #[test]
    fn capabilities_parse() {
        let caps = Capabilities::parse(&reply(
            250,
            &[
                "mx.example",
                "SIZE 35882577",
                "8BITMIME",
                "AUTH LOGIN xoauth2",
                "AUTH=PLAIN",
                "STARTTLS",
            ],
        ));
        assert_eq!(caps.size, Some(35882577));
        assert!(caps.eight_bit_mime && caps.starttls);
        assert_eq!(caps.auth, vec!["LOGIN", "XOAUTH2", "PLAIN"]);
        assert!(caps.offers(Mechanism::XOAuth2));
        assert!(!caps.offers(Mechanism::OAuthBearer));
        let none = Capabilities::parse(&reply(250, &["only-name"]));
        assert_eq!(none.auth_list(), "none");
        assert_eq!(none.size, None);
    }

    #[test]
    fn dot_stuffing_in_pieces_is_the_same_as_at_once() {
        let samples: [&[u8]; 6] = [
            b"a\r\n.b\r\n..c\n.\nlast",
            b".\r\n",
            b"x\r\r\n\n\n.y\rz\n",
            b"a long line without any end at all, longer than one word",
            b"\n",
            b"0123456789abcdef\n.0123456789abcdef\r\n0123456789abcdefg",
        ];
        for raw in samples {
            let whole = dot_stuff(raw);
            for cut in 0..=raw.len() {
                for cut2 in cut..=raw.len() {
                    let mut out = Vec::new();
                    let mut s = DotStuffer::new();
                    s.push(&raw[..cut], &mut out);
                    s.push(&raw[cut..cut2], &mut out);
                    s.push(&raw[cut2..], &mut out);
                    s.finish(&mut out);
                    assert_eq!(out, whole, "{raw:?} cut at {cut}, {cut2}");
                }
            }
            let naive_bare_lf = raw
                .iter()
                .enumerate()
                .filter(|(i, b)| **b == b'\n' && (*i == 0 || raw[i - 1] != b'\r'))
                .count();
            let unterminated = if !raw.is_empty() && !raw.ends_with(b"\n") {
                2
            } else {
                0
            };
            assert_eq!(
                message_size(raw),
                (raw.len() + naive_bare_lf + unterminated) as u64
            );
        }
        assert!(!has_eight_bit(b"plain ascii"));
        assert!(has_eight_bit("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn dot_stuffing_and_crlf() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".\nx\n"), b"..\r\nx\r\n.\r\n");
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(message_size(b"a\nb"), 6);
        assert_eq!(message_size(b"a\r\n"), 3);
    }

    #[test]
    fn reply_display_is_bounded() {
        let long = "x".repeat(5000);
        let shown = reply(250, &[&long]).to_string();
        assert!(shown.len() <= MAX_REPORTED + 4);
    }

    /// A fake server that sends `script` and then reads forever.
    async fn scripted(script: Vec<u8>) -> SmtpConnection {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = server.write_all(&script).await;
            let mut sink = vec![0u8; 4096];
            while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        SmtpConnection::new(client, "test:25", Duration::from_secs(5))
    }

    #[tokio::test]
    async fn hostile_replies_do_not_panic_or_grow() {
        let mut c = scripted(vec![b'2'; 100_000]).await;
        let e = c.read_reply("greeting").await.err().map(|e| e.to_string());
        assert!(
            e.unwrap_or_default().contains("longer than 8192"),
            "overlong line"
        );

        let mut many = Vec::new();
        for _ in 0..1000 {
            many.extend_from_slice(b"250-x\r\n");
        }
        let mut c = scripted(many).await;
        let e = c.read_reply("EHLO").await.err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("256 lines"));

        let mut c = scripted(b"250-a\r\n251 b\r\n".to_vec()).await;
        assert!(c.read_reply("x").await.is_err());

        let mut c = scripted(b"hello\r\n".to_vec()).await;
        let e = c.read_reply("greeting").await.err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("not an SMTP reply line"));

        let mut c = scripted(b"220 ok\r\n".to_vec()).await;
        assert_eq!(c.greeting().await.ok().map(|r| r.code), Some(220));
        // The script is exhausted; the next read times out or sees the end, never panics.
        c.set_timeout(Duration::from_millis(50));
        assert!(c.read_reply("more").await.is_err());
    }

    #[tokio::test]
    async fn starttls_refuses_injected_data() {
        let caps = Capabilities {
            starttls: true,
            ..Capabilities::default()
        };
        let c = scripted(b"220 go ahead\r\n250 injected\r\n".to_vec()).await;
        let err = c.starttls(&caps).await.err().map(|e| e.to_string());
        assert!(
            err.unwrap_or_default()
                .contains("data arrived after the STARTTLS reply")
        );
        let c = scripted(Vec::new()).await;
        let err = c
            .starttls(&Capabilities::default())
            .await
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("does not offer STARTTLS"));
    }
}
