//! Vision Transformers `vit-*` (ViT/DeiT, pre-norm), cut into modules at block boundaries.
//!
//! Unit 0 is the patch embedding (a convolution with kernel = stride = patch size, then the
//! class token and the learnable position embedding); units 1..=depth are the blocks:
//!
//! ```text
//! x = x + proj(attention(LN₁(x)))      attention = softmax(q·kᵀ/√d_h)·v, per head
//! x = x + fc₂(GELU(fc₁(LN₂(x))))       MLP ratio 4
//! ```
//!
//! The network's classifier (the last module's head) pools the tokens (class token, or the mean
//! with `--token-pool mean`), then LayerNorm and a linear layer: pooling before the norm equals
//! timm's "norm, then take the class token", and is timm's `fc_norm` for mean pooling.
//!
//! Attention is written out (matmul, softmax, matmul) rather than fused: SGR's exact penalty
//! gradient differentiates the backward pass itself, and libtorch's fused attention kernels have
//! no double backward.
//!
//! Initialisation is timm's `init_weights_vit_timm` as DeiT uses it: every linear weight drawn
//! from a normal of std 0.02 truncated to [-2, 2] (PyTorch's `trunc_normal_` algorithm), biases
//! 0, LayerNorm 1 and 0, position embedding and class token truncated normal 0.02 (DeiT's
//! choice for the class token; timm draws it at std 1e-6). The patch-embedding convolution
//! keeps PyTorch's default, U(±1/√fan_in) for weight and bias. The heads' linear layers on
//! tokens (classifier and auxiliary) are initialised like the blocks' (timm's head init).
//!
//! Variables: `patch_embed.{proj.*, cls_token, pos_embed}`, `blocks.{i}.{norm1, attn.qkv,
//! attn.proj, norm2, mlp.fc1, mlp.fc2}.*` (timm's names), classifier `norm.*` and `fc.*`.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual, LN_EPS};
use super::network::{Built, Family, NetOptions, Network, Parsed, TokenPool, UnitSpec};
use super::splits::TableEntry;
use crate::{Error, Result};
use std::sync::Arc;
use tch::{Tensor, nn, nn::ModuleT};

/// Hidden width of the MLP relative to the token width.
const MLP_RATIO: i64 = 4;

/// Standard deviation of timm's truncated-normal initialisation.
const INIT_STD: f64 = 0.02;

/// The named sizes: (name, depth, width, heads). `micro` is for CPUs and tests; `tiny` is
/// DeiT-Ti, `small` DeiT-S.
const SIZES: &[(&str, usize, i64, i64)] = &[
    ("micro", 6, 128, 4),
    ("tiny", 12, 192, 3),
    ("small", 12, 384, 6),
];

/// A Vision Transformer of `depth` blocks, token width `dim` and `heads` attention heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vit {
    /// Blocks (units after the patch embedding).
    pub depth: usize,
    /// Token width.
    pub dim: i64,
    /// Attention heads (divides `dim`).
    pub heads: i64,
}

/// Registry entry.
pub const FAMILY: Family = Family {
    syntax: "vit-micro, vit-tiny, vit-small, or vit-DxWhH (D blocks of width W with H heads, e.g. vit-2x16h2)",
    parse: parse_name,
};

fn parse_name(name: &str) -> Parsed {
    let rest = name.strip_prefix("vit")?;
    let rest = rest.strip_prefix('-').unwrap_or("");
    if let Some(&(_, depth, dim, heads)) = SIZES.iter().find(|s| s.0 == rest) {
        return Some(Ok(Arc::new(Vit { depth, dim, heads })));
    }
    let parsed = rest.split_once('x').and_then(|(d, wh)| {
        let (w, h) = wh.split_once('h')?;
        Some((
            d.parse::<usize>().ok()?,
            w.parse::<i64>().ok()?,
            h.parse::<i64>().ok()?,
        ))
    });
    Some(match parsed {
        Some((depth, dim, heads)) if depth >= 1 && heads >= 1 && dim >= 1 && dim % heads == 0 => {
            Ok(Arc::new(Vit { depth, dim, heads }) as Arc<dyn Network>)
        }
        _ => Err(format!(
            "malformed network '{name}': write vit-micro, vit-tiny, vit-small, or vit-DxWhH with D >= 1 blocks of width W divisible by H heads, e.g. vit-2x16h2"
        )),
    })
}

