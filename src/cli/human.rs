//! Human output for each report: what an operator reads at a terminal. Scripts use `--json`
//! instead, so these shapes may change for readability; the JSON may not.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::format::{self, Align, Table, fields, mib, mib_change, mib_number};
use super::report::{
    CloseReport, DaemonStatusReport, EventReport, MemoryReport, ResetOperation, ResetReport,
    SessionListReport, SessionReport, Time,
};

/// A report that prints itself for people.
pub trait Human {
    fn human(&self, now: SystemTime) -> String;
}

impl Human for DaemonStatusReport {
    fn human(&self, _now: SystemTime) -> String {
        let started = match (self.started_at, self.uptime_ms) {
            (Some(at), Some(uptime)) => format!(
                "{} (up {})",
                format::time(at.0),
                format::duration(Duration::from_millis(uptime))
            ),
            _ => "unknown".into(),
        };
        let system = match self.system {
            Some(system) => format!(
                "{} available of {}",
                mib(system.available_bytes),
                mib(system.total_bytes)
            ),
            None => "unknown".into(),
        };
        let cgroup_limit = match self.system.and_then(|system| system.cgroup_limit_bytes) {
            Some(limit) => mib(limit),
            None => "none".into(),
        };
        let mut text = format!("tfsd {} at {}\n", self.version, self.address);
        text.push_str(&fields(&[
            ("pid", self.pid.to_string()),
            (
                "TensorFlow",
                self.tensorflow_version
                    .clone()
                    .unwrap_or_else(|| "not known yet (no worker has started)".into()),
            ),
            ("started", started),
            ("supervisor memory", memory_pair(self.memory)),
            ("sessions", self.session_count.to_string()),
            (
                "warm pool",
                format!("{}/{} ready", self.warm_workers, self.warm_pool_size),
            ),
            (
                "Python sessions",
                match &self.python {
                    None => "not configured (python.interpreter)".into(),
                    Some(python) => format!(
                        "{}/{} ready; {}",
                        python.warm_workers,
                        python.warm_pool_size,
                        python
                            .runtime
                            .as_deref()
                            .unwrap_or("no worker has started yet")
                    ),
                },
            ),
            ("system memory", system),
            ("cgroup limit", cgroup_limit),
            ("hard limits held by", self.memory_enforcement.clone()),
            ("worker sandbox", self.sandbox.clone()),
            ("GPUs", gpus_line(self)),
            ("draining", yes_no(self.draining).into()),
        ]));
        text
    }
}

impl Human for SessionListReport {
    fn human(&self, _now: SystemTime) -> String {
        if self.sessions.is_empty() {
            return "no sessions\n".into();
        }
        let mut table = Table::new(&[
            ("ID", Align::Left),
            ("STATE", Align::Left),
            ("RUNTIME", Align::Left),
            ("PID", Align::Right),
            ("PRIVATE MiB", Align::Right),
            ("RSS MiB", Align::Right),
            ("GPU MiB", Align::Right),
            ("RUNS/CALLS", Align::Right),
            ("GRAPH", Align::Right),
            ("RESETS", Align::Right),
            ("PURGES", Align::Right),
            ("RECYCLES", Align::Right),
            ("RESTARTS", Align::Right),
            ("IDLE", Align::Right),
            ("LABELS", Align::Left),
        ]);
        for session in &self.sessions {
            table.row(vec![
                session.session_id.clone(),
                session.state.clone(),
                session.runtime.clone(),
                session.worker_pid.to_string(),
                session
                    .memory
                    .map_or("-".into(), |memory| mib_number(memory.private_bytes)),
                session
                    .memory
                    .map_or("-".into(), |memory| mib_number(memory.rss_bytes)),
                session
                    .memory
                    .and_then(|memory| memory.gpu_bytes)
                    .map_or("-".into(), mib_number),
                (session.run_count + session.call_count).to_string(),
                session.graph_version.to_string(),
                session.graph_reset_count.to_string(),
                session.purge_count.to_string(),
                session.recycle_count.to_string(),
                session.worker_restart_count.to_string(),
                session.idle_ms.map_or("-".into(), |idle| {
                    format::duration(Duration::from_millis(idle))
                }),
                labels(&session.labels),
            ]);
        }
        table.render()
    }
}

