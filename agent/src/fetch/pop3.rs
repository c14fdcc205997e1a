//! The POP3 fetch client (RFC 1939, RFC 2449 `CAPA`, RFC 2595 `STLS`, RFC 5034 `AUTH`).
//!
//! Authentication is always the two-step form Exchange Online requires: `AUTH XOAUTH2`, wait for
//! the `+` continuation, then the base64 payload on its own line (the one-line form with an
//! initial response gets `-ERR Protocol error` there). On a bad token the server sends
//! `+ <base64 JSON>`; the client answers with an empty line and reports the JSON and the final
//! `-ERR`.
//!
//! A run: `UIDL` and `LIST`, then per message either "already in the maildrop" (no download) or
//! `RETR` → [`Maildrop::store`] (fsynced) → `DELE`, and finally `QUIT`, which is when the server
//! commits the deletions. A crash before `QUIT` keeps every message upstream; the maildrop's
//! memory of upstream ids prevents a duplicate on the next run.
//!
//! Replies and multi-line bodies are parsed by [`crate::wire::pop3`] (sans-IO); this file is the
//! session — what to send, when, and what each answer means — hand-driven because the two-step
//! `AUTH XOAUTH2` and the answer to the error challenge are what Exchange Online requires and no
//! POP3 client crate does.

use std::collections::HashMap;

use super::{
    Conn, ErrorChallenge, FetchError, FetchReport, FetchSettings, Security, already_stored, store,
};
use crate::maildrop::{Maildrop, StoreOutcome};
use crate::sasl;
use crate::upstream::{Credentials, FailureKind};
use crate::wire::pop3;

/// Longest line accepted from the server: generous for message lines (RFC 5322 allows 998
/// characters; real mail sometimes has more), bounded all the same.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// A POP3 client session.
pub struct Pop3Client {
    conn: Conn,
    greeting: String,
    capabilities: Vec<String>,
}

impl std::fmt::Debug for Pop3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Client")
            .field("greeting", &self.greeting)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

/// Classifies a `-ERR` reply: RFC 3206 `[IN-USE]` and `[SYS/TEMP]` (and `[LOGIN-DELAY]`) are
/// transient, the rest permanent.
fn err_reply(what: &str, reply: &str) -> FetchError {
    let text = format!("{what}: {reply}");
    if pop3::is_transient_err(reply) {
        FetchError::transient(text)
    } else {
        FetchError::permanent(text)
    }
}

/// A `+` continuation (`+`, `+ `, `+ <text>`) but not `+OK`: returns the text after it.
fn continuation(line: &str) -> Option<&str> {
    match pop3::Reply::parse(line) {
        pop3::Reply::Continuation(text) => Some(text),
        _ => None,
    }
}

impl Pop3Client {
    /// Connects as `settings` say: TCP, TLS (implicit, or `STLS` after the greeting), the
    /// greeting and `CAPA` (again after `STLS`).
    pub async fn connect(settings: &FetchSettings) -> Result<Self, FetchError> {
        let conn = Conn::connect(settings, MAX_LINE).await?;
        let mut client = Self::greet(conn).await?;
        client.capa().await?;
        if settings.security == Security::Starttls {
            client = client.stls(settings).await?;
            client.capa().await?;
        }
        Ok(client)
    }

    /// Reads the greeting on a fresh connection.
    pub(crate) async fn greet(mut conn: Conn) -> Result<Self, FetchError> {
        let greeting = conn.text_line().await?;
        if !greeting.starts_with("+OK") {
            return Err(err_reply("POP3 greeting", &greeting));
        }
        Ok(Self {
            conn,
            greeting,
            capabilities: Vec::new(),
        })
    }

    /// A session continuing on `conn` after `STLS` and the handshake (no new greeting).
    pub(crate) fn resume(conn: Conn, greeting: String) -> Self {
        Self {
            conn,
            greeting,
            capabilities: Vec::new(),
        }
    }

