//! Free loopback ports for the servers the tests start.
//!
//! Ports are chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, usually
//! 32768–60999), where the kernel never puts the local end of an outgoing connection: a server
//! restarted on its old port (the agent after a SIGKILL, while a printer keeps reconnecting)
//! cannot find it taken by some client's socket, and a client can never connect to itself on a
//! port a test meant for a server. A candidate counts as free when it can be bound; every
//! listener is held until all ports of a call are chosen, so they are distinct. Another process
//! may still take a port before the server binds it; the launchers detect that and retry with
//! new ports.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};

/// Lowest port handed out.
const LOWEST: u16 = 10_000;
/// Candidates tried per port before giving up.
const TRIES: usize = 2_000;

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
pub(crate) fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A cheap pseudo-random sequence (splitmix64), seeded per process and advanced per call.
fn next_random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 32)
    };
    let _ = STATE.compare_exchange(0, seed() | 1, Ordering::SeqCst, Ordering::SeqCst);
    let mut z = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `N` distinct loopback ports, below the ephemeral range, that were free a moment ago.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let end = ephemeral_start();
    if end <= LOWEST + 1_000 {
        bail!("the ephemeral port range starts at {end}: no room below it for test servers");
    }
    let span = u64::from(end - LOWEST);
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let mut found = None;
        for _ in 0..TRIES {
            // `span` < 65536, so the sum fits.
            let candidate = LOWEST + (next_random() % span) as u16;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", candidate)) {
                found = Some((candidate, listener));
                break;
            }
        }
        let Some((candidate, listener)) = found else {
            bail!("no free loopback port in {LOWEST}..{end} after {TRIES} tries");
        };
        *port = candidate;
        held.push(listener);
    }
    Ok(ports)
}

/// One loopback port, below the ephemeral range, that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let [port] = free_ports::<1>()?;
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_taken_together_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports::<16>().unwrap();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 16, "repeated port in {ports:?}");
        for port in ports {
            assert!((LOWEST..ephemeral_start()).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[test]
    fn a_held_port_is_not_handed_out() {
        let held: Vec<TcpListener> = (0..50)
            .map(|_| TcpListener::bind(("127.0.0.1", free_port().unwrap())).unwrap())
            .collect();
        let taken: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        for _ in 0..200 {
            let port = free_port().unwrap();
            assert!(!taken.contains(&port), "{port} is held");
        }
    }
}
