//! SGD with momentum, Nesterov and decoupled-from-BN weight decay, with state that can be saved.
//!
//! tch's own optimizer cannot export its momentum buffers, so `--resume` would silently restart
//! momentum. This one follows PyTorch's `torch.optim.SGD` update (dampening 0):
//! `d = g + wd·p`, `buf = μ·buf + d`, `p -= lr · (d + μ·buf if nesterov else buf)`.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Tensor, nn::VarStore};

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

struct Param {
    name: String,
    value: Tensor,
    decay: bool,
    momentum: Tensor,
}

/// SGD over every trainable variable of a `VarStore`, in a fixed (name) order.
pub struct Sgd {
    params: Vec<Param>,
    cfg: SgdConfig,
}

impl Sgd {
    /// Collects the trainable variables of `vs`. Weight decay applies to tensors of rank >= 2
    /// (conv and linear weights) unless `decay_bn_and_bias` is set.
    pub fn new(vs: &VarStore, cfg: SgdConfig) -> Self {
        let mut named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, value)| Param {
                decay: cfg.decay_bn_and_bias || value.dim() >= 2,
                momentum: value.zeros_like(),
                name,
                value,
            })
            .collect();
        Sgd { params, cfg }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.value.zero_grad();
        }
    }

    /// True if every defined gradient is finite.
    pub fn grads_finite(&self) -> bool {
        self.params.iter().all(|p| {
            let g = p.value.grad();
            !g.defined() || bool::try_from(g.isfinite().all()).unwrap_or(false)
        })
    }

    /// Applies one update with learning rate `lr`. Variables without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let (mu, wd) = (self.cfg.momentum, self.cfg.weight_decay);
        for p in &mut self.params {
            let grad = p.value.grad();
            if !grad.defined() {
                continue;
            }
            let d = if p.decay && wd != 0.0 {
                &grad + &p.value * wd
            } else {
                grad
            };
            let _ = p.momentum.g_mul_scalar_(mu).g_add_(&d);
            let update = if self.cfg.nesterov {
                d + &p.momentum * mu
            } else {
                p.momentum.shallow_clone()
            };
            let _ = p.value.g_sub_(&(update * lr));
        }
    }

    /// Momentum buffers by variable name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.momentum.shallow_clone()))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state`]; every variable must be present.
    pub fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let saved = state
                .remove(&p.name)
                .ok_or_else(|| Error::Config(format!("optimizer state lacks `{}`", p.name)))?;
            if saved.size() != p.momentum.size() {
                return Err(Error::Config(format!(
                    "optimizer state `{}` has the wrong shape",
                    p.name
                )));
            }
            p.momentum.copy_(&saved);
        }
        Ok(())
    }
}
