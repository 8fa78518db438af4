//! The loop around the pure policy: sample, decide, act, re-measure, record.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{PolicyConfig, PolicyState, decide};
use crate::session::SessionManager;

/// Runs the memory policy every `config.interval` until `shutdown`. After a tick that acted,
/// the next observation is taken at once: an action that did not bring a session under its
/// limit escalates without waiting for the next interval.
pub async fn run(manager: Arc<SessionManager>, config: PolicyConfig, shutdown: CancellationToken) {
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
                Ok(outcome) => tracing::info!(
                    session_id = %action.session_id,
                    trigger = action.trigger.as_str(),
                    rung = action.rung,
                    dry_run = action.dry_run,
                    private_before = before,
                    private_after = outcome.memory_after.map(|m| m.private_bytes),
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
