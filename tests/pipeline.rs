//! Module-parallel training (`--workers W`): the pipeline computes the sequential run bit for
//! bit, resumes with another W, stops cleanly, and refuses what it cannot run.
use crate::common::assert_refused;
use sgr::config::TrainConfig;
use sgr::data::{self, Dataset, DatasetKind};
use sgr::metrics::EpochRecord;
use sgr::model::{Arch, LocalLossKind, SplitStrategy};
use sgr::rules::{RuleKind, SgrGrad, SgrSide};
use std::path::Path;

fn base(model: &str, rule: RuleKind, modules: usize) -> TrainConfig {
    TrainConfig {
        data: DatasetKind::Synthetic,
        model: model.parse::<Arch>().unwrap(),
        rule,
        modules,
        split: SplitStrategy::Even,
        epochs: 2,
        batch_size: 16,
        lr: 0.05,
        lambda: 1.0,
        diag_every: 3,
        threads: 1,
        seed: 11,
        ..Default::default()
    }
}

fn synthetic() -> Dataset {
    data::synthetic::generate(7, 80, 32, 1, 8, 3)
}

/// Every tensor of the two runs' checkpoints (weights, buffers, optimizer state) is equal, bit
/// for bit, and so is every epoch's record.
pub fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (va, ma, sa) = sgr::checkpoint::load(&a.join("checkpoint.safetensors")).unwrap();
    let (vb, mb, sb) = sgr::checkpoint::load(&b.join("checkpoint.safetensors")).unwrap();
    assert_eq!(sa.unwrap().global_step, sb.unwrap().global_step, "{what}");
    for (x, y) in [(&va, &vb), (&ma, &mb)] {
        assert_eq!(x.len(), y.len(), "{what}");
        for (name, t) in x {
            let other = y.get(name).unwrap_or_else(|| panic!("{what}: no {name}"));
            let same = t.equal(other);
            assert!(
                same,
                "{what}: {name} differs by {}",
                (t - other).abs().max().double_value(&[])
            );
        }
    }
    let read = |p: &Path| -> Vec<EpochRecord> {
        sgr::metrics::read_lines(&p.join("metrics.jsonl")).unwrap()
    };
    let (la, lb) = (read(a), read(b));
    assert_eq!(la.len(), lb.len(), "{what}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(
            (
                &x.module_train_loss,
                &x.sgr_penalty,
                &x.module_test_accuracy,
                &x.grad_cosine,
                x.train_accuracy
            ),
            (
                &y.module_train_loss,
                &y.sgr_penalty,
                &y.module_test_accuracy,
                &y.grad_cosine,
                y.train_accuracy
            ),
            "{what}: epoch {}",
            x.epoch
        );
    }
}

/// Trains `cfg` sequentially and with each of `workers`, and checks the runs agree bit for bit.
fn assert_pipeline_is_sequential(cfg: TrainConfig, workers: &[usize], what: &str) {
    let ds = synthetic();
    let sequential = tempfile::tempdir().unwrap();
    sgr::train::run_with_data(&cfg, &ds, sequential.path(), false, true).unwrap();
    for &w in workers {
        let piped = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            workers: w,
            ..cfg.clone()
        };
        sgr::train::run_with_data(&cfg, &ds, piped.path(), false, true).unwrap();
        assert_same_run(sequential.path(), piped.path(), &format!("{what}, W={w}"));
    }
}

#[test]
fn dgl_pipeline_equals_the_sequential_run_bit_for_bit() {
    // Clipping per module, and channels-last weights and batches.
    let cfg = TrainConfig {
        clip_grad_norm: 0.5,
        channels_last: true,
        ..base("resnet20", RuleKind::Dgl, 4)
    };
    assert_pipeline_is_sequential(cfg, &[2, 3, 4], "dgl resnet20 K=4");
}

#[test]
fn sgr_pipeline_equals_the_sequential_run_for_every_penalty_gradient() {
    for grad in [SgrGrad::Exact, SgrGrad::Jvp, SgrGrad::Fd] {
        let cfg = TrainConfig {
            sgr_grad: grad,
            ..base("resnet20", RuleKind::Sgr, 3)
        };
        assert_pipeline_is_sequential(cfg, &[3], &format!("sgr {grad:?}"));
    }
}

#[test]
fn sender_side_sgr_runs_lock_step_and_equals_the_sequential_run() {
    for side in [SgrSide::Sender, SgrSide::Both] {
        let cfg = TrainConfig {
            sgr_side: side,
            ..base("resnet20", RuleKind::Sgr, 4)
        };
        assert_pipeline_is_sequential(cfg, &[2, 4], &format!("sgr {side:?}"));
    }
}

