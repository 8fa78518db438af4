//! `SessionManager`: the registry of sessions and every operation on them.
//!
//! Operations that change a session (create, extend, resets, close, restore) run as tasks on
//! the manager's `TaskTracker`; the caller awaits the task. A gRPC handler dropped because its
//! client went away therefore never leaves a session half-reset, and shutdown waits for them.

mod partial_run;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Cause, DaemonStatus, EventBus, EventKind, ResetOutcome, RunSpec, Runtime, Session, SessionCore,
    SessionDefinition, SessionEvent, SessionSnapshot, SessionState, Trigger,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::policy::{PolicyConfig, SessionPolicy};
use crate::proto::tensorflow::TensorProto;
use crate::tensor;
use crate::worker::{Deadlines, StepRequest, Urgency, WarmPool, WorkerError, WorkerProcess};

pub use partial_run::PartialRunSpec;

/// Durable sessions checkpointed at once during the drain.
const DRAIN_CHECKPOINTS: usize = 2;
/// Workers tried before creating, restoring or recycling a session gives up.
const WORKER_START_ATTEMPTS: u32 = 3;

/// The warm pools, one per runtime. Python sessions exist only where `python` is set.
#[derive(Debug, Clone)]
pub struct Pools {
    pub graph: Arc<WarmPool>,
    pub python: Option<Arc<WarmPool>>,
}

impl Pools {
    /// The pool `runtime`'s workers come from, or why there is none.
    fn of(&self, runtime: Runtime) -> Result<&Arc<WarmPool>> {
        match runtime {
            Runtime::Graph => Ok(&self.graph),
            Runtime::Python => self.python.as_ref().ok_or_else(|| {
                Error::FailedPrecondition(
                    "Python sessions are not configured on this daemon: set python.interpreter \
                     in its config (an environment with tensorflow, keras and tfsd_worker)"
                        .to_string(),
                )
            }),
        }
    }

    /// Every pool, for shutdown.
    pub fn all(&self) -> impl Iterator<Item = &Arc<WarmPool>> {
        std::iter::once(&self.graph).chain(self.python.iter())
    }
}

/// The two resets that keep the session's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InPlaceReset {
    /// ResetGraph: an empty graph (Python: Keras' and TensorFlow's global state cleared).
    Graph,
    /// PurgeVariables: every variable uninitialised (Python: the namespace emptied too).
    Variables,
}

impl InPlaceReset {
    fn event(self) -> EventKind {
        match self {
            InPlaceReset::Graph => EventKind::GraphReset,
            InPlaceReset::Variables => EventKind::VariablesPurged,
        }
    }
}

#[derive(Debug)]
pub struct SessionManager {
    started_at: std::time::SystemTime,
    pub(super) sessions: RwLock<HashMap<String, Arc<Session>>>,
    pub(super) pools: Pools,
    pub(super) events: EventBus,
    pub(super) metrics: Arc<Metrics>,
    pub(super) tracker: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Defaults and maxima for sessions' memory limits.
    pub(super) policy: PolicyConfig,
    /// Where sessions are made durable; set once at start-up when state.dir is configured.
    pub(super) store: std::sync::OnceLock<Arc<crate::store::SessionStore>>,
    /// The kernel's OOM-kill count when the sampler last looked, to tell an OOM kill from
    /// another SIGKILL.
    pub(super) oom_kills_seen: AtomicU64,
    /// When a worker counts as hung (workers.call_timeout, run_grace, liveness_timeout).
    pub(super) deadlines: Deadlines,
    /// Sessions counted by admission that are not in the registry: being created (a slot
    /// reserved before the worker is taken) or being closed (until their worker is reaped),
    /// per owner. See `admit`.
    admission: std::sync::Mutex<Admission>,
    /// What holds workers to their hard limits, and their sandbox, in words (set once at
    /// start-up; GetDaemonStatus reports them).
    confinement: std::sync::OnceLock<(String, String)>,
    /// The host's GPUs (NVML), set once at start-up (`gpu.rs`).
    pub(super) gpus: std::sync::OnceLock<(Arc<crate::gpu::Gpus>, crate::gpu::GpuConfig)>,
}

/// Sessions admission counts beyond the registry, per owner.
#[derive(Debug, Default)]
struct Admission {
    creating: HashMap<String, usize>,
    closing: HashMap<String, usize>,
}

impl Admission {
    fn total(&self) -> usize {
        self.creating.values().sum::<usize>() + self.closing.values().sum::<usize>()
    }

    fn of(&self, owner: &str) -> usize {
        self.creating.get(owner).copied().unwrap_or(0)
            + self.closing.get(owner).copied().unwrap_or(0)
    }
}

fn count_down(counts: &mut HashMap<String, usize>, owner: &str) {
    if let Some(count) = counts.get_mut(owner) {
        *count -= 1;
        if *count == 0 {
            counts.remove(owner);
        }
    }
}

/// A session slot reserved by `SessionManager::admit`: counted against the session caps
/// from the check until the session is in the registry (or the create fails) and every clone
/// is dropped — a caller that counts the session somewhere of its own (the MasterService's
/// map) holds a clone until it has.
#[derive(Debug, Clone)]
pub struct Admitted(Arc<Reservation>);

