//! The IMAP fetch client (RFC 3501, RFC 4959 SASL-IR, RFC 4315 UIDPLUS, XOAUTH2).
//!
//! A small hand-written client rather than a crate: the agent needs eight commands, control over
//! the SASL exchange (answering the XOAUTH2 error challenge with an empty line and keeping the
//! server's JSON, which the async IMAP crates do not expose), rustls through the agent's own
//! [`TlsSettings`](crate::upstream::tls::TlsSettings), and hard bounds on line and literal sizes.
//! The response grammar is [`crate::wire::imap`] (sans-IO): this client reads what it asks for —
//! a line, a literal of `n` bytes, or `n` bytes to discard when a literal is over the
//! configured size, so memory stays bounded. Anything malformed is an error, never a panic.
//!
//! A run: `CAPABILITY`, `AUTHENTICATE XOAUTH2` (with the initial response when the server offers
//! `SASL-IR`, otherwise after the `+`), `SELECT` the folder (default `INBOX`, recording
//! `UIDVALIDITY`), `UID SEARCH ALL`, then per UID not yet in the maildrop: `UID FETCH uid
//! (RFC822.SIZE)` (too large: left upstream, not downloaded), `UID FETCH uid BODY.PEEK[]` →
//! [`Maildrop::store`] (fsynced) → `UID STORE uid +FLAGS.SILENT (\Deleted)`; finally
//! `UID EXPUNGE` (with UIDPLUS; plain `EXPUNGE` otherwise) and `LOGOUT`. `SEARCH ALL` rather
//! than `UNSEEN`: the mailbox belongs to the device, and a message someone opened in webmail
//! must still reach it; what was already stored is recognised by its upstream id
//! (`imap <user> <folder> <UIDVALIDITY> <UID>`), not by flags. With `keep_upstream` the message
//! is flagged `\Seen` instead of deleted and stays upstream.
//!
//! Folder names are configured as plain Unicode (`Gescannte Dokumente/Büro`) and sent in IMAP's
//! modified UTF-7 ([`mailbox_name`], RFC 3501 §5.1.3), which Exchange Online, Gmail and Dovecot
//! all understand.

use super::{
    Conn, ErrorChallenge, FetchError, FetchReport, FetchSettings, Security, already_stored, store,
};
use crate::maildrop::{Maildrop, StoreOutcome};
use crate::sasl;
use crate::upstream::{Credentials, FailureKind};
use crate::wire::imap::{
    Body, Need, Part, Response, ResponseAssembler, Status, Step, capability_words, fetch_body,
    uidvalidity,
};
#[cfg(test)]
use crate::wire::imap::{literal_size, parse_tagged};

