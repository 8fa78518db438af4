//! System-wide memory, sampled with sysinfo: total, available, and the cgroup limit the
//! daemon runs under (containers, systemd's MemoryMax); the memory budget the safe defaults
//! derive from (`memory_budget`: the machine's memory, or its cgroup's limit if lower).

use std::path::{Path, PathBuf};

/// Machine memory, in bytes. `cgroup_limit_bytes` is 0 when no limit applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub cgroup_limit_bytes: u64,
}

/// Samples the machine's memory now.
pub fn memory() -> SystemMemory {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let cgroup_limit_bytes = system
        .cgroup_limits()
        .map(|limits| limits.total_memory)
        .filter(|limit| *limit < system.total_memory())
        .unwrap_or(0);
    SystemMemory {
        total_bytes: system.total_memory(),
        available_bytes: system.available_memory(),
        cgroup_limit_bytes,
    }
}

/// What the daemon and its workers may use together, and where that figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    /// True when a cgroup's limit (a container's, systemd's MemoryMax) is below the
    /// machine's memory and is the budget.
    pub from_cgroup: bool,
}

/// The machine's memory, or the memory limit of the daemon's cgroup when that is lower;
/// `None` when neither can be read. Defaults that must fit the machine (the hard limit per
/// session) derive from it.
pub fn memory_budget() -> Option<MemoryBudget> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let total = system.total_memory();
    budget(total, cgroup_memory_limit())
}

fn budget(total: u64, cgroup_limit: Option<u64>) -> Option<MemoryBudget> {
    match cgroup_limit {
        Some(limit) if total == 0 || limit < total => Some(MemoryBudget {
            bytes: limit,
            from_cgroup: true,
        }),
        _ => (total > 0).then_some(MemoryBudget {
            bytes: total,
            from_cgroup: false,
        }),
    }
}

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The memory limit that applies to the daemon's cgroup: the lowest of its own and its
/// ancestors' (a parent's limit binds its children), from `memory.max` under cgroup v2 or
/// `memory/…/memory.limit_in_bytes` under v1, the cgroup read from `/proc/self/cgroup`.
/// `None` when no limit is set or none can be read.
pub fn cgroup_memory_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_in(Path::new(CGROUP_ROOT), &membership, |path| {
        std::fs::read_to_string(path).ok()
    })
}

/// `cgroup_memory_limit` with the mount point, `/proc/self/cgroup`'s text and the file
/// reader given, for tests.
fn cgroup_limit_in(
    root: &Path,
    membership: &str,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<u64> {
    let mut files: Vec<PathBuf> = Vec::new();
    // Without a readable membership (or in a cgroup namespace, where it says "/"), the
    // root's own files are what applies.
    let mut candidates = vec![
        (root.to_path_buf(), "memory.max"),
        (root.join("memory"), "memory.limit_in_bytes"),
    ];
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            candidates.push((root.join(relative), "memory.max"));
        } else if controllers.split(',').any(|name| name == "memory") {
            candidates.push((root.join("memory").join(relative), "memory.limit_in_bytes"));
        }
    }
    for (dir, file) in candidates {
        let top = if file == "memory.max" {
            root.to_path_buf()
        } else {
            root.join("memory")
        };
        let mut at = Some(dir.as_path());
        while let Some(dir) = at {
            if !dir.starts_with(&top) {
                break;
            }
            files.push(dir.join(file));
            at = dir.parent();
        }
    }
    files
        .iter()
        .filter_map(|file| read(file))
        .filter_map(|text| parse_cgroup_limit(&text))
        .min()
}

/// A cgroup memory limit file's value: bytes, or `None` for "max" (v2) and for v1's
/// "unlimited", the largest page-aligned count (9223372036854771712).
fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|bytes| *bytes < 1 << 62)
}

/// How many processes the kernel's OOM killer has killed since boot (`/proc/vmstat`).
pub fn oom_kill_count() -> Option<u64> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    vmstat
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

/// Kernel memory pressure (PSI), percent of time some/all tasks stalled on memory over the
/// last 10 s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryPressure {
    pub some_avg10: f64,
    pub full_avg10: f64,
}

