//! The local loss of a module (`--local-loss`): what each non-final module's head is trained
//! on, and so what SGR's forwarded gradient is the gradient of.
//!
//! * `ce`: cross-entropy of the head's logits (DGL).
//! * `infopro` (Wang et al., ICLR 2021): `λ1·R + λ2·C`, where R is the binary cross-entropy of
//!   a small decoder's reconstruction of the input image from the module's output (upsampled
//!   bilinearly to the image size, conv3x3 → 12 channels, BatchNorm, ReLU, conv3x3 → image
//!   channels, sigmoid), and C is the head's cross-entropy (`softmax`) or the supervised
//!   contrastive loss of its L2-normalised outputs (`contrast`, temperature τ). λ1 and λ2 are
//!   interpolated linearly from the first module to module K-1, as the InfoPro repository does.
//! * `predsim` (Nøkland & Eidnes, ICML 2019): `(1 − β)·pred + β·sim`, where pred is the head's
//!   cross-entropy and sim the mean squared difference between the cosine-similarity matrix of
//!   the module's conv-projected output (per-channel standard deviation over positions) and
//!   that of the one-hot labels.
//!
//! The last module always trains on the network's own classifier with cross-entropy, as both
//! papers do. A loss's extra layers (decoder, projection) live under the head's variable prefix
//! (`aux.{unit}.decoder.*`, `aux.{unit}.sim.*`), so they are the head's: trained, checkpointed,
//! counted and frozen with it. Every term has a forward-mode tangent (`loss_dual`) for
//! `--sgr-grad jvp`.
use super::FeatureShape;
use super::dual::{self, Dual};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

/// Which local loss every non-final module trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LocalLossKind {
    /// Cross-entropy of the auxiliary head (DGL's loss).
    #[default]
    Ce,
    /// InfoPro: input reconstruction plus classification, weighted by depth.
    Infopro,
    /// PredSim: prediction cross-entropy plus similarity matching.
    Predsim,
}

impl LocalLossKind {
    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            LocalLossKind::Ce => "ce",
            LocalLossKind::Infopro => "infopro",
            LocalLossKind::Predsim => "predsim",
        }
    }
}

impl std::fmt::Display for LocalLossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// InfoPro's classification term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InfoproClass {
    /// Cross-entropy of the head's logits (the paper's "InfoPro (Softmax)").
    #[default]
    Softmax,
    /// Supervised contrastive loss of the head's normalised outputs ("InfoPro (Contrast)").
    Contrast,
}

/// Output width of the head under `--infopro-class contrast` (the repository's
/// `aux_net_feature_dim`, 128 in every published command).
pub const CONTRAST_DIM: i64 = 128;

/// The supervised contrastive loss's base temperature (fixed at 0.07 in InfoPro's loss).
const BASE_TEMPERATURE: f64 = 0.07;

/// Width of the decoder's hidden layer (InfoPro's decoder, `widen` 1).
const DECODER_WIDTH: i64 = 12;

/// The published (λ1, λ2) schedule of InfoPro's ResNet-32 CIFAR-10 commands: for K, the
/// reconstruction weight at module 1 and at module K-1, then the classification weight at the
/// same two. K not in the table takes K = 4's.
pub fn published_weights(k: usize) -> ([f64; 2], [f64; 2]) {
    match k {
        2 => ([5.0, 0.0], [1.0, 0.0]),
        8 => ([5.0, 0.0], [0.0, 2.0]),
        16 => ([5.0, 0.2], [0.05, 0.5]),
        _ => ([6.0, 1.0], [0.0, 2.0]),
    }
}

