//! What each command reports, as plain structs: the `--json` documents (stable snake_case
//! keys, sizes in bytes, durations in integer units) and the input of the human renderers.
//!
//! They are built from the tfsd.v1 messages here, in one place, and deliberately do not
//! mirror the prost types: enums become lowercase names, absent values become `null`, and
//! a new proto field changes nothing until it is added here on purpose.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use crate::proto::tfsd::v1 as api;

/// A point in time, printed as RFC 3339 UTC with milliseconds in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time(pub SystemTime);

impl Time {
    fn from_proto(timestamp: Option<&prost_types::Timestamp>) -> Option<Time> {
        timestamp
            .and_then(|timestamp| SystemTime::try_from(*timestamp).ok())
            .map(Time)
    }

    /// How long ago, clamped at zero when the daemon's clock is ahead of ours.
    pub fn elapsed_at(self, now: SystemTime) -> Duration {
        now.duration_since(self.0).unwrap_or(Duration::ZERO)
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    pub rss_bytes: u64,
    pub private_bytes: u64,
    /// Charged to the worker's cgroup; `None` without one.
    pub cgroup_bytes: Option<u64>,
    /// GPU memory of the worker's processes, summed over devices; `None` when NVML lists
    /// none of them (or the host has no NVIDIA driver).
    pub gpu_bytes: Option<u64>,
}

/// One device's share of a session's GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuMemoryReport {
    /// NVML's (nvidia-smi's) device index.
    pub gpu: u32,
    pub used_bytes: u64,
}

impl GpuMemoryReport {
    fn from_proto(memory: Option<&api::MemoryUsage>) -> Vec<GpuMemoryReport> {
        memory.map_or_else(Vec::new, |memory| {
            memory
                .gpu
                .iter()
                .map(|usage| GpuMemoryReport {
                    gpu: usage.gpu,
                    used_bytes: usage.used_bytes,
                })
                .collect()
        })
    }
}

/// One GPU of the host, as `tfsd status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuDeviceReport {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

impl MemoryReport {
    fn from_proto(memory: Option<&api::MemoryUsage>) -> Option<MemoryReport> {
        memory.map(|memory| MemoryReport {
            rss_bytes: memory.rss_bytes,
            private_bytes: memory.private_bytes,
            cgroup_bytes: Some(memory.cgroup_bytes).filter(|bytes| *bytes > 0),
            gpu_bytes: (!memory.gpu.is_empty())
                .then(|| memory.gpu.iter().map(|usage| usage.used_bytes).sum()),
        })
    }
}

