//! Training end to end: learning on real data, resume, and the command line's behaviour on
//! bad input.
use crate::common::assert_no_panic;
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
        train: all.subset(800).into(),
        test: test.into(),
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
    let cfg = TrainConfig {
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
    assert_resume_is_exact(cfg, &ds);
}

#[test]
fn resume_is_exact_for_a_vit_with_adamw_and_the_recipe() {
    // AdamW's moments and step count, the per-module clipping, label smoothing and random
    // erasing (drawn from the (seed, epoch, batch) stream) must all carry over.
    let ds = data::synthetic::generate(4, 160, 48, 1, 8, 3);
    let cfg = TrainConfig {
        data: DatasetKind::Synthetic,
        model: "vit-2x16h2".parse::<Arch>().unwrap(),
        rule: RuleKind::Sgr,
        modules: 2,
        aux_head: sgr::model::HeadKind::Linear,
        epochs: 3,
        batch_size: 32,
        lr: 1e-3,
        optimizer: sgr::optim::OptimizerKind::Adamw,
        weight_decay: 0.05,
        schedule: ScheduleKind::Constant,
        warmup_epochs: 1.0,
        label_smoothing: 0.1,
        clip_grad_norm: 0.5,
        random_erasing: 0.5,
        diag_every: 3,
        threads: 1,
        seed: 6,
        ..Default::default()
    };
    assert_resume_is_exact(cfg, &ds);
}

