//! The domain's errors: what can go wrong with a session, in terms a caller can branch on.
//! `grpc/status.rs` maps each one to a gRPC status, exhaustively.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no session with id {0:?}")]
    SessionNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "graph version mismatch: the session is at version {actual}, the request says \
         {requested}; fetch the session and extend from its current version"
    )]
    GraphVersionMismatch { actual: u64, requested: u64 },
    /// An error TensorFlow reported, with TensorFlow's code (the same numbers as gRPC's).
    #[error("{message}")]
    Tensorflow { code: TfCode, message: String },
    #[error(
        "the session's worker (pid {pid}) died while handling the request: {how}; the session \
         is being restored in a fresh worker (variables are lost unless preserved)"
    )]
    WorkerDied {
        pid: u32,
        /// How it ended, in words ("killed by signal 9 (SIGKILL)").
        how: String,
    },
    #[error("could not start a worker process: {0}")]
    WorkerStart(String),
    #[error("session {0} could not be restored after its worker died; RecycleSession retries")]
    SessionBroken(String),
    /// The memory policy killed the worker under a running step (hard limit).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The operation does not apply to the session as it is (e.g. a graph operation on a
    /// Python session, Python sessions not configured).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A call ran past its deadline and was stopped.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("the daemon is shutting down and takes no new work")]
    ShuttingDown,
    #[error("worker protocol error: {0}")]
    Protocol(String),
}

/// A TensorFlow status code (`TF_Code`): the same numbers as gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TfCode(pub i32);

impl TfCode {
    pub const INVALID_ARGUMENT: TfCode = TfCode(3);
    pub const NOT_FOUND: TfCode = TfCode(5);
    pub const FAILED_PRECONDITION: TfCode = TfCode(9);
    pub const INTERNAL: TfCode = TfCode(13);
}

impl fmt::Display for TfCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
