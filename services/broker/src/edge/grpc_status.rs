//! The one mapping from [`Error`] to gRPC [`Status`], exhaustive over the error enum (a new
//! variant does not compile until it is mapped here), and the reading of the Admin API's bearer
//! credential. Details of internal failures are logged here, never sent.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::ops::Error;

/// The gRPC status of `err`. A function, not `From`: the error enum belongs to `tokenfleet-core`
/// and `Status` to tonic, and the orphan rule keeps an impl between two foreign types out of
/// this crate. Handlers end with `.map_err(status)`.
pub fn status(err: impl Into<Error>) -> Status {
    {
        match err.into() {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::Unavailable {
                message,
                retry_after,
                detail,
            } => {
                if !detail.is_empty() {
                    tracing::warn!(error = %detail, "dependency unavailable");
                }
                with_retry_after(Status::unavailable(message), retry_after)
            }
            Error::ResourceExhausted {
                message,
                retry_after,
            } => with_retry_after(Status::resource_exhausted(message), retry_after),
            Error::Internal { message, detail } => {
                tracing::error!(error = %detail, "internal failure");
                Status::internal(message)
            }
        }
    }
}

/// Adds a `retry-after` metadata entry (whole seconds, at least 1).
fn with_retry_after(mut status: Status, retry_after: Option<std::time::Duration>) -> Status {
    if let Some(wait) = retry_after {
        let secs = crate::ops::error::retry_after_secs(wait);
        if let Ok(value) = secs.to_string().parse() {
            status.metadata_mut().insert("retry-after", value);
        }
    }
    status
}

/// The audit outcome name of a gRPC code (`invalid_argument`, …), for edges that hold a
/// [`Status`] already.
pub fn result_of(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The API key from the `authorization: Bearer <key>` metadata. UNAUTHENTICATED when absent or not
/// a bearer credential; the message never echoes what was sent.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Error> {
    let missing =
        || Error::Unauthenticated("missing `authorization: Bearer <api key>` metadata".into());
    let malformed =
        || Error::Unauthenticated("`authorization` metadata must be `Bearer <api key>`".into());
    let value = metadata.get("authorization").ok_or_else(missing)?;
    let text = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("`authorization` metadata is not valid text".into()))?;
    let (scheme, key) = text.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    let key = key.trim();
    if key.is_empty() {
        return Err(missing());
    }
    Ok(key)
}

/// The gRPC status of one of the core's narrower errors (through [`Error`]).
pub trait ToStatus {
    /// The status this error answers with.
    fn to_status(&self) -> Status;
}

impl ToStatus for crate::tokens::lifecycle::TokenError {
    fn to_status(&self) -> Status {
        status(Error::from(self))
    }
}

