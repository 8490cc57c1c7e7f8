//! Forward-mode tangents: every layer as `(x, ẋ) -> (f(x), J_f(x)·ẋ)`.
//!
//! The tangent ẋ is carried next to the value through the same layers, with ordinary
//! differentiable tensor ops, so reverse mode can then differentiate the tangent itself w.r.t.
//! the parameters ("reverse over forward"). `sgr --sgr-grad jvp` uses this to get the SGR
//! penalty's exact parameter gradient without a `create_graph` backward (see `rules::sgr`).
//!
//! The layers here reproduce the training forward (BatchNorm on batch statistics) but never
//! update running statistics: the rule calls them only after the real forward of the step.
//! The parameterised primitives (linear, conv, BatchNorm) pass their result through
//! [`super::perturb`]'s hooks, which do nothing unless rule `fg` is recording a tape.
//!
//! Each function saves as few activation-sized tensors for reverse mode as its ops allow
//! (what a layer saves is what the penalty's memory is made of).
use tch::{Tensor, nn};

/// A value and its tangent.
///
/// Layers are chained by reassigning one `Dual` (`h = relu(&h)`), not by shadowing: a shadowed
/// binding lives to the end of the scope, and a unit's intermediates that reverse mode does not
/// keep would then all be alive at once (measured: +48 MiB for one stage-1 block at batch 128).
pub type Dual = (Tensor, Tensor);

/// BatchNorm's ε. [`super::resnet::batch_norm`] builds every BN layer with it, so the tangent
/// layers normalise exactly as the layers do.
pub const BN_EPS: f64 = 1e-5;

/// A layer that can push a tangent through itself.
pub trait ForwardDual {
    /// `(f(x), J_f(x)·ẋ)` for `input = (x, ẋ)`, with batch statistics (training mode),
    /// running statistics untouched. Differentiable in x, ẋ and the parameters.
    fn forward_dual(&self, input: &Dual) -> Dual;
}

/// Convolution with padding k/2 (stride given: `nn::Conv2D` keeps its own private). Linear,
/// so the tangent is the same convolution of ẋ, without the bias.
pub fn conv(layer: &nn::Conv2D, stride: i64, input: &Dual) -> Dual {
    conv_padded(layer, stride, layer.ws.size()[2] / 2, input)
}

/// [`conv`] with an explicit padding (a ViT's patch embedding: kernel = stride, no padding).
pub fn conv_padded(layer: &nn::Conv2D, stride: i64, padding: i64, (x, x_dot): &Dual) -> Dual {
    let apply = |t: &Tensor, bias: Option<&Tensor>| {
        t.conv2d(
            &layer.ws,
            bias,
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        )
    };
    let out = (apply(x, layer.bs.as_ref()), apply(x_dot, None));
    super::perturb::conv(layer, stride, padding, x, out)
}

/// Training-mode BatchNorm over `[B, C, H, W]` (per channel over B, H, W) or `[B, C]` (per
/// feature over B):
///
/// ```text
/// y = γ·x̂ + β,   x̂ = (x − μ)·s,   s = (var + ε)^-1/2
/// ẏ = γ·s·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))
/// ```
///
/// The tangent includes the batch statistics' own dependence on x (the mean and x̂ terms).
/// Reverse mode keeps three activation-sized tensors here (x − μ, x̂, ẋ).
pub fn batch_norm(layer: &nn::BatchNorm, input: &Dual) -> Dual {
    super::perturb::batch_norm(layer, input, |input| batch_norm_plain(layer, input))
}

/// [`batch_norm`] without the perturbation hook.
fn batch_norm_plain(layer: &nn::BatchNorm, (x, x_dot): &Dual) -> Dual {
    let maps = x.dim() == 4;
    let dims: &[i64] = if maps { &[0, 2, 3] } else { &[0] };
    let kind = x.kind();
    let channel = |t: &Option<Tensor>| {
        t.as_ref().map(|t| {
            if maps {
                t.view([1, -1, 1, 1])
            } else {
                t.view([1, -1])
            }
        })
    };
    let (gamma, beta) = (channel(&layer.ws), channel(&layer.bs));
    let centred = x - x.mean_dim(dims, true, kind);
    let invstd = (centred.square().mean_dim(dims, true, kind) + BN_EPS).rsqrt();
    let x_hat = &centred * &invstd;
    drop(centred);
    let scale = match &gamma {
        Some(g) => g * &invstd,
        None => invstd,
    };
    let mean_dot = x_dot.mean_dim(dims, true, kind);
    let along_x_hat = (&x_hat * x_dot).mean_dim(dims, true, kind);
    let tangent = x_dot * &scale - &scale * mean_dot - &x_hat * (&scale * along_x_hat);
    let value = match (gamma, beta) {
        (Some(g), Some(b)) => &x_hat * g + b,
        (Some(g), None) => &x_hat * g,
        (None, Some(b)) => &x_hat + b,
        (None, None) => x_hat,
    };
    (value, tangent)
}

/// ReLU: the tangent passes where the output is positive. `threshold_backward` reads the
/// output ReLU keeps for its own backward anyway, so the tangent saves nothing more.
pub fn relu((x, x_dot): &Dual) -> Dual {
    let value = x.relu();
    let tangent = value.threshold_backward(x_dot, 0.0);
    (value, tangent)
}

