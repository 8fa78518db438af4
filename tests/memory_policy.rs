//! The memory policy's loop with real workers and real TensorFlow: limits trip on memory a
//! graph really allocates, and the tests wait on WatchEvents, never on sleeps.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tensorflow::{DataType, Graph, Tensor};
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

const MIB: u64 = 1024 * 1024;

/// A daemon with `policy_toml` as its config.
fn daemon_with(policy_toml: &str) -> Daemon {
    daemon_with_env(policy_toml, &[])
}

/// A daemon with `policy_toml` as its config and `env` in its environment.
fn daemon_with_env(policy_toml: &str, env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-policy-{}-{}",
        std::process::id(),
        uuid_like()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tfsd.toml");
    std::fs::write(&path, policy_toml).expect("config");
    let path = path.to_string_lossy().to_string();
    Daemon::start_with_env(&["--config", &path], env)
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos()
}

/// `big` (VariableV2 of `elements` floats) set from a fed value by `big_init`; `fill` is the
/// same tensor as a plain output; `queue`/`dequeue` block a step for as long as a test needs.
fn growing_graph(elements: i64) -> Vec<u8> {
    let mut graph = Graph::new();
    let fill = add_big_variable(&mut graph, elements);
    // A step that holds `fill` and then blocks on the empty queue.
    let queue = add_op(&mut graph, "FIFOQueueV2", "queue", &[], |d| {
        d.set_attr_type_list("component_types", &[DataType::Float])
            .expect("component_types");
    });
    let dequeue = add_op(&mut graph, "QueueDequeueV2", "dequeue", &[&queue], |d| {
        d.set_attr_type_list("component_types", &[DataType::Float])
            .expect("component_types");
    });
    let axis = add_op(&mut graph, "Const", "axis", &[], |d| {
        d.set_attr_type("dtype", DataType::Int32).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i32>::new(&[1]).with_values(&[0]).expect("v"),
        )
        .expect("value");
    });
    add_op(&mut graph, "Sum", "sum", &[&fill, &axis], |_| {});
    // `fill` passed through once the queue yields (never): the step allocates `fill` and
    // keeps it alive while it waits, so only the policy can end it.
    add_op(&mut graph, "Identity", "hold_and_wait", &[&fill], |d| {
        d.add_control_input(&dequeue);
    });
    graph.graph_def().expect("graph_def")
}

async fn create_with_policy(
    client: &mut Client,
    graph_def: Vec<u8>,
    policy: api::MemoryPolicy,
) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            graph_def,
            memory_policy: Some(policy),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session")
}

fn private(memory: &Option<api::MemoryUsage>) -> u64 {
    memory.as_ref().expect("memory").private_bytes
}

/// A soft limit some 40 MiB above what a fresh worker holds.
fn soft_limit_over(info: &api::SessionInfo) -> u64 {
    private(&info.memory) + 40 * MIB
}

