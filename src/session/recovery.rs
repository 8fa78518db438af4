//! When a worker dies without being asked to: each worker's watcher task, the report of how
//! it died (a kill by the memory policy, the kernel's OOM killer, a crash), and bringing the
//! session back in a fresh worker with its graph (and, for a durable session, its last
//! checkpoint).
//!
//! Crash loops are not free: a session whose workers keep failing is restarted after a
//! growing backoff, and once it has failed `CRASH_LOOP_EXITS` times within
//! `CRASH_LOOP_WINDOW` it is marked unhealthy (an UNHEALTHY event, GetSession's `unhealthy`,
//! the `unhealthy`/`worker_exit` action metric) and left BROKEN without a worker: no more
//! restarts until a RecycleSession (the client's or the operator's) tries again with a clean
//! record. What counts is a worker that died on its own (`ExitOrigin::Failed`): a crash or
//! the kernel's OOM killer. tfsd's own kills (the memory policy's hard limit, a Python call
//! that would not stop, a worker that stopped answering) and SIGKILLs from outside (an
//! operator, a chaos tool) are restored at once and not counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Cause, EventKind, Runtime, Session, SessionManager, SessionState, Trigger};
use crate::error::Error;
use crate::worker::WorkerProcess;

/// Failures within `CRASH_LOOP_WINDOW` that mark a session crash-looping. One or two
/// failures are ordinary (an OOM kill on a busy machine, a kernel bug hit once) and each is
/// restored; five in ten minutes is a session that fails deterministically (a graph with an
/// op that aborts, a checkpoint that crashes the worker on restore, a broken environment),
/// which a sixth restart would not save: it would only cost another worker start and the
/// memory the worker builds up before it dies again.
pub(super) const CRASH_LOOP_EXITS: usize = 5;
/// See `CRASH_LOOP_EXITS`. Ten minutes also catches a loop slowed down by the backoff or by
/// a client that retries only every minute or two.
pub(super) const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// The wait before the second restart in a row; each later one waits twice as long as the
/// one before. The first restart is immediate: a single crash is restored as fast as it can
/// be, since the client is waiting for it.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest wait before a restart. With the limits above a session is marked
/// crash-looping before the backoff gets there (0, 100, 200, 400 ms); the cap holds should
/// those limits be raised.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that served this long before it failed ends the run of failures: the next
/// restart is immediate again. (It still counts towards `CRASH_LOOP_EXITS`: five failures
/// within ten minutes are a loop however long each worker lived.)
const STABLE_UPTIME: Duration = Duration::from_secs(60);

/// How a worker that tfsd did not stop on purpose came to die, as the crash-loop guard
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExitOrigin {
    /// It died on its own: it crashed (a signal it raised itself, an exit code) or the
    /// kernel's OOM killer took it. Counted.
    Failed,
    /// tfsd killed it on purpose: a step over the hard limit, a Python call that would not
    /// stop, a worker that stopped answering. Not counted: each kill answers one request
    /// (whose error says why) or a process someone stopped, and the limit or timeout behind
    /// it already paces the next one; the session's own code did not fail.
    KilledByTfsd,
    /// SIGKILL from outside tfsd and not the OOM killer: an operator or a chaos tool decided
    /// it. Not counted: the session did nothing wrong.
    KilledFromOutside,
    /// The kernel killed it at its cgroup's memory limit, the session's hard limit.
    /// Counted, unlike the policy's own hard-limit kill: the kernel also kills a worker
    /// that goes over while its session is being restored into it (a checkpoint bigger than
    /// the limit), and such a session must end up crash-looping, not restored forever.
    AtMemoryLimit,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Now,
    After(Duration),
    /// Crash-looping: no restart until a RecycleSession.
    Never,
}

