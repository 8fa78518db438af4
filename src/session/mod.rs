//! Sessions: what a client created, independent of the worker process that hosts it now.
//!
//! A `Session` owns its definition (graph, config, labels) and a handle to its current
//! worker. The worker can change (recycle, restore after a crash); the id, the graph and the
//! counters do not. `SessionManager` holds every session and performs the operations.
//!
//! Locking: `Session::core` is a tokio `RwLock`. Runs take it shared, so they run
//! concurrently; anything that changes the worker's graph, variables or process takes it
//! exclusively, so a reset never interleaves with a step. The counters in `Session::stats`
//! sit behind a plain mutex so that GetSession/ListSessions never wait behind a long step.

mod durability;
mod events;
mod manager;
mod recovery;
mod supervision;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use events::{Cause, EVENT_BUFFER, EventBus, EventKind, SessionEvent};
pub use manager::{PartialRunSpec, SessionManager};
pub use supervision::ActionOutcome;

use crate::memory::MemoryUsage;
use crate::policy::SessionPolicy;
use crate::proto::tensorflow::TensorProto;
use crate::worker::WorkerProcess;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Ready,
    /// The worker died; a fresh one is being started with the session's graph.
    Restoring,
    /// Restoring failed; RecycleSession tries again.
    Broken,
    Closed,
}

/// A point-in-time view of a session, for GetSession, ListSessions and reset answers.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub id: String,
    pub owner: String,
    pub durable_variables: bool,
    pub labels: BTreeMap<String, String>,
    pub state: SessionState,
    pub worker_pid: u32,
    pub memory: MemoryUsage,
    pub graph_version: u64,
    pub run_count: u64,
    pub runs_in_flight: u32,
    pub graph_reset_count: u64,
    pub purge_count: u64,
    pub recycle_count: u64,
    pub worker_restart_count: u64,
    pub created_at: SystemTime,
    pub last_used_at: SystemTime,
    pub peak_private_bytes: u64,
    pub policy: SessionPolicy,
    pub unhealthy: bool,
    pub automatic_action_count: u64,
}

/// What a reset, purge or recycle did.
#[derive(Debug, Clone)]
pub struct ResetOutcome {
    pub session: SessionSnapshot,
    pub memory_before: MemoryUsage,
    pub memory_after: MemoryUsage,
    pub duration: Duration,
    pub worker_pid_before: u32,
    pub worker_pid_after: u32,
    pub variables_preserved: u32,
}

/// The daemon's own state, for GetDaemonStatus.
#[derive(Debug, Clone)]
pub struct DaemonStatus {
    pub version: &'static str,
    pub tensorflow_version: String,
    pub pid: u32,
    pub memory: MemoryUsage,
    pub started_at: SystemTime,
    pub session_count: usize,
    pub warm_workers: usize,
    pub warm_pool_size: usize,
    pub system: crate::system::SystemMemory,
    pub draining: bool,
}

/// One step's inputs, as the client sent them.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub feeds: Vec<(String, TensorProto)>,
    pub fetches: Vec<String>,
    pub targets: Vec<String>,
    pub timeout: Option<Duration>,
    /// Refuse the run (RESOURCE_EXHAUSTED) when the session already has this many in
    /// flight (limits.max_concurrent_runs_per_session).
    pub max_runs_in_flight: Option<u32>,
}

/// The session's definition and current worker; see the module doc for the locking rule.
#[derive(Debug)]
struct SessionCore {
    /// `None` only while broken (restoring failed) or after close.
    worker: Option<Arc<WorkerProcess>>,
    /// Every GraphDef the session received since its last graph reset, concatenated.
    /// Concatenated serialized protobufs parse as their merge, so this is one GraphDef
    /// holding every node: what a fresh worker imports on recycle or restore.
    graph_def: Vec<u8>,
    config: Bytes,
    closed: bool,
}

#[derive(Debug)]
struct SessionStats {
    state: SessionState,
    worker_pid: u32,
    graph_version: u64,
    run_count: u64,
    runs_in_flight: u32,
    graph_reset_count: u64,
    purge_count: u64,
    recycle_count: u64,
    worker_restart_count: u64,
    last_used_at: SystemTime,
    peak_private_bytes: u64,
    /// The private memory the sampler saw last, for reporting a worker the kernel killed.
    last_private_bytes: u64,
    unhealthy: bool,
    automatic_action_count: u64,
    /// The current worker, for killing it under a running step without the session lock.
    worker: std::sync::Weak<WorkerProcess>,
    /// Set just before the memory policy kills the worker with this pid: why, so that the
    /// failed runs and the exit event say so.
    pending_kill: Option<(u32, Cause)>,
}

