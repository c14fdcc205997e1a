//! What the fleet's parts share and nothing else: heartbeat and staleness constants, the
//! settings of the agent-facing side, and how ages read. A leaf — the status, session and
//! connection-test modules import it, and it imports none of them.

use std::time::Duration;

/// Default seconds between an agent's status reports (`[agents] heartbeat_seconds`).
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 30;
/// Largest `[agents] heartbeat_seconds`.
pub const MAX_HEARTBEAT_SECONDS: u32 = 3600;
/// A report (and a presence marker) older than this many heartbeats no longer counts.
pub const STALE_HEARTBEATS: i32 = 3;
/// How often the replica holding an agent's stream looks for commands queued for it when no wake
/// came (a notification lost while the subscription reconnected, which also wakes every stream)
/// and checks it still holds the presence marker (every report checks that too): commands are
/// pushed by a wake ([`super::wake`]), so this is a backstop, not a poll.
pub const COMMAND_SWEEP_MAX: Duration = Duration::from_secs(60);

/// What the agent-facing side of the fleet needs from the broker's configuration.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Seconds between an agent's status reports (sent in the agent configuration).
    pub heartbeat_seconds: u32,
    /// This replica's id in presence markers (random per process).
    pub replica: String,
    /// How often a stream looks for queued commands without a wake (a backstop; see
    /// [`COMMAND_SWEEP_MAX`]).
    pub command_sweep: Duration,
    /// Turns true when the broker shuts down: open streams end with UNAVAILABLE.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self::new(DEFAULT_HEARTBEAT_SECONDS)
    }
}

impl FleetSettings {
    /// Settings with `heartbeat_seconds` and a new replica id.
    pub fn new(heartbeat_seconds: u32) -> Self {
        Self {
            heartbeat_seconds: heartbeat_seconds.clamp(1, MAX_HEARTBEAT_SECONDS),
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            command_sweep: COMMAND_SWEEP_MAX,
            shutdown: None,
        }
    }

    /// Ends open streams when `shutdown` turns true.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }
}

/// A duration as people read it: `45s`, `4m 10s`, `3h 5m`, `2d 4h` (negative counts as 0).
pub fn format_age(age: time::Duration) -> String {
    let s = age.whole_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}
