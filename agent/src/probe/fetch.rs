//! The fetch-profile test (POP3 or IMAP): `dns`, `tcp`, `tls` (implicit TLS), `greeting`,
//! `capa` (POP3) / `capability` (IMAP), then for STARTTLS `stls`/`starttls`, `tls` and the
//! capabilities again, `auth` with a fresh token (XOAUTH2, as the fetch job does), `stat`
//! (POP3) / `select` (IMAP, the profile's folder) and `quit`. Nothing is downloaded or deleted.

use std::time::Duration;

use tokenfleet_proto::v1::{ConnectionTarget, ConnectionTestResult, ConnectionVerdict};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{
    Finding, ProbeRun, connect_tcp, no_token_finding, protocol_finding, refine_with_certificate,
    resolve, timeout_finding, tls_handshake,
};
use crate::fetch::imap::{self, ImapClient};
use crate::fetch::pop3::{self, Pop3Client};
use crate::fetch::{Conn, FetchError, FetchProtocol, FetchSettings, Io, Security};
use crate::upstream::{Credentials, FailureKind};

/// The fix for a token the mail server refused on POP3/IMAP.
pub const FETCH_TOKEN_REJECTED_FIX: &str = "token audience or scope: for Exchange Online the \
    token must carry https://outlook.office.com/POP.AccessAsUser.All or IMAP.AccessAsUser.All \
    (delegated), or the app needs POP.AccessAsApp / IMAP.AccessAsApp and a mailbox permission \
    (Add-MailboxPermission) for the service principal; for Gmail the scope \
    https://mail.google.com/; then re-consent. Also check that POP/IMAP is enabled for the \
    mailbox (Set-CASMailbox -PopEnabled/-ImapEnabled $true)";

pub use super::NO_TOKEN_FIX;

/// Tests the fetch profile `settings`: connects, secures, authenticates with `credentials` (a
/// fresh token for the mailbox) and looks at the mailbox (`STAT` / `SELECT`), all before
/// `deadline`. With `credentials` `None` (the broker gave no token) the connection steps still
/// run and the verdict is NO_TOKEN with `no_token_summary` — unless a connection step failed
/// first. The result's `device` is left empty for the caller to fill in.
pub async fn test_fetch(
    settings: &FetchSettings,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
    deadline: Instant,
) -> ConnectionTestResult {
    let endpoint = settings.endpoint();
    let mut run = ProbeRun::new(ConnectionTarget::Fetch, endpoint.clone(), deadline);
    let outcome = tokio::time::timeout_at(
        deadline,
        steps(&mut run, settings, credentials, no_token_summary),
    )
    .await;
    match outcome {
        Ok(Ok(summary)) => run.succeed(summary),
        Ok(Err(finding)) => run.finish(finding),
        Err(_) => {
            let after = run
                .steps()
                .iter()
                .map(|s| Duration::from_millis(u64::from(s.duration_ms)))
                .sum();
            run.finish(timeout_finding("the connection test", &endpoint, after))
        }
    }
}

/// The finding for a POP3/IMAP-level failure.
pub fn fetch_finding(e: &FetchError, endpoint: &str, timeout: Duration) -> Finding {
    let text = &e.final_reply;
    if e.kind == FailureKind::AuthRejected {
        let mut summary = text.clone();
        if let Some(json) = &e.auth_challenge_json {
            summary.push_str(&format!(" (challenge: {json})"));
        }
        return Finding::new(
            ConnectionVerdict::TokenRejected,
            summary,
            FETCH_TOKEN_REJECTED_FIX,
        );
    }
    if text.contains("did not answer within") || text.contains("timed out") {
        return timeout_finding("waiting for the server", endpoint, timeout);
    }
    if text.contains("refused STLS") || text.contains("does not offer STARTTLS") {
        return Finding::new(
            ConnectionVerdict::TlsFailed,
            text.clone(),
            "use implicit TLS (POP3S 995, IMAPS 993) if the server offers it; choose security \
             `none` only on a trusted network",
        );
    }
    if text.contains("refused AUTH XOAUTH2") || text.starts_with("AUTHENTICATE XOAUTH2") {
        return mechanism_not_offered(text.clone());
    }
    let mut finding = protocol_finding(text.clone());
    finding.fix = "check that the port speaks the protocol and security mode of the profile \
                   (POP3: 110 with STLS, 995 implicit TLS; IMAP: 143 with STARTTLS, 993 \
                   implicit TLS)"
        .to_owned();
    finding
}

