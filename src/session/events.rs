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
}

#[derive(Debug, Clone)]
pub struct SessionEvent {
    pub session_id: String,
    pub kind: EventKind,
    pub reason: String,
    pub worker_pid: u32,
    pub memory_before: Option<MemoryUsage>,
    pub memory_after: Option<MemoryUsage>,
    pub graph_version: u64,
    pub at: SystemTime,
}

impl SessionEvent {
    pub fn new(session_id: &str, kind: EventKind, worker_pid: u32, graph_version: u64) -> Self {
        SessionEvent {
            session_id: session_id.to_string(),
            kind,
            reason: String::new(),
            worker_pid,
            memory_before: None,
            memory_after: None,
            graph_version,
            at: SystemTime::now(),
        }
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
