//! The local POP3 server (RFC 1939, RFC 2449 `CAPA`, RFC 2595 `STLS`, RFC 3206 response codes)
//! from which legacy devices collect the mail the fetch jobs ([`crate::fetch`]) put into their
//! [`Maildrop`].
//!
//! Devices log in with `USER`/`PASS` against their local credentials through a [`Pop3Auth`]
//! (the ingress device table, [`LocalDevices`], implements it). A session holds its device's
//! maildrop lock, so a second login for the same device gets `-ERR [IN-USE]`. The message list
//! is fixed at login; `DELE` only marks, and the marked messages are removed when the client
//! sends `QUIT` — a dropped connection, a timeout or a server shutdown deletes nothing. The
//! session never panics on input: over-long lines, unknown or out-of-state commands and bad
//! arguments get `-ERR`, and a client that keeps erring or stays silent is disconnected.
//!
//! Limits: sessions at once, in total and per source ([`SessionLimits`]; over them a
//! connection gets `-ERR [SYS/TEMP]` and is closed — except that over the total, a session that
//! has not logged in from a source that is not known makes room: the one that has waited longest
//! gets `-ERR [SYS/TEMP]` and is closed, and the new connection takes its slot), and failed
//! logins slowed down, then locked out per source and user by the [`LoginGuard`] the SMTP
//! ingress shares (a locked login gets `-ERR [AUTH] … try again in N seconds` and the connection
//! is closed, without a password check).
//!
//! The command grammar is [`crate::wire::pop3`] (sans-IO); this file is the session.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_listen::{Seat, Waiting};
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::fetch::Io;
use crate::ingress::{Admission, LocalDevices, LoginGuard, Password};
use crate::line_server::{self, Gate, Line, Refusal, SessionLimits, read_limited};
use crate::maildrop::{Maildrop, MaildropEntry, MaildropLock};
use crate::metrics::{AgentMetrics, Listener, Login, LoginProtocol};
use crate::wire::pop3::{Command, Verb, message_number, top, top_arguments};
// POP3 byte-stuffing (RFC 1939 §3) is SMTP's (RFC 5321 §4.5.2), with the same CRLF line ends.
use crate::wire::smtp_client::dot_stuff;

/// Settings of the local POP3 server.
#[derive(Clone)]
pub struct Pop3ServerConfig {
    /// Name in the greeting.
    pub hostname: String,
    /// Longest command line, CRLF included (RFC 2449: 255 octets; a little more is tolerated).
    pub max_line_length: usize,
    /// Longest wait for the next command; then the session is closed without deleting anything
    /// (RFC 1939's autologout timer).
    pub command_timeout: Duration,
    /// `-ERR` replies after which the session is closed.
    pub max_errors: u32,
    /// When set, `STLS` is offered and upgrades the session with this rustls configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse `USER`/`PASS` until `STLS` succeeded, and leave `USER` out of `CAPA` before it
    /// (RFC 2595 §4). Needs [`Pop3ServerConfig::tls`].
    pub require_tls: bool,
    /// Sessions at once, in total and per source.
    pub limits: SessionLimits,
    /// Failed-login throttling (the runtime shares the SMTP ingress's).
    pub login_guard: Arc<LoginGuard>,
    /// Where logins and the connections the limits close are counted.
    pub metrics: AgentMetrics,
}

impl Default for Pop3ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "tokenfleet-agent".to_owned(),
            max_line_length: 512,
            command_timeout: Duration::from_secs(600),
            max_errors: 10,
            tls: None,
            require_tls: false,
            limits: SessionLimits::default(),
            login_guard: Arc::new(LoginGuard::default()),
            metrics: AgentMetrics::default(),
        }
    }
}

impl std::fmt::Debug for Pop3ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3ServerConfig")
            .field("hostname", &self.hostname)
            .field("max_line_length", &self.max_line_length)
            .field("command_timeout", &self.command_timeout)
            .field("max_errors", &self.max_errors)
            .field("tls", &self.tls.is_some())
            .field("require_tls", &self.require_tls)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Who a POP3 client is: the runtime implements this with the devices' local credentials.
pub trait Pop3Auth: Send + Sync + 'static {
    /// The device whose local credentials these are, if they are valid.
    fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> impl Future<Output = Option<String>> + Send;
}

/// The ingress device table doubles as the POP3 one: same user names, same argon2 hashes.
impl Pop3Auth for LocalDevices {
    fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> impl Future<Output = Option<String>> + Send {
        crate::ingress::IngressHandler::authenticate(self, peer, user, password)
    }
}

