//! Worker processes: spawning `tfsd-worker`, talking to it, noticing its death, reaping it.
//!
//! A worker is one OS process that links libtensorflow and hosts one TensorFlow session. The
//! supervisor talks to it over a Unix socketpair inherited as fd 3, with length-delimited
//! protobuf frames (`proto/tfsd/worker/v1/worker.proto`). Why not tonic over a Unix socket:
//! a socketpair needs no path on disk to create, secure or clean up, the worker cannot be
//! reached by anyone else, and the supervisor learns of the worker's death from the process
//! itself (`wait`) the moment it happens, not at the next request.
//!
//! Invariants: every spawned worker is reaped by its exit watcher task; a worker dies with
//! the supervisor (`PR_SET_PDEATHSIG`, and the worker exits when its socket closes); dropping
//! the last handle to a worker kills it.

pub mod budget;
pub mod cgroup;
pub mod limiter;
mod operations;
mod pool;
mod process;
pub mod sandbox;

pub use limiter::{EnforcementMode, MemoryLimiter};
pub use operations::{
    CallOutcome, CallOutput, CallTarget, CarriedState, OutputStream, RemoteException, Runtime,
    StepRequest,
};
pub use pool::{StartGate, StartLimits, Urgency, WarmPool};
pub use process::{ExitDescription, WorkerError, WorkerProcess, WorkerSpec};

/// When the supervisor stops waiting for a worker and counts it as hung (`workers.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// For a control operation: load, extend, a reset, a state export or import.
    pub call: std::time::Duration,
    /// Added to a step's own timeout (TensorFlow cancels between kernels, so a little late).
    pub run_grace: std::time::Duration,
    /// How long a worker may stay stopped (state T in /proc/PID/stat) before it is killed.
    pub liveness: std::time::Duration,
}
