//! The operator's path with the real grpcurl (1.8.6, provisioned by
//! scripts/provision-grpcurl): no proto files, everything through server reflection.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

fn grpcurl_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/grpcurl/grpcurl");
    assert!(
        path.exists(),
        "{} is missing: run scripts/provision-grpcurl (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `grpcurl -plaintext [-d DATA] ADDRESS ARGS...` and returns stdout; fails the test on
/// a non-zero exit.
fn grpcurl(address: &str, data: Option<&str>, args: &[&str]) -> String {
    let mut command = Command::new(grpcurl_binary());
    command.arg("-plaintext");
    if let Some(data) = data {
        command.args(["-d", data]);
    }
    let output = command
        .arg(address)
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{error}: {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_drives_the_daemon_through_reflection() {
    let daemon = Daemon::start();
    let address = daemon.address.as_str();

    let services = grpcurl(address, None, &["list"]);
    for service in [
        "tfsd.v1.SessionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.lines().any(|line| line == service), "{services}");
    }
    // Each port lists what it serves, and nothing it would answer UNIMPLEMENTED.
    assert!(
        !services
            .lines()
            .any(|line| line == "tensorflow.MasterService"),
        "{services}"
    );
    let master = grpcurl(&daemon.master_address, None, &["list"]);
    assert!(
        master
            .lines()
            .any(|line| line == "tensorflow.MasterService"),
        "{master}"
    );
    assert!(
        !master.lines().any(|line| line == "tfsd.v1.SessionService"),
        "{master}"
    );
    let described = grpcurl(
        &daemon.master_address,
        None,
        &["describe", "tensorflow.MasterService"],
    );
    assert!(described.contains("rpc RunStep"), "{described}");
    let described = grpcurl(address, None, &["describe", "tfsd.v1.SessionService"]);
    for method in [
        "CreateSession",
        "RecycleSession",
        "WatchEvents",
        "GetDaemonStatus",
    ] {
        assert!(described.contains(&format!("rpc {method}")), "{described}");
    }
    let described = grpcurl(address, None, &["describe", "tfsd.v1.RunRequest"]);
    assert!(described.contains("tensorflow.TensorProto"), "{described}");

    // A session created by a client, as in real life.
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    let id = session.session_id.as_str();
    run(&mut client, id, &[], &[], &["w_init", "v_init"])
        .await
        .expect("init");

    // Follow events from grpcurl while the operator acts.
    let mut watcher = Command::new(grpcurl_binary())
        .args([
            "-plaintext",
            "-v",
            "-d",
            &format!("{{\"session_id\": \"{id}\"}}"),
        ])
        .args([address, "tfsd.v1.SessionService/WatchEvents"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("grpcurl watch");
    let stdout = watcher.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // The daemon subscribes the stream before it answers with headers; grpcurl -v prints
    // them. From then on no event can be missed.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = received.recv_timeout(left).expect("grpcurl subscribed");
        if line.contains("Response headers received") {
            break;
        }
    }
    let status = json(&grpcurl(
        address,
        Some("{}"),
        &["tfsd.v1.SessionService/GetDaemonStatus"],
    ));
    assert_eq!(status["sessionCount"], 1);

    let listed = json(&grpcurl(
        address,
        Some("{}"),
        &["tfsd.v1.SessionService/ListSessions"],
    ));
    assert_eq!(listed["sessions"][0]["sessionId"], id);

    let request = format!("{{\"session_id\": \"{id}\"}}");
    let reset = json(&grpcurl(
        address,
        Some(&request),
        &["tfsd.v1.SessionService/PurgeVariables"],
    ));
    assert!(reset["memoryAfter"]["privateBytes"].is_string(), "{reset}");
    let reset = json(&grpcurl(
        address,
        Some(&request),
        &["tfsd.v1.SessionService/ResetGraph"],
    ));
    assert_eq!(reset["session"]["graphResetCount"], "1");
    let recycle = format!("{{\"session_id\": \"{id}\", \"preserve_variables\": true}}");
    let recycled = json(&grpcurl(
        address,
        Some(&recycle),
        &["tfsd.v1.SessionService/RecycleSession"],
    ));
    assert_ne!(recycled["workerPidAfter"], recycled["workerPidBefore"]);
    grpcurl(
        address,
        Some(&request),
        &["tfsd.v1.SessionService/CloseSession"],
    );

    // The watcher saw the operator's actions, in order, ending with the close.
    let mut kinds = Vec::new();
    while !kinds
        .iter()
        .any(|kind: &String| kind == "EVENT_KIND_CLOSED")
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = received.recv_timeout(left).expect("events from grpcurl");
        if let Some(kind) = line.trim().strip_prefix("\"kind\": \"") {
            kinds.push(kind.trim_end_matches(['"', ',']).to_string());
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(
        kinds,
        [
            "EVENT_KIND_VARIABLES_PURGED",
            "EVENT_KIND_GRAPH_RESET",
            "EVENT_KIND_RECYCLED",
            "EVENT_KIND_CLOSED"
        ]
    );

    let health = json(&grpcurl(
        address,
        Some("{\"service\": \"tfsd.v1.SessionService\"}"),
        &["grpc.health.v1.Health/Check"],
    ));
    assert_eq!(health["status"], "SERVING");
    let overall = json(&grpcurl(
        address,
        Some("{}"),
        &["grpc.health.v1.Health/Check"],
    ));
    assert_eq!(overall["status"], "SERVING");
}
