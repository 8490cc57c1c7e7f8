//! Rules: gradient isolation, equivalences between rules, and the SGR gradient checked
//! numerically.
use crate::common::*;
use sgr::data::Batch;
use sgr::model::{HeadKind, SplitNet, TokenPool};
use sgr::optim::{OptimConfig, Optimizer};
use sgr::rules::sgr::distance;
use sgr::rules::{self, RuleKind, SgrConfig, SgrDistance, SgrGrad, cross_entropy};
use tch::Tensor;

/// Builds a test network.
type Build = fn() -> SplitNet;
/// Builds a test network with the given auxiliary heads.
type BuildWithHead = fn(HeadKind) -> SplitNet;

fn step(net: &SplitNet, kind: RuleKind, sgr: &SgrConfig, batch: &Batch) {
    zero_grads(net);
    rules::build(kind, sgr)
        .step(net, batch, &rules::StepContext::default())
        .unwrap();
}

#[test]
fn dgl_with_one_module_is_bp() {
    let batch = tiny_batch(6, 1, 10, false, 1);
    let a = tiny_net(1, 1, 10, false, 7);
    let b = tiny_net(1, 1, 10, false, 7);
    let (mut oa, mut ob) = (
        Optimizer::new(&a.vs, OptimConfig::default(), &[]),
        Optimizer::new(&b.vs, OptimConfig::default(), &[]),
    );
    for _ in 0..2 {
        step(&a, RuleKind::Bp, &SgrConfig::default(), &batch);
        step(&b, RuleKind::Dgl, &SgrConfig::default(), &batch);
        assert_eq!(max_abs_diff(&grads(&a), &grads(&b)), 0.0);
        oa.step(0.1);
        ob.step(0.1);
    }
    assert_eq!(max_abs_diff(&values(&a), &values(&b)), 0.0);
}

#[test]
fn sgr_with_zero_lambda_is_dgl() {
    let batch = tiny_batch(6, 1, 10, false, 2);
    let a = tiny_net(4, 1, 10, false, 3);
    let b = tiny_net(4, 1, 10, false, 3);
    let sgr = SgrConfig {
        lambda: 0.0,
        ..Default::default()
    };
    step(&a, RuleKind::Dgl, &sgr, &batch);
    step(&b, RuleKind::Sgr, &sgr, &batch);
    assert_eq!(max_abs_diff(&grads(&a), &grads(&b)), 0.0);
    // Sanity: with λ > 0 the gradients do differ, so the comparison above can fail.
    step(
        &b,
        RuleKind::Sgr,
        &SgrConfig {
            lambda: 1.0,
            ..Default::default()
        },
        &batch,
    );
    assert!(max_abs_diff(&grads(&a), &grads(&b)) > 1e-6);
}

/// The input of module `k` and the plain-loss output gradient of module `k-1`, computed
/// independently of the rule code.
fn module_input_and_target(net: &SplitNet, batch: &Batch, k: usize) -> (Tensor, Option<Tensor>) {
    let mut h = batch.images.shallow_clone();
    let mut target = None;
    for j in 0..k {
        let h_out = net
            .forward_module(j, &h.detach(), true)
            .detach()
            .set_requires_grad(true);
        let loss = cross_entropy(&net.head_logits(j, &h_out, true), &batch.labels);
        target = Some(Tensor::run_backward(&[&loss], &[&h_out], false, false).remove(0));
        h = h_out.detach();
    }
    (h, target)
}

/// L̃_k = L_k + λ D(∂L_k/∂h, target) of module `k` alone, as a differentiable scalar.
fn penalised_loss(
    net: &SplitNet,
    batch: &Batch,
    k: usize,
    h: &Tensor,
    target: Option<&Tensor>,
    cfg: &SgrConfig,
) -> Tensor {
    let h_in = h.detach().set_requires_grad(true);
    let loss = cross_entropy(
        &net.head_logits(k, &net.forward_module(k, &h_in, true), true),
        &batch.labels,
    );
    match target {
        Some(t) => {
            let g_in = Tensor::run_backward(&[&loss], &[&h_in], true, true).remove(0);
            &loss + distance(cfg.distance, &g_in, t) * cfg.lambda
        }
        None => loss,
    }
}

