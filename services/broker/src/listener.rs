//! Connection limits of the broker's listeners and the HTTP server loop that applies the HTTP
//! limits of `[limits]` (see [`crate::config::ListenerLimits`]).
//!
//! [`grpc_incoming`] accepts TCP connections for tonic while at most `grpc_max_connections` are
//! open: every accepted socket carries a semaphore permit that is released when the connection is
//! dropped. When none is free, a new connection takes the slot of the one that has waited longest
//! unserved (below), and when none waits it is accepted and closed at once (the client sees a
//! reset rather than a silent backlog; warnings are logged at most once a minute per limit).
//!
//! With `[tls]` it also does the TLS handshake (tonic's own TLS layer would do it after the
//! connection is handed over, where nothing can count it). A connection that is not served —
//! still in its handshake (10 s at most), or being told it is refused — waits in its slot, and
//! when every slot is taken a new connection closes the one that has waited longest and takes
//! its slot (as nginx reuses its idle connections; the waiting set is `tokenfleet_listen`'s,
//! shared with the agent's metrics listener); only when every open connection is being
//! served is the new one closed at once. So clients that connect and then send nothing, or
//! trickle their hello, cannot keep anyone out: to hold off one honest client an attacker would
//! have to open as many connections as there are free slots within that client's handshake (a
//! few milliseconds), and the connections already served are never touched.
//!
//! A connection that presents no client certificate — an admin client with an API key, an agent
//! enrolling, or anyone who can reach the port — takes one of `grpc_max_anonymous_connections`
//! slots besides its listener slot. Those wait the same way whenever they have no *proven*
//! call in flight: a call whose caller proved who they are (an admin call whose API key was
//! accepted, [`prove_call`]; an enrollment whose one-time code was redeemed, [`call_proof`]),
//! counted by [`AnonymousCallsLayer`] until its response body is done. Over the limit a new one
//! closes the one that has waited longest and takes its slot, so neither idle clients nor
//! clients holding calls that prove nothing — half-open calls that never send their request,
//! `Health/Watch` streams, calls with a bad key — can keep `tokenfleetctl` or an enrolling agent
//! out (an enrollment proves itself once its one-time code is redeemed, so a flood cannot cut it
//! off after that and spend the code for nothing; before, it is one request: to close it, an
//! attacker would have to open as many connections as there are anonymous slots within its
//! milliseconds). Only when every one of them has a proven call in flight is the new
//! connection's first call answered `RESOURCE_EXHAUSTED` naming the limit and the connection
//! closed with an HTTP/2 `GOAWAY` (`ENHANCE_YOUR_CALM`). So connections that prove nothing
//! cannot hold the slots agents or operators need; an agent's certificate is verified against
//! the agent CA during the handshake, as tonic did.
//!
//! [`serve_http`] runs the axum router on hyper's HTTP/1.1 connection builder, because
//! `axum::serve` offers no header-read timeout: a client that sends its request header a byte at
//! a time (or nothing at all, or keeps an idle keep-alive connection) is disconnected after
//! `http_header_read_timeout`. Its connections wait likewise whenever they serve no request, so a
//! full HTTP listener also makes room by closing the one that has waited longest.
//!
//! Each of the three limits counts what it closed in `tokenfleet_listener_connections_closed_total`
//! (`listener` = `grpc`, `grpc_anonymous` or `http`; `reason` = `made_room` for a waiting
//! connection closed for a new one, `refused` for a new one closed because every slot serves),
//! so a flood shows on a dashboard and not only in the once-a-minute warnings.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::CertificateDer;
use tokenfleet_listen::{CallInFlight, Calls, GuardedBody, Seat, Waiting};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::config::ListenerLimits;
use crate::metrics::{LimitCounters, Metrics};

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

/// A number of slots, each held by one connection until it is dropped, when the last "limit
/// reached" warning about them was logged, and the counters of the connections it closed.
#[derive(Debug)]
struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    last_warning: AtomicU64,
    counters: LimitCounters,
}

