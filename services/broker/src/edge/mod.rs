//! The broker's edges: where a transport meets the operations. Each edge decodes, calls an
//! operation and encodes; the mapping from [`crate::ops::Error`] to its status codes is here,
//! once per transport.
//!
//! Dependency direction: `edge` depends on `ops` (and tonic); nothing in `ops` depends on `edge`.

pub mod callback;
pub mod grpc_status;
pub mod http_status;

/// The leaf client certificate (DER) of the connection `request` came on, if any: what the
/// core's agent check ([`crate::identity::peer::authenticate`]) verifies. The broker's own
/// listener ([`crate::listener::grpc_incoming`]) records it once per connection (shared here,
/// not copied per call); a service served through tonic's TLS instead (the services are public)
/// has it from there.
pub fn peer_certificate<T>(
    request: &tonic::Request<T>,
) -> Option<std::sync::Arc<rustls::pki_types::CertificateDer<'static>>> {
    match request.extensions().get::<crate::listener::GrpcPeer>() {
        Some(peer) => peer.leaf.clone(),
        None => request
            .peer_certs()?
            .first()
            .map(|leaf| std::sync::Arc::new(leaf.clone().into_owned())),
    }
}
