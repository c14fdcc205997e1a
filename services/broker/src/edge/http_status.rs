//! The one mapping from [`Error`] to HTTP status codes, exhaustive over the error enum, for the
//! pages and endpoints of the HTTP listener (the consent callback today, the console next). A
//! plain number, so page builders need no web framework.

use crate::ops::Error;

/// The HTTP status for `err`.
pub fn http_status(err: &Error) -> u16 {
    match err {
        Error::InvalidArgument(_) => 400,
        Error::Unauthenticated(_) => 401,
        Error::PermissionDenied(_) => 403,
        Error::NotFound(_) => 404,
        Error::AlreadyExists(_) | Error::FailedPrecondition(_) | Error::Aborted(_) => 409,
        Error::ResourceExhausted { .. } => 429,
        Error::Internal { .. } => 500,
        Error::Unavailable { .. } => 503,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_one_http_status() {
        let m = || "m".to_owned();
        let table = [
            (Error::InvalidArgument(m()), 400),
            (Error::Unauthenticated(m()), 401),
            (Error::PermissionDenied(m()), 403),
            (Error::NotFound(m()), 404),
            (Error::AlreadyExists(m()), 409),
            (Error::FailedPrecondition(m()), 409),
            (Error::Aborted(m()), 409),
            (
                Error::ResourceExhausted {
                    message: m(),
                    retry_after: None,
                },
                429,
            ),
            (Error::internal("m", "d"), 500),
            (
                Error::Unavailable {
                    message: m(),
                    retry_after: None,
                    detail: String::new(),
                },
                503,
            ),
        ];
        for (err, status) in table {
            assert_eq!(http_status(&err), status, "{err:?}");
        }
    }
}
