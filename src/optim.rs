//! The optimizers, SGD (momentum, Nesterov) and AdamW, over flat buffers, with state that can
//! be saved.
//!
//! tch's own optimizers cannot export their state, so `--resume` would silently restart
//! momentum. These follow PyTorch's updates:
//! - `torch.optim.SGD` (dampening 0): `d = g + wd·p`, `buf = μ·buf + d`,
//!   `p -= lr · (d + μ·buf if nesterov else buf)`;
//! - `torch.optim.AdamW` (no amsgrad): `p -= lr·wd·p`, `m = β1·m + (1−β1)·g`,
//!   `v = β2·v + (1−β2)·g²`, `p -= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`.
//!
//! Weight decay skips rank-1 tensors (norm scales, biases) and the names a network lists in
//! `Network::no_weight_decay` (position embeddings, class tokens), unless `decay_bn_and_bias`.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor, nn::VarStore};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum (and optionally Nesterov), L2 weight decay.
    #[default]
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`.
    Adamw,
}

/// Optimizer hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// The update rule.
    pub kind: OptimizerKind,
    /// SGD momentum μ.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay: L2 (added to the gradient) for SGD, decoupled for AdamW.
    pub weight_decay: f64,
    /// Also decay norm parameters and biases (PyTorch's default; off here, as is usual for
    /// ResNets and ViTs: decaying norm scales only changes the effective learning rate).
    pub decay_bn_and_bias: bool,
    /// AdamW (β1, β2).
    pub betas: (f64, f64),
    /// AdamW ε.
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            decay_bn_and_bias: false,
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

/// One trainable variable (itself a view into the flat value buffer) and its views into the
/// flat gradient and state buffers.
struct Param {
    name: String,
    value: Tensor,
    grad_slot: Tensor,
    /// Views into each state buffer (SGD: momentum; AdamW: first and second moments).
    state_slots: Vec<Tensor>,
}

/// An optimizer over every trainable variable of a `VarStore`, in a fixed (name) order.
///
/// The update runs on flat buffers (values, gradients, state) instead of once per variable:
/// ResNet-32 has ~100 parameter tensors, and a per-tensor update launches ~600 small kernels
/// per step, which on a GPU costs more than the update's arithmetic. Every variable's storage
/// is made a view into the flat value buffer (`set_data`, so the layers, which share the
/// variable, see it), and every gradient is made a view into the flat gradient buffer once
/// autograd has created it; later backward passes accumulate into it in place.
pub struct Optimizer {
    params: Vec<Param>,
    cfg: OptimConfig,
    flat_values: Tensor,
    flat_grads: Tensor,
    /// SGD: `[momentum]`; AdamW: `[exp_avg, exp_avg_sq]`.
    flat_state: Vec<Tensor>,
    /// `wd` where a variable is decayed, 0 elsewhere (`None` when nothing is decayed).
    decay: Option<Tensor>,
    /// Updates taken (AdamW's bias correction).
    steps: i64,
    /// Clipping group of every element (`None`: one group), and the number of groups.
    groups: Option<(Tensor, i64)>,
}

/// Names of the state buffers of `kind`, as they appear in checkpoints
/// (`optimizer.{buffer}.{variable}`).
fn state_names(kind: OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd => &["momentum"],
        OptimizerKind::Adamw => &["exp_avg", "exp_avg_sq"],
    }
}

/// Name of the update counter in [`Optimizer::state`].
const STEP_KEY: &str = "step";

impl Optimizer {
    /// Collects the trainable variables of `vs` (all of one dtype and device). Weight decay
    /// applies to tensors of rank >= 2 (conv and linear weights) that `no_decay` does not name,
    /// unless `decay_bn_and_bias`.
    pub fn new(vs: &VarStore, cfg: OptimConfig, no_decay: &[String]) -> Self {
        Self::with_layout(vs, cfg, no_decay, false)
    }

    /// [`Optimizer::new`]; with `channels_last`, every 4-D variable (a convolution weight
    /// `[O, I, kh, kw]`) is stored in O, kh, kw, I order in the flat buffers, and the variable,
    /// its gradient and its state become channels-last views (strides `[kh·kw·I, 1, kw·I, I]`)
    /// of them. The update is elementwise on the flat buffers, so the layout changes nothing
    /// else; checkpoints are written in the logical (contiguous) order either way.
    pub fn with_layout(
        vs: &VarStore,
        cfg: OptimConfig,
        no_decay: &[String],
        channels_last: bool,
    ) -> Self {
        Self::over(vs, cfg, no_decay, channels_last, |_| true)
    }

    /// [`Optimizer::with_layout`] over the trainable variables of `vs` that `keep` selects by
    /// name: a pipeline stage's optimizer owns its modules' variables only. The update is
    /// elementwise, so an optimizer per stage computes, for every variable, exactly what one
    /// optimizer over all of them does.
    pub fn over(
        vs: &VarStore,
        cfg: OptimConfig,
        no_decay: &[String],
        channels_last: bool,
        keep: impl Fn(&str) -> bool,
    ) -> Self {
        let nhwc = |shape: &[i64]| channels_last && shape.len() == 4;
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, t)| t.requires_grad() && keep(name))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let options = named
            .first()
            .map_or((Kind::Float, vs.device()), |(_, t)| (t.kind(), t.device()));
        let _guard = tch::no_grad_guard();
        let flat_values = if named.is_empty() {
            Tensor::zeros([0], options)
        } else {
            Tensor::cat(
                &named
                    .iter()
                    .map(|(_, t)| {
                        if nhwc(&t.size()) {
                            t.detach().permute([0, 2, 3, 1]).reshape([-1])
                        } else {
                            t.detach().reshape([-1])
                        }
                    })
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let flat_grads = flat_values.zeros_like();
        let flat_state: Vec<Tensor> = state_names(cfg.kind)
            .iter()
            .map(|_| flat_values.zeros_like())
            .collect();
        let mut params = Vec::with_capacity(named.len());
        let mut decay_mask = Vec::with_capacity(named.len());
        let mut offset = 0;
        for (name, mut value) in named {
            let numel = value.numel() as i64;
            let shape = value.size();
            let slot = |flat: &Tensor| {
                let part = flat.narrow(0, offset, numel);
                match shape[..] {
                    [_, i, kh, kw] if nhwc(&shape) => {
                        part.as_strided(shape.as_slice(), [kh * kw * i, 1, kw * i, i], None)
                    }
                    _ => part.view(shape.as_slice()),
                }
            };
            value.set_data(&slot(&flat_values));
            let decayed = cfg.decay_bn_and_bias || (shape.len() >= 2 && !no_decay.contains(&name));
            decay_mask.push(Tensor::full(
                [numel],
                if decayed { cfg.weight_decay } else { 0.0 },
                options,
            ));
            params.push(Param {
                name,
                value,
                grad_slot: slot(&flat_grads),
                state_slots: flat_state.iter().map(slot).collect(),
            });
            offset += numel;
        }
        let decay = (cfg.weight_decay != 0.0 && !decay_mask.is_empty())
            .then(|| Tensor::cat(&decay_mask, 0));
        Optimizer {
            flat_grads,
            flat_state,
            flat_values,
            params,
            cfg,
            decay,
            steps: 0,
            groups: None,
        }
    }

    /// Puts every variable into a clipping group (`group_of(name)`, numbered from 0), so that
    /// [`Optimizer::clip_grad_norm`] clips each group on its own: gradient-isolated modules
    /// are clipped each by its own norm.
    pub fn set_clip_groups(&mut self, group_of: impl Fn(&str) -> usize) {
        let ids: Vec<usize> = self.params.iter().map(|p| group_of(&p.name)).collect();
        let count = ids.iter().max().map_or(1, |m| m + 1) as i64;
        let device = self.flat_values.device();
        let per_element: Vec<Tensor> = self
            .params
            .iter()
            .zip(&ids)
            .map(|(p, &g)| Tensor::full([p.value.numel() as i64], g as i64, (Kind::Int64, device)))
            .collect();
        if !per_element.is_empty() {
            self.groups = Some((Tensor::cat(&per_element, 0), count));
        }
    }

    /// Clears every gradient (one fill of the flat buffer, after pulling in any gradient
    /// autograd created or replaced since the last step).
    pub fn zero_grad(&mut self) {
        self.gather_grads();
        let _ = self.flat_grads.zero_();
    }

    /// Makes every defined gradient a view into the flat gradient buffer (copying it there the
    /// first time, or after something replaced the tensor), so the update sees all of them.
    fn gather_grads(&mut self) {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let mut grad = p.value.grad();
            if grad.defined() && grad.data_ptr() != p.grad_slot.data_ptr() {
                p.grad_slot.copy_(&grad);
                grad.set_data(&p.grad_slot);
            }
        }
    }

    /// Multiplies every gradient by `factor` (one op on the flat buffer; fp16 loss scaling's
    /// unscale, see [`crate::precision::LossScaler`]).
    pub fn scale_grads(&mut self, factor: f64) {
        self.gather_grads();
        let _guard = tch::no_grad_guard();
        let _ = self.flat_grads.g_mul_scalar_(factor);
    }

    /// True if every gradient is finite.
    pub fn grads_finite(&mut self) -> bool {
        self.gather_grads();
        bool::try_from(self.flat_grads.isfinite().all()).unwrap_or(false)
    }

    /// Scales the gradients so that each clipping group's L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does for one group (factor `max_norm / (norm + 1e-6)`,
    /// capped at 1); returns the norms before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Vec<f64> {
        self.gather_grads();
        let _guard = tch::no_grad_guard();
        let kind = self.flat_grads.kind();
        let squares = self.flat_grads.square();
        let (norms, factor) = match &self.groups {
            Some((ids, count)) => {
                let sums = Tensor::zeros([*count], (kind, self.flat_grads.device()))
                    .scatter_add(0, ids, &squares);
                let norms = sums.sqrt();
                let factor = (max_norm / (&norms + 1e-6)).clamp_max(1.0);
                let per_element = factor.gather(0, ids, false);
                (norms, per_element)
            }
            None => {
                let norm = squares.sum(kind).sqrt().reshape([1]);
                let factor = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
                (norm, factor)
            }
        };
        let _ = self.flat_grads.g_mul_(&factor);
        Vec::<f64>::try_from(norms.to_kind(Kind::Double).to_device(tch::Device::Cpu))
            .unwrap_or_default()
    }

    /// Applies one update with learning rate `lr`. A variable that received no gradient since
    /// the last `zero_grad` is updated with a zero gradient (as PyTorch's optimizers do with
    /// `zero_grad(set_to_none=False)`): its momentum and weight decay still act.
    pub fn step(&mut self, lr: f64) {
        self.gather_grads();
        self.steps += 1;
        let _guard = tch::no_grad_guard();
        match self.cfg.kind {
            OptimizerKind::Sgd => self.sgd_step(lr),
            OptimizerKind::Adamw => self.adamw_step(lr),
        }
    }

    fn sgd_step(&mut self, lr: f64) {
        let d = match &self.decay {
            Some(decay) => self.flat_grads.addcmul(&self.flat_values, decay),
            None => self.flat_grads.shallow_clone(),
        };
        let momentum = &mut self.flat_state[0];
        let _ = momentum.g_mul_scalar_(self.cfg.momentum).g_add_(&d);
        let update = if self.cfg.nesterov {
            d + &*momentum * self.cfg.momentum
        } else {
            momentum.shallow_clone()
        };
        let _ = self.flat_values.g_sub_(&(update * lr));
    }

    fn adamw_step(&mut self, lr: f64) {
        let (beta1, beta2) = self.cfg.betas;
        if let Some(decay) = &self.decay {
            // p ← p·(1 − lr·wd), decoupled from the gradient.
            let _ = self.flat_values.g_sub_(&(&self.flat_values * decay * lr));
        }
        let g = &self.flat_grads;
        let _ = self.flat_state[0]
            .g_mul_scalar_(beta1)
            .g_add_(&(g * (1.0 - beta1)));
        let _ = self.flat_state[1]
            .g_mul_scalar_(beta2)
            .g_add_(&(g.square() * (1.0 - beta2)));
        let t = self.steps as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        let denom = self.flat_state[1].sqrt() / bias2.sqrt() + self.cfg.eps;
        let _ = self
            .flat_values
            .g_sub_(&(&self.flat_state[0] / denom * (lr / bias1)));
    }

    /// The trainable variables' names, in the optimizer's (name) order.
    pub fn variable_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The flat gradient buffer (every variable's gradient is a view into it), after pulling in
    /// gradients autograd created since the last step: what data-parallel replicas average.
    pub fn flat_grads(&mut self) -> &mut Tensor {
        self.gather_grads();
        &mut self.flat_grads
    }

    /// The optimizer's state for checkpoints: every buffer by `{buffer}.{variable}` name
    /// (`momentum.layer1.0.conv1.weight`), plus the update counter `step`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let names = state_names(self.cfg.kind);
        let mut state: Vec<(String, Tensor)> =
            self.params
                .iter()
                .flat_map(|p| {
                    names.iter().zip(&p.state_slots).map(|(buffer, slot)| {
                        (format!("{buffer}.{}", p.name), slot.shallow_clone())
                    })
                })
                .collect();
        state.push((STEP_KEY.into(), Tensor::from_slice(&[self.steps])));
        state
    }

    /// Restores state saved by [`Optimizer::state`] (or [`merged_state`]); every buffer of
    /// every variable of this optimizer must be present, and entries of other variables (other
    /// pipeline stages') are ignored. A missing counter (checkpoints from before it was saved,
    /// SGD only) is 0.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let names = state_names(self.cfg.kind);
        for p in &mut self.params {
            for (buffer, slot) in names.iter().zip(&mut p.state_slots) {
                let key = format!("{buffer}.{}", p.name);
                let saved = state.get(&key).ok_or_else(|| {
                    Error::Config(format!(
                        "optimizer state lacks `{key}` (saved by another --optimizer?)"
                    ))
                })?;
                if saved.size() != slot.size() {
                    return Err(Error::Config(format!(
                        "optimizer state `{key}` has the wrong shape"
                    )));
                }
                slot.copy_(saved);
            }
        }
        self.steps = match state.get(STEP_KEY) {
            Some(t) => t.int64_value(&[0]),
            None if self.cfg.kind == OptimizerKind::Sgd => 0,
            None => {
                return Err(Error::Config(
                    "optimizer state lacks its step count `step`".into(),
                ));
            }
        };
        Ok(())
    }
}

/// The state of several optimizers over disjoint variables (the stages of a pipeline) as one
/// optimizer over all of them saves it: every buffer once, and the one update counter (every
/// stage steps on every batch, so the counters agree).
pub fn merged_state(optimizers: &[Optimizer]) -> Vec<(String, Tensor)> {
    let mut merged: Vec<(String, Tensor)> = Vec::new();
    for opt in optimizers {
        merged.extend(opt.state().into_iter().filter(|(name, _)| name != STEP_KEY));
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    let steps = optimizers.first().map_or(0, |o| o.steps);
    merged.push((STEP_KEY.into(), Tensor::from_slice(&[steps])));
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn};

    /// A weight (decayed: rank 2) and a bias (not decayed), in f64.
    fn store() -> (VarStore, Tensor, Tensor) {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = root.var("w", &[3, 2], nn::Init::Const(0.5));
        let b = root.var("b", &[3], nn::Init::Const(-0.25));
        let mut vs = vs;
        vs.double();
        (vs, w, b)
    }

    /// Gradients of a fixed non-linear loss, different at each step.
    fn backward(w: &Tensor, b: &Tensor, step: i64) {
        let x = Tensor::arange(6, (Kind::Double, Device::Cpu)).view([2, 3]) + step as f64;
        let y = x.matmul(w).sum(Kind::Double) * (b.square().sum(Kind::Double) + 1.0);
        y.backward();
    }

    #[test]
    fn flat_update_matches_the_per_tensor_formula_and_reaches_the_layers() {
        let cfg = OptimConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        let (vs, w, b) = store();
        let mut opt = Optimizer::new(&vs, cfg.clone(), &[]);
        // The expected trajectory, one tensor at a time, in PyTorch's formula.
        let (mut w_ref, mut b_ref) = (w.detach().copy(), b.detach().copy());
        let (mut w_buf, mut b_buf) = (w_ref.zeros_like(), b_ref.zeros_like());
        for step in 0..3 {
            opt.zero_grad();
            backward(&w, &b, step);
            let (gw, gb) = {
                let (wr, br) = (
                    w_ref.detach().set_requires_grad(true),
                    b_ref.detach().set_requires_grad(true),
                );
                backward(&wr, &br, step);
                (wr.grad() + &w_ref * cfg.weight_decay, br.grad())
            };
            w_buf = &w_buf * cfg.momentum + &gw;
            b_buf = &b_buf * cfg.momentum + &gb;
            w_ref = &w_ref - (gw + &w_buf * cfg.momentum) * 0.05;
            b_ref = &b_ref - (gb + &b_buf * cfg.momentum) * 0.05;
            opt.step(0.05);
            // `w` and `b` are the handles the model would hold, taken before Sgd::new.
            assert!(f64::try_from((&w - &w_ref).abs().max()).unwrap() < 1e-12);
            assert!(f64::try_from((&b - &b_ref).abs().max()).unwrap() < 1e-12);
        }
        let state: HashMap<String, Tensor> = opt.state().into_iter().collect();
        assert!(f64::try_from((&state["momentum.w"] - &w_buf).abs().max()).unwrap() < 1e-12);
    }

    #[test]
    fn a_gradient_replaced_out_of_place_is_still_applied() {
        let cfg = OptimConfig {
            momentum: 0.0,
            weight_decay: 0.0,
            ..OptimConfig::default()
        };
        let (vs, w, b) = store();
        let mut opt = Optimizer::new(&vs, cfg, &[]);
        opt.zero_grad();
        backward(&w, &b, 0);
        opt.step(0.0); // gradients are now views into the flat buffer
        opt.zero_grad();
        // Something outside the optimizer points the gradient at new storage.
        let mut grad = w.grad();
        grad.set_data(&w.full_like(2.0));
        let before = w.detach().copy();
        opt.step(1.0);
        let moved = f64::try_from((before - &w).abs().max()).unwrap();
        assert!((moved - 2.0).abs() < 1e-12, "moved by {moved}");
    }

    #[test]
    fn momentum_state_round_trips() {
        let (vs, w, b) = store();
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), &[]);
        backward(&w, &b, 0);
        opt.step(0.1);
        let copy = || -> HashMap<String, Tensor> {
            opt.state()
                .into_iter()
                .map(|(n, t)| (n, t.copy()))
                .collect()
        };
        let saved = copy();
        let (vs2, _, _) = store();
        let mut other = Optimizer::new(&vs2, OptimConfig::default(), &[]);
        other.load_state(&copy()).unwrap();
        for (name, t) in other.state() {
            assert_eq!(
                f64::try_from((&t - &saved[&name]).abs().max()).unwrap(),
                0.0
            );
        }
        let mut missing = copy();
        missing.remove("momentum.b");
        assert!(other.load_state(&missing).is_err());
    }

    #[test]
    fn adamw_matches_the_per_tensor_formula_and_skips_decay_where_told() {
        let cfg = OptimConfig {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.1,
            betas: (0.8, 0.95),
            eps: 1e-6,
            ..OptimConfig::default()
        };
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let w = root.var("w", &[3, 2], nn::Init::Const(0.5));
        let b = root.var("b", &[3], nn::Init::Const(-0.25));
        let pos = root.var("pos", &[1, 3], nn::Init::Const(0.3));
        let mut vs = vs;
        vs.double();
        // `pos` has rank 2 but is listed as no-decay, like a position embedding.
        let mut opt = Optimizer::new(&vs, cfg.clone(), &["pos".to_string()]);
        let lr = 0.01;
        let (beta1, beta2) = cfg.betas;
        let mut reference: Vec<(Tensor, Tensor, Tensor, f64)> = [(&w, 0.1), (&b, 0.0), (&pos, 0.0)]
            .iter()
            .map(|(t, wd)| (t.detach().copy(), t.zeros_like(), t.zeros_like(), *wd))
            .collect();
        let loss = |w: &Tensor, b: &Tensor, pos: &Tensor, step: i64| {
            let x = Tensor::arange(6, (Kind::Double, Device::Cpu)).view([2, 3]) + step as f64;
            x.matmul(w).sum(Kind::Double) * (b.square().sum(Kind::Double) + 1.0)
                + (pos * pos * (step + 1) as f64).sum(Kind::Double)
        };
        for step in 0..3 {
            opt.zero_grad();
            loss(&w, &b, &pos, step).backward();
            let leaves: Vec<Tensor> = reference
                .iter()
                .map(|r| r.0.detach().set_requires_grad(true))
                .collect();
            loss(&leaves[0], &leaves[1], &leaves[2], step).backward();
            let t = step as i32 + 1;
            for (r, leaf) in reference.iter_mut().zip(&leaves) {
                let g = leaf.grad();
                let p = &r.0 * (1.0 - lr * r.3);
                r.1 = &r.1 * beta1 + &g * (1.0 - beta1);
                r.2 = &r.2 * beta2 + g.square() * (1.0 - beta2);
                let denom = r.2.sqrt() / (1.0 - beta2.powi(t)).sqrt() + cfg.eps;
                r.0 = p - &r.1 / denom * (lr / (1.0 - beta1.powi(t)));
            }
            opt.step(lr);
            for (live, r) in [&w, &b, &pos].iter().zip(&reference) {
                let d = f64::try_from((*live - &r.0).abs().max()).unwrap();
                assert!(d < 1e-12, "step {step}: {d}");
            }
        }
        // Decay acted on `w` only: with zero gradients, `w` shrinks and the others stay.
        opt.zero_grad();
        let (b0, pos0) = (b.detach().copy(), pos.detach().copy());
        let state: HashMap<String, Tensor> = opt
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        assert!(state.contains_key("exp_avg.w") && state.contains_key("exp_avg_sq.pos"));
        assert_eq!(state["step"].int64_value(&[0]), 3);
        // The state restores into a fresh optimizer, which then takes the same step.
        let fresh = VarStore::new(Device::Cpu);
        let r = fresh.root();
        let (w2, b2, pos2) = (
            r.var("w", &[3, 2], nn::Init::Const(0.0)),
            r.var("b", &[3], nn::Init::Const(0.0)),
            r.var("pos", &[1, 3], nn::Init::Const(0.0)),
        );
        let mut fresh = fresh;
        fresh.double();
        tch::no_grad(|| {
            for (dst, src) in [(&w2, &w), (&b2, &b), (&pos2, &pos)] {
                dst.shallow_clone().copy_(src);
            }
        });
        let mut other = Optimizer::new(&fresh, cfg.clone(), &["pos".to_string()]);
        other.load_state(&state).unwrap();
        for o in [&mut opt, &mut other] {
            o.zero_grad();
        }
        loss(&w, &b, &pos, 7).backward();
        loss(&w2, &b2, &pos2, 7).backward();
        opt.step(lr);
        other.step(lr);
        for (x, y) in [(&w, &w2), (&b, &b2), (&pos, &pos2)] {
            assert_eq!(f64::try_from((x - y).abs().max()).unwrap(), 0.0);
        }
        assert!(f64::try_from((&b - &b0).abs().max()).unwrap() > 0.0);
        assert!(f64::try_from((&pos - &pos0).abs().max()).unwrap() > 0.0);
        // SGD state does not load into AdamW.
        let sgd = Optimizer::new(&fresh, OptimConfig::default(), &[]);
        let e = other
            .load_state(&sgd.state().into_iter().collect())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exp_avg"), "{e}");
    }

    #[test]
    fn clipping_scales_each_group_to_its_own_norm() {
        let (vs, w, b) = store();
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), &[]);
        opt.set_clip_groups(|name| usize::from(name == "b"));
        backward(&w, &b, 0);
        opt.zero_grad();
        tch::no_grad(|| {
            w.grad().copy_(&w.full_like(2.0)); // norm √(6·4) ≈ 4.90
            b.grad().copy_(&b.full_like(0.1)); // norm √(3·0.01) ≈ 0.17
        });
        let norms = opt.clip_grad_norm(1.0);
        assert!((norms[0] - 24f64.sqrt()).abs() < 1e-9 && (norms[1] - 0.03f64.sqrt()).abs() < 1e-9);
        let after = |t: &Tensor| f64::try_from(t.grad().norm()).unwrap();
        // The large group is scaled to norm 1; the small one is left alone.
        assert!((after(&w) - 1.0).abs() < 1e-5, "{}", after(&w));
        assert!((after(&b) - 0.03f64.sqrt()).abs() < 1e-12);
        // One group: the whole gradient is scaled by one factor.
        let (vs, w, b) = store();
        let mut opt = Optimizer::new(&vs, OptimConfig::default(), &[]);
        backward(&w, &b, 0);
        opt.zero_grad();
        tch::no_grad(|| {
            w.grad().copy_(&w.full_like(2.0));
            b.grad().copy_(&b.full_like(0.1));
        });
        opt.clip_grad_norm(1.0);
        let total = (after(&w).powi(2) + after(&b).powi(2)).sqrt();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
}
