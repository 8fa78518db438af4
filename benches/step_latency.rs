//! Step round trips and large tensors, Rust side: a small step (a fed [4, 4] placeholder
//! through a tiny MatMul) in-process through the `tensorflow` crate (`TF_SessionRun`, the
//! floor) and through tfsd.v1 from a tonic client, over TCP and over the Unix socket
//! (`server.unix_socket`), with 1 and 4 client threads; then a 64 MiB float32 tensor fed to
//! and fetched from a tfsd session, over both. benches/peers.py measures the
//! same graph through TensorFlow's own gRPC server and tfsd's MasterService from TensorFlow's
//! Python client.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench step_latency
//! ```
//!
//! TF_ENABLE_ONEDNN_OPTS=0 is set in this process, as tfsd sets it in its workers, so the
//! floor and the workers run TensorFlow's same kernels and the difference is transport.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Client, Daemon, Latencies, MIB, call};
use tensorflow::{
    Graph, ImportGraphDefOptions, Operation, Session, SessionOptions, SessionRunArgs, Tensor,
};
use tfsd::proto::tfsd::v1 as api;

/// Client threads in the concurrent runs (the issue's "1 and 4 client threads").
const THREADS: usize = 4;

/// A serialized ConfigProto with `inter_op_parallelism_threads = -1` (field 5, a negative
/// int32 as a 10-byte varint): TensorFlow's DirectSession then runs each step in the calling
/// thread. Measured as an experiment next to the default.
const RUN_IN_CALLER_THREAD: [u8; 11] = [
    0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
];

