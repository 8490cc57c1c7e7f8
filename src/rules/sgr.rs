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
//! `ε = fd_eps · ‖h‖/‖v‖`; the ± passes run with BatchNorm running statistics frozen. On a ReLU
//! network this is *not* a small-step approximation of the exact gradient: the ± inputs put
//! some units on the other side of their kink, each adding a jump of O(1)/ε, and the number of
//! such units shrinks only like ε, so the error does not vanish as ε → 0 (it grows, like
//! ε^-1/2, see `examples/sgr_fd_accuracy.rs`). A larger step averages the kinks out:
//! fd_eps = 3e-2 gave cosine 0.90–0.91 with the exact gradient on ResNet-20/32, 1e-3 only 0.4.
//! The fd path holds one input-sized tensor more than `dgl` (v) instead of the exact path's
//! second graph, so it is the low-memory option, at the price of that approximation.
//!
//! `--sgr-grad jvp` computes the same directional derivative exactly: module k runs on the
//! pair (h, v), carrying the tangent J·v through every layer (forward mode, written with
//! ordinary ops in [`crate::model::dual`]), its head gives the loss tangent
//! `L̇ = (∂L_k/∂h)·v`, and one reverse pass of `λ·L̇` adds `λ·∇_θ D`. Unlike the double
//! backward, this graph runs input to output like a forward pass, so it can be recomputed unit
//! by unit (checkpointing): only one unit's tangent graph is alive at a time. It equals `exact`
//! to rounding (tested to 1e-10 in f64) and needs less memory at every K ≥ 4 (ResNet-32, batch
//! 128: 160 vs 300 MiB at K=4, 136 vs 184 at K=16), for 1.2–1.4x the time (BENCHMARKS.md).
//! See `../shared/research/paper.md` §3.3–3.6 for which parts are confirmed and which are ours.
use super::{Carry, ModuleOutcome, Rule, StepContext, StepRecorder};
use crate::Result;
use crate::data::Batch;
use crate::model::SplitNet;
use crate::model::dual::Dual;
use crate::model::splits::PenaltyCost;
use crate::precision::{scale_grad, unscaled};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The gradient distance D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SgrDistance {
    /// Per-sample-normalised squared L2 distance.
    #[default]
    L2,
    /// One minus the cosine similarity of the batch-flattened gradients.
    Cosine,
    /// The mean over samples of one minus the cosine similarity of per-sample gradients:
    /// scale-invariant per sample, so a few high-loss samples cannot dominate.
    CosineSample,
}

/// Which side of a boundary the penalty shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SgrSide {
    /// Module k shapes its input gradient ∂L_k/∂h_{k-1} toward module k-1's forwarded
    /// output gradient (the rule as first built).
    #[default]
    Receiver,
    /// Module k-1 shapes its output gradient ∂L_{k-1}/∂h_{k-1} toward module k's input
    /// gradient on the same batch (detached, at module k's current parameters).
    Sender,
    /// Both penalties at every regularised boundary.
    Both,
}

impl SgrSide {
    /// Whether the receiving module is penalised.
    pub fn receiver(self) -> bool {
        matches!(self, SgrSide::Receiver | SgrSide::Both)
    }
    /// Whether the sending module is penalised.
    pub fn sender(self) -> bool {
        matches!(self, SgrSide::Sender | SgrSide::Both)
    }
}

/// How λ changes over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LambdaSchedule {
    /// λ throughout.
    #[default]
    Constant,
    /// λ ramped linearly up from 0 over the first `span` epochs, then constant.
    Warmup,
    /// λ annealed linearly down to 0 over the first `span` epochs, then 0 (plain `dgl`).
    Decay,
}

/// How the penalty's parameter gradient is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SgrGrad {
    /// Exact double backward (`create_graph`).
    #[default]
    Exact,
    /// Exact, by reverse mode over a forward-mode tangent, recomputed unit by unit
    /// (no `create_graph`; less memory than `exact`).
    Jvp,
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
    /// Which side of each boundary is penalised.
    pub side: SgrSide,
    /// How λ changes over training.
    pub schedule: LambdaSchedule,
    /// Epochs the λ schedule spans (its ramp or its decay).
    pub schedule_epochs: f64,
}

impl Default for SgrConfig {
    fn default() -> Self {
        SgrConfig {
            lambda: 0.1,
            distance: SgrDistance::L2,
            from: 2,
            every: 1,
            grad: SgrGrad::Exact,
            fd_eps: 3e-2,
            side: SgrSide::Receiver,
            schedule: LambdaSchedule::Constant,
            schedule_epochs: 1.0,
        }
    }
}

