//! scripts/provision-libtensorflow's path discovery for a `tensorflow[and-cuda]` environment,
//! on a MADE-UP site-packages layout (empty directories, no libraries): this machine has no
//! GPU wheel, and only the discovery is under test here. Linking the found libraries and
//! running a GPU TensorFlow are not tested on this machine.

mod common;

use std::process::Command;

use common::TempDir;

#[test]
fn cuda_library_dirs_are_found_in_a_fake_site_packages_layout() {
    let dir = TempDir::new("fake-site-packages");
    let site = dir.0.join("lib/python3.11/site-packages");
    for path in [
        "tensorflow",
        "nvidia/cublas/lib",
        "nvidia/cudnn/lib",
        "nvidia/cuda_runtime/lib",
        // A package without a lib directory is not on the path.
        "nvidia/nccl/include",
    ] {
        std::fs::create_dir_all(site.join(path)).expect("fake layout");
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/provision-libtensorflow"
    );
    let output = Command::new(script)
        .arg("--cuda-library-dirs")
        .arg(site.join("tensorflow"))
        .output()
        .expect("run the script");
    assert!(output.status.success(), "{output:?}");
    let found: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let expected: Vec<String> = ["cublas", "cuda_runtime", "cudnn"]
        .iter()
        .map(|name| {
            site.join("nvidia")
                .join(name)
                .join("lib")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(found, expected);

    // A CPU environment (no nvidia packages): nothing, and no failure.
    let cpu = TempDir::new("fake-cpu-site-packages");
    std::fs::create_dir_all(cpu.0.join("tensorflow")).expect("fake layout");
    let output = Command::new(script)
        .arg("--cuda-library-dirs")
        .arg(cpu.0.join("tensorflow"))
        .output()
        .expect("run the script");
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
}
