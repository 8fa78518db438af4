//! TensorFlow's MasterService, wired into the real daemon: the address it prints, raw
//! MasterService calls with a tonic client, and how its sessions look through tfsd.v1.
//! (python/tests/test_master_service.py drives it with TensorFlow's own Python client.)

mod common;

use common::*;
use tfsd::proto::tensorflow as tf;
use tfsd::proto::tfsd::v1 as api;
use tonic::transport::Channel;

type Master = tf::master_service_client::MasterServiceClient<Channel>;

async fn master(daemon: &Daemon) -> Master {
    assert!(
        !daemon.master_address.is_empty(),
        "the daemon did not print its MasterService address"
    );
    let channel = Channel::from_shared(format!("http://{}", daemon.master_address))
        .expect("address")
        .connect()
        .await
        .expect("connect to the MasterService");
    Master::new(channel)
}

async fn create_master_session(master: &mut Master) -> String {
    master
        .create_session(tf::CreateSessionRequest {
            graph_def: model_graph(),
            ..Default::default()
        })
        .await
        .expect("CreateSession")
        .into_inner()
        .session_handle
}

fn step(handle: &str, fetch: &str, targets: &[&str]) -> tf::RunStepRequest {
    tf::RunStepRequest {
        session_handle: handle.to_string(),
        feed: vec![tf::NamedTensorProto {
            name: "x:0".into(),
            tensor: Some(scalar(2.0)),
        }],
        fetch: if fetch.is_empty() {
            Vec::new()
        } else {
            vec![fetch.to_string()]
        },
        target: targets.iter().map(|t| t.to_string()).collect(),
        store_errors_in_response_body: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_master_session_is_a_tfsd_session_that_survives_a_recycle() {
    let daemon = Daemon::start();
    let mut master = master(&daemon).await;
    let mut client = daemon.client().await;
    let handle = create_master_session(&mut master).await;

    // The handle is the tfsd session id, labelled as a MasterService session.
    let info = client
        .get_session(api::GetSessionRequest {
            session_id: handle.clone(),
        })
        .await
        .expect("GetSession")
        .into_inner();
    assert_eq!(info.labels["tfsd.origin"], "master");
    assert!(info.labels["tfsd.master.client"].starts_with("127.0.0.1:"));

    // An uninitialised variable fails in the body, with TensorFlow's code, over gRPC OK.
    let failed = master
        .run_step(step(&handle, "y:0", &[]))
        .await
        .expect("errors travel in the body")
        .into_inner();
    assert_eq!(failed.status_code, tonic::Code::FailedPrecondition as i32);
    assert!(failed.status_error_message.contains("uninitialized"));

    master
        .run_step(step(&handle, "", &["w_init"]))
        .await
        .expect("init");
    let answer = master
        .run_step(step(&handle, "y:0", &[]))
        .await
        .expect("RunStep")
        .into_inner();
    assert_eq!(answer.status_code, 0, "{}", answer.status_error_message);
    assert_eq!(answer.tensor[0].name, "y:0");
    assert_eq!(
        as_f32(answer.tensor[0].tensor.as_ref().expect("tensor")),
        6.0
    );

    // An operator recycles the session; the client's handle goes on working, values kept.
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: handle.clone(),
            preserve_variables: true,
        })
        .await
        .expect("RecycleSession")
        .into_inner();
    assert_ne!(recycled.worker_pid_before, recycled.worker_pid_after);
    let answer = master
        .run_step(step(&handle, "y:0", &[]))
        .await
        .expect("RunStep after the recycle")
        .into_inner();
    assert_eq!(
        as_f32(answer.tensor[0].tensor.as_ref().expect("tensor")),
        6.0
    );

    master
        .close_session(tf::CloseSessionRequest {
            session_handle: handle.clone(),
        })
        .await
        .expect("CloseSession");
    let gone = client
        .get_session(api::GetSessionRequest { session_id: handle })
        .await
        .expect_err("closed");
    assert_eq!(gone.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reset_clears_master_sessions_and_never_tfsd_v1_sessions() {
    let daemon = Daemon::start();
    let mut master = master(&daemon).await;
    let mut client = daemon.client().await;
    let handle = create_master_session(&mut master).await;
    master
        .run_step(step(&handle, "", &["w_init"]))
        .await
        .expect("init");
    let own = create(&mut client, model_graph()).await.session_id;
    run(&mut client, &own, &[], &[], &["w_init"])
        .await
        .expect("init");

    // A MasterService client cannot reach a tfsd.v1 session at all.
    let answer = master
        .run_step(step(&own, "y:0", &[]))
        .await
        .expect("body")
        .into_inner();
    assert_eq!(answer.status_code, tonic::Code::NotFound as i32);

    master
        .reset(tf::ResetRequest::default())
        .await
        .expect("Reset");
    let cleared = master
        .run_step(step(&handle, "y:0", &[]))
        .await
        .expect("body")
        .into_inner();
    assert_eq!(
        cleared.status_code,
        tonic::Code::FailedPrecondition as i32,
        "the master session's variables were cleared"
    );
    assert_eq!(fetch_f32(&mut client, &own, "w").await, 3.0);
}

#[tokio::test]
async fn a_retried_step_runs_once() {
    let daemon = Daemon::start();
    let mut master = master(&daemon).await;
    let handle = create_master_session(&mut master).await;
    master
        .run_step(step(&handle, "", &["w_init"]))
        .await
        .expect("init");
    // w_add adds x (2) to w (3): the same request id twice must add once.
    let mut add = step(&handle, "w_add:0", &[]);
    add.request_id = 4242;
    for _ in 0..2 {
        let answer = master
            .run_step(add.clone())
            .await
            .expect("RunStep")
            .into_inner();
        assert_eq!(
            as_f32(answer.tensor[0].tensor.as_ref().expect("tensor")),
            5.0
        );
    }
    let read = master
        .run_step(step(&handle, "w:0", &[]))
        .await
        .expect("RunStep")
        .into_inner();
    assert_eq!(as_f32(read.tensor[0].tensor.as_ref().expect("tensor")), 5.0);
}

#[tokio::test]
async fn unsupported_requests_answer_clear_errors() {
    let daemon = Daemon::start();
    let mut master = master(&daemon).await;
    let handle = create_master_session(&mut master).await;
    // CallableOptions with a tensor_connection (field 5).
    let options = vec![0x2a, 0x03, 0x0a, 0x01, b'a'];
    let status = master
        .make_callable(tf::MakeCallableRequest {
            session_handle: handle.clone(),
            options,
            request_id: 0,
        })
        .await
        .expect_err("unsupported");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("tensor_connection"));

    let devices = master
        .list_devices(tf::ListDevicesRequest {
            session_handle: handle,
        })
        .await
        .expect("ListDevices")
        .into_inner();
    assert_eq!(
        devices.local_device[0].name,
        "/job:localhost/replica:0/task:0/device:CPU:0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_session_outlives_a_daemon_restart_with_a_state_directory() {
    let dir = std::env::temp_dir().join(format!(
        "tfsd-master-state-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("state dir");
    let env = [("TFSD_STATE_DIR", dir.as_os_str())];

    let mut first = Daemon::start_with_env(&[], &env);
    let mut master_client = master(&first).await;
    let handle = create_master_session(&mut master_client).await;
    master_client
        .run_step(step(&handle, "", &["w_init"]))
        .await
        .expect("init");
    master_client
        .run_step(step(&handle, "", &["w_add"]))
        .await
        .expect("w += 2");
    drop(master_client);
    assert_eq!(first.stop(), 0);

    // Same handle, same value: the variables were checkpointed at shutdown.
    let second = Daemon::start_with_env(&[], &env);
    let mut master_client = master(&second).await;
    let answer = master_client
        .run_step(step(&handle, "w:0", &[]))
        .await
        .expect("RunStep")
        .into_inner();
    assert_eq!(answer.status_code, 0, "{}", answer.status_error_message);
    assert_eq!(
        as_f32(answer.tensor[0].tensor.as_ref().expect("tensor")),
        5.0
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
