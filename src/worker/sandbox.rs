//! The sandbox each worker runs in, Rust worker and Python interpreter alike: applied in the
//! child between fork and exec, so it holds from the program's first instruction.
//!
//! In order, in the child: the workers' user (`workers.user`: setgroups, setgid, setuid,
//! and the parent-death signal again, which a change of user clears); RLIMIT_CORE 0 and
//! RLIMIT_NOFILE; every capability dropped when the worker stays root; no_new_privs;
//! Landlock (read and execute what the runtime needs, read-write only the worker's own
//! scratch directory and `sandbox.write_paths`, no TCP, no signals or abstract unix sockets
//! outside the worker); the scratch directory as working directory; and last a seccomp
//! filter (no socket but AF_UNIX, no io_uring, no ptrace, native system calls only).
//!
//! Everything that allocates, opens or looks up happens in `Sandbox::prepare`, in the
//! supervisor: the Landlock ruleset is built there (its fd, close-on-exec, is inherited by
//! the fork), the BPF program compiled, the working directory a `CString`.
//! `PreparedWorker::apply_in_child` makes system calls only. This module never touches the
//! spawn itself (`process.rs` calls it) nor the session's life.

mod landlock;
mod paths;
mod scratch;
mod seccomp;
#[cfg(test)]
mod tests;
mod user;

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::{Config, SandboxMode};
use landlock::{Abi, READ_EXECUTE, READ_WRITE, Ruleset};
use paths::Rule;
use scratch::{ScratchDir, ScratchRoot};
use seccomp::Filter;
pub use user::{WorkerUser, resolve_worker_user};

/// The Landlock ABI version of the running kernel; `None` without Landlock.
pub fn landlock_abi() -> Option<u32> {
    Abi::probe().map(|abi| abi.version)
}

/// The daemon-wide sandbox: settings, what the kernel offers, the rules every worker gets,
/// and the root under which each worker's scratch directory is made.
#[derive(Debug)]
pub struct Sandbox {
    /// `None` when `sandbox.enabled = false`: only `workers.user` applies.
    confinement: Option<Confinement>,
    /// Switch to this user in the child (the daemon runs as root and workers.user is set).
    user: Option<WorkerUser>,
    /// Every worker, sandbox on or off, root daemon or not: empty the bounding set (up to
    /// this capability, the kernel's last) before the switch to the workers' user, the
    /// other sets after it, so that no worker holds or inherits a capability (a daemon
    /// given ambient capabilities by systemd passes them on otherwise).
    last_capability: u32,
    description: String,
}

#[derive(Debug)]
struct Confinement {
    /// `None` on a kernel without Landlock (auto mode).
    landlock: Option<Abi>,
    network: bool,
    /// The rules every worker gets: the system's, and the operator's paths.
    common_rules: Vec<Rule>,
    /// Rules per program (the configured worker binary and Python interpreter), found once.
    program_rules: HashMap<PathBuf, Vec<Rule>>,
    /// For a program not configured (none today): the library directory to add.
    library_dir: Option<PathBuf>,
    seccomp: Option<Arc<Filter>>,
    max_open_files: libc::rlim_t,
    scratch: ScratchRoot,
}

impl Confinement {
    /// "landlock ABI 7 (filesystem, tcp, scopes), seccomp (...), no_new_privs, ...".
    fn describe(&self, user: Option<&WorkerUser>) -> String {
        let mut parts = Vec::new();
        match self.landlock {
            Some(abi) => {
                let mut scopes = vec!["filesystem"];
                if abi.has_network() && !self.network {
                    scopes.push("tcp");
                }
                if abi.has_scopes() {
                    scopes.push("scopes");
                }
                parts.push(format!(
                    "landlock ABI {} ({})",
                    abi.version,
                    scopes.join(", ")
                ));
            }
            None => parts.push("no landlock on this kernel (files unconfined)".to_string()),
        }
        parts.push(match (&self.seccomp, self.network) {
            (Some(_), false) => {
                "seccomp (no inet sockets, no socket connects, no io_uring, no ptrace)".to_string()
            }
            (Some(_), true) => "seccomp (no io_uring, no ptrace), network allowed".to_string(),
            (None, _) => "no seccomp on this architecture".to_string(),
        });
        parts.push("no_new_privs".to_string());
        parts.push("capabilities dropped".to_string());
        parts.push("core dumps off".to_string());
        parts.push(format!("{} files", self.max_open_files));
        parts.push(format!("scratch in {}", self.scratch.path().display()));
        if let Some(user) = user {
            parts.push(format!("workers run as {} (uid {})", user.name, user.uid));
        }
        parts.join(", ")
    }
}

