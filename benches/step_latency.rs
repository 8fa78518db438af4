//! Step round trips and large tensors, Rust side: a small step (a fed [4, 4] placeholder
//! through a tiny MatMul) in-process through the `tensorflow` crate (`TF_SessionRun`, the
//! floor) and through tfsd.v1 from a tonic client, with 1 and 4 client threads; then a
//! 64 MiB float32 tensor fed to and fetched from a tfsd session. benches/peers.py measures the
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
use tensorflow::{Graph, ImportGraphDefOptions, Session, SessionOptions, SessionRunArgs, Tensor};
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
        large_bytes: 64 * MIB,
        large_repeats: common::scaled(7, 2),
    };
    println!(
        "step_latency: tfsd {}; {} sequential steps, {:?} with {THREADS} threads; load {load_before:.2}",
        tfsd.display(),
        plan.sequential_steps,
        plan.concurrent_for
    );
    let graph_def = common::step_graph()?;

    let floor = in_process(&graph_def, &[], &plan)?;
    print_steps("in-process TF_SessionRun (Rust crate)", &floor);
    let floor_inline = in_process(&graph_def, &RUN_IN_CALLER_THREAD, &plan)?;
    print_steps(
        "in-process TF_SessionRun, inter_op_parallelism_threads = -1",
        &floor_inline,
    );

    let daemon = Daemon::start(&tfsd, "steps", "").await?;
    let mut client = daemon.connect().await?;
    let session = common::create_session(&mut client, &graph_def, None).await?;
    let processes = [
        ("client", std::process::id()),
        ("supervisor", daemon.pid),
        ("worker", session.worker_pid),
    ];
    let tfsd_v1 = through_tfsd(&client, &session.session_id, &plan, &processes).await?;
    print_steps("tfsd.v1 (Rust tonic client)", &tfsd_v1);
    if let Some(cpu) = &tfsd_v1.cpu_per_step {
        println!("  CPU per step (µs): {cpu}");
    }
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
    let processes = [
        ("client", std::process::id()),
        ("supervisor", daemon.pid),
        ("worker", inline_session.worker_pid),
    ];
    let tfsd_v1_inline =
        through_tfsd(&client, &inline_session.session_id, &plan, &processes).await?;
    print_steps(
        "tfsd.v1 (Rust tonic client), inter_op_parallelism_threads = -1",
        &tfsd_v1_inline,
    );
    if let Some(cpu) = &tfsd_v1_inline.cpu_per_step {
        println!("  CPU per step (µs): {cpu}");
    }
    let overhead_us = tfsd_v1.sequential.percentile(50.0) - floor.sequential.percentile(50.0);
    println!("  tfsd.v1 overhead over in-process: {overhead_us:.0} µs p50");

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
    daemon.stop().await?;

    common::write_results(
        "step_latency",
        load_before,
        serde_json::json!({
            "steps": {
                "in_process_rust": floor.to_json(),
                "in_process_rust_inline": floor_inline.to_json(),
                "tfsd_v1_rust": tfsd_v1.to_json(),
                "tfsd_v1_rust_inline": tfsd_v1_inline.to_json(),
            },
            "large": {
                "bytes": plan.large_bytes,
                "tfsd_v1_rust": large.to_json(),
            },
            "threads": THREADS,
        }),
    )
}

/// One system's step figures.
struct StepFigures {
    sequential: Latencies,
    sequential_elapsed: Duration,
    concurrent: Latencies,
    concurrent_elapsed: Duration,
    /// CPU µs per sequential step of each process involved (none for the floor: it is all
    /// this process).
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
// The floor: TF_SessionRun in this process.

fn in_process(graph_def: &[u8], config: &[u8], plan: &Plan) -> anyhow::Result<StepFigures> {
    let mut graph = Graph::new();
    graph
        .import_graph_def(graph_def, &ImportGraphDefOptions::new())
        .context("import the step graph")?;
    let mut options = SessionOptions::new();
    options.set_config(config).context("session config")?;
    let mut session = Session::new(&options, &graph).context("new session")?;
    let x = graph.operation_by_name_required("x").context("x")?;
    let y = graph.operation_by_name_required("y").context("y")?;
    let side = common::MATMUL_SIDE;
    let values: Vec<f32> = (0..side * side).map(|i| i as f32 * 0.5).collect();
    let feed = Tensor::<f32>::new(&[side, side])
        .with_values(&values)
        .context("feed tensor")?;
    let step = || -> anyhow::Result<()> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&x, 0, &feed);
        let token = args.request_fetch(&y, 0);
        session.run(&mut args).context("TF_SessionRun")?;
        let out: Tensor<f32> = args.fetch(token).context("fetch y")?;
        ensure!(
            out.len() == (side * side) as usize,
            "y has {} elements",
            out.len()
        );
        Ok(())
    };
    for _ in 0..plan.warmup {
        step()?;
    }
    let mut sequential = Latencies::default();
    let started = Instant::now();
    for _ in 0..plan.sequential_steps {
        let step_started = Instant::now();
        step()?;
        sequential.push(step_started.elapsed());
    }
    let sequential_elapsed = started.elapsed();

    let started = Instant::now();
    let deadline = started + plan.concurrent_for;
    let per_thread = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Latencies> {
                    let mut latencies = Latencies::default();
                    while Instant::now() < deadline {
                        let step_started = Instant::now();
                        step()?;
                        latencies.push(step_started.elapsed());
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
    })?;
    let concurrent_elapsed = started.elapsed();
    let mut concurrent = Latencies::default();
    per_thread.into_iter().for_each(|l| concurrent.extend(l));
    session.close().context("close the session")?;
    Ok(StepFigures {
        sequential,
        sequential_elapsed,
        concurrent,
        concurrent_elapsed,
        cpu_per_step: None,
    })
}

// ---------------------------------------------------------------------------------------
// tfsd.v1 from a tonic client.

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

async fn through_tfsd(
    client: &Client,
    id: &str,
    plan: &Plan,
    processes: &[(&'static str, u32)],
) -> anyhow::Result<StepFigures> {
    let request = Arc::new(common::step_request(id));
    let mut client_1 = client.clone();
    for _ in 0..plan.warmup {
        one_step(&mut client_1, &request).await?;
    }
    let mut sequential = Latencies::default();
    let meter = common::CpuMeter::start(processes)?;
    let started = Instant::now();
    for _ in 0..plan.sequential_steps {
        let step_started = Instant::now();
        one_step(&mut client_1, &request).await?;
        sequential.push(step_started.elapsed());
    }
    let sequential_elapsed = started.elapsed();
    let cpu_per_step = Some(meter.per_operation(plan.sequential_steps)?);

    // THREADS concurrent callers on one HTTP/2 connection, as TensorFlow's Python client
    // shares one channel between threads.
    let started = Instant::now();
    let deadline = started + plan.concurrent_for;
    let tasks: Vec<_> = (0..THREADS)
        .map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                while Instant::now() < deadline {
                    let step_started = Instant::now();
                    one_step(&mut client, &request).await?;
                    latencies.push(step_started.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut concurrent = Latencies::default();
    for task in tasks {
        concurrent.extend(task.await.context("a step task panicked")??);
    }
    let concurrent_elapsed = started.elapsed();
    Ok(StepFigures {
        sequential,
        sequential_elapsed,
        concurrent,
        concurrent_elapsed,
        cpu_per_step,
    })
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
