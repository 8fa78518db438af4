//! Python sessions from the outside: the real daemon with a real Python worker pool (the
//! project's `.venv`, made by scripts/python-env: TensorFlow 2.21, Keras 3, tfsd_worker), a
//! real tonic client, and the real `tfsd run`. Calls here are scripts (a Rust client cannot
//! cloudpickle a function); python/tests/test_python_sessions.py drives pickled calls from
//! the Python client.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tfsd::proto::tfsd::v1 as api;

fn python_daemon(extra_env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
    let interpreter = python_interpreter();
    let mut env = vec![("TFSD_PYTHON_INTERPRETER", interpreter.as_os_str())];
    env.extend_from_slice(extra_env);
    Daemon::start_with_env(&[], &env)
}

async fn create_python(client: &mut Client, policy: Option<api::MemoryPolicy>) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            memory_policy: policy,
            ..Default::default()
        })
        .await
        .expect("create a Python session")
        .into_inner()
        .session
        .expect("session info")
}

fn script(session_id: &str, source: &str, timeout_ms: u64) -> api::CallRequest {
    api::CallRequest {
        session_id: session_id.to_string(),
        target: Some(api::call_request::Target::Script(api::Script {
            path: "test_script.py".to_string(),
            source: source.as_bytes().to_vec(),
            argv: Vec::new(),
        })),
        timeout_ms,
        close_session_after: false,
    }
}

/// What a finished call sent: its stdout, and its result or exception.
#[derive(Debug, Default)]
struct Finished {
    stdout: String,
    result: Option<api::CallResult>,
    exception: Option<api::RemoteException>,
}

async fn call(client: &mut Client, request: api::CallRequest) -> Result<Finished, tonic::Status> {
    let mut events = client.call(request).await?.into_inner();
    let mut finished = Finished::default();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.message().await? {
            match event.event {
                Some(api::call_event::Event::Output(output))
                    if output.stream == api::Stream::Stdout as i32 =>
                {
                    finished
                        .stdout
                        .push_str(&String::from_utf8_lossy(&output.data));
                }
                Some(api::call_event::Event::Result(result)) => finished.result = Some(result),
                Some(api::call_event::Event::Exception(exception)) => {
                    finished.exception = Some(exception)
                }
                Some(api::call_event::Event::Output(_)) | None => {}
            }
        }
        Ok(finished)
    })
    .await
    .expect("the call answered within the deadline")
}