fn main() -> anyhow::Result<()> {
    // SAFETY: no other thread exists yet (the runtime is built below), so nothing reads the
    // environment concurrently. TensorFlow reads this variable lazily, at first use.
    unsafe {
        std::env::set_var("TF_ENABLE_ONEDNN_OPTS", "0");
        std::env::set_var("TF_CPP_MIN_LOG_LEVEL", "1");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime")?
        .block_on(bench())
}

struct Plan {
    warmup: usize,
    sequential_steps: usize,
    concurrent_for: Duration,
    /// The systems take turns, `rounds` times, so that a burst of load from other users of
    /// the machine falls on all of them alike and the ratios stay fair.
    rounds: usize,
    large_bytes: u64,
    large_repeats: usize,
}

async fn bench() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let plan = Plan {
        warmup: common::scaled(500, 50),
        sequential_steps: common::scaled(5000, 300),
        concurrent_for: common::scaled(Duration::from_secs(4), Duration::from_millis(500)),
        rounds: common::scaled(10, 2),
        large_bytes: 64 * MIB,
        large_repeats: common::scaled(7, 2),
    };
    println!(
        "step_latency: tfsd {}; {} sequential steps, {:?} with {THREADS} threads, in {} interleaved rounds; load {load_before:.2}",
        tfsd.display(),
        plan.sequential_steps,
        plan.concurrent_for,
        plan.rounds
    );
    let graph_def = common::step_graph()?;

    let socket = std::env::temp_dir().join(format!("tfsd-bench-{}.sock", std::process::id()));
    let daemon = Daemon::start(
        &tfsd,
        "steps",
        &format!(
            "[server]\nunix_socket = {:?}\n",
            socket.display().to_string()
        ),
    )
    .await?;
    let mut client = daemon.connect().await?;
    let mut unix_client = daemon.connect_unix().await?;
    let session = common::create_session(&mut client, &graph_def, None).await?;
    // An experiment, not a tfsd default: the same step in a session whose ConfigProto makes
    // TensorFlow run the graph in the calling thread instead of handing it to its inter-op
    // pool (whose threads spin while they wait for work, on a 2-core machine shared with the
    // client and the supervisor).
    let inline_session = call(
        "CreateSession inter_op_parallelism_threads = -1",
        client.create_session(api::CreateSessionRequest {
            graph_def: graph_def.clone(),
            config: RUN_IN_CALLER_THREAD.to_vec(),
            ..Default::default()
        }),
    )
    .await?
    .session
    .context("CreateSession answered without session info")?;
    let tfsd_processes = |worker_pid: u32| {
        vec![
            ("client", std::process::id()),
            ("supervisor", daemon.pid),
            ("worker", worker_pid),
        ]
    };
    let mut contenders = vec![
        Contender::new(
            "in_process_rust",
            "in-process TF_SessionRun (Rust crate)",
            Stepper::InProcess(Arc::new(InProcess::new(&graph_def, &[])?)),
            vec![("client", std::process::id())],
        ),
        Contender::new(
            "in_process_rust_inline",
            "in-process TF_SessionRun, inter_op_parallelism_threads = -1",
            Stepper::InProcess(Arc::new(InProcess::new(&graph_def, &RUN_IN_CALLER_THREAD)?)),
            vec![("client", std::process::id())],
        ),
        Contender::new(
            "tfsd_v1_rust",
            "tfsd.v1 (Rust tonic client)",
            Stepper::Tfsd {
                client: client.clone(),
                request: Arc::new(common::step_request(&session.session_id)),
            },
            tfsd_processes(session.worker_pid),
        ),
        Contender::new(
            "tfsd_v1_rust_inline",
            "tfsd.v1 (Rust tonic client), inter_op_parallelism_threads = -1",
            Stepper::Tfsd {
                client: client.clone(),
                request: Arc::new(common::step_request(&inline_session.session_id)),
            },
            tfsd_processes(inline_session.worker_pid),
        ),
        // The same session as tfsd_v1_rust, over the Unix socket.
        Contender::new(
            "tfsd_v1_rust_unix",
            "tfsd.v1 over the Unix socket (Rust tonic client)",
            Stepper::Tfsd {
                client: unix_client.clone(),
                request: Arc::new(common::step_request(&session.session_id)),
            },
            tfsd_processes(session.worker_pid),
        ),
    ];
    measure_interleaved(&mut contenders, &plan).await?;
    let mut steps = serde_json::Map::new();
    for contender in &contenders {
        print_steps(contender.label, &contender.figures);
        steps.insert(contender.key.to_string(), contender.figures.to_json());
    }
    let overhead_us = contenders[2].figures.sequential.percentile(50.0)
        - contenders[0].figures.sequential.percentile(50.0);
    println!("  tfsd.v1 overhead over in-process: {overhead_us:.0} µs p50");
    let unix_overhead_us = contenders[4].figures.sequential.percentile(50.0)
        - contenders[0].figures.sequential.percentile(50.0);
    println!(
        "  tfsd.v1 over the Unix socket, overhead over in-process: {unix_overhead_us:.0} µs p50"
    );

    let large_graph = common::large_tensor_graph(plan.large_bytes / 4)?;
    let large_session = common::create_session(&mut client, &large_graph, None).await?;
    let processes = [
        ("client", std::process::id()),
        ("supervisor", daemon.pid),
        ("worker", large_session.worker_pid),
    ];
    let large = large_tensors(&mut client, &large_session.session_id, &plan, &processes).await?;
    println!(
        "  64 MiB through tfsd.v1: feed {:.0} MB/s, fetch {:.0} MB/s",
        large.feed_mb_per_s(),
        large.fetch_mb_per_s()
    );
    println!(
        "  CPU per 64 MiB (µs): feed {}, fetch {}",
        large.feed_cpu.clone().unwrap_or_default(),
        large.fetch_cpu.clone().unwrap_or_default()
    );
    let large_unix = large_tensors(
        &mut unix_client,
        &large_session.session_id,
        &plan,
        &processes,
    )
    .await?;
    println!(
        "  64 MiB through tfsd.v1 over the Unix socket: feed {:.0} MB/s, fetch {:.0} MB/s",
        large_unix.feed_mb_per_s(),
        large_unix.fetch_mb_per_s()
    );
    println!(
        "  CPU per 64 MiB over the Unix socket (µs): feed {}, fetch {}",
        large_unix.feed_cpu.clone().unwrap_or_default(),
        large_unix.fetch_cpu.clone().unwrap_or_default()
    );
    daemon.stop().await?;

    common::write_results(
        "step_latency",
        load_before,
        serde_json::json!({
            "steps": steps,
            "large": {
                "bytes": plan.large_bytes,
                "tfsd_v1_rust": large.to_json(),
                "tfsd_v1_rust_unix": large_unix.to_json(),
            },
            "threads": THREADS,
        }),
    )
}

