//! Mixed precision: fp16 loss scaling leaves every rule's gradient as it was (checked in f64,
//! where scaling by a power of two is exact), and bf16/fp16 autocast steps of the SGR exact
//! (double backward) and jvp paths agree with fp32 on the CPU to the documented tolerance.
use crate::common::{grads, rel_err, tiny_batch, tiny_net, zero_grads};
use sgr::data::Batch;
use sgr::model::SplitNet;
use sgr::precision::{Precision, StepScope};
use sgr::rules::{self, RuleKind, SgrConfig, SgrDistance, SgrGrad, SgrSide};
use tch::Device;

/// Every gradient of `net`, flattened in name order.
fn flat_grads(net: &SplitNet) -> Vec<f64> {
    let g = grads(net);
    let mut names: Vec<&String> = g.keys().collect();
    names.sort();
    names
        .into_iter()
        .flat_map(|n| Vec::<f64>::try_from(g[n].to_kind(tch::Kind::Double).reshape([-1])).unwrap())
        .collect()
}

/// One step of `rule`, inside `scope` if given; the gradients divided by `unscale`, and the
/// losses.
fn step(
    net: &SplitNet,
    rule: RuleKind,
    cfg: &SgrConfig,
    batch: &Batch,
    scope: Option<StepScope>,
    unscale: f64,
) -> (Vec<f64>, Vec<f64>) {
    zero_grads(net);
    let stats = rules::build(rule, cfg)
        .step(net, batch, &rules::StepContext::at_step(0))
        .unwrap();
    drop(scope);
    let g = flat_grads(net).into_iter().map(|x| x / unscale).collect();
    (g, stats.module_losses)
}

#[test]
fn loss_scaling_leaves_every_rules_gradient_unchanged_in_f64() {
    let batch = tiny_batch(6, 2, 8, true, 71);
    let sgr = |grad, distance, side| SgrConfig {
        grad,
        distance,
        side,
        ..Default::default()
    };
    let cases = [
        (RuleKind::Bp, SgrConfig::default()),
        (RuleKind::Dgl, SgrConfig::default()),
        (
            RuleKind::Sgr,
            sgr(SgrGrad::Exact, SgrDistance::L2, SgrSide::Receiver),
        ),
        (
            RuleKind::Sgr,
            sgr(SgrGrad::Exact, SgrDistance::Cosine, SgrSide::Both),
        ),
        (
            RuleKind::Sgr,
            sgr(SgrGrad::Jvp, SgrDistance::L2, SgrSide::Receiver),
        ),
        (
            RuleKind::Sgr,
            sgr(SgrGrad::Jvp, SgrDistance::CosineSample, SgrSide::Receiver),
        ),
        (
            RuleKind::Sgr,
            sgr(SgrGrad::Fd, SgrDistance::L2, SgrSide::Receiver),
        ),
    ];
    let scale = 1024.0;
    for (rule, cfg) in cases {
        let (a, b) = (tiny_net(3, 2, 8, true, 72), tiny_net(3, 2, 8, true, 72));
        let (plain, losses) = step(&a, rule, &cfg, &batch, None, 1.0);
        let scope = StepScope::scaled_only(scale);
        let (scaled, scaled_losses) = step(&b, rule, &cfg, &batch, Some(scope), scale);
        let err = rel_err(&scaled, &plain);
        assert!(err < 1e-10, "{rule} {cfg:?}: rel err {err:e}");
        // Loss values are not scaled.
        assert_eq!(losses, scaled_losses, "{rule} {cfg:?}");
        // And the scale did reach the gradients: without unscaling they are S times larger.
        let (raw, _) = step(
            &b,
            rule,
            &cfg,
            &batch,
            Some(StepScope::scaled_only(scale)),
            1.0,
        );
        assert!(rel_err(&raw, &plain) > 100.0, "{rule} {cfg:?}");
    }
}

/// Tolerances of a reduced-precision step's gradient against fp32's (relative L2 error), on
/// the CPU for ResNet-20 cut in 3 at initialisation, batch 16 of 3x16x16. Autocast itself
/// moves a plain `dgl` step's gradient this much (measured with libtorch 2.11: bf16 0.24, fp16
/// 0.093; PyTorch's own CPU autocast moves a 7-layer conv-BN-ReLU net's gradient by 0.14 and
/// 0.044), since BatchNorm's backward cancels large terms; the bounds leave ~1.6x headroom.
const TOL: [(Precision, f64, f64); 2] =
    [(Precision::Bf16, 1.0, 0.4), (Precision::Fp16, 1024.0, 0.15)];

