//! Broken and hostile input: each gets a clear error, and neither the daemon nor any other
//! session notices. Every test checks a bystander session afterwards.

mod common;

use common::*;
use tensorflow::{DataType, Graph, Tensor};
use tfsd::proto::tensorflow::TensorProto;
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

/// A session that must be unaffected by whatever the test does to another one.
struct Bystander {
    id: String,
    worker_pid: u32,
}

impl Bystander {
    async fn new(client: &mut Client) -> Bystander {
        let session = create(client, model_graph()).await;
        run(client, &session.session_id, &[], &[], &["w_init"])
            .await
            .expect("init bystander");
        Bystander {
            id: session.session_id,
            worker_pid: session.worker_pid,
        }
    }

    /// Still the same worker, still holding its variable.
    async fn check(&self, client: &mut Client) {
        assert_eq!(fetch_f32(client, &self.id, "w").await, 3.0);
        let info = client
            .get_session(api::GetSessionRequest {
                session_id: self.id.clone(),
            })
            .await
            .expect("get bystander")
            .into_inner();
        assert_eq!(info.worker_pid, self.worker_pid);
        assert_eq!(info.worker_restart_count, 0);
    }
}

async fn create_error(client: &mut Client, graph_def: Vec<u8>) -> tonic::Status {
    client
        .create_session(api::CreateSessionRequest {
            graph_def,
            ..Default::default()
        })
        .await
        .expect_err("the graph must be rejected")
}

fn graph_of(build: impl FnOnce(&mut Graph)) -> Vec<u8> {
    let mut graph = Graph::new();
    build(&mut graph);
    graph.graph_def().expect("graph_def")
}

/// Serialized GraphDef nodes written by hand (prost), for graphs the TensorFlow API refuses
/// to build: unknown ops, cycles.
fn raw_graph(nodes: &[(&str, &str, &[&str])]) -> Vec<u8> {
    let nodes: Vec<RawNode> = nodes
        .iter()
        .map(|&(name, op, inputs)| RawNode {
            name,
            op,
            inputs,
            types: &[],
        })
        .collect();
    raw_typed_graph(&nodes)
}

/// A node for `raw_typed_graph`: `types` sets type attributes to TensorFlow type codes (ones
/// the `tensorflow` crate cannot name, too); a node with a `dtype` also gets a scalar `shape`.
struct RawNode<'a> {
    name: &'a str,
    op: &'a str,
    inputs: &'a [&'a str],
    types: &'a [(&'a str, i32)],
}

