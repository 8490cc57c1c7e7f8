//! Networks as ordered units, cut into K gradient-isolated modules with a classifier head each.
//!
//! [`SplitNet`] is the only type the rules see: `forward_module(k, x)` runs module k's units,
//! `head_logits(k, h)` its head (an auxiliary classifier for k < K-1, the network's own
//! classifier for the last module). All variables live in one `VarStore`, so a checkpoint is
//! one file, and backbone names do not depend on K.
pub mod dual;
pub mod forward_ad;
pub mod heads;
pub mod local_loss;
pub mod mlp;
pub mod network;
pub mod perturb;
pub mod resnet;
pub mod resnet_imagenet;
pub mod splits;
pub mod vit;

pub use heads::{Head, HeadKind};
pub use local_loss::{InfoproClass, LocalLoss, LocalLossKind, LocalLossSpec};
pub use network::{Arch, NetOptions, Network, TokenPool};
pub use splits::SplitStrategy;

use crate::Result;
use dual::{Dual, ForwardDual};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use tch::{Device, Tensor, nn, nn::ModuleT};

/// libtorch's random generator is process-global; this lock keeps "seed, then draw" atomic when
/// several threads build models (tests, or a library user training in threads).
static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds libtorch's generator with `seed` and runs `f` while no other `with_seed` can draw.
pub fn with_seed<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    f()
}

/// Shape of one sample's features: what a unit outputs and a head reads. Heads adapt to the
/// kind (a linear head pools maps but reads vectors as they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureShape {
    /// Feature maps `[C, H, W]` (images, convolutional features).
    Map {
        /// Channels.
        c: i64,
        /// Height.
        h: i64,
        /// Width.
        w: i64,
    },
    /// Feature vectors `[N]` (MLP layers).
    Vector {
        /// Features.
        n: i64,
    },
    /// A sequence of `t` tokens of width `d`, `[T, D]` (Transformer blocks). With `cls`, token 0
    /// is a class token and pooling reads it; otherwise pooling averages the tokens.
    Tokens {
        /// Tokens (the class token included).
        t: i64,
        /// Width of each token.
        d: i64,
        /// Whether token 0 is a class token.
        cls: bool,
    },
}

impl FeatureShape {
    /// A feature-map shape.
    pub fn map(c: i64, h: i64, w: i64) -> Self {
        FeatureShape::Map { c, h, w }
    }

    /// Elements per sample.
    pub fn elems(&self) -> i64 {
        match *self {
            FeatureShape::Map { c, h, w } => c * h * w,
            FeatureShape::Vector { n } => n,
            FeatureShape::Tokens { t, d, .. } => t * d,
        }
    }

    /// Channels of a map, features of a vector or width of a token: the width a pooled head
    /// reads.
    pub fn channels(&self) -> i64 {
        match *self {
            FeatureShape::Map { c, .. } => c,
            FeatureShape::Vector { n } => n,
            FeatureShape::Tokens { d, .. } => d,
        }
    }
}

impl std::fmt::Display for FeatureShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureShape::Map { c, h, w } => write!(f, "{c}x{h}x{w} feature maps"),
            FeatureShape::Vector { n } => write!(f, "vectors of {n}"),
            FeatureShape::Tokens { t, d, .. } => write!(f, "{t} tokens of width {d}"),
        }
    }
}

/// Everything needed to build a [`SplitNet`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Network.
    pub arch: Arch,
    /// Number of modules K (1 = the whole network is one module).
    pub modules: usize,
    /// How units are divided among modules.
    pub split: SplitStrategy,
    /// Auxiliary head type for modules 1..K-1.
    pub head: HeadKind,
    /// Input shape (from the data set).
    pub input: FeatureShape,
    /// Number of classes (from the data set).
    pub classes: i64,
    /// What the rule adds to the memory of some modules (SGR), for `--split balanced-memory`.
    #[serde(default)]
    pub penalty_cost: Option<splits::PenaltyCost>,
    /// Network options that are not part of the name (patch size, token pooling).
    #[serde(default)]
    pub options: NetOptions,
    /// Label smoothing ε of every module's cross-entropy ([`SplitNet::loss`]).
    #[serde(default)]
    pub label_smoothing: f64,
    /// The local loss of modules 1..K-1 (`--local-loss`; the last module trains on
    /// cross-entropy).
    #[serde(default)]
    pub local_loss: LocalLossSpec,
}

