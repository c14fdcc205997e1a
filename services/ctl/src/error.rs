//! What can go wrong, as one readable line and an exit code. No raw gRPC or transport dumps.

use std::fmt;

use tonic::Code;

/// Exit code: the broker refused or failed the request.
pub const EXIT_API: u8 = 1;
/// Exit code: bad usage or local input (same as clap's).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the broker cannot be reached or is unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A failed command.
#[derive(Debug)]
pub enum CtlError {
    /// Bad usage or unusable local input (unreadable file, nothing to update, no API key).
    Usage(String),
    /// The broker answered with an error status.
    Api { code: Code, message: String },
    /// The broker could not be reached at all.
    Unreachable { url: String, cause: String },
    /// A call did not finish within `--timeout`.
    Timeout { seconds: u64 },
    /// Writing the output failed (other than a closed pipe).
    Output(String),
}

impl CtlError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => EXIT_USAGE,
            CtlError::Api {
                code: Code::Unavailable,
                ..
            }
            | CtlError::Unreachable { .. } => EXIT_UNAVAILABLE,
            CtlError::Api { .. } | CtlError::Timeout { .. } | CtlError::Output(_) => EXIT_API,
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        CtlError::Usage(message.into())
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Usage(message) | CtlError::Output(message) => f.write_str(message),
            CtlError::Api { code, message } => {
                let prefix = code_prefix(*code);
                if message.is_empty() {
                    f.write_str(prefix)?;
                } else {
                    write!(f, "{prefix}: {message}")?;
                }
                if *code == Code::Unauthenticated {
                    f.write_str(" (check TOKENFLEET_API_KEY or --api-key-file)")?;
                }
                Ok(())
            }
            CtlError::Unreachable { url, cause } => {
                write!(f, "cannot reach broker at {url} ({cause})")?;
                let refused = ["connection refused", "timed out", "unreachable", "lookup"]
                    .iter()
                    .any(|c| cause.contains(c));
                if cause.contains("certificate") {
                    f.write_str(" — is it the right broker? set --ca-file or TOKENFLEET_CA_FILE")
                } else if url.starts_with("http://") && !refused {
                    // A TLS listener hangs up on plain HTTP/2 without a word.
                    f.write_str(" — if the broker serves TLS, use an https:// URL")
                } else {
                    f.write_str(" — is it running? set --broker or TOKENFLEET_BROKER")
                }
            }
            CtlError::Timeout { seconds } => write!(
                f,
                "timed out: the broker did not answer within {seconds}s (raise --timeout)"
            ),
        }
    }
}

/// Short readable prefix for every gRPC status code.
pub fn code_prefix(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not supported by this broker",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Collapses whitespace runs (including newlines) so a message stays on one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost readable cause of a transport error: `connection refused`, `timed out`, or the
/// deepest error message in the chain.
pub fn transport_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut deepest = error.to_string();
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_cause(io);
        }
        let text = e.to_string();
        if !text.is_empty() {
            deepest = text;
        }
        current = e.source();
    }
    one_line(&deepest)
}

fn io_cause(io: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match io.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        ErrorKind::ConnectionReset => "connection reset".to_owned(),
        ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
        ErrorKind::TimedOut => "timed out".to_owned(),
        ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        ErrorKind::HostUnreachable => "host unreachable".to_owned(),
        ErrorKind::NetworkUnreachable => "network unreachable".to_owned(),
        _ => {
            // The io error may wrap a further cause (e.g. a TLS alert); prefer that.
            match io.get_ref() {
                Some(inner) => one_line(&inner.to_string()),
                None => one_line(&io.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_one_line_with_a_prefix() {
        let err = CtlError::Api {
            code: Code::InvalidArgument,
            message: one_line("mailbox.address: \"x\"\n is not an e-mail address"),
        };
        assert_eq!(
            err.to_string(),
            "invalid argument: mailbox.address: \"x\" is not an e-mail address"
        );
        assert_eq!(err.exit_code(), 1);
        let err = CtlError::Api {
            code: Code::Unavailable,
            message: String::new(),
        };
        assert_eq!(err.to_string(), "unavailable");
        assert_eq!(err.exit_code(), 69);
    }

    #[test]
    fn unreachable_broker_gives_a_hint() {
        let err = CtlError::Unreachable {
            url: "http://127.0.0.1:50051".into(),
            cause: "connection refused".into(),
        };
        assert_eq!(
            err.to_string(),
            "cannot reach broker at http://127.0.0.1:50051 (connection refused) — is it running? \
             set --broker or TOKENFLEET_BROKER"
        );
        assert_eq!(err.exit_code(), 69);
    }

    #[test]
    fn hints_follow_the_cause() {
        let hint = |url: &str, cause: &str| {
            CtlError::Unreachable {
                url: url.into(),
                cause: cause.into(),
            }
            .to_string()
        };
        assert!(
            hint(
                "http://127.0.0.1:1",
                "stream closed because of a broken pipe"
            )
            .ends_with("use an https:// URL")
        );
        assert!(
            hint(
                "https://localhost:1",
                "invalid peer certificate: UnknownIssuer"
            )
            .ends_with("set --ca-file or TOKENFLEET_CA_FILE")
        );
        assert!(
            hint("http://127.0.0.1:1", "timed out").ends_with("set --broker or TOKENFLEET_BROKER")
        );
    }

    #[test]
    fn every_code_has_a_distinct_prefix() {
        let codes = [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        let prefixes: std::collections::BTreeSet<_> =
            codes.iter().map(|c| code_prefix(*c)).collect();
        assert_eq!(prefixes.len(), codes.len());
    }

    #[test]
    fn transport_cause_finds_the_io_error() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(transport_cause(&err), "connection refused");
    }
}
