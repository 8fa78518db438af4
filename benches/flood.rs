//! A create flood (issue 13): N CreateSessions sent at once, each on a connection of its own,
//! to a daemon with `pool_size = 1`, in two configurations side by side in one run:
//!
//! - **unbounded**: `max_concurrent_starts = 256`, `max_waiting_creates = 100000`, which is what
//!   the daemon did before it had admission for worker starts (every create that finds the pool
//!   empty starts its own worker at once);
//! - **bounded**: the defaults (one start per core, 64 creates waiting, `start_wait` 120 s).
//!
//! For each: time to session of the creates that succeeded (each from its own send), how many
//! were refused (RESOURCE_EXHAUSTED) or failed otherwise (by code, with one message each), the
//! peak number of live worker processes (the daemon's non-zombie children in /proc, sampled
//! every 50 ms), the peak of those not serving a session yet (live workers less the sessions
//! answered so far: starting, loading the graph, or ready in the pool), how many distinct
//! workers were seen, the machine's peak 1-minute load average and runnable-thread count, and
//! what grpc.health.v1 Check for tfsd.v1.SessionService answered while the flood ran (every
//! 100 ms). Then every session takes one step (so a figure never counts a session that does not
//! work), is closed, and the bench waits until the only workers left are the warm pool's ready
//! ones (a worker beyond them would be a leak) before it stops the daemon.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench flood
//! ```
//!
//! `BENCH_FLOOD_CREATES=N` changes the flood's size (default 80, 8 with `BENCH_QUICK=1`). 80 is
//! more than the bounded configuration lets wait (64), so its refusals show, and on a busy
//! 2-core machine it can bring the unbounded configuration's starts near their 60 s start
//! timeout; a full run took 1–1.5 minutes there. Figures only: nothing here asserts on a time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Client, Daemon, Latencies, call};
use tfsd::proto::tfsd::v1 as api;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const POOL_SIZE: usize = 1;
/// How often the daemon's children and the machine's load are read.
const PROCESS_SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How often the health check is called while the flood runs.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(100);
/// A health check unanswered this long counts as "no answer" (a readiness probe's timeout
/// is of this order).
const HEALTH_CHECK_DEADLINE: Duration = Duration::from_secs(5);
/// A create unanswered this long counts as "no answer" instead of hanging the bench: longer
/// than the bounded configuration's `start_wait` (120 s), so that its UNAVAILABLE is seen.
const CREATE_DEADLINE: Duration = Duration::from_secs(180);
/// How long the closed sessions' workers may take to be reaped (and the pool to finish a
/// start it had begun).
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// Messages in the report are cut to this many characters.
const MESSAGE_CHARS: usize = 300;

