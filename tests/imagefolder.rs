//! `--data imagefolder` on folders the tests write from the real MNIST test images in
//! tests/fixtures (PNG and JPEG, grey and tinted RGB): scanning, batches that do not depend on
//! the number of loader threads, transforms, bad files (errors naming them, `--skip-bad-images`),
//! `sgr data info`, statistics, a training run, and fuzzed decoding (0 panics).
use std::path::{Path, PathBuf};
use std::process::Command;

use image::{GrayImage, ImageFormat, Rgb, RgbImage};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sgr::data::folder::{self, Transform};
use sgr::data::{self, Batches, DatasetKind, LoadOptions, Order, load_idx_pair};
use tch::{Device, Tensor};

use crate::common::{assert_no_panic, text};

/// English digit names: sorted by name they are not in digit order, so the test sees whether
/// labels follow torchvision's sorted-folder convention.
pub const DIGITS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

fn mnist() -> (Vec<GrayImage>, Vec<i64>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist");
    let split = load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    let labels = Vec::<i64>::try_from(&split.labels).unwrap();
    let bytes = Vec::<u8>::try_from(&split.images.reshape([-1])).unwrap();
    let images = bytes
        .chunks_exact(28 * 28)
        .map(|c| GrayImage::from_raw(28, 28, c.to_vec()).unwrap())
        .collect();
    (images, labels)
}

/// Writes `D/train/<digit name>/` and `D/val/<digit name>/` with `train` and `val` real MNIST
/// images per class: even ones as grey PNG, odd ones as tinted RGB JPEG, upscaled to
/// `side x side` (and some to a non-square size, as photos are). Returns the file count per
/// class of each split, in label (sorted-name) order.
pub fn write_fixture(dir: &Path, train: usize, val: usize, side: u32) -> [Vec<usize>; 2] {
    let (images, labels) = mnist();
    let mut sorted: Vec<&str> = DIGITS.to_vec();
    sorted.sort();
    let mut counts = [vec![0; 10], vec![0; 10]];
    let mut seen = [0usize; 10];
    for (img, &y) in images.iter().zip(&labels) {
        let y = y as usize;
        let k = seen[y];
        seen[y] += 1;
        let (split, s) = if k < train {
            ("train", 0)
        } else if k < train + val {
            ("val", 1)
        } else {
            continue;
        };
        let name = DIGITS[y];
        let class_dir = dir.join(split).join(name);
        std::fs::create_dir_all(&class_dir).unwrap();
        let (w, h) = if k % 3 == 2 {
            (side + side / 2, side)
        } else {
            (side, side)
        };
        let big = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
        if k % 2 == 0 {
            big.save_with_format(class_dir.join(format!("{k:03}.png")), ImageFormat::Png)
                .unwrap();
        } else {
            let rgb = RgbImage::from_fn(w, h, |x, y| {
                let v = big.get_pixel(x, y)[0];
                Rgb([v, v / 2 + 64, 255 - v])
            });
            rgb.save_with_format(class_dir.join(format!("{k:03}.JPG")), ImageFormat::Jpeg)
                .unwrap();
        }
        counts[s][sorted.iter().position(|n| *n == name).unwrap()] += 1;
    }
    counts
}

fn opts(image_size: i64, workers: usize) -> LoadOptions {
    LoadOptions {
        image_size,
        workers,
        skip_bad: false,
    }
}

fn all_batches(b: Batches) -> (Tensor, Vec<i64>) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for batch in b {
        ys.extend(Vec::<i64>::try_from(&batch.labels).unwrap());
        xs.push(batch.images);
    }
    (Tensor::cat(&xs, 0), ys)
}

