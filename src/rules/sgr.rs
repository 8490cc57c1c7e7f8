//! Rule `sgr`: Successive Gradient Reconciliation (Yang et al., ICML 2024), our reconstruction.
//!
//! Modules run in order as in `dgl`. Module k-1 sends forward, with its detached output
//! h_{k-1}, the gradient of its *plain* local loss w.r.t. that output,
//! `g_prev = sg[∂L_{k-1}/∂h_{k-1}]`. Module k (from `--sgr-from` on) minimises
//!
//! ```text
//! L̃_k = L_k + λ · D(∂L_k/∂h_{k-1}, g_prev)
//! ```
//!
//! where `∂L_k/∂h_{k-1}` is built with `create_graph`, so the penalty is differentiated exactly
//! (double backward) w.r.t. θ_k and the head's parameters, inside module k only: h_{k-1} is a
//! detached leaf, so no gradient ever reaches module k-1 (gradient isolation stays intact).
//!
//! D (`--sgr-distance`), with B the batch size and g the gradients of the *mean* batch loss:
//! * `l2`: `B · ‖g_in − g_prev‖²`, i.e. the mean over samples of the squared distance between
//!   per-sample gradients (B·g_i is sample i's gradient), so λ does not depend on B;
//! * `cosine`: `1 − cos(g_in, g_prev)` over the flattened batch.
//!
//! `--sgr-grad fd` replaces the double backward by the finite-difference identity
//! `∇_θ D ≈ [∇_θ L_k(h + εv) − ∇_θ L_k(h − εv)] / 2ε` with `v = ∂D/∂g_in` held fixed and
//! `ε = fd_eps · ‖h‖/‖v‖`; the ± passes run with BatchNorm running statistics frozen.
//! See `../shared/research/paper.md` §3.3–3.6 for which parts are confirmed and which are ours.
use super::{Rule, StepStats, correct, cross_entropy, scalar};
use crate::Result;
use crate::data::Batch;
use crate::model::SplitNet;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The gradient distance D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SgrDistance {
    /// Per-sample-normalised squared L2 distance.
    #[default]
    L2,
    /// One minus the cosine similarity.
    Cosine,
}

/// How the penalty's parameter gradient is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SgrGrad {
    /// Exact double backward (`create_graph`).
    #[default]
    Exact,
    /// Central finite difference along the input (first-order passes only).
    Fd,
}

/// SGR settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgrConfig {
    /// Penalty weight λ (0 makes `sgr` identical to `dgl`).
    pub lambda: f64,
    /// Distance D.
    pub distance: SgrDistance,
    /// First regularised module, 1-based (2 = every boundary).
    pub from: usize,
    /// Apply the penalty on every N-th step only (other steps are plain `dgl` steps).
    pub every: usize,
    /// Exact or finite-difference penalty gradient.
    pub grad: SgrGrad,
    /// Relative finite-difference step (ε·‖v‖/‖h‖).
    pub fd_eps: f64,
}

impl Default for SgrConfig {
    fn default() -> Self {
        SgrConfig {
            lambda: 0.1,
            distance: SgrDistance::L2,
            from: 2,
            every: 1,
            grad: SgrGrad::Exact,
            fd_eps: 1e-3,
        }
    }
}

/// D(g_in, target) as a scalar tensor (differentiable in `g_in`).
pub fn distance(kind: SgrDistance, g_in: &Tensor, target: &Tensor) -> Tensor {
    match kind {
        SgrDistance::L2 => (g_in - target).square().sum(g_in.kind()) * g_in.size()[0] as f64,
        SgrDistance::Cosine => {
            let dot = (g_in * target).sum(g_in.kind());
            1.0 - dot / (g_in.norm() * target.norm() + 1e-12)
        }
    }
}

/// Successive gradient reconciliation.
pub struct Sgr(pub SgrConfig);

