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
    Cause, DaemonStatus, EventBus, EventKind, ResetOutcome, RunSpec, Session, SessionCore,
    SessionDefinition, SessionEvent, SessionSnapshot, SessionState,
};
use crate::error::{Error, Result, TfCode};
use crate::metrics::Metrics;
use crate::policy::{PolicyConfig, SessionPolicy};
use crate::proto::tensorflow::TensorProto;
use crate::proto::tfsd::worker::v1 as wire;
use crate::tensor;
use crate::worker::{WarmPool, WorkerError, WorkerProcess};
use wire::{worker_request::Kind, worker_response::Result as Reply};

pub use partial_run::PartialRunSpec;

/// Workers tried before creating, restoring or recycling a session gives up.
const WORKER_START_ATTEMPTS: u32 = 3;

#[derive(Debug)]
pub struct SessionManager {
    started_at: std::time::SystemTime,
    pub(super) sessions: RwLock<HashMap<String, Arc<Session>>>,
    pub(super) pool: Arc<WarmPool>,
    pub(super) events: EventBus,
    metrics: Arc<Metrics>,
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
        pool: Arc<WarmPool>,
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
            pool,
            events: EventBus::new(metrics.clone()),
            metrics,
            tracker,
            shutdown,
        })
    }

    pub fn pool(&self) -> &Arc<WarmPool> {
        &self.pool
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
            tensorflow_version: self.pool.tensorflow_version(),
            pid,
            memory: crate::memory::process_memory(pid).unwrap_or_default(),
            started_at: self.started_at,
            session_count: self
                .sessions
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            warm_workers: self.pool.ready_count(),
            warm_pool_size: self.pool.target(),
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

    pub async fn create(
        self: &Arc<Self>,
        graph_def: Bytes,
        config: Bytes,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
    ) -> Result<SessionSnapshot> {
        self.create_owned(String::new(), false, graph_def, config, labels, policy)
            .await
    }

    /// `create` for an authenticated principal, who then owns the session: clients see and
    /// act on their own sessions only.
    pub async fn create_owned(
        self: &Arc<Self>,
        owner: String,
        durable_variables: bool,
        graph_def: Bytes,
        config: Bytes,
        labels: BTreeMap<String, String>,
        policy: SessionPolicy,
    ) -> Result<SessionSnapshot> {
        let manager = self.clone();
        let policy = self.policy.effective(policy);
        self.detached(async move {
            let worker = manager.start_worker(&graph_def, &config).await?;
            let id = format!("s-{}", uuid::Uuid::new_v4().simple());
            let stored_config = config.clone();
            let session = Arc::new(Session::new(
                SessionDefinition {
                    id: id.clone(),
                    owner,
                    durable_variables,
                    labels,
                    policy,
                    graph_def: graph_def.to_vec(),
                    config,
                },
                worker.clone(),
            ));
            manager
                .sessions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), session.clone());
            manager.watch_worker(&session, &worker);
            manager.persist(|store| {
                store.put(&manager.record_of(&session, &graph_def, &stored_config))
            });
            manager
                .events
                .publish(session.event(EventKind::Created, worker.pid(), 0));
            Ok(session.snapshot())
        })
        .await
    }

    /// A worker from the pool with the graph loaded; the worker is stopped if loading fails.
    pub(super) async fn start_worker(
        &self,
        graph_def: &[u8],
        config: &Bytes,
    ) -> Result<Arc<WorkerProcess>> {
        // A worker killed while it starts or loads (the OOM killer, an operator, chaos) is
        // no reason to fail the session: try the next one. TensorFlow rejecting the graph
        // is the client's answer and is not retried.
        let mut attempt = 1;
        loop {
            match self.start_worker_once(graph_def, config).await {
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
        graph_def: &[u8],
        config: &Bytes,
    ) -> Result<Arc<WorkerProcess>> {
        let worker = self
            .pool
            .take()
            .await
            .map_err(|error| Error::WorkerStart(error.to_string()))?;
        let load = Kind::Load(wire::Load {
            graph_def: graph_def.to_vec(),
            config: config.to_vec(),
        });
        match expect_done(&worker, worker.call(load).await).map_err(rejected_graph) {
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
            let extend = Kind::Extend(wire::Extend {
                graph_def: graph_def.to_vec(),
            });
            expect_done(&worker, worker.call(extend).await).map_err(rejected_graph)?;
            core.graph_def.extend_from_slice(&graph_def);
            manager.persist(|store| store.set_graph(session.id(), &core.graph_def, actual + 1));
            let version = actual + 1;
            session.touch(|stats| stats.graph_version = version);
            manager
                .events
                .publish(session.event(EventKind::Extended, worker.pid(), version));
            Ok(version)
        })
        .await
    }

    pub async fn run(&self, id: &str, spec: RunSpec) -> Result<Vec<TensorProto>> {
        let session = self.get(id)?;
        for (name, tensor) in &spec.feeds {
            tensor::validate(tensor)
                .map_err(|error| Error::InvalidArgument(format!("feed {name:?}: {error}")))?;
        }
        let core = session.core.read().await;
        let worker = usable_worker(&session, &core)?;
        let run = Kind::Run(wire::Run {
            feeds: spec.feeds.into_iter().collect(),
            fetches: spec.fetches,
            targets: spec.targets,
            timeout_ms: spec
                .timeout
                .map_or(0, |timeout| timeout.as_millis().max(1) as u64),
        });
        let started = Instant::now();
        // Counted down even if the caller goes away mid-run.
        let in_flight = InFlight::enter(&session, spec.max_runs_in_flight)?;
        let reply = worker.call(run).await;
        drop(in_flight);
        drop(core);
        session.touch(|stats| stats.run_count += 1);
        let ok = matches!(reply, Ok(Reply::Run(_)));
        self.metrics.record_run(started.elapsed(), ok);
        match reply {
            Ok(Reply::Run(result)) => Ok(result.outputs),
            Err(WorkerError::Died { pid, .. }) if session.kill_cause(pid).is_some() => {
                let cause = session.kill_cause(pid).unwrap_or_else(Cause::client);
                Err(Error::ResourceExhausted(format!(
                    "the step was stopped by tfsd's memory policy: {}; the session is being \
                     restored in a fresh worker (variables are lost)",
                    cause.reason
                )))
            }
            other => Err(unexpected(&worker, other)),
        }
    }

    /// ResetGraph: an empty graph and a new TensorFlow session in the same worker.
    pub async fn reset_graph(self: &Arc<Self>, id: &str) -> Result<ResetOutcome> {
        self.in_place_reset(id, EventKind::GraphReset, Cause::client())
            .await
    }

    /// PurgeVariables: the same graph in a new TensorFlow session, so every variable is
    /// uninitialised. Each worker hosts exactly one session, so no other session is touched.
    pub async fn purge_variables(self: &Arc<Self>, id: &str) -> Result<ResetOutcome> {
        self.in_place_reset(id, EventKind::VariablesPurged, Cause::client())
            .await
    }

    /// ResetGraph (`kind` GraphReset) or PurgeVariables, attributed to `cause` (the calling
    /// principal, or the memory policy).
    pub async fn in_place_reset(
        self: &Arc<Self>,
        id: &str,
        kind: EventKind,
        cause: Cause,
    ) -> Result<ResetOutcome> {
        let session = self.get(id)?;
        let manager = self.clone();
        self.detached(async move {
            let started = Instant::now();
            let mut core = session.core.write().await;
            let worker = usable_worker(&session, &core)?;
            let before = worker.memory();
            let request = match kind {
                EventKind::GraphReset => Kind::ResetGraph(wire::ResetGraph {}),
                _ => Kind::PurgeVariables(wire::PurgeVariables {}),
            };
            expect_done(&worker, worker.call(request).await)?;
            if kind == EventKind::GraphReset {
                core.graph_def.clear();
                manager.persist(|store| store.set_graph(session.id(), &[], 0));
            }
            // The checkpointed values no longer apply.
            manager.persist(|store| store.drop_checkpoint(session.id()));
            let after = worker.memory();
            session.touch_because(&cause, |stats| match kind {
                EventKind::GraphReset => {
                    stats.graph_reset_count += 1;
                    stats.graph_version = 0;
                }
                _ => stats.purge_count += 1,
            });
            let snapshot = session.snapshot();
            manager.events.publish(
                session
                    .event(kind, worker.pid(), snapshot.graph_version)
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

    /// RecycleSession: the session moves to a fresh worker with its graph re-imported (and
    /// its variables copied over when asked); the old worker is killed and reaped.
    pub async fn recycle(
        self: &Arc<Self>,
        id: &str,
        preserve_variables: bool,
    ) -> Result<ResetOutcome> {
        self.recycle_because(id, preserve_variables, Cause::client())
            .await
    }

    pub async fn recycle_because(
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
            let old = core.worker.clone();
            let before = old.as_ref().map(|w| w.memory()).unwrap_or_default();
            let variables = match (&old, preserve_variables) {
                (Some(old), true) => {
                    match old
                        .call(Kind::ExportVariables(wire::ExportVariables {}))
                        .await
                    {
                        Ok(Reply::Variables(variables)) => variables.variables,
                        other => return Err(unexpected(old, other)),
                    }
                }
                (None, true) => {
                    return Err(Error::InvalidArgument(format!(
                        "session {} has no live worker to preserve variables from; recycle \
                         without preserve_variables",
                        session.id()
                    )));
                }
                (_, false) => Vec::new(),
            };
            let variables_preserved = variables.len() as u32;
            if session.durable_variables && !variables.is_empty() {
                manager.persist_blocking(|store| store.write_checkpoint(session.id(), &variables));
            }
            let fresh = manager.start_worker(&core.graph_def, &core.config).await?;
            if !variables.is_empty() {
                let import = Kind::ImportVariables(wire::ImportVariables { variables });
                if let Err(error) = expect_done(&fresh, fresh.call(import).await) {
                    fresh.stop().await;
                    return Err(error);
                }
            }
            core.worker = Some(fresh.clone());
            manager.watch_worker(&session, &fresh);
            if let Some(old) = &old {
                old.stop().await;
            }
            let after = fresh.memory();
            session.touch_because(&cause, |stats| {
                stats.state = SessionState::Ready;
                stats.worker_pid = fresh.pid();
                stats.worker = Arc::downgrade(&fresh);
                stats.recycle_count += 1;
            });
            let snapshot = session.snapshot();
            let old_pid = old.as_ref().map_or(0, |w| w.pid());
            manager.events.publish(
                session
                    .event(EventKind::Recycled, fresh.pid(), snapshot.graph_version)
                    .reason(format!(
                        "moved from worker pid {old_pid} to {}; {variables_preserved} variables \
                     preserved",
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

    async fn close_session(&self, session: Arc<Session>, cause: Cause) {
        let mut core = session.core.write().await;
        core.closed = true;
        // A daemon shutting down keeps its sessions for the next start; a close is final.
        if cause.trigger != "shutdown" {
            self.persist(|store| store.remove(session.id()));
        }
        let worker = core.worker.take();
        let pid = worker.as_ref().map_or(0, |w| w.pid());
        if let Some(worker) = worker {
            worker.stop().await;
        }
        let graph_version = session.stats().graph_version;
        session.touch(|stats| {
            stats.state = SessionState::Closed;
            stats.worker_pid = 0;
        });
        self.events.publish(
            session
                .event(EventKind::Closed, pid, graph_version)
                .cause(&cause),
        );
    }

    /// Closes every session and reaps every worker, waiting at most `grace` for in-flight
    /// operations to finish before their workers are killed anyway.
    pub async fn shutdown(&self, grace: Duration) {
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
            let cause = Cause {
                trigger: "shutdown",
                rung: 0,
                reason: "the daemon is shutting down".to_string(),
                actor: "tfsd".to_string(),
            };
            let closed = self.close_session(session.clone(), cause);
            if tokio::time::timeout(grace, closed).await.is_err() {
                // A step outlived the grace period: kill the worker under it.
                let worker = session.core.try_read().ok().and_then(|c| c.worker.clone());
                if let Some(worker) = worker {
                    worker.stop().await;
                }
            }
        }
        self.pool.drain().await;
    }
}

/// One run in flight on a session, counted down on drop.
struct InFlight<'a>(&'a Session);

impl<'a> InFlight<'a> {
    /// Counts one more run in flight on the session and marks it used, or refuses the run
    /// when the session already has `max` in flight (limits.max_concurrent_runs_per_session).
    fn enter(session: &'a Session, max: Option<u32>) -> Result<InFlight<'a>> {
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

/// The session's worker, or why it cannot take requests.
fn usable_worker(session: &Session, core: &SessionCore) -> Result<Arc<WorkerProcess>> {
    if core.closed {
        return Err(Error::SessionNotFound(session.id().to_string()));
    }
    core.worker
        .clone()
        .ok_or_else(|| Error::SessionBroken(session.id().to_string()))
}

pub(super) fn expect_done(worker: &WorkerProcess, reply: Result<Reply, WorkerError>) -> Result<()> {
    match reply {
        Ok(Reply::Done(_)) => Ok(()),
        other => Err(unexpected(worker, other)),
    }
}

/// A GraphDef or ConfigProto TensorFlow refused is the client's invalid argument, whatever
/// code TensorFlow used (an unregistered op is NOT_FOUND to it); its message is kept.
fn rejected_graph(error: Error) -> Error {
    match error {
        Error::Tensorflow { message, .. } => Error::InvalidArgument(message),
        other => other,
    }
}

/// Turns any answer but the expected one into the domain error.
pub(super) fn unexpected(worker: &WorkerProcess, reply: Result<Reply, WorkerError>) -> Error {
    match reply {
        Ok(Reply::Error(error)) => Error::Tensorflow {
            code: TfCode(error.code),
            message: error.message,
        },
        Ok(other) => Error::Protocol(format!(
            "worker pid {} sent an unexpected answer: {}",
            worker.pid(),
            reply_name(&other)
        )),
        Err(WorkerError::Died { pid, how }) => Error::WorkerDied { pid, how },
        Err(error @ WorkerError::Start { .. }) => Error::WorkerStart(error.to_string()),
        Err(WorkerError::Protocol(message)) => Error::Protocol(message),
    }
}

fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Error(_) => "error",
        Reply::Done(_) => "done",
        Reply::Run(_) => "run result",
        Reply::Variables(_) => "variables",
        Reply::Ready(_) => "ready",
        Reply::PartialRunHandle(_) => "partial run handle",
    }
}
