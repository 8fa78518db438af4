//! The `[gpu]` table: which devices each pool's workers see, and TensorFlow's GPU settings
//! for every worker.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::placement::{CUDA_VISIBLE_DEVICES, Placement};

/// TensorFlow grows its GPU pool as needed instead of taking nearly all of every visible
/// device at its first GPU op (`TF_FORCE_GPU_ALLOW_GROWTH=true`): several sessions can then
/// share a device, and each session's NVML figure is what it used, not the whole device.
pub const DEFAULT_MEMORY_GROWTH: bool = true;

/// Devices (NVML indices) the most a list may name.
const MAX_DEVICES: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGpu {
    /// `"all"` or a list of device indices (`[]`: none).
    graph_devices: Option<toml::Value>,
    python_devices: Option<toml::Value>,
    memory_growth: Option<bool>,
    /// TF_GPU_ALLOCATOR: "" (TensorFlow's BFC allocator) or "cuda_malloc_async".
    allocator: Option<String>,
}

/// `[gpu]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuConfig {
    /// What graph-session workers see (`gpu.graph_devices`).
    pub graph: Placement,
    /// What Python-session workers see (`gpu.python_devices`).
    pub python: Placement,
    /// `TF_FORCE_GPU_ALLOW_GROWTH` for every worker.
    pub memory_growth: bool,
    /// `TF_GPU_ALLOCATOR` for every worker; `None`: TensorFlow's default (BFC).
    pub allocator: Option<String>,
    /// The `CUDA_VISIBLE_DEVICES` a pool placed at "all" passes on to its workers (the
    /// daemon's own environment, or `workers.env` / `python.env`), graph then Python: there
    /// a session's device indices would name devices the operator did not hand over, so
    /// such requests are refused. Filled in at start-up (`with_inherited`), not read from
    /// `[gpu]`.
    pub inherited: [Option<String>; 2],
}

fn placement(key: &str, value: Option<toml::Value>) -> anyhow::Result<Placement> {
    let wrong =
        || format!("{key} must be \"all\" or a list of GPU indices like [0, 1] ([] for no GPU)");
    match value {
        None => Ok(Placement::All),
        Some(toml::Value::String(text)) if text == "all" => Ok(Placement::All),
        Some(toml::Value::Array(items)) => {
            if items.len() > MAX_DEVICES {
                bail!("{key} names {} GPUs (at most {MAX_DEVICES})", items.len());
            }
            let mut devices = Vec::with_capacity(items.len());
            for item in items {
                let index = item
                    .as_integer()
                    .and_then(|i| u32::try_from(i).ok())
                    .with_context(wrong)?;
                if devices.contains(&index) {
                    bail!("{key} names GPU {index} twice");
                }
                devices.push(index);
            }
            Ok(Placement::Devices(devices))
        }
        Some(_) => bail!(wrong()),
    }
}

impl GpuConfig {
    pub fn from_raw(raw: RawGpu) -> anyhow::Result<GpuConfig> {
        let allocator = match raw.allocator.as_deref() {
            None | Some("") => None,
            Some(name @ "cuda_malloc_async") => Some(name.to_string()),
            Some(other) => bail!(
                "gpu.allocator = {} must be \"\" (TensorFlow's default allocator) or \
                 \"cuda_malloc_async\"",
                crate::error::quoted(other)
            ),
        };
        Ok(GpuConfig {
            graph: placement("gpu.graph_devices", raw.graph_devices)?,
            python: placement("gpu.python_devices", raw.python_devices)?,
            memory_growth: raw.memory_growth.unwrap_or(DEFAULT_MEMORY_GROWTH),
            allocator,
            inherited: [None, None],
        })
    }

    /// This config with the `CUDA_VISIBLE_DEVICES` each pool's workers inherit where the
    /// pool does not set one itself (see `inherited`).
    pub fn with_inherited(
        &self,
        graph_env: &BTreeMap<String, String>,
        python_env: &BTreeMap<String, String>,
        daemon: Option<String>,
    ) -> GpuConfig {
        let inherited = |placement: &Placement, env: &BTreeMap<String, String>| {
            (*placement == Placement::All)
                .then(|| {
                    env.get(CUDA_VISIBLE_DEVICES)
                        .cloned()
                        .or_else(|| daemon.clone())
                })
                .flatten()
        };
        GpuConfig {
            inherited: [
                inherited(&self.graph, graph_env),
                inherited(&self.python, python_env),
            ],
            ..self.clone()
        }
    }

