//! Connection limits of the broker's listeners and the HTTP server loop that applies the HTTP
//! limits of `[limits]` (see [`crate::config::ListenerLimits`]).
//!
//! [`grpc_incoming`] accepts TCP connections for tonic while at most `grpc_max_connections` are
//! open: every accepted socket carries a semaphore permit that is released when the connection is
//! dropped, and a connection over the limit is accepted and closed at once (the client sees a
//! reset rather than a silent backlog; the warning is logged at most once a minute per limit).
//!
//! With `[tls]` it also does the TLS handshake (tonic's own TLS layer would do it after the
//! connection is handed over, where nothing can count it): a connection that presents no client
//! certificate — an admin client with an API key, an agent enrolling, or anyone who can reach the
//! port — takes one of `grpc_max_anonymous_connections` slots besides its listener slot, and over
//! that limit its first call is answered `RESOURCE_EXHAUSTED` naming the limit and the connection
//! is closed with an HTTP/2 `GOAWAY` (`ENHANCE_YOUR_CALM`). So connections that prove nothing
//! cannot hold the slots agents need; an agent's certificate is verified against the agent CA
//! during the handshake, as tonic did.
//!
//! [`serve_http`] runs the axum router on hyper's HTTP/1.1 connection builder, because
//! `axum::serve` offers no header-read timeout: a client that sends its request header a byte at
//! a time (or nothing at all, or keeps an idle keep-alive connection) is disconnected after
//! `http_header_read_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tonic::transport::server::Connected;

use crate::config::ListenerLimits;

/// A pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Seconds between two "connection limit reached" warnings of one listener.
const LIMIT_WARNING_EVERY_SECS: u64 = 60;

/// An accepted TCP connection holding one of its listener's connection slots until dropped.
#[derive(Debug)]
pub struct LimitedStream {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A number of slots, each held by one connection until it is dropped, and when the last "limit
/// reached" warning about them was logged.
#[derive(Debug)]
struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    last_warning: AtomicU64,
}