#[derive(Debug)]
struct Reservation {
    manager: std::sync::Weak<SessionManager>,
    /// Whom the reservation is counted for (the owner, or for the MasterService the
    /// client's address).
    key: String,
    /// The principal that will own the session.
    owner: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(manager) = self.manager.upgrade() {
            count_down(&mut manager.admission().creating, &self.key);
        }
    }
}

/// A closing session counted by admission until its worker is reaped.
struct Closing {
    manager: Arc<SessionManager>,
    owner: String,
}

impl Drop for Closing {
    fn drop(&mut self) {
        count_down(&mut self.manager.admission().closing, &self.owner);
    }
}

impl SessionManager {
    pub fn new(
        pools: Pools,
        metrics: Arc<Metrics>,
        policy: PolicyConfig,
        deadlines: Deadlines,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<SessionManager> {
        Arc::new(SessionManager {
            deadlines,
            admission: std::sync::Mutex::new(Admission::default()),
            confinement: std::sync::OnceLock::new(),
            gpus: std::sync::OnceLock::new(),
            store: std::sync::OnceLock::new(),
            policy,
            oom_kills_seen: AtomicU64::new(crate::system::oom_kill_count().unwrap_or(0)),
            started_at: std::time::SystemTime::now(),
            sessions: RwLock::new(HashMap::new()),
            pools,
            events: EventBus::new(metrics.clone()),
            metrics,
            tracker,
            shutdown,
        })
    }

    /// Records how workers are confined, for GetDaemonStatus: the memory enforcement and
    /// the sandbox, each in one line.
    pub fn describe_confinement(&self, memory_enforcement: String, sandbox: String) {
        let _ = self.confinement.set((memory_enforcement, sandbox));
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    /// The session `id`. Once the daemon is shutting down, every lookup answers
    /// `ShuttingDown` (UNAVAILABLE): a durable session comes back after the restart, so "not
    /// found" would mislead its client.
    pub(super) fn get(&self, id: &str) -> Result<Arc<Session>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))
    }

    /// The admission counts. Lock order: this lock before `sessions`, never the reverse.
    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a slot for a new session of `owner`, or refuses it: `check(total, own)`
    /// sees every session the daemon hosts, creates and closes in progress included (own:
    /// those of `owner`), and answers whether one more is allowed (the operator's caps,
    /// `Limits::check_session_count`). Counting and reserving happen under one lock, so
    /// concurrent creates cannot all pass a check that only one of them should.
    pub fn admit(
        self: &Arc<Self>,
        owner: &str,
        check: impl FnOnce(usize, usize) -> Result<()>,
    ) -> Result<Admitted> {
        self.admit_as(owner, owner, check)
    }

    /// `admit`, counting the reservation under `key` rather than the owner (the
    /// MasterService counts its ownerless sessions per client address): `check` sees, as
    /// `own`, the hosted sessions of `key` plus the creates and closes in progress under it.
    pub fn admit_as(
        self: &Arc<Self>,
        owner: &str,
        key: &str,
        check: impl FnOnce(usize, usize) -> Result<()>,
    ) -> Result<Admitted> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut admission = self.admission();
        let (hosted, hosted_own) = {
            let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            let own = sessions.values().filter(|s| s.owner == key).count();
            (sessions.len(), own)
        };
        check(hosted + admission.total(), hosted_own + admission.of(key))?;
        *admission.creating.entry(key.to_string()).or_default() += 1;
        Ok(Admitted(Arc::new(Reservation {
            manager: Arc::downgrade(self),
            key: key.to_string(),
            owner: owner.to_string(),
        })))
    }

    /// The principal that owns a session: what authorization needs on every call, without
    /// reading the worker's memory from /proc as `session` does.
    pub fn owner(&self, id: &str) -> Result<String> {
        Ok(self.get(id)?.owner.clone())
    }

    pub fn session(&self, id: &str) -> Result<SessionSnapshot> {
        let mut snapshot = [self.get(id)?.snapshot()];
        self.add_gpu_memory(&mut snapshot);
        let [snapshot] = snapshot;
        Ok(snapshot)
    }

    pub fn status(&self) -> DaemonStatus {
        let pid = std::process::id();
        let (gpu, gpus) = self.gpu_status();
        DaemonStatus {
            gpu,
            gpus,
            version: env!("CARGO_PKG_VERSION"),
            tensorflow_version: self.pools.graph.tensorflow_version(),
            pid,
            memory: crate::memory::process_memory(pid).unwrap_or_default(),
            started_at: self.started_at,
            session_count: self
                .sessions
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            warm_workers: self.pools.graph.ready_count(),
            warm_pool_size: self.pools.graph.target(),
            warm_python_workers: self.pools.python.as_ref().map_or(0, |p| p.ready_count()),
            warm_python_pool_size: self.pools.python.as_ref().map_or(0, |p| p.target()),
            python_runtime: self
                .pools
                .python
                .as_ref()
                .map_or_else(String::new, |p| p.runtime_description()),
            system: crate::system::memory(),
            draining: self.shutdown.is_cancelled(),
            memory_enforcement: self
                .confinement
                .get()
                .map_or_else(String::new, |(memory, _)| memory.clone()),
            sandbox: self
                .confinement
                .get()
                .map_or_else(String::new, |(_, sandbox)| sandbox.clone()),
        }
    }

    pub fn list(&self) -> Vec<SessionSnapshot> {
        let mut snapshots = self.list_without_gpu();
        self.add_gpu_memory(&mut snapshots);
        snapshots
    }

    /// `list` without GPU figures (the policy adds them from its own sample).
    pub(super) fn list_without_gpu(&self) -> Vec<SessionSnapshot> {
        let sessions: Vec<_> = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut snapshots: Vec<_> = sessions.iter().map(|s| s.snapshot()).collect();
        snapshots.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        snapshots
    }

    /// Runs `operation` to completion even if the caller stops waiting.
    pub(super) async fn detached<T: Send + 'static>(
        &self,
        operation: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        self.tracker
            .spawn(operation)
            .await
            .map_err(|error| Error::Protocol(format!("session operation panicked: {error}")))?
    }

    /// Creates a graph session for `owner`, who then owns it: clients see and act on their
    /// own sessions only ("" when authentication is off).
    #[allow(
        clippy::too_many_arguments,
        reason = "one per part of a CreateSessionRequest; both callers name each one"
    )]
    pub async fn create_owned(
        self: &Arc<Self>,
        admitted: Admitted,
        durable_variables: bool,
        graph_def: Bytes,
        config: Bytes,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
        gpus: crate::gpu::GpuRequest,
    ) -> Result<SessionSnapshot> {
        let definition = SessionDefinition {
            gpus: self.session_gpus(Runtime::Graph, &gpus)?,
            id: format!("s-{}", uuid::Uuid::new_v4().simple()),
            runtime: Runtime::Graph,
            owner: admitted.0.owner.clone(),
            durable_variables,
            labels,
            policy: self.policy.effective(policy),
            graph_def: graph_def.to_vec(),
            config,
        };
        self.create_session(definition, admitted).await
    }

    /// Creates a Python session for `owner`: a fresh worker that has already imported the
    /// configured modules (TensorFlow and Keras by default). Its state lives in the worker's
    /// memory only: it is carried by a preserving recycle, never written to the store.
    pub async fn create_python_owned(
        self: &Arc<Self>,
        admitted: Admitted,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
        gpus: crate::gpu::GpuRequest,
    ) -> Result<SessionSnapshot> {
        self.pools.of(Runtime::Python)?;
        let definition = SessionDefinition {
            gpus: self.session_gpus(Runtime::Python, &gpus)?,
            id: format!("s-{}", uuid::Uuid::new_v4().simple()),
            runtime: Runtime::Python,
            owner: admitted.0.owner.clone(),
            durable_variables: false,
            labels,
            policy: self.policy.effective(policy),
            graph_def: Vec::new(),
            config: Bytes::new(),
        };
        self.create_session(definition, admitted).await
    }

    async fn create_session(
        self: &Arc<Self>,
        definition: SessionDefinition,
        admitted: Admitted,
    ) -> Result<SessionSnapshot> {
        let manager = self.clone();
        self.detached(async move {
            let worker = manager
                .start_worker_for(
                    definition.runtime,
                    &definition.graph_def,
                    &definition.config,
                    definition.policy.hard_limit_bytes,
                    &definition.gpus.env,
                    Urgency::Create,
                )
                .await?;
            if manager.shutdown.is_cancelled() {
                // The drain has taken the registry: a session added now would never be
                // closed, nor its worker reaped.
                worker.stop().await;
                return Err(Error::ShuttingDown);
            }
            let session = Arc::new(Session::new(definition));
            let mut core = session.core.write().await;
            manager.replace_worker(&session, &mut core, Some(worker.clone()));
            manager
                .sessions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(session.id.clone(), session.clone());
            // In the registry now: counted there.
            drop(admitted);
            manager.persist_session(&session, |store| {
                store.put(&manager.record_of(&session, &core.graph_def, &core.config))
            });
            drop(core);
            manager.events.publish(
                session
                    .event(EventKind::Created, worker.pid(), 0)
                    .cause(&session.owner_cause()),
            );
            Ok(session.snapshot())
        })
        .await
    }

    /// Puts `fresh` in the session's worker slot and answers the worker it replaces (which
    /// the caller stops). The one way a session's worker changes: create, recycle, restore
    /// after a crash, close and the start-up restore all come through here. Taking `core`
    /// exclusively is the proof that no run is using the old worker and that the recovery
    /// watcher (which takes it too, and checks the slot) cannot act on the session meanwhile.
    pub(super) fn replace_worker(
        self: &Arc<Self>,
        session: &Arc<Session>,
        _exclusive: &mut SessionCore,
        fresh: Option<Arc<WorkerProcess>>,
    ) -> Option<Arc<WorkerProcess>> {
        if let Some(fresh) = &fresh {
            self.watch_worker(session, fresh);
            self.watch_liveness(session, fresh);
        }
        session.worker.replace(fresh)
    }

    /// A worker of `runtime` from its pool, held by the kernel to `hard_limit` (the
    /// session's), with the graph loaded (graph sessions); the worker is stopped if loading
    /// fails.
    pub(super) async fn start_worker(
        &self,
        runtime: Runtime,
        graph_def: &[u8],
        config: &Bytes,
        hard_limit: Option<u64>,
        gpu_env: &BTreeMap<String, String>,
    ) -> Result<Arc<WorkerProcess>> {
        self.start_worker_for(
            runtime,
            graph_def,
            config,
            hard_limit,
            gpu_env,
            Urgency::Existing,
        )
        .await
    }

    /// `start_worker`, for a new session (`Urgency::Create`: refused when too many creates
    /// already wait for a worker) or an existing one.
    async fn start_worker_for(
        &self,
        runtime: Runtime,
        graph_def: &[u8],
        config: &Bytes,
        hard_limit: Option<u64>,
        gpu_env: &BTreeMap<String, String>,
        urgency: Urgency,
    ) -> Result<Arc<WorkerProcess>> {
        // A worker killed while it starts or loads (the OOM killer, an operator, chaos) is
        // no reason to fail the session: try the next one. TensorFlow rejecting the graph
        // is the client's answer and is not retried.
        let mut attempt = 1;
        loop {
            match self
                .start_worker_once(runtime, graph_def, config, hard_limit, gpu_env, urgency)
                .await
            {
                Err(error @ (Error::WorkerDied { .. } | Error::WorkerStart(_)))
                    if attempt < WORKER_START_ATTEMPTS =>
                {
                    tracing::warn!(attempt, %error, "a worker died while starting; trying another");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_worker_once(
        &self,
        runtime: Runtime,
        graph_def: &[u8],
        config: &Bytes,
        hard_limit: Option<u64>,
        gpu_env: &BTreeMap<String, String>,
        urgency: Urgency,
    ) -> Result<Arc<WorkerProcess>> {
        let pool = self.pools.of(runtime)?;
        // The drain does not wait for starts still queued at the gate.
        let taken = tokio::select! {
            taken = pool.take_with_env(urgency, gpu_env) => taken,
            _ = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
        };
        let worker = taken.map_err(|error| match error {
            WorkerError::Busy(message) => Error::ResourceExhausted(message),
            WorkerError::StartWait(message) => Error::Unavailable(message),
            other => Error::WorkerStart(other.to_string()),
        })?;
        // The kernel holds the worker to the session's hard limit before anything of the
        // session is loaded into it (graph, restored variables, a recycle's state): a limit
        // set later, below what the worker then holds, is refused (cgroup v1) or kills it
        // at once (v2). Off the async threads: the write may make the kernel reclaim.
        let confined = worker.clone();
        let result = tokio::task::spawn_blocking(move || confined.confine_memory(hard_limit))
            .await
            .unwrap_or_else(|join| Err(std::io::Error::other(join)));
        let result = match result {
            // prlimit(2) of a worker running as another user needs CAP_SYS_RESOURCE, which
            // containers drop by default: the worker sets its own (lowering needs no right).
            Err(error)
                if error.raw_os_error() == Some(libc::EPERM)
                    && worker.uses_rlimit_backstop()
                    && hard_limit.is_some() =>
            {
                tokio::time::timeout(self.deadlines.call, worker.set_own_data_limit(hard_limit))
                    .await
                    .unwrap_or_else(|_| Err(Error::Unavailable("no answer".to_string())))
                    .map_err(|own| {
                        std::io::Error::other(format!("{error}; the worker's own: {own}"))
                    })
            }
            other => other,
        };
        if let Err(error) = result {
            tracing::warn!(
                worker_pid = worker.pid(),
                %error,
                "could not set the kernel's memory limit for the worker; the memory policy's \
                 sampling still applies"
            );
        }
        if runtime == Runtime::Python {
            return Ok(worker);
        }
        let load = worker.load(graph_def, config);
        let loaded = match tokio::time::timeout(self.deadlines.call, load).await {
            Ok(loaded) => loaded.map_err(rejected_graph),
            // Not `WorkerStart`: that is retried, and a graph this slow would take as long in
            // the next worker.
            Err(_) => Err(Error::Unavailable(format!(
                "worker pid {} did not load the graph within {:?} (workers.call_timeout)",
                worker.pid(),
                self.deadlines.call
            ))),
        };
        match loaded {
            Ok(()) => Ok(worker),
            Err(error) => {
                worker.stop().await;
                Err(error)
            }
        }
    }

    /// A step with a timeout: TensorFlow stops it at its timeout, but only between kernels.
    /// A worker that has not answered `workers.run_grace` later is checked: one still using
    /// CPU is inside a long kernel and gets another grace period (up to
    /// `workers.call_timeout` in all, so its variables are not lost for a slow kernel); one
    /// that is not is hung, and is killed (the session restored) with DEADLINE_EXCEEDED.
    async fn step_within<T>(
        &self,
        session: &Session,
        worker: &WorkerProcess,
        timeout: Duration,
        step: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let grace = self.deadlines.run_grace;
        tokio::pin!(step);
        if let Ok(answer) = tokio::time::timeout(timeout, &mut step).await {
            return answer;
        }
        let give_up = tokio::time::Instant::now() + self.deadlines.call.max(grace);
        let why = loop {
            let cpu_before = worker.cpu_ticks();
            if let Ok(answer) = tokio::time::timeout(grace, &mut step).await {
                return answer;
            }
            let busy = matches!(
                (cpu_before, worker.cpu_ticks()),
                (Some(before), Some(after)) if after > before
            );
            if !busy {
                break format!(
                    "had no answer and used no CPU for {grace:?} after it (workers.run_grace)"
                );
            }
            if tokio::time::Instant::now() >= give_up {
                break format!(
                    "was still running {:?} after it (workers.call_timeout)",
                    self.deadlines.call
                );
            }
        };
        session.kill_worker(
            worker,
            Cause::daemon(
                Trigger::Unresponsive,
                format!("it stopped answering: a step with a timeout of {timeout:?} {why}"),
            ),
        );
        Err(Error::DeadlineExceeded(format!(
            "the step ran past its timeout of {timeout:?} and its worker (pid {}) stopped \
             answering, so it was killed; the session is being restored in a fresh worker \
             (variables are lost unless durable)",
            worker.pid()
        )))
    }

    /// Waits at most `deadline` for `operation`, a request to the session's `worker`. A
    /// worker that misses it is killed as unresponsive (its watcher restores the session,
    /// and the WORKER_EXITED event says why); the answer is then UNAVAILABLE naming it.
    pub(super) async fn within<T>(
        &self,
        session: &Session,
        worker: &WorkerProcess,
        what: &str,
        operation: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let deadline = self.deadlines.call;
        match tokio::time::timeout(deadline, operation).await {
            Ok(result) => result,
            Err(_) => {
                let reason = format!(
                    "it stopped answering: no answer to {what} within {deadline:?} \
                     (workers.call_timeout)"
                );
                session.kill_worker(worker, Cause::daemon(Trigger::Unresponsive, reason.clone()));
                Err(Error::Unavailable(format!(
                    "the session's worker (pid {}) {reason}; it was killed and the session is \
                     being restored in a fresh worker",
                    worker.pid()
                )))
            }
        }
    }

    pub async fn extend(
        self: &Arc<Self>,
        id: &str,
        graph_def: Bytes,
        current_version: u64,
    ) -> Result<u64> {
        let session = self.get(id)?;
        session.expect_runtime(Runtime::Graph, "ExtendGraph")?;
        let manager = self.clone();
        self.detached(async move {
            let mut core = session.core.write().await;
            let worker = usable_worker(&session, &core)?;
            let actual = session.stats().graph_version;
            if actual != current_version {
                return Err(Error::GraphVersionMismatch {
                    actual,
                    requested: current_version,
                });
            }
            manager
                .within(&session, &worker, "ExtendGraph", worker.extend(&graph_def))
                .await
                .map_err(rejected_graph)?;
            core.graph_def.extend_from_slice(&graph_def);
            manager.persist(|store| store.set_graph(session.id(), &core.graph_def, actual + 1));
            let version = actual + 1;
            session.touch(|stats| stats.graph_version = version);
            manager.events.publish(
                session
                    .event(EventKind::Extended, worker.pid(), version)
                    .cause(&session.owner_cause()),
            );
            Ok(version)
        })
        .await
    }

    pub async fn run(&self, id: &str, spec: RunSpec) -> Result<Vec<TensorProto>> {
        let session = self.get(id)?;
        let timeout = spec.timeout;
        session.expect_runtime(Runtime::Graph, "Run")?;
        for (name, tensor) in &spec.feeds {
            tensor::validate(tensor)
                .map_err(|error| Error::InvalidArgument(format!("feed {name:?}: {error}")))?;
        }
        let core = session.core.read().await;
        let worker = usable_worker(&session, &core)?;
        let step = StepRequest {
            feeds: spec.feeds,
            fetches: spec.fetches,
            targets: spec.targets,
            timeout: spec.timeout,
        };
        let started = Instant::now();
        // Counted down even if the caller goes away mid-run.
        let in_flight = InFlight::enter(&session, spec.max_runs_in_flight)?;
        let result = match timeout {
            Some(timeout) => {
                self.step_within(&session, &worker, timeout, worker.run(step))
                    .await
            }
            None => worker.run(step).await,
        };
        drop(in_flight);
        drop(core);
        session.touch(|stats| stats.run_count += 1);
        self.metrics.record_run(started.elapsed(), result.is_ok());
        result.map_err(|error| session.explain_kill(error))
    }

    /// ResetGraph or PurgeVariables, attributed to `cause` (the calling principal, or the
    /// memory policy).
    pub async fn reset_in_place(
        self: &Arc<Self>,
        id: &str,
        reset: InPlaceReset,
        cause: Cause,
    ) -> Result<ResetOutcome> {
        let session = self.get(id)?;
        let manager = self.clone();
        self.detached(async move {
            let started = Instant::now();
            let mut core = session.core.write().await;
            let worker = usable_worker(&session, &core)?;
            let before = manager.worker_memory(&worker);
            match reset {
                InPlaceReset::Graph => {
                    manager
                        .within(&session, &worker, "ResetGraph", worker.reset_graph())
                        .await?
                }
                InPlaceReset::Variables => {
                    manager
                        .within(
                            &session,
                            &worker,
                            "PurgeVariables",
                            worker.purge_variables(),
                        )
                        .await?
                }
            }
            if reset == InPlaceReset::Graph {
                core.graph_def.clear();
                manager.persist_session(&session, |store| store.set_graph(session.id(), &[], 0));
            }
            // The checkpointed values no longer apply.
            manager.persist_session(&session, |store| store.drop_checkpoint(session.id()));
            let after = manager.worker_memory(&worker);
            session.touch_because(&cause, |stats| match reset {
                InPlaceReset::Graph => {
                    stats.graph_reset_count += 1;
                    stats.graph_version = 0;
                }
                InPlaceReset::Variables => stats.purge_count += 1,
            });
            let snapshot = session.snapshot();
            manager.events.publish(
                session
                    .event(reset.event(), worker.pid(), snapshot.graph_version)
                    .memory(before.clone(), after.clone())
                    .cause(&cause),
            );
            Ok(ResetOutcome {
                session: snapshot,
                memory_before: before,
                memory_after: after,
                duration: started.elapsed(),
                worker_pid_before: worker.pid(),
                worker_pid_after: worker.pid(),
                variables_preserved: 0,
            })
        })
        .await
    }

    /// PurgeVariables at the client's request (the MasterService's `Reset`).
    pub async fn purge_variables(self: &Arc<Self>, id: &str) -> Result<ResetOutcome> {
        self.reset_in_place(id, InPlaceReset::Variables, Cause::client())
            .await
    }

    /// RecycleSession: the session moves to a fresh worker with its graph re-imported (and
    /// its state carried over when asked: a graph's variables, a Python session's
    /// namespace); the old worker is killed and reaped.
    pub async fn recycle(
        self: &Arc<Self>,
        id: &str,
        preserve_variables: bool,
        cause: Cause,
    ) -> Result<ResetOutcome> {
        let session = self.get(id)?;
        // A client's recycle that keeps nothing does not queue behind a step or call in
        // flight (which may never end): the old worker goes first, and they answer CANCELLED.
        // One that preserves variables needs the worker's answer, so it waits, at most
        // `workers.call_timeout`.
        if !preserve_variables
            && cause.is_client()
            && session.stats().runs_in_flight > 0
            && let Some(worker) = session.worker.get()
        {
            let stopped = Cause {
                reason: "the session was recycled without preserving its variables".to_string(),
                ..cause.clone()
            };
            // As a failure, not an expected stop: if the recycle then fails (no worker could
            // be started), the watcher restores the session instead of leaving it on a dead
            // worker; if it succeeds, the watcher finds the slot moved on and does nothing.
            session.kill_worker(&worker, stopped);
        }
        let manager = self.clone();
        let deadline = self.deadlines.call;
        self.detached(async move {
            let started = Instant::now();
            let Ok(mut core) = tokio::time::timeout(deadline, session.core.write()).await else {
                let hint = if preserve_variables {
                    "so its variables could not be exported; recycle without \
                     preserve_variables to stop that work, or retry later"
                } else {
                    "retry later"
                };
                return Err(Error::Unavailable(format!(
                    "session {} still had work in flight after {deadline:?} \
                     (workers.call_timeout), {hint}",
                    session.id()
                )));
            };
            if core.closed {
                return Err(Error::SessionNotFound(session.id().to_string()));
            }
            let old = session.worker.get();
            let before = old
                .as_ref()
                .map(|w| manager.worker_memory(w))
                .unwrap_or_default();
            let carried = match (&old, preserve_variables) {
                (Some(old), true) => Some(
                    manager
                        .within(&session, old, "a state export", old.export_state())
                        .await?,
                ),
                (None, true) => {
                    return Err(Error::InvalidArgument(format!(
                        "session {} has no live worker to preserve variables from; recycle \
                         without preserve_variables",
                        session.id()
                    )));
                }
                (_, false) => None,
            };
            let variables_preserved = carried.as_ref().map_or(0, |state| state.object_count());
            if let Some(state) = &carried
                && session.durable_variables
                && !state.is_empty()
            {
                manager.write_checkpoint(&session, state);
            }
            let fresh = manager
                .start_worker(
                    session.runtime,
                    &core.graph_def,
                    &core.config,
                    session.policy.hard_limit_bytes,
                    &session.gpus.env,
                )
                .await?;
            if let Some(state) = carried.filter(|state| !state.is_empty()) {
                let import =
                    tokio::time::timeout(manager.deadlines.call, fresh.import_state(state));
                let imported = import.await.unwrap_or_else(|_| {
                    Err(Error::Unavailable(format!(
                        "the fresh worker (pid {}) did not take the carried state within {:?} \
                         (workers.call_timeout); the session stays in its old worker",
                        fresh.pid(),
                        manager.deadlines.call
                    )))
                });
                if let Err(error) = imported {
                    fresh.stop().await;
                    return Err(error);
                }
            }
            let old = manager.replace_worker(&session, &mut core, Some(fresh.clone()));
            if let Some(old) = &old {
                // The scratch directory is the session's: its files go with it (before the
                // old worker's is removed with the old worker).
                carry_scratch(old, &fresh).await;
                old.stop().await;
            }
            let after = manager.worker_memory(&fresh);
            session.touch_because(&cause, |stats| {
                stats.state = SessionState::Ready;
                stats.recycle_count += 1;
            });
            drop(core);
            let snapshot = session.snapshot();
            let old_pid = old.as_ref().map_or(0, |w| w.pid());
            let carried_what = match session.runtime {
                Runtime::Graph => "variables",
                Runtime::Python => "state entries",
            };
            manager.events.publish(
                session
                    .event(EventKind::Recycled, fresh.pid(), snapshot.graph_version)
                    .reason(format!(
                        "moved from worker pid {old_pid} to {}; {variables_preserved} \
                         {carried_what} preserved",
                        fresh.pid()
                    ))
                    .memory(before.clone(), after.clone())
                    .cause(&cause),
            );
            Ok(ResetOutcome {
                session: snapshot,
                memory_before: before,
                memory_after: after,
                duration: started.elapsed(),
                worker_pid_before: old_pid,
                worker_pid_after: fresh.pid(),
                variables_preserved,
            })
        })
        .await
    }

    /// CloseSession at the client's request (the MasterService's CloseSession).
    pub async fn close(self: &Arc<Self>, id: &str) -> Result<()> {
        let cause = Cause {
            reason: "closed by the client".to_string(),
            ..Cause::client()
        };
        self.close_because(id, cause).await
    }

    /// Closes the session: it leaves the registry at once (new requests get NOT_FOUND), its
    /// worker is killed at once (a step, call or reset in flight does not hold the close:
    /// it fails with CANCELLED saying the session was closed), and the session counts
    /// against the session caps until that worker is reaped.
    pub async fn close_because(self: &Arc<Self>, id: &str, cause: Cause) -> Result<()> {
        let session = {
            // Admission first, then the registry: the order `admit_as` takes them in (the
            // other order deadlocks against a concurrent create). Both held, so the session is
            // counted, in the registry or as closing, at every instant.
            let mut admission = self.admission();
            let mut sessions = self.sessions.write().unwrap_or_else(|e| e.into_inner());
            let session = sessions
                .remove(id)
                .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
            *admission.closing.entry(session.owner.clone()).or_default() += 1;
            session
        };
        let closing = Closing {
            manager: self.clone(),
            owner: session.owner.clone(),
        };
        if let Some(worker) = session.worker.get() {
            let stopped = Cause {
                reason: "the session was closed".to_string(),
                ..cause.clone()
            };
            session.stop_worker(&worker, stopped);
        }
        let manager = self.clone();
        self.tracker
            .spawn(async move {
                manager.close_session(session, cause).await;
                drop(closing);
            })
            .await
            .map_err(|error| Error::Protocol(format!("close panicked: {error}")))
    }

    async fn close_session(self: &Arc<Self>, session: Arc<Session>, cause: Cause) {
        let mut core = session.core.write().await;
        core.closed = true;
        // A daemon shutting down keeps its sessions for the next start; a close is final.
        if cause.trigger != Trigger::Shutdown {
            self.persist_session(&session, |store| store.remove(session.id()));
        }
        let worker = self.replace_worker(&session, &mut core, None);
        let pid = worker.as_ref().map_or(0, |w| w.pid());
        if let Some(worker) = worker {
            worker.stop().await;
        }
        drop(core);
        let graph_version = session.stats().graph_version;
        session.touch(|stats| stats.state = SessionState::Closed);
        self.events.publish(
            session
                .event(EventKind::Closed, pid, graph_version)
                .cause(&cause),
        );
    }

    /// Closes every session and reaps every worker within one `deadline` for the whole
    /// drain: each session checkpoints (if durable) and closes in parallel with the others,
    /// letting its in-flight work finish; what is still running at the deadline has its
    /// worker killed (the step answers UNAVAILABLE, shutting down).
    pub async fn shutdown(self: &Arc<Self>, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        let sessions: Vec<_> = self
            .sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, session)| session)
            .collect();
        let cause = Cause::daemon(Trigger::Shutdown, "the daemon is shutting down");
        // Each export copies a session's variables into the daemon: two at a time bounds that
        // memory, while the closes themselves run all at once.
        let checkpoints = Arc::new(tokio::sync::Semaphore::new(DRAIN_CHECKPOINTS));
        let closes = sessions.iter().map(|session| {
            let manager = self.clone();
            let session = session.clone();
            let cause = cause.clone();
            let checkpoints = checkpoints.clone();
            async move {
                // Variables of durable sessions go to disk before their workers go (only
                // where there is a store to keep them).
                if session.durable_variables && manager.store.get().is_some() {
                    let _turn = checkpoints.acquire().await;
                    manager.checkpoint(&session).await;
                }
                manager.close_session(session, cause).await;
            }
        });
        let closes = futures::future::join_all(closes);
        tokio::pin!(closes);
        if tokio::time::timeout_at(until, &mut closes).await.is_err() {
            tracing::warn!(
                ?deadline,
                "work still in flight at the drain deadline: killing its workers"
            );
            for session in &sessions {
                if let Some(worker) = session.worker.get() {
                    session.stop_worker(&worker, cause.clone());
                }
            }
            closes.await;
        }
        for pool in self.pools.all() {
            pool.drain().await;
        }
    }
}

impl Session {
    /// The session's own client, as the actor of what it asked for (create, extend).
    fn owner_cause(&self) -> Cause {
        if self.owner.is_empty() {
            Cause::client()
        } else {
            Cause::by(self.owner.clone())
        }
    }

    /// Refuses an operation meant for another runtime, by name.
    pub(super) fn expect_runtime(&self, runtime: Runtime, operation: &str) -> Result<()> {
        if self.runtime == runtime {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "session {} is a {} session: {operation} applies to {} sessions",
            self.id, self.runtime, runtime
        )))
    }

    /// Kills the session's `worker` because of `cause` and lets its watcher restore the
    /// session: the requests that fail and the WORKER_EXITED event say why.
    pub(super) fn kill_worker(&self, worker: &WorkerProcess, cause: Cause) {
        self.stats().pending_kill = Some((worker.pid(), cause));
        worker.kill_as_failure();
    }

    /// Kills the session's `worker` on purpose (close, shutdown): no restore follows, and the
    /// requests that fail say why.
    pub(super) fn stop_worker(&self, worker: &WorkerProcess, cause: Cause) {
        self.stats().pending_kill = Some((worker.pid(), cause));
        worker.kill_expected();
    }

    /// A request that failed because tfsd killed the worker under it (the memory policy, a
    /// missed deadline, a close, the shutdown) says so, instead of "the worker died".
    pub(super) fn explain_kill(&self, error: Error) -> Error {
        let Error::WorkerDied {
            pid,
            how,
            memory_limit,
        } = error
        else {
            return error;
        };
        let (request, fresh, lost) = match self.runtime {
            Runtime::Python => ("call", "a fresh Python process", "its state is lost"),
            Runtime::Graph => ("step", "a fresh worker", "variables are lost"),
        };
        let Some(cause) = self.kill_cause(pid) else {
            if let Some(limit) = memory_limit {
                return Error::ResourceExhausted(format!(
                    "the {request} was stopped by the kernel at the session's hard limit of \
                     {:.1} MiB (its worker's cgroup limit); the session is being restored in \
                     {fresh} ({lost})",
                    limit as f64 / (1024.0 * 1024.0)
                ));
            }
            return Error::WorkerDied {
                pid,
                how,
                memory_limit,
            };
        };
        match cause.trigger {
            Trigger::Policy(_) => Error::ResourceExhausted(format!(
                "the {request} was stopped by tfsd's memory policy: {}; the session is being \
                 restored in {fresh} ({lost})",
                cause.reason
            )),
            Trigger::Unresponsive => Error::Unavailable(format!(
                "the session's worker (pid {pid}) was killed because {}; the session is being \
                 restored in {fresh} ({lost})",
                cause.reason
            )),
            Trigger::Shutdown => Error::Unavailable(format!(
                "the daemon is shutting down and this {request} did not finish within its drain \
                 deadline; its worker (pid {pid}) was stopped"
            )),
            Trigger::Client => Error::Cancelled(format!(
                "this {request} was stopped: {} ({}) while it ran",
                cause.reason,
                cause.actor.as_str()
            )),
            _ => Error::WorkerDied {
                pid,
                how,
                memory_limit,
            },
        }
    }
}

