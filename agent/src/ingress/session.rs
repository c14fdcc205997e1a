//! One SMTP session: the socket loop that reads bounded command lines and `DATA` blocks, feeds
//! them to the sans-IO grammar of [`crate::wire::smtp_server`] (commands; `DATA` through its
//! block scanner) and [`crate::sasl`] (AUTH responses), and answers; STARTTLS, timeouts, limits
//! and the hand-off to the handler.
//!
//! `DATA` is read a buffer at a time, not a line at a time: [`DataScanner`] finds the line ends
//! of the whole buffer, copies the lines that need no change in runs and applies the `DATA`
//! rules (end of message, dot-unstuffing, bare LF, line limit) exactly as line by line; the
//! content goes to the [`MessageSink`] in blocks of [`DATA_BLOCK`] bytes, which keeps the
//! header block (and the first bytes of the body) in memory and streams the rest to the
//! spool's tail file — the file that becomes the spool entry.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokenfleet_listen::Seat;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::handoff::{DeliverError, Incoming, IngressHandler};
use super::password::Password;
use super::{Admission, IngressConfig};
use crate::line_server::{self, Line, read_limited};
use crate::metrics::{Login, LoginProtocol};
use crate::sasl::{self, SaslError};
use crate::spool::{Envelope, TailFile};
use crate::wire::smtp_server::{
    Command, DataEvent, DataScanner, MailParam, command_text, mail_params, parse_path,
    printable_name,
};

/// Read buffer of a session: one TLS record, and a few read calls per 64 KiB of `DATA`.
const READ_BUFFER: usize = 16 * 1024;

/// `DATA` content is handed to the [`MessageSink`] in blocks of about this size.
const DATA_BLOCK: usize = 64 * 1024;

/// The client connection: plain TCP, or TLS after `STARTTLS`.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while the stream is handed to the TLS handshake (reads EOF, writes fail).
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Gone => Poll::Ready(Ok(())),
        }
    }
}

struct Conn<'a> {
    io: BufReader<Stream>,
    /// Whether `STARTTLS` succeeded.
    tls: bool,
    config: &'a IngressConfig,
    errors: u32,
    /// A session from a source that is not known waits among the listener's connections until
    /// it logs in: a new connection over `max_sessions` may close it (see
    /// [`tokenfleet_listen::Waiting`]).
    waiting: Option<Seat>,
}

impl Conn<'_> {
    /// Writes `bytes` and flushes.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        line_server::send(self.io.get_mut(), bytes).await
    }

    /// Sends a reply (lines joined with CRLF). Returns `false` when the session must end
    /// because of too many errors (after telling the client).
    async fn reply(&mut self, text: &str) -> io::Result<bool> {
        let mut out = text.replace('\n', "\r\n");
        out.push_str("\r\n");
        if text.starts_with('5') {
            self.errors += 1;
            if self.errors >= self.config.max_errors {
                out.push_str(&format!(
                    "421 4.7.0 {} Too many errors, closing connection\r\n",
                    self.config.hostname
                ));
                self.send(out.as_bytes()).await?;
                return Ok(false);
            }
        }
        self.send(out.as_bytes()).await?;
        Ok(true)
    }

    /// Reads the next command line, answering `421 4.4.2` on timeout.
    async fn read(&mut self) -> io::Result<Line> {
        self.read_max(self.config.max_line_length).await
    }

    /// Makes sure input is buffered (for `DATA`): `false` when the client left, or sent nothing
    /// for the command timeout (answered `421 4.4.2`). Input already buffered needs no wait, so
    /// no timer.
    async fn fill(&mut self) -> io::Result<bool> {
        if !self.io.buffer().is_empty() {
            return Ok(true);
        }
        match tokio::time::timeout(self.config.command_timeout, self.io.fill_buf()).await {
            Ok(Ok(buf)) => Ok(!buf.is_empty()),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let msg = format!(
                    "421 4.4.2 {} Timeout waiting for client input\r\n",
                    self.config.hostname
                );
                self.send(msg.as_bytes()).await?;
                Ok(false)
            }
        }
    }

    /// Reads the next line of at most `limit` bytes, answering `421 4.4.2` on timeout, and
    /// `421 4.3.2` when the session was closed for a new connection while it read.
    async fn read_max(&mut self, limit: usize) -> io::Result<Line> {
        let read = tokio::time::timeout(
            self.config.command_timeout,
            read_limited(&mut self.io, limit),
        );
        let read = tokio::select! {
            biased;
            () = line_server::closed_for_new(self.waiting.as_ref()) => None,
            read = read => Some(read),
        };
        match read {
            Some(Ok(line)) => line,
            Some(Err(_)) => {
                let msg = format!(
                    "421 4.4.2 {} Timeout waiting for client input\r\n",
                    self.config.hostname
                );
                self.send(msg.as_bytes()).await?;
                Ok(Line::Closed)
            }
            None => {
                self.closed_for_new().await?;
                Ok(Line::Closed)
            }
        }
    }

    /// Tells a session that has not logged in that its slot went to a new connection.
    async fn closed_for_new(&mut self) -> io::Result<()> {
        let msg = format!(
            "421 4.3.2 {} Too many connections: closing this one, which has not logged in\r\n",
            self.config.hostname
        );
        self.send(msg.as_bytes()).await
    }

    /// The session logged in: it no longer waits (it is served). `false` when it was closed for
    /// a new connection first (and told so): it must end.
    async fn served(&mut self) -> io::Result<bool> {
        if self.waiting.take().is_some_and(|seat| !seat.leave()) {
            self.closed_for_new().await?;
            return Ok(false);
        }
        Ok(true)
    }
}

