//! Which GPUs a worker may see, enforced with `CUDA_VISIBLE_DEVICES` in its environment.
//!
//! CUDA reads `CUDA_VISIBLE_DEVICES` once, when the process initialises it; a worker that
//! has started cannot be pointed at other devices. Warm workers are started before any
//! session is known, with their pool's placement (`[gpu] graph_devices`,
//! `python_devices`); a session asking for other devices therefore gets a worker started
//! for it (`WarmPool::take_with_env`), which costs a worker start (a quarter of a second
//! for a graph worker, seconds for a Python one). Indices are NVML's (nvidia-smi's), and
//! every worker gets `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that CUDA numbers devices the same
//! way (CUDA's default order is "fastest first").

use std::collections::BTreeMap;

/// The variable that hides devices from CUDA.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// What `CUDA_VISIBLE_DEVICES` says to hide every device: CUDA stops at the first index it
/// cannot use, so an invalid first index leaves none visible (an empty value is read as
/// "unset" by some tools).
pub const NO_DEVICES: &str = "-1";

/// Which devices a pool's workers (or one session's) may see.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Placement {
    /// Every device the daemon sees: `CUDA_VISIBLE_DEVICES` is left as the daemon's.
    #[default]
    All,
    /// These devices (NVML indices), in this order (CUDA numbers them 0, 1, ...); none
    /// when empty.
    Devices(Vec<u32>),
}

impl Placement {
    /// The value of `CUDA_VISIBLE_DEVICES` for this placement; `None`: leave it alone.
    pub fn visible_devices(&self) -> Option<String> {
        match self {
            Placement::All => None,
            Placement::Devices(devices) if devices.is_empty() => Some(NO_DEVICES.to_string()),
            Placement::Devices(devices) => Some(
                devices
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }

    /// "all GPUs", "no GPU", "GPUs [0, 2]".
    pub fn describe(&self) -> String {
        match self {
            Placement::All => "all GPUs".to_string(),
            Placement::Devices(devices) if devices.is_empty() => "no GPU".to_string(),
            Placement::Devices(devices) => format!("GPUs {devices:?}"),
        }
    }
}

/// What a session asked for at CreateSession.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuRequest {
    /// Whatever its pool's workers see (the default).
    #[default]
    Any,
    /// No GPU at all.
    None,
    /// These devices.
    Devices(Vec<u32>),
}

/// Why a request cannot be placed, as the client will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// The request itself is malformed (INVALID_ARGUMENT).
    Invalid(String),
    /// The host or the config does not have what it asks for (FAILED_PRECONDITION).
    Unavailable(String),
}

