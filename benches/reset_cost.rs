//! What each tfsd reset costs in time, seen from a client: PurgeVariables, ResetGraph,
//! RecycleSession (with a warm worker from the pool, and cold with `pool_size = 0`, with and
//! without preserve_variables), and a whole session's life (create, one step, close), on the
//! small step graph of benches/common (a [4, 4] MatMul and a 256 KiB variable `v`).
//! benches/peers.py measures what users do instead: restart a Python process that imports
//! TensorFlow, restart TensorFlow's own server, `Session.reset` on it.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench reset_cost
//! ```
//!
//! Each reset starts from a session whose variable is initialised; a warm recycle first waits
//! (untimed) until the pool holds a ready worker again. Figures are client wall time per call,
//! next to the daemon's own `duration_us`.

mod common;

use std::time::Instant;

use anyhow::{Context, ensure};
use common::{Client, Daemon, Latencies, call};
use tfsd::proto::tfsd::v1 as api;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let repeats = common::scaled(30, 5);
    println!(
        "reset_cost: tfsd {}; {repeats} of each; load {load_before:.2}",
        tfsd.display()
    );
    let graph_def = common::step_graph()?;
    let mut results = serde_json::Map::new();

    let warm = Daemon::start(&tfsd, "resets-warm", "[workers]\npool_size = 1\n").await?;
    let mut client = warm.connect().await?;
    let id = common::create_session(&mut client, &graph_def, None)
        .await?
        .session_id;
    let mut record = |name: &str, figures: Figures| {
        figures.print(name);
        results.insert(name.to_string(), figures.to_json());
    };

    let mut figures = Figures::default();
    for _ in 0..repeats {
        common::init_variable(&mut client, &id, "v").await?;
        let started = Instant::now();
        let reply = call(
            "PurgeVariables",
            client.purge_variables(api::PurgeVariablesRequest {
                session_id: id.clone(),
            }),
        )
        .await?;
        figures.record(started, &reply);
        ensure_uninitialised(&mut client, &id, "after PurgeVariables").await?;
    }
    record("purge_variables", figures);

    let mut figures = Figures::default();
    for _ in 0..repeats {
        common::init_variable(&mut client, &id, "v").await?;
        let started = Instant::now();
        let reply = call(
            "ResetGraph",
            client.reset_graph(api::ResetGraphRequest {
                session_id: id.clone(),
            }),
        )
        .await?;
        figures.record(started, &reply);
        // Untimed: the graph back, for the next round.
        let version = reply
            .session
            .as_ref()
            .context("ResetGraph answered without session info")?
            .graph_version;
        call(
            "ExtendGraph",
            client.extend_graph(api::ExtendGraphRequest {
                session_id: id.clone(),
                graph_def: graph_def.clone(),
                current_graph_version: version,
            }),
        )
        .await?;
    }
    record("reset_graph", figures);

    let mut first_steps = Figures::default();
    let mut first_steps_refilled = Figures::default();
    for preserve in [false, true] {
        let mut figures = Figures::default();
        for repeat in 0..repeats {
            warm.wait_for_warm_pool(&mut client).await?;
            common::init_variable(&mut client, &id, "v").await?;
            let started = Instant::now();
            let reply = recycle(&mut client, &id, preserve).await?;
            figures.record(started, &reply);
            if !preserve {
                // The first step in the fresh worker: what the client waits for next. Every
                // other time, only once the pool has refilled, to tell the step's own cost
                // from the new worker's start competing with it for the two cores.
                let refilled = repeat % 2 == 1;
                if refilled {
                    warm.wait_for_warm_pool(&mut client).await?;
                }
                let started = Instant::now();
                call("Run", client.run(common::step_request(&id))).await?;
                if refilled {
                    first_steps_refilled.client.push(started.elapsed());
                } else {
                    first_steps.client.push(started.elapsed());
                }
            }
        }
        record(
            if preserve {
                "recycle_warm_preserve"
            } else {
                "recycle_warm"
            },
            figures,
        );
    }
    record("first_step_after_recycle_warm", first_steps);
    record(
        "first_step_after_recycle_warm_refilled",
        first_steps_refilled,
    );
    record(
        "create_run_close_warm",
        session_lives(&warm, &mut client, &graph_def, repeats, true).await?,
    );
    warm.stop().await?;

    let cold = Daemon::start(&tfsd, "resets-cold", "[workers]\npool_size = 0\n").await?;
    let mut client = cold.connect().await?;
    let id = common::create_session(&mut client, &graph_def, None)
        .await?
        .session_id;
    for preserve in [false, true] {
        let mut figures = Figures::default();
        for _ in 0..repeats {
            common::init_variable(&mut client, &id, "v").await?;
            let started = Instant::now();
            let reply = recycle(&mut client, &id, preserve).await?;
            figures.record(started, &reply);
        }
        let name = if preserve {
            "recycle_cold_preserve"
        } else {
            "recycle_cold"
        };
        figures.print(name);
        results.insert(name.to_string(), figures.to_json());
    }
    let figures = session_lives(&cold, &mut client, &graph_def, repeats, false).await?;
    figures.print("create_run_close_cold");
    results.insert("create_run_close_cold".to_string(), figures.to_json());
    cold.stop().await?;

    common::write_results(
        "reset_cost",
        load_before,
        serde_json::json!({ "resets": results }),
    )
}