/// One daemon configuration under the same flood.
#[derive(Debug)]
struct Configuration {
    name: &'static str,
    /// The `[workers]` keys this configuration sets beyond `pool_size`.
    keys: &'static str,
    max_concurrent_starts: usize,
    max_waiting_creates: usize,
    start_wait: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let creates = match std::env::var("BENCH_FLOOD_CREATES") {
        Ok(text) => text
            .parse::<usize>()
            .with_context(|| format!("BENCH_FLOOD_CREATES={text:?} is not a count"))?,
        Err(_) => common::scaled(80, 8),
    };
    ensure!(creates > 0, "BENCH_FLOOD_CREATES must be at least 1");
    let settle = common::scaled(Duration::from_secs(10), Duration::from_secs(1));
    let configurations = [
        Configuration {
            name: "unbounded",
            keys: "max_concurrent_starts = 256\nmax_waiting_creates = 100000\n",
            max_concurrent_starts: 256,
            max_waiting_creates: 100_000,
            start_wait: tfsd::config::DEFAULT_START_WAIT,
        },
        Configuration {
            name: "bounded",
            keys: "",
            max_concurrent_starts: tfsd::config::default_concurrent_starts(),
            max_waiting_creates: tfsd::config::DEFAULT_MAX_WAITING_CREATES,
            start_wait: tfsd::config::DEFAULT_START_WAIT,
        },
    ];
    println!(
        "flood: tfsd {}; {creates} concurrent CreateSessions, pool_size {POOL_SIZE}; load {load_before:.2}",
        tfsd.display()
    );
    let graph_def = Arc::new(common::step_graph()?);
    let started = Instant::now();
    let mut rows = Vec::new();
    for (index, configuration) in configurations.iter().enumerate() {
        if index > 0 {
            // Let the previous daemon's workers' exits and the page cache settle; the load
            // average (a 1-minute mean) still carries the previous flood, hence the runnable
            // count beside it.
            tokio::time::sleep(settle).await;
        }
        let row = measure(&tfsd, configuration, creates, &graph_def)
            .await
            .with_context(|| format!("the {} configuration", configuration.name))?;
        rows.push(row);
    }
    common::write_results(
        "flood",
        load_before,
        serde_json::json!({
            "creates": creates,
            "pool_size": POOL_SIZE,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "process_sample_ms": PROCESS_SAMPLE_EVERY.as_millis(),
            "health_check_ms": HEALTH_CHECK_EVERY.as_millis(),
            "health_check_deadline_s": HEALTH_CHECK_DEADLINE.as_secs(),
            "create_deadline_s": CREATE_DEADLINE.as_secs(),
            "configurations": rows,
            "duration_s": started.elapsed().as_secs_f64(),
        }),
    )
}

