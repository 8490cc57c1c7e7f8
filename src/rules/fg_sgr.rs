//! Rule `fg-sgr`: successive gradient reconciliation in the BP-free setting.
//!
//! Rule `sgr` (receiver side, `l2`) adds to module k's loss `λ·D` with
//! `D = B‖g_in − g_prev‖²`, where `g_in = ∂L_k/∂h` at module k's detached input h and
//! `g_prev = ∂L_{k-1}/∂h` is module k-1's output gradient, and its parameter gradient is a
//! directional derivative (see [`super::sgr`]):
//!
//! ```text
//! ∇_θ D = ∇_θ [ (∂L_k/∂h) · v ] = ∇_θ [ d/dε L_k(h + εv) ]_{ε=0},   v = ∂D/∂g_in = 2B(g_in − g_prev)
//! ```
//!
//! Here every piece comes from forward-mode passes only, with no reverse pass:
//!
//! 1. `ĝ_prev`: module k-1's head runs on the pair (h, u), u ~ N(0, I) per sample; with `L̇_i`
//!    sample i's loss tangent, `ĝ_prev,i = L̇_i u_i / B`, averaged over `--fg-tangents N` draws
//!    (the activity estimate of [`crate::model::perturb`], at the head's input).
//! 2. `ĝ_in`: module k and its head run on (h, u') with N further independent draws, the same way.
//! 3. `v̂ = 2B(ĝ_in − ĝ_prev)`. Rule `fg`'s estimate `G(x; U)` of `∇_θ L_k(x)` (perturbation
//!    directions U, local rules) is differentiated along v̂ with U held fixed:
//!    `G' = d/dε G(h + εv̂; U)` at ε = 0. The tangent pass of `fg` is made of ordinary tensor
//!    ops, so libtorch's own forward-mode AD, entered as an outer level on the input
//!    (`h + ε v̂` as a dual tensor, [`crate::model::forward_ad`]), computes G' exactly in the
//!    same pass that computes G: nested forward mode (the inner tangent carried by hand in
//!    [`crate::model::dual`], the outer one by libtorch), no second-order rules written out.
//! 4. The module's update direction is `G + λ·G'`.
//!
//! **Where it is unbiased.** `E_U[G(x; U)] = ∇_θ L_k(x)` for every x wherever `fg`'s estimate is
//! unbiased (no batch-mixing op after a perturbation point, see [`crate::model::perturb`]);
//! U does not depend on ε, so `E_U[G'] = d/dε E_U[G(h + εv̂)] = ∇_θ[(∂L_k/∂h)·v̂]`. That is
//! linear in v̂, which is drawn independently of U, so `E[G'] = ∇_θ D` when additionally
//! `E ĝ_in = g_in` and `E ĝ_prev = g_prev`, i.e. when no batch-mixing op lies between h and
//! the losses (heads without BatchNorm; module k without BatchNorm after h, such as ViT
//! blocks). A BatchNorm inside module k (every MLP and ResNet module here) makes the
//! per-sample `ĝ_in` leave out the BatchNorm's cross-sample terms: a bias of the size of those
//! terms, measured in `tests/fg_sgr.rs` and RESULTS.md. Only `l2` keeps v̂ linear in the
//! estimates; the cosine distances would put the estimates inside a nonlinearity (biased), so
//! they are refused, as is the sender side (it needs module k's input gradient while module
//! k-1 still runs).
//!
//! The recorded penalty is `D̂ = B‖ĝ_in − ĝ_prev‖²`, an upward-biased estimate:
//! `E D̂ = D + B·tr Cov(ĝ_in − ĝ_prev)`.
//!
//! Cost per regularised module and step: N extra tangent passes of the module and head (ĝ_in),
//! N of module k-1's head (ĝ_prev), and the N tape passes at about twice `fg`'s cost (every op
//! also computes its forward derivative). Memory: what `fg` keeps, plus the outer tangents of
//! the tape's kept inputs.
use super::fg::{
    FgConfig, add_estimates, check_guess, ensure_grad_slots, estimate_with, tangent_seeds,
    value_pass,
};
use super::{Carry, ModuleOutcome, Rule, SgrConfig, StepContext, StepRecorder};
use crate::Result;
use crate::data::Batch;
use crate::model::dual::Dual;
use crate::model::forward_ad::DualLevel;
use crate::model::{SplitNet, perturb, with_seed};
use tch::Tensor;

/// Offsets of the tangent index that keep the three kinds of draws of one (step, module) on
/// different seeds: the tape passes use 0..N, the input-gradient passes and the output-gradient
/// passes these offsets plus 0..N.
const INPUT_DRAWS: usize = 1 << 20;
const OUTPUT_DRAWS: usize = 2 << 20;

/// Forward-gradient SGR.
pub struct FgSgr {
    /// Tangents, seed (the guess must be random).
    pub fg: FgConfig,
    /// λ, its schedule, `--sgr-from`, `--sgr-every` (distance `l2`, receiver side).
    pub sgr: SgrConfig,
}

