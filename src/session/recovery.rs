//! When a worker dies without being asked to: each worker's watcher task, the report of how
//! it died (a kill by the memory policy, the kernel's OOM killer, a crash), and bringing the
//! session back in a fresh worker with its graph (and, for a durable session, its last
//! checkpoint).

use std::sync::Arc;

use super::{Cause, EventKind, Runtime, Session, SessionManager, SessionState, Trigger};
use crate::worker::WorkerProcess;

impl SessionManager {
    /// Restores the session in a fresh worker if this worker dies without being asked to.
    /// Called by `replace_worker` for every worker a session gets.
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

    /// Brings the session back in a fresh worker after `dead` died on its own. Does nothing
    /// when `dead` is no longer the session's worker by the time the session's lock is had
    /// (a recycle or a close replaced it meanwhile): the session is already elsewhere, and
    /// restoring it again would lose that worker's state and report a restore that was not.
    pub(super) async fn restore_after_crash(
        self: Arc<Self>,
        session: Arc<Session>,
        dead: Arc<WorkerProcess>,
    ) {
        let how = dead.exited().await;
        // Runs on the dead worker have failed by now, so this lock is not held for long by
        // them; a recycle in progress finishes first, and then the slot says who won.
        let mut core = session.core.write().await;
        if core.closed || !session.worker.holds(&dead) {
            return;
        }
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
            None => Cause::daemon(
                Trigger::WorkerExit,
                self.describe_unexpected_exit(&how, last_private),
            ),
        };
        self.events.publish(
            session
                .event(EventKind::WorkerExited, dead.pid(), graph_version)
                .reason(format!("worker pid {} {how}", dead.pid()))
                .cause(&cause),
        );
        session.touch(|stats| stats.state = SessionState::Restoring);
        match self
            .start_worker(session.runtime, &core.graph_def, &core.config)
            .await
        {
            Ok(worker) => {
                // A durable session gets its last checkpoint back.
                let restored = self.restore_checkpoint(&session, &worker).await;
                self.replace_worker(&session, &mut core, Some(worker.clone()));
                drop(core);
                session.touch(|stats| {
                    stats.state = SessionState::Ready;
                    stats.worker_restart_count += 1;
                    stats.pending_kill = None;
                });
                let what = match (session.runtime, restored) {
                    (Runtime::Python, _) => {
                        "a fresh Python process; the session's state was lost".to_string()
                    }
                    (Runtime::Graph, 0) => {
                        "graph restored in a fresh worker; variables were lost".to_string()
                    }
                    (Runtime::Graph, count) => format!(
                        "graph restored in a fresh worker; {count} variables restored from the \
                         last checkpoint"
                    ),
                };
                self.events.publish(
                    session
                        .event(EventKind::Restored, worker.pid(), graph_version)
                        .reason(format!("{what} (worker pid {} {how})", dead.pid()))
                        .cause(&cause),
                );
            }
            Err(error) => {
                self.replace_worker(&session, &mut core, None);
                session.touch(|stats| stats.state = SessionState::Broken);
                tracing::error!(session_id = %session.id(), %error, "could not restore session");
            }
        }
    }
}
