//! The gRPC transport: tonic services over the domain. Only this module (and `proto`)
//! knows prost types of the public API; handlers stay thin (see `session_service.rs`).

mod convert;
mod session_service;
mod status;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::proto::tfsd::v1::session_service_server::SessionServiceServer;
use crate::session::SessionManager;

/// Largest message either way: TensorFlow's own client allows INT32_MAX, and big tensors
/// travel in one message.
pub const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// Serves tfsd.v1 on `listener` until `shutdown` is cancelled, then lets in-flight calls end.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<SessionManager>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sessions = SessionServiceServer::new(session_service::SessionService::new(manager))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(sessions)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
