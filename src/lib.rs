//! tfsd, a TensorFlow session daemon: each client session lives in its own worker process,
//! and resetting it — graph, variables, or the whole process — is one gRPC call.
//!
//! Layout (see `docs/ARCHITECTURE.md` for the invariants):
//! - `cli`: the operator CLI (`tfsd status`, `sessions`, `watch`, ...), a tfsd.v1 client.
//! - `auth`: who is calling (bearer tokens, client certificates) and what they may see.
//! - `config`: the TOML config, validated into `Config`.
//! - `daemon`: the daemon's life: start, serve, drain on a signal, reap.
//! - `grpc`: the tonic services (tfsd.v1), thin over the domain.
//! - `limits`: operator maxima on what clients may ask.
//! - `master`: TensorFlow's MasterService, so `tf.compat.v1.Session("grpc://…")` runs here.
//! - `session`: sessions, their operations (`SessionManager`) and lifecycle events.
//! - `worker`: worker processes (spawn, protocol, death, reaping) and the warm pool.
//! - `tensor`: TensorFlow's TensorProto, validated and decoded (from `tfsd-protocol`, shared
//!   with the worker).
//! - `memory`: a process's RSS and private memory from `/proc`.
//! - `metrics`: Prometheus metrics and their HTTP endpoint.
//! - `notify`: systemd readiness and watchdog notifications.
//! - `store`: durable sessions (SQLite) and variable checkpoints in the state directory.
//! - `system`: system-wide memory (sysinfo).
//! - `units`: byte sizes and durations as the config writes them.
//! - `proto`: generated code (the worker protocol and TensorFlow's framework messages
//!   re-exported from `tfsd-protocol`).
//!
//! This crate never links libtensorflow: only the `tfsd-worker` binary (in `worker/`) does.

pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod gpu;
pub mod grpc;
pub mod limits;
pub mod master;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proto;
pub mod session;
pub mod store;
pub mod system;
pub mod tensor;
pub mod units;
pub mod unix_socket;
pub mod worker;
