//! The one error type of the broker's operations. Every module below the edges (resources,
//! tokens, identity, fleet, API keys) reports failures as an [`Error`]; each front end maps it
//! once, in the broker's edge (one map to gRPC status codes, one to HTTP statuses). No transport
//! type appears here.
//!
//! Messages are for the caller: they name the field or object and say what to do. What must not
//! reach a caller (store addresses, sealing failures) goes into `detail`, which the edge logs.

use std::time::Duration;

use tokenfleet_domain::ValidationError;
use tokenfleet_seal::SealError;
use tokenfleet_store::StoreError;

/// Why an operation gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// What the caller sent is wrong (the message names the field).
    #[error("{0}")]
    InvalidArgument(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object of that name exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the operation (a reference is missing, the grant
    /// is dead, …); the message says what to fix first.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller is not known (no, a wrong or a stale credential).
    #[error("{0}")]
    Unauthenticated(String),
    /// Someone else changed the object first (version mismatch, lost compare-and-set).
    #[error("{0}")]
    Aborted(String),
    /// A dependency (store, provider, another replica) is not available now; retrying may work.
    #[error("{message}")]
    Unavailable {
        /// For the caller.
        message: String,
        /// When to retry, if known.
        retry_after: Option<Duration>,
        /// For the log only (empty: nothing to add).
        detail: String,
    },
    /// A limit is reached (rate, number of objects; the message names the setting).
    #[error("{message}")]
    ResourceExhausted {
        /// For the caller.
        message: String,
        /// When to retry, if waiting helps.
        retry_after: Option<Duration>,
    },
    /// The broker failed; the caller learns only that (details in the broker log).
    #[error("{message}")]
    Internal {
        /// For the caller, without details.
        message: String,
        /// For the log only.
        detail: String,
    },
}

/// Result of an operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `wait` as a `retry-after` value: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

impl Error {
    /// RESOURCE_EXHAUSTED for a limit that frees up after `wait` (a rate): `"{what}; retry
    /// after N s"` ([`retry_after_secs`]), with the wait for the caller's `retry-after`.
    pub fn exhausted_for(what: impl std::fmt::Display, wait: Duration) -> Self {
        Self::ResourceExhausted {
            message: format!("{what}; retry after {} s", retry_after_secs(wait)),
            retry_after: Some(wait),
        }
    }

    /// INVALID_ARGUMENT naming the field: `"{field}: {problem}"`.
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {problem}"))
    }

    /// FAILED_PRECONDITION naming the field: `"{field}: {problem}"`.
    pub fn precondition(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::FailedPrecondition(format!("{field}: {problem}"))
    }

    /// An internal failure: `message` for the caller, `detail` for the log.
    pub fn internal(message: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: message.into(),
            detail: detail.to_string(),
        }
    }

    /// Sealing failures are internal; the detail names the record, never the secret.
    pub fn seal(err: &SealError, record: &str) -> Self {
        Self::internal(
            "internal error while sealing a secret (details in the broker log)",
            format_args!("sealing a secret of {record}: {err}"),
        )
    }

    /// ABORTED for a version mismatch: the caller's `expected` against the `stored` version.
    pub fn changed_concurrently(what: &str, expected: u64, stored: u64) -> Self {
        Self::Aborted(format!(
            "{what} was changed concurrently: the request carries version {expected}, the stored version is {stored}; read it again and retry"
        ))
    }

    /// The outcome name the audit log records for this error (`invalid_argument`, …), the same
    /// words as the gRPC codes.
    pub fn result(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "invalid_argument",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::PermissionDenied(_) => "permission_denied",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Aborted(_) => "aborted",
            Self::Unavailable { .. } => "unavailable",
            Self::ResourceExhausted { .. } => "resource_exhausted",
            Self::Internal { .. } => "internal",
        }
    }
}

impl From<ValidationError> for Error {
    fn from(err: ValidationError) -> Self {
        Self::InvalidArgument(err.to_string())
    }
}

/// The one mapping of store errors. Internals (addresses, what was corrupt) go to the detail.
impl From<&StoreError> for Error {
    fn from(err: &StoreError) -> Self {
        match err {
            StoreError::AlreadyExists(_) => Self::AlreadyExists(err.to_string()),
            StoreError::NotFound(_) => Self::NotFound(err.to_string()),
            StoreError::Conflict { .. } => Self::Aborted(format!("{err}; read it again and retry")),
            StoreError::Unavailable(_) => Self::Unavailable {
                message: "the store is unavailable; retry later".to_owned(),
                retry_after: None,
                detail: format!("store unavailable: {err}"),
            },
            StoreError::Corrupt { .. } | StoreError::Config(_) => Self::internal(
                "internal store error (details in the broker log)",
                format_args!("store failure: {err}"),
            ),
        }
    }
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        Self::from(&err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_told_in_whole_seconds_rounded_up_at_least_one() {
        for (wait, secs) in [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_secs(3), 3),
            (Duration::from_millis(3001), 4),
            (Duration::from_secs(59) + Duration::from_nanos(1), 60),
        ] {
            assert_eq!(retry_after_secs(wait), secs, "{wait:?}");
        }
        let err = Error::exhausted_for("key `k` is over its rate", Duration::from_millis(1500));
        assert_eq!(err.to_string(), "key `k` is over its rate; retry after 2 s");
        assert!(matches!(
            err,
            Error::ResourceExhausted {
                retry_after: Some(w),
                ..
            } if w == Duration::from_millis(1500)
        ));
    }
}
