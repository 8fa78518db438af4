//! What every tfsd bench shares: finding and starting the real daemon with a generated
//! config, a tonic client, graphs built with the real TensorFlow, latency statistics,
//! `/proc` readings, and the JSON file each bench leaves for `benches/report.py`.
//!
//! Benches report figures; they never assert on timings (the machine is shared and noisy).
//! They do check that each operation did what it says, so that no figure in the report
//! belongs to a call that silently did something else.
//!
//! Environment:
//! - `TFSD_BIN`: the daemon to run (default: `tfsd` in the target directory the bench runs
//!   from, release before debug); its `tfsd-worker` must sit next to it.
//! - `TFSD_BENCH_OUT`: a directory; each bench writes `<name>.json` there for the report.
//! - `BENCH_QUICK=1`: fewer repeats and smaller sizes, for a smoke run of the harness.

#![allow(
    dead_code,
    reason = "each bench binary uses a different part of the harness"
)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tensorflow::{DataType, Graph, Operation, OperationDescription, Shape, Tensor, TensorType};
use tfsd::proto::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto::Dim};
use tfsd::proto::tfsd::v1 as api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub type Client = api::session_service_client::SessionServiceClient<Channel>;

pub const MIB: u64 = 1 << 20;

/// tensorflow.DataType's DT_FLOAT and DT_INT32.
pub const DT_FLOAT: i32 = 1;
pub const DT_INT32: i32 = 3;

/// How long the daemon may take to say it listens (its warm pool starts a worker, and the
/// machine is shared).
const DAEMON_START_DEADLINE: Duration = Duration::from_secs(60);

/// How long any one call may take before the bench gives up instead of hanging. Generous:
/// a preserving recycle of 1 GiB copies it through the daemon twice.
pub const CALL_DEADLINE: Duration = Duration::from_secs(180);

/// How long the daemon may take to stop after SIGTERM (it reaps its workers first).
const DAEMON_STOP_DEADLINE: Duration = Duration::from_secs(120);

/// True for a quick smoke run (`BENCH_QUICK=1`): the harness is exercised end to end, the
/// figures are not worth reporting.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|value| !value.is_empty() && value != "0")
}

/// `full` normally, `quick` in a smoke run.
pub fn scaled<T>(full: T, quick_value: T) -> T {
    if quick() { quick_value } else { full }
}

// ---------------------------------------------------------------------------------------
// The daemon.

/// Finds the `tfsd` binary: `TFSD_BIN`, else the target directory this bench runs from
/// (current_exe is target/<profile>/deps/NAME-HASH), release before debug.
pub fn locate_tfsd() -> anyhow::Result<PathBuf> {
    const HOW_TO_BUILD: &str = "build the daemon and the worker first with \
                                `cargo build --release --workspace`, or set TFSD_BIN";
    if let Some(path) = std::env::var_os("TFSD_BIN") {
        let path = PathBuf::from(path);
        ensure!(path.is_file(), "TFSD_BIN={} is not a file", path.display());
        return Ok(path);
    }
    let exe = std::env::current_exe().context("find this bench's own path")?;
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        let profile_dir = if deps.ends_with("deps") {
            deps.parent().unwrap_or(deps)
        } else {
            deps
        };
        candidates.push(profile_dir.join("tfsd"));
        if let Some(target_dir) = profile_dir.parent() {
            for profile in ["release", "debug"] {
                let candidate = target_dir.join(profile).join("tfsd");
                if !candidates.contains(&candidate) {
                    candidates.push(candidate);
                }
            }
        }
    }
    let Some(tfsd) = candidates.iter().find(|path| path.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "no tfsd binary (looked for {}): {HOW_TO_BUILD}",
            looked.join(", ")
        );
    };
    // The daemon looks for its worker next to itself; say so here rather than let the
    // daemon fail after we started it.
    let worker = tfsd.with_file_name("tfsd-worker");
    ensure!(
        worker.is_file(),
        "{} has no tfsd-worker next to it ({} is missing): {HOW_TO_BUILD}",
        tfsd.display(),
        worker.display()
    );
    Ok(tfsd.clone())
}

/// A daemon started with its own config file. `stop` ends it with SIGTERM; if the bench fails
/// first, the child is killed on drop (its workers die with it through PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub address: String,
    /// `unix:PATH` when the config switched the Unix socket on (`server.unix_socket`).
    pub unix_socket: Option<String>,
    pub pid: u32,
    config: TempFile,
}

