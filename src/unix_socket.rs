//! The tfsd.v1 Unix-domain socket (`server.unix_socket`): its settings, and its file's life.
//!
//! Local clients (training processes on the same host, the operator's CLI) reach tfsd.v1
//! through a socket file instead of TCP: no TCP stack on the path, and the kernel tells the
//! daemon who connected (SO_PEERCRED: the peer's uid, which `[[auth.peers]]` maps to a
//! principal, `crate::auth`). This module owns the file, not the serving (`crate::grpc`):
//!
//! - **Bind without a window**: the socket is bound under a temporary name in the same
//!   directory, given its mode and group, and only then renamed onto the configured path, so
//!   that nobody ever connects to it with the umask's permissions, and a stale file is replaced
//!   in one step.
//! - **Stale or live**: a socket file whose listener is gone (a killed daemon's: connecting is
//!   refused) is replaced; a path where something still accepts connections (another tfsd), or
//!   that is not a socket at all, is refused at start with a message naming it.
//! - **Removed at exit**: the file is removed when the daemon stops, but only if it is still
//!   the one this daemon bound (same device and inode), so a daemon never deletes a successor's.
//!
//! It must not touch the session domain or the gRPC services.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The socket file's permission bits when `server.unix_socket_mode` is not set: the daemon's
/// user and group may connect (connecting needs write permission on the file), nobody else.
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o660;

/// The longest path a Unix socket address holds: `sun_path` is 108 bytes, NUL included.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The temporary name the socket is bound under before it is renamed into place: in the same
/// directory (a rename cannot cross file systems), unique per daemon.
fn temporary_name(pid: u32) -> String {
    format!(".tfsd-{pid}.bind")
}

/// The longest temporary path below the socket's directory (`pid_max` is at most 4194304:
/// 7 digits).
const MAX_TEMPORARY_NAME_BYTES: usize = ".tfsd-4194304.bind/s".len();

/// `server.unix_socket*`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketConfig {
    /// Where the socket file is (resolved against the config file's directory).
    pub path: PathBuf,
    /// Permission bits of the socket file (at most 0o777).
    pub mode: u32,
    /// The socket file's group; `None`: the daemon's own (primary) group.
    pub group: Option<SocketGroup>,
}

/// A group from the system's group database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

impl UnixSocketConfig {
    /// Validates `server.unix_socket`, `server.unix_socket_mode` and
    /// `server.unix_socket_group`. No path (or `""`) switches the socket off; a mode or group
    /// without a path is an error.
    pub fn from_raw(
        path: Option<PathBuf>,
        mode: Option<&toml::Value>,
        group: Option<&toml::Value>,
        base: &Path,
    ) -> anyhow::Result<Option<UnixSocketConfig>> {
        let Some(path) = path.filter(|path| !path.as_os_str().is_empty()) else {
            if mode.is_some() || group.is_some() {
                bail!(
                    "server.unix_socket_mode and server.unix_socket_group need server.unix_socket \
                     (the Unix socket is off without it)"
                );
            }
            return Ok(None);
        };
        let path = base.join(path);
        check_path_length(&path)?;
        let mode = match mode {
            None => DEFAULT_UNIX_SOCKET_MODE,
            Some(value) => parse_mode(value)?,
        };
        let group = group.map(resolve_group).transpose()?;
        Ok(Some(UnixSocketConfig { path, mode, group }))
    }