fn mechanism_not_offered(summary: String) -> Finding {
    Finding::new(
        ConnectionVerdict::MechanismNotOffered,
        summary,
        "the server must offer XOAUTH2: Exchange Online outlook.office365.com (POP3 995, IMAP \
         993), Gmail pop.gmail.com:995 / imap.gmail.com:993",
    )
}

/// Runs one step: `$call` with the step timeout set on `$client`, recorded as `$name`.
macro_rules! step {
    ($run:expr, $client:ident, $s:expr, $name:expr, $call:expr, $detail:expr) => {
        probe_step!(
            $run,
            $client,
            $s.timeout,
            $name,
            $call,
            $detail,
            |e: FetchError| fetch_finding(&e, &$s.endpoint(), $s.timeout)
        )
    };
}

async fn steps(
    run: &mut ProbeRun,
    s: &FetchSettings,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
) -> Result<String, Finding> {
    let addrs = resolve(run, &s.host, s.port, run.step_timeout(s.timeout)).await?;
    let tcp = connect_tcp(run, &addrs, run.step_timeout(s.timeout)).await?;
    let peer = tcp.peer_addr().ok();
    let io: Box<dyn Io> = match s.security {
        Security::ImplicitTls => {
            match tls_handshake(run, &s.host, tcp, &s.tls, run.step_timeout(s.timeout)).await {
                Ok(tls) => Box::new(tls),
                Err(finding) => return Err(with_certificate(run, s, peer, finding).await),
            }
        }
        Security::Starttls | Security::None => Box::new(tcp),
    };
    match s.protocol {
        FetchProtocol::Pop3 => {
            client_steps::<Pop3Client>(run, s, io, peer, credentials, no_token_summary).await
        }
        FetchProtocol::Imap => {
            client_steps::<ImapClient>(run, s, io, peer, credentials, no_token_summary).await
        }
    }
}

fn security_text(s: &FetchSettings, run: &ProbeRun) -> String {
    match (s.security, run.certificate()) {
        (Security::None, _) => "without TLS".to_owned(),
        (_, Some(c)) if !c.tls_version.is_empty() => format!("over {}", c.tls_version),
        _ => "over TLS".to_owned(),
    }
}

/// What the test needs from a POP3 or an IMAP client: the steps are the same, only their names,
/// the commands and the mailbox check differ.
trait ProbeClient: Sized {
    /// Longest line accepted from the server.
    const MAX_LINE: usize;
    /// The step reading the capabilities (`capa` / `capability`).
    const CAPS_STEP: &'static str;
    /// The step asking for TLS (`stls` / `starttls`).
    const STARTTLS_STEP: &'static str;
    /// What the session keeps across the TLS handshake.
    type Resume;

    /// Reads the greeting on a fresh connection.
    async fn greet(conn: Conn, s: &FetchSettings) -> Result<Self, FetchError>;
    /// The greeting line.
    fn greeting(&self) -> &str;
    /// Changes the reply timeout.
    fn set_timeout(&mut self, timeout: Duration);
    /// `CAPA` / `CAPABILITY`.
    async fn read_capabilities(&mut self) -> Result<(), FetchError>;
    /// The capabilities, for a step detail.
    fn capabilities_text(&self) -> String;
    /// `STLS` / `STARTTLS`, without the handshake.
    async fn starttls_command(&mut self, endpoint: &str) -> Result<String, FetchError>;
    /// The connection and what to resume with after the handshake.
    fn into_parts(self) -> (Conn, Self::Resume);
    /// The session on the TLS connection.
    fn resume(conn: Conn, s: &FetchSettings, state: Self::Resume) -> Self;
    /// When the capabilities show that XOAUTH2 will not work: the step detail and the summary.
    fn xoauth2_missing(&self, endpoint: &str) -> Option<(String, String)>;
    /// The XOAUTH2 exchange; the server's final reply.
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<String, FetchError>;
    /// The mailbox step (`stat` / `select`); returns the end of the summary.
    async fn mailbox(&mut self, run: &mut ProbeRun, s: &FetchSettings) -> Result<String, Finding>;
    /// `QUIT` / `LOGOUT`; the detail of step `quit`.
    async fn quit(self) -> Result<String, FetchError>;
}

impl ProbeClient for Pop3Client {
    const MAX_LINE: usize = pop3::MAX_LINE;
    const CAPS_STEP: &'static str = "capa";
    const STARTTLS_STEP: &'static str = "stls";
    type Resume = String;