fn raw_typed_graph(nodes: &[RawNode]) -> Vec<u8> {
    use prost::Message;
    use std::collections::HashMap;
    use tfsd::proto::tensorflow::TensorShapeProto;
    #[derive(Clone, PartialEq, prost::Message)]
    struct AttrValue {
        #[prost(int32, optional, tag = "6")]
        r#type: Option<i32>,
        #[prost(message, optional, tag = "7")]
        shape: Option<TensorShapeProto>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct NodeDef {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(string, tag = "2")]
        op: String,
        #[prost(string, repeated, tag = "3")]
        input: Vec<String>,
        #[prost(map = "string, message", tag = "5")]
        attr: HashMap<String, AttrValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct GraphDef {
        #[prost(message, repeated, tag = "1")]
        node: Vec<NodeDef>,
    }
    GraphDef {
        node: nodes
            .iter()
            .map(|node| NodeDef {
                name: node.name.to_string(),
                op: node.op.to_string(),
                input: node.inputs.iter().map(|s| s.to_string()).collect(),
                attr: node
                    .types
                    .iter()
                    .map(|&(attr, code)| {
                        let value = AttrValue {
                            r#type: Some(code),
                            shape: None,
                        };
                        (attr.to_string(), value)
                    })
                    .chain(
                        node.types
                            .iter()
                            .any(|&(attr, _)| attr == "dtype")
                            .then(|| {
                                let scalar = AttrValue {
                                    r#type: None,
                                    shape: Some(TensorShapeProto::default()),
                                };
                                ("shape".to_string(), scalar)
                            }),
                    )
                    .collect(),
            })
            .collect(),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn graphs_tensorflow_rejects_are_invalid_arguments_with_its_message() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;

    let status = create_error(&mut client, vec![0xff, 0xff, 0xff, 0x07, 0x01]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("GraphDef"), "{status:?}");

    let status = create_error(&mut client, raw_graph(&[("x", "NoSuchOpAnywhere", &[])])).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("NoSuchOpAnywhere"), "{status:?}");

    // a = Identity(b), b = Identity(a): a cycle.
    let cycle = raw_graph(&[("a", "Identity", &["b"]), ("b", "Identity", &["a"])]);
    let status = create_error(&mut client, cycle).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = create_error(&mut client, raw_graph(&[("y", "Identity", &["missing"])])).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("missing"), "{status:?}");

    bystander.check(&mut client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_constant_is_carried_and_a_bad_extension_leaves_the_graph_intact() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;
    // A 64 MiB constant in the GraphDef itself: large, legal, and it must work.
    let elements = 16 << 20;
    let huge = graph_of(|graph| {
        let values = vec![0.5f32; elements];
        add_op(graph, "Const", "huge", &[], |d| {
            d.set_attr_type("dtype", DataType::Float).expect("dtype");
            d.set_attr_tensor(
                "value",
                Tensor::<f32>::new(&[elements as u64])
                    .with_values(&values)
                    .expect("value"),
            )
            .expect("value");
        });
    });
    let id = create(&mut client, huge).await.session_id;
    let outputs = run(&mut client, &id, &[], &["huge"], &[])
        .await
        .expect("fetch the constant");
    assert_eq!(outputs[0].tensor_content.len(), elements * 4);

    // An extension TensorFlow rejects changes nothing: the version stays, the graph runs.
    let status = client
        .extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: raw_graph(&[("bad", "NoSuchOpAnywhere", &[])]),
            current_graph_version: 0,
        })
        .await
        .expect_err("bad extension");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.graph_version, 0);
    run(&mut client, &id, &[], &["huge"], &[])
        .await
        .expect("still runs");
    // And a recycle re-imports the graph without the rejected nodes.
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: false,
        })
        .await
        .expect("recycle");
    bystander.check(&mut client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_tensors_name_the_feed() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;
    let id = create(&mut client, model_graph()).await.session_id;

    let cases: Vec<(&str, TensorProto, &str)> = vec![
        (
            "negative dimension",
            TensorProto {
                dtype: 1,
                tensor_shape: shape(&[2, -1]),
                ..TensorProto::default()
            },
            "sizes must be 0 or more",
        ),
        (
            "overflowing shape",
            TensorProto {
                dtype: 1,
                tensor_shape: shape(&[i64::MAX, i64::MAX]),
                float_val: vec![1.0],
                ..TensorProto::default()
            },
            "more elements than fit",
        ),
        (
            "unknown dtype",
            TensorProto {
                dtype: 1234,
                ..TensorProto::default()
            },
            "dtype 1234 is not supported",
        ),
        (
            "too many strings",
            TensorProto {
                dtype: 7,
                tensor_shape: shape(&[1]),
                string_val: vec![b"a".to_vec(), b"b".to_vec()],
                ..TensorProto::default()
            },
            "string_val holds 2 values",
        ),
        (
            "content for a string tensor",
            TensorProto {
                dtype: 7,
                tensor_shape: shape(&[1]),
                float_val: vec![1.0],
                ..TensorProto::default()
            },
            "must use string_val",
        ),
    ];
    for (what, tensor, expected) in cases {
        let status = run(&mut client, &id, &[("x", tensor)], &["y"], &[])
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().starts_with("feed \"x\": "),
            "{what}: {status:?}"
        );
        assert!(status.message().contains(expected), "{what}: {status:?}");
    }

    // Names that are not in the graph, as feed, fetch and target.
    for (feeds, fetches, targets, name) in [
        (vec![("nope", scalar(1.0))], vec!["y"], vec![], "nope"),
        (vec![], vec!["y:7"], vec![], "y:7"),
        (vec![], vec![], vec!["ghost"], "ghost"),
    ] {
        let status = run(&mut client, &id, &feeds, &fetches, &targets)
            .await
            .expect_err("missing node");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(name), "{status:?}");
    }
    bystander.check(&mut client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_wants_more_memory_than_the_machine_has_fails_cleanly() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;
    // Fill of 2^40 floats: 4 TiB.
    let graph = graph_of(|graph| {
        let dims = add_op(graph, "Const", "dims", &[], |d| {
            d.set_attr_type("dtype", DataType::Int64).expect("dtype");
            d.set_attr_tensor(
                "value",
                Tensor::<i64>::new(&[2])
                    .with_values(&[1 << 20, 1 << 20])
                    .expect("value"),
            )
            .expect("value");
        });
        let value = placeholder(graph, "value", DataType::Float);
        add_op(graph, "Fill", "enormous", &[&dims, &value], |_| {});
    });
    let session = create(&mut client, graph).await;
    let status = run(
        &mut client,
        &session.session_id,
        &[("value", scalar(1.0))],
        &["enormous"],
        &[],
    )
    .await
    .expect_err("4 TiB");
    // TensorFlow reports the failed allocation; if the worker died instead, the session is
    // restored and the error says how the worker died. Either way: a clear answer.
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::Unavailable),
        "{status:?}"
    );
    assert!(!status.message().is_empty());
    // The session still works.
    let outputs = run(&mut client, &session.session_id, &[], &["dims"], &[])
        .await
        .expect("the session recovers");
    assert_eq!(outputs[0].tensor_content.len(), 16);
    bystander.check(&mut client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_a_request_are_refused_by_the_transport() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;
    // A raw gRPC call whose body is not a RunRequest protobuf.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.address))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tfsd.v1.SessionService/Run");
    let status = grpc
        .unary::<RawBytes, api::RunResponse, _>(
            tonic::Request::new(RawBytes(vec![0xff; 64])),
            path,
            RawCodec,
        )
        .await
        .expect_err("not a protobuf");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    bystander.check(&mut client).await;
}

/// A message that is just bytes, for sending garbage through a real gRPC call.
#[derive(Debug, Clone)]
struct RawBytes(Vec<u8>);