impl Limit {
    fn new(max: usize, counters: LimitCounters) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            last_warning: AtomicU64::new(0),
            counters,
        }
    }

    /// A free slot, if any.
    fn take(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// A free slot, else the slot of the connection that has waited longest among `waiting`,
    /// closed for it (`true` in the answer); `None` when none is free and none waits, or when
    /// the closed connection's slot went to another new one first and no other came free within
    /// [`SLOT_HANDOVER`].
    async fn take_or_close_longest(
        &self,
        waiting: &Waiting,
    ) -> Option<(OwnedSemaphorePermit, bool)> {
        if let Some(slot) = self.take() {
            return Some((slot, false));
        }
        if !waiting.close_longest() {
            self.counters.refused.inc();
            return None;
        }
        self.counters.made_room.inc();
        let slot = Arc::clone(&self.slots).acquire_owned();
        match tokio::time::timeout(SLOT_HANDOVER, slot).await {
            Ok(Ok(slot)) => Some((slot, true)),
            _ => {
                self.counters.refused.inc();
                None
            }
        }
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

/// Accepts connections from `listener` within `limit`, making room by closing the longest of
/// its `waiting` connections; see the module documentation.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    limit: Limit,
    waiting: Arc<Waiting>,
    name: &'static str,
    /// What its waiting connections wait for, for the log.
    waits_for: &'static str,
}

impl Acceptor {
    /// `name` is the listener's label in the metrics and its key prefix in `[limits]`.
    fn new(
        listener: TcpListener,
        max: usize,
        name: &'static str,
        waits_for: &'static str,
        metrics: &Metrics,
    ) -> Self {
        Self {
            listener,
            limit: Limit::new(max, metrics.limit_counters(name)),
            waiting: Arc::new(Waiting::default()),
            name,
            waits_for,
        }
    }

    /// The next accepted connection, slot or not.
    async fn next(&self) -> (TcpStream, std::net::SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(error) => {
                    tracing::warn!(listener = self.name, %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    /// The next connection within the limit and its peer's address: in a free slot, or in the
    /// slot of the connection that has waited longest (closed for it). Connections that find
    /// neither are closed on the spot.
    async fn accept(&self) -> (LimitedStream, std::net::SocketAddr) {
        loop {
            let (io, peer) = self.next().await;
            if let Some(slot) = self.slot_or_longest_waiting().await {
                // TCP options stay as the listener gave them (as tonic's own
                // `TcpListenerStream` path does).
                return (LimitedStream { io, _slot: slot }, peer);
            }
            drop(io);
            self.warn_full(peer);
        }
    }

    /// A free slot, else the slot of the connection that has waited longest (closed for it);
    /// `None` when no connection waits.
    async fn slot_or_longest_waiting(&self) -> Option<OwnedSemaphorePermit> {
        let (slot, closed_one) = self.limit.take_or_close_longest(&self.waiting).await?;
        if closed_one && self.limit.warning_due() {
            tracing::warn!(
                listener = self.name,
                max_connections = self.limit.max,
                "connection limit reached: closing, for each new connection, the one that has \
                 waited longest {} (limits.{}_max_connections)",
                self.waits_for,
                self.name
            );
        }
        Some(slot)
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
    /// The client's address (the TCP peer's).
    pub remote: Option<std::net::IpAddr>,
    /// The client certificate (DER) presented in the TLS handshake and verified there against the
    /// agent CA; `None` without TLS or without a certificate.
    pub leaf: Option<Arc<CertificateDer<'static>>>,
    /// The proven calls in flight on a TLS connection without a client certificate, counted by
    /// [`AnonymousCallsLayer`] ([`prove_call`]).
    calls: Option<Arc<Calls>>,
}

/// Counts the proven calls in flight on each connection without a client certificate (see
/// [`GrpcPeer`] and [`prove_call`]); calls on other connections pass untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnonymousCallsLayer;

impl<S> tower::Layer<S> for AnonymousCallsLayer {
    type Service = AnonymousCallsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AnonymousCallsService { inner }
    }
}

/// The service of [`AnonymousCallsLayer`].
#[derive(Debug, Clone)]
pub struct AnonymousCallsService<S> {
    inner: S,
}

/// One call on a connection without a client certificate, in the request's extensions and held
/// by its response until the response body is done. It keeps its connection from waiting (from
/// being closed for a new connection) only once it has proven who makes it ([`prove_call`]):
/// a half-open call that never sends its request, a `Health/Watch` stream or a call refused
/// for a bad API key proves nothing, so holding such calls cannot keep anyone out.
#[derive(Debug)]
pub struct AnonymousCall {
    calls: Arc<Calls>,
    /// Set once the call is proven: from then on it counts among the connection's calls.
    proven: std::sync::OnceLock<CallInFlight>,
}

/// The address of `request`'s client (the TCP peer's), when the gRPC listener served it.
pub fn client_ip<T>(request: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<GrpcPeer>()
        .and_then(|p| p.remote)
}

/// Marks `request`'s call as made by a caller who proved who they are (an admin call whose API
/// key was accepted): from now until its response is done, its connection (one without a
/// client certificate) is served, not waiting, and is never closed for a new connection. Does
/// nothing for calls on connections with a certificate or without TLS.
pub fn prove_call<T>(request: &tonic::Request<T>) {
    call_proof(request)();
}

/// [`prove_call`] for later: what proves `request`'s call when run (after the request itself
/// is consumed — an enrollment proves itself only once its one-time code is redeemed).
pub fn call_proof<T>(request: &tonic::Request<T>) -> impl FnOnce() + Send + use<T> {
    let call = request.extensions().get::<Arc<AnonymousCall>>().cloned();
    move || {
        if let Some(call) = call {
            call.proven.get_or_init(|| call.calls.start());
        }
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AnonymousCallsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<GuardedBody<ResBody, Option<Arc<AnonymousCall>>>>;
    type Error = S::Error;
    type Future = CountedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let call = request
            .extensions()
            .get::<GrpcPeer>()
            .and_then(|peer| peer.calls.as_ref())
            .map(|calls| {
                Arc::new(AnonymousCall {
                    calls: Arc::clone(calls),
                    proven: std::sync::OnceLock::new(),
                })
            });
        if let Some(call) = &call {
            request.extensions_mut().insert(Arc::clone(call));
        }
        CountedCall {
            inner: self.inner.call(request),
            call,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future holding its [`AnonymousCall`], handed to the response body.
    #[derive(Debug)]
    pub struct CountedCall<F> {
        #[pin]
        inner: F,
        call: Option<Arc<AnonymousCall>>,
    }
}

impl<F, ResBody, E> Future for CountedCall<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<GuardedBody<ResBody, Option<Arc<AnonymousCall>>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let call = this.call.take();
        Poll::Ready(result.map(|response| response.map(|body| GuardedBody::new(body, call))))
    }
}

/// A gRPC connection as tonic gets it: plain TCP (no `[tls]`) or TLS after its handshake, its
/// listener slot (in the stream), and without a client certificate one of the anonymous slots,
/// held until it is dropped.
#[derive(Debug)]
pub struct GrpcConn {
    io: Either<LimitedStream, Box<tokio_rustls::server::TlsStream<LimitedStream>>>,
    _anonymous: Option<OwnedSemaphorePermit>,
    /// Without a client certificate: fires when a new connection took its anonymous slot.
    closed: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    peer: GrpcPeer,
}

impl GrpcConn {
    fn plain(io: LimitedStream, remote: std::net::SocketAddr) -> Self {
        Self {
            io: Either::Left(io),
            _anonymous: None,
            closed: None,
            peer: GrpcPeer {
                remote: Some(remote.ip()),
                ..GrpcPeer::default()
            },
        }
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // HTTP/2 always keeps a read waiting, so this is where the connection learns it is
        // closed: the error ends it, and dropping it frees its slots.
        if let Some(closed) = &mut this.closed
            && closed.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "idle connection without a client certificate closed for a new one \
                 (limits.grpc_max_anonymous_connections)",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
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

/// How long a new connection waits for the slot of the connection it closed (that one's task
/// only has to drop it).
const SLOT_HANDOVER: Duration = Duration::from_secs(1);

/// The gRPC listener's connections for tonic's `serve_with_incoming_shutdown`: at most
/// `limits.grpc_max_connections` open at once, and with `tls` the handshake done here, each on
/// its own task, a full listener making room by closing the connection that has waited longest
/// unserved, and certificate-less connections held to `limits.grpc_max_anonymous_connections`
/// (see the module documentation).
/// What the limits close is counted in `metrics`.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: &ListenerLimits,
    tls: Option<GrpcTls>,
    metrics: &Metrics,
) -> Pin<Box<dyn Stream<Item = Result<GrpcConn, io::Error>> + Send>> {
    let acceptor = Acceptor::new(
        listener,
        limits.grpc_max_connections,
        "grpc",
        "in its TLS handshake",
        metrics,
    );
    // Without TLS no connection waits (nor can it be told from one being served).
    let Some(tls) = tls else {
        return Box::pin(futures::stream::unfold(acceptor, |acceptor| async move {
            let (stream, remote) = acceptor.accept().await;
            Some((Ok(GrpcConn::plain(stream, remote)), acceptor))
        }));
    };
    let anonymous = Arc::new(Anonymous {
        limit: Limit::new(
            limits.grpc_max_anonymous_connections,
            metrics.limit_counters("grpc_anonymous"),
        ),
        idle: Arc::new(Waiting::default()),
    });
    let (handed, taken) = tokio::sync::mpsc::channel::<GrpcConn>(HANDED_OVER);
    tokio::spawn(async move {
        loop {
            // Ends when tonic drops the stream (the server stopped).
            let (stream, remote) = tokio::select! {
                accepted = acceptor.accept() => accepted,
                () = handed.closed() => break,
            };
            let connection = Handshake {
                stream,
                remote,
                seat: acceptor.waiting.seat(CancellationToken::new()),
            };
            let (tls, anonymous, handed) = (tls.clone(), Arc::clone(&anonymous), handed.clone());
            tokio::spawn(async move {
                if let Some(conn) = connection.run(&tls, &anonymous).await {
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

/// The anonymous slots (`grpc_max_anonymous_connections`) and their connections that have no
/// call in flight, idle longest first.
#[derive(Debug)]
struct Anonymous {
    limit: Limit,
    idle: Arc<Waiting>,
}

/// A connection accepted into its slot, waiting in its `seat` until its handshake is done.
#[derive(Debug)]
struct Handshake {
    stream: LimitedStream,
    remote: std::net::SocketAddr,
    seat: Seat,
}

impl Handshake {
    /// The TLS handshake within the timeout, unless a new connection takes the slot first; then
    /// the anonymous slot if the client presented no certificate. `None` when the handshake
    /// failed or was cut short, or the connection was refused.
    async fn run(self, tls: &GrpcTls, anonymous: &Anonymous) -> Option<GrpcConn> {
        let Self {
            stream,
            remote,
            seat,
        } = self;
        let acceptor = TlsAcceptor::from(Arc::clone(&tls.config));
        let io = tokio::select! {
            done = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream)) => match done {
                Ok(Ok(io)) => io,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %remote, "gRPC TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%remote, "gRPC TLS handshake timed out");
                    return None;
                }
            },
            () = seat.closed().cancelled() => {
                tracing::debug!(%remote, "gRPC TLS handshake closed: its slot went to a new connection");
                return None;
            }
        };
        let leaf = io
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| Arc::new(leaf.clone().into_owned()));
        let (anonymous_slot, calls) = if leaf.is_some() {
            (None, None)
        } else if let Some((slot, closed_one)) =
            anonymous.limit.take_or_close_longest(&anonymous.idle).await
        {
            if closed_one && anonymous.limit.warning_due() {
                tracing::warn!(
                    max_anonymous_connections = anonymous.limit.max,
                    %remote,
                    "gRPC connections without a client certificate at their limit: closing, for \
                     each new one, the one idle longest (limits.grpc_max_anonymous_connections)"
                );
            }
            (Some(slot), Some(Calls::new(&anonymous.idle)))
        } else {
            if anonymous.limit.warning_due() {
                tracing::warn!(
                    max_anonymous_connections = anonymous.limit.max,
                    %remote,
                    "gRPC connections without a client certificate at their limit, all with \
                     calls in flight: closing new ones (limits.grpc_max_anonymous_connections)"
                );
            }
            // Told why while still waiting in the slot: a new connection may cut it short.
            tokio::select! {
                () = refuse(io, anonymous.limit.max) => {}
                () = seat.closed().cancelled() => {}
            }
            return None;
        };
        // Served from here on, unless its slot went to a new connection just now.
        if !seat.leave() {
            return None;
        }
        let closed = calls
            .as_ref()
            .map(|calls| Box::pin(calls.closed().clone().cancelled_owned()));
        Some(GrpcConn {
            io: Either::Right(Box::new(io)),
            _anonymous: anonymous_slot,
            closed,
            peer: GrpcPeer {
                remote: Some(remote.ip()),
                leaf,
                calls,
            },
        })
    }
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

/// The address of the client an HTTP request came from, in the request's extensions: the
/// connection's peer, or the client behind a trusted reverse proxy (see [`serve_http`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub std::net::IpAddr);

/// Serves `router` on `listener` with the HTTP limits until `shutdown` completes, then stops
/// accepting and waits for open connections to finish (the caller bounds that wait). A
/// connection waits (see [`Waiting`]) whenever it is not serving a request — before its first
/// one and between keep-alive requests — so when every slot is taken a new connection closes the
/// one that has waited longest, and idle or slow clients cannot keep out the health probes,
/// Prometheus or a browser finishing a consent.
///
/// Each request carries its [`ClientAddress`]: the connection's peer, or, when the peer is one
/// of `trusted_proxies`, the client its `X-Forwarded-For` names
/// ([`tokenfleet_listen::client_behind_proxies`]).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: ListenerLimits,
    trusted_proxies: Vec<tokenfleet_listen::IpNet>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let acceptor = Acceptor::new(
        listener,
        limits.http_max_connections,
        "http",
        "for a request",
        &metrics,
    );
    // HTTP/1.1 only (health probes, Prometheus, browsers on the consent callback): protocol
    // detection for h2c would read the first bytes without any timeout.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let trusted_proxies: Arc<[tokenfleet_listen::IpNet]> = trusted_proxies.into();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Idle (waiting for a request) whenever no request is in flight.
        let calls = Calls::new(&acceptor.waiting);
        let closed = calls.closed().clone();
        let (router, service_calls) = (router.clone(), Arc::clone(&calls));
        let trusted = Arc::clone(&trusted_proxies);
        let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
            // The client's address, for handlers that limit per source (console sign-in).
            let client = tokenfleet_listen::client_behind_proxies(
                peer.ip(),
                request
                    .headers()
                    .get_all("x-forwarded-for")
                    .iter()
                    .map(http::HeaderValue::as_bytes),
                &trusted,
            );
            request.extensions_mut().insert(ClientAddress(client));
            // Served, not waiting, until the answer is sent (its body dropped).
            let call = service_calls.start();
            let response = tower::ServiceExt::oneshot(router.clone(), request);
            async move {
                let response = response.await;
                response.map(|response| response.map(|body| GuardedBody::new(body, call)))
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                // Errors here are a client's doing (reset, timeout, bad request): nothing to
                // report.
                done = connection => if let Err(error) = done {
                    tracing::debug!(error = %error, "HTTP connection ended with an error");
                },
                () = closed.cancelled() => {
                    tracing::debug!("HTTP connection closed: its slot went to a new connection");
                }
            }
        });
    }
    drop(acceptor);
    graceful.shutdown().await;
    Ok(())
}
