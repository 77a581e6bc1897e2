//! Generates the tonic code for sakuga.v1 and KEDA's external scaler with protox (a pure
//! Rust protobuf compiler, so no protoc is needed) and writes the file descriptor set
//! that server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sakuga/v1/common.proto",
    "sakuga/v1/render.proto",
    "sakuga/v1/signals.proto",
    "sakuga/v1/nodes.proto",
    "externalscaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("sakuga_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
