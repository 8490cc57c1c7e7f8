//! What the SGR study needs end to end: MLPs that learn under every side of the penalty, and a
//! held-out evaluation split for choosing settings without the test set.
use sgr::config::TrainConfig;
use sgr::data::{self, Dataset, DatasetKind};
use sgr::model::{HeadKind, SplitStrategy};
use sgr::rules::{RuleKind, SgrDistance, SgrSide};
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist")
}

/// The 1,000 Fashion-MNIST fixture images: 800 to train on, 200 to test on.
fn fixture() -> Dataset {
    let dir = fixture_dir();
    let all = data::load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    Dataset {
        meta: DatasetKind::FashionMnist.meta(),
        train: all.subset(800).into(),
        test: all.tail(200).into(),
    }
}

#[test]
fn mlps_learn_layer_wise_under_every_sgr_side() {
    let ds = fixture();
    for (rule, side) in [
        (RuleKind::Dgl, SgrSide::Receiver),
        (RuleKind::Sgr, SgrSide::Receiver),
        (RuleKind::Sgr, SgrSide::Sender),
        (RuleKind::Sgr, SgrSide::Both),
    ] {
        let cfg = TrainConfig {
            model: "mlp-3x64".parse().unwrap(),
            rule,
            modules: 3,
            split: SplitStrategy::Table,
            aux_head: HeadKind::Linear,
            sgr_side: side,
            sgr_distance: SgrDistance::CosineSample,
            lambda: 0.1,
            epochs: 2,
            batch_size: 32,
            lr: 0.05,
            diag_every: 10,
            threads: 1,
            ..Default::default()
        };
        let out = tempfile::tempdir().unwrap();
        let s = sgr::train::run_with_data(&cfg, &ds, out.path(), false, true).unwrap();
        // Chance is 10%.
        assert!(
            s.test_accuracy > 0.45,
            "{rule} {side:?}: test accuracy {}",
            s.test_accuracy
        );
        assert_eq!(s.module_test_accuracy.len(), 3);
        let lines: Vec<sgr::metrics::EpochRecord> =
            sgr::metrics::read_lines(&out.path().join("metrics.jsonl")).unwrap();
        // The penalty is recorded on the modules that carry it.
        let penalty = &lines[1].sgr_penalty;
        match (rule, side) {
            (RuleKind::Dgl, _) => assert!(penalty.iter().all(|p| *p == 0.0), "{penalty:?}"),
            (_, SgrSide::Receiver) => assert!(penalty[0] == 0.0 && penalty[2] > 0.0),
            (_, SgrSide::Sender) => assert!(penalty[0] > 0.0 && penalty[2] == 0.0),
            (_, SgrSide::Both) => assert!(penalty.iter().all(|p| *p > 0.0), "{penalty:?}"),
        }
    }
}

#[test]
fn holdout_evaluates_on_the_last_training_images_and_trains_on_the_rest() {
    // A data folder whose training files are the fixture (1,000 images).
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("fashion-mnist");
    std::fs::create_dir_all(&target).unwrap();
    for (from, to) in [
        ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"),
        ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"),
        ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ] {
        std::fs::copy(fixture_dir().join(from), target.join(to)).unwrap();
    }
    let cfg = |holdout| TrainConfig {
        data: DatasetKind::FashionMnist,
        data_dir: dir.path().to_path_buf(),
        holdout,
        ..Default::default()
    };
    let full = sgr::train::load_data(&cfg(0)).unwrap();
    let held = sgr::train::load_data(&cfg(150)).unwrap();
    assert_eq!((held.train.len(), held.test.len()), (850, 150));
    let same = |a: &data::Source, b: &data::Source| {
        let (a, b) = (a.memory().unwrap(), b.memory().unwrap());
        a.images.equal(&b.images) && a.labels.equal(&b.labels)
    };
    assert!(same(&held.train, &full.train.subset(850)));
    assert!(same(&held.test, &full.train.tail(150)));
    let e = sgr::train::load_data(&cfg(1000)).unwrap_err().to_string();
    assert!(
        e.contains("--holdout 1000") && e.contains("1000 training images"),
        "{e}"
    );
}

#[test]
fn malformed_networks_and_impossible_variants_fail_before_a_run_folder_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--model", "mlp-0x256"], "mlp-0x256"),
        (&["--model", "mlp-8x"], "mlp-8x"),
        (&["--model", "mlp-8x256x3"], "mlp-8x256x3"),
        (
            &[
                "--model",
                "mlp-8x256",
                "--aux-head",
                "linear",
                "--modules",
                "9",
            ],
            "--modules 9",
        ),
        // The default head is linear on vectors; an explicit conv head is refused.
        (
            &[
                "--model",
                "mlp-8x256",
                "--modules",
                "2",
                "--aux-head",
                "conv",
            ],
            "--aux-head",
        ),
        (
            &[
                "--model",
                "mlp-4x8",
                "--aux-head",
                "linear",
                "--rule",
                "sgr",
                "--sgr-side",
                "sender",
            ],
            "--sgr-side",
        ),
        (&["--holdout", "70000"], "--holdout"),
    ];
    for (args, needle) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
            .args(["train", "--data", "synthetic", "--out", o, "--epochs", "1"])
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            err.starts_with("error") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("internal error"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} wrote a run folder");
    }
}
