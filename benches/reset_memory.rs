//! What each tfsd reset gives back: a worker's private memory before and after PurgeVariables,
//! ResetGraph and RecycleSession (with and without preserve_variables), next to the memory of
//! a fresh worker holding the same graph.
//!
//! Run it with:
//!
//! ```text
//! cargo build --release --workspace    # the daemon (tfsd) and the worker (tfsd-worker)
//! cargo bench --bench reset_memory
//! ```
//!
//! `cargo bench` builds only this binary and the library, not the daemon and the worker it
//! talks to, hence the build first. It runs `tfsd` from the same target directory
//! (target/release, falling back to target/debug); set `TFSD_BIN` to run another one (its
//! `tfsd-worker` must sit next to it).
//!
//! The bench itself links libtensorflow (it builds its graphs with the `tensorflow` crate),
//! so, like the integration tests, it needs the rpath that build.rs gives bench targets
//! (`cargo:rustc-link-arg-benches`), or LD_LIBRARY_PATH=.cache/libtensorflow/lib.
//!
//! For each worker environment (TF_ENABLE_ONEDNN_OPTS=0, tfsd's default, and =1, TensorFlow's
//! own default) it starts a daemon on port 0 with a generated config, and for each variable
//! size creates sessions whose graph holds one float32 VariableV2 `big`, initialised by
//! `big_init`, and measures every reset kind a few times. The table reports medians; memory is
//! the worker's RssAnon ("private"), as the daemon reports it in GetSession and ResetResponse:
//! the honest per-session figure, since RSS also counts the libtensorflow pages mapped into
//! every worker (most of a fresh worker's ~280 MiB RSS).
//!
//! The machine is shared and noisy: the numbers are for the issue note and the docs, so
//! nothing here asserts on timings or sizes. It does check that each reset did what it says
//! (the variable is uninitialised after a purge, preserved by a preserving recycle), so the
//! table never reports memory for a reset that silently did something else.
//!
//! With `TFSD_BENCH_OUT` set it also writes `reset_memory.json` there (every sample, for the
//! report's plots); `BENCH_QUICK=1` measures once per row instead of three times. The daemon
//! and the graph come from the shared harness in `benches/common/`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use common::{CALL_DEADLINE, Client, Daemon, MIB, call};
use tfsd::proto::tfsd::v1 as api;

/// TF_ENABLE_ONEDNN_OPTS values: "0" is tfsd's default (oneDNN's CPU allocator pools freed
/// memory: a session holding a 200 MiB variable, closed in-process, left RSS 200 MiB higher,
/// and `malloc_trim` did not give it back; with oneDNN off RSS went back to the baseline),
/// "1" is TensorFlow's own default on x86.
const ONEDNN_SETTINGS: [&str; 2] = ["0", "1"];

/// Sizes of the variable `big`, in bytes: one well above a fresh worker's ~32 MiB of private
/// memory, and one that dwarfs even its ~280 MiB RSS.
const VARIABLE_SIZES: [u64; 2] = [200 * MIB, 1024 * MIB];

/// Measurements per (environment, size); the table shows medians. Three keeps the whole run
/// under two minutes on a 2-core machine (most of it preserving recycles of 1 GiB).
const REPEATS: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tfsd = common::locate_tfsd()?;
    let load_before = common::load_average();
    let repeats = common::scaled(REPEATS, 1);
    print_header(&tfsd, repeats);

    let graphs = VARIABLE_SIZES
        .iter()
        .map(|&bytes| Ok((bytes, common::big_variable_graph(bytes)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let started = Instant::now();
    let mut rows = Vec::new();
    for onednn in ONEDNN_SETTINGS {
        let daemon = Daemon::start(
            &tfsd,
            &format!("reset-memory-onednn{onednn}"),
            &format!("[workers]\nenv = {{ TF_ENABLE_ONEDNN_OPTS = \"{onednn}\" }}\n"),
        )
        .await?;
        let mut client = daemon.connect().await?;
        for (bytes, graph_def) in &graphs {
            let setting_started = Instant::now();
            let mut samples: BTreeMap<Step, Vec<Sample>> = BTreeMap::new();
            for repeat in 1..=repeats {
                measure_once(&mut client, graph_def, &mut samples)
                    .await
                    .with_context(|| {
                        format!(
                            "TF_ENABLE_ONEDNN_OPTS={onednn}, variable {}, repeat {repeat}",
                            size_label(*bytes)
                        )
                    })?;
            }
            println!(
                "- measured TF_ENABLE_ONEDNN_OPTS={onednn}, variable {} ({repeats}x) in {:.1} s",
                size_label(*bytes),
                setting_started.elapsed().as_secs_f64()
            );
            rows.extend(samples.into_iter().map(|(step, samples)| Row {
                onednn,
                variable_bytes: *bytes,
                step,
                stats: RowStats::median_of(&samples),
                samples,
            }));
        }
        daemon.stop().await?;
    }
    println!("- total {:.1} s\n", started.elapsed().as_secs_f64());
    print_table(&rows);
    common::write_results(
        "reset_memory",
        load_before,
        serde_json::json!({
            "repeats": repeats,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        }),
    )
}

// ---------------------------------------------------------------------------------------
// One measurement: a fresh session, initialised, then every reset kind in turn.

/// What the table has a row for. The order is the order of the steps in `measure_once`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// Not a reset: running `big_init` in the fresh worker, the memory every reset should
    /// give back.
    Init,
    PurgeVariables,
    ResetGraph,
    Recycle,
    RecyclePreservingVariables,
}

impl Step {
    fn label(self) -> &'static str {
        match self {
            Step::Init => "(init: run big_init)",
            Step::PurgeVariables => "PurgeVariables",
            Step::ResetGraph => "ResetGraph",
            Step::Recycle => "RecycleSession",
            Step::RecyclePreservingVariables => "RecycleSession preserve_variables",
        }
    }
}