/// The patch size for `h x w` inputs: `requested`, or the smallest of 4, 8, 16 that divides
/// both sides and gives at most 196 patches (4 for 28 and 32 px, 8 for 64 and 96, 16 for 224).
pub fn patch_size(requested: Option<i64>, h: i64, w: i64) -> Result<i64> {
    match requested {
        Some(p) if p >= 1 && h % p == 0 && w % p == 0 => Ok(p),
        Some(p) => Err(Error::Config(format!(
            "--patch-size {p} does not divide the {h}x{w} input; choose a divisor of both sides"
        ))),
        None => [4, 8, 16]
            .into_iter()
            .find(|&p| h % p == 0 && w % p == 0 && (h / p) * (w / p) <= 196)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no default patch size fits the {h}x{w} input; pass --patch-size (a divisor of both sides)"
                ))
            }),
    }
}

/// Fills `t` from a normal(0, `std`) truncated to [-2, 2], PyTorch's `trunc_normal_` algorithm
/// (inverse CDF of a uniform draw), with libtorch's generator.
fn trunc_normal_(t: &Tensor, std: f64) {
    let cdf = |x: f64| 0.5 * (1.0 + host_erf(x / std::f64::consts::SQRT_2));
    let (lo, hi) = (cdf(-2.0 / std), cdf(2.0 / std));
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        let _ = t.uniform_(2.0 * lo - 1.0, 2.0 * hi - 1.0);
        let _ = t.erfinv_();
        let _ = t.g_mul_scalar_(std * std::f64::consts::SQRT_2);
        let _ = t.clamp_(-2.0, 2.0);
    });
}

/// erf on the host (for the truncation bounds only), through libtorch to avoid a dependency.
fn host_erf(x: f64) -> f64 {
    Tensor::from(x).erf().double_value(&[])
}

/// A linear layer initialised as timm's ViT does (truncated normal 0.02, zero bias).
pub(crate) fn linear(p: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    let layer = nn::linear(p, fan_in, fan_out, config);
    trunc_normal_(&layer.ws, INIT_STD);
    layer
}

/// LayerNorm over the token width (ε as the tangent layer uses it).
pub(crate) fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        eps: LN_EPS,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], config)
}

/// Unit 0: patches -> tokens, class token, position embedding.
#[derive(Debug)]
struct PatchEmbed {
    proj: nn::Conv2D,
    patch: i64,
    cls_token: Option<Tensor>,
    pos_embed: Tensor,
}

impl PatchEmbed {
    /// `[B, D, H/p, W/p] -> [B, N, D]`.
    fn tokens(maps: &Tensor) -> Tensor {
        maps.flatten(2, -1).transpose(1, 2)
    }
}

impl ModuleT for PatchEmbed {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let mut h = Self::tokens(&xs.apply(&self.proj));
        if let Some(cls) = &self.cls_token {
            h = Tensor::cat(&[cls.expand([h.size()[0], -1, -1], false), h], 1);
        }
        h + &self.pos_embed
    }
}

impl ForwardDual for PatchEmbed {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let (maps, maps_dot) = dual::conv_padded(&self.proj, self.patch, 0, input);
        let (mut h, mut h_dot) = (Self::tokens(&maps), Self::tokens(&maps_dot));
        if let Some(cls) = &self.cls_token {
            // The class token and the position embedding do not depend on the input.
            let (b, _, d) = h.size3().expect("tokens [B, N, D]");
            h = Tensor::cat(&[cls.expand([b, -1, -1], false), h], 1);
            let still = Tensor::zeros([b, 1, d], (h_dot.kind(), h_dot.device()));
            h_dot = Tensor::cat(&[still, h_dot], 1);
        }
        let out = (h + &self.pos_embed, h_dot);
        super::perturb::embedding(self.cls_token.as_ref(), &self.pos_embed, out)
    }
}