impl SgrConfig {
    /// λ at `epoch` (fractional progress in epochs) under the λ schedule.
    pub fn lambda_at(&self, epoch: f64) -> f64 {
        let done = if self.schedule_epochs > 0.0 {
            (epoch / self.schedule_epochs).clamp(0.0, 1.0)
        } else {
            1.0
        };
        match self.schedule {
            LambdaSchedule::Constant => self.lambda,
            LambdaSchedule::Warmup => self.lambda * done,
            LambdaSchedule::Decay => self.lambda * (1.0 - done),
        }
    }

    /// What the penalty adds to the memory of the modules it regularises, relative to `dgl`,
    /// for `--split balanced-memory` (`None` when the penalty is off). The factors are measured
    /// module-level peaks on ResNet-32 (BENCHMARKS.md, SGR memory table): exact 2.1–2.6x, fd
    /// 1.1–1.2x; the upper ends are used. `jvp`'s extra is one unit's tangent graph rather than
    /// a multiple of the module, so no factor fits it exactly; 2.0 was measured best of 1.5,
    /// 2.0 and 2.5 (BENCHMARKS.md).
    pub fn penalty_cost(&self) -> Option<PenaltyCost> {
        (self.lambda != 0.0).then_some(PenaltyCost {
            from: self.from.max(2),
            factor: match self.grad {
                SgrGrad::Exact => 2.5,
                SgrGrad::Jvp => 2.0,
                SgrGrad::Fd => 1.2,
            },
        })
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
        SgrDistance::CosineSample => {
            let kind = g_in.kind();
            let b = g_in.size()[0];
            let (g, t) = (g_in.reshape([b, -1]), target.reshape([b, -1]));
            let dot = (&g * &t).sum_dim_intlist(1, false, kind);
            let norms = g.norm_scalaropt_dim(2, [1], false) * t.norm_scalaropt_dim(2, [1], false);
            // A confidently right sample has a near-zero gradient whose direction is noise, and
            // the cosine's gradient grows like 1/‖g_i‖: a floor at 1e-3 of the batch's mean norm
            // product (a constant) keeps such samples from dominating the penalty's gradient.
            let floor = norms.detach().mean(kind) * 1e-3 + 1e-30;
            1.0 - (dot / norms.maximum(&floor)).mean(kind)
        }
    }
}

/// Successive gradient reconciliation.
pub struct Sgr(pub SgrConfig);

impl Sgr {
    /// λ at `at`, when the penalty applies at this step.
    fn active_lambda(&self, at: &StepContext) -> Option<f64> {
        let lambda = self.0.lambda_at(at.epoch);
        (lambda != 0.0 && at.global_step.is_multiple_of(self.0.every.max(1))).then_some(lambda)
    }
}

