//! A cgroup per worker, so that the kernel holds each session to its hard limit.
//!
//! The memory policy samples every `policy.interval`; TensorFlow can allocate gigabytes
//! between two samples (one `tf.fill` of a large shape). A memory cgroup stops the allocation
//! itself: at the limit the kernel reclaims what it can (page cache) and then kills the
//! worker, and no process outside the session pays for it. The supervisor reads the kill from
//! the cgroup's own OOM counter (`memory.events` under v2, `memory.oom_control` under v1), so
//! the run that hit the limit is answered RESOURCE_EXHAUSTED naming it, and the session is
//! restored as after the policy's own hard-limit kill.
//!
//! Layout: `<the daemon's own cgroup>/tfsd-<daemon pid>/w-<n>`, one leaf per worker process
//! (a Python session's subprocesses included: they inherit it). tfsd only ever creates
//! cgroups below the one it was started in, and writes limits only to those. Under cgroup v2
//! a process may not sit in a cgroup whose controllers are enabled for its children, so when
//! the daemon's cgroup does not yet pass the memory controller down, the daemon moves itself
//! into `tfsd-<pid>/supervisor` and then enables `memory` (and `pids`) in its cgroup's
//! `cgroup.subtree_control` — the one write to its own cgroup, and what delegation
//! (systemd's `Delegate=yes`, a container's cgroup namespace) hands a service for exactly
//! this. Under v1 (the memory controller mounted on its own hierarchy) no such step exists.
//!
//! Every worker's cgroup is removed once the worker is reaped (its leftover processes, if
//! any, killed first). A daemon that died without cleaning up leaves `tfsd-<its pid>`
//! behind; the next daemon started in the same cgroup removes those of dead pids at start.
//!
//! A worker joins its cgroup between fork and exec (it writes "0", meaning itself, to the
//! cgroup's `cgroup.procs`, opened beforehand), so everything it allocates is charged there.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Which cgroup interface holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The daemon's subtree of worker cgroups.
#[derive(Debug)]
pub struct Cgroups {
    version: Version,
    /// `<own cgroup>/tfsd-<pid>`: every worker's cgroup is made in here.
    base: PathBuf,
    next: AtomicU64,
    /// `pids.max` for each worker (v2 only: tasks, threads included).
    pids_max: Option<u64>,
}

/// What `Cgroups::setup` found.
#[derive(Debug)]
pub enum Setup {
    Ready(Cgroups),
    /// No cgroup can be had here; the reason says why, in words an operator can act on.
    Unavailable(String),
}

/// Where cgroup file systems are mounted and which cgroup a process is in, as the kernel
/// says in `/proc/self/mountinfo` and `/proc/self/cgroup`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Location {
    v2: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
}

impl Cgroups {
    /// Finds the daemon's own cgroup and makes its subtree, removing what dead daemons left
    /// in it. Call once, before any worker starts (under v2 the daemon may move itself).
    pub fn setup(pids_max: Option<u64>) -> Setup {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let location = locate(&mountinfo, &membership);
        let mut reasons = Vec::new();
        if let Some(own) = &location.v2 {
            match setup_v2(own) {
                Ok(base) => {
                    return Setup::Ready(Cgroups::new(Version::V2, base, pids_max));
                }
                Err(reason) => reasons.push(format!("cgroup v2 ({}): {reason}", own.display())),
            }
        }
        if let Some(own) = &location.v1_memory {
            match setup_v1(own) {
                Ok(base) => {
                    return Setup::Ready(Cgroups::new(Version::V1, base, None));
                }
                Err(reason) => reasons.push(format!("cgroup v1 ({}): {reason}", own.display())),
            }
        }
        if reasons.is_empty() {
            reasons.push("no cgroup file system with the memory controller is mounted".into());
        }
        Setup::Unavailable(reasons.join("; "))
    }

