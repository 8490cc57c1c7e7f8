//! Classifier heads: the auxiliary (local) classifiers that give modules 1..K-1 their local
//! loss, and the network's own classifier, which serves the last module. A head first reads the
//! features into one vector per sample ([`Reader`]: maps are pooled, tokens pooled and
//! normalised, vectors taken as they are).
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::resnet::{batch_norm, conv};
use super::vit;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::ModuleT};

/// Which auxiliary head each non-final module gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// DGL/InfoPro-style: conv3x3 + BN + ReLU at the module's width, global average pool, linear.
    #[default]
    Conv,
    /// Pool + linear (a linear probe that is trained); on tokens: pool + LayerNorm + linear.
    Linear,
    /// Pool + linear(C, 128) + ReLU + linear (on tokens with a LayerNorm after the pool).
    Mlp,
    /// One Transformer block at the module's width, then pool + LayerNorm + linear (token
    /// features only: the stronger, InfoPro-style head for ViTs).
    Block,
    /// InfoPro's ImageNet auxiliary classifier (Wang et al. 2021, `Experiments on
    /// ImageNet/networks/resnet.py` of their code): conv1x1 to 128, conv3x3 stride 2 to 256,
    /// conv3x3 stride 2 to 512, conv1x1 to 2048 (each without bias, then BN + ReLU), global
    /// average pool, linear. The widths are theirs, fixed whatever the module's width (their
    /// head reads ResNet-101's 512-channel stage-2 maps at 28x28); feature maps only.
    Imagenet,
}

/// Hidden width of the `mlp` head.
const MLP_HIDDEN: i64 = 128;

/// The `imagenet` head's convolutions: (output width, kernel, stride), as InfoPro's.
const IMAGENET_LAYERS: [(i64, i64, i64); 4] = [(128, 1, 1), (256, 3, 2), (512, 3, 2), (2048, 1, 1)];

/// How a head reads features into one vector per sample.
#[derive(Debug)]
pub enum Reader {
    /// Vectors, read as they are.
    Vector,
    /// Feature maps, globally average-pooled.
    Map,
    /// Tokens: the class token (or the token mean), then LayerNorm.
    Tokens {
        /// The LayerNorm after pooling.
        norm: nn::LayerNorm,
        /// Read the class token (token 0) rather than the mean.
        cls: bool,
    },
}

impl Reader {
    /// The reader for `input` features (a LayerNorm under `p / "norm"` for tokens).
    pub fn new(p: &nn::Path, input: FeatureShape) -> Self {
        match input {
            FeatureShape::Vector { .. } => Reader::Vector,
            FeatureShape::Map { .. } => Reader::Map,
            FeatureShape::Tokens { d, cls, .. } => Reader::Tokens {
                norm: vit::layer_norm(p / "norm", d),
                cls,
            },
        }
    }

    /// `[B, ...] -> [B, C]`.
    fn read(&self, xs: &Tensor) -> Tensor {
        match self {
            Reader::Vector => xs.shallow_clone(),
            Reader::Map => dual::pool_maps(xs),
            Reader::Tokens { norm, cls } => dual::pool_tokens(xs, *cls).apply(norm),
        }
    }

    /// [`Reader::read`] of a value and its tangent.
    fn read_dual(&self, input: &Dual) -> Dual {
        match self {
            Reader::Vector => (input.0.shallow_clone(), input.1.shallow_clone()),
            Reader::Map => dual::pool(input),
            Reader::Tokens { norm, cls } => dual::layer_norm(norm, &dual::token_pool(input, *cls)),
        }
    }

    /// Elements per sample the reading keeps for backward (the pooled vector; for tokens also
    /// the normalised one).
    fn activation_elems(input: FeatureShape) -> i64 {
        match input {
            FeatureShape::Tokens { d, .. } => 2 * d,
            other => other.channels(),
        }
    }
}

