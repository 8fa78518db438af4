//! What can go wrong in an operator command, and the exit code each failure maps to.
//! Scripts branch on the code, people read the message, so both are decided here and
//! nowhere else.

use std::error::Error as _;

use tonic::Code;

use super::{EXIT_FAILED, EXIT_UNREACHABLE};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No connection to the daemon: refused, timed out, or broken during the call.
    #[error("cannot reach tfsd at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// The daemon answered the call with a gRPC error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Daemon(tonic::Status),
    /// `check-config` found the file unreadable or invalid; the message names the key.
    #[error("{0:#}")]
    InvalidConfig(anyhow::Error),
    /// `health`: the daemon answered, and the service is not SERVING.
    #[error("{service:?} is not serving")]
    NotServing { service: String },
    /// `watch` could not listen for Ctrl-C.
    #[error("listen for Ctrl-C: {0}")]
    Signal(#[source] std::io::Error),
    /// `--token-file` could not be read or holds no usable token.
    #[error("cannot use the token file {path}: {reason}")]
    TokenFile { path: String, reason: String },
    /// `run`: the script could not be read.
    #[error("cannot read the script {path}: {error}")]
    Script {
        path: String,
        #[source]
        error: std::io::Error,
    },
    /// Writing to stdout failed (a closed pipe is not reported: see `cli::run`).
    #[error("write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// A status from a call: the daemon's own answer, or — when tonic made it from a
    /// transport failure, which is the only case where it carries a source error — proof
    /// that the connection broke, which scripts must see as "unreachable", not as an answer.
    pub fn from_status(status: tonic::Status, address: &impl std::fmt::Display) -> CliError {
        if status.source().is_some() {
            return CliError::Unreachable {
                address: address.to_string(),
                reason: format!("the connection failed: {}", status.message()),
            };
        }
        CliError::Daemon(status)
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::Daemon(_)
            | CliError::NotServing { .. }
            | CliError::InvalidConfig(_)
            | CliError::Signal(_)
            | CliError::Script { .. }
            | CliError::TokenFile { .. }
            | CliError::Output(_) => EXIT_FAILED,
        }
    }

    /// What the operator can do about it, where there is something to do.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::Unreachable { .. } => Some(
                "is the daemon running? Start it with `scripts/serve` (or `tfsd serve \
                 --config config/tfsd.toml`), or point --address / TFSD_ADDRESS at it",
            ),
            CliError::Daemon(status) if status.code() == Code::NotFound => {
                Some("`tfsd sessions` lists the sessions that exist")
            }
            _ => None,
        }
    }
}

/// The gRPC name of a status code (as in the gRPC spec and grpcurl), which is what an
/// operator searches for; tonic's `Display` gives a sentence instead.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_errors_print_the_grpc_code_name_and_exit_1() {
        let error = CliError::from_status(
            tonic::Status::not_found("no session with id \"s-1\""),
            &"127.0.0.1:1",
        );
        assert_eq!(error.to_string(), "NOT_FOUND: no session with id \"s-1\"");
        assert_eq!(error.exit_code(), EXIT_FAILED);
        assert!(error.hint().is_some());
    }

    #[test]
    fn transport_failures_during_a_call_are_unreachable() {
        let status = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let error = CliError::from_status(status, &"127.0.0.1:1");
        assert_eq!(error.exit_code(), EXIT_UNREACHABLE);
        assert!(
            error
                .to_string()
                .starts_with("cannot reach tfsd at 127.0.0.1:1: "),
            "{error}"
        );
    }
}