impl Sandbox {
    /// Sets the sandbox up for the daemon: checks the kernel (`sandbox.enabled = true` on a
    /// kernel without Landlock is an error; `"auto"` logs a warning), checks the operator's
    /// paths, finds what the configured runtimes need, and makes the scratch root (removing
    /// what dead daemons left).
    pub fn new(config: &Config) -> anyhow::Result<Sandbox> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let user = match &config.workers.user {
            Some(user) if user.uid == euid => None,
            Some(user) if euid != 0 => bail!(
                "workers.user = {} needs the daemon to run as root (it runs as uid {euid}); \
                 start it as root, or as {} itself",
                user.name,
                user.name
            ),
            Some(user) => Some(user.clone()),
            // Workers never run as root: a root daemon without workers.user runs them as
            // nobody.
            None if euid == 0 => Some(user::default_worker_user()?),
            None => None,
        };
        if let Some(user) = &user {
            check_runtime_reachable(config, user)?;
        }
        let settings = &config.sandbox;
        if settings.mode == SandboxMode::Off {
            let mut description = "off (sandbox.enabled = false), capabilities dropped".to_string();
            if let Some(user) = &user {
                description.push_str(&format!(
                    ", workers run as {} (uid {})",
                    user.name, user.uid
                ));
            }
            return Ok(Sandbox {
                confinement: None,
                user,
                last_capability: last_capability(),
                description,
            });
        }
        let landlock = Abi::probe();
        if landlock.is_none() {
            if settings.mode == SandboxMode::Required {
                bail!(
                    "sandbox.enabled = true, but this kernel has no Landlock (Linux 5.13 or \
                     later with landlock in the `lsm=` list): set sandbox.enabled = \"auto\" to \
                     run workers without filesystem confinement, or false"
                );
            }
            tracing::warn!(
                "this kernel has no Landlock: workers run without filesystem and TCP \
                 confinement (the rest of the sandbox applies)"
            );
        }
        let mut common_rules = paths::system_rules();
        for (key, paths, access) in [
            ("sandbox.read_paths", &settings.read_paths, READ_EXECUTE),
            (
                "sandbox.write_paths",
                &settings.write_paths,
                READ_WRITE | landlock::IOCTL_DEV,
            ),
        ] {
            for path in paths {
                if !path.exists() {
                    bail!("{key}: {} does not exist", path.display());
                }
                common_rules.push((path.clone(), access));
            }
        }
        let library_dir = config.workers.library_dir.clone();
        let mut program_rules = HashMap::new();
        program_rules.insert(
            config.workers.binary.clone(),
            paths::program_rules(
                &config.workers.binary,
                library_dir.as_deref(),
                &config.workers.env,
            ),
        );
        if let Some(python) = &config.python {
            program_rules.insert(
                python.interpreter.clone(),
                paths::program_rules(&python.interpreter, None, &python.env),
            );
        }
        // tfsd-worker next to the daemon, as it is installed and built: a workers.binary that
        // is a wrapper script around it can exec it, with its libraries.
        if let Some(default_worker) = default_worker_binary()
            && default_worker != config.workers.binary
            && default_worker.is_file()
        {
            common_rules.extend(paths::program_rules(
                &default_worker,
                library_dir.as_deref(),
                &config.workers.env,
            ));
        }
        // Fail closed: a grant that covers `/` or a secret of the daemon's (a program or
        // read path placed beside the state directory or a token file) refuses to start.
        let mut secrets: Vec<PathBuf> = config.auth.token_files.clone();
        secrets.extend(config.state.as_ref().map(|state| state.dir.clone()));
        secrets.extend(config.tls.as_ref().map(|tls| tls.key.clone()));
        check_grants(
            common_rules.iter().chain(program_rules.values().flatten()),
            &secrets,
        )?;
        let seccomp = Filter::new(!settings.network).map(Arc::new);
        if seccomp.is_none() {
            tracing::warn!("no seccomp filter for this architecture: workers may open sockets");
        }
        let hard_limit = current_open_files_hard_limit();
        let max_open_files = (settings.max_open_files as libc::rlim_t).min(hard_limit);
        let scratch = ScratchRoot::new(
            config.state.as_ref().map(|state| state.dir.as_path()),
            user.as_ref(),
        )?;

