//! The kernel holds each worker to its session's hard limit: a step that allocates four times
//! the limit in one op is stopped at the limit (by the worker's cgroup on this host, or by the
//! RLIMIT_DATA backstop where no cgroup can be had), with the memory policy's sampling set
//! so slow that it cannot be what stopped it. Real daemon, real workers, real TensorFlow.
//!
//! The tests in this file measure the machine's available memory while a step runs, so they
//! run one at a time (a process-wide lock), not beside each other.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tensorflow::{DataType, Graph, Tensor};
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

const MIB: u64 = 1024 * 1024;
/// The session's hard limit; the step allocates four times as much.
const HARD_LIMIT: u64 = 256 * MIB;
/// What the kernel may let the machine lose beyond the limit before it acts: page cache
/// charged to the worker and the memory other processes of this test use meanwhile.
const MARGIN: u64 = 96 * MIB;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn daemon_with(config: &str) -> Daemon {
    // The directory may go once the daemon has read its config.
    let dir = TempDir::new("enforcement");
    Daemon::start_with(&["--config", &dir.config(config)])
}

/// The policy's sampling slowed to once an hour: only the kernel can act within a test.
const NO_SAMPLING: &str = "[policy]\ninterval = \"1h\"\n";

/// `sum` = the sum of a `Fill` of `elements` floats from the fed `value`: one op that
/// allocates `elements * 4` bytes and touches every page; `dims` is a small fetch.
fn fill_graph(elements: i64) -> Vec<u8> {
    let mut graph = Graph::new();
    let dims = add_op(&mut graph, "Const", "dims", &[], |d| {
        d.set_attr_type("dtype", DataType::Int64).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i64>::new(&[1])
                .with_values(&[elements])
                .expect("value"),
        )
        .expect("value");
    });
    let value = placeholder(&mut graph, "value", DataType::Float);
    let fill = add_op(&mut graph, "Fill", "fill", &[&dims, &value], |_| {});
    let axis = add_op(&mut graph, "Const", "axis", &[], |d| {
        d.set_attr_type("dtype", DataType::Int32).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i32>::new(&[1]).with_values(&[0]).expect("v"),
        )
        .expect("value");
    });
    add_op(&mut graph, "Sum", "sum", &[&fill, &axis], |_| {});
    graph.graph_def().expect("graph_def")
}

async fn create_limited(client: &mut Client, graph_def: Vec<u8>) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            graph_def,
            memory_policy: Some(api::MemoryPolicy {
                hard_limit_bytes: HARD_LIMIT,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session")
}

fn available_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("MemAvailable")
        * 1024
}

