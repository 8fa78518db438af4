//! A session's GPU memory: what NVML lists for the processes of its worker, per device.
//!
//! A worker's processes are the worker itself and everything it started: a Python session
//! may start subprocesses (a data loader, a multiprocessing pool) that hold GPU memory of
//! their own. A process belongs to the worker that is its own pid, its process group (every
//! worker leads a group of its own, which children inherit), or an ancestor (a child that
//! left the group with `setsid` is still found through its parents). Pure over a
//! `ProcessTree`, so tested with made-up trees; `ProcFs` reads `/proc/PID/stat`.

use std::collections::{HashMap, HashSet};

use super::GpuSample;

/// How far up the parent chain a GPU process is followed to find its worker.
const MAX_ANCESTRY: usize = 64;

/// One device's share of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuUsage {
    /// The device's NVML index (the order of `nvidia-smi`).
    pub gpu: u32,
    pub used_bytes: u64,
}

/// Parent and process group of live processes.
pub trait ProcessTree {
    /// `(parent pid, process group)` of `pid`, or `None` when it is gone or unreadable.
    fn parent_and_group(&self, pid: u32) -> Option<(u32, u32)>;
}

/// The host's processes, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy)]
pub struct ProcFs;

impl ProcessTree for ProcFs {
    fn parent_and_group(&self, pid: u32) -> Option<(u32, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&stat)
    }
}

/// The parent and group fields of `/proc/PID/stat` ("pid (comm) state ppid pgrp ..."): read
/// after the last ')', since the command name may hold spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<(u32, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

/// The worker (one of `workers`) that `pid` belongs to, if any.
pub fn owner(pid: u32, workers: &HashSet<u32>, tree: &impl ProcessTree) -> Option<u32> {
    let mut at = pid;
    for _ in 0..MAX_ANCESTRY {
        if workers.contains(&at) {
            return Some(at);
        }
        let (parent, group) = tree.parent_and_group(at)?;
        if workers.contains(&group) {
            return Some(group);
        }
        if parent <= 1 || parent == at {
            return None;
        }
        at = parent;
    }
    None
}

/// Each worker's GPU memory per device, summed over its processes; devices where it holds
/// nothing are left out, and so are workers holding nothing. A process whose figure NVML
/// cannot give counts 0 bytes, but its device is still listed.
pub fn attribute(
    sample: &GpuSample,
    workers: &[u32],
    tree: &impl ProcessTree,
) -> HashMap<u32, Vec<GpuUsage>> {
    let workers: HashSet<u32> = workers.iter().copied().filter(|pid| *pid != 0).collect();
    let mut usage: HashMap<u32, Vec<GpuUsage>> = HashMap::new();
    if workers.is_empty() {
        return usage;
    }
    for device in &sample.devices {
        for process in &device.processes {
            let Some(worker) = owner(process.pid, &workers, tree) else {
                continue;
            };
            let devices = usage.entry(worker).or_default();
            let bytes = process.used_bytes.unwrap_or(0);
            match devices.iter_mut().find(|u| u.gpu == device.index) {
                Some(seen) => seen.used_bytes += bytes,
                None => devices.push(GpuUsage {
                    gpu: device.index,
                    used_bytes: bytes,
                }),
            }
        }
    }
    for devices in usage.values_mut() {
        devices.sort_by_key(|u| u.gpu);
    }
    usage
}

