//! Errors in the response body. TensorFlow's client sets `store_errors_in_response_body` on
//! every RunStep: the server then answers gRPC OK with the error's code and message in
//! `status_code` / `status_error_message`, and the client raises the matching
//! `tf.errors.*Error`. Other methods, and RunStep without the flag, answer a gRPC status
//! (TensorFlow's error codes are gRPC's, so the client maps it to the same classes).

use tonic::{Response, Status};

use crate::error::Error;
use crate::proto::tensorflow::RunStepResponse;

/// A domain error as the gRPC status a TensorFlow client understands: the daemon's one
/// `From<Error> for Status` mapping, so the codes are the same as over tfsd.v1.
pub fn status(error: Error) -> Status {
    Status::from(error)
}

/// Answers a RunStep, putting a failure in the body when the client asked for that.
pub fn run_step_answer(
    store_errors_in_response_body: bool,
    result: Result<RunStepResponse, Status>,
) -> Result<Response<RunStepResponse>, Status> {
    match result {
        Ok(response) => Ok(Response::new(response)),
        Err(status) if store_errors_in_response_body => Ok(Response::new(RunStepResponse {
            status_code: status.code() as i32,
            status_error_message: status.message().to_string(),
            ..RunStepResponse::default()
        })),
        Err(status) => Err(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TfCode;

    #[test]
    fn failures_go_in_the_body_when_asked() {
        let failure = status(Error::Tensorflow {
            code: TfCode::FAILED_PRECONDITION,
            message: "Attempting to use uninitialized value w".into(),
        });
        let answer = run_step_answer(true, Err(failure.clone()))
            .expect("gRPC OK")
            .into_inner();
        assert_eq!(answer.status_code, tonic::Code::FailedPrecondition as i32);
        assert_eq!(
            answer.status_error_message,
            "Attempting to use uninitialized value w"
        );
        let status = run_step_answer(false, Err(failure)).expect_err("a gRPC status");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn successes_are_unchanged() {
        let answer = run_step_answer(true, Ok(RunStepResponse::default()))
            .expect("OK")
            .into_inner();
        assert_eq!(answer.status_code, 0);
    }
}
