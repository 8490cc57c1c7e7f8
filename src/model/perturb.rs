//! Activity perturbation for forward gradients (rule `fg`), hooked into the tangent layers.
//!
//! While a [`Tape`] is recording (see [`record`]), every parameterised tangent primitive of
//! [`super::dual`] (linear, conv, BatchNorm, LayerNorm, and a ViT's token embedding with its
//! class token and position embedding) becomes a *perturbation point*: it adds a fresh
//! Gaussian direction u (one per sample and feature, drawn from libtorch's generator) to the
//! tangent it hands on, and notes what its layer-local weight rule needs (its input, u). After
//! the pass, the loss tangent of sample i is `L̇_i = Σ_p ∇_{z_p,i} L_i · u_{p,i}` (all points
//! at once), and the activity estimate at point p is `ĝ_{z_p,i} = L̇_i · u_{p,i} / B`
//! (Ren et al., ICLR 2023, "FG-A"). Each point then turns its ĝ into parameter gradients by its
//! own local rule, written out here as ordinary tensor ops (no autograd):
//!
//! ```text
//! linear  z = x Wᵀ + b          ĝ_W = ĝ_zᵀ x,            ĝ_b = Σ_i ĝ_z
//! conv    z = W ⋆ x + b         ĝ_W = Σ_i ĝ_z · im2col(x)ᵀ, ĝ_b = Σ_{i,h,w} ĝ_z
//! BN      y = γ x̂ + β           ĝ_γ = Σ ĝ_y ⊙ x̂,        ĝ_β = Σ ĝ_y
//! LN      y = γ x̂ + β (per token) ĝ_γ = Σ ĝ_y ⊙ x̂,       ĝ_β = Σ ĝ_y
//! embed   y = [cls; t] + pos     ĝ_pos = Σ_i ĝ_y,        ĝ_cls = Σ_i ĝ_y[token 0]
//! ```
//!
//! A linear or conv whose output goes straight into a BatchNorm is not perturbed on its own:
//! the BatchNorm uses the layer's unperturbed tangent, and the layer's ĝ_z is the BatchNorm's
//! ĝ_y pushed through the (local, exact) BatchNorm input gradient
//! `ĝ_x = γ·s·(ĝ_y − mean ĝ_y − x̂·mean(ĝ_y ⊙ x̂))`. So an affine layer and its normalisation
//! are one perturbation point at the normalised output, where the per-sample estimate is
//! unbiased (see below), rather than two points, the first of which sits before the
//! BatchNorm's coupling of the samples.
//!
//! **Unbiasedness.** `E[L̇_i u_{p,i}] = Σ_{q,j} ∇_{z_q,j} L_i E[u_{q,j} u_{p,i}ᵀ] = ∇_{z_p,i} L_i`,
//! and `∇_{z_p,i} L = ∇_{z_p,i} L_i / B` exactly when sample i's point activity reaches no
//! other sample's loss, i.e. when no BatchNorm (or other batch-mixing op) lies *after* the
//! point inside the module. With one affine+BN layer per module and a linear or MLP head
//! (mlp-DxW at K = D) the estimate is unbiased; where a later BatchNorm mixes the batch
//! (a ResNet block's first conv, a conv head) the estimate omits the cross-sample terms of
//! that BatchNorm's statistics, a bias of the order of those terms.
//!
//! The point that produces the logits gets no perturbation: the loss gradient there is known in
//! closed form, `(softmax(z) − onehot(y)) / B`, and [`Tape::gradients`] uses it.
//!
//! Any tangent layer added later gets this for free if it is built from these primitives; a
//! parameter no primitive reaches is reported by the rule rather than silently left untrained.
use super::dual::{BN_EPS, Dual, LN_EPS};
use std::cell::RefCell;
use tch::{Tensor, nn};