/// The forward-gradient estimate of `∂L/∂x` of the mean cross-entropy of `logits_of(x)`,
/// averaged over one Gaussian direction per seed: `ĝ_i = L̇_i u_i / B` per sample (no reverse
/// pass; unbiased where `logits_of` does not mix samples).
pub fn boundary_gradient(
    x: &Tensor,
    labels: &Tensor,
    smoothing: f64,
    seeds: &[i64],
    logits_of: impl Fn(&Dual) -> Dual,
) -> Tensor {
    tch::no_grad(|| {
        let batch = x.size()[0] as f64;
        let mut sum: Option<Tensor> = None;
        for &seed in seeds {
            let u = with_seed(seed, || x.randn_like());
            let logits = logits_of(&(x.shallow_clone(), u.shallow_clone()));
            let loss_dot = perturb::sample_loss_tangents(&logits, labels, smoothing);
            let g = u * perturb::per_sample(&loss_dot, x.dim()) / batch;
            sum = Some(match sum {
                Some(s) => s + g,
                None => g,
            });
        }
        sum.map_or_else(|| x.zeros_like(), |s| s / seeds.len().max(1) as f64)
    })
}

/// `ĝ_in`: the estimate of `∂L_k/∂h` at module `k`'s input `h`.
pub fn input_gradient(
    net: &SplitNet,
    k: usize,
    h: &Tensor,
    labels: &Tensor,
    seeds: &[i64],
) -> Tensor {
    let smoothing = net.spec.label_smoothing;
    boundary_gradient(h, labels, smoothing, seeds, |d| {
        super::fg::module_dual(net, k, d)
    })
}

/// `ĝ_prev`: the estimate of `∂L_k/∂h_out` through module `k`'s head alone, at its output.
pub fn output_gradient(
    net: &SplitNet,
    k: usize,
    h_out: &Tensor,
    labels: &Tensor,
    seeds: &[i64],
) -> Tensor {
    let smoothing = net.spec.label_smoothing;
    boundary_gradient(h_out, labels, smoothing, seeds, |d| {
        net.head_logits_dual(k, d)
    })
}

/// Rule `fg`'s estimate G of module `k`'s parameter gradient at input `h` (one tape pass per
/// seed; two with `recompute`, see [`super::fg::estimate_with`]) together with its derivative
/// G' along `v` (nested forward mode): `(parameter, G, G')`, where
/// `E[G'] = ∇_θ[(∂L_k/∂h)·v]` wherever `fg` is unbiased.
pub fn penalty_estimate(
    net: &SplitNet,
    k: usize,
    h: &Tensor,
    v: &Tensor,
    labels: &Tensor,
    seeds: &[i64],
    recompute: bool,
) -> Vec<(Tensor, Tensor, Tensor)> {
    let level = DualLevel::enter();
    let x = tch::no_grad(|| level.make_dual(&h.detach(), &v.detach()));
    estimate_with(net, k, &x, labels, seeds, recompute)
        .into_iter()
        .map(|(p, g)| {
            let (value, slope) = level.unpack(&g);
            (p, value, slope)
        })
        .collect()
}

impl Rule for FgSgr {
    fn module_step(
        &self,
        net: &SplitNet,
        k: usize,
        carry: Carry,
        batch: &Batch,
        at: &StepContext,
        record: &mut StepRecorder,
    ) -> Result<ModuleOutcome> {
        let (fg, sgr) = (&self.fg, &self.sgr);
        check_guess(fg, "fg-sgr")?;
        let lambda = sgr.lambda_at(at.epoch);
        let active = lambda != 0.0 && at.global_step.is_multiple_of(sgr.every.max(1));
        ensure_grad_slots(net, k);
        let modules = net.num_modules();
        let labels = &batch.labels;
        let step = at.global_step;
        let h = &carry.h;
        let h_out = value_pass(net, k, h, labels, record);
        // Module numbers are 1-based in the CLI, as in rule `sgr`.
        let boundary = k >= 1 && k + 1 >= sgr.from;
        let tape_seeds = tangent_seeds(fg, step, k, 0);
        let estimates = match carry.forwarded.filter(|_| active && boundary) {
            Some(target) => {
                let g_in =
                    input_gradient(net, k, h, labels, &tangent_seeds(fg, step, k, INPUT_DRAWS));
                let b = labels.size()[0] as f64;
                let diff = g_in - target;
                record.penalty(k, &(diff.square().sum(diff.kind()) * b));
                let v = diff * (2.0 * b);
                penalty_estimate(net, k, h, &v, labels, &tape_seeds, fg.recompute)
                    .into_iter()
                    .map(|(p, g, slope)| (p, g + slope * lambda))
                    .collect()
            }
            None => estimate_with(net, k, h, labels, &tape_seeds, fg.recompute),
        };
        add_estimates(net, k, estimates)?;
        let sends = active && k + 1 < modules && k + 2 >= sgr.from;
        let forwarded = sends.then(|| {
            let draws = tangent_seeds(fg, step, k, OUTPUT_DRAWS);
            output_gradient(net, k, &h_out, labels, &draws)
        });
        Ok(ModuleOutcome {
            carry: Carry {
                h: h_out,
                forwarded,
            },
            back: None,
        })
    }
}
