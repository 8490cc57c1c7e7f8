//! Rule `fg`: local learning with forward gradients only (BP-free).
//!
//! Modules are gradient-isolated as in `dgl`, and module k learns from its local loss
//! `L_k = CE(head_k(f_k(sg(h_{k-1}))), y)`, but no reverse pass runs: the step is computed
//! under `no_grad` and nothing in it calls `backward`. For every module and each of the
//! `--fg-tangents N` tangents, the module and its head run once in forward mode
//! ([`crate::model::dual`]) with a perturbation tape recording ([`crate::model::perturb`]):
//! every parameterised layer adds a Gaussian direction u to its output tangent, so the head's
//! per-sample loss tangent is `L̇_i = Σ_p ∇_{z_p,i} L_i · u_{p,i}`, and each layer's activity
//! gradient is estimated as
//!
//! ```text
//! ĝ_{z,i} = L̇_i · u_i / B          (activity perturbation, per sample; E[ĝ] = ∇_z L)
//! ĝ_θ     = local rule of the layer applied to ĝ_z  (outer product with its input, …)
//! ```
//!
//! averaged over the N tangents. The logits' layer gets the exact output gradient
//! `(softmax − onehot)/B` (known in closed form, no perturbation needed). Perturbation points
//! are per *layer* (an affine layer together with the BatchNorm that follows it), not per
//! block: the variance of the estimate grows with the number of perturbed features that share
//! one loss tangent, and a per-layer point sits where the per-sample estimate is unbiased on
//! layer-wise MLPs. See [`crate::model::perturb`] for where it is unbiased and where a
//! BatchNorm after the point biases it.
//!
//! The directions come from libtorch's generator seeded from (run seed, global step, module,
//! tangent), so a resumed run draws what an uninterrupted one draws.
//!
//! The value pass that moves BatchNorm running statistics and feeds the next module is one
//! plain forward per module (under `no_grad`); the tangent passes never touch running
//! statistics.
use super::{Carry, ModuleOutcome, Rule, StepContext, StepRecorder};
use crate::data::Batch;
use crate::model::dual::Dual;
use crate::model::{SplitNet, perturb, with_seed};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::Tensor;

/// Where the tangent directions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FgGuess {
    /// Independent standard Gaussian directions at every perturbation point (strictly BP-free).
    #[default]
    Random,
    /// Fournier et al.'s local guess: the gradient of a local loss, which needs a reverse pass.
    Local,
}

/// Settings of rule `fg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FgConfig {
    /// Tangents N averaged per module and step.
    pub tangents: usize,
    /// Direction of the tangents.
    pub guess: FgGuess,
    /// Run seed, mixed with the step, module and tangent to seed each direction.
    pub seed: u64,
    /// Run each tangent twice and apply every layer's rule as soon as it has run, keeping one
    /// layer's tensors instead of the module's (see [`estimate_with`]).
    #[serde(default)]
    pub recompute: bool,
}

impl Default for FgConfig {
    fn default() -> Self {
        FgConfig {
            tangents: 1,
            guess: FgGuess::Random,
            seed: 0,
            recompute: false,
        }
    }
}

