//! The SGR variants of the study: sender/both sides, the per-sample cosine distance and the λ
//! schedules. Every exact gradient is checked against central differences over parameters in
//! f64, with the targets computed independently of the rule code.
use crate::common::*;
use sgr::data::Batch;
use sgr::model::{HeadKind, SplitNet};
use sgr::rules::sgr::distance;
use sgr::rules::{
    self, LambdaSchedule, RuleKind, SgrConfig, SgrDistance, SgrGrad, SgrSide, StepContext,
    cross_entropy,
};
use tch::Tensor;

fn step_at(net: &SplitNet, kind: RuleKind, cfg: &SgrConfig, batch: &Batch, at: &StepContext) {
    zero_grads(net);
    rules::build(kind, cfg).step(net, batch, at).unwrap();
}

fn step(net: &SplitNet, kind: RuleKind, cfg: &SgrConfig, batch: &Batch) {
    step_at(net, kind, cfg, batch, &StepContext::default());
}

/// Per module (frozen buffers): its input, the plain-loss gradient w.r.t. its output and the
/// plain-loss gradient w.r.t. its input, all detached.
struct Boundaries {
    inputs: Vec<Tensor>,
    output_grads: Vec<Tensor>,
    input_grads: Vec<Tensor>,
}

fn boundaries(net: &SplitNet, batch: &Batch) -> Boundaries {
    net.with_frozen_buffers(|| {
        let mut b = Boundaries {
            inputs: Vec::new(),
            output_grads: Vec::new(),
            input_grads: Vec::new(),
        };
        let mut h = batch.images.shallow_clone();
        for k in 0..net.num_modules() {
            let x = h.detach().set_requires_grad(true);
            let out = net.forward_module(k, &x, true);
            let loss = cross_entropy(&net.head_logits(k, &out, true), &batch.labels);
            let g = Tensor::run_backward(&[&loss], &[&x, &out], false, false);
            b.inputs.push(x.detach());
            b.input_grads.push(g[0].detach());
            b.output_grads.push(g[1].detach());
            h = out.detach();
        }
        b
    })
}

/// Module `k`'s whole objective as SGR defines it, a differentiable scalar of its parameters:
/// L_k + λ·D(∂L_k/∂x_k, g_out_{k-1}) on the receiver side + λ·D(∂L_k/∂h_k, g_in_{k+1}) on the
/// sender side, with the targets held fixed.
fn objective(net: &SplitNet, batch: &Batch, k: usize, b: &Boundaries, cfg: &SgrConfig) -> Tensor {
    let x = b.inputs[k].detach().set_requires_grad(true);
    let out = net.forward_module(k, &x, true);
    let loss = cross_entropy(&net.head_logits(k, &out, true), &batch.labels);
    let (receives, sends) = (
        cfg.side.receiver() && k >= 1,
        cfg.side.sender() && k + 1 < net.num_modules(),
    );
    let grads = Tensor::run_backward(&[&loss], &[&x, &out], true, true);
    let mut total = loss.shallow_clone();
    if receives {
        total += distance(cfg.distance, &grads[0], &b.output_grads[k - 1]) * cfg.lambda;
    }
    if sends {
        total += distance(cfg.distance, &grads[1], &b.input_grads[k + 1]) * cfg.lambda;
    }
    total
}

/// The gradient the rule left in module `k` at [`parameter_picks`].
fn rule_grads(net: &SplitNet, k: usize) -> Vec<f64> {
    picked(net, k, &parameter_picks(net, k))
}

/// Relative error between the rule's gradient of module `k` and central differences of `f`.
fn fd_vs_rule(net: &SplitNet, k: usize, f: &dyn Fn() -> f64) -> f64 {
    let (fd, picks) = fd_over_parameters(net, k, f);
    rel_err(&picked(net, k, &picks), &fd)
}

