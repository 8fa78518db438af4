//! GPUs from the outside: the real daemon on this host. On a host without an NVIDIA driver
//! (the development machine) tfsd must run exactly as before and say so once; where NVML
//! loads, the devices must be listed. What needs a GPU itself (a session's figure against
//! NVML's, a GPU-limit recycle, memory given back) is checked by scripts/device-check-gpu
//! on a GPU machine; here, its skip is.

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;
use tfsd::proto::tfsd::v1 as api;

/// Whether NVML loads on this host, as the daemon will see it.
fn host_has_nvml() -> bool {
    tfsd::gpu::Gpus::detect().present()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_says_once_which_gpus_it_sees() {
    let info = std::ffi::OsStr::new("info");
    // A device no host here has (NVML indices run from 0), to see the warning.
    let dir = TempDir::new("gpu-status");
    let config = dir.config("[gpu]\ngraph_devices = [63]\n");
    let (daemon, log) =
        Daemon::start_capturing_log_with(&["--config", &config], &[("RUST_LOG", info)]);
    let mut client = daemon.client().await;
    let status = client
        .get_daemon_status(api::GetDaemonStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    if host_has_nvml() {
        assert!(!status.gpus.is_empty(), "{status:?}");
        assert!(status.gpu.contains("GPU"), "{}", status.gpu);
    } else {
        assert!(
            status.gpu.starts_with("no NVIDIA driver"),
            "GetDaemonStatus.gpu = {:?}",
            status.gpu
        );
        assert!(status.gpus.is_empty());
        // No series for devices that are not there.
        let metrics = daemon.scrape_metrics();
        assert!(
            !metrics.contains("tfsd_gpu_memory_total_bytes{"),
            "{metrics}"
        );
        assert!(!metrics.contains("tfsd_session_gpu_bytes{"), "{metrics}");
    }
    // Said once in the log, at start-up, then the warning about the configured device (the
    // log is read up to the lines, with a deadline).
    let started = Instant::now();
    let (mut said, mut warned) = (0, false);
    while started.elapsed() < DEADLINE && !warned {
        let Ok(line) = log.recv_timeout(DEADLINE) else {
            break;
        };
        if line.contains("GPUs: ") {
            said += 1;
            assert!(line.contains(&status.gpu), "{line}");
        }
        warned |= line.contains("gpu.graph_devices names GPUs [63]");
    }
    assert_eq!(said, 1, "one 'GPUs: ' line in the daemon's log");
    assert!(warned, "no warning about gpu.graph_devices");

    // The CLI shows the same line.
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "status"])
        .output()
        .expect("tfsd status");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with("GPUs"))
        .unwrap_or_else(|| panic!("no GPUs line in {stdout}"));
    if !host_has_nvml() {
        assert!(line.contains("no NVIDIA driver"), "{line}");
    }
    let json = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "status", "--json"])
        .output()
        .expect("tfsd status --json");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(json["gpu"], status.gpu.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_without_gpu_memory_report_none() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let session = create(&mut client, model_graph()).await;
    let memory = session.memory.expect("memory");
    // A CPU graph session holds no GPU memory, whatever the host.
    assert!(memory.gpu.is_empty(), "{memory:?}");
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "sessions"])
        .output()
        .expect("tfsd sessions");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("GPU MiB"), "{stdout}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&session.session_id))
        .expect("the session's row");
    assert!(row.split_whitespace().any(|cell| cell == "-"), "{row}");
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "show", &session.session_id])
        .output()
        .expect("tfsd show");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("GPU memory") && line.ends_with("none")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_limits_are_taken_capped_and_shown() {
    let dir = TempDir::new("gpu-limits");
    let config = dir.config(
        "[policy]\ngpu_soft_limit = \"1GiB\"\nmax_gpu_hard_limit = \"4GiB\"\n\
         [policy.pressure]\nmin_gpu_free = \"512MiB\"\n",
    );
    let daemon = Daemon::start_with(&["--config", &config]);
    let mut client = daemon.client().await;
    let session = client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            memory_policy: Some(api::MemoryPolicy {
                gpu_hard_limit_bytes: 64 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .expect("session");
    let policy = session.memory_policy.expect("policy");
    // The default soft limit, and the asked hard limit capped by the ceiling.
    assert_eq!(policy.gpu_soft_limit_bytes, 1 << 30);
    assert_eq!(policy.gpu_hard_limit_bytes, 4 << 30);
    // GetSession shows the same effective limits.
    let again = client
        .get_session(api::GetSessionRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(again.memory_policy, Some(policy));
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["check-config", "--config", &config])
        .output()
        .expect("tfsd check-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("policy.max_gpu_hard_limit") && l.contains("4 GiB")),
        "{stdout}"
    );
}

/// A daemon whose Python workers import nothing (fast to start) under `[gpu]` `gpu_table`.
fn python_daemon(dir: &TempDir, gpu_table: &str) -> Daemon {
    let config = dir.config(&format!(
        "[python]\ninterpreter = {:?}\npreload = []\npool_size = 1\n[gpu]\n{gpu_table}\n",
        python_interpreter().display().to_string()
    ));
    Daemon::start_with(&["--config", &config])
}

async fn create_python(client: &mut Client, gpus: Option<api::GpuPlacement>) -> api::SessionInfo {
    client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            gpus,
            ..Default::default()
        })
        .await
        .expect("create a Python session")
        .into_inner()
        .session
        .expect("session info")
}

