//! Operating tfsd: health, metrics, and the shutdown sequence, with the real binary.

mod common;

use common::*;
use tfsd::proto::tfsd::v1 as api;

/// The value of the first sample line that starts with `prefix`, e.g.
/// `tfsd_session_actions_total{action="created"}`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_the_daemon() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let before = daemon.scrape_metrics();
    assert!(before.contains("# TYPE tfsd_sessions gauge"), "{before}");
    assert_eq!(sample(&before, "tfsd_sessions "), 0.0);

    let session = create(&mut client, model_graph()).await;
    run(&mut client, &session.session_id, &[], &[], &["w_init"])
        .await
        .expect("run");
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: session.session_id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle");

    let after = daemon.scrape_metrics();
    assert_eq!(sample(&after, "tfsd_sessions "), 1.0);
    assert_eq!(
        sample(
            &after,
            "tfsd_session_actions_total{action=\"created\",trigger=\"client\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "tfsd_session_actions_total{action=\"recycled\",trigger=\"client\"}"
        ),
        1.0
    );
    assert_eq!(sample(&after, "tfsd_run_duration_seconds_count"), 1.0);
    assert!(sample(&after, "tfsd_worker_spawns_total") >= 2.0);
    assert_eq!(
        sample(&after, "tfsd_worker_exits_total{cause=\"stopped\"}"),
        1.0
    );
    let private = format!(
        "tfsd_session_private_bytes{{session_id=\"{}\"}}",
        session.session_id
    );
    assert!(sample(&after, &private) > 0.0, "{after}");
    assert!(sample(&after, "tfsd_system_memory_available_bytes") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_daemon_and_the_pool() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    create(&mut client, model_graph()).await;
    let status = client
        .get_daemon_status(api::GetDaemonStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.pid, daemon.pid());
    assert_eq!(status.session_count, 1);
    assert_eq!(status.warm_pool_size, 1);
    assert_eq!(status.tensorflow_version, "2.21.0");
    assert!(!status.draining);
    let memory = status.memory.expect("memory");
    // The supervisor never loads TensorFlow: it stays small.
    assert!(
        memory.rss_bytes < 100 << 20,
        "supervisor RSS {}",
        memory.rss_bytes
    );
    assert!(status.system.expect("system").total_bytes > 0);
}

/// A graph whose `total` takes a while: a chain of 1024×1024 matrix products. Long enough
/// to still be running when the test sends SIGTERM; its result is whatever it is.
fn slow_graph(products: usize) -> Vec<u8> {
    use tensorflow::{DataType, Graph, Tensor};
    let mut graph = Graph::new();
    let shape = add_op(&mut graph, "Const", "shape", &[], |d| {
        d.set_attr_type("dtype", DataType::Int32).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i32>::new(&[2])
                .with_values(&[1024, 1024])
                .expect("value"),
        )
        .expect("value");
    });
    let a = add_op(&mut graph, "RandomStandardNormal", "a", &[&shape], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
    });
    let mut product = a.clone();
    for i in 0..products {
        product = add_op(
            &mut graph,
            "MatMul",
            &format!("m{i}"),
            &[&product, &a],
            |_| {},
        );
    }
    let axes = add_op(&mut graph, "Const", "axes", &[], |d| {
        d.set_attr_type("dtype", DataType::Int32).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i32>::new(&[2])
                .with_values(&[0, 1])
                .expect("value"),
        )
        .expect("value");
    });
    add_op(&mut graph, "Sum", "total", &[&product, &axes], |_| {});
    graph.graph_def().expect("graph_def")
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_run_finish_refuses_new_work_and_reaps_everything() {
    let mut daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, slow_graph(24)).await;
    let workers = children_of(daemon.pid());
    assert!(workers.contains(&session.worker_pid));

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", daemon.address))
            .expect("address")
            .connect()
            .await
            .expect("connect"),
    );
    let mut health_updates = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "tfsd.v1.SessionService".to_string(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    // The first update is the current status; the warm worker may still be starting.
    let mut status = health_updates
        .message()
        .await
        .expect("health")
        .expect("status");
    while status.status != serving {
        status = health_updates
            .message()
            .await
            .expect("health")
            .expect("status");
    }

    let mut run_client = client.clone();
    let id = session.session_id.clone();
    let in_flight =
        tokio::spawn(async move { run(&mut run_client, &id, &[], &["total"], &[]).await });
    // Wait until the daemon counts the run as in flight.
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;

    signal(daemon.pid(), libc::SIGTERM);
    // Updates queued before the signal (the pool refilling) may still say SERVING; the
    // drain must turn it to NOT_SERVING.
    tokio::time::timeout(DEADLINE, async {
        loop {
            let status = health_updates
                .message()
                .await
                .expect("health stream")
                .expect("status");
            if status.status == not_serving {
                break;
            }
            assert_eq!(status.status, serving);
        }
    })
    .await
    .expect("health turns NOT_SERVING on SIGTERM");

    // New work is refused while the run goes on.
    let refused = Client::connect(format!("http://{}", daemon.address)).await;
    if let Ok(mut fresh) = refused {
        let status = fresh
            .create_session(api::CreateSessionRequest::default())
            .await
            .expect_err("no new sessions while draining");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    let outputs = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the in-flight run must end")
        .expect("task")
        .expect("the in-flight run completes during the drain");
    assert_eq!(outputs[0].dtype, 1);

    assert_eq!(daemon.wait_exit(), 0, "a drained daemon exits 0");
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived the daemon");
    }
}

