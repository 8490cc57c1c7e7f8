//! The network layer: what a network is to the rest of the crate, and the registry of networks.
//!
//! A network is an ordered list of *units* plus a classifier. [`Network`] describes one: how
//! many units it has, how they are built (each with its output [`FeatureShape`], its activation
//! size and its variable prefixes), what the classifier sees, and its split table. Everything
//! downstream (splitting into modules, heads, rules, the memory estimate) goes through this
//! trait, so a new network is one file that implements it plus one entry in [`FAMILIES`].
//!
//! On the command line and in config files a network is named by a string (`resnet32`,
//! `mlp-8x256`); [`Arch`] is that name, checked against the registry when it is parsed.
use super::FeatureShape;
use super::splits::TableEntry;
use super::{mlp, resnet, resnet_imagenet, vit};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::nn;

/// A unit of a network: a layer with a training/eval forward and a tangent forward.
pub trait Unit: nn::ModuleT + super::dual::ForwardDual {}
impl<T: nn::ModuleT + super::dual::ForwardDual> Unit for T {}

/// A built unit together with the facts the splitter and the memory estimate need.
#[derive(Debug)]
pub struct UnitSpec {
    /// The layer itself.
    pub layer: Box<dyn Unit>,
    /// Output feature shape for one sample.
    pub out: FeatureShape,
    /// Elements per sample of the intermediate tensors this unit creates in a training forward
    /// (what autograd keeps alive until backward).
    pub activation_elems: i64,
    /// Variable-name prefixes of this unit's parameters and buffers (each ends with `.`).
    pub prefixes: Vec<String>,
}

/// How a Transformer's classifier and token heads pool the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TokenPool {
    /// A learnable class token is prepended; heads read it (ViT, DeiT).
    #[default]
    Cls,
    /// No class token; heads average the patch tokens.
    Mean,
}

/// Network options that are not part of the network's name. Networks ignore the ones that do
/// not apply to them (a ResNet has no patches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetOptions {
    /// Patch size of a Vision Transformer (`None`: chosen from the input size).
    pub patch_size: Option<i64>,
    /// How token features are pooled.
    pub token_pool: TokenPool,
}

/// A built network: its units and the feature shape its classifier reads.
pub struct Built {
    /// The units, in order.
    pub units: Vec<UnitSpec>,
    /// Shape of the last unit's output (the classifier's input).
    pub features: FeatureShape,
}

/// A network family member with its size parameters fixed (e.g. ResNet-32, MLP 8x256).
pub trait Network: std::fmt::Debug + Send + Sync {
    /// The canonical name (`resnet32`, `mlp-8x256`).
    fn name(&self) -> String;
    /// Number of units.
    fn num_units(&self) -> usize;
    /// What the units are, for error messages (`stem + 15 residual blocks`).
    fn describe_units(&self) -> String;
    /// Whether the units output feature maps (`Map`) rather than vectors, so that the heads that
    /// need maps can be checked before anything is built.
    fn outputs_maps(&self) -> bool;
    /// Whether the units output token sequences (`Tokens`), for the same checks.
    fn outputs_tokens(&self) -> bool {
        false
    }
    /// Names of parameters (whole variable names) that weight decay must skip although their
    /// rank is 2 or more, like timm's `no_weight_decay()` (position embedding, class token).
    fn no_weight_decay(&self) -> Vec<String> {
        Vec::new()
    }
    /// The split table: for each listed K, how the units are cut (`--split table`).
    fn split_table(&self) -> Vec<(usize, TableEntry)>;
    /// Builds the units under `root` for inputs of shape `input` with `options`; fails with a
    /// configuration error when the network cannot take such inputs.
    fn build(&self, root: &nn::Path, input: FeatureShape, options: &NetOptions) -> Result<Built>;
}

/// What a family's parser returns: `None` if the name is not of the family, `Some(Err(why))` if
/// it is but is malformed.
pub type Parsed = Option<std::result::Result<Arc<dyn Network>, String>>;

/// One registry entry: the names a family accepts and its parser.
pub struct Family {
    /// How the family's names are written, for help and error texts.
    pub syntax: &'static str,
    /// Parses a name (see [`Parsed`]).
    pub parse: fn(&str) -> Parsed,
}

/// Every network family. Adding a network: a file implementing [`Network`] and a line here.
pub const FAMILIES: &[Family] = &[
    resnet_imagenet::FAMILY,
    resnet::FAMILY,
    mlp::FAMILY,
    vit::FAMILY,
];

/// A network name, checked against [`FAMILIES`] when parsed (`"resnet32".parse::<Arch>()`).
#[derive(Clone)]
pub struct Arch(Arc<dyn Network>);

impl Arch {
    /// The network this name stands for.
    pub fn network(&self) -> &dyn Network {
        self.0.as_ref()
    }

    /// Number of units.
    pub fn num_units(&self) -> usize {
        self.0.num_units()
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        for family in FAMILIES {
            if let Some(parsed) = (family.parse)(name) {
                return parsed.map(Arch);
            }
        }
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.syntax).collect();
        Err(format!(
            "unknown network '{name}' (known: {})",
            known.join(", ")
        ))
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.name())
    }
}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arch({})", self.0.name())
    }
}

impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl Eq for Arch {}

impl std::hash::Hash for Arch {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
    }
}

impl Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.name())
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_allowed() {
        for name in [
            "resnet20",
            "resnet32",
            "resnet56",
            "resnet110",
            "mlp-8x256",
            "mlp-1x3",
        ] {
            let arch: Arch = name.parse().unwrap();
            assert_eq!(arch.to_string(), name);
            let json = serde_json::to_string(&arch).unwrap();
            assert_eq!(serde_json::from_str::<Arch>(&json).unwrap(), arch);
        }
        for bad in [
            "resnet33",
            "mlp-0x256",
            "mlp-8x",
            "mlp-8x256x3",
            "mlp-8x0",
            "mlp",
            "vgg",
        ] {
            let e = bad.parse::<Arch>().unwrap_err();
            assert!(e.contains(bad) && !e.contains('\n'), "{bad}: {e}");
        }
        let e = "mlp-8x".parse::<Arch>().unwrap_err();
        assert!(e.contains("mlp-DxW"), "{e}");
    }
}
