//! The gRPC transport: tonic services over the domain. Only this module (and `proto`)
//! knows prost types of the public API; handlers stay thin (see `session_service.rs`).
//!
//! Besides tfsd.v1 the server answers `grpc.health.v1.Health` (overall and per service)
//! and server reflection in both v1 and v1alpha (grpcurl 1.8 asks for v1alpha), so
//! operators can use grpcurl with no proto files at hand.

mod convert;
mod decode_errors;
mod session_service;
mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::AuthConfig;
use crate::config::TlsConfig;
use crate::limits::Limits;
use crate::proto::tfsd::v1::session_service_server::SessionServiceServer;
use crate::session::SessionManager;

pub use decode_errors::DecodeErrorsAreInvalidArgument;

/// Largest message either way: TensorFlow's own client allows INT32_MAX, and big tensors
/// travel in one message.
pub const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// The fully qualified name of the tfsd.v1 service, as health checks name it.
pub const SESSION_SERVICE: &str = "tfsd.v1.SessionService";

/// Health of the overall server ("") and of tfsd.v1, as the daemon's state changes.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    /// Once draining, nothing reports SERVING again.
    draining: Arc<AtomicBool>,
}

impl Health {
    /// Whether tfsd.v1 can take work: false while no worker can be started or while draining.
    pub async fn set_sessions_serving(&self, serving: bool) {
        let status = if serving && !self.draining.load(Ordering::SeqCst) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter
            .set_service_status(SESSION_SERVICE, status)
            .await;
    }

    /// Draining: everything reports NOT_SERVING.
    pub async fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.set_sessions_serving(false).await;
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

/// What the tfsd.v1 listener needs besides the domain: who may call, how to encrypt, and
/// the operator's limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub auth: Arc<AuthConfig>,
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
}

/// The rustls configuration for the listener: the server's identity and, when a client CA
/// is configured, client certificates signed by it (optional at the TLS layer: a caller may
/// use a bearer token instead; the interceptor decides who gets in).
fn tls_config(tls: &TlsConfig) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).with_context(|| format!("read the {what} {}", path.display()))
    };
    let identity = Identity::from_pem(read(&tls.cert, "tls.cert")?, read(&tls.key, "tls.key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca, "tls.client_ca")?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// Serves tfsd.v1, health and reflection on `listener` (and `unix_socket`) until `shutdown`
/// is cancelled, then lets in-flight calls end.
///
/// `shutdown` starts the drain (event streams end, new sessions are refused with
/// UNAVAILABLE); `stop_accepting`, cancelled once the drain is over, closes the listeners.
/// Until then a client connecting during the drain gets a clear UNAVAILABLE, not a connection
/// accepted by the kernel's backlog and then dropped. `unix_socket` (`server.unix_socket`,
/// bound by `crate::unix_socket::bind`) serves the same services beside TCP, with the peer's
/// uid as a credential (`auth::Listener::UnixSocket`) and without TLS.
pub async fn serve(
    listener: TcpListener,
    unix_socket: Option<tokio::net::UnixListener>,
    manager: Arc<SessionManager>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    options: ServeOptions,
    shutdown: CancellationToken,
    stop_accepting: CancellationToken,
) -> anyhow::Result<()> {
    let services = |listener| {
        let max_message = options.limits.max_message_bytes;
        let sessions = SessionServiceServer::new(session_service::SessionService::new(
            manager.clone(),
            options.limits.clone(),
            shutdown.clone(),
        ))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let sessions = tonic::service::interceptor::InterceptedService::new(
            sessions,
            crate::auth::interceptor(options.auth.clone(), listener),
        );
        let (reflection_v1, reflection_v1alpha) = reflection(&[SESSION_SERVICE, HEALTH_SERVICE])?;
        anyhow::Ok((
            health_service.clone(),
            reflection_v1,
            reflection_v1alpha,
            DecodeErrorsAreInvalidArgument::new(sessions),
        ))
    };
    let (health, reflection_v1, reflection_v1alpha, sessions) =
        services(crate::auth::Listener::Tcp)?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls_config(tls)?)
            .context("configure TLS for the tfsd.v1 listener")?;
    }
    let tcp = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(sessions)
        // TCP_NODELAY: a response written in two segments (headers, then data) must not wait
        // for the client's delayed ACK (Nagle): without it, concurrent callers saw 40 ms p99.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop_accepting.clone().cancelled_owned(),
        );
    let Some(unix_socket) = unix_socket else {
        tcp.await?;
        return Ok(());
    };
    let (health, reflection_v1, reflection_v1alpha, sessions) =
        services(crate::auth::Listener::UnixSocket)?;
    let unix = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(sessions)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(unix_socket),
            stop_accepting.cancelled_owned(),
        );
    tokio::try_join!(
        async { tcp.await.context("the tfsd.v1 TCP listener failed") },
        async { unix.await.context("the tfsd.v1 Unix socket failed") },
    )?;
    Ok(())
}

/// The fully qualified name of the health service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Server reflection, v1 and v1alpha (grpcurl 1.8 asks for v1alpha), listing exactly
/// `services` and themselves: each port lists what it serves, and nothing it would answer
/// UNIMPLEMENTED. Every file is described, so any of them resolves.
pub fn reflection(
    services: &[&str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        services
            .iter()
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    Ok((
        builder()
            .build_v1()
            .context("build the v1 reflection service")?,
        builder()
            .build_v1alpha()
            .context("build the v1alpha reflection service")?,
    ))
}

/// A health reporter with tfsd.v1 NOT_SERVING until the first worker is ready, and the
/// service that answers health checks from it.
pub async fn health() -> (
    Health,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        draining: Arc::new(AtomicBool::new(false)),
    };
    health.set_sessions_serving(false).await;
    (health, service)
}
