//! The training configuration: one flat set of fields, given as command-line flags, in a TOML
//! file (`--config`, same field names with `_`), or both (flags win), and saved resolved in every
//! run folder as `config.json`.
//!
//! [`TrainOptions`] is what a user typed (every field optional); [`TrainConfig`] is the resolved
//! configuration with defaults filled in. Both are the same field list, so a flag and a config
//! key can never drift apart.
use crate::data::DatasetKind;
use crate::model::{
    Arch, FeatureShape, HeadKind, InfoproClass, LocalLossKind, LocalLossSpec, ModelSpec,
    NetOptions, SplitStrategy, TokenPool,
};
use crate::optim::{OptimConfig, OptimizerKind};
use crate::rules::{
    FgConfig, FgGuess, LambdaSchedule, RuleKind, SgrConfig, SgrDistance, SgrGrad, SgrSide,
};
use crate::schedule::{Schedule, ScheduleKind};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What to do when a loss or gradient becomes NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnNan {
    /// Stop with an error, keeping the last good checkpoint.
    #[default]
    Stop,
    /// Skip the batch's update and go on (stops after 10 consecutive bad batches).
    SkipBatch,
}

/// How pipeline stages are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Distributed {
    /// Threads in one process.
    #[default]
    None,
    /// One MPI rank per stage and replica (`mpirun -np W×R`).
    Mpi,
}

/// Compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

impl DeviceKind {
    /// The libtorch device, or an error naming why CUDA is unavailable.
    pub fn tch_device(self) -> Result<tch::Device> {
        match self {
            DeviceKind::Cpu => Ok(tch::Device::Cpu),
            DeviceKind::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            DeviceKind::Cuda => Err(Error::Config(
                "--device cuda: no CUDA device is available (or the binary was built without --features cuda)".into(),
            )),
        }
    }

    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

macro_rules! config_fields {
    ($( $(#[doc = $doc:literal])* $([arg($($arg:tt)*)])? $([negation($neg:ident = $neg_flag:literal)])? $name:ident : $ty:ty = $default:expr ; )*) => {
        /// A fully resolved training configuration (saved as `config.json` in the run folder).
        /// A field missing from a saved file takes its default, so configurations written
        /// before a field existed still read (and mean what they meant: every new field's
        /// default is the old behaviour).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                TrainConfig { $( $name: $default, )* }
            }
        }

        /// Training options as typed: flags, or keys of a `--config` TOML file. Unset fields
        /// take the value from the file, then the default.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct TrainOptions {
            $(
                $(#[doc = $doc])*
                #[arg(long $(, $($arg)*)? $(, overrides_with = stringify!($neg))?)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $name: Option<$ty>,
            )*
            $($(
                /// The negation switch of the field it names (a flag only, never a config key).
                #[arg(
                    long = $neg_flag,
                    overrides_with = stringify!($name),
                    help = concat!("Sets ", stringify!($name), " to false, like --", stringify!($name), "=false (in a config file: ", stringify!($name), " = false)")
                )]
                #[serde(skip)]
                pub $neg: bool,
            )?)*
        }

        impl TrainOptions {
            /// The options with every negation switch (`--no-augment`) folded into its field,
            /// so that only config keys are left: a negation is a flag, not a config key.
            pub fn folded(&self) -> TrainOptions {
                let mut o = self.clone();
                $($(
                    if o.$neg {
                        o.$name = Some(false);
                        o.$neg = false;
                    }
                )?)*
                o
            }
        }
    };
}

