//! Conversions between tfsd.v1 messages and domain types, in one place.

use std::time::SystemTime;

use prost_types::Timestamp;

use crate::memory::MemoryUsage;
use crate::policy::{GentleAction, SessionPolicy};
use crate::proto::tfsd::v1 as api;
use crate::session::{
    DaemonStatus, EventKind, ResetOutcome, Runtime, SessionEvent, SessionSnapshot, SessionState,
};
use crate::worker::{CallOutcome, CallOutput, CallTarget, OutputStream};

pub fn memory(usage: MemoryUsage) -> api::MemoryUsage {
    api::MemoryUsage {
        rss_bytes: usage.rss_bytes,
        private_bytes: usage.private_bytes,
        cgroup_bytes: usage.cgroup_bytes,
        gpu: usage
            .gpu
            .iter()
            .map(|usage| api::GpuMemoryUsage {
                gpu: usage.gpu,
                used_bytes: usage.used_bytes,
            })
            .collect(),
    }
}

fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from(time)
}

fn state(state: SessionState) -> api::SessionState {
    match state {
        SessionState::Ready => api::SessionState::Ready,
        SessionState::Restoring => api::SessionState::Restoring,
        SessionState::Broken => api::SessionState::Broken,
        SessionState::Closed => api::SessionState::Closed,
    }
}

pub fn session(snapshot: SessionSnapshot) -> api::SessionInfo {
    api::SessionInfo {
        session_id: snapshot.id,
        labels: snapshot.labels.into_iter().collect(),
        state: state(snapshot.state) as i32,
        worker_pid: snapshot.worker_pid,
        memory: Some(memory(snapshot.memory)),
        graph_version: snapshot.graph_version,
        run_count: snapshot.run_count,
        runs_in_flight: snapshot.runs_in_flight,
        graph_reset_count: snapshot.graph_reset_count,
        purge_count: snapshot.purge_count,
        recycle_count: snapshot.recycle_count,
        worker_restart_count: snapshot.worker_restart_count,
        created_at: Some(timestamp(snapshot.created_at)),
        last_used_at: Some(timestamp(snapshot.last_used_at)),
        peak_private_bytes: snapshot.peak_private_bytes,
        memory_policy: Some(memory_policy_to_api(snapshot.policy)),
        unhealthy: snapshot.unhealthy,
        automatic_action_count: snapshot.automatic_action_count,
        owner: snapshot.owner,
        durable_variables: snapshot.durable_variables,
        runtime: runtime(snapshot.runtime) as i32,
        call_count: snapshot.call_count,
        gpus: Some(gpu_placement(&snapshot.gpu_placement)),
    }
}

fn gpu_placement(placement: &crate::gpu::Placement) -> api::GpuPlacement {
    match placement {
        crate::gpu::Placement::All => api::GpuPlacement::default(),
        crate::gpu::Placement::Devices(devices) => api::GpuPlacement {
            none: devices.is_empty(),
            devices: devices.clone(),
        },
    }
}

pub fn runtime(runtime: Runtime) -> api::Runtime {
    match runtime {
        Runtime::Graph => api::Runtime::Graph,
        Runtime::Python => api::Runtime::Python,
    }
}

/// What a Python call runs, from the request; `None` when it names nothing.
pub fn call_target(target: Option<api::call_request::Target>) -> Option<CallTarget> {
    Some(match target? {
        api::call_request::Target::Pickled(pickled) => CallTarget::Pickled(pickled.into()),
        api::call_request::Target::Script(script) => CallTarget::Script {
            path: script.path,
            source: script.source.into(),
            argv: script.argv,
        },
    })
}

pub fn call_output(output: CallOutput) -> api::CallEvent {
    let stream = match output.stream {
        OutputStream::Stdout => api::Stream::Stdout,
        OutputStream::Stderr => api::Stream::Stderr,
    };
    api::CallEvent {
        event: Some(api::call_event::Event::Output(api::Output {
            stream: stream as i32,
            data: output.data.to_vec(),
        })),
    }
}

pub fn call_outcome(outcome: CallOutcome, duration: std::time::Duration) -> api::CallEvent {
    let duration_us = duration.as_micros() as u64;
    let event = match outcome {
        CallOutcome::Returned(pickled) => api::call_event::Event::Result(api::CallResult {
            pickled: pickled.to_vec(),
            exit_code: 0,
            duration_us,
        }),
        CallOutcome::Exited(exit_code) => api::call_event::Event::Result(api::CallResult {
            pickled: Vec::new(),
            exit_code,
            duration_us,
        }),
        CallOutcome::Raised(exception) => api::call_event::Event::Exception(api::RemoteException {
            type_name: exception.type_name,
            message: exception.message,
            traceback: exception.traceback,
        }),
    };
    api::CallEvent { event: Some(event) }
}

fn memory_policy_to_api(policy: SessionPolicy) -> api::MemoryPolicy {
    api::MemoryPolicy {
        soft_limit_bytes: policy.soft_limit_bytes.unwrap_or(0),
        hard_limit_bytes: policy.hard_limit_bytes.unwrap_or(0),
        gentle_action: match policy.gentle_action {
            None => api::GentleAction::Unspecified,
            Some(GentleAction::PurgeVariables) => api::GentleAction::PurgeVariables,
            Some(GentleAction::ResetGraph) => api::GentleAction::ResetGraph,
        } as i32,
        preserve_variables: policy.preserve_variables,
        gpu_soft_limit_bytes: policy.gpu_soft_limit_bytes.unwrap_or(0),
        gpu_hard_limit_bytes: policy.gpu_hard_limit_bytes.unwrap_or(0),
    }
}