#[test]
fn bf16_and_fp16_autocast_sgr_steps_agree_with_fp32() {
    let batch = tiny_batch(16, 3, 16, false, 73);
    let run = |rule, grad, precision, scale| {
        let cfg = SgrConfig {
            grad,
            ..Default::default()
        };
        let net = tiny_net(3, 3, 16, false, 74);
        let scope = StepScope::new(precision, Device::Cpu, scale).unwrap();
        step(&net, rule, &cfg, &batch, Some(scope), scale)
    };
    let minus = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let (dgl32, _) = run(RuleKind::Dgl, SgrGrad::Exact, Precision::Fp32, 1.0);
    for grad in [SgrGrad::Exact, SgrGrad::Jvp] {
        let (sgr32, losses32) = run(RuleKind::Sgr, grad, Precision::Fp32, 1.0);
        // What the penalty adds to the gradient, at fp32.
        let penalty32 = minus(&sgr32, &dgl32);
        for (precision, scale, tol) in TOL {
            let (sgr, losses) = run(RuleKind::Sgr, grad, precision, scale);
            let (dgl, _) = run(RuleKind::Dgl, grad, precision, scale);
            let err = rel_err(&sgr, &sgr32);
            let dgl_err = rel_err(&dgl, &dgl32);
            let penalty_err = rel_err(&minus(&sgr, &dgl), &penalty32);
            eprintln!(
                "{precision} {grad:?}: gradient rel err vs fp32 {err:.3} (dgl's {dgl_err:.3}), penalty part {penalty_err:.3}"
            );
            assert!(err < tol, "{precision} {grad:?}: rel err {err}");
            assert!(
                penalty_err < 1.3 * tol,
                "{precision} {grad:?}: penalty part {penalty_err}"
            );
            // The SGR paths add no error of their own beyond what autocast does to dgl.
            assert!(
                err < 1.2 * dgl_err,
                "{precision} {grad:?}: {err} vs dgl {dgl_err}"
            );
            // Autocast was on: the losses are not fp32's bit for bit.
            assert_ne!(losses, losses32, "{precision} {grad:?}");
        }
    }
}

#[test]
fn fp16_training_keeps_its_loss_scaler_in_the_checkpoint_and_resumes_exactly() {
    use sgr::config::TrainConfig;
    let ds = sgr::data::synthetic::generate(3, 96, 32, 1, 8, 3);
    let mut cfg = TrainConfig {
        data: sgr::data::DatasetKind::Synthetic,
        model: "resnet20".parse().unwrap(),
        rule: RuleKind::Sgr,
        modules: 2,
        split: sgr::model::SplitStrategy::Even,
        precision: Precision::Fp16,
        epochs: 2,
        batch_size: 32,
        schedule: sgr::schedule::ScheduleKind::Constant,
        diag_every: 0,
        threads: 1,
        seed: 7,
        ..Default::default()
    };
    let whole = tempfile::tempdir().unwrap();
    let a = sgr::train::run_with_data(&cfg, &ds, whole.path(), false, true).unwrap();
    assert!(a.test_accuracy.is_finite());
    let (_, _, state) =
        sgr::checkpoint::load(&whole.path().join("checkpoint.safetensors")).unwrap();
    let scaler = state.unwrap().loss_scaler.expect("fp16 saves its scaler");
    // Six steps, no overflow at the initial scale on this data.
    assert_eq!(scaler.good_steps + scaler.skipped_steps, 6);
    let parts = tempfile::tempdir().unwrap();
    cfg.epochs = 1;
    sgr::train::run_with_data(&cfg, &ds, parts.path(), false, true).unwrap();
    cfg.epochs = 2;
    let b = sgr::train::run_with_data(&cfg, &ds, parts.path(), true, true).unwrap();
    assert_eq!(a.test_accuracy, b.test_accuracy);
    let (_, _, resumed) =
        sgr::checkpoint::load(&parts.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(resumed.unwrap().loss_scaler, Some(scaler));
}

#[test]
fn bad_precision_input_is_one_clear_error_and_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let base = ["train", "--data", "synthetic", "--epochs", "1", "--out", o];
    for (extra, needle) in [
        (&["--precision", "fp8"][..], "--precision"),
        (
            &["--rule", "fg", "--modules", "2", "--precision", "bf16"][..],
            "--precision: bf16 is not available with --rule fg",
        ),
        (
            &["--rule", "fg", "--modules", "2", "--channels-last"][..],
            "--channels-last: not available with --rule fg",
        ),
    ] {
        let out_ = std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
            .args(base)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out_.stderr);
        assert!(!out_.status.success(), "{extra:?} succeeded");
        assert!(
            err.contains("error") && err.contains(needle),
            "{extra:?}: {err}"
        );
        crate::common::assert_no_panic(&err);
        assert!(!out.exists(), "{extra:?} left a run folder");
    }
}

