//! Training rules: what one training step does with one batch.
//!
//! A rule runs forward and backward and leaves gradients in the parameters; it never touches
//! the optimizer, the learning rate or any file (the trainer owns those). This is the only
//! place that names every rule: adding a rule means a new file plus one arm in [`build`].
pub mod bp;
pub mod dgl;
pub mod fg;
pub mod fg_sgr;
pub mod sgr;

use crate::Result;
use crate::data::Batch;
use crate::model::SplitNet;
use crate::model::splits::PenaltyCost;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use fg::{FgConfig, FgGuess};
pub use sgr::{LambdaSchedule, SgrConfig, SgrDistance, SgrGrad, SgrSide};

/// The available rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    /// Global back-propagation through the whole network (aux heads, if any, are trained as
    /// probes on detached features and never send gradient into the backbone).
    Bp,
    /// Decoupled greedy learning: K gradient-isolated modules, each trained by its local loss.
    Dgl,
    /// DGL plus successive gradient reconciliation between neighbouring modules.
    Sgr,
    /// K gradient-isolated modules trained by their local losses with forward gradients only
    /// (activity perturbation; no reverse pass).
    Fg,
    /// `fg` plus the SGR penalty, its gradient estimated by nested forward mode (no reverse
    /// pass).
    FgSgr,
}

impl RuleKind {
    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            RuleKind::Bp => "bp",
            RuleKind::Dgl => "dgl",
            RuleKind::Sgr => "sgr",
            RuleKind::Fg => "fg",
            RuleKind::FgSgr => "fg-sgr",
        }
    }

    /// Whether the rule reads the SGR settings (λ, its schedule, `--sgr-*`).
    pub fn reconciles(self) -> bool {
        matches!(self, RuleKind::Sgr | RuleKind::FgSgr)
    }

    /// Whether the rule trains with forward gradients only (reads `--fg-*`, runs no reverse
    /// pass).
    pub fn forward_gradient(self) -> bool {
        matches!(self, RuleKind::Fg | RuleKind::FgSgr)
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a step reports (host-side numbers; reading them synchronises the device).
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Local loss of every module (the last one is the network's loss).
    pub module_losses: Vec<f64>,
    /// SGR penalty D(·,·) of every module (the sum when both sides apply; 0 where none was).
    pub penalties: Vec<f64>,
    /// Whether the penalty was applied to each module in this step (a penalty can be 0 when
    /// applied, so [`StepStats::penalties`] alone cannot tell; epoch means count these steps).
    pub penalty_applied: Vec<bool>,
    /// Correct predictions of the last module's classifier.
    pub correct: i64,
    /// Samples in the batch.
    pub samples: i64,
}

impl StepStats {
    /// One step's stats from the stats of its pipeline stages, in stage order (each covers
    /// its own modules; the last stage's holds the correct count).
    pub fn concat(parts: Vec<StepStats>) -> StepStats {
        let mut all = StepStats::default();
        for part in parts {
            all.module_losses.extend(part.module_losses);
            all.penalties.extend(part.penalties);
            all.penalty_applied.extend(part.penalty_applied);
            all.correct += part.correct;
            all.samples = part.samples;
        }
        all
    }

    /// The network's (last module's) loss.
    pub fn loss(&self) -> f64 {
        *self.module_losses.last().unwrap_or(&f64::NAN)
    }
}

/// Where in training a step is.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepContext {
    /// Optimizer steps taken before this one.
    pub global_step: usize,
    /// Progress in epochs at this step (`epoch + step / steps_per_epoch`, steps that run).
    pub epoch: f64,
}

impl StepContext {
    /// The context of step `global_step` when progress does not matter (tests, benchmarks).
    pub fn at_step(global_step: usize) -> Self {
        StepContext {
            global_step,
            epoch: 0.0,
        }
    }
}

/// What module k hands module k+1 within one step.
#[derive(Debug)]
pub struct Carry {
    /// Module k's output, detached (the batch's images before module 0).
    pub h: Tensor,
    /// SGR (receiver side): `sg[∂L_k/∂h_k]`, the target of module k+1's penalty, when module
    /// k+1 is regularised at this step.
    pub forwarded: Option<Tensor>,
}

