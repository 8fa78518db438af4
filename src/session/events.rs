//! Lifecycle events, fanned out to WatchEvents subscribers through a bounded broadcast
//! channel: a slow subscriber misses events (and is told how many) rather than growing the
//! daemon's memory.

use std::time::SystemTime;

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::metrics::Metrics;

use crate::memory::MemoryUsage;

/// Events buffered per subscriber before the oldest are dropped for it.
pub const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Extended,
    GraphReset,
    VariablesPurged,
    Recycled,
    WorkerExited,
    Restored,
    Closed,
    /// The memory policy acted too often on the session; it is reported, not thrashed.
    Unhealthy,
    /// Dry run: what the memory policy would have done.
    DryRun,
}

/// Who or what caused an event: the client, or one of the memory policy's triggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// "client", "soft_limit", "hard_limit", "system_pressure", "idle", "worker_exit".
    pub trigger: &'static str,
    /// The policy's rung (1 gentle, 2 recycle, 3 hard limit); 0 for anything else.
    pub rung: u32,
    /// Why, in a sentence with the figures; empty for a client's request.
    pub reason: String,
    /// Who acted: the principal that called, "policy" for the memory policy, "tfsd" for
    /// the daemon itself (restores, shutdown).
    pub actor: String,
}

impl Cause {
    pub fn client() -> Cause {
        Cause::by("client")
    }

    /// A client's or operator's own request, attributed to `actor`.
    pub fn by(actor: impl Into<String>) -> Cause {
        Cause {
            trigger: "client",
            rung: 0,
            reason: String::new(),
            actor: actor.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionEvent {
    pub session_id: String,
    /// The session's owner, so that a client's WatchEvents shows only its own sessions.
    pub owner: String,
    pub kind: EventKind,
    pub reason: String,
    pub worker_pid: u32,
    pub memory_before: Option<MemoryUsage>,
    pub memory_after: Option<MemoryUsage>,
    pub graph_version: u64,
    pub at: SystemTime,
    pub trigger: &'static str,
    pub rung: u32,
    pub actor: String,
}

impl SessionEvent {
    pub fn new(session_id: &str, kind: EventKind, worker_pid: u32, graph_version: u64) -> Self {
        SessionEvent {
            session_id: session_id.to_string(),
            owner: String::new(),
            kind,
            reason: String::new(),
            worker_pid,
            memory_before: None,
            memory_after: None,
            graph_version,
            at: SystemTime::now(),
            trigger: "",
            rung: 0,
            actor: String::new(),
        }
    }

    /// Records the cause; its reason goes first in the event's reason.
    pub fn cause(mut self, cause: &Cause) -> Self {
        self.trigger = cause.trigger;
        self.rung = cause.rung;
        self.actor = cause.actor.clone();
        if !cause.reason.is_empty() {
            self.reason = if self.reason.is_empty() {
                cause.reason.clone()
            } else {
                format!("{}; {}", cause.reason, self.reason)
            };
        }
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    pub fn memory(mut self, before: MemoryUsage, after: MemoryUsage) -> Self {
        self.memory_before = Some(before);
        self.memory_after = Some(after);
        self
    }
}

#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<SessionEvent>,
    metrics: Arc<Metrics>,
}

impl EventBus {
    pub fn new(metrics: Arc<Metrics>) -> EventBus {
        EventBus {
            sender: broadcast::channel(EVENT_BUFFER).0,
            metrics,
        }
    }

    pub fn publish(&self, event: SessionEvent) {
        tracing::info!(
            session_id = %event.session_id,
            worker_pid = event.worker_pid,
            kind = ?event.kind,
            trigger = event.trigger,
            actor = %event.actor,
            rung = event.rung,
            reason = %event.reason,
            "session event"
        );
        self.metrics.record_event(&event);
        // No subscribers is fine: events are not stored.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.sender.subscribe()
    }
}