impl Daemon {
    /// Starts `tfsd serve --config FILE --listen 127.0.0.1:0` with `config` (TOML) as its
    /// config file, and waits (with a deadline) for it to say where it listens. `name` makes
    /// the config file's name unique among this bench's daemons.
    pub async fn start(tfsd: &Path, name: &str, config: &str) -> anyhow::Result<Daemon> {
        let config = TempFile::write(
            &format!("tfsd-bench-{}-{name}.toml", std::process::id()),
            &format!("{config}\n[log]\nfilter = \"warn\"\n"),
        )?;
        let mut command = Command::new(tfsd);
        // TFSD_* variables override config keys; one left in the caller's shell (a pool size,
        // a worker binary) would silently change what is measured.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TFSD_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            // Metrics off: nothing here reads them, and their fixed default port would
            // collide with any other daemon on the machine.
            .env("TFSD_METRICS_LISTEN", "")
            // MasterService off: its fixed default port (2222) would collide the same way.
            .env("TFSD_MASTER_LISTEN", "")
            .env_remove("RUST_LOG")
            .arg("serve")
            .arg("--config")
            .arg(&config.path)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", tfsd.display()))?;
        let pid = child.id().context("the daemon's pid")?;
        let stdout = child.stdout.take().context("the daemon's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut unix_socket = None;
        let wait_for_address = async {
            while let Some(line) = lines
                .next_line()
                .await
                .context("read the daemon's stdout")?
            {
                // Printed before the listening line.
                if let Some(address) = line.strip_prefix("tfsd socket on ") {
                    unix_socket = Some(address.trim().to_string());
                }
                if let Some(address) = line.strip_prefix("tfsd listening on ") {
                    return Ok(address.trim().to_string());
                }
            }
            bail!("the daemon exited before it said it listens (its stderr is above)")
        };
        let address = tokio::time::timeout(DAEMON_START_DEADLINE, wait_for_address)
            .await
            .with_context(|| {
                format!("the daemon did not say it listens within {DAEMON_START_DEADLINE:?}")
            })??;
        // Keep reading stdout so that the daemon never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Daemon {
            child,
            address,
            unix_socket,
            pid,
            config,
        })
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect_to(&format!("http://{}", self.address)).await
    }

    /// A client over the daemon's Unix socket (its config must set `server.unix_socket`).
    pub async fn connect_unix(&self) -> anyhow::Result<Client> {
        let address = self
            .unix_socket
            .as_deref()
            .context("the daemon serves no Unix socket (server.unix_socket)")?;
        connect_to(address).await
    }

    /// Waits until the warm pool holds its configured number of ready workers, so that the
    /// next CreateSession or RecycleSession takes a warm worker. Polls: this is a bench, and
    /// the daemon has no event for it.
    pub async fn wait_for_warm_pool(&self, client: &mut Client) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DAEMON_START_DEADLINE;
        loop {
            let status = call(
                "GetDaemonStatus",
                client.get_daemon_status(api::GetDaemonStatusRequest {}),
            )
            .await?;
            if status.warm_workers >= status.warm_pool_size {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the warm pool did not refill within {DAEMON_START_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits (with a deadline) for the daemon to reap its workers and exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.pid).context("the daemon's pid")?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own live child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the daemon: {}", std::io::Error::last_os_error());
        }
        let status = tokio::time::timeout(DAEMON_STOP_DEADLINE, self.child.wait())
            .await
            .with_context(|| {
                format!("the daemon did not exit within {DAEMON_STOP_DEADLINE:?} of SIGTERM")
            })?
            .context("wait for the daemon")?;
        ensure!(
            status.success(),
            "the daemon exited with {status} after SIGTERM (config {})",
            self.config.path.display()
        );
        Ok(())
    }
}