    fn new(version: Version, base: PathBuf, pids_max: Option<u64>) -> Cgroups {
        Cgroups {
            version,
            base,
            next: AtomicU64::new(1),
            pids_max,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Where the workers' cgroups are made.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// One line for the log and GetDaemonStatus.
    pub fn describe(&self) -> String {
        match self.version {
            Version::V2 => format!(
                "cgroup v2: each worker in its own cgroup under {}, memory.max = the session's \
                 hard limit, memory.oom.group = 1",
                self.base.display()
            ),
            Version::V1 => format!(
                "cgroup v1: each worker in its own memory cgroup under {}, \
                 memory.limit_in_bytes = the session's hard limit",
                self.base.display()
            ),
        }
    }

    /// Makes the cgroup for one worker about to be spawned.
    pub fn create_worker(&self) -> io::Result<WorkerCgroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.base.join(format!("w-{n}"));
        fs::create_dir(&dir)?;
        let mut made = WorkerCgroup {
            version: self.version,
            procs: None,
            limit: AtomicU64::new(0),
            dir,
        };
        // From here on, dropping `made` removes the directory again.
        if self.version == Version::V2 {
            // Kill the whole session (its subprocesses too) when the kernel kills one.
            write(&made.dir.join("memory.oom.group"), "1")?;
            if let Some(max) = self.pids_max {
                // The pids controller may not be delegated: then there is no such file.
                let _ = write(&made.dir.join("pids.max"), &max.to_string());
            }
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(made.dir.join("cgroup.procs"))?;
        made.procs = Some(OwnedFd::from(procs));
        Ok(made)
    }

    /// Removes the daemon's subtree (its worker cgroups are gone by then) at shutdown. Under
    /// v2 the daemon itself may live in `supervisor`, which cannot be removed while it does:
    /// that leaf and the subtree stay until the next start (or systemd) removes them.
    pub fn remove(&self) {
        let supervisor = self.base.join(SUPERVISOR_LEAF);
        if !supervisor.exists() {
            remove_tree(&self.base);
            return;
        }
        if let Ok(entries) = fs::read_dir(&self.base) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path != supervisor && entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    remove_tree(&path);
                }
            }
        }
    }
}

/// One worker's cgroup. Removed (its processes killed first) when dropped, which the
/// worker's exit watcher does once the worker is reaped.
#[derive(Debug)]
pub struct WorkerCgroup {
    version: Version,
    dir: PathBuf,
    /// `cgroup.procs`, opened before the fork so the child joins with one write.
    procs: Option<OwnedFd>,
    /// The limit last written, in bytes; 0 for none.
    limit: AtomicU64,
}

