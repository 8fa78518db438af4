//! Compiles the daemon's protos with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and tonic-prost-build: the public API (`tfsd.v1`) and TensorFlow's
//! MasterService. The worker protocol and the TensorFlow framework messages are generated once,
//! in the `tfsd-protocol` crate, which both binaries depend on: every message and enum of those
//! files is mapped to it with `extern_path` rather than generated again. The file descriptor
//! set of every file, worker protocol included, is also written out for gRPC server reflection.
//!
//! The daemon itself never links libtensorflow, but its integration tests build graphs with
//! the `tensorflow` crate: they (and the benches) get an rpath to the libtensorflow found
//! through pkg-config.

use std::path::PathBuf;

/// Files whose types `tfsd-protocol` generates: TensorFlow's framework protos (package
/// `tensorflow`, shared with the MasterService protos, so mapped type by type) and the worker
/// protocol (a package of its own, mapped whole).
const FRAMEWORK_DIR: &str = "tensorflow/core/framework/";
const WORKER_PACKAGE: &str = "tfsd.worker.v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tfsd/v1/control.proto",
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
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(
            format!(".{WORKER_PACKAGE}"),
            "::tfsd_protocol::tfsd::worker::v1",
        );
    for file in &descriptors.file {
        if !file.name().starts_with(FRAMEWORK_DIR) {
            continue;
        }
        let package = file.package();
        if package != "tensorflow" {
            return Err(format!("{} is in package {package}, not tensorflow", file.name()).into());
        }
        let names = file.message_type.iter().map(|message| message.name());
        let enums = file.enum_type.iter().map(|enumeration| enumeration.name());
        for name in names.chain(enums) {
            builder = builder.extern_path(
                format!(".{package}.{name}"),
                format!("::tfsd_protocol::tensorflow::{name}"),
            );
        }
    }
    builder.compile_fds(descriptors)?;
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
