//! The legacy SMTP ingress: the server side of RFC 5321 that printers and scanners submit to on
//! the LAN, with `AUTH PLAIN`/`LOGIN` against per-device local credentials (or a per-device
//! source-address allowlist), handing each message to an [`IngressHandler`] — normally
//! [`LocalDevices`], which stores it in the [`Spool`](crate::spool::Spool).
//!
//! `250` after `DATA` is sent only once the handler returned, i.e. after the spool fsync. The
//! session never panics on input: over-long lines get `500 5.5.2`, bad base64 `501 5.5.2`,
//! sequence errors `503 5.5.1`, and a client that keeps erring or stays silent is disconnected
//! with `421`.

mod handler;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use handler::{LocalDevice, LocalDevices};

use crate::spool::{Envelope, SpoolId};

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
        }
    }
}

/// A password received in `AUTH`. `Debug` prints `[redacted]`.
#[derive(Clone)]
pub struct Password(zeroize::Zeroizing<String>);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(zeroize::Zeroizing::new(password.into()))
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// Why a message could not be accepted; the session answers `451 4.3.0` (try again later).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DeliverError(pub String);

/// What the ingress asks of its owner: who a client is and where messages go.
pub trait IngressHandler: Send + Sync + 'static {
    /// The device allowed to send from `peer` without authenticating, if any.
    fn device_for_peer(&self, peer: SocketAddr) -> Option<String>;

    /// The device whose local credentials these are, if they are valid.
    fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> impl Future<Output = Option<String>> + Send;

    /// Stores a complete message durably. The session replies `250` only after this returns `Ok`.
    fn deliver(
        &self,
        envelope: Envelope,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<SpoolId, DeliverError>> + Send;
}

/// The SMTP ingress server.
#[derive(Debug)]
pub struct IngressServer;

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
        let config = Arc::new(config);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    match accepted {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            let config = Arc::clone(&config);
                            let handler = Arc::clone(&handler);
                            let stop = stop_rx.clone();
                            sessions.spawn(async move {
                                if let Err(e) = session::run(stream, peer, &config, &*handler, stop).await {
                                    tracing::debug!(%peer, error = %e, "smtp ingress session ended with an error");
                                }
                            });
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: log, back off a little, go on.
                            tracing::warn!(error = %e, "smtp ingress accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        let _ = stop_tx.send(true);
        while sessions.join_next().await.is_some() {}
        Ok(())
    }
}