fn module_grads(net: &SplitNet, k: usize) -> Vec<f64> {
    net.module_variables(k, true)
        .iter()
        .flat_map(|(_, t)| {
            Vec::<f64>::try_from(t.grad().to_kind(tch::Kind::Double).flatten(0, -1)).unwrap()
        })
        .collect()
}

fn all_module_grads(net: &SplitNet) -> Vec<f64> {
    (0..net.num_modules())
        .flat_map(|k| module_grads(net, k))
        .collect()
}

#[test]
fn sgr_gradients_stay_inside_each_module_and_use_the_plain_forwarded_gradient() {
    let batch = tiny_batch(4, 1, 8, true, 4);
    let net = tiny_net(3, 1, 8, true, 5);
    let cfg = SgrConfig {
        lambda: 2.0,
        ..Default::default()
    };
    step(&net, RuleKind::Sgr, &cfg, &batch);
    let from_rule: Vec<Vec<f64>> = (0..3).map(|k| module_grads(&net, k)).collect();
    for (k, expected) in from_rule.iter().enumerate() {
        let (h, target) = net.with_frozen_buffers(|| module_input_and_target(&net, &batch, k));
        zero_grads(&net);
        net.with_frozen_buffers(|| {
            penalised_loss(&net, &batch, k, &h, target.as_ref(), &cfg).backward()
        });
        let g = module_grads(&net, k);
        let err = rel_err(&g, expected);
        assert!(err < 1e-10, "module {k}: {err}");
    }
    // Gradient isolation of the rule itself: with module k's head made NaN, its loss, penalty
    // and gradients are NaN, and any path from them back into an earlier module would carry
    // NaN there. The earlier modules' gradients must be exactly what they were.
    for k in 1..3 {
        let poisoned = tiny_net(3, 1, 8, true, 5);
        let head: Vec<tch::Tensor> = poisoned
            .module_variables(k, true)
            .into_iter()
            .filter(|(name, _)| name.starts_with("aux.") || name.starts_with("fc."))
            .map(|(_, t)| t)
            .collect();
        assert!(!head.is_empty());
        tch::no_grad(|| {
            for mut t in head {
                let _ = t.fill_(f64::NAN);
            }
        });
        step(&poisoned, RuleKind::Sgr, &cfg, &batch);
        assert!(
            module_grads(&poisoned, k).iter().all(|g| g.is_nan()),
            "module {k}'s own gradients are not NaN: the poison did not reach them"
        );
        for (j, expected) in from_rule.iter().enumerate().take(k) {
            assert_eq!(
                &module_grads(&poisoned, j),
                expected,
                "the loss of module {k} leaked into module {j}"
            );
        }
    }
    // Negative control: had module 1 forwarded the gradient of its *penalised* loss, module 2
    // would get a different gradient.
    let (h1, t1) = net.with_frozen_buffers(|| module_input_and_target(&net, &batch, 1));
    let h1_in = h1.detach().set_requires_grad(true);
    let wrong_target = net.with_frozen_buffers(|| {
        let out = net.forward_module(1, &h1_in, true);
        let loss = cross_entropy(&net.head_logits(1, &out, true), &batch.labels);
        let g_in = Tensor::run_backward(&[&loss], &[&h1_in], true, true).remove(0);
        let total = loss + distance(cfg.distance, &g_in, t1.as_ref().unwrap()) * cfg.lambda;
        Tensor::run_backward(&[&total], &[&out], false, false).remove(0)
    });
    let (h2, _) = net.with_frozen_buffers(|| module_input_and_target(&net, &batch, 2));
    zero_grads(&net);
    net.with_frozen_buffers(|| {
        penalised_loss(&net, &batch, 2, &h2, Some(&wrong_target), &cfg).backward()
    });
    assert!(rel_err(&module_grads(&net, 2), &from_rule[2]) > 1e-6);
}