#[test]
fn every_side_and_distance_has_the_exact_gradient_in_f64() {
    let distances = [
        SgrDistance::L2,
        SgrDistance::Cosine,
        SgrDistance::CosineSample,
    ];
    for side in [SgrSide::Receiver, SgrSide::Sender, SgrSide::Both] {
        for distance_kind in distances {
            let batch = tiny_batch(6, 1, 4, true, 50);
            let net = tiny_mlp(3, 5, HeadKind::Linear, 3, (1, 4), true, 51);
            let cfg = SgrConfig {
                lambda: 2.0,
                distance: distance_kind,
                side,
                ..Default::default()
            };
            let b = boundaries(&net, &batch);
            step(&net, RuleKind::Sgr, &cfg, &batch);
            let sgr_grads: Vec<Vec<f64>> = (0..3)
                .map(|k| {
                    let value = || {
                        net.with_frozen_buffers(|| {
                            objective(&net, &batch, k, &b, &cfg).double_value(&[])
                        })
                    };
                    let err = fd_vs_rule(&net, k, &value);
                    assert!(err < 1e-6, "{side:?} {distance_kind:?} module {k}: {err:e}");
                    rule_grads(&net, k)
                })
                .collect();
            // The penalty moved exactly the modules it should (so the check above can fail).
            step(&net, RuleKind::Dgl, &cfg, &batch);
            for (k, sgr_k) in sgr_grads.iter().enumerate() {
                let penalised = (side.receiver() && k >= 1) || (side.sender() && k < 2);
                let moved = rel_err(sgr_k, &rule_grads(&net, k)) > 1e-4;
                assert_eq!(moved, penalised, "{side:?} {distance_kind:?} module {k}");
            }
        }
    }
}

#[test]
fn cosine_sample_is_the_mean_per_sample_cosine_distance() {
    let g = Tensor::from_slice(&[1.0f64, 0.0, 3.0, 4.0]).view([2, 2]);
    let t = Tensor::from_slice(&[1.0f64, 1.0, -3.0, -4.0]).view([2, 2]);
    let d = distance(SgrDistance::CosineSample, &g, &t).double_value(&[]);
    // Sample 1: cos 45° = 0.7071; sample 2: cos 180° = -1.
    let expected = 1.0 - (std::f64::consts::FRAC_1_SQRT_2 - 1.0) / 2.0;
    assert!((d - expected).abs() < 1e-12, "{d} vs {expected}");
    // Scale-invariant per sample, unlike the batch-flattened cosine.
    let scaled = &g * Tensor::from_slice(&[100.0f64, 1.0]).view([2, 1]);
    let d2 = distance(SgrDistance::CosineSample, &scaled, &t).double_value(&[]);
    assert!((d2 - d).abs() < 1e-12);
    let flat = distance(SgrDistance::Cosine, &g, &t).double_value(&[]);
    let flat2 = distance(SgrDistance::Cosine, &scaled, &t).double_value(&[]);
    assert!((flat - flat2).abs() > 1e-3);
}

#[test]
fn lambda_schedules_ramp_and_anneal_and_zero_lambda_is_dgl() {
    let at = |schedule, span, epoch| {
        SgrConfig {
            lambda: 2.0,
            schedule,
            schedule_epochs: span,
            ..Default::default()
        }
        .lambda_at(epoch)
    };
    assert_eq!(at(LambdaSchedule::Constant, 4.0, 3.0), 2.0);
    assert_eq!(at(LambdaSchedule::Warmup, 4.0, 0.0), 0.0);
    assert_eq!(at(LambdaSchedule::Warmup, 4.0, 1.0), 0.5);
    assert_eq!(at(LambdaSchedule::Warmup, 4.0, 9.0), 2.0);
    assert_eq!(at(LambdaSchedule::Decay, 4.0, 0.0), 2.0);
    assert_eq!(at(LambdaSchedule::Decay, 4.0, 3.0), 0.5);
    assert_eq!(at(LambdaSchedule::Decay, 4.0, 5.0), 0.0);
    // A warm-up step at epoch 0 is a dgl step; the same step later is not.
    let batch = tiny_batch(6, 1, 4, false, 52);
    let (a, b) = (
        tiny_mlp(4, 6, HeadKind::Linear, 4, (1, 4), false, 53),
        tiny_mlp(4, 6, HeadKind::Linear, 4, (1, 4), false, 53),
    );
    let cfg = SgrConfig {
        lambda: 1.0,
        schedule: LambdaSchedule::Warmup,
        schedule_epochs: 2.0,
        ..Default::default()
    };
    step(&a, RuleKind::Dgl, &cfg, &batch);
    step(&b, RuleKind::Sgr, &cfg, &batch);
    assert_eq!(max_abs_diff(&grads(&a), &grads(&b)), 0.0);
    let later = StepContext {
        global_step: 10,
        epoch: 1.0,
    };
    step_at(&b, RuleKind::Sgr, &cfg, &batch, &later);
    assert!(max_abs_diff(&grads(&a), &grads(&b)) > 1e-6);
}

