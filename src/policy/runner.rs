//! The loop around the pure policy: sample, decide, act, re-measure, record.
//!
//! Actions run concurrently, each as a task of its own, and the loop keeps observing while
//! they run: a slow action on one session (a preserving recycle that copies gigabytes of
//! variables takes seconds) never delays another session's, least of all a hard-limit kill.
//! Two rules keep that from doing more than the sequential loop did:
//! - at most one action per session: a session whose action is still running is shown to
//!   `decide` as not ready, so nothing is decided for it (and it is no pressure victim)
//!   until that action is done and recorded — an observation taken mid-recycle would
//!   otherwise escalate on memory the recycle is about to give back;
//! - at most one system-pressure action at a time: pressure takes one victim and measures
//!   the machine again before it takes another, so a second victim is chosen only once the
//!   first one's memory is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    Action, ActionKind, Observation, PolicyConfig, PolicyState, Trigger, decide, hard_limit_kill,
};
use crate::memory::MemoryUsage;

/// What the policy watches and acts on: the sessions. `session::SessionManager` implements
/// it; the policy knows nothing else of them.
pub trait Supervised: Send + Sync + 'static {
    /// Every session's memory and the machine's, now.
    fn observe(&self) -> Observation;
    /// Carries out one action (or, in dry run, reports it); the session's memory after it,
    /// where the action measured it. Called concurrently for different sessions, never for
    /// one session while an earlier action on it still runs — except a hard-limit kill
    /// (`KillAndRestore`, which takes no lock) of a step that grows past the limit while
    /// that earlier action waits behind it.
    fn apply(
        self: &Arc<Self>,
        action: &Action,
    ) -> impl Future<Output = crate::error::Result<Option<MemoryUsage>>> + Send;
}

/// One action carried out, as its task answers it.
struct Applied {
    action: Action,
    /// The session's private memory in the observation the action was decided on.
    private_before: u64,
    result: crate::error::Result<Option<MemoryUsage>>,
}

/// The actions whose tasks are running, by task: the session each acts on and why.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<Applied>,
    actions: HashMap<Id, (String, Trigger)>,
}

impl InFlight {
    fn acting_on(&self, session_id: &str) -> bool {
        self.actions.values().any(|(id, _)| id == session_id)
    }

    fn relieving_pressure(&self) -> bool {
        self.actions
            .values()
            .any(|(_, trigger)| *trigger == Trigger::SystemPressure)
    }

    /// Whether a hard-limit kill is already on its way for the session.
    fn killing(&self, session_id: &str) -> bool {
        self.actions
            .values()
            .any(|(id, trigger)| id == session_id && *trigger == Trigger::HardLimit)
    }

    /// Whether `action` may start now (see the module doc for the two rules).
    fn admits(&self, action: &Action) -> bool {
        if self.acting_on(&action.session_id) {
            return false;
        }
        action.trigger != Trigger::SystemPressure || !self.relieving_pressure()
    }

    fn start<S: Supervised>(&mut self, manager: &Arc<S>, action: Action, private_before: u64) {
        let manager = manager.clone();
        let entry = (action.session_id.clone(), action.trigger);
        let task = self.tasks.spawn(async move {
            let result = manager.apply(&action).await;
            Applied {
                action,
                private_before,
                result,
            }
        });
        self.actions.insert(task.id(), entry);
    }

    /// The next action to finish; `None` when none is running. An action whose task
    /// panicked is forgotten (its session becomes eligible again) and logged.
    async fn next_done(&mut self) -> Option<Applied> {
        loop {
            match self.tasks.join_next_with_id().await? {
                Ok((id, applied)) => {
                    self.actions.remove(&id);
                    return Some(applied);
                }
                Err(error) => {
                    let session = self.actions.remove(&error.id());
                    tracing::error!(
                        session_id = session.as_ref().map_or("", |(id, _)| id.as_str()),
                        %error,
                        "memory policy action panicked"
                    );
                }
            }
        }
    }
}

/// Runs the memory policy every `config.interval` until `shutdown`. Whenever an action
/// finishes, the next observation is taken at once: an action that did not bring a session
/// under its limit escalates without waiting for the next interval. On shutdown, the actions
/// already started finish (each is a session operation that must not stop half-way).
pub async fn run(manager: Arc<impl Supervised>, config: PolicyConfig, shutdown: CancellationToken) {
    let mut state = PolicyState::default();
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = InFlight::default();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            Some(applied) = in_flight.next_done() => {
                let dry_run = applied.action.dry_run;
                finish(&mut state, applied);
                // A dry run changed nothing worth measuring again before the next tick.
                if dry_run {
                    continue;
                }
            }
            _ = shutdown.cancelled() => break,
        }
        let mut observation = manager.observe();
        for sample in &mut observation.sessions {
            if in_flight.acting_on(&sample.session_id) {
                sample.ready = false;
                // The one exception to one action per session: an action waiting for a
                // running step (a purge or recycle takes the session's lock) must not leave
                // that step free to grow past the hard limit. The kill takes no lock.
                if !in_flight.killing(&sample.session_id)
                    && let Some(kill) = hard_limit_kill(sample, &config)
                {
                    debug_assert_eq!(kill.kind, ActionKind::KillAndRestore);
                    in_flight.start(&manager, kill, sample.private_bytes);
                }
            }
        }
        for action in decide(&observation, &config, &mut state, Instant::now()) {
            if !in_flight.admits(&action) {
                continue;
            }
            let private_before = observation
                .sessions
                .iter()
                .find(|s| s.session_id == action.session_id)
                .map_or(0, |s| s.private_bytes);
            in_flight.start(&manager, action, private_before);
        }
    }
    while let Some(applied) = in_flight.next_done().await {
        finish(&mut state, applied);
    }
}

/// Logs what an action achieved and records it for the next decisions.
fn finish(state: &mut PolicyState, applied: Applied) {
    let Applied {
        action,
        private_before,
        result,
    } = applied;
    match result {
        Ok(memory_after) => tracing::info!(
            session_id = %action.session_id,
            trigger = action.trigger.as_str(),
            rung = action.rung,
            dry_run = action.dry_run,
            private_before,
            private_after = memory_after.map(|m| m.private_bytes),
            reason = %action.reason,
            "memory policy acted"
        ),
        Err(error) => tracing::warn!(
            session_id = %action.session_id,
            %error,
            "memory policy action failed"
        ),
    }
    state.record(&action, Instant::now());
}