/// A classifier on features (maps `[B, C, H, W]`, vectors `[B, N]` or tokens `[B, T, D]`)
/// giving logits `[B, classes]`.
// Built once per module, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Head {
    /// See [`HeadKind::Conv`].
    Conv {
        /// 3x3 conv at the input width.
        conv: nn::Conv2D,
        /// Its BatchNorm.
        bn: nn::BatchNorm,
        /// The final linear layer.
        fc: nn::Linear,
    },
    /// Read + linear; also the network's own classifier.
    Linear {
        /// How the features are pooled.
        read: Reader,
        /// The linear layer.
        fc: nn::Linear,
    },
    /// See [`HeadKind::Mlp`].
    Mlp {
        /// How the features are pooled.
        read: Reader,
        /// First linear layer.
        fc1: nn::Linear,
        /// Second linear layer.
        fc2: nn::Linear,
    },
    /// See [`HeadKind::Block`].
    Block {
        /// The Transformer block.
        block: vit::Block,
        /// Pool + LayerNorm.
        read: Reader,
        /// The linear layer.
        fc: nn::Linear,
    },
    /// See [`HeadKind::Imagenet`].
    Imagenet {
        /// Each convolution with its stride and BatchNorm ([`IMAGENET_LAYERS`]).
        layers: Vec<(nn::Conv2D, i64, nn::BatchNorm)>,
        /// The final linear layer.
        fc: nn::Linear,
    },
}

impl Head {
    /// Builds a head of `kind` under `p` for features of shape `input`; a conv head on
    /// vectors or tokens, and a block head on anything but tokens, are configuration errors.
    pub fn new(p: &nn::Path, kind: HeadKind, input: FeatureShape, classes: i64) -> Result<Self> {
        let c = input.channels();
        Ok(match (kind, input) {
            (HeadKind::Conv, FeatureShape::Map { .. }) => Head::Conv {
                conv: conv(p / "conv", c, c, 3, 1),
                bn: batch_norm(p / "bn", c),
                fc: nn::linear(p / "fc", c, classes, Default::default()),
            },
            (HeadKind::Conv, _) => {
                return Err(Error::Config(format!(
                    "--aux-head conv needs feature maps, but the modules output {input}; use --aux-head linear or mlp"
                )));
            }
            (HeadKind::Linear, _) => Head::Linear {
                read: Reader::new(p, input),
                fc: linear(p / "fc", c, classes, input),
            },
            (HeadKind::Mlp, _) => Head::Mlp {
                read: Reader::new(p, input),
                fc1: linear(p / "fc1", c, MLP_HIDDEN, input),
                fc2: linear(p / "fc2", MLP_HIDDEN, classes, input),
            },
            (HeadKind::Block, FeatureShape::Tokens { d, .. }) => Head::Block {
                block: vit::Block::new(&(p / "block"), d, block_heads(d)),
                read: Reader::new(p, input),
                fc: linear(p / "fc", c, classes, input),
            },
            (HeadKind::Block, _) => {
                return Err(Error::Config(format!(
                    "--aux-head block needs token features (a vit-* network), but the modules output {input}"
                )));
            }
            (HeadKind::Imagenet, FeatureShape::Map { .. }) => {
                let mut c_in = c;
                let mut layers = Vec::with_capacity(IMAGENET_LAYERS.len());
                for (i, (c_out, k, stride)) in IMAGENET_LAYERS.into_iter().enumerate() {
                    layers.push((
                        conv(p / format!("conv{i}"), c_in, c_out, k, stride),
                        stride,
                        batch_norm(p / format!("bn{i}"), c_out),
                    ));
                    c_in = c_out;
                }
                Head::Imagenet {
                    layers,
                    fc: nn::linear(p / "fc", c_in, classes, Default::default()),
                }
            }
            (HeadKind::Imagenet, _) => {
                return Err(Error::Config(format!(
                    "--aux-head imagenet needs feature maps, but the modules output {input}; use --aux-head linear or mlp"
                )));
            }
        })
    }

    /// The network's own classifier: read + `fc`, named `fc` at the root as in torchvision
    /// (and `norm` for the LayerNorm of token features).
    pub fn classifier(root: &nn::Path, features: FeatureShape, classes: i64) -> Self {
        Head::Linear {
            read: Reader::new(root, features),
            fc: linear(root / "fc", features.channels(), classes, features),
        }
    }

    /// Variable-name prefixes of the network's own classifier on `features`.
    pub fn classifier_prefixes(features: FeatureShape) -> Vec<String> {
        match features {
            FeatureShape::Tokens { .. } => vec!["fc.".into(), "norm.".into()],
            _ => vec!["fc.".into()],
        }
    }

