//! Multi-layer perceptrons `mlp-DxW`: D hidden layers of width W, each Linear -> BatchNorm1d ->
//! ReLU, then the network's linear classifier. One unit per hidden layer, so K can go up to D:
//! layer-wise local learning, the setting of the SGR paper's analysis, at a cost small enough
//! for seeded grids on a CPU.
//!
//! The first unit flattens its input (`[B, C, H, W] -> [B, C·H·W]`, a view). Linear layers take
//! tch's default initialisation, which is PyTorch's (`nn.Linear`: Kaiming-uniform weights with
//! a = √5, bias U(±1/√fan_in)); BatchNorm starts at weight 1, bias 0. Variables are
//! `layers.{i}.fc.*` and `layers.{i}.bn.*`, the classifier `fc.*`.
use super::FeatureShape;
use super::dual::{self, Dual, ForwardDual};
use super::network::{Built, Family, NetOptions, Network, Parsed, UnitSpec};
use super::splits::TableEntry;
use crate::Result;
use std::sync::Arc;
use tch::{Tensor, nn, nn::ModuleT};

/// An MLP with `depth` hidden layers of `width` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mlp {
    /// Hidden layers (= units).
    pub depth: usize,
    /// Width of every hidden layer.
    pub width: i64,
}

/// Registry entry.
pub const FAMILY: Family = Family {
    syntax: "mlp-DxW (D hidden layers of width W, e.g. mlp-8x256)",
    parse: parse_name,
};

fn parse_name(name: &str) -> Parsed {
    let rest = name.strip_prefix("mlp")?;
    let bad = || {
        format!(
            "malformed network '{name}': write mlp-DxW with D >= 1 hidden layers and width W >= 1, e.g. mlp-8x256"
        )
    };
    let parsed = rest
        .strip_prefix('-')
        .and_then(|dims| dims.split_once('x'))
        .and_then(|(d, w)| Some((d.parse::<usize>().ok()?, w.parse::<i64>().ok()?)));
    Some(match parsed {
        Some((depth, width)) if depth >= 1 && width >= 1 => {
            Ok(Arc::new(Mlp { depth, width }) as Arc<dyn Network>)
        }
        _ => Err(bad()),
    })
}

/// BatchNorm1d with the ResNets' settings (PyTorch's init, the tangent layers' ε).
fn batch_norm1d(p: nn::Path, n: i64) -> nn::BatchNorm {
    nn::batch_norm1d(p, n, super::resnet::batch_norm_config())
}

/// One hidden layer: (flatten ->) Linear -> BatchNorm1d -> ReLU.
#[derive(Debug)]
struct Layer {
    fc: nn::Linear,
    bn: nn::BatchNorm,
}

/// `[B, ...] -> [B, n]`: the first layer reads images; later layers get vectors unchanged.
fn flatten(x: &Tensor) -> Tensor {
    x.flatten(1, -1)
}

impl ModuleT for Layer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        flatten(xs).apply(&self.fc).apply_t(&self.bn, train).relu()
    }
}

impl ForwardDual for Layer {
    fn forward_dual(&self, (x, x_dot): &Dual) -> Dual {
        let mut h = dual::linear(&self.fc, &(flatten(x), flatten(x_dot)));
        h = dual::batch_norm(&self.bn, &h);
        dual::relu(&h)
    }
}

impl Network for Mlp {
    fn name(&self) -> String {
        format!("mlp-{}x{}", self.depth, self.width)
    }

    fn num_units(&self) -> usize {
        self.depth
    }

    fn describe_units(&self) -> String {
        format!("{} hidden layers", self.depth)
    }

    fn outputs_maps(&self) -> bool {
        false
    }

    /// Every K divides the layers evenly; K = D is one layer per module.
    fn split_table(&self) -> Vec<(usize, TableEntry)> {
        (1..=self.depth).map(|k| (k, TableEntry::Even)).collect()
    }

    fn build(&self, root: &nn::Path, input: FeatureShape, _: &NetOptions) -> Result<Built> {
        let out = FeatureShape::Vector { n: self.width };
        let mut fan_in = input.elems();
        let units = (0..self.depth)
            .map(|i| {
                let p = root / "layers" / i;
                let layer = Layer {
                    fc: nn::linear(&p / "fc", fan_in, self.width, Default::default()),
                    bn: batch_norm1d(&p / "bn", self.width),
                };
                fan_in = self.width;
                UnitSpec {
                    layer: Box::new(layer),
                    out,
                    // Linear, BN and ReLU outputs.
                    activation_elems: 3 * self.width,
                    prefixes: vec![format!("layers.{i}.")],
                }
            })
            .collect();
        Ok(Built {
            units,
            features: out,
        })
    }
}
