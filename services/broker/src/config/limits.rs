//! `[limits]`: what one client may hold on the broker's listeners before it has authenticated —
//! connections, HTTP/2 streams and header sizes, keep-alive, per-request time on gRPC, and how
//! long an HTTP/1 client may take to send its request header. The raw section and its validation
//! into [`ListenerLimits`], which `crate::server` applies to the tonic and hyper builders.
//!
//! Without these an unauthenticated peer could open tens of thousands of half-open HTTP/2 streams
//! on one connection (each holds a request task and buffers) or keep hundreds of HTTP/1
//! connections open by sending a header a byte at a time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// `[limits]`. Every value has a safe default; `0` is refused where it would mean "unlimited".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most open gRPC connections (every agent holds one). When all are taken, a new connection
    /// closes the one that has waited longest in its TLS handshake and takes its slot; when all
    /// are past their handshake (or there is no `[tls]`), it is accepted and closed at once.
    pub grpc_max_connections: usize,
    /// Most of those open without a client certificate (admin clients with API keys, agents
    /// enrolling, and anyone who can reach the port): counted once the TLS handshake is done. A
    /// certificate-less connection over it closes, for its slot, the one that has waited
    /// longest without a proven call in flight (an admin call whose API key was accepted, an
    /// enrollment whose one-time code was redeemed; half-open calls and `Health/Watch` streams prove nothing); when every one has a proven
    /// call in flight it gets `RESOURCE_EXHAUSTED` naming this limit for its first call and is
    /// closed, so connections that prove nothing cannot take the slots agents need. At most
    /// `grpc_max_connections`; without `[tls]` it does not apply.
    pub grpc_max_anonymous_connections: usize,
    /// Most concurrent HTTP/2 streams per gRPC connection (advertised in SETTINGS; streams
    /// beyond it are refused with `REFUSED_STREAM`).
    pub grpc_max_concurrent_streams: u32,
    /// Largest request header list on gRPC, in bytes (advertised in SETTINGS).
    pub grpc_max_header_list_bytes: u32,
    /// Seconds between HTTP/2 keep-alive pings on an idle gRPC connection.
    pub grpc_keepalive_interval_seconds: u64,
    /// Seconds a keep-alive ping may stay unanswered before the connection is closed.
    pub grpc_keepalive_timeout_seconds: u64,
    /// Seconds a gRPC call may take to produce its response (for `StatusStream`: to open it;
    /// the stream itself then lives as long as the agent). A half-open call that never sends its
    /// request message is ended after this.
    pub grpc_request_timeout_seconds: u64,
    /// Most open HTTP connections (health, metrics, consent callback). When all are taken, a new
    /// connection closes the one that has waited longest for a request (its first, or the next on
    /// keep-alive) and takes its slot; when all are serving a request it is closed at once.
    pub http_max_connections: usize,
    /// Seconds an HTTP client may take to send a complete request header (also the first one
    /// after connecting, and the next one on an idle keep-alive connection); the connection is
    /// closed when it takes longer. The HTTP listener speaks HTTP/1.1 only.
    pub http_header_read_timeout_seconds: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            grpc_max_connections: 10_000,
            grpc_max_anonymous_connections: 512,
            grpc_max_concurrent_streams: 100,
            grpc_max_header_list_bytes: 16 * 1024,
            grpc_keepalive_interval_seconds: 30,
            grpc_keepalive_timeout_seconds: 20,
            grpc_request_timeout_seconds: 60,
            http_max_connections: 1024,
            http_header_read_timeout_seconds: 10,
        }
    }
}

/// The validated listener limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// See [`LimitsSection::grpc_max_connections`].
    pub grpc_max_connections: usize,
    /// See [`LimitsSection::grpc_max_anonymous_connections`].
    pub grpc_max_anonymous_connections: usize,
    /// See [`LimitsSection::grpc_max_concurrent_streams`].
    pub grpc_max_concurrent_streams: u32,
    /// See [`LimitsSection::grpc_max_header_list_bytes`].
    pub grpc_max_header_list_bytes: u32,
    /// See [`LimitsSection::grpc_keepalive_interval_seconds`].
    pub grpc_keepalive_interval: Duration,
    /// See [`LimitsSection::grpc_keepalive_timeout_seconds`].
    pub grpc_keepalive_timeout: Duration,
    /// See [`LimitsSection::grpc_request_timeout_seconds`].
    pub grpc_request_timeout: Duration,
    /// See [`LimitsSection::http_max_connections`].
    pub http_max_connections: usize,
    /// See [`LimitsSection::http_header_read_timeout_seconds`].
    pub http_header_read_timeout: Duration,
}

