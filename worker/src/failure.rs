//! The worker's error: a TensorFlow status code (the same numbers as gRPC's) and a message
//! for the client. Sent back as `worker.v1.Error`.

use tensorflow::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const INTERNAL: i32 = 13;

    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Failure {
        Failure::new(Failure::INVALID_ARGUMENT, message)
    }

    pub fn internal(message: impl Into<String>) -> Failure {
        Failure::new(Failure::INTERNAL, message)
    }
}

fn code_number(code: Code) -> i32 {
    match code {
        Code::Ok => 0,
        Code::Cancelled => 1,
        Code::Unknown => 2,
        Code::InvalidArgument => 3,
        Code::DeadlineExceeded => 4,
        Code::NotFound => 5,
        Code::AlreadyExists => 6,
        Code::PermissionDenied => 7,
        Code::ResourceExhausted => 8,
        Code::FailedPrecondition => 9,
        Code::Aborted => 10,
        Code::OutOfRange => 11,
        Code::Unimplemented => 12,
        Code::Internal => 13,
        Code::Unavailable => 14,
        Code::DataLoss => 15,
        Code::Unauthenticated => 16,
        Code::UnrecognizedEnumValue(value) => value as i32,
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        let code = status.code();
        // Status's Display is "Code: message"; the client gets the code separately.
        let text = status.to_string();
        let prefix = format!("{code}: ");
        let message = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
        Failure::new(code_number(code), message)
    }
}

impl From<std::ffi::NulError> for Failure {
    fn from(error: std::ffi::NulError) -> Failure {
        Failure::invalid_argument(format!("a name holds a NUL byte: {error}"))
    }
}