impl Human for SessionReport {
    fn human(&self, now: SystemTime) -> String {
        let ago = |time: Option<Time>| match time {
            Some(time) => format!(
                "{} ({} ago)",
                format::time(time.0),
                format::duration(time.elapsed_at(now))
            ),
            None => "unknown".into(),
        };
        fields(&[
            ("session", self.session_id.clone()),
            ("state", self.state.clone()),
            ("runtime", self.runtime.clone()),
            ("worker pid", self.worker_pid.to_string()),
            ("memory", memory_pair(self.memory)),
            ("GPU memory", gpu_per_device(&self.gpu)),
            (
                "GPUs",
                match &self.gpus {
                    None => "all the daemon sees".into(),
                    Some(devices) if devices.is_empty() => "none".into(),
                    Some(devices) => devices
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            ),
            ("graph version", self.graph_version.to_string()),
            (
                "runs",
                format!("{} ({} in flight)", self.run_count, self.runs_in_flight),
            ),
            ("calls", self.call_count.to_string()),
            ("graph resets", self.graph_reset_count.to_string()),
            ("purges", self.purge_count.to_string()),
            ("recycles", self.recycle_count.to_string()),
            ("worker restarts", self.worker_restart_count.to_string()),
            ("created", ago(self.created_at)),
            ("last used", ago(self.last_used_at)),
            ("labels", labels(&self.labels)),
            ("peak private", format::mib(self.peak_private_bytes)),
            (
                "limits",
                format!(
                    "soft {}, hard {}",
                    self.soft_limit_bytes.map_or("none".into(), format::mib),
                    self.hard_limit_bytes.map_or("none".into(), format::mib)
                ),
            ),
            (
                "memory policy",
                format!(
                    "{} automatic actions{}",
                    self.automatic_action_count,
                    if self.unhealthy { ", UNHEALTHY" } else { "" }
                ),
            ),
        ])
    }
}

impl Human for ResetReport {
    fn human(&self, _now: SystemTime) -> String {
        let took = format::duration(Duration::from_micros(self.duration_us));
        let mut text = match self.operation {
            ResetOperation::ResetGraph => {
                format!("reset the graph of session {} in {took}\n", self.session_id)
            }
            ResetOperation::Purge => format!(
                "purged the variables of session {} in {took}\n",
                self.session_id
            ),
            ResetOperation::Recycle => format!(
                "recycled session {} into a fresh worker in {took}\n",
                self.session_id
            ),
        };
        let pids = if self.worker_pid_before == self.worker_pid_after {
            format!("{} (same worker)", self.worker_pid_after)
        } else {
            format!("{} → {}", self.worker_pid_before, self.worker_pid_after)
        };
        let mut lines = vec![("worker pid", pids)];
        if let (Some(before), Some(after)) = (self.memory_before, self.memory_after) {
            lines.push((
                "private memory",
                mib_change(before.private_bytes, after.private_bytes),
            ));
            lines.push(("RSS", mib_change(before.rss_bytes, after.rss_bytes)));
            if before.gpu_bytes.is_some() || after.gpu_bytes.is_some() {
                lines.push((
                    "GPU memory",
                    mib_change(before.gpu_bytes.unwrap_or(0), after.gpu_bytes.unwrap_or(0)),
                ));
            }
        }
        if self.operation == ResetOperation::Recycle {
            lines.push(("variables preserved", self.variables_preserved.to_string()));
        }
        text.push_str(&fields(&lines));
        text
    }
}

impl Human for CloseReport {
    fn human(&self, _now: SystemTime) -> String {
        format!("closed session {}\n", self.session_id)
    }
}

impl Human for EventReport {
    /// One line per event: time, kind, session, pid, memory, reason. The fixed-width
    /// columns keep a scrolling terminal readable without knowing the widths in advance.
    fn human(&self, _now: SystemTime) -> String {
        let at = self
            .at
            .map_or_else(|| "-".into(), |at| format::time_millis(at.0));
        let session = self.session_id.as_deref().unwrap_or("-");
        let pid = self
            .worker_pid
            .map_or_else(|| "pid -".into(), |pid| format!("pid {pid}"));
        let mut line = format!("{at:<24}  {:<16}  {session:<34}  {pid:<10}", self.kind);
        let private = arrow(self.memory_before, self.memory_after, |m| m.private_bytes);
        let rss = arrow(self.memory_before, self.memory_after, |m| m.rss_bytes);
        if let (Some(private), Some(rss)) = (private, rss) {
            line.push_str(&format!("  private {private}  RSS {rss}"));
        }
        if let Some(gpu) = arrow(self.memory_before, self.memory_after, |m| {
            m.gpu_bytes.unwrap_or(0)
        })
        .filter(|_| {
            [self.memory_before, self.memory_after]
                .iter()
                .flatten()
                .any(|m| m.gpu_bytes.is_some())
        }) {
            line.push_str(&format!("  GPU {gpu}"));
        }
        if let Some(trigger) = self.trigger.as_deref().filter(|t| *t != "client") {
            line.push_str(&format!("  [{trigger}"));
            if self.rung > 0 {
                line.push_str(&format!(", rung {}", self.rung));
            }
            line.push(']');
        }
        if let Some(reason) = &self.reason {
            line.push_str("  ");
            line.push_str(reason);
        }
        line.trim_end().to_string() + "\n"
    }
}

/// "12.3→4.5 MiB", or one side alone when the event has only one.
fn arrow(
    before: Option<MemoryReport>,
    after: Option<MemoryReport>,
    bytes: impl Fn(MemoryReport) -> u64,
) -> Option<String> {
    match (before.map(&bytes), after.map(&bytes)) {
        (Some(before), Some(after)) => {
            Some(format!("{}→{} MiB", mib_number(before), mib_number(after)))
        }
        (None, Some(after)) => Some(mib(after)),
        (Some(before), None) => Some(format!("{} before", mib(before))),
        (None, None) => None,
    }
}

fn memory_pair(memory: Option<MemoryReport>) -> String {
    match memory {
        Some(memory) => format!(
            "{} private, {} RSS",
            mib(memory.private_bytes),
            mib(memory.rss_bytes)
        ),
        None => "unknown".into(),
    }
}

/// "0: 1024.0 MiB, 1: 12.0 MiB", or "none".
fn gpu_per_device(gpu: &[super::report::GpuMemoryReport]) -> String {
    if gpu.is_empty() {
        return "none".into();
    }
    gpu.iter()
        .map(|usage| format!("GPU {}: {}", usage.gpu, mib(usage.used_bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The daemon's GPUs: each device's use, or why there are none.
fn gpus_line(status: &DaemonStatusReport) -> String {
    if status.gpus.is_empty() {
        return if status.gpu.is_empty() {
            "unknown".into()
        } else {
            status.gpu.clone()
        };
    }
    status
        .gpus
        .iter()
        .map(|device| {
            format!(
                "{} {}: {} used of {}",
                device.index,
                device.name,
                mib(device.used_bytes),
                mib(device.total_bytes)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_recycle_shows_both_pids_and_the_memory_it_gave_back() {
        let report = ResetReport {
            operation: ResetOperation::Recycle,
            session_id: "s-1".into(),
            duration_us: 312_400,
            worker_pid_before: 100,
            worker_pid_after: 200,
            memory_before: Some(MemoryReport {
                rss_bytes: 310 * MIB,
                private_bytes: 40 * MIB,
                cgroup_bytes: None,
                gpu_bytes: Some(2048 * MIB),
            }),
            memory_after: Some(MemoryReport {
                rss_bytes: 290 * MIB,
                private_bytes: 10 * MIB,
                cgroup_bytes: None,
                gpu_bytes: None,
            }),
            variables_preserved: 2,
            session: None,
        };
        assert_eq!(
            report.human(SystemTime::now()),
            "recycled session s-1 into a fresh worker in 312.4 ms\n\
             worker pid           100 → 200\n\
             private memory       40.0 MiB → 10.0 MiB (-30.0 MiB)\n\
             RSS                  310.0 MiB → 290.0 MiB (-20.0 MiB)\n\
             GPU memory           2048.0 MiB → 0.0 MiB (-2048.0 MiB)\n\
             variables preserved  2\n"
        );
    }

    #[test]
    fn an_event_is_one_line() {
        let event = EventReport {
            at: Some(Time(SystemTime::UNIX_EPOCH)),
            kind: "variables_purged".into(),
            session_id: Some("s-1".into()),
            worker_pid: Some(7),
            reason: None,
            graph_version: 1,
            memory_before: Some(MemoryReport {
                rss_bytes: 2 * MIB,
                private_bytes: MIB,
                cgroup_bytes: None,
                gpu_bytes: None,
            }),
            memory_after: Some(MemoryReport {
                rss_bytes: MIB,
                private_bytes: 0,
                cgroup_bytes: None,
                gpu_bytes: None,
            }),
            trigger: Some("client".into()),
            rung: 0,
        };
        let line = event.human(SystemTime::now());
        assert_eq!(line.lines().count(), 1);
        assert!(line.starts_with("1970-01-01T00:00:00.000Z  variables_purged  s-1"));
        assert!(line.contains("pid 7"));
        assert!(
            line.ends_with("private 1.0→0.0 MiB  RSS 2.0→1.0 MiB\n"),
            "{line}"
        );

        // The memory policy's actions say which trigger and rung.
        let automatic = EventReport {
            trigger: Some("soft_limit".into()),
            rung: 1,
            reason: Some("private memory 3.1 GiB is over the soft limit 3.0 GiB".into()),
            ..event
        };
        let line = automatic.human(SystemTime::now());
        assert!(
            line.contains("[soft_limit, rung 1]  private memory 3.1 GiB"),
            "{line}"
        );
    }
}