/// What a perturbation point's local rule needs to know about its layer.
#[derive(Debug)]
enum Op {
    Linear {
        ws: Tensor,
        bs: Option<Tensor>,
    },
    Conv {
        ws: Tensor,
        bs: Option<Tensor>,
        stride: i64,
        padding: i64,
    },
    Norm {
        ws: Option<Tensor>,
        bs: Option<Tensor>,
        /// The affine point this BatchNorm normalises (its output gradient comes from here).
        source: Option<usize>,
    },
    /// LayerNorm over the last dimension (per sample and token: no batch mixing).
    LayerNorm {
        ws: Option<Tensor>,
        bs: Option<Tensor>,
    },
    /// A ViT's token embedding: `[cls; tokens] + pos` (the class token and the position
    /// embedding are parameters added to the patch tokens).
    Embed {
        cls: Option<Tensor>,
        pos: Tensor,
    },
}

/// One perturbation point.
#[derive(Debug)]
struct Point {
    op: Op,
    /// The layer's input value (`None` where the tape does not keep inputs, and for a
    /// BatchNorm that took a point over: its input is recomputed from the source's).
    input: Option<Tensor>,
    /// The direction added to the output tangent (`None` when absorbed by a BatchNorm, and on
    /// a counting tape, which keeps no directions).
    u: Option<Tensor>,
    /// Whether the point's direction is its own (not absorbed by a BatchNorm, not the logits'
    /// point whose exact gradient replaces it).
    perturbed: bool,
    /// Data pointers of the value and the perturbed tangent handed on, to recognise them in
    /// the next primitive.
    out_ptrs: (usize, usize),
    /// The unperturbed output tangent, kept while this is the latest point only.
    clean: Option<Tensor>,
}

/// The perturbation points of one tangent pass, in the order they ran.
#[derive(Debug, Default)]
pub struct Tape {
    /// The points not yet applied (all of them, except on an applying tape).
    points: Vec<Point>,
    /// Points already applied and dropped (an applying tape's); `points[0]` is point `applied`.
    applied: usize,
    mode: Mode,
}

/// What a tape keeps.
#[derive(Debug)]
enum Mode {
    /// Every point, with its direction and, if `keep_inputs`, its layer's input, for
    /// [`Tape::activities`] and [`Tape::local_rules`] at the end (only the pass whose local
    /// rules run needs the inputs; the other tangents' passes only contribute activities).
    Keep { keep_inputs: bool },
    /// Nothing beyond the latest point's clean tangent: a first pass that only measures the
    /// loss tangent ([`count`]).
    Count,
    /// A second pass with the same directions ([`apply`]): each point's local rule runs as soon
    /// as no later primitive can take the point over, and the point is dropped.
    Apply(Applying),
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Keep { keep_inputs: true }
    }
}

/// What an applying pass knows from its counting pass, and what it has summed so far.
#[derive(Debug)]
struct Applying {
    /// `w·L̇_i/B` per sample: the factor of each direction.
    scale: Tensor,
    /// `w·∂L/∂z` of the logits, for the point that produced them.
    output_grad: Tensor,
    /// The index of that point, if one did.
    exact_last: Option<usize>,
    /// The parameter estimates of the points applied so far.
    grads: Vec<(Tensor, Tensor)>,
}

/// What the counting pass of one tangent measured: see [`count`] and [`apply`].
#[derive(Debug)]
pub struct PassSummary {
    scale: Tensor,
    output_grad: Tensor,
    exact_last: Option<usize>,
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Runs `f` with a fresh tape recording every tangent primitive it calls on this thread, and
/// returns `f`'s result with the tape. Outside `record` the primitives are plain tangent layers.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Tape) {
    record_with(true, f)
}

/// [`record`], keeping the layers' inputs only if `keep_inputs` (a tape without them gives
/// activities but cannot run [`Tape::local_rules`]).
pub fn record_with<T>(keep_inputs: bool, f: impl FnOnce() -> T) -> (T, Tape) {
    run_with(Mode::Keep { keep_inputs }, f)
}

