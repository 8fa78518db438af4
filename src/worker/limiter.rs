//! How the kernel holds a worker to its session's hard limit: a cgroup of its own where the
//! host gives tfsd one (`cgroup.rs`), otherwise a data-segment rlimit as a backstop. The
//! memory policy's sampling (`policy/`) runs on top of either, and alone under `sampling`.
//!
//! The rlimit backstop: `RLIMIT_DATA` bounds a process's private writable mappings (heap,
//! anonymous mmaps, thread stacks), which is where TensorFlow's and Python's allocations go.
//! An allocation past it fails inside the allocator (TensorFlow: ResourceExhausted "OOM when
//! allocating tensor"; Python: MemoryError) instead of taking the machine. It counts address
//! space, not memory touched, so it is set to what the worker had mapped when its session
//! took it, plus the hard limit, plus headroom for what TensorFlow maps lazily (its thread
//! pools' stacks, allocator arenas: `RLIMIT_HEADROOM`). It is coarser than a cgroup
//! (reserved address space counts; page cache and shared memory do not), so it is only the
//! fallback.

use std::io;
use std::path::Path;

use super::cgroup::{Cgroups, Setup, WorkerCgroup};

/// `workers.memory_enforcement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnforcementMode {
    /// A cgroup per worker where the host allows it, the rlimit backstop otherwise.
    #[default]
    Auto,
    /// A cgroup per worker, or the daemon refuses to start.
    Cgroup,
    /// The rlimit backstop only.
    Rlimit,
    /// Neither: only the memory policy's sampling.
    Sampling,
}

impl EnforcementMode {
    pub const NAMES: &'static str = "\"auto\", \"cgroup\", \"rlimit\" or \"sampling\"";

    pub fn parse(text: &str) -> Option<EnforcementMode> {
        match text {
            "auto" => Some(EnforcementMode::Auto),
            "cgroup" => Some(EnforcementMode::Cgroup),
            "rlimit" => Some(EnforcementMode::Rlimit),
            "sampling" => Some(EnforcementMode::Sampling),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EnforcementMode::Auto => "auto",
            EnforcementMode::Cgroup => "cgroup",
            EnforcementMode::Rlimit => "rlimit",
            EnforcementMode::Sampling => "sampling",
        }
    }
}

/// Address space allowed above the hard limit under the rlimit backstop: TensorFlow creates
/// its thread pools at the first step (a stack of 8 MiB each, two pools of one thread per
/// core) and its allocator maps arenas ahead of use.
pub fn rlimit_headroom() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    256 * MIB + 2 * cores * 8 * MIB
}

const MIB: u64 = 1 << 20;

/// The enforcement in force, decided once at start-up.
#[derive(Debug)]
pub enum MemoryLimiter {
    Cgroup(Cgroups),
    Rlimit {
        /// Why no cgroup (empty when the operator chose the rlimit).
        why: String,
    },
    Sampling {
        why: String,
    },
}

impl MemoryLimiter {
    /// Decides the enforcement for `mode`; `Err` (for the daemon to refuse to start) only
    /// when a cgroup was required and none can be had.
    pub fn setup(mode: EnforcementMode, pids_max: Option<u64>) -> Result<MemoryLimiter, String> {
        match mode {
            EnforcementMode::Sampling => Ok(MemoryLimiter::Sampling {
                why: "workers.memory_enforcement = \"sampling\"".into(),
            }),
            EnforcementMode::Rlimit => Ok(MemoryLimiter::Rlimit {
                why: "workers.memory_enforcement = \"rlimit\"".into(),
            }),
            EnforcementMode::Auto | EnforcementMode::Cgroup => match Cgroups::setup(pids_max) {
                Setup::Ready(cgroups) => Ok(MemoryLimiter::Cgroup(cgroups)),
                Setup::Unavailable(why) if mode == EnforcementMode::Cgroup => Err(format!(
                    "workers.memory_enforcement = \"cgroup\", but no cgroup can be had: {why}"
                )),
                Setup::Unavailable(why) => Ok(MemoryLimiter::Rlimit { why }),
            },
        }
    }