#[test]
fn forward_gradient_rules_and_local_losses_pipeline_exactly() {
    let fg = TrainConfig {
        fg_tangents: 2,
        aux_head: sgr::model::HeadKind::Linear,
        ..base("mlp-3x24", RuleKind::Fg, 3)
    };
    assert_pipeline_is_sequential(fg.clone(), &[3], "fg mlp");
    let fg_sgr = TrainConfig {
        rule: RuleKind::FgSgr,
        ..fg
    };
    assert_pipeline_is_sequential(fg_sgr, &[2], "fg-sgr mlp");
    // InfoPro's decoder reads the images in every module: they travel with the batch.
    let infopro = TrainConfig {
        local_loss: LocalLossKind::Infopro,
        ..base("resnet20", RuleKind::Dgl, 2)
    };
    assert_pipeline_is_sequential(infopro, &[2], "dgl infopro");
    let vit = TrainConfig {
        optimizer: sgr::optim::OptimizerKind::Adamw,
        lr: 1e-3,
        aux_head: sgr::model::HeadKind::Linear,
        label_smoothing: 0.1,
        ..base("vit-2x16h2", RuleKind::Sgr, 2)
    };
    assert_pipeline_is_sequential(vit, &[2], "sgr vit adamw");
}

#[test]
fn a_pipelined_run_resumes_with_another_number_of_workers() {
    let ds = synthetic();
    let cfg = TrainConfig {
        epochs: 3,
        schedule: sgr::schedule::ScheduleKind::Step,
        milestones: vec![2],
        ..base("resnet20", RuleKind::Sgr, 4)
    };
    let whole = tempfile::tempdir().unwrap();
    sgr::train::run_with_data(&cfg, &ds, whole.path(), false, true).unwrap();
    // Epoch 1 on 2 workers, epoch 2 on 4, epoch 3 on 1.
    let parts = tempfile::tempdir().unwrap();
    for (epochs, workers) in [(1, 2), (2, 4), (3, 1)] {
        let cfg = TrainConfig {
            epochs,
            workers,
            ..cfg.clone()
        };
        sgr::train::run_with_data(&cfg, &ds, parts.path(), epochs > 1, true).unwrap();
    }
    assert_same_run(whole.path(), parts.path(), "resumed with W = 2, 4, 1");
}

#[test]
fn a_diverging_stage_stops_the_pipeline_with_the_place_it_happened() {
    let ds = synthetic();
    let cfg = TrainConfig {
        lr: 1e8,
        workers: 2,
        ..base("resnet20", RuleKind::Dgl, 2)
    };
    let out = tempfile::tempdir().unwrap();
    let e = sgr::train::run_with_data(&cfg, &ds, out.path(), false, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("training diverged at epoch 1, step ") && e.contains("of module"),
        "{e}"
    );
    assert!(e.contains("none yet"), "{e}");
}

#[test]
fn bad_pipeline_options_give_one_clear_error_and_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let train = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--data",
            "synthetic",
            "--model",
            "resnet20",
            "--epochs",
            "1",
            "--out",
            o,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // Every case trains dgl on K=2; `two` adds --workers 2 and the case's own flags.
    let one = |extra: &[&'static str]| -> Vec<&'static str> {
        ["--rule", "dgl", "--modules", "2"]
            .iter()
            .chain(extra)
            .copied()
            .collect()
    };
    let two = |extra: &[&'static str]| -> Vec<&'static str> {
        one(&["--workers", "2"])
            .into_iter()
            .chain(extra.iter().copied())
            .collect()
    };
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (
            one(&["--workers", "3"]),
            "--workers: 3: more workers than the 2 module(s)",
        ),
        (
            vec!["--rule", "bp", "--modules", "2", "--workers", "2"],
            "--workers: 2: rule bp",
        ),
        (one(&["--workers", "0"]), "--workers: must be at least 1"),
        (
            two(&["--devices", "cpu"]),
            "--devices: 1 device(s) for 2 worker(s)",
        ),
        (two(&["--devices", "cpu,cuda:7"]), "--devices: `cuda:7`"),
        (
            two(&["--devices", "cpu,tpu"]),
            "--devices: `tpu` is not a device",
        ),
        (
            one(&["--replicas", "2"]),
            "--replicas: data-parallel replicas run as MPI ranks",
        ),
        (two(&["--precision", "fp16"]), "--workers: 2: fp16"),
        (
            two(&["--on-nan", "skip-batch"]),
            "--workers: 2: --on-nan skip-batch",
        ),
    ];
    if !cfg!(feature = "mpi") {
        cases.push((
            one(&["--distributed", "mpi"]),
            "--distributed: mpi: this binary was built without the `mpi` feature",
        ));
    }
    for (extra, needle) in cases {
        let args = train(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&args, &format!("error: {needle}"), true, &out);
    }
}
