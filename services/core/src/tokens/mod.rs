//! Token lifecycle: the sealed grant behind each mailbox, consent flows that obtain it, the refresh
//! machinery that keeps it alive, and issuance of access tokens.
//!
//! State lives in one record per mailbox ([`grant::GrantRecord`], collection [`grant::GRANTS`],
//! id = mailbox name) so every transition is one compare-and-set write. Work that must happen at a
//! time (refresh before expiry, retry after a transient failure, the next device-code poll) is
//! put on a store schedule, which any replica may pick up; a store lease per mailbox makes sure only
//! one replica works on a mailbox at a time.
//!
//! What operators do to a mailbox's token (start or complete a consent, refresh now, delete the
//! token), authorized and audited, is [`operator`].

pub mod backoff;
pub mod breaker;
pub mod consent;
pub mod device_poller;
pub mod grant;
pub mod issue;
pub mod lifecycle;
pub mod machine;
pub mod operator;
pub mod scheduler;