#[derive(Default)]
struct State {
    greeted: bool,
    authenticated: bool,
    device: Option<String>,
    from: Option<String>,
    rcpts: Vec<String>,
}

impl State {
    fn reset(&mut self) {
        self.from = None;
        self.rcpts.clear();
    }
}

/// Outcome of handling one command.
enum Flow {
    Continue,
    Close,
}

fn flow(keep: bool) -> Flow {
    if keep { Flow::Continue } else { Flow::Close }
}

/// Runs one session; `waiting`: its seat among the connections a new one may close, until it
/// logs in (`None` for a known source).
pub(super) async fn run<H: IngressHandler>(
    stream: TcpStream,
    peer: SocketAddr,
    config: &IngressConfig,
    handler: &H,
    mut stop: watch::Receiver<bool>,
    waiting: Option<Seat>,
) -> io::Result<()> {
    let mut conn = Conn {
        io: BufReader::with_capacity(READ_BUFFER, Stream::Plain(stream)),
        tls: false,
        config,
        errors: 0,
        waiting,
    };
    let mut state = State {
        device: handler.device_for_peer(peer),
        ..State::default()
    };
    conn.reply(&format!(
        "220 {} ESMTP tokenfleet-agent ready",
        config.hostname
    ))
    .await?;
    loop {
        let line = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => None,
            line = conn.read() => Some(line?),
        };
        let Some(line) = line else {
            conn.reply(&format!(
                "421 4.3.2 {} Service shutting down",
                config.hostname
            ))
            .await?;
            return Ok(());
        };
        let line = match line {
            Line::Closed => return Ok(()),
            Line::TooLong => {
                if !conn.reply("500 5.5.2 Line too long").await? {
                    return Ok(());
                }
                continue;
            }
            Line::Text(line) => line,
        };
        if let Flow::Close = command(&mut conn, &mut state, peer, handler, &line).await? {
            return Ok(());
        }
    }
}