        let confinement = Confinement {
            landlock,
            network: settings.network,
            common_rules,
            program_rules,
            library_dir,
            seccomp,
            max_open_files,
            scratch,
        };
        let description = confinement.describe(user.as_ref());
        Ok(Sandbox {
            confinement: Some(confinement),
            user,
            last_capability: last_capability(),
            description,
        })
    }

    /// What the sandbox does on this kernel, in one line for the log and GetDaemonStatus.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// The root of the workers' scratch directories; `None` when the sandbox is off.
    pub fn scratch_root(&self) -> Option<&Path> {
        self.confinement
            .as_ref()
            .map(|confinement| confinement.scratch.path())
    }

    /// Prepares one worker's sandbox: makes its scratch directory and everything
    /// `apply_in_child` needs. `program` is the worker binary or Python interpreter.
    pub fn prepare(&self, program: &Path) -> io::Result<PreparedWorker> {
        let mut prepared = PreparedWorker {
            scratch: None,
            env: Vec::new(),
            user: self.user.as_ref().map(|user| (user.uid, user.gid)),
            rlimits: None,
            drop_capabilities: Some(self.last_capability),
            no_new_privs: false,
            ruleset: None,
            working_dir: None,
            seccomp: None,
        };
        let Some(confinement) = &self.confinement else {
            return Ok(prepared);
        };
        let scratch = confinement.scratch.make_worker_dir()?;
        let scratch_path = scratch.path().to_path_buf();
        // From here on, an error drops `prepared` and with it the directory.
        prepared.scratch = Some(scratch);
        let text = scratch_path.to_string_lossy().to_string();
        prepared.env = ["TMPDIR", "TMP", "TEMP", "HOME", "KERAS_HOME"]
            .iter()
            .map(|key| (key.to_string(), text.clone()))
            .collect();
        prepared.rlimits = Some(confinement.max_open_files);
        prepared.no_new_privs = true;
        if let Some(abi) = confinement.landlock {
            let mut ruleset = Ruleset::new(abi, confinement.network)?;
            let computed;
            let program_rules = match confinement.program_rules.get(program) {
                Some(rules) => rules,
                None => {
                    computed = paths::program_rules(
                        program,
                        confinement.library_dir.as_deref(),
                        &Default::default(),
                    );
                    &computed
                }
            };
            for (path, access) in confinement.common_rules.iter().chain(program_rules) {
                ruleset.allow(path, *access).map_err(|error| {
                    io::Error::new(
                        error.kind(),
                        format!("landlock rule for {}: {error}", path.display()),
                    )
                })?;
            }
            ruleset.allow(&scratch_path, READ_WRITE)?;
            prepared.ruleset = Some(ruleset);
        }
        // A relative program is found from the working directory at exec: keep it then.
        if program.is_absolute() {
            prepared.working_dir = Some(
                CString::new(scratch_path.as_os_str().as_bytes())
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            );
        }
        prepared.seccomp = confinement.seccomp.clone();
        Ok(prepared)
    }
}

/// One worker's sandbox, prepared in the supervisor before the fork (everything that
/// allocates happens here), applied in the child with `apply_in_child`. Dropping it removes
/// the worker's scratch directory: keep it until the worker is reaped.
#[derive(Debug)]
pub struct PreparedWorker {
    scratch: Option<ScratchDir>,
    env: Vec<(String, String)>,
    /// (uid, gid) to switch to.
    user: Option<(u32, u32)>,
    /// RLIMIT_NOFILE; RLIMIT_CORE goes to 0 with it.
    rlimits: Option<libc::rlim_t>,
    /// Drop capabilities 0..=this (see `Sandbox::last_capability`).
    drop_capabilities: Option<u32>,
    no_new_privs: bool,
    ruleset: Option<Ruleset>,
    working_dir: Option<CString>,
    seccomp: Option<Arc<Filter>>,
}

impl PreparedWorker {
    /// Environment the worker gets: TMPDIR, TMP, TEMP, HOME and KERAS_HOME all name its
    /// scratch directory (so that libraries that write under `~` write there). Set before
    /// the operator's `workers.env` / `python.env`, which win.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// The worker's scratch directory, removed when this is dropped.
    pub fn scratch_dir(&self) -> Option<&Path> {
        self.scratch.as_ref().map(ScratchDir::path)
    }

