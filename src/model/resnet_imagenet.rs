//! ImageNet ResNets `resnet18/34/50/101/152` in torchvision's layout (v1.5: the stride of a
//! bottleneck sits on its 3x3 convolution): a 7x7 stride-2 stem with 3x3 stride-2 max-pool,
//! four stages of BasicBlocks (18, 34) or Bottlenecks (50, 101, 152) at widths 64/128/256/512
//! (x4 expansion for bottlenecks), global average pooling and `fc`.
//!
//! Units: 0 is the stem (conv, BN, ReLU, max-pool), 1.. the residual blocks in order. Variable
//! names are torchvision's (`conv1`, `bn1`, `layer{s}.{i}.conv{1,2,3}`, `bn{1,2,3}`,
//! `downsample.{0,1}`, `fc`), so the backbone and classifier of a checkpoint load into
//! `torchvision.models.resnetXX(num_classes=C)` with `strict=True` once BatchNorm's
//! `num_batches_tracked` counters (which tch does not keep) are added. Initialisation follows
//! torchvision (Kaiming-normal fan-out convolutions, BN weight 1 and bias 0, PyTorch's default
//! `fc`).
//!
//! Split tables: InfoPro (Wang et al. 2021) cuts ResNet-101/152 on ImageNet at K = 2 and 4, but
//! its cut positions could not be checked here, so the tables are *derived*, not copied: for
//! K = 2 and 4 the cuts that minimise the largest module's activation memory at 224x224 (the
//! `balanced-memory` dynamic programme over this file's per-unit estimates), for every depth.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::network::{Built, Family, NetOptions, Network, Parsed, UnitSpec};
use super::resnet::{BasicBlock, Shortcut, batch_norm, conv};
use super::splits::{self, TableEntry};
use crate::{Error, Result};
use std::sync::Arc;
use tch::{Tensor, nn, nn::ModuleT};

/// An ImageNet ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagenetResnet {
    /// Depth (18, 34, 50, 101, 152).
    pub depth: usize,
}

/// Registry entry.
pub const FAMILY: Family = Family {
    syntax: "resnet18|resnet34|resnet50|resnet101|resnet152 (ImageNet layout)",
    parse: parse_name,
};

fn parse_name(name: &str) -> Parsed {
    let depth: usize = name.strip_prefix("resnet")?.parse().ok()?;
    // Other depths belong to the CIFAR family (or to its error message).
    ImagenetResnet::config(depth)?;
    Some(Ok(Arc::new(ImagenetResnet { depth })))
}

/// Stage widths (before the bottleneck expansion).
const WIDTHS: [i64; 4] = [64, 128, 256, 512];
/// Output channels of a bottleneck relative to its width.
const EXPANSION: i64 = 4;
/// Side length at which the split tables are derived.
const TABLE_SIZE: i64 = 224;