fn sgr_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn scan_sorts_classes_by_name_and_labels_follow_the_folders() {
    let dir = tempfile::tempdir().unwrap();
    let counts = write_fixture(dir.path(), 6, 3, 32);
    let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(24, 1)).unwrap();
    let mut sorted: Vec<String> = DIGITS.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    assert_eq!(ds.class_names(), sorted);
    assert_eq!(ds.meta.classes, 10);
    assert_eq!(
        (ds.meta.height, ds.meta.width, ds.meta.channels),
        (24, 24, 3)
    );
    assert_eq!(ds.meta.mean, data::IMAGENET_MEAN.to_vec());
    assert_eq!((ds.train.len(), ds.test.len()), (60, 30));
    let info = data::info(&ds);
    assert_eq!(info.train.per_class, counts[0]);
    assert_eq!(info.test.per_class, counts[1]);
    // Every file's label is the position of its folder's name in the sorted class list.
    let f = ds.train.folder().unwrap();
    for (i, &y) in f.labels().iter().enumerate() {
        let class = f.path(i).parent().unwrap().file_name().unwrap();
        assert_eq!(class.to_str().unwrap(), sorted[y as usize]);
    }
    // A val class unknown to train is an error naming the folder.
    std::fs::create_dir_all(dir.path().join("val/eleven")).unwrap();
    let err = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(24, 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("val/eleven") && err.contains("training classes"),
        "{err}"
    );
    // A missing train folder says what layout is expected.
    let empty = tempfile::tempdir().unwrap();
    let err = data::load_with(DatasetKind::ImageFolder, empty.path(), &opts(24, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train") && err.contains("<class>"), "{err}");
}

#[test]
fn batches_are_the_same_for_any_number_of_loader_workers() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), 5, 2, 40);
    let run = |workers: usize, epoch: u64, augment: bool| {
        let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(32, workers)).unwrap();
        let order = Order::Shuffled { seed: 7, epoch };
        all_batches(Batches::new(
            &ds.train,
            &ds.meta,
            8,
            order,
            augment,
            Device::Cpu,
        ))
    };
    let (x1, y1) = run(1, 0, true);
    assert_eq!(x1.size(), [50, 3, 32, 32]);
    for workers in [2, 3, 8] {
        let (x, y) = run(workers, 0, true);
        assert_eq!(y, y1, "labels differ with {workers} workers");
        assert!(x.equal(&x1), "pixels differ with {workers} workers");
    }
    // The order is the in-memory sets' permutation, so labels come in that order.
    let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(32, 1)).unwrap();
    let labels = ds.train.labels();
    let perm = data::permutation(50, 7, 0);
    assert_eq!(
        y1,
        perm.iter().map(|&i| labels[i as usize]).collect::<Vec<_>>()
    );
    // Another epoch: another order and other crops; no augmentation: the evaluation transform.
    let (x2, _) = run(2, 1, true);
    assert!(!x2.equal(&x1));
    let (plain, _) = run(1, 0, false);
    assert!(!plain.equal(&x1), "augmentation changed nothing");
}

#[test]
fn eval_batches_are_the_centre_crops_normalised_with_the_meta() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), 2, 2, 28);
    let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(28, 2)).unwrap();
    let f = ds.test.folder().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let raw: Vec<u8> = (0..f.len())
        .flat_map(|i| f.load(i, Transform::Eval, &mut rng).unwrap())
        .collect();
    let raw = Tensor::from_slice(&raw).view([f.len() as i64, 3, 28, 28]);
    let (x, y) = all_batches(
        Batches::new(&ds.test, &ds.meta, 7, Order::Sequential, false, Device::Cpu).keep_singleton(),
    );
    assert_eq!(y, ds.test.labels());
    let mean = Tensor::from_slice(&data::IMAGENET_MEAN).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&data::IMAGENET_STD).view([1, 3, 1, 1]);
    let want = (raw.to_kind(tch::Kind::Double) / 255.0 - mean) / std;
    let diff = (x.to_kind(tch::Kind::Double) - want)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
    // A PNG decodes to exactly the pixels written (grey replicated to RGB).
    let png = (0..f.len())
        .find(|&i| f.path(i).extension().unwrap() == "png")
        .unwrap();
    let img = folder::decode(f.path(png)).unwrap();
    let grey = image::open(f.path(png)).unwrap().into_luma8();
    assert!(
        img.pixels()
            .zip(grey.pixels())
            .all(|(c, g)| c.0 == [g[0]; 3])
    );
}

/// Cuts a file to `keep` bytes.
fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..keep.min(bytes.len())]).unwrap();
}

fn first_with_ext(dir: &Path, ext: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().unwrap() == ext)
        .collect();
    files.sort();
    files.remove(0)
}

