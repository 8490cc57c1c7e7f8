//! Mixed precision: `--precision fp32|bf16|fp16`, libtorch's autocast and dynamic loss scaling.
//!
//! **Autocast.** tch 0.24 wraps only CUDA's old autocast switch, so [`Autocast`] calls
//! libtorch's own functions (`at::autocast::set_autocast_enabled`, `set_autocast_dtype`, ...,
//! exported by `libtorch_cpu.so` as C++ symbols) through `extern "C"` declarations with their
//! mangled names. That is sound here because every argument and result is a plain integer or
//! `bool` (`c10::DeviceType` and `c10::ScalarType` are `enum class : int8_t`), which the C and
//! C++ calling conventions pass alike, and because none of these functions throws for the
//! values passed (CPU or CUDA, Half or BFloat16). The state is thread-local in libtorch, so the
//! guard is neither `Send` nor `Sync`: it must be dropped on the thread that made it. While a
//! guard lives, ops on the autocast list (convolutions, linear layers, matmuls) run in the
//! chosen dtype, the numerically sensitive ones in f32, exactly as under
//! `torch.autocast(device, dtype)`; the parameters stay f32 (master weights).
//!
//! **Where.** A training step (forward and backward, the SGR penalty's double backward or
//! tangent passes included) runs inside one [`StepScope`]; the optimizer update runs after it,
//! once the scope has cleared autocast's cache of cast weights (stale after an update).
//! Evaluation and the gradient diagnostics run in f32.
//!
//! **Loss scaling (fp16).** fp16 gradients underflow, so every loss a rule differentiates is
//! given a gradient S times its own while its value is unchanged ([`scale_grad`], applied by
//! [`crate::model::SplitNet::loss`]): all gradients of a step come out S times too large, the
//! boundary gradients SGR compares included. Those are divided by S in f32 before the distance
//! D is taken ([`unscaled`]), and the penalty term's backward is scaled by S again, so that the
//! whole step's parameter gradient is S·∇(L + λD). After the step [`LossScaler`] checks the
//! gradients: any inf/NaN skips the update and halves S; otherwise they are divided by S, and S
//! doubles after [`GROWTH_INTERVAL`] good steps in a row (torch.cuda.amp.GradScaler's
//! defaults). The scaler's state is part of the checkpoint. bf16 has f32's exponent range and
//! runs unscaled.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::marker::PhantomData;
use tch::{Device, Kind, Tensor};

/// Numeric precision of training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Autocast to bfloat16 (f32's range, 8 bits of mantissa); no loss scaling.
    Bf16,
    /// Autocast to float16 with dynamic loss scaling.
    Fp16,
}

impl Precision {
    /// The autocast dtype (`None` for f32).
    pub fn kind(self) -> Option<Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
        }
    }

    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// libtorch's autocast functions (C++ symbols of `libtorch_cpu.so`, see the module docs).
mod ffi {
    unsafe extern "C" {
        /// `void at::autocast::set_autocast_enabled(c10::DeviceType, bool)`
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: i8, enabled: bool);
        /// `bool at::autocast::is_autocast_enabled(c10::DeviceType)`
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: i8) -> bool;
        /// `void at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)`
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        /// `c10::ScalarType at::autocast::get_autocast_dtype(c10::DeviceType)`
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
        /// `int at::autocast::increment_nesting()`
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        /// `int at::autocast::decrement_nesting()`
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        /// `void at::autocast::clear_cache()`
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

/// `c10::DeviceType` of `device` (CPU = 0, CUDA = 1), for the devices autocast serves here.
fn device_type(device: Device) -> Option<i8> {
    match device {
        Device::Cpu => Some(0),
        Device::Cuda(_) => Some(1),
        _ => None,
    }
}