/// Reads `/proc/pressure/memory`; `None` where the kernel has no PSI.
pub fn memory_pressure() -> Option<MemoryPressure> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    Some(parse_pressure(&text))
}

/// Parses PSI lines like `some avg10=0.12 avg60=0.05 avg300=0.01 total=1234`.
pub fn parse_pressure(text: &str) -> MemoryPressure {
    let avg10 = |line: &str| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("avg10="))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    };
    let mut pressure = MemoryPressure::default();
    for line in text.lines() {
        if line.starts_with("some ") {
            pressure.some_avg10 = avg10(line);
        } else if line.starts_with("full ") {
            pressure.full_avg10 = avg10(line);
        }
    }
    pressure
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_psi_lines() {
        let text = "some avg10=1.50 avg60=0.20 avg300=0.00 total=100\n\
                    full avg10=0.25 avg60=0.00 avg300=0.00 total=10\n";
        let pressure = super::parse_pressure(text);
        assert_eq!(pressure.some_avg10, 1.5);
        assert_eq!(pressure.full_avg10, 0.25);
    }

    #[test]
    fn the_budget_is_the_lower_of_the_machine_and_its_cgroup() {
        use super::{MemoryBudget, budget};
        assert_eq!(
            budget(16 << 30, None),
            Some(MemoryBudget {
                bytes: 16 << 30,
                from_cgroup: false
            })
        );
        assert_eq!(
            budget(16 << 30, Some(4 << 30)),
            Some(MemoryBudget {
                bytes: 4 << 30,
                from_cgroup: true
            })
        );
        assert_eq!(
            budget(16 << 30, Some(32 << 30)).map(|b| b.bytes),
            Some(16 << 30)
        );
        assert_eq!(budget(0, None), None);
    }

    #[test]
    fn cgroup_limits_are_read_for_v2_and_v1_up_the_hierarchy() {
        use std::collections::HashMap;
        use std::path::Path;
        let files = |entries: &[(&str, &str)]| -> HashMap<String, String> {
            entries
                .iter()
                .map(|(path, text)| (path.to_string(), text.to_string()))
                .collect()
        };
        let limit = |membership: &str, entries: &[(&str, &str)]| {
            let files = files(entries);
            super::cgroup_limit_in(Path::new("/cg"), membership, |path| {
                files.get(path.to_str().expect("utf-8")).cloned()
            })
        };
        // cgroup v2, systemd's MemoryMax on the unit, a lower limit on its slice.
        let v2 = "0::/system.slice/tfsd.service\n";
        assert_eq!(
            limit(
                v2,
                &[
                    ("/cg/system.slice/tfsd.service/memory.max", "8589934592\n"),
                    ("/cg/system.slice/memory.max", "4294967296\n"),
                    ("/cg/memory.max", "max\n"),
                ]
            ),
            Some(4 << 30)
        );
        // A container: a cgroup namespace, the limit at the root.
        assert_eq!(
            limit("0::/\n", &[("/cg/memory.max", "2147483648\n")]),
            Some(2 << 30)
        );
        assert_eq!(limit("0::/\n", &[("/cg/memory.max", "max\n")]), None);
        // cgroup v1: the memory controller's own hierarchy; "unlimited" is a huge number.
        let v1 = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n";
        assert_eq!(
            limit(
                v1,
                &[
                    (
                        "/cg/memory/docker/abc/memory.limit_in_bytes",
                        "1073741824\n"
                    ),
                    ("/cg/memory/memory.limit_in_bytes", "9223372036854771712\n"),
                ]
            ),
            Some(1 << 30)
        );
        assert_eq!(
            limit(
                v1,
                &[("/cg/memory/memory.limit_in_bytes", "9223372036854771712\n")]
            ),
            None
        );
        assert_eq!(limit("", &[]), None);
    }

    #[test]
    fn reads_the_machine() {
        let memory = super::memory();
        assert!(memory.total_bytes > 0);
        let budget = super::memory_budget().expect("a budget");
        assert!(budget.bytes > 0 && budget.bytes <= memory.total_bytes);
        assert!(memory.available_bytes > 0 && memory.available_bytes <= memory.total_bytes);
    }
}