/// The worker's view of the GPU variables, one `NAME=VALUE` line each ("unset" if absent).
async fn gpu_environment(client: &mut Client, session_id: &str) -> String {
    let source = "import os\n\
                  for name in ('CUDA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER', \
                  'TF_FORCE_GPU_ALLOW_GROWTH', 'TF_GPU_ALLOCATOR'):\n    \
                  print(name + '=' + os.environ.get(name, 'unset'))\n";
    let request = api::CallRequest {
        session_id: session_id.to_string(),
        target: Some(api::call_request::Target::Script(api::Script {
            path: "gpu_env.py".to_string(),
            source: source.as_bytes().to_vec(),
            argv: Vec::new(),
        })),
        timeout_ms: 0,
        close_session_after: false,
    };
    let mut events = client.call(request).await.expect("call").into_inner();
    let mut stdout = String::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.message().await.expect("call event") {
            match event.event {
                Some(api::call_event::Event::Output(output))
                    if output.stream == api::Stream::Stdout as i32 =>
                {
                    stdout.push_str(&String::from_utf8_lossy(&output.data));
                }
                Some(api::call_event::Event::Exception(exception)) => {
                    panic!("the script raised: {exception:?}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the call answered within the deadline");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_configured_without_gpus_hides_them_from_its_workers() {
    let dir = TempDir::new("gpu-hidden");
    let daemon = python_daemon(
        &dir,
        "python_devices = []\nallocator = \"cuda_malloc_async\"",
    );
    let mut client = daemon.client().await;
    let session = create_python(&mut client, None).await;
    let env = gpu_environment(&mut client, &session.session_id).await;
    assert!(env.contains("CUDA_VISIBLE_DEVICES=-1\n"), "{env}");
    assert!(env.contains("CUDA_DEVICE_ORDER=PCI_BUS_ID\n"), "{env}");
    assert!(env.contains("TF_FORCE_GPU_ALLOW_GROWTH=true\n"), "{env}");
    assert!(
        env.contains("TF_GPU_ALLOCATOR=cuda_malloc_async\n"),
        "{env}"
    );
    // The pool's placement is the session's.
    assert_eq!(
        session.gpus,
        Some(api::GpuPlacement {
            devices: Vec::new(),
            none: true
        })
    );
    // A GPU the pool does not allow is refused, naming the key (or, on a GPU-less host,
    // the missing GPU first).
    let refused = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            gpus: Some(api::GpuPlacement {
                devices: vec![0],
                none: false,
            }),
            ..Default::default()
        })
        .await
        .expect_err("GPU 0 is not allowed");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("GPU 0"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_asking_for_no_gpu_gets_a_worker_of_its_own_across_recycles() {
    if std::env::var_os("CUDA_VISIBLE_DEVICES").is_some() {
        // The daemon inherits it and the pool would not differ from the request.
        eprintln!("CUDA_VISIBLE_DEVICES is set for the tests: nothing to compare with");
        return;
    }
    let dir = TempDir::new("gpu-none");
    let daemon = python_daemon(&dir, "");
    let mut client = daemon.client().await;
    // The pool's workers see every GPU (the variable is left alone)...
    let any = create_python(&mut client, None).await;
    let env = gpu_environment(&mut client, &any.session_id).await;
    assert!(env.contains("CUDA_VISIBLE_DEVICES=unset\n"), "{env}");
    // ... so a session asking for none gets a worker started with it hidden,
    let none = create_python(
        &mut client,
        Some(api::GpuPlacement {
            devices: Vec::new(),
            none: true,
        }),
    )
    .await;
    let env = gpu_environment(&mut client, &none.session_id).await;
    assert!(env.contains("CUDA_VISIBLE_DEVICES=-1\n"), "{env}");
    // SessionInfo says which GPUs each sees.
    assert_eq!(
        none.gpus,
        Some(api::GpuPlacement {
            devices: Vec::new(),
            none: true
        })
    );
    assert_eq!(any.gpus, Some(api::GpuPlacement::default()));
    let output = Command::new(env!("CARGO_BIN_EXE_tfsd"))
        .args(["--address", &daemon.address, "show", &none.session_id])
        .output()
        .expect("tfsd show");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("GPUs ") && line.ends_with("none")),
        "{stdout}"
    );
    // and so does every worker after it.
    let recycled = client
        .recycle_session(api::RecycleSessionRequest {
            session_id: none.session_id.clone(),
            preserve_variables: false,
        })
        .await
        .expect("recycle")
        .into_inner();
    assert_ne!(recycled.worker_pid_after, recycled.worker_pid_before);
    let env = gpu_environment(&mut client, &none.session_id).await;
    assert!(env.contains("CUDA_VISIBLE_DEVICES=-1\n"), "{env}");

    // A request that contradicts itself is INVALID_ARGUMENT.
    let contradiction = client
        .create_session(api::CreateSessionRequest {
            runtime: api::Runtime::Python as i32,
            gpus: Some(api::GpuPlacement {
                devices: vec![0],
                none: true,
            }),
            ..Default::default()
        })
        .await
        .expect_err("none and devices");
    assert_eq!(contradiction.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_this_host_lacks_is_refused_by_name() {
    let gpus = tfsd::gpu::Gpus::detect();
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let missing = gpus.device_count() + 3;
    let refused = client
        .create_session(api::CreateSessionRequest {
            graph_def: model_graph(),
            gpus: Some(api::GpuPlacement {
                devices: vec![missing],
                none: false,
            }),
            ..Default::default()
        })
        .await
        .expect_err("no such GPU");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&format!(
            "the session asks for GPU {missing} but this host has"
        )),
        "{}",
        refused.message()
    );
    if !gpus.present() {
        assert!(
            refused.message().contains("no GPU (no NVIDIA driver"),
            "{}",
            refused.message()
        );
    }
}

#[test]
fn the_device_check_skips_cleanly_without_a_gpu() {
    if host_has_nvml() {
        eprintln!("this host has an NVIDIA driver: the device check is run by hand there");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/device-check-gpu");
    let output = Command::new(script)
        .output()
        .expect("run scripts/device-check-gpu");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {stdout}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(report["gpu"], false);
    assert!(
        report["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("no GPU")),
        "{report}"
    );
}