/// A network cut into K modules, each with a classifier head.
pub struct SplitNet {
    /// Every variable: backbone, classifier `fc`, auxiliary heads `aux.{unit}.*`.
    pub vs: nn::VarStore,
    /// What was built.
    pub spec: ModelSpec,
    units: Vec<network::UnitSpec>,
    modules: Vec<Range<usize>>,
    heads: Vec<Head>,
    /// Every module's local loss (the last one's is cross-entropy).
    losses: Vec<LocalLoss>,
    /// Variable-name prefixes of every module's head.
    head_prefixes: Vec<Vec<String>>,
}

impl std::fmt::Debug for SplitNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitNet")
            .field("spec", &self.spec)
            .field("modules", &self.modules)
            .finish()
    }
}

impl SplitNet {
    /// Builds the network with tch's current global seed and moves it to `device`.
    ///
    /// Weights are always drawn on the CPU: CUDA has its own random generator, so drawing there
    /// would give a different network for the same seed, and a CPU run could not be compared
    /// with a GPU run step for step.
    pub fn new(spec: &ModelSpec, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let network = spec.arch.network();
        let network::Built { units, features } = network.build(&root, spec.input, &spec.options)?;
        let weights: Vec<i64> = units.iter().map(|u| u.activation_elems).collect();
        let modules = splits::split(
            network,
            spec.modules,
            spec.split,
            &weights,
            spec.penalty_cost,
        )?;
        let mut heads = Vec::with_capacity(modules.len());
        let mut losses = Vec::with_capacity(modules.len());
        let mut head_prefixes = Vec::with_capacity(modules.len());
        let outputs = spec.local_loss.head_outputs(spec.classes);
        for (k, range) in modules[..modules.len() - 1].iter().enumerate() {
            let last = range.end - 1;
            let p = &root / "aux" / last;
            heads.push(Head::new(&p, spec.head, units[last].out, outputs)?);
            // The loss's own layers sit under the head's prefix: they are the head's.
            losses.push(LocalLoss::new(
                &p,
                &spec.local_loss,
                (k, modules.len()),
                units[last].out,
                spec.input,
                spec.classes,
            )?);
            head_prefixes.push(vec![format!("aux.{last}.")]);
        }
        heads.push(Head::classifier(&root, features, spec.classes));
        losses.push(LocalLoss::ce());
        head_prefixes.push(Head::classifier_prefixes(features));
        if device != Device::Cpu {
            vs.set_device(device);
        }
        Ok(SplitNet {
            vs,
            spec: spec.clone(),
            units,
            modules,
            heads,
            losses,
            head_prefixes,
        })
    }

