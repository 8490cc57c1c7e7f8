//! SVHN (`.mat`, level 5) and STL-10 (binary) files written by the tests in their published
//! layouts from real MNIST digits (tests/fixtures): exact round trips, label conventions
//! (SVHN's 10 for the digit 0, STL-10's 1-10), `sgr data info`, and fuzzed files that must
//! fail with an error naming them, never a panic.
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use sgr::data::{self, DatasetKind, load, load_idx_pair, mat, stl10, svhn};
use tch::Tensor;

use crate::common::{assert_no_panic, text};

/// The first `n` MNIST test digits as 3-channel `side x side` CHW bytes (zero-padded and
/// centred, each channel a different tint), with their labels.
fn digits(n: usize, side: usize) -> (Vec<u8>, Vec<i64>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist");
    let split = load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap()
    .subset(n);
    let pad = ((side - 28) / 2) as i64;
    let x =
        split
            .images
            .constant_pad_nd([pad, side as i64 - 28 - pad, pad, side as i64 - 28 - pad]);
    let x = Tensor::cat(&[&x, &(x.shallow_clone() / 2), &(255 - &x)], 1).to_kind(tch::Kind::Uint8);
    let pixels = Vec::<u8>::try_from(&x.reshape([-1])).unwrap();
    (pixels, Vec::<i64>::try_from(&split.labels).unwrap())
}

fn write_svhn(
    dir: &Path,
    n_train: usize,
    n_test: usize,
    compress: bool,
) -> [(Vec<u8>, Vec<i64>); 2] {
    let d = dir.join("svhn");
    std::fs::create_dir_all(&d).unwrap();
    let (px, y) = digits(n_train + n_test, 32);
    let b = svhn::IMAGE_BYTES;
    let train = (px[..n_train * b].to_vec(), y[..n_train].to_vec());
    let test = (px[n_train * b..].to_vec(), y[n_train..].to_vec());
    for (name, (p, l)) in [("train_32x32.mat", &train), ("test_32x32.mat", &test)] {
        std::fs::write(d.join(name), mat::write(&svhn::to_arrays(p, l), compress)).unwrap();
    }
    [train, test]
}

fn write_stl(dir: &Path, n_train: usize, n_test: usize) -> [(Vec<u8>, Vec<i64>); 2] {
    let d = dir.join("stl10_binary");
    std::fs::create_dir_all(&d).unwrap();
    let (px, y) = digits(n_train + n_test, 96);
    let b = stl10::IMAGE_BYTES;
    let train = (px[..n_train * b].to_vec(), y[..n_train].to_vec());
    let test = (px[n_train * b..].to_vec(), y[n_train..].to_vec());
    for (name, (p, l)) in [("train", &train), ("test", &test)] {
        let (xb, yb) = stl10::write(p, l);
        std::fs::write(d.join(format!("{name}_X.bin")), xb).unwrap();
        std::fs::write(d.join(format!("{name}_y.bin")), yb).unwrap();
    }
    [train, test]
}

fn pixels_of(s: &data::Source) -> Vec<u8> {
    Vec::<u8>::try_from(&s.memory().unwrap().images.reshape([-1])).unwrap()
}

#[test]
fn svhn_round_trips_with_ten_as_zero_compressed_or_not() {
    for compress in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let [train, test] = write_svhn(dir.path(), 40, 15, compress);
        assert!(
            train.1.contains(&0),
            "the fixture needs a zero to test label 10"
        );
        let ds = load(DatasetKind::Svhn, dir.path()).unwrap();
        assert_eq!(ds.train.memory().unwrap().images.size(), [40, 3, 32, 32]);
        assert_eq!(pixels_of(&ds.train), train.0);
        assert_eq!(ds.train.labels(), train.1);
        assert_eq!(pixels_of(&ds.test), test.0);
        assert_eq!(ds.test.labels(), test.1);
        // The stored labels really are 1-10 with 10 for zero.
        let raw = mat::read_file(&dir.path().join("svhn/train_32x32.mat")).unwrap();
        let y = raw.iter().find(|a| a.name == "y").unwrap();
        let zero = train.1.iter().position(|&l| l == 0).unwrap();
        assert_eq!(y.get(zero), 10.0);
        // Normalisation: the training split's own statistics.
        let info = data::info(&ds);
        assert_eq!(ds.meta.mean, info.train.mean);
        assert_eq!(ds.meta.std, info.train.std);
        let mut counts = vec![0; 10];
        train.1.iter().for_each(|&l| counts[l as usize] += 1);
        assert_eq!(info.train.per_class, counts);
    }
}