impl WorkerCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the calling process into this cgroup. Runs in the child between fork and
    /// exec: one write(2) of "0" ("the writer itself") to the fd opened before the fork.
    pub fn join_in_child(&self) -> io::Result<()> {
        let Some(procs) = &self.procs else {
            return Ok(());
        };
        // SAFETY: write(2) on an fd this struct owns, from a static buffer.
        let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if written == 1 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sets the memory limit (`None`: none). Below what the cgroup holds and cannot reclaim,
    /// v1 refuses the write (EBUSY) and v2 takes it and kills: so it is set when the worker
    /// is taken for a session, before anything of the session is loaded into it.
    pub fn set_memory_limit(&self, bytes: Option<u64>) -> io::Result<()> {
        match self.version {
            Version::V2 => {
                let value = bytes.map_or_else(|| "max".to_string(), |b| b.to_string());
                // No swapping past the limit either (v1's memsw below does the same); the
                // file is absent without swap accounting.
                let swap = self.dir.join("memory.swap.max");
                if bytes.is_some() && swap.exists() {
                    write(&swap, "0")?;
                }
                write(&self.dir.join("memory.max"), &value)?;
            }
            Version::V1 => {
                let value = bytes.map_or_else(|| "-1".to_string(), |b| b.to_string());
                // memory.memsw.limit_in_bytes (memory + swap) must never be below
                // memory.limit_in_bytes: raise it first, lower it last. Without swap
                // accounting the file is absent.
                let memsw = self.dir.join("memory.memsw.limit_in_bytes");
                let lowering = bytes.is_some_and(|b| b < self.limit.load(Ordering::SeqCst))
                    || self.limit.load(Ordering::SeqCst) == 0;
                if !lowering && memsw.exists() {
                    write(&memsw, &value)?;
                }
                write(&self.dir.join("memory.limit_in_bytes"), &value)?;
                if lowering && memsw.exists() {
                    write(&memsw, &value)?;
                }
            }
        }
        self.limit.store(bytes.unwrap_or(0), Ordering::SeqCst);
        Ok(())
    }

    /// The limit last set, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::SeqCst)).filter(|&limit| limit > 0)
    }

    /// Memory charged to the cgroup now (anonymous, page cache, kernel), in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the kernel's OOM killer killed a process here because this cgroup's own
    /// limit was reached — not a machine-wide OOM, nor a parent's limit (systemd's
    /// MemoryMax, a container's limit), which raise the kill counter too. Under v2,
    /// `memory.events.local`: `oom` counts this cgroup reaching its own limit, `oom_kill`
    /// the kills. Under v1, the cgroup's peak (`memory.max_usage_in_bytes`) reached its own
    /// limit, and `memory.oom_control`'s `oom_kill` counts the kills.
    pub fn killed_at_own_limit(&self) -> bool {
        let read = |file: &str| fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        match self.version {
            Version::V2 => {
                let events = read("memory.events.local");
                counter(&events, "oom") > 0 && counter(&events, "oom_kill") > 0
            }
            Version::V1 => {
                // The failure counters stay 0 when memsw is set to the same limit (measured
                // on Linux 6.18), so: did the cgroup's peak reach its own limit?
                let number = |file: &str| read(file).trim().parse::<u64>().unwrap_or(0);
                let limit = self.limit.load(Ordering::SeqCst);
                let reached = limit > 0
                    && number("memory.max_usage_in_bytes")
                        .max(number("memory.memsw.max_usage_in_bytes"))
                        >= limit;
                (reached || number("memory.failcnt") > 0)
                    && counter(&read("memory.oom_control"), "oom_kill") > 0
            }
        }
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        self.procs = None;
        remove_leaf(&self.dir);
    }
}

/// `key N` from a flat-keyed cgroup file (`memory.events`, `memory.oom_control`).
fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}

/// The cgroup directories of this process: the v2 one (from the `0::` line, under the
/// cgroup2 mount) and the v1 memory one (the line whose controllers include `memory`, under
/// the v1 mount with the memory option). A mount's root (a container's bind mount of part of
/// the tree) is taken off the membership path before joining.
fn locate(mountinfo: &str, membership: &str) -> Location {
    let mut v2_mount = None;
    let mut v1_memory_mount = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mut rest = after.split(' ');
        let fstype = rest.next().unwrap_or_default();
        let options = rest.nth(1).unwrap_or_default();
        match fstype {
            "cgroup2" if v2_mount.is_none() => {
                v2_mount = Some((root.to_string(), PathBuf::from(point)));
            }
            "cgroup" if options.split(',').any(|option| option == "memory") => {
                v1_memory_mount = Some((root.to_string(), PathBuf::from(point)));
            }
            _ => {}
        }
    }
    let mut location = Location::default();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let join = |(root, point): &(String, PathBuf)| {
            let relative = path
                .strip_prefix(root.as_str())
                .filter(|_| root != "/")
                .unwrap_or(path)
                .trim_start_matches('/');
            point.join(relative)
        };
        if id == "0" && controllers.is_empty() {
            location.v2 = v2_mount.as_ref().map(join);
        } else if controllers.split(',').any(|c| c == "memory") {
            location.v1_memory = v1_memory_mount.as_ref().map(join);
        }
    }
    location
}

/// Where the daemon moves itself under v2 (see the module doc).
const SUPERVISOR_LEAF: &str = "supervisor";

fn subtree_name() -> String {
    format!("tfsd-{}", std::process::id())
}

