//! The one mapping from domain errors to gRPC statuses. Messages are the domain errors'
//! own: written for the client, never a `{:?}` of an internal type.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match &error {
            Error::SessionNotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::GraphVersionMismatch { .. } => Code::FailedPrecondition,
            // TensorFlow's codes are gRPC's codes; anything out of range is an internal error.
            Error::Tensorflow { code, .. } => match Code::from_i32(code.0) {
                Code::Ok => Code::Internal,
                code => code,
            },
            Error::WorkerDied { .. } | Error::SessionBroken(_) | Error::ShuttingDown => {
                Code::Unavailable
            }
            Error::WorkerStart(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Protocol(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TfCode;

    #[test]
    fn tensorflow_codes_pass_through() {
        let status = Status::from(Error::Tensorflow {
            code: TfCode::FAILED_PRECONDITION,
            message: "Attempting to use uninitialized value w".into(),
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "Attempting to use uninitialized value w");
        let status = Status::from(Error::Tensorflow {
            code: TfCode(0),
            message: "odd".into(),
        });
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn unknown_sessions_are_not_found() {
        let status = Status::from(Error::SessionNotFound("s-1".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no session with id \"s-1\"");
    }
}
