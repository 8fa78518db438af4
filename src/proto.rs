//! Code generated from `proto/` by `build.rs`, and the types the `tfsd-protocol` crate
//! generates (the worker protocol and TensorFlow's framework messages) re-exported under the
//! same paths. Only this module, `grpc/` and the worker protocol (`worker/connection.rs`, and
//! the worker binary) touch these types.

#![allow(
    missing_debug_implementations,
    clippy::all,
    reason = "generated code is not ours to lint"
)]

/// Package `tensorflow`: the MasterService, generated here, and the framework messages
/// (`TensorProto`, `DataType`, `DeviceAttributes`, ...) from `tfsd-protocol`.
pub mod tensorflow {
    pub use tfsd_protocol::tensorflow::*;

    tonic::include_proto!("tensorflow");
}

pub mod tfsd {
    pub mod v1 {
        tonic::include_proto!("tfsd.v1");
    }
    /// The supervisor–worker protocol, from `tfsd-protocol`.
    pub use tfsd_protocol::tfsd::worker;
}

/// The file descriptor set of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tfsd_descriptor");
