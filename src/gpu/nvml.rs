//! The NVML backend: `libnvidia-ml.so.1` loaded at run time (nvml-wrapper dlopens it in
//! `Nvml::init`; nothing links against it), read once per sample: each device's memory and
//! the processes on it. The only file here that names NVML.

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

use super::{DeviceProcess, DeviceSample, GpuBackend, GpuSample};

pub struct NvmlBackend {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlBackend")
    }
}

impl NvmlBackend {
    /// Loads and initialises NVML; the error says why not (no library: no driver).
    pub fn load() -> Result<NvmlBackend, String> {
        Nvml::init()
            .map(|nvml| NvmlBackend { nvml })
            .map_err(|error| format!("libnvidia-ml.so.1 could not be loaded: {error}"))
    }
}

fn used(info: &ProcessInfo) -> Option<u64> {
    match info.used_gpu_memory {
        UsedGpuMemory::Used(bytes) => Some(bytes),
        UsedGpuMemory::Unavailable => None,
    }
}

impl GpuBackend for NvmlBackend {
    fn sample(&self) -> Result<GpuSample, String> {
        let count = self
            .nvml
            .device_count()
            .map_err(|error| format!("device count: {error}"))?;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(|error| format!("device {index}: {error}"))?;
            let memory = device
                .memory_info()
                .map_err(|error| format!("device {index} memory: {error}"))?;
            // A process using the device for compute and graphics is listed twice.
            let mut processes: Vec<DeviceProcess> = Vec::new();
            let compute = device
                .running_compute_processes()
                .map_err(|error| format!("device {index} processes: {error}"))?;
            // Graphics contexts are rare on a compute host; a driver without the call is
            // no reason to lose the compute figures.
            let graphics = device.running_graphics_processes().unwrap_or_default();
            for list in [compute, graphics] {
                for info in &list {
                    let process = DeviceProcess {
                        pid: info.pid,
                        used_bytes: used(info),
                    };
                    match processes.iter_mut().find(|p| p.pid == process.pid) {
                        Some(seen) => seen.used_bytes = seen.used_bytes.max(process.used_bytes),
                        None => processes.push(process),
                    }
                }
            }
            devices.push(DeviceSample {
                index,
                name: device.name().unwrap_or_default(),
                uuid: device.uuid().unwrap_or_default(),
                total_bytes: memory.total,
                used_bytes: memory.used,
                free_bytes: memory.free,
                processes,
            });
        }
        Ok(GpuSample { devices })
    }
}
