//! The worker sandbox (docs/SANDBOX.md) with the real daemon and real workers: a graph
//! session's ReadFile and WriteFile ops reach the system's libraries and the session's own
//! scratch directory, and nothing else of interest (the daemon's config and state, another
//! session's files, the daemon's environment, /etc/shadow); a Python session cannot open a
//! TCP connection or read secrets, and its scratch directory (HOME, TMPDIR, its working
//! directory) goes with it. Each refusal is TensorFlow's or Python's own PERMISSION_DENIED,
//! and the session goes on.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tensorflow::{DataType, Graph};
use tfsd::proto::tensorflow::{TensorProto, TensorShapeProto};
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

/// Landlock is what these tests are about; on a kernel without it the sandbox runs in
/// "auto" mode without filesystem confinement and there is nothing to check.
fn landlock_available() -> bool {
    // SAFETY: the version query reads no memory.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if version <= 0 {
        eprintln!("no Landlock on this kernel: the sandbox tests have nothing to check");
    }
    version > 0
}

/// `read = ReadFile(path)`, `write = WriteFile(path, contents)`.
fn file_graph() -> Vec<u8> {
    let mut graph = Graph::new();
    let path = placeholder(&mut graph, "path", DataType::String);
    let contents = placeholder(&mut graph, "contents", DataType::String);
    add_op(&mut graph, "ReadFile", "read", &[&path], |_| {});
    add_op(
        &mut graph,
        "WriteFile",
        "write",
        &[&path, &contents],
        |_| {},
    );
    graph.graph_def().expect("graph_def")
}

fn string(value: &str) -> TensorProto {
    TensorProto {
        dtype: 7,
        tensor_shape: Some(TensorShapeProto::default()),
        string_val: vec![value.as_bytes().to_vec()],
        ..TensorProto::default()
    }
}

async fn read_file(
    client: &mut Client,
    session: &str,
    path: &Path,
) -> Result<Vec<u8>, tonic::Status> {
    let path = path.display().to_string();
    let outputs = run(client, session, &[("path", string(&path))], &["read"], &[]).await?;
    Ok(outputs[0].string_val.first().cloned().unwrap_or_default())
}

async fn write_file(
    client: &mut Client,
    session: &str,
    path: &Path,
    contents: &str,
) -> Result<(), tonic::Status> {
    let path = path.display().to_string();
    let feeds = [("path", string(&path)), ("contents", string(contents))];
    run(client, session, &feeds, &[], &["write"])
        .await
        .map(|_| ())
}

/// The worker's scratch directory, from its environment (the test runs unconfined).
fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Workers never run as root: a root daemon's run as nobody (workers.user unset), any other
/// daemon's as the daemon's user.
fn expected_worker_uid() -> u32 {
    if running_as_root() {
        65534
    } else {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }
}

/// The real uid of a process, from /proc/PID/status.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("Uid line")
}

fn scratch_of(worker_pid: u32) -> PathBuf {
    let environ = std::fs::read(format!("/proc/{worker_pid}/environ")).expect("worker environ");
    let tmpdir = environ
        .split(|byte| *byte == 0)
        .find_map(|entry| entry.strip_prefix(b"TMPDIR="))
        .expect("the worker has TMPDIR");
    PathBuf::from(String::from_utf8_lossy(tmpdir).to_string())
}

