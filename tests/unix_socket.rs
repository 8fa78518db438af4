//! tfsd.v1 on the Unix socket (`server.unix_socket`): the real daemon, real clients (tonic
//! over `unix:PATH`, the `tfsd` CLI, also as other uids), the socket file's mode, group and
//! life, and peer credentials mapped to principals (`[[auth.peers]]`).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;
use sha2::Digest;
use tensorflow::{DataType, Graph};
use tfsd::proto::tensorflow::TensorProto;
use tfsd::proto::tfsd::v1 as api;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A user with no entry in our config and no access to anything of root's (the classic
/// `nobody`), and two more uids the tests map; none needs a passwd entry to connect.
const STRANGER_UID: u32 = 65534;
const TRAINER_UID: u32 = 65533;
const OTHER_UID: u32 = 65532;

/// `x` (float placeholder) → `y` (Identity): what is fed comes back as it is.
fn identity_graph() -> Vec<u8> {
    let mut graph = Graph::new();
    let x = placeholder(&mut graph, "x", DataType::Float);
    add_op(&mut graph, "Identity", "y", &[&x], |_| {});
    graph.graph_def().expect("graph_def")
}

/// 64 MiB of float32 whose bit patterns all differ from their neighbours: every value
/// finite (the exponent's top bit is cleared), denormals and negatives included.
fn big_tensor() -> (TensorProto, Vec<u8>) {
    const ELEMENTS: usize = 16 << 20;
    let mut bytes = Vec::with_capacity(ELEMENTS * 4);
    for index in 0..ELEMENTS as u32 {
        let bits = index.wrapping_mul(0x9E37_79B1) & 0xBFFF_FFFF;
        bytes.extend_from_slice(&bits.to_le_bytes());
    }
    let tensor = TensorProto {
        dtype: 1,
        tensor_shape: shape(&[ELEMENTS as i64]),
        tensor_content: content(&bytes),
        ..TensorProto::default()
    };
    (tensor, bytes)
}

async fn connect(address: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .expect("address")
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
    Client::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// Waits (with a deadline) until health says tfsd.v1 is SERVING at `address`.
async fn wait_serving(address: &str) {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .expect("address")
        .connect()
        .await
        .expect("connect for health");
    let mut health = HealthClient::new(channel);
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: "tfsd.v1.SessionService".to_string(),
        })
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let status = statuses
                .message()
                .await
                .expect("health stream")
                .expect("health stream ended");
            if status.status == 1 {
                return;
            }
        }
    })
    .await
    .expect("tfsd.v1 never SERVING over the socket");
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the `tfsd` CLI binary to completion (killed at `DEADLINE`), as `uid` when given.
fn cli(uid: Option<u32>, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tfsd"));
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        // std drops root's supplementary groups when it switches uid.
        command.uid(uid).gid(uid);
    }
    let child = command.spawn().expect("start the tfsd CLI");
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
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
    }
}

/// `tfsd serve` with `config`, expected to refuse to start: its exit code and log.
fn refused_start(config: &str) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config", config])
        .env("TFSD_METRICS_LISTEN", "127.0.0.1:0")
        .env("TFSD_MASTER_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tfsd");
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait for tfsd"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("tfsd did not refuse to start with {config}");
        }
    };
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
    }
}

