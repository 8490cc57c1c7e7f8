//! A build without the `mpi` feature refuses what needs MPI with one clear line.
use std::process::Command;

#[test]
fn without_the_mpi_feature_the_mpi_self_test_says_how_to_build_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["internal-mpi-selftest", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("built without the `mpi` feature")
            && err.contains("cargo build --release --features mpi"),
        "{err}"
    );
}