/// Samples MemAvailable every millisecond on a thread of its own until dropped; `lowest`
/// is the lowest figure seen.
struct AvailableWatch {
    lowest: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AvailableWatch {
    fn start() -> AvailableWatch {
        let lowest = Arc::new(AtomicU64::new(available_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (lowest, stop) = (lowest.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    lowest.fetch_min(available_bytes(), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        AvailableWatch {
            lowest,
            stop,
            thread: Some(thread),
        }
    }

    fn lowest(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler");
        }
        self.lowest.load(Ordering::SeqCst)
    }
}

/// The cgroup directory (memory controller) that `pid` is in: v1's memory hierarchy when
/// the host has one, else the v2 one.
fn memory_cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some(Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')));
        }
    }
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

fn limit_of(cgroup: &Path) -> Option<u64> {
    ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|file| std::fs::read_to_string(cgroup.join(file)).ok())
        .and_then(|text| text.trim().parse().ok())
}

/// Runs the fill step, which must fail, while MemAvailable is watched: its error, and how
/// much memory the machine lost meanwhile.
async fn failing_fill_step(client: &mut Client, id: &str) -> (tonic::Status, u64) {
    let before = available_bytes();
    let watch = AvailableWatch::start();
    let status = tokio::time::timeout(
        DEADLINE,
        run(client, id, &[("value", scalar(1.0))], &["sum"], &[]),
    )
    .await
    .expect("the step must be answered")
    .expect_err("a step past the limit cannot succeed");
    (status, before.saturating_sub(watch.lowest()))
}

async fn enforcement(client: &mut Client) -> String {
    client
        .get_daemon_status(api::GetDaemonStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .memory_enforcement
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_stops_a_step_at_the_hard_limit_and_the_session_comes_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut daemon = daemon_with(&format!(
        "[workers]\nmemory_enforcement = \"cgroup\"\n{NO_SAMPLING}"
    ));
    let mut client = daemon.client().await;
    let how = enforcement(&mut client).await;
    assert!(how.starts_with("cgroup v"), "{how}");

    let elements = (4 * HARD_LIMIT / 4) as i64;
    let session = create_limited(&mut client, fill_graph(elements)).await;
    let id = session.session_id.clone();

    // The worker is in a cgroup of its own, below the one this test (and so the daemon)
    // started in, with the session's hard limit.
    let ours = memory_cgroup_of(std::process::id()).expect("this process's cgroup");
    let its = memory_cgroup_of(session.worker_pid).expect("the worker's cgroup");
    assert!(
        its.starts_with(&ours) && its != ours,
        "{} is not below {}",
        its.display(),
        ours.display()
    );
    assert_eq!(limit_of(&its), Some(HARD_LIMIT), "{}", its.display());

    let mut events = watch(&mut client, &id).await;
    let (status, dip) = failing_fill_step(&mut client, &id).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("hard limit") && status.message().contains("kernel"),
        "{status:?}"
    );
    assert!(
        dip < HARD_LIMIT + MARGIN,
        "the machine lost {} MiB while the step ran (limit {} MiB)",
        dip / MIB,
        HARD_LIMIT / MIB
    );

    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!((exited.trigger.as_str(), exited.rung), ("hard_limit", 3));
    assert!(exited.reason.contains("memory limit"), "{exited:?}");
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert_ne!(restored.worker_pid, session.worker_pid);
    // The fresh worker is held to the same limit, and the session runs.
    let fresh = memory_cgroup_of(restored.worker_pid).expect("fresh worker's cgroup");
    assert_eq!(limit_of(&fresh), Some(HARD_LIMIT));
    let outputs = run(&mut client, &id, &[], &["dims"], &[])
        .await
        .expect("runs again");
    assert_eq!(outputs[0].tensor_content.as_ref(), elements.to_le_bytes());

    // Every cgroup the daemon made goes with it.
    let subtree = ours.join(format!("tfsd-{}", daemon.pid()));
    assert!(subtree.is_dir(), "{}", subtree.display());
    assert_eq!(daemon.stop(), 0);
    assert!(!subtree.exists(), "{} was left behind", subtree.display());
    assert!(!its.exists() && !fresh.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cgroups_of_a_killed_daemon_are_removed_at_the_next_start_and_no_others() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ours = memory_cgroup_of(std::process::id()).expect("this process's cgroup");
    let cgroup_config = "[workers]\nmemory_enforcement = \"cgroup\"\n";
    // A daemon that stays up beside the others: its cgroups are not the next start's to take.
    let alive = daemon_with(cgroup_config);
    let mut alive_client = alive.client().await;
    let alive_session = create(&mut alive_client, fill_graph(4)).await;
    let kept = ours.join(format!("tfsd-{}", alive.pid()));

    let mut first = daemon_with(cgroup_config);
    let mut client = first.client().await;
    let session = create(&mut client, fill_graph(4)).await;
    let left = ours.join(format!("tfsd-{}", first.pid()));
    assert!(left.is_dir());
    signal(first.pid(), libc::SIGKILL);
    first.wait_exit();
    assert!(wait_for_exit(session.worker_pid, DEADLINE));
    assert!(left.is_dir(), "a SIGKILL leaves the cgroups behind");

    let second = daemon_with(cgroup_config);
    assert!(
        !left.exists(),
        "{} was not removed at the next start",
        left.display()
    );
    assert!(kept.is_dir(), "a live daemon's cgroups were removed");
    assert!(process_alive(alive_session.worker_pid));
    let outputs = run(
        &mut alive_client,
        &alive_session.session_id,
        &[],
        &["dims"],
        &[],
    )
    .await
    .expect("the live daemon's session still runs");
    assert_eq!(outputs[0].tensor_content.as_ref(), 4i64.to_le_bytes());
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cgroup_the_rlimit_backstop_fails_the_allocation_inside_tensorflow() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let daemon = daemon_with(&format!(
        "[workers]\nmemory_enforcement = \"rlimit\"\n{NO_SAMPLING}"
    ));
    let mut client = daemon.client().await;
    let how = enforcement(&mut client).await;
    assert!(how.starts_with("rlimit"), "{how}");
    // Far past what the backstop allows (mappings + limit + headroom), so TensorFlow's
    // allocator is refused at once.
    let elements = (16 * HARD_LIMIT / 4) as i64;
    let session = create_limited(&mut client, fill_graph(elements)).await;
    let id = session.session_id.clone();

    let (status, dip) = failing_fill_step(&mut client, &id).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(dip < HARD_LIMIT + MARGIN, "lost {} MiB", dip / MIB);
    // The worker survived: the allocation failed inside TensorFlow, the session goes on.
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.worker_pid, session.worker_pid);
    let outputs = run(&mut client, &id, &[], &["dims"], &[])
        .await
        .expect("the session goes on");
    assert_eq!(outputs[0].tensor_content.as_ref(), elements.to_le_bytes());
}

/// The backstop holds a Python session too, also where the supervisor may not prlimit its
/// worker (a root daemon's workers run as nobody; a container drops CAP_SYS_RESOURCE): the
/// worker sets its own RLIMIT_DATA, and an allocation past it is a MemoryError the session
/// survives.
#[tokio::test(flavor = "multi_thread")]
async fn the_rlimit_backstop_holds_a_python_session() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let interpreter = python_interpreter();
    let dir = TempDir::new("enforcement-python");
    let daemon = Daemon::start_with_env(
        &[
            "--config",
            &dir.config(&format!(
                "[workers]\nmemory_enforcement = \"rlimit\"\n{NO_SAMPLING}"
            )),
        ],
        &[("TFSD_PYTHON_INTERPRETER", interpreter.as_os_str())],
    );
    let mut client = daemon.client().await;
    let session = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            memory_policy: Some(api::MemoryPolicy {
                hard_limit_bytes: HARD_LIMIT,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create a Python session")
        .into_inner()
        .session
        .expect("session");
    let script = format!(
        r#"
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
print("limit:", hard)
try:
    block = bytearray({bytes})
    print("allocated")
except MemoryError:
    print("MemoryError")
"#,
        bytes = 16 * HARD_LIMIT
    );
    let stdout = python_script(&mut client, &session.session_id, &script).await;
    assert!(stdout.contains("MemoryError"), "{stdout}");
    let limit: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("limit:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no limit in {stdout}"));
    assert!(
        limit < 16 * HARD_LIMIT,
        "RLIMIT_DATA {limit} holds nothing back"
    );
    // The worker lives on, and the session with it.
    let again = python_script(&mut client, &session.session_id, "print('still here')").await;
    assert!(again.contains("still here"), "{again}");
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.worker_pid, session.worker_pid);
}

async fn python_script(client: &mut Client, session_id: &str, source: &str) -> String {
    let request = api::CallRequest {
        session_id: session_id.to_string(),
        target: Some(api::call_request::Target::Script(api::Script {
            path: "probe.py".to_string(),
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
