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
