//! What sessions know of GPUs: each worker's GPU memory (`gpu::attribution`) added to the
//! memory figures the manager reports (GetSession, ListSessions, reset answers, events, the
//! policy's observations), and the devices for GetDaemonStatus. Without an NVIDIA driver
//! every function here returns at once: `Gpus::sample` is `None` without a call.

use std::sync::Arc;

use super::{SessionManager, SessionSnapshot};
use crate::gpu::{GpuSample, Gpus};
use crate::memory::MemoryUsage;
use crate::worker::WorkerProcess;

impl SessionManager {
    /// Gives the manager the host's GPUs (once, at start-up); without it, GPU figures are
    /// empty, as on a host without a driver.
    pub fn attach_gpus(&self, gpus: Arc<Gpus>) {
        let _ = self.gpus.set(gpus);
    }

    /// The host's GPUs; `None` before `attach_gpus`.
    pub fn gpus(&self) -> Option<&Arc<Gpus>> {
        self.gpus.get()
    }

    /// One sample of every device; `None` without a driver.
    pub(super) fn gpu_sample(&self) -> Option<GpuSample> {
        self.gpus.get()?.sample()
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
        let Some(gpus) = self.gpus.get() else {
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