async fn measure(
    tfsd: &std::path::Path,
    configuration: &Configuration,
    creates: usize,
    graph_def: &Arc<Vec<u8>>,
) -> anyhow::Result<serde_json::Value> {
    let config = format!("[workers]\npool_size = {POOL_SIZE}\n{}", configuration.keys);
    let daemon = Daemon::start(tfsd, &format!("flood-{}", configuration.name), &config).await?;
    let mut control = daemon.connect().await?;
    daemon.wait_for_warm_pool(&mut control).await?;
    // Every create on a connection of its own, connected before the flood: a flood comes
    // from many clients, and the time to session should not include a TCP handshake.
    let mut clients = Vec::with_capacity(creates);
    for _ in 0..creates {
        clients.push(daemon.connect().await?);
    }
    let health = HealthClient::new(
        Channel::from_shared(format!("http://{}", daemon.address))
            .context("the daemon's address")?
            .connect()
            .await
            .context("connect the health client")?,
    );
    let load_at_start = common::load_average();

    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicUsize::new(0));
    let flood_started = Instant::now();
    let processes = {
        let stop = stop.clone();
        let created = created.clone();
        let daemon_pid = daemon.pid;
        std::thread::Builder::new()
            .name("flood-sampler".to_string())
            .spawn(move || sample_processes(daemon_pid, flood_started, &created, &stop))
            .context("start the /proc sampler")?
    };
    let health_task = tokio::spawn(sample_health(health, flood_started, stop.clone()));
    let answers = flood(clients, graph_def, &created).await?;
    let flood_s = flood_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let processes = processes
        .join()
        .map_err(|_| anyhow::anyhow!("the /proc sampler panicked"))?;
    let health = health_task.await.context("the health sampler panicked")?;

    // What the answers say, checked against the daemon's own list.
    let mut time_to_session = Latencies::default();
    let mut time_to_refusal = Latencies::default();
    let mut sessions = Vec::new();
    let mut codes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut examples: BTreeMap<&'static str, String> = BTreeMap::new();
    for answer in &answers {
        *codes.entry(answer.code).or_default() += 1;
        match &answer.session_id {
            Some(id) => {
                time_to_session.push(answer.elapsed);
                sessions.push(id.clone());
            }
            None => {
                if answer.code == "RESOURCE_EXHAUSTED" {
                    time_to_refusal.push(answer.elapsed);
                }
                examples
                    .entry(answer.code)
                    .or_insert_with(|| truncate(&answer.message));
            }
        }
    }
    let listed = call(
        "ListSessions",
        control.list_sessions(api::ListSessionsRequest {}),
    )
    .await?;
    ensure!(
        listed.sessions.len() == sessions.len(),
        "ListSessions shows {} sessions after the flood, but {} creates succeeded",
        listed.sessions.len(),
        sessions.len()
    );
    for id in &sessions {
        call(
            "Run (one step in a flooded session)",
            control.run(common::step_request(id)),
        )
        .await?;
    }
    let closing = Instant::now();
    for id in &sessions {
        call(
            "CloseSession",
            control.close_session(api::CloseSessionRequest {
                session_id: id.clone(),
            }),
        )
        .await?;
    }
    let close_s = closing.elapsed().as_secs_f64();
    let after_close = settle(&daemon, &mut control).await?;
    daemon.wait_for_warm_pool(&mut control).await?;
    daemon.stop().await?;

    let refused = codes.get("RESOURCE_EXHAUSTED").copied().unwrap_or(0);
    let failed: BTreeMap<&str, usize> = codes
        .iter()
        .filter(|(code, _)| !matches!(**code, "OK" | "RESOURCE_EXHAUSTED"))
        .map(|(code, count)| (*code, *count))
        .collect();
    println!(
        "- {}: {} of {creates} sessions, {refused} refused, other failures {failed:?}; time to session p50 {:.2} s p90 {:.2} s max {:.2} s; peak {} live workers, {} not serving a session ({} seen); peak load {:.1}, runnable {}; health {} checks, {} NOT_SERVING ({} times into it), {} unanswered; {} workers left after closing, {} of them ready in the pool ({:.1} s)",
        configuration.name,
        sessions.len(),
        time_to_session.percentile(50.0) / 1e6,
        time_to_session.percentile(90.0) / 1e6,
        time_to_session.percentile(100.0) / 1e6,
        processes.peak_workers,
        processes.peak_unserved,
        processes.workers_seen,
        processes.peak_load1,
        processes.peak_runnable,
        health.checks,
        health.not_serving,
        health.into_not_serving,
        health.no_answer,
        after_close.live,
        after_close.pooled,
        after_close.waited.as_secs_f64(),
    );
    for (code, message) in &examples {
        println!("  {code}: {message}");
    }
    Ok(serde_json::json!({
        "name": configuration.name,
        "config": config,
        "max_concurrent_starts": configuration.max_concurrent_starts,
        "max_waiting_creates": configuration.max_waiting_creates,
        "start_wait_s": configuration.start_wait.as_secs_f64(),
        "creates": creates,
        "succeeded": sessions.len(),
        "refused": refused,
        "failed": failed,
        "examples": examples,
        "time_to_session": time_to_session.summary(true),
        "time_to_refusal": time_to_refusal.summary(false),
        "flood_s": flood_s,
        "close_s": close_s,
        "peak_workers": processes.peak_workers,
        "peak_workers_not_serving": processes.peak_unserved,
        "workers_seen": processes.workers_seen,
        "workers_series": processes.series,
        "peak_load1": processes.peak_load1,
        "peak_runnable": processes.peak_runnable,
        "load_at_start": load_at_start,
        "health": {
            "checks": health.checks,
            "serving": health.serving,
            "not_serving": health.not_serving,
            "into_not_serving": health.into_not_serving,
            "other": health.other,
            "no_answer": health.no_answer,
            "latency": health.latency.summary(false),
            "not_serving_at_s": health.not_serving_at_s,
        },
        "workers_after_close": after_close.live,
        "pooled_after_close": after_close.pooled,
        "settle_s": after_close.waited.as_secs_f64(),
    }))
}

/// The daemon's workers once every session was closed.
#[derive(Debug)]
struct AfterClose {
    /// Live worker processes.
    live: usize,
    /// Of them, ready in the warm pool (which may have grown under the flood, up to
    /// `workers.pool_max`).
    pooled: usize,
    /// How long it took until every live worker was a pooled one (or `SETTLE_DEADLINE`).
    waited: Duration,
}

