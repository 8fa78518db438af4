//! Supervision that holds when workers hang and clients misbehave, tried from the outside as
//! an attacker or an unlucky operator would: workers stopped with SIGSTOP, steps that never
//! end, closes mid-step, concurrent creates against a cap, a create flood, SIGTERM with steps
//! in flight. Every wait has a deadline; nothing sleeps for readiness.

mod common;

use std::time::Duration;

use common::*;
use tensorflow::{DataType, Graph};
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

/// A daemon started with `toml` as its config file.
fn daemon_with(name: &str, toml: &str) -> Daemon {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-supervision-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tfsd.toml");
    std::fs::write(&path, toml).expect("config");
    Daemon::start_with(&["--config", path.to_str().expect("utf-8 path")])
}

/// `y = x * 2` for quick steps, and `dequeue`, a target that blocks until the step is
/// stopped (an empty queue nobody fills).
fn blocking_graph() -> Vec<u8> {
    let mut graph = Graph::new();
    let x = placeholder(&mut graph, "x", DataType::Float);
    let two = constant(&mut graph, "two", 2.0);
    add_op(&mut graph, "Mul", "y", &[&x, &two], |_| {});
    let queue = add_op(&mut graph, "FIFOQueueV2", "queue", &[], |d| {
        d.set_attr_type_list("component_types", &[DataType::Float])
            .expect("component_types");
    });
    add_op(&mut graph, "QueueDequeueV2", "dequeue", &[&queue], |d| {
        d.set_attr_type_list("component_types", &[DataType::Float])
            .expect("component_types");
    });
    graph.graph_def().expect("graph_def")
}

/// `count` CreateSessions sent at once, each from its own task; their answers.
async fn create_at_once(
    client: &Client,
    count: usize,
) -> Vec<Result<tonic::Response<api::CreateSessionResponse>, tonic::Status>> {
    let creates = (0..count).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .create_session(api::CreateSessionRequest {
                    graph_def: blocking_graph(),
                    ..Default::default()
                })
                .await
        })
    });
    tokio::time::timeout(DEADLINE, futures::future::join_all(creates))
        .await
        .expect("creates never answered")
        .into_iter()
        .map(|answer| answer.expect("join"))
        .collect()
}

/// Waits (with a deadline) until the kernel shows `pid` stopped (state T).
fn wait_until_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rfind(')').and_then(|end| {
            stat[end + 1..]
                .split_whitespace()
                .next()
                .map(str::to_string)
        });
        if state.as_deref() == Some("T") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker {pid} never stopped: {stat}"
        );
        std::thread::yield_now();
    }
}

async fn double(client: &mut Client, session_id: &str, value: f32) -> Result<f32, tonic::Status> {
    run(client, session_id, &[("x", scalar(value))], &["y"], &[])
        .await
        .map(|outputs| as_f32(&outputs[0]))
}

async fn watch(client: &mut Client) -> tonic::Streaming<api::SessionEvent> {
    client
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner()
}

async fn session_info(client: &mut Client, session_id: &str) -> api::SessionInfo {
    client
        .get_session(api::GetSessionRequest {
            session_id: session_id.to_string(),
        })
        .await
        .expect("get session")
        .into_inner()
}

/// A step with a timeout on a worker that stopped answering (SIGSTOP) answers
/// DEADLINE_EXCEEDED shortly after its timeout; the worker is killed and the session comes
/// back in a fresh one, with a WORKER_EXITED event naming the cause. Before: the step hung
/// until the client gave up.
#[tokio::test]
async fn a_step_on_a_stopped_worker_answers_at_its_deadline() {
    // Liveness far away: this test is about the step's own deadline.
    let daemon = daemon_with(
        "step-deadline",
        "[workers]\nrun_grace = \"1s\"\nliveness_timeout = \"10m\"\n",
    );
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    let mut events = watch(&mut client).await;
    signal(session.worker_pid, libc::SIGSTOP);

    let mut request = run_request(&session.session_id, &[("x", scalar(1.0))], &["y"], &[]);
    request.timeout_ms = 500;
    let status = tokio::time::timeout(DEADLINE, client.run(request))
        .await
        .expect("the step never answered")
        .expect_err("a stopped worker cannot answer");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("killed"), "{}", status.message());

    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!(exited.trigger, "unresponsive", "{exited:?}");
    assert!(exited.reason.contains("stopped answering"), "{exited:?}");
    next_event(&mut events, api::EventKind::Restored).await;
    assert!(wait_for_exit(session.worker_pid, DEADLINE));
    assert_eq!(
        double(&mut client, &session.session_id, 4.0)
            .await
            .expect("step"),
        8.0
    );
}