/// One system's step figures.
#[derive(Default)]
struct StepFigures {
    sequential: Latencies,
    sequential_elapsed: Duration,
    concurrent: Latencies,
    concurrent_elapsed: Duration,
    /// CPU µs per sequential step of each process involved.
    cpu_per_step: Option<serde_json::Value>,
}

impl StepFigures {
    fn steps_per_s(latencies: &Latencies, elapsed: Duration) -> f64 {
        latencies.micros.len() as f64 / elapsed.as_secs_f64()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "t1": {
                "latency": self.sequential.summary(true),
                "steps_per_s": Self::steps_per_s(&self.sequential, self.sequential_elapsed),
                "cpu_us_per_step": self.cpu_per_step,
            },
            "t4": {
                "latency": self.concurrent.summary(true),
                "steps_per_s": Self::steps_per_s(&self.concurrent, self.concurrent_elapsed),
            },
        })
    }
}

fn print_steps(what: &str, figures: &StepFigures) {
    println!(
        "- {what}: 1 thread p50 {:.0} µs p99 {:.0} µs {:.0} steps/s; {THREADS} threads p50 {:.0} µs p99 {:.0} µs {:.0} steps/s",
        figures.sequential.percentile(50.0),
        figures.sequential.percentile(99.0),
        StepFigures::steps_per_s(&figures.sequential, figures.sequential_elapsed),
        figures.concurrent.percentile(50.0),
        figures.concurrent.percentile(99.0),
        StepFigures::steps_per_s(&figures.concurrent, figures.concurrent_elapsed),
    );
}

// ---------------------------------------------------------------------------------------
// The systems, measured in turns.

/// The floor: TF_SessionRun in this process.
struct InProcess {
    session: Session,
    x: Operation,
    y: Operation,
    feed: Tensor<f32>,
}

impl InProcess {
    fn new(graph_def: &[u8], config: &[u8]) -> anyhow::Result<InProcess> {
        let mut graph = Graph::new();
        graph
            .import_graph_def(graph_def, &ImportGraphDefOptions::new())
            .context("import the step graph")?;
        let mut options = SessionOptions::new();
        options.set_config(config).context("session config")?;
        let session = Session::new(&options, &graph).context("new session")?;
        let side = common::MATMUL_SIDE;
        let values: Vec<f32> = (0..side * side).map(|i| i as f32 * 0.5).collect();
        Ok(InProcess {
            session,
            x: graph.operation_by_name_required("x").context("x")?,
            y: graph.operation_by_name_required("y").context("y")?,
            feed: Tensor::<f32>::new(&[side, side])
                .with_values(&values)
                .context("feed tensor")?,
        })
    }

    fn step(&self) -> anyhow::Result<()> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.x, 0, &self.feed);
        let token = args.request_fetch(&self.y, 0);
        self.session.run(&mut args).context("TF_SessionRun")?;
        let out: Tensor<f32> = args.fetch(token).context("fetch y")?;
        let side = common::MATMUL_SIDE;
        ensure!(
            out.len() == (side * side) as usize,
            "y has {} elements",
            out.len()
        );
        Ok(())
    }
}

/// How one system runs the step.
enum Stepper {
    InProcess(Arc<InProcess>),
    Tfsd {
        client: Client,
        request: Arc<api::RunRequest>,
    },
}

impl Stepper {
    async fn step(&mut self) -> anyhow::Result<()> {
        match self {
            Stepper::InProcess(floor) => floor.step(),
            Stepper::Tfsd { client, request } => one_step(client, request).await,
        }
    }

