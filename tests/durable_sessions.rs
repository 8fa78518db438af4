//! Durable sessions: with a state directory, sessions come back after a restart — clean or
//! `kill -9` — under the same ids with their graphs, and durable ones with their variables
//! as of the last checkpoint.

mod common;

use std::path::PathBuf;

use common::*;
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-state-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("state dir");
    dir
}

fn start(dir: &std::path::Path) -> Daemon {
    Daemon::start_with_env(&[], &[("TFSD_STATE_DIR", dir.as_os_str())])
}

async fn create_durable(client: &mut Client, durable_variables: bool) -> String {
    client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            durable_variables,
            labels: [("run".to_string(), "durable".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session")
        .session_id
}

async fn list_ids(client: &mut Client) -> Vec<String> {
    let mut ids: Vec<String> = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_a_clean_restart() {
    let dir = state_dir("clean");
    let mut daemon = start(&dir);
    let mut client = daemon.client().await;
    let durable = create_durable(&mut client, true).await;
    let plain = create_durable(&mut client, false).await;
    let closed = create_durable(&mut client, false).await;
    for id in [&durable, &plain] {
        run(&mut client, id, &[], &[], &["w_init"])
            .await
            .expect("init");
        run(&mut client, id, &[("x", scalar(4.0))], &[], &["w_add"])
            .await
            .expect("train");
    }
    client
        .extend_graph(api::ExtendGraphRequest {
            session_id: plain.clone(),
            graph_def: extension_graph(),
            current_graph_version: 0,
        })
        .await
        .expect("extend");
    client
        .close_session(api::CloseSessionRequest {
            session_id: closed.clone(),
        })
        .await
        .expect("close");
    assert_eq!(daemon.stop(), 0);

    let daemon = start(&dir);
    let mut client = daemon.client().await;
    let mut expected = vec![durable.clone(), plain.clone()];
    expected.sort();
    assert_eq!(
        list_ids(&mut client).await,
        expected,
        "closed sessions stay closed"
    );
    // The durable session has its variables, checkpointed at shutdown.
    assert_eq!(fetch_f32(&mut client, &durable, "w").await, 7.0);
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: durable.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(info.durable_variables);
    assert_eq!(info.labels["run"], "durable");
    // The other has its graph (extension included) but not its variables.
    let status = run(&mut client, &plain, &[], &["w"], &[])
        .await
        .expect_err("not durable");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: plain.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.graph_version, 1);
    run(&mut client, &plain, &[], &[], &["w_init"])
        .await
        .expect("init");
    let outputs = run(&mut client, &plain, &[("x", scalar(2.0))], &["z"], &[])
        .await
        .expect("the extension is back");
    assert_eq!(as_f32(&outputs[0]), 7.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_training_resumes_from_the_last_checkpoint() {
    let dir = state_dir("kill");
    let mut daemon = start(&dir);
    let mut client = daemon.client().await;
    let id = create_durable(&mut client, true).await;
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    run(&mut client, &id, &[("x", scalar(4.0))], &[], &["w_add"])
        .await
        .expect("train");
    // A recycle that preserves variables writes a checkpoint (w = 7).
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle");
    // Training goes on past the checkpoint, then the daemon dies without warning.
    run(&mut client, &id, &[("x", scalar(1.0))], &[], &["w_add"])
        .await
        .expect("train");
    let workers = children_of(daemon.pid());
    signal(daemon.pid(), libc::SIGKILL);
    let _ = daemon.wait_exit();
    for pid in workers {
        assert!(
            wait_for_exit(pid, DEADLINE),
            "worker {pid} outlived the daemon"
        );
    }

    let daemon = start(&dir);
    let mut client = daemon.client().await;
    assert_eq!(list_ids(&mut client).await, vec![id.clone()]);
    assert_eq!(
        fetch_f32(&mut client, &id, "w").await,
        7.0,
        "the last checkpoint, not the lost step"
    );
    run(&mut client, &id, &[("x", scalar(1.0))], &[], &["w_add"])
        .await
        .expect("training resumes");
    assert_eq!(fetch_f32(&mut client, &id, "w").await, 8.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_durable_session_gets_its_checkpoint_back_after_a_worker_crash() {
    let dir = state_dir("crash");
    let daemon = start(&dir);
    let mut client = daemon.client().await;
    let session = client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            durable_variables: true,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session");
    let id = session.session_id.clone();
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle (checkpoint)")
        .into_inner();
    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    signal(recycled.worker_pid_after, libc::SIGKILL);
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert!(
        restored
            .reason
            .contains("restored from the last checkpoint"),
        "{restored:?}"
    );
    assert_eq!(fetch_f32(&mut client, &id, "w").await, 3.0);
}

/// Every path under `dir`, with its permission bits.
fn modes_under(dir: &std::path::Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("list the state directory") {
        let path = entry.expect("entry").path();
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        found.push((path.clone(), mode));
        if path.is_dir() {
            found.extend(modes_under(&path));
        }
    }
    found
}

/// The state directory holds clients' graphs and variables: 0700, and every file in it 0600,
/// whatever the umask (SQLite alone would make its database and its -wal and -shm 0644, a
/// plain `File::create` a checkpoint 0644). A directory the operator made open to others is
/// tightened, and the log says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_state_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // The usual umask, which leaves new files 0644 and directories 0755; the daemon inherits
    // it. (Set for the whole test process: every test here is content with 022.)
    // SAFETY: umask has no preconditions; it only changes this process's file mode mask.
    unsafe { libc::umask(0o022) };
    let dir = state_dir("modes");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (mut daemon, log) = Daemon::start_capturing_log(&[("TFSD_STATE_DIR", dir.as_os_str())]);
    let mut client = daemon.client().await;
    let id = create_durable(&mut client, true).await;
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    // A preserving recycle writes a checkpoint.
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle (checkpoint)");

    // While the daemon runs: the database with its -wal and -shm, and the checkpoint.
    let found = modes_under(&dir);
    let names: Vec<String> = found
        .iter()
        .filter_map(|(path, _)| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    for expected in [
        "sessions.sqlite3",
        "sessions.sqlite3-wal",
        "sessions.sqlite3-shm",
        "checkpoints",
    ] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
    assert!(
        names.iter().any(|name| name.ends_with(".pb")),
        "a checkpoint: {names:?}"
    );
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
    };
    assert_eq!(mode(&dir), 0o700, "the state directory");
    for (path, mode) in &found {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, expected, "{} is {mode:04o}", path.display());
    }
    assert_eq!(daemon.stop(), 0);
    // The checkpoint written at shutdown too.
    for (path, mode) in modes_under(&dir) {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{} is {mode:04o}", path.display());
    }
    // Said at start-up, before the daemon listened: the line is in the channel already or on
    // its way.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log
            .recv_timeout(left)
            .expect("the log says the directory was tightened");
        if line.contains("tightened") && line.contains("0755") {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