/// The first pass of the recomputing estimate: runs `f` with a tape that keeps nothing per
/// point; [`Tape::summary`] then gives the loss tangent the second pass needs.
pub fn count<T>(f: impl FnOnce() -> T) -> (T, Tape) {
    run_with(Mode::Count, f)
}

/// The second pass of the recomputing estimate: runs `f`, which must draw the same directions
/// as the counting pass that gave `summary` (same generator seed, same layers), applies every
/// point's local rule as soon as the layer has run, with the activity `w·ĝ`, and returns `f`'s
/// result with the parameter estimates. Only the latest point (and the affine layer a
/// BatchNorm takes over) is alive at any time: one layer's tensors instead of the module's.
pub fn apply<T>(summary: PassSummary, w: f64, f: impl FnOnce() -> T) -> (T, Vec<(Tensor, Tensor)>) {
    let applying = Applying {
        scale: summary.scale * w,
        output_grad: summary.output_grad * w,
        exact_last: summary.exact_last,
        grads: Vec::new(),
    };
    let (out, mut tape) = run_with(Mode::Apply(applying), f);
    tape.flush(true);
    let grads = match tape.mode {
        Mode::Apply(a) => a.grads,
        _ => Vec::new(),
    };
    (out, grads)
}

fn run_with<T>(mode: Mode, f: impl FnOnce() -> T) -> (T, Tape) {
    let fresh = Tape {
        points: Vec::new(),
        applied: 0,
        mode,
    };
    let previous = TAPE.with(|t| t.borrow_mut().replace(fresh));
    let out = f();
    let tape = TAPE.with(|t| std::mem::replace(&mut *t.borrow_mut(), previous));
    (out, tape.unwrap_or_default())
}

fn ptrs((x, x_dot): &Dual) -> (usize, usize) {
    (x.data_ptr() as usize, x_dot.data_ptr() as usize)
}

/// Hook for an affine primitive: when recording, perturbs `out`'s tangent and notes the point.
fn affine(op: impl FnOnce() -> Op, input: Option<&Tensor>, out: Dual) -> Dual {
    TAPE.with(|t| {
        let mut tape = t.borrow_mut();
        let Some(tape) = tape.as_mut() else {
            return out;
        };
        let (z, z_dot) = out;
        let u = z_dot.randn_like();
        let perturbed = &z_dot + &u;
        if let Some(last) = tape.points.last_mut() {
            last.clean = None;
        }
        let (keep_input, keep_u) = match tape.mode {
            Mode::Keep { keep_inputs } => (keep_inputs, true),
            Mode::Count => (false, false),
            Mode::Apply(_) => (true, true),
        };
        tape.points.push(Point {
            op: op(),
            input: input.filter(|_| keep_input).map(Tensor::shallow_clone),
            u: keep_u.then_some(u),
            perturbed: true,
            out_ptrs: (z.data_ptr() as usize, perturbed.data_ptr() as usize),
            clean: Some(z_dot),
        });
        tape.flush(false);
        (z, perturbed)
    })
}

/// Linear primitive hook (see [`super::dual::linear`]).
pub(crate) fn linear(layer: &nn::Linear, input: &Tensor, out: Dual) -> Dual {
    let op = || Op::Linear {
        ws: layer.ws.shallow_clone(),
        bs: layer.bs.as_ref().map(Tensor::shallow_clone),
    };
    affine(op, Some(input), out)
}

/// Convolution primitive hook (see [`super::dual::conv_padded`]), with the padding the
/// convolution used, so the local weight rule unfolds the input the same way.
pub(crate) fn conv(
    layer: &nn::Conv2D,
    stride: i64,
    padding: i64,
    input: &Tensor,
    out: Dual,
) -> Dual {
    let op = || Op::Conv {
        ws: layer.ws.shallow_clone(),
        bs: layer.bs.as_ref().map(Tensor::shallow_clone),
        stride,
        padding,
    };
    affine(op, Some(input), out)
}

