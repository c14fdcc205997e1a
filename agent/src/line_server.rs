//! What the agent's listeners — the SMTP [`crate::ingress`], the local POP3 server
//! ([`crate::pop3_server`]) and the metrics listener — share: the accept loop with shutdown
//! draining, the session caps ([`SessionLimits`]: total and per source, so idle or slow clients
//! cannot hold every slot; over the total a full server makes room by closing the session that
//! has waited longest unserved, see [`Gate`]) and bounded line reading. Each protocol keeps its
//! own replies and says when a session waits (SMTP and POP3: until it logs in; metrics: while no
//! request is in flight).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokenfleet_listen::{CancellationToken, Seat, Waiting, source_key};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// One line read from the client.
pub enum Line {
    /// A line, without its CRLF (or bare LF).
    Text(Vec<u8>),
    /// A line longer than the limit; all of it has been consumed and discarded.
    TooLong,
    /// The client went away, timed out (already answered) or the server is stopping.
    Closed,
}

/// Reads one line of at most `limit` bytes (line end included). Over-long lines are consumed to
/// their end and reported as [`Line::TooLong`]; a partial line at EOF is dropped. (SMTP `DATA`
/// is not read in lines: see [`crate::wire::smtp_server::DataScanner`].)
pub async fn read_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Closed);
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long && line.len() + n <= limit {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line = Vec::new();
        }
        reader.consume(n);
        if done {
            if too_long {
                return Ok(Line::TooLong);
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text(line));
        }
    }
}

/// Writes `bytes` and flushes.
pub async fn send<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// How many sessions a server runs at once. A connection over either cap is answered with the
/// protocol's "busy" line and closed at once, before any session state is allocated — except
/// that over `max_sessions` a server that makes room ([`Gate::waiting`]) first closes the session
/// that has waited longest unserved and lets the new one take its slot.
///
/// Known sources (the server's `known` test: a device's allowlisted address, or one that logged
/// in successfully before) are exempt from `max_sessions` — but not from the per-source cap — so
/// strangers filling every slot cannot lock out the devices the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions at once, all sources together.
    pub max_sessions: usize,
    /// Sessions at once from one source: one IPv4 address, or one IPv6 /64 (what one host
    /// usually holds).
    pub max_sessions_per_source: usize,
    /// Longest a session may last, whatever it does (a client trickling one line just inside
    /// each idle timeout cannot hold its slot for ever); then the connection is closed.
    pub max_session: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: 100,
            max_sessions_per_source: 10,
            max_session: Duration::from_secs(1800),
        }
    }
}

#[derive(Debug, Default)]
struct Occupancy {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// A server's sessions: how many are open, in total and per source, and a signal when one ends.
#[derive(Debug, Default)]
struct Seats {
    counts: Mutex<Occupancy>,
    /// Notified whenever a slot is freed (a connection closed for a new one hands its slot over).
    freed: Notify,
}

/// One admitted session; frees its slot when dropped.
struct Slot {
    seats: Arc<Seats>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut o = self.seats.lock();
            o.total = o.total.saturating_sub(1);
            if let Some(n) = o.per_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    o.per_source.remove(&self.source);
                }
            }
        }
        self.seats.freed.notify_waiters();
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`SessionLimits::max_sessions`].
    Total,
    /// [`SessionLimits::max_sessions_per_source`].
    PerSource,
}

/// How long a new connection waits for the slot of the connection it closed (that one's task
/// only has to drop it).
const SLOT_HANDOVER: Duration = Duration::from_secs(1);

impl Seats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Occupancy> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `ip` within `limits` (`known` sources pass the total cap),
    /// or the cap that refuses it. The per-source cap is checked first: a source over its own
    /// cap never makes another connection room.
    fn admit(
        self: &Arc<Self>,
        limits: SessionLimits,
        ip: IpAddr,
        known: bool,
    ) -> Result<Slot, Refusal> {
        let source = source_key(ip);
        let mut o = self.lock();
        if o.per_source.get(&source).copied().unwrap_or(0) >= limits.max_sessions_per_source {
            return Err(Refusal::PerSource);
        }
        if o.total >= limits.max_sessions && !known {
            return Err(Refusal::Total);
        }
        *o.per_source.entry(source).or_insert(0) += 1;
        o.total += 1;
        Ok(Slot {
            seats: Arc::clone(self),
            source,
        })
    }

    /// Like [`Seats::admit`], but when the total cap is reached and a connection of `waiting`
    /// waits unserved, the one that has waited longest is closed and the new one takes its slot
    /// (`true` in the answer) once a slot has been freed — normally the closed one's, within
    /// [`SLOT_HANDOVER`]; else it is refused. The accept loop admits one connection at a time, so
    /// each one let in this way follows one slot freed: the total never grows by it, even when
    /// known sources hold more than `max_sessions`.
    async fn admit_or_make_room(
        self: &Arc<Self>,
        limits: SessionLimits,
        ip: IpAddr,
        known: bool,
        waiting: Option<&Waiting>,
    ) -> Result<(Slot, bool), Refusal> {
        let freed = self.freed.notified();
        tokio::pin!(freed);
        // Registered before closing anyone, so the slot freed for this one is not missed.
        freed.as_mut().enable();
        match self.admit(limits, ip, known) {
            Err(Refusal::Total) if waiting.is_some_and(Waiting::close_longest) => {}
            other => return other.map(|slot| (slot, false)),
        }
        if tokio::time::timeout(SLOT_HANDOVER, freed).await.is_err() {
            return Err(Refusal::Total);
        }
        self.admit(limits, ip, true).map(|slot| (slot, true))
    }
}

