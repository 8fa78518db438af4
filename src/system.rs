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

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_machine() {
        let memory = super::memory();
        assert!(memory.total_bytes > 0);
        assert!(memory.available_bytes > 0 && memory.available_bytes <= memory.total_bytes);
    }
}
