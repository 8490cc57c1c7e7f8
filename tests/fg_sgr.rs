//! Rule `fg-sgr`: the nested forward-mode derivative equals a central difference of `fg`'s
//! estimate, the penalty's estimate is unbiased where the module docs claim it (and the input
//! gradient estimate is biased where a BatchNorm mixes the batch, as they say).
use crate::common::*;
use crate::fg::{bias_statistic, module_input, moments_by_name};
use sgr::model::{HeadKind, SplitNet, TokenPool};
use sgr::rules::cross_entropy;
use sgr::rules::fg::{estimate, estimate_with, tangent_seed};
use sgr::rules::fg_sgr::{input_gradient, output_gradient, penalty_estimate};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// `(parameter, estimate)` pairs keyed by data pointer.
fn by_ptr(list: Vec<(Tensor, Tensor)>) -> HashMap<usize, Tensor> {
    list.into_iter()
        .map(|(p, g)| (p.data_ptr() as usize, g))
        .collect()
}

fn max_rel(a: &HashMap<usize, Tensor>, b: &HashMap<usize, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    let largest = b
        .values()
        .map(|y| y.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    a.iter()
        .map(|(p, x)| {
            let y = &b[p];
            // A floor, relative to the largest entry of any parameter, for parameters whose
            // gradient is (nearly) zero, such as a bias before a BatchNorm: there a central
            // difference is rounding noise, about 1e-10 in absolute terms.
            let scale = y.abs().max().double_value(&[]).max(1e-3 * largest);
            (x - y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

/// G and G' of [`penalty_estimate`] against `fg`'s estimate at h and its central difference
/// along v, with the same tangent seed (same directions), in f64.
fn assert_nested_matches_central_difference(net: &SplitNet, k: usize, b: i64, c: i64, s: i64) {
    let batch = tiny_batch(b, c, s, true, 21);
    let h = module_input(net, &batch, k);
    let v = sgr::model::with_seed(31, || tch::no_grad(|| h.randn_like()));
    let labels = &batch.labels;
    let seeds = [tangent_seed(5, 0, k, 0), tangent_seed(5, 0, k, 1)];
    let nested = penalty_estimate(net, k, &h, &v, labels, &seeds, false);
    let value = by_ptr(
        nested
            .iter()
            .map(|(p, g, _)| (p.shallow_clone(), g.shallow_clone()))
            .collect(),
    );
    let slope = by_ptr(nested.into_iter().map(|(p, _, d)| (p, d)).collect());
    let plain = by_ptr(estimate(net, k, &h, labels, &seeds));
    assert!(
        max_rel(&value, &plain) < 1e-12,
        "G differs from fg's estimate"
    );
    let eps = 1e-6;
    let at = |sign: f64| by_ptr(estimate(net, k, &(&h + &v * (sign * eps)), labels, &seeds));
    let (plus, minus) = (at(1.0), at(-1.0));
    let central: HashMap<usize, Tensor> = plus
        .iter()
        .map(|(p, g)| (*p, (g - &minus[p]) / (2.0 * eps)))
        .collect();
    let err = max_rel(&slope, &central);
    // Measured 8e-8 (MLP) and 4e-7 (ResNet: the O(ε²) truncation of its tiny-batch
    // BatchNorms) with these seeds; a wrong derivative is off by O(1).
    assert!(err < 1e-5, "module {k}: G' vs central difference: {err:e}");
}

#[test]
fn nested_forward_mode_matches_a_central_difference_of_the_fg_estimate() {
    // Linear + BatchNorm points (the BatchNorm's recomputed source, its local input rule).
    let mlp = tiny_mlp(2, 6, HeadKind::Linear, 2, (1, 3), true, 4);
    assert_nested_matches_central_difference(&mlp, 1, 5, 1, 3);
    // Convolutions (im2col local rule) in ResNet blocks and a conv head.
    let conv = tiny_net_with_head(HeadKind::Conv, 2, 1, 4, true, 5);
    assert_nested_matches_central_difference(&conv, 1, 3, 1, 4);
}

/// The exact `∇_θ[(∂L_k/∂h)·v]` of module `k` by reverse mode (double backward), by name.
fn exact_penalty_gradient(
    net: &SplitNet,
    k: usize,
    h: &Tensor,
    v: &Tensor,
    labels: &Tensor,
) -> Vec<(String, Tensor)> {
    let params = net.module_variables(k, true);
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let grads = net.with_frozen_buffers(|| {
        let x = h.detach().set_requires_grad(true);
        let logits = net.head_logits(k, &net.forward_module(k, &x, true), true);
        let g = Tensor::run_backward(&[&cross_entropy(&logits, labels)], &[&x], true, true);
        let directional = (&g[0] * v).sum(Kind::Double);
        Tensor::run_backward(&[&directional], &tensors, false, false)
    });
    params.into_iter().map(|(n, _)| n).zip(grads).collect()
}

/// The exact `∂L/∂x` of the mean cross-entropy of `logits_of(x)`, by reverse mode.
fn exact_boundary_gradient(
    x: &Tensor,
    labels: &Tensor,
    logits_of: impl Fn(&Tensor) -> Tensor,
) -> Tensor {
    let x = x.detach().set_requires_grad(true);
    let loss = cross_entropy(&logits_of(&x), labels);
    Tensor::run_backward(&[&loss], &[&x], false, false).remove(0)
}

/// `(statistic, bound, statistic of an estimate 10% off)` of `draws` single-draw estimates
/// `draw(d)` of a tensor against `exact` (the χ² check of `tests/fg.rs`).
fn tensor_bias_check(
    exact: &Tensor,
    draws: usize,
    draw: impl Fn(usize) -> Tensor,
) -> (f64, f64, f64) {
    let (mut sum, mut sq) = (exact.zeros_like(), exact.zeros_like());
    for d in 0..draws {
        let g = draw(d);
        sq += g.square();
        sum += g;
    }
    let moments = HashMap::from([("x".to_string(), (sum, sq))]);
    let named = [("x".to_string(), exact.shallow_clone())];
    let (stat, n) = bias_statistic(&moments, &named, draws, 1.0, &|_| true);
    let (off, _) = bias_statistic(&moments, &named, draws, 1.1, &|_| true);
    assert!(n > 20, "only {n} entries vary");
    (stat, n as f64 + 6.0 * (2.0 * n as f64).sqrt(), off)
}

#[test]
fn penalty_estimate_is_unbiased_on_a_layer_wise_mlp() {
    // One Linear+BN+ReLU layer per module and linear heads: `fg` is unbiased there, so the
    // derivative of its estimate along a fixed v is unbiased for ∇_θ[(∂L/∂h)·v].
    let net = tiny_mlp(2, 6, HeadKind::Linear, 2, (1, 3), true, 4);
    let batch = tiny_batch(5, 1, 3, true, 8);
    let k = 1;
    let h = module_input(&net, &batch, k);
    let v = sgr::model::with_seed(31, || tch::no_grad(|| h.randn_like()));
    let exact = exact_penalty_gradient(&net, k, &h, &v, &batch.labels);
    let draws = 8_000;
    let moments = moments_by_name(&net, k, draws, |d| {
        let seed = tangent_seed(13, d, k, 0);
        penalty_estimate(&net, k, &h, &v, &batch.labels, &[seed], false)
            .into_iter()
            .map(|(p, _, slope)| (p, slope))
            .collect()
    });
    let (stat, d) = bias_statistic(&moments, &exact, draws, 1.0, &|_| true);
    let (off, _) = bias_statistic(&moments, &exact, draws, 1.1, &|_| true);
    let bound = d as f64 + 6.0 * (2.0 * d as f64).sqrt();
    assert!(d > 20, "only {d} entries vary");
    assert!(
        stat < bound,
        "penalty estimate: bias statistic {stat:.1} (bound {bound:.1})"
    );
    assert!(
        off > bound,
        "a 10% bias gives only {off:.1} (bound {bound:.1})"
    );
}

#[test]
fn boundary_gradient_estimates_are_unbiased_without_batch_mixing_and_biased_with_it() {
    // ĝ_prev through an MLP's linear head (per-sample ops only): unbiased.
    let mlp = tiny_mlp(2, 6, HeadKind::Linear, 2, (1, 3), true, 4);
    let batch = tiny_batch(5, 1, 3, true, 8);
    let labels = &batch.labels;
    let h_out = module_input(&mlp, &batch, 1);
    let exact = exact_boundary_gradient(&h_out, labels, |x| mlp.head_logits(0, x, true));
    let (stat, bound, off) = tensor_bias_check(&exact, 20_000, |d| {
        output_gradient(&mlp, 0, &h_out, labels, &[tangent_seed(17, d, 0, 0)])
    });
    assert!(
        stat < bound,
        "head output gradient: {stat:.1} (bound {bound:.1})"
    );
    assert!(
        off > bound,
        "head: a 10% bias gives only {off:.1} (bound {bound:.1})"
    );
    // ĝ_in through ViT blocks (LayerNorm and attention act per sample): unbiased.
    let vit = tiny_vit(2, HeadKind::Linear, 2, 1, TokenPool::Cls, true, 6);
    let batch_vit = tiny_batch(4, 1, 8, true, 9);
    let h = module_input(&vit, &batch_vit, 1);
    let exact = exact_boundary_gradient(&h, &batch_vit.labels, |x| {
        vit.head_logits(1, &vit.forward_module(1, x, true), true)
    });
    let (stat, bound, off) = tensor_bias_check(&exact, 20_000, |d| {
        input_gradient(&vit, 1, &h, &batch_vit.labels, &[tangent_seed(19, d, 1, 0)])
    });
    assert!(
        stat < bound,
        "ViT input gradient: {stat:.1} (bound {bound:.1})"
    );
    assert!(
        off > bound,
        "ViT: a 10% bias gives only {off:.1} (bound {bound:.1})"
    );
    // ĝ_in through an MLP module, whose BatchNorm mixes the batch after h: the per-sample
    // estimate leaves out the cross-sample terms, a bias the docs state and this shows.
    let h = module_input(&mlp, &batch, 1);
    let exact = exact_boundary_gradient(&h, labels, |x| {
        mlp.head_logits(1, &mlp.forward_module(1, x, true), true)
    });
    let (stat, bound, _) = tensor_bias_check(&exact, 20_000, |d| {
        input_gradient(&mlp, 1, &h, labels, &[tangent_seed(23, d, 1, 0)])
    });
    assert!(
        stat > bound,
        "MLP input gradient shows no bias: {stat:.1} (bound {bound:.1})"
    );
}

#[test]
fn recomputing_estimate_equals_the_tape_estimate() {
    // Linear+BN points and a linear head; conv+BN points in ResNet blocks and a conv head;
    // three tangents; plain and nested (the fg-sgr penalty's derivative).
    let cases = [
        (
            tiny_mlp(3, 6, HeadKind::Linear, 3, (1, 3), true, 4),
            tiny_batch(5, 1, 3, true, 8),
        ),
        (
            tiny_net_with_head(HeadKind::Conv, 2, 1, 4, true, 5),
            tiny_batch(3, 1, 4, true, 6),
        ),
    ];
    for (net, batch) in &cases {
        let labels = &batch.labels;
        for k in 0..net.num_modules() {
            let h = module_input(net, batch, k);
            let seeds: Vec<i64> = (0..3).map(|t| tangent_seed(7, 2, k, t)).collect();
            let kept = by_ptr(estimate(net, k, &h, labels, &seeds));
            let recomputed = by_ptr(estimate_with(net, k, &h, labels, &seeds, true));
            let err = max_rel(&recomputed, &kept);
            assert!(
                err < 1e-10,
                "module {k}: recomputed estimate off by {err:e}"
            );
            let v = sgr::model::with_seed(31, || tch::no_grad(|| h.randn_like()));
            let slopes = |recompute| {
                let list = penalty_estimate(net, k, &h, &v, labels, &seeds, recompute);
                by_ptr(list.into_iter().map(|(p, _, d)| (p, d)).collect())
            };
            let err = max_rel(&slopes(true), &slopes(false));
            assert!(
                err < 1e-10,
                "module {k}: recomputed derivative off by {err:e}"
            );
        }
    }
}