impl ImagenetResnet {
    /// Blocks per stage and whether they are bottlenecks (torchvision's `resnet.py`).
    fn config(depth: usize) -> Option<([usize; 4], bool)> {
        Some(match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            101 => ([3, 4, 23, 3], true),
            152 => ([3, 8, 36, 3], true),
            _ => return None,
        })
    }

    fn layers(&self) -> ([usize; 4], bool) {
        Self::config(self.depth).expect("checked when parsed")
    }

    /// Per-unit plan for `(h, w)` inputs: `(stage, block, c_in, c_out, stride, out, elems)`.
    fn plan(&self, c: i64, h: i64, w: i64) -> Vec<Plan> {
        let (blocks, bottleneck) = self.layers();
        let down = |x: i64, s: i64| (x - 1) / s + 1;
        let (sh, sw) = (down(h, 2), down(w, 2));
        let (ph, pw) = (down(sh, 2), down(sw, 2));
        let stem_out = FeatureShape::map(WIDTHS[0], ph, pw);
        let mut plan = vec![Plan {
            stage: 0,
            block: 0,
            c_in: c,
            c_out: WIDTHS[0],
            stride: 2,
            out: stem_out,
            // conv, BN, ReLU at half resolution; the pooled output and its indices.
            elems: 3 * WIDTHS[0] * sh * sw + 2 * stem_out.elems(),
        }];
        let (mut c_in, mut h, mut w) = (WIDTHS[0], ph, pw);
        for (s, (&n, &width)) in blocks.iter().zip(&WIDTHS).enumerate() {
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let (h_in, w_in) = (h, w);
                (h, w) = (down(h, stride), down(w, stride));
                let c_out = if bottleneck { width * EXPANSION } else { width };
                let out = FeatureShape::map(c_out, h, w);
                let projects = stride != 1 || c_in != c_out;
                let elems = if bottleneck {
                    // conv1/bn1/relu at the input size; conv2/bn2/relu, conv3/bn3, add, relu
                    // (+ projection conv and BN) at the output size.
                    3 * width * h_in * w_in
                        + 3 * width * h * w
                        + (4 + 2 * i64::from(projects)) * out.elems()
                } else {
                    (7 + 2 * i64::from(projects)) * out.elems()
                };
                plan.push(Plan {
                    stage: s + 1,
                    block: b,
                    c_in,
                    c_out,
                    stride,
                    out,
                    elems,
                });
                c_in = c_out;
            }
        }
        plan
    }
}

/// What one unit is and costs.
struct Plan {
    stage: usize,
    block: usize,
    c_in: i64,
    c_out: i64,
    stride: i64,
    out: FeatureShape,
    elems: i64,
}

impl Network for ImagenetResnet {
    fn name(&self) -> String {
        format!("resnet{}", self.depth)
    }

    fn num_units(&self) -> usize {
        1 + self.layers().0.iter().sum::<usize>()
    }

    fn describe_units(&self) -> String {
        let (blocks, bottleneck) = self.layers();
        format!(
            "stem + {} {} blocks",
            blocks.iter().sum::<usize>(),
            if bottleneck { "bottleneck" } else { "basic" }
        )
    }

    fn outputs_maps(&self) -> bool {
        true
    }

    /// K = 1, and K = 2 and 4 derived by balancing activation memory at 224x224 (see the
    /// module docs: not InfoPro's published cuts).
    fn split_table(&self) -> Vec<(usize, TableEntry)> {
        let weights: Vec<i64> = self
            .plan(3, TABLE_SIZE, TABLE_SIZE)
            .iter()
            .map(|p| p.elems)
            .collect();
        let mut table = vec![(1, TableEntry::Ends(Vec::new()))];
        for k in [2, 4] {
            let ranges = splits::balanced(&weights, k);
            let ends = ranges[..k - 1].iter().map(|r| r.end).collect();
            table.push((k, TableEntry::Ends(ends)));
        }
        table
    }

    fn build(&self, root: &nn::Path, input: FeatureShape, _: &NetOptions) -> Result<Built> {
        let FeatureShape::Map { c, h, w } = input else {
            return Err(Error::Config(format!(
                "--model {}: needs image inputs, got {input}",
                self.name()
            )));
        };
        if h < 32 || w < 32 {
            return Err(Error::Config(format!(
                "--model {}: needs images of at least 32x32 (five stride-2 steps), got {h}x{w}",
                self.name()
            )));
        }
        let (_, bottleneck) = self.layers();
        let units: Vec<UnitSpec> = self
            .plan(c, h, w)
            .into_iter()
            .map(|p| {
                if p.stage == 0 {
                    return UnitSpec {
                        layer: Box::new(Stem {
                            conv: conv(root / "conv1", c, WIDTHS[0], 7, 2),
                            bn: batch_norm(root / "bn1", WIDTHS[0]),
                        }),
                        out: p.out,
                        activation_elems: p.elems,
                        prefixes: vec!["conv1.".into(), "bn1.".into()],
                    };
                }
                let path = root / format!("layer{}", p.stage) / p.block;
                let layer: Box<dyn super::network::Unit> = if bottleneck {
                    Box::new(Bottleneck::new(
                        &path,
                        p.c_in,
                        p.c_out / EXPANSION,
                        p.stride,
                    ))
                } else {
                    Box::new(BasicBlock::new(&path, p.c_in, p.c_out, p.stride))
                };
                UnitSpec {
                    layer,
                    out: p.out,
                    activation_elems: p.elems,
                    prefixes: vec![format!("layer{}.{}.", p.stage, p.block)],
                }
            })
            .collect();
        let features = units[units.len() - 1].out;
        Ok(Built { units, features })
    }
}

