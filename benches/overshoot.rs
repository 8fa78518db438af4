//! How far past its hard limit one step gets, under each way tfsd holds the limit.
//!
//! A session with `hard_limit = 1 GiB` runs one step that fills a 4 GiB variable, under
//! `workers.memory_enforcement` = `sampling` (the memory policy alone, every 250 ms: what tfsd
//! did before per-worker cgroups), `cgroup` (the kernel stops the allocation at the worker's
//! cgroup limit) and `rlimit` (RLIMIT_DATA: the allocation fails inside TensorFlow), side by
//! side in one run. Measured per trial: the machine's MemAvailable and the worker's private
//! memory (RssAnon), sampled every millisecond from before the step until its answer (the
//! lowest MemAvailable against the one before: how much memory the step took from the
//! machine; the highest private figure: how far past the limit the worker got), the policy's
//! kill reason (sampling), the answer's status and time, and the
//! time until the session serves again (RESTORED, or at once when the worker survived).
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench overshoot
//! ```

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{Client, Daemon, MIB, mib};
use tfsd::proto::tfsd::v1 as api;

const HARD_LIMIT: u64 = 1024 * MIB;
const STEP_BYTES: u64 = 4 * HARD_LIMIT;
const MODES: [&str; 3] = ["sampling", "cgroup", "rlimit"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let trials = common::scaled(3, 1);
    println!(
        "overshoot: tfsd {}; {trials} trials per mode; {} MiB step against a {} MiB hard limit",
        tfsd.display(),
        STEP_BYTES / MIB,
        HARD_LIMIT / MIB
    );
    let graph_def = common::big_variable_graph(STEP_BYTES)?;
    let mut modes = Vec::new();
    for mode in MODES {
        let config = format!("[workers]\nmemory_enforcement = \"{mode}\"\n");
        let daemon = Daemon::start(&tfsd, &format!("overshoot-{mode}"), &config).await?;
        let mut client = daemon.connect().await?;
        let status = common::call(
            "GetDaemonStatus",
            client.get_daemon_status(api::GetDaemonStatusRequest {}),
        )
        .await?;
        let mut results = Vec::new();
        for _ in 0..trials {
            results.push(trial(&mut client, &graph_def).await?);
        }
        daemon.stop().await?;
        for result in &results {
            println!("- {mode}: {result}");
        }
        modes.push(serde_json::json!({
            "mode": mode,
            "enforcement": status.memory_enforcement,
            "trials": results,
        }));
    }
    common::write_results(
        "overshoot",
        load_before,
        serde_json::json!({
            "hard_limit_bytes": HARD_LIMIT,
            "step_bytes": STEP_BYTES,
            "modes": modes,
        }),
    )
}

/// One session, one 4 GiB step, then the session closed.
async fn trial(client: &mut Client, graph_def: &[u8]) -> anyhow::Result<serde_json::Value> {
    let session = common::create_session(
        client,
        graph_def,
        Some(api::MemoryPolicy {
            hard_limit_bytes: HARD_LIMIT,
            ..Default::default()
        }),
    )
    .await?;
    let id = session.session_id.clone();
    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: id.clone(),
        })
        .await
        .context("WatchEvents")?
        .into_inner();
    let before = common::mem_available()?;
    let watch = AvailableWatch::start(before, session.worker_pid);
    let started = Instant::now();
    let answer = client
        .run(api::RunRequest {
            session_id: id.clone(),
            feeds: [("big_fill".to_string(), common::float_scalar(1.0))]
                .into_iter()
                .collect(),
            targets: vec!["big_init".to_string()],
            ..Default::default()
        })
        .await;
    let answered = started.elapsed();
    let (lowest, peak_private) = watch.finish();
    let (code, message) = match &answer {
        Ok(_) => ("OK".to_string(), String::new()),
        Err(status) => (format!("{:?}", status.code()), status.message().to_string()),
    };
    // The session serves again: after its restore where the worker was killed.
    let mut exit_reason = String::new();
    let back = if answer.is_err() && !message.contains("OOM when allocating") {
        let deadline = Duration::from_secs(60);
        tokio::time::timeout(deadline, async {
            while let Some(event) = events.message().await? {
                if event.kind == api::EventKind::WorkerExited as i32 {
                    exit_reason = event.reason.clone();
                }
                if event.kind == api::EventKind::Restored as i32 {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("the event stream ended before RESTORED")
        })
        .await
        .context("no RESTORED within a minute")??;
        started.elapsed()
    } else {
        answered
    };
    common::call(
        "CloseSession",
        client.close_session(api::CloseSessionRequest { session_id: id }),
    )
    .await?;
    let dip = before.saturating_sub(lowest);
    let result = serde_json::json!({
        "code": code,
        "message": message.chars().take(200).collect::<String>(),
        "exit_reason": exit_reason,
        "answered_ms": answered.as_secs_f64() * 1e3,
        "serving_again_ms": back.as_secs_f64() * 1e3,
        "available_dip_bytes": dip,
        "available_dip_mib": mib(dip),
        "peak_private_mib": mib(peak_private),
    });
    Ok(result)
}

/// Samples MemAvailable and the worker's private memory (RssAnon) every millisecond on a
/// thread of its own.
struct AvailableWatch {
    lowest: Arc<AtomicU64>,
    peak_private: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AvailableWatch {
    fn start(before: u64, worker_pid: u32) -> AvailableWatch {
        let lowest = Arc::new(AtomicU64::new(before));
        let peak_private = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (lowest, peak_private, stop) = (lowest.clone(), peak_private.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(available) = common::mem_available() {
                        lowest.fetch_min(available, Ordering::SeqCst);
                    }
                    if let Ok((_, private)) = common::process_memory(worker_pid) {
                        peak_private.fetch_max(private, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        AvailableWatch {
            lowest,
            peak_private,
            stop,
            thread: Some(thread),
        }
    }

    /// The lowest MemAvailable and the highest private memory seen.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        (
            self.lowest.load(Ordering::SeqCst),
            self.peak_private.load(Ordering::SeqCst),
        )
    }
}
