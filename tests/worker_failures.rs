//! Workers that fail to start: one failure is a transient, not an outage. The worker binary
//! is a small script in front of the real `tfsd-worker` that makes chosen starts fail, so
//! each failure happens exactly where the test wants it (found by the chaos soak: a single
//! worker killed while loading flipped health to NOT_SERVING, and left a restoring session
//! broken).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use tfsd::proto::tfsd::v1 as api;

/// A directory with `worker.sh`, which fails (exit 1) on the starts numbered in `fail_on`
/// and runs the real worker otherwise.
fn flaky_worker(name: &str, fail_on: &[u32]) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-flaky-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let real = PathBuf::from(env!("CARGO_BIN_EXE_tfsd"))
        .parent()
        .expect("target dir")
        .join("tfsd-worker");
    let fail_on: Vec<String> = fail_on.iter().map(u32::to_string).collect();
    let script = dir.join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             count_file='{count}'\n\
             n=$(( $(cat \"$count_file\" 2>/dev/null || echo 0) + 1 ))\n\
             echo \"$n\" > \"$count_file\"\n\
             case ' {fail_on} ' in *\" $n \"*) exit 1 ;; esac\n\
             exec '{real}' \"$@\"\n",
            count = dir.join("starts").display(),
            fail_on = fail_on.join(" "),
            real = real.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, script)
}

fn failed_starts(daemon: &Daemon) -> f64 {
    daemon
        .scrape_metrics()
        .lines()
        .find(|line| line.starts_with("tfsd_worker_exits_total{cause=\"exit_code_1\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

async fn sessions_serving(daemon: &Daemon) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.address))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tfsd.v1.SessionService".to_string(),
        })
        .await
        .expect("health")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failed_start_does_not_turn_health_off() {
    let (_dir, script) = flaky_worker("health", &[2]);
    let daemon = Daemon::start_with_env(&[], &[("TFSD_WORKER_BINARY", script.as_os_str())]);
    let mut client = daemon.client().await;
    // Start 1 is the warm worker; the session takes it and the refill (start 2) fails.
    create(&mut client, model_graph()).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while failed_starts(&daemon) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "start 2 never failed");
        tokio::task::yield_now().await;
    }
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(sessions_serving(&daemon).await, serving);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_tries_another_worker_when_one_fails_to_start() {
    // No warm pool: the restore starts its own worker, and that start (number 2) fails.
    let (_dir, script) = flaky_worker("restore", &[2]);
    let daemon = Daemon::start_with_env(
        &[],
        &[
            ("TFSD_WORKER_BINARY", script.as_os_str()),
            ("TFSD_POOL_SIZE", "0".as_ref()),
        ],
    );
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    signal(session.worker_pid, libc::SIGKILL);
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert_ne!(restored.worker_pid, session.worker_pid);
    assert_eq!(
        failed_starts(&daemon),
        1.0,
        "start 2 failed and was retried"
    );
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.state, api::SessionState::Ready as i32);
    run(&mut client, &session.session_id, &[], &[], &["w_init"])
        .await
        .expect("the session works");
}