/// The local loss as a model needs it (saved in the model spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalLossSpec {
    /// Which loss.
    pub kind: LocalLossKind,
    /// InfoPro's reconstruction weight λ1 at module 1 and at module K-1.
    pub recon_weights: [f64; 2],
    /// InfoPro's classification weight λ2 at module 1 and at module K-1.
    pub class_weights: [f64; 2],
    /// InfoPro's classification term.
    pub class: InfoproClass,
    /// Temperature of InfoPro's contrastive term.
    pub temperature: f64,
    /// PredSim's β (weight of the similarity term).
    pub beta: f64,
    /// Per-channel mean the images were normalised with (the decoder's target is the image
    /// restored to [0, 1]); empty = the images are already in [0, 1].
    pub input_mean: Vec<f64>,
    /// Per-channel standard deviation the images were normalised with.
    pub input_std: Vec<f64>,
}

impl Default for LocalLossSpec {
    fn default() -> Self {
        let (recon_weights, class_weights) = published_weights(4);
        LocalLossSpec {
            kind: LocalLossKind::Ce,
            recon_weights,
            class_weights,
            class: InfoproClass::Softmax,
            temperature: 0.07,
            beta: 0.99,
            input_mean: Vec::new(),
            input_std: Vec::new(),
        }
    }
}

impl LocalLossSpec {
    /// (λ1, λ2) of module `k` (0-based) of `modules`: linear from module 1 to module K-1.
    pub fn infopro_weights(&self, k: usize, modules: usize) -> (f64, f64) {
        let r = if modules > 2 {
            k as f64 / (modules - 2) as f64
        } else {
            0.0
        };
        let lerp = |w: [f64; 2]| w[0] * (1.0 - r) + w[1] * r;
        (lerp(self.recon_weights), lerp(self.class_weights))
    }

    /// Output width of an auxiliary head for `classes` classes under this loss.
    pub fn head_outputs(&self, classes: i64) -> i64 {
        match (self.kind, self.class) {
            (LocalLossKind::Infopro, InfoproClass::Contrast) => CONTRAST_DIM,
            _ => classes,
        }
    }
}

/// InfoPro's decoder from a module's output back to the input image.
#[derive(Debug)]
struct Decoder {
    conv1: nn::Conv2D,
    bn: nn::BatchNorm,
    conv2: nn::Conv2D,
    /// Image height and width.
    size: [i64; 2],
    mean: Vec<f64>,
    std: Vec<f64>,
}

/// What a module's loss adds to its head.
#[derive(Debug)]
enum Term {
    Ce,
    Infopro {
        decoder: Box<Decoder>,
        recon: f64,
        class: f64,
        mode: InfoproClass,
        temperature: f64,
    },
    Predsim {
        /// The 3x3 projection of feature maps (none on vectors: they are compared as they are).
        projection: Option<nn::Conv2D>,
        beta: f64,
        classes: i64,
    },
}

/// One module's local loss, built once with its head. Cross-entropy terms take the label
/// smoothing of the call (the model spec's, read when the loss runs).
#[derive(Debug)]
pub struct LocalLoss {
    term: Term,
}

/// A 3x3 convolution with bias, weights N(0, 2/(9·c_out)) as InfoPro initialises every
/// convolution, bias PyTorch's default U(±1/√fan_in).
fn conv_bias(p: nn::Path, c_in: i64, c_out: i64) -> nn::Conv2D {
    let stdev = (2.0 / (9 * c_out) as f64).sqrt();
    let bound = 1.0 / ((9 * c_in) as f64).sqrt();
    let cfg = nn::ConvConfig {
        padding: 1,
        ws_init: nn::Init::Randn { mean: 0.0, stdev },
        bs_init: nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, 3, cfg)
}

impl LocalLoss {
    /// Plain cross-entropy (the last module, and every module under `ce`).
    pub fn ce() -> Self {
        LocalLoss { term: Term::Ce }
    }

