//! What the tfsd supervisor and its workers both speak, and nothing else:
//! - `tfsd::worker::v1`: the supervisor–worker protocol (`proto/tfsd/worker/v1/worker.proto`),
//!   length-delimited frames on the socketpair a worker inherits;
//! - `tensorflow`: the TensorFlow framework messages it carries (`TensorProto` and what it is
//!   made of, plus `DeviceAttributes`), with TensorFlow's own package and field numbers;
//! - `tensor`: the pure `TensorProto` codec (validation, decoding, encoding).
//!
//! Architecture Invariant: this crate depends on prost, bytes and thiserror only. The worker
//! binary depends on it and on no other tfsd crate, so the worker never compiles or links the
//! daemon's transport (tonic, axum), SQLite, sysinfo or Prometheus. The daemon re-exports
//! these types from its `proto` module (its build script maps them with `extern_path`).

pub mod tensor;

#[allow(clippy::all, reason = "generated code is not ours to lint")]
pub mod tensorflow {
    include!(concat!(env!("OUT_DIR"), "/tensorflow.rs"));
}

#[allow(clippy::all, reason = "generated code is not ours to lint")]
pub mod tfsd {
    pub mod worker {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tfsd.worker.v1.rs"));
        }
    }
}