/// Unit 0: conv7x7/2 -> BN -> ReLU -> max-pool 3x3/2.
#[derive(Debug)]
struct Stem {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

fn max_pool(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
}

impl ModuleT for Stem {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // [B, 3, H, W] -> [B, 64, H/4, W/4]
        max_pool(&xs.apply(&self.conv).apply_t(&self.bn, train).relu())
    }
}

impl ForwardDual for Stem {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = dual::conv(&self.conv, 2, input);
        h = dual::batch_norm(&self.bn, &h);
        h = dual::relu(&h);
        // Max-pool is piecewise linear: the tangent is taken at the maxima's positions.
        let (value, indices) =
            h.0.max_pool2d_with_indices([3, 3], [2, 2], [1, 1], [1, 1], false);
        let tangent =
            h.1.flatten(2, -1)
                .gather(2, &indices.flatten(2, -1), false)
                .view_as(&value);
        (value, tangent)
    }
}

/// A v1.5 bottleneck: conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 ->
/// BN, plus the identity or a strided 1x1 conv + BN projection, then ReLU.
#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    shortcut: Shortcut,
    stride: i64,
}

impl Bottleneck {
    fn new(p: &nn::Path, c_in: i64, width: i64, stride: i64) -> Self {
        let c_out = width * EXPANSION;
        let shortcut = Shortcut::new(p, c_in, c_out, stride);
        Bottleneck {
            conv1: conv(p / "conv1", c_in, width, 1, 1),
            bn1: batch_norm(p / "bn1", width),
            conv2: conv(p / "conv2", width, width, 3, stride),
            bn2: batch_norm(p / "bn2", width),
            conv3: conv(p / "conv3", width, c_out, 1, 1),
            bn3: batch_norm(p / "bn3", c_out),
            shortcut,
            stride,
        }
    }
}

impl ModuleT for Bottleneck {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let out = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train)
            .relu()
            .apply(&self.conv3)
            .apply_t(&self.bn3, train);
        self.shortcut.join(out, xs, train)
    }
}

impl ForwardDual for Bottleneck {
    fn forward_dual(&self, input: &Dual) -> Dual {
        let mut h = dual::conv(&self.conv1, 1, input);
        h = dual::batch_norm(&self.bn1, &h);
        h = dual::relu(&h);
        h = dual::conv(&self.conv2, self.stride, &h);
        h = dual::batch_norm(&self.bn2, &h);
        h = dual::relu(&h);
        h = dual::conv(&self.conv3, 1, &h);
        h = dual::batch_norm(&self.bn3, &h);
        self.shortcut.join_dual(h, input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::network::Arch;

    #[test]
    fn units_and_tables_of_every_depth() {
        for (name, units) in [
            ("resnet18", 9),
            ("resnet34", 17),
            ("resnet50", 17),
            ("resnet101", 34),
            ("resnet152", 51),
        ] {
            let arch: Arch = name.parse().unwrap();
            assert_eq!(arch.to_string(), name);
            assert_eq!(arch.num_units(), units, "{name}");
            let table = arch.network().split_table();
            assert_eq!(table.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 4]);
            for (k, entry) in table {
                let TableEntry::Ends(ends) = entry else {
                    panic!("{name}: derived tables list their cuts")
                };
                assert_eq!(ends.len(), k - 1);
                assert!(ends.windows(2).all(|w| w[0] < w[1]));
                assert!(ends.iter().all(|&e| 0 < e && e < units));
            }
        }
        // CIFAR names still belong to the CIFAR family.
        assert!("resnet32".parse::<Arch>().is_ok());
        assert!("resnet33".parse::<Arch>().is_err());
    }
}