/// The placement for a session asking `request` from a pool placed at `pool` (configured
/// as `pool_key`), on a host whose NVML shows `host_devices` devices (`host` describes
/// them, or says why there are none).
pub fn resolve(
    request: &GpuRequest,
    pool: &Placement,
    pool_key: &str,
    inherited: Option<&str>,
    host_devices: u32,
    host: &str,
) -> Result<Placement, PlacementError> {
    let devices = match request {
        GpuRequest::Any => return Ok(pool.clone()),
        GpuRequest::None => return Ok(Placement::Devices(Vec::new())),
        GpuRequest::Devices(devices) => devices,
    };
    if devices.is_empty() {
        return Ok(pool.clone());
    }
    // The pool's workers see what an inherited CUDA_VISIBLE_DEVICES leaves them: indices
    // chosen here would replace it and reach devices the operator kept back.
    if let (Placement::All, Some(inherited)) = (pool, inherited) {
        return Err(PlacementError::Unavailable(format!(
            "the session asks for {} but {pool_key} = \"all\" passes on \
             CUDA_VISIBLE_DEVICES={}, which tfsd does not replace: set {pool_key} to a list of \
             devices to let sessions choose among them",
            gpu_list(devices),
            crate::error::quoted(inherited)
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = devices.iter().find(|d| !seen.insert(**d)) {
        return Err(PlacementError::Invalid(format!(
            "gpus.devices names GPU {twice} twice"
        )));
    }
    let missing: Vec<u32> = devices
        .iter()
        .copied()
        .filter(|d| *d >= host_devices)
        .collect();
    if !missing.is_empty() {
        let has = match host_devices {
            0 => format!("no GPU ({host})"),
            1 => "1 GPU (index 0)".to_string(),
            n => format!("{n} GPUs (indices 0 to {})", n - 1),
        };
        return Err(PlacementError::Unavailable(format!(
            "the session asks for {} but this host has {has}",
            gpu_list(&missing)
        )));
    }
    if let Placement::Devices(allowed) = pool {
        let refused: Vec<u32> = devices
            .iter()
            .copied()
            .filter(|d| !allowed.contains(d))
            .collect();
        if !refused.is_empty() {
            return Err(PlacementError::Unavailable(format!(
                "the session asks for {} but {pool_key} allows only {}",
                gpu_list(&refused),
                pool.describe()
            )));
        }
    }
    Ok(Placement::Devices(devices.clone()))
}

fn gpu_list(devices: &[u32]) -> String {
    let names: Vec<String> = devices.iter().map(u32::to_string).collect();
    let noun = if devices.len() == 1 { "GPU" } else { "GPUs" };
    format!("{noun} {}", names.join(", "))
}

/// What a worker for a session placed at `placement` needs on top of its pool's
/// environment (the pool placed at `pool`): nothing when they agree, so a warm worker
/// serves it; else `CUDA_VISIBLE_DEVICES`, and a worker is started for it.
pub fn env_override(placement: &Placement, pool: &Placement) -> BTreeMap<String, String> {
    if placement == pool {
        return BTreeMap::new();
    }
    // A pool with every device and a session asking for every device agree above; any
    // other placement is `Devices`.
    let value = placement
        .visible_devices()
        .unwrap_or_else(|| NO_DEVICES.to_string());
    BTreeMap::from([(CUDA_VISIBLE_DEVICES.to_string(), value)])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "2 GPUs: 0 A, 1 B";

    fn devices(list: &[u32]) -> GpuRequest {
        GpuRequest::Devices(list.to_vec())
    }

    #[test]
    fn placements_become_cuda_visible_devices() {
        assert_eq!(Placement::All.visible_devices(), None);
        assert_eq!(
            Placement::Devices(vec![]).visible_devices().as_deref(),
            Some("-1")
        );
        assert_eq!(
            Placement::Devices(vec![2, 0]).visible_devices().as_deref(),
            Some("2,0")
        );
    }

    #[test]
    fn any_takes_the_pools_placement_and_none_hides_every_gpu() {
        let pool = Placement::Devices(vec![1]);
        assert_eq!(
            resolve(&GpuRequest::Any, &pool, "gpu.graph_devices", None, 2, HOST),
            Ok(pool.clone())
        );
        assert_eq!(
            resolve(&devices(&[]), &pool, "gpu.graph_devices", None, 2, HOST),
            Ok(pool.clone())
        );
        assert_eq!(
            resolve(
                &GpuRequest::None,
                &pool,
                "gpu.graph_devices",
                None,
                0,
                "no NVIDIA driver"
            ),
            Ok(Placement::Devices(vec![]))
        );
    }

    #[test]
    fn devices_the_host_lacks_are_refused_by_name() {
        let error = resolve(
            &devices(&[0]),
            &Placement::All,
            "gpu.graph_devices",
            None,
            0,
            "no NVIDIA driver (libnvidia-ml.so.1 could not be loaded)",
        )
        .expect_err("no GPU here");
        assert_eq!(
            error,
            PlacementError::Unavailable(
                "the session asks for GPU 0 but this host has no GPU (no NVIDIA driver \
                 (libnvidia-ml.so.1 could not be loaded))"
                    .to_string()
            )
        );
        let error = resolve(
            &devices(&[1, 3, 4]),
            &Placement::All,
            "gpu.graph_devices",
            None,
            2,
            HOST,
        )
        .expect_err("3 and 4 are missing");
        assert_eq!(
            error,
            PlacementError::Unavailable(
                "the session asks for GPUs 3, 4 but this host has 2 GPUs (indices 0 to 1)"
                    .to_string()
            )
        );
    }

    #[test]
    fn devices_the_pool_does_not_allow_are_refused_naming_the_key() {
        let pool = Placement::Devices(vec![0]);
        let error = resolve(&devices(&[1]), &pool, "gpu.python_devices", None, 2, HOST)
            .expect_err("not allowed");
        assert_eq!(
            error,
            PlacementError::Unavailable(
                "the session asks for GPU 1 but gpu.python_devices allows only GPUs [0]"
                    .to_string()
            )
        );
        assert_eq!(
            resolve(&devices(&[0]), &pool, "gpu.python_devices", None, 2, HOST),
            Ok(Placement::Devices(vec![0]))
        );
        assert!(matches!(
            resolve(&devices(&[1, 1]), &Placement::All, "gpu.graph_devices", None, 2, HOST),
            Err(PlacementError::Invalid(message)) if message.contains("GPU 1 twice")
        ));
    }

    #[test]
    fn only_a_different_placement_needs_a_worker_of_its_own() {
        let pool = Placement::Devices(vec![0, 1]);
        assert!(env_override(&pool, &pool).is_empty());
        assert_eq!(
            env_override(&Placement::Devices(vec![1]), &pool),
            BTreeMap::from([(CUDA_VISIBLE_DEVICES.to_string(), "1".to_string())])
        );
        assert_eq!(
            env_override(&Placement::Devices(vec![]), &Placement::All),
            BTreeMap::from([(CUDA_VISIBLE_DEVICES.to_string(), "-1".to_string())])
        );
        assert!(env_override(&Placement::All, &Placement::All).is_empty());
    }

    #[test]
    fn a_pool_that_passes_on_an_inherited_cuda_visible_devices_refuses_device_indices() {
        let error = resolve(
            &devices(&[0]),
            &Placement::All,
            "gpu.python_devices",
            Some("2,3"),
            4,
            HOST,
        )
        .expect_err("indices would escape the inherited restriction");
        let PlacementError::Unavailable(message) = error else {
            panic!("{error:?}")
        };
        assert!(
            message.contains("CUDA_VISIBLE_DEVICES=\"2,3\""),
            "{message}"
        );
        assert!(
            message.contains("set gpu.python_devices to a list"),
            "{message}"
        );
        // Any and None stay fine: they replace nothing the operator set.
        assert_eq!(
            resolve(
                &GpuRequest::Any,
                &Placement::All,
                "gpu.python_devices",
                Some("2,3"),
                4,
                HOST
            ),
            Ok(Placement::All)
        );
        // A pool with its own list is what the config promises.
        assert_eq!(
            resolve(
                &devices(&[1]),
                &Placement::Devices(vec![0, 1]),
                "gpu.python_devices",
                Some("2,3"),
                4,
                HOST
            ),
            Ok(Placement::Devices(vec![1]))
        );
    }
}
