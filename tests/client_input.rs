//! What one client sends must not break the daemon for others, nor take the machine: ids,
//! names and labels are bounded and never echoed whole into an error, labels under `tfsd.`
//! are the daemon's, a feed cannot declare more than `limits.max_feed_size`, and a session
//! gets a hard memory limit derived from the machine without any config. Each test is what an
//! attacker (or an unlucky client) did, through the real daemon and real clients.

mod common;

use common::*;
use tfsd::proto::tensorflow as tf;
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;
use tonic::transport::Channel;

type Master = tf::master_service_client::MasterServiceClient<Channel>;

async fn master(daemon: &Daemon) -> Master {
    let channel = Channel::from_shared(format!("http://{}", daemon.master_address))
        .expect("address")
        .connect()
        .await
        .expect("connect to the MasterService");
    Master::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A tfsd.v1 client with tonic's (and grpcio's) default 4 MiB limit on what it receives, as
/// the CLI and a default Python client have.
async fn default_client(daemon: &Daemon) -> Client {
    let channel = Channel::from_shared(format!("http://{}", daemon.address))
        .expect("address")
        .connect()
        .await
        .expect("connect to tfsd");
    Client::new(channel)
}

/// An error the daemon chose: its code, and a message short enough for any client's
/// metadata limit that says how long the echoed input was.
fn assert_bounded(status: &tonic::Status, code: Code, length: usize) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().len() < 1024,
        "{} bytes: {}…",
        status.message().len(),
        &status.message()[..200]
    );
    assert!(
        status.message().contains(&format!("{length} bytes")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_ids_and_names_get_their_real_error_not_a_transport_error() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;

    // A 16 MiB session id: its NOT_FOUND quoted it whole, past gRPC's metadata limit.
    let id = "s".repeat(16 << 20);
    let status = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect_err("no such session");
    assert_bounded(&status, Code::InvalidArgument, id.len());
    let status = client
        .close_session(api::CloseSessionRequest { session_id: id })
        .await
        .expect_err("no such session");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A 1 MiB fetch name: TensorFlow's error named it whole.
    let fetch = "y".repeat(1 << 20);
    let status = run(&mut client, &session.session_id, &[], &[&fetch], &[])
        .await
        .expect_err("no such fetch");
    assert_bounded(&status, Code::InvalidArgument, fetch.len());
    assert!(status.message().contains("fetches"), "{status:?}");
    let status = run(
        &mut client,
        &session.session_id,
        &[(&fetch, scalar(1.0))],
        &["y"],
        &[],
    )
    .await
    .expect_err("no such feed");
    assert_bounded(&status, Code::InvalidArgument, fetch.len());

    // A long name within the bound still gets TensorFlow's own error, quoted.
    let fetch = "y".repeat(1000);
    let status = run(&mut client, &session.session_id, &[], &[&fetch], &[])
        .await
        .expect_err("no such fetch");
    assert!(
        matches!(status.code(), Code::InvalidArgument | Code::NotFound),
        "{status:?}"
    );
    assert!(status.message().contains("yyyyyyyy"), "{status:?}");

    // The same through the MasterService.
    let mut master = master(&daemon).await;
    let handle = "h".repeat(16 << 20);
    let status = master
        .run_step(tf::RunStepRequest {
            session_handle: handle.clone(),
            fetch: vec!["y".into()],
            ..Default::default()
        })
        .await
        .expect_err("no such session");
    assert_bounded(&status, Code::InvalidArgument, handle.len());

    // Nobody else noticed.
    run(&mut client, &session.session_id, &[], &[], &["w_init"])
        .await
        .expect("the session still runs");
    assert_eq!(fetch_f32(&mut client, &session.session_id, "w").await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_label_is_refused_and_list_sessions_keeps_working_for_everyone() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = create(&mut client, model_graph()).await;

    let huge = "v".repeat(5 << 20);
    let status = client
        .create_session(api::CreateSessionRequest {
            labels: [("notes".to_string(), huge.clone())].into(),
            ..Default::default()
        })
        .await
        .expect_err("a 5 MiB label");
    assert_bounded(&status, Code::InvalidArgument, huge.len());
    assert!(status.message().contains("\"notes\""), "{status:?}");

    let many = (0..1000)
        .map(|index| (format!("k{index}"), "v".to_string()))
        .collect();
    let status = client
        .create_session(api::CreateSessionRequest {
            labels: many,
            ..Default::default()
        })
        .await
        .expect_err("a thousand labels");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // ListSessions still fits in a default client's 4 MiB, for everyone.
    let listed = default_client(&daemon)
        .await
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("ListSessions with a default client")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    assert_eq!(listed.sessions[0].session_id, bystander.session_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_under_tfsd_are_the_daemons_own() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    for runtime in [api::Runtime::Graph, api::Runtime::Python] {
        for key in ["tfsd.origin", "TFSD.master.client"] {
            let status = client
                .create_session(api::CreateSessionRequest {
                    labels: [
                        ("run".to_string(), "1".to_string()),
                        (key.to_string(), "master".to_string()),
                    ]
                    .into(),
                    runtime: runtime as i32,
                    ..Default::default()
                })
                .await
                .expect_err("a reserved label");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains(&format!("{key:?} is reserved")),
                "{status:?}"
            );
        }
    }
    let listed = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(listed.sessions.is_empty(), "{listed:?}");
    // Labels that merely mention tfsd are the client's.
    let session = client
        .create_session(api::CreateSessionRequest {
            labels: [("tfsd".to_string(), "yes".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("an ordinary label")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(session.labels["tfsd"], "yes");
}

/// 66 bytes on the wire declaring `[1 << 28]` floats: TensorFlow fills the shape with the
/// one value given, so the worker would allocate a gigabyte (twice, with TensorFlow's copy).
fn gigabyte_in_66_bytes() -> tf::TensorProto {
    let mut feed = scalar(1.0);
    feed.tensor_shape = shape(&[1 << 28]);
    feed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_that_declares_more_than_it_carries_is_refused_by_default() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    // `x` takes any shape, and `w_init` does not read it: the step itself would succeed.
    let status = run(
        &mut client,
        &session.session_id,
        &[("x", gigabyte_in_66_bytes())],
        &[],
        &["w_init"],
    )
    .await
    .expect_err("1 GiB decoded");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limits.max_feed_size"),
        "{status:?}"
    );
    assert!(status.message().contains("\"x\""), "{status:?}");

    let mut master = master(&daemon).await;
    let handle = master
        .create_session(tf::CreateSessionRequest {
            graph_def: model_graph(),
            ..Default::default()
        })
        .await
        .expect("CreateSession")
        .into_inner()
        .session_handle;
    let answer = master
        .run_step(tf::RunStepRequest {
            session_handle: handle,
            feed: vec![tf::NamedTensorProto {
                name: "x:0".into(),
                tensor: Some(gigabyte_in_66_bytes()),
            }],
            target: vec!["w_init".into()],
            store_errors_in_response_body: true,
            ..Default::default()
        })
        .await
        .expect("an answer")
        .into_inner();
    assert_eq!(
        answer.status_code,
        Code::InvalidArgument as i32,
        "{answer:?}"
    );
    assert!(
        answer.status_error_message.contains("limits.max_feed_size"),
        "{answer:?}"
    );

    // The workers never saw it: the same ones go on.
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.worker_pid, session.worker_pid);
    assert_eq!(info.worker_restart_count, 0);
    run(
        &mut client,
        &session.session_id,
        &[("x", scalar(2.0))],
        &[],
        &["w_init"],
    )
    .await
    .expect("an ordinary step");
    assert_eq!(fetch_f32(&mut client, &session.session_id, "w").await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_the_box_a_session_gets_a_hard_limit_from_the_machine() {
    let budget = tfsd::system::memory_budget().expect("this machine's memory");
    let derived = tfsd::policy::config::default_hard_limit(budget);
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    let policy = session.memory_policy.expect("policy");
    assert_eq!(policy.hard_limit_bytes, derived);
    assert_eq!(
        derived,
        (u128::from(budget.bytes) * 75 / 100) as u64,
        "75% of {budget:?}"
    );

    // A client cannot lift its own limit past it.
    let session = client
        .create_session(api::CreateSessionRequest {
            memory_policy: Some(api::MemoryPolicy {
                hard_limit_bytes: u64::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(
        session.memory_policy.expect("policy").hard_limit_bytes,
        derived
    );
}

#[test]
fn check_config_shows_the_safe_defaults_with_their_values() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tfsd.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--json", "check-config", "--config", shipped])
        .output()
        .expect("run tfsd check-config");
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let budget = tfsd::system::memory_budget().expect("this machine's memory");
    let derived = tfsd::policy::config::default_hard_limit(budget);
    assert_eq!(json["policy"]["hard_limit"]["bytes"], derived, "{json}");
    assert_eq!(json["policy"]["hard_limit_from"], "default");
    assert_eq!(json["policy"]["max_hard_limit"]["bytes"], derived);
    assert_eq!(json["policy"]["memory_budget"]["bytes"], budget.bytes);
    assert_eq!(
        json["limits"]["max_feed_size"]["bytes"],
        tfsd::limits::DEFAULT_MAX_FEED_BYTES
    );
    assert_eq!(json["limits"]["max_feed_size_from"], "default");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["check-config", "--config", shipped])
        .output()
        .expect("run tfsd check-config");
    let human = String::from_utf8(output.stdout).expect("utf-8");
    assert!(human.contains("% of "), "{human}");
    assert!(
        human.contains("536870912 bytes (512 MiB): default"),
        "{human}"
    );
}

/// A request nested past prost's recursion limit (deep unknown groups) is the client's
/// INVALID_ARGUMENT, through tfsd.v1 and the MasterService alike; tonic answered INTERNAL.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_nested_too_deeply_is_an_invalid_argument() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    // RunRequest{session_id, fetches: ["w"]}, then 200 nested groups of an unknown field.
    let mut body = Vec::new();
    for (field, value) in [(1, session.session_id.as_bytes()), (3, b"w".as_slice())] {
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut body);
        prost::encoding::encode_varint(value.len() as u64, &mut body);
        body.extend_from_slice(value);
    }
    body.extend(std::iter::repeat_n(0x7b, 200));
    body.extend(std::iter::repeat_n(0x7c, 200));
    for (address, path) in [
        (&daemon.address, "/tfsd.v1.SessionService/Run"),
        (&daemon.master_address, "/tensorflow.MasterService/RunStep"),
    ] {
        let status = raw_call(address, path, body.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains("recursion limit"),
            "{path}: {status:?}"
        );
    }
    run(&mut client, &session.session_id, &[], &[], &["w_init"])
        .await
        .expect("the session still runs");
}

/// Sends `body` as the request of `path` and returns the error status.
async fn raw_call(address: &str, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.unary::<RawBytes, api::RunResponse, _>(
        tonic::Request::new(RawBytes(body)),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("not a valid request")
}

/// A request that is just bytes, for sending what no client library would.
#[derive(Debug, Clone)]
struct RawBytes(Vec<u8>);

#[derive(Debug, Clone, Default)]
struct RawCodec;

/// Only to name `ProstCodec`'s decoder type; never encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct NeverEncoded {}

impl tonic::codec::Codec for RawCodec {
    type Encode = RawBytes;
    type Decode = api::RunResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<api::RunResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<NeverEncoded, api::RunResponse>::default().decoder()
    }
}

#[derive(Debug, Clone, Default)]
struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = RawBytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: RawBytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item.0);
        Ok(())
    }
}
