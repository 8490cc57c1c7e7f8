//! Classifier heads: the auxiliary (local) classifiers that give modules 1..K-1 their local
//! loss, and the network's own classifier, which serves the last module.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::resnet::{batch_norm, conv};
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

/// A classifier on a feature map `[B, C, H, W]` giving logits `[B, classes]`.
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
    /// Pool + linear; also the network's own classifier.
    Linear {
        /// The linear layer.
        fc: nn::Linear,
    },
    /// See [`HeadKind::Mlp`].
    Mlp {
        /// First linear layer.
        fc1: nn::Linear,
        /// Second linear layer.
        fc2: nn::Linear,
    },
}

impl Head {
    /// Builds a head of `kind` under `p` for features of shape `input`.
    pub fn new(p: &nn::Path, kind: HeadKind, input: FeatureShape, classes: i64) -> Self {
        let c = input.c;
        match kind {
            HeadKind::Conv => Head::Conv {
                conv: conv(p / "conv", c, c, 3, 1),
                bn: batch_norm(p / "bn", c),
                fc: nn::linear(p / "fc", c, classes, Default::default()),
            },
            HeadKind::Linear => Head::Linear {
                fc: nn::linear(p / "fc", c, classes, Default::default()),
            },
            HeadKind::Mlp => Head::Mlp {
                fc1: nn::linear(p / "fc1", c, MLP_HIDDEN, Default::default()),
                fc2: nn::linear(p / "fc2", MLP_HIDDEN, classes, Default::default()),
            },
        }
    }

    /// The network's own classifier (pool + `fc`), named `fc` at the root as in torchvision.
    pub fn classifier(root: &nn::Path, features: i64, classes: i64) -> Self {
        Head::Linear {
            fc: nn::linear(root / "fc", features, classes, Default::default()),
        }
    }

    /// Elements per sample of the tensors this head keeps alive for backward.
    pub fn activation_elems(kind: HeadKind, input: FeatureShape) -> i64 {
        match kind {
            HeadKind::Conv => 3 * input.elems() + input.c,
            HeadKind::Linear => input.c,
            HeadKind::Mlp => input.c + 2 * MLP_HIDDEN,
        }
    }
}

/// Global average pool: [B, C, H, W] -> [B, C].
fn pool(xs: &Tensor) -> Tensor {
    xs.mean_dim(&[2i64, 3][..], false, xs.kind())
}

impl ModuleT for Head {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Head::Conv { conv, bn, fc } => {
                pool(&xs.apply(conv).apply_t(bn, train).relu()).apply(fc)
            }
            Head::Linear { fc } => pool(xs).apply(fc),
            Head::Mlp { fc1, fc2 } => pool(xs).apply(fc1).relu().apply(fc2),
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
            Head::Linear { fc } => dual::linear(fc, &dual::pool(input)),
            Head::Mlp { fc1, fc2 } => {
                let mut h = dual::linear(fc1, &dual::pool(input));
                h = dual::relu(&h);
                dual::linear(fc2, &h)
            }
        }
    }
}