impl Limit {
    fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            last_warning: AtomicU64::new(0),
        }
    }

    /// A free slot, if any.
    fn take(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// Whether a "limit reached" warning may be logged now (at most one per
    /// [`LIMIT_WARNING_EVERY_SECS`]); takes the turn when it is.
    fn warning_due(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let before = self.last_warning.load(Ordering::Relaxed);
        now.saturating_sub(before) >= LIMIT_WARNING_EVERY_SECS
            && self
                .last_warning
                .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Accepts connections from `listener` within `limit`; see the module documentation.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    limit: Limit,
    name: &'static str,
}

impl Acceptor {
    fn new(listener: TcpListener, max: usize, name: &'static str) -> Self {
        Self {
            listener,
            limit: Limit::new(max),
            name,
        }
    }

    /// The next connection within the limit (connections over it are closed on the spot).
    async fn accept(&self) -> LimitedStream {
        loop {
            let (io, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = self.name, %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            if let Some(slot) = self.limit.take() {
                // TCP options stay as the listener gave them (as tonic's own
                // `TcpListenerStream` path does).
                return LimitedStream { io, _slot: slot };
            }
            drop(io);
            self.warn_full(peer);
        }
    }

    fn warn_full(&self, peer: std::net::SocketAddr) {
        if self.limit.warning_due() {
            tracing::warn!(
                listener = self.name,
                max_connections = self.limit.max,
                %peer,
                "connection limit reached: closing new connections (limits.{}_max_connections)",
                self.name
            );
        }
    }
}

/// What the gRPC services learn of a connection.
#[derive(Debug, Clone, Default)]
pub struct GrpcPeer {
    /// The client certificate (DER) presented in the TLS handshake and verified there against the
    /// agent CA; `None` without TLS or without a certificate.
    pub leaf: Option<Arc<CertificateDer<'static>>>,
}

/// A gRPC connection as tonic gets it: plain TCP (no `[tls]`) or TLS after its handshake, its
/// listener slot (in the stream), and without a client certificate one of the anonymous slots,
/// held until it is dropped.
#[derive(Debug)]
pub struct GrpcConn {
    io: Either<LimitedStream, Box<tokio_rustls::server::TlsStream<LimitedStream>>>,
    _anonymous: Option<OwnedSemaphorePermit>,
    peer: GrpcPeer,
}

impl GrpcConn {
    fn plain(io: LimitedStream) -> Self {
        Self {
            io: Either::Left(io),
            _anonymous: None,
            peer: GrpcPeer::default(),
        }
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for GrpcConn {
    type ConnectInfo = GrpcPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// The gRPC listener's TLS: the server configuration (client certificates of the agent CA
/// optional) and how long a client may take for its handshake.
#[derive(Clone)]
pub struct GrpcTls {
    /// The rustls server configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// Handshakes taking longer are abandoned.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for GrpcTls {
    // The configuration holds the server's key: not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// How long a connection refused over the anonymous limit is waited on for its first call...
const FIRST_CALL_WAIT: Duration = Duration::from_secs(1);
/// ...and kept in all.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest header list and request body window of a refused connection's call.
const REFUSAL_HEADER_BYTES: u32 = 16 * 1024;

/// Handshakes done and not yet taken by tonic.
const HANDED_OVER: usize = 64;

/// The gRPC listener's connections for tonic's `serve_with_incoming_shutdown`: at most
/// `limits.grpc_max_connections` open at once, and with `tls` the handshake done here, each on
/// its own task, with certificate-less connections held to
/// `limits.grpc_max_anonymous_connections` (see the module documentation).
pub fn grpc_incoming(
    listener: TcpListener,
    limits: &ListenerLimits,
    tls: Option<GrpcTls>,
) -> Pin<Box<dyn Stream<Item = Result<GrpcConn, io::Error>> + Send>> {
    let acceptor = Acceptor::new(listener, limits.grpc_max_connections, "grpc");
    let Some(tls) = tls else {
        return Box::pin(futures::stream::unfold(
            Arc::new(acceptor),
            |acceptor| async move {
                let stream = acceptor.accept().await;
                Some((Ok(GrpcConn::plain(stream)), acceptor))
            },
        ));
    };
    let anonymous = Arc::new(Limit::new(limits.grpc_max_anonymous_connections));
    let acceptor_tls = TlsAcceptor::from(tls.config);
    let (handed, taken) = tokio::sync::mpsc::channel::<GrpcConn>(HANDED_OVER);
    tokio::spawn(async move {
        loop {
            // Ends when tonic drops the stream (the server stopped).
            let stream = tokio::select! {
                stream = acceptor.accept() => stream,
                () = handed.closed() => break,
            };
            let (handed, acceptor_tls, anonymous) =
                (handed.clone(), acceptor_tls.clone(), Arc::clone(&anonymous));
            tokio::spawn(async move {
                if let Some(conn) =
                    handshake(stream, &acceptor_tls, tls.handshake_timeout, &anonymous).await
                {
                    // Fails only when the server has stopped: the connection is dropped.
                    let _ = handed.send(conn).await;
                }
            });
        }
    });
    Box::pin(futures::stream::unfold(taken, |mut taken| async move {
        let conn = taken.recv().await?;
        Some((Ok(conn), taken))
    }))
}

/// The TLS handshake of `stream` within `timeout`, then its anonymous slot if it presented no
/// client certificate; `None` when the handshake failed or the connection was refused.
async fn handshake(
    stream: LimitedStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
    anonymous: &Limit,
) -> Option<GrpcConn> {
    let remote = stream.io.peer_addr().ok();
    let io = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(io)) => io,
        Ok(Err(error)) => {
            tracing::debug!(%error, ?remote, "gRPC TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(?remote, "gRPC TLS handshake timed out");
            return None;
        }
    };
    let leaf = io
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Arc::new(leaf.clone().into_owned()));
    let slot = if leaf.is_some() {
        None
    } else if let Some(slot) = anonymous.take() {
        Some(slot)
    } else {
        if anonymous.warning_due() {
            tracing::warn!(
                max_anonymous_connections = anonymous.max,
                ?remote,
                "gRPC connections without a client certificate at their limit: closing new ones \
                 (limits.grpc_max_anonymous_connections)"
            );
        }
        refuse(io, anonymous.max).await;
        return None;
    };
    Some(GrpcConn {
        io: Either::Right(Box::new(io)),
        _anonymous: slot,
        peer: GrpcPeer { leaf },
    })
}

/// Tells a client over the anonymous limit why it is closed, on HTTP/2 as the client speaks
/// it: a call that arrives within [`FIRST_CALL_WAIT`] is answered `RESOURCE_EXHAUSTED` naming the
/// limit (so `tokenfleetctl` and gRPC clients show the reason), then the connection ends with a
/// `GOAWAY` (`ENHANCE_YOUR_CALM`); all of it within [`REFUSAL_TIMEOUT`].
async fn refuse(io: tokio_rustls::server::TlsStream<LimitedStream>, max: usize) {
    let message = format!(
        "too many gRPC connections without a client certificate are open \
         (limits.grpc_max_anonymous_connections = {max}); try again later"
    );
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async move {
        // One stream, small headers and body window: a refused client holds next to nothing.
        let mut conn = h2::server::Builder::new()
            .max_concurrent_streams(1)
            .max_header_list_size(REFUSAL_HEADER_BYTES)
            .initial_window_size(REFUSAL_HEADER_BYTES)
            .handshake::<_, hyper::body::Bytes>(io)
            .await?;
        if let Ok(Some(Ok((_, mut respond)))) =
            tokio::time::timeout(FIRST_CALL_WAIT, conn.accept()).await
        {
            let _ = respond.send_response(resource_exhausted(&message), true);
            // Graceful: the client finishes sending its call and reads the answer first.
            conn.graceful_shutdown();
        } else {
            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
        }
        while let Some(next) = conn.accept().await {
            if let Ok((_, mut respond)) = next {
                let _ = respond.send_response(resource_exhausted(&message), true);
            }
        }
        Ok::<(), h2::Error>(())
    })
    .await;
}

/// A trailers-only gRPC answer: status `RESOURCE_EXHAUSTED` (8) with `message` (printable ASCII,
/// so it needs no percent-encoding).
fn resource_exhausted(message: &str) -> http::Response<()> {
    let mut response = http::Response::new(());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(value) = http::HeaderValue::from_str(message) {
        headers.insert("grpc-message", value);
    }
    response
}

/// Serves `router` on `listener` with the HTTP limits until `shutdown` completes, then stops
/// accepting and waits for open connections to finish (the caller bounds that wait).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let acceptor = Acceptor::new(listener, limits.http_max_connections, "http");
    // HTTP/1.1 only (health probes, Prometheus, browsers on the consent callback): protocol
    // detection for h2c would read the first bytes without any timeout.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            stream = acceptor.accept() => stream,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are a client's doing (reset, timeout, bad request): nothing to report.
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "HTTP connection ended with an error");
            }
        });
    }
    drop(acceptor);
    graceful.shutdown().await;
    Ok(())
}
