//! Memory policy: what to do about sessions' memory, as a pure function of what was observed.
//!
//! `decide(observation, config, state, now)` returns the actions to take; it does no I/O and
//! reads no clock, so every rung of the ladder, cooldown, hysteresis, victim order and dry
//! run is unit-tested with made-up observations and times (`tests.rs`). `PolicyState` is the
//! policy's memory between ticks (what it did to whom and when), owned by the runner
//! (`runner.rs`), which samples, decides, acts, re-measures and records the outcome.
//!
//! The ladder for one session:
//! 1. private memory above its soft limit, between steps → the gentle action (purge or
//!    graph reset, per session);
//! 2. still above after it (measured right after acting), or above again before the session
//!    went back under `rearm_below × soft` → recycle (a fresh worker);
//! 3. above the hard limit → recycle at once; if a step is running, the worker is killed
//!    under it (the step fails with RESOURCE_EXHAUSTED) and the session is restored;
//! 4. more than `max_actions` automatic actions within `action_window` → the session is
//!    marked unhealthy and reported; soft-limit actions stop for it (the hard limit stays).
//!
//! System pressure (available memory below a floor, or PSI above a threshold for a while)
//! picks one victim per tick: sessions over their own soft limit first, then idle ones before
//! running ones, then the longest idle, then the largest.
//!
//! GPU memory has rules of its own (`gpu.rs`): a GPU-limit breach goes straight to a
//! recycle, since no in-process reset gives a framework's GPU pool back; a device short of
//! free memory picks a victim among the sessions on it.

pub mod config;
mod gpu;
mod runner;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use gpu::GpuDeviceSample;
pub use runner::{Supervised, run};

/// What the gentle rung does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GentleAction {
    PurgeVariables,
    ResetGraph,
}

/// What idle culling does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    Close,
    /// Recycle into a fresh worker, keeping the graph (and variables if the session asked).
    Recycle,
}

/// System-pressure thresholds; each is off when `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PressureConfig {
    /// Pressure when available memory is below this many bytes.
    pub min_available_bytes: Option<u64>,
    /// Pressure when PSI `some avg10` (percent) stays above this for `psi_duration`.
    pub psi_some_avg10: Option<f64>,
    pub psi_duration: Duration,
    /// GPU pressure when a device's free memory is below this many bytes.
    pub min_gpu_free_bytes: Option<u64>,
}

/// The policy's configuration (validated; see `config.rs` for the TOML keys).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub interval: Duration,
    pub dry_run: bool,
    /// Defaults for sessions that do not set their own.
    pub soft_limit_bytes: Option<u64>,
    pub hard_limit_bytes: Option<u64>,
    /// Ceilings for limits a session asks for at CreateSession.
    pub max_soft_limit_bytes: Option<u64>,
    pub max_hard_limit_bytes: Option<u64>,
    /// GPU memory limits (summed over a session's devices): defaults and ceilings, as for
    /// host memory; off unless configured.
    pub gpu_soft_limit_bytes: Option<u64>,
    pub gpu_hard_limit_bytes: Option<u64>,
    pub max_gpu_soft_limit_bytes: Option<u64>,
    pub max_gpu_hard_limit_bytes: Option<u64>,
    pub gentle_action: GentleAction,
    /// After an action on a session, no new soft-limit episode starts for this long.
    pub cooldown: Duration,
    /// A session is re-armed (the ladder starts again at the gentle rung) only once its
    /// memory has been below `rearm_below × soft limit`.
    pub rearm_below: f64,
    pub max_actions: usize,
    pub action_window: Duration,
    pub pressure: PressureConfig,
    pub idle_timeout: Option<Duration>,
    pub idle_action: IdleAction,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            interval: Duration::from_millis(250),
            dry_run: false,
            soft_limit_bytes: None,
            hard_limit_bytes: None,
            max_soft_limit_bytes: None,
            max_hard_limit_bytes: None,
            gpu_soft_limit_bytes: None,
            gpu_hard_limit_bytes: None,
            max_gpu_soft_limit_bytes: None,
            max_gpu_hard_limit_bytes: None,
            gentle_action: GentleAction::PurgeVariables,
            cooldown: Duration::from_secs(30),
            rearm_below: 0.9,
            max_actions: 5,
            action_window: Duration::from_secs(600),
            pressure: PressureConfig::default(),
            idle_timeout: None,
            idle_action: IdleAction::Recycle,
        }
    }
}