/// A session's recent worker failures, kept in its stats: how long to wait before the next
/// restart, and whether the session is crash-looping.
#[derive(Debug, Default)]
pub(super) struct CrashHistory {
    /// When each failure within `CRASH_LOOP_WINDOW` happened, oldest first.
    failures: VecDeque<Instant>,
    /// Failures in a row, each of a worker that served less than `STABLE_UPTIME`: what the
    /// backoff grows with.
    in_a_row: u32,
    /// When the session got its current worker.
    worker_since: Option<Instant>,
    /// Set while the session is crash-looping.
    crash_loop: Option<CrashLoop>,
}

/// Why a session was marked crash-looping, for the errors its requests get.
#[derive(Debug, Clone)]
struct CrashLoop {
    /// How its last worker ended ("killed by signal 6 (SIGABRT, core dumped)").
    last_exit: String,
    /// It was already unhealthy (the memory policy marked it): a recycle leaves that mark.
    was_unhealthy: bool,
}

impl CrashHistory {
    /// Records a failure at `now`: answers whether to restart, and when.
    fn record_failure(&mut self, now: Instant) -> Restart {
        self.failures
            .retain(|at| now.saturating_duration_since(*at) < CRASH_LOOP_WINDOW);
        self.failures.push_back(now);
        let served_long = self
            .worker_since
            .is_some_and(|since| now.saturating_duration_since(since) >= STABLE_UPTIME);
        self.in_a_row = if served_long { 1 } else { self.in_a_row + 1 };
        if self.failures.len() >= CRASH_LOOP_EXITS {
            return Restart::Never;
        }
        match self.in_a_row {
            0 | 1 => Restart::Now,
            n => {
                let doublings = (n - 2).min(16);
                Restart::After(
                    (RESTART_BACKOFF_FIRST * 2u32.pow(doublings)).min(RESTART_BACKOFF_MAX),
                )
            }
        }
    }

    /// The session got a new worker at `now`. A crash-looping session gets one only from a
    /// RecycleSession: that is the way back, with a clean record. Answers whether the
    /// session was crash-looping and whether the unhealthy mark was the crash loop's alone.
    fn worker_started(&mut self, now: Instant) -> Option<CrashLoop> {
        self.worker_since = Some(now);
        let ended = self.crash_loop.take();
        if ended.is_some() {
            self.failures.clear();
            self.in_a_row = 0;
        }
        ended
    }
}