/// One run in flight on a session, counted down on drop.
pub(super) struct InFlight<'a>(&'a Session);

impl<'a> InFlight<'a> {
    /// Counts one more run in flight on the session and marks it used, or refuses the run
    /// when the session already has `max` in flight (limits.max_concurrent_runs_per_session).
    pub(super) fn enter(session: &'a Session, max: Option<u32>) -> Result<InFlight<'a>> {
        let mut stats = session.stats();
        if let Some(max) = max
            && stats.runs_in_flight >= max
        {
            return Err(Error::ResourceExhausted(format!(
                "session {} already has {} runs in flight, the most \
                 limits.max_concurrent_runs_per_session allows",
                session.id(),
                stats.runs_in_flight
            )));
        }
        stats.runs_in_flight += 1;
        stats.last_used_at = std::time::SystemTime::now();
        Ok(InFlight(session))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut stats = self.0.stats();
        stats.runs_in_flight = stats.runs_in_flight.saturating_sub(1);
    }
}

/// The session's worker, or why it cannot take requests. Called with `core` held, so the
/// worker stays the session's until the caller lets go.
pub(super) fn usable_worker(session: &Session, core: &SessionCore) -> Result<Arc<WorkerProcess>> {
    if core.closed {
        return Err(Error::SessionNotFound(session.id().to_string()));
    }
    session.worker.get().ok_or_else(|| session.without_worker())
}

/// A GraphDef or ConfigProto TensorFlow refused is the client's invalid argument, whatever
/// code TensorFlow used (an unregistered op is NOT_FOUND to it); its message is kept.
fn rejected_graph(error: Error) -> Error {
    match error {
        Error::Tensorflow { message, .. } => Error::InvalidArgument(message),
        other => other,
    }
}

/// Moves what a session's old worker left in its scratch directory into the fresh worker's
/// (renames within one file system: no copy). Runs while the old worker still lives but no
/// longer serves (the session's lock is held exclusively), so nothing of the session writes
/// there meanwhile. What cannot be moved is logged and left to go with the old worker.
async fn carry_scratch(old: &WorkerProcess, fresh: &WorkerProcess) {
    let (Some(from), Some(to)) = (old.scratch_dir(), fresh.scratch_dir()) else {
        return;
    };
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    let moved = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        let mut moved = 0;
        let mut failed = None;
        for entry in std::fs::read_dir(&from)? {
            // One that cannot be moved (a directory of the same name the fresh worker
            // made) does not keep the others back.
            match entry.and_then(|entry| std::fs::rename(entry.path(), to.join(entry.file_name())))
            {
                Ok(()) => moved += 1,
                Err(error) => failed = Some(error),
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(moved),
        }
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    match moved {
        Ok(0) => {}
        Ok(count) => tracing::debug!(
            old_pid = old.pid(),
            fresh_pid = fresh.pid(),
            count,
            "scratch files carried into the fresh worker"
        ),
        Err(error) => tracing::warn!(
            old_pid = old.pid(),
            fresh_pid = fresh.pid(),
            %error,
            "could not carry the session's scratch files into the fresh worker"
        ),
    }
}