/// LayerNorm primitive hook (see [`super::dual::layer_norm`]): a point at the normalised
/// output, whose rule recomputes x̂ from the kept input.
pub(crate) fn layer_norm(layer: &nn::LayerNorm, input: &Tensor, out: Dual) -> Dual {
    let op = || Op::LayerNorm {
        ws: layer.ws.as_ref().map(Tensor::shallow_clone),
        bs: layer.bs.as_ref().map(Tensor::shallow_clone),
    };
    affine(op, Some(input), out)
}

/// Token-embedding hook (a ViT's `[cls; tokens] + pos`): a point at the embedded tokens,
/// whose rule sums the activity over the batch (and takes its first token for `cls`).
pub(crate) fn embedding(cls: Option<&Tensor>, pos: &Tensor, out: Dual) -> Dual {
    let op = || Op::Embed {
        cls: cls.map(Tensor::shallow_clone),
        pos: pos.shallow_clone(),
    };
    affine(op, None, out)
}

/// BatchNorm primitive hook: `compute` is the plain tangent BatchNorm. When recording and the
/// input is the latest affine point's output, the BatchNorm reads that layer's unperturbed
/// tangent and takes over its point.
pub(crate) fn batch_norm(
    layer: &nn::BatchNorm,
    input: &Dual,
    compute: impl Fn(&Dual) -> Dual,
) -> Dual {
    let source = TAPE.with(|t| {
        let mut tape = t.borrow_mut();
        let tape = tape.as_mut()?;
        let local = tape.points.len().checked_sub(1)?;
        let index = tape.applied + local;
        let last = &mut tape.points[local];
        let affine = matches!(last.op, Op::Linear { .. } | Op::Conv { .. });
        if affine && last.out_ptrs == ptrs(input) {
            let clean = last.clean.take()?;
            last.u = None;
            last.perturbed = false;
            Some((index, clean))
        } else {
            None
        }
    });
    let recording = TAPE.with(|t| t.borrow().is_some());
    let (index, out) = match source {
        Some((index, clean)) => (Some(index), compute(&(input.0.shallow_clone(), clean))),
        None => (None, compute(input)),
    };
    if !recording {
        return out;
    }
    let op = || Op::Norm {
        ws: layer.ws.as_ref().map(Tensor::shallow_clone),
        bs: layer.bs.as_ref().map(Tensor::shallow_clone),
        source: index,
    };
    let input = index.is_none().then_some(&input.0);
    affine(op, input, out)
}

/// `∂L/∂z` of the mean (label-smoothed) cross-entropy L of logits `z` `[B, C]`, in closed form:
/// `(softmax(z) − target) / B` with target `(1 − ε)·onehot + ε/C`.
pub fn output_gradient(z: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    let (batch, classes) = (z.size()[0], z.size()[1]);
    let kind = z.kind();
    let target =
        labels.one_hot(classes).to_kind(kind) * (1.0 - smoothing) + smoothing / classes as f64;
    (z.softmax(-1, kind) - target) / batch as f64
}

/// The tangent of every sample's *own* loss `L_i` along the logits' tangent, `[B]`:
/// `L̇_i = Σ_c ∂L_i/∂z_ic · ż_ic` (B·∂L/∂z is sample i's own loss gradient).
pub fn sample_loss_tangents((z, z_dot): &Dual, labels: &Tensor, smoothing: f64) -> Tensor {
    let batch = z.size()[0] as f64;
    (output_gradient(z, labels, smoothing) * z_dot).sum_dim_intlist(1, false, z.kind()) * batch
}

/// Per-channel reduction dims of a BatchNorm input (`[B, C, H, W]` or `[B, C]`).
fn norm_dims(x: &Tensor) -> &'static [i64] {
    if x.dim() == 4 { &[0, 2, 3] } else { &[0] }
}

