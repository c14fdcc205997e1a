//! Connection limits of the broker's listeners and the HTTP server loop that applies the HTTP
//! limits of `[limits]` (see [`crate::config::ListenerLimits`]).
//!
//! [`limited_incoming`] accepts TCP connections for tonic while at most `max` are open: every
//! accepted socket carries a semaphore permit that is released when the connection is dropped,
//! and a connection over the limit is accepted and closed at once (the client sees a reset
//! rather than a silent backlog; the warning is logged at most once a minute per listener).
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

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

impl Connected for LimitedStream {
    // The TCP stream's own info, so tonic's TLS layer still exposes peer certificates
    // (`Request::peer_certs` looks for `TlsConnectInfo<TcpConnectInfo>`).
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts connections from `listener`, at most `max` open at once; see the module documentation.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    name: &'static str,
    last_warning: AtomicU64,
}

impl Acceptor {
    fn new(listener: TcpListener, max: usize, name: &'static str) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            max,
            name,
            last_warning: AtomicU64::new(0),
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
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    // TCP options stay as the listener gave them (as tonic's own
                    // `TcpListenerStream` path does).
                    return LimitedStream { io, _slot: slot };
                }
                Err(_) => {
                    drop(io);
                    self.warn_full(peer);
                }
            }
        }
    }

    fn warn_full(&self, peer: std::net::SocketAddr) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LIMIT_WARNING_EVERY_SECS
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                listener = self.name,
                max_connections = self.max,
                %peer,
                "connection limit reached: closing new connections (limits.{}_max_connections)",
                self.name
            );
        }
    }
}

/// The gRPC listener's connections for tonic's `serve_with_incoming_shutdown`, at most `max`
/// open at once.
pub fn limited_incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = Result<LimitedStream, io::Error>> + Send + 'static {
    let acceptor = Arc::new(Acceptor::new(listener, max, "grpc"));
    futures::stream::unfold(acceptor, |acceptor| async move {
        let stream = acceptor.accept().await;
        Some((Ok(stream), acceptor))
    })
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