    /// Module `k` of `modules`'s loss under `spec`, its layers under `p` (the head's path), for
    /// module outputs `features` of an `input`-shaped image, `classes` classes. A loss that
    /// cannot read the features, or cannot reconstruct the input, is a configuration error
    /// naming why.
    pub fn new(
        p: &nn::Path,
        spec: &LocalLossSpec,
        (k, modules): (usize, usize),
        features: FeatureShape,
        input: FeatureShape,
        classes: i64,
    ) -> Result<Self> {
        let term = match spec.kind {
            LocalLossKind::Ce => Term::Ce,
            LocalLossKind::Infopro => {
                let (FeatureShape::Map { c, .. }, FeatureShape::Map { c: ci, h, w }) =
                    (features, input)
                else {
                    return Err(Error::Config(format!(
                        "--local-loss infopro: its decoder reconstructs an input image from feature maps, but the input is {input} and module {} outputs {features}; use --local-loss ce or predsim",
                        k + 1
                    )));
                };
                let channels_ok = |v: &Vec<f64>| v.is_empty() || v.len() == ci as usize;
                if !channels_ok(&spec.input_mean) || !channels_ok(&spec.input_std) {
                    return Err(Error::Config(format!(
                        "--local-loss infopro: the input has {ci} channels but its normalisation has {} means and {} deviations",
                        spec.input_mean.len(),
                        spec.input_std.len()
                    )));
                }
                let d = p / "decoder";
                let (recon, class) = spec.infopro_weights(k, modules);
                Term::Infopro {
                    decoder: Box::new(Decoder {
                        conv1: conv_bias(&d / "conv1", c, DECODER_WIDTH),
                        bn: super::resnet::batch_norm(&d / "bn", DECODER_WIDTH),
                        conv2: conv_bias(&d / "conv2", DECODER_WIDTH, ci),
                        size: [h, w],
                        mean: spec.input_mean.clone(),
                        std: spec.input_std.clone(),
                    }),
                    recon,
                    class,
                    mode: spec.class,
                    temperature: spec.temperature,
                }
            }
            LocalLossKind::Predsim => {
                let projection = match features {
                    FeatureShape::Map { c, .. } => {
                        Some(super::resnet::conv(p / "sim" / "conv", c, c, 3, 1))
                    }
                    FeatureShape::Vector { .. } => None,
                    FeatureShape::Tokens { .. } => {
                        return Err(Error::Config(format!(
                            "--local-loss predsim: its similarity term reads feature maps or vectors, but module {} outputs {features}; use --local-loss ce",
                            k + 1
                        )));
                    }
                };
                Term::Predsim {
                    projection,
                    beta: spec.beta,
                    classes,
                }
            }
        };
        Ok(LocalLoss { term })
    }

    /// The loss of a module whose output is `h` and whose head gave `head_out` (logits, or the
    /// contrastive features), for `labels` and the step's input `images`, with label smoothing
    /// `smoothing` in its cross-entropy terms.
    pub fn loss(
        &self,
        (head_out, h): (&Tensor, &Tensor),
        (labels, images): (&Tensor, &Tensor),
        smoothing: f64,
        train: bool,
    ) -> Tensor {
        let ce = |z: &Tensor| crate::rules::cross_entropy_smoothed(z, labels, smoothing);
        match &self.term {
            Term::Ce => ce(head_out),
            Term::Infopro {
                decoder,
                recon,
                class,
                mode,
                temperature,
            } => {
                let r = decoder.loss(h, images, train);
                let c = match mode {
                    InfoproClass::Softmax => ce(head_out),
                    InfoproClass::Contrast => supcon(head_out, labels, *temperature),
                };
                r * *recon + c * *class
            }
            Term::Predsim {
                projection,
                beta,
                classes,
            } => {
                let x = match projection {
                    Some(conv) => similarity_input(&h.apply(conv)),
                    None => h.shallow_clone(),
                };
                let sim = (similarity(&x) - label_similarity(labels, *classes, x.kind()))
                    .square()
                    .mean(x.kind());
                ce(head_out) * (1.0 - *beta) + sim * *beta
            }
        }
    }