    /// K.
    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }

    /// The unit range of every module.
    pub fn module_ranges(&self) -> &[Range<usize>] {
        &self.modules
    }

    /// Device of the variables.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Device of module `k`'s variables (pipeline stages may be placed on different devices;
    /// otherwise [`SplitNet::device`]).
    pub fn module_device(&self, k: usize) -> Device {
        self.module_variables(k, true)
            .first()
            .map_or_else(|| self.device(), |(_, t)| t.device())
    }

    /// Runs module `k`'s units on `x`.
    ///
    /// # Shapes
    /// `[B, C_in, H, W]` -> `[B, C_k, H_k, W_k]` (maps) or `[B, N_k]` (vectors).
    pub fn forward_module(&self, k: usize, x: &Tensor, train: bool) -> Tensor {
        let range = self.modules[k].clone();
        let mut h = self.units[range.start].layer.forward_t(x, train);
        for unit in &self.units[range.start + 1..range.end] {
            h = unit.layer.forward_t(&h, train);
        }
        h
    }

    /// The local (training) loss of logits `[B, classes]` against `labels` `[B]`: mean
    /// cross-entropy with the spec's label smoothing, in the logits' precision. Every rule
    /// trains every module on this loss; evaluation reports plain cross-entropy.
    ///
    /// Inside a reduced-precision step ([`crate::precision`]) the logits are read in f32 and
    /// the loss's gradient carries the step's loss scale (its value does not).
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        let logits = crate::precision::loss_logits(logits);
        let loss = crate::rules::cross_entropy_smoothed(&logits, labels, self.spec.label_smoothing);
        crate::precision::scale_grad(&loss)
    }

    /// [`SplitNet::loss`] and its tangent for logits `(z, ż)`.
    pub fn loss_dual(&self, logits: &Dual, labels: &Tensor) -> Dual {
        use crate::precision::{loss_logits, scale_grad};
        let logits = (loss_logits(&logits.0), loss_logits(&logits.1));
        let (loss, tangent) = dual::cross_entropy(&logits, labels, self.spec.label_smoothing);
        (scale_grad(&loss), scale_grad(&tangent))
    }

    /// Module `k`'s local training loss on its output `h` (`--local-loss`; cross-entropy for
    /// the last module) and its head's output, for `labels` and the step's input `images`
    /// (which InfoPro's decoder reconstructs). Every local rule trains module `k` on this.
    pub fn local_loss(
        &self,
        k: usize,
        h: &Tensor,
        labels: &Tensor,
        images: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let head_out = self.heads[k].forward_t(h, train);
        let smoothing = self.spec.label_smoothing;
        // As in [`SplitNet::loss`]: the head's output in f32 inside a reduced-precision step,
        // and the step's loss scale on the gradient (not the value).
        let read = crate::precision::loss_logits(&head_out);
        let loss = self.losses[k].loss((&read, h), (labels, images), smoothing, train);
        (crate::precision::scale_grad(&loss), head_out)
    }

    /// [`SplitNet::local_loss`]'s value and tangent on `h = (h, ḣ)` (training-mode statistics,
    /// running statistics untouched).
    pub fn local_loss_dual(&self, k: usize, h: &Dual, labels: &Tensor, images: &Tensor) -> Dual {
        use crate::precision::{loss_logits, scale_grad};
        let (z, z_dot) = self.heads[k].forward_dual(h);
        let head_out = (loss_logits(&z), loss_logits(&z_dot));
        let smoothing = self.spec.label_smoothing;
        let (loss, tangent) = self.losses[k].loss_dual((&head_out, h), (labels, images), smoothing);
        (scale_grad(&loss), scale_grad(&tangent))
    }

    /// Logits of module `k`'s head on its output `h` -> `[B, classes]`.
    pub fn head_logits(&self, k: usize, h: &Tensor, train: bool) -> Tensor {
        self.heads[k].forward_t(h, train)
    }

    /// Runs unit `u` alone (units are numbered over the whole network; see
    /// [`SplitNet::module_ranges`]).
    pub fn forward_unit(&self, u: usize, x: &Tensor, train: bool) -> Tensor {
        self.units[u].layer.forward_t(x, train)
    }

    /// Unit `u`'s value and tangent on `input = (x, ẋ)` (training-mode statistics, running
    /// statistics untouched); see [`dual`].
    pub fn unit_forward_dual(&self, u: usize, input: &Dual) -> Dual {
        self.units[u].layer.forward_dual(input)
    }

    /// Module `k`'s head logits and their tangent on `input = (h, ḣ)`.
    pub fn head_logits_dual(&self, k: usize, input: &Dual) -> Dual {
        self.heads[k].forward_dual(input)
    }

    /// The whole network end to end (the last module's classifier): `[B, C, H, W]` -> logits.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for unit in &self.units {
            h = unit.layer.forward_t(&h, train);
        }
        self.heads[self.num_modules() - 1].forward_t(&h, train)
    }

    /// Output shape of module `k` for one sample.
    pub fn module_output_shape(&self, k: usize) -> FeatureShape {
        self.units[self.modules[k].end - 1].out
    }

    /// Analytic activation bytes module `k` keeps alive for backward at batch size `batch`
    /// (f32): its input, the intermediates its units and its head create.
    pub fn module_activation_bytes(&self, k: usize, batch: i64) -> i64 {
        let range = self.modules[k].clone();
        let input = if range.start == 0 {
            self.spec.input.elems()
        } else {
            self.units[range.start - 1].out.elems()
        };
        let units: i64 = self.units[range].iter().map(|u| u.activation_elems).sum();
        let head_kind = if k + 1 == self.num_modules() {
            HeadKind::Linear
        } else {
            self.spec.head
        };
        let head = Head::activation_elems(head_kind, self.module_output_shape(k));
        let extra = if k + 1 == self.num_modules() {
            0
        } else {
            LocalLoss::activation_elems(
                &self.spec.local_loss,
                self.module_output_shape(k),
                self.spec.input,
            )
        };
        4 * batch * (input + units + head + extra)
    }

    /// Parameter count of every head, named by its first variable prefix (`aux.{unit}` or
    /// `fc`).
    pub fn head_parameter_counts(&self) -> Vec<(String, i64)> {
        let vars = self.vs.variables();
        self.head_prefixes
            .iter()
            .map(|prefixes| {
                let n = vars
                    .iter()
                    .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
                    .map(|(_, t)| t.numel() as i64)
                    .sum();
                (prefixes[0].trim_end_matches('.').to_string(), n)
            })
            .collect()
    }

    /// The module that owns variable `name` (its units or its head), if any.
    pub fn module_of_variable(&self, name: &str) -> Option<usize> {
        (0..self.num_modules())
            .find(|&k| self.module_prefixes(k).iter().any(|p| name.starts_with(p)))
    }

    /// Variables weight decay must skip besides rank-1 tensors (the network's list).
    pub fn no_weight_decay(&self) -> Vec<String> {
        self.spec.arch.network().no_weight_decay()
    }

    /// Variable-name prefixes of module `k`: its units and its head.
    fn module_prefixes(&self, k: usize) -> Vec<String> {
        let range = self.modules[k].clone();
        self.units[range]
            .iter()
            .flat_map(|u| u.prefixes.iter().cloned())
            .chain(self.head_prefixes[k].iter().cloned())
            .collect()
    }

    /// Module `k`'s variables (units and head), sorted by name; `trainable` selects parameters
    /// (true) or buffers such as BatchNorm running statistics (false).
    pub fn module_variables(&self, k: usize, trainable: bool) -> Vec<(String, Tensor)> {
        let prefixes = self.module_prefixes(k);
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, t)| {
                t.requires_grad() == trainable && prefixes.iter().any(|p| name.starts_with(p))
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Runs `f` and then restores every buffer (BatchNorm running statistics) to its value
    /// before `f`: extra forward passes made for diagnostics or finite differences must not
    /// count as training steps of the running statistics.
    pub fn with_frozen_buffers<T>(&self, f: impl FnOnce() -> T) -> T {
        restoring(self.buffers(), f)
    }

    /// Every buffer of the network (BatchNorm running statistics), in no particular order.
    pub fn buffers(&self) -> Vec<Tensor> {
        let variables = self.vs.variables().into_values();
        variables.filter(|t| !t.requires_grad()).collect()
    }

    /// [`SplitNet::with_frozen_buffers`] for module `k`'s buffers only (units and head), the
    /// only ones a pass through module `k` can move; cheaper when called every step.
    pub fn with_frozen_module_buffers<T>(&self, k: usize, f: impl FnOnce() -> T) -> T {
        let buffers = self.module_variables(k, false).into_iter().map(|(_, t)| t);
        restoring(buffers.collect(), f)
    }

    /// Trainable parameter count (backbone + all heads).
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

/// Runs `f`, then writes back the values `buffers` had before it.
fn restoring<T>(buffers: Vec<Tensor>, f: impl FnOnce() -> T) -> T {
    let saved: Vec<Tensor> = buffers.iter().map(|t| t.detach().copy()).collect();
    let out = f();
    tch::no_grad(|| {
        for (mut t, saved) in buffers.into_iter().zip(saved) {
            t.copy_(&saved);
        }
    });
    out
}