    async fn greet(conn: Conn, _: &FetchSettings) -> Result<Self, FetchError> {
        Pop3Client::greet(conn).await
    }
    fn greeting(&self) -> &str {
        Pop3Client::greeting(self)
    }
    fn set_timeout(&mut self, timeout: Duration) {
        Pop3Client::set_timeout(self, timeout);
    }
    async fn read_capabilities(&mut self) -> Result<(), FetchError> {
        self.capa().await
    }
    fn capabilities_text(&self) -> String {
        self.capabilities().join(", ")
    }
    async fn starttls_command(&mut self, endpoint: &str) -> Result<String, FetchError> {
        self.stls_command(endpoint).await
    }
    fn into_parts(self) -> (Conn, String) {
        let greeting = Pop3Client::greeting(&self).to_owned();
        (self.into_conn(), greeting)
    }
    fn resume(conn: Conn, _: &FetchSettings, greeting: String) -> Self {
        Pop3Client::resume(conn, greeting)
    }
    fn xoauth2_missing(&self, endpoint: &str) -> Option<(String, String)> {
        let sasl = self
            .capabilities()
            .iter()
            .find(|c| c.to_ascii_uppercase().starts_with("SASL"))?;
        if sasl.to_ascii_uppercase().contains("XOAUTH2") {
            return None;
        }
        Some((
            format!("CAPA: {sasl}"),
            format!("{endpoint} does not offer XOAUTH2 (CAPA: {sasl})"),
        ))
    }
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<String, FetchError> {
        Pop3Client::authenticate(self, credentials).await
    }
    async fn mailbox(&mut self, run: &mut ProbeRun, s: &FetchSettings) -> Result<String, Finding> {
        let client = self;
        let (count, size) = step!(run, client, s, "stat", client.stat(), |v: &(usize, u64)| {
            format!("{} messages, {} octets", v.0, v.1)
        });
        Ok(format!("{count} messages ({size} octets) waiting"))
    }
    async fn quit(self) -> Result<String, FetchError> {
        Pop3Client::quit(self).await
    }
}

impl ProbeClient for ImapClient {
    const MAX_LINE: usize = imap::MAX_LINE;
    const CAPS_STEP: &'static str = "capability";
    const STARTTLS_STEP: &'static str = "starttls";
    type Resume = (String, u32);

    async fn greet(conn: Conn, s: &FetchSettings) -> Result<Self, FetchError> {
        ImapClient::greet(conn, s).await
    }
    fn greeting(&self) -> &str {
        ImapClient::greeting(self)
    }
    fn set_timeout(&mut self, timeout: Duration) {
        ImapClient::set_timeout(self, timeout);
    }
    async fn read_capabilities(&mut self) -> Result<(), FetchError> {
        self.capability().await
    }
    fn capabilities_text(&self) -> String {
        self.capabilities().join(" ")
    }
    async fn starttls_command(&mut self, endpoint: &str) -> Result<String, FetchError> {
        ImapClient::starttls_command(self, endpoint).await
    }
    fn into_parts(self) -> (Conn, (String, u32)) {
        let greeting = ImapClient::greeting(&self).to_owned();
        let next_tag = self.next_tag();
        (self.into_conn(), (greeting, next_tag))
    }
    fn resume(conn: Conn, s: &FetchSettings, (greeting, next_tag): (String, u32)) -> Self {
        ImapClient::resume(conn, s, greeting, next_tag)
    }
    fn xoauth2_missing(&self, endpoint: &str) -> Option<(String, String)> {
        if self.has_capability("AUTH=XOAUTH2") {
            return None;
        }
        let offered = self.capabilities_text();
        Some((
            format!("CAPABILITY: {offered}"),
            format!("{endpoint} does not offer AUTH=XOAUTH2 (CAPABILITY: {offered})"),
        ))
    }
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<String, FetchError> {
        ImapClient::authenticate(self, credentials).await
    }
    async fn mailbox(&mut self, run: &mut ProbeRun, s: &FetchSettings) -> Result<String, Finding> {
        let folder = if s.folder.is_empty() {
            "INBOX"
        } else {
            s.folder.as_str()
        };
        let client = self;
        step!(
            run,
            client,
            s,
            "select",
            client.select(folder),
            String::clone
        );
        let exists = client.exists().unwrap_or(0);
        Ok(format!("{folder} has {exists} messages"))
    }
    async fn quit(self) -> Result<String, FetchError> {
        self.logout().await.map(|()| "LOGOUT: OK".to_owned())
    }
}