/// Waits (at most `SETTLE_DEADLINE`) until the daemon has no session left and every live
/// worker is a ready one in its pool: each closed session's worker reaped, no start left
/// over. What is alive beyond the pool then is a leak, reported as such.
async fn settle(daemon: &Daemon, control: &mut Client) -> anyhow::Result<AfterClose> {
    let started = Instant::now();
    loop {
        let status = call(
            "GetDaemonStatus",
            control.get_daemon_status(api::GetDaemonStatusRequest {}),
        )
        .await?;
        let live = live_children(daemon.pid).len();
        let pooled = (status.warm_workers + status.warm_python_workers) as usize;
        let settled = status.session_count == 0 && live == pooled;
        if settled || started.elapsed() > SETTLE_DEADLINE {
            return Ok(AfterClose {
                live,
                pooled,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(PROCESS_SAMPLE_EVERY).await;
    }
}

/// One create's answer.
#[derive(Debug)]
struct CreateAnswer {
    /// The gRPC code's name ("OK", "RESOURCE_EXHAUSTED", …), or "NO_ANSWER" after
    /// `CREATE_DEADLINE`.
    code: &'static str,
    elapsed: Duration,
    session_id: Option<String>,
    message: String,
}

/// Sends one CreateSession on each client at once and waits for every answer, counting the
/// sessions in `created` as they come.
async fn flood(
    clients: Vec<Client>,
    graph_def: &Arc<Vec<u8>>,
    created: &Arc<AtomicUsize>,
) -> anyhow::Result<Vec<CreateAnswer>> {
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let start = start.clone();
            let created = created.clone();
            let request = api::CreateSessionRequest {
                graph_def: graph_def.to_vec(),
                ..Default::default()
            };
            tokio::spawn(async move {
                start.wait().await;
                let sent = Instant::now();
                let reply =
                    tokio::time::timeout(CREATE_DEADLINE, client.create_session(request)).await;
                let elapsed = sent.elapsed();
                match reply {
                    Err(_) => CreateAnswer {
                        code: "NO_ANSWER",
                        elapsed,
                        session_id: None,
                        message: format!("no answer within {CREATE_DEADLINE:?}"),
                    },
                    Ok(Err(status)) => CreateAnswer {
                        code: code_name(status.code()),
                        elapsed,
                        session_id: None,
                        message: status.message().to_string(),
                    },
                    Ok(Ok(response)) => match response.into_inner().session {
                        Some(session) => {
                            created.fetch_add(1, Ordering::SeqCst);
                            CreateAnswer {
                                code: "OK",
                                elapsed,
                                session_id: Some(session.session_id),
                                message: String::new(),
                            }
                        }
                        None => CreateAnswer {
                            code: "OK_WITHOUT_SESSION",
                            elapsed,
                            session_id: None,
                            message: "CreateSession answered OK without session info".to_string(),
                        },
                    },
                }
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.context("a create task panicked")?);
    }
    Ok(answers)
}

/// The canonical name of a gRPC status code, as grpc.io writes it.
fn code_name(code: tonic::Code) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(i32::from(code))
        .ok()
        .and_then(|index| NAMES.get(index).copied())
        .unwrap_or("UNKNOWN_CODE")
}

fn truncate(message: &str) -> String {
    if message.chars().count() <= MESSAGE_CHARS {
        return message.to_string();
    }
    let cut: String = message.chars().take(MESSAGE_CHARS).collect();
    format!("{cut}… ({} characters)", message.chars().count())
}

// ---------------------------------------------------------------------------------------
// Samplers.

/// What the /proc sampler saw between the flood's start and its last answer.
#[derive(Debug, Default)]
struct ProcessFigures {
    peak_workers: usize,
    /// Live workers less the sessions created so far, at its peak: workers starting, loading a
    /// graph, or ready in the pool (a create's worker counts here until its answer arrives).
    peak_unserved: usize,
    /// Distinct worker pids seen alive: the workers started during the flood, plus the warm
    /// one it began with (a worker that lived less than one sampling interval may be missed).
    workers_seen: usize,
    /// (seconds since the flood's start, live workers) at every sample.
    series: Vec<(f64, usize)>,
    peak_load1: f64,
    /// The machine's runnable threads (`procs_running` in /proc/stat), at its peak.
    peak_runnable: u64,
}

/// Runs on a thread of its own, so that a busy runtime does not delay the samples.
fn sample_processes(
    daemon_pid: u32,
    since: Instant,
    created: &AtomicUsize,
    stop: &AtomicBool,
) -> ProcessFigures {
    let mut figures = ProcessFigures::default();
    let mut seen = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        // Sessions first: a session answered between the two reads then counts as a worker
        // not serving yet, never the other way round.
        let sessions = created.load(Ordering::SeqCst);
        let live = live_children(daemon_pid);
        figures.peak_workers = figures.peak_workers.max(live.len());
        figures.peak_unserved = figures
            .peak_unserved
            .max(live.len().saturating_sub(sessions));
        figures.series.push((
            (since.elapsed().as_secs_f64() * 1e3).round() / 1e3,
            live.len(),
        ));
        seen.extend(live);
        let load = common::load_average();
        if load.is_finite() {
            figures.peak_load1 = figures.peak_load1.max(load);
        }
        figures.peak_runnable = figures.peak_runnable.max(procs_running().unwrap_or(0));
        std::thread::sleep(PROCESS_SAMPLE_EVERY);
    }
    figures.workers_seen = seen.len();
    figures
}

/// The daemon's children that are alive (not zombies): its workers, starting or ready.
fn live_children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A process may exit between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, then ppid.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) && !matches!(state, Some("Z" | "X")) {
            children.push(pid);
        }
    }
    children
}