/// Completes when `seat` (a session's place among the connections waiting unserved) was closed
/// for a new connection; never without a seat.
pub async fn closed_for_new(seat: Option<&Seat>) {
    match seat {
        Some(seat) => seat.closed().cancelled().await,
        None => std::future::pending().await,
    }
}

/// Runs a session that waits in a seat until it is served (`closed`: the seat's token, `None`
/// without a seat). When the seat is closed for a new connection the session is polled once more
/// — at a read it says why and ends (see [`closed_for_new`]) — and dropped if it has not ended
/// (in a TLS handshake, waiting for a password check, writing to a client that does not read),
/// so its slot goes to the new connection at once and the accept loop never waits on it.
async fn ending_when_closed<F>(closed: Option<CancellationToken>, session: F) -> io::Result<()>
where
    F: Future<Output = io::Result<()>>,
{
    let Some(closed) = closed else {
        return session.await;
    };
    tokio::pin!(session);
    tokio::select! {
        biased;
        ended = &mut session => ended,
        () = closed.cancelled() => Ok(()),
    }
}

/// Which sources are known (exempt from the total cap, and never waiting).
pub type Known = Box<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// Who a server lets in: its caps, how it refuses, which sources pass the total cap, and
/// whether a full server makes room.
pub struct Gate {
    /// The caps.
    pub limits: SessionLimits,
    /// The answer to a connection over a cap (one protocol line, written without waiting).
    pub busy: fn(Refusal) -> &'static [u8],
    /// Sources exempt from the total cap (not from their own); their sessions never wait.
    pub known: Known,
    /// The server's connections that wait unserved (see [`tokenfleet_listen`]), when it makes
    /// room: each session from a source that is not known is handed a seat among them, which it
    /// leaves when it is served (SMTP and POP3: at login) or turns into a call counter
    /// (`Calls::seated`, metrics: waiting whenever no request is in flight); when its seat is
    /// closed the session ends. Over the total cap a new connection closes the one that has
    /// waited longest and takes its slot, and is refused only when none waits. `None`: sessions
    /// get no seat and new connections over the cap are refused.
    pub waiting: Option<Arc<Waiting>>,
    /// Told of every connection the caps close (the metrics count them).
    pub closed: Box<dyn Fn(Closed) + Send + Sync>,
}

/// Why a server's caps closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It waited unserved and a new connection took its slot.
    MadeRoom,
    /// It was new and a cap refused it.
    Refused(Refusal),
}

impl Closed {
    /// Every reason (the metrics create each series at 0).
    pub const ALL: [Self; 3] = [
        Self::MadeRoom,
        Self::Refused(Refusal::Total),
        Self::Refused(Refusal::PerSource),
    ];
}