#[test]
fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = std::env::temp_dir().join(format!("tfsd-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut daemon = Daemon::start_with_env(&[], &[("NOTIFY_SOCKET", socket_path.as_os_str())]);
    let mut buffer = [0u8; 256];
    let received = socket.recv(&mut buffer).expect("READY=1 from the daemon");
    assert_eq!(&buffer[..received], b"READY=1");
    assert_eq!(daemon.stop(), 0);
    let received = socket
        .recv(&mut buffer)
        .expect("STOPPING=1 from the daemon");
    assert_eq!(&buffer[..received], b"STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_tensorflow_stderr_tagged_with_the_session() {
    let (daemon, log) = Daemon::start_capturing_log(&[
        ("TFSD_LOG_FORMAT", "json".as_ref()),
        ("RUST_LOG", "info".as_ref()),
    ]);
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    // Reading an uninitialised variable makes TensorFlow print a warning on the worker's
    // stderr ("Local rendezvous is aborting ...").
    run(&mut client, &id, &[], &["w"], &[])
        .await
        .expect_err("uninitialised");
    let deadline = std::time::Instant::now() + DEADLINE;
    let (mut tensorflow_line, mut created_event) = (false, false);
    while !(tensorflow_line && created_event) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log
            .recv_timeout(left)
            .expect("a TensorFlow log line and a Created event for the session");
        let entry: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|error| panic!("{error}: {line}"));
        if entry["fields"]["session_id"] != id.as_str() {
            continue;
        }
        if entry["target"] == "tfsd::worker_stderr" {
            assert!(entry["fields"]["worker_pid"].as_u64().is_some(), "{line}");
            assert!(entry["fields"]["message"].as_str().is_some(), "{line}");
            tensorflow_line = true;
        }
        // Fields are the names the API uses, never Rust's Debug forms ("Created").
        if entry["fields"]["message"] == "session event" && entry["fields"]["kind"] == "created" {
            assert_eq!(entry["fields"]["trigger"], "client", "{line}");
            created_event = true;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once_and_still_reaps_every_worker() {
    let (mut daemon, log) = Daemon::start_capturing_log(&[("RUST_LOG", "info".as_ref())]);
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    // A step that never ends by itself holds the drain open after the first SIGTERM.
    let mut blocked = client.clone();
    let id = session.session_id.clone();
    tokio::spawn(async move { run(&mut blocked, &id, &[], &["dequeue"], &[]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;
    let workers = children_of(daemon.pid());
    signal(daemon.pid(), libc::SIGTERM);
    // Two signals sent back to back may reach the daemon as one: wait until it has taken
    // the first (it says so) before sending the second.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log.recv_timeout(left).expect("the daemon's log");
        if line.contains("shutting down") {
            break;
        }
    }
    // The drain waits for the step (30 s grace); the second signal must not.
    assert_eq!(daemon.stop(), 130);
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived the daemon");
    }
}

/// A recycle after a purge is a normal operation: exporting variables that are not
/// initialised is not an error, and must not fill the log with TensorFlow's warnings
/// ("Local rendezvous is aborting", "Could not find variable w") from the old worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_recycle_after_a_purge_logs_no_tensorflow_warnings() {
    let (daemon, log) = Daemon::start_capturing_log(&[
        ("TFSD_LOG_FORMAT", "json".as_ref()),
        ("RUST_LOG", "info".as_ref()),
    ]);
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init w only: v stays uninitialised");
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle")
        .into_inner();
    assert_eq!(recycled.variables_preserved, 1, "w only");
    client
        .purge_variables(api::PurgeVariablesRequest {
            session_id: id.clone(),
        })
        .await
        .expect("purge");
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle after purge")
        .into_inner();
    assert_eq!(recycled.variables_preserved, 0);
    // A marker from the fresh worker: reading the uninitialised `w` there makes TensorFlow
    // warn. Everything the old workers wrote came before it.
    run(&mut client, &id, &[], &["w"], &[])
        .await
        .expect_err("uninitialised");
    let fresh = recycled.worker_pid_after;
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut from_old_workers = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log.recv_timeout(left).expect("the fresh worker's warning");
        let entry: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|error| panic!("{error}: {line}"));
        if entry["target"] != "tfsd::worker_stderr" || entry["fields"]["session_id"] != id.as_str()
        {
            continue;
        }
        if entry["fields"]["worker_pid"] == fresh {
            break;
        }
        from_old_workers.push(line);
    }
    assert!(from_old_workers.is_empty(), "{from_old_workers:#?}");
}

/// The shipped config/tfsd.toml (what `scripts/serve` runs) starts the daemon as it is, with
/// only the listen addresses moved to free ports, and serves a session.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_config_starts_the_daemon_and_serves_a_session() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tfsd.toml");
    let daemon = Daemon::start_with(&["--config", shipped]);
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    run(&mut client, &session.session_id, &[], &[], &["w_init"])
        .await
        .expect("init");
    assert_eq!(fetch_f32(&mut client, &session.session_id, "w").await, 3.0);
}
