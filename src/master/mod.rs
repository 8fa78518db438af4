//! TensorFlow's MasterService, so that an unmodified `tf.compat.v1.Session("grpc://HOST:PORT")`
//! (and graph-mode Keras 2 on top of it) runs on tfsd. Served on its own listener
//! (`[master] listen`), beside tfsd.v1.
//!
//! Every MasterService session is an ordinary tfsd session created through the
//! `SessionManager`: its own worker, listed by ListSessions with the label
//! `tfsd.origin=master`, resettable and recyclable by an operator through tfsd.v1. The
//! session handle the client gets *is* the tfsd session id, so a recycle (same id) is
//! invisible to the client. This module owns only what TensorFlow's protocol adds on top:
//! - `service.rs`: the handlers, thin over the manager;
//! - `credentials.rs`: who creates a session: a token in the ConfigProto, or a client
//!   without credentials where that is allowed;
//! - `convert.rs`: the fields tfsd reads from ConfigProto / RunOptions / CallableOptions,
//!   named tensors, the device list;
//! - `sessions.rs`: which sessions are MasterService sessions, their client address and
//!   owner (the scope of Reset), their operation timeout and callables;
//! - `callables.rs`: MakeCallable / RunCallable / ReleaseCallable as ordinary runs;
//! - `dedup.rs`: `request_id` de-duplication, so a retried step never runs twice;
//! - `errors.rs`: errors in the response body (`store_errors_in_response_body`).
//!
//! It must not touch sessions created through tfsd.v1: their handles are unknown here.
//!
//! The operator's `[limits]` apply here as over tfsd.v1, through the same checks
//! (`limits.rs`): a client with a token counts as its principal; for clients without
//! credentials every client address is one principal, `master:IP`.

mod callables;
mod convert;
mod credentials;
mod dedup;
mod errors;
mod service;
mod sessions;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

pub use credentials::{MasterAccess, TOKEN_PREFIX};
pub use sessions::{
    CLIENT_LABEL, NAME_LABEL, OPERATION_TIMEOUT_LABEL, ORIGIN_LABEL, ORIGIN_MASTER, PRINCIPAL_LABEL,
};

use crate::limits::Limits;
use crate::proto::tensorflow::master_service_server::MasterServiceServer;
use crate::session::SessionManager;

/// Serves MasterService on `listener`, within the operator's `limits`, to the clients
/// `access` lets in, until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<SessionManager>,
    limits: Limits,
    access: MasterAccess,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sessions = Arc::new(sessions::MasterSessions::default());
    // Sessions brought back from the state directory keep serving their TensorFlow clients.
    let adopted = sessions.adopt_restored(&manager.list());
    if adopted > 0 {
        tracing::info!(
            adopted,
            "MasterService sessions restored from the state directory"
        );
    }
    tokio::spawn(
        sessions
            .clone()
            .forget_closed(manager.clone(), shutdown.clone()),
    );
    let max_message = limits.max_message_bytes;
    let service = MasterServiceServer::new(service::MasterService::new(service::Master::new(
        manager, sessions, limits, access,
    )))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    // Steps are small request/response pairs: Nagle's algorithm would hold them back.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (reflection_v1, reflection_v1alpha) =
        crate::grpc::reflection(&["tensorflow.MasterService"])?;
    tonic::transport::Server::builder()
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(crate::grpc::DecodeErrorsAreInvalidArgument::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
