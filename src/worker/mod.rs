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

mod operations;
mod pool;
mod process;

pub use operations::{
    CallOutcome, CallOutput, CallTarget, CarriedState, OutputStream, RemoteException, Runtime,
    StepRequest,
};
pub use pool::WarmPool;
pub use process::{ExitDescription, WorkerError, WorkerProcess, WorkerSpec};