/// A file in the temp directory, removed on drop.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn write(name: &str, contents: &str) -> anyhow::Result<TempFile> {
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(TempFile { path })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Awaits one RPC with a deadline, turning a gRPC error into one that names the call.
pub async fn call<T>(
    what: &str,
    reply: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_DEADLINE, reply).await {
        Err(_) => bail!("{what}: no answer within {CALL_DEADLINE:?}"),
        Ok(Err(status)) => bail!("{what} failed: {:?} {}", status.code(), status.message()),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

pub async fn create_session(
    client: &mut Client,
    graph_def: &[u8],
    memory_policy: Option<api::MemoryPolicy>,
) -> anyhow::Result<api::SessionInfo> {
    call(
        "CreateSession",
        client.create_session(api::CreateSessionRequest {
            graph_def: graph_def.to_vec(),
            memory_policy,
            ..Default::default()
        }),
    )
    .await?
    .session
    .context("CreateSession answered without session info")
}

/// Runs `targets` with no feeds and no fetches.
pub async fn run_targets(client: &mut Client, id: &str, targets: &[&str]) -> anyhow::Result<()> {
    call(
        "Run",
        client.run(api::RunRequest {
            session_id: id.to_string(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }),
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Graphs, built with the real TensorFlow and serialized as GraphDefs.

pub fn add_op(
    graph: &mut Graph,
    op_type: &str,
    name: &str,
    inputs: &[&Operation],
    attrs: impl FnOnce(&mut OperationDescription<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Operation> {
    let mut description = graph
        .new_operation(op_type, name)
        .with_context(|| format!("new {op_type} {name}"))?;
    for input in inputs {
        description.add_input((*input).clone());
    }
    attrs(&mut description).with_context(|| format!("attributes of {op_type} {name}"))?;
    description
        .finish()
        .with_context(|| format!("add {op_type} {name}"))
}

pub fn constant<T: TensorType>(
    graph: &mut Graph,
    name: &str,
    dims: &[u64],
    values: &[T],
) -> anyhow::Result<Operation> {
    let value = Tensor::<T>::new(dims)
        .with_values(values)
        .with_context(|| format!("value of {name}"))?;
    add_op(graph, "Const", name, &[], |d| {
        d.set_attr_type("dtype", T::data_type())?;
        d.set_attr_tensor("value", value)?;
        Ok(())
    })
}

fn placeholder(
    graph: &mut Graph,
    name: &str,
    shape: Option<Vec<Option<i64>>>,
) -> anyhow::Result<Operation> {
    add_op(graph, "Placeholder", name, &[], |d| {
        d.set_attr_type("dtype", DataType::Float)?;
        d.set_attr_shape("shape", &Shape::from(shape))?;
        Ok(())
    })
}

/// Side of the square matrices in the step graph. benches/peers.py builds the same graph
/// for TensorFlow's own server.
pub const MATMUL_SIDE: u64 = 4;

/// The step graph: `x` a fed float placeholder [4, 4], `w` a constant [4, 4], `y =
/// MatMul(x, w)`. Plus `v`, a small variable (VariableV2 [256, 256], 256 KiB) initialised by
/// `v_init` from a fed `v_fill`, so that PurgeVariables has something to drop. Steps fetch
/// `y` and never touch `v`, so they work after any reset that keeps the graph.
pub fn step_graph() -> anyhow::Result<Vec<u8>> {
    let side = MATMUL_SIDE as i64;
    let mut graph = Graph::new();
    let x = placeholder(&mut graph, "x", Some(vec![Some(side), Some(side)]))?;
    let values: Vec<f32> = (0..MATMUL_SIDE * MATMUL_SIDE).map(|i| i as f32).collect();
    let w = constant(&mut graph, "w", &[MATMUL_SIDE, MATMUL_SIDE], &values)?;
    add_op(&mut graph, "MatMul", "y", &[&x, &w], |_| Ok(()))?;
    add_variable(&mut graph, "v", 256 * 256)?;
    graph.graph_def().context("serialize the step graph")
}

/// The step's feed: `x` as a [4, 4] float32 TensorProto.
pub fn step_feed() -> TensorProto {
    let values: Vec<u8> = (0..MATMUL_SIDE * MATMUL_SIDE)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    float_tensor(&[MATMUL_SIDE as i64, MATMUL_SIDE as i64], values.into())
}

pub fn step_request(session_id: &str) -> api::RunRequest {
    api::RunRequest {
        session_id: session_id.to_string(),
        feeds: [("x".to_string(), step_feed())].into_iter().collect(),
        fetches: vec!["y:0".to_string()],
        ..Default::default()
    }
}

/// Adds a float32 VariableV2 `name` of `elements` elements, initialised by `{name}_init` =
/// Assign(name, Fill([elements], {name}_fill)), and `{name}_probe` = its first element.
///
/// Fill of a fed placeholder, not a Const: the GraphDef stays a few hundred bytes instead of
/// carrying the whole value, and Grappler cannot constant-fold the Fill into a second
/// full-size constant held by the session (seen here: +400 MiB for a 200 MiB variable).
pub fn add_variable(graph: &mut Graph, name: &str, elements: u64) -> anyhow::Result<()> {
    // Fill's dims are int32, and so are Slice's begin and size.
    let elements_i32 = i32::try_from(elements)
        .with_context(|| format!("{elements} elements do not fit Fill's int32 dims"))?;
    let variable = add_op(graph, "VariableV2", name, &[], |d| {
        d.set_attr_type("dtype", DataType::Float)?;
        d.set_attr_shape(
            "shape",
            &Shape::from(Some(vec![Some(i64::from(elements_i32))])),
        )?;
        Ok(())
    })?;
    let dims = constant(graph, &format!("{name}_dims"), &[1], &[elements_i32])?;
    let fill_value = placeholder(graph, &format!("{name}_fill"), Some(Vec::new()))?;
    let fill = add_op(
        graph,
        "Fill",
        &format!("{name}_value"),
        &[&dims, &fill_value],
        |_| Ok(()),
    )?;
    add_op(
        graph,
        "Assign",
        &format!("{name}_init"),
        &[&variable, &fill],
        |_| Ok(()),
    )?;
    let begin = constant(graph, &format!("{name}_probe_begin"), &[1], &[0_i32])?;
    let size = constant(graph, &format!("{name}_probe_size"), &[1], &[1_i32])?;
    add_op(
        graph,
        "Slice",
        &format!("{name}_probe"),
        &[&variable, &begin, &size],
        |_| Ok(()),
    )?;
    Ok(())
}

/// Runs `{name}_init` with the fill value 1.0.
pub async fn init_variable(client: &mut Client, id: &str, name: &str) -> anyhow::Result<()> {
    call(
        &format!("Run {name}_init"),
        client.run(api::RunRequest {
            session_id: id.to_string(),
            feeds: [(format!("{name}_fill"), float_scalar(1.0))]
                .into_iter()
                .collect(),
            targets: vec![format!("{name}_init")],
            ..Default::default()
        }),
    )
    .await?;
    Ok(())
}

/// A graph holding one float32 VariableV2 `big` of `bytes` bytes (see `add_variable`).
pub fn big_variable_graph(bytes: u64) -> anyhow::Result<Vec<u8>> {
    let mut graph = Graph::new();
    add_variable(&mut graph, "big", bytes / 4)?;
    graph
        .graph_def()
        .context("serialize the big-variable graph")
}

/// The large-tensor graph: `big_in` a float placeholder of unknown shape and `big_in_size =
/// Size(big_in)` (a 4-byte fetch that needs the fed tensor, so a feed travels in full and
/// nothing comes back); the variable `big_out` of `elements` floats and `big_out_read =
/// Identity(big_out)`, a fetch of the whole variable.
pub fn large_tensor_graph(elements: u64) -> anyhow::Result<Vec<u8>> {
    let mut graph = Graph::new();
    let big_in = placeholder(&mut graph, "big_in", None)?;
    add_op(&mut graph, "Size", "big_in_size", &[&big_in], |d| {
        d.set_attr_type("out_type", DataType::Int32)?;
        Ok(())
    })?;
    add_variable(&mut graph, "big_out", elements)?;
    let variable = graph
        .operation_by_name_required("big_out")
        .context("big_out")?;
    add_op(&mut graph, "Identity", "big_out_read", &[&variable], |_| {
        Ok(())
    })?;
    graph
        .graph_def()
        .context("serialize the large-tensor graph")
}

// ---------------------------------------------------------------------------------------
// Tensors.

pub fn float_tensor(dims: &[i64], content: bytes::Bytes) -> TensorProto {
    TensorProto {
        dtype: DT_FLOAT,
        tensor_shape: Some(TensorShapeProto {
            dim: dims
                .iter()
                .map(|&size| Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        tensor_content: content,
        ..Default::default()
    }
}

pub fn float_scalar(value: f32) -> TensorProto {
    TensorProto {
        dtype: DT_FLOAT,
        tensor_shape: Some(TensorShapeProto::default()),
        float_val: vec![value],
        ..Default::default()
    }
}

/// The first element of a float32 TensorProto, whichever field TensorFlow put it in.
pub fn first_f32(tensor: &TensorProto) -> anyhow::Result<f32> {
    ensure!(
        tensor.dtype == DT_FLOAT,
        "not a float32 tensor (dtype {})",
        tensor.dtype
    );
    if let Some(bytes) = tensor.tensor_content.get(..4) {
        let bytes: [u8; 4] = bytes.try_into().context("4 bytes")?;
        return Ok(f32::from_le_bytes(bytes));
    }
    tensor
        .float_val
        .first()
        .copied()
        .context("an empty float32 tensor")
}

/// The bytes a dense float32 TensorProto carries (tensor_content, or float_val).
pub fn float_payload_bytes(tensor: &TensorProto) -> usize {
    if tensor.tensor_content.is_empty() {
        tensor.float_val.len() * 4
    } else {
        tensor.tensor_content.len()
    }
}

// ---------------------------------------------------------------------------------------
// Statistics.

/// Latency samples in microseconds, and what the report shows of them.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub micros: Vec<f64>,
}

impl Latencies {
    pub fn push(&mut self, elapsed: Duration) {
        self.micros.push(elapsed.as_secs_f64() * 1e6);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    /// The nearest-rank percentile `p` (0–100), in microseconds.
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.micros, p)
    }

    /// p50/p90/p99/min/max/mean/count, plus every sample (for the plots) when `keep_samples`.
    pub fn summary(&self, keep_samples: bool) -> serde_json::Value {
        let mean = if self.micros.is_empty() {
            0.0
        } else {
            self.micros.iter().sum::<f64>() / self.micros.len() as f64
        };
        let mut value = serde_json::json!({
            "n": self.micros.len(),
            "p50_us": self.percentile(50.0),
            "p90_us": self.percentile(90.0),
            "p99_us": self.percentile(99.0),
            "min_us": self.percentile(0.0),
            "max_us": self.percentile(100.0),
            "mean_us": mean,
        });
        if keep_samples {
            value["samples_us"] = serde_json::json!(
                self.micros
                    .iter()
                    .map(|us| (us * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            );
        }
        value
    }
}

/// The nearest-rank percentile of unsorted samples; 0 for none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

// ---------------------------------------------------------------------------------------
// /proc readings.

/// A process's user + system CPU time so far (`/proc/PID/stat` utime + stime).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("a /proc/PID/stat without ')'")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .context("a short /proc/PID/stat")?
            .parse::<u64>()
            .context("a CPU time field")
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}

/// A process's CPU time so far in nanoseconds, summed over its live threads
/// (`/proc/PID/task/*/schedstat`): precise where `cpu_time`'s clock ticks (10 ms) are too
/// coarse for a quiet daemon. Threads that exited are not counted; a daemon that is idle or
/// serving steps keeps its threads, so over a window the two agree up to a tick.
pub fn cpu_time_precise(pid: u32) -> anyhow::Result<Duration> {
    let mut total_ns: u64 = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("list /proc/{pid}/task"))?;
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read: skip it.
        let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let on_cpu_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .context("a malformed schedstat")?;
        total_ns += on_cpu_ns;
    }
    Ok(Duration::from_nanos(total_ns))
}

/// CPU time spent by a few processes (this bench, the supervisor, a worker) between `start`
/// and `per_operation`: what one operation costs each of them, independent of how busy the
/// shared machine is (wall time is not).
#[derive(Debug)]
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration)>,
}

impl CpuMeter {
    pub fn start(processes: &[(&'static str, u32)]) -> anyhow::Result<CpuMeter> {
        let processes = processes
            .iter()
            .map(|&(name, pid)| Ok((name, pid, cpu_time_precise(pid)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(CpuMeter { processes })
    }

    /// Microseconds of CPU per operation for each process, over `operations` operations.
    pub fn per_operation(&self, operations: usize) -> anyhow::Result<serde_json::Value> {
        let mut figures = serde_json::Map::new();
        for (name, pid, before) in &self.processes {
            let spent = cpu_time_precise(*pid)?.saturating_sub(*before);
            figures.insert(
                (*name).to_string(),
                serde_json::json!(spent.as_secs_f64() * 1e6 / operations.max(1) as f64),
            );
        }
        Ok(serde_json::Value::Object(figures))
    }
}

/// (VmRSS, RssAnon) of a process, in bytes.
pub fn process_memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let usage = tfsd::memory::parse_status(&status);
    Ok((usage.rss_bytes, usage.private_bytes))
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
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
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// The 1-minute load average: how busy the shared machine was around a measurement.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------
// The report file.

/// Writes `value` as `$TFSD_BENCH_OUT/<name>.json` (nothing when TFSD_BENCH_OUT is unset),
/// with the load average before and after the bench.
pub fn write_results(
    name: &str,
    load_before: f64,
    mut value: serde_json::Value,
) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("TFSD_BENCH_OUT") else {
        return Ok(());
    };
    value["bench"] = serde_json::json!(name);
    value["quick"] = serde_json::json!(quick());
    value["load_before"] = serde_json::json!(load_before);
    value["load_after"] = serde_json::json!(load_average());
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&value).context("serialize the results")?;
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    println!("- results in {}", path.display());
    Ok(())
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A client of tfsd.v1 at `address` (`http://HOST:PORT` or `unix:PATH`).
async fn connect_to(address: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .with_context(|| format!("the daemon's address {address:?}"))?
        .connect()
        .await
        .with_context(|| format!("connect to the daemon at {address}"))?;
    // tonic's 4 MiB default would refuse the 64 MiB tensors.
    Ok(Client::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}