#[test]
fn exact_sgr_gradient_matches_finite_differences_in_f64() {
    // A ResNet and a ViT (the double backward through attention, LayerNorm and GELU).
    let cases: [(SgrDistance, i64, Build); 3] = [
        (SgrDistance::L2, 6, || tiny_net(2, 2, 6, true, 9)),
        (SgrDistance::Cosine, 6, || tiny_net(2, 2, 6, true, 9)),
        (SgrDistance::L2, 8, || {
            tiny_vit(2, HeadKind::Linear, 2, 2, TokenPool::Cls, true, 9)
        }),
    ];
    for (distance_kind, size, build) in cases {
        let batch = tiny_batch(4, 2, size, true, 8);
        let net = build();
        let cfg = SgrConfig {
            lambda: 3.0,
            distance: distance_kind,
            ..Default::default()
        };
        step(&net, RuleKind::Sgr, &cfg, &batch);
        let (h, target) = net.with_frozen_buffers(|| module_input_and_target(&net, &batch, 1));
        let target = target.unwrap();
        let value = || {
            net.with_frozen_buffers(|| {
                penalised_loss(&net, &batch, 1, &h, Some(&target), &cfg).double_value(&[])
            })
        };
        let (fd, picks) = fd_over_parameters(&net, 1, &value);
        let exact = picked(&net, 1, &picks);
        let err = rel_err(&exact, &fd);
        assert!(
            err < 1e-6,
            "{distance_kind:?}: exact vs FD over parameters, rel err {err:e}"
        );
        // The penalty matters for these entries (the check is not just the plain CE gradient).
        let plain: Vec<f64> = {
            step(&net, RuleKind::Dgl, &cfg, &batch);
            picked(&net, 1, &picks)
        };
        assert!(
            rel_err(&plain, &exact) > 1e-3,
            "{distance_kind:?}: penalty had no effect"
        );
    }
}

#[test]
fn finite_difference_sgr_agrees_with_exact() {
    let batch = tiny_batch(4, 2, 6, true, 10);
    let net = tiny_net(3, 2, 6, true, 11);
    let exact_cfg = SgrConfig {
        lambda: 1.0,
        ..Default::default()
    };
    step(&net, RuleKind::Sgr, &exact_cfg, &batch);
    let exact: Vec<f64> = (1..3).flat_map(|k| module_grads(&net, k)).collect();
    // In f64 a small step is accurate (measured ~1e-10 at fd_eps 1e-6). Larger steps cross ReLU
    // kinks on this tiny net: fd_eps 1e-4 is off by O(1) here, which is why the check is in f64.
    let fd_cfg = SgrConfig {
        grad: SgrGrad::Fd,
        fd_eps: 1e-6,
        ..exact_cfg.clone()
    };
    step(&net, RuleKind::Sgr, &fd_cfg, &batch);
    let fd: Vec<f64> = (1..3).flat_map(|k| module_grads(&net, k)).collect();
    let err = rel_err(&fd, &exact);
    assert!(err < 1e-6, "fd vs exact rel err {err:e}");
    // The ± passes must not move BatchNorm running statistics beyond the one real forward:
    // compare with what an exact step (one forward per module) does to them.
    let after_fd = values(&net);
    let net2 = tiny_net(3, 2, 6, true, 11);
    step(&net2, RuleKind::Sgr, &exact_cfg, &batch);
    step(&net2, RuleKind::Sgr, &exact_cfg, &batch);
    let after_exact = values(&net2);
    for (name, t) in &after_fd {
        if name.contains("running") {
            let d = (t - &after_exact[name]).abs().max().double_value(&[]);
            assert!(
                d < 1e-12,
                "{name} moved by the finite-difference passes ({d})"
            );
        }
    }
}

