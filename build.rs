//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and tonic-prost-build. The file descriptor set is also written out for
//! gRPC server reflection.
//!
//! The daemon itself never links libtensorflow, but its integration tests build graphs with
//! the `tensorflow` crate: they (and the benches) get an rpath to the libtensorflow found
//! through pkg-config.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tfsd/v1/tfsd.proto",
        "proto/tfsd/worker/v1/worker.proto",
        "proto/tensorflow/core/protobuf/master_service.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tfsd_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".tensorflow.TensorProto.tensor_content")
        .compile_fds(descriptors)?;
    if let Ok(library) = pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("tensorflow")
    {
        for dir in library.link_paths {
            println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{}", dir.display());
            println!("cargo:rustc-link-arg-benches=-Wl,-rpath,{}", dir.display());
        }
    }
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    Ok(())
}