#[tokio::test(flavor = "multi_thread")]
async fn a_soft_limit_purges_between_steps_and_memory_comes_back() {
    let daemon = daemon_with("[policy]\ninterval = \"100ms\"\n");
    let mut client = daemon.client().await;
    // Learn a fresh worker's footprint, then set the limit from it.
    let probe = create(&mut client, growing_graph(16 << 20)).await;
    let soft = soft_limit_over(&probe);
    let session = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            soft_limit_bytes: soft,
            ..Default::default()
        },
    )
    .await;
    let id = session.session_id.clone();
    let effective = session.memory_policy.expect("policy");
    assert_eq!(effective.soft_limit_bytes, soft);

    let mut events = watch(&mut client, &id).await;
    // 64 MiB of variable: over the soft limit.
    run(
        &mut client,
        &id,
        &[("value", scalar(1.0))],
        &[],
        &["big_init"],
    )
    .await
    .expect("init");
    let purged = next_event(&mut events, api::EventKind::VariablesPurged).await;
    assert_eq!(purged.trigger, "soft_limit");
    assert_eq!(purged.rung, 1);
    assert!(purged.reason.contains("soft limit"), "{purged:?}");
    assert!(private(&purged.memory_before) > soft);
    assert!(private(&purged.memory_after) < soft, "{purged:?}");

    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.automatic_action_count, 1);
    assert!(info.peak_private_bytes > soft);
    // The purge really happened: the variable is uninitialised.
    let status = run(&mut client, &id, &[], &["big"], &[])
        .await
        .expect_err("purged");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_gentle_action_is_not_enough_the_policy_recycles() {
    // With oneDNN's allocator a purge keeps the memory pooled in the process (freed tensors
    // stay in its pool, and `malloc_trim` does not release them): the gentle rung cannot
    // help, the recycle does.
    let daemon = daemon_with(
        "[policy]\ninterval = \"100ms\"\n[workers.env]\nTF_ENABLE_ONEDNN_OPTS = \"1\"\n",
    );
    let mut client = daemon.client().await;
    let probe = create(&mut client, growing_graph(16 << 20)).await;
    let soft = soft_limit_over(&probe);
    let session = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            soft_limit_bytes: soft,
            ..Default::default()
        },
    )
    .await;
    let id = session.session_id.clone();
    let mut events = watch(&mut client, &id).await;
    run(
        &mut client,
        &id,
        &[("value", scalar(1.0))],
        &[],
        &["big_init"],
    )
    .await
    .expect("init");

    let purged = next_event(&mut events, api::EventKind::VariablesPurged).await;
    assert_eq!((purged.trigger.as_str(), purged.rung), ("soft_limit", 1));
    assert!(
        private(&purged.memory_after) > soft,
        "oneDNN keeps it: {purged:?}"
    );
    let recycled = next_event(&mut events, api::EventKind::Recycled).await;
    assert_eq!(
        (recycled.trigger.as_str(), recycled.rung),
        ("soft_limit", 2)
    );
    assert!(private(&recycled.memory_after) < soft, "{recycled:?}");
    assert_ne!(recycled.worker_pid, session.worker_pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_limit_stops_a_running_step_and_the_session_recovers() {
    let daemon = daemon_with("[policy]\ninterval = \"100ms\"\n");
    let mut client = daemon.client().await;
    let probe = create(&mut client, growing_graph(16 << 20)).await;
    let hard = soft_limit_over(&probe);
    let session = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            hard_limit_bytes: hard,
            ..Default::default()
        },
    )
    .await;
    let id = session.session_id.clone();
    let mut events = watch(&mut client, &id).await;

    // The step allocates 64 MiB and then waits on an empty queue: only the policy ends it.
    let status = tokio::time::timeout(
        DEADLINE,
        run(
            &mut client.clone(),
            &id,
            &[("value", scalar(1.0))],
            &["hold_and_wait"],
            &[],
        ),
    )
    .await
    .expect("the policy must stop the step")
    .expect_err("stopped");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("hard limit"), "{status:?}");
    assert!(status.message().contains("MiB"), "{status:?}");

    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!((exited.trigger.as_str(), exited.rung), ("hard_limit", 3));
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert_ne!(restored.worker_pid, session.worker_pid);

    // Back in a fresh worker with its graph (a small step: a 64 MiB one would cross the
    // hard limit again, and rightly be stopped again).
    let outputs = run(&mut client, &id, &[], &["dims"], &[])
        .await
        .expect("runs again");
    assert_eq!(
        outputs[0].tensor_content.as_ref(),
        (16i64 << 20).to_le_bytes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_reports_and_touches_nothing() {
    let daemon = daemon_with("[policy]\ninterval = \"100ms\"\ndry_run = true\n");
    let mut client = daemon.client().await;
    let probe = create(&mut client, growing_graph(16 << 20)).await;
    let soft = soft_limit_over(&probe);
    let id = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            soft_limit_bytes: soft,
            ..Default::default()
        },
    )
    .await
    .session_id;
    let mut events = watch(&mut client, &id).await;
    run(
        &mut client,
        &id,
        &[("value", scalar(1.0))],
        &[],
        &["big_init"],
    )
    .await
    .expect("init");
    let reported = next_event(&mut events, api::EventKind::DryRun).await;
    assert_eq!(reported.trigger, "soft_limit");
    assert!(reported.reason.contains("would purge"), "{reported:?}");
    // Nothing was done: the variable still holds its value.
    let outputs = run(&mut client, &id, &[], &["big"], &[])
        .await
        .expect("still initialised");
    assert_eq!(outputs[0].tensor_content.len() as u64, 64 * MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_are_closed_when_configured() {
    let daemon = daemon_with(
        "[policy]\ninterval = \"100ms\"\n[policy.idle]\ntimeout = \"1s\"\naction = \"close\"\n",
    );
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    let mut events = watch(&mut client, &id).await;
    let closed = next_event(&mut events, api::EventKind::Closed).await;
    assert_eq!(closed.trigger, "idle");
    let status = client
        .get_session(api::GetSessionRequest { session_id: id })
        .await
        .expect_err("closed");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn system_pressure_recycles_a_victim() {
    // Available memory is always below 1000 TiB: permanent pressure.
    let daemon = daemon_with(
        "[policy]\ninterval = \"100ms\"\ncooldown = \"1h\"\n[policy.pressure]\nmin_available = \"1000TiB\"\n",
    );
    let mut client = daemon.client().await;
    let mut events = client
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let session = create(&mut client, model_graph()).await;
    let recycled = next_event(&mut events, api::EventKind::Recycled).await;
    assert_eq!(recycled.session_id, session.session_id);
    assert_eq!(recycled.trigger, "system_pressure");
    assert!(recycled.reason.contains("available memory"), "{recycled:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_capped_by_the_operator_and_bad_policies_rejected() {
    let daemon = daemon_with("[policy]\nmax_soft_limit = \"1GiB\"\nhard_limit = \"8GiB\"\n");
    let mut client = daemon.client().await;
    let session = create_with_policy(
        &mut client,
        model_graph(),
        api::MemoryPolicy {
            soft_limit_bytes: 100 << 30,
            ..Default::default()
        },
    )
    .await;
    let policy = session.memory_policy.expect("policy");
    assert_eq!(policy.soft_limit_bytes, 1 << 30);
    assert_eq!(policy.hard_limit_bytes, 8 << 30);

    let status = client
        .create_session(api::CreateSessionRequest {
            memory_policy: Some(api::MemoryPolicy {
                soft_limit_bytes: 2 << 30,
                hard_limit_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("hard below soft");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("hard_limit_bytes"), "{status:?}");
}

/// A worker binary in front of the real `tfsd-worker` whose next start, once armed, is held
/// until the test lets it go: whatever needs that worker (here a recycle) is in progress and
/// cannot finish, for as long as the test wants, without depending on timing. (A stopped
/// worker would not do: tfsd kills a worker that stays stopped, as it should.)
struct HeldStart {
    dir: PathBuf,
    script: PathBuf,
}

impl HeldStart {
    fn new() -> HeldStart {
        let dir = std::env::temp_dir().join(format!(
            "tfsd-held-start-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        // The held worker moves its arming file and writes to the FIFOs, and a root
        // daemon's workers run as nobody.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        for fifo in ["held.fifo", "release.fifo"] {
            let path = std::ffi::CString::new(dir.join(fifo).as_os_str().as_bytes()).expect("path");
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
            std::fs::set_permissions(dir.join(fifo), std::fs::Permissions::from_mode(0o666))
                .expect("chmod");
        }
        let real = PathBuf::from(env!("CARGO_BIN_EXE_tfsd"))
            .parent()
            .expect("target dir")
            .join("tfsd-worker");
        let script = dir.join("worker.sh");
        // `mv` of the arming file is atomic: exactly one start takes it. That start says so
        // on one FIFO and waits for the test to write to the other.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 dir='{dir}'\n\
                 if mv \"$dir/armed\" \"$dir/taken\" 2>/dev/null; then\n\
                 echo \"$$\" > \"$dir/held.fifo\"\n\
                 cat \"$dir/release.fifo\" > /dev/null\n\
                 fi\n\
                 exec '{real}' \"$@\"\n",
                dir = dir.display(),
                real = real.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        HeldStart { dir, script }
    }

    /// Holds the next worker start. Answers a receiver that gets the held start's pid once
    /// it is held.
    fn arm(&self) -> std::sync::mpsc::Receiver<String> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let held = self.dir.join("held.fifo");
        // Opening a FIFO for reading waits for its writer: the held start.
        std::thread::spawn(move || {
            if let Ok(pid) = std::fs::read_to_string(held) {
                let _ = sender.send(pid.trim().to_string());
            }
        });
        std::fs::write(self.dir.join("armed"), b"").expect("arm");
        receiver
    }

    /// Lets the held start go on when `go` says so, or after `at_the_latest`: a test that
    /// fails must not leave the daemon waiting for a worker.
    fn release_on(&self, go: std::sync::mpsc::Receiver<()>, at_the_latest: Duration) {
        let release = self.dir.join("release.fifo");
        std::thread::spawn(move || {
            let _ = go.recv_timeout(at_the_latest);
            // Opening a FIFO for writing waits for its reader: the held start.
            let _ = std::fs::write(release, b"go\n");
        });
    }

    fn binary(&self) -> &Path {
        &self.script
    }
}

/// The next event on `events`, whatever it is, with a deadline.
async fn next_any(events: &mut tonic::Streaming<api::SessionEvent>) -> api::SessionEvent {
    tokio::time::timeout(DEADLINE, events.message())
        .await
        .expect("no event")
        .expect("event stream")
        .expect("stream ended")
}

fn is(event: &api::SessionEvent, session_id: &str, kind: api::EventKind) -> bool {
    event.session_id == session_id && event.kind == kind as i32
}

/// Found by review (issue 13): the policy applied its actions one at a time, so a session
/// over its hard limit waited behind another session's recycle — 8 s for a preserving one
/// that copies a large variable, and indefinitely for one whose fresh worker does not come.
/// Here session A's soft-limit recycle cannot finish (its fresh worker's start is held) until
/// session B's hard-limit kill has been handled; the policy must handle B meanwhile, and must
/// not start a second action on A while its first still runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_hard_limit_is_enforced_while_another_session_recycles() {
    /// If B is not handled while A recycles, A's held start is let go after this long and
    /// the test fails on the order of events.
    const HOLD_AT_MOST: Duration = Duration::from_secs(30);
    let held = HeldStart::new();
    // No warm pool, and none that grows under demand (pool_max = 0): every worker is started
    // when needed, so the recycle's start is the one held. oneDNN keeps purged memory pooled,
    // so A's gentle rung does not help and the ladder goes on to a recycle.
    // The held start's script moves its arming file and writes to its FIFOs: the worker
    // sandbox lets it write there.
    let daemon = daemon_with_env(
        &format!(
            "[policy]\ninterval = \"100ms\"\n[workers]\npool_max = 0\n\
             [workers.env]\nTF_ENABLE_ONEDNN_OPTS = \"1\"\n\
             [sandbox]\nwrite_paths = [\"{}\"]\n",
            held.dir.display()
        ),
        &[
            ("TFSD_WORKER_BINARY", held.binary().as_os_str()),
            ("TFSD_POOL_SIZE", "0".as_ref()),
        ],
    );
    let mut client = daemon.client().await;
    let probe = create(&mut client, growing_graph(16 << 20)).await;
    let limit = soft_limit_over(&probe);
    let slow = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            soft_limit_bytes: limit,
            preserve_variables: true,
            ..Default::default()
        },
    )
    .await
    .session_id;
    let over = create_with_policy(
        &mut client,
        growing_graph(16 << 20),
        api::MemoryPolicy {
            hard_limit_bytes: limit,
            ..Default::default()
        },
    )
    .await
    .session_id;
    let mut events = client
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();

    // A: 64 MiB of variable, over its soft limit → purge → still over → recycle, whose
    // fresh worker is the held start.
    let held_pid = held.arm();
    run(
        &mut client,
        &slow,
        &[("value", scalar(1.0))],
        &[],
        &["big_init"],
    )
    .await
    .expect("init");
    tokio::task::spawn_blocking(move || held_pid.recv_timeout(DEADLINE))
        .await
        .expect("task")
        .expect("A's recycle never started its fresh worker");

    // B: a step that allocates 64 MiB, over its hard limit, and waits.
    let (go, release) = std::sync::mpsc::channel();
    held.release_on(release, HOLD_AT_MOST);
    let mut stepper = client.clone();
    let over_step = over.clone();
    let step = tokio::spawn(async move {
        run(
            &mut stepper,
            &over_step,
            &[("value", scalar(1.0))],
            &["hold_and_wait"],
            &[],
        )
        .await
    });
    let first = loop {
        let event = next_any(&mut events).await;
        if is(&event, &over, api::EventKind::WorkerExited)
            || is(&event, &slow, api::EventKind::Recycled)
        {
            break event;
        }
    };
    assert!(
        is(&first, &over, api::EventKind::WorkerExited),
        "A's recycle finished before B's hard-limit kill was handled: {first:?}"
    );
    assert_eq!((first.trigger.as_str(), first.rung), ("hard_limit", 3));
    let _ = go.send(());
    let status = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("B's step answered")
        .expect("task")
        .expect_err("stopped");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let recycled = loop {
        let event = next_any(&mut events).await;
        if is(&event, &slow, api::EventKind::Recycled) {
            break event;
        }
    };
    assert_eq!(
        (recycled.trigger.as_str(), recycled.rung),
        ("soft_limit", 2)
    );

    // One action at a time on A: the purge and the recycle, nothing decided for it while
    // its recycle ran (an action counts when it starts, even one that would wait for A's
    // lock behind the recycle).
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: slow.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.automatic_action_count, 2, "{info:?}");
}