impl Rule for Sgr {
    fn module_step(
        &self,
        net: &SplitNet,
        k: usize,
        carry: Carry,
        batch: &Batch,
        at: &StepContext,
        record: &mut StepRecorder,
    ) -> Result<ModuleOutcome> {
        let cfg = &self.0;
        let modules = net.num_modules();
        let lambda = self.active_lambda(at).unwrap_or(0.0);
        let receiver = lambda != 0.0 && cfg.side.receiver();
        let labels = &batch.labels;
        let images = &batch.images;
        let h = carry.h;
        // Module numbers are 1-based in the CLI: module k here is number k + 1, and the
        // boundary in front of it is regularised when k + 1 >= from.
        let boundary = k >= 1 && k + 1 >= cfg.from;
        let target = carry.forwarded.filter(|_| receiver && boundary);
        let sends = receiver && k + 1 < modules && k + 2 >= cfg.from;
        let gives_target = self.sends_back(net, k, at);
        let h_in = h
            .detach()
            .set_requires_grad(target.is_some() || gives_target);
        let h_out = net.forward_module(k, &h_in, true);
        let h_next = h_out.detach();
        let last = k + 1 == modules;
        // ∂L_k/∂h_in of the plain loss, detached: the sender-side target of module k-1.
        let input_grad_of_plain_loss;
        let forwarded = match target {
            Some(target) if cfg.grad == SgrGrad::Exact => {
                let (loss, logits) = net.local_loss(k, &h_out, labels, images, true);
                record.loss(&loss, &logits, labels, last);
                // Both gradients are of the plain loss L_k, taken before the penalty exists.
                let inputs: &[&Tensor] = if sends { &[&h_in, &h_out] } else { &[&h_in] };
                let mut grads = Tensor::run_backward(&[&loss], inputs, true, true);
                // Under fp16 loss scaling the gradients are S times too large: D compares
                // them unscaled, in f32 (a no-op at fp32).
                let output_grad = sends
                    .then(|| grads.pop().map(|g| unscaled(&g.detach())))
                    .flatten();
                let input_grad = unscaled(&grads.remove(0));
                input_grad_of_plain_loss = gives_target.then(|| input_grad.detach());
                let penalty = distance(cfg.distance, &input_grad, &target);
                record.penalty(k, &penalty);
                // Only the penalty's own graph needs the two gradients from here on.
                drop((input_grad, target));
                (loss + scale_grad(&(&penalty * lambda))).backward();
                output_grad
            }
            Some(target) => {
                let (loss, logits, _) = local_backward(net, k, &h_out, (labels, images), false);
                record.loss(&loss, &logits, labels, last);
                let input_grad = unscaled(&h_in.grad());
                input_grad_of_plain_loss = gives_target.then(|| input_grad.detach());
                // The spent graph's nodes (reachable from the loss and the output) still
                // hold the input leaf, and the leaf its gradient: free them before the
                // penalty passes, which only need the input's values (`h`).
                drop((loss, logits, h_out, h_in));
                let (penalty, direction) = penalty_direction(cfg, input_grad, target);
                record.penalty(k, &penalty);
                if cfg.grad == SgrGrad::Jvp {
                    tangent_penalty(net, k, &h, direction, (labels, images), lambda);
                } else {
                    let target = (labels, images);
                    finite_difference_penalty(net, k, &h, direction, target, cfg, lambda);
                }
                // Taken now rather than in the backward above, so that it is not held
                // through the penalty passes (one activation-sized tensor less at the peak).
                sends.then(|| unscaled(&head_output_grad(net, k, &h_next, (labels, images))))
            }
            None => {
                let (loss, logits, output_grad) =
                    local_backward(net, k, &h_out, (labels, images), sends);
                record.loss(&loss, &logits, labels, last);
                input_grad_of_plain_loss = gives_target.then(|| unscaled(&h_in.grad().detach()));
                output_grad.map(|g| unscaled(&g))
            }
        };
        Ok(ModuleOutcome {
            carry: Carry {
                h: h_next,
                forwarded,
            },
            back: input_grad_of_plain_loss,
        })
    }

    fn sends_back(&self, net: &SplitNet, k: usize, at: &StepContext) -> bool {
        let boundary = k >= 1 && k < net.num_modules() && k + 1 >= self.0.from;
        boundary && self.0.side.sender() && self.active_lambda(at).is_some()
    }

    fn sender_step(
        &self,
        net: &SplitNet,
        j: usize,
        (input, target): (&Tensor, &Tensor),
        batch: &Batch,
        at: &StepContext,
        record: &mut StepRecorder,
    ) -> Result<()> {
        let lambda = self.active_lambda(at).unwrap_or(0.0);
        let data = (&batch.labels, &batch.images);
        let penalty = sender_penalty(net, j, input, target, data, &self.0, lambda);
        record.penalty(j, &penalty);
        Ok(())
    }
}

/// The sender-side penalty of module `j`: adds `λ·∇ D(∂L_j/∂h_j, target)` to module `j`'s
/// parameter and head gradients, exactly (double backward), where `target` is module j+1's
/// detached plain-loss input gradient on the same batch. Module `j` is recomputed from its
/// (detached) `input` with its buffers frozen: the batch statistics, and so the function, are
/// those of the step's forward, and the running statistics move once per step as in `dgl`.
/// The penalty reaches θ_j through the head and through h_j; nothing leaves the module.
fn sender_penalty(
    net: &SplitNet,
    j: usize,
    input: &Tensor,
    target: &Tensor,
    (labels, images): (&Tensor, &Tensor),
    cfg: &SgrConfig,
    lambda: f64,
) -> Tensor {
    net.with_frozen_module_buffers(j, || {
        let h_out = net.forward_module(j, input, true);
        let (loss, _) = net.local_loss(j, &h_out, labels, images, true);
        let output_grad = Tensor::run_backward(&[&loss], &[&h_out], true, true).remove(0);
        let penalty = distance(cfg.distance, &unscaled(&output_grad), target);
        scale_grad(&(&penalty * lambda)).backward();
        penalty.detach()
    })
}