#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = RawBytes;
    type Decode = api::RunResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<api::RunResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<RawBytes2, api::RunResponse>::default().decoder()
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

/// Only to name `ProstCodec`'s decoder type; never encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBytes2 {}

/// TensorFlow has types tfsd cannot carry (float8, int4, resource handles). Fetching one is
/// refused by name before the step runs; a graph holding one still runs, purges and
/// recycles. (Reading such a type code once crashed release-built workers: the C API's type
/// enum in tensorflow-sys lists only 1–23.)
#[tokio::test(flavor = "multi_thread")]
async fn fetches_of_types_tfsd_cannot_carry_are_refused_by_name() {
    const DT_FLOAT8_E5M2: i32 = 24;
    const DT_INT4: i32 = 29;
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let bystander = Bystander::new(&mut client).await;

    const DT_FLOAT: i32 = 1;
    let graph = raw_typed_graph(&[
        RawNode {
            name: "f8",
            op: "Placeholder",
            inputs: &[],
            types: &[("dtype", DT_FLOAT8_E5M2)],
        },
        RawNode {
            name: "i4",
            op: "Placeholder",
            inputs: &[],
            types: &[("dtype", DT_INT4)],
        },
        RawNode {
            name: "f8_var",
            op: "VariableV2",
            inputs: &[],
            types: &[("dtype", DT_FLOAT8_E5M2)],
        },
        RawNode {
            name: "ok",
            op: "Placeholder",
            inputs: &[],
            types: &[("dtype", DT_FLOAT)],
        },
        RawNode {
            name: "ok_out",
            op: "Identity",
            inputs: &["ok"],
            types: &[("T", DT_FLOAT)],
        },
    ]);
    let session = create(&mut client, graph).await;
    let id = session.session_id;
    for (fetch, type_name) in [
        ("f8", "DT_FLOAT8_E5M2"),
        ("i4", "DT_INT4"),
        ("f8_var", "DT_FLOAT8_E5M2_REF"),
    ] {
        let status = run(&mut client, &id, &[], &[fetch], &[])
            .await
            .expect_err("an uncarriable type");
        assert_eq!(status.code(), Code::InvalidArgument, "{fetch}: {status:?}");
        assert!(
            status.message().contains(fetch) && status.message().contains(type_name),
            "{fetch}: {status:?}"
        );
    }
    // A resource handle, in a graph the crate can build.
    let handles = create(&mut client, model_graph()).await.session_id;
    let status = run(&mut client, &handles, &[], &["v"], &[])
        .await
        .expect_err("a resource handle");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("DT_RESOURCE"), "{status:?}");

    // The worker is the same one, and the session works and recycles.
    let outputs = run(&mut client, &id, &[("ok", scalar(1.5))], &["ok_out"], &[])
        .await
        .expect("a float fetch");
    assert_eq!(as_f32(&outputs[0]), 1.5);
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle a graph with a float8 variable")
        .into_inner();
    assert_eq!(recycled.worker_pid_before, session.worker_pid);
    assert_eq!(recycled.variables_preserved, 0);
    run(&mut client, &id, &[("ok", scalar(2.5))], &["ok_out"], &[])
        .await
        .expect("runs after the recycle");
    bystander.check(&mut client).await;
}

/// The daemon's own buffer for tensors in transit is bounded (`limits.max_buffered_size`):
/// three concurrent fetches, each larger than the whole budget, go through one at a time and
/// arrive intact (no deadlock, no mix-up); small steps pass meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn fetches_larger_than_the_buffer_budget_go_one_at_a_time_and_arrive_intact() {
    const ELEMENTS: usize = 6 << 20; // 24 MiB of float32 each way
    let dir = TempDir::new("budget");
    let daemon = Daemon::start_with(&[
        "--config",
        &dir.config("[limits]\nmax_buffered_size = \"16MiB\"\n"),
    ]);
    let mut client = daemon.client().await;
    let mut graph = Graph::new();
    let x = placeholder(&mut graph, "x", DataType::Float);
    add_op(&mut graph, "Identity", "y", &[&x], |d| {
        d.set_attr_type("T", DataType::Float).expect("T");
    });
    let graph_def = graph.graph_def().expect("graph_def");
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(create(&mut client, graph_def.clone()).await.session_id);
    }
    let runs = sessions.iter().enumerate().map(|(index, id)| {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let values: Vec<u8> = (0..ELEMENTS)
                .flat_map(|i| ((i * 3 + index) as f32).to_le_bytes())
                .collect();
            let feed = TensorProto {
                dtype: 1, // DT_FLOAT
                tensor_shape: shape(&[ELEMENTS as i64]),
                tensor_content: values.clone().into(),
                ..Default::default()
            };
            let outputs =
                tokio::time::timeout(DEADLINE, run(&mut client, &id, &[("x", feed)], &["y"], &[]))
                    .await
                    .expect("answered")
                    .expect("run");
            assert!(
                outputs[0].tensor_content.as_ref() == values.as_slice(),
                "session {index}'s fetch differs from its feed"
            );
        }
    });
    futures::future::join_all(runs).await;
}