    /// One name: "cgroup v2", "cgroup v1", "rlimit", "sampling".
    pub fn kind(&self) -> &'static str {
        match self {
            MemoryLimiter::Cgroup(cgroups) => match cgroups.version() {
                super::cgroup::Version::V2 => "cgroup v2",
                super::cgroup::Version::V1 => "cgroup v1",
            },
            MemoryLimiter::Rlimit { .. } => "rlimit",
            MemoryLimiter::Sampling { .. } => "sampling",
        }
    }

    /// What holds a session to its hard limit, in one line for the log, GetDaemonStatus and
    /// check-config.
    pub fn describe(&self) -> String {
        let sampling = "plus the memory policy's sampling";
        match self {
            MemoryLimiter::Cgroup(cgroups) => format!("{}; {sampling}", cgroups.describe()),
            MemoryLimiter::Rlimit { why } => format!(
                "rlimit: RLIMIT_DATA = the worker's mappings + the hard limit + {} MiB headroom, \
                 {sampling}{}",
                rlimit_headroom() / MIB,
                because(why)
            ),
            MemoryLimiter::Sampling { why } => format!(
                "sampling only: the memory policy checks every policy.interval, so a step can \
                 allocate past the hard limit between two checks{}",
                because(why)
            ),
        }
    }

    /// The cgroup for a worker about to be spawned (cgroup enforcement only).
    pub fn worker_cgroup(&self) -> io::Result<Option<WorkerCgroup>> {
        match self {
            MemoryLimiter::Cgroup(cgroups) => cgroups.create_worker().map(Some),
            _ => Ok(None),
        }
    }

    /// Whether the rlimit backstop applies.
    pub fn uses_rlimit(&self) -> bool {
        matches!(self, MemoryLimiter::Rlimit { .. })
    }

    /// Removes what the daemon made (its cgroup subtree) at shutdown.
    pub fn remove(&self) {
        if let MemoryLimiter::Cgroup(cgroups) = self {
            cgroups.remove();
        }
    }
}

fn because(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" (no cgroup: {why})")
    }
}

/// Sets worker `pid`'s RLIMIT_DATA to `data_rlimit_for(pid, hard_limit)` with prlimit(2).
/// EPERM where the worker runs as another user and the daemon lacks CAP_SYS_RESOURCE (a
/// container's default): the worker then sets it on itself (`WorkerProcess::
/// set_own_data_limit`).
pub fn set_data_rlimit(pid: u32, hard_limit: Option<u64>) -> io::Result<()> {
    let limit = data_rlimit_for(pid, hard_limit)?;
    let value = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: prlimit(2) reads `value` and writes nothing (old limit pointer null).
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_DATA, &value, std::ptr::null_mut()) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The RLIMIT_DATA that holds worker `pid` to `hard_limit`: its present private mappings
/// plus the limit plus headroom (`None`: unlimited), never above its present hard limit.
pub fn data_rlimit_for(pid: u32, hard_limit: Option<u64>) -> io::Result<u64> {
    let limit = match hard_limit {
        Some(hard) => {
            let mapped = data_mapped(pid)?;
            mapped
                .saturating_add(hard)
                .saturating_add(rlimit_headroom())
        }
        None => libc::RLIM_INFINITY,
    };
    // The hard limit too, so that the session's own code cannot raise it again (a worker
    // serves one session, whose limit does not change).
    Ok(limit.min(current_hard(pid).unwrap_or(libc::RLIM_INFINITY)))
}

/// The process's RLIMIT_DATA hard limit now.
fn current_hard(pid: u32) -> Option<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: prlimit(2) with no new limit writes the current one into `old`.
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_DATA, std::ptr::null(), &mut old) };
    (result == 0).then_some(old.rlim_max)
}

/// `VmData` of /proc/PID/status: the private writable mappings RLIMIT_DATA counts.
pub fn data_mapped(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmData:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other("no VmData line in /proc/PID/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_by_name() {
        for mode in [
            EnforcementMode::Auto,
            EnforcementMode::Cgroup,
            EnforcementMode::Rlimit,
            EnforcementMode::Sampling,
        ] {
            assert_eq!(EnforcementMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(EnforcementMode::parse("yes"), None);
    }

    #[test]
    fn the_own_process_has_data_mappings() {
        assert!(data_mapped(std::process::id()).expect("VmData") > 0);
    }
}