impl SessionManager {
    /// Restores the session in a fresh worker if this worker dies without being asked to.
    /// Called by `replace_worker` for every worker a session gets.
    pub(super) fn watch_worker(
        self: &Arc<Self>,
        session: &Arc<Session>,
        worker: &Arc<WorkerProcess>,
    ) {
        worker.assign_session(session.id());
        let ended_crash_loop = session.stats().crash_history.worker_started(Instant::now());
        if let Some(crash_loop) = ended_crash_loop {
            if !crash_loop.was_unhealthy {
                session.touch_policy(|stats| stats.unhealthy = false);
            }
            tracing::info!(
                session_id = %session.id(),
                worker_pid = worker.pid(),
                "a crash-looping session got a fresh worker: restarts are counted afresh"
            );
        }
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

    /// Brings the session back in a fresh worker after `dead` died on its own, after a
    /// backoff when its workers keep failing, or marks it crash-looping and leaves it
    /// without a worker (see the module doc). Does nothing when `dead` is no longer the
    /// session's worker by the time the session's lock is had (a recycle or a close replaced
    /// it meanwhile, or during the backoff): the session is already elsewhere, and restoring
    /// it again would lose that worker's state and report a restore that was not.
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
        let (cause, origin) = match pending_kill {
            Some(cause) => (cause, ExitOrigin::KilledByTfsd),
            None => {
                let (reason, origin) = self.describe_unexpected_exit(&how, last_private);
                let cause = match origin {
                    ExitOrigin::AtMemoryLimit => Cause {
                        trigger: Trigger::Policy(crate::policy::Trigger::HardLimit),
                        rung: 3,
                        reason,
                        actor: super::Actor::Daemon,
                    },
                    _ => Cause::daemon(Trigger::WorkerExit, reason),
                };
                (cause, origin)
            }
        };
        self.events.publish(
            session
                .event(EventKind::WorkerExited, dead.pid(), graph_version)
                .reason(format!("worker pid {} {how}", dead.pid()))
                .cause(&cause),
        );
        let restart = match origin {
            ExitOrigin::Failed | ExitOrigin::AtMemoryLimit => {
                session.stats().crash_history.record_failure(Instant::now())
            }
            ExitOrigin::KilledByTfsd | ExitOrigin::KilledFromOutside => Restart::Now,
        };
        let backoff = match restart {
            Restart::Now => None,
            Restart::After(delay) => Some(delay),
            Restart::Never => {
                self.mark_crash_looping(&session, &mut core, &dead, how.to_string());
                return;
            }
        };
        session.touch(|stats| stats.state = SessionState::Restoring);
        if let Some(delay) = backoff {
            // Without the lock while waiting: a Close or a RecycleSession meanwhile acts at
            // once (and then the restore gives way to it); runs answer UNAVAILABLE from the
            // dead worker, as while any restore is under way.
            drop(core);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return,
            }
            core = session.core.write().await;
            if core.closed || !session.worker.holds(&dead) {
                return;
            }
        }
        match self
            .start_worker(
                session.runtime,
                &core.graph_def,
                &core.config,
                session.policy.hard_limit_bytes,
                &session.gpus.env,
            )
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
                let waited = backoff.map_or_else(String::new, |delay| {
                    format!(
                        "; restarted after a backoff of {delay:?}, as its workers keep failing \
                         ({CRASH_LOOP_EXITS} failures within {} mark it crash-looping)",
                        humantime::format_duration(CRASH_LOOP_WINDOW)
                    )
                });
                self.events.publish(
                    session
                        .event(EventKind::Restored, worker.pid(), graph_version)
                        .reason(format!("{what} (worker pid {} {how}){waited}", dead.pid()))
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

    /// Leaves a session whose workers keep failing BROKEN without a worker, marked unhealthy
    /// and reported. Called with the session's lock held exclusively, `dead` in its slot.
    fn mark_crash_looping(
        self: &Arc<Self>,
        session: &Arc<Session>,
        core: &mut super::SessionCore,
        dead: &Arc<WorkerProcess>,
        last_exit: String,
    ) {
        self.replace_worker(session, core, None);
        let graph_version = {
            let mut stats = session.stats();
            stats.crash_history.crash_loop = Some(CrashLoop {
                last_exit: last_exit.clone(),
                was_unhealthy: stats.unhealthy,
            });
            stats.state = SessionState::Broken;
            stats.unhealthy = true;
            stats.pending_kill = None;
            stats.graph_version
        };
        let cause = Cause::daemon(
            Trigger::WorkerExit,
            format!(
                "the session keeps crashing: its worker failed {CRASH_LOOP_EXITS} times within \
                 {} (last: worker pid {} {last_exit}); tfsd no longer restarts it, \
                 RecycleSession starts it again in a fresh worker",
                humantime::format_duration(CRASH_LOOP_WINDOW),
                dead.pid()
            ),
        );
        tracing::warn!(
            session_id = %session.id(),
            failures = CRASH_LOOP_EXITS,
            window = ?CRASH_LOOP_WINDOW,
            "session marked crash-looping; not restarted until recycled"
        );
        self.events.publish(
            session
                .event(EventKind::Unhealthy, dead.pid(), graph_version)
                .cause(&cause),
        );
    }
}

impl Session {
    /// Why the session has no worker to take a request: it is crash-looping (and how to get
    /// it back), or restoring it failed. For `usable_worker`.
    pub(super) fn without_worker(&self) -> Error {
        match &self.stats().crash_history.crash_loop {
            Some(crash_loop) => Error::Unavailable(format!(
                "session {} is crash-looping: its worker failed {CRASH_LOOP_EXITS} times within \
                 {} (last: {}), so tfsd stopped restarting it; find the cause in the daemon's \
                 log (the worker's stderr), then RecycleSession starts it again in a fresh \
                 worker",
                self.id(),
                humantime::format_duration(CRASH_LOOP_WINDOW),
                crash_loop.last_exit
            )),
            None => Error::SessionBroken(self.id().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A history whose worker started at `at`.
    fn started(at: Instant) -> CrashHistory {
        let mut history = CrashHistory::default();
        history.worker_started(at);
        history
    }

    #[test]
    fn the_first_failure_restarts_at_once_and_later_ones_back_off() {
        let t0 = Instant::now();
        let mut history = started(t0);
        let mut restarts = Vec::new();
        for i in 0..CRASH_LOOP_EXITS as u64 {
            let now = t0 + seconds(i);
            restarts.push(history.record_failure(now));
            history.worker_started(now);
        }
        let ms = Duration::from_millis;
        assert_eq!(
            restarts,
            [
                Restart::Now,
                Restart::After(ms(100)),
                Restart::After(ms(200)),
                Restart::After(ms(400)),
                Restart::Never
            ]
        );
    }

    #[test]
    fn the_backoff_is_capped() {
        let t0 = Instant::now();
        let mut history = started(t0);
        // A run this long is marked crash-looping first with the limits above; the cap holds
        // should they change.
        history.in_a_row = 20;
        assert_eq!(
            history.record_failure(t0 + seconds(1)),
            Restart::After(RESTART_BACKOFF_MAX)
        );
    }

    #[test]
    fn a_worker_that_served_long_enough_ends_the_run_of_failures() {
        let t0 = Instant::now();
        let mut history = started(t0);
        assert_eq!(history.record_failure(t0), Restart::Now);
        history.worker_started(t0);
        assert_eq!(
            history.record_failure(t0 + seconds(1)),
            Restart::After(RESTART_BACKOFF_FIRST)
        );
        history.worker_started(t0 + seconds(1));
        assert_eq!(
            history.record_failure(t0 + seconds(1) + STABLE_UPTIME),
            Restart::Now
        );
    }

    #[test]
    fn failures_leave_the_window() {
        let t0 = Instant::now();
        let mut history = started(t0);
        // One failure short of the limit, each worker serving long enough to reset the
        // backoff; then the oldest leaves the window before the next failure.
        let mut now = t0;
        for _ in 0..CRASH_LOOP_EXITS - 1 {
            now += STABLE_UPTIME;
            assert_eq!(history.record_failure(now), Restart::Now);
            history.worker_started(now);
        }
        let first = t0 + STABLE_UPTIME;
        assert_eq!(
            history.record_failure(first + CRASH_LOOP_WINDOW),
            Restart::Now
        );
        // Within the window they add up, however long each worker lived.
        assert_eq!(
            history.record_failure(first + CRASH_LOOP_WINDOW + seconds(1)),
            Restart::Never
        );
    }

    #[test]
    fn a_fresh_worker_after_a_crash_loop_starts_a_clean_record() {
        let t0 = Instant::now();
        let mut history = started(t0);
        for i in 0..CRASH_LOOP_EXITS as u64 {
            history.record_failure(t0 + seconds(i));
        }
        history.crash_loop = Some(CrashLoop {
            last_exit: "killed by signal 6 (SIGABRT)".into(),
            was_unhealthy: false,
        });
        let ended = history.worker_started(t0 + seconds(10));
        assert!(ended.is_some_and(|crash_loop| !crash_loop.was_unhealthy));
        assert!(history.crash_loop.is_none());
        assert_eq!(history.record_failure(t0 + seconds(11)), Restart::Now);
    }
}