fn setup_v1(own: &Path) -> Result<PathBuf, String> {
    remove_stale(own);
    let base = own.join(subtree_name());
    fs::create_dir(&base).map_err(|error| format!("cannot create {}: {error}", base.display()))?;
    Ok(base)
}

fn setup_v2(own: &Path) -> Result<PathBuf, String> {
    let controllers = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(
            "the memory controller is not delegated to tfsd's cgroup (systemd: \
                    Delegate=yes; a container: its own cgroup namespace)"
                .into(),
        );
    }
    remove_stale(own);
    let base = own.join(subtree_name());
    fs::create_dir(&base).map_err(|error| format!("cannot create {}: {error}", base.display()))?;
    let enabled = |dir: &Path| {
        fs::read_to_string(dir.join("cgroup.subtree_control"))
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| c == "memory")
    };
    let mut enabled_in_own = false;
    let result = (|| {
        if !enabled(own) {
            // No process may stay in a cgroup that passes controllers down: move the daemon
            // into a leaf of its own first. Only when it is alone there: a cgroup shared
            // with other processes is not tfsd's to rearrange.
            let others = fs::read_to_string(own.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter(|pid| pid.trim() != std::process::id().to_string())
                .count();
            if others > 0 {
                return Err(format!(
                    "{others} other processes share tfsd's cgroup, so it cannot enable the \
                     memory controller for its children; give tfsd a cgroup of its own \
                     (systemd: Delegate=yes)"
                ));
            }
            let leaf = base.join(SUPERVISOR_LEAF);
            fs::create_dir(&leaf).map_err(|e| format!("{}: {e}", leaf.display()))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(|e| e.to_string())?;
            enable_controllers(own, &controllers)?;
            enabled_in_own = true;
        }
        enable_controllers(&base, &controllers)
    })();
    match result {
        Ok(()) => Ok(base),
        Err(reason) => {
            // Undo in reverse: the controllers first (a cgroup that passes them down may
            // hold no process), then the daemon back where it started.
            if enabled_in_own {
                let _ = write(&own.join("cgroup.subtree_control"), "-pids");
                let _ = write(&own.join("cgroup.subtree_control"), "-memory");
            }
            let _ = write(&own.join("cgroup.procs"), &std::process::id().to_string());
            remove_tree(&base);
            Err(reason)
        }
    }
}

/// Enables memory (and pids, where the parent has it) for `dir`'s children.
fn enable_controllers(dir: &Path, available: &str) -> Result<(), String> {
    let file = dir.join("cgroup.subtree_control");
    write(&file, "+memory").map_err(|e| e.to_string())?;
    if available.split_whitespace().any(|c| c == "pids") {
        let _ = write(&file, "+pids");
    }
    Ok(())
}

/// Removes the subtrees (`tfsd-<pid>`) that daemons which are no longer running left in
/// `own`: the workers in them died with their daemon (PR_SET_PDEATHSIG), but a cgroup
/// outlives its processes.
fn remove_stale(own: &Path) {
    let Ok(entries) = fs::read_dir(own) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("tfsd-"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if process_exists(pid) {
            continue;
        }
        tracing::info!(cgroup = %entry.path().display(), "removing the cgroups a stopped daemon left");
        remove_tree(&entry.path());
    }
}

/// Whether a process with this pid runs, asked of the kernel (kill with signal 0), not of
/// /proc, which hidepid or another pid namespace's mount can hide.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes a directory of cgroups, leaves first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    remove_leaf(dir);
}