#[test]
fn channels_last_steps_match_the_standard_layout() {
    use sgr::config::TrainConfig;
    use sgr::optim::Optimizer;
    use sgr::precision::{is_channels_last, to_channels_last};
    let batch = tiny_batch(6, 2, 8, true, 75);
    let x = to_channels_last(&batch.images);
    assert!(is_channels_last(&x) && !is_channels_last(&batch.images));
    assert_eq!((&x - &batch.images).abs().max().double_value(&[]), 0.0);
    for (rule, grad) in [
        (RuleKind::Bp, SgrGrad::Exact),
        (RuleKind::Dgl, SgrGrad::Exact),
        (RuleKind::Sgr, SgrGrad::Exact),
        (RuleKind::Sgr, SgrGrad::Jvp),
    ] {
        let cfg = |channels_last| TrainConfig {
            rule,
            modules: 3,
            sgr_grad: grad,
            channels_last,
            ..Default::default()
        };
        let mut results = Vec::new();
        for channels_last in [false, true] {
            let cfg = cfg(channels_last);
            let net = tiny_net(3, 2, 8, true, 76);
            let mut opt =
                Optimizer::with_layout(&net.vs, cfg.optim(), &net.no_weight_decay(), channels_last);
            let convs: Vec<_> = net
                .vs
                .trainable_variables()
                .into_iter()
                .filter(|t| t.dim() == 4)
                .collect();
            assert!(!convs.is_empty());
            // The weights are channels-last views exactly when asked for (among kernels whose
            // two layouts differ: more than one input channel and wider than 1x1).
            for w in convs.iter().filter(|w| w.size()[1] > 1 && w.size()[2] > 1) {
                assert_eq!(is_channels_last(w), channels_last, "{:?}", w.size());
            }
            let rule_impl = rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
            opt.zero_grad();
            let at = rules::StepContext::at_step(0);
            sgr::train::run_step(&cfg, &net, &*rule_impl, &batch, &at, &None).unwrap();
            if channels_last {
                // Gradients (views into the optimizer's buffer) and a convolution's output
                // follow the layout.
                for w in &convs {
                    assert!(is_channels_last(&w.grad()), "{rule}: gradient layout");
                }
                let y = tch::no_grad(|| net.forward_unit(0, &x, false));
                assert!(is_channels_last(&y), "{rule}: conv output layout");
            }
            opt.step(0.1);
            results.push((flat_grads(&net), crate::common::values(&net)));
        }
        let err = rel_err(&results[1].0, &results[0].0);
        assert!(err < 1e-10, "{rule} {grad:?}: gradients differ by {err:e}");
        let moved = crate::common::max_abs_diff(&results[1].1, &results[0].1);
        assert!(
            moved < 1e-12,
            "{rule} {grad:?}: updated values differ by {moved:e}"
        );
    }
}

#[test]
fn bench_precision_compares_every_step_with_fp32() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args([
            "bench",
            "precision",
            "--model",
            "resnet20",
            "--batch-size",
            "8",
            "--channels",
            "1",
            "--size",
            "8",
            "--modules",
            "2",
            "--threads",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let cells: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["precision"].as_str().unwrap(),
                r["step"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cells,
        [
            ("bf16", "dgl"),
            ("bf16", "sgr exact"),
            ("bf16", "sgr jvp"),
            ("fp16", "dgl"),
            ("fp16", "sgr exact"),
            ("fp16", "sgr jvp"),
        ]
    );
    for r in &rows {
        let err = r["rel_err"].as_f64().unwrap();
        // Non-zero (autocast ran) and within what autocast does to a step (see the test above).
        assert!(err > 0.0 && err < 0.5, "{r}");
        assert_eq!(r["penalty_rel_err"].is_null(), r["step"] == "dgl", "{r}");
    }
    let e = crate::common::text(
        &std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
            .args(["bench", "precision", "--precision", "fp16"])
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("error: sgr bench precision: --precision is set by the check"),
        "{e}"
    );
    // The PyTorch reference of `bench compare` runs fp32 in the standard layout only.
    for flag in [&["--precision", "bf16"][..], &["--channels-last"][..]] {
        let e = crate::common::text(
            &std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
                .args(["bench", "compare", "--rule", "dgl", "--modules", "2"])
                .args(flag)
                .output()
                .unwrap(),
        );
        assert!(
            e.contains("error: sgr bench compare: the PyTorch reference has no --"),
            "{flag:?}: {e}"
        );
    }
}