impl Default for ListenerLimits {
    /// The same values as [`LimitsSection::default`] (a unit test keeps them equal).
    fn default() -> Self {
        Self {
            grpc_max_connections: 10_000,
            grpc_max_anonymous_connections: 512,
            grpc_max_concurrent_streams: 100,
            grpc_max_header_list_bytes: 16 * 1024,
            grpc_keepalive_interval: Duration::from_secs(30),
            grpc_keepalive_timeout: Duration::from_secs(20),
            grpc_request_timeout: Duration::from_secs(60),
            http_max_connections: 1024,
            http_header_read_timeout: Duration::from_secs(10),
        }
    }
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: T,
    min: T,
    max: T,
    unit: &str,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            format!("limits.{field}"),
            format!("{value} is out of range: must be {min} to {max}{unit}"),
        ));
    }
    Ok(value)
}

impl LimitsSection {
    /// The validated limits (the error names the `limits.*` field at fault).
    pub fn to_limits(&self) -> Result<ListenerLimits, ConfigError> {
        let secs = |field: &str, value: u64, min: u64, max: u64| {
            range(field, value, min, max, " seconds").map(Duration::from_secs)
        };
        let grpc_max_connections = range(
            "grpc_max_connections",
            self.grpc_max_connections,
            1,
            1_000_000,
            "",
        )?;
        Ok(ListenerLimits {
            grpc_max_connections,
            grpc_max_anonymous_connections: range(
                "grpc_max_anonymous_connections",
                self.grpc_max_anonymous_connections,
                1,
                grpc_max_connections,
                " (limits.grpc_max_connections)",
            )?,
            grpc_max_concurrent_streams: range(
                "grpc_max_concurrent_streams",
                self.grpc_max_concurrent_streams,
                1,
                10_000,
                "",
            )?,
            grpc_max_header_list_bytes: range(
                "grpc_max_header_list_bytes",
                self.grpc_max_header_list_bytes,
                1024,
                1024 * 1024,
                " bytes",
            )?,
            grpc_keepalive_interval: secs(
                "grpc_keepalive_interval_seconds",
                self.grpc_keepalive_interval_seconds,
                1,
                3600,
            )?,
            grpc_keepalive_timeout: secs(
                "grpc_keepalive_timeout_seconds",
                self.grpc_keepalive_timeout_seconds,
                1,
                600,
            )?,
            grpc_request_timeout: secs(
                "grpc_request_timeout_seconds",
                self.grpc_request_timeout_seconds,
                1,
                3600,
            )?,
            http_max_connections: range(
                "http_max_connections",
                self.http_max_connections,
                1,
                1_000_000,
                "",
            )?,
            http_header_read_timeout: secs(
                "http_header_read_timeout_seconds",
                self.http_header_read_timeout_seconds,
                1,
                600,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_zero_is_refused_with_the_field_named() {
        let limits = LimitsSection::default().to_limits().unwrap();
        assert_eq!(limits, ListenerLimits::default());
        assert_eq!(limits.grpc_max_concurrent_streams, 100);
        assert_eq!(limits.http_header_read_timeout, Duration::from_secs(10));
        let bad = LimitsSection {
            grpc_max_concurrent_streams: 0,
            ..LimitsSection::default()
        };
        let e = bad.to_limits().unwrap_err().to_string();
        assert!(e.contains("limits.grpc_max_concurrent_streams"), "{e}");
        let bad = LimitsSection {
            http_header_read_timeout_seconds: 0,
            ..LimitsSection::default()
        };
        let e = bad.to_limits().unwrap_err().to_string();
        assert!(e.contains("limits.http_header_read_timeout_seconds"), "{e}");
    }

    #[test]
    fn anonymous_connections_fit_within_all_connections() {
        let fits = LimitsSection {
            grpc_max_connections: 20,
            grpc_max_anonymous_connections: 20,
            ..LimitsSection::default()
        };
        assert_eq!(fits.to_limits().unwrap().grpc_max_anonymous_connections, 20);
        let over = LimitsSection {
            grpc_max_connections: 20,
            grpc_max_anonymous_connections: 21,
            ..LimitsSection::default()
        };
        let e = over.to_limits().unwrap_err().to_string();
        assert!(
            e.contains("limits.grpc_max_anonymous_connections")
                && e.contains("must be 1 to 20 (limits.grpc_max_connections)"),
            "{e}"
        );
        let zero = LimitsSection {
            grpc_max_anonymous_connections: 0,
            ..LimitsSection::default()
        };
        let e = zero.to_limits().unwrap_err().to_string();
        assert!(e.contains("limits.grpc_max_anonymous_connections"), "{e}");
    }
}