/// `[B]` reshaped to broadcast over a tensor of `dim` dimensions.
pub fn per_sample(scale: &Tensor, dim: usize) -> Tensor {
    let mut shape = vec![-1i64];
    shape.resize(dim, 1);
    scale.view(shape.as_slice())
}

impl Tape {
    /// Number of perturbation points that carry a direction.
    pub fn perturbed_points(&self) -> usize {
        self.points.iter().filter(|p| p.perturbed).count()
    }

    /// What a counting pass measured, for [`apply`]: the loss tangent of the mean cross-entropy
    /// (label smoothing `smoothing`) of `logits` against `labels`.
    pub fn summary(mut self, logits: &Dual, labels: &Tensor, smoothing: f64) -> PassSummary {
        let last = self.points.len().checked_sub(1);
        let (output_grad, scale, exact_last) = self.loss_tangent(logits, labels, smoothing);
        PassSummary {
            scale,
            output_grad,
            exact_last: last.filter(|_| exact_last),
        }
    }

    /// On an applying tape, runs the local rules of the points no later primitive can take
    /// over (all of them if `all`), then drops those points. The latest point stays (a
    /// BatchNorm may follow it), and so does the affine point a BatchNorm latest took over
    /// (its rule needs the BatchNorm's activity).
    fn flush(&mut self, all: bool) {
        let Mode::Apply(applying) = &mut self.mode else {
            return;
        };
        let keep = match self.points.last() {
            _ if all => 0,
            Some(Point {
                op: Op::Norm {
                    source: Some(_), ..
                },
                ..
            }) => 2,
            Some(_) => 1,
            None => 0,
        };
        let ready = self.points.len().saturating_sub(keep);
        if ready == 0 {
            return;
        }
        let points: Vec<Point> = self.points.drain(..ready).collect();
        let activity = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if applying.exact_last == Some(self.applied + i) {
                    Some(applying.output_grad.shallow_clone())
                } else {
                    let u = p.u.as_ref().filter(|_| p.perturbed)?;
                    Some(u * per_sample(&applying.scale, u.dim()))
                }
            })
            .collect();
        applying
            .grads
            .extend(rules_of(&points, activity, self.applied));
        self.applied += ready;
    }

    /// The per-sample loss tangent of this pass: `(∂L/∂z of the logits, L̇_i/B, whether the
    /// last point produced the logits)`. That point's own direction is left out of L̇ (it gets
    /// the exact output gradient instead) and it stops counting as perturbed.
    fn loss_tangent(
        &mut self,
        logits: &Dual,
        labels: &Tensor,
        smoothing: f64,
    ) -> (Tensor, Tensor, bool) {
        let (z, z_dot) = logits;
        let batch = z.size()[0];
        let kind = z.kind();
        let output_grad = output_gradient(z, labels, smoothing);
        let exact_last = self
            .points
            .last()
            .is_some_and(|p| p.perturbed && p.out_ptrs == ptrs(logits));
        let clean_dot = if exact_last {
            let last = self.points.last_mut().expect("a last point");
            last.u = None;
            last.perturbed = false;
            last.clean
                .take()
                .expect("the latest point keeps its tangent")
        } else {
            z_dot.shallow_clone()
        };
        // B·∂L/∂z is sample i's own loss gradient, so Σ_c of it times ż is L̇_i.
        let loss_dot = (&output_grad * &clean_dot).sum_dim_intlist(1, false, kind) * batch as f64;
        (output_grad, loss_dot / batch as f64, exact_last)
    }

    /// The parameter gradient estimates of this pass, `(parameter, estimate)` for every
    /// parameter a point reaches, for the mean cross-entropy (label smoothing `smoothing`) of
    /// `logits` against `labels`: [`Tape::activities`] followed by [`Tape::local_rules`].
    pub fn gradients(
        mut self,
        logits: &Dual,
        labels: &Tensor,
        smoothing: f64,
    ) -> Vec<(Tensor, Tensor)> {
        let activity = self.activities(logits, labels, smoothing);
        self.local_rules(activity)
    }

    /// The activity gradient estimate at every point's output (`None` where a BatchNorm took
    /// the point over), for the mean cross-entropy of `logits` against `labels` with label
    /// smoothing `smoothing`.
    ///
    /// `logits = (z, ż)` is the pass's output. If the last point produced z, its tangent
    /// perturbation is left out and it gets the exact output gradient; every other point gets
    /// `ĝ_i = L̇_i · u_i / B` with `L̇_i` the per-sample loss tangent.
    pub fn activities(
        &mut self,
        logits: &Dual,
        labels: &Tensor,
        smoothing: f64,
    ) -> Vec<Option<Tensor>> {
        let (output_grad, scale, exact_last) = self.loss_tangent(logits, labels, smoothing);
        let last_index = self.points.len().wrapping_sub(1);
        // Each direction is scaled in place: it is not needed afterwards, and this way the
        // estimate costs no memory beyond the direction's own.
        self.points
            .iter_mut()
            .enumerate()
            .map(|(i, p)| {
                if exact_last && i == last_index {
                    Some(output_grad.shallow_clone())
                } else {
                    p.u.take().map(|mut u| {
                        let _ = u.g_mul_(&per_sample(&scale, u.dim()));
                        u
                    })
                }
            })
            .collect()
    }

    /// Every point's layer-local rule applied to its activity gradient `activity` (one entry
    /// per point, as [`Tape::activities`] gives them; the rules are linear, so a sum of several
    /// passes' activities gives the sum of their parameter estimates).
    pub fn local_rules(self, activity: Vec<Option<Tensor>>) -> Vec<(Tensor, Tensor)> {
        rules_of(&self.points, activity, self.applied)
    }
}

