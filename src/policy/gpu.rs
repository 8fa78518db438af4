//! The GPU rules of the policy, pure like the rest of it.
//!
//! TensorFlow's GPU allocator keeps the memory it took for the life of the process (BFC
//! grows its pool and never shrinks it, with or without `allow_growth`; NVML keeps reporting
//! the pool after a graph reset or `clear_session()`), and so do PyTorch's caching allocator
//! and CuPy's pool unless the code empties them. The gentle rung (purge, graph reset) would
//! run and give nothing back, so a session over a GPU limit goes straight to a recycle: only
//! a fresh process returns its GPU memory to the device.
//! - over `gpu_hard_limit` (summed over its devices) → recycle at once; a running step is
//!   killed under it (rung 3);
//! - over `gpu_soft_limit`, between steps → recycle (rung 2), at most once per cooldown;
//!   counted toward `max_actions` like the host soft limit;
//! - a device's free memory below `pressure.min_gpu_free` → one victim per tick among the
//!   sessions holding memory on that device: over their own GPU soft limit first, then idle
//!   before running, then the longest idle, then the largest on that device.

use std::time::{Duration, Instant};

use super::{Action, ActionKind, Observation, PolicyConfig, PolicyState, SessionHistory};
use super::{SessionSample, Trigger};
use crate::gpu::GpuUsage;

/// One device as the policy sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuDeviceSample {
    /// NVML's index.
    pub gpu: u32,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

const WHY_RECYCLE: &str = "a reset cannot return GPU memory (the framework's allocator keeps \
                           its pool until the process exits)";

fn mib(bytes: u64) -> String {
    super::mib(bytes)
}

/// The session's GPU memory summed over devices, and per device in words.
fn held(usage: &[GpuUsage]) -> (u64, String) {
    let total = crate::gpu::attribution::total(usage);
    let per_device: Vec<String> = usage
        .iter()
        .map(|u| format!("GPU {} {}", u.gpu, mib(u.used_bytes)))
        .collect();
    (total, per_device.join(", "))
}

/// The GPU hard limit's action for `sample`, if it is over.
pub(super) fn hard_limit(sample: &SessionSample) -> Option<Action> {
    let hard = sample.policy.gpu_hard_limit_bytes?;
    let (total, devices) = held(&sample.gpu);
    if total <= hard {
        return None;
    }
    let (kind, how) = if sample.runs_in_flight > 0 {
        (
            ActionKind::KillAndRestore,
            "killing the worker under its running step",
        )
    } else {
        (
            ActionKind::Recycle {
                preserve_variables: sample.policy.preserve_variables,
            },
            "recycling",
        )
    };
    Some(Action {
        session_id: sample.session_id.clone(),
        worker_pid: sample.worker_pid,
        kind,
        trigger: Trigger::GpuHardLimit,
        rung: 3,
        reason: format!(
            "GPU memory {} ({devices}) is over the GPU hard limit {}: {how}, since {WHY_RECYCLE}",
            mib(total),
            mib(hard)
        ),
        dry_run: false,
    })
}

/// The GPU soft limit's action for `sample`, if it is over and may act now.
pub(super) fn soft_limit(
    sample: &SessionSample,
    config: &PolicyConfig,
    history: &SessionHistory,
    now: Instant,
) -> Option<Action> {
    let soft = sample.policy.gpu_soft_limit_bytes?;
    let (total, devices) = held(&sample.gpu);
    if total <= soft || history.unhealthy {
        return None;
    }
    let over = format!(
        "GPU memory {} ({devices}) is over the GPU soft limit {}",
        mib(total),
        mib(soft)
    );
    let action = |kind, rung, reason| Action {
        session_id: sample.session_id.clone(),
        worker_pid: sample.worker_pid,
        kind,
        trigger: Trigger::GpuSoftLimit,
        rung,
        reason,
        dry_run: false,
    };
    if history.actions.len() >= config.max_actions {
        return Some(action(
            ActionKind::MarkUnhealthy,
            2,
            format!(
                "{} automatic actions within {:?} and {over}: marked unhealthy, no more \
                 soft-limit actions",
                history.actions.len(),
                config.action_window
            ),
        ));
    }
    if sample.runs_in_flight > 0 {
        return None;
    }
    let in_cooldown = history
        .last_action
        .is_some_and(|at| now.saturating_duration_since(at) < config.cooldown);
    if in_cooldown {
        return None;
    }
    Some(action(
        ActionKind::Recycle {
            preserve_variables: sample.policy.preserve_variables,
        },
        2,
        format!("{over}: recycling, since {WHY_RECYCLE}"),
    ))
}

/// One victim for the first device whose free memory is below `pressure.min_gpu_free`.
pub(super) fn pressure(
    observation: &Observation,
    config: &PolicyConfig,
    state: &PolicyState,
    now: Instant,
) -> Option<Action> {
    let floor = config.pressure.min_gpu_free_bytes?;
    for device in observation.gpus.iter().filter(|d| d.free_bytes < floor) {
        let on_device = |sample: &SessionSample| {
            sample
                .gpu
                .iter()
                .find(|u| u.gpu == device.gpu)
                .map_or(0, |u| u.used_bytes)
        };
        let victim = observation
            .sessions
            .iter()
            .filter(|s| s.ready && on_device(s) > 0)
            .filter(|s| {
                let last = state
                    .sessions
                    .get(&s.session_id)
                    .and_then(|h| h.last_action);
                last.is_none_or(|at| now.saturating_duration_since(at) >= config.cooldown)
            })
            .min_by_key(|s| victim_order(s, on_device(s)));
        let Some(victim) = victim else {
            continue;
        };
        return Some(Action {
            session_id: victim.session_id.clone(),
            worker_pid: victim.worker_pid,
            kind: ActionKind::Recycle {
                preserve_variables: victim.policy.preserve_variables,
            },
            trigger: Trigger::GpuPressure,
            rung: 2,
            reason: format!(
                "GPU {} has {} free, below {} (policy.pressure.min_gpu_free): recycling the \
                 session holding {} on it, since {WHY_RECYCLE}",
                device.gpu,
                mib(device.free_bytes),
                mib(floor),
                mib(on_device(victim))
            ),
            dry_run: false,
        });
    }
    None
}

/// Sort key for GPU pressure victims, smallest first.
fn victim_order(
    sample: &SessionSample,
    on_device: u64,
) -> (
    bool,
    bool,
    std::cmp::Reverse<Duration>,
    std::cmp::Reverse<u64>,
) {
    let over_budget = sample
        .policy
        .gpu_soft_limit_bytes
        .is_some_and(|soft| crate::gpu::attribution::total(&sample.gpu) > soft);
    (
        !over_budget,
        sample.runs_in_flight > 0,
        std::cmp::Reverse(sample.idle_for),
        std::cmp::Reverse(on_device),
    )
}
