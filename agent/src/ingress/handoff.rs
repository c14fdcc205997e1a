//! The hand-off between an SMTP session and its owner: what a session asks
//! ([`IngressHandler`]: who a client is, where a message goes, how much room there is), what it
//! hands over ([`Incoming`], with the envelope), and how the owner refuses ([`DeliverError`]).
//! The session ([`super::session`]) depends on this; the owner ([`super::LocalDevices`], the
//! agent's fleet ingress) implements it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::password::Password;
use crate::spool::{Envelope, SpoolId, TailFile};

/// A message as the session received it: the first bytes (at least the header block) in
/// memory, the rest, if any, in a file.
#[derive(Debug)]
pub struct Incoming {
    /// The header block and as much of the body as [`super::IngressConfig::message_memory`] allows.
    pub head: Vec<u8>,
    /// The rest of the message.
    pub tail: Option<TailFile>,
}

impl Incoming {
    /// A message held wholly in memory.
    pub fn in_memory(message: Vec<u8>) -> Self {
        Self {
            head: message,
            tail: None,
        }
    }
}

/// Why a message could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// A local problem (spool full, disk error): the session answers `451 4.3.0` and the client
    /// tries again later. The text is logged, not sent.
    #[error("{0}")]
    Temporary(String),
    /// The message is refused as it is (sender not allowed, no sender): the session answers
    /// `code text`, e.g. `550` and `5.7.1 Sender <x> is not allowed for device "d": …`.
    /// Nothing is queued.
    #[error("{code} {text}")]
    Rejected {
        /// The SMTP reply code (`4xx` or `5xx`).
        code: u16,
        /// The rest of the reply: enhanced status code and explanation (one line).
        text: String,
    },
}

/// What the ingress asks of its owner: who a client is and where messages go.
pub trait IngressHandler: Send + Sync + 'static {
    /// The device allowed to send from `peer` without authenticating, if any.
    fn device_for_peer(&self, peer: SocketAddr) -> Option<String>;

    /// The device whose local credentials these are, if they are valid.
    fn authenticate(
        &self,
        peer: SocketAddr,
        user: String,
        password: Password,
    ) -> impl Future<Output = Option<String>> + Send;

    /// Stores a complete message durably. The session replies `250` only after this returns `Ok`.
    fn deliver(
        &self,
        envelope: Envelope,
        message: Incoming,
    ) -> impl Future<Output = Result<SpoolId, DeliverError>> + Send;

    /// A new file name for the part of a message beyond [`super::IngressConfig::message_memory`];
    /// `None` keeps whole messages in memory.
    fn tail_path(&self) -> Option<PathBuf> {
        None
    }

    /// Bytes the store can still take (`None`: no limit). `0` refuses `MAIL` with `452 4.3.1`.
    fn room(&self) -> Option<u64> {
        None
    }
}