impl Carry {
    /// What module 0 receives: the batch's images.
    pub fn input(batch: &Batch) -> Self {
        Carry {
            h: batch.images.shallow_clone(),
            forwarded: None,
        }
    }
}

/// What module k's part of a step returns.
#[derive(Debug)]
pub struct ModuleOutcome {
    /// What module k+1 receives.
    pub carry: Carry,
    /// SGR (sender side): `sg[∂L_k/∂h_{k-1}]` of the plain loss, the target of module k-1's
    /// sender penalty ([`Rule::sender_step`]), when module k-1 is penalised at this step.
    pub back: Option<Tensor>,
}

/// One training step, cut at module boundaries.
///
/// A local rule's step is a chain: module k needs only what module k-1 hands it in the same
/// step ([`Carry`]), so [`run_modules`] can run any contiguous range of modules, and the
/// pipeline ([`crate::pipeline`]) runs the ranges on different workers. `Send + Sync`: a
/// pipeline shares one rule between its stage threads (rules hold settings only).
pub trait Rule: Send + Sync {
    /// Forward and backward on `batch` at `at`, leaving gradients in `net`'s parameters (which
    /// the caller zeroed).
    fn step(&self, net: &SplitNet, batch: &Batch, at: &StepContext) -> Result<StepStats> {
        let modules = net.num_modules();
        let mut record = StepRecorder::new(0..modules, batch.labels.size()[0]);
        let no_upstream = |_: Tensor| -> Result<()> { unreachable!("module 0 has no sender") };
        run_modules(
            self,
            net,
            0..modules,
            Carry::input(batch),
            batch,
            at,
            &mut record,
            no_upstream,
        )?;
        Ok(record.finish())
    }

    /// Module `k`'s part of a step on `carry` from module k-1: its forward, its backward
    /// (gradients into module k's parameters and head only) and what it hands on.
    fn module_step(
        &self,
        net: &SplitNet,
        k: usize,
        carry: Carry,
        batch: &Batch,
        at: &StepContext,
        record: &mut StepRecorder,
    ) -> Result<ModuleOutcome>;

    /// Whether module `k` returns a [`ModuleOutcome::back`] target at `at` (sender-side SGR),
    /// so module k-1 must keep its input for [`Rule::sender_step`].
    fn sends_back(&self, _net: &SplitNet, _k: usize, _at: &StepContext) -> bool {
        false
    }

    /// Module `j`'s sender-side penalty, once module j+1 gave its `target` (see
    /// [`ModuleOutcome::back`]); `input` is module j's input in this step.
    fn sender_step(
        &self,
        _net: &SplitNet,
        _j: usize,
        _input_and_target: (&Tensor, &Tensor),
        _batch: &Batch,
        _at: &StepContext,
        _record: &mut StepRecorder,
    ) -> Result<()> {
        Ok(())
    }
}

/// Runs modules `modules` of one step from `carry` (what module `modules.start - 1` handed
/// on) and returns what the last of them hands on, with the last module's input when module
/// `modules.end` will send a sender-side target back to it.
///
/// A target that module `modules.start` sends back to its predecessor (in another pipeline
/// stage) goes to `upstream`; targets inside the range are applied at once, in the order the
/// sequential step applies them.
#[allow(clippy::too_many_arguments)]
pub fn run_modules<R: Rule + ?Sized>(
    rule: &R,
    net: &SplitNet,
    modules: std::ops::Range<usize>,
    mut carry: Carry,
    batch: &Batch,
    at: &StepContext,
    record: &mut StepRecorder,
    mut upstream: impl FnMut(Tensor) -> Result<()>,
) -> Result<(Carry, Option<Tensor>)> {
    // Module k-1's input, kept while module k may still send it a target.
    let mut prev_input: Option<Tensor> = None;
    for k in modules.clone() {
        let input = rule.sends_back(net, k + 1, at).then(|| carry.h.detach());
        let outcome = rule.module_step(net, k, carry, batch, at, record)?;
        if let Some(target) = outcome.back {
            match prev_input.take() {
                Some(input) => {
                    rule.sender_step(net, k - 1, (&input, &target), batch, at, record)?
                }
                None if k == modules.start => upstream(target)?,
                None => {
                    unreachable!("module {k} sent back a target its predecessor did not expect")
                }
            }
        }
        prev_input = input;
        carry = outcome.carry;
    }
    Ok((carry, prev_input))
}