#[test]
fn a_bad_image_stops_with_its_name_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), 4, 2, 32);
    let jpg = first_with_ext(&dir.path().join("train/three"), "JPG");
    let png = first_with_ext(&dir.path().join("train/seven"), "png");
    let len = std::fs::metadata(&jpg).unwrap().len() as usize;
    truncate(&jpg, len / 2);
    truncate(&png, 100);
    for (workers, bad) in [(1, &jpg), (3, &jpg)] {
        let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(32, workers)).unwrap();
        let order = Order::Shuffled { seed: 1, epoch: 0 };
        let mut b = Batches::new(&ds.train, &ds.meta, 4, order, true, Device::Cpu);
        let got = b.by_ref().count();
        let err = b
            .take_error()
            .expect("a truncated file must fail")
            .to_string();
        assert!(got < 10, "the pass went on after the error");
        assert!(
            err.contains("train/three") || err.contains("train/seven"),
            "{err} (expected {})",
            bad.display()
        );
    }
    // The CLI: one error line naming a file, no panic, no summary.
    let out_dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let base = [
        "train",
        "--data",
        "imagefolder",
        "--data-dir",
        d,
        "--model",
        "resnet20",
        "--rule",
        "dgl",
        "--modules",
        "2",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--diag-every",
        "0",
        "--quiet",
        "--loader-workers",
        "2",
    ];
    let run = out_dir.path().join("stop");
    let out = sgr_cmd(
        &[
            &base[..],
            &["--out", run.to_str().unwrap(), "--epochs", "1"],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_no_panic(&stderr);
    assert!(
        stderr.starts_with("error: ")
            && stderr.trim_end().lines().count() == 1
            && (stderr.contains("train/three/") || stderr.contains("train/seven/"))
            && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(!run.join("summary.json").exists());
    // --skip-bad-images: the run finishes and counts both files once.
    let run = out_dir.path().join("skip");
    let out = sgr_cmd(
        &[
            &base[..],
            &[
                "--out",
                run.to_str().unwrap(),
                "--skip-bad-images",
                "--epochs",
                "2",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_images"], 2, "{summary}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("skipping unreadable image").count(),
        2,
        "{stderr}"
    );
}

#[test]
fn data_info_counts_classes_and_compute_stats_feeds_training() {
    let dir = tempfile::tempdir().unwrap();
    let counts = write_fixture(dir.path(), 3, 2, 32);
    let d = dir.path().to_str().unwrap();
    let out = sgr_cmd(&[
        "data",
        "info",
        "--data",
        "imagefolder",
        "--data-dir",
        d,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["train"]["per_class"], serde_json::json!(counts[0]));
    assert_eq!(info["test"]["per_class"], serde_json::json!(counts[1]));
    assert_eq!(info["classes"][0], "eight");
    let out = sgr_cmd(&[
        "data",
        "info",
        "--data",
        "imagefolder",
        "--data-dir",
        d,
        "--compute-stats",
        "--image-size",
        "24",
        "--loader-workers",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("eight") && table.contains("mean[2]"),
        "{table}"
    );
    let stats = folder::read_stats(dir.path())
        .unwrap()
        .expect("stats written");
    // Cross-check against the decoded pixels directly.
    let ds = data::load_with(DatasetKind::ImageFolder, dir.path(), &opts(24, 1)).unwrap();
    let f = ds.train.folder().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let raw: Vec<u8> = (0..f.len())
        .flat_map(|i| f.load(i, Transform::Eval, &mut rng).unwrap())
        .collect();
    let x = Tensor::from_slice(&raw)
        .view([-1, 3, 24 * 24])
        .to_kind(tch::Kind::Double)
        / 255.0;
    for c in 0..3 {
        let xc = x.select(1, c);
        let m = xc.mean(tch::Kind::Double).double_value(&[]);
        let s = xc.std(false).double_value(&[]);
        assert!((stats.mean[c as usize] - m).abs() < 1e-9, "channel {c}");
        assert!((stats.std[c as usize] - s).abs() < 1e-9, "channel {c}");
    }
    // The loader now normalises with them.
    assert_eq!(ds.meta.mean, stats.mean);
    assert_eq!(ds.meta.std, stats.std);
}

/// The acceptance command: an ImageNet ResNet-18 in two DGL modules on the folder.
#[test]
fn trains_resnet18_on_an_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), 8, 3, 72);
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("run");
    let out = sgr_cmd(&[
        "train",
        "--data",
        "imagefolder",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--model",
        "resnet18",
        "--rule",
        "dgl",
        "--modules",
        "2",
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--diag-every",
        "0",
        "--loader-workers",
        "2",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["dataset"], "imagefolder");
    assert_eq!(summary["skipped_images"], 0);
    assert_eq!(summary["config"]["image_size"], 64);
    assert_eq!(summary["model"], "resnet18");
    assert_eq!(summary["modules"], 2);
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
}

/// A real JPEG and PNG from the fixture, as bytes.
fn sample_files() -> (Vec<u8>, Vec<u8>) {
    let (images, _) = mnist();
    let mut png = std::io::Cursor::new(Vec::new());
    images[0].write_to(&mut png, ImageFormat::Png).unwrap();
    let mut jpg = std::io::Cursor::new(Vec::new());
    images[1].write_to(&mut jpg, ImageFormat::Jpeg).unwrap();
    (jpg.into_inner(), png.into_inner())
}

#[test]
fn every_truncation_of_a_jpeg_or_png_is_an_error() {
    let (jpg, png) = sample_files();
    assert!(folder::decode_bytes(&jpg).is_ok() && folder::decode_bytes(&png).is_ok());
    for (name, bytes) in [("jpeg", &jpg), ("png", &png)] {
        for keep in 0..bytes.len() {
            assert!(
                folder::decode_bytes(&bytes[..keep]).is_err(),
                "{name} cut to {keep} of {} bytes decoded",
                bytes.len()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Corrupted bytes decode or fail, never panic, and what decodes has pixels.
    #[test]
    fn decoding_corrupted_images_never_panics(
        png in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let (jpg, pngb) = sample_files();
        let mut bytes = if png { pngb } else { jpg };
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if do_cut {
            let keep = cut.index(bytes.len());
            bytes.truncate(keep);
        }
        if let Ok(img) = folder::decode_bytes(&bytes) {
            prop_assert!(img.width() > 0 && img.height() > 0);
        }
    }
}

#[test]
fn bench_data_reports_one_row_per_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), 4, 1, 40);
    let out = sgr_cmd(&[
        "bench",
        "data",
        "--data",
        "imagefolder",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--loader-workers",
        "1,3",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--batches",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, workers) in rows.iter().zip([1, 3]) {
        assert_eq!(row["workers"], workers);
        assert_eq!(row["images"], 24);
        assert!(row["images_per_second"].as_f64().unwrap() > 0.0);
    }
}