async fn command<H: IngressHandler>(
    conn: &mut Conn<'_>,
    state: &mut State,
    peer: SocketAddr,
    handler: &H,
    line: &[u8],
) -> io::Result<Flow> {
    let text = command_text(line);
    let cfg = conn.config;
    let keep = match Command::parse(&text) {
        Command::Ehlo("") => conn.reply("501 5.5.4 Syntax: EHLO hostname").await?,
        Command::Ehlo(args) => {
            state.greeted = true;
            state.reset();
            let mut lines = vec![
                format!("{} greets {}", cfg.hostname, printable_name(args)),
                format!("SIZE {}", cfg.max_message_size),
                "8BITMIME".to_owned(),
                "PIPELINING".to_owned(),
                "ENHANCEDSTATUSCODES".to_owned(),
            ];
            if cfg.tls.is_some() && !conn.tls {
                lines.push("STARTTLS".to_owned());
            }
            if auth_offered(conn) {
                lines.push("AUTH PLAIN LOGIN".to_owned());
            }
            let last = lines.len() - 1;
            let reply: Vec<String> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                .collect();
            conn.reply(&reply.join("\n")).await?
        }
        Command::Helo("") => conn.reply("501 5.5.4 Syntax: HELO hostname").await?,
        Command::Helo(_) => {
            state.greeted = true;
            state.reset();
            conn.reply(&format!("250 {}", cfg.hostname)).await?
        }
        Command::Mail(args) => mail(conn, state, handler, args).await?,
        Command::Rcpt(args) => rcpt(conn, state, args).await?,
        Command::Data(args) => return data(conn, state, handler, args).await,
        Command::Auth { mechanism, initial } => {
            return auth(conn, state, peer, handler, &mechanism, initial).await;
        }
        Command::Rset => {
            state.reset();
            conn.reply("250 2.0.0 Ok").await?
        }
        Command::Noop => conn.reply("250 2.0.0 Ok").await?,
        Command::Vrfy => {
            conn.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
                .await?
        }
        Command::Help => {
            conn.reply("214 2.0.0 Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY")
                .await?
        }
        Command::Quit => {
            conn.reply(&format!("221 2.0.0 {} Bye", cfg.hostname))
                .await?;
            return Ok(Flow::Close);
        }
        Command::StartTls(args) if cfg.tls.is_some() => {
            return starttls(conn, state, peer, handler, args).await;
        }
        Command::StartTls(_) | Command::NotImplemented => {
            conn.reply("502 5.5.1 Command not implemented").await?
        }
        Command::Empty => conn.reply("500 5.5.2 Syntax error, empty command").await?,
        Command::Unknown => conn.reply("500 5.5.1 Command unrecognized").await?,
    };
    Ok(flow(keep))
}

/// The spool is over its quota (RFC 3463 X.3.1 "mail system full"); the client tries later.
const SPOOL_FULL: &str =
    "452 4.3.1 Insufficient system storage: the agent's spool is full, try again later";

async fn mail<H: IngressHandler>(
    conn: &mut Conn<'_>,
    state: &mut State,
    handler: &H,
    args: &str,
) -> io::Result<bool> {
    if !state.greeted {
        return conn.reply("503 5.5.1 Send EHLO or HELO first").await;
    }
    if state.from.is_some() {
        return conn.reply("503 5.5.1 Nested MAIL command").await;
    }
    if conn.config.require_tls && !conn.tls {
        return conn.reply(MUST_STARTTLS).await;
    }
    if conn.config.require_auth && state.device.is_none() {
        return conn.reply("530 5.7.0 Authentication required").await;
    }
    let Some((addr, params)) = parse_path(args, "FROM:") else {
        return conn.reply("501 5.5.4 Syntax: MAIL FROM:<address>").await;
    };
    let room = handler.room();
    if room == Some(0) {
        return conn.reply(SPOOL_FULL).await;
    }
    for param in mail_params(params) {
        match param {
            MailParam::Size(size) if size > conn.config.max_message_size as u64 => {
                return conn
                    .reply("552 5.3.4 Message size exceeds fixed maximum message size")
                    .await;
            }
            MailParam::Size(size) if room.is_some_and(|room| size > room) => {
                return conn.reply(SPOOL_FULL).await;
            }
            MailParam::Size(_) | MailParam::Body | MailParam::Auth => {}
            MailParam::BadSize => return conn.reply("501 5.5.4 Bad SIZE parameter").await,
            MailParam::Unsupported => {
                return conn.reply("555 5.5.4 Unsupported MAIL parameter").await;
            }
        }
    }
    // A mail transaction without a login (`require_auth` off) is served from here on.
    if !conn.served().await? {
        return Ok(false);
    }
    state.from = Some(addr.to_owned());
    conn.reply("250 2.1.0 Ok").await
}