/// Builds the rule `kind`; `sgr` is used by the SGR rule only (`fg` takes its defaults, see
/// [`build_with`]).
pub fn build(kind: RuleKind, sgr: &SgrConfig) -> Box<dyn Rule> {
    build_with(kind, sgr, &FgConfig::default())
}

/// Builds the rule `kind` with its settings: `sgr` for the SGR rules, `fg` for the
/// forward-gradient rules.
pub fn build_with(kind: RuleKind, sgr: &SgrConfig, fg: &FgConfig) -> Box<dyn Rule> {
    match kind {
        RuleKind::Bp => Box::new(bp::Bp),
        RuleKind::Dgl => Box::new(dgl::Dgl),
        RuleKind::Sgr => Box::new(sgr::Sgr(sgr.clone())),
        RuleKind::Fg => Box::new(fg::Fg(fg.clone())),
        RuleKind::FgSgr => Box::new(fg_sgr::FgSgr {
            fg: fg.clone(),
            sgr: sgr.clone(),
        }),
    }
}

/// What rule `kind` adds to the memory of some modules, for `--split balanced-memory`
/// (`None` for rules whose modules all cost what `dgl`'s do).
pub fn penalty_cost(kind: RuleKind, sgr: &SgrConfig) -> Option<PenaltyCost> {
    match kind {
        RuleKind::Bp | RuleKind::Dgl | RuleKind::Fg | RuleKind::FgSgr => None,
        RuleKind::Sgr => sgr.penalty_cost(),
    }
}

/// Mean cross-entropy of `logits` `[B, classes]` against `labels` `[B]`, in the logits' own
/// precision (tch's `cross_entropy_for_logits` silently computes in f32, which breaks f64
/// gradient checks).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.log_softmax(-1, logits.kind()).nll_loss(labels)
}

/// [`cross_entropy`] with label smoothing ε: the target is `(1 − ε)·onehot + ε/C`, so the loss
/// is `(1 − ε)·CE + ε·mean_c(−log p_c)` (PyTorch's `label_smoothing`).
pub fn cross_entropy_smoothed(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    smoothed_nll(&logits.log_softmax(-1, logits.kind()), labels, smoothing)
}

/// [`cross_entropy_smoothed`] from log-probabilities already computed (the tangent layer
/// needs them too).
pub(crate) fn smoothed_nll(log_probs: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    let nll = log_probs.nll_loss(labels);
    if smoothing == 0.0 {
        return nll;
    }
    let kind = log_probs.kind();
    let uniform = -log_probs.mean_dim(&[-1i64][..], false, kind).mean(kind);
    nll * (1.0 - smoothing) + uniform * smoothing
}

/// Number of rows of `logits` whose arg-max equals the label.
pub fn correct(logits: &Tensor, labels: &Tensor) -> i64 {
    correct_tensor(logits, labels).int64_value(&[])
}

/// [`correct`] as a 0-dim tensor on the logits' device (no host synchronisation).
fn correct_tensor(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.argmax(-1, false).eq_tensor(labels).sum(Kind::Int64)
}

/// Collects a step's numbers as device tensors and copies them to the host once, in
/// [`StepRecorder::finish`]: reading each loss as it is computed would stall a GPU's queue
/// once per module.
pub struct StepRecorder {
    /// The modules this recorder covers (a pipeline stage records its own).
    first: usize,
    losses: Vec<Tensor>,
    penalties: Vec<Option<Tensor>>,
    correct: Option<Tensor>,
    samples: i64,
}