/// A stopped worker is noticed from its state in /proc, without any deadline of a request:
/// killed and replaced; a step without a timeout waiting on it fails with UNAVAILABLE
/// naming the cause instead of hanging forever; the session then works.
#[tokio::test]
async fn a_stopped_worker_is_replaced_and_its_waiting_step_told_why() {
    let daemon = daemon_with("liveness", "[workers]\nliveness_timeout = \"1s\"\n");
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    let mut events = watch(&mut client).await;
    // A step that never ends by itself, and has no timeout: only liveness can end it.
    let mut stepper = client.clone();
    let id = session.session_id.clone();
    let step = tokio::spawn(async move { run(&mut stepper, &id, &[], &[], &["dequeue"]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;
    signal(session.worker_pid, libc::SIGSTOP);

    let status = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("the step never answered")
        .expect("join")
        .expect_err("a stopped worker cannot answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("stopped answering"),
        "{}",
        status.message()
    );
    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!(exited.trigger, "unresponsive", "{exited:?}");
    assert!(exited.reason.contains("stopped"), "{exited:?}");
    next_event(&mut events, api::EventKind::Restored).await;
    let info = session_info(&mut client, &session.session_id).await;
    assert_ne!(info.worker_pid, session.worker_pid);
    assert_eq!(info.worker_restart_count, 1);
    assert_eq!(
        double(&mut client, &session.session_id, 3.0)
            .await
            .expect("step"),
        6.0
    );
}

/// A preserving recycle of a stopped idle worker does not wedge the session: the export
/// misses its deadline (workers.call_timeout), the worker is killed as unresponsive, the
/// session is restored, and later calls work.
#[tokio::test]
async fn a_preserving_recycle_of_a_stopped_worker_does_not_wedge_the_session() {
    // Liveness far away: this test is about the control call's own deadline.
    let daemon = daemon_with(
        "recycle-stopped",
        "[workers]\ncall_timeout = \"1s\"\nliveness_timeout = \"10m\"\n",
    );
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    let mut events = watch(&mut client).await;
    signal(session.worker_pid, libc::SIGSTOP);
    wait_until_stopped(session.worker_pid);

    let recycle = client.recycle_session(api::RecycleSessionRequest {
        session_id: session.session_id.clone(),
        preserve_variables: true,
    });
    let status = tokio::time::timeout(DEADLINE, recycle)
        .await
        .expect("the recycle never answered")
        .expect_err("nothing can be exported from a stopped worker");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("stopped answering"),
        "{}",
        status.message()
    );
    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!(exited.trigger, "unresponsive", "{exited:?}");
    next_event(&mut events, api::EventKind::Restored).await;
    assert_eq!(
        double(&mut client, &session.session_id, 5.0)
            .await
            .expect("step"),
        10.0
    );
    // And the operator's recycle works again.
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: session.session_id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle after the restore");
}

/// CloseSession does not queue behind a step that never ends: the worker is killed at
/// once, the step answers CANCELLED saying the session was closed, and the worker is gone.
/// Before: the close waited for the step (forever).
#[tokio::test]
async fn close_preempts_a_step_in_flight() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    let mut stepper = client.clone();
    let id = session.session_id.clone();
    let step = tokio::spawn(async move { run(&mut stepper, &id, &[], &[], &["dequeue"]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;

    let close = client.close_session(api::CloseSessionRequest {
        session_id: session.session_id.clone(),
    });
    tokio::time::timeout(DEADLINE, close)
        .await
        .expect("the close waited behind the step")
        .expect("close");
    let status = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("the step never answered")
        .expect("join")
        .expect_err("its session was closed");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(status.message().contains("closed"), "{}", status.message());
    assert!(wait_for_exit(session.worker_pid, DEADLINE));
}

/// A recycle that keeps nothing does not queue behind a step that never ends either: the
/// step answers CANCELLED naming the recycle, and the session goes on in a fresh worker.
#[tokio::test]
async fn a_plain_recycle_preempts_a_step_in_flight() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    let mut stepper = client.clone();
    let id = session.session_id.clone();
    let step = tokio::spawn(async move { run(&mut stepper, &id, &[], &[], &["dequeue"]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;

    let recycle = client.recycle_session(api::RecycleSessionRequest {
        session_id: session.session_id.clone(),
        preserve_variables: false,
    });
    let recycled = tokio::time::timeout(DEADLINE, recycle)
        .await
        .expect("the recycle waited behind the step")
        .expect("recycle")
        .into_inner();
    assert_ne!(recycled.worker_pid_after, session.worker_pid);
    let status = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("the step never answered")
        .expect("join")
        .expect_err("its worker was recycled");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        status.message().contains("recycled"),
        "{}",
        status.message()
    );
    assert_eq!(
        double(&mut client, &session.session_id, 2.0)
            .await
            .expect("step"),
        4.0
    );
}

/// Concurrent creates against limits.max_sessions make exactly that many sessions: the
/// slot is reserved before the worker is taken. Before: all of them passed the check.
#[tokio::test]
async fn concurrent_creates_never_pass_max_sessions() {
    const CAP: usize = 2;
    const CREATES: usize = 10;
    let daemon = daemon_with("admission", &format!("[limits]\nmax_sessions = {CAP}\n"));
    let client = daemon.client().await;
    let answers = create_at_once(&client, CREATES).await;
    let mut made = 0;
    for answer in answers {
        match answer {
            Ok(_) => made += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("max_sessions"),
                    "{}",
                    status.message()
                );
            }
        }
    }
    assert_eq!(made, CAP);
    let mut client = client;
    let listed = client
        .list_sessions(api::ListSessionsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), CAP);
}

/// A create flood against one start slot and a short queue: the excess is refused at once
/// with RESOURCE_EXHAUSTED saying why and when to retry, the admitted creates succeed, and
/// health never leaves SERVING. Before: every create started its own worker at once.
#[tokio::test]
async fn a_create_flood_queues_within_bounds_and_refuses_the_rest() {
    const CREATES: usize = 8;
    let daemon = daemon_with(
        "flood",
        "[workers]\npool_size = 0\nmax_concurrent_starts = 1\nmax_waiting_creates = 2\n",
    );
    let client = daemon.client().await;
    let answers = create_at_once(&client, CREATES).await;
    let (mut made, mut refused) = (0, 0);
    for answer in answers {
        match answer {
            Ok(_) => made += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("retry"), "{}", status.message());
                refused += 1;
            }
        }
    }
    // One starting and two waiting are admitted at least; the rest, at most, refused.
    assert!(made >= 3, "{made} made, {refused} refused");
    assert!(refused >= 1, "{made} made, {refused} refused");
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(client_channel(&daemon).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tfsd.v1.SessionService".to_string(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

async fn client_channel(daemon: &Daemon) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", daemon.address))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// SIGTERM with steps in flight on several sessions: one drain deadline for all of them
/// (not one per session, one after another), each step answers UNAVAILABLE saying the
/// daemon is shutting down (not "being restored"), requests sent during the drain are
/// refused with UNAVAILABLE (not NOT_FOUND), and every worker is reaped.
#[tokio::test]
async fn shutdown_drains_every_session_within_one_deadline() {
    const SESSIONS: usize = 4;
    const DRAIN: Duration = Duration::from_secs(4);
    let mut daemon = daemon_with(
        "drain",
        &format!("[server]\ndrain_timeout = \"{}s\"\n", DRAIN.as_secs()),
    );
    let mut client = daemon.client().await;
    let mut steps = Vec::new();
    let mut pids = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let session = create(&mut client, blocking_graph()).await;
        let mut stepper = client.clone();
        let id = session.session_id.clone();
        steps.push(tokio::spawn(async move {
            run(&mut stepper, &id, &[], &[], &["dequeue"]).await
        }));
        wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;
        pids.push(session.worker_pid);
        ids.push(session.session_id);
    }
    signal(daemon.pid(), libc::SIGTERM);
    let signalled = std::time::Instant::now();
    // Refused during the drain, as shutting down.
    let refused = tokio::time::timeout(DEADLINE, async {
        loop {
            match double(&mut client, &ids[0], 1.0).await {
                Err(status) if status.code() == Code::Unavailable => return status,
                Err(status) => panic!("during the drain: {status:?}"),
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("never refused");
    assert!(
        refused.message().contains("shutting down"),
        "{}",
        refused.message()
    );
    for step in steps {
        let status = tokio::time::timeout(DEADLINE, step)
            .await
            .expect("a step never answered")
            .expect("join")
            .expect_err("the drain ends it");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("shutting down"),
            "{}",
            status.message()
        );
    }
    // Sessions drained one after another would take SESSIONS × DRAIN (16 s) from the
    // signal; one deadline, DRAIN plus the reaping (and 2 s for client streams to close).
    let bound = DRAIN * (SESSIONS as u32 - 1);
    let left = bound.saturating_sub(signalled.elapsed());
    assert!(
        wait_for_exit(daemon.pid(), left),
        "the daemon was still draining {bound:?} after SIGTERM"
    );
    daemon.wait_exit();
    for pid in pids {
        assert!(!process_alive(pid), "worker {pid} outlived the daemon");
    }
}

/// The warm pool follows demand: back-to-back recycles that drain a pool of one make it keep
/// more ready workers (up to workers.pool_max), and the waits are counted in metrics.
#[tokio::test]
async fn the_warm_pool_grows_while_demand_drains_it() {
    let daemon = daemon_with("pool-demand", "[workers]\npool_size = 1\npool_max = 3\n");
    let mut client = daemon.client().await;
    let session = create(&mut client, blocking_graph()).await;
    for _ in 0..3 {
        client
            .recycle_session(api::RecycleSessionRequest {
                session_id: session.session_id.clone(),
                preserve_variables: false,
            })
            .await
            .expect("recycle");
    }
    tokio::time::timeout(DEADLINE, async {
        loop {
            let status = client
                .get_daemon_status(api::GetDaemonStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            if status.warm_workers >= 2 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the pool never grew past its configured size");
    let metrics = daemon.scrape_metrics();
    let misses: f64 = metrics
        .lines()
        .find(|line| line.starts_with("tfsd_warm_pool_miss_wait_seconds_count"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no miss count in\n{metrics}"));
    assert!(misses >= 1.0, "{misses}");
}
