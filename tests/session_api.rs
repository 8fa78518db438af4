//! tfsd.v1 end to end: the real daemon, real workers running the real libtensorflow, and a
//! real gRPC client.

mod common;

use common::*;
use tfsd::proto::tensorflow::TensorProto;
use tfsd::proto::tfsd::v1 as api;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn create_run_get_list_and_close() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let mut labels = std::collections::HashMap::new();
    labels.insert("experiment".to_string(), "smoke".to_string());
    let session = client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            config: Vec::new(),
            labels,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("info");
    assert!(session.session_id.starts_with("s-"));
    assert_eq!(session.state, api::SessionState::Ready as i32);
    assert!(process_alive(session.worker_pid));
    let id = session.session_id.as_str();

    run(&mut client, id, &[], &[], &["w_init"])
        .await
        .expect("init");
    let outputs = run(&mut client, id, &[("x", scalar(2.0))], &["y", "w:0"], &[])
        .await
        .expect("run");
    assert_eq!(as_f32(&outputs[0]), 6.0);
    assert_eq!(as_f32(&outputs[1]), 3.0);

    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.to_string(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.run_count, 2);
    assert_eq!(info.labels["experiment"], "smoke");
    assert_eq!(info.worker_pid, session.worker_pid);
    let memory = info.memory.expect("memory");
    assert!(memory.private_bytes > 0 && memory.rss_bytes > memory.private_bytes);

    let listed = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, id);

    client
        .close_session(api::CloseSessionRequest {
            session_id: id.to_string(),
        })
        .await
        .expect("close");
    // Close returns once the worker is reaped.
    assert!(!process_alive(session.worker_pid));
    let status = run(&mut client, id, &[], &["y"], &[])
        .await
        .expect_err("closed");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_uninitialises_every_variable_and_keeps_the_graph() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    run(&mut client, &id, &[], &[], &["w_init", "v_init"])
        .await
        .expect("init");
    assert_eq!(fetch_f32(&mut client, &id, "v_read").await, 5.0);

    let purged = client
        .purge_variables(api::PurgeVariablesRequest {
            session_id: id.clone(),
        })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.worker_pid_before, purged.worker_pid_after);
    assert!(purged.memory_before.is_some() && purged.memory_after.is_some());
    assert_eq!(purged.session.expect("info").purge_count, 1);

    for fetch in ["w", "v_read"] {
        let status = run(&mut client, &id, &[], &[fetch], &[])
            .await
            .expect_err("variable is uninitialised");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{fetch}: {status:?}"
        );
    }
    // The graph is still there: initialise again and run.
    run(&mut client, &id, &[], &[], &["w_init", "v_init"])
        .await
        .expect("re-init");
    let outputs = run(
        &mut client,
        &id,
        &[("x", scalar(2.0))],
        &["y", "v_read"],
        &[],
    )
    .await
    .expect("run");
    assert_eq!(as_f32(&outputs[0]), 6.0);
    assert_eq!(as_f32(&outputs[1]), 5.0);
}