/// The seed of tangent `t` of module `k` at step `step` (SplitMix64 finaliser over the four).
pub fn tangent_seed(seed: u64, step: usize, k: usize, t: usize) -> i64 {
    let mut z = seed;
    for part in [step as u64, k as u64, t as u64] {
        z = z
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(part.wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 1) as i64
}

/// The seeds of the `--fg-tangents` draws of module `k` at `step`: tangent indices
/// `offset..offset + N` (rule `fg-sgr` keeps its three kinds of draws apart by the offset).
pub(crate) fn tangent_seeds(cfg: &FgConfig, step: usize, k: usize, offset: usize) -> Vec<i64> {
    (0..cfg.tangents.max(1))
        .map(|t| tangent_seed(cfg.seed, step, k, offset + t))
        .collect()
}

/// Forward-gradient local learning.
pub struct Fg(pub FgConfig);

/// Module `k` and its head in forward mode on the pair `input`: the logits and their tangent.
/// With a zero input tangent, the tangent holds only what the perturbation points add.
pub fn module_dual(net: &SplitNet, k: usize, input: &Dual) -> Dual {
    let mut h = (input.0.shallow_clone(), input.1.shallow_clone());
    for u in net.module_ranges()[k].clone() {
        h = net.unit_forward_dual(u, &h);
    }
    net.head_logits_dual(k, &h)
}

/// The parameter gradient estimate of module `k` on input `x`, averaged over one tangent
/// pass per seed in `seeds` (each pass's directions drawn from its seed), under `no_grad`.
///
/// The local rules are linear in the activity gradients and every pass sees the same layer
/// inputs, so the passes' activity estimates are averaged first and the rules (the weight
/// outer products) run once, not once per tangent.
pub fn estimate(
    net: &SplitNet,
    k: usize,
    x: &Tensor,
    labels: &Tensor,
    seeds: &[i64],
) -> Vec<(Tensor, Tensor)> {
    tch::no_grad(|| {
        let mut first: Option<perturb::Tape> = None;
        let mut sums: Vec<Option<Tensor>> = Vec::new();
        for &seed in seeds {
            // Only the first pass keeps the layer inputs its local rules will read.
            let keep = first.is_none();
            let (logits, mut tape) = with_seed(seed, || {
                perturb::record_with(keep, || {
                    module_dual(net, k, &(x.shallow_clone(), x.zeros_like()))
                })
            });
            let activity = tape.activities(&logits, labels, net.spec.label_smoothing);
            if first.is_none() {
                first = Some(tape);
                sums = activity;
            } else {
                for (sum, a) in sums.iter_mut().zip(activity) {
                    if let (Some(sum), Some(a)) = (sum.as_mut(), a) {
                        *sum += a;
                    }
                }
            }
        }
        let scale = 1.0 / seeds.len().max(1) as f64;
        let mean = sums.into_iter().map(|s| s.map(|s| s * scale)).collect();
        first.map_or_else(Vec::new, |tape| tape.local_rules(mean))
    })
}

/// [`estimate`], or with `recompute` the same estimate in two passes per tangent that keep no
/// layer's tensors beyond the layer running.
///
/// The tape of [`estimate`] keeps every perturbed layer's input and direction until the loss
/// tangent is known at the end of the pass, about what autograd keeps for `dgl`. Recomputing,
/// a first pass only measures the loss tangent ([`perturb::count`]), and a second pass with the
/// same seed regenerates the same directions and applies each layer's rule as soon as the layer
/// has run ([`perturb::apply`]): the estimate is the same (to rounding: the tangents are summed
/// as parameter estimates rather than as activities), for two forward-mode passes per tangent
/// and the rules once per tangent instead of once per step.
pub fn estimate_with(
    net: &SplitNet,
    k: usize,
    x: &Tensor,
    labels: &Tensor,
    seeds: &[i64],
    recompute: bool,
) -> Vec<(Tensor, Tensor)> {
    if !recompute {
        return estimate(net, k, x, labels, seeds);
    }
    tch::no_grad(|| {
        let smoothing = net.spec.label_smoothing;
        let zero = || (x.shallow_clone(), x.zeros_like());
        let weight = 1.0 / seeds.len().max(1) as f64;
        let mut sums: Vec<(Tensor, Tensor)> = Vec::new();
        let mut index: HashMap<usize, usize> = HashMap::new();
        for &seed in seeds {
            let summary = with_seed(seed, || {
                let (logits, tape) = perturb::count(|| module_dual(net, k, &zero()));
                tape.summary(&logits, labels, smoothing)
            });
            let (_, grads) = with_seed(seed, || {
                perturb::apply(summary, weight, || module_dual(net, k, &zero()))
            });
            for (p, g) in grads {
                match index.get(&(p.data_ptr() as usize)) {
                    Some(&i) => sums[i].1 += g,
                    None => {
                        index.insert(p.data_ptr() as usize, sums.len());
                        sums.push((p, g));
                    }
                }
            }
        }
        sums
    })
}

/// The single-tangent estimate of module `k` on input `x` with directions drawn from `seed`.
pub fn tangent_estimate(
    net: &SplitNet,
    k: usize,
    x: &Tensor,
    labels: &Tensor,
    seed: i64,
) -> Vec<(Tensor, Tensor)> {
    estimate(net, k, x, labels, &[seed])
}

/// The first parameter of module `k` that the estimates `sums` (keyed by data pointer) do not
/// reach, by name.
fn unreached(net: &SplitNet, k: usize, sums: &HashMap<usize, (Tensor, Tensor)>) -> Option<String> {
    net.module_variables(k, true)
        .into_iter()
        .find(|(_, p)| !sums.contains_key(&(p.data_ptr() as usize)))
        .map(|(name, _)| name)
}

fn unreached_error(net: &SplitNet, name: &str) -> Error {
    Error::Config(format!(
        "--rule fg: parameter `{name}` of {} is not reached by any forward-gradient perturbation point (its layer has no fg local rule)",
        net.spec.arch
    ))
}

/// Checks, before a run starts, that every parameter of every module of `net` gets an estimate
/// (every layer with parameters is built from the hooked tangent primitives), with one tangent
/// pass per module on `batch` (only which parameters are reached matters, not the values).
pub fn check_network(net: &SplitNet, batch: &crate::data::Batch) -> Result<()> {
    let x = batch.images.to_device(net.device());
    let labels = batch.labels.to_device(net.device());
    net.with_frozen_buffers(|| {
        let mut h = x;
        for k in 0..net.num_modules() {
            let sums: HashMap<usize, (Tensor, Tensor)> = estimate(net, k, &h, &labels, &[0])
                .into_iter()
                .map(|(p, g)| (p.data_ptr() as usize, (p, g)))
                .collect();
            if let Some(name) = unreached(net, k, &sums) {
                return Err(unreached_error(net, &name));
            }
            h = tch::no_grad(|| net.forward_module(k, &h, true));
        }
        Ok(())
    })
}

/// The value pass of module `k` on `h` under `no_grad` (it moves BatchNorm running statistics
/// and feeds the next module): records the module's loss and returns its output.
pub(crate) fn value_pass(
    net: &SplitNet,
    k: usize,
    h: &Tensor,
    labels: &Tensor,
    record: &mut StepRecorder,
) -> Tensor {
    let (h_out, logits) = tch::no_grad(|| {
        let h_out = net.forward_module(k, h, true);
        let logits = net.head_logits(k, &h_out, true);
        (h_out, logits)
    });
    let loss = net.loss(&logits, labels);
    record.loss(&loss, &logits, labels, k + 1 == net.num_modules());
    h_out
}

/// Adds module `k`'s parameter gradient estimates `(parameter, estimate)` to the parameters'
/// gradients, after checking that every parameter of the module got one (a layer without an
/// fg local rule is an error, not a parameter silently left untrained).
pub(crate) fn add_estimates(
    net: &SplitNet,
    k: usize,
    estimates: Vec<(Tensor, Tensor)>,
) -> Result<()> {
    let sums: HashMap<usize, (Tensor, Tensor)> = estimates
        .into_iter()
        .map(|(p, g)| (p.data_ptr() as usize, (p, g)))
        .collect();
    if let Some(name) = unreached(net, k, &sums) {
        return Err(unreached_error(net, &name));
    }
    tch::no_grad(|| {
        for (_, (p, g)) in sums {
            let _ = p.grad().g_add_(&g);
        }
    });
    Ok(())
}

/// Gives every trainable parameter of module `k` (units and head) a gradient tensor if it has
/// none yet (one module at a time: a pipeline stage touches only its own modules).
///
/// Rust's libtorch bindings offer no way to attach a `.grad` to a tensor other than a backward
/// pass, so the first time a parameter lacks one, its slot is made by a backward of `0·Σθ`:
/// a graph of the parameters alone, touching no data. Once slots exist (after the first step
/// of a run; the optimizer keeps them) this does nothing.
pub fn ensure_grad_slots(net: &SplitNet, k: usize) {
    let missing: Vec<Tensor> = net
        .module_variables(k, true)
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| !t.grad().defined())
        .collect();
    if missing.is_empty() {
        return;
    }
    tch::with_grad(|| {
        let zero = missing
            .iter()
            .map(|t| t.sum(t.kind()) * 0.0)
            .reduce(|a, b| a + b)
            .expect("at least one parameter");
        zero.backward();
    });
}

/// The error for `--fg-guess local` under a forward-gradient rule (`rule` names it).
pub(crate) fn check_guess(cfg: &FgConfig, rule: &str) -> Result<()> {
    if cfg.guess != FgGuess::Random {
        return Err(Error::Config(format!(
            "--fg-guess local needs a reverse pass, which --rule {rule} does not run"
        )));
    }
    Ok(())
}

impl Rule for Fg {
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
        check_guess(cfg, "fg")?;
        ensure_grad_slots(net, k);
        let labels = &batch.labels;
        let h_out = value_pass(net, k, &carry.h, labels, record);
        let seeds = tangent_seeds(cfg, at.global_step, k, 0);
        let estimates = estimate_with(net, k, &carry.h, labels, &seeds, cfg.recompute);
        add_estimates(net, k, estimates)?;
        Ok(ModuleOutcome {
            carry: Carry {
                h: h_out,
                forwarded: None,
            },
            back: None,
        })
    }
}
