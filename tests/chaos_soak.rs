//! A bounded chaos soak with the real daemon and real TensorFlow workers: 16 training clients,
//! an operator resetting, purging and recycling random sessions, and a chaos loop sending
//! SIGKILL to random workers (session workers and, now and then, warm-pool workers).
//!
//! Its length is `TFSD_SOAK_SECONDS` (default 20 s, enough for CI on a 2-core machine);
//! `TFSD_SOAK_SEED` replays a run's random choices, though not its timing (the seed is
//! printed).
//!
//! Pass means:
//! - every RPC got an answer within `CALL_DEADLINE`, and that answer was success or one of
//!   the errors allowed for that call in that situation (see `allowed` at each call site);
//!   an error that says state was lost (FAILED_PRECONDITION, INVALID_ARGUMENT) is allowed
//!   only when `SessionInfo` or the operator's own record shows what lost it;
//! - training state is never lost silently: every successful step continues the values the
//!   client expects (preserving recycles carry them over);
//! - no worker process leaked: while running, live workers never exceed sessions, plus pool
//!   size, plus `REPLACEMENT_MARGIN`; once every session is closed only the pool's workers remain, and
//!   after the daemon stops no process it started is left;
//! - no file descriptor leaked and the daemon's own memory is flat (see the margins).
//!
//! The figures are printed in one block at the end, before any assertion, so that a failing
//! run still shows them.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tfsd::proto::tfsd::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Concurrent training clients, one session each.
const CLIENTS: usize = 16;
/// Warm-pool size for the soak: two, so that pool workers exist to be killed while one is
/// being handed out.
const POOL_SIZE: usize = 2;
const DEFAULT_SOAK_SECONDS: u64 = 20;
/// The longest any single RPC may take before it counts as a hang. Generous: on a loaded
/// 2-core machine a recycle waits for a fresh worker to load TensorFlow (~0.3 s idle,
/// several seconds while 16 other workers compete for the CPU).
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long the daemon may take to settle (pool refilled, restores finished) after the load.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// Load pacing (not readiness): one SIGKILL per interval, one operator action per interval.
const KILL_EVERY: Duration = Duration::from_millis(500);
const OPERATE_EVERY: Duration = Duration::from_millis(250);
/// Workers that may be alive beyond sessions + pool while replacements are in progress: the
/// pool's refill (1), the operator's recycle (old + fresh: 1), restores after kills (a kill
/// every 500 ms, each restore loading TensorFlow for up to a few seconds under load: 3), and
/// one client's close-and-create (1).
const REPLACEMENT_MARGIN: usize = 6;
/// File descriptors the daemon may hold after the soak beyond its count before: none are
/// expected (the control client's connection exists at both times); the slack covers a
/// client connection whose close the server has not processed yet.
const FD_MARGIN: usize = 4;
/// Growth of the daemon's private memory (RssAnon) and of its RSS allowed from start to end.
/// Not zero, because the supervisor's allocator keeps some freed memory for reuse (glibc
/// keeps a heap per thread arena, up to 8 per core, and trims only above its threshold),
/// the first soak touches buffers that stay allocated (HTTP/2 connection windows for 16
/// clients, the event channel's 1024-slot ring, tokio's task slabs), and RSS also counts
/// the binary's code pages the first time each path runs. All of that is bounded by the
/// concurrency and the code size, not by the duration (measured: +2 MiB after 20 s and
/// after 120 s alike), whereas a leak of 1 KiB per RPC passes 20 MiB within the ~20,000 RPCs
/// of a 60 s soak on 2 cores.
const MEMORY_MARGIN: u64 = 20 * MIB;
/// A client that fails this many times in a row is not recovering: a violation.
const MAX_CONSECUTIVE_FAILURES: u32 = 200;
/// Upper bounds on loop iterations, so that every loop ends by count as well as by time.
const MAX_ITERATIONS_PER_SECOND: u64 = 1_000;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn chaos_soak_every_rpc_answers_and_nothing_leaks() {
    let soak_duration = soak_duration();
    let seed = seed();
    let mut daemon = Daemon::start_with_env(
        &[],
        &[(
            "TFSD_POOL_SIZE",
            std::ffi::OsStr::new(&POOL_SIZE.to_string()),
        )],
    );
    let daemon_pid = daemon.pid();
    let mut control = daemon.client().await;
    // Before: no session, the pool full. The throwaway Soak only gives the calls a deadline.
    settle(
        &Soak::new(daemon_pid, Duration::ZERO),
        &mut control,
        daemon_pid,
    )
    .await
    .expect("the daemon did not settle before the soak");
    let fds_before = fd_count(daemon_pid);
    let memory_before = daemon_memory(daemon_pid);

    let started = Instant::now();
    let soak = Arc::new(Soak::new(daemon_pid, soak_duration));
    let events = tokio::spawn(count_events(soak.clone(), daemon.client().await));
    let mut clients = Vec::new();
    for index in 0..CLIENTS {
        let client = TrainingClient::new(
            soak.clone(),
            daemon.client().await,
            Rng::new(seed ^ ((index as u64 + 1) * 0x9e37_79b9)),
        );
        clients.push(tokio::spawn(client.train()));
    }
    let operator = tokio::spawn(operate(
        soak.clone(),
        daemon.client().await,
        Rng::new(seed ^ 0xa5a5),
    ));
    let health = HealthClient::new(
        Channel::from_shared(format!("http://{}", daemon.address))
            .expect("address")
            .connect()
            .await
            .expect("connect to tfsd"),
    );
    let chaos = tokio::spawn(chaos(
        soak.clone(),
        daemon.client().await,
        health,
        Rng::new(seed ^ 0x5a5a),
    ));

    // Every loop stops by itself at `until`; a client then finishes on one good step.
    let join_deadline = soak_duration + 4 * CALL_DEADLINE;
    let mut sessions = Vec::new();
    for client in clients {
        let (session, steps) = tokio::time::timeout(join_deadline, client)
            .await
            .expect("a client did not stop")
            .expect("client task");
        sessions.push((session, steps));
    }
    for task in [operator, chaos] {
        tokio::time::timeout(join_deadline, task)
            .await
            .expect("a load loop did not stop")
            .expect("load task");
    }
    let soak_elapsed = started.elapsed();

    // Quiescent: every session is READY with nothing in flight; then close them all.
    let ids: Vec<String> = sessions.iter().map(|(id, _)| id.clone()).collect();
    let final_sessions = settled_sessions(&soak, &mut control).await;
    let restarts_at_end: u64 = final_sessions.iter().map(|s| s.worker_restart_count).sum();
    for id in &ids {
        soak.call(
            "CloseSession",
            &[],
            control.close_session(api::CloseSessionRequest {
                session_id: id.clone(),
            }),
        )
        .await
        .ok();
    }
    if let Err(unsettled) = settle(&soak, &mut control, daemon_pid).await {
        soak.violation(format!("after closing every session: {unsettled}"));
    }
    let fds_after = settled_fd_count(daemon_pid, fds_before).await;
    let memory_after = daemon_memory(daemon_pid);
    let (spawns, exits) = worker_spawns_and_exits(&daemon.scrape_metrics());
    soak.stop.cancel();
    let event_counts = tokio::time::timeout(CALL_DEADLINE, events)
        .await
        .expect("event counter did not stop")
        .expect("event task");

    let figures = soak
        .figures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let steps: Vec<u64> = sessions.iter().map(|(_, steps)| *steps).collect();
    print_figures(&Report {
        seed,
        asked: soak_duration,
        elapsed: soak_elapsed,
        figures: &figures,
        events: &event_counts,
        restarts_at_end,
        steps: &steps,
        memory_before,
        memory_after,
        fds_before,
        fds_after,
        spawns,
        exits,
    });

    // The daemon stops cleanly and leaves no process it started.
    assert_eq!(daemon.stop(), 0, "the daemon did not drain cleanly");
    let survivors = processes_started_by(daemon_pid);
    assert!(
        survivors.is_empty(),
        "workers outlived the daemon: {survivors:?}"
    );

    assert!(
        figures.violations.is_empty(),
        "{} violations, the first ones:\n{}",
        figures.violations.len(),
        figures
            .violations
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let bound = CLIENTS + POOL_SIZE + REPLACEMENT_MARGIN;
    assert!(
        figures.max_live_workers <= bound,
        "{} live workers at once; the bound is {bound}",
        figures.max_live_workers
    );
    assert!(
        fds_after <= fds_before + FD_MARGIN,
        "the daemon's fds grew from {fds_before} to {fds_after}"
    );
    assert!(
        memory_after.private <= memory_before.private + MEMORY_MARGIN
            && memory_after.rss <= memory_before.rss + MEMORY_MARGIN,
        "the daemon's memory grew: private {} -> {}, RSS {} -> {}",
        mib(memory_before.private),
        mib(memory_after.private),
        mib(memory_before.rss),
        mib(memory_after.rss)
    );
    assert_eq!(
        spawns,
        exits + POOL_SIZE as u64,
        "workers spawned minus workers reaped must be the pool once every session is closed"
    );
    assert!(
        steps.iter().all(|steps| *steps > 0),
        "a client never completed a step: {steps:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Shared state and the one wrapper every RPC goes through.

struct Soak {
    daemon_pid: u32,
    until: Instant,
    /// Ends the event counter (and any loop early, after too many violations).
    stop: CancellationToken,
    /// Sessions their client closed (inserted before CloseSession is sent): the only ones
    /// the operator may get NOT_FOUND for.
    closed: Mutex<HashSet<String>>,
    /// Recycles without preserve_variables the operator asked for, per session (counted
    /// before the request is sent): the only recycles that may lose a client's variables.
    plain_recycles: Mutex<HashMap<String, u64>>,
    figures: Mutex<Figures>,
}

#[derive(Debug, Clone, Default)]
struct Figures {
    rpcs: BTreeMap<&'static str, RpcFigures>,
    violations: Vec<String>,
    /// Client recoveries.
    reinitialised: u64,
    rebuilt_graphs: u64,
    retried_unavailable: u64,
    broken_recycled: u64,
    churned: u64,
    value_checks: u64,
    /// `worker_restart_count` of the sessions clients closed during the soak.
    restarts_of_closed: u64,
    /// grpc.health.v1 answers for tfsd.v1.SessionService, sampled each chaos tick.
    health: BTreeMap<&'static str, u64>,
    /// Operator actions that succeeded, by kind.
    operator_done: BTreeMap<&'static str, u64>,
    /// SIGKILLs sent: to session workers, to warm-pool workers; ticks with no target.
    killed_session_workers: u64,
    killed_pool_workers: u64,
    kills_missed: u64,
    max_live_workers: usize,
    max_private: u64,
    max_fds: usize,
}

#[derive(Debug, Clone, Default)]
struct RpcFigures {
    calls: u64,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    max_latency: Duration,
}

impl Soak {
    fn new(daemon_pid: u32, duration: Duration) -> Soak {
        Soak {
            daemon_pid,
            until: Instant::now() + duration,
            stop: CancellationToken::new(),
            closed: Mutex::new(HashSet::new()),
            plain_recycles: Mutex::new(HashMap::new()),
            figures: Mutex::new(Figures::default()),
        }
    }

    fn running(&self) -> bool {
        Instant::now() < self.until && !self.stop.is_cancelled()
    }

    fn figures(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn violation(&self, what: String) {
        let mut figures = self.figures();
        figures.violations.push(what);
        // A daemon this broken is not worth soaking further; stop early with the evidence.
        if figures.violations.len() >= 100 {
            self.stop.cancel();
        }
    }

    fn was_closed(&self, id: &str) -> bool {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    fn plain_recycles(&self, id: &str) -> u64 {
        let recycles = self
            .plain_recycles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        recycles.get(id).copied().unwrap_or(0)
    }

    /// Sends one RPC with a deadline and records it. A missing answer, or an error whose
    /// code is not in `allowed`, is a violation. Callers check the conditions under which
    /// an allowed error may happen.
    async fn call<T>(
        &self,
        kind: &'static str,
        allowed: &[Code],
        request: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let answer = tokio::time::timeout(CALL_DEADLINE, request).await;
        let latency = started.elapsed();
        let mut figures = self.figures();
        let rpc = figures.rpcs.entry(kind).or_default();
        rpc.calls += 1;
        rpc.max_latency = rpc.max_latency.max(latency);
        let (result, violation) = match answer {
            Ok(Ok(response)) => {
                rpc.ok += 1;
                (Ok(response.into_inner()), None)
            }
            Ok(Err(status)) => {
                *rpc.errors.entry(code_name(status.code())).or_default() += 1;
                let violation = (!allowed.contains(&status.code())).then(|| {
                    format!(
                        "{kind}: {} is not an allowed answer: {}",
                        code_name(status.code()),
                        status.message()
                    )
                });
                (Err(status), violation)
            }
            Err(_) => {
                *rpc.errors.entry("NO ANSWER").or_default() += 1;
                let message = format!("{kind}: no answer within {CALL_DEADLINE:?}");
                (
                    Err(Status::deadline_exceeded(message.clone())),
                    Some(message),
                )
            }
        };
        drop(figures);
        if let Some(violation) = violation {
            self.violation(violation);
        }
        result
    }

    /// GetSession, which must always answer for a session its client has not closed.
    async fn session_info(&self, client: &mut Client, id: &str) -> Option<api::SessionInfo> {
        let request = api::GetSessionRequest {
            session_id: id.to_string(),
        };
        self.call("GetSession", &[], client.get_session(request))
            .await
            .ok()
    }

    async fn list(&self, client: &mut Client) -> Vec<api::SessionInfo> {
        self.call(
            "ListSessions",
            &[],
            client.list_sessions(api::ListSessionsRequest {}),
        )
        .await
        .map(|list| list.sessions)
        .unwrap_or_default()
    }

    /// Load pacing, cut short at the end of the soak.
    async fn pace(&self, interval: Duration) {
        let left = self.until.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = tokio::time::sleep(interval.min(left)) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    fn max_iterations(&self, started: Instant) -> u64 {
        (self.until - started).as_secs().max(1) * MAX_ITERATIONS_PER_SECOND
    }
}

// ---------------------------------------------------------------------------------------
// A training client: init, then steps that feed x and run the assign-adds, coping with
// everything the operator and the chaos loop do to its session the way a real one would.

/// What has happened to a session that may take state away, as `SessionInfo` counts it plus
/// the operator's record of recycles that did not preserve variables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Marks {
    purges: u64,
    graph_resets: u64,
    restarts: u64,
    plain_recycles: u64,
}

struct TrainingClient {
    soak: Arc<Soak>,
    client: Client,
    rng: Rng,
    session: String,
    /// The marks just before the variables were last initialised.
    init_marks: Marks,
    /// The marks just before the graph was last (re)built.
    graph_marks: Marks,
    /// The values of w and v the next step must continue; None until initialised.
    expected: Option<(f32, f32)>,
    needs_graph: bool,
    steps: u64,
    consecutive_failures: u32,
}

/// Why a client's action did not succeed, once the allowed error was accounted for.
struct Failed;

impl TrainingClient {
    fn new(soak: Arc<Soak>, client: Client, rng: Rng) -> TrainingClient {
        TrainingClient {
            soak,
            client,
            rng,
            session: String::new(),
            init_marks: Marks::default(),
            graph_marks: Marks::default(),
            expected: None,
            needs_graph: false,
            steps: 0,
            consecutive_failures: 0,
        }
    }

    /// Trains until the soak ends, then until one more step succeeds (so that every client
    /// ends on a working session). Returns the session id and the successful steps.
    async fn train(mut self) -> (String, u64) {
        let started = Instant::now();
        let max_iterations = self.soak.max_iterations(started);
        let mut iterations = 0;
        while self.session.is_empty() && iterations < max_iterations {
            iterations += 1;
            let _ = self.create().await;
        }
        while self.soak.running() && iterations < max_iterations {
            iterations += 1;
            let outcome = if self.needs_graph {
                self.rebuild_graph().await
            } else if self.expected.is_none() {
                self.initialise().await
            } else if self.rng.one_in(200) {
                self.churn().await
            } else if self.rng.one_in(10) {
                self.check_values().await
            } else {
                self.step().await
            };
            if !self.progress(outcome) {
                return (self.session, self.steps);
            }
        }
        // The finishing step: the soak is over, so recovery converges quickly.
        let steps_before = self.steps;
        while self.steps == steps_before && !self.soak.stop.is_cancelled() {
            let outcome = if self.needs_graph {
                self.rebuild_graph().await
            } else if self.expected.is_none() {
                self.initialise().await
            } else {
                self.step().await
            };
            if !self.progress(outcome) {
                break;
            }
        }
        (self.session, self.steps)
    }

    /// Counts consecutive failures; false when the client stopped recovering.
    fn progress(&mut self, outcome: Result<(), Failed>) -> bool {
        match outcome {
            Ok(()) => self.consecutive_failures = 0,
            Err(Failed) => self.consecutive_failures += 1,
        }
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            self.soak.violation(format!(
                "session {}: {MAX_CONSECUTIVE_FAILURES} failures in a row, no recovery",
                self.session
            ));
            return false;
        }
        true
    }

    async fn create(&mut self) -> Result<(), Failed> {
        // UNAVAILABLE: the warm worker it was given was killed while loading the graph.
        let request = api::CreateSessionRequest {
            graph_def: model_graph(),
            ..Default::default()
        };
        let created = self
            .soak
            .call(
                "CreateSession",
                &[Code::Unavailable],
                self.client.create_session(request),
            )
            .await;
        match created.ok().and_then(|response| response.session) {
            Some(info) => {
                self.session = info.session_id.clone();
                self.init_marks = self.marks(&info);
                self.graph_marks = self.init_marks;
                self.expected = None;
                self.needs_graph = false;
                Ok(())
            }
            None => {
                self.soak.figures().retried_unavailable += 1;
                Err(Failed)
            }
        }
    }

    fn marks(&self, info: &api::SessionInfo) -> Marks {
        Marks {
            purges: info.purge_count,
            graph_resets: info.graph_reset_count,
            restarts: info.worker_restart_count,
            plain_recycles: self.soak.plain_recycles(&self.session),
        }
    }

    async fn current_marks(&mut self) -> Result<Marks, Failed> {
        let info = self
            .soak
            .session_info(&mut self.client, &self.session)
            .await
            .ok_or(Failed)?;
        Ok(self.marks(&info))
    }

    /// One Run. Allowed errors: UNAVAILABLE (the worker died under it, or the session is
    /// being restored or broken); FAILED_PRECONDITION or NOT_FOUND (variables uninitialised:
    /// only after a purge, a reset, a restore or a recycle without preservation; TensorFlow
    /// answers NOT_FOUND "Container localhost does not exist" when `v_add` runs before any
    /// resource variable exists in the fresh TensorFlow session, FAILED_PRECONDITION when
    /// `w_add` fails first: the two ops race); INVALID_ARGUMENT (a node is missing: only
    /// after a ResetGraph).
    async fn run(
        &mut self,
        feeds: &[(&str, tfsd::proto::tensorflow::TensorProto)],
        fetches: &[&str],
        targets: &[&str],
    ) -> Result<Vec<f32>, Failed> {
        let request = run_request(&self.session, feeds, fetches, targets);
        let allowed = [
            Code::Unavailable,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::InvalidArgument,
        ];
        let answer = self
            .soak
            .call("Run", &allowed, self.client.run(request))
            .await;
        match answer {
            Ok(response) => Ok(response.outputs.iter().map(as_f32).collect()),
            Err(status) => {
                self.recover(&status).await;
                Err(Failed)
            }
        }
    }

    /// What a training worker does after an allowed error, having checked that the error
    /// is explained by something that really happened to its session.
    async fn recover(&mut self, status: &Status) {
        match status.code() {
            Code::Unavailable => {
                self.soak.figures().retried_unavailable += 1;
                // A session whose restore failed stays BROKEN until someone recycles it.
                let Some(info) = self
                    .soak
                    .session_info(&mut self.client, &self.session)
                    .await
                else {
                    return;
                };
                if info.state == api::SessionState::Broken as i32 {
                    let request = api::RecycleSessionRequest {
                        session_id: self.session.clone(),
                        preserve_variables: false,
                    };
                    let recycled = self
                        .soak
                        .call(
                            "RecycleSession",
                            &[Code::Unavailable],
                            self.client.recycle_session(request),
                        )
                        .await;
                    if recycled.is_ok() {
                        self.soak.figures().broken_recycled += 1;
                        self.expected = None;
                    }
                }
            }
            Code::FailedPrecondition | Code::NotFound => {
                let Ok(now) = self.current_marks().await else {
                    return;
                };
                let lost = now != self.init_marks;
                if !lost {
                    self.soak.violation(format!(
                        "session {}: Run answered {} ({}) although it was \
                         not purged, reset, restored or recycled without preservation since \
                         its variables were initialised",
                        self.session,
                        code_name(status.code()),
                        status.message()
                    ));
                }
                self.soak.figures().reinitialised += 1;
                self.expected = None;
            }
            Code::InvalidArgument => {
                let Ok(now) = self.current_marks().await else {
                    return;
                };
                if now.graph_resets == self.graph_marks.graph_resets {
                    self.soak.violation(format!(
                        "session {}: Run answered INVALID_ARGUMENT ({}) although its graph \
                         was not reset",
                        self.session,
                        status.message()
                    ));
                }
                self.needs_graph = true;
                self.expected = None;
            }
            _ => {}
        }
    }

    async fn initialise(&mut self) -> Result<(), Failed> {
        let marks = self.current_marks().await?;
        self.run(&[], &[], &["w_init", "v_init"]).await?;
        self.init_marks = marks;
        self.expected = Some((3.0, 5.0));
        Ok(())
    }

    /// After a ResetGraph the graph is empty: send it again at the version the session says.
    async fn rebuild_graph(&mut self) -> Result<(), Failed> {
        let info = self
            .soak
            .session_info(&mut self.client, &self.session)
            .await
            .ok_or(Failed)?;
        let marks = self.marks(&info);
        let request = api::ExtendGraphRequest {
            session_id: self.session.clone(),
            graph_def: model_graph(),
            current_graph_version: info.graph_version,
        };
        // UNAVAILABLE: the worker died during the extension (the graph was not kept), or
        // the session is restoring or broken.
        let extended = self
            .soak
            .call(
                "ExtendGraph",
                &[Code::Unavailable],
                self.client.extend_graph(request),
            )
            .await;
        if let Err(status) = extended {
            if status.code() == Code::Unavailable {
                self.recover(&status).await;
            }
            return Err(Failed);
        }
        self.soak.figures().rebuilt_graphs += 1;
        self.graph_marks = marks;
        self.needs_graph = false;
        self.expected = None;
        Ok(())
    }

    /// A training step: w += x and v += x, fetching the new w.
    async fn step(&mut self) -> Result<(), Failed> {
        let outputs = self
            .run(&[("x", scalar(1.0))], &["w_add"], &["v_add"])
            .await?;
        let Some((w, v)) = self.expected else {
            return Ok(());
        };
        if outputs.first() != Some(&(w + 1.0)) {
            self.soak.violation(format!(
                "session {}: a step returned w = {outputs:?}, expected {} (training state \
                 changed without an error)",
                self.session,
                w + 1.0
            ));
            self.expected = None;
            return Err(Failed);
        }
        self.expected = Some((w + 1.0, v + 1.0));
        self.steps += 1;
        Ok(())
    }

    /// Reads both variables without changing them and compares with what training did.
    async fn check_values(&mut self) -> Result<(), Failed> {
        let outputs = self.run(&[], &["w", "v_read"], &[]).await?;
        let Some((w, v)) = self.expected else {
            return Ok(());
        };
        self.soak.figures().value_checks += 1;
        if outputs != [w, v] {
            self.soak.violation(format!(
                "session {}: w, v = {outputs:?}, expected [{w}, {v}]",
                self.session
            ));
            self.expected = None;
            return Err(Failed);
        }
        Ok(())
    }

    /// Now and then a client finishes and another starts: close, then create.
    async fn churn(&mut self) -> Result<(), Failed> {
        // Its restarts still count in the figures once it is gone.
        let info = self
            .soak
            .session_info(&mut self.client, &self.session)
            .await
            .ok_or(Failed)?;
        self.soak.figures().restarts_of_closed += info.worker_restart_count;
        self.soak
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.session.clone());
        let request = api::CloseSessionRequest {
            session_id: self.session.clone(),
        };
        let closed = self
            .soak
            .call("CloseSession", &[], self.client.close_session(request))
            .await;
        if closed.is_err() {
            return Err(Failed);
        }
        self.soak.figures().churned += 1;
        self.session.clear();
        while self.session.is_empty() && !self.soak.stop.is_cancelled() {
            if self.create().await.is_err() {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
                    return Err(Failed);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The operator and the chaos loop.

/// What the operator does to a random session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OperatorAction {
    PurgeVariables,
    ResetGraph,
    RecyclePreserving,
    Recycle,
}

impl OperatorAction {
    fn pick(rng: &mut Rng) -> OperatorAction {
        match rng.below(100) {
            0..30 => OperatorAction::PurgeVariables,
            30..45 => OperatorAction::ResetGraph,
            45..75 => OperatorAction::RecyclePreserving,
            _ => OperatorAction::Recycle,
        }
    }

    fn name(self) -> &'static str {
        match self {
            OperatorAction::PurgeVariables => "purge",
            OperatorAction::ResetGraph => "reset graph",
            OperatorAction::RecyclePreserving => "recycle (preserve)",
            OperatorAction::Recycle => "recycle",
        }
    }
}

/// Purges, resets and recycles (with and without preserve_variables) random sessions.
/// Allowed errors: UNAVAILABLE (the worker died during the action, or the session is
/// restoring or broken, or the fresh worker of a recycle was killed), NOT_FOUND (only for a
/// session its client closed), INVALID_ARGUMENT (only for a preserving recycle of a BROKEN
/// session, which has no live worker to copy from).
async fn operate(soak: Arc<Soak>, mut client: Client, mut rng: Rng) {
    let started = Instant::now();
    let max_iterations = soak.max_iterations(started);
    let mut iterations = 0;
    while soak.running() && iterations < max_iterations {
        iterations += 1;
        // Load pacing, not readiness: one action per interval.
        soak.pace(OPERATE_EVERY).await;
        if rng.one_in(10) {
            let request = client.get_daemon_status(api::GetDaemonStatusRequest {});
            soak.call("GetDaemonStatus", &[], request).await.ok();
        }
        let sessions = soak.list(&mut client).await;
        if sessions.is_empty() {
            continue;
        }
        let id = sessions[rng.below(sessions.len())].session_id.clone();
        let action = OperatorAction::pick(&mut rng);
        let answer = act(&soak, &mut client, action, &id).await;
        match answer {
            Ok(_) => {
                *soak
                    .figures()
                    .operator_done
                    .entry(action.name())
                    .or_default() += 1
            }
            Err(status) if status.code() == Code::NotFound && !soak.was_closed(&id) => {
                soak.violation(format!(
                    "{} {id}: NOT_FOUND for a session nobody closed: {}",
                    action.name(),
                    status.message()
                ));
            }
            // The one INVALID_ARGUMENT a reset may answer; its message is the only thing
            // that tells it from a rejected request (the session may be restored by now).
            Err(status)
                if status.code() == Code::InvalidArgument
                    && !(action == OperatorAction::RecyclePreserving
                        && status.message().contains("no live worker")) =>
            {
                soak.violation(format!(
                    "{} {id}: INVALID_ARGUMENT: {}",
                    action.name(),
                    status.message()
                ));
            }
            Err(_) => {}
        }
    }
}

async fn act(
    soak: &Soak,
    client: &mut Client,
    action: OperatorAction,
    id: &str,
) -> Result<api::ResetResponse, Status> {
    let allowed = [Code::Unavailable, Code::NotFound, Code::InvalidArgument];
    let session_id = id.to_string();
    match action {
        OperatorAction::PurgeVariables => {
            let request = client.purge_variables(api::PurgeVariablesRequest { session_id });
            soak.call("PurgeVariables", &allowed, request).await
        }
        OperatorAction::ResetGraph => {
            let request = client.reset_graph(api::ResetGraphRequest { session_id });
            soak.call("ResetGraph", &allowed, request).await
        }
        OperatorAction::RecyclePreserving | OperatorAction::Recycle => {
            let preserve_variables = action == OperatorAction::RecyclePreserving;
            if !preserve_variables {
                // Counted before sending: the client may see its variables gone before
                // this call returns.
                let mut recycles = soak
                    .plain_recycles
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *recycles.entry(session_id.clone()).or_default() += 1;
            }
            let request = client.recycle_session(api::RecycleSessionRequest {
                session_id,
                preserve_variables,
            });
            soak.call("RecycleSession", &allowed, request).await
        }
    }
}

/// Every KILL_EVERY: SIGKILL to a random session worker (or, one time in five, a warm-pool
/// worker: a live child of the daemon that no session has), and the live-worker bound.
async fn chaos(
    soak: Arc<Soak>,
    mut client: Client,
    mut health: HealthClient<Channel>,
    mut rng: Rng,
) {
    let started = Instant::now();
    let max_iterations = soak.max_iterations(started);
    let bound = CLIENTS + POOL_SIZE + REPLACEMENT_MARGIN;
    let mut iterations = 0;
    while soak.running() && iterations < max_iterations {
        iterations += 1;
        // Load pacing, not readiness: one kill per interval.
        soak.pace(KILL_EVERY).await;
        if !soak.running() {
            break;
        }
        let request = HealthCheckRequest {
            service: "tfsd.v1.SessionService".to_string(),
        };
        if let Ok(answer) = soak.call("Health/Check", &[], health.check(request)).await {
            let status = ServingStatus::try_from(answer.status).map_or("?", |s| s.as_str_name());
            *soak.figures().health.entry(status).or_default() += 1;
        }
        let sessions = soak.list(&mut client).await;
        let session_pids: HashSet<u32> = sessions
            .iter()
            .map(|s| s.worker_pid)
            .filter(|pid| *pid != 0)
            .collect();
        let live = live_children(soak.daemon_pid);
        let memory = daemon_memory(soak.daemon_pid);
        let fds = fd_count(soak.daemon_pid);
        {
            let mut figures = soak.figures();
            figures.max_live_workers = figures.max_live_workers.max(live.len());
            figures.max_private = figures.max_private.max(memory.private);
            figures.max_fds = figures.max_fds.max(fds);
        }
        if live.len() > bound {
            soak.violation(format!(
                "{} live workers (bound {bound}): {live:?}; sessions' workers {session_pids:?}",
                live.len()
            ));
        }
        let pool_pids: Vec<u32> = live
            .iter()
            .copied()
            .filter(|pid| !session_pids.contains(pid))
            .collect();
        // Sorted, so that a seed replays the same choices (the timing still differs).
        let mut session_pids: Vec<u32> = session_pids.into_iter().collect();
        session_pids.sort_unstable();
        let (targets, pool) = if rng.one_in(5) && !pool_pids.is_empty() {
            (pool_pids, true)
        } else {
            (session_pids, false)
        };
        if targets.is_empty() {
            soak.figures().kills_missed += 1;
            continue;
        }
        let pid = targets[rng.below(targets.len())];
        let killed = kill_child(soak.daemon_pid, pid);
        let mut figures = soak.figures();
        match (killed, pool) {
            (true, true) => figures.killed_pool_workers += 1,
            (true, false) => figures.killed_session_workers += 1,
            (false, _) => figures.kills_missed += 1,
        }
    }
}

/// Counts lifecycle events by kind until `stop`. The stream must not fail.
async fn count_events(soak: Arc<Soak>, mut client: Client) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let stream = soak
        .call(
            "WatchEvents",
            &[],
            client.watch_events(api::WatchEventsRequest::default()),
        )
        .await;
    let Ok(mut stream) = stream else {
        return counts;
    };
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            _ = soak.stop.cancelled() => break,
        };
        match message {
            Ok(Some(event)) => {
                let kind = api::EventKind::try_from(event.kind).map_or_else(
                    |_| format!("kind {}", event.kind),
                    |k| k.as_str_name().to_string(),
                );
                *counts.entry(kind).or_default() += 1;
            }
            Ok(None) => {
                soak.violation("WatchEvents: the stream ended while the daemon ran".into());
                break;
            }
            Err(status) => {
                soak.violation(format!("WatchEvents: the stream failed: {status}"));
                break;
            }
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------
// Settling: waiting for conditions the daemon reaches on its own (the pool refilled, every
// restore finished, closed connections released). The warm pool and restores publish no
// event a test can wait on, so these poll the condition with a deadline; a condition not
// reached by the deadline is a failure, never a reason to wait longer.

const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Waits until the daemon holds no session, its pool is full, and its only children are the
/// pool's live workers (no zombie, no worker being replaced).
async fn settle(soak: &Soak, control: &mut Client, daemon_pid: u32) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let request = control.get_daemon_status(api::GetDaemonStatusRequest {});
        let status = soak
            .call("GetDaemonStatus", &[], request)
            .await
            .map_err(|status| format!("GetDaemonStatus: {status}"))?;
        let children = children_of(daemon_pid);
        let live = children.iter().filter(|pid| process_alive(**pid)).count();
        if status.session_count == 0
            && status.warm_workers as usize == POOL_SIZE
            && children.len() == POOL_SIZE
            && live == POOL_SIZE
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the daemon did not settle within {SETTLE_DEADLINE:?}: {} sessions, {} warm \
             workers (pool {POOL_SIZE}), children {children:?} ({live} live)",
                status.session_count, status.warm_workers
            ));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Waits until every session is READY with no run in flight (restores after the last kills
/// finished), records a violation if that does not happen, and returns the sessions.
async fn settled_sessions(soak: &Soak, control: &mut Client) -> Vec<api::SessionInfo> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let sessions = soak.list(control).await;
        let unsettled: Vec<String> = sessions
            .iter()
            .filter(|s| s.state != api::SessionState::Ready as i32 || s.runs_in_flight > 0)
            .map(|s| {
                let state =
                    api::SessionState::try_from(s.state).map_or("?", |state| state.as_str_name());
                format!(
                    "{} {state} runs_in_flight={}",
                    s.session_id, s.runs_in_flight
                )
            })
            .collect();
        if unsettled.is_empty() && sessions.len() == CLIENTS {
            return sessions;
        }
        if Instant::now() >= deadline {
            soak.violation(format!(
                "after the soak, {} sessions (expected {CLIENTS}) and these are not READY and \
                 idle within {SETTLE_DEADLINE:?}: {unsettled:?}",
                sessions.len()
            ));
            return sessions;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// The daemon's fd count once it is back within the margin of `before` (connections closed
/// by clients are released asynchronously), or as it stands at the deadline.
async fn settled_fd_count(pid: u32, before: usize) -> usize {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let fds = fd_count(pid);
        if fds <= before + FD_MARGIN || Instant::now() >= deadline {
            return fds;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// Processes, memory, fds.

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    private: u64,
}

/// VmRSS and RssAnon of a process.
fn daemon_memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Memory {
        rss: field("VmRSS:"),
        private: field("RssAnon:"),
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

fn live_children(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|child| process_alive(*child))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILL to `pid` only if it is still a live child of the daemon. The pidfd pins the
/// process, so a pid reused after the check can never receive the signal.
fn kill_child(daemon_pid: u32, pid: u32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        return false;
    }
    let ours = parent_of(pid) == Some(daemon_pid) && process_alive(pid);
    // SAFETY: a pidfd we own, a valid signal, no siginfo; the fd is closed right after.
    let sent = ours
        && unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    sent
}

/// Live processes whose environment says this daemon started them (TFSD_SUPERVISOR_PID).
fn processes_started_by(daemon_pid: u32) -> Vec<u32> {
    let marker = format!("TFSD_SUPERVISOR_PID={daemon_pid}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let started_by_daemon = environ
            .split(|byte| *byte == 0)
            .any(|variable| variable == marker.as_bytes());
        // PR_SET_PDEATHSIG kills a worker as its parent exits; give that a moment to land.
        if started_by_daemon && !wait_for_exit(pid, Duration::from_secs(5)) {
            found.push(pid);
        }
    }
    found
}

/// `tfsd_worker_spawns_total` and the sum of `tfsd_worker_exits_total` over causes.
fn worker_spawns_and_exits(metrics: &str) -> (u64, u64) {
    let sum = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit_once(' '))
            .filter_map(|(_, value)| value.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum()
    };
    (
        sum("tfsd_worker_spawns_total"),
        sum("tfsd_worker_exits_total"),
    )
}

// ---------------------------------------------------------------------------------------
// Configuration, randomness, and the figures.

fn soak_duration() -> Duration {
    let seconds = match std::env::var("TFSD_SOAK_SECONDS") {
        Ok(text) => text
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("TFSD_SOAK_SECONDS={text:?} is not a whole number")),
        Err(_) => DEFAULT_SOAK_SECONDS,
    };
    Duration::from_secs(seconds)
}

fn seed() -> u64 {
    match std::env::var("TFSD_SOAK_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("TFSD_SOAK_SEED={text:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64),
    }
}

/// splitmix64: small, seedable, and good enough to pick sessions and actions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

struct Report<'a> {
    seed: u64,
    asked: Duration,
    elapsed: Duration,
    figures: &'a Figures,
    events: &'a BTreeMap<String, u64>,
    restarts_at_end: u64,
    steps: &'a [u64],
    memory_before: Memory,
    memory_after: Memory,
    fds_before: usize,
    fds_after: usize,
    spawns: u64,
    exits: u64,
}

fn print_figures(report: &Report<'_>) {
    let f = report.figures;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "==== tfsd chaos soak: {:.1} s (TFSD_SOAK_SECONDS={}), {CLIENTS} clients, warm pool \
         {POOL_SIZE}, seed {} ====",
        report.elapsed.as_secs_f64(),
        report.asked.as_secs(),
        report.seed
    ));
    line(format!(
        "{:<16} {:>8} {:>8}  {:>11}  errors by code",
        "RPC", "calls", "ok", "max latency"
    ));
    let mut total = RpcFigures::default();
    let mut by_code: BTreeMap<&str, u64> = BTreeMap::new();
    for (kind, rpc) in &f.rpcs {
        let errors: Vec<String> = rpc
            .errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        line(format!(
            "{kind:<16} {:>8} {:>8}  {:>9.0}ms  {}",
            rpc.calls,
            rpc.ok,
            rpc.max_latency.as_secs_f64() * 1000.0,
            errors.join(", ")
        ));
        total.calls += rpc.calls;
        total.ok += rpc.ok;
        for (code, n) in &rpc.errors {
            *by_code.entry(code).or_default() += n;
        }
    }
    let codes: Vec<String> = by_code.iter().map(|(c, n)| format!("{c} {n}")).collect();
    line(format!(
        "{:<16} {:>8} {:>8}  errors: {}",
        "all",
        total.calls,
        total.ok,
        if codes.is_empty() {
            "none".into()
        } else {
            codes.join(", ")
        }
    ));
    let steps: u64 = report.steps.iter().sum();
    line(format!(
        "training: {steps} steps ({} min, {} max per client), {} value checks, {} \
         close-and-create",
        report.steps.iter().min().unwrap_or(&0),
        report.steps.iter().max().unwrap_or(&0),
        f.value_checks,
        f.churned
    ));
    let done: Vec<String> = f
        .operator_done
        .iter()
        .map(|(action, n)| format!("{action} {n}"))
        .collect();
    line(format!("operator (succeeded): {}", done.join(", ")));
    line(format!(
        "chaos: SIGKILL to {} session workers and {} warm-pool workers ({} ticks without a \
         target)",
        f.killed_session_workers, f.killed_pool_workers, f.kills_missed
    ));
    let event = |kind: &str| report.events.get(kind).copied().unwrap_or(0);
    line(format!(
        "recoveries: {} WORKER_EXITED and {} RESTORED events ({} LAGGED); {} worker restarts \
         in SessionInfo ({} of sessions closed during the soak); clients: {} \
         re-initialisations, {} graphs rebuilt, {} retries after UNAVAILABLE, {} broken \
         sessions recycled",
        event("EVENT_KIND_WORKER_EXITED"),
        event("EVENT_KIND_RESTORED"),
        event("EVENT_KIND_LAGGED"),
        report.restarts_at_end + f.restarts_of_closed,
        f.restarts_of_closed,
        f.reinitialised,
        f.rebuilt_graphs,
        f.retried_unavailable,
        f.broken_recycled
    ));
    let events: Vec<String> = report
        .events
        .iter()
        .map(|(kind, n)| format!("{} {n}", kind.trim_start_matches("EVENT_KIND_")))
        .collect();
    line(format!("events: {}", events.join(", ")));
    line(format!(
        "workers: at most {} live at once (bound {CLIENTS} + {POOL_SIZE} + \
         {REPLACEMENT_MARGIN}); {} spawned, {} reaped, {} left (the pool) after closing",
        f.max_live_workers,
        report.spawns,
        report.exits,
        report.spawns.saturating_sub(report.exits)
    ));
    line(format!(
        "daemon RSS: {} -> {} ({:+.1} MiB); private: {} -> {} ({:+.1} MiB, at most {} \
         during the soak)",
        mib(report.memory_before.rss),
        mib(report.memory_after.rss),
        (report.memory_after.rss as f64 - report.memory_before.rss as f64) / MIB as f64,
        mib(report.memory_before.private),
        mib(report.memory_after.private),
        (report.memory_after.private as f64 - report.memory_before.private as f64) / MIB as f64,
        mib(f.max_private)
    ));
    line(format!(
        "daemon fds: {} -> {} (at most {} during the soak)",
        report.fds_before, report.fds_after, f.max_fds
    ));
    let health: Vec<String> = f.health.iter().map(|(s, n)| format!("{s} {n}")).collect();
    line(format!(
        "health of tfsd.v1.SessionService, sampled per kill: {}",
        health.join(", ")
    ));
    line(format!("violations: {}", f.violations.len()));
    line("====".to_string());
    println!("{out}");
}