/// Runnable threads on the machine now.
fn procs_running() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("procs_running "))?
        .trim()
        .parse()
        .ok()
}

/// What grpc.health.v1 Check for tfsd.v1.SessionService answered during the flood.
#[derive(Debug, Default)]
struct HealthFigures {
    checks: usize,
    serving: usize,
    not_serving: usize,
    /// Times the answer went to NOT_SERVING from anything else: a readiness probe's flaps.
    into_not_serving: usize,
    /// Any other status (UNKNOWN, SERVICE_UNKNOWN) or an error answer.
    other: usize,
    /// No answer within `HEALTH_CHECK_DEADLINE`.
    no_answer: usize,
    latency: Latencies,
    /// Seconds since the flood's start of every NOT_SERVING answer.
    not_serving_at_s: Vec<f64>,
}

async fn sample_health(
    mut health: HealthClient<Channel>,
    since: Instant,
    stop: Arc<AtomicBool>,
) -> HealthFigures {
    let mut figures = HealthFigures::default();
    let mut ticks = tokio::time::interval(HEALTH_CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous_not_serving = false;
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let request = HealthCheckRequest {
            service: tfsd::grpc::SESSION_SERVICE.to_string(),
        };
        let sent = Instant::now();
        let answer = tokio::time::timeout(HEALTH_CHECK_DEADLINE, health.check(request)).await;
        figures.checks += 1;
        let not_serving = match answer {
            Err(_) => {
                figures.no_answer += 1;
                false
            }
            Ok(Err(_)) => {
                figures.latency.push(sent.elapsed());
                figures.other += 1;
                false
            }
            Ok(Ok(response)) => {
                figures.latency.push(sent.elapsed());
                match ServingStatus::try_from(response.into_inner().status) {
                    Ok(ServingStatus::Serving) => {
                        figures.serving += 1;
                        false
                    }
                    Ok(ServingStatus::NotServing) => {
                        figures.not_serving += 1;
                        figures
                            .not_serving_at_s
                            .push((since.elapsed().as_secs_f64() * 1e3).round() / 1e3);
                        true
                    }
                    _ => {
                        figures.other += 1;
                        false
                    }
                }
            }
        };
        if not_serving && !previous_not_serving {
            figures.into_not_serving += 1;
        }
        previous_not_serving = not_serving;
    }
    figures
}