/// A `VariableV2` and the ops that assign to it output references (`DT_FLOAT_REF`); TF1
/// clients fetch them (`sess.run(w)`, `sess.run(assign_op)`) and get the base type.
#[tokio::test(flavor = "multi_thread")]
async fn reference_outputs_are_fetched_as_their_values() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let created = create(&mut client, model_graph()).await;
    let id = created.session_id;
    let outputs = run(&mut client, &id, &[], &["w_init"], &[])
        .await
        .expect("fetch an Assign");
    assert_eq!(outputs[0].dtype, 1, "DT_FLOAT, not DT_FLOAT_REF");
    assert_eq!(as_f32(&outputs[0]), 3.0);
    let outputs = run(
        &mut client,
        &id,
        &[("x", scalar(2.0))],
        &["w_add", "w:0"],
        &[],
    )
    .await
    .expect("fetch an AssignAdd and the variable");
    assert_eq!(as_f32(&outputs[0]), 5.0);
    assert_eq!(as_f32(&outputs[1]), 5.0);
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.worker_pid, created.worker_pid, "the worker survived");
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_graph_leaves_an_empty_graph_that_can_be_extended() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let created = create(&mut client, model_graph()).await;
    let id = created.session_id;
    let new_version = client
        .extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: extension_graph(),
            current_graph_version: 0,
        })
        .await
        .expect("extend")
        .into_inner()
        .new_graph_version;
    assert_eq!(new_version, 1);

    let reset = client
        .reset_graph(api::ResetGraphRequest {
            session_id: id.clone(),
        })
        .await
        .expect("reset")
        .into_inner();
    let info = reset.session.expect("info");
    assert_eq!(info.graph_version, 0);
    assert_eq!(info.graph_reset_count, 1);
    assert_eq!(reset.worker_pid_after, created.worker_pid);

    let status = run(&mut client, &id, &[], &["y"], &[])
        .await
        .expect_err("graph is empty");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("no node named \"y\""),
        "{status:?}"
    );

    // The empty graph takes a whole new graph through ExtendGraph.
    client
        .extend_graph(api::ExtendGraphRequest {
            session_id: id.clone(),
            graph_def: model_graph(),
            current_graph_version: 0,
        })
        .await
        .expect("extend the empty graph");
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    assert_eq!(fetch_f32(&mut client, &id, "w").await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn extend_graph_checks_the_version_and_links_to_existing_nodes() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    let extend = |version| api::ExtendGraphRequest {
        session_id: id.clone(),
        graph_def: extension_graph(),
        current_graph_version: version,
    };
    let status = client
        .extend_graph(extend(7))
        .await
        .expect_err("stale version");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("version"), "{status:?}");

    client.extend_graph(extend(0)).await.expect("extend");
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    // z = y + 1 = x * w + 1, with y from the original graph.
    let outputs = run(&mut client, &id, &[("x", scalar(2.0))], &["z"], &[])
        .await
        .expect("run the extension");
    assert_eq!(as_f32(&outputs[0]), 7.0);

    // The extension survives a recycle: the fresh worker imports the whole graph.
    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle");
    let outputs = run(&mut client, &id, &[("x", scalar(2.0))], &["z"], &[])
        .await
        .expect("run after recycle");
    assert_eq!(as_f32(&outputs[0]), 7.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn recycle_moves_to_a_fresh_process_and_preserves_variables_when_asked() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let created = create(&mut client, model_graph()).await;
    let id = created.session_id;
    run(&mut client, &id, &[], &[], &["w_init", "v_init"])
        .await
        .expect("init");
    run(
        &mut client,
        &id,
        &[("x", scalar(4.0))],
        &[],
        &["w_add", "v_add"],
    )
    .await
    .expect("train a step");

    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: true,
        })
        .await
        .expect("recycle")
        .into_inner();
    assert_eq!(recycled.worker_pid_before, created.worker_pid);
    assert_ne!(recycled.worker_pid_after, created.worker_pid);
    assert_eq!(recycled.variables_preserved, 2);
    assert!(!process_alive(created.worker_pid), "old worker still alive");
    assert!(process_alive(recycled.worker_pid_after));
    let info = recycled.session.expect("info");
    assert_eq!(info.session_id, id);
    assert_eq!(info.recycle_count, 1);
    assert_eq!(info.worker_pid, recycled.worker_pid_after);

    assert_eq!(fetch_f32(&mut client, &id, "w").await, 7.0);
    assert_eq!(fetch_f32(&mut client, &id, "v_read").await, 9.0);
    // Training goes on in the new process.
    run(&mut client, &id, &[("x", scalar(1.0))], &[], &["w_add"])
        .await
        .expect("step");
    assert_eq!(fetch_f32(&mut client, &id, "w").await, 8.0);

    // Without preserve_variables the fresh worker starts uninitialised.
    let plain = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: false,
        })
        .await
        .expect("recycle")
        .into_inner();
    assert_eq!(plain.variables_preserved, 0);
    assert!(!process_alive(recycled.worker_pid_after));
    let status = run(&mut client, &id, &[], &["w"], &[])
        .await
        .expect_err("uninitialised");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_fails_its_run_and_the_session_comes_back() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let created = create(&mut client, model_graph()).await;
    let id = created.session_id.clone();
    let other = create(&mut client, model_graph()).await;
    run(&mut client, &other.session_id, &[], &[], &["w_init"])
        .await
        .expect("init other");

    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    // A step that blocks in the worker until the queue gets an element: it stays in flight.
    let mut blocked_client = client.clone();
    let blocked_id = id.clone();
    let blocked =
        tokio::spawn(
            async move { run(&mut blocked_client, &blocked_id, &[], &["dequeue"], &[]).await },
        );
    // Runs are concurrent: another step of the same session completes meanwhile.
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("concurrent run");
    assert!(!blocked.is_finished());

    signal(created.worker_pid, libc::SIGKILL);
    let status = tokio::time::timeout(DEADLINE, blocked)
        .await
        .expect("the blocked run must fail when its worker dies")
        .expect("task")
        .expect_err("worker died");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("killed by signal 9 (SIGKILL)"),
        "{status:?}"
    );

    let exited = next_event(&mut events, api::EventKind::WorkerExited).await;
    assert_eq!(exited.worker_pid, created.worker_pid);
    assert!(exited.reason.contains("SIGKILL"), "{exited:?}");
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert_ne!(restored.worker_pid, created.worker_pid);

    // The graph is back (variables are not): initialise and run.
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init after restore");
    let outputs = run(&mut client, &id, &[("x", scalar(2.0))], &["y"], &[])
        .await
        .expect("run after restore");
    assert_eq!(as_f32(&outputs[0]), 6.0);
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(info.worker_restart_count, 1);
    assert_eq!(info.worker_pid, restored.worker_pid);

    // The other session did not notice.
    assert_eq!(fetch_f32(&mut client, &other.session_id, "w").await, 3.0);
    assert_eq!(
        client
            .get_session(api::GetSessionRequest {
                session_id: other.session_id.clone()
            })
            .await
            .expect("get")
            .into_inner()
            .worker_restart_count,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_timeout_cancels_the_step_with_deadline_exceeded() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;
    let mut request = run_request(&id, &[], &["dequeue"], &[]);
    request.timeout_ms = 200;
    let status = client.run(request).await.expect_err("times out");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The session is fine afterwards.
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_breaks_nothing() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, model_graph()).await.session_id;

    let status = run(&mut client, "s-nope", &[], &["y"], &[])
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("s-nope"));

    let status = client
        .create_session(api::CreateSessionRequest {
            graph_def: b"definitely not a GraphDef".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("garbage graph");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("GraphDef"), "{status:?}");

    let mut truncated = scalar(0.0);
    truncated.float_val.clear();
    truncated.tensor_shape = shape(&[2, 2]);
    truncated.tensor_content = content(&[0u8; 12]);
    let status = run(&mut client, &id, &[("x", truncated)], &["y"], &[])
        .await
        .expect_err("12 bytes for 4 floats");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("feed \"x\": tensor_content has 12 bytes"),
        "{status:?}"
    );

    let unknown_dtype = TensorProto {
        dtype: 77,
        ..scalar(1.0)
    };
    let status = run(&mut client, &id, &[("x", unknown_dtype)], &["y"], &[])
        .await
        .expect_err("dtype 77");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("dtype 77 is not supported"),
        "{status:?}"
    );

    let status = run(&mut client, &id, &[], &["missing:0"], &[])
        .await
        .expect_err("missing");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("no node named \"missing\""),
        "{status:?}"
    );

    // A TensorFlow error keeps TensorFlow's code: feeding an int into a float placeholder.
    let int_feed = TensorProto {
        dtype: 3,
        int_val: vec![1],
        ..TensorProto::default()
    };
    let status = run(&mut client, &id, &[("x", int_feed)], &["y"], &[])
        .await
        .expect_err("wrong dtype");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // None of that hurt the session.
    run(&mut client, &id, &[], &[], &["w_init"])
        .await
        .expect("init");
    assert_eq!(fetch_f32(&mut client, &id, "w").await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_report_each_lifecycle_step_with_memory() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let mut events = client
        .watch_events(api::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let id = create(&mut client, model_graph()).await.session_id;
    let created = next_event(&mut events, api::EventKind::Created).await;
    assert_eq!(created.session_id, id);

    let request = || api::PurgeVariablesRequest {
        session_id: id.clone(),
    };
    client.purge_variables(request()).await.expect("purge");
    let purged = next_event(&mut events, api::EventKind::VariablesPurged).await;
    assert!(purged.memory_before.is_some() && purged.memory_after.is_some());

    client
        .recycle_session(api::RecycleSessionRequest {
            session_id: id.clone(),
            preserve_variables: false,
        })
        .await
        .expect("recycle");
    let recycled = next_event(&mut events, api::EventKind::Recycled).await;
    assert!(
        recycled.reason.contains("moved from worker pid"),
        "{recycled:?}"
    );

    client
        .close_session(api::CloseSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("close");
    let closed = next_event(&mut events, api::EventKind::Closed).await;
    assert_eq!(closed.session_id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_supervisor_never_loads_tensorflow_and_leaves_no_worker_behind() {
    let mut daemon = Daemon::start();
    let mut client = daemon.client().await;
    let first = create(&mut client, model_graph()).await;
    let second = create(&mut client, model_graph()).await;

    let maps = std::fs::read_to_string(format!("/proc/{}/maps", daemon.pid())).expect("maps");
    assert!(
        !maps.contains("libtensorflow"),
        "the supervisor mapped libtensorflow"
    );
    let worker_maps =
        std::fs::read_to_string(format!("/proc/{}/maps", first.worker_pid)).expect("maps");
    assert!(
        worker_maps.contains("libtensorflow"),
        "workers do run TensorFlow"
    );

    let workers = children_of(daemon.pid());
    assert!(workers.contains(&first.worker_pid) && workers.contains(&second.worker_pid));
    assert_eq!(daemon.stop(), 0);
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived the daemon");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_die_with_a_killed_supervisor() {
    let mut daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    signal(daemon.pid(), libc::SIGKILL);
    let _ = daemon.stop();
    // PR_SET_PDEATHSIG delivers SIGKILL to the worker when its parent dies.
    assert!(
        wait_for_exit(session.worker_pid, DEADLINE),
        "worker outlived a killed supervisor"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_supported_dtype_round_trips_through_a_run() {
    use tensorflow::DataType;
    let cases: [(DataType, i32, usize); 13] = [
        (DataType::Float, 1, 4),
        (DataType::Double, 2, 8),
        (DataType::Int32, 3, 4),
        (DataType::UInt8, 4, 1),
        (DataType::Int16, 5, 2),
        (DataType::Int8, 6, 1),
        (DataType::Int64, 9, 8),
        (DataType::Bool, 10, 1),
        (DataType::BFloat16, 14, 2),
        (DataType::UInt16, 17, 2),
        (DataType::Half, 19, 2),
        (DataType::UInt32, 22, 4),
        (DataType::UInt64, 23, 8),
    ];
    let mut graph = tensorflow::Graph::new();
    for (data_type, number, _) in &cases {
        let input = placeholder(&mut graph, &format!("in_{number}"), *data_type);
        add_op(
            &mut graph,
            "Identity",
            &format!("out_{number}"),
            &[&input],
            |_| {},
        );
    }
    let input = placeholder(&mut graph, "in_string", DataType::String);
    add_op(&mut graph, "Identity", "out_string", &[&input], |_| {});
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, graph.graph_def().expect("graph_def"))
        .await
        .session_id;

    for (_, number, size) in cases {
        // Bools must be 0 or 1; other types take any bytes.
        let bytes: Vec<u8> = (0..3 * size)
            .map(|i| {
                if number == 10 {
                    (i % 2) as u8
                } else {
                    (i * 37) as u8
                }
            })
            .collect();
        let feed = TensorProto {
            dtype: number,
            tensor_shape: shape(&[3]),
            tensor_content: content(&bytes),
            ..TensorProto::default()
        };
        let name = format!("in_{number}");
        let fetch = format!("out_{number}");
        let outputs = run(&mut client, &id, &[(&name, feed)], &[&fetch], &[])
            .await
            .unwrap_or_else(|status| panic!("dtype {number}: {status:?}"));
        assert_eq!(outputs[0].dtype, number);
        assert_eq!(outputs[0].tensor_shape, shape(&[3]));
        assert_eq!(
            outputs[0].tensor_content.as_ref(),
            bytes.as_slice(),
            "dtype {number}"
        );
    }
    // A broadcast scalar, as tf.make_tensor_proto(1.5, shape=[4]) writes it.
    let broadcast = TensorProto {
        dtype: 1,
        tensor_shape: shape(&[4]),
        float_val: vec![1.5],
        ..TensorProto::default()
    };
    let outputs = run(&mut client, &id, &[("in_1", broadcast)], &["out_1"], &[])
        .await
        .expect("broadcast");
    let expected: Vec<u8> = [1.5f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(outputs[0].tensor_content.as_ref(), expected.as_slice());

    let strings = TensorProto {
        dtype: 7,
        tensor_shape: shape(&[3]),
        string_val: vec![
            b"hello".to_vec(),
            "wörld".as_bytes().to_vec(),
            b"\xff\x00raw".to_vec(),
        ],
        ..TensorProto::default()
    };
    let outputs = run(
        &mut client,
        &id,
        &[("in_string", strings.clone())],
        &["out_string"],
        &[],
    )
    .await
    .expect("strings");
    assert_eq!(outputs[0].string_val, strings.string_val);
}

/// A graph holding only `big` (see `add_big_variable`).
fn big_variable_graph(elements: i64) -> Vec<u8> {
    let mut graph = tensorflow::Graph::new();
    add_big_variable(&mut graph, elements);
    graph.graph_def().expect("graph_def")
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_and_reset_give_a_variables_memory_back() {
    // 16 MiB: big enough to see, small enough that glibc's dynamic mmap threshold would
    // keep it on the heap after a free unless the worker prevents that.
    const BYTES: i64 = 16 << 20;
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let id = create(&mut client, big_variable_graph(BYTES / 4))
        .await
        .session_id;
    for reset in ["purge", "reset_graph"] {
        run(
            &mut client,
            &id,
            &[("value", scalar(1.0))],
            &[],
            &["big_init"],
        )
        .await
        .expect("init");
        let outcome = if reset == "purge" {
            client
                .purge_variables(api::PurgeVariablesRequest {
                    session_id: id.clone(),
                })
                .await
        } else {
            client
                .reset_graph(api::ResetGraphRequest {
                    session_id: id.clone(),
                })
                .await
        }
        .expect("reset")
        .into_inner();
        let before = outcome.memory_before.expect("before").private_bytes as i64;
        let after = outcome.memory_after.expect("after").private_bytes as i64;
        assert!(
            before - after >= BYTES * 3 / 4,
            "{reset}: private memory went from {before} to {after}, not down by ~{BYTES}"
        );
    }
}
