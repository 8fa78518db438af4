//! What the memory policy needs from the sessions: an observation of every session and of
//! the machine, and a way to carry out each `policy::Action` (through the same operations a
//! client uses, with the policy's cause on every event). The decisions themselves live in
//! `policy/`, which knows nothing of processes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::recovery::ExitOrigin;
use super::{Actor, Cause, EventKind, InPlaceReset, SessionManager, SessionState, Trigger};
use crate::error::Result;
use crate::memory::MemoryUsage;
use crate::policy::{
    Action, ActionKind, GentleAction, Observation, SessionSample, Supervised, SystemSample,
};
use crate::worker::ExitDescription;

/// What one action achieved, for the log and the runner.
#[derive(Debug, Clone)]
pub struct ActionOutcome {
    pub memory_after: Option<MemoryUsage>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl SessionManager {
    /// Samples every session's memory and the machine's. One small `/proc` read per worker.
    pub fn observe(&self) -> Observation {
        let now = SystemTime::now();
        // One NVML sample per tick, and none at all without a driver.
        let gpu_sample = self.gpu_sample();
        let mut snapshots = self.list_without_gpu();
        let mut gpu_usage = gpu_sample
            .as_ref()
            .map(|sample| {
                let pids: Vec<u32> = snapshots.iter().map(|s| s.worker_pid).collect();
                sample.by_worker(&pids)
            })
            .unwrap_or_default();
        for snapshot in &mut snapshots {
            snapshot.memory.gpu = gpu_usage.remove(&snapshot.worker_pid).unwrap_or_default();
        }
        let sessions = snapshots
            .into_iter()
            .map(|snapshot| SessionSample {
                idle_for: now
                    .duration_since(snapshot.last_used_at)
                    .unwrap_or(Duration::ZERO),
                ready: snapshot.state == SessionState::Ready && snapshot.worker_pid != 0,
                session_id: snapshot.id,
                worker_pid: snapshot.worker_pid,
                private_bytes: snapshot.memory.private_bytes,
                policy: snapshot.policy,
                runs_in_flight: snapshot.runs_in_flight,
                gpu: snapshot.memory.gpu,
            })
            .collect();
        let system = crate::system::memory();
        if let Some(count) = crate::system::oom_kill_count() {
            self.oom_kills_seen.store(count, Ordering::SeqCst);
        }
        Observation {
            sessions,
            system: SystemSample {
                available_bytes: system.available_bytes,
                psi_some_avg10: crate::system::memory_pressure().map(|p| p.some_avg10),
            },
            gpus: gpu_sample
                .map(|sample| {
                    sample
                        .devices
                        .iter()
                        .map(|device| crate::policy::GpuDeviceSample {
                            gpu: device.index,
                            free_bytes: device.free_bytes,
                            total_bytes: device.total_bytes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Explains a worker's death that tfsd did not cause, and where it came from (see
    /// `ExitOrigin`). A SIGKILL while the kernel's OOM-kill counter moved is reported as the
    /// OOM killer's, with the last figure seen; any other SIGKILL came from outside tfsd.
    pub(super) fn describe_unexpected_exit(
        &self,
        how: &ExitDescription,
        last_private_bytes: u64,
    ) -> (String, ExitOrigin) {
        if let Some(limit) = how.memory_limit() {
            // The kernel's global counter moved for this kill too: take it as seen, so that
            // it is not blamed on the next SIGKILL from outside.
            if let Some(count) = crate::system::oom_kill_count() {
                self.oom_kills_seen.store(count, Ordering::SeqCst);
            }
            let reason = format!(
                "killed by the kernel at the hard limit {} (the worker's cgroup limit; last \
                 measured private memory {})",
                mib(limit),
                mib(last_private_bytes)
            );
            return (reason, ExitOrigin::AtMemoryLimit);
        }
        let seen = self.oom_kills_seen.load(Ordering::SeqCst);
        let now = crate::system::oom_kill_count().unwrap_or(seen);
        if how.was_killed() && now > seen {
            self.oom_kills_seen.store(now, Ordering::SeqCst);
            let reason = format!(
                "killed by the kernel's OOM killer (last measured private memory {})",
                mib(last_private_bytes)
            );
            return (reason, ExitOrigin::Failed);
        }
        let origin = if how.was_killed() {
            ExitOrigin::KilledFromOutside
        } else {
            ExitOrigin::Failed
        };
        (format!("the worker {how} without being asked to"), origin)
    }

    /// Carries out one action (or, in dry run, reports it).
    pub async fn apply(self: &Arc<Self>, action: &Action) -> Result<ActionOutcome> {
        let session = self.get(&action.session_id)?;
        let cause = Cause {
            trigger: Trigger::Policy(action.trigger),
            rung: action.rung,
            reason: action.reason.clone(),
            actor: Actor::Policy,
        };
        let graph_version = session.stats().graph_version;
        if action.dry_run {
            self.events.publish(
                session
                    .event(EventKind::DryRun, action.worker_pid, graph_version)
                    .reason(format!("would {}", describe(action.kind)))
                    .cause(&cause),
            );
            return Ok(ActionOutcome { memory_after: None });
        }
        session.touch_policy(|stats| stats.automatic_action_count += 1);
        let memory_after = match action.kind {
            ActionKind::Gentle(GentleAction::PurgeVariables) => Some(
                self.reset_in_place(&action.session_id, InPlaceReset::Variables, cause)
                    .await?
                    .memory_after,
            ),
            ActionKind::Gentle(GentleAction::ResetGraph) => Some(
                self.reset_in_place(&action.session_id, InPlaceReset::Graph, cause)
                    .await?
                    .memory_after,
            ),
            ActionKind::Recycle { preserve_variables } => Some(
                self.recycle(&action.session_id, preserve_variables, cause)
                    .await?
                    .memory_after,
            ),
            ActionKind::KillAndRestore => {
                let worker = session.worker.get();
                let Some(worker) = worker.filter(|w| w.pid() == action.worker_pid) else {
                    // The worker changed since the sample: nothing to kill any more.
                    return Ok(ActionOutcome { memory_after: None });
                };
                session.touch_policy(|stats| {
                    stats.pending_kill = Some((worker.pid(), cause));
                });
                worker.kill_as_failure();
                worker.exited().await;
                None
            }
            ActionKind::Close => {
                self.close_because(&action.session_id, cause).await?;
                None
            }
            ActionKind::MarkUnhealthy => {
                session.touch_policy(|stats| {
                    stats.unhealthy = true;
                    stats.automatic_action_count -= 1;
                });
                self.events.publish(
                    session
                        .event(EventKind::Unhealthy, action.worker_pid, graph_version)
                        .cause(&cause),
                );
                None
            }
        };
        Ok(ActionOutcome { memory_after })
    }
}

impl Supervised for SessionManager {
    fn observe(&self) -> Observation {
        SessionManager::observe(self)
    }

    async fn apply(self: &Arc<Self>, action: &Action) -> Result<Option<MemoryUsage>> {
        Ok(SessionManager::apply(self, action).await?.memory_after)
    }
}

/// The action in words, for dry-run events.
fn describe(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Gentle(GentleAction::PurgeVariables) => "purge the variables",
        ActionKind::Gentle(GentleAction::ResetGraph) => "reset the graph",
        ActionKind::Recycle {
            preserve_variables: true,
        } => "recycle, preserving variables",
        ActionKind::Recycle {
            preserve_variables: false,
        } => "recycle",
        ActionKind::KillAndRestore => "kill the worker under its running step and restore",
        ActionKind::Close => "close the session",
        ActionKind::MarkUnhealthy => "mark the session unhealthy",
    }
}
