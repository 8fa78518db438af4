//! Landlock through its three system calls (no crate: the rules are built in the supervisor,
//! and the child makes one system call). The ruleset handles every access right the running
//! kernel's ABI knows, best effort as the kernel's documentation describes: an older kernel
//! restricts less, never refuses the ruleset.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)` answers the ABI.
const CREATE_RULESET_VERSION: u32 = 1 << 0;
/// `landlock_add_rule` rule type for a file hierarchy.
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem access rights (include/uapi/linux/landlock.h), with the ABI that added them.
pub const EXECUTE: u64 = 1 << 0;
pub const WRITE_FILE: u64 = 1 << 1;
pub const READ_FILE: u64 = 1 << 2;
pub const READ_DIR: u64 = 1 << 3;
pub const REMOVE_DIR: u64 = 1 << 4;
pub const REMOVE_FILE: u64 = 1 << 5;
// 1 << 6, making character devices, is never granted.
pub const MAKE_DIR: u64 = 1 << 7;
pub const MAKE_REG: u64 = 1 << 8;
pub const MAKE_SOCK: u64 = 1 << 9;
pub const MAKE_FIFO: u64 = 1 << 10;
// 1 << 11, making block devices, is never granted.
pub const MAKE_SYM: u64 = 1 << 12;
/// ABI 2: link or rename a file into another directory.
pub const REFER: u64 = 1 << 13;
/// ABI 3: truncate a file.
pub const TRUNCATE: u64 = 1 << 14;
/// ABI 5: ioctl on a device file.
pub const IOCTL_DEV: u64 = 1 << 15;

/// Rights that a rule on a file (not a directory) may carry.
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

/// Read a hierarchy.
pub const READ: u64 = READ_FILE | READ_DIR;
/// Read a hierarchy and run what is in it (programs, their ELF interpreter).
pub const READ_EXECUTE: u64 = READ | EXECUTE;
/// Everything in a directory of one's own except running programs from it and making
/// device nodes: write, make, remove, rename, truncate.
pub const READ_WRITE: u64 = READ
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_SYM
    | REFER
    | TRUNCATE;

// Network access rights (ABI 4).
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
// Scopes (ABI 6).
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI of the running kernel, and what a ruleset handles under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abi {
    pub version: u32,
}

impl Abi {
    /// The running kernel's ABI; `None` when Landlock is not built in or not enabled
    /// (`lsm=` on the kernel command line).
    pub fn probe() -> Option<Abi> {
        // SAFETY: the version query reads no memory (NULL attribute, size 0).
        let version = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        (version > 0).then_some(Abi {
            version: version as u32,
        })
    }

    /// Every filesystem right this ABI knows.
    pub fn handled_fs(self) -> u64 {
        match self.version {
            1 => (1 << 13) - 1,
            2 => (1 << 14) - 1,
            3 | 4 => (1 << 15) - 1,
            _ => (1 << 16) - 1,
        }
    }

    /// TCP bind and connect, from ABI 4.
    pub fn has_network(self) -> bool {
        self.version >= 4
    }

    /// Abstract unix sockets and signals, from ABI 6.
    pub fn has_scopes(self) -> bool {
        self.version >= 6
    }

    /// The size of `RulesetAttr` this ABI reads.
    fn attr_size(self) -> usize {
        match self.version {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        }
    }
}

/// A ruleset being built in the supervisor. Its fd is close-on-exec: the child inherits it
/// through the fork, enforces it with `restrict_self`, and it closes at exec.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    handled_fs: u64,
}

impl Ruleset {
    /// A ruleset that handles every filesystem right of `abi`, TCP bind and connect unless
    /// `network` (no rule allows any port, so both are denied), and the scopes.
    pub fn new(abi: Abi, network: bool) -> io::Result<Ruleset> {
        let attr = RulesetAttr {
            handled_access_fs: abi.handled_fs(),
            handled_access_net: if abi.has_network() && !network {
                NET_BIND_TCP | NET_CONNECT_TCP
            } else {
                0
            },
            scoped: match (abi.has_scopes(), network) {
                (false, _) => 0,
                (true, false) => SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL,
                (true, true) => SCOPE_SIGNAL,
            },
        };
        // SAFETY: `attr` is valid for `attr_size` bytes (a prefix of the struct).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                abi.attr_size(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ruleset {
            // SAFETY: the kernel just returned this fd (close-on-exec) and nobody else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            handled_fs: attr.handled_access_fs,
        })
    }

    /// Allows `access` on `path` and everything beneath it (a file gets the file rights
    /// only). Symbolic links are followed: the rule is on what they point to. Returns
    /// false, adding nothing, when the path does not exist.
    pub fn allow(&mut self, path: &Path, access: u64) -> io::Result<bool> {
        let file = match File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        let mut access = access & self.handled_fs;
        if !file.metadata()?.is_dir() {
            access &= FILE_RIGHTS;
        }
        if access == 0 {
            return Ok(true);
        }
        let rule = PathBeneathAttr {
            allowed_access: access,
            parent_fd: file.as_raw_fd(),
        };
        // SAFETY: `rule` is a valid path-beneath attribute; both fds are open.
        let result = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &rule as *const PathBeneathAttr,
                0u32,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Enforces the ruleset on the calling thread (the forked child has one). Needs
/// no_new_privs or CAP_SYS_ADMIN. Async-signal-safe: one system call.
pub fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed; a bad fd is an error, not undefined behaviour.
    let result = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
