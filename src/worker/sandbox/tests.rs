//! The sandbox applied to real children (`std::process::Command` with `apply_in_child` in
//! `pre_exec`, as `process.rs` does): what they can and cannot reach.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::*;

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tfsd-sandbox-unit-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Python interpreter to run: the project's environment, else the system's.
fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    [venv, PathBuf::from("/usr/bin/python3")]
        .into_iter()
        .find(|path| path.is_file())
}

fn sandbox(state: &Path, extra: &str) -> Sandbox {
    let python = python().map_or_else(String::new, |path| {
        format!("[python]\ninterpreter = \"{}\"\n", path.display())
    });
    let text = format!(
        "[workers]\nbinary = \"/bin/cat\"\n{python}[state]\ndir = \"{}\"\n{extra}",
        state.display()
    );
    let config = Config::parse(&text, Path::new("/")).expect("config");
    Sandbox::new(&config).expect("sandbox")
}

fn run(prepared: &PreparedWorker, program: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(prepared.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: apply_in_child is async-signal-safe (system calls on prepared values).
    // The child is forked and gone before `output` returns, while `prepared` is borrowed.
    let address = prepared as *const PreparedWorker as usize;
    unsafe {
        command.pre_exec(move || (*(address as *const PreparedWorker)).apply_in_child());
    }
    command.output().expect("run the sandboxed child")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn landlock_here() -> bool {
    Abi::probe().is_some()
}

#[test]
fn a_worker_reads_the_system_and_writes_only_its_scratch_directory() {
    if !landlock_here() {
        return;
    }
    let state = TempDir::new("files");
    let sandbox = sandbox(&state.0, "");
    let cat = Path::new("/bin/cat");
    let first = sandbox.prepare(cat).expect("prepare");
    let second = sandbox.prepare(cat).expect("prepare");
    let scratch = first.scratch_dir().expect("scratch").to_path_buf();
    let other = second.scratch_dir().expect("scratch").to_path_buf();
    assert!(
        scratch.starts_with(sandbox.scratch_root().expect("root")),
        "{scratch:?}"
    );
    assert_ne!(scratch, other);
    let mode = std::fs::metadata(&scratch).expect("scratch").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    std::fs::write(scratch.join("mine.txt"), "mine").expect("write");
    std::fs::write(other.join("theirs.txt"), "theirs").expect("write");

    let readable = run(&first, cat, &["/etc/passwd", "mine.txt"]);
    assert!(readable.status.success(), "{}", stderr(&readable));
    assert!(String::from_utf8_lossy(&readable.stdout).ends_with("mine"));

    let database = state.0.join("sessions.sqlite3");
    std::fs::write(&database, "secret").expect("write");
    let parent_environ = format!("/proc/{}/environ", std::process::id());
    for forbidden in [
        "/etc/shadow".to_string(),
        database.display().to_string(),
        other.join("theirs.txt").display().to_string(),
        parent_environ,
    ] {
        let output = run(&first, cat, &[&forbidden]);
        assert!(!output.status.success(), "{forbidden} was readable");
        assert!(
            stderr(&output).contains("Permission denied"),
            "{forbidden}: {}",
            stderr(&output)
        );
    }

    let sh = Path::new("/bin/sh");
    let written = run(
        &first,
        sh,
        &[
            "-c",
            "echo a > \"$TMPDIR/new\" && mkdir d && mv new d/ && cat d/new",
        ],
    );
    assert!(written.status.success(), "{}", stderr(&written));
    let outside = state.0.join("outside");
    let refused = run(
        &first,
        sh,
        &["-c", &format!("echo a > {}", outside.display())],
    );
    assert!(!refused.status.success());
    assert!(!outside.exists());

    let limits = run(&first, cat, &["/proc/self/limits"]);
    let limits = String::from_utf8_lossy(&limits.stdout).to_string();
    let line = |name: &str| {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(line("Max core file size").contains(" 0 0 "), "{limits}");
    assert!(line("Max open files").contains(" 4096 4096 "), "{limits}");

    drop(first);
    assert!(
        !scratch.exists(),
        "the scratch directory goes with the worker"
    );
    assert!(other.exists());
}

#[test]
fn python_gets_permission_denied_for_sockets_and_secrets() {
    let Some(python) = python() else { return };
    if !landlock_here() {
        return;
    }
    let state = TempDir::new("python");
    let sandbox = sandbox(&state.0, "");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    let unix_path = state.0.join("daemon.sock");
    let _unix = std::os::unix::net::UnixListener::bind(&unix_path).expect("unix listener");
    let unix_path = unix_path.display().to_string();
    let prepared = sandbox.prepare(&python).expect("prepare");
    let scratch = prepared.scratch_dir().expect("scratch").to_path_buf();
    let script = format!(
        r#"
import os, socket, tempfile
results = []
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
    results.append("connected")
except PermissionError as error:
    results.append("tcp refused %d" % error.errno)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    results.append("udp socket")
except PermissionError:
    results.append("udp refused")
a, b = socket.socketpair()
a.sendall(b"x"); b.recv(1)
results.append("socketpair ok")
try:
    socket.socket(socket.AF_UNIX).connect({unix_path:?})
    results.append("unix connected")
except PermissionError:
    results.append("unix refused")
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", {unix_path:?})
    results.append("unix sent")
except PermissionError:
    results.append("unix sendto refused")
try:
    open("/etc/shadow").read()
    results.append("shadow read")
except PermissionError:
    results.append("shadow refused")
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, os.getppid(), 0, 0) == -1:  # PTRACE_ATTACH to the test process
    results.append("ptrace refused %d" % ctypes.get_errno())
else:
    results.append("ptrace attached")
results.append("home " + os.environ["HOME"])
results.append("tmp " + tempfile.gettempdir())
results.append("cwd " + os.getcwd())
with open(os.path.expanduser("~/.keep"), "w") as f:
    f.write("x")
print("\n".join(results))
"#
    );
    let output = run(&prepared, &python, &["-c", &script]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let dir = scratch.display();
    for expected in [
        "tcp refused 13".to_string(),
        "udp refused".to_string(),
        "socketpair ok".to_string(),
        "unix refused".to_string(),
        "unix sendto refused".to_string(),
        "shadow refused".to_string(),
        "ptrace refused 13".to_string(),
        format!("home {dir}"),
        format!("tmp {dir}"),
        format!("cwd {dir}"),
    ] {
        assert!(
            stdout.lines().any(|line| line == expected),
            "{expected:?} in {stdout}"
        );
    }
    assert!(scratch.join(".keep").is_file());
}

#[test]
fn network_true_lets_workers_open_sockets() {
    let Some(python) = python() else { return };
    let state = TempDir::new("network");
    let sandbox = sandbox(&state.0, "[sandbox]\nnetwork = true\n");
    assert!(
        sandbox.describe().contains("network allowed"),
        "{}",
        sandbox.describe()
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    let prepared = sandbox.prepare(&python).expect("prepare");
    let script = format!(
        "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('ok')"
    );
    let output = run(&prepared, &python, &["-c", &script]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn workers_user_runs_the_worker_as_that_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let state = TempDir::new("user");
    // Unset, a root daemon's workers run as nobody: never as root.
    let sandbox = sandbox(&state.0, "");
    assert!(
        sandbox
            .describe()
            .contains("workers run as nobody (uid 65534)"),
        "{}",
        sandbox.describe()
    );
    let prepared = sandbox.prepare(Path::new("/usr/bin/id")).expect("prepare");
    let output = run(&prepared, Path::new("/usr/bin/id"), &["-u"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "65534");
    let sandbox_off = {
        let text = format!(
            "[workers]\nbinary = \"/bin/cat\"\n[sandbox]\nenabled = false\n[state]\ndir = \"{}\"\n",
            state.0.display()
        );
        Sandbox::new(&Config::parse(&text, Path::new("/")).expect("config")).expect("sandbox")
    };
    assert!(
        sandbox_off.describe().contains("workers run as nobody"),
        "{}",
        sandbox_off.describe()
    );
    let text = format!(
        "[workers]\nbinary = \"/bin/cat\"\nuser = \"nobody\"\n[state]\ndir = \"{}\"\n",
        state.0.display()
    );
    let config = Config::parse(&text, Path::new("/")).expect("config");
    let nobody = config.workers.user.clone().expect("user");
    let sandbox = Sandbox::new(&config).expect("sandbox");
    assert!(sandbox.describe().contains("workers run as nobody"));
    let prepared = sandbox.prepare(Path::new("/usr/bin/id")).expect("prepare");
    let scratch = prepared.scratch_dir().expect("scratch");
    // Not in the state directory, which is the daemon's alone (0700).
    assert!(!scratch.starts_with(&state.0), "{}", scratch.display());
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(scratch).expect("dir"));
    assert_eq!(owner, nobody.uid);
    let uid = run(&prepared, Path::new("/usr/bin/id"), &["-u"]);
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        nobody.uid.to_string()
    );
    let groups = run(&prepared, Path::new("/usr/bin/id"), &["-G"]);
    assert_eq!(
        String::from_utf8_lossy(&groups.stdout).trim(),
        nobody.gid.to_string(),
        "no supplementary groups"
    );
}

#[test]
fn a_root_daemons_worker_keeps_no_capability() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let state = TempDir::new("caps");
    let sandbox = sandbox(&state.0, "");
    let prepared = sandbox.prepare(Path::new("/bin/cat")).expect("prepare");
    let output = run(&prepared, Path::new("/bin/cat"), &["/proc/self/status"]);
    let status = String::from_utf8_lossy(&output.stdout).to_string();
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_default();
        assert!(line.ends_with("0000000000000000"), "{line} in\n{status}");
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
}

#[test]
fn without_a_state_directory_the_scratch_root_is_private_and_goes_with_the_daemon() {
    let config =
        Config::parse("[workers]\nbinary = \"/bin/cat\"\n", Path::new("/")).expect("config");
    let sandbox = Sandbox::new(&config).expect("sandbox");
    let root = sandbox.scratch_root().expect("root").to_path_buf();
    let name = root
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert_eq!(root.parent(), Some(std::env::temp_dir().as_path()));
    assert!(
        name.starts_with(&format!("tfsd-scratch-{}-", std::process::id())),
        "{name}"
    );
    let mode = std::fs::metadata(&root).expect("root").permissions();
    // SAFETY: geteuid has no preconditions.
    let expected = if unsafe { libc::geteuid() } == 0 {
        // Workers run as nobody: they must get through to their own directories.
        0o711
    } else {
        0o700
    };
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        expected
    );
    let prepared = sandbox.prepare(Path::new("/bin/cat")).expect("prepare");
    assert!(prepared.scratch_dir().expect("dir").starts_with(&root));
    drop(prepared);
    drop(sandbox);
    assert!(!root.exists());
}

#[test]
fn a_dead_daemons_scratch_directories_are_removed() {
    let state = TempDir::new("stale");
    // A pid that cannot be running: above the kernel's maximum.
    let stale = state.0.join("scratch").join("4194305-1");
    std::fs::create_dir_all(stale.join("deep")).expect("stale dir");
    let _sandbox = sandbox(&state.0, "");
    assert!(!stale.exists());
}

#[test]
fn switched_off_it_does_nothing_but_says_so() {
    let state = TempDir::new("off");
    let sandbox = sandbox(&state.0, "[sandbox]\nenabled = false\n");
    assert!(
        sandbox.describe().starts_with("off"),
        "{}",
        sandbox.describe()
    );
    let prepared = sandbox.prepare(Path::new("/bin/cat")).expect("prepare");
    assert!(prepared.scratch_dir().is_none());
    assert!(prepared.env().is_empty());
    let output = run(&prepared, Path::new("/bin/cat"), &["/etc/hostname"]);
    assert!(output.status.success());
}

#[test]
fn the_description_names_what_applies() {
    let state = TempDir::new("describe");
    let sandbox = sandbox(&state.0, "[sandbox]\nmax_open_files = 1000\n");
    let text = sandbox.describe();
    for part in [
        "seccomp (no inet sockets",
        "no_new_privs",
        "core dumps off",
        "1000 files",
    ] {
        assert!(text.contains(part), "{part} in {text}");
    }
    if let Some(abi) = Abi::probe() {
        assert!(
            text.starts_with(&format!("landlock ABI {} (filesystem", abi.version)),
            "{text}"
        );
    }
}

#[test]
fn workers_user_must_exist_and_not_be_root() {
    for (value, message) in [
        ("\"root\"", "is root (uid 0)"),
        ("0", "is root (uid 0)"),
        ("\"no-such-user-tfsd\"", "is not a user on this machine"),
        ("-1", "is not a valid uid"),
    ] {
        let text = format!("[workers]\nuser = {value}\n");
        let error = Config::parse(&text, Path::new("/")).expect_err(value);
        let error = format!("{error:#}");
        assert!(
            error.contains("workers.user") && error.contains(message),
            "{value}: {error}"
        );
    }
    let config = Config::parse("[workers]\nuser = \"nobody\"\n", Path::new("/")).expect("nobody");
    assert_eq!(
        config.workers.user.map(|user| user.name).as_deref(),
        Some("nobody")
    );
}

#[test]
fn operator_paths_must_exist() {
    let state = TempDir::new("paths");
    let text = format!(
        "[workers]\nbinary = \"/bin/cat\"\n[state]\ndir = \"{}\"\n[sandbox]\nread_paths = [\"/does/not/exist\"]\n",
        state.0.display()
    );
    let config = Config::parse(&text, Path::new("/")).expect("config");
    let error = Sandbox::new(&config).expect_err("missing path");
    assert!(
        format!("{error:#}").contains("sandbox.read_paths"),
        "{error:#}"
    );
}

#[test]
fn a_grant_over_root_or_a_secret_refuses_to_start() {
    let dir = TempDir::new("grants");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).expect("state");
    let token = dir.0.join("ops.token");
    std::fs::write(&token, "t").expect("token");
    let secrets = [state.clone(), token];
    let rule = |path: &Path| (path.to_path_buf(), READ_EXECUTE);

    let error = check_grants([rule(Path::new("/"))].iter(), &secrets).expect_err("all of /");
    assert!(error.to_string().contains("all of /"), "{error}");
    let error = check_grants([rule(&dir.0)].iter(), &secrets).expect_err("holds the state");
    assert!(error.to_string().contains("state"), "{error}");
    let beside = dir.0.join("bin");
    std::fs::create_dir_all(&beside).expect("bin");
    check_grants([rule(&beside), rule(Path::new("/usr"))].iter(), &secrets)
        .expect("neither covers a secret");
}

#[test]
fn a_root_daemon_refuses_a_runtime_its_workers_user_cannot_reach() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let home = TempDir::new("private-home");
    let private = home.0.join("private");
    std::fs::create_dir(&private).expect("dir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("mode");
    let interpreter = private.join("python3");
    std::os::unix::fs::symlink("/usr/bin/python3", &interpreter).expect("link");
    let text = format!(
        "[workers]\nbinary = \"/bin/cat\"\n[python]\ninterpreter = \"{}\"\n",
        interpreter.display()
    );
    let config = Config::parse(&text, Path::new("/")).expect("config");
    let error = format!(
        "{:#}",
        Sandbox::new(&config).expect_err("unreachable interpreter")
    );
    assert!(error.contains("python.interpreter"), "{error}");
    assert!(error.contains("workers run as nobody"), "{error}");
    assert!(error.contains("set workers.user"), "{error}");
    assert!(
        error.contains(&format!("{} is not searchable", private.display())),
        "{error}"
    );

    // Readable by its owner only: refused by name too.
    let binary = home.0.join("tfsd-worker");
    std::fs::copy("/bin/cat", &binary).expect("copy");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o700)).expect("mode");
    let text = format!("[workers]\nbinary = \"{}\"\n", binary.display());
    let config = Config::parse(&text, Path::new("/")).expect("config");
    let error = format!(
        "{:#}",
        Sandbox::new(&config).expect_err("unreadable binary")
    );
    assert!(error.contains("cannot read and execute"), "{error}");
}
