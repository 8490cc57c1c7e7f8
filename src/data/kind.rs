//! Which data sets exist and what is known about them before any file is read: names, shapes,
//! class counts, normalisation constants and augmentation.
use std::fmt;

use serde::{Deserialize, Serialize};

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
/// Synthetic-set mean: what [`super::synthetic::generate`] is designed to produce.
pub const SYNTHETIC_MEAN: f64 = 0.5;
/// Synthetic-set standard deviation (same source).
pub const SYNTHETIC_STD: f64 = 0.25;

/// Seed of the synthetic set that [`super::load`] returns; fixed so every run and every machine gets the
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
/// Placeholder mean of SVHN and STL-10 in [`DatasetKind::meta`]: their published files could
/// not be read here to fix constants, so [`super::load`] replaces it with the exact statistics
/// of the training split it reads (computed once, before any subset or hold-out).
pub const STATS_AT_LOAD_MEAN: f64 = 0.5;
/// Placeholder standard deviation (same note).
pub const STATS_AT_LOAD_STD: f64 = 0.25;
/// ImageNet per-channel (RGB) mean, torchvision's published constant: the default
/// normalisation of `--data imagefolder` (a folder's own statistics can replace it, see
/// `sgr data info --compute-stats`).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (same source).
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// Default side length of streamed images (`--image-size`), the ImageNet training size.
pub const DEFAULT_IMAGE_SIZE: i64 = 224;

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
    /// SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`), 3x32x32, 10 classes.
    Svhn,
    /// STL-10 labelled images (`stl10_binary/`), 3x96x96, 10 classes.
    #[serde(rename = "stl10")]
    #[value(name = "stl10")]
    Stl10,
    /// Class folders of JPEG/PNG images (torchvision's `ImageFolder` layout), streamed from
    /// disk; classes and their order come from a scan of `<data-dir>/train`.
    #[serde(rename = "imagefolder")]
    #[value(name = "imagefolder")]
    ImageFolder,
}

impl DatasetKind {
    /// Every kind, in a fixed order (for help texts and exhaustive tests).
    pub const ALL: [DatasetKind; 8] = [
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Synthetic,
        DatasetKind::Svhn,
        DatasetKind::Stl10,
        DatasetKind::ImageFolder,
    ];

    /// The name used on the command line, in configs and in file names.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Synthetic => "synthetic",
            DatasetKind::Svhn => "svhn",
            DatasetKind::Stl10 => "stl10",
            DatasetKind::ImageFolder => "imagefolder",
        }
    }

    /// Whether the set is streamed from disk (decoded per batch) rather than held in memory.
    pub fn streams(self) -> bool {
        matches!(self, DatasetKind::ImageFolder)
    }

    /// Shape, classes, normalisation and augmentation of this data set, known without loading it
    /// (so a model can be built, or a checkpoint checked, before the data are read). For
    /// `Synthetic` this is the default set that [`load`](super::load) returns. For
    /// `ImageFolder` only the defaults are known here (3 channels, [`DEFAULT_IMAGE_SIZE`],
    /// ImageNet statistics, `classes` 0): the class count comes from the folder scan that
    /// [`load_with`](super::load_with) does, the size from `--image-size`.
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
            // Digits are not mirrored.
            DatasetKind::Svhn => (
                3,
                32,
                10,
                vec![STATS_AT_LOAD_MEAN; 3],
                vec![STATS_AT_LOAD_STD; 3],
                AugmentKind::Crop,
            ),
            DatasetKind::Stl10 => (
                3,
                96,
                10,
                vec![STATS_AT_LOAD_MEAN; 3],
                vec![STATS_AT_LOAD_STD; 3],
                AugmentKind::CropFlip,
            ),
            DatasetKind::ImageFolder => (
                3,
                DEFAULT_IMAGE_SIZE,
                0,
                IMAGENET_MEAN.to_vec(),
                IMAGENET_STD.to_vec(),
                AugmentKind::ResizedCropFlip,
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
    /// torchvision's `RandomResizedCrop` (scale 0.08-1, aspect ratio 3/4-4/3) to the image
    /// size, then a horizontal flip with probability 0.5; evaluation resizes the shorter side to
    /// `size / 0.875` and crops the centre (streamed sets only, see [`super::folder`]).
    ResizedCropFlip,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