#[test]
fn stl10_round_trips_its_column_major_layout() {
    let dir = tempfile::tempdir().unwrap();
    let [train, test] = write_stl(dir.path(), 6, 4);
    // The file is column-major: byte 1 of an image is row 1, column 0 of its red plane.
    let raw = std::fs::read(dir.path().join("stl10_binary/train_X.bin")).unwrap();
    assert_eq!(raw[1], train.0[96]);
    let ds = load(DatasetKind::Stl10, dir.path()).unwrap();
    assert_eq!(ds.train.memory().unwrap().images.size(), [6, 3, 96, 96]);
    assert_eq!(pixels_of(&ds.train), train.0);
    assert_eq!(ds.train.labels(), train.1);
    assert_eq!(pixels_of(&ds.test), test.0);
    let y = std::fs::read(dir.path().join("stl10_binary/test_y.bin")).unwrap();
    assert_eq!(y, test.1.iter().map(|&l| l as u8 + 1).collect::<Vec<_>>());
}

#[test]
fn data_info_prints_counts_per_class_for_svhn_and_stl10() {
    let dir = tempfile::tempdir().unwrap();
    let [svhn_train, _] = write_svhn(dir.path(), 30, 10, true);
    let [stl_train, _] = write_stl(dir.path(), 5, 3);
    for (kind, labels) in [("svhn", &svhn_train.1), ("stl10", &stl_train.1)] {
        let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
            .args(["data", "info", "--data", kind, "--data-dir"])
            .arg(dir.path())
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut counts = vec![0; 10];
        labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert_eq!(
            info["train"]["per_class"],
            serde_json::json!(counts),
            "{kind}"
        );
    }
}

