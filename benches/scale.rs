//! How the supervisor scales with sessions: 1, 8, 32 and 64 sessions in one daemon. At each
//! level, with 4 clients running steps on the sessions (on one connection, round-robin over
//! the first four sessions), a separate client times control calls — ListSessions, and
//! PurgeVariables on the last session — while the supervisor's CPU (its threads' schedstat) and RSS
//! are measured. Then the same window with no steps, for the supervisor's idle CPU (the
//! policy sampler at its default 250 ms among it).
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench scale
//! ```
//!
//! 64 workers take ~64 × 280 MiB of RSS, mostly libtensorflow's shared pages; privately
//! ~35 MiB each. The bench checks available memory before each new session and stops growing
//! (saying so) before it would leave less than 3 GiB to the rest of the machine.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{Client, Daemon, Latencies, MIB, call};
use tfsd::proto::tfsd::v1 as api;

const LOAD_CLIENTS: usize = 4;
const PER_WORKER_BUDGET: u64 = 120 * MIB;
const MEMORY_MARGIN: u64 = 3 * 1024 * MIB;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let levels: &[usize] = if common::quick() {
        &[1, 8]
    } else {
        &[1, 8, 32, 64]
    };
    let window = common::scaled(Duration::from_secs(6), Duration::from_millis(1500));
    let idle_window = common::scaled(Duration::from_secs(4), Duration::from_secs(1));
    println!(
        "scale: tfsd {}; levels {levels:?}; {window:?} under load, {idle_window:?} idle; load {load_before:.2}",
        tfsd.display()
    );
    let daemon = Daemon::start(&tfsd, "scale", "[workers]\npool_size = 1\n").await?;
    let mut control = daemon.connect().await?;
    let load_client = daemon.connect().await?;
    let graph_def = common::step_graph()?;
    let mut sessions: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    let mut stopped_early = None;
    'levels: for &level in levels {
        while sessions.len() < level {
            let available = common::mem_available()?;
            if available < MEMORY_MARGIN + PER_WORKER_BUDGET {
                let message = format!(
                    "stopped at {} sessions: {:.0} MiB available, below the {:.0} MiB this bench leaves to the machine",
                    sessions.len(),
                    common::mib(available),
                    common::mib(MEMORY_MARGIN + PER_WORKER_BUDGET)
                );
                println!("- {message}");
                stopped_early = Some(message);
                break 'levels;
            }
            let id = common::create_session(&mut control, &graph_def, None)
                .await?
                .session_id;
            sessions.push(id);
        }
        daemon.wait_for_warm_pool(&mut control).await?;
        let row = measure_level(
            &daemon,
            &mut control,
            &load_client,
            &sessions,
            window,
            idle_window,
        )
        .await
        .with_context(|| format!("{level} sessions"))?;
        rows.push(row);
    }
    daemon.stop().await?;
    common::write_results(
        "scale",
        load_before,
        serde_json::json!({
            "levels": rows,
            "load_clients": LOAD_CLIENTS,
            "stopped_early": stopped_early,
        }),
    )
}

async fn measure_level(
    daemon: &Daemon,
    control: &mut Client,
    load_client: &Client,
    sessions: &[String],
    window: Duration,
    idle_window: Duration,
) -> anyhow::Result<serde_json::Value> {
    // Idle first: only the policy's sampler and the warm pool.
    let cpu_before = common::cpu_time_precise(daemon.pid)?;
    let started = Instant::now();
    tokio::time::sleep(idle_window).await;
    let idle_cpu = (common::cpu_time_precise(daemon.pid)? - cpu_before).as_secs_f64()
        / started.elapsed().as_secs_f64();

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..LOAD_CLIENTS)
        .map(|i| {
            let mut client = load_client.clone();
            let request = common::step_request(&sessions[i % sessions.len()]);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    call("Run", client.run(request.clone())).await?;
                    latencies.push(started.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let purged = sessions.last().context("no session")?.clone();
    let mut list = Latencies::default();
    let mut purge = Latencies::default();
    let cpu_before = common::cpu_time_precise(daemon.pid)?;
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < window {
        let call_started = Instant::now();
        let listed = call(
            "ListSessions",
            control.list_sessions(api::ListSessionsRequest {}),
        )
        .await?;
        list.push(call_started.elapsed());
        anyhow::ensure!(
            listed.sessions.len() == sessions.len(),
            "ListSessions shows {} sessions, expected {}",
            listed.sessions.len(),
            sessions.len()
        );
        if round % 4 == 0 {
            let call_started = Instant::now();
            call(
                "PurgeVariables",
                control.purge_variables(api::PurgeVariablesRequest {
                    session_id: purged.clone(),
                }),
            )
            .await?;
            purge.push(call_started.elapsed());
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let busy_cpu =
        (common::cpu_time_precise(daemon.pid)? - cpu_before).as_secs_f64() / elapsed.as_secs_f64();
    let (rss, private) = common::process_memory(daemon.pid)?;
    stop.store(true, Ordering::Relaxed);
    let mut steps = Latencies::default();
    for task in load {
        steps.extend(task.await.context("a load task panicked")??);
    }
    let steps_per_s = steps.micros.len() as f64 / (elapsed.as_secs_f64() + 0.3);

    let listed = call(
        "ListSessions",
        control.list_sessions(api::ListSessionsRequest {}),
    )
    .await?;
    let workers_private: u64 = listed
        .sessions
        .iter()
        .filter_map(|s| s.memory.as_ref().map(|m| m.private_bytes))
        .sum();
    let workers_rss: u64 = listed
        .sessions
        .iter()
        .filter_map(|s| s.memory.as_ref().map(|m| m.rss_bytes))
        .sum();
    let available = common::mem_available()?;
    println!(
        "- {} sessions: supervisor RSS {:.1} MiB (private {:.1}), CPU {:.1}% busy / {:.2}% idle; ListSessions p50 {:.2} ms p99 {:.2} ms; PurgeVariables p50 {:.2} ms p99 {:.2} ms; steps p50 {:.0} µs, {:.0}/s; workers private {:.0} MiB; available {:.0} MiB",
        sessions.len(),
        common::mib(rss),
        common::mib(private),
        busy_cpu * 100.0,
        idle_cpu * 100.0,
        list.percentile(50.0) / 1e3,
        list.percentile(99.0) / 1e3,
        purge.percentile(50.0) / 1e3,
        purge.percentile(99.0) / 1e3,
        steps.percentile(50.0),
        steps_per_s,
        common::mib(workers_private),
        common::mib(available),
    );
    Ok(serde_json::json!({
        "sessions": sessions.len(),
        "supervisor_rss_bytes": rss,
        "supervisor_private_bytes": private,
        "supervisor_cpu_busy_percent": busy_cpu * 100.0,
        "supervisor_cpu_idle_percent": idle_cpu * 100.0,
        "list_sessions": list.summary(false),
        "purge_variables": purge.summary(false),
        "steps": steps.summary(false),
        "steps_per_s": steps_per_s,
        "workers_private_bytes": workers_private,
        "workers_rss_bytes": workers_rss,
        "mem_available_bytes": available,
    }))
}
