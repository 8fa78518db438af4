//! Sessions: what a client created, independent of the worker process that hosts it now.
//!
//! A `Session` owns its definition (runtime, graph, config, labels) and one slot holding its
//! current worker. The worker can change (recycle, restore after a crash); the id, the graph
//! and the counters do not. `SessionManager` holds every session and performs the
//! operations; it talks to workers only through their typed operations (`worker::`), never
//! in the wire protocol.
//!
//! Locking: `Session::core` is a tokio `RwLock`. Runs and calls take it shared, so they run
//! concurrently; anything that changes the worker's graph, variables or process takes it
//! exclusively, so a reset never interleaves with a step. The worker slot and the counters
//! sit behind plain mutexes so that GetSession/ListSessions (and the memory policy's kill)
//! never wait behind a long step; only `SessionManager::replace_worker`, called with the
//! core lock held exclusively, changes the slot.

mod durability;
mod events;
mod gpu;
mod liveness;
mod manager;
mod python;
mod recovery;
mod supervision;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use events::{Actor, Cause, EVENT_BUFFER, EventBus, EventKind, SessionEvent, Trigger};
pub use manager::{Admitted, InPlaceReset, PartialRunSpec, Pools, SessionManager};
pub use python::CallEvent;
pub use supervision::ActionOutcome;

use crate::memory::MemoryUsage;
use crate::policy::SessionPolicy;
use crate::proto::tensorflow::TensorProto;
pub use crate::worker::Runtime;
use crate::worker::WorkerProcess;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Ready,
    /// The worker died; a fresh one is being started with the session's graph.
    Restoring,
    /// Restoring failed, or the worker keeps crashing (crash loop); RecycleSession tries
    /// again.
    Broken,
    Closed,
}

/// A point-in-time view of a session, for GetSession, ListSessions and reset answers.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub id: String,
    pub runtime: Runtime,
    pub owner: String,
    pub durable_variables: bool,
    pub labels: BTreeMap<String, String>,
    pub state: SessionState,
    pub worker_pid: u32,
    pub memory: MemoryUsage,
    pub graph_version: u64,
    pub run_count: u64,
    pub call_count: u64,
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
    /// The GPUs its worker sees.
    pub gpu_placement: crate::gpu::Placement,
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
    /// Variables (graph) or namespace entries (Python) carried to the fresh worker.
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
    /// Python sessions' pool (zeros when they are not configured).
    pub warm_python_workers: usize,
    pub warm_python_pool_size: usize,
    pub python_runtime: String,
    pub system: crate::system::SystemMemory,
    pub draining: bool,
    /// What holds workers to their hard limits ("cgroup v1: …", "rlimit: …").
    pub memory_enforcement: String,
    /// The workers' sandbox, or "off".
    pub sandbox: String,
    /// The GPUs NVML shows, or why none (`gpu::Gpus::description`).
    pub gpu: String,
    /// Each device now (no process lists); empty without an NVIDIA driver.
    pub gpus: Vec<crate::gpu::DeviceSample>,
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

/// The session's definition; see the module doc for the locking rule. Holding it
/// exclusively is what allows replacing the worker.
#[derive(Debug)]
struct SessionCore {
    /// Every GraphDef the session received since its last graph reset, concatenated.
    /// Concatenated serialized protobufs parse as their merge, so this is one GraphDef
    /// holding every node: what a fresh worker imports on recycle or restore.
    graph_def: Vec<u8>,
    config: Bytes,
    closed: bool,
}

/// The one place a session's current worker is kept. `None` only while broken (restoring
/// failed) or after close.
#[derive(Debug, Default)]
struct WorkerSlot(Mutex<Option<Arc<WorkerProcess>>>);

impl WorkerSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<WorkerProcess>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self) -> Option<Arc<WorkerProcess>> {
        self.lock().clone()
    }

    /// Whether `worker` is the current worker.
    fn holds(&self, worker: &Arc<WorkerProcess>) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, worker))
    }

    fn replace(&self, fresh: Option<Arc<WorkerProcess>>) -> Option<Arc<WorkerProcess>> {
        std::mem::replace(&mut *self.lock(), fresh)
    }
}

#[derive(Debug)]
struct SessionStats {
    state: SessionState,
    graph_version: u64,
    run_count: u64,
    call_count: u64,
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
    /// Set just before the memory policy kills the worker with this pid: why, so that the
    /// failed runs and the exit event say so.
    pending_kill: Option<(u32, Cause)>,
    /// Recent worker failures: the restart backoff and crash-loop marking (`recovery.rs`).
    crash_history: recovery::CrashHistory,
}

#[derive(Debug)]
pub struct Session {
    id: String,
    runtime: Runtime,
    /// The principal that created it ("" when authentication is off).
    owner: String,
    /// Variables are checkpointed to the store and restored (see `store`).
    durable_variables: bool,
    labels: BTreeMap<String, String>,
    /// The effective memory policy (the session's request capped by the operator's maxima).
    policy: SessionPolicy,
    /// The GPUs its workers see, and the environment that makes them (`gpu.rs`).
    gpus: gpu::SessionGpus,
    created_at: SystemTime,
    core: tokio::sync::RwLock<SessionCore>,
    worker: WorkerSlot,
    /// Python sessions: one call in the worker at a time (`python.rs`).
    call_turn: tokio::sync::Mutex<()>,
    stats: Mutex<SessionStats>,
}

/// What a session is made of, apart from its worker.
struct SessionDefinition {
    id: String,
    runtime: Runtime,
    owner: String,
    durable_variables: bool,
    labels: BTreeMap<String, String>,
    policy: SessionPolicy,
    gpus: gpu::SessionGpus,
    graph_def: Vec<u8>,
    config: Bytes,
}

impl Session {
    /// A session without a worker yet: `SessionManager::replace_worker` gives it one.
    fn new(definition: SessionDefinition) -> Session {
        let SessionDefinition {
            id,
            runtime,
            owner,
            durable_variables,
            labels,
            policy,
            gpus,
            graph_def,
            config,
        } = definition;
        let now = SystemTime::now();
        Session {
            id,
            runtime,
            owner,
            durable_variables,
            labels,
            policy,
            gpus,
            created_at: now,
            worker: WorkerSlot::default(),
            call_turn: tokio::sync::Mutex::new(()),
            stats: Mutex::new(SessionStats {
                state: SessionState::Ready,
                graph_version: 0,
                run_count: 0,
                call_count: 0,
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
                pending_kill: None,
                crash_history: recovery::CrashHistory::default(),
            }),
            core: tokio::sync::RwLock::new(SessionCore {
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
        if cause.is_client() {
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
        let worker = self.worker.get();
        let worker_pid = worker.as_ref().map_or(0, |worker| worker.pid());
        let memory = worker.map_or_else(MemoryUsage::default, |worker| worker.memory());
        let mut stats = self.stats();
        stats.peak_private_bytes = stats.peak_private_bytes.max(memory.private_bytes);
        if memory.private_bytes > 0 {
            stats.last_private_bytes = memory.private_bytes;
        }
        SessionSnapshot {
            id: self.id.clone(),
            runtime: self.runtime,
            owner: self.owner.clone(),
            durable_variables: self.durable_variables,
            labels: self.labels.clone(),
            state: stats.state,
            worker_pid,
            memory,
            graph_version: stats.graph_version,
            run_count: stats.run_count,
            call_count: stats.call_count,
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
            gpu_placement: self.gpus.placement.clone(),
        }
    }
}