    /// THREADS callers until `deadline`: OS threads in-process, tasks on one HTTP/2
    /// connection for tfsd (as TensorFlow's Python client shares one channel between threads).
    async fn concurrently(&self, deadline: Instant) -> anyhow::Result<Latencies> {
        let mut all = Latencies::default();
        match self {
            Stepper::InProcess(floor) => {
                let per_thread = tokio::task::block_in_place(|| {
                    std::thread::scope(|scope| {
                        let handles: Vec<_> = (0..THREADS)
                            .map(|_| {
                                scope.spawn(|| -> anyhow::Result<Latencies> {
                                    let mut latencies = Latencies::default();
                                    while Instant::now() < deadline {
                                        let started = Instant::now();
                                        floor.step()?;
                                        latencies.push(started.elapsed());
                                    }
                                    Ok(latencies)
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|handle| {
                                handle
                                    .join()
                                    .map_err(|_| anyhow::anyhow!("a step thread panicked"))?
                            })
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                })?;
                per_thread.into_iter().for_each(|l| all.extend(l));
            }
            Stepper::Tfsd { client, request } => {
                let tasks: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let mut client = client.clone();
                        let request = request.clone();
                        tokio::spawn(async move {
                            let mut latencies = Latencies::default();
                            while Instant::now() < deadline {
                                let started = Instant::now();
                                one_step(&mut client, &request).await?;
                                latencies.push(started.elapsed());
                            }
                            anyhow::Ok(latencies)
                        })
                    })
                    .collect();
                for task in tasks {
                    all.extend(task.await.context("a step task panicked")??);
                }
            }
        }
        Ok(all)
    }
}

/// One system and what was measured of it so far.
struct Contender {
    key: &'static str,
    label: &'static str,
    stepper: Stepper,
    processes: Vec<(&'static str, u32)>,
    figures: StepFigures,
    cpu: Vec<Duration>,
}

impl Contender {
    fn new(
        key: &'static str,
        label: &'static str,
        stepper: Stepper,
        processes: Vec<(&'static str, u32)>,
    ) -> Contender {
        let cpu = vec![Duration::ZERO; processes.len()];
        Contender {
            key,
            label,
            stepper,
            processes,
            figures: StepFigures::default(),
            cpu,
        }
    }
}

/// Warms every system up, then measures them in turns: `plan.rounds` rounds of sequential
/// steps (the order rotating each round), then the same for THREADS concurrent callers.
async fn measure_interleaved(contenders: &mut [Contender], plan: &Plan) -> anyhow::Result<()> {
    for contender in contenders.iter_mut() {
        for _ in 0..plan.warmup {
            contender.stepper.step().await?;
        }
    }
    let per_round = plan.sequential_steps.div_ceil(plan.rounds);
    let count = contenders.len();
    for round in 0..plan.rounds {
        for turn in 0..count {
            let contender = &mut contenders[(round + turn) % count];
            let before = contender
                .processes
                .iter()
                .map(|&(_, pid)| common::cpu_time_precise(pid))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let started = Instant::now();
            for _ in 0..per_round {
                let step_started = Instant::now();
                contender.stepper.step().await?;
                contender.figures.sequential.push(step_started.elapsed());
            }
            contender.figures.sequential_elapsed += started.elapsed();
            for (index, &(_, pid)) in contender.processes.iter().enumerate() {
                contender.cpu[index] +=
                    common::cpu_time_precise(pid)?.saturating_sub(before[index]);
            }
        }
    }
    for contender in contenders.iter_mut() {
        let steps = contender.figures.sequential.micros.len().max(1) as f64;
        let cpu: serde_json::Map<String, serde_json::Value> = contender
            .processes
            .iter()
            .zip(&contender.cpu)
            .map(|(&(name, _), spent)| {
                (
                    name.to_string(),
                    serde_json::json!(spent.as_secs_f64() * 1e6 / steps),
                )
            })
            .collect();
        contender.figures.cpu_per_step = Some(serde_json::Value::Object(cpu));
    }

    let concurrent_rounds = plan.rounds.div_ceil(2).max(1);
    let block = plan.concurrent_for / concurrent_rounds as u32;
    for round in 0..concurrent_rounds {
        for turn in 0..count {
            let contender = &mut contenders[(round + turn) % count];
            let started = Instant::now();
            let latencies = contender.stepper.concurrently(started + block).await?;
            contender.figures.concurrent_elapsed += started.elapsed();
            contender.figures.concurrent.extend(latencies);
        }
    }
    Ok(())
}

async fn one_step(client: &mut Client, request: &api::RunRequest) -> anyhow::Result<()> {
    let response = common::call("Run", client.run(request.clone())).await?;
    let output = response.outputs.first().context("Run returned no output")?;
    ensure!(
        common::float_payload_bytes(output)
            == (common::MATMUL_SIDE * common::MATMUL_SIDE * 4) as usize,
        "y has the wrong size"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 64 MiB each way.

struct LargeFigures {
    bytes: u64,
    feed_s: Vec<f64>,
    fetch_s: Vec<f64>,
    /// CPU µs per transfer of each process.
    feed_cpu: Option<serde_json::Value>,
    fetch_cpu: Option<serde_json::Value>,
}

impl LargeFigures {
    fn mb_per_s(&self, seconds: &[f64]) -> f64 {
        self.bytes as f64 / 1e6 / common::median(seconds)
    }
    fn feed_mb_per_s(&self) -> f64 {
        self.mb_per_s(&self.feed_s)
    }
    fn fetch_mb_per_s(&self) -> f64 {
        self.mb_per_s(&self.fetch_s)
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "feed": {
                "median_s": common::median(&self.feed_s),
                "mb_per_s": self.feed_mb_per_s(),
                "samples_s": self.feed_s,
                "cpu_us": self.feed_cpu,
            },
            "fetch": {
                "median_s": common::median(&self.fetch_s),
                "mb_per_s": self.fetch_mb_per_s(),
                "samples_s": self.fetch_s,
                "cpu_us": self.fetch_cpu,
            },
        })
    }
}

async fn large_tensors(
    client: &mut Client,
    id: &str,
    plan: &Plan,
    processes: &[(&'static str, u32)],
) -> anyhow::Result<LargeFigures> {
    let elements = plan.large_bytes / 4;
    let content: Vec<u8> = (0..elements)
        .flat_map(|i| ((i % 1000) as f32).to_le_bytes())
        .collect();
    let feed = common::float_tensor(&[elements as i64], content.into());
    let feed_request = api::RunRequest {
        session_id: id.to_string(),
        feeds: [("big_in".to_string(), feed)].into_iter().collect(),
        fetches: vec!["big_in_size:0".to_string()],
        ..Default::default()
    };
    let mut feed_s = Vec::new();
    // One warm-up round each way, not counted.
    let mut meter = None;
    for round in 0..=plan.large_repeats {
        if round == 1 {
            meter = Some(common::CpuMeter::start(processes)?);
        }
        let started = Instant::now();
        let response = common::call("Run feed big_in", client.run(feed_request.clone())).await?;
        let elapsed = started.elapsed();
        let size = response.outputs.first().context("no big_in_size")?;
        let count = size
            .int_val
            .first()
            .copied()
            .or_else(|| {
                size.tensor_content
                    .get(..4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            })
            .context("an empty big_in_size")?;
        ensure!(
            count as u64 == elements,
            "big_in_size is {count}, fed {elements}"
        );
        if round > 0 {
            feed_s.push(elapsed.as_secs_f64());
        }
    }

    let feed_cpu = match &meter {
        Some(meter) => Some(meter.per_operation(plan.large_repeats)?),
        None => None,
    };

    common::init_variable(client, id, "big_out").await?;
    let fetch_request = api::RunRequest {
        session_id: id.to_string(),
        fetches: vec!["big_out_read:0".to_string()],
        ..Default::default()
    };
    let mut fetch_s = Vec::new();
    let mut meter = None;
    for round in 0..=plan.large_repeats {
        if round == 1 {
            meter = Some(common::CpuMeter::start(processes)?);
        }
        let started = Instant::now();
        let response =
            common::call("Run fetch big_out_read", client.run(fetch_request.clone())).await?;
        let elapsed = started.elapsed();
        let out = response.outputs.first().context("no big_out_read")?;
        ensure!(
            common::float_payload_bytes(out) as u64 == plan.large_bytes,
            "fetched {} bytes, expected {}",
            common::float_payload_bytes(out),
            plan.large_bytes
        );
        if round > 0 {
            fetch_s.push(elapsed.as_secs_f64());
        }
    }
    let fetch_cpu = match &meter {
        Some(meter) => Some(meter.per_operation(plan.large_repeats)?),
        None => None,
    };
    Ok(LargeFigures {
        bytes: plan.large_bytes,
        feed_s,
        fetch_s,
        feed_cpu,
        fetch_cpu,
    })
}
