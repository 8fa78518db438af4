//! The operator CLI end to end: the real `tfsd` binary run as a command against the real
//! daemon (started by the harness on port 0), with sessions made through the gRPC client.
//! Exit codes and JSON keys are the CLI's contract with scripts, so they are asserted
//! exactly; human output is checked for the facts it must show.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;
use serde_json::Value;
use tfsd::proto::tfsd::v1 as api;

/// What one CLI invocation did.
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {}", self.stdout))
    }

    fn assert_success(&self) -> &CliRun {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The CLI binary with a clean environment for its own variables, so that a developer's
/// TFSD_ADDRESS never points a test at the wrong daemon.
fn tfsd_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tfsd"));
    command
        .args(args)
        .env_remove("TFSD_ADDRESS")
        .env_remove("TFSD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `tfsd ARGS` to completion, failing the test instead of hanging past `DEADLINE`.
fn tfsd(args: &[&str]) -> CliRun {
    let child = tfsd_command(args).spawn().expect("start the tfsd CLI");
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait for the tfsd CLI"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("`tfsd {}` did not finish", args.join(" "));
        }
    };
    CliRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

/// `tfsd --address DAEMON ARGS`.
fn tfsd_at(daemon: &Daemon, args: &[&str]) -> CliRun {
    let mut all = vec!["--address", daemon.address.as_str()];
    all.extend_from_slice(args);
    tfsd(&all)
}

async fn create_labelled(client: &mut Client) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            config: Vec::new(),
            labels: [("experiment".to_string(), "cli".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session info")
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_daemon_in_both_outputs() {
    let daemon = Daemon::start();
    let human = tfsd_at(&daemon, &["status"]);
    human.assert_success();
    assert_eq!(field(&human.stdout, "pid"), daemon.pid().to_string());
    assert!(field(&human.stdout, "warm pool").ends_with(" ready"));

    // The scheme is optional, and the flags may follow the subcommand.
    let address = format!("http://{}", daemon.address);
    let json = tfsd(&["status", "--json", "--address", &address]);
    let status = json.assert_success().json();
    assert_eq!(status["session_count"], 0);
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["address"], daemon.address.as_str());
    assert!(status["memory"]["rss_bytes"].as_u64().expect("rss") > 0);
    assert!(status["system"]["total_bytes"].as_u64().expect("total") > 0);
    assert_eq!(status["draining"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_show_and_every_reset_report_what_they_did() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create_labelled(&mut client).await;
    let id = session.session_id.as_str();
    let pid = session.worker_pid.to_string();
    run(&mut client, id, &[], &[], &["w_init", "v_init"])
        .await
        .expect("initialise the variables");

    let table = tfsd_at(&daemon, &["sessions"]);
    table.assert_success();
    let mut lines = table.stdout.lines();
    let header = lines.next().expect("header");
    assert!(header.starts_with("ID "), "{header}");
    assert!(header.contains("PRIVATE MiB"), "{header}");
    let row = lines.next().expect("one row");
    for fact in [id, "ready", pid.as_str(), "experiment=cli"] {
        assert!(row.contains(fact), "{fact} missing from: {row}");
    }
    let listed = tfsd_at(&daemon, &["sessions", "--json"]).json();
    assert_eq!(listed["sessions"][0]["session_id"], id);
    assert_eq!(listed["sessions"][0]["run_count"], 1);
    assert_eq!(listed["sessions"][0]["labels"]["experiment"], "cli");

    let shown = tfsd_at(&daemon, &["show", id]);
    shown.assert_success();
    assert_eq!(field(&shown.stdout, "session"), id);
    assert_eq!(field(&shown.stdout, "worker pid"), pid);
    assert!(field(&shown.stdout, "memory").contains(" MiB private, "));
    let shown = tfsd_at(&daemon, &["--json", "show", id]).json();
    assert_eq!(shown["session_id"], id);
    assert_eq!(shown["state"], "ready");
    assert_eq!(shown["worker_pid"], session.worker_pid);
    assert!(shown["memory"]["private_bytes"].as_u64().expect("private") > 0);

    // Recycle, keeping the variables: a new worker, and the values survive.
    let recycled = tfsd_at(&daemon, &["recycle", id, "--preserve-variables", "--json"]);
    let recycled = recycled.assert_success().json();
    assert_eq!(recycled["operation"], "recycle");
    assert_eq!(recycled["worker_pid_before"], session.worker_pid);
    assert_ne!(recycled["worker_pid_after"], recycled["worker_pid_before"]);
    assert_eq!(recycled["variables_preserved"], 2);
    assert!(recycled["memory_after"]["rss_bytes"].as_u64().expect("rss") > 0);
    assert_eq!(recycled["session"]["recycle_count"], 1);
    assert_eq!(fetch_f32(&mut client, id, "v_read").await, 5.0);

    let recycled = tfsd_at(&daemon, &["recycle", id, "--preserve-variables"]);
    recycled.assert_success();
    assert_before_after(&recycled.stdout, "recycled session");
    assert!(recycled.stdout.contains("variables preserved  2"));

    let purged = tfsd_at(&daemon, &["purge", id]);
    purged.assert_success();
    assert_before_after(&purged.stdout, "purged the variables of session");
    assert!(purged.stdout.contains("(same worker)"), "{}", purged.stdout);
    let purged = tfsd_at(&daemon, &["purge", "--json", id]).json();
    assert_eq!(purged["operation"], "purge");
    assert_eq!(purged["worker_pid_before"], purged["worker_pid_after"]);

    let reset = tfsd_at(&daemon, &["reset-graph", id]);
    reset.assert_success();
    assert_before_after(&reset.stdout, "reset the graph of session");
    let reset = tfsd_at(&daemon, &["reset-graph", id, "--json"]).json();
    assert_eq!(reset["operation"], "reset_graph");
    assert_eq!(reset["session"]["graph_reset_count"], 2);
}

/// The value of a "label  value" line of human output.
fn field(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(label)?;
            // The label must be whole: "worker pid" is not "worker pids".
            value.starts_with("  ").then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
}

/// A reset's human report names the reset, the pids and memory before → after.
fn assert_before_after(stdout: &str, headline: &str) {
    assert!(stdout.starts_with(headline), "{stdout}");
    assert!(stdout.contains("worker pid"), "{stdout}");
    for label in ["private memory", "RSS"] {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in: {stdout}"));
        assert!(
            line.contains(" MiB → ") && line.ends_with(" MiB)"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_then_show_is_not_found_with_exit_code_1() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    let id = session.session_id.as_str();

    let closed = tfsd_at(&daemon, &["close", id]);
    assert_eq!(
        closed.assert_success().stdout,
        format!("closed session {id}\n")
    );
    assert!(
        wait_for_exit(session.worker_pid, DEADLINE),
        "worker not gone"
    );

    for args in [
        vec!["show", id],
        vec!["--json", "purge", id],
        vec!["watch", id],
    ] {
        let missing = tfsd_at(&daemon, &args);
        assert_eq!(missing.code, 1, "{args:?}: {}", missing.stderr);
        assert!(
            missing.stderr.starts_with("error: NOT_FOUND: ") && missing.stderr.contains(id),
            "{args:?}: {}",
            missing.stderr
        );
        assert_eq!(missing.stdout, "", "{args:?}");
    }
}

#[test]
fn an_unreachable_daemon_is_exit_code_3_with_a_hint() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    drop(listener);
    for args in [vec!["status"], vec!["--json", "sessions"], vec!["watch"]] {
        let mut all = vec!["--address", address.as_str()];
        all.extend(args.iter().copied());
        let failed = tfsd(&all);
        assert_eq!(failed.code, 3, "{args:?}: {}", failed.stderr);
        assert!(
            failed
                .stderr
                .starts_with(&format!("error: cannot reach tfsd at {address}: ")),
            "{}",
            failed.stderr
        );
        assert!(failed.stderr.contains("scripts/serve"), "{}", failed.stderr);
        assert_eq!(failed.stdout, "");
    }
}

#[test]
fn usage_errors_are_exit_code_2() {
    for args in [
        vec!["--address", "localhost", "status"],
        vec!["show"],
        vec!["status", "--timeout", "soon"],
        vec!["no-such-command"],
    ] {
        let failed = tfsd(&args);
        assert_eq!(failed.code, 2, "{args:?}: {}", failed.stderr);
    }
    let help = tfsd(&["--help"]);
    assert!(help.stdout.contains("Exit codes:"), "{}", help.stdout);
}

#[test]
fn check_config_accepts_the_shipped_file_and_names_a_bad_key() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tfsd.toml");
    let checked = tfsd(&["check-config", "--config", shipped]);
    let human = checked.assert_success().stdout.clone();
    assert!(human.contains("is valid"), "{human}");
    let checked = tfsd(&["--json", "check-config", "--config", shipped]);
    let json = checked.assert_success().json();
    assert_eq!(json["valid"], true);
    assert_eq!(json["server"]["listen"], "127.0.0.1:50051");
    // Every table of the file is reported, in both forms, not only the first few.
    for (section, key) in [
        ("server", "listen"),
        ("metrics", "listen"),
        ("master", "listen"),
        ("workers", "pool_size"),
        ("python", "interpreter"),
        ("policy", "interval"),
        ("auth", "allow_unauthenticated"),
        ("tls", "cert"),
        ("limits", "max_message_size"),
        ("state", "dir"),
        ("log", "filter"),
    ] {
        let table = json[section]
            .as_object()
            .unwrap_or_else(|| panic!("no {section} in {json}"));
        assert!(table.contains_key(key), "{section}.{key} in {json}");
        assert!(
            human.contains(&format!("\n{section}.")),
            "{section} in {human}"
        );
    }
    let interpreter = json["python"]["interpreter"]
        .as_str()
        .expect("python is on");
    assert!(interpreter.ends_with(".venv/bin/python"), "{interpreter}");
    assert_eq!(json["policy"]["gentle_action"], "purge_variables");
    // The shipped file closes sessions idle for a day, as the built-in default does.
    assert_eq!(json["policy"]["idle"]["action"], "close");
    assert_eq!(json["policy"]["idle"]["timeout"], "1day");
    assert_eq!(json["state"]["dir"], Value::Null);

    let bad = std::env::temp_dir().join(format!("tfsd-cli-test-{}.toml", std::process::id()));
    std::fs::write(&bad, "[workers]\npool_sise = 2\n").expect("write the bad config");
    let path = bad.to_str().expect("utf-8 path");
    let rejected = tfsd(&["check-config", "--config", path]);
    let _ = std::fs::remove_file(&bad);
    assert_eq!(rejected.code, 1, "{}", rejected.stderr);
    assert!(rejected.stderr.contains("pool_sise"), "{}", rejected.stderr);
    assert_eq!(rejected.stdout, "");
}

/// A `tfsd watch` process whose stdout lines arrive on a channel, so the test can wait for
/// each with a deadline. It is told to stop (SIGINT, as Ctrl-C) by `interrupt`.
struct Watcher {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    /// Starts `tfsd ARGS` and returns once it says (on stderr) that it is subscribed: every
    /// event from then on reaches it.
    fn start(args: &[&str]) -> Watcher {
        let mut child = tfsd_command(args).spawn().expect("start tfsd watch");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (line_sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_sender.send(line).is_err() {
                    break;
                }
            }
        });
        let (ready_sender, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("tfsd watch: {line}");
                if line.starts_with("watching events of ") {
                    let _ = ready_sender.send(());
                }
            }
        });
        ready
            .recv_timeout(DEADLINE)
            .expect("tfsd watch did not say it is watching");
        Watcher { child, lines }
    }

    /// The next stdout line that contains `text`.
    fn line_with(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {text:?} from tfsd watch"));
            if line.contains(text) {
                return line;
            }
        }
    }

    /// The next JSON event of `kind`.
    fn event(&self, kind: &str) -> Value {
        loop {
            let line = self.line_with(kind);
            let event: Value = serde_json::from_str(&line).expect("one JSON object per line");
            if event["kind"] == kind {
                return event;
            }
        }
    }

    /// Ctrl-C: the watcher must stop and exit 0.
    fn interrupt(mut self) {
        signal(self.child.id(), libc::SIGINT);
        assert!(
            wait_for_exit(self.child.id(), DEADLINE),
            "watch ignored SIGINT"
        );
        let status = self.child.wait().expect("reap tfsd watch");
        assert_eq!(status.code(), Some(0), "{status}");
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // After a failed assertion: never leave a watcher running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_follows_events_as_json_lines_and_as_text() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let every = Watcher::start(&["--address", daemon.address.as_str(), "watch", "--json"]);

    let session = create(&mut client, model_graph()).await;
    let id = session.session_id.as_str();
    let created = every.event("created");
    assert_eq!(created["session_id"], id);
    assert_eq!(created["worker_pid"], session.worker_pid);
    assert!(created["at"].as_str().expect("at").ends_with('Z'));

    // A second watcher, on this session only, in human form.
    let one = Watcher::start(&["--address", daemon.address.as_str(), "watch", id]);
    client
        .purge_variables(api::PurgeVariablesRequest {
            session_id: id.to_string(),
        })
        .await
        .expect("purge");
    let purged = every.event("variables_purged");
    assert_eq!(purged["session_id"], id);
    assert!(
        purged["memory_before"]["private_bytes"].is_u64(),
        "{purged}"
    );
    let line = one.line_with("variables_purged");
    assert!(line.contains(id) && line.contains(&format!("pid {}", session.worker_pid)));
    assert!(line.contains("private ") && line.contains("→"), "{line}");

    client
        .close_session(api::CloseSessionRequest {
            session_id: id.to_string(),
        })
        .await
        .expect("close");
    assert_eq!(every.event("closed")["session_id"], id);
    assert!(one.line_with("closed").contains(id));

    every.interrupt();
    one.interrupt();
}

#[test]
fn health_exits_zero_only_when_serving() {
    let daemon = Daemon::start();
    // The warm worker may still be starting: NOT_SERVING (exit 1) until it is ready, then
    // SERVING (exit 0). Both answers are valid; anything else is not.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
            .args(["--address", &daemon.address, "--json", "health"])
            .output()
            .expect("run tfsd health");
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("json report");
        match output.status.code() {
            Some(0) => {
                assert_eq!(report["status"], "SERVING");
                assert_eq!(report["service"], "tfsd.v1.SessionService");
                break;
            }
            Some(1) => assert_eq!(report["status"], "NOT_SERVING"),
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "never SERVING");
    }
    let overall = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "health", "--service", ""])
        .output()
        .expect("run tfsd health");
    assert_eq!(overall.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&overall.stdout).contains("SERVING"));
}