/// A session's own policy, from CreateSession, already clamped to the operator's maxima.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionPolicy {
    pub soft_limit_bytes: Option<u64>,
    pub hard_limit_bytes: Option<u64>,
    pub gentle_action: Option<GentleAction>,
    /// Carry variables over when the policy recycles this session.
    pub preserve_variables: bool,
    /// GPU memory limits, summed over the session's devices.
    pub gpu_soft_limit_bytes: Option<u64>,
    pub gpu_hard_limit_bytes: Option<u64>,
}

impl PolicyConfig {
    /// The limits that apply to a session asking for `requested`: its own where set, the
    /// defaults otherwise, each capped by the operator's maximum.
    pub fn effective(&self, requested: SessionPolicy) -> SessionPolicy {
        let cap = |value: Option<u64>, max: Option<u64>| match (value, max) {
            (Some(value), Some(max)) => Some(value.min(max)),
            (value, _) => value,
        };
        SessionPolicy {
            soft_limit_bytes: cap(
                requested.soft_limit_bytes.or(self.soft_limit_bytes),
                self.max_soft_limit_bytes,
            ),
            hard_limit_bytes: cap(
                requested.hard_limit_bytes.or(self.hard_limit_bytes),
                self.max_hard_limit_bytes,
            ),
            gentle_action: Some(requested.gentle_action.unwrap_or(self.gentle_action)),
            preserve_variables: requested.preserve_variables,
            gpu_soft_limit_bytes: cap(
                requested.gpu_soft_limit_bytes.or(self.gpu_soft_limit_bytes),
                self.max_gpu_soft_limit_bytes,
            ),
            gpu_hard_limit_bytes: cap(
                requested.gpu_hard_limit_bytes.or(self.gpu_hard_limit_bytes),
                self.max_gpu_hard_limit_bytes,
            ),
        }
    }

    /// A stored session's policy with today's GPU limits: the session store keeps the host
    /// limits it was created with, not GPU limits, so a session brought back after a restart
    /// gets the configured GPU defaults.
    pub fn with_gpu_defaults(&self, stored: SessionPolicy) -> SessionPolicy {
        let defaults = self.effective(SessionPolicy::default());
        SessionPolicy {
            gpu_soft_limit_bytes: defaults.gpu_soft_limit_bytes,
            gpu_hard_limit_bytes: defaults.gpu_hard_limit_bytes,
            ..stored
        }
    }
}

/// One session as sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSample {
    pub session_id: String,
    pub worker_pid: u32,
    pub private_bytes: u64,
    pub policy: SessionPolicy,
    pub runs_in_flight: u32,
    pub idle_for: Duration,
    /// Sessions whose worker is being replaced are left alone this tick.
    pub ready: bool,
    /// GPU memory of the worker's processes per device; empty without GPUs.
    pub gpu: Vec<crate::gpu::GpuUsage>,
}

/// The machine as sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SystemSample {
    pub available_bytes: u64,
    pub psi_some_avg10: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub sessions: Vec<SessionSample>,
    pub system: SystemSample,
    /// Every GPU's free memory; empty without an NVIDIA driver.
    pub gpus: Vec<GpuDeviceSample>,
}