#[test]
fn tangent_sgr_gradient_equals_the_double_backward_in_f64() {
    // Even split of ResNet-20 into 3 modules: module 2 starts with a downsampling block, so
    // every layer kind (stem, identity and projection blocks, every head) is covered. With
    // `from: 3` module 2 is not penalised but still sends its gradient to module 3.
    let cases = [
        (HeadKind::Conv, SgrDistance::L2, 2),
        (HeadKind::Conv, SgrDistance::Cosine, 2),
        (HeadKind::Linear, SgrDistance::L2, 2),
        (HeadKind::Linear, SgrDistance::Cosine, 2),
        (HeadKind::Mlp, SgrDistance::L2, 2),
        (HeadKind::Mlp, SgrDistance::Cosine, 3),
    ];
    let nets: Vec<(HeadKind, SgrDistance, usize, BuildWithHead)> = cases
        .into_iter()
        .map(|(h, d, f)| {
            let resnet: BuildWithHead = |h| tiny_net_with_head(h, 3, 2, 8, true, 41);
            (h, d, f, resnet)
        })
        .chain(
            // A ViT: the penalty's tangent through attention, LayerNorm and GELU.
            [
                (HeadKind::Block, SgrDistance::L2),
                (HeadKind::Linear, SgrDistance::Cosine),
            ]
            .into_iter()
            .map(|(h, d)| {
                let vit: fn(HeadKind) -> SplitNet =
                    |h| tiny_vit(3, h, 3, 2, TokenPool::Cls, true, 41);
                (h, d, 2, vit)
            }),
        )
        .collect();
    for (head, distance_kind, from, build) in nets {
        let batch = tiny_batch(5, 2, 8, true, 40);
        let exact_cfg = SgrConfig {
            lambda: 2.0,
            distance: distance_kind,
            from,
            ..Default::default()
        };
        let tangent_cfg = SgrConfig {
            grad: SgrGrad::Jvp,
            ..exact_cfg.clone()
        };
        let (a, b) = (build(head), build(head));
        step(&a, RuleKind::Sgr, &exact_cfg, &batch);
        step(&b, RuleKind::Sgr, &tangent_cfg, &batch);
        let (exact, tangent) = (all_module_grads(&a), all_module_grads(&b));
        let err = rel_err(&tangent, &exact);
        assert!(err < 1e-10, "{head:?} {distance_kind:?}: rel err {err:e}");
        // Same running statistics: the tangent passes do not count as forwards.
        assert_eq!(max_abs_diff(&values(&a), &values(&b)), 0.0);
        // The penalty changed the gradients, so the comparison can fail.
        step(&b, RuleKind::Dgl, &tangent_cfg, &batch);
        let plain = all_module_grads(&b);
        assert!(
            rel_err(&plain, &exact) > 1e-4,
            "{head:?}: no penalty effect"
        );
    }
}

#[test]
fn unit_and_head_tangents_match_central_differences_in_f64() {
    check_tangents(&tiny_net(3, 2, 8, true, 42), &tiny_batch(4, 2, 8, true, 43));
    for head in [HeadKind::Linear, HeadKind::Mlp] {
        let net = tiny_mlp(3, 7, head, 3, (2, 4), true, 44);
        check_tangents(&net, &tiny_batch(5, 2, 4, true, 45));
    }
    // ViT: patch embedding (class token or not), LayerNorm, attention, GELU, token pooling,
    // and every token head.
    for pool in [TokenPool::Cls, TokenPool::Mean] {
        for head in [HeadKind::Linear, HeadKind::Mlp, HeadKind::Block] {
            let net = tiny_vit(3, head, 3, 2, pool, true, 46);
            check_tangents(&net, &tiny_batch(4, 2, 8, true, 47));
        }
    }
}

