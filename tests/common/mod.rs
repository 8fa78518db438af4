//! Test harness: the real `tfsd` binary on port 0, a real tonic client, graphs built with the
//! real TensorFlow (the `tensorflow` crate), and helpers to inspect processes.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tensorflow::{DataType, Graph, Operation, OperationDescription, Shape, Tensor};
use tfsd::proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto::Dim};
use tfsd::proto::tfsd::v1 as api;
use tonic::transport::Channel;

pub type Client = api::session_service_client::SessionServiceClient<Channel>;

/// How long anything in a test may take before the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A running daemon. Dropping it stops the daemon with SIGTERM and waits for it.
pub struct Daemon {
    child: Child,
    stopped: bool,
    pub address: String,
    /// `http://HOST:PORT/metrics`.
    pub metrics_url: String,
    /// `HOST:PORT` of TensorFlow's MasterService.
    pub master_address: String,
    /// `unix:PATH` of the Unix socket (`server.unix_socket`); empty when it is off.
    pub unix_socket: String,
}

/// A fresh directory for one test's files (a config, a state directory), removed on drop.
pub struct TempDir(pub std::path::PathBuf);

/// A fresh directory `tfsd-NAME-PID-NANOS` in the system's temporary directory, made now;
/// the caller removes it (`TempDir` does so on drop).
pub fn unique_temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        TempDir(unique_temp_dir(name))
    }

    /// Writes `text` as `tfsd.toml` in the directory; answers its path.
    pub fn config(&self, text: &str) -> String {
        let path = self.0.join("tfsd.toml");
        std::fs::write(&path, text).expect("config");
        path.to_string_lossy().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts `tfsd serve --listen 127.0.0.1:0` plus `args`, and waits (with a deadline) for
    /// the line that says it listens.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_with_env(args, &[])
    }

    /// Like `start_with`, with extra environment variables for the daemon alone.
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        Daemon::spawn(args, env, Stdio::inherit()).0
    }

    /// Starts a daemon whose log (stderr) comes back line by line through the receiver.
    pub fn start_capturing_log(
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Daemon, std::sync::mpsc::Receiver<String>) {
        Daemon::start_capturing_log_with(&[], env)
    }

    /// `start_capturing_log` with extra `tfsd serve` arguments.
    pub fn start_capturing_log_with(
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Daemon, std::sync::mpsc::Receiver<String>) {
        let (mut daemon, _) = Daemon::spawn(args, env, Stdio::piped());
        let stderr = daemon.child.stderr.take().expect("stderr");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        (daemon, receiver)
    }

    fn spawn(args: &[&str], env: &[(&str, &std::ffi::OsStr)], stderr: Stdio) -> (Daemon, ()) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tfsd"))
            .arg("serve")
            // Port 0 on loopback unless the test listens elsewhere itself.
            .args(if args.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(args)
            // Every test daemon gets its own free port for metrics too.
            .env("TFSD_METRICS_LISTEN", "127.0.0.1:0")
            .env("TFSD_MASTER_LISTEN", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("TFSD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // The test's own variables win over the defaults above.
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start tfsd");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut metrics_url = String::new();
            let mut master_address = String::new();
            let mut unix_socket = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("tfsd metrics on ") {
                    metrics_url = url.to_string();
                }
                if let Some(address) = line.strip_prefix("tfsd master on ") {
                    master_address = address.to_string();
                }
                if let Some(address) = line.strip_prefix("tfsd socket on ") {
                    unix_socket = address.to_string();
                }
                if let Some(address) = line.strip_prefix("tfsd listening on ") {
                    let _ = sender.send((
                        address.to_string(),
                        metrics_url.clone(),
                        master_address.clone(),
                        unix_socket.clone(),
                    ));
                }
            }
        });
        let (address, metrics_url, master_address, unix_socket) = receiver
            .recv_timeout(DEADLINE)
            .expect("tfsd did not say it listens");
        (
            Daemon {
                child,
                stopped: false,
                address,
                metrics_url,
                master_address,
                unix_socket,
            },
            (),
        )
    }

    /// One scrape of the metrics endpoint (plain HTTP/1.1 over a TCP stream).
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let rest = self
            .metrics_url
            .strip_prefix("http://")
            .expect("metrics url");
        let (host, path) = rest.split_once('/').expect("path");
        let mut stream = std::net::TcpStream::connect(host).expect("connect to metrics");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.address))
            .expect("address")
            .connect()
            .await
            .expect("connect to tfsd");
        Client::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Sends SIGTERM and waits (with a deadline) for the daemon to exit; returns the exit
    /// code, or -1 for death by a signal.
    pub fn stop(&mut self) -> i32 {
        signal(self.child.id(), libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits (with a deadline) for the daemon to exit on its own; returns the exit code, or
    /// -1 for death by a signal.
    pub fn wait_exit(&mut self) -> i32 {
        self.stopped = true;
        let pid = self.child.id() as i32;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut status = 0;
            // SAFETY: waitpid on our own child; the status pointer is valid.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let _ = sender.send(status);
        });
        let status = receiver
            .recv_timeout(DEADLINE)
            .expect("tfsd did not exit after SIGTERM");
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Waits until `pid` (not necessarily our child) has exited, using a pidfd, which becomes
/// readable when the process terminates. Returns false if it is still running at `timeout`.
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        return !process_alive(pid); // already gone (ESRCH)
    }
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the fd is ours and closed right after.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
    unsafe { libc::close(fd) };
    ready == 1
}