/// The sum over devices.
pub fn total(usage: &[GpuUsage]) -> u64 {
    usage.iter().map(|u| u.used_bytes).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceProcess, DeviceSample};

    /// pid → (parent, group).
    struct Tree(HashMap<u32, (u32, u32)>);

    impl ProcessTree for Tree {
        fn parent_and_group(&self, pid: u32) -> Option<(u32, u32)> {
            self.0.get(&pid).copied()
        }
    }

    fn device(index: u32, processes: &[(u32, Option<u64>)]) -> DeviceSample {
        DeviceSample {
            index,
            name: "test".to_string(),
            uuid: String::new(),
            total_bytes: 100 << 30,
            used_bytes: 0,
            free_bytes: 100 << 30,
            processes: processes
                .iter()
                .map(|&(pid, used_bytes)| DeviceProcess { pid, used_bytes })
                .collect(),
        }
    }

    fn tree() -> Tree {
        Tree(HashMap::from([
            // Worker 100 (the daemon, 10, is its parent) and its data-loader child.
            (100, (10, 100)),
            (101, (100, 100)),
            // A grandchild that left the group with setsid.
            (102, (101, 102)),
            // Worker 200.
            (200, (10, 200)),
            // A process of someone else's, a child of init.
            (300, (1, 300)),
            (10, (1, 10)),
        ]))
    }

    #[test]
    fn a_workers_processes_are_summed_per_device() {
        let sample = crate::gpu::GpuSample {
            devices: vec![
                device(
                    0,
                    &[
                        (100, Some(1000)),
                        (101, Some(500)),
                        (200, Some(7)),
                        (300, Some(9999)),
                    ],
                ),
                device(1, &[(102, Some(40)), (300, Some(1))]),
            ],
        };
        let usage = attribute(&sample, &[100, 200, 400], &tree());
        assert_eq!(
            usage.get(&100),
            Some(&vec![
                GpuUsage {
                    gpu: 0,
                    used_bytes: 1500
                },
                GpuUsage {
                    gpu: 1,
                    used_bytes: 40
                },
            ])
        );
        assert_eq!(
            usage.get(&200),
            Some(&vec![GpuUsage {
                gpu: 0,
                used_bytes: 7
            }])
        );
        // A worker with nothing on any device, and someone else's process, are absent.
        assert_eq!(usage.get(&400), None);
        assert_eq!(usage.len(), 2);
        assert_eq!(total(&usage[&100]), 1540);
    }

    #[test]
    fn processes_are_found_by_group_and_by_ancestry() {
        let workers = HashSet::from([100, 200]);
        assert_eq!(owner(100, &workers, &tree()), Some(100));
        assert_eq!(owner(101, &workers, &tree()), Some(100));
        assert_eq!(owner(102, &workers, &tree()), Some(100));
        assert_eq!(owner(300, &workers, &tree()), None);
        // Gone from /proc (or another pid namespace's pid): nobody's.
        assert_eq!(owner(999, &workers, &tree()), None);
        // A loop in a made-up tree ends.
        let looped = Tree(HashMap::from([(5, (6, 5)), (6, (5, 6))]));
        assert_eq!(owner(5, &workers, &looped), None);
    }

    #[test]
    fn unavailable_figures_count_zero_but_name_the_device() {
        let sample = crate::gpu::GpuSample {
            devices: vec![device(3, &[(100, None)])],
        };
        let usage = attribute(&sample, &[100], &tree());
        assert_eq!(
            usage[&100],
            vec![GpuUsage {
                gpu: 3,
                used_bytes: 0
            }]
        );
        // No workers, or only pid 0 (a session between workers): nothing to do.
        assert!(attribute(&sample, &[], &tree()).is_empty());
        assert!(attribute(&sample, &[0], &tree()).is_empty());
    }

    #[test]
    fn a_real_workers_descendants_are_found_through_proc() {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        // A stand-in worker leading its own process group, as workers do, with a child.
        let mut worker = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        std::io::BufReader::new(worker.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the child's pid");
        let child: u32 = line.trim().parse().expect("a pid");
        let workers = HashSet::from([worker.id()]);
        assert_eq!(owner(worker.id(), &workers, &ProcFs), Some(worker.id()));
        assert_eq!(owner(child, &workers, &ProcFs), Some(worker.id()));
        // This test's own process belongs to no such worker.
        assert_eq!(owner(std::process::id(), &workers, &ProcFs), None);
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-(worker.id() as i32), libc::SIGKILL) };
        let _ = worker.wait();
    }

    #[test]
    fn stat_lines_are_read_after_the_command_name() {
        assert_eq!(
            parse_stat("4242 (python3 (tfsd) x) S 4200 4242 4242 0 -1 4194560 ..."),
            Some((4200, 4242))
        );
        assert_eq!(parse_stat("garbage"), None);
        let own = ProcFs
            .parent_and_group(std::process::id())
            .expect("own stat");
        assert!(own.0 > 0);
    }
}