/// Removes one cgroup, killing what still runs in it; the kernel refuses (EBUSY) while a
/// process is in it, and a killed one leaves a moment later.
fn remove_leaf(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return,
            Err(error) => {
                if Instant::now() >= deadline {
                    tracing::warn!(cgroup = %dir.display(), %error, "could not remove a worker's cgroup");
                    return;
                }
            }
        }
        kill_members(dir);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs every process in the cgroup but the daemon itself (which lives in its subtree's
/// supervisor leaf under v2). Through a pidfd, checked to still be a member after it was
/// opened: a pid read from `cgroup.procs` may have exited and been reused by a process
/// elsewhere by the time it is signalled.
fn kill_members(dir: &Path) {
    let procs = dir.join("cgroup.procs");
    let members = |text: &str| -> Vec<i32> {
        text.lines()
            .filter_map(|pid| pid.trim().parse::<i32>().ok())
            .collect()
    };
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    for pid in members(&fs::read_to_string(&procs).unwrap_or_default()) {
        if pid <= 0 || pid == own {
            continue;
        }
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let Ok(fd) = i32::try_from(fd) else { continue };
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if members(&fs::read_to_string(&procs).unwrap_or_default()).contains(&pid) {
            // SAFETY: pidfd_send_signal(2) on the pidfd above; no memory is passed.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
38 33 0:33 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
39 33 0:34 / /sys/fs/cgroup/pids rw,nosuid shared:16 - cgroup cgroup rw,pids
";

    #[test]
    fn finds_both_hierarchies_on_a_hybrid_host() {
        let membership = "9:pids:/\n4:memory:/process_api/abc\n0::/user.slice\n";
        let location = locate(MOUNTINFO, membership);
        assert_eq!(
            location.v1_memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            location.v2,
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice"))
        );
    }

    #[test]
    fn a_pure_v2_host_has_no_v1_memory_cgroup() {
        let mountinfo =
            "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let location = locate(mountinfo, "0::/system.slice/tfsd.service\n");
        assert_eq!(
            location.v2,
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/tfsd.service"))
        );
        assert_eq!(location.v1_memory, None);
    }

    #[test]
    fn a_bind_mounted_subtree_is_joined_below_its_root() {
        // A container that sees its host's cgroup path but only its own part mounted.
        let mountinfo = "30 25 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let location = locate(mountinfo, "0::/kubepods/pod1/ctr\n");
        assert_eq!(location.v2, Some(PathBuf::from("/sys/fs/cgroup/ctr")));
    }

    #[test]
    fn nothing_is_found_without_cgroup_mounts() {
        let location = locate("", "0::/\n");
        assert_eq!(location, Location::default());
    }

    /// A directory standing in for a v2 cgroup: its interface files as plain files.
    fn fake_v2_cgroup(controllers: &str, procs: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tfsd-fake-cgroup-{}-{}",
            std::process::id(),
            controllers.len() + procs.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("cgroup.controllers"), controllers).expect("controllers");
        fs::write(dir.join("cgroup.subtree_control"), "").expect("subtree_control");
        fs::write(dir.join("cgroup.procs"), procs).expect("procs");
        dir
    }

    #[test]
    fn v2_without_the_memory_controller_says_delegation_is_missing() {
        let own = fake_v2_cgroup("cpu io", "");
        let error = setup_v2(&own).expect_err("no memory controller");
        assert!(error.contains("Delegate=yes"), "{error}");
        assert!(!own.join(subtree_name()).exists());
        fs::remove_dir_all(own).expect("clean up");
    }

    #[test]
    fn v2_refuses_to_rearrange_a_cgroup_shared_with_other_processes() {
        let procs = format!("1\n{}\n", std::process::id());
        let own = fake_v2_cgroup("memory pids", &procs);
        let error = setup_v2(&own).expect_err("shared cgroup");
        assert!(error.contains("1 other processes share"), "{error}");
        // What it made on the way is gone again, and it wrote no setting.
        assert!(!own.join(subtree_name()).exists());
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).expect("read"),
            ""
        );
        fs::remove_dir_all(own).expect("clean up");
    }

    #[test]
    fn reads_the_oom_kill_counter_of_either_version() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(v1, "oom_kill"), 2);
        assert_eq!(counter(v2, "oom_kill"), 1);
        assert_eq!(counter(v2, "oom_group_kill"), 0);
        assert_eq!(counter("", "oom_kill"), 0);
    }
}