/// Back-propagates module `k`'s plain local loss through its head and units (one pass) and
/// returns `(loss, logits, ∂L_k/∂h_out if want_output_grad)`.
///
/// The output gradient comes from the same backward pass: the head runs on a detached copy of
/// `h_out` marked as a leaf, so the backward through the head leaves ∂L/∂h_out in that leaf's
/// `.grad`, which is then pushed through the units. (Asking autograd for ∂L/∂h_out in a separate
/// call, as `torch.autograd.grad(loss, h_out, retain_graph=True)` does, runs the head's backward
/// twice.)
fn local_backward(
    net: &SplitNet,
    k: usize,
    h_out: &Tensor,
    (labels, images): (&Tensor, &Tensor),
    want_output_grad: bool,
) -> (Tensor, Tensor, Option<Tensor>) {
    if !want_output_grad {
        let (loss, logits) = net.local_loss(k, h_out, labels, images, true);
        loss.backward();
        return (loss, logits, None);
    }
    let head_input = h_out.detach().set_requires_grad(true);
    let (loss, logits) = net.local_loss(k, &head_input, labels, images, true);
    loss.backward();
    let output_grad = head_input.grad().detach();
    // d/dθ Σ h_out ⊙ g = (∂h_out/∂θ)ᵀ g with g held constant: the units' share of the backward.
    (h_out * &output_grad).sum(h_out.kind()).backward();
    (loss, logits, Some(output_grad))
}

/// ∂L_k/∂h_out through module `k`'s head alone, the same value `local_backward` returns (same
/// batch statistics), with running statistics and parameter gradients left as they are.
fn head_output_grad(
    net: &SplitNet,
    k: usize,
    h_out: &Tensor,
    (labels, images): (&Tensor, &Tensor),
) -> Tensor {
    let leaf = h_out.detach().set_requires_grad(true);
    // The backward reads the running statistics (saved by BatchNorm), so it runs before they
    // are restored.
    net.with_frozen_module_buffers(k, || {
        let (loss, _) = net.local_loss(k, &leaf, labels, images, true);
        Tensor::run_backward(&[&loss], &[&leaf], false, false).remove(0)
    })
}

/// D(g_in, target) and v = ∂D/∂g_in at the current g_in, both detached: the direction in
/// input space along which the penalty's parameter gradient is a directional derivative,
///
/// ```text
/// ∇_θ D(∂L/∂h) = (∂D/∂g_in)ᵀ ∂²L/∂h∂θ = ∇_θ [ (∂L/∂h)·v ] = ∇_θ [ d/dε L(h + εv) at ε = 0 ],
/// ```
///
/// with v held constant. `jvp` computes the last form exactly, `fd` approximates it.
fn penalty_direction(cfg: &SgrConfig, input_grad: Tensor, target: Tensor) -> (Tensor, Tensor) {
    let g = input_grad.detach().set_requires_grad(true);
    let penalty = distance(cfg.distance, &g, &target);
    let direction = Tensor::run_backward(&[&penalty], &[&g], false, false).remove(0);
    (penalty.detach(), direction)
}

/// Adds λ·∇_θ D to module `k`'s parameter gradients, exactly: the module and its head run
/// on the pair (h, v) carrying the tangent ḣ = J·v layer by layer ([`crate::model::dual`]),
/// the head's loss tangent is L̇ = (∂L/∂h)·v, and one backward of λ·L̇ gives λ·∇_θ D.
///
/// Memory: the tangent doubles what a forward keeps for backward, so the backward runs unit
/// by unit, recomputing each unit from its input pair stored by a first pass without graph
/// (gradient checkpointing at unit boundaries). At any time it holds the boundary pairs, one
/// unit's (or the head's) graph and one adjoint pair; never the second graph of `exact`'s
/// `create_graph` backward, which cannot be freed layer by layer.
fn tangent_penalty(
    net: &SplitNet,
    k: usize,
    h_in: &Tensor,
    direction: Tensor,
    (labels, images): (&Tensor, &Tensor),
    lambda: f64,
) {
    let units = net.module_ranges()[k].clone();
    // The (value, tangent) input of every unit, then the module's output pair.
    let mut boundaries: Vec<Dual> = vec![(h_in.detach(), direction)];
    tch::no_grad(|| {
        for u in units.clone() {
            let next = net.unit_forward_dual(u, &boundaries[boundaries.len() - 1]);
            boundaries.push(next);
        }
    });
    let leaves = |(x, x_dot): Dual, needs_grad: bool| {
        (
            x.set_requires_grad(needs_grad),
            x_dot.set_requires_grad(needs_grad),
        )
    };
    let adjoint = |(x, x_dot): &Dual| (x.grad(), x_dot.grad());
    // Head segment: the objective is λ·L̇ (the plain loss's gradient is already in place).
    let output = leaves(boundaries.pop().expect("module output"), true);
    let (_, loss_dot) = net.local_loss_dual(k, &output, labels, images);
    (loss_dot * lambda).backward();
    let mut output_adjoint = adjoint(&output);
    // The spent graph's nodes hold the leaves (and their values) as long as any output of
    // the graph lives, so all of it goes before the unit segments.
    drop(output);
    // Unit segments, last to first: recompute with graph, back-propagate the adjoint pair.
    let first = units.start;
    for u in units.rev() {
        let input = leaves(boundaries.pop().expect("unit input"), u > first);
        let (y, y_dot) = net.unit_forward_dual(u, &input);
        let kind = y.kind();
        // Σ y⊙ȳ + ẏ⊙ẏ̄ with the adjoints held constant: its gradient is the vector-Jacobian
        // product of the unit with the adjoint pair. The adjoints are moved into the products,
        // whose backward nodes are then their only holders and free them as soon as they ran.
        let (adjoint_value, adjoint_tangent) = output_adjoint;
        let objective = (y * adjoint_value).sum(kind) + (y_dot * adjoint_tangent).sum(kind);
        objective.backward();
        output_adjoint = adjoint(&input);
    }
}