/// Runs `cfg` for its epochs in one go and as one epoch plus a resume, and checks that
/// weights, optimizer state and every epoch's metrics agree.
fn assert_resume_is_exact(mut cfg: TrainConfig, ds: &Dataset) {
    let epochs = cfg.epochs;
    let whole = tempfile::tempdir().unwrap();
    let a = sgr::train::run_with_data(&cfg, ds, whole.path(), false, true).unwrap();
    // Interrupted after epoch 1, then resumed to the end (the schedule only depends on epoch).
    let parts = tempfile::tempdir().unwrap();
    cfg.epochs = 1;
    sgr::train::run_with_data(&cfg, ds, parts.path(), false, true).unwrap();
    cfg.epochs = epochs;
    let b = sgr::train::run_with_data(&cfg, ds, parts.path(), true, true).unwrap();
    assert_eq!(a.test_accuracy, b.test_accuracy);
    let (va, ma, _) = sgr::checkpoint::load(&whole.path().join("checkpoint.safetensors")).unwrap();
    let (vb, mb, sb) = sgr::checkpoint::load(&parts.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(sb.unwrap().epoch, epochs);
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
    assert_eq!(lb.len(), epochs);
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
    assert_no_panic(&err);
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
    // ViT and recipe settings (synthetic images are 16 px).
    let vit = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--data",
            "synthetic",
            "--model",
            "vit-micro",
            "--out",
            o,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    for (extra, needle) in [
        (&["--patch-size", "5"][..], "--patch-size 5"),
        (&["--modules", "7"][..], "--modules 7"),
        (&["--modules", "2", "--aux-head", "conv"][..], "--aux-head"),
        (
            &["--optimizer", "adamw", "--adam-beta1", "1"][..],
            "--adam-beta1",
        ),
        (
            &["--optimizer", "adamw", "--adam-beta2=-0.1"][..],
            "--adam-beta2",
        ),
        (&["--label-smoothing=-0.1"][..], "--label-smoothing"),
        (&["--clip-grad-norm=-1"][..], "--clip-grad-norm"),
        (&["--random-erasing", "1.5"][..], "--random-erasing"),
        (&["--optimizer", "adam"][..], "adam"),
    ] {
        let args = vit(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&args, needle, &out);
        assert!(!out.exists(), "{extra:?} wrote a run folder");
    }
    assert_clean_failure(
        &[
            "train",
            "--data",
            "synthetic",
            "--model",
            "resnet20",
            "--modules",
            "2",
            "--aux-head",
            "block",
            "--out",
            o,
        ],
        "--aux-head",
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
        "--test-subset",
        "40",
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
        "peak_host_rss_bytes",
        "peak_device_bytes",
        "config",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    // Host RSS is measured on every device; device memory only on a GPU.
    assert!(summary["peak_host_rss_bytes"].as_u64().unwrap() > 0);
    assert!(summary["peak_device_bytes"].is_null());
    let acc = summary["test_accuracy"].as_f64().unwrap();
    let (code, stdout, err) = sgr_cmd(&[
        "eval",
        "--checkpoint",
        out.join("checkpoint.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // The run's --test-subset is what eval evaluates by default, so it matches summary.json.
    assert!(
        stdout.contains(&format!("{:.2}% (40 test images", 100.0 * acc)),
        "{stdout} vs {acc}"
    );
    let ckpt = out.join("checkpoint.safetensors");
    let eval_json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["eval", "--checkpoint", ckpt.to_str().unwrap(), "--json"];
        args.extend(extra);
        let (code, stdout, err) = sgr_cmd(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let e = eval_json(&[]);
    assert_eq!(e["test_images"], 40);
    assert_eq!(e["split"], "test");
    assert_eq!(e["epoch"], 1);
    assert_eq!(e["test_accuracy"], summary["test_accuracy"]);
    assert_eq!(e["module_test_accuracy"], summary["module_test_accuracy"]);
    assert!(e["test_loss"].as_f64().unwrap().is_finite());
    // --test-subset 0 evaluates the whole test split.
    assert_eq!(eval_json(&["--test-subset", "0"])["test_images"], 500);
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

#[test]
fn the_schedule_anneals_over_the_steps_that_run() {
    // 12 batches per epoch, of which --max-steps-per-epoch runs 3: the cosine schedule must
    // reach its end over those 3 x 2 steps, not over 12 x 2 that never run.
    let ds = data::synthetic::generate(4, 192, 32, 1, 8, 3);
    let cfg = TrainConfig {
        data: DatasetKind::Synthetic,
        model: "resnet20".parse::<Arch>().unwrap(),
        rule: RuleKind::Dgl,
        modules: 2,
        split: SplitStrategy::Even,
        epochs: 2,
        batch_size: 16,
        max_steps_per_epoch: 3,
        diag_every: 0,
        threads: 1,
        ..Default::default()
    };
    let out = tempfile::tempdir().unwrap();
    sgr::train::run_with_data(&cfg, &ds, out.path(), false, true).unwrap();
    let lines: Vec<sgr::metrics::EpochRecord> =
        sgr::metrics::read_lines(&out.path().join("metrics.jsonl")).unwrap();
    let schedule = cfg.schedule();
    for (epoch, line) in lines.iter().enumerate() {
        assert_eq!(line.lr, schedule.lr(epoch, 0, 3, 2));
        assert_eq!(line.last_lr, schedule.lr(epoch, 2, 3, 2));
    }
    // The last step is 5/6 of the way: 0.5 (1 + cos 150°) = 0.067 of the base rate.
    let last = lines[1].last_lr / cfg.lr;
    assert!((last - 0.0670).abs() < 1e-3, "{last}");
}

#[test]
fn a_skipped_batch_leaves_batchnorm_statistics_as_they_were() {
    // Every training pixel normalises to 255 x 1e38 = inf in f32, so the first convolution
    // gives inf and NaN and so does BatchNorm's batch statistics: every batch is bad. The test
    // pixels normalise to 0, so a network that never saw the training batches evaluates to a
    // finite loss.
    let mut ds = data::synthetic::generate(5, 48, 32, 1, 8, 3);
    ds.meta.mean = vec![0.0];
    ds.meta.std = vec![1.0 / (255.0 * 1e38)];
    let train = ds.train.memory_mut().unwrap();
    train.images = train.images.full_like(255);
    let test = ds.test.memory_mut().unwrap();
    test.images = test.images.zeros_like();
    let cfg = TrainConfig {
        data: DatasetKind::Synthetic,
        model: "resnet20".parse::<Arch>().unwrap(),
        rule: RuleKind::Dgl,
        modules: 2,
        split: SplitStrategy::Even,
        epochs: 1,
        batch_size: 16,
        diag_every: 0,
        threads: 1,
        on_nan: OnNan::SkipBatch,
        ..Default::default()
    };
    let out = tempfile::tempdir().unwrap();
    // 3 bad batches in a row: skipped (the run stops only after 10).
    sgr::train::run_with_data(&cfg, &ds, out.path(), false, true).unwrap();
    let fresh = sgr::train::build_net(&cfg, &ds).unwrap();
    let never = sgr::train::evaluate(&fresh, &ds, &ds.test, 256).unwrap();
    // Read loosely: with no batch trained, the train loss is NaN, written as null.
    let lines: Vec<serde_json::Value> =
        sgr::metrics::read_lines(&out.path().join("metrics.jsonl")).unwrap();
    // Every variable, running statistics included, is where it started.
    let (trained, _, _) =
        sgr::checkpoint::load(&out.path().join("checkpoint.safetensors")).unwrap();
    for (name, t) in fresh.vs.variables() {
        let d = (&t - &trained[&name]).abs().max().double_value(&[]);
        assert!(
            d == 0.0,
            "{name} moved by {d} although every batch was skipped"
        );
    }
    assert!(never.loss.is_finite());
    // (serde_json's default float parser may be off by one ulp.)
    let loss = lines[0]["test_loss"].as_f64().unwrap();
    assert!(
        (loss - never.loss).abs() < 1e-12,
        "{loss} vs {}",
        never.loss
    );
    assert_eq!(
        lines[0]["module_test_accuracy"],
        serde_json::json!(never.module_accuracy)
    );
}

#[test]
fn resume_with_a_config_file_cannot_change_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let (code, _, err) = sgr_cmd(&[
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
        "--train-subset",
        "128",
        "--threads",
        "1",
        "--quiet",
        "--out",
        o,
    ]);
    assert_eq!(code, 0, "{err}");
    let saved = std::fs::read(out.join("config.json")).unwrap();
    let ckpt = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let file = tmp.path().join("f.toml");
    for (text, needle) in [
        (
            "lr = 0.5\n",
            "lr (in the --config file) cannot change when resuming",
        ),
        (
            "rule = \"sgr\"\n",
            "rule (in the --config file) cannot change",
        ),
        (
            "batch_size = 32\n",
            "batch_size (in the --config file) cannot change",
        ),
        // The cosine schedule depends on the total.
        (
            "epochs = 2\n",
            "epochs (in the --config file) cannot change when resuming a run with the cosine schedule",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let args = [
            "train",
            "--resume",
            "--config",
            file.to_str().unwrap(),
            "--quiet",
            "--out",
            o,
        ];
        let (code, _, err) = sgr_cmd(&args);
        assert_ne!(code, 0, "{text}");
        assert!(
            err.starts_with(&format!("error: {needle}")),
            "{text}: {err}"
        );
        assert_no_panic(&err);
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            saved,
            "{text}"
        );
        assert_eq!(
            std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
            ckpt
        );
    }
    // A flag that changes the run is refused the same way, naming the flag.
    let (code, _, err) = sgr_cmd(&["train", "--resume", "--lr", "0.5", "--out", o]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with(
            "error: --lr cannot change when resuming (the run has 0.1, this asks for 0.5)"
        ),
        "{err}"
    );
    // The file may repeat saved values and change the resumable fields.
    std::fs::write(
        &file,
        "lr = 0.1\nrule = \"dgl\"\nthreads = 1\ndiag_every = 7\n",
    )
    .unwrap();
    let (code, _, err) = sgr_cmd(&[
        "train",
        "--resume",
        "--config",
        file.to_str().unwrap(),
        "--quiet",
        "--out",
        o,
    ]);
    assert_eq!(code, 0, "{err}");
    let now: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let mut expected: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    expected["diag_every"] = 7.into();
    assert_eq!(now, expected);
}

#[test]
fn sgr_from_past_the_last_module_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let base = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "resnet20",
        "--rule",
        "sgr",
        "--out",
        o,
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    assert_clean_failure(
        &with(&["--modules", "2", "--sgr-from", "3"]),
        "error: --sgr-from: 3 is larger than --modules 2, so no module would be regularised (the run would be dgl under the name sgr); use a value in 2..=2, or --rule dgl",
        &out,
    );
    assert_clean_failure(
        &with(&["--modules", "1"]),
        "error: --sgr-from: 2 is larger than --modules 1, so no module would be regularised (the run would be dgl under the name sgr); --rule sgr needs --modules 2 or more",
        &out,
    );
}

#[test]
fn a_panic_is_one_located_line_and_the_bad_input_checks_catch_it() {
    let run = |backtrace: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sgr"));
        cmd.arg("internal-panic")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        if backtrace {
            cmd.env("RUST_BACKTRACE", "1");
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(false);
    // One line for the user, with where it happened for the bug report.
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: internal error (please report): deliberate panic (sgr internal-panic) (at src/main.rs:"),
        "{err}"
    );
    // The backtrace follows when asked for.
    let traced = run(true);
    assert!(traced.starts_with(err.trim_end()), "{traced}");
    assert!(
        traced.contains("stack backtrace:") && traced.lines().count() > 2,
        "{traced}"
    );
    // The bad-input checks reject both outputs.
    for e in [&err, &traced] {
        assert!(
            std::panic::catch_unwind(|| assert_no_panic(e)).is_err(),
            "{e}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let caught =
        std::panic::catch_unwind(|| assert_clean_failure(&["internal-panic"], "error", tmp.path()));
    assert!(caught.is_err(), "assert_clean_failure accepted a panic");
}