/// True while `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z') | None)
        }
        Err(_) => false,
    }
}

/// Every process whose parent is `parent`, live or zombie.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

// ---------------------------------------------------------------------------------------
// Graphs, built with the real TensorFlow and serialized as GraphDef bytes.

pub fn add_op(
    graph: &mut Graph,
    op_type: &str,
    name: &str,
    inputs: &[&Operation],
    attrs: impl FnOnce(&mut OperationDescription<'_>),
) -> Operation {
    let mut description = graph.new_operation(op_type, name).expect("new op");
    for input in inputs {
        description.add_input(tensorflow::Output {
            operation: (*input).clone(),
            index: 0,
        });
    }
    attrs(&mut description);
    description.finish().expect("finish op")
}

pub fn placeholder(graph: &mut Graph, name: &str, dtype: DataType) -> Operation {
    add_op(graph, "Placeholder", name, &[], |d| {
        d.set_attr_type("dtype", dtype).expect("dtype");
    })
}

pub fn constant(graph: &mut Graph, name: &str, value: f32) -> Operation {
    add_op(graph, "Const", name, &[], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<f32>::new(&[])
                .with_values(&[value])
                .expect("value"),
        )
        .expect("value");
    })
}

fn scalar_shape() -> Shape {
    Shape::from(Some(Vec::new()))
}

/// The graph most tests use:
/// - `x`: float placeholder; `w`: a reference variable (VariableV2) initialised to 3 by
///   `w_init`; `y = x * w`; `w_add = w.assign_add(x)`;
/// - `v`: a resource variable (VarHandleOp) initialised to 5 by `v_init`; `v_read` reads it;
///   `v_add` adds x to it;
/// - `queue` and `dequeue`: a FIFO queue whose dequeue blocks until something is enqueued,
///   for steps that stay in flight as long as a test needs.
pub fn model_graph() -> Vec<u8> {
    let mut graph = Graph::new();
    let x = placeholder(&mut graph, "x", DataType::Float);
    let w = add_op(&mut graph, "VariableV2", "w", &[], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
        d.set_attr_shape("shape", &scalar_shape()).expect("shape");
    });
    let three = constant(&mut graph, "three", 3.0);
    add_op(&mut graph, "Assign", "w_init", &[&w, &three], |_| {});
    add_op(&mut graph, "Mul", "y", &[&x, &w], |_| {});
    add_op(&mut graph, "AssignAdd", "w_add", &[&w, &x], |_| {});

    let v = add_op(&mut graph, "VarHandleOp", "v", &[], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
        d.set_attr_shape("shape", &scalar_shape()).expect("shape");
        d.set_attr_string("shared_name", "v").expect("shared_name");
    });
    let five = constant(&mut graph, "five", 5.0);
    add_op(
        &mut graph,
        "AssignVariableOp",
        "v_init",
        &[&v, &five],
        |d| {
            d.set_attr_type("dtype", DataType::Float).expect("dtype");
        },
    );
    add_op(&mut graph, "ReadVariableOp", "v_read", &[&v], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
    });
    add_op(&mut graph, "AssignAddVariableOp", "v_add", &[&v, &x], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
    });

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

/// Adds `big`, a float variable of `elements` elements, set by `big_init` from the fed
/// scalar `value` through `fill` (fed, not constant: Grappler would fold a constant Fill into
/// a second full-size constant held by the session). Returns `fill`.
pub fn add_big_variable(graph: &mut Graph, elements: i64) -> Operation {
    let big = add_op(graph, "VariableV2", "big", &[], |d| {
        d.set_attr_type("dtype", DataType::Float).expect("dtype");
        d.set_attr_shape("shape", &Shape::from(Some(vec![Some(elements)])))
            .expect("shape");
    });
    let dims = add_op(graph, "Const", "dims", &[], |d| {
        d.set_attr_type("dtype", DataType::Int64).expect("dtype");
        d.set_attr_tensor(
            "value",
            Tensor::<i64>::new(&[1])
                .with_values(&[elements])
                .expect("value"),
        )
        .expect("value");
    });
    let value = placeholder(graph, "value", DataType::Float);
    let fill = add_op(graph, "Fill", "fill", &[&dims, &value], |_| {});
    add_op(graph, "Assign", "big_init", &[&big, &fill], |_| {});
    fill
}

