//! When a worker dies without being asked to: each worker's watcher task, the report of how
//! it died (a kill by the memory policy, the kernel's OOM killer, a crash), and bringing the
//! session back in a fresh worker with its graph (and, for a durable session, its last
//! checkpoint).

use std::sync::Arc;

use super::{Cause, EventKind, Session, SessionManager, SessionState};
use crate::worker::WorkerProcess;

impl SessionManager {
    /// Restores the session in a fresh worker if this worker dies without being asked to.
    pub(super) fn watch_worker(
        self: &Arc<Self>,
        session: &Arc<Session>,
        worker: &Arc<WorkerProcess>,
    ) {
        worker.assign_session(session.id());
        let exited = worker.exit_signal();
        let manager = Arc::downgrade(self);
        let session = Arc::downgrade(session);
        let worker = Arc::downgrade(worker);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = exited => {}
                _ = shutdown.cancelled() => return,
            }
            let (Some(manager), Some(session), Some(worker)) =
                (manager.upgrade(), session.upgrade(), worker.upgrade())
            else {
                return;
            };
            if !worker.exit_was_expected() {
                manager.restore_after_crash(session, worker).await;
            }
        });
    }

    pub(super) async fn restore_after_crash(
        self: Arc<Self>,
        session: Arc<Session>,
        dead: Arc<WorkerProcess>,
    ) {
        let how = dead.exited().await;
        let (graph_version, pending_kill, last_private) = {
            let stats = session.stats();
            let pending = stats
                .pending_kill
                .as_ref()
                .filter(|(pid, _)| *pid == dead.pid())
                .map(|(_, cause)| cause.clone());
            (stats.graph_version, pending, stats.last_private_bytes)
        };
        let cause = match pending_kill {
            Some(cause) => cause,
            None => Cause {
                trigger: "worker_exit",
                rung: 0,
                reason: self.describe_unexpected_exit(&how, last_private),
                actor: "tfsd".to_string(),
            },
        };
        self.events.publish(
            session
                .event(EventKind::WorkerExited, dead.pid(), graph_version)
                .reason(format!("worker pid {} {how}", dead.pid()))
                .cause(&cause),
        );
        session.touch(|stats| stats.state = SessionState::Restoring);
        let mut core = session.core.write().await;
        let is_current = core
            .worker
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &dead));
        if core.closed || !is_current {
            return;
        }
        match self.start_worker(&core.graph_def, &core.config).await {
            Ok(worker) => {
                // A durable session gets its last checkpoint back.
                let restored = self.restore_checkpoint(&session, &worker).await;
                core.worker = Some(worker.clone());
                self.watch_worker(&session, &worker);
                session.touch(|stats| {
                    stats.state = SessionState::Ready;
                    stats.worker_pid = worker.pid();
                    stats.worker = Arc::downgrade(&worker);
                    stats.worker_restart_count += 1;
                    stats.pending_kill = None;
                });
                let variables = match restored {
                    0 => "variables were lost".to_string(),
                    count => format!("{count} variables restored from the last checkpoint"),
                };
                self.events.publish(
                    session
                        .event(EventKind::Restored, worker.pid(), graph_version)
                        .reason(format!(
                            "graph restored in a fresh worker after worker pid {} {how}; \
                             {variables}",
                            dead.pid()
                        ))
                        .cause(&cause),
                );
            }
            Err(error) => {
                core.worker = None;
                session.touch(|stats| {
                    stats.state = SessionState::Broken;
                    stats.worker_pid = 0;
                });
                tracing::error!(session_id = %session.id(), %error, "could not restore session");
            }
        }
    }
}
