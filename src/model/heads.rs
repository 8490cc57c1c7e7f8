//! Classifier heads: the auxiliary (local) classifiers that give modules 1..K-1 their local
//! loss, and the network's own classifier, which serves the last module.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::resnet::{batch_norm, conv};
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
    /// Global average pool + linear (a linear probe that is trained).
    Linear,
    /// Global average pool + linear(C, 128) + ReLU + linear.
    Mlp,
}

/// Hidden width of the `mlp` head.
const MLP_HIDDEN: i64 = 128;

/// A classifier on features (maps `[B, C, H, W]` or vectors `[B, N]`) giving logits
/// `[B, classes]`. Maps are pooled globally first; vectors are read as they are.
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
    /// Pool (maps only) + linear; also the network's own classifier.
    Linear {
        /// The linear layer.
        fc: nn::Linear,
        /// Whether the input is a feature map to pool.
        pool: bool,
    },
    /// See [`HeadKind::Mlp`].
    Mlp {
        /// First linear layer.
        fc1: nn::Linear,
        /// Second linear layer.
        fc2: nn::Linear,
        /// Whether the input is a feature map to pool.
        pool: bool,
    },
}

impl Head {
    /// Builds a head of `kind` under `p` for features of shape `input`; a conv head on
    /// vectors is a configuration error.
    pub fn new(p: &nn::Path, kind: HeadKind, input: FeatureShape, classes: i64) -> Result<Self> {
        let c = input.channels();
        let pool = matches!(input, FeatureShape::Map { .. });
        Ok(match kind {
            HeadKind::Conv if !pool => {
                return Err(Error::Config(format!(
                    "--aux-head conv needs feature maps, but the modules output {input}; use --aux-head linear or mlp"
                )));
            }
            HeadKind::Conv => Head::Conv {
                conv: conv(p / "conv", c, c, 3, 1),
                bn: batch_norm(p / "bn", c),
                fc: nn::linear(p / "fc", c, classes, Default::default()),
            },
            HeadKind::Linear => Head::Linear {
                fc: nn::linear(p / "fc", c, classes, Default::default()),
                pool,
            },
            HeadKind::Mlp => Head::Mlp {
                fc1: nn::linear(p / "fc1", c, MLP_HIDDEN, Default::default()),
                fc2: nn::linear(p / "fc2", MLP_HIDDEN, classes, Default::default()),
                pool,
            },
        })
    }

    /// The network's own classifier ((pool +) `fc`), named `fc` at the root as in torchvision.
    pub fn classifier(root: &nn::Path, features: FeatureShape, classes: i64) -> Self {
        Head::Linear {
            fc: nn::linear(
                root / "fc",
                features.channels(),
                classes,
                Default::default(),
            ),
            pool: matches!(features, FeatureShape::Map { .. }),
        }
    }

    /// Elements per sample of the tensors this head keeps alive for backward.
    pub fn activation_elems(kind: HeadKind, input: FeatureShape) -> i64 {
        let c = input.channels();
        match kind {
            HeadKind::Conv => 3 * input.elems() + c,
            HeadKind::Linear => c,
            HeadKind::Mlp => c + 2 * MLP_HIDDEN,
        }
    }
}

/// Global average pool `[B, C, H, W] -> [B, C]` if `pool`, else the input as it is.
fn pooled(xs: &Tensor, pool: bool) -> Tensor {
    if pool {
        xs.mean_dim(&[2i64, 3][..], false, xs.kind())
    } else {
        xs.shallow_clone()
    }
}

impl ModuleT for Head {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Head::Conv { conv, bn, fc } => {
                pooled(&xs.apply(conv).apply_t(bn, train).relu(), true).apply(fc)
            }
            Head::Linear { fc, pool } => pooled(xs, *pool).apply(fc),
            Head::Mlp { fc1, fc2, pool } => pooled(xs, *pool).apply(fc1).relu().apply(fc2),
        }
    }
}

/// [`pooled`] of a value and its tangent.
fn pooled_dual(input: &Dual, pool: bool) -> Dual {
    if pool {
        dual::pool(input)
    } else {
        (input.0.shallow_clone(), input.1.shallow_clone())
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
            Head::Linear { fc, pool } => dual::linear(fc, &pooled_dual(input, *pool)),
            Head::Mlp { fc1, fc2, pool } => {
                let mut h = dual::linear(fc1, &pooled_dual(input, *pool));
                h = dual::relu(&h);
                dual::linear(fc2, &h)
            }
        }
    }
}