/// A pre-norm Transformer block (also the `--aux-head block` head).
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    /// A block of width `dim` with `heads` heads under `p` (timm's variable names).
    pub fn new(p: &nn::Path, dim: i64, heads: i64) -> Self {
        let attn = p / "attn";
        let mlp = p / "mlp";
        Block {
            norm1: layer_norm(p / "norm1", dim),
            qkv: linear(&attn / "qkv", dim, 3 * dim),
            proj: linear(&attn / "proj", dim, dim),
            norm2: layer_norm(p / "norm2", dim),
            fc1: linear(&mlp / "fc1", dim, MLP_RATIO * dim),
            fc2: linear(&mlp / "fc2", MLP_RATIO * dim, dim),
            heads,
        }
    }

    /// Elements per sample a training forward keeps for backward with `t` tokens of width `d`
    /// and `heads` heads: about 16 token-sized tensors (norms, q/k/v, attention output, MLP
    /// hidden ×2 at 4d) plus the attention scores and probabilities.
    pub fn activation_elems(t: i64, d: i64, heads: i64) -> i64 {
        16 * t * d + 2 * heads * t * t
    }

    /// `[B, T, 3D] -> three [B, H, T, D/H]` (q, k, v).
    fn split_heads(&self, qkv: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t, d3) = qkv.size3().expect("tokens [B, T, 3D]");
        let per = qkv
            .view([b, t, 3, self.heads, d3 / (3 * self.heads)])
            .permute([2, 0, 3, 1, 4]);
        (per.get(0), per.get(1), per.get(2))
    }

    /// `[B, H, T, D/H] -> [B, T, D]`.
    fn merge_heads(o: &Tensor) -> Tensor {
        let (b, h, t, dh) = o.size4().expect("heads [B, H, T, D/H]");
        o.transpose(1, 2).reshape([b, t, h * dh])
    }

    fn attention(&self, x: &Tensor) -> Tensor {
        let (q, k, v) = self.split_heads(&x.apply(&self.qkv));
        let scale = (q.size()[3] as f64).powf(-0.5);
        let probs = (q * scale)
            .matmul(&k.transpose(-2, -1))
            .softmax(-1, x.kind());
        Self::merge_heads(&probs.matmul(&v)).apply(&self.proj)
    }

    fn attention_dual(&self, x: &Dual) -> Dual {
        let (qkv, qkv_dot) = dual::linear(&self.qkv, x);
        let (q, k, v) = self.split_heads(&qkv);
        let (q_dot, k_dot, v_dot) = self.split_heads(&qkv_dot);
        let scale = (q.size()[3] as f64).powf(-0.5);
        let kt = (k.transpose(-2, -1), k_dot.transpose(-2, -1));
        let scores = dual::matmul(&(q * scale, q_dot * scale), &kt);
        let probs = dual::softmax(&scores, -1);
        let (o, o_dot) = dual::matmul(&probs, &(v, v_dot));
        dual::linear(
            &self.proj,
            &(Self::merge_heads(&o), Self::merge_heads(&o_dot)),
        )
    }
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let h = xs + self.attention(&xs.apply(&self.norm1));
        let hidden = h.apply(&self.norm2).apply(&self.fc1).gelu("none");
        &h + hidden.apply(&self.fc2)
    }
}

impl ForwardDual for Block {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = self.attention_dual(&dual::layer_norm(&self.norm1, input));
        h = dual::add(input, &h);
        let mut m = dual::layer_norm(&self.norm2, &h);
        m = dual::linear(&self.fc1, &m);
        m = dual::gelu(&m);
        m = dual::linear(&self.fc2, &m);
        dual::add(&h, &m)
    }
}

impl Network for Vit {
    fn name(&self) -> String {
        match SIZES
            .iter()
            .find(|s| (s.1, s.2, s.3) == (self.depth, self.dim, self.heads))
        {
            Some(s) => format!("vit-{}", s.0),
            None => format!("vit-{}x{}h{}", self.depth, self.dim, self.heads),
        }
    }

    fn num_units(&self) -> usize {
        1 + self.depth
    }

    fn describe_units(&self) -> String {
        format!("patch embedding + {} Transformer blocks", self.depth)
    }

    fn outputs_maps(&self) -> bool {
        false
    }