/// The local POP3 server.
#[derive(Debug)]
pub struct Pop3Server;

impl Pop3Server {
    /// Serves `listener` until `shutdown` completes, then stops accepting, tells sessions
    /// `-ERR [SYS/TEMP]` at their next command (deleting nothing) and waits for them to end.
    pub async fn serve<A: Pop3Auth>(
        listener: TcpListener,
        config: Pop3ServerConfig,
        auth: Arc<A>,
        maildrop: Arc<Maildrop>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let config = Arc::new(config);
        let limits = config.limits;
        let guard = Arc::clone(&config.login_guard);
        line_server::serve(
            listener,
            shutdown,
            "pop3",
            Gate {
                limits,
                busy,
                known: Box::new(move |peer: SocketAddr| guard.known_source(peer.ip())),
                // Sessions from other sources wait until they log in.
                waiting: Some(Arc::new(Waiting::default())),
                closed: config.metrics.closed_by(Listener::Pop3),
            },
            move |stream, peer, stop, seat| {
                let session = Session {
                    reader: BufReader::new(Box::new(stream)),
                    peer,
                    config: Arc::clone(&config),
                    maildrop: Arc::clone(&maildrop),
                    errors: 0,
                    tls: false,
                    waiting: seat,
                };
                let auth = Arc::clone(&auth);
                async move { session.run(&*auth, stop).await }
            },
        )
        .await
    }
}

/// The answer to a connection over a session limit (RFC 3206 `SYS/TEMP`), instead of the greeting.
fn busy(refusal: Refusal) -> &'static [u8] {
    match refusal {
        Refusal::Total => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
        Refusal::PerSource => {
            b"-ERR [SYS/TEMP] too many connections from your address, try again later\r\n"
        }
    }
}

/// The last line to a session that has not logged in when a new connection took its slot.
const CLOSED_FOR_NEW: &[u8] =
    b"-ERR [SYS/TEMP] too many connections: closing this one, which has not logged in\r\n";

/// Completes when the server is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The maildrop as the session sees it: fixed at login, with deletion marks.
struct Transaction {
    _lock: MaildropLock,
    device: String,
    entries: Vec<MaildropEntry>,
    deleted: Vec<bool>,
}

impl Transaction {
    /// The entry with 1-based number `arg`, unless deleted.
    fn get(&self, arg: &str) -> Result<usize, &'static str> {
        let i = message_number(arg, self.entries.len())?;
        if self.deleted[i] {
            return Err("-ERR message already deleted");
        }
        Ok(i)
    }

    fn live(&self) -> impl Iterator<Item = (usize, &MaildropEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.deleted[*i])
    }
}

/// What the command loop ends with.
enum Next {
    /// Close the connection.
    Close,
    /// `STLS` was accepted: run the handshake, then commands again.
    StartTls(Arc<rustls::ServerConfig>),
}

enum State {
    Authorization { user: Option<String> },
    Transaction(Box<Transaction>),
}

struct Session {
    reader: BufReader<Box<dyn Io>>,
    peer: SocketAddr,
    config: Arc<Pop3ServerConfig>,
    maildrop: Arc<Maildrop>,
    errors: u32,
    tls: bool,
    /// A session from a source that is not known waits among the listener's connections until
    /// it logs in: a new connection over `max_sessions` may close it (see
    /// [`tokenfleet_listen::Waiting`]).
    waiting: Option<Seat>,
}