/// `c10::ScalarType` of the autocast dtypes (c10/core/ScalarType.h: Half = 5, BFloat16 = 15).
fn scalar_type(kind: Kind) -> Option<i8> {
    match kind {
        Kind::Half => Some(5),
        Kind::BFloat16 => Some(15),
        _ => None,
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: a valid DeviceType value; reads thread-local state.
    device_type(device).is_some_and(|d| unsafe { ffi::is_autocast_enabled(d) })
}

/// Autocast on for one device type and dtype while the guard lives (as a
/// `with torch.autocast(...)` block); dropping it restores the previous switch and dtype and,
/// when the outermost guard ends, clears the cache of cast weights.
#[derive(Debug)]
pub struct Autocast {
    device: i8,
    was_enabled: bool,
    was_dtype: i8,
    /// Autocast state is thread-local: the guard must end on its own thread.
    _thread_bound: PhantomData<*const ()>,
}

impl Autocast {
    /// Turns autocast to `kind` (Half or BFloat16) on for `device` (CPU or CUDA).
    pub fn new(device: Device, kind: Kind) -> Result<Self> {
        let (Some(d), Some(dtype)) = (device_type(device), scalar_type(kind)) else {
            return Err(Error::Config(format!(
                "autocast to {kind:?} on {device:?} is not supported (CPU or CUDA; Half or BFloat16)"
            )));
        };
        // SAFETY: valid DeviceType and ScalarType values; these set thread-local state, which
        // Drop restores on the same thread (the guard is !Send).
        unsafe {
            let was_enabled = ffi::is_autocast_enabled(d);
            let was_dtype = ffi::get_autocast_dtype(d);
            ffi::set_autocast_dtype(d, dtype);
            ffi::set_autocast_enabled(d, true);
            ffi::increment_nesting();
            Ok(Autocast {
                device: d,
                was_enabled,
                was_dtype,
                _thread_bound: PhantomData,
            })
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: restores values read from libtorch in `new`, on the same thread.
        unsafe {
            if ffi::decrement_nesting() == 0 {
                ffi::clear_cache();
            }
            ffi::set_autocast_enabled(self.device, self.was_enabled);
            ffi::set_autocast_dtype(self.device, self.was_dtype);
        }
    }
}

thread_local! {
    /// The loss scale of the step scope open on this thread (`None`: no reduced-precision
    /// step is running, and [`scale_grad`], [`unscaled`] and [`loss_logits`] change nothing).
    static STEP_SCALE: Cell<Option<f64>> = const { Cell::new(None) };
}

/// What one training step runs under: autocast (if any) and the loss scale that
/// [`scale_grad`] applies. Ends (restoring the previous state) when dropped.
#[derive(Debug)]
pub struct StepScope {
    autocast: Option<Autocast>,
    previous: Option<f64>,
}

impl StepScope {
    /// A step at `precision` on `device` with loss scale `scale` (1 unless fp16).
    pub fn new(precision: Precision, device: Device, scale: f64) -> Result<Self> {
        let autocast = precision
            .kind()
            .map(|kind| Autocast::new(device, kind))
            .transpose()?;
        let active = (precision != Precision::Fp32).then_some(scale);
        Ok(Self::with(autocast, active))
    }

    /// A scope with loss scale `scale` and no autocast: the loss-scaling arithmetic alone, in
    /// any dtype (the tests check it in f64 against an unscaled step).
    pub fn scaled_only(scale: f64) -> Self {
        Self::with(None, Some(scale))
    }

    fn with(autocast: Option<Autocast>, scale: Option<f64>) -> Self {
        let previous = STEP_SCALE.with(|s| s.replace(scale));
        StepScope { autocast, previous }
    }
}

impl Drop for StepScope {
    fn drop(&mut self) {
        STEP_SCALE.with(|s| s.set(self.previous));
        // The autocast guard ends after the scale is restored (field drop order).
        let _ = self.autocast.take();
    }
}

/// The current step's loss scale, if a reduced-precision step is running on this thread.
fn step_scale() -> Option<f64> {
    STEP_SCALE.with(Cell::get)
}

/// `t` with its gradient multiplied by the step's loss scale S and its value unchanged:
/// `t + (a − sg(a))` with `a = (S − 1)·t`, whose value is t exactly (a − a = 0) and whose
/// derivative is 1 + (S − 1) = S (exact for a power of two), also under `create_graph`.
/// Outside a scaled step this is `t` itself.
pub fn scale_grad(t: &Tensor) -> Tensor {
    match step_scale() {
        Some(s) if s != 1.0 => {
            let extra = t * (s - 1.0);
            t + (&extra - extra.detach())
        }
        _ => t.shallow_clone(),
    }
}

/// A gradient computed inside a reduced-precision step, divided by the loss scale and, if it
/// is half or bfloat16, in f32 (what SGR compares); outside such a step, `g` itself.
pub fn unscaled(g: &Tensor) -> Tensor {
    match step_scale() {
        Some(s) => {
            let g = if matches!(g.kind(), Kind::Half | Kind::BFloat16) {
                g.to_kind(Kind::Float)
            } else {
                g.shallow_clone()
            };
            if s != 1.0 { g / s } else { g }
        }
        None => g.shallow_clone(),
    }
}

/// Logits as the loss reads them: f32 inside a reduced-precision step (autocast leaves a
/// log-softmax whose dtype is given explicitly in the input's dtype), otherwise unchanged.
pub fn loss_logits(z: &Tensor) -> Tensor {
    if step_scale().is_some() && matches!(z.kind(), Kind::Half | Kind::BFloat16) {
        z.to_kind(Kind::Float)
    } else {
        z.shallow_clone()
    }
}

/// Whether `t` is a 4-D tensor in channels-last (NHWC) memory layout: strides
/// `[H·W·C, 1, W·C, C]` (a 1-wide dimension's stride does not matter, as in libtorch).
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    let [_, c, h, w] = size[..] else {
        return false;
    };
    let expected = [h * w * c, 1, w * c, c];
    (0..4).all(|d| size[d] == 1 || stride[d] == expected[d])
}

/// A channels-last copy of a 4-D tensor `[N, C, H, W]` (same values and shape, NHWC
/// strides; what `x.contiguous(memory_format=torch.channels_last)` returns, which tch does not
/// expose); other tensors are returned as they are.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    let size = t.size();
    let [n, c, h, w] = size[..] else {
        return t.shallow_clone();
    };
    let mut out = Tensor::empty_strided(
        [n, c, h, w],
        [h * w * c, 1, w * c, c],
        (t.kind(), t.device()),
    );
    tch::no_grad(|| out.copy_(t));
    out
}

