//! GPU memory: which devices the host has, and how much of each one every session's worker
//! holds.
//!
//! NVIDIA's management library (NVML, `libnvidia-ml.so.1`, installed with the driver) is
//! loaded at run time (`nvml.rs`, through the `nvml-wrapper` crate, which dlopens it in
//! `Nvml::init`), so a host without the driver runs exactly as without this module: `Gpus`
//! then holds no backend, says "no NVIDIA driver ..." once, and every sample is `None`
//! without a call or a file read. Everything else here is pure and tested with made-up
//! samples: `attribution.rs` (a worker's share of each device, summed over its processes),
//! `placement.rs` (which devices a worker may see, as `CUDA_VISIBLE_DEVICES`) and
//! `config.rs` (the `[gpu]` table).
//!
//! NVML reports host pids. tfsd matches them with `/proc`, so a containerised tfsd must
//! share the host's pid namespace (`docker run --pid=host`, Kubernetes `hostPID: true`);
//! otherwise no process matches and every session shows 0 GPU bytes (README, "GPU").
//!
//! This module must not touch sessions or the policy: it answers samples; `session/` and
//! `policy/` decide what they mean.

pub mod attribution;
pub mod config;
mod nvml;
pub mod placement;

use std::collections::HashMap;

pub use attribution::{GpuUsage, ProcFs, ProcessTree};
pub use config::GpuConfig;
pub use placement::{GpuRequest, Placement, PlacementError};

/// One process on one device, as NVML lists it. `used_bytes` is `None` where the driver
/// cannot say (NVML's "not available").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceProcess {
    pub pid: u32,
    pub used_bytes: Option<u64>,
}

/// One device now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSample {
    /// NVML's index: PCI bus order, the order `CUDA_DEVICE_ORDER=PCI_BUS_ID` gives CUDA.
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Compute and graphics processes, each pid once.
    pub processes: Vec<DeviceProcess>,
}

/// Every device at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSample {
    pub devices: Vec<DeviceSample>,
}

impl GpuSample {
    /// Each of `workers`' share of every device, summed over the worker's processes (see
    /// `attribution::attribute`), read from `/proc`.
    pub fn by_worker(&self, workers: &[u32]) -> HashMap<u32, Vec<GpuUsage>> {
        attribution::attribute(self, workers, &ProcFs)
    }
}

/// What reads the devices: NVML on a real host, a made-up sequence in tests.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// Every device now; `Err` says why the driver could not answer.
    fn sample(&self) -> Result<GpuSample, String>;
}

/// The host's GPUs, or their absence, for the whole life of the daemon.
#[derive(Debug)]
pub struct Gpus {
    backend: Option<Box<dyn GpuBackend>>,
    /// What GetDaemonStatus and the start-up log say: the devices, or why there are none.
    description: String,
    /// How many devices there were at start-up (placement checks requests against it).
    device_count: u32,
    /// A failed sample is logged once per run of failures, not every tick.
    failing: std::sync::atomic::AtomicBool,
}

impl Gpus {
    /// Loads NVML; on a host without the NVIDIA driver, no GPUs (and no further work).
    pub fn detect() -> Gpus {
        match nvml::NvmlBackend::load() {
            Ok(backend) => Gpus::with_backend(Box::new(backend)),
            Err(reason) => Gpus::absent(format!("no NVIDIA driver ({reason})")),
        }
    }

