//! Free loopback ports for the servers the tests start.
//!
//! A port is found by binding `127.0.0.1:0` and reading what the kernel chose. Ports found one
//! after another can repeat once each listener is dropped, so a server that needs several ports
//! takes them from one [`free_ports`] call: every listener is held until all are chosen, which
//! makes them distinct. Another process may still take a port before the server binds it; the
//! launchers detect that and retry with new ports.

use std::net::TcpListener;

use anyhow::{Context, Result};

/// `N` distinct loopback ports that were free a moment ago.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
        *port = listener
            .local_addr()
            .context("reading a bound port")?
            .port();
        held.push(listener);
    }
    Ok(ports)
}

/// One loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let [port] = free_ports::<1>()?;
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_taken_together_are_distinct_and_bindable() {
        let ports = free_ports::<16>().unwrap();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 16, "repeated port in {ports:?}");
        for port in ports {
            assert_ne!(port, 0);
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