#[derive(Debug)]
pub struct Session {
    id: String,
    /// The principal that created it ("" when authentication is off).
    owner: String,
    /// Variables are checkpointed to the store and restored (see `store`).
    durable_variables: bool,
    labels: BTreeMap<String, String>,
    /// The effective memory policy (the session's request capped by the operator's maxima).
    policy: SessionPolicy,
    created_at: SystemTime,
    core: tokio::sync::RwLock<SessionCore>,
    stats: Mutex<SessionStats>,
}

/// What a session is made of, apart from its worker.
struct SessionDefinition {
    id: String,
    owner: String,
    durable_variables: bool,
    labels: BTreeMap<String, String>,
    policy: SessionPolicy,
    graph_def: Vec<u8>,
    config: Bytes,
}

impl Session {
    fn new(definition: SessionDefinition, worker: Arc<WorkerProcess>) -> Session {
        let SessionDefinition {
            id,
            owner,
            durable_variables,
            labels,
            policy,
            graph_def,
            config,
        } = definition;
        let now = SystemTime::now();
        Session {
            id,
            owner,
            durable_variables,
            labels,
            policy,
            created_at: now,
            stats: Mutex::new(SessionStats {
                state: SessionState::Ready,
                worker_pid: worker.pid(),
                graph_version: 0,
                run_count: 0,
                runs_in_flight: 0,
                graph_reset_count: 0,
                purge_count: 0,
                recycle_count: 0,
                worker_restart_count: 0,
                last_used_at: now,
                peak_private_bytes: 0,
                last_private_bytes: 0,
                unhealthy: false,
                automatic_action_count: 0,
                worker: Arc::downgrade(&worker),
                pending_kill: None,
            }),
            core: tokio::sync::RwLock::new(SessionCore {
                worker: Some(worker),
                graph_def,
                config,
                closed: false,
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, SessionStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the counters and marks the session used now.
    fn touch(&self, update: impl FnOnce(&mut SessionStats)) {
        let mut stats = self.stats();
        update(&mut stats);
        stats.last_used_at = SystemTime::now();
    }

    /// Updates the counters without marking the session used: what the memory policy does
    /// to a session is not the client using it (idle time and victim order depend on that).
    fn touch_policy(&self, update: impl FnOnce(&mut SessionStats)) {
        update(&mut self.stats());
    }

    /// `touch` for the client's own operations, `touch_policy` for anything else.
    fn touch_because(&self, cause: &Cause, update: impl FnOnce(&mut SessionStats)) {
        if cause.trigger == "client" {
            self.touch(update);
        } else {
            self.touch_policy(update);
        }
    }

    /// A new event about this session.
    fn event(&self, kind: EventKind, worker_pid: u32, graph_version: u64) -> SessionEvent {
        let mut event = SessionEvent::new(&self.id, kind, worker_pid, graph_version);
        event.owner = self.owner.clone();
        event
    }

    /// Why the memory policy killed worker `pid`, if it did.
    fn kill_cause(&self, pid: u32) -> Option<Cause> {
        self.stats()
            .pending_kill
            .as_ref()
            .filter(|(killed, _)| *killed == pid)
            .map(|(_, cause)| cause.clone())
    }

    pub fn snapshot(&self) -> SessionSnapshot {
        let mut stats = self.stats();
        let memory = if stats.worker_pid == 0 {
            MemoryUsage::default()
        } else {
            crate::memory::process_memory(stats.worker_pid).unwrap_or_default()
        };
        stats.peak_private_bytes = stats.peak_private_bytes.max(memory.private_bytes);
        if memory.private_bytes > 0 {
            stats.last_private_bytes = memory.private_bytes;
        }
        SessionSnapshot {
            id: self.id.clone(),
            owner: self.owner.clone(),
            durable_variables: self.durable_variables,
            labels: self.labels.clone(),
            state: stats.state,
            worker_pid: stats.worker_pid,
            memory,
            graph_version: stats.graph_version,
            run_count: stats.run_count,
            runs_in_flight: stats.runs_in_flight,
            graph_reset_count: stats.graph_reset_count,
            purge_count: stats.purge_count,
            recycle_count: stats.recycle_count,
            worker_restart_count: stats.worker_restart_count,
            created_at: self.created_at,
            last_used_at: stats.last_used_at,
            peak_private_bytes: stats.peak_private_bytes,
            policy: self.policy,
            unhealthy: stats.unhealthy,
            automatic_action_count: stats.automatic_action_count,
        }
    }
}