impl Session {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        line_server::send(self.reader.get_mut(), bytes).await
    }

    /// Sends a one-line reply. Returns `false` when the session must end (too many errors).
    async fn reply(&mut self, line: &str) -> io::Result<bool> {
        let mut out = format!("{line}\r\n");
        if line.starts_with("-ERR") {
            self.errors += 1;
            if self.errors >= self.config.max_errors {
                out.push_str("-ERR too many errors, closing connection\r\n");
                self.write(out.as_bytes()).await?;
                return Ok(false);
            }
        }
        self.write(out.as_bytes()).await?;
        Ok(true)
    }

    async fn read_line(&mut self, stop: &mut watch::Receiver<bool>) -> io::Result<Line> {
        let limit = self.config.max_line_length;
        let timeout = self.config.command_timeout;
        tokio::select! {
            read = tokio::time::timeout(timeout, read_limited(&mut self.reader, limit)) => match read {
                Ok(line) => line,
                Err(_) => {
                    self.write(b"-ERR autologout: idle too long, nothing deleted\r\n").await?;
                    Ok(Line::Closed)
                }
            },
            () = stopped(stop) => {
                self.write(b"-ERR [SYS/TEMP] server shutting down, nothing deleted\r\n").await?;
                Ok(Line::Closed)
            }
            () = line_server::closed_for_new(self.waiting.as_ref()) => {
                self.write(CLOSED_FOR_NEW).await?;
                Ok(Line::Closed)
            }
        }
    }

    async fn run<A: Pop3Auth>(
        mut self,
        auth: &A,
        mut stop: watch::Receiver<bool>,
    ) -> io::Result<()> {
        if *stop.borrow() {
            return Ok(());
        }
        let greeting = format!("+OK {} POP3 server ready", self.config.hostname);
        self.reply(&greeting).await?;
        loop {
            match self.commands(auth, &mut stop).await? {
                Next::Close => return Ok(()),
                Next::StartTls(tls) => match self.upgrade(tls).await? {
                    Some(session) => self = session,
                    None => return Ok(()),
                },
            }
        }
    }

    /// The command loop, from the authorization state (after the greeting or `STLS`).
    async fn commands<A: Pop3Auth>(
        &mut self,
        auth: &A,
        stop: &mut watch::Receiver<bool>,
    ) -> io::Result<Next> {
        let mut state = State::Authorization { user: None };
        loop {
            let line = match self.read_line(stop).await? {
                Line::Closed => return Ok(Next::Close),
                Line::TooLong => {
                    if !self.reply("-ERR line too long").await? {
                        return Ok(Next::Close);
                    }
                    continue;
                }
                Line::Text(line) => line,
            };
            let Command { verb, arg } = Command::parse(&line);
            let arg = arg.as_str();
            let in_auth = matches!(state, State::Authorization { .. });
            let tls_first = self.config.require_tls && !self.tls;
            let keep_going = match (&mut state, verb) {
                (_, Verb::Capa) => {
                    let stls = self.config.tls.is_some() && !self.tls && in_auth;
                    let mut out = String::from("+OK capability list follows\r\n");
                    if !tls_first {
                        out.push_str("USER\r\n");
                    }
                    out.push_str("UIDL\r\nTOP\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
                    if stls {
                        out.push_str("STLS\r\n");
                    }
                    out.push_str("IMPLEMENTATION tokenfleet-agent\r\n.\r\n");
                    self.write(out.as_bytes()).await?;
                    true
                }
                (State::Authorization { .. }, Verb::Stls) => {
                    match self.config.tls.clone() {
                        Some(tls) if !self.tls => {
                            self.reply("+OK begin TLS negotiation").await?;
                            if !self.reader.buffer().is_empty() {
                                // Commands pipelined before the handshake are a protocol
                                // violation (and a known injection trick): refuse.
                                return Ok(Next::Close);
                            }
                            return Ok(Next::StartTls(tls));
                        }
                        Some(_) => self.reply("-ERR already using TLS").await?,
                        None => self.reply("-ERR STLS not available").await?,
                    }
                }
                (State::Authorization { user }, Verb::User | Verb::Pass) if tls_first => {
                    // Forget a name given earlier: nothing of a login survives into TLS.
                    *user = None;
                    self.reply("-ERR [AUTH] this server takes passwords only over TLS: STLS first")
                        .await?
                }
                (State::Authorization { user }, Verb::User) => {
                    if arg.is_empty() {
                        self.reply("-ERR USER needs a name").await?
                    } else {
                        *user = Some(arg.to_owned());
                        self.reply("+OK send PASS").await?
                    }
                }
                (State::Authorization { user }, Verb::Pass) => {
                    let Some(name) = user.take() else {
                        if !self.reply("-ERR USER first").await? {
                            return Ok(Next::Close);
                        }
                        continue;
                    };
                    let guard = Arc::clone(&self.config.login_guard);
                    if let Admission::LockedOut { retry_after, .. } =
                        guard.check(self.peer.ip(), &name)
                    {
                        tracing::info!(peer = %self.peer, "pop3 login refused: locked out");
                        self.config
                            .metrics
                            .login(LoginProtocol::Pop3, Login::LockedOut);
                        let reply = format!(
                            "-ERR [AUTH] too many failed logins from your address or for this user; try again in {} seconds\r\n",
                            retry_after.as_secs().max(1)
                        );
                        self.write(reply.as_bytes()).await?;
                        return Ok(Next::Close);
                    }
                    match auth
                        .authenticate(self.peer, name.clone(), Password::new(arg))
                        .await
                    {
                        None => {
                            tracing::info!(peer = %self.peer, "pop3 login failed");
                            self.config
                                .metrics
                                .login(LoginProtocol::Pop3, Login::Failed);
                            let delay = guard.failed(self.peer.ip(), &name);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            self.reply("-ERR [AUTH] invalid user name or password")
                                .await?
                        }
                        Some(device) => {
                            guard.succeeded(self.peer.ip(), &name);
                            self.config.metrics.login(LoginProtocol::Pop3, Login::Ok);
                            // Served from now on, unless closed for a new connection first.
                            if self.waiting.take().is_some_and(|seat| !seat.leave()) {
                                self.write(CLOSED_FOR_NEW).await?;
                                return Ok(Next::Close);
                            }
                            match self.open_maildrop(&device).await {
                                Ok(tx) => {
                                    let count = tx.entries.len();
                                    let size: u64 = tx.entries.iter().map(|e| e.size).sum();
                                    tracing::info!(peer = %self.peer, device, messages = count, "pop3 login");
                                    state = State::Transaction(Box::new(tx));
                                    self.reply(&format!(
                                        "+OK maildrop has {count} messages ({size} octets)"
                                    ))
                                    .await?
                                }
                                Err(reply) => self.reply(reply).await?,
                            }
                        }
                    }
                }
                (_, Verb::Quit) => {
                    let reply = match &state {
                        State::Authorization { .. } => "+OK bye".to_owned(),
                        State::Transaction(tx) => self.commit(tx).await,
                    };
                    self.write(format!("{reply}\r\n").as_bytes()).await?;
                    return Ok(Next::Close);
                }
                (State::Transaction(tx), _) => {
                    let (reply, body) = transaction_command(tx, verb, arg, &self.maildrop).await;
                    match body {
                        Some(body) => {
                            self.write(format!("{reply}\r\n").as_bytes()).await?;
                            self.write(&body).await?;
                            true
                        }
                        None => self.reply(&reply).await?,
                    }
                }
                (State::Authorization { .. }, v) if v.is_transaction() => {
                    self.reply("-ERR not logged in").await?
                }
                (State::Authorization { .. }, _) => self.reply("-ERR unknown command").await?,
            };
            if !keep_going {
                return Ok(Next::Close);
            }
        }
    }

    /// Runs the TLS handshake after `STLS`; `None` when the client went away.
    async fn upgrade(self, tls: Arc<rustls::ServerConfig>) -> io::Result<Option<Self>> {
        let Self {
            reader,
            peer,
            config,
            maildrop,
            errors,
            waiting,
            ..
        } = self;
        let stream = reader.into_inner();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        match tokio::time::timeout(config.command_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => Ok(Some(Session {
                reader: BufReader::new(Box::new(tls_stream)),
                peer,
                config,
                maildrop,
                errors,
                tls: true,
                waiting,
            })),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "pop3 STLS handshake failed");
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    async fn open_maildrop(&self, device: &str) -> Result<Transaction, &'static str> {
        let Some(lock) = self.maildrop.try_lock(device) else {
            return Err("-ERR [IN-USE] maildrop already locked by another session");
        };
        let maildrop = Arc::clone(&self.maildrop);
        let name = device.to_owned();
        match tokio::task::spawn_blocking(move || maildrop.list(&name)).await {
            Ok(Ok(entries)) => {
                let deleted = vec![false; entries.len()];
                Ok(Transaction {
                    _lock: lock,
                    device: device.to_owned(),
                    entries,
                    deleted,
                })
            }
            Ok(Err(e)) => {
                tracing::error!(device, error = %e, "pop3: listing the maildrop failed");
                Err("-ERR [SYS/TEMP] maildrop unavailable")
            }
            Err(_) => Err("-ERR [SYS/TEMP] maildrop unavailable"),
        }
    }

    /// `QUIT` in the transaction state: removes the marked messages.
    async fn commit(&self, tx: &Transaction) -> String {
        let ids: Vec<_> = tx
            .entries
            .iter()
            .zip(&tx.deleted)
            .filter(|(_, d)| **d)
            .map(|(e, _)| e.id.clone())
            .collect();
        if ids.is_empty() {
            return "+OK bye".to_owned();
        }
        let maildrop = Arc::clone(&self.maildrop);
        let device = tx.device.clone();
        let n = ids.len();
        match tokio::task::spawn_blocking(move || maildrop.delete(&device, &ids)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    device = tx.device,
                    deleted = n,
                    "pop3: device collected messages"
                );
                format!("+OK bye, {n} messages deleted")
            }
            Ok(Err(e)) => {
                tracing::error!(device = tx.device, error = %e, "pop3: deleting collected messages failed");
                "-ERR [SYS/TEMP] some deleted messages not removed".to_owned()
            }
            Err(_) => "-ERR [SYS/TEMP] some deleted messages not removed".to_owned(),
        }
    }
}