/// `grpcurl -plaintext -unix -authority localhost ARGS... SOCKET` (ARGS may hold `-d DATA`
/// and end with the method); fails the test on a non-zero exit.
fn grpcurl_over(socket: &Path, args: &[&str]) -> String {
    let grpcurl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/grpcurl/grpcurl");
    assert!(
        grpcurl.exists(),
        "{} is missing: run scripts/provision-grpcurl (scripts/test does)",
        grpcurl.display()
    );
    let (flags, method) = args.split_at(args.len() - 1);
    let output = Command::new(grpcurl)
        .args(["-plaintext", "-unix", "-authority", "localhost"])
        .args(flags)
        .arg(socket)
        .args(method)
        .output()
        .expect("run grpcurl");
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn socket_config(socket: &Path, extra: &str) -> String {
    format!("[server]\nunix_socket = {:?}\n{extra}", socket.display())
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

#[tokio::test(flavor = "multi_thread")]
async fn tfsd_v1_works_over_the_socket_with_its_mode_and_group() {
    let dir = TempDir::new("uds");
    let socket: PathBuf = dir.0.join("tfsd.sock");
    let text = socket_config(
        &socket,
        "unix_socket_mode = \"0640\"\nunix_socket_group = \"daemon\"\n",
    );
    let group = tfsd::config::Config::parse(&text, &dir.0)
        .expect("valid")
        .unix_socket
        .expect("on")
        .group
        .expect("group");
    let mut daemon = Daemon::start_with(&["--config", &dir.config(&text)]);
    let address = format!("unix:{}", socket.display());
    assert_eq!(daemon.unix_socket, address);

    let metadata = std::fs::symlink_metadata(&socket).expect("the socket file");
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o7777, 0o640);
    assert_eq!(metadata.gid(), group.gid);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(metadata.uid(), unsafe { libc::geteuid() });
    // Nothing left of the temporary name the socket was bound under.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    wait_serving(&address).await;
    let mut client = connect(&address).await;
    let session = create(&mut client, identity_graph()).await;
    assert_eq!(
        session.owner, "",
        "no [auth]: the anonymous caller, as on TCP"
    );
    let (tensor, bytes) = big_tensor();
    let outputs = run(
        &mut client,
        &session.session_id,
        &[("x", tensor)],
        &["y"],
        &[],
    )
    .await
    .expect("64 MiB through Identity over the socket");
    let fetched = &outputs[0];
    assert_eq!(fetched.dtype, 1);
    assert_eq!(fetched.tensor_shape, shape(&[(bytes.len() / 4) as i64]));
    assert_eq!(fetched.tensor_content.len(), bytes.len());
    assert!(
        fetched.tensor_content[..] == bytes[..],
        "the fetched tensor differs from the fed one"
    );

    // The CLI takes the same address, and sees the same daemon as TCP does.
    let listed = cli(None, &["--address", &address, "--json", "sessions"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(
        listed.stdout.contains(&session.session_id),
        "{}",
        listed.stdout
    );
    let health = cli(None, &["--address", &address, "health"]);
    assert_eq!(health.code, 0, "{}{}", health.stdout, health.stderr);
    // grpcurl, through reflection on the socket, with the authority README.md tells it to send.
    let services = grpcurl_over(&socket, &["list"]);
    for service in ["tfsd.v1.SessionService", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|line| line == service), "{services}");
    }
    let listed = grpcurl_over(
        &socket,
        &["-d", "{}", "tfsd.v1.SessionService/ListSessions"],
    );
    assert!(listed.contains(&session.session_id), "{listed}");
    let mut tcp = daemon.client().await;
    let over_tcp = tcp
        .get_session(api::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("the same session over TCP")
        .into_inner();
    assert_eq!(over_tcp.run_count, 1);

    assert_eq!(daemon.stop(), 0);
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket file is removed at exit"
    );
    let gone = cli(None, &["--address", &address, "health"]);
    assert_eq!(gone.code, 3, "unreachable once stopped: {}", gone.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_socket_is_replaced_and_a_live_one_or_a_file_refused() {
    let dir = TempDir::new("uds-stale");
    let socket = dir.0.join("tfsd.sock");
    // A killed daemon's socket: the file stays, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(is_socket(&socket));
    let refused = std::os::unix::net::UnixStream::connect(&socket).expect_err("stale");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let config = dir.config(&socket_config(&socket, ""));
    let mut daemon = Daemon::start_with(&["--config", &config]);
    let address = format!("unix:{}", socket.display());
    wait_serving(&address).await;
    let health = cli(None, &["--address", &address, "health"]);
    assert_eq!(
        health.code, 0,
        "the stale socket was replaced: {}",
        health.stderr
    );

    // A second daemon on the same path is refused, and the first keeps its socket.
    let second = refused_start(&config);
    assert_ne!(second.code, 0);
    assert!(
        second.stderr.contains("another process")
            && second.stderr.contains(&socket.display().to_string()),
        "{}",
        second.stderr
    );
    assert!(
        !second.stdout.contains("tfsd listening on"),
        "{}",
        second.stdout
    );
    let health = cli(None, &["--address", &address, "health"]);
    assert_eq!(
        health.code, 0,
        "the first daemon still serves: {}",
        health.stderr
    );

    // Something that is not a socket is never replaced.
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("file");
    let other = TempDir::new("uds-file");
    let refused = refused_start(&other.config(&socket_config(&file, "")));
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("is a regular file, not a socket"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read_to_string(&file).expect("file"), "keep me");

    assert_eq!(daemon.stop(), 0);
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_uids_map_to_principals_and_strangers_are_refused() {
    let dir = TempDir::new("uds-peers");
    // Other uids must reach the socket and read the token file the test writes for them.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.0.join("tfsd.sock");
    let token = "trainer-token-0123456789abcdef";
    let token_file = dir.0.join("trainer.token");
    std::fs::write(&token_file, token).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let text = socket_config(
        &socket,
        &format!(
            "unix_socket_mode = \"0666\"\n\
             [[auth.tokens]]\nprincipal = \"trainer\"\nsha256 = \"{digest}\"\n\
             [[auth.peers]]\nuser = \"root\"\nprincipal = \"admin\"\nrole = \"operator\"\n\
             [[auth.peers]]\nuid = {TRAINER_UID}\nprincipal = \"trainer\"\n\
             [[auth.peers]]\nuid = {OTHER_UID}\nprincipal = \"other\"\n"
        ),
    );
    let daemon = Daemon::start_with(&["--config", &dir.config(&text)]);
    let address = format!("unix:{}", socket.display());

    // On TCP the peer's uid means nothing: root without a token is refused there.
    let mut tcp = daemon.client().await;
    let status = tcp
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect_err("no token on TCP");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // On the socket root is `admin`, an operator, without any token.
    let mut admin = connect(&address).await;
    let admins = admin
        .create_session(api::CreateSessionRequest {
            graph_def: identity_graph(),
            ..Default::default()
        })
        .await
        .expect("root maps to admin")
        .into_inner()
        .session
        .expect("info");
    assert_eq!(admins.owner, "admin");
    // A session of `trainer`'s, made with trainer's token over TCP.
    let mut bearer = tonic::Request::new(api::CreateSessionRequest {
        graph_def: identity_graph(),
        ..Default::default()
    });
    bearer.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let trainers = tcp
        .create_session(bearer)
        .await
        .expect("the token works on TCP")
        .into_inner()
        .session
        .expect("info");
    assert_eq!(trainers.owner, "trainer");

    // The real CLI as uid TRAINER_UID: no token, mapped to `trainer`, a client: it sees
    // trainer's session and not admin's.
    let as_trainer = cli(
        Some(TRAINER_UID),
        &["--address", &address, "--json", "sessions"],
    );
    assert_eq!(as_trainer.code, 0, "{}", as_trainer.stderr);
    assert!(
        as_trainer.stdout.contains(&trainers.session_id),
        "{}",
        as_trainer.stdout
    );
    assert!(
        !as_trainer.stdout.contains(&admins.session_id),
        "{}",
        as_trainer.stdout
    );
    // As OTHER_UID: another principal, who sees neither.
    let as_other = cli(
        Some(OTHER_UID),
        &["--address", &address, "--json", "sessions"],
    );
    assert_eq!(as_other.code, 0, "{}", as_other.stderr);
    assert!(
        !as_other.stdout.contains(&trainers.session_id),
        "{}",
        as_other.stdout
    );
    let show = cli(
        Some(OTHER_UID),
        &["--address", &address, "show", &trainers.session_id],
    );
    assert_eq!(show.code, 1, "{}", show.stderr);
    assert!(show.stderr.contains("NOT_FOUND"), "{}", show.stderr);

    // A uid nobody mapped is refused, saying which uid and what to do.
    let stranger = cli(Some(STRANGER_UID), &["--address", &address, "sessions"]);
    assert_eq!(stranger.code, 1, "{}", stranger.stderr);
    assert!(
        stranger.stderr.contains("UNAUTHENTICATED")
            && stranger.stderr.contains(&format!("uid {STRANGER_UID}")),
        "{}",
        stranger.stderr
    );
    // ... unless it sends a token, which works over the socket too.
    let token_path = token_file.display().to_string();
    let with_token = cli(
        Some(STRANGER_UID),
        &[
            "--address",
            &address,
            "--token-file",
            &token_path,
            "--json",
            "sessions",
        ],
    );
    assert_eq!(with_token.code, 0, "{}", with_token.stderr);
    assert!(
        with_token.stdout.contains(&trainers.session_id),
        "{}",
        with_token.stdout
    );
    // A mapped uid with a wrong token is refused: the token decides when there is one.
    let wrong = dir.0.join("wrong.token");
    std::fs::write(&wrong, "not-the-token-0123456789").expect("token");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let wrong_path = wrong.display().to_string();
    let refused = cli(
        Some(TRAINER_UID),
        &[
            "--address",
            &address,
            "--token-file",
            &wrong_path,
            "sessions",
        ],
    );
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("UNAUTHENTICATED"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_drains_with_the_daemon() {
    let dir = TempDir::new("uds-drain");
    let socket = dir.0.join("tfsd.sock");
    let config = dir.config(&socket_config(&socket, "drain_timeout = \"2s\"\n"));
    let mut daemon = Daemon::start_with(&["--config", &config]);
    let address = format!("unix:{}", socket.display());
    let mut client = connect(&address).await;
    let session = create(&mut client, model_graph()).await;
    // A step that blocks until the drain's deadline kills its worker.
    let mut stepper = client.clone();
    let id = session.session_id.clone();
    let step = tokio::spawn(async move { run(&mut stepper, &id, &[], &[], &["dequeue"]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;

    signal(daemon.pid(), libc::SIGTERM);
    // During the drain the socket still accepts, and answers as shutting down.
    let refused = tokio::time::timeout(DEADLINE, async {
        loop {
            let lookup = api::GetSessionRequest {
                session_id: session.session_id.clone(),
            };
            match client.get_session(lookup).await {
                Err(status) if status.code() == tonic::Code::Unavailable => return status,
                Err(status) => panic!("during the drain: {status:?}"),
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("never refused during the drain");
    assert!(
        refused.message().contains("shutting down"),
        "{}",
        refused.message()
    );
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(address.clone())
            .expect("address")
            .connect()
            .await
            .expect("connect for health during the drain"),
    );
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health during the drain")
        .into_inner();
    assert_eq!(status.status, 2, "NOT_SERVING while draining");

    let stepped = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("the step in flight ended")
        .expect("step task");
    let status = stepped.expect_err("killed at the drain's deadline");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(daemon.wait_exit(), 0);
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_still_removes_the_socket() {
    let dir = TempDir::new("uds-forced");
    let socket = dir.0.join("tfsd.sock");
    let config = dir.config(&socket_config(&socket, "drain_timeout = \"60s\"\n"));
    let mut daemon = Daemon::start_with(&["--config", &config]);
    let address = format!("unix:{}", socket.display());
    let mut client = connect(&address).await;
    let session = create(&mut client, model_graph()).await;
    // A step that holds the drain until the second signal.
    let mut stepper = client.clone();
    let id = session.session_id.clone();
    let _step = tokio::spawn(async move { run(&mut stepper, &id, &[], &[], &["dequeue"]).await });
    wait_for_runs_in_flight(&mut client, &session.session_id, 1).await;
    signal(daemon.pid(), libc::SIGTERM);
    tokio::time::timeout(DEADLINE, async {
        loop {
            let lookup = api::GetSessionRequest {
                session_id: session.session_id.clone(),
            };
            if let Err(status) = client.get_session(lookup).await {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the drain never started");
    assert!(is_socket(&socket), "the socket stays while the drain runs");
    signal(daemon.pid(), libc::SIGTERM);
    assert_eq!(daemon.wait_exit(), 130, "the second signal's exit");
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket file is removed on the second signal's exit too"
    );
}