    fn outputs_tokens(&self) -> bool {
        true
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec![
            "patch_embed.cls_token".into(),
            "patch_embed.pos_embed".into(),
        ]
    }

    /// K dividing the depth gets equal blocks per module (the patch embedding rides with the
    /// first); other K up to the depth are balanced by unit count.
    fn split_table(&self) -> Vec<(usize, TableEntry)> {
        (1..=self.depth)
            .map(|k| {
                let entry = if self.depth.is_multiple_of(k) {
                    TableEntry::Ends((1..k).map(|i| 1 + i * self.depth / k).collect())
                } else {
                    TableEntry::Even
                };
                (k, entry)
            })
            .collect()
    }

    fn build(&self, root: &nn::Path, input: FeatureShape, options: &NetOptions) -> Result<Built> {
        let FeatureShape::Map { c, h, w } = input else {
            return Err(Error::Config(format!(
                "--model {}: needs image inputs, got {input}",
                self.name()
            )));
        };
        let patch = patch_size(options.patch_size, h, w)?;
        let cls = options.token_pool == TokenPool::Cls;
        let t = (h / patch) * (w / patch) + i64::from(cls);
        let d = self.dim;
        let out = FeatureShape::Tokens { t, d, cls };
        let p = root / "patch_embed";
        let bound = 1.0 / ((c * patch * patch) as f64).sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let conv = nn::ConvConfig {
            stride: patch,
            ws_init: uniform,
            bs_init: uniform,
            ..Default::default()
        };
        let embed = PatchEmbed {
            proj: nn::conv2d(&p / "proj", c, d, patch, conv),
            patch,
            cls_token: cls.then(|| {
                let t = p.var("cls_token", &[1, 1, d], nn::Init::Const(0.0));
                trunc_normal_(&t, INIT_STD);
                t
            }),
            pos_embed: {
                let t = p.var("pos_embed", &[1, t, d], nn::Init::Const(0.0));
                trunc_normal_(&t, INIT_STD);
                t
            },
        };
        let mut units = vec![UnitSpec {
            layer: Box::new(embed),
            out,
            // The convolution's output (its input is the module's input), the tokens, the sum.
            activation_elems: 3 * t * d,
            prefixes: vec!["patch_embed.".into()],
        }];
        for i in 0..self.depth {
            units.push(UnitSpec {
                layer: Box::new(Block::new(&(root / "blocks" / i), d, self.heads)),
                out,
                activation_elems: Block::activation_elems(t, d, self.heads),
                prefixes: vec![format!("blocks.{i}.")],
            });
        }
        Ok(Built {
            units,
            features: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn names_and_patch_sizes() {
        for (name, canonical) in [
            ("vit-micro", "vit-micro"),
            ("vit-tiny", "vit-tiny"),
            ("vit-6x128h4", "vit-micro"),
            ("vit-2x16h2", "vit-2x16h2"),
        ] {
            let arch: super::super::Arch = name.parse().unwrap();
            assert_eq!(arch.to_string(), canonical);
        }
        for bad in ["vit", "vit-huge", "vit-2x15h2", "vit-0x16h2", "vit-2x16"] {
            let e = bad.parse::<super::super::Arch>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(patch_size(None, 28, 28).unwrap(), 4);
        assert_eq!(patch_size(None, 32, 32).unwrap(), 4);
        assert_eq!(patch_size(None, 96, 96).unwrap(), 8);
        assert_eq!(patch_size(None, 224, 224).unwrap(), 16);
        assert_eq!(patch_size(Some(7), 28, 28).unwrap(), 7);
        let e = patch_size(Some(5), 28, 28).unwrap_err().to_string();
        assert!(e.contains("--patch-size 5") && e.contains("28x28"), "{e}");
    }

    #[test]
    fn truncated_normal_has_the_requested_spread_and_bounds() {
        let t = Tensor::zeros([100_000], (Kind::Float, tch::Device::Cpu));
        tch::manual_seed(3);
        trunc_normal_(&t, 0.02);
        let std = t.std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.0005, "std {std}");
        let wide = Tensor::zeros([100_000], (Kind::Float, tch::Device::Cpu));
        trunc_normal_(&wide, 3.0);
        assert!(wide.abs().max().double_value(&[]) <= 2.0);
    }
}