/// One measured step, in bytes.
#[derive(Debug, Clone, Copy)]
struct Sample {
    private_before: u64,
    private_after: u64,
    rss_after: u64,
    /// The same session's worker right after CreateSession, before `big_init` ran.
    fresh_baseline_private: u64,
    duration: Duration,
}

impl Sample {
    fn from_reset(
        response: &api::ResetResponse,
        fresh_baseline_private: u64,
    ) -> anyhow::Result<Sample> {
        // A missing figure must fail the bench, not appear in the table as 0 MiB.
        let before = response
            .memory_before
            .as_ref()
            .context("a ResetResponse without memory_before")?;
        let after = response
            .memory_after
            .as_ref()
            .context("a ResetResponse without memory_after")?;
        Ok(Sample {
            private_before: before.private_bytes,
            private_after: after.private_bytes,
            rss_after: after.rss_bytes,
            fresh_baseline_private,
            duration: Duration::from_micros(response.duration_us),
        })
    }
}

/// Creates a session holding `graph_def`, initialises `big`, and runs each reset kind once,
/// re-initialising `big` after each one that drops it, so that every reset starts from a
/// worker holding the whole variable. The session is closed at the end.
async fn measure_once(
    client: &mut Client,
    graph_def: &[u8],
    samples: &mut BTreeMap<Step, Vec<Sample>>,
) -> anyhow::Result<()> {
    let created = call(
        "CreateSession",
        client.create_session(api::CreateSessionRequest {
            graph_def: graph_def.to_vec(),
            ..Default::default()
        }),
    )
    .await?
    .session
    .context("CreateSession answered without session info")?;
    let id = created.session_id;
    let mut record = |step: Step, sample: Sample| samples.entry(step).or_default().push(sample);

    // The fresh worker: TensorFlow loaded, the graph imported, no variable allocated.
    let fresh = memory_of(client, &id).await?;

    let init_started = Instant::now();
    init_big(client, &id).await?;
    let init_duration = init_started.elapsed();
    let after_init = memory_of(client, &id).await?;
    record(
        Step::Init,
        Sample {
            private_before: fresh.private_bytes,
            private_after: after_init.private_bytes,
            rss_after: after_init.rss_bytes,
            fresh_baseline_private: fresh.private_bytes,
            duration: init_duration,
        },
    );
    ensure_probe(client, &id, ProbeExpect::Initialised, "after big_init").await?;

    let purged = call(
        "PurgeVariables",
        client.purge_variables(api::PurgeVariablesRequest {
            session_id: id.clone(),
        }),
    )
    .await?;
    record(
        Step::PurgeVariables,
        Sample::from_reset(&purged, fresh.private_bytes)?,
    );
    ensure_probe(
        client,
        &id,
        ProbeExpect::Uninitialised,
        "after PurgeVariables",
    )
    .await?;
    init_big(client, &id).await?;

    let reset = call(
        "ResetGraph",
        client.reset_graph(api::ResetGraphRequest {
            session_id: id.clone(),
        }),
    )
    .await?;
    record(
        Step::ResetGraph,
        Sample::from_reset(&reset, fresh.private_bytes)?,
    );
    // ResetGraph leaves an empty graph at version 0; ExtendGraph onto it with the whole graph
    // brings the session back to where it started.
    let version_after_reset = reset
        .session
        .as_ref()
        .context("ResetGraph answered without session info")?
        .graph_version;
    call(
        "ExtendGraph after ResetGraph",
        client.extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: graph_def.to_vec(),
            current_graph_version: version_after_reset,
        }),
    )
    .await?;
    ensure_probe(client, &id, ProbeExpect::Uninitialised, "after ResetGraph").await?;
    init_big(client, &id).await?;

    let recycled = call(
        "RecycleSession",
        client.recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: false,
        }),
    )
    .await?;
    record(
        Step::Recycle,
        Sample::from_reset(&recycled, fresh.private_bytes)?,
    );
    ensure_probe(
        client,
        &id,
        ProbeExpect::Uninitialised,
        "after RecycleSession",
    )
    .await?;
    init_big(client, &id).await?;

    let preserved = call(
        "RecycleSession preserve_variables",
        client.recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        }),
    )
    .await?;
    ensure!(
        preserved.variables_preserved >= 1,
        "RecycleSession preserve_variables preserved {} variables, expected `big`",
        preserved.variables_preserved
    );
    record(
        Step::RecyclePreservingVariables,
        Sample::from_reset(&preserved, fresh.private_bytes)?,
    );
    ensure_probe(
        client,
        &id,
        ProbeExpect::Initialised,
        "after RecycleSession preserve_variables",
    )
    .await?;

    call(
        "CloseSession",
        client.close_session(api::CloseSessionRequest { session_id: id }),
    )
    .await?;
    Ok(())
}

