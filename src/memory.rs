//! Memory of one process, read from `/proc/PID/status`.
//!
//! RSS counts libtensorflow's shared library pages (~280 MiB in every worker); `RssAnon` is
//! what the process holds privately, the honest per-session figure. One small file read gives
//! both, cheap enough to take before and after every reset.

use std::io;

/// A process's resident memory, in bytes, and the GPU memory of its processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    pub rss_bytes: u64,
    pub private_bytes: u64,
    /// Charged to the worker's cgroup: its whole process tree, page cache and shared memory
    /// included (what the kernel holds to the hard limit); 0 without a cgroup.
    pub cgroup_bytes: u64,
    /// GPU memory per device, summed over the worker's processes (`gpu::attribution`);
    /// empty without an NVIDIA driver. Filled by the session manager, which holds NVML.
    pub gpu: Vec<crate::gpu::GpuUsage>,
}

/// Reads a live process's memory. Fails when the process is gone.
pub fn process_memory(pid: u32) -> io::Result<MemoryUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_status(&status))
}

/// Parses the `VmRSS` and `RssAnon` lines of `/proc/PID/status` (values in kB).
pub fn parse_status(status: &str) -> MemoryUsage {
    let mut usage = MemoryUsage::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        match key {
            "VmRSS" => usage.rss_bytes = kib * 1024,
            "RssAnon" => usage.private_bytes = kib * 1024,
            _ => {}
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_anonymous_memory() {
        let status = "Name:\ttfsd-worker\nVmRSS:\t  290000 kB\nRssAnon:\t   12000 kB\n\
                      RssFile:\t  278000 kB\n";
        assert_eq!(
            parse_status(status),
            MemoryUsage {
                rss_bytes: 290_000 * 1024,
                private_bytes: 12_000 * 1024,
                cgroup_bytes: 0,
                gpu: Vec::new(),
            }
        );
    }

    #[test]
    fn reads_this_process() {
        let usage = process_memory(std::process::id()).expect("own /proc entry");
        assert!(usage.rss_bytes > 0);
        assert!(usage.private_bytes > 0 && usage.private_bytes <= usage.rss_bytes);
    }
}