/// Longest response line (a `SEARCH` result for a large mailbox is long).
pub(crate) const MAX_LINE: usize = 4 * 1024 * 1024;
/// `folder` in IMAP's modified UTF-7 (RFC 3501 §5.1.3): printable ASCII stands for itself
/// except `&`, which becomes `&-`; every run of other characters becomes `&`, the base64 of its
/// UTF-16BE with `,` for `/` and no padding, and `-`. Control characters are refused.
pub fn mailbox_name(folder: &str) -> Result<String, FetchError> {
    use base64::Engine as _;
    const MUTF7: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::IMAP_MUTF7,
        base64::engine::general_purpose::NO_PAD,
    );
    if let Some(c) = folder.chars().find(|c| c.is_control()) {
        return Err(FetchError::permanent(format!(
            "IMAP folder {folder:?} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    let mut out = String::with_capacity(folder.len());
    let mut run: Vec<u8> = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut String| {
        if !run.is_empty() {
            out.push('&');
            out.push_str(&MUTF7.encode(&run));
            out.push('-');
            run.clear();
        }
    };
    for c in folder.chars() {
        if c.is_ascii() {
            flush(&mut run, &mut out);
            out.push(c);
            if c == '&' {
                out.push('-');
            }
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                run.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
    flush(&mut run, &mut out);
    Ok(out)
}

/// Quotes `text` as an IMAP quoted string (only printable ASCII is accepted).
fn quoted(text: &str) -> Result<String, FetchError> {
    if text.is_empty() || !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(FetchError::permanent(format!(
            "IMAP folder {text:?} must be non-empty printable ASCII"
        )));
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// An IMAP client session.
pub struct ImapClient {
    conn: Conn,
    next_tag: u32,
    greeting: String,
    capabilities: Vec<String>,
    max_literal: usize,
    literal_timeout: std::time::Duration,
    uidvalidity: Option<u32>,
    exists: Option<u32>,
}

impl std::fmt::Debug for ImapClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapClient")
            .field("greeting", &self.greeting)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

impl ImapClient {
    /// Connects as `settings` say: TCP, TLS (implicit, or `STARTTLS` after the greeting), the
    /// greeting and `CAPABILITY` (again after `STARTTLS`).
    pub async fn connect(settings: &FetchSettings) -> Result<Self, FetchError> {
        let conn = Conn::connect(settings, MAX_LINE).await?;
        let mut client = Self::greet(conn, settings).await?;
        if settings.security == Security::Starttls {
            client.capability().await?;
            client = client.starttls(settings).await?;
        }
        client.capability().await?;
        Ok(client)
    }

    /// Reads the greeting on a fresh connection.
    pub(crate) async fn greet(conn: Conn, settings: &FetchSettings) -> Result<Self, FetchError> {
        let mut client = Self {
            conn,
            next_tag: 1,
            greeting: String::new(),
            capabilities: Vec::new(),
            max_literal: settings.max_message_size,
            literal_timeout: settings.message_timeout,
            uidvalidity: None,
            exists: None,
        };
        let greeting = client.conn.text_line().await?;
        let upper = greeting.to_ascii_uppercase();
        if !(upper.starts_with("* OK") || upper.starts_with("* PREAUTH")) {
            return Err(FetchError::transient(format!("IMAP greeting: {greeting}")));
        }
        if let Some(caps) = capability_words(&greeting) {
            client.capabilities = caps;
        }
        client.greeting = greeting;
        Ok(client)
    }

    /// A session continuing on `conn` after `STARTTLS` and the handshake (no new greeting;
    /// capabilities from before TLS are forgotten).
    pub(crate) fn resume(
        conn: Conn,
        settings: &FetchSettings,
        greeting: String,
        next_tag: u32,
    ) -> Self {
        Self {
            conn,
            next_tag,
            greeting,
            capabilities: Vec::new(),
            max_literal: settings.max_message_size,
            literal_timeout: settings.message_timeout,
            uidvalidity: None,
            exists: None,
        }
    }

    /// The next command tag number (to continue a session after STARTTLS).
    pub(crate) fn next_tag(&self) -> u32 {
        self.next_tag
    }

    /// Changes the reply timeout.
    pub(crate) fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.conn.set_timeout(timeout);
    }

    /// The server's greeting line.
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The capabilities, upper-cased.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// Whether the server announced `name` (case-insensitive).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
    }

    /// `UIDVALIDITY` of the selected folder.
    pub fn uidvalidity(&self) -> Option<u32> {
        self.uidvalidity
    }

    /// Messages in the selected folder (`EXISTS`).
    pub fn exists(&self) -> Option<u32> {
        self.exists
    }

    fn tag(&mut self) -> String {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    /// Reads one response, with its literals: the socket side of [`ResponseAssembler`].
    pub(crate) async fn response(&mut self) -> Result<Response, FetchError> {
        let mut assembler = ResponseAssembler::new(self.max_literal);
        let mut step = assembler
            .line(self.conn.line().await?)
            .map_err(FetchError::permanent)?;
        loop {
            step = match step {
                Step::Done(response) => return Ok(response),
                Step::Need(Need::Line) => assembler
                    .line(self.conn.line().await?)
                    .map_err(FetchError::permanent)?,
                Step::Need(Need::Literal(n)) => {
                    assembler.literal(self.conn.exact(n, self.literal_timeout).await?)
                }
                Step::Need(Need::Discard(n)) => {
                    self.conn.discard(n, self.literal_timeout).await?;
                    assembler.discarded(n)
                }
            };
        }
    }

    /// Sends `command` and collects untagged responses until its tagged reply; `NO`/`BAD` are
    /// errors.
    async fn command(&mut self, command: &str) -> Result<(Vec<Vec<Part>>, String), FetchError> {
        let tag = self.tag();
        self.conn.send(&format!("{tag} {command}")).await?;
        let mut untagged = Vec::new();
        loop {
            match self.response().await? {
                Response::Untagged(parts) => {
                    self.note_untagged(&parts);
                    untagged.push(parts);
                }
                Response::Continuation(text) => {
                    return Err(FetchError::permanent(format!(
                        "unexpected continuation {text:?} after {}",
                        verb(command)
                    )));
                }
                Response::Tagged {
                    tag: t,
                    status,
                    line,
                } if t == tag => {
                    return match status {
                        Status::Ok => Ok((untagged, line)),
                        Status::No if line.to_ascii_uppercase().contains("[UNAVAILABLE]") => {
                            Err(FetchError::transient(format!("{}: {line}", verb(command))))
                        }
                        _ => Err(FetchError::permanent(format!("{}: {line}", verb(command)))),
                    };
                }
                Response::Tagged { line, .. } => {
                    return Err(FetchError::permanent(format!(
                        "IMAP reply with an unknown tag: {line}"
                    )));
                }
            }
        }
    }

    fn note_untagged(&mut self, parts: &[Part]) {
        let Some(Part::Text(first)) = parts.first() else {
            return;
        };
        let text = String::from_utf8_lossy(first);
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("* CAPABILITY ") || upper.starts_with("* OK [CAPABILITY ") {
            if let Some(caps) = capability_words(&text) {
                self.capabilities = caps;
            }
        } else if let Some(v) = uidvalidity(&text) {
            self.uidvalidity = Some(v);
        } else if upper.ends_with(" EXISTS") {
            self.exists = text.split(' ').nth(1).and_then(|n| n.parse().ok());
        }
    }

    /// `CAPABILITY`.
    pub async fn capability(&mut self) -> Result<(), FetchError> {
        self.command("CAPABILITY").await.map(|_| ())
    }

    /// Sends `STARTTLS` (refusing when not offered); the caller runs the handshake.
    pub(crate) async fn starttls_command(&mut self, endpoint: &str) -> Result<String, FetchError> {
        if !self.has_capability("STARTTLS") {
            return Err(FetchError::permanent(format!(
                "{endpoint} does not offer STARTTLS"
            )));
        }
        self.command("STARTTLS").await.map(|(_, line)| line)
    }

    /// The connection, for a handshake after [`ImapClient::starttls_command`].
    pub(crate) fn into_conn(self) -> Conn {
        self.conn
    }

    /// `STARTTLS` and the TLS handshake.
    pub async fn starttls(mut self, settings: &FetchSettings) -> Result<Self, FetchError> {
        self.starttls_command(&settings.endpoint()).await?;
        let conn = self.conn.start_tls(&settings.tls).await?;
        Ok(Self {
            conn,
            // Capabilities from before TLS must not be trusted (RFC 3501 §6.2.1).
            capabilities: Vec::new(),
            uidvalidity: None,
            exists: None,
            ..self
        })
    }

    /// `AUTHENTICATE XOAUTH2`: with the payload on the command line when the server offers
    /// SASL-IR, else after the `+`. On an error challenge answers with an empty line and reports
    /// the JSON and the tagged `NO`. Returns the tagged `OK` line.
    pub async fn authenticate(&mut self, credentials: &Credentials) -> Result<String, FetchError> {
        let tag = self.tag();
        let payload = sasl::xoauth2_payload(&credentials.username, &credentials.token);
        let mut sent = self.has_capability("SASL-IR");
        if sent {
            self.conn
                .send(&format!("{tag} AUTHENTICATE XOAUTH2 {}", payload.expose()))
                .await?;
        } else {
            self.conn
                .send(&format!("{tag} AUTHENTICATE XOAUTH2"))
                .await?;
        }
        let mut challenge: Option<ErrorChallenge> = None;
        loop {
            match self.response().await? {
                Response::Continuation(text) => {
                    if !sent {
                        self.conn.send(payload.expose()).await?;
                        sent = true;
                    } else if challenge.is_none() {
                        challenge = Some(ErrorChallenge::parse(&text));
                        self.conn.answer_challenge().await?;
                    } else {
                        // A second challenge: cancel the exchange (RFC 3501 §6.2.2).
                        self.conn.send("*").await?;
                    }
                }
                Response::Untagged(parts) => self.note_untagged(&parts),
                Response::Tagged {
                    tag: t,
                    status,
                    line,
                } if t == tag => {
                    if status == Status::Ok {
                        if let Some(caps) = capability_words(&line) {
                            self.capabilities = caps;
                        } else {
                            self.capability().await?;
                        }
                        return Ok(line);
                    }
                    let (text, json) = challenge
                        .unwrap_or_default()
                        .rejection("AUTHENTICATE XOAUTH2", &line);
                    return if status == Status::Bad || !sent {
                        Err(FetchError::permanent(text))
                    } else {
                        Err(FetchError::auth_rejected(text, json))
                    };
                }
                Response::Tagged { line, .. } => {
                    return Err(FetchError::permanent(format!(
                        "IMAP reply with an unknown tag: {line}"
                    )));
                }
            }
        }
    }

    /// `SELECT folder` (`folder` as Unicode; sent as [`mailbox_name`]); records `UIDVALIDITY`
    /// and `EXISTS`.
    pub async fn select(&mut self, folder: &str) -> Result<String, FetchError> {
        self.uidvalidity = None;
        self.exists = None;
        let command = format!("SELECT {}", quoted(&mailbox_name(folder)?)?);
        self.command(&command).await.map(|(_, line)| line)
    }

    /// `UID FETCH uid (RFC822.SIZE)`: the message's size, `None` when it is gone.
    pub async fn size(&mut self, uid: u32) -> Result<Option<u64>, FetchError> {
        let (untagged, _) = self
            .command(&format!("UID FETCH {uid} (RFC822.SIZE)"))
            .await?;
        for parts in &untagged {
            let Some(Part::Text(first)) = parts.first() else {
                continue;
            };
            let text = String::from_utf8_lossy(first).to_ascii_uppercase();
            if fetch_body(parts).is_some_and(|(u, _)| u == Some(uid)) {
                let mut words = text.split([' ', '(', ')']);
                while let Some(w) = words.next() {
                    if w == "RFC822.SIZE" {
                        return match words.next().and_then(|n| n.parse().ok()) {
                            Some(size) => Ok(Some(size)),
                            None => Err(FetchError::permanent(format!(
                                "malformed FETCH RFC822.SIZE response {text:?}"
                            ))),
                        };
                    }
                }
            }
        }
        Ok(None)
    }

    /// `UID SEARCH ALL`: every UID in the selected folder, ascending.
    pub async fn search_all(&mut self) -> Result<Vec<u32>, FetchError> {
        let (untagged, _) = self.command("UID SEARCH ALL").await?;
        let mut uids = Vec::new();
        for parts in untagged {
            let Some(Part::Text(first)) = parts.first() else {
                continue;
            };
            let text = String::from_utf8_lossy(first);
            let mut words = text.split(' ');
            if words.next() != Some("*")
                || !words
                    .next()
                    .is_some_and(|w| w.eq_ignore_ascii_case("SEARCH"))
            {
                continue;
            }
            for w in words.filter(|w| !w.is_empty()) {
                match w.parse::<u32>() {
                    Ok(uid) => uids.push(uid),
                    Err(_) => {
                        return Err(FetchError::permanent(format!(
                            "malformed SEARCH response {text:?}"
                        )));
                    }
                }
            }
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// `UID FETCH uid BODY.PEEK[]`: `Ok(None)` when the message is gone, `Err(size)` inside
    /// `Ok(Some(..))` when it is above the size limit.
    pub async fn fetch_body(&mut self, uid: u32) -> Result<Option<Body>, FetchError> {
        let (untagged, _) = self
            .command(&format!("UID FETCH {uid} BODY.PEEK[]"))
            .await?;
        let mut found = None;
        for parts in &untagged {
            match fetch_body(parts) {
                Some((Some(u), Some(body))) if u == uid => found = Some(body),
                Some((None, Some(_))) => {
                    return Err(FetchError::permanent(format!(
                        "FETCH response for UID {uid} without its UID"
                    )));
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// `UID STORE uid +FLAGS.SILENT (flag)`.
    pub async fn add_flag(&mut self, uid: u32, flag: &str) -> Result<(), FetchError> {
        self.command(&format!("UID STORE {uid} +FLAGS.SILENT ({flag})"))
            .await
            .map(|_| ())
    }

    /// Removes the messages flagged `\Deleted`: `UID EXPUNGE uids` with UIDPLUS, else `EXPUNGE`.
    pub async fn expunge(&mut self, uids: &[u32]) -> Result<(), FetchError> {
        if uids.is_empty() {
            return Ok(());
        }
        if self.has_capability("UIDPLUS") {
            let set: Vec<String> = uids.iter().map(u32::to_string).collect();
            self.command(&format!("UID EXPUNGE {}", set.join(",")))
                .await?;
        } else {
            self.command("EXPUNGE").await?;
        }
        Ok(())
    }

    /// `LOGOUT` (the server's `BYE` and `OK`; a close right after `BYE` is fine).
    pub async fn logout(mut self) -> Result<(), FetchError> {
        match self.command("LOGOUT").await {
            Ok(_) => Ok(()),
            Err(e) if e.final_reply.contains("closed the connection") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn verb(command: &str) -> String {
    let mut words = command.split(' ');
    match (words.next(), words.next()) {
        (Some("UID"), Some(second)) => format!("UID {second}"),
        (Some(first), _) => first.to_owned(),
        _ => command.to_owned(),
    }
}

/// One IMAP fetch run (see the module docs).
/// Counts and logs a message left upstream because it is above `max_message_size`.
fn skip_too_large(report: &mut FetchReport, device: &str, uid: u32, size: u64) {
    report.skipped_too_large += 1;
    tracing::warn!(
        device,
        uid,
        size,
        "upstream message above max_message_size left on the server"
    );
}

pub(crate) async fn fetch(
    settings: &FetchSettings,
    credentials: &Credentials,
    maildrop: &Maildrop,
    device: &str,
) -> Result<FetchReport, FetchError> {
    let mut client = ImapClient::connect(settings).await?;
    if let Err(e) = client.authenticate(credentials).await {
        if e.kind == FailureKind::AuthRejected {
            // The connection is fine, only the token was refused: say goodbye properly.
            let _ = client.logout().await;
        }
        return Err(e);
    }
    let mut report = FetchReport::default();
    let result = run(
        settings,
        credentials,
        maildrop,
        device,
        &mut client,
        &mut report,
    )
    .await;
    let logout = client.logout().await;
    match result {
        Ok(()) => {
            logout.map_err(|e| e.with_partial(report))?;
            Ok(report)
        }
        Err(e) => Err(e.with_partial(report)),
    }
}

async fn run(
    settings: &FetchSettings,
    credentials: &Credentials,
    maildrop: &Maildrop,
    device: &str,
    client: &mut ImapClient,
    report: &mut FetchReport,
) -> Result<(), FetchError> {
    let folder = if settings.folder.is_empty() {
        "INBOX"
    } else {
        settings.folder.as_str()
    };
    client.select(folder).await?;
    let uidvalidity = client.uidvalidity().ok_or_else(|| {
        FetchError::permanent(format!("SELECT {folder}: the server sent no UIDVALIDITY"))
    })?;
    let uids = client.search_all().await?;
    let mut flagged = Vec::new();
    for uid in uids {
        if report.fetched >= settings.max_messages {
            break;
        }
        let upstream_id = format!("imap {} {folder} {uidvalidity} {uid}", credentials.username);
        let duplicate = if already_stored(maildrop, device, &upstream_id).await? {
            true
        } else {
            // Too large: left upstream without downloading it (the literal limit in the parser
            // is the backstop for a server that misstates the size).
            match client.size(uid).await? {
                None => continue,
                Some(size) if size > settings.max_message_size as u64 => {
                    skip_too_large(report, device, uid, size);
                    continue;
                }
                Some(_) => {}
            }
            match client.fetch_body(uid).await? {
                None => continue,
                Some(Err(size)) => {
                    skip_too_large(report, device, uid, size);
                    continue;
                }
                Some(Ok(bytes)) => {
                    let len = bytes.len() as u64;
                    match store(maildrop, device, &upstream_id, bytes).await? {
                        StoreOutcome::Stored(id) => {
                            tracing::debug!(device, uid, maildrop_id = %id, "stored fetched message");
                            report.fetched += 1;
                            report.bytes += len;
                            false
                        }
                        StoreOutcome::Duplicate => true,
                    }
                }
            }
        };
        if duplicate {
            report.skipped_duplicates += 1;
            if settings.keep_upstream {
                continue;
            }
        }
        let flag = if settings.keep_upstream {
            "\\Seen"
        } else {
            "\\Deleted"
        };
        client.add_flag(uid, flag).await?;
        flagged.push(uid);
    }
    if settings.keep_upstream {
        report.deleted_upstream = flagged.len();
    } else {
        client.expunge(&flagged).await?;
        report.deleted_upstream = flagged.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_sizes_are_parsed_strictly() {
        assert_eq!(literal_size(b"* 1 FETCH (UID 5 BODY[] {123}"), Some(123));
        assert_eq!(literal_size(b"x {7+}"), Some(7));
        assert_eq!(literal_size(b"x {}"), None);
        assert_eq!(literal_size(b"x {12a}"), None);
        assert_eq!(literal_size(b"x {99999999999999999999999}"), None);
        assert_eq!(literal_size(b"no literal"), None);
        assert_eq!(literal_size(b"}"), None);
    }

    #[test]
    fn tagged_lines_are_parsed() {
        assert_eq!(parse_tagged("t1 OK done"), Some(("t1".into(), Status::Ok)));
        assert_eq!(
            parse_tagged("t2 no [AUTHENTICATIONFAILED] x"),
            Some(("t2".into(), Status::No))
        );
        assert_eq!(parse_tagged("t3 BAD"), Some(("t3".into(), Status::Bad)));
        assert_eq!(parse_tagged("garbage"), None);
        assert_eq!(parse_tagged("t1 MAYBE x"), None);
        assert_eq!(parse_tagged(""), None);
    }

    #[test]
    fn fetch_responses_yield_uid_and_body() {
        let parts = vec![
            Part::Text(b"* 3 FETCH (UID 42 BODY[] {5}".to_vec()),
            Part::Literal(b"hello".to_vec()),
            Part::Text(b")".to_vec()),
        ];
        assert_eq!(
            fetch_body(&parts),
            Some((Some(42), Some(Ok(b"hello".to_vec()))))
        );
        let parts = vec![
            Part::Text(b"* 3 FETCH (BODY[] {5000}".to_vec()),
            Part::TooLarge(5000),
            Part::Text(b" UID 7)".to_vec()),
        ];
        assert_eq!(fetch_body(&parts), Some((Some(7), Some(Err(5000)))));
        assert_eq!(fetch_body(&[Part::Text(b"* 3 EXISTS".to_vec())]), None);
        assert_eq!(fetch_body(&[]), None);
        let flags_only = vec![Part::Text(b"* 3 FETCH (FLAGS (\\Seen) UID 9)".to_vec())];
        assert_eq!(fetch_body(&flags_only), Some((Some(9), None)));
    }

    #[test]
    fn capabilities_and_uidvalidity_are_found() {
        assert_eq!(
            capability_words("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready"),
            Some(vec![
                "IMAP4REV1".into(),
                "SASL-IR".into(),
                "AUTH=XOAUTH2".into()
            ])
        );
        assert_eq!(
            uidvalidity("* OK [UIDVALIDITY 1700000000] UIDs valid"),
            Some(1_700_000_000)
        );
        assert_eq!(uidvalidity("* OK [UIDVALIDITY x]"), None);
        assert!(quoted("IN\"BOX").unwrap() == "\"IN\\\"BOX\"");
        assert!(quoted("bad\r\nfolder").is_err());
    }

    #[test]
    fn folder_names_are_sent_in_modified_utf7() {
        let name = |f: &str| mailbox_name(f).unwrap();
        assert_eq!(name("INBOX"), "INBOX");
        // RFC 3501 §5.1.3's example.
        assert_eq!(
            name("~peter/mail/\u{53F0}\u{5317}/\u{65E5}\u{672C}\u{8A9E}"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(name("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(name("Scans & Faxe"), "Scans &- Faxe");
        assert_eq!(name("Gelöschte Elemente"), "Gel&APY-schte Elemente");
        // A character outside the BMP is a surrogate pair in one run.
        assert_eq!(name("Fax \u{1F4E0}"), "Fax &2D3c4A-");
        assert!(mailbox_name("bad\r\nfolder").is_err());
    }

    use std::time::Duration;

    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, DuplexStream};

    use super::super::{FetchProtocol, Security};
    use crate::sasl::AccessToken;

    fn test_settings() -> FetchSettings {
        let mut s = FetchSettings::new(FetchProtocol::Imap, "imap.test", 143, Security::None);
        s.timeout = Duration::from_secs(5);
        s.message_timeout = Duration::from_secs(5);
        s.max_message_size = 64;
        s
    }

    fn client_and_server() -> (Conn, BufReader<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (
            Conn::from_stream(Box::new(a), &test_settings(), 1024),
            BufReader::new(b),
        )
    }

    async fn expect_line(server: &mut BufReader<DuplexStream>) -> String {
        let mut line = String::new();
        server.read_line(&mut line).await.unwrap();
        line.trim_end().to_owned()
    }

    #[tokio::test]
    async fn without_sasl_ir_the_payload_follows_the_continuation_and_a_challenge_is_answered() {
        let (conn, mut server) = client_and_server();
        let script = tokio::spawn(async move {
            server.get_mut().write_all(b"* OK ready\r\n").await.unwrap();
            assert_eq!(expect_line(&mut server).await, "t1 AUTHENTICATE XOAUTH2");
            server.get_mut().write_all(b"+ \r\n").await.unwrap();
            let payload = expect_line(&mut server).await;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(&payload)
                .unwrap();
            assert!(decoded.starts_with(b"user=u@example.com\x01auth=Bearer "));
            let json = base64::engine::general_purpose::STANDARD.encode(r#"{"status":"401"}"#);
            server
                .get_mut()
                .write_all(format!("+ {json}\r\n").as_bytes())
                .await
                .unwrap();
            assert_eq!(
                expect_line(&mut server).await,
                "",
                "XOAUTH2 answers with an empty line"
            );
            server
                .get_mut()
                .write_all(b"t1 NO [AUTHENTICATIONFAILED] nope\r\n")
                .await
                .unwrap();
        });
        let mut client = ImapClient::greet(conn, &test_settings()).await.unwrap();
        let credentials = Credentials {
            username: "u@example.com".into(),
            token: AccessToken::new("tok-123456"),
        };
        let e = client.authenticate(&credentials).await.unwrap_err();
        script.await.unwrap();
        assert_eq!(e.kind, crate::upstream::FailureKind::AuthRejected);
        assert_eq!(
            e.final_reply,
            "AUTHENTICATE XOAUTH2: t1 NO [AUTHENTICATIONFAILED] nope"
        );
        assert_eq!(
            e.auth_challenge_json.as_deref(),
            Some(r#"{"status":"401"}"#)
        );
    }

    #[tokio::test]
    async fn literals_are_bounded_and_oversized_ones_discarded() {
        let (conn, mut server) = client_and_server();
        server
            .get_mut()
            .write_all(b"* OK hi\r\n* 1 FETCH (UID 3 BODY[] {5}\r\nhello)\r\n* 2 FETCH (UID 4 BODY[] {100}\r\n")
            .await
            .unwrap();
        server.get_mut().write_all(&[b'x'; 100]).await.unwrap();
        server
            .get_mut()
            .write_all(b")\r\n* 3 FETCH (BODY[] {10}\r\nshort")
            .await
            .unwrap();
        drop(server);
        let mut client = ImapClient::greet(conn, &test_settings()).await.unwrap();
        let Response::Untagged(parts) = client.response().await.unwrap() else {
            panic!()
        };
        assert_eq!(
            fetch_body(&parts),
            Some((Some(3), Some(Ok(b"hello".to_vec()))))
        );
        let Response::Untagged(parts) = client.response().await.unwrap() else {
            panic!()
        };
        assert_eq!(fetch_body(&parts), Some((Some(4), Some(Err(100)))));
        // A literal cut short by the server closing: an error, not a hang or a panic.
        assert!(client.response().await.is_err());
    }

    #[tokio::test]
    async fn garbage_from_the_server_is_an_error_never_a_panic() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces: [&[u8]; 12] = [
            b"* ",
            b"+ ",
            b"t1 ",
            b"OK ",
            b"NO ",
            b"{",
            b"}",
            b"3",
            b"\r\n",
            b"FETCH (",
            b"\xff\x00",
            b"BODY[] ",
        ];
        for _ in 0..300 {
            let (conn, mut server) = client_and_server();
            let mut input = b"* OK hi\r\n".to_vec();
            for _ in 0..(next() % 20) {
                input.extend_from_slice(pieces[(next() % 12) as usize]);
            }
            server.get_mut().write_all(&input).await.unwrap();
            drop(server);
            let mut client = ImapClient::greet(conn, &test_settings()).await.unwrap();
            for _ in 0..10 {
                if client.response().await.is_err() {
                    break;
                }
            }
        }
    }
}