/// A transaction-state command: the reply line and, for multi-line replies, the body (with its
/// final `.` line).
async fn transaction_command(
    tx: &mut Transaction,
    verb: Verb,
    arg: &str,
    maildrop: &Arc<Maildrop>,
) -> (String, Option<Vec<u8>>) {
    let arg = arg.trim();
    match verb {
        Verb::Stat => {
            let (n, size) = tx
                .live()
                .fold((0usize, 0u64), |(n, s), (_, e)| (n + 1, s + e.size));
            (format!("+OK {n} {size}"), None)
        }
        Verb::List | Verb::Uidl => {
            let show = |i: usize, e: &MaildropEntry| {
                if verb == Verb::List {
                    format!("{} {}", i + 1, e.size)
                } else {
                    format!("{} {}", i + 1, e.id)
                }
            };
            if arg.is_empty() {
                let mut body = String::new();
                for (i, e) in tx.live() {
                    body.push_str(&show(i, e));
                    body.push_str("\r\n");
                }
                body.push_str(".\r\n");
                (String::from("+OK"), Some(body.into_bytes()))
            } else {
                match tx.get(arg) {
                    Ok(i) => (format!("+OK {}", show(i, &tx.entries[i])), None),
                    Err(e) => (e.to_owned(), None),
                }
            }
        }
        Verb::Retr => match tx.get(arg) {
            Ok(i) => {
                let entry = tx.entries[i].clone();
                let maildrop = Arc::clone(maildrop);
                let device = tx.device.clone();
                match tokio::task::spawn_blocking(move || maildrop.read(&device, &entry.id)).await {
                    Ok(Ok(bytes)) => (
                        format!("+OK {} octets", bytes.len()),
                        Some(dot_stuff(&bytes)),
                    ),
                    Ok(Err(e)) => {
                        tracing::error!(device = tx.device, error = %e, "pop3: reading a message failed");
                        ("-ERR [SYS/TEMP] message unavailable".to_owned(), None)
                    }
                    Err(_) => ("-ERR [SYS/TEMP] message unavailable".to_owned(), None),
                }
            }
            Err(e) => (e.to_owned(), None),
        },
        Verb::Top => {
            let (n, lines) = match top_arguments(arg) {
                Ok(args) => args,
                Err(reply) => return (reply.to_owned(), None),
            };
            match tx.get(n) {
                Ok(i) => {
                    let entry = tx.entries[i].clone();
                    let maildrop = Arc::clone(maildrop);
                    let device = tx.device.clone();
                    match tokio::task::spawn_blocking(move || maildrop.read(&device, &entry.id))
                        .await
                    {
                        Ok(Ok(bytes)) => ("+OK".to_owned(), Some(dot_stuff(top(&bytes, lines)))),
                        _ => ("-ERR [SYS/TEMP] message unavailable".to_owned(), None),
                    }
                }
                Err(e) => (e.to_owned(), None),
            }
        }
        Verb::Dele => match tx.get(arg) {
            Ok(i) => {
                tx.deleted[i] = true;
                (format!("+OK message {} deleted", i + 1), None)
            }
            Err(e) => (e.to_owned(), None),
        },
        Verb::Rset => {
            tx.deleted.iter_mut().for_each(|d| *d = false);
            let n = tx.entries.len();
            (format!("+OK maildrop has {n} messages"), None)
        }
        Verb::Noop => ("+OK".to_owned(), None),
        Verb::User | Verb::Pass | Verb::Stls => ("-ERR already logged in".to_owned(), None),
        Verb::Capa | Verb::Quit | Verb::Unknown => ("-ERR unknown command".to_owned(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"a\nb"), b"a\r\nb\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    #[test]
    fn top_returns_the_header_and_n_body_lines() {
        let m = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(m, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top(m, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(m, 99), m);
        assert_eq!(top(b"no body", 3), b"no body");
    }
}
