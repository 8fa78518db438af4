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

#[cfg(test)]
mod tests {
    use prost::Message;

    /// Reflection (grpcurl) needs every file, including those whose types `tfsd-protocol`
    /// generates and this crate only maps.
    #[test]
    fn the_descriptor_set_describes_every_file() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET)
            .expect("a FileDescriptorSet");
        let names: Vec<&str> = set.file.iter().map(|file| file.name()).collect();
        for expected in [
            "tfsd/v1/control.proto",
            "tfsd/v1/tfsd.proto",
            "tfsd/worker/v1/worker.proto",
            "tensorflow/core/protobuf/master_service.proto",
            "tensorflow/core/protobuf/master.proto",
            "tensorflow/core/protobuf/named_tensor.proto",
            "tensorflow/core/framework/tensor.proto",
            "tensorflow/core/framework/tensor_shape.proto",
            "tensorflow/core/framework/types.proto",
            "tensorflow/core/framework/device_attributes.proto",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} is missing from {names:?}"
            );
        }
    }
}
