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
    let (daemon, log) = Daemon::start_capturing_log(&[("RUST_LOG", info)]);
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
    // Said once in the log, at start-up (the log is read up to the line, with a deadline).
    let started = Instant::now();
    let mut said = 0;
    while started.elapsed() < DEADLINE {
        let Ok(line) = log.recv_timeout(DEADLINE) else {
            break;
        };
        if line.contains("GPUs: ") {
            said += 1;
            assert!(line.contains(&status.gpu), "{line}");
            break;
        }
    }
    assert_eq!(said, 1, "no 'GPUs: ' line in the daemon's log");

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
