//! CIFAR-style ResNets (He et al. 2016, §4.2): a 3x3 stem, three stages of `n` basic blocks at
//! widths 16/32/64, global average pooling and a linear classifier; depth = 6n + 2.
//!
//! The network is an ordered list of *units* (unit 0 = stem, units 1.. = residual blocks) plus
//! the classifier, so that [`super::splits`] can cut it into modules at unit boundaries.
//! Variable names follow torchvision (`conv1`, `bn1`, `layer{s}.{i}.conv1`, `...downsample.0`,
//! `fc`), so they do not depend on K and match a PyTorch `state_dict` key by key.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::ModuleT};

/// The supported network depths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// ResNet-20 (n = 3, 10 units).
    Resnet20,
    /// ResNet-32 (n = 5, 16 units).
    Resnet32,
    /// ResNet-56 (n = 9, 28 units).
    Resnet56,
    /// ResNet-110 (n = 18, 55 units).
    Resnet110,
}

impl Arch {
    /// Basic blocks per stage (`n` in depth = 6n + 2).
    pub fn blocks_per_stage(self) -> usize {
        match self {
            Arch::Resnet20 => 3,
            Arch::Resnet32 => 5,
            Arch::Resnet56 => 9,
            Arch::Resnet110 => 18,
        }
    }
    /// Units: the stem plus every residual block.
    pub fn num_units(self) -> usize {
        1 + 3 * self.blocks_per_stage()
    }
    /// The kebab-case name used on the command line and in run folders.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet20 => "resnet20",
            Arch::Resnet32 => "resnet32",
            Arch::Resnet56 => "resnet56",
            Arch::Resnet110 => "resnet110",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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

/// BatchNorm with PyTorch's init (weight 1, bias 0); tch's default weight init is U(0, 1).
pub(crate) fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        eps: dual::BN_EPS,
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
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
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
    stride: i64,
}

impl BasicBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            (
                conv(&d / "0", c_in, c_out, 1, stride),
                batch_norm(&d / "1", c_out),
            )
        });
        BasicBlock {
            conv1: conv(p / "conv1", c_in, c_out, 3, stride),
            bn1: batch_norm(p / "bn1", c_out),
            conv2: conv(p / "conv2", c_out, c_out, 3, 1),
            bn2: batch_norm(p / "bn2", c_out),
            downsample,
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
        let shortcut = match &self.downsample {
            Some((c, bn)) => xs.apply(c).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (out + shortcut).relu()
    }
}

impl ForwardDual for BasicBlock {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = dual::conv(&self.conv1, self.stride, input);
        h = dual::batch_norm(&self.bn1, &h);
        h = dual::relu(&h);
        h = dual::conv(&self.conv2, 1, &h);
        h = dual::batch_norm(&self.bn2, &h);
        let (out, out_dot) = match &self.downsample {
            Some((c, bn)) => {
                let shortcut = dual::batch_norm(bn, &dual::conv(c, self.stride, input));
                (h.0 + shortcut.0, h.1 + shortcut.1)
            }
            None => (h.0 + &input.0, h.1 + &input.1),
        };
        dual::relu(&(out, out_dot))
    }
}

/// What a unit of the network is: a layer with a training/eval forward and a tangent forward.
pub trait Unit: ModuleT + ForwardDual {}
impl<T: ModuleT + ForwardDual> Unit for T {}

/// A unit together with the facts the splitter and the memory meter need.
#[derive(Debug)]
pub struct UnitSpec {
    /// The layer itself.
    pub layer: Box<dyn Unit>,
    /// Output feature shape for one sample.
    pub out: FeatureShape,
    /// Elements per sample of the intermediate tensors this unit creates in a training forward
    /// (conv, BN, ReLU, add outputs), i.e. what autograd keeps alive until backward.
    pub activation_elems: i64,
    /// InfoPro-style location `(stage, block)`; the stem is `(0, 0)`.
    pub location: (usize, usize),
    /// Variable-name prefixes of this unit's parameters and buffers (each ends with `.`).
    pub prefixes: Vec<String>,
}

/// Builds the units of a CIFAR ResNet on `root` for inputs of `input` shape.
pub fn units(root: &nn::Path, arch: Arch, input: FeatureShape) -> Vec<UnitSpec> {
    let mut units = Vec::with_capacity(arch.num_units());
    let stem_out = FeatureShape {
        c: STAGE_WIDTHS[0],
        ..input
    };
    units.push(UnitSpec {
        layer: Box::new(Stem {
            conv: conv(root / "conv1", input.c, STAGE_WIDTHS[0], 3, 1),
            bn: batch_norm(root / "bn1", STAGE_WIDTHS[0]),
        }),
        out: stem_out,
        // conv, BN and ReLU outputs.
        activation_elems: 3 * stem_out.elems(),
        location: (0, 0),
        prefixes: vec!["conv1.".into(), "bn1.".into()],
    });
    let mut shape = stem_out;
    for (stage, &width) in STAGE_WIDTHS.iter().enumerate() {
        let p = root / format!("layer{}", stage + 1);
        for block in 0..arch.blocks_per_stage() {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let out = FeatureShape {
                c: width,
                h: (shape.h - 1) / stride + 1,
                w: (shape.w - 1) / stride + 1,
            };
            let projects = stride != 1 || shape.c != width;
            // conv1, bn1, relu, conv2, bn2, add, relu (+ projection conv and BN).
            let tensors = if projects { 9 } else { 7 };
            units.push(UnitSpec {
                layer: Box::new(BasicBlock::new(&(&p / block), shape.c, width, stride)),
                out,
                activation_elems: tensors * out.elems(),
                location: (stage + 1, block),
                prefixes: vec![format!("layer{}.{block}.", stage + 1)],
            });
            shape = out;
        }
    }
    units
}

/// Width of the last stage, i.e. the classifier's input features.
pub fn final_width() -> i64 {
    STAGE_WIDTHS[2]
}