#[test]
fn sender_side_keeps_gradients_inside_modules_and_running_statistics_as_dgl() {
    // The last module never sends and, on the sender side, never receives: it is exactly dgl.
    // Every module's running statistics move once per step, as in dgl (the recomputation
    // for the sender penalty runs with frozen buffers).
    let batch = tiny_batch(6, 1, 4, false, 54);
    let a = tiny_mlp(4, 6, HeadKind::Mlp, 4, (1, 4), false, 55);
    let b = tiny_mlp(4, 6, HeadKind::Mlp, 4, (1, 4), false, 55);
    let cfg = SgrConfig {
        lambda: 1.0,
        side: SgrSide::Sender,
        ..Default::default()
    };
    step(&a, RuleKind::Dgl, &cfg, &batch);
    step(&b, RuleKind::Sgr, &cfg, &batch);
    let last = |net: &SplitNet| {
        net.module_variables(3, true)
            .into_iter()
            .map(|(_, t)| t.grad().copy())
            .collect::<Vec<_>>()
    };
    for (x, y) in last(&a).iter().zip(last(&b)) {
        assert_eq!((x - y).abs().max().double_value(&[]), 0.0);
    }
    let buffers = |net: &SplitNet| {
        net.vs
            .variables()
            .into_iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(n, t)| (n, t.copy()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    assert_eq!(max_abs_diff(&buffers(&a), &buffers(&b)), 0.0);
    assert!(max_abs_diff(&grads(&a), &grads(&b)) > 1e-6);
}

#[test]
fn sender_side_refuses_what_it_cannot_compute() {
    use sgr::config::{TrainConfig, TrainOptions};
    let base = TrainOptions {
        rule: Some(RuleKind::Sgr),
        sgr_side: Some(SgrSide::Sender),
        ..Default::default()
    };
    let e = TrainConfig::resolve(
        &TrainOptions {
            modules: Some(1),
            ..base.clone()
        },
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--sgr-side") && e.contains("--modules"), "{e}");
    let e = TrainConfig::resolve(
        &TrainOptions {
            modules: Some(2),
            sgr_grad: Some(SgrGrad::Jvp),
            sgr_side: Some(SgrSide::Both),
            ..base
        },
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--sgr-side") && e.contains("exact"), "{e}");
}

#[test]
fn tangent_penalty_equals_the_double_backward_on_mlps() {
    for distance_kind in [SgrDistance::L2, SgrDistance::CosineSample] {
        let batch = tiny_batch(6, 1, 4, true, 56);
        let exact = SgrConfig {
            lambda: 2.0,
            distance: distance_kind,
            ..Default::default()
        };
        let jvp = SgrConfig {
            grad: SgrGrad::Jvp,
            ..exact.clone()
        };
        let a = tiny_mlp(4, 6, HeadKind::Mlp, 3, (1, 4), true, 57);
        let b = tiny_mlp(4, 6, HeadKind::Mlp, 3, (1, 4), true, 57);
        step(&a, RuleKind::Sgr, &exact, &batch);
        step(&b, RuleKind::Sgr, &jvp, &batch);
        let all = |net: &SplitNet| (0..3).flat_map(|k| rule_grads(net, k)).collect::<Vec<_>>();
        let err = rel_err(&all(&b), &all(&a));
        assert!(err < 1e-10, "{distance_kind:?}: {err:e}");
        step(&b, RuleKind::Dgl, &jvp, &batch);
        assert!(rel_err(&all(&b), &all(&a)) > 1e-4);
    }
}

#[test]
fn sender_target_is_sent_whatever_computes_the_receiver_penalty() {
    // The CLI refuses `both` with jvp/fd, but the rule itself must not drop the sender-side
    // penalty when the receiving module takes the jvp or fd path: module 0 carries only the
    // sender penalty, computed exactly either way, so its gradient matches the exact run.
    let batch = tiny_batch(6, 1, 4, true, 58);
    let exact = SgrConfig {
        lambda: 2.0,
        side: SgrSide::Both,
        ..Default::default()
    };
    let a = tiny_mlp(3, 5, HeadKind::Linear, 3, (1, 4), true, 59);
    step(&a, RuleKind::Sgr, &exact, &batch);
    step(&a, RuleKind::Dgl, &exact, &batch);
    let dgl = rule_grads(&a, 0);
    step(&a, RuleKind::Sgr, &exact, &batch);
    let want = rule_grads(&a, 0);
    assert!(
        rel_err(&want, &dgl) > 1e-4,
        "the sender penalty moves module 0"
    );
    for grad in [SgrGrad::Jvp, SgrGrad::Fd] {
        let cfg = SgrConfig {
            grad,
            ..exact.clone()
        };
        step(&a, RuleKind::Sgr, &cfg, &batch);
        let err = rel_err(&rule_grads(&a, 0), &want);
        assert!(err < 1e-10, "{grad:?}: {err:e}");
    }
}