async fn rcpt(conn: &mut Conn<'_>, state: &mut State, args: &str) -> io::Result<bool> {
    if state.from.is_none() {
        return conn.reply("503 5.5.1 Need MAIL before RCPT").await;
    }
    let Some((addr, _params)) = parse_path(args, "TO:") else {
        return conn.reply("501 5.5.4 Syntax: RCPT TO:<address>").await;
    };
    if addr.is_empty() {
        return conn.reply("501 5.1.3 Empty recipient address").await;
    }
    if state.rcpts.len() >= conn.config.max_recipients {
        return conn.reply("452 4.5.3 Too many recipients").await;
    }
    state.rcpts.push(addr.to_owned());
    conn.reply("250 2.1.5 Ok").await
}

async fn data<H: IngressHandler>(
    conn: &mut Conn<'_>,
    state: &mut State,
    handler: &H,
    args: &str,
) -> io::Result<Flow> {
    if !args.is_empty() {
        return Ok(flow(conn.reply("501 5.5.4 Syntax: DATA").await?));
    }
    if state.from.is_none() {
        return Ok(flow(conn.reply("503 5.5.1 Need MAIL command").await?));
    }
    if state.rcpts.is_empty() {
        return Ok(flow(conn.reply("503 5.5.1 Need RCPT command").await?));
    }
    if !conn.reply("354 End data with <CR><LF>.<CR><LF>").await? {
        return Ok(Flow::Close);
    }
    let mut sink = MessageSink::new(
        conn.config.max_message_size,
        conn.config.message_memory,
        handler.tail_path(),
        handler.room(),
    );
    // One more byte than a command line: the dot a client adds when it stuffs a full line.
    let mut scanner = DataScanner::new(conn.config.max_line_length + 1);
    let mut block = Vec::with_capacity(DATA_BLOCK + READ_BUFFER);
    loop {
        // Disconnect or timeout mid-DATA: nothing is queued (a tail file is removed).
        if !conn.fill().await? {
            return Ok(Flow::Close);
        }
        let (taken, event) = scanner.feed(conn.io.buffer(), &mut block);
        conn.io.consume(taken);
        if block.len() >= DATA_BLOCK || event != DataEvent::More {
            sink.push_block(&block).await;
            block.clear();
        }
        match event {
            DataEvent::More => {}
            DataEvent::LineTooLong => sink.refuse(Refused::LineTooLong),
            DataEvent::End => break,
        }
    }
    drop(block);
    let received = sink.finish().await;
    let envelope = Envelope {
        device: state
            .device
            .clone()
            .unwrap_or_else(|| "unauthenticated".to_owned()),
        from: state.from.take().unwrap_or_default(),
        rcpts: std::mem::take(&mut state.rcpts),
        mailbox: String::new(),
        user_address: String::new(),
    };
    state.reset();
    let keep = match received {
        Err(Refused::LineTooLong) => conn.reply("500 5.5.2 Line too long").await?,
        Err(Refused::TooBig) => {
            conn.reply("552 5.3.4 Message size exceeds fixed maximum message size")
                .await?
        }
        Err(Refused::HeaderTooBig) => {
            conn.reply(&format!(
                "552 5.3.4 Message header block exceeds {} bytes",
                conn.config.message_memory
            ))
            .await?
        }
        Err(Refused::NoRoom) => conn.reply(SPOOL_FULL).await?,
        Err(Refused::Io(e)) => {
            tracing::error!(error = %e, "storing an arriving message failed");
            conn.reply("451 4.3.0 Local error in processing, try again later")
                .await?
        }
        Ok(message) => {
            let device = envelope.device.clone();
            match handler.deliver(envelope, message).await {
                Ok(id) => conn.reply(&format!("250 2.0.0 Ok: queued as {id}")).await?,
                Err(DeliverError::Temporary(e)) => {
                    tracing::warn!(error = %e, "message not accepted");
                    conn.reply("451 4.3.0 Local error in processing, try again later")
                        .await?
                }
                Err(DeliverError::Rejected { code, text }) => {
                    let code = if (400..600).contains(&code) {
                        code
                    } else {
                        554
                    };
                    // One line: the handler's text must not smuggle in further replies.
                    let text: String = text
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    tracing::info!(%device, code, reply = %text, "message refused");
                    conn.reply(&format!("{code} {text}")).await?
                }
            }
        }
    };
    Ok(flow(keep))
}

