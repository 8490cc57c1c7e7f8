//! SGD with momentum, Nesterov and decoupled-from-BN weight decay, with state that can be saved.
//!
//! tch's own optimizer cannot export its momentum buffers, so `--resume` would silently restart
//! momentum. This one follows PyTorch's `torch.optim.SGD` update (dampening 0):
//! `d = g + wd·p`, `buf = μ·buf + d`, `p -= lr · (d + μ·buf if nesterov else buf)`.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor, nn::VarStore};

/// Optimizer hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum μ.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Also decay BatchNorm parameters and biases (PyTorch's default; off here, as is usual for
    /// ResNets: decaying BN scales only changes the effective learning rate).
    pub decay_bn_and_bias: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            decay_bn_and_bias: false,
        }
    }
}

/// One trainable variable (itself a view into the flat value buffer) and its views into the
/// flat gradient and momentum buffers.
struct Param {
    name: String,
    value: Tensor,
    grad_slot: Tensor,
    momentum_slot: Tensor,
}

/// SGD over every trainable variable of a `VarStore`, in a fixed (name) order.
///
/// The update runs on three flat buffers (values, gradients, momentum) instead of once per
/// variable: ResNet-32 has ~100 parameter tensors, and a per-tensor update launches ~600 small
/// kernels per step, which on a GPU costs more than the update's arithmetic. Every variable's
/// storage is made a view into the flat value buffer (`set_data`, so the layers, which share
/// the variable, see it), and every gradient is made a view into the flat gradient buffer once
/// autograd has created it; later backward passes accumulate into it in place.
pub struct Sgd {
    params: Vec<Param>,
    cfg: SgdConfig,
    flat_values: Tensor,
    flat_grads: Tensor,
    flat_momentum: Tensor,
    /// `wd` where a variable is decayed, 0 elsewhere (`None` when nothing is decayed).
    decay: Option<Tensor>,
}

impl Sgd {
    /// Collects the trainable variables of `vs` (all of one dtype and device). Weight decay
    /// applies to tensors of rank >= 2 (conv and linear weights) unless `decay_bn_and_bias`.
    pub fn new(vs: &VarStore, cfg: SgdConfig) -> Self {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
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
                    .map(|(_, t)| t.detach().reshape([-1]))
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let flat_grads = flat_values.zeros_like();
        let flat_momentum = flat_values.zeros_like();
        let mut params = Vec::with_capacity(named.len());
        let mut decay_mask = Vec::with_capacity(named.len());
        let mut offset = 0;
        for (name, mut value) in named {
            let numel = value.numel() as i64;
            let shape = value.size();
            let slot = |flat: &Tensor| flat.narrow(0, offset, numel).view(shape.as_slice());
            value.set_data(&slot(&flat_values));
            let decayed = cfg.decay_bn_and_bias || shape.len() >= 2;
            decay_mask.push(Tensor::full(
                [numel],
                if decayed { cfg.weight_decay } else { 0.0 },
                options,
            ));
            params.push(Param {
                name,
                value,
                grad_slot: slot(&flat_grads),
                momentum_slot: slot(&flat_momentum),
            });
            offset += numel;
        }
        let decay = (cfg.weight_decay != 0.0 && !decay_mask.is_empty())
            .then(|| Tensor::cat(&decay_mask, 0));
        Sgd {
            flat_grads,
            flat_momentum,
            flat_values,
            params,
            cfg,
            decay,
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

    /// True if every gradient is finite.
    pub fn grads_finite(&mut self) -> bool {
        self.gather_grads();
        bool::try_from(self.flat_grads.isfinite().all()).unwrap_or(false)
    }

    /// Applies one update with learning rate `lr`. A variable that received no gradient since
    /// the last `zero_grad` is updated with a zero gradient (as PyTorch's SGD does with
    /// `zero_grad(set_to_none=False)`): its momentum and weight decay still act.
    pub fn step(&mut self, lr: f64) {
        self.gather_grads();
        let _guard = tch::no_grad_guard();
        let d = match &self.decay {
            Some(decay) => self.flat_grads.addcmul(&self.flat_values, decay),
            None => self.flat_grads.shallow_clone(),
        };
        let _ = self
            .flat_momentum
            .g_mul_scalar_(self.cfg.momentum)
            .g_add_(&d);
        let update = if self.cfg.nesterov {
            d + &self.flat_momentum * self.cfg.momentum
        } else {
            self.flat_momentum.shallow_clone()
        };
        let _ = self.flat_values.g_sub_(&(update * lr));
    }

    /// Momentum buffers by variable name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.momentum_slot.shallow_clone()))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state`]; every variable must be present.
    pub fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let saved = state
                .remove(&p.name)
                .ok_or_else(|| Error::Config(format!("optimizer state lacks `{}`", p.name)))?;
            if saved.size() != p.momentum_slot.size() {
                return Err(Error::Config(format!(
                    "optimizer state `{}` has the wrong shape",
                    p.name
                )));
            }
            p.momentum_slot.copy_(&saved);
        }
        Ok(())
    }
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
        let cfg = SgdConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
            decay_bn_and_bias: false,
        };
        let (vs, w, b) = store();
        let mut opt = Sgd::new(&vs, cfg.clone());
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
        assert!(f64::try_from((&state["w"] - &w_buf).abs().max()).unwrap() < 1e-12);
    }

    #[test]
    fn a_gradient_replaced_out_of_place_is_still_applied() {
        let cfg = SgdConfig {
            momentum: 0.0,
            weight_decay: 0.0,
            ..SgdConfig::default()
        };
        let (vs, w, b) = store();
        let mut opt = Sgd::new(&vs, cfg);
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
        let mut opt = Sgd::new(&vs, SgdConfig::default());
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
        let mut other = Sgd::new(&vs2, SgdConfig::default());
        other.load_state(copy()).unwrap();
        for (name, t) in other.state() {
            assert_eq!(
                f64::try_from((&t - &saved[&name]).abs().max()).unwrap(),
                0.0
            );
        }
        let mut missing = copy();
        missing.remove("b");
        assert!(other.load_state(missing).is_err());
    }
}
