//! The daemon's life: start every subsystem, serve until SIGTERM/SIGINT, drain, reap.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LogFormat};
use crate::metrics::Metrics;
use crate::session::{Pools, SessionManager};
use crate::worker::budget::BufferBudget;
use crate::worker::{Runtime, StartGate, WarmPool, WorkerSpec};

/// How long open client streams may hold the gRPC server after every session is closed.
const SERVER_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon until a signal, then drains. Prints "tfsd listening on ADDRESS" on stdout
/// once connections are accepted (after "tfsd metrics on URL", "tfsd master on ADDRESS" and
/// "tfsd socket on unix:PATH" for the endpoints that are switched on).
pub async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    config.ensure_safe_exposure()?;
    if !config.listen.ip().is_loopback() && !config.auth.required() {
        tracing::warn!(
            listen = %config.listen,
            "SERVING tfsd.v1 WITHOUT AUTHENTICATION ON A NON-LOOPBACK ADDRESS \
             (auth.allow_unauthenticated = true): anyone who reaches it can run graphs"
        );
    }
    // Listen for signals before anything else: a SIGTERM right after start-up must drain,
    // not kill the daemon with its default action.
    let mut signals = Signals::new()?;
    if !config.workers.binary.is_file() {
        bail!(
            "the worker binary {} does not exist (build it with `cargo build --workspace`, \
             or set workers.binary)",
            config.workers.binary.display()
        );
    }
    if let Some(python) = &config.python
        && !python.interpreter.is_file()
    {
        bail!(
            "python.interpreter = {} does not exist (scripts/python-env makes the project's \
             environment; or point it at an environment with tensorflow, keras and tfsd_worker \
             installed)",
            python.interpreter.display()
        );
    }
    let store = match &config.state {
        Some(state) => Some(Arc::new(
            crate::store::SessionStore::open(&state.dir)
                .with_context(|| format!("open the state directory {}", state.dir.display()))?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let address = listener.local_addr().context("read the bound address")?;
    // The socket file is removed when `socket_file` goes, however `serve` ends, and by the
    // second signal's exit.
    let (unix_listener, socket_file) = match &config.unix_socket {
        Some(socket) => {
            let (listener, file) = crate::unix_socket::bind(socket)?;
            (Some(listener), Some(Arc::new(file)))
        }
        None => (None, None),
    };
    let metrics_listener = match config.metrics_listen {
        Some(metrics_address) => Some(
            tokio::net::TcpListener::bind(metrics_address)
                .await
                .with_context(|| format!("bind the metrics endpoint {metrics_address}"))?,
        ),
        None => None,
    };
    let master_listener = match config.master_listen {
        Some(master_address) => Some(
            tokio::net::TcpListener::bind(master_address)
                .await
                .with_context(|| format!("bind the MasterService {master_address}"))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    // Before any worker starts: under cgroup v2 the daemon may move itself into a leaf.
    let limiter = Arc::new(
        crate::worker::MemoryLimiter::setup(
            config.workers.memory_enforcement,
            Some(config.workers.max_tasks),
        )
        .map_err(anyhow::Error::msg)?,
    );
    // Removes the daemon's cgroups however `serve` ends, an error included.
    let _cgroups = RemoveOnExit(limiter.clone());
    let memory_enforcement = limiter.describe();
    match &*limiter {
        crate::worker::MemoryLimiter::Cgroup(_) => {
            tracing::info!(
                enforcement = limiter.kind(),
                "hard limits: {memory_enforcement}"
            );
        }
        _ => tracing::warn!(
            enforcement = limiter.kind(),
            "hard limits: {memory_enforcement}"
        ),
    }
    let sandbox = Arc::new(
        crate::worker::sandbox::Sandbox::new(&config).context("set up the workers' sandbox")?,
    );
    let sandbox_description = sandbox.describe();
    tracing::info!("worker sandbox: {sandbox_description}");
    let sandbox = Some(sandbox);

    let budget = config
        .limits
        .max_buffered_bytes
        .map_or_else(BufferBudget::unlimited, BufferBudget::new);
    let shutdown = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let spec = WorkerSpec {
        runtime: Runtime::Graph,
        binary: config.workers.binary.clone(),
        args: Vec::new(),
        env: config
            .gpu
            .worker_env(&config.workers.env, &config.gpu.graph),
        library_dir: config.workers.library_dir.clone(),
        start_timeout: config.workers.start_timeout,
        metrics: metrics.clone(),
        limiter: limiter.clone(),
        sandbox: sandbox.clone(),
        budget: budget.clone(),
    };
    // One gate for both runtimes: every start competes for the same CPU.
    let gate = StartGate::new(config.workers.starts);
    let pool = WarmPool::start(
        spec,
        (config.workers.pool_size, config.workers.pool_max),
        gate.clone(),
        &tracker,
        shutdown.clone(),
    );
    let python_pool = config.python.as_ref().map(|python| {
        let mut env = config.gpu.worker_env(&python.env, &config.gpu.python);
        env.insert("TFSD_PYTHON_PRELOAD".to_string(), python.preload.join(","));
        // The worker's own output must reach the supervisor's log unbuffered.
        env.insert("PYTHONUNBUFFERED".to_string(), "1".to_string());
        let spec = WorkerSpec {
            runtime: Runtime::Python,
            binary: python.interpreter.clone(),
            args: vec!["-m".to_string(), "tfsd_worker".to_string()],
            env,
            library_dir: None,
            start_timeout: python.start_timeout,
            metrics: metrics.clone(),
            limiter: limiter.clone(),
            sandbox: sandbox.clone(),
            budget: budget.clone(),
        };
        WarmPool::start(
            spec,
            (python.pool_size, python.pool_max),
            gate.clone(),
            &tracker,
            shutdown.clone(),
        )
    });
    let (health, health_service) = crate::grpc::health().await;
    tracker.spawn(follow_worker_health(
        pool.startable(),
        health.clone(),
        shutdown.clone(),
    ));
    let manager = SessionManager::new(
        Pools {
            graph: pool,
            python: python_pool,
        },
        metrics.clone(),
        config.policy.clone(),
        config.workers.deadlines,
        tracker.clone(),
        shutdown.clone(),
    );
    manager.describe_confinement(memory_enforcement, sandbox_description);
    // NVML is loaded here or never: without the driver nothing GPU-related runs again.
    let gpus = crate::gpu::Gpus::detect();
    tracing::info!("GPUs: {}", gpus.description());
    for warning in config.gpu.missing_devices(gpus.device_count()) {
        tracing::warn!("{warning}");
    }
    let python_env = config.python.as_ref().map(|python| {
        let mut env = config.workers.env.clone();
        env.extend(python.env.clone());
        env
    });
    manager.attach_gpus(
        Arc::new(gpus),
        config.gpu.with_inherited(
            &config.workers.env,
            &python_env.unwrap_or_default(),
            std::env::var(crate::gpu::placement::CUDA_VISIBLE_DEVICES).ok(),
        ),
    );
    if let (Some(store), Some(state)) = (store, &config.state) {
        manager.attach_store(store);
        let restored = manager.restore_from_store().await;
        tracing::info!(restored, dir = %state.dir.display(), "durable sessions brought back");
        tracker.spawn(checkpoint_periodically(
            manager.clone(),
            state.checkpoint_interval,
            shutdown.clone(),
        ));
    }
    tracker.spawn(crate::policy::run(
        manager.clone(),
        config.policy.clone(),
        shutdown.clone(),
    ));
    let server = tokio::spawn(crate::grpc::serve(
        listener,
        unix_listener,
        manager.clone(),
        health_service,
        crate::grpc::ServeOptions {
            auth: Arc::new(config.auth.clone()),
            tls: config.tls.clone(),
            limits: config.limits.clone(),
        },
        shutdown.clone(),
        stop_accepting.clone(),
    ));
    if let Some(metrics_listener) = metrics_listener {
        let metrics_address = metrics_listener
            .local_addr()
            .context("read the metrics address")?;
        tracker.spawn(serve_metrics(
            metrics_listener,
            metrics.clone(),
            manager.clone(),
            shutdown.clone(),
        ));
        println!("tfsd metrics on http://{metrics_address}/metrics");
    }
    if let Some(master_listener) = master_listener {
        let master_address = master_listener
            .local_addr()
            .context("read the MasterService address")?;
        // Not on the tracker: a TensorFlow client's open connection must not hold the drain.
        tokio::spawn(serve_master(
            master_listener,
            manager.clone(),
            config.limits.clone(),
            crate::master::MasterAccess::new(
                Arc::new(config.auth.clone()),
                config.master_allow_unauthenticated,
            ),
            shutdown.clone(),
        ));
        println!("tfsd master on {master_address}");
    }
    if let Some(socket) = &socket_file {
        tracing::info!(path = %socket.path().display(), "tfsd serving tfsd.v1 on a Unix socket");
        // Before the listening line, which is the last one parsers wait for.
        println!("tfsd socket on unix:{}", socket.path().display());
    }
    tracing::info!(%address, pool_size = config.workers.pool_size, "tfsd serving tfsd.v1");
    println!("tfsd listening on {address}");
    crate::notify::notify("READY=1");
    if let Some(interval) = crate::notify::watchdog_interval() {
        tracker.spawn(crate::notify::keep_watchdog_fed(interval, shutdown.clone()));
    }

    signals.recv().await;
    tracing::info!(
        drain_timeout = ?config.drain_timeout,
        "shutting down: no new sessions, in-flight work may finish, then every worker is reaped"
    );
    let pools = manager.pools().clone();
    // Set before the second signal's task kills anything: killing the workers ends the runs
    // the drain waits for, so the drain may finish first, and the exit must still say 130.
    let forced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forced_by_signal = forced.clone();
    let limiter_on_signal = limiter.clone();
    let socket_on_signal = socket_file.clone();
    tokio::spawn(async move {
        signals.recv().await;
        forced_by_signal.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!("second signal: killing every worker now, then exiting");
        for pool in pools.all() {
            pool.kill_all_workers().await;
        }
        limiter_on_signal.remove();
        if let Some(socket) = socket_on_signal {
            socket.remove();
        }
        std::process::exit(130);
    });
    crate::notify::notify("STOPPING=1");
    // Refuse new work before health says so: a client that sees NOT_SERVING and tries
    // anyway must be refused, not slip in between.
    shutdown.cancel();
    health.set_draining().await;
    drain(manager, tracker, config.drain_timeout).await;
    // Every worker is reaped: their cgroups are gone, and now the daemon's subtree goes.
    limiter.remove();
    if forced.load(std::sync::atomic::Ordering::SeqCst) {
        if let Some(socket) = &socket_file {
            socket.remove();
        }
        tracing::info!("tfsd stopped by a second signal; every worker reaped");
        std::process::exit(130);
    }
    stop_accepting.cancel();
    // Streams that never end by themselves (a client's health Watch) must not keep the
    // daemon alive once every session is closed.
    match tokio::time::timeout(SERVER_CLOSE_TIMEOUT, server).await {
        Ok(Ok(result)) => result.context("the gRPC server failed")?,
        Ok(Err(error)) => bail!("the gRPC server task failed: {error}"),
        Err(_) => tracing::warn!("closing the remaining client streams"),
    }
    // Now, not when the last handle goes: the second signal's task holds one until exit.
    if let Some(socket) = &socket_file {
        socket.remove();
    }
    tracing::info!("tfsd stopped; every worker reaped");
    Ok(())
}

/// Removes what the memory limiter made (the daemon's cgroups) when dropped.
struct RemoveOnExit(Arc<crate::worker::MemoryLimiter>);

impl Drop for RemoveOnExit {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// tfsd.v1 is SERVING while workers can be started, NOT_SERVING (with the reason in the
/// log) while they cannot, e.g. when libtensorflow is missing.
async fn follow_worker_health(
    mut startable: tokio::sync::watch::Receiver<Option<bool>>,
    health: crate::grpc::Health,
    shutdown: CancellationToken,
) {
    let mut reported = None;
    loop {
        let state = *startable.borrow_and_update();
        if state.is_some() && state != reported {
            let serving = state == Some(true);
            if !serving {
                tracing::error!("workers cannot be started: tfsd.v1 reports NOT_SERVING");
            }
            health.set_sessions_serving(serving).await;
            reported = state;
        }
        tokio::select! {
            changed = startable.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn drain(manager: Arc<SessionManager>, tracker: TaskTracker, deadline: Duration) {
    manager.shutdown(deadline).await;
    tracker.close();
    tracker.wait().await;
}

/// Checkpoints durable sessions' variables every `interval` until shutdown.
async fn checkpoint_periodically(
    manager: Arc<SessionManager>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // the first tick is immediate: nothing to save yet
    loop {
        tokio::select! {
            _ = ticks.tick() => manager.checkpoint_all().await,
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    manager: Arc<SessionManager>,
    shutdown: CancellationToken,
) {
    let present = move || {
        let status = manager.status();
        crate::metrics::Present {
            sessions: manager
                .list()
                .into_iter()
                .map(|session| (metrics_session_label(&session), session.memory))
                .collect(),
            warm_workers: status.warm_workers + status.warm_python_workers,
            supervisor: status.memory,
            system: status.system,
            gpus: status.gpus,
        }
    };
    if let Err(error) = crate::metrics::serve(listener, metrics, present, shutdown).await {
        tracing::error!(%error, "the metrics endpoint failed");
    }
}

async fn serve_master(
    listener: tokio::net::TcpListener,
    manager: Arc<SessionManager>,
    limits: crate::limits::Limits,
    access: crate::master::MasterAccess,
    shutdown: CancellationToken,
) {
    if let Err(error) = crate::master::serve(listener, manager, limits, access, shutdown).await {
        tracing::error!(%error, "the MasterService failed");
    }
}

/// SIGTERM and SIGINT, installed once at start-up.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => EnvFilter::try_new(filter),
        _ => EnvFilter::try_new(&config.log.filter),
    }
    .context("log.filter is not a valid filter")?;
    // Colour only for a person at a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|error| anyhow::anyhow!("start logging: {error}"))
}

/// A session's `session_id` label on the unauthenticated metrics endpoint. A MasterService
/// session's id is its handle, the capability for every later call on it: it appears there
/// only as a digest (`master-` and 12 hex digits of its SHA-256), stable for dashboards,
/// useless as a handle.
fn metrics_session_label(session: &crate::session::SessionSnapshot) -> String {
    use sha2::Digest;
    let from_master = session
        .labels
        .get(crate::master::ORIGIN_LABEL)
        .is_some_and(|origin| origin == crate::master::ORIGIN_MASTER);
    if !from_master {
        return session.id.clone();
    }
    let digest = hex::encode(sha2::Sha256::digest(session.id.as_bytes()));
    format!("master-{}", &digest[..12])
}
