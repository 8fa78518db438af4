//! `workers.user`: the user workers run as, looked up in the system's user database when
//! the config is read (never in the forked child, where the lookup could allocate or lock).

use std::ffi::CString;
use std::io;
use std::path::Path;

use anyhow::{Context, bail};

/// The user workers run as (`workers.user`), looked up when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `workers.user` (a user name, or a uid as a number or a string) with the
/// system's user database. Root is refused: the point is to not run workers as root.
pub fn resolve_worker_user(value: &toml::Value) -> anyhow::Result<WorkerUser> {
    let found = match value {
        toml::Value::Integer(uid) => {
            let uid = u32::try_from(*uid)
                .with_context(|| format!("workers.user = {uid} is not a valid uid"))?;
            lookup_user(UserKey::Uid(uid))
        }
        toml::Value::String(text) if !text.is_empty() => match text.parse::<u32>() {
            Ok(uid) => lookup_user(UserKey::Uid(uid)),
            Err(_) => lookup_user(UserKey::Name(text)),
        },
        other => bail!("workers.user = {other} is not a user name or uid"),
    }
    .with_context(|| format!("look up workers.user = {value}"))?;
    let Some(user) = found else {
        bail!("workers.user = {value} is not a user on this machine (getent passwd)");
    };
    if user.uid == 0 {
        bail!(
            "workers.user = {value} is root (uid 0): workers would keep every privilege. \
             Name an unprivileged user (e.g. a dedicated `tfsd-worker` user), or leave \
             workers.user unset"
        );
    }
    Ok(user)
}

/// The user a root daemon's workers run as when `workers.user` is unset: `nobody`, the
/// unprivileged account every Linux system has (uid 65534 where the name is missing).
pub fn default_worker_user() -> anyhow::Result<WorkerUser> {
    // Some NSS modules answer "not found" with an errno (ENOENT, ESRCH, EPERM...): any
    // failure counts as not found here, and the overflow uid is the fallback.
    let found = lookup_user(UserKey::Name("nobody"))
        .ok()
        .flatten()
        .or_else(|| lookup_user(UserKey::Uid(NOBODY_UID)).ok().flatten());
    let user = found.unwrap_or(WorkerUser {
        name: "nobody".to_string(),
        uid: NOBODY_UID,
        gid: NOBODY_UID,
    });
    if user.uid == 0 {
        bail!(
            "the daemon runs as root, workers.user is unset, and this machine's `nobody` is \
             root: set workers.user to an unprivileged user"
        );
    }
    tracing::warn!(
        "workers.user is unset and the daemon runs as root: workers run as {} (uid {}), \
         which other services of this host may share; set workers.user to a user of \
         tfsd's own",
        user.name,
        user.uid
    );
    Ok(user)
}

/// The overflow uid the kernel and the distributions give `nobody`.
const NOBODY_UID: u32 = 65534;

/// Access a user has to a file by its mode bits alone, as the kernel checks them for a
/// process without supplementary groups (which workers drop): owner, else primary group,
/// else others. ACLs are not read: a path they open is reported unreachable, one they close
/// fails at the worker's start instead.
fn permits(user: &WorkerUser, metadata: &std::fs::Metadata, read: bool, execute: bool) -> bool {
    use std::os::unix::fs::MetadataExt;
    let shift = if metadata.uid() == user.uid {
        6
    } else if metadata.gid() == user.gid {
        3
    } else {
        0
    };
    let bits = (metadata.mode() >> shift) & 0o7;
    (!read || bits & 0o4 != 0) && (!execute || bits & 0o1 != 0)
}

/// Every directory above `path` lets `user` through (search permission).
pub fn ensure_traversable(user: &WorkerUser, path: &Path) -> anyhow::Result<()> {
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let metadata =
            std::fs::metadata(dir).with_context(|| format!("inspect {}", dir.display()))?;
        if !permits(user, &metadata, false, true) {
            bail!(
                "{} cannot reach {}: {} is not searchable by it (mode {:o})",
                user.name,
                path.display(),
                dir.display(),
                std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777
            );
        }
    }
    Ok(())
}

/// `user` can exec `program`: through the path as given (a venv's `bin/python`, whose
/// environment is found next to it) and through where its links lead.
pub fn ensure_runnable(user: &WorkerUser, program: &Path) -> anyhow::Result<()> {
    ensure_traversable(user, program)?;
    let target =
        std::fs::canonicalize(program).with_context(|| format!("resolve {}", program.display()))?;
    ensure_traversable(user, &target)?;
    let metadata =
        std::fs::metadata(&target).with_context(|| format!("inspect {}", target.display()))?;
    if !permits(user, &metadata, true, true) {
        bail!("{} cannot read and execute {}", user.name, target.display());
    }
    Ok(())
}

/// `user` can list and enter `dir` (a library directory).
pub fn ensure_listable(user: &WorkerUser, dir: &Path) -> anyhow::Result<()> {
    let target =
        std::fs::canonicalize(dir).with_context(|| format!("resolve {}", dir.display()))?;
    ensure_traversable(user, &target)?;
    let metadata =
        std::fs::metadata(&target).with_context(|| format!("inspect {}", target.display()))?;
    if !permits(user, &metadata, true, true) {
        bail!("{} cannot list {}", user.name, target.display());
    }
    Ok(())
}

enum UserKey<'a> {
    Name(&'a str),
    Uid(u32),
}

/// getpwnam_r / getpwuid_r, growing the buffer on ERANGE.
fn lookup_user(key: UserKey<'_>) -> io::Result<Option<WorkerUser>> {
    let name = match key {
        UserKey::Name(name) => {
            Some(CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?)
        }
        UserKey::Uid(_) => None,
    };
    let mut buffer = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpw*_r to fill.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let status = unsafe {
            match (&name, &key) {
                (Some(name), _) => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, UserKey::Uid(uid)) => libc::getpwuid_r(
                    *uid,
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, UserKey::Name(_)) => unreachable!("a name lookup has its CString"),
            }
        };
        if status == libc::ERANGE && buffer.len() < (1 << 20) {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if status != 0 {
            return Err(io::Error::from_raw_os_error(status));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buffer`.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) }
            .to_string_lossy()
            .to_string();
        return Ok(Some(WorkerUser {
            name,
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        }));
    }
}