config_fields! {
    /// Data set [default: fashion-mnist]
    data: DatasetKind = DatasetKind::FashionMnist;
    /// Folder holding the data sets [default: data]
    data_dir: PathBuf = PathBuf::from("data");
    /// Network: resnet20, resnet32, resnet56, resnet110 (CIFAR), resnet18, resnet34, resnet50, resnet101, resnet152 (ImageNet), mlp-DxW (D hidden layers of width W, e.g. mlp-8x256), vit-micro, vit-tiny, vit-small or vit-DxWhH (D blocks of width W, H heads) [default: resnet32]
    model: Arch = "resnet32".parse().expect("a registered network");
    /// ViT patch size (0 = from the input: 4 for 28/32 px, 8 for 64/96 px, 16 for 224 px) [default: 0]
    patch_size: i64 = 0;
    /// How ViT heads pool tokens: cls (a class token) or mean (no class token, token mean) [default: cls]
    token_pool: TokenPool = TokenPool::Cls;
    /// Training rule [default: bp]
    rule: RuleKind = RuleKind::Bp;
    /// Number of gradient-isolated modules K [default: 1]
    modules: usize = 1;
    /// How units are divided among modules [default: table]
    split: SplitStrategy = SplitStrategy::Table;
    /// Auxiliary head of modules 1..K-1: conv (DGL's), linear, mlp, block (ViTs) or imagenet (InfoPro's ImageNet head) [default: conv on feature maps (ResNets), linear on vectors and tokens (MLPs, ViTs)]
    aux_head: HeadKind = HeadKind::Conv;
    /// Epochs [default: 10]
    epochs: usize = 10;
    /// Mini-batch size [default: 128]
    batch_size: i64 = 128;
    /// Base learning rate [default: 0.1]
    lr: f64 = 0.1;
    /// Optimizer: sgd (momentum, Nesterov) or adamw (decoupled weight decay) [default: sgd]
    optimizer: OptimizerKind = OptimizerKind::Sgd;
    /// SGD momentum [default: 0.9]
    momentum: f64 = 0.9;
    /// AdamW β1 [default: 0.9]
    adam_beta1: f64 = 0.9;
    /// AdamW β2 [default: 0.999]
    adam_beta2: f64 = 0.999;
    /// AdamW ε [default: 1e-8]
    adam_eps: f64 = 1e-8;
    /// Nesterov momentum (a switch; `--nesterov=false` turns it off) [default: false]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    nesterov: bool = false;
    /// Weight decay (L2 for sgd, decoupled for adamw; DeiT uses 0.05 with adamw) [default: 5e-4]
    weight_decay: f64 = 5e-4;
    /// Apply weight decay to norm parameters, biases, position embeddings and class tokens too (a switch) [default: false]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    decay_bn_and_bias: bool = false;
    /// LR schedule [default: cosine]
    schedule: ScheduleKind = ScheduleKind::Cosine;
    /// Linear warm-up epochs (fractional allowed) [default: 0]
    warmup_epochs: f64 = 0.0;
    /// Step-schedule milestone epochs, comma-separated [default: none]
    [arg(value_delimiter = ',')]
    milestones: Vec<usize> = Vec::new();
    /// Step-schedule decay factor [default: 0.1]
    gamma: f64 = 0.1;
    /// Label smoothing ε of every module's cross-entropy (0 = none; DeiT uses 0.1) [default: 0]
    label_smoothing: f64 = 0.0;
    /// Local loss of modules 1..K-1 under dgl and sgr: ce (the head's cross-entropy), infopro (input reconstruction + classification, Wang et al. 2021) or predsim (prediction + similarity matching, Nøkland & Eidnes 2019); the last module always trains on cross-entropy [default: ce]
    local_loss: LocalLossKind = LocalLossKind::Ce;
    /// InfoPro's reconstruction weight λ1 at module 1 and at module K-1, comma-separated (interpolated linearly between; empty = the published ResNet-32 values for K, see README) [default: published]
    [arg(value_delimiter = ',')]
    infopro_recon_weights: Vec<f64> = Vec::new();
    /// InfoPro's classification weight λ2 at module 1 and at module K-1, comma-separated (empty = published, as --infopro-recon-weights) [default: published]
    [arg(value_delimiter = ',')]
    infopro_class_weights: Vec<f64> = Vec::new();
    /// InfoPro's classification term: softmax (the head's cross-entropy) or contrast (supervised contrastive loss of 128 normalised head outputs) [default: softmax]
    infopro_class: InfoproClass = InfoproClass::Softmax;
    /// Temperature of InfoPro's contrastive term [default: 0.07]
    infopro_temperature: f64 = 0.07;
    /// PredSim's β: weight of the similarity term, (1 − β) that of the prediction term [default: 0.99]
    predsim_beta: f64 = 0.99;
    /// Clip each module's gradient norm to this value before the update (the whole network's under bp; 0 = no clipping) [default: 0]
    clip_grad_norm: f64 = 0.0;
    /// Random seed (weights, shuffling, augmentation) [default: 0]
    seed: u64 = 0;
    /// CPU threads for libtorch, per pipeline worker (0 = libtorch's default, one per core; with --workers W the cores are shared evenly among the workers) [default: 0]
    threads: usize = 0;
    /// Train on the first N training images only (0 = all) [default: 0]
    train_subset: usize = 0;
    /// Evaluate on the first N test images only (0 = all) [default: 0]
    test_subset: usize = 0;
    /// Hold out the last N training images and evaluate on them instead of the test split, to choose settings without looking at the test set (0 = evaluate on the test split) [default: 0]
    holdout: usize = 0;
    /// Data augmentation (crop, plus flip for CIFAR); `--no-augment` turns it off [default: true]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    [negation(no_augment = "no-augment")]
    augment: bool = true;
    /// Random erasing probability per training image (a random rectangle replaced by noise, as timm's RandomErasing in pixel mode; 0 = off; DeiT uses 0.25) [default: 0]
    random_erasing: f64 = 0.0;
    /// Stop each epoch after N steps (0 = full epochs; for smoke tests and benchmarks) [default: 0]
    max_steps_per_epoch: usize = 0;
    /// SGR penalty weight λ [default: 0.1]
    lambda: f64 = 0.1;
    /// SGR gradient distance: l2, cosine (batch-flattened) or cosine-sample (mean per-sample cosine) [default: l2]
    sgr_distance: SgrDistance = SgrDistance::L2;
    /// First module (1-based) that SGR regularises [default: 2]
    sgr_from: usize = 2;
    /// Apply the SGR penalty every N steps [default: 1]
    sgr_every: usize = 1;
    /// SGR penalty gradient: exact double backward, jvp (exact, tangents + recomputation, less memory, slower) or fd (finite difference) [default: exact]
    sgr_grad: SgrGrad = SgrGrad::Exact;
    /// Relative finite-difference step of --sgr-grad fd (see BENCHMARKS.md for how 3e-2 was chosen) [default: 3e-2]
    fd_eps: f64 = 3e-2;
    /// Which side of each boundary SGR penalises: receiver (module k matches its input gradient to module k-1's output gradient), sender (module k-1 matches its output gradient to module k's input gradient) or both [default: receiver]
    sgr_side: SgrSide = SgrSide::Receiver;
    /// How λ changes over training: constant, warmup (linear ramp from 0) or decay (linear to 0) [default: constant]
    lambda_schedule: LambdaSchedule = LambdaSchedule::Constant;
    /// Epochs the λ warm-up or decay spans (0 = the whole run) [default: 0]
    lambda_schedule_epochs: f64 = 0.0;
    /// Tangents N averaged per module and step by --rule fg [default: 1]
    fg_tangents: usize = 1;
    /// Tangent directions of --rule fg: random (Gaussian, strictly BP-free) or local (Fournier et al.'s local-loss guess, which needs a reverse pass) [default: random]
    fg_guess: FgGuess = FgGuess::Random;
    /// Rules fg and fg-sgr run each tangent twice, the second pass regenerating its directions from their seed and applying every layer's rule as soon as the layer has run: the step holds one layer's tensors instead of the module's, for about twice the time (a switch; `--fg-recompute=false` turns it off) [default: false]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    fg_recompute: bool = false;
    /// Measure gradient discord every N steps (0 = never) [default: 50]
    diag_every: usize = 50;
    /// What to do on a NaN/Inf loss or gradient [default: stop]
    on_nan: OnNan = OnNan::Stop;
    /// Compute device [default: cpu]
    device: DeviceKind = DeviceKind::Cpu;
    /// Side length of the square images of a streamed set (--data imagefolder) [default: 224]
    image_size: i64 = crate::data::DEFAULT_IMAGE_SIZE;
    /// Decode threads for a streamed set; the batches do not depend on it [default: 1]
    loader_workers: usize = 1;
    /// Log and skip unreadable images of a streamed set instead of stopping (a switch) [default: false]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    skip_bad_images: bool = false;
    /// Precision of training steps: fp32, bf16 (autocast) or fp16 (autocast with dynamic loss scaling); evaluation stays fp32 [default: fp32]
    precision: crate::precision::Precision = crate::precision::Precision::Fp32;
    /// Pipeline workers W: the K modules are grouped into W contiguous stages, each trained on its own thread (or MPI rank) as soon as its input arrives; bit-identical to W = 1 (README, Scaling out) [default: 1]
    workers: usize = 1;
    /// Device of each pipeline stage, comma-separated: cpu, cuda or cuda:N (empty = --device for every stage) [default: --device]
    [arg(value_delimiter = ',')]
    devices: Vec<String> = Vec::new();
    /// Run the stages as processes: none (threads in this process) or mpi (one MPI rank per stage and replica, under mpirun; needs a build with --features mpi) [default: none]
    distributed: Distributed = Distributed::None;
    /// Data-parallel replicas R of the whole pipeline (--distributed mpi; mpirun -np W×R): each takes 1/R of every batch and each stage's gradients are averaged over its replicas [default: 1]
    replicas: usize = 1;
    /// Keep the input batches and the convolution weights in channels-last (NHWC) memory layout (a switch) [default: false]
    [arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    channels_last: bool = false;
}

/// Fields that may differ from the saved config when a run is resumed (`epochs` only where
/// the schedule does not depend on it, see [`TrainConfig::resolve`]).
const RESUMABLE_OVERRIDES: &[&str] = &[
    "epochs",
    // The pipeline computes what one worker does (bit for bit on the CPU).
    "workers",
    "devices",
    "distributed",
    "threads",
    "data_dir",
    "diag_every",
    "on_nan",
    "device",
    "loader_workers",
    "skip_bad_images",
];

fn overlay(base: &mut serde_json::Value, top: serde_json::Value) {
    if let (Some(b), serde_json::Value::Object(t)) = (base.as_object_mut(), top) {
        for (k, v) in t {
            b.insert(k, v);
        }
    }
}

/// Reads a `--config` TOML file; unknown keys and bad values are errors naming the file, line
/// and key.
pub fn read_options_file(path: &Path) -> Result<TrainOptions> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_options(&text).map_err(|reason| Error::Config(format!("{}: {reason}", path.display())))
}