fn assert_denied(result: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status.message().contains("Permission denied"),
        "{what}: {}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graph_session_reaches_its_scratch_directory_and_nothing_private() {
    if !landlock_available() {
        return;
    }
    let dir = TempDir::new("graph");
    std::fs::write(dir.0.join("ops.token"), "a-secret-token\n").expect("token");
    let config = dir.0.join("tfsd.toml");
    std::fs::write(&config, "[state]\ndir = \"state\"\n").expect("config");
    let daemon = Daemon::start_with(&["--config", config.to_str().expect("path")]);
    let mut client = daemon.client().await;

    let ours = create(&mut client, file_graph()).await;
    let theirs = create(&mut client, file_graph()).await;
    let (id, scratch) = (ours.session_id.clone(), scratch_of(ours.worker_pid));
    let their_scratch = scratch_of(theirs.worker_pid);
    assert_ne!(scratch, their_scratch);
    // A root daemon's workers run as nobody, never root, and their directories lie outside
    // the state directory (0700, the daemon's alone).
    let scratch_root = if running_as_root() {
        std::env::temp_dir().join(format!("tfsd-scratch-{}-1", daemon.pid()))
    } else {
        dir.0.join("state/scratch")
    };
    assert!(scratch.starts_with(&scratch_root), "{scratch:?}");
    assert_eq!(uid_of(ours.worker_pid), expected_worker_uid());
    if running_as_root() {
        let status = client
            .get_daemon_status(api::GetDaemonStatusRequest {})
            .await
            .expect("daemon status")
            .into_inner();
        assert!(
            status.sandbox.contains("workers run as nobody (uid 65534)"),
            "{}",
            status.sandbox
        );
    }

    // Its own directory: written and read back by the session, there on disk.
    let own_file = scratch.join("notes.txt");
    write_file(&mut client, &id, &own_file, "kept")
        .await
        .expect("write in scratch");
    assert_eq!(std::fs::read_to_string(&own_file).expect("on disk"), "kept");
    assert_eq!(
        read_file(&mut client, &id, &own_file)
            .await
            .expect("read back"),
        b"kept"
    );
    // The system's files that programs need stay readable.
    let passwd = read_file(&mut client, &id, Path::new("/etc/passwd")).await;
    assert!(passwd.expect("/etc/passwd").starts_with(b"root:"));

    let their_file = their_scratch.join("theirs.txt");
    std::fs::write(&their_file, "private").expect("their file");
    let database = dir.0.join("state/sessions.sqlite3");
    assert!(database.is_file(), "the state directory holds the database");
    let daemon_environ = PathBuf::from(format!("/proc/{}/environ", daemon.pid()));
    for path in [
        Path::new("/etc/shadow"),
        config.as_path(),
        &dir.0.join("ops.token"),
        &database,
        &daemon_environ,
        &their_file,
    ] {
        assert_denied(
            read_file(&mut client, &id, path).await,
            &format!("ReadFile {}", path.display()),
        );
        // The refusal is an op's error: the session goes on.
        assert_eq!(
            read_file(&mut client, &id, &own_file)
                .await
                .expect("next step"),
            b"kept"
        );
    }
    for path in [
        dir.0.join("state/planted.txt"),
        dir.0.join("planted.txt"),
        their_scratch.join("planted.txt"),
        std::env::temp_dir().join(format!("tfsd-sandbox-planted-{}", std::process::id())),
    ] {
        assert_denied(
            write_file(&mut client, &id, &path, "x").await,
            &format!("WriteFile {}", path.display()),
        );
        assert!(!path.exists(), "{} was written", path.display());
    }
    assert_eq!(
        read_file(&mut client, &id, &own_file)
            .await
            .expect("still serving"),
        b"kept"
    );

    // The scratch directory is the session's: a recycle carries its files into the fresh
    // worker's, and the old worker's goes with the old worker.
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("recycle")
        .into_inner();
    let fresh_pid = recycled.session.expect("session").worker_pid;
    let fresh_scratch = scratch_of(fresh_pid);
    assert_ne!(fresh_scratch, scratch);
    wait_until_removed(&scratch);
    assert_eq!(
        read_file(&mut client, &id, &fresh_scratch.join("notes.txt"))
            .await
            .expect("carried over"),
        b"kept"
    );
    assert!(!own_file.exists(), "the old worker's copy is gone with it");

    client
        .close_session(api::CloseSessionRequest { session_id: id })
        .await
        .expect("close");
    wait_until_removed(&fresh_scratch);
}