/// Why a message in `DATA` is not taken (the rest of it is read and discarded).
enum Refused {
    LineTooLong,
    TooBig,
    HeaderTooBig,
    NoRoom,
    Io(io::Error),
}

/// Collects a message in `DATA`: the header block and the first `memory` bytes in memory, the
/// rest streamed to a tail file (when the handler gives a path). The first problem wins; later
/// lines are only counted.
struct MessageSink {
    max: usize,
    memory: usize,
    tail_path: Option<std::path::PathBuf>,
    room: Option<u64>,
    head: Vec<u8>,
    in_header: bool,
    tail: Option<(TailFile, tokio::io::BufWriter<tokio::fs::File>)>,
    len: u64,
    refused: Option<Refused>,
}

impl MessageSink {
    fn new(
        max: usize,
        memory: usize,
        tail_path: Option<std::path::PathBuf>,
        room: Option<u64>,
    ) -> Self {
        Self {
            max,
            memory,
            tail_path,
            room,
            head: Vec::new(),
            in_header: true,
            tail: None,
            len: 0,
            refused: None,
        }
    }

    fn refuse(&mut self, why: Refused) {
        if self.refused.is_none() {
            self.refused = Some(why);
            self.head = Vec::new();
            // Dropping the tail file removes it.
            self.tail = None;
        }
    }

    /// Takes complete lines of content, each ending with CRLF (what [`DataScanner`] gives). The
    /// header block, and a block that crosses the size limit or the spool's room, go line by
    /// line ([`MessageSink::push`]: the header's end and memory limit, the refusal's reason);
    /// the rest of the body in one piece.
    async fn push_block(&mut self, block: &[u8]) {
        let limit = (self.max as u64).min(self.room.unwrap_or(u64::MAX));
        let mut rest = block;
        while !rest.is_empty() && self.refused.is_none() {
            if !self.in_header && self.len + rest.len() as u64 <= limit {
                self.len += rest.len() as u64;
                return self.store_body(rest).await;
            }
            let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
            let line = &rest[..end];
            self.push(line.strip_suffix(b"\r\n").unwrap_or(line)).await;
            rest = &rest[end..];
        }
    }

    /// Body bytes within the limits: into memory up to `memory` bytes in all (everything when
    /// there is no tail file), the rest to the tail file.
    async fn store_body(&mut self, bytes: &[u8]) {
        let mut bytes = bytes;
        if self.tail.is_none() {
            let fit = if self.tail_path.is_none() {
                bytes.len()
            } else {
                self.memory.saturating_sub(self.head.len()).min(bytes.len())
            };
            self.head.extend_from_slice(&bytes[..fit]);
            bytes = &bytes[fit..];
        }
        if !bytes.is_empty() {
            self.write_tail(&[bytes]).await;
        }
    }

    /// One line of content (without its CRLF).
    async fn push(&mut self, line: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        let n = line.len() as u64 + 2;
        if self.len + n > self.max as u64 {
            return self.refuse(Refused::TooBig);
        }
        if self.room.is_some_and(|room| self.len + n > room) {
            return self.refuse(Refused::NoRoom);
        }
        self.len += n;
        let to_memory = self.tail.is_none()
            && (self.in_header
                || self.tail_path.is_none()
                || self.head.len() + line.len() + 2 <= self.memory);
        if self.in_header && line.is_empty() {
            self.in_header = false;
        }
        if to_memory {
            if self.in_header && self.head.len() + line.len() + 2 > self.memory {
                return self.refuse(Refused::HeaderTooBig);
            }
            self.head.extend_from_slice(line);
            self.head.extend_from_slice(b"\r\n");
            return;
        }
        self.write_tail(&[line, b"\r\n"]).await;
    }

