//! The legacy SMTP ingress: the server side of RFC 5321 that printers and scanners submit to on
//! the LAN, with optional `STARTTLS` (RFC 3207, [`IngressTls`]), `AUTH PLAIN`/`LOGIN` against
//! per-device local credentials (or a per-device source allowlist of addresses and CIDR ranges),
//! handing each message to an [`IngressHandler`] — normally [`LocalDevices`], which applies the
//! device's [`SenderPolicy`] and stores it in the [`Spool`](crate::spool::Spool).
//!
//! TLS: with [`IngressConfig::tls`] set, `STARTTLS` is advertised; after the handshake the
//! session starts over (the client must `EHLO` again; an earlier `AUTH` is forgotten, bytes the
//! client pipelined behind `STARTTLS` are discarded). [`IngressConfig::require_tls`] refuses
//! `AUTH` and `MAIL` before it with `530 5.7.0 Must issue a STARTTLS command first`.
//! [`IngressConfig::allow_plaintext_auth`] decides whether `AUTH PLAIN`/`LOGIN` are offered on a
//! connection without TLS: printers on a LAN often cannot do TLS at all, so it defaults to
//! allowed; set it to `false` wherever the devices can use `STARTTLS` (the password then never
//! crosses the network in clear; a plain-text `AUTH` gets `538 5.7.11`).
//!
//! `250` after `DATA` is sent only once the handler returned, i.e. after the spool fsync. The
//! session never panics on input: over-long lines get `500 5.5.2`, bad base64 `501 5.5.2`,
//! sequence errors `503 5.5.1`, and a client that keeps erring or stays silent is disconnected
//! with `421`.
//!
//! Limits (all in [`IngressConfig`], set from the agent configuration's `[ingress_limits]`):
//! sessions at once, in total and per source ([`SessionLimits`]; over them a connection gets
//! `421 4.7.0` and is closed — except that over the total, a session that has not logged in
//! from a source that is not known makes room: the one that has waited longest gets `421 4.3.2`
//! and is closed, and the new connection takes its slot); idle time per command ([`IngressConfig::command_timeout`]);
//! failed logins slowed down and then locked out per source and user ([`LoginGuard`]; a locked
//! login gets `421 4.7.0 … try again in N seconds` without its password being checked);
//! concurrent password hashing ([`PasswordChecker`]); a message's memory
//! ([`IngressConfig::message_memory`]; the rest streams to the spool's `tmp/`); and the spool's
//! quota (`452 4.3.1` at `MAIL` when the spool is full, or after `DATA` when the message does
//! not fit).

mod guard;
mod handler;
mod handoff;
mod password;
mod sender;
mod session;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_listen::Waiting;
use tokio::net::TcpListener;

pub use guard::{Admission, LoginGuard, LoginLimits};
pub use handler::{LocalDevice, LocalDevices, check_devices, parse_source};
pub use handoff::{DeliverError, Incoming, IngressHandler};
pub use password::{Password, PasswordChecker, PasswordSettings};
pub use sender::{SenderPolicy, apply_sender_policy};
pub use tls::{IngressTls, IngressTlsError};

pub use crate::line_server::SessionLimits;
use crate::line_server::{self, Refusal};
use crate::metrics::{AgentMetrics, Listener};

/// Settings of the ingress server.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Largest message accepted (advertised as `SIZE`); larger ones get `552 5.3.4`.
    pub max_message_size: usize,
    /// Longest command or data line, CRLF included; longer ones get `500 5.5.2`.
    pub max_line_length: usize,
    /// Longest wait for the next line from the client; then `421 4.4.2` and close.
    pub command_timeout: Duration,
    /// Error replies after which the session is closed with `421 4.7.0`.
    pub max_errors: u32,
    /// Most recipients per message (`452 4.5.3` after that).
    pub max_recipients: usize,
    /// Whether `MAIL` needs prior authentication (or an allowlisted source address).
    pub require_auth: bool,
    /// The certificate for `STARTTLS`; `None` = no TLS (`STARTTLS` answers `502`).
    pub tls: Option<IngressTls>,
    /// Refuse `AUTH` and `MAIL` until `STARTTLS` succeeded (needs [`IngressConfig::tls`]).
    pub require_tls: bool,
    /// Offer and accept `AUTH PLAIN`/`LOGIN` on a connection without TLS (default `true`: LAN
    /// printers often have no TLS; see the module documentation).
    pub allow_plaintext_auth: bool,
    /// Sessions at once, in total and per source.
    pub limits: SessionLimits,
    /// Bytes of a message held in memory while it arrives (the header block must fit; it gets
    /// `552 5.3.4` otherwise); the rest streams to [`IngressHandler::tail_path`].
    pub message_memory: usize,
    /// Failed-login throttling (share one between the SMTP and POP3 listeners).
    pub login_guard: Arc<LoginGuard>,
    /// Where logins and the connections the limits close are counted.
    pub metrics: AgentMetrics,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            hostname: "tokenfleet-agent".to_owned(),
            max_message_size: 35 * 1024 * 1024,
            max_line_length: 1000,
            command_timeout: Duration::from_secs(300),
            max_errors: 10,
            max_recipients: 100,
            require_auth: true,
            tls: None,
            require_tls: false,
            allow_plaintext_auth: true,
            limits: SessionLimits::default(),
            message_memory: 64 * 1024,
            login_guard: Arc::new(LoginGuard::default()),
            metrics: AgentMetrics::default(),
        }
    }
}

/// The SMTP ingress server.
#[derive(Debug)]
pub struct IngressServer;

/// The reply to a connection over a session limit (RFC 5321 §3.1: `421` instead of the greeting).
fn busy(refusal: Refusal) -> &'static [u8] {
    match refusal {
        Refusal::Total => {
            b"421 4.7.0 tokenfleet-agent Too many connections, try again later\r\n"
        }
        Refusal::PerSource => {
            b"421 4.7.0 tokenfleet-agent Too many connections from your address, try again later\r\n"
        }
    }
}

impl IngressServer {
    /// Serves `listener` until `shutdown` completes, then stops accepting, tells idle sessions
    /// `421 4.3.2` and waits for running sessions to end (a message in `DATA` is not queued unless
    /// it completes).
    pub async fn serve<H: IngressHandler>(
        listener: TcpListener,
        config: IngressConfig,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        if config.require_tls && config.tls.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "ingress require_tls is set but no tls certificate is configured",
            ));
        }
        let config = Arc::new(config);
        let (guard, devices) = (Arc::clone(&config.login_guard), Arc::clone(&handler));
        line_server::serve(
            listener,
            shutdown,
            "smtp ingress",
            line_server::Gate {
                limits: config.limits,
                busy,
                // A device's allowlisted address, or one that logged in successfully lately.
                known: Box::new(move |peer| {
                    guard.known_source(peer.ip()) || devices.device_for_peer(peer).is_some()
                }),
                // Sessions from other sources wait until they log in.
                waiting: Some(Arc::new(Waiting::default())),
                closed: config.metrics.closed_by(Listener::Smtp),
            },
            move |stream, peer, stop, seat| {
                let config = Arc::clone(&config);
                let handler = Arc::clone(&handler);
                async move { session::run(stream, peer, &config, &*handler, stop, seat).await }
            },
        )
        .await
    }
}
