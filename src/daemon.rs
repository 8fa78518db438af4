//! The daemon's life: start every subsystem, serve until SIGTERM/SIGINT, drain, reap.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LogFormat};
use crate::session::SessionManager;
use crate::worker::{WarmPool, WorkerSpec};

/// How long in-flight work may take to finish after SIGTERM before workers are killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the daemon until a signal, then drains. Prints "tfsd listening on ADDRESS" on stdout
/// once connections are accepted.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    if !config.workers.binary.is_file() {
        bail!(
            "the worker binary {} does not exist (build it with `cargo build --workspace`, \
             or set workers.binary)",
            config.workers.binary.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let address = listener.local_addr().context("read the bound address")?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let spec = WorkerSpec {
        binary: config.workers.binary.clone(),
        env: config.workers.env.clone(),
        library_dir: config.workers.library_dir.clone(),
        start_timeout: config.workers.start_timeout,
    };
    let pool = WarmPool::start(spec, config.workers.pool_size, &tracker, shutdown.clone());
    let (health, health_service) = crate::grpc::health().await;
    tracker.spawn(follow_worker_health(
        pool.startable(),
        health.clone(),
        shutdown.clone(),
    ));
    let manager = SessionManager::new(pool, tracker.clone(), shutdown.clone());
    let server = tokio::spawn(crate::grpc::serve(
        listener,
        manager.clone(),
        health_service,
        shutdown.clone(),
    ));
    tracing::info!(%address, pool_size = config.workers.pool_size, "tfsd serving tfsd.v1");
    println!("tfsd listening on {address}");

    wait_for_signal().await?;
    tracing::info!("shutting down: no new work; closing sessions");
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second signal: exiting now (workers die with the daemon)");
            std::process::exit(130);
        }
    });
    health.set_draining().await;
    shutdown.cancel();
    drain(manager, tracker).await;
    match server.await {
        Ok(result) => result.context("the gRPC server failed")?,
        Err(error) => bail!("the gRPC server task failed: {error}"),
    }
    tracing::info!("tfsd stopped; every worker reaped");
    Ok(())
}

/// tfsd.v1 is SERVING while workers can be started, NOT_SERVING (with the reason in the
/// log) while they cannot, e.g. when libtensorflow is missing.
async fn follow_worker_health(
    mut startable: tokio::sync::watch::Receiver<Option<bool>>,
    health: crate::grpc::Health,
    shutdown: CancellationToken,
) {
    loop {
        let state = *startable.borrow_and_update();
        if let Some(serving) = state {
            if !serving {
                tracing::error!("workers cannot be started: tfsd.v1 reports NOT_SERVING");
            }
            health.set_sessions_serving(serving).await;
        }
        tokio::select! {
            changed = startable.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn drain(manager: Arc<SessionManager>, tracker: TaskTracker) {
    manager.shutdown(SHUTDOWN_GRACE).await;
    tracker.close();
    tracker.wait().await;
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => EnvFilter::try_new(filter),
        _ => EnvFilter::try_new(&config.log.filter),
    }
    .context("log.filter is not a valid filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|error| anyhow::anyhow!("start logging: {error}"))
}