    /// No GPUs, for `reason`.
    pub fn absent(reason: String) -> Gpus {
        Gpus {
            backend: None,
            description: reason,
            device_count: 0,
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// GPUs read through `backend`: the daemon's NVML, or a test's made-up devices.
    pub fn with_backend(backend: Box<dyn GpuBackend>) -> Gpus {
        match backend.sample() {
            Ok(sample) => Gpus {
                description: describe(&sample),
                device_count: sample.devices.len() as u32,
                backend: Some(backend),
                failing: std::sync::atomic::AtomicBool::new(false),
            },
            Err(reason) => Gpus::absent(format!("NVIDIA driver loaded but unusable ({reason})")),
        }
    }

    /// The devices in one line ("1 GPU: 0 NVIDIA H200 (139.8 GiB)"), or why there are none.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether NVML answered at start-up.
    pub fn present(&self) -> bool {
        self.backend.is_some()
    }

    /// Devices found at start-up.
    pub fn device_count(&self) -> u32 {
        self.device_count
    }

    /// Every device now; `None` without a driver (no work at all) or when NVML fails (logged
    /// once per run of failures).
    pub fn sample(&self) -> Option<GpuSample> {
        use std::sync::atomic::Ordering;
        let backend = self.backend.as_ref()?;
        match backend.sample() {
            Ok(sample) => {
                if self.failing.swap(false, Ordering::SeqCst) {
                    tracing::info!("NVML answers again");
                }
                Some(sample)
            }
            Err(reason) => {
                if !self.failing.swap(true, Ordering::SeqCst) {
                    tracing::warn!("could not read GPU memory from NVML: {reason}");
                }
                None
            }
        }
    }
}

/// "2 GPUs: 0 NVIDIA H200 (139.8 GiB), 1 NVIDIA H200 (139.8 GiB)" or "NVML found no GPU".
pub fn describe(sample: &GpuSample) -> String {
    if sample.devices.is_empty() {
        return "NVML found no GPU".to_string();
    }
    let devices: Vec<String> = sample
        .devices
        .iter()
        .map(|device| {
            format!(
                "{} {} ({:.1} GiB)",
                device.index,
                device.name,
                device.total_bytes as f64 / f64::from(1u32 << 30)
            )
        })
        .collect();
    let count = sample.devices.len();
    let noun = if count == 1 { "GPU" } else { "GPUs" };
    format!("{count} {noun}: {}", devices.join(", "))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A made-up GPU backend for unit and daemon-side tests.
    use super::{GpuBackend, GpuSample};
    use std::sync::Mutex;

    /// Answers the sample it holds; `set` changes it.
    #[derive(Debug)]
    pub struct FixedGpus(pub Mutex<Result<GpuSample, String>>);

    impl FixedGpus {
        pub fn new(sample: GpuSample) -> FixedGpus {
            FixedGpus(Mutex::new(Ok(sample)))
        }
    }

    impl GpuBackend for std::sync::Arc<FixedGpus> {
        fn sample(&self) -> Result<GpuSample, String> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FixedGpus;
    use super::*;
    use std::sync::Arc;

    fn device(index: u32, total: u64, free: u64) -> DeviceSample {
        DeviceSample {
            index,
            name: "NVIDIA Test".to_string(),
            uuid: format!("GPU-{index}"),
            total_bytes: total,
            used_bytes: total - free,
            free_bytes: free,
            processes: Vec::new(),
        }
    }

    #[test]
    fn without_a_driver_there_is_no_sample_and_the_reason_is_said() {
        let gpus = Gpus::absent("no NVIDIA driver (libnvidia-ml.so.1: not found)".to_string());
        assert!(!gpus.present());
        assert_eq!(gpus.device_count(), 0);
        assert!(gpus.sample().is_none());
        assert!(gpus.description().starts_with("no NVIDIA driver"));
    }

    #[test]
    fn devices_are_described_and_sampled() {
        let sample = GpuSample {
            devices: vec![device(0, 80 << 30, 70 << 30), device(1, 80 << 30, 80 << 30)],
        };
        let backend = Arc::new(FixedGpus::new(sample.clone()));
        let gpus = Gpus::with_backend(Box::new(backend.clone()));
        assert!(gpus.present());
        assert_eq!(gpus.device_count(), 2);
        assert_eq!(
            gpus.description(),
            "2 GPUs: 0 NVIDIA Test (80.0 GiB), 1 NVIDIA Test (80.0 GiB)"
        );
        assert_eq!(gpus.sample(), Some(sample));
        // A failing driver: no sample (and one warning), then back.
        *backend.0.lock().expect("lock") = Err("GPU is lost".to_string());
        assert_eq!(gpus.sample(), None);
        assert_eq!(gpus.sample(), None);
        *backend.0.lock().expect("lock") = Ok(GpuSample::default());
        assert_eq!(gpus.sample(), Some(GpuSample::default()));
    }

    #[test]
    fn a_driver_that_fails_at_start_counts_as_none() {
        let backend = Arc::new(FixedGpus(std::sync::Mutex::new(Err(
            "Driver Not Loaded".to_string()
        ))));
        let gpus = Gpus::with_backend(Box::new(backend));
        assert!(!gpus.present());
        assert!(gpus.description().contains("Driver Not Loaded"));
    }

    #[test]
    fn this_host_is_detected_without_failing() {
        // On a host without the driver this is "no NVIDIA driver (...)"; on a GPU host the
        // devices. Either way detection returns and never panics.
        let gpus = Gpus::detect();
        assert!(!gpus.description().is_empty());
        if !gpus.present() {
            assert!(gpus.description().starts_with("no NVIDIA driver"));
            assert!(gpus.sample().is_none());
        }
    }
}
