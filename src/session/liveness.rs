//! Liveness: a worker that is stopped (SIGSTOP, a debugger, a job-control stop) answers
//! nothing, and every request on it would wait for its deadline, or forever for a step
//! without a timeout. The kernel shows such a process at once: its state in
//! `/proc/PID/stat` is `T` (stopped by a signal) or `t` (stopped by a tracer). A worker
//! that stays stopped past `workers.liveness_timeout` is killed and its session restored,
//! with the WORKER_EXITED event and the failed requests saying it stopped answering.
//!
//! A worker that is running but hung is caught by the deadlines instead: every control
//! request has `workers.call_timeout`, and a step its own timeout plus `workers.run_grace`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Cause, Session, SessionManager, Trigger};
use crate::worker::WorkerProcess;

/// Bounds on how often a worker's state is read: often enough to act within a quarter of
/// the timeout, rarely enough to cost nothing (one small /proc read per worker).
const CHECK_PERIOD_MIN: Duration = Duration::from_millis(100);
const CHECK_PERIOD_MAX: Duration = Duration::from_secs(1);

impl SessionManager {
    /// Watches `worker`, the session's, until it exits: killed as unresponsive once it has
    /// been stopped for `workers.liveness_timeout`.
    pub(super) fn watch_liveness(
        self: &Arc<Self>,
        session: &Arc<Session>,
        worker: &Arc<WorkerProcess>,
    ) {
        let limit = self.deadlines.liveness;
        let period = (limit / 4).clamp(CHECK_PERIOD_MIN, CHECK_PERIOD_MAX);
        let exited = worker.exit_signal();
        let session = Arc::downgrade(session);
        let worker = Arc::downgrade(worker);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::pin!(exited);
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stopped_since: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = &mut exited => return,
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let (Some(session), Some(worker)) = (session.upgrade(), worker.upgrade()) else {
                    return;
                };
                if !matches!(worker.process_state(), Some('T' | 't')) {
                    stopped_since = None;
                    continue;
                }
                let since = *stopped_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= limit {
                    let reason = format!(
                        "it stopped answering: the process was stopped (state T in \
                         /proc/{}/stat, e.g. by SIGSTOP) for {limit:?} \
                         (workers.liveness_timeout)",
                        worker.pid()
                    );
                    tracing::warn!(session_id = %session.id(), worker_pid = worker.pid(), %reason, "killing a stopped worker");
                    session.kill_worker(&worker, Cause::daemon(Trigger::Unresponsive, reason));
                    return;
                }
            }
        });
    }
}