/// The local rules of `points` (point `first` onwards) with their activities `activity`.
/// A BatchNorm's source must be among `points`.
fn rules_of(
    points: &[Point],
    mut activity: Vec<Option<Tensor>>,
    first: usize,
) -> Vec<(Tensor, Tensor)> {
    assert_eq!(activity.len(), points.len(), "one activity per point");
    let mut out = Vec::new();
    // Later points first, so a BatchNorm hands its input gradient to its source in time.
    for i in (0..points.len()).rev() {
        let Some(g) = activity[i].take() else {
            continue;
        };
        let kind = g.kind();
        let point = &points[i];
        let input = || {
            point
                .input
                .as_ref()
                .expect("local rules need a tape that keeps inputs")
        };
        match &point.op {
            Op::Linear { ws, bs } => {
                let (fan_out, fan_in) = (ws.size()[0], ws.size()[1]);
                let g2 = g.reshape([-1, fan_out]);
                let x2 = input().reshape([-1, fan_in]);
                out.push((ws.shallow_clone(), g2.tr().matmul(&x2)));
                if let Some(b) = bs {
                    out.push((b.shallow_clone(), g2.sum_dim_intlist(0, false, kind)));
                }
            }
            Op::Conv {
                ws,
                bs,
                stride,
                padding,
            } => {
                let size = ws.size();
                let (o, k_h, k_w) = (size[0], size[2], size[3]);
                let x = input();
                let b = g.size()[0];
                let g3 = g.reshape([b, o, -1]);
                // im2col makes k_h·k_w copies of the input: a few samples at a time keep
                // that below about 4M elements.
                let per_sample_cols = x.numel() as i64 / b.max(1) * k_h * k_w;
                let chunk = (4_000_000 / per_sample_cols.max(1)).clamp(1, b);
                let mut w_grad = ws.zeros_like().reshape([o, -1]);
                let mut start = 0;
                while start < b {
                    let n = chunk.min(b - start);
                    let cols = x.narrow(0, start, n).im2col(
                        [k_h, k_w],
                        [1, 1],
                        [*padding, *padding],
                        [*stride, *stride],
                    );
                    let part = g3.narrow(0, start, n).matmul(&cols.transpose(1, 2));
                    w_grad += part.sum_dim_intlist(0, false, kind);
                    start += n;
                }
                out.push((ws.shallow_clone(), w_grad.reshape(size.as_slice())));
                if let Some(bias) = bs {
                    let b_grad = g.sum_dim_intlist(&[0i64, 2, 3][..], false, kind);
                    out.push((bias.shallow_clone(), b_grad));
                }
            }
            Op::LayerNorm { ws, bs } => {
                let x = input();
                let last: &[i64] = &[-1];
                let centred = x - x.mean_dim(last, true, kind);
                let invstd = (centred.square().mean_dim(last, true, kind) + LN_EPS).rsqrt();
                let x_hat = centred * invstd;
                // Every dimension but the normalised one is summed over.
                let dims: Vec<i64> = (0..g.dim() as i64 - 1).collect();
                if let Some(gamma) = ws {
                    let g_gamma = (&g * &x_hat).sum_dim_intlist(dims.as_slice(), false, kind);
                    out.push((gamma.shallow_clone(), g_gamma));
                }
                if let Some(beta) = bs {
                    let g_beta = g.sum_dim_intlist(dims.as_slice(), false, kind);
                    out.push((beta.shallow_clone(), g_beta));
                }
            }
            Op::Embed { cls, pos } => {
                let summed = g.sum_dim_intlist(0, true, kind);
                if let Some(cls) = cls {
                    // A copy, not a view: callers sum estimates in place, and a view would
                    // alias the position embedding's estimate.
                    out.push((cls.shallow_clone(), summed.narrow(1, 0, 1).copy()));
                }
                out.push((pos.shallow_clone(), summed));
            }
            Op::Norm { ws, bs, source } => {
                // A BatchNorm that took over its source recomputes its input from the
                // source's (one layer forward) rather than keeping a second tensor.
                let recomputed = match source {
                    Some(source) => {
                        let from = &points[*source - first];
                        let x = from.input.as_ref().expect("the source keeps its input");
                        Some(match &from.op {
                            Op::Linear { ws, bs } => x.linear(ws, bs.as_ref()),
                            Op::Conv {
                                ws,
                                bs,
                                stride,
                                padding,
                            } => x.conv2d(
                                ws,
                                bs.as_ref(),
                                [*stride, *stride],
                                [*padding, *padding],
                                [1, 1],
                                1,
                            ),
                            _ => unreachable!("a source is linear or conv"),
                        })
                    }
                    None => None,
                };
                let x = recomputed.as_ref().unwrap_or_else(input);
                let dims = norm_dims(x);
                let centred = x - x.mean_dim(dims, true, kind);
                let invstd = (centred.square().mean_dim(dims, true, kind) + BN_EPS).rsqrt();
                let x_hat = centred * &invstd;
                if let Some(gamma) = ws {
                    let g_gamma = (&g * &x_hat).sum_dim_intlist(dims, false, kind);
                    out.push((gamma.shallow_clone(), g_gamma));
                }
                if let Some(beta) = bs {
                    out.push((beta.shallow_clone(), g.sum_dim_intlist(dims, false, kind)));
                }
                if let Some(source) = source {
                    let scale = match ws {
                        Some(gamma) => {
                            let shape: Vec<i64> =
                                (0..x.dim()).map(|d| if d == 1 { -1 } else { 1 }).collect();
                            gamma.view(shape.as_slice()) * &invstd
                        }
                        None => invstd,
                    };
                    let along = (&g * &x_hat).mean_dim(dims, true, kind);
                    let g_x = (&g - g.mean_dim(dims, true, kind) - x_hat * along) * scale;
                    activity[*source - first] = Some(g_x);
                }
            }
        }
    }
    out
}