/// The steps after TCP (and implicit TLS): greeting, capabilities, STARTTLS, auth, mailbox, quit.
async fn client_steps<C: ProbeClient>(
    run: &mut ProbeRun,
    s: &FetchSettings,
    io: Box<dyn Io>,
    peer: Option<std::net::SocketAddr>,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
) -> Result<String, Finding> {
    let mut conn = Conn::from_stream(io, s, C::MAX_LINE);
    let mut client = step!(run, conn, s, "greeting", C::greet(conn, s), |c: &C| c
        .greeting()
        .to_owned());
    step!(
        run,
        client,
        s,
        C::CAPS_STEP,
        client.read_capabilities(),
        |_: &()| client.capabilities_text()
    );
    if s.security == Security::Starttls {
        step!(
            run,
            client,
            s,
            C::STARTTLS_STEP,
            client.starttls_command(&s.endpoint()),
            String::clone
        );
        let (conn, resume) = client.into_parts();
        let io = conn
            .into_io()
            .map_err(|e| fetch_finding(&e, &s.endpoint(), s.timeout))?;
        let tls = match tls_handshake(run, &s.host, io, &s.tls, run.step_timeout(s.timeout)).await {
            Ok(tls) => tls,
            Err(finding) => return Err(with_certificate(run, s, peer, finding).await),
        };
        client = C::resume(Conn::from_stream(Box::new(tls), s, C::MAX_LINE), s, resume);
        step!(
            run,
            client,
            s,
            C::CAPS_STEP,
            client.read_capabilities(),
            |_: &()| client.capabilities_text()
        );
    }
    let started = Instant::now();
    let Some(credentials) = credentials else {
        run.record("auth", false, "no token from the broker", started);
        quit(run, client).await;
        return Err(no_token_finding(no_token_summary));
    };
    if let Some((detail, summary)) = client.xoauth2_missing(&s.endpoint()) {
        run.record("auth", false, detail, started);
        quit(run, client).await;
        return Err(mechanism_not_offered(summary));
    }
    // The agent's own check: no token in clear text to a host that is not loopback.
    if let Err(refusal) =
        s.tls
            .check_token_transport("fetch", &s.host, s.port, s.security != Security::None)
    {
        run.record("auth", false, refusal.clone(), started);
        quit(run, client).await;
        return Err(Finding::new(
            ConnectionVerdict::TlsFailed,
            refusal,
            super::smtp::CLEARTEXT_TOKEN_FIX,
        ));
    }
    client.set_timeout(run.step_timeout(s.timeout));
    match client.authenticate(credentials).await {
        Ok(reply) => run.record(
            "auth",
            true,
            format!("XOAUTH2 as {}: {reply}", credentials.username),
            started,
        ),
        Err(e) => {
            run.record("auth", false, e.to_string(), started);
            quit(run, client).await;
            return Err(fetch_finding(&e, &s.endpoint(), s.timeout));
        }
    }
    let mailbox = client.mailbox(run, s).await?;
    quit(run, client).await;
    Ok(format!(
        "authenticated as {} with XOAUTH2 at {} {}: {mailbox}",
        credentials.username,
        s.endpoint(),
        security_text(s, run)
    ))
}

/// Step `quit`, best effort.
async fn quit<C: ProbeClient>(run: &mut ProbeRun, mut client: C) {
    run.quit(|timeout| {
        client.set_timeout(timeout);
        async move { client.quit().await.map(|reply| (true, reply)) }
    })
    .await;
}

/// After a failed verified handshake: reconnects, re-does the plain-text part (STLS/STARTTLS)
/// and reads the certificate with verification off, for the report only.
async fn with_certificate(
    run: &mut ProbeRun,
    s: &FetchSettings,
    peer: Option<std::net::SocketAddr>,
    finding: Finding,
) -> Finding {
    let starttls = |tcp: TcpStream, _timeout: Duration| async move {
        let io: Box<dyn Io> = match s.protocol {
            FetchProtocol::Pop3 => {
                let conn = Conn::from_stream(Box::new(tcp), s, pop3::MAX_LINE);
                let mut c = Pop3Client::greet(conn).await.ok()?;
                c.stls_command(&s.endpoint()).await.ok()?;
                c.into_conn().into_io().ok()?
            }
            FetchProtocol::Imap => {
                let conn = Conn::from_stream(Box::new(tcp), s, imap::MAX_LINE);
                let mut c = ImapClient::greet(conn, s).await.ok()?;
                c.capability().await.ok()?;
                c.starttls_command(&s.endpoint()).await.ok()?;
                c.into_conn().into_io().ok()?
            }
        };
        Some(io)
    };
    super::with_certificate(
        run,
        peer,
        finding,
        s.security,
        &s.host,
        &s.tls,
        s.timeout,
        starttls,
        refine_with_certificate,
    )
    .await
}
