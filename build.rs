//! Link-time plumbing for libtorch from the project-local venv.
//!
//! * rpath: the binary and test executables find `libtorch_cpu.so` (and the CUDA runtime stubs
//!   it needs) at run time without `LD_LIBRARY_PATH`. An `LD_LIBRARY_PATH` set by the user still
//!   wins, because modern linkers emit DT_RUNPATH.
//! * feature `cuda`: `--no-as-needed -ltorch_cuda` so CUDA kernels register (tch-rs issue 980).
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    for dir in [".venv/libtorch/lib", ".venv/cuda-lib"] {
        let path = root.join(dir);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", path.display());
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