async fn init_big(client: &mut Client, id: &str) -> anyhow::Result<()> {
    common::init_variable(client, id, "big").await
}

async fn memory_of(client: &mut Client, id: &str) -> anyhow::Result<api::MemoryUsage> {
    call(
        "GetSession",
        client.get_session(api::GetSessionRequest {
            session_id: id.to_string(),
        }),
    )
    .await?
    .memory
    .context("GetSession answered without memory usage")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeExpect {
    Initialised,
    Uninitialised,
}

/// Checks, by fetching `big_probe` (big's first element, 4 bytes), that `big` is or is not
/// initialised: proof that a reset did what it says before its memory goes in the table.
async fn ensure_probe(
    client: &mut Client,
    id: &str,
    expect: ProbeExpect,
    when: &str,
) -> anyhow::Result<()> {
    let reply = tokio::time::timeout(
        CALL_DEADLINE,
        client.run(api::RunRequest {
            session_id: id.to_string(),
            fetches: vec!["big_probe".to_string()],
            ..Default::default()
        }),
    )
    .await
    .with_context(|| format!("Run probe {when}: no answer within {CALL_DEADLINE:?}"))?;
    match (expect, reply) {
        (ProbeExpect::Initialised, Ok(response)) => {
            let outputs = response.into_inner().outputs;
            let tensor = outputs
                .first()
                .with_context(|| format!("Run probe {when} returned no tensor"))?;
            let value = common::first_f32(tensor).with_context(|| format!("probe {when}"))?;
            ensure!(value == 1.0, "probe {when} is {value}, expected 1.0");
            Ok(())
        }
        (ProbeExpect::Initialised, Err(status)) => bail!(
            "probe {when} failed, but big should be initialised: {:?} {}",
            status.code(),
            status.message()
        ),
        // TensorFlow answers FAILED_PRECONDITION for an uninitialised variable.
        (ProbeExpect::Uninitialised, Err(status))
            if status.code() == tonic::Code::FailedPrecondition =>
        {
            Ok(())
        }
        (ProbeExpect::Uninitialised, Err(status)) => bail!(
            "probe {when}: expected FAILED_PRECONDITION (big uninitialised), got {:?} {}",
            status.code(),
            status.message()
        ),
        (ProbeExpect::Uninitialised, Ok(_)) => {
            bail!("probe {when} succeeded: big is still initialised")
        }
    }
}

// ---------------------------------------------------------------------------------------
// Report.

fn print_header(tfsd: &Path, repeats: usize) {
    println!("# tfsd reset memory\n");
    println!("- date: {}", utc_now());
    println!(
        "- machine: {} CPUs (available to this process), MemTotal {}, CPU {}, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        proc_field("/proc/meminfo", "MemTotal").unwrap_or_else(|| "unknown".into()),
        proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_string()),
    );
    println!(
        "- libtensorflow: {}",
        tensorflow::version().unwrap_or_else(|_| "unknown".into())
    );
    println!("- daemon: {}", tfsd.display());
    println!(
        "- variable: one float32 VariableV2 per session; {repeats} sessions per row, medians \
         (each column its own median)"
    );
    println!(
        "- memory: the worker's private memory (RssAnon) and RSS (includes ~280 MiB of \
         libtensorflow pages), as the daemon reports it"
    );
    println!();
}

/// The first `key: value` line of a /proc file, value trimmed.
fn proc_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_string())
        })
}

/// The current time as "YYYY-MM-DD HH:MM:SS UTC", without a date crate.
fn utc_now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, time_of_day) = (seconds / 86_400, seconds % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        time_of_day / 3_600,
        time_of_day / 60 % 60,
        time_of_day % 60
    )
}

