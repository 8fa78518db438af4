//! Authentication, ownership, TLS, exposure and limits, with the real daemon: bearer tokens
//! and client certificates map to principals; clients see only their own sessions (another
//! principal's answers NOT_FOUND, exactly like a missing one); operators see all; every
//! action is attributed; non-loopback without auth refuses to start.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tfsd::proto::tfsd::v1 as api;
use tfsd::proto::tfsd::v1::session_service_client::SessionServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ALICE: &str = "alice-secret-token-0001";
const BOB: &str = "bob-secret-token-0002";
const OPS: &str = "ops-secret-token-0003";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-security-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("tfsd.toml");
    std::fs::write(&path, text).expect("config");
    path.to_string_lossy().to_string()
}

/// Writes a token file only its owner can read, as tfsd requires.
fn write_token_file(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{token}\n")).expect("token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Tokens: alice and bob are clients (alice's token from a file), ops is an operator.
fn token_config(dir: &Path, extra: &str) -> String {
    write_token_file(&dir.join("alice.token"), ALICE);
    write_config(
        dir,
        &format!(
            "[[auth.tokens]]\nprincipal = \"alice\"\nfile = \"alice.token\"\n\
             [[auth.tokens]]\nprincipal = \"bob\"\nsha256 = \"{}\"\n\
             [[auth.tokens]]\nprincipal = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n{extra}",
            sha256_hex(BOB.as_bytes()),
            sha256_hex(OPS.as_bytes())
        ),
    )
}

/// Adds the bearer token (if any) to every call.
type AddToken =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type AuthedClient = SessionServiceClient<InterceptedService<Channel, AddToken>>;

async fn client_with_token(address: &str, token: Option<&'static str>) -> AuthedClient {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let add_token: AddToken = Box::new(move |mut request: tonic::Request<()>| {
        if let Some(token) = token {
            let value = MetadataValue::try_from(format!("Bearer {token}")).expect("header");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    });
    SessionServiceClient::with_interceptor(channel, add_token)
}

async fn create_as(client: &mut AuthedClient) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session")
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_see_only_their_own_sessions_and_operators_see_all() {
    let dir = temp_dir("tokens");
    let config = token_config(&dir, "");
    let daemon = Daemon::start_with(&["--config", &config]);
    let mut alice = client_with_token(&daemon.address, Some(ALICE)).await;
    let mut bob = client_with_token(&daemon.address, Some(BOB)).await;
    let mut ops = client_with_token(&daemon.address, Some(OPS)).await;

    let session = create_as(&mut alice).await;
    let id = session.session_id.clone();
    assert_eq!(session.owner, "alice");
    let bobs = create_as(&mut bob).await;

    // Bob cannot tell alice's session from one that does not exist.
    let missing = bob
        .get_session(api::GetSessionRequest {
            session_id: "s-does-not-exist".into(),
        })
        .await
        .expect_err("missing");
    let hidden = bob
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect_err("not his");
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(
        hidden.message().replace(&id, "ID"),
        missing.message().replace("s-does-not-exist", "ID")
    );
    for status in [
        bob.run(run_request(&id, &[], &[], &["w_init"]))
            .await
            .expect_err("run"),
        bob.purge_variables(api::PurgeVariablesRequest {
            session_id: id.clone(),
        })
        .await
        .expect_err("purge"),
        bob.close_session(api::CloseSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect_err("close"),
        bob.watch_events(api::WatchEventsRequest {
            session_id: id.clone(),
        })
        .await
        .expect_err("watch"),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let listed = bob
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(
        listed
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        [bobs.session_id.as_str()]
    );

    // Bob's event stream carries his sessions' events, never alice's.
    let mut bob_events = bob
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // The operator sees everything and acts on alice's session; the action is attributed.
    let mut all_events = ops
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let listed = ops
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 2);
    ops.recycle_session(api::RecycleSessionRequest {
        session_id: id.clone(),
        preserve_variables: false,
    })
    .await
    .expect("operator recycles alice's session");
    let recycled = next_event(&mut all_events, api::EventKind::Recycled).await;
    assert_eq!(recycled.session_id, id);
    assert_eq!(recycled.actor, "ops");
    bob.purge_variables(api::PurgeVariablesRequest {
        session_id: bobs.session_id.clone(),
    })
    .await
    .expect("bob purges his own");
    // The first event bob sees is his own purge: alice's recycle came before it and was
    // not delivered to him.
    let first = tokio::time::timeout(DEADLINE, bob_events.message())
        .await
        .expect("an event")
        .expect("stream")
        .expect("event");
    assert_eq!(first.session_id, bobs.session_id);
    assert_eq!(first.actor, "bob");

    // Alice still has her session.
    alice
        .run(run_request(&id, &[], &[], &["w_init"]))
        .await
        .expect("alice runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_valid_credentials_are_unauthenticated_but_health_answers() {
    let dir = temp_dir("unauthenticated");
    let config = token_config(&dir, "");
    let daemon = Daemon::start_with(&["--config", &config]);
    for token in [None, Some("not-a-token-we-know")] {
        let mut client = client_with_token(&daemon.address, token).await;
        let status = client
            .list_sessions(api::ListSessionsRequest {})
            .await
            .expect_err("no valid credential");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // Probes need no credentials.
    let channel = Channel::from_shared(format!("http://{}", daemon.address))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token");
}

#[test]
fn a_non_loopback_address_without_auth_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env("TFSD_METRICS_LISTEN", "")
        .output()
        .expect("run tfsd");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(stderr.contains("auth.allow_unauthenticated"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "nothing may be bound"
    );
}

/// A token file group or others could read is no secret: the daemon refuses to start, naming
/// the file, its mode and the fix; once only its owner can read it, the daemon starts.
#[test]
fn a_token_file_others_can_read_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("token-mode");
    let token_file = dir.join("alice.token");
    std::fs::write(&token_file, format!("{ALICE}\n")).expect("token file");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = write_config(
        &dir,
        "[[auth.tokens]]\nprincipal = \"alice\"\nfile = \"alice.token\"\n",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["serve", "--config", &config, "--listen", "127.0.0.1:0"])
        .env("TFSD_METRICS_LISTEN", "")
        .env("TFSD_MASTER_LISTEN", "")
        .output()
        .expect("run tfsd");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let path = token_file.display().to_string();
    assert!(stderr.contains("auth.tokens[0].file"), "{stderr}");
    assert!(stderr.contains("mode 0644"), "{stderr}");
    assert!(stderr.contains(&format!("chmod 600 {path}")), "{stderr}");
    assert!(
        !stderr.contains(ALICE),
        "the token is never printed: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "nothing may be bound"
    );

    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut daemon = Daemon::start_with(&["--config", &config]);
    assert_eq!(daemon.stop(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn allowing_unauthenticated_exposure_warns_loudly() {
    let dir = temp_dir("exposed");
    let config = write_config(&dir, "[auth]\nallow_unauthenticated = true\n");
    let (mut daemon, log) =
        Daemon::start_capturing_log_with(&["--config", &config, "--listen", "0.0.0.0:0"], &[]);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log.recv_timeout(left).expect("the warning");
        if line.contains("WITHOUT AUTHENTICATION") {
            break;
        }
    }
    assert_eq!(daemon.stop(), 0);
}

/// A CA, a server certificate for localhost signed by it, and a client certificate.
struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    client_cert_der: Vec<u8>,
}

fn make_pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let server_params =
        CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .expect("server cert");

    let client_key = KeyPair::generate().expect("client key");
    let client_params = CertificateParams::new(vec!["trainer".to_string()]).expect("client params");
    let client_cert = client_params
        .signed_by(&client_key, &issuer)
        .expect("client cert");
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        client_cert_der: client_cert.der().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_client_certificates_and_tokens() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let dir = temp_dir("tls");
    let pki = make_pki();
    for (name, text) in [
        ("ca.pem", &pki.ca_pem),
        ("server.pem", &pki.server_cert_pem),
        ("server.key", &pki.server_key_pem),
    ] {
        std::fs::write(dir.join(name), text).expect("pem");
    }
    let config = write_config(
        &dir,
        &format!(
            "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [[auth.certificates]]\nprincipal = \"trainer\"\nsha256 = \"{}\"\n\
             [[auth.tokens]]\nprincipal = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha256_hex(&pki.client_cert_der),
            sha256_hex(OPS.as_bytes())
        ),
    );
    let daemon = Daemon::start_with(&["--config", &config]);
    let port = daemon.address.rsplit(':').next().expect("port");
    let tls = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .domain_name("localhost")
    };

    // A client certificate is the credential: the session belongs to "trainer".
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .expect("address")
        .tls_config(tls().identity(Identity::from_pem(
            &pki.client_cert_pem,
            &pki.client_key_pem,
        )))
        .expect("tls")
        .connect()
        .await
        .expect("mTLS connect");
    let mut trainer = SessionServiceClient::new(channel);
    let session = trainer
        .create_session(api::CreateSessionRequest::default())
        .await
        .expect("create over mTLS")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(session.owner, "trainer");

    // Without a client certificate, over TLS, a token works too.
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .expect("address")
        .tls_config(tls())
        .expect("tls")
        .connect()
        .await
        .expect("TLS connect");
    let mut anonymous = SessionServiceClient::new(channel.clone());
    let status = anonymous
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect_err("no credential");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut ops =
        SessionServiceClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
            let value = MetadataValue::try_from(format!("Bearer {OPS}")).expect("header");
            request.metadata_mut().insert("authorization", value);
            Ok(request)
        });
    let listed = ops
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("operator over TLS")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);

    // Plaintext is refused by the TLS listener.
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("address")
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let status = SessionServiceClient::new(channel)
            .list_sessions(api::ListSessionsRequest {})
            .await
            .expect_err("plaintext on a TLS port");
        assert_ne!(status.code(), Code::Ok);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_answer_with_clear_errors() {
    let dir = temp_dir("limits");
    let config = token_config(
        &dir,
        "[limits]\nmax_sessions = 3\nmax_sessions_per_principal = 2\n\
         max_graph_def_size = \"64KiB\"\nmax_feed_elements = 100\n\
         max_concurrent_runs_per_session = 1\nmax_run_timeout = \"2s\"\n",
    );
    let daemon = Daemon::start_with(&["--config", &config]);
    let mut alice = client_with_token(&daemon.address, Some(ALICE)).await;
    let mut bob = client_with_token(&daemon.address, Some(BOB)).await;

    let id = create_as(&mut alice).await.session_id;
    create_as(&mut alice).await;
    let status = alice
        .create_session(api::CreateSessionRequest::default())
        .await
        .expect_err("third for alice");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_sessions_per_principal"),
        "{status:?}"
    );
    create_as(&mut bob).await;
    let status = bob
        .create_session(api::CreateSessionRequest::default())
        .await
        .expect_err("fourth overall");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.max_sessions"),
        "{status:?}"
    );

    let status = alice
        .extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: vec![0; 100 << 10],
            current_graph_version: 0,
        })
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_graph_def_size"),
        "{status:?}"
    );

    let mut big = scalar(0.0);
    big.float_val.clear();
    big.tensor_shape = shape(&[1000]);
    let status = alice
        .run(run_request(&id, &[("x", big)], &["y"], &[]))
        .await
        .expect_err("too many elements");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_feed_elements"), "{status:?}");

    // The run-timeout ceiling applies to a run that set none: the blocked dequeue ends.
    let status = alice
        .run(run_request(&id, &[], &["dequeue"], &[]))
        .await
        .expect_err("ceiling");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // One run at a time on a session: a second concurrent one is refused.
    let mut blocked_client = client_with_token(&daemon.address, Some(ALICE)).await;
    let blocked_id = id.clone();
    let mut request = run_request(&blocked_id, &[], &["dequeue"], &[]);
    request.timeout_ms = 5_000;
    let blocked = tokio::spawn(async move { blocked_client.run(request).await });
    let info = loop {
        let info = alice
            .get_session(api::GetSessionRequest {
                session_id: id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if info.runs_in_flight == 1 {
            break info;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(info.runs_in_flight, 1);
    let status = alice
        .run(run_request(&id, &[], &[], &["w_init"]))
        .await
        .expect_err("second concurrent run");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_concurrent_runs_per_session"),
        "{status:?}"
    );
    let _ = blocked.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_over_max_message_size_is_refused_by_name() {
    let dir = temp_dir("message-size");
    let config = write_config(&dir, "[limits]\nmax_message_size = \"1MiB\"\n");
    let daemon = Daemon::start_with(&["--config", &config]);
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    // `fill`: a float vector of 512 Ki elements (2 MiB) from the fed `value`.
    let mut graph = tensorflow::Graph::new();
    add_big_variable(&mut graph, 512 << 10);
    client
        .extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: graph.graph_def().expect("graph_def"),
            current_graph_version: 0,
        })
        .await
        .expect("extend");

    // An answer over the limit names it, with RESOURCE_EXHAUSTED rather than tonic's
    // encoder's OUT_OF_RANGE.
    let status = run(&mut client, &id, &[("value", scalar(1.0))], &["fill"], &[])
        .await
        .expect_err("a 2 MiB answer");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_message_size"),
        "{status:?}"
    );
    // A request over it is refused by tonic's decoder before any handler runs, as before.
    let mut huge = scalar(0.0);
    huge.float_val.clear();
    huge.tensor_shape = shape(&[512 << 10]);
    huge.tensor_content = content(&vec![0; 2 << 20]);
    let status = run(&mut client, &id, &[("x", huge)], &["y"], &[])
        .await
        .expect_err("a 2 MiB request");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1048576"), "{status:?}");

    // The session goes on working with answers within the limit.
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    let outputs = run(&mut client, &id, &[("x", scalar(2.0))], &["y"], &[])
        .await
        .expect("a small step");
    assert_eq!(as_f32(&outputs[0]), 6.0);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The operator CLI authenticates with `--token-file` (or `TFSD_TOKEN_FILE`); without it a
/// daemon that requires tokens answers UNAUTHENTICATED, exit 1 (found by the deploy tests:
/// every shipped deployment needs a token, and the CLI could not send one).
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_authenticates_with_a_token_file() {
    let dir = temp_dir("cli-token");
    let config = token_config(&dir, "");
    let daemon = Daemon::start_with(&["--config", &config]);
    let token_file = dir.join("ops.token");
    std::fs::write(&token_file, format!("  {OPS}\n")).expect("token file");
    let tfsd = |extra: &[&str], env: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tfsd"));
        command
            .args(["--address", &daemon.address])
            .args(extra)
            .env_remove("TFSD_TOKEN_FILE");
        if let Some(path) = env {
            command.env("TFSD_TOKEN_FILE", path);
        }
        command.output().expect("run tfsd")
    };
    let refused = tfsd(&["sessions"], None);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"),
        "{refused:?}"
    );
    let path = token_file.to_str().expect("path");
    let listed = tfsd(&["--token-file", path, "sessions"], None);
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let listed = tfsd(&["sessions"], Some(&token_file));
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let missing = tfsd(&["--token-file", "/nonexistent/token", "sessions"], None);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot use the token file"),
        "{missing:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
