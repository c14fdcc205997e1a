//! Listener slots that make room, shared by the broker's listeners and the agent's metrics
//! listener: a connection that is not being served — still in its TLS handshake, waiting for its
//! first request, idle between keep-alive requests — waits in its slot among the [`Waiting`]
//! ones, and when every slot of its listener is taken, a new connection closes the one that has
//! waited longest and takes its slot (as nginx reuses its idle connections). Only when every open
//! connection is being served is a new one turned away. So clients that connect and then send
//! nothing cannot keep anyone out: to hold off one honest client an attacker would have to open
//! as many connections as there are slots within that client's first request (milliseconds), and
//! connections being served are never touched.
//!
//! [`Calls`] counts a connection's requests in flight and keeps it among the waiting ones while
//! it has none; [`GuardedBody`] keeps a request counted until its answer's body is done.
//! [`source_key`] says which connections come from one client, for limits counted per source;
//! [`client_behind_proxies`] finds that client's address behind trusted reverse proxies
//! (`X-Forwarded-For`), and [`parse_network`] reads the networks such lists name.
//!
//! Written here because no crate offers it: hyper, tonic and axum cap nothing, tower's
//! concurrency limits turn new work away instead of closing idle connections, and nginx's rule
//! (close the idle connection used least recently) lives inside nginx. How a listener counts its
//! slots (a semaphore, per-source counts) stays with the listener; this crate only says which
//! connection goes.
//!
//! The walk through `X-Forwarded-For` is written here too (a dozen lines over `ipnet`): the
//! crates that read it either trust its leftmost entry, which any client can write, or take a
//! fixed number of hops instead of a list of trusted proxies.
//!
//! Dependency direction: depends on tokio-util, http-body and ipnet only; the broker and the
//! agent depend on it, and the core for [`parse_network`] (a device's ingress source ranges).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

pub use ipnet::IpNet;
pub use tokio_util::sync::CancellationToken;

/// The key a client's connections (or failed logins) are counted under by limits per source: the
/// IPv4 address (IPv4-mapped IPv6 included), or the /64 of an IPv6 address (one host commonly
/// holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Shortest prefix [`parse_network`] accepts for an IPv4 range (`10.0.0.0/8` is the largest
/// private block).
pub const MIN_IPV4_PREFIX: u8 = 8;
/// Shortest prefix [`parse_network`] accepts for an IPv6 range.
pub const MIN_IPV6_PREFIX: u8 = 16;

/// Why [`parse_network`] refused a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkError {
    /// Neither an address nor a CIDR range.
    NotANetwork(String),
    /// Wider than /[`MIN_IPV4_PREFIX`] (IPv4) or /[`MIN_IPV6_PREFIX`] (IPv6): close to
    /// everybody.
    TooWide(String),
}

impl std::fmt::Display for NetworkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotANetwork(text) => write!(f, "{text:?} is not an IP address or CIDR range"),
            Self::TooWide(text) => write!(
                f,
                "{text:?} is too wide (at most /{MIN_IPV4_PREFIX} for IPv4, /{MIN_IPV6_PREFIX} for IPv6)"
            ),
        }
    }
}

impl std::error::Error for NetworkError {}

/// Parses an address (`192.168.1.20`, `fd00::7`: a /32 or /128) or a CIDR range
/// (`192.168.1.0/24`; host bits are cleared). Ranges wider than /8 (IPv4) or /16 (IPv6), such as
/// `0.0.0.0/0` or `::/0`, are refused: a list of trusted hosts that holds them trusts the
/// internet.
pub fn parse_network(text: &str) -> Result<IpNet, NetworkError> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| NetworkError::NotANetwork(text.to_owned()))?,
    };
    let min = match net {
        IpNet::V4(_) => MIN_IPV4_PREFIX,
        IpNet::V6(_) => MIN_IPV6_PREFIX,
    };
    if net.prefix_len() < min {
        return Err(NetworkError::TooWide(text.to_owned()));
    }
    Ok(net)
}

/// The client's address when `peer` (the address a connection came from) may be a reverse proxy
/// listed in `trusted`, given the values of the request's `X-Forwarded-For` header fields as
/// they came, bytes and all (several fields are one comma-separated list, RFC 9110 §5.3; a
/// field with bytes that are not text is still read entry by entry, so what a client writes
/// cannot hide the entry its proxy appended).
///
/// Only when `peer` is trusted is the header read, and then from its right end: each proxy
/// appends the address it got the request from, so the rightmost entry that is not a trusted
/// proxy is the client, and everything left of it is what that client (or proxies it chose)
/// wrote, which is never believed. An entry that is not an address (`unknown`, an obfuscated
/// name) ends the walk at the trusted hop right of it; when every entry is trusted, the leftmost
/// is the client. Entries may carry a port (`192.0.2.1:5000`, `[2001:db8::1]:443`).
/// IPv4-mapped IPv6 addresses count as their IPv4 address throughout.
pub fn client_behind_proxies<'a>(
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip));
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !is_trusted(client) {
        return client;
    }
    let entries: Vec<&[u8]> = forwarded_for
        .into_iter()
        .flat_map(|value| value.split(|byte| *byte == b','))
        .collect();
    for entry in entries.iter().rev() {
        let Some(hop) = forwarded_address(entry) else {
            return client;
        };
        client = hop;
        if !is_trusted(hop) {
            return hop;
        }
    }
    client
}

