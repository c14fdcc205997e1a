//! Wire types of the tokenfleet API (`tokenfleet.v1`): messages, the `Admin` and `TokenBroker`
//! client and server stubs, and the encoded file descriptor set for gRPC server reflection.
//!
//! Dependency direction: nothing in the workspace is below this crate; it depends only on
//! tonic/prost.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

pub mod v1 {
    tonic::include_proto!("tokenfleet.v1");
}

pub mod codec;

/// Encoded `FileDescriptorSet` of every tokenfleet.v1 file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tokenfleet_v1_descriptor");