/// A client's GPU request; `Err` when it contradicts itself.
pub fn gpu_request(
    placement: Option<api::GpuPlacement>,
) -> Result<crate::gpu::GpuRequest, crate::error::Error> {
    use crate::gpu::GpuRequest;
    Ok(match placement {
        None => GpuRequest::Any,
        Some(api::GpuPlacement {
            devices,
            none: true,
        }) if !devices.is_empty() => {
            return Err(crate::error::Error::InvalidArgument(
                "gpus.none is set and gpus.devices names GPUs: ask for one or the other"
                    .to_string(),
            ));
        }
        Some(api::GpuPlacement { none: true, .. }) => GpuRequest::None,
        Some(api::GpuPlacement { devices, .. }) if devices.is_empty() => GpuRequest::Any,
        Some(api::GpuPlacement { devices, .. }) => GpuRequest::Devices(devices),
    })
}

/// A client's requested memory policy (0 and UNSPECIFIED mean "the daemon's default").
pub fn memory_policy_from_api(policy: Option<api::MemoryPolicy>) -> SessionPolicy {
    let Some(policy) = policy else {
        return SessionPolicy::default();
    };
    let nonzero = |bytes: u64| (bytes > 0).then_some(bytes);
    SessionPolicy {
        soft_limit_bytes: nonzero(policy.soft_limit_bytes),
        hard_limit_bytes: nonzero(policy.hard_limit_bytes),
        gentle_action: match api::GentleAction::try_from(policy.gentle_action) {
            Ok(api::GentleAction::PurgeVariables) => Some(GentleAction::PurgeVariables),
            Ok(api::GentleAction::ResetGraph) => Some(GentleAction::ResetGraph),
            _ => None,
        },
        preserve_variables: policy.preserve_variables,
        gpu_soft_limit_bytes: nonzero(policy.gpu_soft_limit_bytes),
        gpu_hard_limit_bytes: nonzero(policy.gpu_hard_limit_bytes),
    }
}

pub fn reset(outcome: ResetOutcome) -> api::ResetResponse {
    api::ResetResponse {
        session: Some(session(outcome.session)),
        memory_before: Some(memory(outcome.memory_before)),
        memory_after: Some(memory(outcome.memory_after)),
        duration_us: outcome.duration.as_micros() as u64,
        worker_pid_before: outcome.worker_pid_before,
        worker_pid_after: outcome.worker_pid_after,
        variables_preserved: outcome.variables_preserved,
    }
}

fn event_kind(kind: EventKind) -> api::EventKind {
    match kind {
        EventKind::Created => api::EventKind::Created,
        EventKind::Extended => api::EventKind::Extended,
        EventKind::GraphReset => api::EventKind::GraphReset,
        EventKind::VariablesPurged => api::EventKind::VariablesPurged,
        EventKind::Recycled => api::EventKind::Recycled,
        EventKind::WorkerExited => api::EventKind::WorkerExited,
        EventKind::Restored => api::EventKind::Restored,
        EventKind::Closed => api::EventKind::Closed,
        EventKind::Unhealthy => api::EventKind::Unhealthy,
        EventKind::DryRun => api::EventKind::DryRun,
    }
}

pub fn event(event: SessionEvent) -> api::SessionEvent {
    let trigger_name = event.trigger_name().to_string();
    let actor_name = event.actor_name().to_string();
    api::SessionEvent {
        session_id: event.session_id,
        kind: event_kind(event.kind) as i32,
        reason: event.reason,
        worker_pid: event.worker_pid,
        memory_before: event.memory_before.map(memory),
        memory_after: event.memory_after.map(memory),
        graph_version: event.graph_version,
        at: Some(timestamp(event.at)),
        trigger: trigger_name,
        rung: event.rung,
        actor: actor_name,
    }
}

/// The event a subscriber gets in place of the `missed` events it fell too far behind for.
pub fn lagged(missed: u64) -> api::SessionEvent {
    api::SessionEvent {
        kind: api::EventKind::Lagged as i32,
        reason: format!("this subscriber fell behind and missed {missed} events"),
        at: Some(timestamp(SystemTime::now())),
        ..api::SessionEvent::default()
    }
}

pub fn daemon_status(status: DaemonStatus) -> api::DaemonStatus {
    api::DaemonStatus {
        version: status.version.to_string(),
        tensorflow_version: status.tensorflow_version,
        pid: status.pid,
        memory: Some(memory(status.memory)),
        started_at: Some(timestamp(status.started_at)),
        session_count: status.session_count as u32,
        warm_workers: status.warm_workers as u32,
        warm_pool_size: status.warm_pool_size as u32,
        warm_python_workers: status.warm_python_workers as u32,
        warm_python_pool_size: status.warm_python_pool_size as u32,
        python_runtime: status.python_runtime,
        system: Some(api::SystemMemory {
            total_bytes: status.system.total_bytes,
            available_bytes: status.system.available_bytes,
            cgroup_limit_bytes: status.system.cgroup_limit_bytes,
        }),
        draining: status.draining,
        memory_enforcement: status.memory_enforcement,
        sandbox: status.sandbox,
        gpu: status.gpu,
        gpus: status
            .gpus
            .into_iter()
            .map(|device| api::GpuDevice {
                index: device.index,
                name: device.name,
                uuid: device.uuid,
                total_bytes: device.total_bytes,
                used_bytes: device.used_bytes,
                free_bytes: device.free_bytes,
            })
            .collect(),
    }
}
