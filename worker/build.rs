//! Bakes an rpath to the libtensorflow directory found through pkg-config into the worker, so
//! the binary runs without LD_LIBRARY_PATH wherever it was built (tensorflow-sys links the
//! library but does not record where it lives).

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    match pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("tensorflow")
    {
        Ok(library) => {
            for dir in library.link_paths {
                println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", dir.display());
            }
        }
        Err(error) => println!(
            "cargo:warning=libtensorflow not found through pkg-config ({error}); \
             run scripts/provision-libtensorflow"
        ),
    }
}
