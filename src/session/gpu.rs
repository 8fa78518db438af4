//! What sessions know of GPUs: each worker's GPU memory (`gpu::attribution`) added to the
//! memory figures the manager reports (GetSession, ListSessions, reset answers, events, the
//! policy's observations), and the devices for GetDaemonStatus. Without an NVIDIA driver
//! every function here returns at once: `Gpus::sample` is `None` without a call.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Runtime, SessionManager, SessionSnapshot};
use crate::error::{Error, Result};
use crate::gpu::placement::{self, PlacementError};
use crate::gpu::{GpuConfig, GpuRequest, GpuSample, Gpus, Placement};
use crate::memory::MemoryUsage;
use crate::worker::WorkerProcess;

/// A session's GPUs: what its workers see, and the environment that makes them see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionGpus {
    pub placement: Placement,
    /// On top of the pool's environment (`gpu::placement::env_override`); empty: any warm
    /// worker will do.
    pub env: BTreeMap<String, String>,
}

impl SessionManager {
    /// Gives the manager the host's GPUs and the `[gpu]` config (once, at start-up);
    /// without it, GPU figures are empty and only "any GPU" requests are taken, as on a
    /// host without a driver.
    pub fn attach_gpus(&self, gpus: Arc<Gpus>, config: GpuConfig) {
        let _ = self.gpus.set((gpus, config));
    }

    /// The host's GPUs; `None` before `attach_gpus`.
    pub fn gpus(&self) -> Option<&Arc<Gpus>> {
        self.gpus.get().map(|(gpus, _)| gpus)
    }

    /// One sample of every device; `None` without a driver.
    pub(super) fn gpu_sample(&self) -> Option<GpuSample> {
        self.gpus.get()?.0.sample()
    }

    /// The GPUs a session of `runtime` asking `request` gets, and what its workers need on
    /// top of their pool's environment for it, or why the request cannot be met.
    pub(super) fn session_gpus(
        &self,
        runtime: Runtime,
        request: &GpuRequest,
    ) -> Result<SessionGpus> {
        let default_config = GpuConfig::default();
        let (count, host, config) = match self.gpus.get() {
            Some((gpus, config)) => (gpus.device_count(), gpus.description(), config),
            None => (0, "GPUs not detected", &default_config),
        };
        let (pool, key, inherited) = match runtime {
            Runtime::Graph => (&config.graph, "gpu.graph_devices", &config.inherited[0]),
            Runtime::Python => (&config.python, "gpu.python_devices", &config.inherited[1]),
        };
        let placement = placement::resolve(request, pool, key, inherited.as_deref(), count, host)
            .map_err(|error| match error {
            PlacementError::Invalid(message) => Error::InvalidArgument(message),
            PlacementError::Unavailable(message) => Error::FailedPrecondition(message),
        })?;
        Ok(SessionGpus {
            env: placement::env_override(&placement, pool),
            placement,
        })
    }

    /// `worker`'s memory now, its GPU memory included.
    pub(super) fn worker_memory(&self, worker: &WorkerProcess) -> MemoryUsage {
        let mut usage = worker.memory();
        if let Some(sample) = self.gpu_sample() {
            usage.gpu = sample
                .by_worker(&[worker.pid()])
                .remove(&worker.pid())
                .unwrap_or_default();
        }
        usage
    }

    /// Adds each session's GPU memory to its snapshot, from one sample for them all.
    pub(super) fn add_gpu_memory(&self, snapshots: &mut [SessionSnapshot]) {
        let Some(sample) = self.gpu_sample() else {
            return;
        };
        let pids: Vec<u32> = snapshots.iter().map(|s| s.worker_pid).collect();
        let mut usage = sample.by_worker(&pids);
        for snapshot in snapshots {
            snapshot.memory.gpu = usage.remove(&snapshot.worker_pid).unwrap_or_default();
        }
    }

    /// The devices in one line, and each device's figures, for GetDaemonStatus.
    pub(super) fn gpu_status(&self) -> (String, Vec<crate::gpu::DeviceSample>) {
        let Some((gpus, _)) = self.gpus.get() else {
            return (String::new(), Vec::new());
        };
        let devices = gpus
            .sample()
            .map(|sample| {
                sample
                    .devices
                    .into_iter()
                    .map(|mut device| {
                        device.processes.clear();
                        device
                    })
                    .collect()
            })
            .unwrap_or_default();
        (gpus.description().to_string(), devices)
    }
}
