//! The one mapping from domain errors to gRPC statuses. Messages are the domain errors'
//! own: written for the client, never a `{:?}` of an internal type, and never longer than
//! `MAX_STATUS_MESSAGE_BYTES` (a status travels in trailers, which clients bound).

use tonic::{Code, Status};

use crate::error::{Error, clip_message};

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
            Error::WorkerStart(_) | Error::Unavailable(_) => Code::Unavailable,
            Error::Cancelled(_) => Code::Cancelled,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Protocol(_) => Code::Internal,
        };
        Status::new(code, clip_message(error.to_string()))
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

    #[test]
    fn messages_fit_in_trailers() {
        let status = Status::from(Error::Tensorflow {
            code: TfCode::NOT_FOUND,
            message: format!("Fetch '{}' not found", "y".repeat(16 << 20)),
        });
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() <= crate::error::MAX_STATUS_MESSAGE_BYTES,
            "{}",
            status.message().len()
        );
        assert!(status.message().starts_with("Fetch 'yyy"));
        assert!(status.message().ends_with("y' not found"));
    }
}
