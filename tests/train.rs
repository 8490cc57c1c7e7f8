//! Training end to end: learning on real data, resume, and the command line's behaviour on
//! bad input.
use sgr::config::{OnNan, TrainConfig};
use sgr::data::{self, Dataset, DatasetKind, Split};
use sgr::model::{Arch, SplitStrategy};
use sgr::rules::RuleKind;
use sgr::schedule::ScheduleKind;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The first 1,000 Fashion-MNIST test images: 800 to train on, 200 to test on.
fn fmnist_fixture() -> Dataset {
    let dir = fixture("fashion-mnist");
    let all = data::load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    let test = Split {
        images: all.images.narrow(0, 800, 200),
        labels: all.labels.narrow(0, 800, 200),
    };
    Dataset {
        meta: DatasetKind::FashionMnist.meta(),
        train: all.subset(800),
        test,
    }
}

fn small_config(rule: RuleKind, modules: usize) -> TrainConfig {
    TrainConfig {
        data: DatasetKind::FashionMnist,
        model: "resnet20".parse::<Arch>().unwrap(),
        rule,
        modules,
        split: SplitStrategy::Even,
        epochs: 3,
        batch_size: 32,
        lr: 0.05,
        diag_every: 10,
        threads: 2,
        ..Default::default()
    }
}

#[test]
fn learns_real_fashion_mnist_well_above_chance() {
    let ds = fmnist_fixture();
    for (rule, k) in [(RuleKind::Bp, 1), (RuleKind::Sgr, 2)] {
        let out = tempfile::tempdir().unwrap();
        let s = sgr::train::run_with_data(&small_config(rule, k), &ds, out.path(), false, true)
            .unwrap();
        // Chance is 10%.
        assert!(
            s.test_accuracy > 0.45,
            "{rule} K={k}: test accuracy {}",
            s.test_accuracy
        );
        let lines: Vec<sgr::metrics::EpochRecord> =
            sgr::metrics::read_lines(&out.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].module_test_accuracy.len(), k);
        if k > 1 {
            assert_eq!(lines[2].grad_cosine.len(), k - 1);
            assert!(lines[2].grad_cosine[0].abs() <= 1.0);
            assert!(lines[2].sgr_penalty[1] > 0.0);
        }
        assert!(out.path().join("summary.json").exists());
    }
}

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let ds = data::synthetic::generate(3, 192, 64, 1, 12, 3);
    let mut cfg = TrainConfig {
        data: DatasetKind::Synthetic,
        model: "resnet20".parse::<Arch>().unwrap(),
        rule: RuleKind::Sgr,
        modules: 3,
        split: SplitStrategy::Even,
        epochs: 3,
        batch_size: 32,
        schedule: ScheduleKind::Step,
        milestones: vec![2],
        diag_every: 4,
        threads: 1,
        seed: 5,
        ..Default::default()
    };
    let whole = tempfile::tempdir().unwrap();
    let a = sgr::train::run_with_data(&cfg, &ds, whole.path(), false, true).unwrap();
    // Interrupted after epoch 1, then resumed to epoch 3 (the schedule only depends on epoch).
    let parts = tempfile::tempdir().unwrap();
    cfg.epochs = 1;
    sgr::train::run_with_data(&cfg, &ds, parts.path(), false, true).unwrap();
    cfg.epochs = 3;
    let b = sgr::train::run_with_data(&cfg, &ds, parts.path(), true, true).unwrap();
    assert_eq!(a.test_accuracy, b.test_accuracy);
    let (va, ma, _) = sgr::checkpoint::load(&whole.path().join("checkpoint.safetensors")).unwrap();
    let (vb, mb, sb) = sgr::checkpoint::load(&parts.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(sb.unwrap().epoch, 3);
    for (x, y) in [(&va, &vb), (&ma, &mb)] {
        assert_eq!(x.len(), y.len());
        for (name, t) in x {
            let d = (t - &y[name]).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{name} differs by {d}");
        }
    }
    let la: Vec<sgr::metrics::EpochRecord> =
        sgr::metrics::read_lines(&whole.path().join("metrics.jsonl")).unwrap();
    let lb: Vec<sgr::metrics::EpochRecord> =
        sgr::metrics::read_lines(&parts.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lb.len(), 3);
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(
            (x.epoch, x.test_accuracy, x.train_loss),
            (y.epoch, y.test_accuracy, y.train_loss)
        );
    }
}

#[test]
fn divergence_stops_with_the_place_it_happened() {
    let ds = data::synthetic::generate(1, 64, 32, 1, 8, 3);
    let cfg = TrainConfig {
        lr: 1e6,
        batch_size: 16,
        epochs: 1,
        diag_every: 0,
        ..small_config(RuleKind::Dgl, 2)
    };
    let out = tempfile::tempdir().unwrap();
    let e = sgr::train::run_with_data(&cfg, &ds, out.path(), false, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("epoch 1, step") && e.contains("module"), "{e}");
    assert!(!out.path().join("summary.json").exists());
    let skip = TrainConfig {
        on_nan: OnNan::SkipBatch,
        ..cfg
    };
    let out = tempfile::tempdir().unwrap();
    // With skip-batch the bad updates are dropped and the run goes on to write its summary.
    sgr::train::run_with_data(&skip, &ds, out.path(), false, true).unwrap();
    assert!(out.path().join("summary.json").exists());
}

