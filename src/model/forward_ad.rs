//! libtorch's own forward-mode AD, as an *outer* derivative level over [`super::dual`].
//!
//! [`super::dual`] carries one tangent by hand (a pair of tensors per value). Rule `fg-sgr`
//! needs a second, independent directional derivative of that whole computation (a derivative
//! of a forward gradient, see [`crate::rules::fg_sgr`]). libtorch computes forward-mode
//! derivatives of every ATen op on "dual tensors" (`_make_dual` / `_unpack_dual`), so the
//! hand-written tangent pass, being ordinary ops, is differentiated by it for free: nested
//! forward mode with no second-order rules written here and no reverse pass.
//!
//! tch wraps `_make_dual` and `_unpack_dual`, but not the level bookkeeping they need
//! (`torch.autograd.forward_ad.dual_level()` in Python). The two functions behind it are
//! exported by `libtorch_cpu`, which torch-sys links, so they are declared here by their
//! (Itanium-mangled) names: `torch::autograd::ForwardADLevel::get_next_idx()` and
//! `::release_idx(uint64_t)`, both static member functions with C calling convention.
//! libtorch allows one level at a time (it refuses nesting with an error of its own, which
//! would abort the process through the FFI); [`DualLevel`] serialises levels with a lock.
use std::sync::Mutex;
use tch::Tensor;

unsafe extern "C" {
    #[link_name = "_ZN5torch8autograd14ForwardADLevel12get_next_idxEv"]
    fn forward_ad_get_next_idx() -> u64;
    #[link_name = "_ZN5torch8autograd14ForwardADLevel11release_idxEm"]
    fn forward_ad_release_idx(idx: u64);
}

/// One level at a time, process-wide (libtorch's own limit).
static LEVEL_LOCK: Mutex<()> = Mutex::new(());

/// An entered forward-AD level. Dropping it releases the level, which clears every forward
/// gradient made at it (the dual tensors become plain tensors again).
pub struct DualLevel {
    idx: u64,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl DualLevel {
    /// Enters a new level (waits while another thread holds one).
    pub fn enter() -> Self {
        let guard = LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a static libtorch function with no arguments; the lock above guarantees that
        // no other level exists, which is the only precondition libtorch checks.
        let idx = unsafe { forward_ad_get_next_idx() };
        DualLevel { idx, _guard: guard }
    }

    /// `primal` with forward derivative `tangent` at this level (same shape and kind).
    pub fn make_dual(&self, primal: &Tensor, tangent: &Tensor) -> Tensor {
        Tensor::internal_make_dual(primal, tangent, self.idx as i64)
    }

    /// The value and the forward derivative of `t` at this level; the derivative is zeros
    /// when `t` does not depend on any dual input.
    pub fn unpack(&self, t: &Tensor) -> (Tensor, Tensor) {
        let (primal, tangent) = Tensor::internal_unpack_dual(t, self.idx as i64);
        // The unpacked primal is a view that still carries the level's derivative; a copy
        // without it keeps the value once the level is gone.
        let primal = primal.detach().copy();
        let tangent = if tangent.defined() {
            tangent.detach().copy()
        } else {
            primal.zeros_like()
        };
        (primal, tangent)
    }
}

impl Drop for DualLevel {
    fn drop(&mut self) {
        // SAFETY: releases the level entered in `enter`, exactly once.
        unsafe { forward_ad_release_idx(self.idx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn forward_derivative_of_ordinary_ops_matches_the_closed_form() {
        let opts = (Kind::Double, Device::Cpu);
        let (x, u) = (Tensor::randn([5], opts), Tensor::randn([5], opts));
        let level = DualLevel::enter();
        let y = tch::no_grad(|| {
            let d = level.make_dual(&x, &u);
            (d.relu() * &d).sum(Kind::Double) + d.exp().sum(Kind::Double)
        });
        let (value, slope) = level.unpack(&y);
        drop(level);
        let expect = (&x * x.gt(0.0).to_kind(Kind::Double) * 2.0 + x.exp()) * &u;
        let want_value = (x.relu() * &x).sum(Kind::Double) + x.exp().sum(Kind::Double);
        assert!((value - want_value).abs().double_value(&[]) < 1e-12);
        let err = (slope - expect.sum(Kind::Double)).abs().double_value(&[]);
        assert!(err < 1e-12, "forward derivative off by {err}");
        // A second level after the first is released works (the first was freed).
        let again = DualLevel::enter();
        let (_, t) = again.unpack(&x.exp());
        assert_eq!(t.abs().sum(Kind::Double).double_value(&[]), 0.0);
    }
}
