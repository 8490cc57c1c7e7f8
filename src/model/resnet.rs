//! CIFAR-style ResNets (He et al. 2016, §4.2): a 3x3 stem, three stages of `n` basic blocks at
//! widths 16/32/64, global average pooling and a linear classifier; depth = 6n + 2.
//!
//! The network is an ordered list of *units* (unit 0 = stem, units 1.. = residual blocks) plus
//! the classifier, so that [`super::splits`] can cut it into modules at unit boundaries.
//! Variable names follow torchvision (`conv1`, `bn1`, `layer{s}.{i}.conv1`, `...downsample.0`,
//! `fc`), so they do not depend on K and match a PyTorch `state_dict` key by key.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::network::{Built, Family, NetOptions, Network, Parsed, UnitSpec};
use super::splits::TableEntry;
use crate::{Error, Result};
use std::sync::Arc;
use tch::{Tensor, nn, nn::ModuleT};

/// A CIFAR ResNet of depth 6n + 2 (n basic blocks per stage): `resnet20`, `resnet32`,
/// `resnet56`, `resnet110`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resnet {
    /// Basic blocks per stage (`n` in depth = 6n + 2).
    pub blocks_per_stage: usize,
}

/// The depths with a name (and, for 32 and 110, InfoPro's split table).
const DEPTHS: [usize; 4] = [20, 32, 56, 110];

/// Registry entry.
pub const FAMILY: Family = Family {
    syntax: "resnet20|resnet32|resnet56|resnet110",
    parse: parse_name,
};

fn parse_name(name: &str) -> Parsed {
    let depth = name.strip_prefix("resnet")?;
    Some(match depth.parse::<usize>() {
        Ok(d) if DEPTHS.contains(&d) => Ok(Arc::new(Resnet {
            blocks_per_stage: (d - 2) / 6,
        })),
        _ => Err(format!(
            "unknown network '{name}': the CIFAR ResNets are resnet20, resnet32, resnet56 and resnet110, the ImageNet ones resnet18, resnet34, resnet50, resnet101 and resnet152"
        )),
    })
}

impl Resnet {
    /// The last unit of an InfoPro cut `[stage, block]` ("after block `block` of stage `stage`";
    /// stage 0 is the stem), plus one: the exclusive end of the module it closes.
    fn cut_end(self, [stage, block]: [usize; 2]) -> usize {
        if stage == 0 {
            1
        } else {
            2 + (stage - 1) * self.blocks_per_stage + block
        }
    }

    /// InfoPro's cuts (`networks/configs.py` of the InfoPro-Pytorch repository) for ResNet-32
    /// and ResNet-110 at K <= 16; `Even` where no published table exists.
    fn cuts(self) -> &'static [(usize, Option<&'static [[usize; 2]]>)] {
        match self.blocks_per_stage {
            3 => &[(1, Some(&[])), (2, None), (4, None), (5, None), (10, None)],
            5 => &[
                (1, Some(&[])),
                (2, Some(&[[2, 1]])),
                (3, Some(&[[1, 4], [2, 4]])),
                (4, Some(&[[1, 2], [2, 1], [3, 0]])),
                (
                    8,
                    Some(&[[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]]),
                ),
                (16, None),
            ],
            9 => &[
                (1, Some(&[])),
                (2, None),
                (4, None),
                (7, None),
                (14, None),
                (28, None),
            ],
            _ => &[
                (1, Some(&[])),
                (2, Some(&[[2, 8]])),
                (3, Some(&[[1, 17], [2, 17]])),
                (4, Some(&[[1, 11], [2, 7], [3, 3]])),
                (
                    8,
                    Some(&[[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]]),
                ),
                (
                    16,
                    Some(&[
                        [1, 1],
                        [1, 4],
                        [1, 7],
                        [1, 10],
                        [1, 13],
                        [1, 16],
                        [2, 1],
                        [2, 4],
                        [2, 7],
                        [2, 11],
                        [2, 15],
                        [3, 1],
                        [3, 5],
                        [3, 9],
                        [3, 13],
                    ]),
                ),
                (32, None),
                (55, None),
            ],
        }
    }
}

impl Network for Resnet {
    fn name(&self) -> String {
        format!("resnet{}", 6 * self.blocks_per_stage + 2)
    }

    fn num_units(&self) -> usize {
        1 + 3 * self.blocks_per_stage
    }

    fn describe_units(&self) -> String {
        format!("stem + {} residual blocks", 3 * self.blocks_per_stage)
    }

    fn outputs_maps(&self) -> bool {
        true
    }

    fn split_table(&self) -> Vec<(usize, TableEntry)> {
        self.cuts()
            .iter()
            .map(|&(k, cuts)| {
                let entry = match cuts {
                    Some(cuts) => TableEntry::Ends(cuts.iter().map(|&c| self.cut_end(c)).collect()),
                    None => TableEntry::Even,
                };
                (k, entry)
            })
            .collect()
    }

    fn build(&self, root: &nn::Path, input: FeatureShape, _: &NetOptions) -> Result<Built> {
        let FeatureShape::Map { c, h, w } = input else {
            return Err(Error::Config(format!(
                "--model {}: needs image inputs, got {input}",
                self.name()
            )));
        };
        let units = units(root, self.blocks_per_stage, (c, h, w));
        let features = units[units.len() - 1].out;
        Ok(Built { units, features })
    }
}

/// Stage widths of the CIFAR ResNets.
const STAGE_WIDTHS: [i64; 3] = [16, 32, 64];