/// Adds λ·∇_θ D to module `k`'s parameter gradients by a central finite difference along the
/// input, `[∇_θ L(h + εv) − ∇_θ L(h − εv)] / 2ε` with v from [`penalty_direction`]. Uses only
/// first-order backward passes, and at most one extra input-sized tensor beyond what `dgl`
/// holds (v): the perturbed inputs are made in place in v's storage, which is spent once ε is
/// known. `h_in` is left untouched: it is the previous module's output, which others may read.
fn finite_difference_penalty(
    net: &SplitNet,
    k: usize,
    h_in: &Tensor,
    mut v: Tensor,
    (labels, images): (&Tensor, &Tensor),
    cfg: &SgrConfig,
    lambda: f64,
) {
    // ε = fd_eps·‖h‖/‖v‖ as a device scalar (no host round trip); v is scaled to ε·v in place.
    let h = h_in.detach();
    let eps = h.norm().clamp_min(1e-12) * cfg.fd_eps / v.norm().clamp_min(1e-30);
    let _ = v.g_mul_(&eps);
    let params: Vec<Tensor> = net
        .module_variables(k, true)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let grads_at = |x: &Tensor| {
        net.with_frozen_module_buffers(k, || {
            let (loss, _) =
                net.local_loss(k, &net.forward_module(k, x, true), labels, images, true);
            Tensor::run_backward(&[&loss], &params, false, false)
        })
    };
    // x = h + εv, then h − εv = 2h − (h + εv), both in v's storage; the rounding this adds is
    // ~1 ulp of h, far below the step ε·v.
    let mut x = v;
    let _ = tch::no_grad(|| x.g_add_(&h));
    let plus = grads_at(&x);
    let _ = tch::no_grad(|| x.neg_().g_add_(&h).g_add_(&h));
    let minus = grads_at(&x);
    let scale = eps.reciprocal() * (lambda / 2.0);
    tch::no_grad(|| {
        for ((p, gp), gm) in params.iter().zip(plus).zip(minus) {
            let _ = p.grad().g_add_(&((gp - gm) * &scale));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TrainConfig, TrainOptions, parse_options};
    use crate::model::FeatureShape;
    use tch::{Device, Kind};

    #[test]
    fn finite_difference_passes_leave_the_boundary_activation_unchanged() {
        let text = "model = \"resnet20\"\nmodules = 2\nsplit = \"even\"\nrule = \"sgr\"\n";
        let cfg = TrainConfig::resolve(
            &TrainOptions::default(),
            Some(&parse_options(text).unwrap()),
            None,
        )
        .unwrap();
        let input = FeatureShape::map(1, 8, 8);
        let (net, x, labels) = crate::model::with_seed(3, || {
            (
                SplitNet::new(&cfg.model_spec(input, 3), Device::Cpu).unwrap(),
                Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu)),
                Tensor::randint(3, [4], (Kind::Int64, Device::Cpu)),
            )
        });
        // Module 2's input, the previous module's output h, and its plain backward, as the
        // rule runs them before the penalty passes.
        let h = tch::no_grad(|| net.forward_module(0, &x, true));
        let loss = crate::rules::cross_entropy(
            &net.head_logits(1, &net.forward_module(1, &h, true), true),
            &labels,
        );
        loss.backward();
        let before = h.copy();
        let v = h.randn_like();
        let sgr = SgrConfig {
            grad: SgrGrad::Fd,
            ..Default::default()
        };
        finite_difference_penalty(&net, 1, &h, v, (&labels, &x), &sgr, sgr.lambda);
        let moved = (&h - &before).abs().max().double_value(&[]);
        assert_eq!(moved, 0.0, "the ± passes left h moved by up to {moved}");
    }
}