/// Waits (with a deadline) until the daemon counts `runs` runs in flight on the session.
pub async fn wait_for_runs_in_flight(client: &mut Client, session_id: &str, runs: u32) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let info = client
                .get_session(api::GetSessionRequest {
                    session_id: session_id.to_string(),
                })
                .await
                .expect("get")
                .into_inner();
            if info.runs_in_flight == runs {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never {runs} runs in flight"));
}

/// `z = y + 1`, referring to `y` in an existing graph: an extension GraphDef.
pub fn extension_graph() -> Vec<u8> {
    let mut graph = Graph::new();
    let y = placeholder(&mut graph, "y", DataType::Float);
    let one = constant(&mut graph, "one", 1.0);
    add_op(&mut graph, "AddV2", "z", &[&y, &one], |_| {});
    // Import only the new nodes; `y` must be resolved against the session's graph.
    let mut def = graph.graph_def().expect("graph_def");
    remove_node(&mut def, "y");
    def
}

/// Drops one node from a serialized GraphDef (by re-encoding with prost).
fn remove_node(def: &mut Vec<u8>, name: &str) {
    use prost::Message;
    #[derive(Clone, PartialEq, prost::Message)]
    struct GraphDef {
        #[prost(bytes = "vec", repeated, tag = "1")]
        node: Vec<Vec<u8>>,
        #[prost(bytes = "vec", optional, tag = "4")]
        versions: Option<Vec<u8>>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct NodeName {
        #[prost(string, tag = "1")]
        name: String,
    }
    let mut graph = GraphDef::decode(def.as_slice()).expect("GraphDef");
    graph
        .node
        .retain(|node| NodeName::decode(node.as_slice()).expect("NodeDef").name != name);
    *def = graph.encode_to_vec();
}

// ---------------------------------------------------------------------------------------
// Tensors and calls.

pub fn scalar(value: f32) -> TensorProto {
    TensorProto {
        dtype: 1,
        tensor_shape: Some(TensorShapeProto::default()),
        float_val: vec![value],
        ..TensorProto::default()
    }
}

pub fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims
            .iter()
            .map(|size| Dim {
                size: *size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    })
}

/// The single f32 value of a result tensor.
pub fn as_f32(tensor: &TensorProto) -> f32 {
    assert_eq!(tensor.dtype, 1, "not a float tensor");
    if tensor.tensor_content.is_empty() {
        tensor.float_val[0]
    } else {
        f32::from_le_bytes(tensor.tensor_content[..4].try_into().expect("4 bytes"))
    }
}

pub fn content(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

pub async fn create(client: &mut Client, graph_def: Vec<u8>) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            graph_def,
            ..Default::default()
        })
        .await
        .expect("create session")
        .into_inner()
        .session
        .expect("session info")
}

pub fn run_request(
    session_id: &str,
    feeds: &[(&str, TensorProto)],
    fetches: &[&str],
    targets: &[&str],
) -> api::RunRequest {
    api::RunRequest {
        session_id: session_id.to_string(),
        feeds: feeds
            .iter()
            .map(|(name, tensor)| (name.to_string(), tensor.clone()))
            .collect(),
        fetches: fetches.iter().map(|s| s.to_string()).collect(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
        timeout_ms: 0,
    }
}

pub async fn run(
    client: &mut Client,
    session_id: &str,
    feeds: &[(&str, TensorProto)],
    fetches: &[&str],
    targets: &[&str],
) -> Result<Vec<TensorProto>, tonic::Status> {
    client
        .run(run_request(session_id, feeds, fetches, targets))
        .await
        .map(|response| response.into_inner().outputs)
}

/// Runs a fetch of one float scalar and returns it.
pub async fn fetch_f32(client: &mut Client, session_id: &str, fetch: &str) -> f32 {
    let outputs = run(client, session_id, &[], &[fetch], &[])
        .await
        .unwrap_or_else(|status| panic!("fetch {fetch}: {status:?}"));
    as_f32(&outputs[0])
}

/// Waits for the first event of `kind` on a WatchEvents stream.
pub async fn next_event(
    events: &mut tonic::Streaming<api::SessionEvent>,
    kind: api::EventKind,
) -> api::SessionEvent {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = events
                .message()
                .await
                .expect("event stream")
                .expect("stream ended");
            if event.kind == kind as i32 {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event"))
}

/// Follows one session's events (WatchEvents).
pub async fn watch(client: &mut Client, session_id: &str) -> tonic::Streaming<api::SessionEvent> {
    client
        .watch_events(api::WatchEventsRequest {
            session_id: session_id.to_string(),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The interpreter Python workers run: `$TFSD_TEST_PYTHON`, or the project's `.venv`.
pub fn python_interpreter() -> std::path::PathBuf {
    let path = std::env::var_os("TFSD_TEST_PYTHON").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        std::path::PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} does not exist: run scripts/python-env (scripts/test does) or set TFSD_TEST_PYTHON",
        path.display()
    );
    path
}