/// Initial loss scale (2^16, as GradScaler).
pub const INIT_SCALE: f64 = 65536.0;
/// Good steps in a row after which the scale doubles (GradScaler's default).
pub const GROWTH_INTERVAL: u64 = 2000;
/// Below this scale a non-finite gradient is no longer an overflow to skip but a divergence,
/// reported as `--on-nan` says (GradScaler has no floor; without one a diverged run would skip
/// every step silently).
pub const MIN_SCALE: f64 = 1.0;

/// Dynamic loss scaling for fp16 (torch.cuda.amp.GradScaler's rule); saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale S.
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    /// Steps skipped for an overflow so far.
    pub skipped_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: INIT_SCALE,
            good_steps: 0,
            skipped_steps: 0,
        }
    }
}

/// What to do with a step's gradients after [`LossScaler::after_backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Finite (and now unscaled): update.
    Update,
    /// An overflow: skip the update (the scale was halved).
    Skip,
    /// Non-finite at the smallest scale: a divergence for the caller's `--on-nan` handling.
    Diverged,
}

impl LossScaler {
    /// Updates the scale after a step whose gradients were all finite (`finite`) or not.
    pub fn update(&mut self, finite: bool) -> Verdict {
        if !finite {
            if self.scale / 2.0 < MIN_SCALE {
                return Verdict::Diverged;
            }
            self.scale /= 2.0;
            self.good_steps = 0;
            self.skipped_steps += 1;
            return Verdict::Skip;
        }
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        Verdict::Update
    }