/// Linear layer: `x·Wᵀ + b`, tangent `ẋ·Wᵀ`.
pub fn linear(layer: &nn::Linear, (x, x_dot): &Dual) -> Dual {
    let out = (
        x.linear(&layer.ws, layer.bs.as_ref()),
        x_dot.linear(&layer.ws, None::<Tensor>),
    );
    super::perturb::linear(layer, x, out)
}

/// Global average pool `[B, C, H, W] -> [B, C]` of one tensor (what the heads do to maps).
pub fn pool_maps(t: &Tensor) -> Tensor {
    t.mean_dim(&[2i64, 3][..], false, t.kind())
}

/// Global average pool `[B, C, H, W] -> [B, C]` of both.
pub fn pool((x, x_dot): &Dual) -> Dual {
    (pool_maps(x), pool_maps(x_dot))
}

/// Mean cross-entropy with label smoothing ε and its tangent:
/// `L̇ = mean_i Σ_c (p_ic − q_ic)·ż_ic`, p = softmax(z), q = (1 − ε)·onehot(y) + ε/C.
pub fn cross_entropy((logits, logits_dot): &Dual, labels: &Tensor, smoothing: f64) -> Dual {
    let kind = logits.kind();
    let log_probs = logits.log_softmax(-1, kind);
    let loss = crate::rules::smoothed_nll(&log_probs, labels, smoothing);
    let batch = logits.size()[0] as f64;
    // nll_loss(ż) = −mean_i ż_{i, y_i}; the uniform part is −ε·mean_i mean_c ż_ic.
    let mut tangent = (log_probs.exp() * logits_dot).sum(kind) / batch
        + logits_dot.nll_loss(labels) * (1.0 - smoothing);
    // Out of place throughout: `-=` on a Tensor is an in-place op, which would corrupt a value
    // autograd saved (these tangents are differentiated again by reverse mode).
    if smoothing != 0.0 {
        tangent = tangent.g_sub(&(logits_dot.mean(kind) * smoothing));
    }
    (loss, tangent)
}

/// LayerNorm's ε in the Transformers (timm's and DeiT's ViTs use 1e-6).
pub const LN_EPS: f64 = 1e-6;

/// LayerNorm over the last dimension, as [`batch_norm`] but per token:
///
/// ```text
/// y = γ·x̂ + β,   x̂ = (x − μ)·s,   s = (var + ε)^-1/2   (μ, var over the last dimension)
/// ẏ = γ·s·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))
/// ```
pub fn layer_norm(layer: &nn::LayerNorm, (x, x_dot): &Dual) -> Dual {
    let kind = x.kind();
    let last: &[i64] = &[-1];
    let centred = x - x.mean_dim(last, true, kind);
    let invstd = (centred.square().mean_dim(last, true, kind) + LN_EPS).rsqrt();
    let x_hat = &centred * &invstd;
    drop(centred);
    let mean_dot = x_dot.mean_dim(last, true, kind);
    let along_x_hat = (&x_hat * x_dot).mean_dim(last, true, kind);
    let tangent = (x_dot - mean_dot - &x_hat * along_x_hat) * invstd;
    // Out of place (`*=` on a Tensor is in place and would overwrite x̂, which reverse mode
    // saved for the tangent's own gradient).
    let (value, tangent) = match &layer.ws {
        Some(g) => (&x_hat * g, tangent * g),
        None => (x_hat, tangent),
    };
    let value = match &layer.bs {
        Some(b) => value + b,
        None => value,
    };
    super::perturb::layer_norm(layer, x, (value, tangent))
}

/// GELU (exact, erf form): `ẏ = ẋ·(Φ(x) + x·φ(x))`, which is what `gelu_backward` computes
/// for a gradient ẋ (the Jacobian is diagonal), and it is itself differentiable.
pub fn gelu((x, x_dot): &Dual) -> Dual {
    (x.gelu("none"), x.gelu_backward(x_dot, "none"))
}

/// Batched matrix product: `(AB)˙ = ȦB + AḂ`.
pub fn matmul((a, a_dot): &Dual, (b, b_dot): &Dual) -> Dual {
    (a.matmul(b), a_dot.matmul(b) + a.matmul(b_dot))
}

/// Softmax over `dim`: `ṗ = p ⊙ (ṡ − Σ_dim p ⊙ ṡ)`.
pub fn softmax((s, s_dot): &Dual, dim: i64) -> Dual {
    let p = s.softmax(dim, s.kind());
    let along = (&p * s_dot).sum_dim_intlist(&[dim][..], true, s.kind());
    let tangent = &p * (s_dot - along);
    (p, tangent)
}

/// Sum of two duals (a residual connection).
pub fn add((a, a_dot): &Dual, (b, b_dot): &Dual) -> Dual {
    (a + b, a_dot + b_dot)
}

/// Token pooling `[B, T, D] -> [B, D]` of one tensor: token 0 (`cls`) or the mean over tokens.
pub fn pool_tokens(t: &Tensor, cls: bool) -> Tensor {
    if cls {
        t.select(1, 0)
    } else {
        t.mean_dim(&[1i64][..], false, t.kind())
    }
}

/// [`pool_tokens`] of a value and its tangent (linear, so the tangent is pooled alike).
pub fn token_pool((x, x_dot): &Dual, cls: bool) -> Dual {
    (pool_tokens(x, cls), pool_tokens(x_dot, cls))
}
