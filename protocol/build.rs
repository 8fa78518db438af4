//! Compiles the protos both binaries speak, from the workspace's `proto/` directory: the
//! supervisor–worker protocol and the TensorFlow framework messages it carries. protox is a
//! pure-Rust protobuf compiler, so no system `protoc` is needed; prost-build writes plain
//! messages (no gRPC: the worker protocol runs over a socketpair, not HTTP/2).
//!
//! The daemon (`../build.rs`) compiles its own gRPC services and points every message and
//! enum of these files at this crate (`extern_path`), so each type is generated exactly once.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // File names stay relative to `proto/` ("tensorflow/core/framework/tensor.proto"), as
    // TensorFlow names them, so the daemon's descriptor set describes the same files.
    let protos = [
        "../proto/tfsd/worker/v1/worker.proto",
        "../proto/tensorflow/core/framework/device_attributes.proto",
        "../proto/tensorflow/core/framework/tensor.proto",
        "../proto/tensorflow/core/framework/tensor_shape.proto",
        "../proto/tensorflow/core/framework/types.proto",
    ];
    println!("cargo:rerun-if-changed=../proto/tfsd/worker");
    println!("cargo:rerun-if-changed=../proto/tensorflow/core/framework");
    let descriptors = protox::compile(protos, ["../proto"])?;
    prost_build::Config::new()
        // A run's fetches are handed to the socket without a copy (`Bytes`).
        .bytes([".tensorflow.TensorProto.tensor_content"])
        .compile_fds(descriptors)?;
    Ok(())
}