    /// Applies the sandbox to the calling process. Runs in the child between fork and exec:
    /// async-signal-safe calls only, nothing allocates.
    pub fn apply_in_child(&self) -> io::Result<()> {
        // SAFETY (the whole function): plain system calls on values prepared beforehand;
        // every pointer passed points into `self` or the stack.
        unsafe {
            if let Some(last) = self.drop_capabilities {
                drop_bounding_set(last)?;
            }
            if let Some((uid, gid)) = self.user {
                let parent = libc::getppid();
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
                // A change of credentials clears the parent-death signal: set it again, and
                // make sure the supervisor did not die in between.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            if self.drop_capabilities.is_some() {
                clear_capability_sets()?;
            }
            if let Some(open_files) = self.rlimits {
                let core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                check(libc::setrlimit(libc::RLIMIT_CORE, &core))?;
                let files = libc::rlimit {
                    rlim_cur: open_files,
                    rlim_max: open_files,
                };
                check(libc::setrlimit(libc::RLIMIT_NOFILE, &files))?;
            }
            if self.no_new_privs {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            }
            if let Some(ruleset) = &self.ruleset {
                landlock::restrict_self(ruleset.raw_fd())?;
            }
            if let Some(dir) = &self.working_dir {
                check(libc::chdir(dir.as_ptr()))?;
            }
            if let Some(filter) = &self.seccomp {
                filter.install()?;
            }
        }
        Ok(())
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Empties the bounding set, so that no later exec can regain a capability. Called before
/// the switch to the workers' user, while CAP_SETPCAP is still held. Async-signal-safe.
unsafe fn drop_bounding_set(last: u32) -> io::Result<()> {
    // SAFETY: plain system calls.
    unsafe {
        // EINVAL: a capability this kernel does not know. EPERM: no CAP_SETPCAP (a
        // container that dropped it): the bounding set stays, but with the permitted set
        // emptied and no_new_privs, no exec can give a capability back.
        for capability in 0..=last {
            if libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) < 0 {
                let errno = *libc::__errno_location();
                if errno == libc::EPERM {
                    break;
                }
                if errno != libc::EINVAL {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// Empties the ambient, effective, permitted and inheritable sets. Called after the switch
/// to the workers' user, which empties the permitted and effective sets but keeps the
/// inheritable one. Async-signal-safe.
unsafe fn clear_capability_sets() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    // SAFETY: plain system calls; the capset pointers point at stack values of the layout
    // the kernel expects for version 3 (two data structs).
    unsafe {
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        let header = Header {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `tfsd-worker` in the running daemon's directory (one level up from a test binary's
/// `deps/`), as `config.rs` finds the default worker binary.
fn default_worker_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.ends_with("deps") {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.join("tfsd-worker"))
}

/// The kernel's highest capability number (/proc/sys/kernel/cap_last_cap; 63 if unknown:
/// dropping a capability the kernel does not know is answered EINVAL and skipped).
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(63)
}

fn current_open_files_hard_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return libc::rlim_t::MAX;
    }
    limit.rlim_max
}

/// The workers' user must be able to run what they run: the worker binary, its library
/// directory, and the Python interpreter (through the environment's own directory and, a
/// venv's interpreter being a link, the installation it runs). Refused at start-up with
/// the path that stops it, instead of every worker failing to start.
fn check_runtime_reachable(config: &Config, user: &WorkerUser) -> anyhow::Result<()> {
    let mut programs = vec![("workers.binary", config.workers.binary.clone())];
    if let Some(python) = &config.python {
        programs.push(("python.interpreter", python.interpreter.clone()));
    }
    for (key, program) in &programs {
        user::ensure_runnable(user, program).with_context(|| {
            format!(
                "{key} = {}: workers run as {} (uid {}){}",
                program.display(),
                user.name,
                user.uid,
                if config.workers.user.is_none() {
                    ", the default for a daemon started as root: set workers.user to a user \
                     who can run it, or install it where that user can"
                } else {
                    ""
                }
            )
        })?;
    }
    if let Some(dir) = &config.workers.library_dir {
        user::ensure_listable(user, dir).with_context(|| {
            format!(
                "workers.library_dir = {}: workers run as {} (uid {})",
                dir.display(),
                user.name,
                user.uid
            )
        })?;
    }
    Ok(())
}

/// Refuses a set of rules that would let a worker reach all of `/` or one of `secrets`.
fn check_grants<'a>(
    rules: impl Iterator<Item = &'a Rule>,
    secrets: &[PathBuf],
) -> anyhow::Result<()> {
    let resolve = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let secrets: Vec<(PathBuf, &PathBuf)> = secrets.iter().map(|s| (resolve(s), s)).collect();
    for (path, _) in rules {
        let granted = resolve(path);
        if granted.parent().is_none() {
            bail!(
                "the workers' sandbox would grant all of / (from {}): check workers.binary, \
                 python.interpreter and sandbox.read_paths / write_paths",
                path.display()
            );
        }
        if let Some((_, secret)) = secrets.iter().find(|(real, _)| real.starts_with(&granted)) {
            bail!(
                "the workers' sandbox would let every worker read {} (it is inside {}, which \
                 workers need or were given): keep the state directory, token files and TLS \
                 key out of the worker's program directories and sandbox.read_paths / \
                 write_paths",
                secret.display(),
                path.display()
            );
        }
    }
    Ok(())
}