    /// Changes the reply timeout.
    pub(crate) fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.conn.set_timeout(timeout);
    }

    /// The server's greeting line.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The `CAPA` lines (empty if the server has no `CAPA`).
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// Whether `CAPA` listed `name` (first word, case-insensitive).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| {
            c.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(name))
        })
    }

    /// Sends `CAPA` and records the answer; a server without `CAPA` (`-ERR`) has none.
    pub async fn capa(&mut self) -> Result<(), FetchError> {
        self.conn.send("CAPA").await?;
        let reply = self.conn.text_line().await?;
        if !reply.starts_with("+OK") {
            self.capabilities.clear();
            return Ok(());
        }
        let body = self.multiline(usize::MAX, None).await?;
        self.capabilities = pop3::body_lines(&body);
        Ok(())
    }

    /// Sends `STLS` and checks the `+OK`; the caller runs the handshake.
    pub(crate) async fn stls_command(&mut self, endpoint: &str) -> Result<String, FetchError> {
        self.conn.send("STLS").await?;
        let reply = self.conn.text_line().await?;
        if reply.starts_with("+OK") {
            Ok(reply)
        } else {
            Err(FetchError::permanent(format!(
                "{endpoint} refused STLS: {reply}"
            )))
        }
    }

    /// The connection, for a handshake after [`Pop3Client::stls_command`].
    pub(crate) fn into_conn(self) -> Conn {
        self.conn
    }

    /// `STLS` and the TLS handshake.
    pub async fn stls(mut self, settings: &FetchSettings) -> Result<Self, FetchError> {
        self.stls_command(&settings.endpoint()).await?;
        let conn = self.conn.start_tls(&settings.tls).await?;
        Ok(Self { conn, ..self })
    }

    /// `AUTH XOAUTH2`, `+`, payload on its own line. Returns the server's `+OK` line.
    pub async fn authenticate(&mut self, credentials: &Credentials) -> Result<String, FetchError> {
        self.conn.send("AUTH XOAUTH2").await?;
        let reply = self.conn.text_line().await?;
        if continuation(&reply).is_none() {
            return Err(FetchError::permanent(format!(
                "server refused AUTH XOAUTH2: {reply}"
            )));
        }
        let payload = sasl::xoauth2_payload(&credentials.username, &credentials.token);
        self.conn.send(payload.expose()).await?;
        drop(payload);
        let reply = self.conn.text_line().await?;
        if reply.starts_with("+OK") {
            return Ok(reply);
        }
        if let Some(challenge) = continuation(&reply) {
            let challenge = ErrorChallenge::parse(challenge);
            self.conn.answer_challenge().await?;
            let last = self.conn.text_line().await?;
            let (text, json) = challenge.rejection("AUTH XOAUTH2", &last);
            return Err(FetchError::auth_rejected(text, json));
        }
        Err(FetchError::auth_rejected(
            format!("AUTH XOAUTH2: {reply}"),
            None,
        ))
    }

    /// Sends `command`, expects `+OK` and returns the non-empty lines of the multi-line
    /// listing that follows (`UIDL`, `LIST`).
    async fn listing(&mut self, command: &str) -> Result<Vec<String>, FetchError> {
        self.ok(command).await?;
        let body = self.multiline(64 * 1024 * 1024, None).await?;
        Ok(pop3::body_lines(&body))
    }

    async fn ok(&mut self, command: &str) -> Result<String, FetchError> {
        self.conn.send(command).await?;
        let reply = self.conn.text_line().await?;
        if reply.starts_with("+OK") {
            Ok(reply)
        } else {
            let verb = command.split_whitespace().next().unwrap_or(command);
            Err(err_reply(verb, &reply))
        }
    }

    /// Reads a multi-line body up to the `.` line, dot-unstuffed, CRLF line ends. More than
    /// `max` bytes is an error.
    async fn multiline(
        &mut self,
        max: usize,
        timeout: Option<std::time::Duration>,
    ) -> Result<Vec<u8>, FetchError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut receiver = pop3::MultilineReceiver::new(max);
        loop {
            let line = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(tokio::time::Instant::now());
                    self.conn.line_within(left).await?
                }
                None => self.conn.line().await?,
            };
            if let Some(body) = receiver.line(&line).map_err(FetchError::permanent)? {
                return Ok(body);
            }
        }
    }

    /// `STAT`: message count and total size.
    pub async fn stat(&mut self) -> Result<(usize, u64), FetchError> {
        let reply = self.ok("STAT").await?;
        let mut f = reply.split_whitespace().skip(1);
        match (
            f.next().and_then(|n| n.parse().ok()),
            f.next().and_then(|n| n.parse().ok()),
        ) {
            (Some(n), Some(size)) => Ok((n, size)),
            _ => Err(FetchError::permanent(format!(
                "malformed STAT reply: {reply}"
            ))),
        }
    }

    /// `UIDL`: message number → unique id.
    pub async fn uidl(&mut self) -> Result<Vec<(u32, String)>, FetchError> {
        let mut out = Vec::new();
        for line in self.listing("UIDL").await? {
            let mut f = line.split_whitespace();
            match (f.next().and_then(|n| n.parse().ok()), f.next()) {
                (Some(n), Some(uid)) if f.next().is_none() => out.push((n, uid.to_owned())),
                _ => {
                    return Err(FetchError::permanent(format!(
                        "malformed UIDL line {line:?}"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// `LIST`: message number → size.
    pub async fn list(&mut self) -> Result<HashMap<u32, u64>, FetchError> {
        let mut out = HashMap::new();
        for line in self.listing("LIST").await? {
            let mut f = line.split_whitespace();
            match (
                f.next().and_then(|n| n.parse().ok()),
                f.next().and_then(|n| n.parse().ok()),
            ) {
                (Some(n), Some(size)) => {
                    out.insert(n, size);
                }
                _ => {
                    return Err(FetchError::permanent(format!(
                        "malformed LIST line {line:?}"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// `RETR n`: the message, dot-unstuffed, at most `max` bytes, within `timeout`.
    pub async fn retr(
        &mut self,
        n: u32,
        max: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>, FetchError> {
        self.ok(&format!("RETR {n}")).await?;
        self.multiline(max, Some(timeout)).await
    }

    /// `DELE n` (committed at `QUIT`).
    pub async fn dele(&mut self, n: u32) -> Result<(), FetchError> {
        self.ok(&format!("DELE {n}")).await.map(|_| ())
    }

    /// `QUIT`: the server commits deletions and answers `+OK`.
    pub async fn quit(mut self) -> Result<String, FetchError> {
        self.ok("QUIT").await
    }
}

/// One POP3 fetch run (see the module docs).
pub(crate) async fn fetch(
    settings: &FetchSettings,
    credentials: &Credentials,
    maildrop: &Maildrop,
    device: &str,
) -> Result<FetchReport, FetchError> {
    let mut client = Pop3Client::connect(settings).await?;
    if let Err(e) = client.authenticate(credentials).await {
        if e.kind == FailureKind::AuthRejected {
            // The connection is fine, only the token was refused: say goodbye properly.
            let _ = client.quit().await;
        }
        return Err(e);
    }
    let mut report = FetchReport::default();
    let mut deleted = 0usize;
    let run = run(
        settings,
        credentials,
        maildrop,
        device,
        &mut client,
        &mut report,
        &mut deleted,
    )
    .await;
    match run {
        Ok(()) => {
            client.quit().await.map_err(|e| e.with_partial(report))?;
            report.deleted_upstream = deleted;
            Ok(report)
        }
        Err(e) => {
            // Whatever was marked for deletion is stored locally: committing it is safe.
            if client.quit().await.is_ok() {
                report.deleted_upstream = deleted;
            }
            Err(e.with_partial(report))
        }
    }
}

async fn run(
    settings: &FetchSettings,
    credentials: &Credentials,
    maildrop: &Maildrop,
    device: &str,
    client: &mut Pop3Client,
    report: &mut FetchReport,
    deleted: &mut usize,
) -> Result<(), FetchError> {
    let uidls = client.uidl().await?;
    let sizes = client.list().await?;
    for (n, uidl) in uidls {
        if report.fetched >= settings.max_messages {
            break;
        }
        let upstream_id = format!("pop3 {} {uidl}", credentials.username);
        let duplicate = if already_stored(maildrop, device, &upstream_id).await? {
            true
        } else {
            let size = sizes.get(&n).copied().unwrap_or(0);
            if size > settings.max_message_size as u64 {
                report.skipped_too_large += 1;
                tracing::warn!(
                    device,
                    number = n,
                    size,
                    "upstream message above max_message_size left on the server"
                );
                continue;
            }
            // LIST sizes count CRLF line ends; allow a little slack for servers that count LF.
            let limit = settings
                .max_message_size
                .saturating_add(settings.max_message_size / 8 + 1024);
            let bytes = client.retr(n, limit, settings.message_timeout).await?;
            let len = bytes.len() as u64;
            match store(maildrop, device, &upstream_id, bytes).await? {
                StoreOutcome::Stored(id) => {
                    tracing::debug!(device, number = n, maildrop_id = %id, "stored fetched message");
                    report.fetched += 1;
                    report.bytes += len;
                    false
                }
                StoreOutcome::Duplicate => true,
            }
        };
        if duplicate {
            report.skipped_duplicates += 1;
        }
        if !settings.keep_upstream {
            client.dele(n).await?;
            *deleted += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_are_told_from_ok() {
        assert_eq!(continuation("+"), Some(""));
        assert_eq!(continuation("+ "), Some(""));
        assert_eq!(continuation("+ eyJ9"), Some("eyJ9"));
        assert_eq!(continuation("+OK done"), None);
        assert_eq!(continuation("-ERR no"), None);
    }

    #[test]
    fn err_replies_are_classified() {
        use crate::upstream::FailureKind;
        assert_eq!(
            err_reply("x", "-ERR [IN-USE] locked").kind,
            FailureKind::Transient
        );
        assert_eq!(
            err_reply("x", "-ERR [SYS/TEMP] later").kind,
            FailureKind::Transient
        );
        assert_eq!(
            err_reply("x", "-ERR no such message").kind,
            FailureKind::Permanent
        );
    }
}