impl ToStatus for crate::tokens::issue::IssueError {
    fn to_status(&self) -> Status {
        status(Error::from(self))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokenfleet_store::StoreError;

    use super::*;

    /// Every variant of the error enum, with the code and message it must map to.
    #[test]
    fn every_error_maps_to_one_code() {
        let m = || "msg".to_owned();
        let table: Vec<(Error, Code, &str)> = vec![
            (Error::InvalidArgument(m()), Code::InvalidArgument, "msg"),
            (Error::NotFound(m()), Code::NotFound, "msg"),
            (Error::AlreadyExists(m()), Code::AlreadyExists, "msg"),
            (
                Error::FailedPrecondition(m()),
                Code::FailedPrecondition,
                "msg",
            ),
            (Error::PermissionDenied(m()), Code::PermissionDenied, "msg"),
            (Error::Unauthenticated(m()), Code::Unauthenticated, "msg"),
            (Error::Aborted(m()), Code::Aborted, "msg"),
            (
                Error::Unavailable {
                    message: m(),
                    retry_after: None,
                    detail: "redis://10.0.0.1 refused".into(),
                },
                Code::Unavailable,
                "msg",
            ),
            (
                Error::ResourceExhausted {
                    message: m(),
                    retry_after: None,
                },
                Code::ResourceExhausted,
                "msg",
            ),
            (
                Error::internal("internal error", "password=hunter2"),
                Code::Internal,
                "internal error",
            ),
        ];
        for (err, code, message) in table {
            let result = err.result();
            let status = status(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
            assert_eq!(result, result_of(code), "audit outcome of {code:?}");
            assert!(status.metadata().get("retry-after").is_none());
        }
    }

    #[test]
    fn waits_travel_as_retry_after() {
        let exhausted = status(Error::ResourceExhausted {
            message: "slow down".into(),
            retry_after: Some(Duration::from_millis(1500)),
        });
        assert_eq!(exhausted.metadata().get("retry-after").unwrap(), "2");
        let unavailable = status(Error::Unavailable {
            message: "busy".into(),
            retry_after: Some(Duration::from_millis(10)),
            detail: String::new(),
        });
        assert_eq!(unavailable.metadata().get("retry-after").unwrap(), "1");
    }

    #[test]
    fn store_errors_map_to_codes_without_leaking_internals() {
        let cases = [
            (StoreError::AlreadyExists("k".into()), Code::AlreadyExists),
            (StoreError::NotFound("k".into()), Code::NotFound),
            (
                StoreError::Conflict {
                    key: "k".into(),
                    expected: 1,
                    found: 2,
                },
                Code::Aborted,
            ),
            (
                StoreError::Unavailable("redis://10.0.0.1 refused".into()),
                Code::Unavailable,
            ),
            (
                StoreError::Corrupt {
                    key: "k".into(),
                    problem: "bad json at 12".into(),
                },
                Code::Internal,
            ),
            (StoreError::Config("password=x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = status(Error::from(err));
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("10.0.0.1"));
            assert!(!status.message().contains("bad json"));
            assert!(!status.message().contains("password"));
        }
        let conflict = status(Error::from(StoreError::Conflict {
            key: "k".into(),
            expected: 1,
            found: 2,
        }));
        assert!(conflict.message().contains("changed concurrently"));
    }

    #[test]
    fn bearer_parsing_never_echoes_the_key() {
        let mut md = MetadataMap::new();
        assert!(matches!(bearer(&md), Err(Error::Unauthenticated(_))));
        md.insert("authorization", "Basic tfk_secretvalue".parse().unwrap());
        let err = bearer(&md).unwrap_err();
        assert!(!err.to_string().contains("secretvalue"));
        md.insert("authorization", "bearer  tfk_x ".parse().unwrap());
        assert_eq!(bearer(&md).unwrap(), "tfk_x");
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert!(bearer(&md).is_err());
    }

    #[test]
    fn errors_map_to_status_codes() {
        use time::OffsetDateTime;
        use tokenfleet_core::tokens::lifecycle::TokenError;
        use tokenfleet_store::StoreError;
        let e = tokenfleet_domain::TokenError {
            code: "AADSTS700082".into(),
            reason: "the refresh token expired after 90 days without use".into(),
            fix: "run `tokenfleetctl mailbox consent scan`".into(),
            time: OffsetDateTime::UNIX_EPOCH,
        };
        let dead = TokenError::ReauthRequired {
            mailbox: "scan".into(),
            error: Box::new(e.clone()),
        };
        assert_eq!(dead.to_status().code(), Code::FailedPrecondition);
        assert!(dead.to_string().contains("90 days") && dead.to_string().contains("consent scan"));
        let failing = TokenError::RefreshFailing {
            mailbox: "scan".into(),
            error: Box::new(e),
            retry_at: None,
        };
        assert_eq!(failing.to_status().code(), Code::Unavailable);
        assert_eq!(
            TokenError::Denied("no".into()).to_status().code(),
            Code::PermissionDenied
        );
        let internal = TokenError::from(StoreError::Corrupt {
            key: "k".into(),
            problem: "secret-ish detail".into(),
        })
        .to_status();
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret-ish"));
    }
}