/// Why the policy acts; reported on events as `trigger`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    SoftLimit,
    HardLimit,
    SystemPressure,
    Idle,
    /// The session's GPU memory, summed over its devices, above its GPU soft limit.
    GpuSoftLimit,
    /// ... above its GPU hard limit.
    GpuHardLimit,
    /// A device's free memory below `pressure.min_gpu_free`.
    GpuPressure,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::SoftLimit => "soft_limit",
            Trigger::HardLimit => "hard_limit",
            Trigger::SystemPressure => "system_pressure",
            Trigger::Idle => "idle",
            Trigger::GpuSoftLimit => "gpu_soft_limit",
            Trigger::GpuHardLimit => "gpu_hard_limit",
            Trigger::GpuPressure => "gpu_pressure",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Gentle(GentleAction),
    /// A fresh worker; `preserve_variables` as the session asked.
    Recycle {
        preserve_variables: bool,
    },
    /// Kill the worker under its running step; the session is restored in a fresh worker.
    KillAndRestore,
    Close,
    /// Too many actions: report, stop soft-limit actions.
    MarkUnhealthy,
}

/// One thing to do, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub session_id: String,
    pub worker_pid: u32,
    pub kind: ActionKind,
    pub trigger: Trigger,
    /// Rung of the ladder: 1 gentle, 2 recycle, 3 hard limit.
    pub rung: u32,
    /// A sentence for events and logs: the limit and the measured figure.
    pub reason: String,
    /// Decide and report only.
    pub dry_run: bool,
}

/// What happened to one session, from the policy's point of view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionHistory {
    /// Times of automatic actions, for the unhealthy window.
    pub actions: Vec<Instant>,
    pub last_action: Option<Instant>,
    /// The rung of the last soft-limit action in the current episode (0 = armed).
    pub rung: u32,
    pub unhealthy: bool,
    /// The idle period already culled (an idle recycle happens once per idle period).
    pub idle_handled: bool,
}

/// The policy's memory between ticks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyState {
    pub sessions: HashMap<String, SessionHistory>,
    /// Since when PSI has been above its threshold.
    pub psi_above_since: Option<Instant>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl PolicyState {
    /// Records that `action` was taken (or, in dry run, reported) at `now`. Whether it
    /// brought memory down shows in the next observation: the ladder escalates from the
    /// rung recorded here if the session is still over its limit.
    pub fn record(&mut self, action: &Action, now: Instant) {
        let history = self.sessions.entry(action.session_id.clone()).or_default();
        match action.kind {
            ActionKind::MarkUnhealthy => {
                history.unhealthy = true;
                return;
            }
            ActionKind::Close => {
                self.sessions.remove(&action.session_id);
                return;
            }
            _ => {}
        }
        history.actions.push(now);
        history.last_action = Some(now);
        if action.trigger == Trigger::Idle {
            history.idle_handled = true;
        }
        if action.trigger == Trigger::SoftLimit {
            history.rung = action.rung;
        }
        // A recycle for the GPU gives host memory back too: the host ladder starts over.
        if matches!(
            action.trigger,
            Trigger::GpuSoftLimit | Trigger::GpuHardLimit
        ) {
            history.rung = 0;
        }
    }
}

/// Decides what to do now. Deterministic: same inputs, same actions. Updates `state` only
/// for what it observes (re-arming, PSI timing, forgetting closed sessions); what actions
/// achieve is recorded by the caller through `PolicyState::record`.
/// The hard limit's kill for a session whose step is running past it, or `None`: what the
/// runner still starts for a session with another action in flight (a purge or recycle
/// waiting behind that very step must not leave the step free to grow past the limit).
pub fn hard_limit_kill(sample: &SessionSample, config: &PolicyConfig) -> Option<Action> {
    if sample.runs_in_flight > 0
        && let Some(mut action) = gpu::hard_limit(sample)
    {
        action.dry_run = config.dry_run;
        return Some(action);
    }
    let hard = sample.policy.hard_limit_bytes?;
    if sample.private_bytes <= hard || sample.runs_in_flight == 0 {
        return None;
    }
    Some(Action {
        session_id: sample.session_id.clone(),
        worker_pid: sample.worker_pid,
        kind: ActionKind::KillAndRestore,
        trigger: Trigger::HardLimit,
        rung: 3,
        reason: format!(
            "private memory {} is over the hard limit {}: killing the worker under its running \
             step",
            mib(sample.private_bytes),
            mib(hard)
        ),
        dry_run: config.dry_run,
    })
}