    /// [`LocalLoss::loss`] and its tangent, for `head_out = (z, ż)` and `h = (h, ḣ)` (the
    /// images and labels are constants).
    pub fn loss_dual(
        &self,
        (head_out, h): (&Dual, &Dual),
        (labels, images): (&Tensor, &Tensor),
        smoothing: f64,
    ) -> Dual {
        let ce = |z: &Dual| dual::cross_entropy(z, labels, smoothing);
        match &self.term {
            Term::Ce => ce(head_out),
            Term::Infopro {
                decoder,
                recon,
                class,
                mode,
                temperature,
            } => {
                let r = decoder.loss_dual(h, images);
                let c = match mode {
                    InfoproClass::Softmax => ce(head_out),
                    InfoproClass::Contrast => supcon_dual(head_out, labels, *temperature),
                };
                (r.0 * *recon + c.0 * *class, r.1 * *recon + c.1 * *class)
            }
            Term::Predsim {
                projection,
                beta,
                classes,
            } => {
                let x = match projection {
                    Some(conv) => similarity_input_dual(&dual::conv(conv, 1, h)),
                    None => (h.0.shallow_clone(), h.1.shallow_clone()),
                };
                let (r, r_dot) = similarity_dual(&x);
                let diff = r - label_similarity(labels, *classes, x.0.kind());
                let kind = diff.kind();
                let sim = diff.square().mean(kind);
                let sim_dot = (&diff * r_dot).mean(kind) * 2.0;
                let (p, p_dot) = ce(head_out);
                (
                    p * (1.0 - *beta) + sim * *beta,
                    p_dot * (1.0 - *beta) + sim_dot * *beta,
                )
            }
        }
    }

    /// Elements per sample this loss keeps alive for backward beyond the head's, for module
    /// outputs `features` of an `input`-shaped image (the decoder works at the image's full
    /// resolution: its upsampled input, three 12-channel maps and two image-sized ones).
    pub fn activation_elems(
        spec: &LocalLossSpec,
        features: FeatureShape,
        input: FeatureShape,
    ) -> i64 {
        match (spec.kind, features, input) {
            (
                LocalLossKind::Infopro,
                FeatureShape::Map { c, .. },
                FeatureShape::Map { c: ci, h, w },
            ) => (c + 3 * DECODER_WIDTH + 2 * ci) * h * w,
            (LocalLossKind::Predsim, FeatureShape::Map { c, h, w }, _) => 2 * c * h * w + c,
            (LocalLossKind::Predsim, f, _) => f.elems(),
            _ => 0,
        }
    }
}

impl Decoder {
    /// The image in [0, 1] the decoder reconstructs: the normalisation undone, clamped (random
    /// erasing can leave values outside).
    fn target(&self, images: &Tensor) -> Tensor {
        let restored = if self.mean.is_empty() {
            images.shallow_clone()
        } else {
            let channel = |v: &[f64]| {
                Tensor::from_slice(v)
                    .to_kind(images.kind())
                    .to_device(images.device())
                    .view([1, -1, 1, 1])
            };
            images * channel(&self.std) + channel(&self.mean)
        };
        restored.clamp(0.0, 1.0).detach()
    }

    fn upsample(&self, h: &Tensor) -> Tensor {
        h.upsample_bilinear2d(self.size, true, None, None)
    }

    /// Mean binary cross-entropy of sigmoid(decoder(h)) against the image, computed from the
    /// logits (`softplus(z) − t·z`, equal to BCE of the sigmoid and stable at its ends).
    fn loss(&self, h: &Tensor, images: &Tensor, train: bool) -> Tensor {
        let z = self
            .upsample(h)
            .apply(&self.conv1)
            .apply_t(&self.bn, train)
            .relu()
            .apply(&self.conv2);
        let t = self.target(images);
        let kind = z.kind();
        (z.softplus() - &t * &z).mean(kind)
    }