    /// Appends `parts` to the tail file, creating it first if needed.
    async fn write_tail(&mut self, parts: &[&[u8]]) {
        if self.tail.is_none() {
            let Some(path) = self.tail_path.take() else {
                return self.refuse(Refused::Io(io::Error::other("no tail file")));
            };
            match TailFile::create(path) {
                Ok((tail, file)) => {
                    // Blocks of DATA_BLOCK bytes pass through; single lines are gathered.
                    let writer = tokio::io::BufWriter::with_capacity(
                        8 * 1024,
                        tokio::fs::File::from_std(file),
                    );
                    self.tail = Some((tail, writer));
                }
                Err(e) => return self.refuse(Refused::Io(e)),
            }
        }
        if let Some((_, writer)) = self.tail.as_mut() {
            use tokio::io::AsyncWriteExt as _;
            let written = async {
                for part in parts {
                    writer.write_all(part).await?;
                }
                Ok::<_, io::Error>(())
            }
            .await;
            if let Err(e) = written {
                self.refuse(Refused::Io(e));
            }
        }
    }

    async fn finish(mut self) -> Result<Incoming, Refused> {
        if let Some(why) = self.refused.take() {
            return Err(why);
        }
        let tail = match self.tail.take() {
            Some((tail, mut writer)) => {
                use tokio::io::AsyncWriteExt as _;
                writer.flush().await.map_err(Refused::Io)?;
                let mut file = writer.into_inner();
                file.flush().await.map_err(Refused::Io)?;
                drop(file);
                Some(tail)
            }
            None => None,
        };
        Ok(Incoming {
            head: self.head,
            tail,
        })
    }
}

/// Reads one SASL response line and base64-decodes it. `Err(reply)` is the error to send.
async fn sasl_response(
    conn: &mut Conn<'_>,
    challenge: &str,
) -> io::Result<Result<Vec<u8>, &'static str>> {
    conn.send(format!("334 {challenge}\r\n").as_bytes()).await?;
    match conn.read().await? {
        Line::Closed => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client left during AUTH",
        )),
        Line::TooLong => Ok(Err("500 5.5.2 Line too long")),
        Line::Text(line) => Ok(sasl::decode_response(&line).map_err(SaslError::smtp_reply)),
    }
}

async fn auth<H: IngressHandler>(
    conn: &mut Conn<'_>,
    state: &mut State,
    peer: SocketAddr,
    handler: &H,
    mechanism: &str,
    initial: Option<&str>,
) -> io::Result<Flow> {
    if !state.greeted {
        return Ok(flow(conn.reply("503 5.5.1 Send EHLO first").await?));
    }
    if conn.config.require_tls && !conn.tls {
        return Ok(flow(conn.reply(MUST_STARTTLS).await?));
    }
    if !auth_offered(conn) {
        return Ok(flow(
            conn.reply("538 5.7.11 Encryption required for requested authentication mechanism")
                .await?,
        ));
    }
    if state.authenticated {
        return Ok(flow(conn.reply("503 5.5.1 Already authenticated").await?));
    }
    if state.from.is_some() {
        return Ok(flow(
            conn.reply("503 5.5.1 AUTH not allowed during a mail transaction")
                .await?,
        ));
    }
    let credentials = match mechanism {
        "PLAIN" => {
            let response = match initial {
                Some(i) => sasl::decode_response(i.as_bytes()).map_err(SaslError::smtp_reply),
                None => match sasl_response(conn, "").await {
                    Ok(r) => r,
                    Err(_) => return Ok(Flow::Close),
                },
            };
            response.and_then(|bytes| {
                sasl::parse_plain(&bytes)
                    .map(|plain| (plain.user.to_vec(), plain.password.to_vec()))
                    .map_err(SaslError::smtp_reply)
            })
        }
        "LOGIN" => {
            let user = match initial {
                Some(i) => sasl::decode_response(i.as_bytes()).map_err(SaslError::smtp_reply),
                None => match sasl_response(conn, "VXNlcm5hbWU6").await {
                    Ok(r) => r,
                    Err(_) => return Ok(Flow::Close),
                },
            };
            match user {
                Ok(user) => match sasl_response(conn, "UGFzc3dvcmQ6").await {
                    Ok(pass) => pass.map(|p| (user, p)),
                    Err(_) => return Ok(Flow::Close),
                },
                Err(e) => Err(e),
            }
        }
        "" => Err("501 5.5.4 Syntax: AUTH mechanism"),
        _ => Err("504 5.5.4 Unrecognized authentication type"),
    };
    let (user, pass) = match credentials {
        Ok(c) => c,
        Err(reply) => return Ok(flow(conn.reply(reply).await?)),
    };
    let (Ok(user), Ok(pass)) = (String::from_utf8(user), String::from_utf8(pass)) else {
        return Ok(flow(
            conn.reply("501 5.5.2 Credentials are not UTF-8").await?,
        ));
    };
    let guard = std::sync::Arc::clone(&conn.config.login_guard);
    if let Admission::LockedOut {
        retry_after,
        source,
    } = guard.check(peer.ip(), &user)
    {
        tracing::info!(%peer, locked = if source { "source" } else { "user name" }, "smtp ingress login refused: locked out");
        conn.config
            .metrics
            .login(LoginProtocol::Smtp, Login::LockedOut);
        conn.reply(&format!(
            "421 4.7.0 {} Too many failed logins from your address or for this user; try again in {} seconds",
            conn.config.hostname,
            retry_after.as_secs().max(1)
        ))
        .await?;
        return Ok(Flow::Close);
    }
    match handler
        .authenticate(peer, user.clone(), Password::new(pass))
        .await
    {
        Some(device) => {
            guard.succeeded(peer.ip(), &user);
            conn.config.metrics.login(LoginProtocol::Smtp, Login::Ok);
            if !conn.served().await? {
                return Ok(Flow::Close);
            }
            state.authenticated = true;
            state.device = Some(device);
            Ok(flow(
                conn.reply("235 2.7.0 Authentication successful").await?,
            ))
        }
        None => {
            tracing::info!(%peer, "smtp ingress authentication failed");
            conn.config
                .metrics
                .login(LoginProtocol::Smtp, Login::Failed);
            let delay = guard.failed(peer.ip(), &user);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(flow(
                conn.reply("535 5.7.8 Authentication credentials invalid")
                    .await?,
            ))
        }
    }
}

