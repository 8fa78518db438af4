//! The loop around the pure policy: sample, decide, act, re-measure, record.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{Action, Observation, PolicyConfig, PolicyState, decide};
use crate::memory::MemoryUsage;

/// What the policy watches and acts on: the sessions. `session::SessionManager` implements
/// it; the policy knows nothing else of them.
pub trait Supervised: Send + Sync + 'static {
    /// Every session's memory and the machine's, now.
    fn observe(&self) -> Observation;
    /// Carries out one action (or, in dry run, reports it); the session's memory after it,
    /// where the action measured it.
    fn apply(
        self: &Arc<Self>,
        action: &Action,
    ) -> impl Future<Output = crate::error::Result<Option<MemoryUsage>>> + Send;
}

/// Runs the memory policy every `config.interval` until `shutdown`. After a tick that acted,
/// the next observation is taken at once: an action that did not bring a session under its
/// limit escalates without waiting for the next interval.
pub async fn run(manager: Arc<impl Supervised>, config: PolicyConfig, shutdown: CancellationToken) {
    let mut state = PolicyState::default();
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acted = false;
    loop {
        if !acted {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let observation = manager.observe();
        let actions = decide(&observation, &config, &mut state, Instant::now());
        acted = actions.iter().any(|action| !action.dry_run);
        for action in actions {
            if shutdown.is_cancelled() {
                return;
            }
            let before = observation
                .sessions
                .iter()
                .find(|s| s.session_id == action.session_id)
                .map_or(0, |s| s.private_bytes);
            match manager.apply(&action).await {
                Ok(memory_after) => tracing::info!(
                    session_id = %action.session_id,
                    trigger = action.trigger.as_str(),
                    rung = action.rung,
                    dry_run = action.dry_run,
                    private_before = before,
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
    }
}