    /// `unix:PATH`, the address clients use (the CLI's `--address`, grpcio's target).
    pub fn address(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

fn check_path_length(path: &Path) -> anyhow::Result<()> {
    let length = path.as_os_str().len();
    let directory = path.parent().map_or(0, |dir| dir.as_os_str().len());
    if length > MAX_SOCKET_PATH_BYTES
        || directory + 1 + MAX_TEMPORARY_NAME_BYTES > MAX_SOCKET_PATH_BYTES
    {
        bail!(
            "server.unix_socket = {} is too long: a Unix socket's path holds at most \
             {MAX_SOCKET_PATH_BYTES} bytes (and tfsd first binds a temporary name of up to \
             {MAX_TEMPORARY_NAME_BYTES} bytes in the same directory); choose a shorter one, \
             e.g. /run/tfsd/tfsd.sock",
            path.display()
        );
    }
    Ok(())
}

/// `server.unix_socket_mode`: an octal string ("0660", "660", "0o660") or a TOML integer
/// (`0o660`), permission bits only.
fn parse_mode(value: &toml::Value) -> anyhow::Result<u32> {
    let invalid = || {
        format!(
            "server.unix_socket_mode = {value} is not a file mode: write it in octal, \
             like \"0660\" (permission bits only, at most 0777)"
        )
    };
    let mode = match value {
        toml::Value::Integer(number) => u32::try_from(*number).ok(),
        toml::Value::String(text) => {
            let digits = text.strip_prefix("0o").unwrap_or(text);
            if digits.is_empty() || !digits.bytes().all(|byte| (b'0'..=b'7').contains(&byte)) {
                None
            } else {
                u32::from_str_radix(digits, 8).ok()
            }
        }
        _ => None,
    };
    match mode {
        Some(mode) if mode <= 0o777 => Ok(mode),
        _ => bail!(invalid()),
    }
}

/// `server.unix_socket_group`: a group name, or a gid as a number or a string.
fn resolve_group(value: &toml::Value) -> anyhow::Result<SocketGroup> {
    let key = match value {
        toml::Value::Integer(gid) => AccountKey::Id(
            u32::try_from(*gid)
                .with_context(|| format!("server.unix_socket_group = {gid} is not a valid gid"))?,
        ),
        toml::Value::String(text) if !text.is_empty() => match text.parse::<u32>() {
            Ok(gid) => AccountKey::Id(gid),
            Err(_) => AccountKey::Name(text),
        },
        other => bail!("server.unix_socket_group = {other} is not a group name or gid"),
    };
    lookup_group(key)
        .with_context(|| format!("look up server.unix_socket_group = {value}"))?
        .with_context(|| {
            format!(
                "server.unix_socket_group = {value} is not a group on this machine (getent group)"
            )
        })
}

/// A user name or a numeric id, to look up in the system's databases.
#[derive(Debug, Clone, Copy)]
pub enum AccountKey<'a> {
    Name(&'a str),
    Id(u32),
}

/// The uid and name of a user in the system's user database (getpwnam_r / getpwuid_r).
pub fn lookup_user(key: AccountKey<'_>) -> io::Result<Option<(u32, String)>> {
    let name = match key {
        AccountKey::Name(name) => Some(CString::new(name).map_err(|_| invalid_input())?),
        AccountKey::Id(_) => None,
    };
    with_growing_buffer(|buffer| {
        // SAFETY: an all-zero passwd is a valid value for getpw*_r to fill.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let status = unsafe {
            match (&name, key) {
                (Some(name), _) => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, AccountKey::Id(uid)) => libc::getpwuid_r(
                    uid,
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, AccountKey::Name(_)) => unreachable!("a name lookup has its CString"),
            }
        };
        if status != 0 || result.is_null() {
            return (status, None);
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buffer`.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) }.to_string_lossy();
        (0, Some((entry.pw_uid, name.to_string())))
    })
}

/// A group in the system's group database (getgrnam_r / getgrgid_r).
fn lookup_group(key: AccountKey<'_>) -> io::Result<Option<SocketGroup>> {
    let name = match key {
        AccountKey::Name(name) => Some(CString::new(name).map_err(|_| invalid_input())?),
        AccountKey::Id(_) => None,
    };
    with_growing_buffer(|buffer| {
        // SAFETY: an all-zero group is a valid value for getgr*_r to fill.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let status = unsafe {
            match (&name, key) {
                (Some(name), _) => libc::getgrnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, AccountKey::Id(gid)) => libc::getgrgid_r(
                    gid,
                    &mut entry,
                    buffer.as_mut_ptr(),
                    buffer.len(),
                    &mut result,
                ),
                (None, AccountKey::Name(_)) => unreachable!("a name lookup has its CString"),
            }
        };
        if status != 0 || result.is_null() {
            return (status, None);
        }
        // SAFETY: on success gr_name points at a NUL-terminated string inside `buffer`.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.gr_name) }.to_string_lossy();
        (
            0,
            Some(SocketGroup {
                name: name.to_string(),
                gid: entry.gr_gid,
            }),
        )
    })
}

fn invalid_input() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

/// Runs a getpw*_r / getgr*_r call, doubling its buffer while it answers ERANGE.
fn with_growing_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut buffer = vec![0 as libc::c_char; 4096];
    loop {
        let (status, found) = call(&mut buffer);
        if status == libc::ERANGE && buffer.len() < (1 << 20) {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if status != 0 {
            return Err(io::Error::from_raw_os_error(status));
        }
        return Ok(found);
    }
}

/// The socket file this daemon bound: removed by `remove` (or on drop) if it is still that
/// file.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the socket this daemon bound; idempotent.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| metadata.dev() == self.device && metadata.ino() == self.inode);
        if ours && let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove the Unix socket");
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds the socket (see the module's documentation): refuses a live socket or a non-socket
/// at the path, replaces a stale socket, and puts the file in place with its mode and group.
/// Needs a tokio runtime (the listener is registered with it).
pub fn bind(config: &UnixSocketConfig) -> anyhow::Result<(tokio::net::UnixListener, SocketFile)> {
    let path = &config.path;
    let shown = path.display();
    let directory = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !directory.is_dir() {
        bail!(
            "server.unix_socket = {shown}: the directory {} does not exist (tfsd does not \
             create it: make it with the permissions you want; systemd's RuntimeDirectory=tfsd \
             makes /run/tfsd)",
            directory.display()
        );
    }
    check_existing(path)?;
    // Bound inside a directory of the daemon's own (0700), so that nobody can connect to it
    // while it still has the umask's mode, and nobody can swap it for a link before its mode
    // and group are set through its path; then renamed into place.
    let private = directory.join(temporary_name(std::process::id()));
    // A leftover of an earlier daemon with the same pid (a container restarts as pid 1).
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if std::fs::symlink_metadata(&private)
        .is_ok_and(|metadata| metadata.file_type().is_dir() && metadata.uid() == euid)
    {
        let _ = std::fs::remove_dir_all(&private);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| {
            format!(
                "server.unix_socket: make the private directory {} to bind in",
                private.display()
            )
        })?;
    let temporary = private.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&temporary)
        .with_context(|| format!("server.unix_socket: bind {}", temporary.display()))
        .and_then(|listener| place(config, &temporary).map(|file| (listener, file)));
    let _ = std::fs::remove_dir_all(&private);
    let (listener, file) = bound?;
    listener
        .set_nonblocking(true)
        .context("server.unix_socket: make the socket non-blocking")?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .context("server.unix_socket: register the socket")?;
    Ok((listener, file))
}

/// Refuses what must not be replaced at `path`: a socket something still listens on, or
/// anything that is not a socket. A socket nobody listens on is stale: the rename replaces it.
fn check_existing(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!("server.unix_socket = {shown}: cannot inspect it: {error}"),
    };
    let kind = metadata.file_type();
    if !kind.is_socket() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        bail!(
            "server.unix_socket = {shown} exists and is {what}, not a socket: tfsd replaces only \
             a stale socket. Remove it, or choose another path"
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "server.unix_socket = {shown}: another process (another tfsd?) accepts connections \
             there. Stop it, or choose another path"
        ),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %shown, "replacing a stale Unix socket (nobody listens on it)");
            Ok(())
        }
        Err(error) => bail!(
            "server.unix_socket = {shown}: a socket is there and tfsd cannot tell whether \
             something listens on it ({error}): remove it if it is stale"
        ),
    }
}

/// Gives the freshly bound socket at `temporary` its mode and group, and renames it onto
/// the configured path.
fn place(config: &UnixSocketConfig, temporary: &Path) -> anyhow::Result<SocketFile> {
    std::fs::set_permissions(temporary, std::fs::Permissions::from_mode(config.mode))
        .with_context(|| {
            format!(
                "server.unix_socket: set mode {:04o} on {}",
                config.mode,
                temporary.display()
            )
        })?;
    if let Some(group) = &config.group {
        std::os::unix::fs::chown(temporary, None, Some(group.gid)).with_context(|| {
            format!(
                "server.unix_socket_group = {:?}: give the socket to group {} (gid {}); tfsd \
                 must run as root or be a member of that group",
                group.name, group.name, group.gid
            )
        })?;
    }
    std::fs::rename(temporary, &config.path).with_context(|| {
        format!(
            "server.unix_socket: move the socket into place at {}",
            config.path.display()
        )
    })?;
    let metadata = std::fs::symlink_metadata(&config.path)
        .with_context(|| format!("server.unix_socket: inspect {}", config.path.display()))?;
    Ok(SocketFile {
        path: config.path.clone(),
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> toml::Value {
        toml::from_str::<toml::Table>(&format!("v = {text}")).expect("toml")["v"].clone()
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        for (text, mode) in [
            ("\"0660\"", 0o660),
            ("\"660\"", 0o660),
            ("\"0o600\"", 0o600),
            ("0o666", 0o666),
            ("\"0\"", 0),
        ] {
            assert_eq!(parse_mode(&value(text)).expect(text), mode, "{text}");
        }
        for text in [
            "\"0888\"",
            "\"01777\"",
            "\"rw-rw----\"",
            "\"\"",
            "4095",
            "true",
        ] {
            let error = parse_mode(&value(text)).expect_err(text).to_string();
            assert!(error.contains("server.unix_socket_mode"), "{error}");
        }
    }

    #[test]
    fn groups_resolve_by_name_or_gid() {
        let root = resolve_group(&value("\"root\"")).expect("root group");
        assert_eq!(root.gid, 0);
        assert_eq!(resolve_group(&value("0")).expect("gid 0").name, root.name);
        assert_eq!(
            resolve_group(&value("\"0\"")).expect("gid \"0\"").name,
            root.name
        );
        let error = resolve_group(&value("\"no-such-group-tfsd\"")).expect_err("unknown");
        assert!(format!("{error:#}").contains("not a group"), "{error:#}");
        let error = resolve_group(&value("-1")).expect_err("negative");
        assert!(
            format!("{error:#}").contains("not a valid gid"),
            "{error:#}"
        );
    }

    #[test]
    fn the_socket_is_off_without_a_path_and_its_settings_need_one() {
        let base = Path::new("/etc/tfsd");
        assert_eq!(
            UnixSocketConfig::from_raw(None, None, None, base).expect("off"),
            None
        );
        assert_eq!(
            UnixSocketConfig::from_raw(Some(PathBuf::new()), None, None, base).expect("off"),
            None
        );
        let error = UnixSocketConfig::from_raw(None, Some(&value("\"0600\"")), None, base)
            .expect_err("mode without path");
        assert!(
            format!("{error:#}").contains("need server.unix_socket"),
            "{error:#}"
        );
        let config = UnixSocketConfig::from_raw(Some("run/tfsd.sock".into()), None, None, base)
            .expect("valid")
            .expect("on");
        assert_eq!(config.path, Path::new("/etc/tfsd/run/tfsd.sock"));
        assert_eq!(config.mode, DEFAULT_UNIX_SOCKET_MODE);
        assert_eq!(config.address(), "unix:/etc/tfsd/run/tfsd.sock");
    }

    #[test]
    fn paths_longer_than_a_socket_address_are_refused() {
        let long = PathBuf::from(format!("/{}/tfsd.sock", "d".repeat(100)));
        let error = UnixSocketConfig::from_raw(Some(long), None, None, Path::new("/"))
            .expect_err("too long");
        assert!(format!("{error:#}").contains("too long"), "{error:#}");
    }
}