/// Kaiming-normal (fan-out, ReLU gain) init for a `k`x`k` conv with `c_out` outputs, as in
/// torchvision's and InfoPro's ResNets: N(0, sqrt(2 / (k^2 c_out))).
pub(crate) fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> nn::Conv2D {
    let stdev = (2.0 / (k * k * c_out) as f64).sqrt();
    let cfg = nn::ConvConfig {
        stride,
        padding: k / 2,
        bias: false,
        ws_init: nn::Init::Randn { mean: 0.0, stdev },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, k, cfg)
}

/// BatchNorm settings with PyTorch's init (weight 1, bias 0; tch's default weight init is
/// U(0, 1)) and the tangent layers' ε.
pub(crate) fn batch_norm_config() -> nn::BatchNormConfig {
    nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        eps: dual::BN_EPS,
        ..Default::default()
    }
}

/// BatchNorm over feature maps (see [`batch_norm_config`]).
pub(crate) fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, batch_norm_config())
}

/// Unit 0: conv3x3 -> BN -> ReLU.
#[derive(Debug)]
pub struct Stem {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ModuleT for Stem {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // [B, C_in, H, W] -> [B, 16, H, W]
        xs.apply(&self.conv).apply_t(&self.bn, train).relu()
    }
}

impl ForwardDual for Stem {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = dual::conv(&self.conv, 1, input);
        h = dual::batch_norm(&self.bn, &h);
        dual::relu(&h)
    }
}

/// A basic residual block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the identity or a
/// 1x1 conv + BN projection when the shape changes, then ReLU.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    shortcut: Shortcut,
    stride: i64,
}

/// A residual block's shortcut: the identity, or a strided 1x1 conv + BN projection
/// (`downsample.{0,1}`, torchvision's names) when the block changes the shape.
#[derive(Debug)]
pub(crate) struct Shortcut {
    projection: Option<(nn::Conv2D, nn::BatchNorm)>,
    stride: i64,
}

impl Shortcut {
    /// The shortcut of a block from `c_in` to `c_out` channels with stride `stride`. Built
    /// before the block's own layers, so the initial weights drawn for a seed stay the same.
    pub(crate) fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let projection = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            (
                conv(&d / "0", c_in, c_out, 1, stride),
                batch_norm(&d / "1", c_out),
            )
        });
        Shortcut { projection, stride }
    }

    /// `relu(out + shortcut(xs))`: the end of the block.
    pub(crate) fn join(&self, out: Tensor, xs: &Tensor, train: bool) -> Tensor {
        let shortcut = match &self.projection {
            Some((c, bn)) => xs.apply(c).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (out + shortcut).relu()
    }

    /// [`Shortcut::join`] in forward mode, for the block's output pair `h` and input pair.
    pub(crate) fn join_dual(&self, h: Dual, input: &Dual) -> Dual {
        let (out, out_dot) = match &self.projection {
            Some((c, bn)) => {
                let shortcut = dual::batch_norm(bn, &dual::conv(c, self.stride, input));
                (h.0 + shortcut.0, h.1 + shortcut.1)
            }
            None => (h.0 + &input.0, h.1 + &input.1),
        };
        dual::relu(&(out, out_dot))
    }
}

impl BasicBlock {
    /// A block from `c_in` to `c_out` channels, strided on its first 3x3 convolution.
    pub(crate) fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let shortcut = Shortcut::new(p, c_in, c_out, stride);
        BasicBlock {
            conv1: conv(p / "conv1", c_in, c_out, 3, stride),
            bn1: batch_norm(p / "bn1", c_out),
            conv2: conv(p / "conv2", c_out, c_out, 3, 1),
            bn2: batch_norm(p / "bn2", c_out),
            shortcut,
            stride,
        }
    }
}

impl ModuleT for BasicBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // [B, C_in, H, W] -> [B, C_out, H/stride, W/stride]
        let out = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train);
        self.shortcut.join(out, xs, train)
    }
}

impl ForwardDual for BasicBlock {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = dual::conv(&self.conv1, self.stride, input);
        h = dual::batch_norm(&self.bn1, &h);
        h = dual::relu(&h);
        h = dual::conv(&self.conv2, 1, &h);
        h = dual::batch_norm(&self.bn2, &h);
        self.shortcut.join_dual(h, input)
    }
}

/// Builds the units of a CIFAR ResNet with `n` blocks per stage on `root` for `(c, h, w)`
/// inputs: unit 0 is the stem, units 1.. the residual blocks.
fn units(root: &nn::Path, n: usize, (c, h, w): (i64, i64, i64)) -> Vec<UnitSpec> {
    let mut units = Vec::with_capacity(1 + 3 * n);
    let (mut c_in, mut h, mut w) = (STAGE_WIDTHS[0], h, w);
    let stem_out = FeatureShape::map(STAGE_WIDTHS[0], h, w);
    units.push(UnitSpec {
        layer: Box::new(Stem {
            conv: conv(root / "conv1", c, STAGE_WIDTHS[0], 3, 1),
            bn: batch_norm(root / "bn1", STAGE_WIDTHS[0]),
        }),
        out: stem_out,
        // conv, BN and ReLU outputs.
        activation_elems: 3 * stem_out.elems(),
        prefixes: vec!["conv1.".into(), "bn1.".into()],
    });
    for (stage, &width) in STAGE_WIDTHS.iter().enumerate() {
        let p = root / format!("layer{}", stage + 1);
        for block in 0..n {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            (h, w) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
            let out = FeatureShape::map(width, h, w);
            let projects = stride != 1 || c_in != width;
            // conv1, bn1, relu, conv2, bn2, add, relu (+ projection conv and BN).
            let tensors = if projects { 9 } else { 7 };
            units.push(UnitSpec {
                layer: Box::new(BasicBlock::new(&(&p / block), c_in, width, stride)),
                out,
                activation_elems: tensors * out.elems(),
                prefixes: vec![format!("layer{}.{block}.", stage + 1)],
            });
            c_in = width;
        }
    }
    units
}