    /// Checks the optimizer's gradients (scaled by the current S), divides them by S when
    /// finite, and updates the scale.
    pub fn after_backward(&mut self, opt: &mut crate::optim::Optimizer) -> Verdict {
        let finite = opt.grads_finite();
        let inverse = 1.0 / self.scale;
        let verdict = self.update(finite);
        if verdict == Verdict::Update {
            opt.scale_grads(inverse);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul_kind() -> Kind {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        a.matmul(&a).kind()
    }

    #[test]
    fn the_guard_changes_op_dtypes_and_restores_the_previous_state() {
        assert!(!autocast_enabled(Device::Cpu));
        assert_eq!(matmul_kind(), Kind::Float);
        {
            let _bf16 = Autocast::new(Device::Cpu, Kind::BFloat16).unwrap();
            assert!(autocast_enabled(Device::Cpu));
            assert_eq!(matmul_kind(), Kind::BFloat16);
            {
                let _fp16 = Autocast::new(Device::Cpu, Kind::Half).unwrap();
                assert_eq!(matmul_kind(), Kind::Half);
            }
            // The inner guard restored the outer one's dtype, not f32.
            assert_eq!(matmul_kind(), Kind::BFloat16);
        }
        assert!(!autocast_enabled(Device::Cpu));
        assert_eq!(matmul_kind(), Kind::Float);
        assert!(Autocast::new(Device::Cpu, Kind::Int64).is_err());
    }

    #[test]
    fn the_autocast_state_is_per_thread() {
        let _on = Autocast::new(Device::Cpu, Kind::BFloat16).unwrap();
        let other = std::thread::spawn(matmul_kind).join().unwrap();
        assert_eq!(other, Kind::Float);
        assert_eq!(matmul_kind(), Kind::BFloat16);
    }

    #[test]
    fn scale_grad_scales_the_gradient_and_keeps_the_value() {
        let x = Tensor::from_slice(&[0.3f64, -1.7, 2.5]).set_requires_grad(true);
        let f = |x: &Tensor| (x * x * x).sum(Kind::Double);
        let plain = f(&x);
        let (value, grad, second) = {
            let _scope = StepScope::scaled_only(1024.0);
            let y = scale_grad(&f(&x));
            let g = Tensor::run_backward(&[&y], &[&x], true, true).remove(0);
            // Second order through the scaled graph (SGR's double backward).
            let gg = Tensor::run_backward(&[&g.sum(Kind::Double)], &[&x], false, false).remove(0);
            (y.double_value(&[]), g.detach(), gg)
        };
        assert_eq!(value, plain.double_value(&[]));
        let expected = (&x * &x * 3.0).detach() * 1024.0;
        assert!((grad - expected).abs().max().double_value(&[]) < 1e-9);
        let expected = (&x * 6.0).detach() * 1024.0;
        assert!((second - expected).abs().max().double_value(&[]) < 1e-9);
        // Outside a scope nothing changes.
        let y = scale_grad(&f(&x));
        let g = Tensor::run_backward(&[&y], &[&x], false, false).remove(0);
        assert!((g - (&x * &x * 3.0).detach()).abs().max().double_value(&[]) < 1e-12);
        assert_eq!(unscaled(&x).kind(), Kind::Double);
    }

    #[test]
    fn unscaled_is_f32_and_divided_inside_a_scope() {
        let g = Tensor::from_slice(&[2048.0f32, -512.0]).to_kind(Kind::Half);
        let _scope = StepScope::scaled_only(1024.0);
        let u = unscaled(&g);
        assert_eq!(u.kind(), Kind::Float);
        assert_eq!(Vec::<f32>::try_from(u).unwrap(), [2.0, -0.5]);
        assert_eq!(loss_logits(&g).kind(), Kind::Float);
    }

    #[test]
    fn the_scaler_halves_on_overflow_and_grows_after_good_steps() {
        let mut s = LossScaler::default();
        assert_eq!(s.update(false), Verdict::Skip);
        assert_eq!((s.scale, s.skipped_steps), (INIT_SCALE / 2.0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(s.update(true), Verdict::Update);
        }
        assert_eq!(s.scale, INIT_SCALE / 2.0);
        // An overflow resets the count of good steps.
        assert_eq!(s.update(false), Verdict::Skip);
        assert_eq!((s.scale, s.good_steps), (INIT_SCALE / 4.0, 0));
        for _ in 0..GROWTH_INTERVAL {
            s.update(true);
        }
        assert_eq!((s.scale, s.good_steps), (INIT_SCALE / 2.0, 0));
        // At the floor an overflow is a divergence, and the scale stays.
        let mut low = LossScaler {
            scale: 1.0,
            ..Default::default()
        };
        assert_eq!(low.update(false), Verdict::Diverged);
        assert_eq!(low.scale, 1.0);
        // It round-trips through a checkpoint's JSON.
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LossScaler>(&text).unwrap(), s);
    }

    #[test]
    fn after_backward_unscales_finite_gradients_and_skips_others() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], tch::nn::Init::Const(1.0));
        let mut opt = crate::optim::Optimizer::new(&vs, Default::default(), &[]);
        let mut s = LossScaler {
            scale: 8.0,
            ..Default::default()
        };
        opt.zero_grad();
        (&w * Tensor::from_slice(&[8.0f32, 16.0, -24.0]))
            .sum(Kind::Float)
            .backward();
        assert_eq!(s.after_backward(&mut opt), Verdict::Update);
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), [1.0, 2.0, -3.0]);
        opt.zero_grad();
        (&w * Tensor::from_slice(&[1.0f32, f32::INFINITY, 0.0]))
            .sum(Kind::Float)
            .backward();
        assert_eq!(s.after_backward(&mut opt), Verdict::Skip);
        assert_eq!(s.scale, 4.0);
    }
}