/// `tfsd status`.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonStatusReport {
    pub address: String,
    pub version: String,
    /// `None` until a worker has started and reported it.
    pub tensorflow_version: Option<String>,
    pub pid: u32,
    pub started_at: Option<Time>,
    pub uptime_ms: Option<u64>,
    /// The supervisor's own memory.
    pub memory: Option<MemoryReport>,
    pub session_count: u32,
    pub warm_workers: u32,
    pub warm_pool_size: u32,
    /// Python sessions' pool; `None` when Python sessions are not configured.
    pub python: Option<PythonPoolReport>,
    pub system: Option<SystemMemoryReport>,
    pub draining: bool,
    /// What holds workers to their hard limits ("cgroup v1: …", "rlimit: …").
    pub memory_enforcement: String,
    /// The workers' sandbox, or "off".
    pub sandbox: String,
    /// The GPUs the daemon sees through NVML, or why none ("no NVIDIA driver (…)").
    pub gpu: String,
    pub gpus: Vec<GpuDeviceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PythonPoolReport {
    pub warm_workers: u32,
    pub warm_pool_size: u32,
    /// What the workers run ("python 3.11.2, tensorflow 2.21.0, keras 3.15.1"); `None`
    /// until one has started.
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SystemMemoryReport {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// `None` when the daemon runs under no cgroup memory limit.
    pub cgroup_limit_bytes: Option<u64>,
}

impl DaemonStatusReport {
    pub fn new(address: String, status: &api::DaemonStatus, now: SystemTime) -> Self {
        let started_at = Time::from_proto(status.started_at.as_ref());
        DaemonStatusReport {
            address,
            version: status.version.clone(),
            tensorflow_version: Some(status.tensorflow_version.clone())
                .filter(|version| !version.is_empty()),
            pid: status.pid,
            started_at,
            uptime_ms: started_at.map(|time| millis(time.elapsed_at(now))),
            memory: MemoryReport::from_proto(status.memory.as_ref()),
            session_count: status.session_count,
            warm_workers: status.warm_workers,
            warm_pool_size: status.warm_pool_size,
            python: (status.warm_python_pool_size > 0).then(|| PythonPoolReport {
                warm_workers: status.warm_python_workers,
                warm_pool_size: status.warm_python_pool_size,
                runtime: Some(status.python_runtime.clone()).filter(|text| !text.is_empty()),
            }),
            system: status.system.as_ref().map(|system| SystemMemoryReport {
                total_bytes: system.total_bytes,
                available_bytes: system.available_bytes,
                cgroup_limit_bytes: Some(system.cgroup_limit_bytes).filter(|limit| *limit > 0),
            }),
            draining: status.draining,
            memory_enforcement: status.memory_enforcement.clone(),
            sandbox: status.sandbox.clone(),
            gpu: status.gpu.clone(),
            gpus: status
                .gpus
                .iter()
                .map(|device| GpuDeviceReport {
                    index: device.index,
                    name: device.name.clone(),
                    uuid: device.uuid.clone(),
                    total_bytes: device.total_bytes,
                    used_bytes: device.used_bytes,
                    free_bytes: device.free_bytes,
                })
                .collect(),
        }
    }
}

/// `tfsd show`, one row of `tfsd sessions`, and the session after a reset.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub session_id: String,
    /// "graph" or "python".
    pub runtime: String,
    pub state: String,
    pub worker_pid: u32,
    pub memory: Option<MemoryReport>,
    /// GPU memory per device (empty when the session holds none, or without a driver).
    pub gpu: Vec<GpuMemoryReport>,
    /// The GPUs its worker sees: device indices (`[]`: none), or `null`: every GPU the
    /// daemon sees.
    pub gpus: Option<Vec<u32>>,
    pub graph_version: u64,
    pub run_count: u64,
    /// Python sessions: calls made.
    pub call_count: u64,
    pub runs_in_flight: u32,
    pub graph_reset_count: u64,
    pub purge_count: u64,
    pub recycle_count: u64,
    pub worker_restart_count: u64,
    pub created_at: Option<Time>,
    pub last_used_at: Option<Time>,
    /// Time since the last call that used the session, as of the command.
    pub idle_ms: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// The highest private memory the daemon's sampler has seen.
    pub peak_private_bytes: u64,
    /// The effective memory limits; `null` when none applies.
    pub soft_limit_bytes: Option<u64>,
    pub hard_limit_bytes: Option<u64>,
    pub unhealthy: bool,
    pub automatic_action_count: u64,
}

impl SessionReport {
    pub fn new(session: &api::SessionInfo, now: SystemTime) -> Self {
        let last_used_at = Time::from_proto(session.last_used_at.as_ref());
        SessionReport {
            session_id: session.session_id.clone(),
            runtime: runtime_name(session.runtime),
            state: state_name(session.state),
            worker_pid: session.worker_pid,
            memory: MemoryReport::from_proto(session.memory.as_ref()),
            gpu: GpuMemoryReport::from_proto(session.memory.as_ref()),
            gpus: match &session.gpus {
                Some(placement) if placement.none => Some(Vec::new()),
                Some(placement) if !placement.devices.is_empty() => Some(placement.devices.clone()),
                _ => None,
            },
            graph_version: session.graph_version,
            run_count: session.run_count,
            call_count: session.call_count,
            runs_in_flight: session.runs_in_flight,
            graph_reset_count: session.graph_reset_count,
            purge_count: session.purge_count,
            recycle_count: session.recycle_count,
            worker_restart_count: session.worker_restart_count,
            created_at: Time::from_proto(session.created_at.as_ref()),
            last_used_at,
            idle_ms: last_used_at.map(|time| millis(time.elapsed_at(now))),
            labels: session
                .labels
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            peak_private_bytes: session.peak_private_bytes,
            soft_limit_bytes: session
                .memory_policy
                .as_ref()
                .map(|p| p.soft_limit_bytes)
                .filter(|b| *b > 0),
            hard_limit_bytes: session
                .memory_policy
                .as_ref()
                .map(|p| p.hard_limit_bytes)
                .filter(|b| *b > 0),
            unhealthy: session.unhealthy,
            automatic_action_count: session.automatic_action_count,
        }
    }
}