    /// Elements per sample of the tensors this head keeps alive for backward.
    pub fn activation_elems(kind: HeadKind, input: FeatureShape) -> i64 {
        let c = input.channels();
        let read = Reader::activation_elems(input);
        match (kind, input) {
            (HeadKind::Conv, _) => 3 * input.elems() + c,
            (HeadKind::Linear, _) => read,
            (HeadKind::Mlp, _) => read + 2 * MLP_HIDDEN,
            (HeadKind::Block, FeatureShape::Tokens { t, d, .. }) => {
                vit::Block::activation_elems(t, d, block_heads(d)) + read
            }
            (HeadKind::Block, _) => 0,
            (HeadKind::Imagenet, FeatureShape::Map { h, w, .. }) => {
                // Each layer keeps its conv output, BN output and ReLU output; the pool keeps
                // the last width. A 3x3 stride-2 convolution with padding 1 halves, rounding up.
                let (mut h, mut w, mut elems) = (h, w, 0);
                for (c_out, _, stride) in IMAGENET_LAYERS {
                    h = (h + stride - 1) / stride;
                    w = (w + stride - 1) / stride;
                    elems += 3 * c_out * h * w;
                }
                elems + IMAGENET_LAYERS[IMAGENET_LAYERS.len() - 1].0
            }
            (HeadKind::Imagenet, _) => 0,
        }
    }
}

/// A head's linear layer: PyTorch's default initialisation, or timm's ViT one (truncated
/// normal 0.02, zero bias) on token features, so a ViT's heads start as its classifier does.
fn linear(p: nn::Path, fan_in: i64, fan_out: i64, input: FeatureShape) -> nn::Linear {
    match input {
        FeatureShape::Tokens { .. } => vit::linear(p, fan_in, fan_out),
        _ => nn::linear(p, fan_in, fan_out, Default::default()),
    }
}

/// Heads of a `block` head of width `d`: width 64 per head, as ViT-B, at least one.
fn block_heads(d: i64) -> i64 {
    let heads = (d / 64).max(1);
    if d % heads == 0 { heads } else { 1 }
}

impl ModuleT for Head {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Head::Conv { conv, bn, fc } => {
                dual::pool_maps(&xs.apply(conv).apply_t(bn, train).relu()).apply(fc)
            }
            Head::Linear { read, fc } => read.read(xs).apply(fc),
            Head::Mlp { read, fc1, fc2 } => read.read(xs).apply(fc1).relu().apply(fc2),
            Head::Block { block, read, fc } => read.read(&block.forward_t(xs, train)).apply(fc),
            Head::Imagenet { layers, fc } => {
                let mut h = xs.shallow_clone();
                for (conv, _, bn) in layers {
                    h = h.apply(conv).apply_t(bn, train).relu();
                }
                dual::pool_maps(&h).apply(fc)
            }
        }
    }
}

impl ForwardDual for Head {
    fn forward_dual(&self, input: &Dual) -> Dual {
        match self {
            Head::Conv { conv, bn, fc } => {
                let mut h = dual::conv(conv, 1, input);
                h = dual::batch_norm(bn, &h);
                h = dual::relu(&h);
                h = dual::pool(&h);
                dual::linear(fc, &h)
            }
            Head::Linear { read, fc } => dual::linear(fc, &read.read_dual(input)),
            Head::Mlp { read, fc1, fc2 } => {
                let mut h = dual::linear(fc1, &read.read_dual(input));
                h = dual::relu(&h);
                dual::linear(fc2, &h)
            }
            Head::Block { block, read, fc } => {
                dual::linear(fc, &read.read_dual(&block.forward_dual(input)))
            }
            Head::Imagenet { layers, fc } => {
                let mut h = (input.0.shallow_clone(), input.1.shallow_clone());
                for (conv, stride, bn) in layers {
                    h = dual::conv(conv, *stride, &h);
                    h = dual::batch_norm(bn, &h);
                    h = dual::relu(&h);
                }
                h = dual::pool(&h);
                dual::linear(fc, &h)
            }
        }
    }
}