const MUST_STARTTLS: &str = "530 5.7.0 Must issue a STARTTLS command first";

/// Whether `AUTH PLAIN`/`LOGIN` are offered on this connection now.
fn auth_offered(conn: &Conn<'_>) -> bool {
    conn.tls || (conn.config.allow_plaintext_auth && !conn.config.require_tls)
}

/// `STARTTLS` (RFC 3207): `220`, the handshake, and a fresh session (the client must `EHLO`
/// again; authentication and transaction are forgotten; bytes pipelined after the command are
/// discarded, so nothing sent in clear is taken as if it came over TLS).
async fn starttls<H: IngressHandler>(
    conn: &mut Conn<'_>,
    state: &mut State,
    peer: SocketAddr,
    handler: &H,
    args: &str,
) -> io::Result<Flow> {
    let Some(tls) = conn.config.tls.clone() else {
        return Ok(flow(conn.reply("502 5.5.1 Command not implemented").await?));
    };
    if conn.tls {
        return Ok(flow(conn.reply("503 5.5.1 TLS already active").await?));
    }
    if !args.is_empty() {
        return Ok(flow(conn.reply("501 5.5.4 Syntax: STARTTLS").await?));
    }
    conn.reply("220 2.0.0 Ready to start TLS").await?;
    let io = std::mem::replace(&mut conn.io, BufReader::new(Stream::Gone));
    if !io.buffer().is_empty() {
        tracing::info!(%peer, bytes = io.buffer().len(), "discarding input pipelined after STARTTLS");
    }
    let Stream::Plain(tcp) = io.into_inner() else {
        return Ok(Flow::Close);
    };
    match tokio::time::timeout(conn.config.command_timeout, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => {
            conn.io = BufReader::with_capacity(READ_BUFFER, Stream::Tls(Box::new(stream)));
            conn.tls = true;
            *state = State {
                device: handler.device_for_peer(peer),
                ..State::default()
            };
            Ok(Flow::Continue)
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "smtp ingress tls handshake failed");
            Ok(Flow::Close)
        }
        Err(_) => {
            tracing::info!(%peer, "smtp ingress tls handshake timed out");
            Ok(Flow::Close)
        }
    }
}