/// Parses TOML config text into options; the error is one line (`line N: message`).
pub fn parse_options(text: &str) -> std::result::Result<TrainOptions, String> {
    parse_toml(text)
}

/// Deserialises TOML text; the error is one line, `line N: message`, so that the binary can
/// print it as a single `error:` line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    toml::from_str::<T>(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().replace('\n', " ");
        match line {
            Some(l) => format!("line {l}: {msg}"),
            None => msg,
        }
    })
}

impl TrainConfig {
    /// Resolves `flags` over `file` over the defaults (or over `saved`, when resuming).
    ///
    /// A resumed run is the same run: every value set by a flag or by the file must equal the
    /// saved one, except the [`RESUMABLE_OVERRIDES`]; `epochs` may change only where no
    /// schedule depends on it (`step` or `constant` learning rate, and a constant λ or one
    /// whose schedule spans `lambda_schedule_epochs`), since a schedule stretched to a new
    /// total would no longer be the one the past epochs followed.
    pub fn resolve(
        flags: &TrainOptions,
        file: Option<&TrainOptions>,
        saved: Option<&TrainConfig>,
    ) -> Result<Self> {
        let flags = flags.folded();
        let mut merged = match saved {
            Some(s) => to_value(s),
            None => to_value(&TrainConfig::default()),
        };
        if let Some(saved) = saved {
            let saved_value = to_value(saved);
            let flags_value = to_value(&flags);
            let file_value = file.map(|f| to_value(&f.folded()));
            // What the flags set, then what only the file sets (flags win over the file).
            let file_only = file_value
                .iter()
                .flat_map(|v| v.as_object().into_iter().flatten())
                .filter(|(key, _)| flags_value.get(key.as_str()).is_none());
            let given = flags_value
                .as_object()
                .into_iter()
                .flatten()
                .map(|kv| (kv, true))
                .chain(file_only.map(|kv| (kv, false)));
            for ((key, value), from_flag) in given {
                let was = saved_value.get(key);
                if was == Some(value) {
                    continue;
                }
                let name = if from_flag {
                    format!("--{}", key.replace('_', "-"))
                } else {
                    format!("{key} (in the --config file)")
                };
                let was = was.map(|v| v.to_string()).unwrap_or_default();
                if !RESUMABLE_OVERRIDES.contains(&key.as_str()) {
                    return Err(Error::Config(format!(
                        "{name} cannot change when resuming (the run has {was}, this asks for {value}); only {} may; leave it out or start a new run in another --out",
                        RESUMABLE_OVERRIDES.join(", ")
                    )));
                }
                if key == "epochs" {
                    // What of the run is a function of the total number of epochs.
                    let depends = if saved.schedule == ScheduleKind::Cosine {
                        Some(("the cosine schedule", "the rate"))
                    } else if saved.lambda_schedule != LambdaSchedule::Constant
                        && saved.lambda_schedule_epochs == 0.0
                    {
                        Some(("a --lambda-schedule over the whole run", "λ"))
                    } else {
                        None
                    };
                    if let Some((what, quantity)) = depends {
                        return Err(Error::Config(format!(
                            "{name} cannot change when resuming a run with {what} (the run has {was}, this asks for {value}): {quantity} at every step depends on the total, so the epochs already trained would no longer follow it; start a new run in another --out with --epochs {value} (runs with --schedule step or constant, and a constant λ or a --lambda-schedule-epochs span, can be extended)"
                        )));
                    }
                }
            }
        }
        if let Some(file) = file {
            overlay(&mut merged, to_value(&file.folded()));
        }
        overlay(&mut merged, to_value(&flags));
        let mut cfg: TrainConfig = serde_json::from_value(merged)
            .map_err(|e| Error::Config(format!("bad configuration: {e}")))?;
        // The default head reads feature maps; a new run on a network without them gets the
        // linear head unless one was asked for (config.json then records `linear`).
        let head_given = flags.aux_head.is_some() || file.is_some_and(|f| f.aux_head.is_some());
        if saved.is_none() && !head_given && !cfg.model.network().outputs_maps() {
            cfg.aux_head = HeadKind::Linear;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that types alone do not rule out.
    pub fn validate(&self) -> Result<()> {
        let fail = |flag: &str, why: &str| Err(Error::Config(format!("--{flag}: {why}")));
        if self.epochs == 0 {
            return fail("epochs", "must be at least 1");
        }
        if self.batch_size < 2 {
            return fail(
                "batch-size",
                "must be at least 2 (BatchNorm needs two samples)",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return fail("lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return fail("momentum", "must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return fail("weight-decay", "must be >= 0");
        }
        for (flag, beta) in [
            ("adam-beta1", self.adam_beta1),
            ("adam-beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return fail(flag, "must be in [0, 1)");
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return fail("adam-eps", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return fail("label-smoothing", "must be in [0, 1)");
        }
        if !(self.clip_grad_norm.is_finite() && self.clip_grad_norm >= 0.0) {
            return fail("clip-grad-norm", "must be >= 0 (0 = no clipping)");
        }
        if !(0.0..=1.0).contains(&self.random_erasing) {
            return fail("random-erasing", "must be a probability in [0, 1]");
        }
        if self.patch_size < 0 {
            return fail("patch-size", "must be >= 1, or 0 to choose from the input");
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return fail("lambda", "must be >= 0");
        }
        if self.modules == 0 {
            return fail("modules", "must be at least 1");
        }
        if self.image_size < 8 {
            return fail("image-size", "must be at least 8");
        }
        if self.loader_workers == 0 {
            return fail("loader-workers", "must be at least 1");
        }
        if self.sgr_every == 0 {
            return fail("sgr-every", "must be at least 1");
        }
        if self.sgr_from < 2 {
            return fail(
                "sgr-from",
                "must be at least 2 (module 1 has no predecessor)",
            );
        }
        if !(self.fd_eps.is_finite() && self.fd_eps > 0.0) {
            return fail("fd-eps", "must be a positive number");
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            return fail("warmup-epochs", "must be >= 0");
        }
        self.validate_local_loss()?;
        self.validate_workers()?;
        // The split and the heads are checked here, before a run folder is written.
        crate::model::splits::check_k(&self.model, self.modules, self.split)?;
        let network = self.model.network();
        let outputs = if network.outputs_maps() {
            "feature maps"
        } else if network.outputs_tokens() {
            "tokens"
        } else {
            "vectors"
        };
        let map_head = matches!(self.aux_head, HeadKind::Conv | HeadKind::Imagenet);
        if self.modules > 1 && map_head && !network.outputs_maps() {
            return fail(
                "aux-head",
                &format!(
                    "{} needs feature maps, but {} outputs {outputs}; use --aux-head linear or mlp",
                    serde_json::to_value(self.aux_head)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    self.model
                ),
            );
        }
        if self.modules > 1 && self.aux_head == HeadKind::Block && !network.outputs_tokens() {
            return fail(
                "aux-head",
                &format!(
                    "block needs token features (a vit-* network), but {} outputs {outputs}",
                    self.model
                ),
            );
        }
        if !(self.lambda_schedule_epochs.is_finite() && self.lambda_schedule_epochs >= 0.0) {
            return fail("lambda-schedule-epochs", "must be >= 0");
        }
        if self.rule == RuleKind::Sgr && self.sgr_side != SgrSide::Receiver {
            if self.modules < 2 {
                return fail(
                    "sgr-side",
                    "sender and both need a boundary: use --modules 2 or more",
                );
            }
            if self.sgr_grad != SgrGrad::Exact {
                return fail(
                    "sgr-side",
                    "sender and both are computed with --sgr-grad exact only",
                );
            }
        }
        if self.fg_tangents == 0 {
            return fail("fg-tangents", "must be at least 1");
        }
        let rule = self.rule;
        if rule.forward_gradient() && self.precision != crate::precision::Precision::Fp32 {
            return fail(
                "precision",
                &format!(
                    "{} is not available with --rule {rule} (its estimates come from tangents, not from a backward that loss scaling and autocast were checked on); use --precision fp32",
                    self.precision
                ),
            );
        }
        if rule.forward_gradient() && self.channels_last {
            return fail(
                "channels-last",
                &format!(
                    "not available with --rule {rule} (its random tangents are drawn in memory order, so the layout would change the directions drawn for a seed)"
                ),
            );
        }
        if rule.forward_gradient() && self.fg_guess == FgGuess::Local {
            return fail(
                "fg-guess",
                &format!(
                    "local takes its guess from a reverse pass through the module, and --rule {rule} runs none (its module's target is that same local loss, so the guess would be the exact gradient: that is --rule dgl); use --fg-guess random"
                ),
            );
        }
        if rule == RuleKind::FgSgr {
            if self.sgr_distance != SgrDistance::L2 {
                return fail(
                    "sgr-distance",
                    "--rule fg-sgr supports l2 only: its penalty direction must be linear in the forward-gradient estimates to stay unbiased (a cosine puts them inside a nonlinearity)",
                );
            }
            if self.sgr_side != SgrSide::Receiver {
                return fail(
                    "sgr-side",
                    "--rule fg-sgr penalises the receiver side only (the sender side needs the next module's input gradient while the sending module still runs)",
                );
            }
            if self.sgr_grad != SgrGrad::Exact {
                return fail(
                    "sgr-grad",
                    "--rule fg-sgr estimates the penalty's gradient by nested forward mode; jvp and fd do not apply: leave --sgr-grad out",
                );
            }
        }
        if rule.reconciles() && self.sgr_from > self.modules {
            let fix = if self.modules < 2 {
                format!("--rule {rule} needs --modules 2 or more")
            } else {
                format!("use a value in 2..={}, or --rule dgl", self.modules)
            };
            let plain = if rule == RuleKind::Sgr { "dgl" } else { "fg" };
            return fail(
                "sgr-from",
                &format!(
                    "{} is larger than --modules {}, so no module would be regularised (the run would be {plain} under the name {rule}); {fix}",
                    self.sgr_from, self.modules
                ),
            );
        }
        Ok(())
    }

    /// The `--local-loss` checks: weights in range, and a rule and K that have local losses.
    /// The pipeline options (`--workers`, `--devices`, `--distributed`, `--replicas`).
    fn validate_workers(&self) -> Result<()> {
        let fail = |flag: &str, why: String| Err(Error::Config(format!("--{flag}: {why}")));
        if self.workers == 0 {
            return fail("workers", "must be at least 1".into());
        }
        if self.replicas == 0 {
            return fail("replicas", "must be at least 1".into());
        }
        if self.replicas > 1 && self.distributed != Distributed::Mpi {
            return fail(
                "replicas",
                "data-parallel replicas run as MPI ranks: add --distributed mpi".into(),
            );
        }
        if self.distributed == Distributed::Mpi && !crate::distributed::AVAILABLE {
            return Err(crate::distributed::not_built());
        }
        if !self.devices.is_empty() && self.devices.len() != self.workers {
            return fail(
                "devices",
                format!(
                    "{} device(s) for {} worker(s): give one per worker",
                    self.devices.len(),
                    self.workers
                ),
            );
        }
        for device in &self.devices {
            crate::pipeline::parse_device(device)?;
        }
        let mut distinct = self.devices.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > 1 && self.diag_every > 0 {
            return fail(
                "devices",
                "gradient diagnostics run the whole network on one device: with stages on several devices pass --diag-every 0".into(),
            );
        }
        if self.workers == 1 {
            return Ok(());
        }
        let w = self.workers;
        if self.rule == RuleKind::Bp {
            return fail(
                "workers",
                format!(
                    "{w}: rule bp back-propagates through the whole network, so it cannot be cut into stages; pipelines train local rules (dgl, sgr, fg, fg-sgr)"
                ),
            );
        }
        if w > self.modules {
            return fail(
                "workers",
                format!(
                    "{w}: more workers than the {} module(s) (--modules)",
                    self.modules
                ),
            );
        }
        if self.precision == crate::precision::Precision::Fp16 {
            return fail(
                "workers",
                format!(
                    "{w}: fp16's loss scale is one decision for all modules per step, which stages cannot share; use --precision bf16 or fp32"
                ),
            );
        }
        if self.on_nan == OnNan::SkipBatch {
            return fail(
                "workers",
                format!(
                    "{w}: --on-nan skip-batch would undo a batch that earlier stages already applied; use --on-nan stop"
                ),
            );
        }
        Ok(())
    }

    fn validate_local_loss(&self) -> Result<()> {
        let fail = |flag: &str, why: String| Err(Error::Config(format!("--{flag}: {why}")));
        for (flag, weights) in [
            ("infopro-recon-weights", &self.infopro_recon_weights),
            ("infopro-class-weights", &self.infopro_class_weights),
        ] {
            if !(weights.is_empty() || weights.len() == 2) {
                return fail(
                    flag,
                    format!(
                        "takes two weights (module 1, module K-1), comma-separated, or none for the published ones; got {}",
                        weights.len()
                    ),
                );
            }
            if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                return fail(flag, format!("{w} is out of range: weights must be >= 0"));
            }
        }
        if !(self.infopro_temperature.is_finite() && self.infopro_temperature > 0.0) {
            return fail(
                "infopro-temperature",
                format!("{} must be a positive number", self.infopro_temperature),
            );
        }
        if !(0.0..=1.0).contains(&self.predsim_beta) {
            return fail(
                "predsim-beta",
                format!("{} must be in [0, 1]", self.predsim_beta),
            );
        }
        if self.local_loss == LocalLossKind::Ce {
            return Ok(());
        }
        let loss = self.local_loss;
        if self.rule == RuleKind::Bp || self.rule.forward_gradient() {
            let why = match self.rule {
                RuleKind::Bp => "bp trains the whole network on the last module's cross-entropy and has no local losses".to_string(),
                rule => format!("{rule}'s forward gradients have local rules for the cross-entropy head only"),
            };
            return fail(
                "local-loss",
                format!("{loss} needs --rule dgl or sgr ({why}); use --local-loss ce"),
            );
        }
        if self.modules < 2 {
            return fail(
                "local-loss",
                format!(
                    "{loss} needs --modules 2 or more (the last module always trains on cross-entropy, so with one module there is no local loss)"
                ),
            );
        }
        let network = self.model.network();
        if loss == LocalLossKind::Infopro && !network.outputs_maps() {
            return fail(
                "local-loss",
                format!(
                    "infopro's decoder reconstructs the input image from feature maps, but {} outputs {}; use --local-loss ce or predsim",
                    self.model,
                    if network.outputs_tokens() {
                        "tokens"
                    } else {
                        "vectors"
                    }
                ),
            );
        }
        if loss == LocalLossKind::Predsim && network.outputs_tokens() {
            return fail(
                "local-loss",
                format!(
                    "predsim's similarity term reads feature maps or vectors, but {} outputs tokens; use --local-loss ce",
                    self.model
                ),
            );
        }
        Ok(())
    }

    /// The local loss of the model (the InfoPro weights resolved for K; the input's
    /// normalisation is the data set's, set by the trainer).
    pub fn local_loss_spec(&self) -> LocalLossSpec {
        let (recon, class) = crate::model::local_loss::published_weights(self.modules);
        let pair = |v: &Vec<f64>, published: [f64; 2]| match v.as_slice() {
            [a, b] => [*a, *b],
            _ => published,
        };
        LocalLossSpec {
            kind: self.local_loss,
            recon_weights: pair(&self.infopro_recon_weights, recon),
            class_weights: pair(&self.infopro_class_weights, class),
            class: self.infopro_class,
            temperature: self.infopro_temperature,
            beta: self.predsim_beta,
            input_mean: Vec::new(),
            input_std: Vec::new(),
        }
    }

    /// The model to build for data of `input` shape and `classes` classes.
    pub fn model_spec(&self, input: FeatureShape, classes: i64) -> ModelSpec {
        ModelSpec {
            arch: self.model.clone(),
            modules: self.modules,
            split: self.split,
            head: self.aux_head,
            input,
            classes,
            penalty_cost: crate::rules::penalty_cost(self.rule, &self.sgr()),
            options: NetOptions {
                patch_size: (self.patch_size > 0).then_some(self.patch_size),
                token_pool: self.token_pool,
            },
            label_smoothing: self.label_smoothing,
            local_loss: self.local_loss_spec(),
        }
    }

    /// Optimizer settings.
    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            kind: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            decay_bn_and_bias: self.decay_bn_and_bias,
            betas: (self.adam_beta1, self.adam_beta2),
            eps: self.adam_eps,
        }
    }

    /// LR schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            lr: self.lr,
            warmup_epochs: self.warmup_epochs,
            milestones: self.milestones.clone(),
            gamma: self.gamma,
        }
    }

    /// SGR settings.
    pub fn sgr(&self) -> SgrConfig {
        SgrConfig {
            lambda: self.lambda,
            distance: self.sgr_distance,
            from: self.sgr_from,
            every: self.sgr_every,
            grad: self.sgr_grad,
            fd_eps: self.fd_eps,
            side: self.sgr_side,
            schedule: self.lambda_schedule,
            schedule_epochs: if self.lambda_schedule_epochs > 0.0 {
                self.lambda_schedule_epochs
            } else {
                self.epochs as f64
            },
        }
    }

    /// Forward-gradient settings (rule `fg`).
    pub fn fg(&self) -> FgConfig {
        FgConfig {
            tangents: self.fg_tangents,
            guess: self.fg_guess,
            seed: self.seed,
            recompute: self.fg_recompute,
        }
    }

    /// The libtorch device.
    pub fn tch_device(&self) -> Result<tch::Device> {
        self.device.tch_device()
    }
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("config serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_memory_split_is_penalty_aware_for_sgr_only() {
        let input = FeatureShape::map(3, 32, 32);
        let ranges = |text: &str| {
            let cfg = TrainConfig::resolve(
                &TrainOptions::default(),
                Some(&parse_options(text).unwrap()),
                None,
            )
            .unwrap();
            let spec = cfg.model_spec(input, 10);
            let net = crate::model::SplitNet::new(&spec, tch::Device::Cpu).unwrap();
            (spec.penalty_cost, net.module_ranges().to_vec())
        };
        let base = "model = \"resnet32\"\nmodules = 4\nsplit = \"balanced-memory\"\n";
        let (dgl_cost, dgl) = ranges(&format!("{base}rule = \"dgl\"\n"));
        let (sgr_cost, sgr) = ranges(&format!("{base}rule = \"sgr\"\n"));
        let (off_cost, off) = ranges(&format!("{base}rule = \"sgr\"\nlambda = 0.0\n"));
        assert_eq!(dgl_cost, None);
        assert_eq!(off_cost, None);
        assert_eq!(off, dgl);
        assert_eq!(sgr_cost.map(|c| (c.from, c.factor)), Some((2, 2.5)));
        // Module 1 carries no penalty, so it takes more units under sgr.
        assert!(sgr[0].len() > dgl[0].len(), "sgr {sgr:?} dgl {dgl:?}");
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let file = parse_options("lr = 0.05\nepochs = 3\nmodel = \"resnet20\"\n").unwrap();
        let flags = TrainOptions {
            lr: Some(0.2),
            ..Default::default()
        };
        let cfg = TrainConfig::resolve(&flags, Some(&file), None).unwrap();
        assert_eq!(cfg.lr, 0.2);
        assert_eq!(cfg.epochs, 3);
        assert_eq!(cfg.model.to_string(), "resnet20");
        assert_eq!(cfg.batch_size, TrainConfig::default().batch_size);
    }

    #[test]
    fn unknown_or_bad_config_keys_name_the_key_and_line() {
        let e = parse_options("lr = 0.1\nlearning_rate = 0.1\n").unwrap_err();
        assert!(e.contains("learning_rate") && e.contains("line 2"), "{e}");
        let e = parse_options("model = \"resnet33\"\n").unwrap_err();
        assert!(e.contains("resnet33"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn the_default_head_follows_the_features_and_an_asked_one_is_kept() {
        let resolve = |model: &str, head: Option<HeadKind>| {
            let flags = TrainOptions {
                model: Some(model.parse().unwrap()),
                modules: Some(2),
                aux_head: head,
                ..Default::default()
            };
            TrainConfig::resolve(&flags, None, None).map(|c| c.aux_head)
        };
        assert_eq!(resolve("resnet20", None).unwrap(), HeadKind::Conv);
        assert_eq!(resolve("vit-micro", None).unwrap(), HeadKind::Linear);
        assert_eq!(resolve("mlp-4x8", None).unwrap(), HeadKind::Linear);
        assert_eq!(
            resolve("vit-micro", Some(HeadKind::Block)).unwrap(),
            HeadKind::Block
        );
        // Asking for conv on tokens is still refused, not silently replaced.
        let e = resolve("vit-micro", Some(HeadKind::Conv))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--aux-head") && e.contains("tokens"), "{e}");
    }

    #[test]
    fn resume_refuses_to_change_the_run_identity() {
        let saved = TrainConfig {
            rule: RuleKind::Dgl,
            modules: 4,
            ..Default::default()
        };
        let flags = TrainOptions {
            modules: Some(8),
            ..Default::default()
        };
        let e = TrainConfig::resolve(&flags, None, Some(&saved))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--modules"), "{e}");
        let flags = TrainOptions {
            threads: Some(1),
            modules: Some(4),
            ..Default::default()
        };
        let cfg = TrainConfig::resolve(&flags, None, Some(&saved)).unwrap();
        assert_eq!((cfg.threads, cfg.modules, cfg.rule), (1, 4, RuleKind::Dgl));
    }

    #[test]
    fn resume_checks_config_file_values_like_flags() {
        let saved = TrainConfig {
            rule: RuleKind::Dgl,
            modules: 4,
            ..Default::default()
        };
        let resume = |file: &str, flags: &TrainOptions| {
            TrainConfig::resolve(flags, Some(&parse_options(file).unwrap()), Some(&saved))
        };
        let none = TrainOptions::default();
        for (file, key) in [
            ("lr = 0.05\n", "lr (in the --config file)"),
            ("rule = \"sgr\"\n", "rule (in the --config file)"),
            ("sgr_every = 4\n", "sgr_every (in the --config file)"),
            ("batch_size = 64\n", "batch_size (in the --config file)"),
        ] {
            let e = resume(file, &none).unwrap_err().to_string();
            assert!(e.starts_with(key) && e.contains("cannot change"), "{e}");
        }
        // A flag that restores the saved value overrides a differing file value.
        let flags = TrainOptions {
            lr: Some(saved.lr),
            ..Default::default()
        };
        assert_eq!(resume("lr = 0.05\n", &flags).unwrap(), saved);
        // Values equal to the saved ones and the fields allowed to change pass; nothing else moves.
        let cfg = resume("lr = 0.1\nmodules = 4\nthreads = 1\n", &none).unwrap();
        assert_eq!(
            cfg,
            TrainConfig {
                threads: 1,
                ..saved.clone()
            }
        );
    }

    #[test]
    fn resume_refuses_new_epochs_where_a_schedule_spans_the_run() {
        let more = TrainOptions {
            epochs: Some(20),
            ..Default::default()
        };
        let cosine = TrainConfig::default();
        let e = TrainConfig::resolve(&more, None, Some(&cosine))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--epochs cannot change") && e.contains("cosine"),
            "{e}"
        );
        let e = TrainConfig::resolve(
            &TrainOptions::default(),
            Some(&parse_options("epochs = 20").unwrap()),
            Some(&cosine),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("epochs (in the --config file) cannot change"),
            "{e}"
        );
        // The same total is no change.
        let same = TrainOptions {
            epochs: Some(cosine.epochs),
            ..Default::default()
        };
        assert_eq!(
            TrainConfig::resolve(&same, None, Some(&cosine)).unwrap(),
            cosine
        );
        for kind in [ScheduleKind::Step, ScheduleKind::Constant] {
            let saved = TrainConfig {
                schedule: kind,
                ..Default::default()
            };
            let cfg = TrainConfig::resolve(&more, None, Some(&saved)).unwrap();
            assert_eq!(cfg.epochs, 20);
            // A λ schedule over the whole run depends on the total too; one with its own span
            // does not.
            let ramped = TrainConfig {
                lambda_schedule: LambdaSchedule::Warmup,
                ..saved
            };
            let e = TrainConfig::resolve(&more, None, Some(&ramped))
                .unwrap_err()
                .to_string();
            assert!(e.contains("--lambda-schedule over the whole run"), "{e}");
            let spanned = TrainConfig {
                lambda_schedule_epochs: 2.0,
                ..ramped
            };
            assert_eq!(
                TrainConfig::resolve(&more, None, Some(&spanned))
                    .unwrap()
                    .epochs,
                20
            );
        }
    }

    #[test]
    fn sgr_from_beyond_the_last_module_is_refused() {
        for (modules, from, ok) in [(2, 2, true), (3, 3, true), (2, 3, false), (1, 2, false)] {
            let flags = TrainOptions {
                rule: Some(RuleKind::Sgr),
                modules: Some(modules),
                sgr_from: Some(from),
                ..Default::default()
            };
            let r = TrainConfig::resolve(&flags, None, None);
            assert_eq!(r.is_ok(), ok, "K={modules} from={from}: {r:?}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(
                    e.starts_with("--sgr-from:") && e.contains(&format!("--modules {modules}")),
                    "{e}"
                );
            }
            // Other rules do not read --sgr-from.
            let dgl = TrainOptions {
                rule: Some(RuleKind::Dgl),
                ..flags
            };
            assert!(TrainConfig::resolve(&dgl, None, None).is_ok());
        }
    }

    #[test]
    fn boolean_flags_are_switches() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            options: TrainOptions,
        }
        let parse = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                std::iter::once("sgr").chain(args.iter().copied()),
            )
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            TrainConfig::resolve(&cli.options, None, None).unwrap()
        };
        let cfg = parse(&["--nesterov", "--no-augment", "--decay-bn-and-bias"]);
        assert!(cfg.nesterov && !cfg.augment && cfg.decay_bn_and_bias);
        let cfg = parse(&[]);
        assert!(!cfg.nesterov && cfg.augment && !cfg.decay_bn_and_bias);
        // An explicit value needs `=`; the last of --augment / --no-augment wins.
        assert!(!parse(&["--nesterov=false"]).nesterov);
        assert!(parse(&["--no-augment", "--augment"]).augment);
        assert!(!parse(&["--augment", "--no-augment"]).augment);
        assert!(!parse(&["--augment=false"]).augment);
        // A switch that is not given leaves the config file's value alone.
        let cli = <Cli as clap::Parser>::try_parse_from(["sgr", "--lr", "0.1"]).unwrap();
        let file = parse_options("augment = false\nnesterov = true\n").unwrap();
        let cfg = TrainConfig::resolve(&cli.options, Some(&file), None).unwrap();
        assert!(!cfg.augment && cfg.nesterov);
        // The negation is a flag, not a config key.
        assert!(parse_options("no_augment = true\n").is_err());
    }

    #[test]
    fn invalid_values_are_rejected() {
        for flags in [
            TrainOptions {
                lr: Some(-1.0),
                ..Default::default()
            },
            TrainOptions {
                batch_size: Some(1),
                ..Default::default()
            },
            TrainOptions {
                sgr_from: Some(1),
                ..Default::default()
            },
            TrainOptions {
                epochs: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                TrainConfig::resolve(&flags, None, None).is_err(),
                "{flags:?}"
            );
        }
    }
}
