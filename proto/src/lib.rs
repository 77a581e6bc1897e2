//! `sakuga-proto`: sakuga's gRPC contract, generated with tonic from `proto/`.
//!
//! - [`v1`]: package `sakuga.v1`: `RenderService`, `SignalService`, `NodeService`.
//! - [`externalscaler`]: KEDA's external scaler protocol, field names exactly as KEDA's.
//! - [`codec`]: the services' codec (undecodable messages are `INVALID_ARGUMENT`).
//! - [`FILE_DESCRIPTOR_SET`]: every file above, for server reflection.

#![allow(missing_debug_implementations, clippy::all)]

pub mod codec;

/// Package `sakuga.v1`.
pub mod v1 {
    tonic::include_proto!("sakuga.v1");
}

/// KEDA's `externalscaler` package.
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// The encoded `FileDescriptorSet` of every proto file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sakuga_descriptor.bin"));
