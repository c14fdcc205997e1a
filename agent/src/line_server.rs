//! What the two line-oriented servers of the agent — the SMTP [`crate::ingress`] and the local
//! POP3 server ([`crate::pop3_server`]) — share: the accept loop with shutdown draining, the
//! session caps ([`SessionLimits`]: total and per source, so idle or slow clients cannot hold
//! every slot) and bounded line reading. Each protocol keeps its own replies.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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
/// protocol's "busy" line and closed at once, before any session state is allocated.
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

/// The key sessions are counted under: the IPv4 address (IPv4-mapped IPv6 included), or the /64
/// of an IPv6 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Occupancy {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One admitted session; frees its slot when dropped.
struct Slot {
    occupancy: Arc<Mutex<Occupancy>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self
            .occupancy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                o.per_source.remove(&self.source);
            }
        }
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

fn admit(
    occupancy: &Arc<Mutex<Occupancy>>,
    limits: SessionLimits,
    ip: IpAddr,
    known: bool,
) -> Result<Slot, Refusal> {
    let source = source_key(ip);
    let mut o = occupancy.lock().unwrap_or_else(PoisonError::into_inner);
    if o.total >= limits.max_sessions && !known {
        return Err(Refusal::Total);
    }
    let n = o.per_source.entry(source).or_insert(0);
    if *n >= limits.max_sessions_per_source {
        return Err(Refusal::PerSource);
    }
    *n += 1;
    o.total += 1;
    Ok(Slot {
        occupancy: Arc::clone(occupancy),
        source,
    })
}

/// Accepts connections on `listener` until `shutdown` completes, running `session` for each on
/// its own task (with `TCP_NODELAY` set and a receiver that turns `true` when the server stops).
/// Then stops accepting, signals the sessions and waits for them to end. `what` names the
/// protocol in log lines; accept errors (out of file descriptors and the like) are logged and
/// followed by a short back-off.
///
/// A connection over one of the `limits` gets `busy(refusal)` (one protocol line, written without
/// waiting) and is closed; `known` tells the sources exempt from the total cap.
pub async fn serve<F, S>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
    limits: SessionLimits,
    busy: fn(Refusal) -> &'static [u8],
    known: impl Fn(SocketAddr) -> bool,
    mut session: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr, watch::Receiver<bool>) -> S,
    S: Future<Output = io::Result<()>> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    let occupancy = Arc::new(Mutex::new(Occupancy::default()));
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let slot = match admit(&occupancy, limits, peer.ip(), known(peer)) {
                            Ok(slot) => slot,
                            Err(refusal) => {
                                // The socket's send buffer is empty: this never blocks.
                                let _ = stream.try_write(busy(refusal));
                                refused += 1;
                                if refused.is_power_of_two() {
                                    tracing::warn!(%peer, ?refusal, refused_so_far = refused, "{what}: connection refused, session limit reached");
                                }
                                continue;
                            }
                        };
                        let _ = stream.set_nodelay(true);
                        let run = session(stream, peer, stop_rx.clone());
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
        let occupancy = Arc::new(Mutex::new(Occupancy::default()));
        let limits = SessionLimits {
            max_sessions: 3,
            max_sessions_per_source: 2,
            ..SessionLimits::default()
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(a);
        let b: IpAddr = "fd00::1:2".parse().unwrap_or(a);
        let b2: IpAddr = "fd00::9".parse().unwrap_or(a);
        let s1 = admit(&occupancy, limits, a, false);
        let s2 = admit(&occupancy, limits, mapped, false);
        assert!(s1.is_ok() && s2.is_ok());
        assert_eq!(
            admit(&occupancy, limits, a, true).err(),
            Some(Refusal::PerSource)
        );
        let s3 = admit(&occupancy, limits, b, false);
        assert!(s3.is_ok());
        assert_eq!(
            admit(&occupancy, limits, b2, false).err(),
            Some(Refusal::Total)
        );
        // A known source passes the total cap (not its own).
        let known = admit(&occupancy, limits, "10.9.9.9".parse().unwrap_or(a), true);
        assert!(known.is_ok());
        drop(known);
        drop(s1);
        assert!(admit(&occupancy, limits, b2, false).is_ok());
    }
}
