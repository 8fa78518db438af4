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
    /// The memory policy acted too often on the session, or its worker keeps crashing
    /// (`recovery.rs`); it is reported, not thrashed. The reason says which.
    Unhealthy,
    /// Dry run: what the memory policy would have done.
    DryRun,
}

impl EventKind {
    /// The event's name in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Extended => "extended",
            EventKind::GraphReset => "graph_reset",
            EventKind::VariablesPurged => "variables_purged",
            EventKind::Recycled => "recycled",
            EventKind::WorkerExited => "worker_exited",
            EventKind::Restored => "restored",
            EventKind::Closed => "closed",
            EventKind::Unhealthy => "unhealthy",
            EventKind::DryRun => "dry_run",
        }
    }
}

/// What set an event off. Names only at the edges (`as_str`: events, logs, metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A client's or operator's request.
    Client,
    /// One of the memory policy's triggers.
    Policy(crate::policy::Trigger),
    /// A worker that died on its own.
    WorkerExit,
    /// The daemon bringing stored sessions back at start-up.
    Restart,
    /// The daemon shutting down.
    Shutdown,
    /// A Python call that did not stop when interrupted (its timeout, or its caller gone).
    CallStopped,
    /// A worker that stopped answering: it missed a call's deadline, or stayed stopped.
    Unresponsive,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Client => "client",
            Trigger::Policy(trigger) => trigger.as_str(),
            Trigger::WorkerExit => "worker_exit",
            Trigger::Restart => "restart",
            Trigger::Shutdown => "shutdown",
            Trigger::CallStopped => "call_stopped",
            Trigger::Unresponsive => "unresponsive",
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The calling principal ("client" when authentication is off).
    Principal(String),
    /// The memory policy.
    Policy,
    /// The daemon itself: restores, shutdown.
    Daemon,
}

impl Actor {
    pub fn as_str(&self) -> &str {
        match self {
            Actor::Principal(principal) => principal,
            Actor::Policy => "policy",
            Actor::Daemon => "tfsd",
        }
    }
}

/// Who or what caused an event: the client, or one of the memory policy's triggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub trigger: Trigger,
    /// The policy's rung (1 gentle, 2 recycle, 3 hard limit); 0 for anything else.
    pub rung: u32,
    /// Why, in a sentence with the figures; empty for a client's request.
    pub reason: String,
    pub actor: Actor,
}

impl Cause {
    pub fn client() -> Cause {
        Cause::by("client")
    }

    /// A client's or operator's own request, attributed to `actor`.
    pub fn by(actor: impl Into<String>) -> Cause {
        Cause {
            trigger: Trigger::Client,
            rung: 0,
            reason: String::new(),
            actor: Actor::Principal(actor.into()),
        }
    }

    /// Something the daemon does on its own.
    pub fn daemon(trigger: Trigger, reason: impl Into<String>) -> Cause {
        Cause {
            trigger,
            rung: 0,
            reason: reason.into(),
            actor: Actor::Daemon,
        }
    }

    /// The client's own use of a session (not the policy's, nor the daemon's): what idle
    /// time and victim order count.
    pub fn is_client(&self) -> bool {
        self.trigger == Trigger::Client
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
    /// `None` for events no one asked for in particular (a graph extended as part of a step).
    pub trigger: Option<Trigger>,
    pub rung: u32,
    pub actor: Option<Actor>,
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
            trigger: None,
            rung: 0,
            actor: None,
        }
    }

    /// Records the cause; its reason goes first in the event's reason.
    pub fn cause(mut self, cause: &Cause) -> Self {
        self.trigger = Some(cause.trigger);
        self.rung = cause.rung;
        self.actor = Some(cause.actor.clone());
        if !cause.reason.is_empty() {
            self.reason = if self.reason.is_empty() {
                cause.reason.clone()
            } else {
                format!("{}; {}", cause.reason, self.reason)
            };
        }
        self
    }

    /// The trigger's name; "" when there is none.
    pub fn trigger_name(&self) -> &'static str {
        self.trigger.map_or("", Trigger::as_str)
    }

    /// The actor's name; "" when there is none.
    pub fn actor_name(&self) -> &str {
        self.actor.as_ref().map_or("", Actor::as_str)
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
            kind = event.kind.as_str(),
            trigger = event.trigger_name(),
            actor = event.actor_name(),
            rung = event.rung,
            reason = %event.reason,
            "session event"
        );
        self.metrics.record_action(
            event.kind.as_str(),
            event.trigger.unwrap_or(Trigger::Client).as_str(),
        );
        // No subscribers is fine: events are not stored.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.sender.subscribe()
    }
}