    /// One warning per pool whose configured devices this host (`host_devices` devices per
    /// NVML) does not have: CUDA skips a missing index and every one after it, so such a
    /// pool's workers may see fewer GPUs than the config says.
    pub fn missing_devices(&self, host_devices: u32) -> Vec<String> {
        [
            ("gpu.graph_devices", &self.graph),
            ("gpu.python_devices", &self.python),
        ]
        .into_iter()
        .filter_map(|(key, placement)| {
            let Placement::Devices(devices) = placement else {
                return None;
            };
            let missing: Vec<u32> = devices
                .iter()
                .copied()
                .filter(|d| *d >= host_devices)
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "{key} names GPUs {missing:?} but NVML shows {host_devices} here: its \
                     workers will not see them"
                )
            })
        })
        .collect()
    }

    /// A pool's worker environment: tfsd's GPU defaults, then the operator's `env` (which
    /// wins, e.g. for `TF_FORCE_GPU_ALLOW_GROWTH`), then the pool's placement (which wins
    /// over everything: it is what the config promises).
    pub fn worker_env(
        &self,
        env: &BTreeMap<String, String>,
        placement: &Placement,
    ) -> BTreeMap<String, String> {
        let mut all = BTreeMap::from([
            ("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()),
            (
                "TF_FORCE_GPU_ALLOW_GROWTH".to_string(),
                self.memory_growth.to_string(),
            ),
        ]);
        if let Some(allocator) = &self.allocator {
            all.insert("TF_GPU_ALLOCATOR".to_string(), allocator.clone());
        }
        all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(visible) = placement.visible_devices() {
            all.insert(CUDA_VISIBLE_DEVICES.to_string(), visible);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(text: &str) -> anyhow::Result<GpuConfig> {
        GpuConfig::from_raw(toml::from_str(text)?)
    }

    #[test]
    fn defaults_see_every_gpu_with_memory_growth() {
        let config = gpu("").expect("valid");
        assert_eq!(config.graph, Placement::All);
        assert_eq!(config.python, Placement::All);
        assert!(config.memory_growth);
        let env = config.worker_env(&BTreeMap::new(), &config.graph);
        assert_eq!(env["TF_FORCE_GPU_ALLOW_GROWTH"], "true");
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"));
        assert!(!env.contains_key("TF_GPU_ALLOCATOR"));
    }

    #[test]
    fn every_key_is_read() {
        let config = gpu(
            "graph_devices = [1, 0]\npython_devices = []\nmemory_growth = false\n\
             allocator = \"cuda_malloc_async\"",
        )
        .expect("valid");
        assert_eq!(config.graph, Placement::Devices(vec![1, 0]));
        assert_eq!(config.python, Placement::Devices(vec![]));
        let env = config.worker_env(
            &BTreeMap::from([("CUDA_VISIBLE_DEVICES".to_string(), "7".to_string())]),
            &config.python,
        );
        assert_eq!(env["TF_FORCE_GPU_ALLOW_GROWTH"], "false");
        assert_eq!(env["TF_GPU_ALLOCATOR"], "cuda_malloc_async");
        // The placement wins over an operator's own CUDA_VISIBLE_DEVICES.
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "-1");
        // The operator's env wins over tfsd's defaults.
        let env = config.worker_env(
            &BTreeMap::from([("TF_FORCE_GPU_ALLOW_GROWTH".to_string(), "true".to_string())]),
            &config.graph,
        );
        assert_eq!(env["TF_FORCE_GPU_ALLOW_GROWTH"], "true");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "1,0");
    }

    #[test]
    fn devices_the_host_lacks_are_warned_about() {
        let config = gpu("graph_devices = [0, 2]\npython_devices = []").expect("valid");
        assert!(config.missing_devices(3).is_empty());
        let warnings = config.missing_devices(1);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("gpu.graph_devices names GPUs [2]"),
            "{warnings:?}"
        );
        assert!(gpu("").expect("valid").missing_devices(0).is_empty());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("graph_devices = \"some\"", "gpu.graph_devices"),
            ("python_devices = [-1]", "gpu.python_devices"),
            ("python_devices = [\"0\"]", "gpu.python_devices"),
            ("graph_devices = [0, 0]", "gpu.graph_devices"),
            ("allocator = \"bfc\"", "gpu.allocator"),
        ] {
            let error = gpu(text).expect_err(text);
            assert!(format!("{error:#}").contains(key), "{text}: {error:#}");
        }
        assert!(gpu("devices = []").is_err(), "unknown keys are refused");
    }
}