pub fn decide(
    observation: &Observation,
    config: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
) -> Vec<Action> {
    let live: std::collections::HashSet<&str> = observation
        .sessions
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    state.sessions.retain(|id, _| live.contains(id.as_str()));

    let mut actions = Vec::new();
    for sample in observation.sessions.iter().filter(|s| s.ready) {
        let history = state.sessions.entry(sample.session_id.clone()).or_default();
        history
            .actions
            .retain(|at| now.saturating_duration_since(*at) < config.action_window);
        if let Some(action) = decide_session(sample, config, history, now) {
            actions.push(action);
        }
    }

    // Under pressure, one action at a time: a session's own ladder (which already acts on
    // sessions over their budget, the first victims anyway) goes first.
    let pressure = decide_pressure(observation, config, state, now)
        .or_else(|| gpu::pressure(observation, config, state, now));
    if actions.is_empty()
        && let Some(action) = pressure
    {
        actions.push(action);
    }
    for action in &mut actions {
        action.dry_run = config.dry_run;
    }
    actions
}

fn decide_session(
    sample: &SessionSample,
    config: &PolicyConfig,
    history: &mut SessionHistory,
    now: Instant,
) -> Option<Action> {
    let action = |kind, trigger, rung, reason: String| Action {
        session_id: sample.session_id.clone(),
        worker_pid: sample.worker_pid,
        kind,
        trigger,
        rung,
        reason,
        dry_run: false,
    };
    let private = sample.private_bytes;
    let recycle = ActionKind::Recycle {
        preserve_variables: sample.policy.preserve_variables,
    };

    // Rung 3: the hard limit, always enforced, even for an unhealthy session.
    if let Some(hard) = sample.policy.hard_limit_bytes
        && private > hard
    {
        let (kind, how) = if sample.runs_in_flight > 0 {
            (
                ActionKind::KillAndRestore,
                "killing the worker under its running step",
            )
        } else {
            (recycle, "recycling")
        };
        return Some(action(
            kind,
            Trigger::HardLimit,
            3,
            format!(
                "private memory {} is over the hard limit {}: {how}",
                mib(private),
                mib(hard)
            ),
        ));
    }

    // The GPU hard limit, always enforced too. A fresh worker can be over it from the start
    // (a framework's per-device context, GPU tensors carried over by a preserving recycle):
    // recycling it again would go on forever, so after `max_actions` actions within the
    // window the session is closed, which is the one way left to hold the limit.
    if let Some(mut action) = gpu::hard_limit(sample) {
        if history.actions.len() >= config.max_actions
            && !matches!(action.kind, ActionKind::KillAndRestore)
        {
            action.kind = ActionKind::Close;
            action.reason = format!(
                "{}; {} automatic actions within {:?} did not bring it under the limit (a \
                 fresh worker is over it from the start): closing the session",
                action.reason,
                history.actions.len(),
                config.action_window
            );
        }
        return Some(action);
    }

    let soft = sample.policy.soft_limit_bytes;
    if let Some(soft) = soft {
        // Hysteresis: the ladder starts again only once memory went well under the limit.
        if (private as f64) < soft as f64 * config.rearm_below {
            history.rung = 0;
        }
        if private > soft && !history.unhealthy {
            if history.actions.len() >= config.max_actions {
                return Some(action(
                    ActionKind::MarkUnhealthy,
                    Trigger::SoftLimit,
                    history.rung,
                    format!(
                        "{} automatic actions within {:?} and private memory {} is still over \
                         the soft limit {}: marked unhealthy, no more soft-limit actions",
                        history.actions.len(),
                        config.action_window,
                        mib(private),
                        mib(soft)
                    ),
                ));
            }
            // A step is running: the soft rungs wait for the gap between steps.
            if sample.runs_in_flight > 0 {
                return None;
            }
            let in_cooldown = history
                .last_action
                .is_some_and(|at| now.saturating_duration_since(at) < config.cooldown);
            let over = format!(
                "private memory {} is over the soft limit {}",
                mib(private),
                mib(soft)
            );
            match history.rung {
                // Armed: start gently, unless we acted very recently.
                0 if !in_cooldown => {
                    let gentle = sample.policy.gentle_action.unwrap_or(config.gentle_action);
                    return Some(action(
                        ActionKind::Gentle(gentle),
                        Trigger::SoftLimit,
                        1,
                        over,
                    ));
                }
                // The gentle rung did not bring it under, or it is over again before
                // re-arming: escalate now; cooldown does not delay an escalation.
                1 => {
                    return Some(action(
                        recycle,
                        Trigger::SoftLimit,
                        2,
                        format!("{over} after the gentle action: recycling"),
                    ));
                }
                // Recycled and over again: only after the cooldown, and then recycle again.
                _ if !in_cooldown => {
                    return Some(action(
                        recycle,
                        Trigger::SoftLimit,
                        2,
                        format!("{over} again: recycling"),
                    ));
                }
                _ => {}
            }
        }
    }

    if let Some(action) = gpu::soft_limit(sample, config, history, now) {
        return Some(action);
    }

    if let Some(timeout) = config.idle_timeout {
        if sample.idle_for < timeout {
            history.idle_handled = false;
        } else if sample.runs_in_flight == 0 && !history.idle_handled {
            let kind = match config.idle_action {
                IdleAction::Close => ActionKind::Close,
                IdleAction::Recycle => recycle,
            };
            return Some(action(
                kind,
                Trigger::Idle,
                0,
                format!(
                    "idle for {:?} (timeout {:?})",
                    round(sample.idle_for),
                    timeout
                ),
            ));
        }
    }
    None
}

