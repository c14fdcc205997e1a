//! The broker's edges: where a transport meets the operations. Each edge decodes, calls an
//! operation and encodes; the mapping from [`crate::ops::Error`] to its status codes is here,
//! once per transport.
//!
//! Dependency direction: `edge` depends on `ops` (and tonic); nothing in `ops` depends on `edge`.

pub mod grpc_status;
pub mod http_status;