    /// [`Decoder::loss`] and its tangent `mean((σ(z) − t)·ż)`.
    fn loss_dual(&self, h: &Dual, images: &Tensor) -> Dual {
        let mut x = (self.upsample(&h.0), self.upsample(&h.1));
        x = dual::conv(&self.conv1, 1, &x);
        x = dual::batch_norm(&self.bn, &x);
        x = dual::relu(&x);
        let (z, z_dot) = dual::conv(&self.conv2, 1, &x);
        let t = self.target(images);
        let kind = z.kind();
        let loss = (z.softplus() - &t * &z).mean(kind);
        let tangent = ((z.sigmoid() - t) * z_dot).mean(kind);
        (loss, tangent)
    }
}

/// What PredSim's similarity reads from feature maps `[B, C, H, W]`: the per-channel standard
/// deviation over positions `[B, C]` (unbiased) where there are more than 3 channels and more
/// than one row, else the flattened maps.
fn similarity_input(y: &Tensor) -> Tensor {
    let s = y.size();
    if s[1] > 3 && s[2] > 1 {
        let flat = y.view([s[0], s[1], -1]);
        let kind = y.kind();
        let n = flat.size()[2] as f64;
        let centred = &flat - flat.mean_dim(&[2i64][..], true, kind);
        (centred.square().sum_dim_intlist(&[2i64][..], false, kind) / (n - 1.0)).sqrt()
    } else {
        y.view([s[0], -1])
    }
}

/// [`similarity_input`] and its tangent: `ṡ = Σ (y − ȳ)·ẏ / ((n − 1)·s)`.
fn similarity_input_dual((y, y_dot): &Dual) -> Dual {
    let s = y.size();
    if s[1] > 3 && s[2] > 1 {
        let flat = y.view([s[0], s[1], -1]);
        let flat_dot = y_dot.view([s[0], s[1], -1]);
        let kind = y.kind();
        let n = flat.size()[2] as f64;
        let centred = &flat - flat.mean_dim(&[2i64][..], true, kind);
        let std = (centred.square().sum_dim_intlist(&[2i64][..], false, kind) / (n - 1.0)).sqrt();
        let std_dot = (centred * flat_dot).sum_dim_intlist(&[2i64][..], false, kind)
            / (std.clamp_min(1e-30) * (n - 1.0));
        (std, std_dot)
    } else {
        (y.view([s[0], -1]), y_dot.view([s[0], -1]))
    }
}

/// PredSim's adjusted cosine similarity of the rows of `x` `[B, N]`: each row centred on its
/// own mean and scaled to unit norm (+1e-8), `R = X̂·X̂ᵀ` clamped to [−1, 1].
fn similarity(x: &Tensor) -> Tensor {
    let kind = x.kind();
    let centred = x - x.mean_dim(&[1i64][..], true, kind);
    let norm = centred
        .square()
        .sum_dim_intlist(&[1i64][..], true, kind)
        .sqrt();
    let xn = centred / (norm + 1e-8);
    xn.matmul(&xn.tr()).clamp(-1.0, 1.0)
}

/// [`similarity`] and its tangent (zero where the clamp is active).
fn similarity_dual((x, x_dot): &Dual) -> Dual {
    let kind = x.kind();
    let centred = x - x.mean_dim(&[1i64][..], true, kind);
    let centred_dot = x_dot - x_dot.mean_dim(&[1i64][..], true, kind);
    let norm = centred
        .square()
        .sum_dim_intlist(&[1i64][..], true, kind)
        .sqrt();
    let norm_dot =
        (&centred * &centred_dot).sum_dim_intlist(&[1i64][..], true, kind) / norm.clamp_min(1e-30);
    let d = norm + 1e-8;
    let xn = &centred / &d;
    let xn_dot = centred_dot / &d - centred * norm_dot / d.square();
    let r = xn.matmul(&xn.tr());
    let r_dot = xn_dot.matmul(&xn.tr()) + xn.matmul(&xn_dot.tr());
    let inside = r.abs().lt(1.0);
    (
        r.clamp(-1.0, 1.0),
        r_dot.where_self(&inside, &r_dot.zeros_like()),
    )
}