fn round(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

/// One victim per tick while the machine is under pressure.
fn decide_pressure(
    observation: &Observation,
    config: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
) -> Option<Action> {
    let pressure = &config.pressure;
    let low_memory = pressure
        .min_available_bytes
        .is_some_and(|floor| observation.system.available_bytes < floor);
    let psi_high = match (pressure.psi_some_avg10, observation.system.psi_some_avg10) {
        (Some(threshold), Some(psi)) if psi > threshold => {
            let since = *state.psi_above_since.get_or_insert(now);
            now.saturating_duration_since(since) >= pressure.psi_duration
        }
        _ => {
            state.psi_above_since = None;
            false
        }
    };
    if !low_memory && !psi_high {
        return None;
    }
    let why = if low_memory {
        format!(
            "available memory {} is below {}",
            mib(observation.system.available_bytes),
            mib(pressure.min_available_bytes.unwrap_or(0))
        )
    } else {
        format!(
            "memory pressure (PSI some avg10 {:.1}%) above {:.1}% for {:?}",
            observation.system.psi_some_avg10.unwrap_or(0.0),
            pressure.psi_some_avg10.unwrap_or(0.0),
            pressure.psi_duration
        )
    };
    let candidates = observation.sessions.iter().filter(|s| {
        let recently = state
            .sessions
            .get(&s.session_id)
            .and_then(|h| h.last_action);
        s.ready && recently.is_none_or(|at| now.saturating_duration_since(at) >= config.cooldown)
    });
    let victim = candidates.min_by_key(|s| victim_order(s))?;
    Some(Action {
        session_id: victim.session_id.clone(),
        worker_pid: victim.worker_pid,
        kind: ActionKind::Recycle {
            preserve_variables: victim.policy.preserve_variables,
        },
        trigger: Trigger::SystemPressure,
        rung: 2,
        reason: format!(
            "{why}: recycling the session holding {}",
            mib(victim.private_bytes)
        ),
        dry_run: false,
    })
}

/// Sort key for pressure victims, smallest first: over its own budget, then idle (no step
/// running), then longest idle, then largest private memory.
fn victim_order(
    sample: &SessionSample,
) -> (
    bool,
    bool,
    std::cmp::Reverse<Duration>,
    std::cmp::Reverse<u64>,
) {
    let over_budget = sample
        .policy
        .soft_limit_bytes
        .is_some_and(|soft| sample.private_bytes > soft);
    (
        !over_budget,
        sample.runs_in_flight > 0,
        std::cmp::Reverse(sample.idle_for),
        std::cmp::Reverse(sample.private_bytes),
    )
}
