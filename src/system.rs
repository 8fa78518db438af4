//! System-wide memory, sampled with sysinfo: total, available, and the cgroup limit the
//! daemon runs under (containers, systemd's MemoryMax).

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
    fn reads_the_machine() {
        let memory = super::memory();
        assert!(memory.total_bytes > 0);
        assert!(memory.available_bytes > 0 && memory.available_bytes <= memory.total_bytes);
    }
}