impl Rule for Sgr {
    fn step(&self, net: &SplitNet, batch: &Batch, global_step: usize) -> Result<StepStats> {
        let cfg = &self.0;
        let modules = net.num_modules();
        let exact = cfg.grad == SgrGrad::Exact;
        let active = cfg.lambda != 0.0 && global_step.is_multiple_of(cfg.every.max(1));
        let mut stats = StepStats {
            penalties: vec![0.0; modules],
            samples: batch.labels.size()[0],
            ..Default::default()
        };
        let mut h = batch.images.shallow_clone();
        let mut prev_output_grad: Option<Tensor> = None;
        for k in 0..modules {
            // Module numbers are 1-based in the CLI: module k here is number k + 1.
            let target = prev_output_grad
                .take()
                .filter(|_| active && k + 1 >= cfg.from);
            let sends = active && k + 1 < modules && k + 2 >= cfg.from;
            let h_in = h.detach().set_requires_grad(target.is_some());
            let h_out = net.forward_module(k, &h_in, true);
            let logits = net.head_logits(k, &h_out, true);
            let loss = cross_entropy(&logits, &batch.labels);
            stats.module_losses.push(scalar(&loss));
            if k + 1 == modules {
                stats.correct = correct(&logits, &batch.labels);
            }
            // Both gradients are of the plain loss L_k, taken before the penalty exists.
            let (input_grad, output_grad) = match (&target, sends) {
                (Some(_), true) => {
                    let mut g = Tensor::run_backward(&[&loss], &[&h_in, &h_out], true, exact);
                    let out = g.pop().map(|g| g.detach());
                    (g.pop(), out)
                }
                (Some(_), false) => (
                    Tensor::run_backward(&[&loss], &[&h_in], true, exact).pop(),
                    None,
                ),
                (None, true) => (
                    None,
                    Tensor::run_backward(&[&loss], &[&h_out], true, false).pop(),
                ),
                (None, false) => (None, None),
            };
            match (input_grad, target) {
                (Some(g_in), Some(target)) if exact => {
                    let penalty = distance(cfg.distance, &g_in, &target);
                    stats.penalties[k] = scalar(&penalty);
                    (loss + penalty * cfg.lambda).backward();
                }
                (Some(g_in), Some(target)) => {
                    loss.backward();
                    stats.penalties[k] =
                        finite_difference_penalty(net, k, &h_in, &g_in, &target, batch, cfg);
                }
                _ => loss.backward(),
            }
            prev_output_grad = output_grad;
            h = h_out.detach();
        }
        Ok(stats)
    }
}

/// Adds λ·∇_θ D to module `k`'s parameter gradients by a central finite difference along the
/// input, and returns D. Uses only first-order backward passes.
fn finite_difference_penalty(
    net: &SplitNet,
    k: usize,
    h_in: &Tensor,
    g_in: &Tensor,
    target: &Tensor,
    batch: &Batch,
    cfg: &SgrConfig,
) -> f64 {
    // v = ∂D/∂g_in at the current g_in, a constant direction in input space.
    let g = g_in.detach().set_requires_grad(true);
    let penalty = distance(cfg.distance, &g, target);
    let value = scalar(&penalty);
    let v = Tensor::run_backward(&[&penalty], &[&g], false, false).remove(0);
    let v_norm = scalar(&v.norm());
    if v_norm == 0.0 {
        return value;
    }
    let h = h_in.detach();
    let eps = cfg.fd_eps * scalar(&h.norm()).max(1e-12) / v_norm;
    let params: Vec<Tensor> = net
        .module_variables(k, true)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let grads_at = |sign: f64| {
        net.with_frozen_buffers(|| {
            let x = &h + &v * (sign * eps);
            let loss = cross_entropy(
                &net.head_logits(k, &net.forward_module(k, &x, true), true),
                &batch.labels,
            );
            Tensor::run_backward(&[&loss], &params, false, false)
        })
    };
    let (plus, minus) = (grads_at(1.0), grads_at(-1.0));
    tch::no_grad(|| {
        for ((p, gp), gm) in params.iter().zip(plus).zip(minus) {
            let _ = p.grad().g_add_(&((gp - gm) * (cfg.lambda / (2.0 * eps))));
        }
    });
    value
}