/// One `X-Forwarded-For` entry's address: `192.0.2.1`, `192.0.2.1:5000`, `2001:db8::1` or
/// `[2001:db8::1]:443`, canonical (IPv4-mapped → IPv4); `None` for anything else.
fn forwarded_address(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

/// The connections of a listener that wait in their slot without being served, longest first:
/// when the listener is full, a new connection closes the first of them for its slot.
#[derive(Debug, Default)]
pub struct Waiting {
    /// The next seat's number (numbers only grow, so the first entry has waited longest) and the
    /// waiting connections, each with what closes it.
    seats: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

/// A connection's place among the [`Waiting`] ones until it is dropped (or leaves); its
/// [`closed`](Seat::closed) token fires when a new connection took its slot.
#[derive(Debug)]
pub struct Seat {
    waiting: Arc<Waiting>,
    number: u64,
    closed: CancellationToken,
}

impl Seat {
    /// Fires when a new connection took this one's slot: the connection must end.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Stops waiting (the connection is served from now on): `false` when it was closed for a
    /// new one first, and must end.
    pub fn leave(self) -> bool {
        self.waiting.lock().1.remove(&self.number).is_some()
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.waiting.lock().1.remove(&self.number);
    }
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, (u64, BTreeMap<u64, CancellationToken>)> {
        self.seats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A seat for a connection that starts waiting; `closed` closes it.
    pub fn seat(self: &Arc<Self>, closed: CancellationToken) -> Seat {
        let mut seats = self.lock();
        let number = seats.0;
        seats.0 += 1;
        seats.1.insert(number, closed.clone());
        drop(seats);
        Seat {
            waiting: Arc::clone(self),
            number,
            closed,
        }
    }

    /// Closes the connection that has waited longest, if any waits (`false` when none does).
    pub fn close_longest(&self) -> bool {
        // Closed under the lock, so `Seat::leave` sees either its seat or its closing.
        let mut seats = self.lock();
        seats
            .1
            .pop_first()
            .map(|(_, closed)| closed.cancel())
            .is_some()
    }
}

/// The calls (requests) in flight on one connection: while it has none, the connection waits
/// among its listener's [`Waiting`] ones and may be closed for a new one.
#[derive(Debug)]
pub struct Calls {
    /// Calls in flight, and the connection's seat among the waiting ones while there are none.
    state: Mutex<(usize, Option<Seat>)>,
    idle: Arc<Waiting>,
    closed: CancellationToken,
}

impl Calls {
    /// A new connection's: waiting, no call yet.
    pub fn new(idle: &Arc<Waiting>) -> Arc<Self> {
        Self::seated(idle.seat(CancellationToken::new()))
    }

    /// The calls of a connection that waits in `seat` (no call yet): it waits again, under the
    /// same closing token, whenever its calls have all ended.
    pub fn seated(seat: Seat) -> Arc<Self> {
        Arc::new(Self {
            idle: Arc::clone(&seat.waiting),
            closed: seat.closed.clone(),
            state: Mutex::new((0, Some(seat))),
        })
    }

    /// Fires when a new connection took this one's slot: the connection must end.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    fn lock(&self) -> MutexGuard<'_, (usize, Option<Seat>)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call starts: the connection no longer waits until it and every other call ended.
    pub fn start(self: &Arc<Self>) -> CallInFlight {
        let seat = {
            let mut state = self.lock();
            state.0 += 1;
            state.1.take()
        };
        // Leaving the waiting ones (a connection closed just now ends anyway).
        drop(seat);
        CallInFlight(Arc::clone(self))
    }
}

/// One call in flight on a connection, until dropped (hand it to the answer's body with
/// [`GuardedBody`]): then, with no other call, the connection waits again, as the newest.
#[derive(Debug)]
pub struct CallInFlight(Arc<Calls>);

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let calls = &self.0;
        let mut state = calls.lock();
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 && !calls.closed.is_cancelled() {
            state.1 = Some(calls.idle.seat(calls.closed.clone()));
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body holding a guard until it is dropped (its answer sent or abandoned), such
    /// as its call's [`CallInFlight`].
    #[derive(Debug)]
    pub struct GuardedBody<B, G> {
        #[pin]
        body: B,
        _guard: G,
    }
}

impl<B, G> GuardedBody<B, G> {
    /// `body`, holding `guard` until it is dropped.
    pub fn new(body: B, guard: G) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<B: http_body::Body, G> http_body::Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let key = |ip: &str| source_key(ip.parse().unwrap());
        assert_eq!(key("192.0.2.1"), key("::ffff:192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn networks_are_addresses_or_ranges_no_wider_than_a_private_block() {
        assert_eq!(
            parse_network(" 10.1.2.3/8 ").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "host bits cleared"
        );
        assert_eq!(
            parse_network("fd00::7").unwrap(),
            "fd00::7/128".parse::<IpNet>().unwrap()
        );
        for wide in ["0.0.0.0/0", "10.0.0.0/7", "::/0", "2001::/15"] {
            let error = parse_network(wide).unwrap_err();
            assert_eq!(error, NetworkError::TooWide(wide.to_owned()));
            assert!(error.to_string().contains("too wide"), "{error}");
        }
        let error = parse_network("proxy.example").unwrap_err();
        assert_eq!(
            error.to_string(),
            "\"proxy.example\" is not an IP address or CIDR range"
        );
    }

    #[test]
    fn the_client_is_the_rightmost_forwarded_address_that_is_not_a_trusted_proxy() {
        let trusted = [
            parse_network("10.0.0.0/8").unwrap(),
            parse_network("192.0.2.7").unwrap(),
        ];
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let client = |peer: &str, fields: &[&str]| {
            client_behind_proxies(ip(peer), fields.iter().map(|f| f.as_bytes()), &trusted)
        };
        // Not from a trusted proxy: the header is whatever the client wrote.
        assert_eq!(client("198.51.100.9", &["203.0.113.5"]), ip("198.51.100.9"));
        // From a trusted proxy without the header: the proxy itself.
        assert_eq!(client("10.1.1.1", &[]), ip("10.1.1.1"));
        // One proxy: its entry is the client; what the client wrote to the left is not believed.
        assert_eq!(
            client("10.1.1.1", &["1.1.1.1, 203.0.113.5"]),
            ip("203.0.113.5")
        );
        // Two proxies, in two header fields, with ports and a mapped address.
        assert_eq!(
            client(
                "::ffff:10.1.1.1",
                &["6.6.6.6, [2001:db8::5]:443", "192.0.2.7:8080"]
            ),
            ip("2001:db8::5")
        );
        assert_eq!(
            client("10.1.1.1", &["::ffff:203.0.113.9, 10.2.2.2"]),
            ip("203.0.113.9")
        );
        // Garbage left by a trusted hop: the walk stops at that hop.
        assert_eq!(
            client("10.1.1.1", &["203.0.113.5, unknown, 10.2.2.2"]),
            ip("10.2.2.2")
        );
        assert_eq!(client("10.1.1.1", &["unknown"]), ip("10.1.1.1"));
        // Every entry trusted: the leftmost.
        assert_eq!(client("10.1.1.1", &["10.3.3.3, 10.2.2.2"]), ip("10.3.3.3"));
        // Bytes that are not text in the client's part hide nothing of the proxy's entry.
        assert_eq!(
            client_behind_proxies(
                ip("10.1.1.1"),
                [b"\xff\xfe, 203.0.113.5".as_slice()],
                &trusted
            ),
            ip("203.0.113.5")
        );
        assert_eq!(client("10.1.1.1", &["é, 203.0.113.5"]), ip("203.0.113.5"));
        // Nothing trusted: never read.
        assert_eq!(
            client_behind_proxies(ip("10.1.1.1"), [b"203.0.113.5".as_slice()], &[]),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn the_connection_that_waited_longest_is_closed_first_and_knows_it() {
        let waiting = Arc::new(Waiting::default());
        let first = waiting.seat(CancellationToken::new());
        let second = waiting.seat(CancellationToken::new());
        let third = waiting.seat(CancellationToken::new());
        // The second stops waiting on its own (served): it can no longer be closed.
        assert!(second.leave());
        assert!(waiting.close_longest());
        assert!(first.closed().is_cancelled());
        assert!(!third.closed().is_cancelled());
        // Closed before it could leave: it must end.
        assert!(!first.leave());
        // Next is the third; the served second is never closed.
        assert!(waiting.close_longest());
        assert!(third.closed().is_cancelled());
        assert!(!waiting.close_longest(), "nobody waits any more");
        drop(third);
        // A seat dropped while waiting (its connection ended) is gone from the set.
        let dropped = waiting.seat(CancellationToken::new());
        drop(dropped);
        assert!(!waiting.close_longest(), "a dropped seat was closed");
    }

    #[test]
    fn a_connection_is_idle_only_with_no_call_in_flight_and_not_after_it_was_closed() {
        let idle = Arc::new(Waiting::default());
        let calls = Calls::new(&idle);
        // Two calls at once: idle again only after both ended.
        let (one, two) = (calls.start(), calls.start());
        assert!(
            !idle.close_longest(),
            "a connection with calls in flight was closed"
        );
        drop(one);
        assert!(!idle.close_longest(), "one call is still in flight");
        drop(two);
        assert!(idle.close_longest());
        assert!(calls.closed().is_cancelled());
        // Closed: a call that started meanwhile and ends does not make it wait again.
        drop(calls.start());
        assert!(!idle.close_longest(), "a closed connection waits again");
    }
}
