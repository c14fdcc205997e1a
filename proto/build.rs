//! Generates the tokenfleet.v1 code and a file descriptor set (for gRPC server reflection).
//! Uses the vendored `protoc` so a fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "tokenfleet/v1/types.proto",
        "tokenfleet/v1/fleet.proto",
        "tokenfleet/v1/admin.proto",
        "tokenfleet/v1/broker.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        // Prost with small per-call buffers (see src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .file_descriptor_set_path(out.join("tokenfleet_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &files.map(PathBuf::from),
            &[PathBuf::from("."), include],
        )?;
    Ok(())
}