/// `tfsd sessions`: oldest first, so that the order is stable from one call to the next.
#[derive(Debug, Clone, Serialize)]
pub struct SessionListReport {
    pub sessions: Vec<SessionReport>,
}

impl SessionListReport {
    pub fn new(sessions: &[api::SessionInfo], now: SystemTime) -> Self {
        let mut sessions: Vec<SessionReport> = sessions
            .iter()
            .map(|session| SessionReport::new(session, now))
            .collect();
        sessions.sort_by(|a, b| {
            (a.created_at.map(|time| time.0), &a.session_id)
                .cmp(&(b.created_at.map(|time| time.0), &b.session_id))
        });
        SessionListReport { sessions }
    }
}

/// Which reset a command asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetOperation {
    ResetGraph,
    Purge,
    Recycle,
}

/// `tfsd reset-graph`, `purge` and `recycle`: what the reset did.
#[derive(Debug, Clone, Serialize)]
pub struct ResetReport {
    pub operation: ResetOperation,
    pub session_id: String,
    pub duration_us: u64,
    pub worker_pid_before: u32,
    pub worker_pid_after: u32,
    pub memory_before: Option<MemoryReport>,
    pub memory_after: Option<MemoryReport>,
    pub variables_preserved: u32,
    /// The session as it is after the reset.
    pub session: Option<SessionReport>,
}

impl ResetReport {
    pub fn new(
        operation: ResetOperation,
        session_id: &str,
        response: &api::ResetResponse,
        now: SystemTime,
    ) -> Self {
        ResetReport {
            operation,
            session_id: session_id.to_string(),
            duration_us: response.duration_us,
            worker_pid_before: response.worker_pid_before,
            worker_pid_after: response.worker_pid_after,
            memory_before: MemoryReport::from_proto(response.memory_before.as_ref()),
            memory_after: MemoryReport::from_proto(response.memory_after.as_ref()),
            variables_preserved: response.variables_preserved,
            session: response
                .session
                .as_ref()
                .map(|session| SessionReport::new(session, now)),
        }
    }
}

/// `tfsd close`.
#[derive(Debug, Clone, Serialize)]
pub struct CloseReport {
    pub session_id: String,
    pub closed: bool,
}

/// One line of `tfsd watch`.
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    pub at: Option<Time>,
    pub kind: String,
    /// `None` for events about the stream itself (lagged).
    pub session_id: Option<String>,
    pub worker_pid: Option<u32>,
    pub reason: Option<String>,
    pub graph_version: u64,
    pub memory_before: Option<MemoryReport>,
    pub memory_after: Option<MemoryReport>,
    /// "client", or the memory policy's trigger ("soft_limit", "hard_limit", ...).
    pub trigger: Option<String>,
    /// The memory policy's rung (1 gentle, 2 recycle, 3 hard limit); 0 otherwise.
    pub rung: u32,
}