#[test]
fn wrong_sizes_and_labels_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_stl(dir.path(), 3, 2);
    let d = dir.path().join("stl10_binary");
    let x = std::fs::read(d.join("train_X.bin")).unwrap();
    std::fs::write(d.join("train_X.bin"), &x[..x.len() - 1]).unwrap();
    let err = load(DatasetKind::Stl10, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train_X.bin") && err.contains("27648"),
        "{err}"
    );
    std::fs::write(d.join("train_X.bin"), &x).unwrap();
    std::fs::write(d.join("train_y.bin"), [1u8, 11, 2]).unwrap();
    let err = load(DatasetKind::Stl10, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train_y.bin") && err.contains("label 11"),
        "{err}"
    );
    std::fs::write(d.join("train_y.bin"), [1u8, 2]).unwrap();
    let err = load(DatasetKind::Stl10, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 labels") && err.contains("3 images"),
        "{err}"
    );

    let (px, y) = digits(4, 32);
    let s = dir.path().join("svhn");
    std::fs::create_dir_all(&s).unwrap();
    let mut arrays = svhn::to_arrays(&px, &y);
    arrays[1].2[2] = 11.0;
    std::fs::write(s.join("train_32x32.mat"), mat::write(&arrays, true)).unwrap();
    std::fs::write(
        s.join("test_32x32.mat"),
        mat::write(&svhn::to_arrays(&px, &y), true),
    )
    .unwrap();
    let err = load(DatasetKind::Svhn, dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("train_32x32.mat") && err.contains("label 11"),
        "{err}"
    );
    let mut arrays = svhn::to_arrays(&px, &y);
    arrays[1].1 = vec![3, 1];
    arrays[1].2.pop();
    std::fs::write(s.join("train_32x32.mat"), mat::write(&arrays, false)).unwrap();
    let err = load(DatasetKind::Svhn, dir.path()).unwrap_err().to_string();
    assert!(err.contains("4 images"), "{err}");
    std::fs::write(s.join("train_32x32.mat"), mat::write(&arrays[..1], false)).unwrap();
    let err = load(DatasetKind::Svhn, dir.path()).unwrap_err().to_string();
    assert!(err.contains("no variable 'y'"), "{err}");
    // Through the CLI: one error line, no panic.
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["data", "info", "--data", "svhn", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_no_panic(&stderr);
    assert!(stderr.contains("train_32x32.mat"), "{stderr}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Truncated or corrupted SVHN files parse or fail; they never panic, and whatever parses
    /// has consistent sizes.
    #[test]
    fn corrupted_svhn_files_never_panic(
        compress in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let (px, y) = digits(3, 32);
        let mut bytes = mat::write(&svhn::to_arrays(&px, &y), compress);
        let intact = flips.is_empty();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if do_cut {
            let keep = cut.index(bytes.len());
            bytes.truncate(keep);
            if intact {
                // Any cut of an intact file loses data: it must be refused.
                prop_assert!(mat::parse(&bytes).and_then(|a| svhn::from_arrays(&a)).is_err());
            }
        }
        if let Ok((p, l)) = mat::parse(&bytes).and_then(|a| svhn::from_arrays(&a)) {
            prop_assert_eq!(p.len(), l.len() * svhn::IMAGE_BYTES);
            prop_assert!(l.iter().all(|&l| (0..10).contains(&l)));
        }
    }

    /// STL-10 buffers of any length and labels of any value: an error or a consistent split.
    #[test]
    fn stl10_of_any_size_never_panics(
        n_bytes in 0usize..3 * stl10::IMAGE_BYTES,
        labels in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let images = vec![7u8; n_bytes];
        match stl10::parse(&images, &labels) {
            Ok((p, l)) => {
                prop_assert_eq!(p.len(), l.len() * stl10::IMAGE_BYTES);
                prop_assert!(n_bytes % stl10::IMAGE_BYTES == 0);
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}

/// The reader against files written by another implementation: scipy.io.savemat (level 5,
/// compressed and not) with SVHN's variables, `X` uint8 `[32, 32, 3, 2]` and `y` double.
#[test]
fn reads_mat_files_written_by_scipy() {
    if crate::common::skip_without_torch("reads_mat_files_written_by_scipy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, numpy as np, scipy.io
r, c, ch, n = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), np.arange(2), indexing="ij")
X = ((r * 7 + c * 3 + ch * 50 + n * 100) % 256).astype(np.uint8)
y = np.array([[10.0], [3.0]])
scipy.io.savemat(sys.argv[1] + "/z.mat", {"X": X, "y": y}, do_compression=True)
scipy.io.savemat(sys.argv[1] + "/u.mat", {"X": X, "y": y}, do_compression=False)
"#;
    let out = Command::new(crate::common::venv_python())
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for name in ["z.mat", "u.mat"] {
        let (px, labels) = svhn::read_file(&dir.path().join(name)).unwrap();
        assert_eq!(labels, vec![0, 3], "{name}");
        for (n, ch, r, c) in [(0, 0, 0, 0), (0, 0, 1, 0), (0, 2, 5, 31), (1, 1, 31, 2)] {
            let got = px[n * svhn::IMAGE_BYTES + ch * 1024 + r * 32 + c];
            assert_eq!(
                usize::from(got),
                (r * 7 + c * 3 + ch * 50 + n * 100) % 256,
                "{name}"
            );
        }
    }
}