/// Accepts connections on `listener` until `shutdown` completes, running `session` for each on
/// its own task (with `TCP_NODELAY` set, a receiver that turns `true` when the server stops, and
/// its seat when the server makes room and the source is not known; see [`Gate::waiting`]).
/// Then stops accepting, signals the sessions and waits for them to end. `what` names the
/// protocol in log lines; accept errors (out of file descriptors and the like) are logged and
/// followed by a short back-off.
///
/// A connection over one of the `gate` caps (after making room, where the server does) gets
/// its `busy` answer and is closed.
pub async fn serve<F, S>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
    gate: Gate,
    mut session: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr, watch::Receiver<bool>, Option<Seat>) -> S,
    S: Future<Output = io::Result<()>> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    let seats = Arc::new(Seats::default());
    let limits = gate.limits;
    let (mut refused, mut closed_for_new): (u64, u64) = (0, 0);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let known = (gate.known)(peer);
                        let admitted = seats
                            .admit_or_make_room(limits, peer.ip(), known, gate.waiting.as_deref())
                            .await;
                        let slot = match admitted {
                            Ok((slot, closed_one)) => {
                                if closed_one {
                                    (gate.closed)(Closed::MadeRoom);
                                    closed_for_new += 1;
                                    if closed_for_new.is_power_of_two() {
                                        tracing::warn!(%peer, closed_so_far = closed_for_new, max_connections = limits.max_sessions, "{what}: connection limit reached: closing, for each new connection, the session that has waited longest unserved (not logged in, or no request in flight)");
                                    }
                                }
                                slot
                            }
                            Err(refusal) => {
                                (gate.closed)(Closed::Refused(refusal));
                                // The socket's send buffer is empty: this never blocks.
                                let _ = stream.try_write((gate.busy)(refusal));
                                refused += 1;
                                if refused.is_power_of_two() {
                                    tracing::warn!(%peer, ?refusal, refused_so_far = refused, "{what}: connection refused, session limit reached");
                                }
                                continue;
                            }
                        };
                        let _ = stream.set_nodelay(true);
                        let seat = gate
                            .waiting
                            .as_ref()
                            .filter(|_| !known)
                            .map(|waiting| waiting.seat(CancellationToken::new()));
                        let closed = seat.as_ref().map(|seat| seat.closed().clone());
                        let run = ending_when_closed(closed, session(stream, peer, stop_rx.clone(), seat));
                        let lifetime = limits.max_session;
                        sessions.spawn(async move {
                            let _slot = slot;
                            match tokio::time::timeout(lifetime, run).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "{what} session ended with an error");
                                }
                                Err(_) => {
                                    tracing::info!(%peer, seconds = lifetime.as_secs(), "{what} session closed: it reached the longest session time");
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what} accept failed");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_per_source_and_free_on_drop() {
        let seats = Arc::new(Seats::default());
        let limits = SessionLimits {
            max_sessions: 3,
            max_sessions_per_source: 2,
            ..SessionLimits::default()
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(a);
        let b: IpAddr = "fd00::1:2".parse().unwrap_or(a);
        let b2: IpAddr = "fd00::9".parse().unwrap_or(a);
        let s1 = seats.admit(limits, a, false);
        let s2 = seats.admit(limits, mapped, false);
        assert!(s1.is_ok() && s2.is_ok());
        assert_eq!(seats.admit(limits, a, true).err(), Some(Refusal::PerSource));
        let s3 = seats.admit(limits, b, false);
        assert!(s3.is_ok());
        assert_eq!(seats.admit(limits, b2, false).err(), Some(Refusal::Total));
        // A known source passes the total cap (not its own).
        let known = seats.admit(limits, "10.9.9.9".parse().unwrap_or(a), true);
        assert!(known.is_ok());
        drop(known);
        drop(s1);
        assert!(seats.admit(limits, b2, false).is_ok());
    }

    #[tokio::test]
    async fn a_full_server_closes_the_connection_that_waited_longest_for_a_new_one() {
        let seats = Arc::new(Seats::default());
        let waiting = Arc::new(Waiting::default());
        let limits = SessionLimits {
            max_sessions: 2,
            max_sessions_per_source: 2,
            ..SessionLimits::default()
        };
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        // Two connections from one source fill the server, each waiting in a seat; a task per
        // connection drops its slot when it is closed (as a session ends).
        let mut seated = Vec::new();
        for _ in 0..2 {
            let slot = seats.admit(limits, a, false).unwrap();
            let seat = waiting.seat(CancellationToken::new());
            let closed = seat.closed().clone();
            tokio::spawn(async move {
                closed.cancelled().await;
                drop(slot);
            });
            seated.push(seat);
        }
        // Over its own cap a source is refused and closes nobody.
        let refused = seats
            .admit_or_make_room(limits, a, false, Some(&waiting))
            .await;
        assert_eq!(refused.err(), Some(Refusal::PerSource));
        assert!(!seated.iter().any(|s| s.closed().is_cancelled()));
        // Another source closes the one that waited longest and gets its slot.
        let (slot, closed_one) = seats
            .admit_or_make_room(limits, b, false, Some(&waiting))
            .await
            .unwrap();
        assert!(closed_one);
        assert!(seated[0].closed().is_cancelled());
        assert!(!seated[1].closed().is_cancelled());
        // A server that does not make room refuses.
        assert_eq!(
            seats.admit_or_make_room(limits, c, false, None).await.err(),
            Some(Refusal::Total)
        );
        // When the other connection is being served (not waiting), nobody is closed.
        let served = seated.pop().unwrap();
        assert!(served.leave());
        assert_eq!(
            seats
                .admit_or_make_room(limits, c, false, Some(&waiting))
                .await
                .err(),
            Some(Refusal::Total)
        );
        drop(slot);
    }
}
