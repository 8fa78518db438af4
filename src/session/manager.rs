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
use crate::worker::{StepRequest, WarmPool, WorkerProcess};

pub use partial_run::PartialRunSpec;

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
    policy: PolicyConfig,
    /// Where sessions are made durable; set once at start-up when state.dir is configured.
    pub(super) store: std::sync::OnceLock<Arc<crate::store::SessionStore>>,
    /// The kernel's OOM-kill count when the sampler last looked, to tell an OOM kill from
    /// another SIGKILL.
    pub(super) oom_kills_seen: AtomicU64,
}

impl SessionManager {
    pub fn new(
        pools: Pools,
        metrics: Arc<Metrics>,
        policy: PolicyConfig,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<SessionManager> {
        Arc::new(SessionManager {
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

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    pub(super) fn get(&self, id: &str) -> Result<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))
    }

    /// The principal that owns a session: what authorization needs on every call, without
    /// reading the worker's memory from /proc as `session` does.
    pub fn owner(&self, id: &str) -> Result<String> {
        Ok(self.get(id)?.owner.clone())
    }

    pub fn session(&self, id: &str) -> Result<SessionSnapshot> {
        Ok(self.get(id)?.snapshot())
    }

    pub fn status(&self) -> DaemonStatus {
        let pid = std::process::id();
        DaemonStatus {
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
        }
    }

    pub fn list(&self) -> Vec<SessionSnapshot> {
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
    pub async fn create_owned(
        self: &Arc<Self>,
        owner: String,
        durable_variables: bool,
        graph_def: Bytes,
        config: Bytes,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
    ) -> Result<SessionSnapshot> {
        let definition = SessionDefinition {
            id: format!("s-{}", uuid::Uuid::new_v4().simple()),
            runtime: Runtime::Graph,
            owner,
            durable_variables,
            labels,
            policy: self.policy.effective(policy),
            graph_def: graph_def.to_vec(),
            config,
        };
        self.create_session(definition).await
    }

    /// Creates a Python session for `owner`: a fresh worker that has already imported the
    /// configured modules (TensorFlow and Keras by default). Its state lives in the worker's
    /// memory only: it is carried by a preserving recycle, never written to the store.
    pub async fn create_python_owned(
        self: &Arc<Self>,
        owner: String,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
    ) -> Result<SessionSnapshot> {
        self.pools.of(Runtime::Python)?;
        let definition = SessionDefinition {
            id: format!("s-{}", uuid::Uuid::new_v4().simple()),
            runtime: Runtime::Python,
            owner,
            durable_variables: false,
            labels,
            policy: self.policy.effective(policy),
            graph_def: Vec::new(),
            config: Bytes::new(),
        };
        self.create_session(definition).await
    }

    async fn create_session(
        self: &Arc<Self>,
        definition: SessionDefinition,
    ) -> Result<SessionSnapshot> {
        let manager = self.clone();
        self.detached(async move {
            let worker = manager
                .start_worker(
                    definition.runtime,
                    &definition.graph_def,
                    &definition.config,
                )
                .await?;
            let session = Arc::new(Session::new(definition));
            let mut core = session.core.write().await;
            manager.replace_worker(&session, &mut core, Some(worker.clone()));
            manager
                .sessions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(session.id.clone(), session.clone());
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
        }
        session.worker.replace(fresh)
    }

    /// A worker of `runtime` from its pool with the graph loaded (graph sessions); the
    /// worker is stopped if loading fails.
    pub(super) async fn start_worker(
        &self,
        runtime: Runtime,
        graph_def: &[u8],
        config: &Bytes,
    ) -> Result<Arc<WorkerProcess>> {
        // A worker killed while it starts or loads (the OOM killer, an operator, chaos) is
        // no reason to fail the session: try the next one. TensorFlow rejecting the graph
        // is the client's answer and is not retried.
        let mut attempt = 1;
        loop {
            match self.start_worker_once(runtime, graph_def, config).await {
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
    ) -> Result<Arc<WorkerProcess>> {
        let worker = self
            .pools
            .of(runtime)?
            .take()
            .await
            .map_err(|error| Error::WorkerStart(error.to_string()))?;
        if runtime == Runtime::Python {
            return Ok(worker);
        }
        match worker.load(graph_def, config).await.map_err(rejected_graph) {
            Ok(()) => Ok(worker),
            Err(error) => {
                worker.stop().await;
                Err(error)
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
            worker.extend(&graph_def).await.map_err(rejected_graph)?;
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
        let result = worker.run(step).await;
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
            let before = worker.memory();
            match reset {
                InPlaceReset::Graph => worker.reset_graph().await?,
                InPlaceReset::Variables => worker.purge_variables().await?,
            }
            if reset == InPlaceReset::Graph {
                core.graph_def.clear();
                manager.persist_session(&session, |store| store.set_graph(session.id(), &[], 0));
            }
            // The checkpointed values no longer apply.
            manager.persist_session(&session, |store| store.drop_checkpoint(session.id()));
            let after = worker.memory();
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
                    .memory(before, after)
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
        let manager = self.clone();
        self.detached(async move {
            let started = Instant::now();
            let mut core = session.core.write().await;
            if core.closed {
                return Err(Error::SessionNotFound(session.id().to_string()));
            }
            let old = session.worker.get();
            let before = old.as_ref().map(|w| w.memory()).unwrap_or_default();
            let carried = match (&old, preserve_variables) {
                (Some(old), true) => Some(old.export_state().await?),
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
                .start_worker(session.runtime, &core.graph_def, &core.config)
                .await?;
            if let Some(state) = carried.filter(|state| !state.is_empty())
                && let Err(error) = fresh.import_state(state).await
            {
                fresh.stop().await;
                return Err(error);
            }
            let old = manager.replace_worker(&session, &mut core, Some(fresh.clone()));
            if let Some(old) = &old {
                old.stop().await;
            }
            let after = fresh.memory();
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
                    .memory(before, after)
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

    pub async fn close_because(self: &Arc<Self>, id: &str, cause: Cause) -> Result<()> {
        let session = self
            .sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        let manager = self.clone();
        self.tracker
            .spawn(async move { manager.close_session(session, cause).await })
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

    /// Closes every session and reaps every worker, waiting at most `grace` for in-flight
    /// operations to finish before their workers are killed anyway.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        // Variables of durable sessions go to disk before their workers go.
        if tokio::time::timeout(grace, self.checkpoint_all())
            .await
            .is_err()
        {
            tracing::warn!("checkpointing took longer than the grace period; closing anyway");
        }
        let sessions: Vec<_> = self
            .sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, session)| session)
            .collect();
        for session in sessions {
            let cause = Cause::daemon(Trigger::Shutdown, "the daemon is shutting down");
            let closed = self.close_session(session.clone(), cause);
            if tokio::time::timeout(grace, closed).await.is_err() {
                // A step outlived the grace period: kill the worker under it.
                if let Some(worker) = session.worker.get() {
                    worker.stop().await;
                }
            }
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

    /// A request that failed because the memory policy killed the worker under it says so.
    pub(super) fn explain_kill(&self, error: Error) -> Error {
        match error {
            Error::WorkerDied { pid, how } => match self.kill_cause(pid) {
                Some(cause) if self.runtime == Runtime::Python => {
                    Error::ResourceExhausted(format!(
                        "the call was stopped by tfsd's memory policy: {}; the session is being \
                         restored in a fresh Python process (its state is lost)",
                        cause.reason
                    ))
                }
                Some(cause) => Error::ResourceExhausted(format!(
                    "the step was stopped by tfsd's memory policy: {}; the session is being \
                     restored in a fresh worker (variables are lost)",
                    cause.reason
                )),
                None => Error::WorkerDied { pid, how },
            },
            other => other,
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
    session
        .worker
        .get()
        .ok_or_else(|| Error::SessionBroken(session.id().to_string()))
}

/// A GraphDef or ConfigProto TensorFlow refused is the client's invalid argument, whatever
/// code TensorFlow used (an unregistered op is NOT_FOUND to it); its message is kept.
fn rejected_graph(error: Error) -> Error {
    match error {
        Error::Tensorflow { message, .. } => Error::InvalidArgument(message),
        other => other,
    }
}