/// Client wall time and the daemon's own duration per call.
#[derive(Debug, Default)]
struct Figures {
    client: Latencies,
    daemon: Latencies,
}

impl Figures {
    fn record(&mut self, started: Instant, reply: &api::ResetResponse) {
        self.client.push(started.elapsed());
        self.daemon
            .push(std::time::Duration::from_micros(reply.duration_us));
    }

    fn print(&self, name: &str) {
        let daemon = if self.daemon.micros.is_empty() {
            String::new()
        } else {
            format!(
                " (daemon's own p50 {:.2} ms)",
                self.daemon.percentile(50.0) / 1e3
            )
        };
        println!(
            "- {name}: p50 {:.2} ms p99 {:.2} ms{daemon}",
            self.client.percentile(50.0) / 1e3,
            self.client.percentile(99.0) / 1e3,
        );
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "client": self.client.summary(true),
            "daemon": (!self.daemon.micros.is_empty()).then(|| self.daemon.summary(false)),
        })
    }
}

async fn recycle(
    client: &mut Client,
    id: &str,
    preserve_variables: bool,
) -> anyhow::Result<api::ResetResponse> {
    let reply = call(
        "RecycleSession",
        client.recycle_session(api::RecycleSessionRequest {
            session_id: id.to_string(),
            preserve_variables,
        }),
    )
    .await?;
    ensure!(
        reply.worker_pid_before != reply.worker_pid_after,
        "RecycleSession kept worker {}",
        reply.worker_pid_before
    );
    if preserve_variables {
        ensure!(
            reply.variables_preserved >= 1,
            "RecycleSession preserve_variables preserved no variable"
        );
    }
    Ok(reply)
}

/// CreateSession, one step, CloseSession; with `warm`, each starts with a full pool.
async fn session_lives(
    daemon: &Daemon,
    client: &mut Client,
    graph_def: &[u8],
    repeats: usize,
    warm: bool,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    for _ in 0..repeats {
        if warm {
            daemon.wait_for_warm_pool(client).await?;
        }
        let started = Instant::now();
        let id = common::create_session(client, graph_def, None)
            .await?
            .session_id;
        call("Run", client.run(common::step_request(&id))).await?;
        call(
            "CloseSession",
            client.close_session(api::CloseSessionRequest { session_id: id }),
        )
        .await?;
        figures.client.push(started.elapsed());
    }
    Ok(figures)
}

/// Checks that `v` is uninitialised (TensorFlow answers FAILED_PRECONDITION), so that the
/// table never reports a reset that did nothing.
async fn ensure_uninitialised(client: &mut Client, id: &str, when: &str) -> anyhow::Result<()> {
    let reply = client
        .run(api::RunRequest {
            session_id: id.to_string(),
            fetches: vec!["v_probe:0".to_string()],
            ..Default::default()
        })
        .await;
    match reply {
        Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(()),
        Err(status) => anyhow::bail!(
            "v_probe {when}: expected FAILED_PRECONDITION, got {:?} {}",
            status.code(),
            status.message()
        ),
        Ok(_) => anyhow::bail!("v_probe {when} succeeded: v is still initialised"),
    }
}
