//! Code generated from `proto/` by `build.rs`. Only this module, `grpc/` and the worker
//! protocol (`worker/connection.rs`, and the worker binary) touch these types.

#![allow(
    missing_debug_implementations,
    clippy::all,
    reason = "generated code is not ours to lint"
)]

pub mod tensorflow {
    tonic::include_proto!("tensorflow");
}

pub mod tfsd {
    pub mod v1 {
        tonic::include_proto!("tfsd.v1");
    }
    pub mod worker {
        pub mod v1 {
            tonic::include_proto!("tfsd.worker.v1");
        }
    }
}

/// The file descriptor set of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tfsd_descriptor");