async fn session(client: &mut Client, session_id: &str) -> api::SessionInfo {
    client
        .get_session(api::GetSessionRequest {
            session_id: session_id.to_string(),
        })
        .await
        .expect("get session")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn tfsd_run_passes_argv_output_and_the_exit_code_through() {
    let daemon = python_daemon(&[]);
    let dir = std::env::temp_dir().join(format!("tfsd-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let exits = dir.join("exits.py");
    std::fs::write(
        &exits,
        "import sys, os\n\
         import tensorflow as tf\n\
         print('argv', sys.argv[1:])\n\
         print('pid', os.getpid())\n\
         print('on stderr', file=sys.stderr)\n\
         print('sum', float(tf.reduce_sum(tf.ones([4]))))\n\
         sys.exit(int(sys.argv[1]))\n",
    )
    .expect("script");
    let tfsd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tfsd"))
            .args(["--address", &daemon.address, "run"])
            .args(args)
            .output()
            .expect("run tfsd")
    };
    let output = tfsd(&[exits.to_str().expect("path"), "3", "--flag", "x y"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(3),
        "stdout {stdout} stderr {stderr}"
    );
    assert!(stdout.contains("argv ['3', '--flag', 'x y']"), "{stdout}");
    assert!(stdout.contains("sum 4.0"), "{stdout}");
    assert!(stderr.contains("on stderr"), "{stderr}");
    let pid: u32 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("pid "))
        .and_then(|pid| pid.parse().ok())
        .expect("the script printed its pid");
    assert_ne!(pid, std::process::id());
    // The script's process and session are gone once `tfsd run` returns.
    assert!(
        wait_for_exit(pid, DEADLINE),
        "the script's worker still runs"
    );
    let mut client = daemon.client().await;
    let sessions = client
        .list_sessions(api::ListSessionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert!(sessions.is_empty(), "{sessions:?}");

    let raises = dir.join("raises.py");
    std::fs::write(
        &raises,
        "def deep():\n    raise ValueError('boom')\n\ndeep()\n",
    )
    .expect("script");
    let output = tfsd(&[raises.to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Traceback"), "{stderr}");
    assert!(stderr.contains("in deep"), "{stderr}");
    assert!(stderr.contains("ValueError: boom"), "{stderr}");

    let missing = tfsd(&[dir.join("missing.py").to_str().expect("path")]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot read the script"),
        "{missing:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_session_keeps_state_resets_and_stops_hung_calls() {
    let daemon = python_daemon(&[]);
    let mut client = daemon.client().await;
    let created = create_python(&mut client, None).await;
    let id = created.session_id.clone();
    assert_eq!(created.runtime, api::Runtime::Python as i32);

    // Graph operations are refused by name, and so is a call on a graph session.
    let status = run(&mut client, &id, &[], &["x"], &[])
        .await
        .expect_err("Run on a Python session");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("Python session"), "{status:?}");
    let graph = create(&mut client, model_graph()).await.session_id;
    let status = call(&mut client, script(&graph, "print(1)", 0))
        .await
        .expect_err("Call on a graph session");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            graph_def: model_graph(),
            ..Default::default()
        })
        .await
        .expect_err("a graph for a Python session");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // State lives in tfsd_worker.state between calls.
    let set = "import tfsd_worker, os\ntfsd_worker.state.x = 41\nprint(os.getpid())\n";
    let finished = call(&mut client, script(&id, set, 0)).await.expect("set");
    assert_eq!(finished.result.expect("result").exit_code, 0);
    assert_eq!(finished.stdout.trim(), created.worker_pid.to_string());
    let get = "import tfsd_worker, os\nprint(tfsd_worker.state.x + 1, os.getpid())\n";
    let finished = call(&mut client, script(&id, get, 0)).await.expect("get");
    assert_eq!(finished.stdout.trim(), format!("42 {}", created.worker_pid));

    // A preserving recycle carries it to a fresh process.
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
    assert_eq!(recycled.variables_preserved, 1);
    assert!(recycled.memory_after.expect("memory").private_bytes > 0);
    assert!(!process_alive(created.worker_pid));
    let finished = call(&mut client, script(&id, get, 0)).await.expect("get");
    assert_eq!(
        finished.stdout.trim(),
        format!("42 {}", recycled.worker_pid_after)
    );

    // A purge empties the namespace; the next call sees no state.
    let purged = client
        .purge_variables(api::PurgeVariablesRequest {
            session_id: id.clone(),
        })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.worker_pid_after, recycled.worker_pid_after);
    let finished = call(&mut client, script(&id, get, 0)).await.expect("get");
    let exception = finished.exception.expect("no state after a purge");
    assert_eq!(
        exception.type_name, "builtins.AttributeError",
        "{exception:?}"
    );

    // A hung call that yields to the interrupt stops at its timeout; the session and its
    // process go on.
    let started = Instant::now();
    let hung = "import time\nwhile True:\n    time.sleep(0.05)\n";
    let status = call(&mut client, script(&id, hung, 1000))
        .await
        .expect_err("past its timeout");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        session(&mut client, &id).await.worker_pid,
        recycled.worker_pid_after
    );
    let finished = call(&mut client, script(&id, "print('after')", 0))
        .await
        .expect("a call after the timeout");
    assert_eq!(finished.stdout.trim(), "after");

    // Code that swallows the interrupt is stopped anyway: its worker is replaced.
    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    // It also started a process of its own, which goes with it.
    let stubborn = "import subprocess, time\n\
                    child = subprocess.Popen(['sleep', '600'])\n\
                    print(child.pid, flush=True)\n\
                    while True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass\n";
    let mut stream = client
        .call(script(&id, stubborn, 1500))
        .await
        .expect("call")
        .into_inner();
    let mut child_pid = 0u32;
    let status = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.message().await {
                Ok(Some(api::CallEvent {
                    event: Some(api::call_event::Event::Output(output)),
                })) => {
                    child_pid = String::from_utf8_lossy(&output.data)
                        .trim()
                        .parse()
                        .unwrap_or(0);
                }
                Ok(other) => panic!("the stubborn call ended without an error: {other:?}"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stubborn call answered");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("replaced"), "{status:?}");
    let restored = next_event(&mut events, api::EventKind::Restored).await;
    assert_ne!(restored.worker_pid, recycled.worker_pid_after);
    assert!(!process_alive(recycled.worker_pid_after));
    assert!(child_pid > 0, "the script printed its child's pid");
    assert!(
        wait_for_exit(child_pid, DEADLINE),
        "the killed worker's own child process still runs"
    );

    // A call waiting behind another call of the session times out without reaching the
    // worker: the running call is not disturbed.
    let mut runner = client.clone();
    let slow = tokio::spawn({
        let id = id.clone();
        async move {
            call(
                &mut runner,
                script(
                    &id,
                    "import time, os\ntime.sleep(3)\nprint(os.getpid())\n",
                    0,
                ),
            )
            .await
        }
    });
    wait_for_runs_in_flight(&mut client, &id, 1).await;
    let status = call(&mut client, script(&id, "print('never')", 300))
        .await
        .expect_err("timed out while queued");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("never ran"), "{status:?}");
    let finished = slow.await.expect("task").expect("the running call");
    assert_eq!(finished.stdout.trim(), restored.worker_pid.to_string());
    let finished = call(&mut client, script(&id, "print('fresh')", 0))
        .await
        .expect("a call in the fresh worker");
    assert_eq!(finished.stdout.trim(), "fresh");

    // A caller that goes away mid-call with close_session_after leaves nothing behind.
    let once = create_python(&mut client, None).await;
    let mut request = script(
        &once.session_id,
        "print('started', flush=True)\nimport time\ntime.sleep(600)\n",
        0,
    );
    request.close_session_after = true;
    let mut stream = client.call(request).await.expect("call").into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("first output")
        .expect("stream")
        .expect("an event");
    assert!(matches!(
        first.event,
        Some(api::call_event::Event::Output(_))
    ));
    drop(stream);
    assert!(
        wait_for_exit(once.worker_pid, DEADLINE),
        "the worker of an abandoned call still runs"
    );
    let status = client
        .get_session(api::GetSessionRequest {
            session_id: once.session_id.clone(),
        })
        .await
        .expect_err("the one-call session is closed");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_session_over_its_hard_limit_is_stopped_while_others_go_on() {
    let daemon = python_daemon(&[("TFSD_POOL_SIZE", "0".as_ref())]);
    let mut client = daemon.client().await;
    let greedy = create_python(
        &mut client,
        Some(api::MemoryPolicy {
            hard_limit_bytes: 768 << 20,
            ..Default::default()
        }),
    )
    .await;
    let modest = create_python(&mut client, None).await;
    let hog = "import time\nblocks = []\nfor _ in range(40):\n    blocks.append(bytearray(64 << 20))\n    time.sleep(0.05)\ntime.sleep(600)\n";
    let mut greedy_client = client.clone();
    let greedy_call = tokio::spawn({
        let id = greedy.session_id.clone();
        async move { call(&mut greedy_client, script(&id, hog, 0)).await }
    });
    let finished = call(
        &mut client,
        script(&modest.session_id, "print(sum(range(10)))", 0),
    )
    .await
    .expect("the other session's call");
    assert_eq!(finished.stdout.trim(), "45");
    let status = greedy_call
        .await
        .expect("task")
        .expect_err("stopped at its hard limit");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("hard limit"), "{status:?}");
    let mut events = client
        .watch_events(api::WatchEventsRequest {
            session_id: greedy.session_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    // Restored in a fresh process (or already restored by the time we watch).
    let info = session(&mut client, &greedy.session_id).await;
    if info.state != api::SessionState::Ready as i32 || info.worker_pid == greedy.worker_pid {
        next_event(&mut events, api::EventKind::Restored).await;
    }
    let info = session(&mut client, &greedy.session_id).await;
    assert_ne!(info.worker_pid, greedy.worker_pid);
    let finished = call(&mut client, script(&greedy.session_id, "print('again')", 0))
        .await
        .expect("a call after the restore");
    assert_eq!(finished.stdout.trim(), "again");
}
