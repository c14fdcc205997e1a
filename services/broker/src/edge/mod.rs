//! The broker's edges: where a transport meets the operations. Each edge decodes, calls an
//! operation and encodes; the mapping from [`crate::ops::Error`] to its status codes is here,
//! once per transport.
//!
//! Dependency direction: `edge` depends on `ops` (and tonic); nothing in `ops` depends on `edge`.

pub mod callback;
pub mod grpc_status;
pub mod http_status;

/// The leaf client certificate (DER) of the connection `request` came on, if any: what the
/// core's agent check ([`crate::identity::peer::authenticate`]) verifies.
pub fn peer_certificate<T>(request: &tonic::Request<T>) -> Option<Vec<u8>> {
    let certs = request.peer_certs()?;
    certs.first().map(|c| c.as_ref().to_vec())
}
