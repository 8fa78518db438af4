//! Scratch directories: one per worker (mode 0700, named `DAEMONPID-N`), the only place it
//! may write, under a root that is `<state.dir>/scratch` or, without a state directory, a
//! directory of this daemon's own in the system's temporary directory
//! (`tfsd-scratch-PID-1`, removed at exit). With `workers.user` (always, for a daemon
//! started as root) the root is the temporary one even with a state directory: that
//! directory is 0700, the daemon's alone. What a daemon killed with SIGKILL left behind is
//! removed by the next one: directories named after a process that no longer runs.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};

use super::WorkerUser;

/// Prefix of a daemon's private scratch root in the temporary directory.
const TEMP_ROOT_PREFIX: &str = "tfsd-scratch-";

#[derive(Debug)]
pub struct ScratchRoot {
    path: PathBuf,
    /// A private root in the temporary directory, removed when the daemon ends.
    private: bool,
    /// Who owns the workers' directories (`workers.user`), if not the daemon's user.
    owner: Option<(u32, u32)>,
    next: AtomicU64,
}

impl ScratchRoot {
    /// Makes the root (`state_dir/scratch`, or a private one in the temporary directory)
    /// and removes what dead daemons left there. With `user`, the root is traversable
    /// (0711) so that the user reaches its own directory in it, and so must its ancestors be.
    pub fn new(state_dir: Option<&Path>, user: Option<&WorkerUser>) -> anyhow::Result<ScratchRoot> {
        let mode = if user.is_some() { 0o711 } else { 0o700 };
        // With workers.user, not in the state directory: that one is 0700, the daemon's
        // alone, and must stay so.
        if let Some(dir) = state_dir.filter(|_| user.is_some()) {
            // A daemon that ran without a user may have left workers' directories there.
            remove_stale_workers(&dir.join("scratch"));
        }
        let (path, private) = match state_dir.filter(|_| user.is_none()) {
            Some(dir) => {
                let path = dir.join("scratch");
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
                    .with_context(|| format!("make the scratch directory {}", path.display()))?;
                remove_stale_workers(&path);
                (path, false)
            }
            None => {
                let temp = std::env::temp_dir();
                remove_stale_roots(&temp);
                // Numbered: one daemon has one sandbox, but the unit tests make many in one
                // process, and each removes its own root when dropped.
                // A name another user took first (the temporary directory is everyone's)
                // is passed over, not a reason to refuse to start.
                static ROOTS: AtomicU64 = AtomicU64::new(1);
                let mut attempts = 0;
                let path = loop {
                    let path = temp.join(format!(
                        "{TEMP_ROOT_PREFIX}{}-{}",
                        std::process::id(),
                        ROOTS.fetch_add(1, Ordering::Relaxed)
                    ));
                    match make_private_root(&path) {
                        Ok(()) => break path,
                        Err(error) if attempts < 16 => {
                            tracing::warn!("{error:#}; trying another name");
                            attempts += 1;
                        }
                        Err(error) => return Err(error),
                    }
                };
                (path, true)
            }
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("set the mode of {}", path.display()))?;
        if let Some(user) = user {
            ensure_traversable(&path, user)?;
        }
        Ok(ScratchRoot {
            path,
            private,
            owner: user.map(|user| (user.uid, user.gid)),
            next: AtomicU64::new(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes a new worker's directory (0700, owned by the workers' user).
    pub fn make_worker_dir(&self) -> io::Result<ScratchDir> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.path.join(format!("{}-{number}", std::process::id()));
        DirBuilder::new().mode(0o700).create(&path)?;
        let dir = ScratchDir { path };
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid))?;
        }
        Ok(dir)
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        if self.private {
            remove_tree(&self.path);
        }
    }
}

/// One worker's scratch directory, removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Makes `path` (mode 0700). One left by an earlier daemon of the same pid is ours to
/// replace if it is a directory we own; anything else there (someone else's, a link) is
/// refused.
fn make_private_root(path: &Path) -> anyhow::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => {
            return Err(error)
                .with_context(|| format!("make the scratch directory {}", path.display()));
        }
    }
    let metadata =
        std::fs::symlink_metadata(path).with_context(|| format!("inspect {}", path.display()))?;
    // SAFETY: geteuid has no preconditions.
    if !metadata.is_dir() || metadata.uid() != unsafe { libc::geteuid() } {
        bail!(
            "{} exists and is not a directory of this user's",
            path.display()
        );
    }
    remove_tree(path);
    DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("make the scratch directory {}", path.display()))
}

/// Removes the private roots of daemons that no longer run (owned by this user).
fn remove_stale_roots(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(TEMP_ROOT_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = std::fs::symlink_metadata(entry.path())
            .is_ok_and(|metadata| metadata.is_dir() && metadata.uid() == me);
        if ours && pid != std::process::id() && !process_exists(pid) {
            tracing::info!(dir = %entry.path().display(), "removing a dead daemon's scratch directory");
            remove_tree(&entry.path());
        }
    }
}

/// Removes the workers' directories of daemons that no longer run (`PID-N`).
fn remove_stale_workers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // Our own pid too: this daemon has made none yet, so one with its pid was left by an
        // earlier daemon that had the same pid (a container's daemon is pid 1 every time).
        if pid == std::process::id() || !process_exists(pid) {
            remove_tree(&entry.path());
        }
    }
}

/// Asked of the kernel (kill with signal 0), not of /proc, which hidepid can hide.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Every directory from `/` to `path` must let `user` through (search permission), or the
/// worker could not reach its own directory.
fn ensure_traversable(path: &Path, user: &WorkerUser) -> anyhow::Result<()> {
    super::user::ensure_traversable(user, &path.join("worker")).with_context(|| {
        format!(
            "workers.user = {} cannot reach the scratch directory {} (chmod o+x, or choose \
             another state.dir)",
            user.name,
            path.display()
        )
    })
}

/// Removes a tree, even one whose directories the worker made unwritable (chmod 0500):
/// on failure, give every directory back its owner's rights and try again.
pub fn remove_tree(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return,
        Err(_) => {}
    }
    restore_dir_modes(path, 0);
    if let Err(error) = std::fs::remove_dir_all(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %path.display(), %error, "could not remove a worker's scratch directory");
    }
}

/// Gives every directory of the tree its owner's rights back, never following a link: each
/// directory is opened with O_NOFOLLOW, changed through its fd, and listed and descended
/// through that fd (`/proc/self/fd/N/...`), never through its path again (a worker's
/// leftover process could swap a directory for a link to /etc in between).
fn restore_dir_modes(dir: &Path, depth: usize) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if depth > 256 {
        return;
    }
    let Ok(opened) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir)
    else {
        return;
    };
    let _ = opened.set_permissions(std::fs::Permissions::from_mode(0o700));
    let here = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
    let Ok(entries) = std::fs::read_dir(&here) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            restore_dir_modes(&here.join(entry.file_name()), depth + 1);
        }
    }
}