fn size_label(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[derive(Debug)]
struct Row {
    onednn: &'static str,
    variable_bytes: u64,
    step: Step,
    stats: RowStats,
    samples: Vec<Sample>,
}

impl Row {
    /// The row's medians and every sample, in MiB and milliseconds, for benches/report.py.
    fn to_json(&self) -> serde_json::Value {
        let stats = &self.stats;
        serde_json::json!({
            "onednn": self.onednn,
            "variable_bytes": self.variable_bytes,
            "step": self.step.label(),
            "private_before_mib": stats.private_before,
            "private_after_mib": stats.private_after,
            "fresh_baseline_mib": stats.fresh_baseline,
            "after_minus_baseline_mib": stats.delta,
            "after_minus_baseline_percent": stats.delta_percent_of_baseline,
            "given_back_percent": stats.given_back_percent,
            "rss_after_mib": stats.rss_after,
            "duration_ms": stats.duration_ms,
            "samples": self.samples.iter().map(|sample| serde_json::json!({
                "private_before_mib": common::mib(sample.private_before),
                "private_after_mib": common::mib(sample.private_after),
                "fresh_baseline_mib": common::mib(sample.fresh_baseline_private),
                "duration_ms": sample.duration.as_secs_f64() * 1e3,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Medians over the repeats, in MiB and milliseconds.
#[derive(Debug)]
struct RowStats {
    private_before: f64,
    private_after: f64,
    fresh_baseline: f64,
    /// after − baseline: what the reset did not give back (or, for a preserving recycle, what
    /// it carried over).
    delta: f64,
    delta_percent_of_baseline: f64,
    /// (before − after) / (before − baseline): the share of what the session had grown by
    /// that the reset gave back.
    given_back_percent: f64,
    rss_after: f64,
    duration_ms: f64,
}

impl RowStats {
    fn median_of(samples: &[Sample]) -> RowStats {
        let mib = |bytes: u64| bytes as f64 / MIB as f64;
        let column = |value: &dyn Fn(&Sample) -> f64| median(samples.iter().map(value).collect());
        RowStats {
            private_before: column(&|s| mib(s.private_before)),
            private_after: column(&|s| mib(s.private_after)),
            fresh_baseline: column(&|s| mib(s.fresh_baseline_private)),
            delta: column(&|s| mib(s.private_after) - mib(s.fresh_baseline_private)),
            delta_percent_of_baseline: column(&|s| {
                100.0 * (s.private_after as f64 - s.fresh_baseline_private as f64)
                    / s.fresh_baseline_private.max(1) as f64
            }),
            given_back_percent: column(&|s| {
                let grown = s.private_before as f64 - s.fresh_baseline_private as f64;
                100.0 * (s.private_before as f64 - s.private_after as f64) / grown.max(1.0)
            }),
            rss_after: column(&|s| mib(s.rss_after)),
            duration_ms: column(&|s| s.duration.as_secs_f64() * 1_000.0),
        }
    }
}

/// The median (the mean of the middle two for an even count); NaN for no values.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// `value` with `decimals` decimals, a "+" on positive values when `plus`, and never "-0"
/// (a median of -0.01 MiB is no change, not a loss).
fn signed(value: f64, decimals: usize, plus: bool) -> String {
    let text = format!("{value:.decimals$}");
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else if plus && value > 0.0 {
        format!("+{text}")
    } else {
        text
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "| worker env | variable | reset | private before MiB | private after MiB \
         | fresh-worker baseline MiB | after − baseline MiB | after − baseline % \
         | given back % | RSS after MiB | duration ms |"
    );
    println!("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for row in rows {
        let stats = &row.stats;
        let env = if row.onednn == "0" {
            "TF_ENABLE_ONEDNN_OPTS=0 (tfsd default)".to_string()
        } else {
            format!("TF_ENABLE_ONEDNN_OPTS={}", row.onednn)
        };
        // Init gives nothing back: it is the growth the resets are measured against.
        let given_back = if row.step == Step::Init {
            "—".to_string()
        } else {
            signed(stats.given_back_percent, 0, false)
        };
        println!(
            "| {env} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {given_back} | {:.1} | {:.1} |",
            size_label(row.variable_bytes),
            row.step.label(),
            stats.private_before,
            stats.private_after,
            stats.fresh_baseline,
            signed(stats.delta, 1, true),
            signed(stats.delta_percent_of_baseline, 0, true),
            stats.rss_after,
            stats.duration_ms,
        );
    }
    println!();
    println!(
        "Init row: before = the fresh worker, after = after big_init, duration = the Run call \
         as the client saw it. Reset rows: before/after/duration from ResetResponse (for a \
         recycle, before is the old worker and after the new one). given back % = (before − \
         after) / (before − baseline)."
    );
}