impl StepRecorder {
    /// A recorder for modules `modules` (all of them, or a pipeline stage's) and a batch of
    /// `samples`.
    pub fn new(modules: std::ops::Range<usize>, samples: i64) -> Self {
        StepRecorder {
            first: modules.start,
            losses: Vec::with_capacity(modules.len()),
            penalties: modules.map(|_| None).collect(),
            correct: None,
            samples,
        }
    }

    /// Records the next module's plain local loss (modules record in order); `logits` of the
    /// last module also give the step's correct count.
    pub(crate) fn loss(&mut self, loss: &Tensor, logits: &Tensor, labels: &Tensor, last: bool) {
        self.losses.push(loss.detach());
        if last {
            self.correct = Some(correct_tensor(logits, labels));
        }
    }

    /// Adds `penalty` to module `k`'s SGR penalty D (with `--sgr-side both` a module minimises
    /// one on each side).
    pub(crate) fn penalty(&mut self, k: usize, penalty: &Tensor) {
        let penalty = penalty.detach();
        let k = k - self.first;
        self.penalties[k] = Some(match self.penalties[k].take() {
            Some(p) => p + penalty,
            None => penalty,
        });
    }

    /// The step's numbers on the host (one device-to-host copy), for the recorder's modules.
    pub fn finish(self) -> StepStats {
        let modules = self.losses.len();
        let mut values: Vec<Tensor> = self.losses;
        let have_penalty: Vec<bool> = self.penalties.iter().map(Option::is_some).collect();
        values.extend(self.penalties.into_iter().flatten());
        values.extend(self.correct);
        if values.is_empty() {
            return StepStats {
                samples: self.samples,
                ..Default::default()
            };
        }
        let as_f64: Vec<Tensor> = values
            .iter()
            .map(|t| t.reshape([1]).to_kind(Kind::Double))
            .collect();
        let host: Vec<f64> = Tensor::cat(&as_f64, 0)
            .to_device(tch::Device::Cpu)
            .try_into()
            .unwrap_or_default();
        let mut rest = host.into_iter();
        let module_losses: Vec<f64> = rest.by_ref().take(modules).collect();
        let penalties = have_penalty
            .iter()
            .map(|&has| if has { rest.next().unwrap_or(0.0) } else { 0.0 })
            .collect();
        StepStats {
            module_losses,
            penalties,
            penalty_applied: have_penalty,
            correct: rest.next().map_or(0, |c| c as i64),
            samples: self.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn label_smoothing_is_cross_entropy_against_the_smoothed_target() {
        let logits = Tensor::randn([5, 4], (Kind::Double, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 3, 1, 1, 2]);
        let eps = 0.2;
        // −Σ_c q_c log p_c with q = (1 − ε)·onehot + ε/C, averaged over the batch.
        let target = labels.one_hot(4).to_kind(Kind::Double) * (1.0 - eps) + eps / 4.0;
        let expected = -(target * logits.log_softmax(-1, Kind::Double))
            .sum_dim_intlist(&[-1i64][..], false, Kind::Double)
            .mean(Kind::Double);
        let got = cross_entropy_smoothed(&logits, &labels, eps);
        assert!((got - &expected).abs().double_value(&[]) < 1e-12);
        let plain = cross_entropy_smoothed(&logits, &labels, 0.0);
        assert!(
            (plain - cross_entropy(&logits, &labels))
                .abs()
                .double_value(&[])
                == 0.0
        );
        // The tangent of the smoothed loss against a central difference.
        let v = logits.randn_like();
        let (_, tangent) = crate::model::dual::cross_entropy(
            &(logits.shallow_clone(), v.shallow_clone()),
            &labels,
            eps,
        );
        let h = 1e-6;
        let fd = (cross_entropy_smoothed(&(&logits + &v * h), &labels, eps)
            - cross_entropy_smoothed(&(&logits - &v * h), &labels, eps))
            / (2.0 * h);
        assert!((tangent - fd).abs().double_value(&[]) < 1e-8);
    }
}