/// Runs a script in a Python session; returns its stdout, failing on an exception.
async fn call_script(client: &mut Client, session_id: &str, source: &str) -> String {
    let request = api::CallRequest {
        session_id: session_id.to_string(),
        target: Some(api::call_request::Target::Script(api::Script {
            path: "sandbox_probe.py".to_string(),
            source: source.as_bytes().to_vec(),
            argv: Vec::new(),
        })),
        timeout_ms: 0,
        close_session_after: false,
    };
    let mut events = client.call(request).await.expect("call").into_inner();
    let mut stdout = String::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.message().await.expect("call events") {
            match event.event {
                Some(api::call_event::Event::Output(output))
                    if output.stream == api::Stream::Stdout as i32 =>
                {
                    stdout.push_str(&String::from_utf8_lossy(&output.data));
                }
                Some(api::call_event::Event::Exception(exception)) => {
                    panic!("the script raised: {exception:?}\nstdout: {stdout}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the call answered within the deadline");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_session_has_no_network_no_secrets_and_a_home_of_its_own() {
    if !landlock_available() {
        return;
    }
    let interpreter = python_interpreter();
    let daemon =
        Daemon::start_with_env(&[], &[("TFSD_PYTHON_INTERPRETER", interpreter.as_os_str())]);
    let mut client = daemon.client().await;
    let session = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            ..Default::default()
        })
        .await
        .expect("create a Python session")
        .into_inner()
        .session
        .expect("session info");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("address").port();

    let script = format!(
        r#"
import os, socket, tempfile
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=10)
    print("tcp: connected")
except PermissionError as error:
    print("tcp: PermissionError", error.errno)
try:
    open("/etc/shadow").read()
    print("shadow: read")
except PermissionError:
    print("shadow: PermissionError")
try:
    open("/proc/{daemon_pid}/environ", "rb").read()
    print("daemon environ: read")
except PermissionError:
    print("daemon environ: PermissionError")
with open(os.path.join(os.path.expanduser("~"), ".written"), "w") as file:
    file.write("x")
print("uid:", os.getuid())
print("home:", os.environ["HOME"])
print("tmp:", tempfile.gettempdir())
print("cwd:", os.getcwd())
"#,
        daemon_pid = daemon.pid()
    );
    let stdout = call_script(&mut client, &session.session_id, &script).await;
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in {stdout}"))
            .trim()
            .to_string()
    };
    assert_eq!(line("tcp:"), "PermissionError 13", "{stdout}");
    assert_eq!(line("shadow:"), "PermissionError", "{stdout}");
    assert_eq!(line("daemon environ:"), "PermissionError", "{stdout}");
    assert!(
        matches!(listener.accept(), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "nothing connected to the listener"
    );
    let home = PathBuf::from(line("home:"));
    assert_eq!(line("tmp:"), home.display().to_string());
    assert_eq!(line("cwd:"), home.display().to_string());
    assert_eq!(line("uid:"), expected_worker_uid().to_string(), "{stdout}");
    let root = std::env::temp_dir().join(format!("tfsd-scratch-{}-1", daemon.pid()));
    assert!(home.starts_with(&root), "{home:?} under {root:?}");
    assert!(home.join(".written").is_file());

    client
        .close_session(api::CloseSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("close");
    wait_until_removed(&home);
}

/// Waits (inotify on its parent, with a deadline) until `dir` no longer exists: a worker's
/// scratch directory is removed once the worker has been reaped.
fn wait_until_removed(dir: &Path) {
    let parent = dir.parent().expect("parent");
    let parent_c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: inotify calls on a fd of our own, closed at the end; the buffer is ours.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_CLOEXEC);
        assert!(fd >= 0, "inotify_init1");
        let watch = libc::inotify_add_watch(fd, parent_c.as_ptr(), libc::IN_DELETE);
        assert!(watch >= 0, "inotify_add_watch {}", parent.display());
        let deadline = Instant::now() + DEADLINE;
        while dir.exists() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} was not removed", dir.display());
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = left.min(Duration::from_secs(1)).as_millis() as i32;
            if libc::poll(&mut poll, 1, timeout) == 1 {
                let mut buffer = [0u8; 4096];
                libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len());
            }
        }
        libc::close(fd);
    }
}