fn sgr_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Asserts a failed run: non-zero exit, an `error:` line naming `needle`, no panic, and no
/// half-written run files.
fn assert_clean_failure(args: &[&str], needle: &str, out: &Path) {
    let (code, _, err) = sgr_cmd(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(
        err.contains("error") && err.contains(needle),
        "{args:?}: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
    for f in ["checkpoint.safetensors", "summary.json"] {
        assert!(!out.join(f).exists(), "{args:?} left {f}");
    }
}

#[test]
fn bad_input_gives_one_clear_error_and_no_run_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let missing = tmp.path().join("nope");
    let m = missing.to_str().unwrap();
    assert_clean_failure(
        &[
            "train",
            "--data",
            "mnist",
            "--data-dir",
            m,
            "--out",
            o,
            "--epochs",
            "1",
        ],
        "nope",
        &out,
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_failure(
        &[
            "train",
            "--data",
            "fashion-mnist",
            "--data-dir",
            empty.to_str().unwrap(),
            "--out",
            o,
        ],
        "fashion-mnist",
        &out,
    );
    // A truncated IDX file.
    let trunc = tmp.path().join("trunc");
    std::fs::create_dir_all(trunc.join("mnist")).unwrap();
    for f in ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"] {
        std::fs::write(
            trunc.join("mnist").join(f),
            [
                0u8, 0, 8, 3, 0, 0, 0, 100, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2, 3,
            ],
        )
        .unwrap();
    }
    for f in ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(trunc.join("mnist").join(f), [0u8, 0, 8, 1, 0, 0, 0, 100]).unwrap();
    }
    assert_clean_failure(
        &[
            "train",
            "--data",
            "mnist",
            "--data-dir",
            trunc.to_str().unwrap(),
            "--out",
            o,
        ],
        "idx3-ubyte",
        &out,
    );
    // Unknown names and bad values on the command line.
    assert_clean_failure(
        &["train", "--model", "resnet33", "--out", o],
        "resnet33",
        &out,
    );
    assert_clean_failure(&["train", "--rule", "sgd", "--out", o], "sgd", &out);
    assert_clean_failure(&["train", "--data", "cifar11", "--out", o], "cifar11", &out);
    assert_clean_failure(
        &["train", "--data", "synthetic", "--lr=-1", "--out", o],
        "--lr",
        &out,
    );
    assert_clean_failure(
        &[
            "train",
            "--data",
            "synthetic",
            "--modules",
            "17",
            "--out",
            o,
        ],
        "--modules 17",
        &out,
    );
    assert_clean_failure(
        &[
            "train",
            "--data",
            "synthetic",
            "--aux-head",
            "big",
            "--out",
            o,
        ],
        "big",
        &out,
    );
    // A config file with an unknown key and one with a bad value.
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "epochs = 1\nlearning_rate = 0.1\n").unwrap();
    assert_clean_failure(
        &["train", "--config", cfg.to_str().unwrap(), "--out", o],
        "learning_rate",
        &out,
    );
    std::fs::write(&cfg, "epochs = \"many\"\n").unwrap();
    assert_clean_failure(
        &["train", "--config", cfg.to_str().unwrap(), "--out", o],
        "bad.toml",
        &out,
    );
    assert_clean_failure(&["train", "--config", m, "--out", o], "nope", &out);
    // Eval of something that is not a checkpoint.
    assert_clean_failure(
        &["eval", "--checkpoint", cfg.to_str().unwrap()],
        "safetensors",
        &out,
    );
    assert_clean_failure(
        &["data", "info", "--data", "mnist", "--data-dir", m],
        "nope",
        &out,
    );
}

#[test]
fn cli_trains_evaluates_and_refuses_to_overwrite_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let args = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "resnet20",
        "--rule",
        "dgl",
        "--modules",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--quiet",
        "--out",
        o,
    ];
    let (code, stdout, err) = sgr_cmd(&args);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("test accuracy"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "rule",
        "model",
        "dataset",
        "modules",
        "epochs",
        "seed",
        "test_accuracy",
        "best_test_accuracy",
        "train_seconds",
        "images_per_second",
        "peak_memory_bytes",
        "config",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    let acc = summary["test_accuracy"].as_f64().unwrap();
    let (code, stdout, err) = sgr_cmd(&[
        "eval",
        "--checkpoint",
        out.join("checkpoint.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains(&format!("{:.2}%", 100.0 * acc)),
        "{stdout} vs {acc}"
    );
    // On a machine without CUDA, asking for it is one clear error, not a panic.
    if !tch::Cuda::is_available() {
        let ckpt = out.join("checkpoint.safetensors");
        let (code, _, err) = sgr_cmd(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--device",
            "cuda",
        ]);
        assert_ne!(code, 0);
        assert!(
            err.starts_with("error: --device cuda: no CUDA device"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // The same --out again is refused, and the run is untouched.
    let before = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let (code, _, err) = sgr_cmd(&args);
    assert_ne!(code, 0);
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(
        before,
        std::fs::read(out.join("checkpoint.safetensors")).unwrap()
    );
}