#[test]
fn sgr_every_n_steps_is_dgl_in_between() {
    let batch = tiny_batch(6, 1, 10, false, 12);
    let cfg = SgrConfig {
        every: 3,
        ..Default::default()
    };
    // Steps 0 and 3 are penalised, 1, 2 and 4 are plain dgl steps (fresh nets each time, so
    // only the step number differs).
    for global_step in 0..5 {
        let active = global_step % 3 == 0;
        let a = tiny_net(4, 1, 10, false, 13);
        let b = tiny_net(4, 1, 10, false, 13);
        zero_grads(&a);
        zero_grads(&b);
        let stats = rules::build(RuleKind::Sgr, &cfg)
            .step(&a, &batch, &rules::StepContext::at_step(global_step))
            .unwrap();
        rules::build(RuleKind::Dgl, &cfg)
            .step(&b, &batch, &rules::StepContext::at_step(global_step))
            .unwrap();
        let diff = max_abs_diff(&grads(&a), &grads(&b));
        if active {
            assert!(diff > 1e-6, "step {global_step}: penalised step equals dgl");
        } else {
            assert_eq!(diff, 0.0, "step {global_step}: plain step differs from dgl");
        }
        // Module 1 is never penalised; modules 2..4 on the active steps only.
        let applied: Vec<bool> = (0..4).map(|k| active && k > 0).collect();
        assert_eq!(stats.penalty_applied, applied, "step {global_step}");
        assert!(
            stats
                .penalties
                .iter()
                .zip(&applied)
                .all(|(p, &on)| on == (*p > 0.0))
        );
    }
}

#[test]
fn sgr_from_3_leaves_module_2_exactly_dgl() {
    // K=3, first penalised module 3: modules 1 and 2 must get dgl's gradients and running
    // statistics bit for bit, although module 2 now also sends its output gradient forward.
    let batch = tiny_batch(5, 2, 8, true, 44);
    let cfg = SgrConfig {
        lambda: 2.0,
        from: 3,
        ..Default::default()
    };
    for grad in [SgrGrad::Exact, SgrGrad::Jvp, SgrGrad::Fd] {
        let cfg = SgrConfig {
            grad,
            ..cfg.clone()
        };
        let sgr_net = tiny_net(3, 2, 8, true, 45);
        let dgl_net = tiny_net(3, 2, 8, true, 45);
        step(&sgr_net, RuleKind::Sgr, &cfg, &batch);
        step(&dgl_net, RuleKind::Dgl, &cfg, &batch);
        for k in 0..2 {
            assert_eq!(
                module_grads(&sgr_net, k),
                module_grads(&dgl_net, k),
                "{grad:?}: module {} differs from dgl",
                k + 1
            );
            let values = |net: &SplitNet| -> Vec<Vec<f64>> {
                net.module_variables(k, false)
                    .iter()
                    .map(|(_, t)| {
                        Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap()
                    })
                    .collect()
            };
            assert_eq!(
                values(&sgr_net),
                values(&dgl_net),
                "{grad:?}: module {} buffers",
                k + 1
            );
        }
        // Module 3 is penalised, so the comparison above could fail.
        let err = rel_err(&module_grads(&sgr_net, 2), &module_grads(&dgl_net, 2));
        assert!(err > 1e-4, "{grad:?}: module 3 got no penalty ({err:e})");
    }
}

#[test]
fn module_by_module_global_gradients_equal_end_to_end_backprop() {
    let batch = tiny_batch(6, 2, 8, true, 30);
    let net = tiny_net(4, 2, 8, true, 31);
    let ours = net.with_frozen_buffers(|| sgr::diagnostics::global_boundary_grads(&net, &batch));
    let reference = net.with_frozen_buffers(|| {
        let mut boundaries = Vec::new();
        let mut h = batch.images.shallow_clone();
        for k in 0..4 {
            h = net.forward_module(k, &h, true);
            if k < 3 {
                boundaries.push(h.shallow_clone());
            }
        }
        let loss = cross_entropy(&net.head_logits(3, &h, true), &batch.labels);
        Tensor::run_backward(&[&loss], &boundaries, false, false)
    });
    assert_eq!(ours.len(), 3);
    for (a, b) in ours.iter().zip(&reference) {
        let err = (a - b).norm().double_value(&[]) / b.norm().double_value(&[]);
        assert!(err < 1e-10, "{err:e}");
    }
}
