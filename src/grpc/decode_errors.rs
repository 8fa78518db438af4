//! A request that is not a valid protobuf message answers INVALID_ARGUMENT, not INTERNAL.
//!
//! tonic decodes the request before any handler runs and answers a decode failure (bytes
//! that are not the message, or nesting past prost's recursion limit of 100) with INTERNAL,
//! as gRPC's guidance for a *server's* parse errors has it. For a daemon whose clients send
//! the bytes, INTERNAL says "our fault, retry": a client's malformed request is the client's
//! INVALID_ARGUMENT. tonic offers no hook in its codec short of a codec of our own in
//! build.rs, so this wrapper rewrites the trailers-only answer tonic sends for it (the status
//! in the response headers; a handler's own answers carry theirs in trailers and are never
//! touched).
//!
//! Wrap each service the servers add, outside any interceptor:
//! `.add_service(DecodeErrorsAreInvalidArgument::new(service))`.

use std::task::{Context, Poll};

use futures::TryFutureExt;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Status};

/// How prost's `DecodeError` begins, and so every decode failure tonic reports.
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// The service `S`, with tonic's INTERNAL for an undecodable request turned into
/// INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct DecodeErrorsAreInvalidArgument<S> {
    inner: S,
}

impl<S> DecodeErrorsAreInvalidArgument<S> {
    pub fn new(inner: S) -> Self {
        DecodeErrorsAreInvalidArgument { inner }
    }
}

impl<S: NamedService> NamedService for DecodeErrorsAreInvalidArgument<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>>
    for DecodeErrorsAreInvalidArgument<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
{
    type Response = http::Response<ResponseBody>;
    type Error = S::Error;
    type Future = futures::future::MapOk<
        S::Future,
        fn(http::Response<ResponseBody>) -> http::Response<ResponseBody>,
    >;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        self.inner
            .call(request)
            .map_ok(decode_error_as_invalid_argument)
    }
}

/// The response, with its header status changed to INVALID_ARGUMENT if it is tonic's
/// INTERNAL for a request that did not decode.
fn decode_error_as_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::Internal || !status.message().starts_with(DECODE_ERROR) {
        return response;
    }
    let status = Status::invalid_argument(format!(
        "the request is not a valid message of this method: {}",
        status.message()
    ));
    // The message is ours and ASCII: it always fits in a header.
    if let Err(error) = status.add_header(response.headers_mut()) {
        tracing::warn!(%error, "could not rewrite a decode error's status");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: Status) -> http::Response<()> {
        let mut response = http::Response::new(());
        status.add_header(response.headers_mut()).expect("header");
        response
    }

    fn status_of(response: &http::Response<()>) -> Status {
        Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn a_request_that_does_not_decode_is_an_invalid_argument() {
        let response = decode_error_as_invalid_argument(answer(Status::internal(
            "failed to decode Protobuf message: recursion limit reached",
        )));
        let status = status_of(&response);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().ends_with(": recursion limit reached"),
            "{status:?}"
        );
    }

    #[test]
    fn every_other_answer_is_untouched() {
        for original in [
            Status::internal("worker protocol error: a response without a result"),
            Status::not_found("failed to decode Protobuf message, said nobody"),
            Status::unavailable("shutting down"),
        ] {
            let response = decode_error_as_invalid_argument(answer(original.clone()));
            let status = status_of(&response);
            assert_eq!(status.code(), original.code());
            assert_eq!(status.message(), original.message());
        }
        // A response with its status in trailers (any answer a handler sent).
        let response = decode_error_as_invalid_argument(http::Response::new(()));
        assert!(Status::from_header_map(response.headers()).is_none());
    }

    #[tokio::test]
    async fn the_wrapper_rewrites_what_the_service_answers() {
        #[derive(Clone)]
        struct Failing;
        impl Service<http::Request<()>> for Failing {
            type Response = http::Response<()>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<http::Response<()>, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: http::Request<()>) -> Self::Future {
                std::future::ready(Ok(answer(Status::internal(
                    "failed to decode Protobuf message: invalid wire type",
                ))))
            }
        }
        let mut service = DecodeErrorsAreInvalidArgument::new(Failing);
        let response = service
            .call(http::Request::new(()))
            .await
            .expect("infallible");
        assert_eq!(status_of(&response).code(), Code::InvalidArgument);
    }
}