/// The similarity matrix of the one-hot labels (a constant).
fn label_similarity(labels: &Tensor, classes: i64, kind: Kind) -> Tensor {
    similarity(&labels.one_hot(classes).to_kind(kind)).detach()
}

/// Shared parts of the supervised contrastive loss: z = f/‖f‖, the positive mask (same label,
/// not itself) and its row counts (at least 1), and the off-diagonal mask.
fn supcon_parts(f: &Tensor, labels: &Tensor) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let kind = f.kind();
    let b = f.size()[0];
    let norm = f
        .square()
        .sum_dim_intlist(&[1i64][..], true, kind)
        .sqrt()
        .clamp_min(1e-12);
    let z = f / &norm;
    let eye = Tensor::eye(b, (Kind::Bool, f.device()));
    let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    let positive = same.logical_and(&eye.logical_not()).to_kind(kind);
    let count = positive
        .sum_dim_intlist(&[1i64][..], false, kind)
        .clamp_min(1.0);
    (z, norm, eye, positive, count)
}

/// The supervised contrastive loss (Khosla et al., one view) of head outputs `f` `[B, D]`, as
/// InfoPro uses it: with z = f/‖f‖ and s_ij = z_i·z_j/τ,
/// `L = −(τ/0.07)·mean_i (1/|P_i|) Σ_{j∈P_i} (s_ij − log Σ_{a≠i} exp s_ia)`, P_i the other
/// samples of i's class (a sample alone in its class adds 0).
pub fn supcon(f: &Tensor, labels: &Tensor, temperature: f64) -> Tensor {
    let kind = f.kind();
    let (z, _, eye, positive, count) = supcon_parts(f, labels);
    let s = z.matmul(&z.tr()) / temperature;
    let log_norm = s
        .masked_fill(&eye, f64::NEG_INFINITY)
        .logsumexp(&[1i64][..], true);
    let mean_pos = ((s - log_norm) * &positive).sum_dim_intlist(&[1i64][..], false, kind) / count;
    mean_pos.mean(kind) * (-temperature / BASE_TEMPERATURE)
}

/// [`supcon`] and its tangent: `ż = (ḟ − z·(z·ḟ))/‖f‖`, `ṡ = (ż·zᵀ + z·żᵀ)/τ`, and each
/// log-probability moves by `ṡ_ij − Σ_a p_ia·ṡ_ia` (p the softmax over a ≠ i).
pub fn supcon_dual((f, f_dot): &Dual, labels: &Tensor, temperature: f64) -> Dual {
    let kind = f.kind();
    let (z, norm, eye, positive, count) = supcon_parts(f, labels);
    let along = (&z * f_dot).sum_dim_intlist(&[1i64][..], true, kind);
    let z_dot = (f_dot - &z * along) / norm;
    let s = z.matmul(&z.tr()) / temperature;
    let s_dot = (z_dot.matmul(&z.tr()) + z.matmul(&z_dot.tr())) / temperature;
    let masked = s.masked_fill(&eye, f64::NEG_INFINITY);
    let log_norm = masked.logsumexp(&[1i64][..], true);
    let p = masked.softmax(1, kind);
    let log_norm_dot = (&p * &s_dot).sum_dim_intlist(&[1i64][..], true, kind);
    let scale = -temperature / BASE_TEMPERATURE;
    let per_row = |t: Tensor| (t * &positive).sum_dim_intlist(&[1i64][..], false, kind) / &count;
    let loss = per_row(s - log_norm).mean(kind) * scale;
    let tangent = per_row(s_dot - log_norm_dot).mean(kind) * scale;
    (loss, tangent)
}