impl EventReport {
    pub fn new(event: &api::SessionEvent) -> Self {
        EventReport {
            at: Time::from_proto(event.at.as_ref()),
            kind: event_kind_name(event.kind),
            session_id: Some(event.session_id.clone()).filter(|id| !id.is_empty()),
            worker_pid: Some(event.worker_pid).filter(|pid| *pid != 0),
            reason: Some(event.reason.clone()).filter(|reason| !reason.is_empty()),
            graph_version: event.graph_version,
            memory_before: MemoryReport::from_proto(event.memory_before.as_ref()),
            memory_after: MemoryReport::from_proto(event.memory_after.as_ref()),
            trigger: Some(event.trigger.clone()).filter(|trigger| !trigger.is_empty()),
            rung: event.rung,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The proto enum's value name without its prefix, in lowercase ("ready"); a value this
/// CLI does not know (a newer daemon) stays visible as "unknown(N)".
fn runtime_name(value: i32) -> String {
    match api::Runtime::try_from(value) {
        Ok(api::Runtime::Unspecified | api::Runtime::Graph) => "graph".into(),
        Ok(api::Runtime::Python) => "python".into(),
        Err(_) => format!("unknown({value})"),
    }
}

fn state_name(value: i32) -> String {
    match api::SessionState::try_from(value) {
        Ok(api::SessionState::Unspecified) => "unspecified".into(),
        Ok(api::SessionState::Ready) => "ready".into(),
        Ok(api::SessionState::Restoring) => "restoring".into(),
        Ok(api::SessionState::Broken) => "broken".into(),
        Ok(api::SessionState::Closed) => "closed".into(),
        Err(_) => format!("unknown({value})"),
    }
}

fn event_kind_name(value: i32) -> String {
    match api::EventKind::try_from(value) {
        Ok(api::EventKind::Unspecified) => "unspecified".into(),
        Ok(api::EventKind::Created) => "created".into(),
        Ok(api::EventKind::Extended) => "extended".into(),
        Ok(api::EventKind::GraphReset) => "graph_reset".into(),
        Ok(api::EventKind::VariablesPurged) => "variables_purged".into(),
        Ok(api::EventKind::Recycled) => "recycled".into(),
        Ok(api::EventKind::WorkerExited) => "worker_exited".into(),
        Ok(api::EventKind::Restored) => "restored".into(),
        Ok(api::EventKind::Closed) => "closed".into(),
        Ok(api::EventKind::Lagged) => "lagged".into(),
        Ok(api::EventKind::Unhealthy) => "unhealthy".into(),
        Ok(api::EventKind::DryRun) => "dry_run".into(),
        Err(_) => format!("unknown({value})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_json_has_stable_snake_case_keys() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        let info = api::SessionInfo {
            session_id: "s-1".into(),
            labels: [("run".to_string(), "demo".to_string())].into(),
            state: api::SessionState::Ready as i32,
            worker_pid: 42,
            memory: Some(api::MemoryUsage {
                rss_bytes: 2048,
                private_bytes: 1024,
                cgroup_bytes: 0,
                gpu: vec![
                    api::GpuMemoryUsage {
                        gpu: 0,
                        used_bytes: 300,
                    },
                    api::GpuMemoryUsage {
                        gpu: 2,
                        used_bytes: 12,
                    },
                ],
            }),
            last_used_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..api::SessionInfo::default()
        };
        let json = serde_json::to_value(SessionReport::new(&info, now)).expect("json");
        assert_eq!(json["session_id"], "s-1");
        assert_eq!(json["state"], "ready");
        assert_eq!(json["memory"]["private_bytes"], 1024);
        assert_eq!(json["memory"]["gpu_bytes"], 312);
        assert_eq!(json["gpu"][1]["gpu"], 2);
        assert_eq!(json["gpu"][1]["used_bytes"], 12);
        assert_eq!(json["last_used_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["idle_ms"], 10_000);
        assert_eq!(json["created_at"], serde_json::Value::Null);
        assert_eq!(json["labels"]["run"], "demo");
    }

    #[test]
    fn unknown_enum_values_stay_visible() {
        assert_eq!(state_name(99), "unknown(99)");
        assert_eq!(
            event_kind_name(api::EventKind::GraphReset as i32),
            "graph_reset"
        );
    }

    #[test]
    fn no_cgroup_limit_is_null_not_zero() {
        let status = api::DaemonStatus {
            system: Some(api::SystemMemory {
                total_bytes: 10,
                available_bytes: 5,
                cgroup_limit_bytes: 0,
            }),
            ..api::DaemonStatus::default()
        };
        let report = DaemonStatusReport::new("a:1".into(), &status, SystemTime::now());
        let json = serde_json::to_value(report).expect("json");
        assert_eq!(
            json["system"]["cgroup_limit_bytes"],
            serde_json::Value::Null
        );
        assert_eq!(json["tensorflow_version"], serde_json::Value::Null);
        assert_eq!(json["gpus"], serde_json::json!([]));
    }

    #[test]
    fn no_gpu_memory_is_null_not_zero() {
        let info = api::SessionInfo {
            memory: Some(api::MemoryUsage::default()),
            ..api::SessionInfo::default()
        };
        let json =
            serde_json::to_value(SessionReport::new(&info, SystemTime::now())).expect("json");
        assert_eq!(json["memory"]["gpu_bytes"], serde_json::Value::Null);
        assert_eq!(json["gpu"], serde_json::json!([]));
    }
}
