//! `--data imagefolder`: torchvision's `ImageFolder` layout, streamed from disk.
//!
//! `<data-dir>/train/<class>/**/*.{jpg,jpeg,png}` and `<data-dir>/val/<class>/...`; classes are
//! the training sub-folders sorted by name, label `k` the `k`-th of them (a `val` class that is
//! not a training class is an error; one missing from `val` is fine). Other files are ignored.
//! Only the file list is held in memory: images are decoded batch by batch by the loader
//! workers of [`super::Batches`].
//!
//! Transforms follow torchvision's ImageNet recipe: training takes a `RandomResizedCrop` (area
//! 8-100 % of the image, aspect ratio 3/4-4/3, resized to `size x size`) and a horizontal flip
//! with probability 0.5; evaluation resizes the shorter side to `size / 0.875` (256 for 224) and
//! crops the centre. Resizing uses a triangle (bilinear) filter widened when shrinking, as
//! PIL's antialiased bilinear resize does.
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::imageops::{self, FilterType};
use image::{GenericImageView, RgbImage};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::batch::uniform_below;
use crate::{Error, Result};

/// File extensions (lower case) that count as images.
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
/// Evaluation resizes the shorter side to `size / EVAL_CROP_FRACTION` before the centre crop.
pub const EVAL_CROP_FRACTION: f64 = 0.875;
/// File in `<data-dir>` where `sgr data info --compute-stats` stores a folder's own pixel
/// statistics; when present, training normalises with them instead of ImageNet's.
pub const STATS_FILE: &str = "sgr-stats.json";
/// First ChaCha stream of the per-sample random crops (stream `SAMPLE_STREAM_BASE + p` for the
/// sample at position `p` of the epoch's order); far above the in-memory sets' permutation and
/// per-batch streams so the two families never meet.
pub const SAMPLE_STREAM_BASE: u64 = 1 << 62;

/// How a streamed split is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Side length of the square images handed to the network.
    pub image_size: i64,
    /// Decode threads per pass.
    pub workers: usize,
    /// Log and skip unreadable images instead of stopping.
    pub skip_bad: bool,
}

/// Which transform a decoded image goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Random resized crop and flip (training with augmentation).
    Train,
    /// Resize and centre crop (evaluation, or training with `--no-augment`).
    Eval,
}

/// Per-channel statistics of a folder, as stored in [`STATS_FILE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FolderStats {
    /// Per-channel (RGB) mean of the training pixels in [0, 1].
    pub mean: Vec<f64>,
    /// Per-channel population standard deviation.
    pub std: Vec<f64>,
    /// The image size the statistics were computed at (after the evaluation transform).
    pub image_size: i64,
}

/// The scanned files of one split.
struct FolderIndex {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<i64>,
}

/// One split of an image folder: a shared file list, a window on it, and how to decode.
#[derive(Clone)]
pub struct FolderSplit {
    index: Arc<FolderIndex>,
    start: usize,
    len: usize,
    opts: StreamOptions,
    /// Files found unreadable and skipped (each counted once, however often it is met).
    skipped: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl fmt::Debug for FolderSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FolderSplit")
            .field("root", &self.index.root)
            .field("images", &self.len)
            .field("classes", &self.index.classes.len())
            .field("opts", &self.opts)
            .finish()
    }
}

/// The sub-folders of `dir`, sorted by name (torchvision's class order).
pub fn class_folders(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.path().is_dir() {
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| Error::data(dir.join(&n), "class folder name is not valid UTF-8"))?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Whether `path` has one of the [`EXTENSIONS`].
fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every image file under `dir` (recursively, following links), in sorted path order.
fn images_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            images_under(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

impl FolderSplit {
    /// Scans `dir/<class>/...` for the given classes (label = position in `classes`). A
    /// sub-folder of `dir` that is not among `classes` is an error: its images would get no
    /// label, or a wrong one.
    pub fn scan(dir: &Path, classes: &[String], opts: StreamOptions) -> Result<FolderSplit> {
        if !dir.is_dir() {
            return Err(Error::data(
                dir,
                "folder not found (--data imagefolder expects <data-dir>/train/<class>/* and <data-dir>/val/<class>/*)",
            ));
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for name in class_folders(dir)? {
            let Some(label) = classes.iter().position(|c| *c == name) else {
                return Err(Error::data(
                    dir.join(&name),
                    "class folder is not among the training classes",
                ));
            };
            let before = files.len();
            images_under(&dir.join(&name), &mut files)?;
            labels.resize(files.len(), label as i64);
            debug_assert!(files.len() >= before);
        }
        if files.is_empty() {
            return Err(Error::data(
                dir,
                format!(
                    "no images (files ending in .{}) in its class folders",
                    EXTENSIONS.join(", .")
                ),
            ));
        }
        let len = files.len();
        Ok(FolderSplit {
            index: Arc::new(FolderIndex {
                root: dir.to_path_buf(),
                classes: classes.to_vec(),
                files,
                labels,
            }),
            start: 0,
            len,
            opts,
            skipped: Arc::default(),
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the split has no image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The split's folder.
    pub fn root(&self) -> &Path {
        &self.index.root
    }

    /// Class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.index.classes
    }

    /// Labels in stored (sorted path) order.
    pub fn labels(&self) -> &[i64] {
        &self.index.labels[self.start..self.start + self.len]
    }

    /// Path of image `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.index.files[self.start + i]
    }

    /// Side length of the decoded images.
    pub fn image_size(&self) -> i64 {
        self.opts.image_size
    }

    /// Decode threads per pass.
    pub fn workers(&self) -> usize {
        self.opts.workers
    }

    /// Whether unreadable images are skipped.
    pub fn skip_bad(&self) -> bool {
        self.opts.skip_bad
    }

    /// The same files decoded differently.
    pub fn with_options(&self, opts: StreamOptions) -> FolderSplit {
        FolderSplit {
            opts,
            ..self.clone()
        }
    }

    /// The first `n` images (all if `n` exceeds the length).
    pub fn subset(&self, n: usize) -> FolderSplit {
        FolderSplit {
            len: n.min(self.len),
            ..self.clone()
        }
    }

    /// The last `n` images (all if `n` exceeds the length).
    pub fn tail(&self, n: usize) -> FolderSplit {
        let n = n.min(self.len);
        FolderSplit {
            start: self.start + self.len - n,
            len: n,
            ..self.clone()
        }
    }

    /// Notes that image `i` was skipped as unreadable (logged the first time).
    pub fn record_skip(&self, i: usize, err: &Error) {
        let mut skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        if skipped.insert(self.path(i).to_path_buf()) {
            eprintln!("skipping unreadable image: {err}");
        }
    }

    /// Distinct files skipped so far.
    pub fn skipped(&self) -> usize {
        self.skipped.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Decodes image `i` and transforms it to `u8 [3, size, size]` (CHW), drawing the random
    /// crop and flip of [`Transform::Train`] from `rng`.
    pub fn load(&self, i: usize, transform: Transform, rng: &mut ChaCha8Rng) -> Result<Vec<u8>> {
        let path = self.path(i);
        let img = decode(path)?;
        let size = self.opts.image_size as u32;
        let out = match transform {
            Transform::Train => random_resized_crop(&img, size, rng),
            Transform::Eval => resize_centre_crop(&img, size),
        };
        Ok(to_chw(&out))
    }
}

/// Reads and decodes one JPEG or PNG file (the format is taken from the content, not the
/// name) to RGB; grey and palette images are expanded, alpha is dropped.
pub fn decode(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes).map_err(|reason| Error::data(path, reason))
}

/// [`decode`] on bytes in memory; the error is the reason only.
pub fn decode_bytes(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let format = image::guess_format(bytes)
        .map_err(|_| "not a JPEG or PNG image (unknown signature)".to_string())?;
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder pads a cut-off scan with grey rather than failing; a truncated file
        // would silently train on half an image.
        return Err("truncated JPEG (no end-of-image marker after the last scan)".into());
    }
    if format == image::ImageFormat::Png && !png_is_complete(bytes) {
        // The PNG decoder accepts a file cut inside or before its end chunk once the pixel
        // data are in; a file without its end is still a truncated file.
        return Err("truncated PNG (no IEND chunk)".into());
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("cannot decode image: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has no pixels".into());
    }
    Ok(img.into_rgb8())
}

/// Whether a JPEG stream has an end-of-image marker (`FF D9`) after its last start-of-scan
/// (`FF DA`). Inside entropy-coded data every `FF` is followed by `00` or a restart marker, so
/// the pair can only be the real end marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(p) => bytes[p..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// Whether a PNG stream holds its complete `IEND` chunk (zero length, type, fixed CRC).
fn png_is_complete(bytes: &[u8]) -> bool {
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
    bytes.windows(IEND.len()).any(|w| w == IEND)
}

/// A uniform draw in `[0, 1)` from the raw ChaCha output (53 bits), independent of `rand`'s
/// sampling algorithms (the stream must not change with a `rand` release).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// torchvision's `RandomResizedCrop.get_params` for a `w x h` image: `(x, y, cw, ch)`.
/// Ten tries at a crop of random area (8-100 %) and log-uniform aspect ratio (3/4-4/3) that
/// fits; otherwise the largest centred crop within the ratio range.
pub fn resized_crop_params(w: u32, h: u32, rng: &mut ChaCha8Rng) -> (u32, u32, u32, u32) {
    let (scale, ratio) = ((0.08, 1.0), (3.0f64 / 4.0, 4.0f64 / 3.0));
    let area = f64::from(w) * f64::from(h);
    let (lo, hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * unit(rng));
        let aspect = (lo + (hi - lo) * unit(rng)).exp();
        let cw = (target * aspect).sqrt().round() as i64;
        let ch = (target / aspect).sqrt().round() as i64;
        if 0 < cw && cw <= i64::from(w) && 0 < ch && ch <= i64::from(h) {
            let (cw, ch) = (cw as u32, ch as u32);
            let y = uniform_below(rng, u64::from(h - ch) + 1) as u32;
            let x = uniform_below(rng, u64::from(w - cw) + 1) as u32;
            return (x, y, cw, ch);
        }
    }
    let in_ratio = f64::from(w) / f64::from(h);
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, ((f64::from(w) / ratio.0).round() as u32).clamp(1, h))
    } else if in_ratio > ratio.1 {
        (((f64::from(h) * ratio.1).round() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// Random resized crop to `size x size`, then a flip with probability 0.5.
fn random_resized_crop(img: &RgbImage, size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let (x, y, cw, ch) = resized_crop_params(img.width(), img.height(), rng);
    let view = img.view(x, y, cw, ch);
    let mut out = imageops::resize(&*view, size, size, FilterType::Triangle);
    if uniform_below(rng, 2) == 1 {
        imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// Resize so the shorter side is `size / 0.875` (torchvision's `Resize(int)`: the longer side
/// keeps the aspect ratio, truncated), then crop `size x size` from the centre.
fn resize_centre_crop(img: &RgbImage, size: u32) -> RgbImage {
    let short = (f64::from(size) / EVAL_CROP_FRACTION) as u32;
    let (w, h) = img.dimensions();
    let (rw, rh) = if w <= h {
        (
            short,
            (u64::from(short) * u64::from(h) / u64::from(w)) as u32,
        )
    } else {
        (
            (u64::from(short) * u64::from(w) / u64::from(h)) as u32,
            short,
        )
    };
    let resized = imageops::resize(img, rw, rh, FilterType::Triangle);
    let top = ((f64::from(rh - size)) / 2.0).round() as u32;
    let left = ((f64::from(rw - size)) / 2.0).round() as u32;
    imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// `HWC` RGB bytes to `CHW` planes.
fn to_chw(img: &RgbImage) -> Vec<u8> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (p, px) in img.pixels().enumerate() {
        out[p] = px[0];
        out[plane + p] = px[1];
        out[2 * plane + p] = px[2];
    }
    out
}

/// Reads a folder's [`STATS_FILE`], if there is one.
pub fn read_stats(data_dir: &Path) -> Result<Option<FolderStats>> {
    let path = data_dir.join(STATS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let stats: FolderStats = serde_json::from_str(&text)
        .map_err(|e| Error::data(&path, format!("bad statistics: {e}")))?;
    if stats.mean.len() != 3
        || stats.std.len() != 3
        || stats.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(Error::data(
            &path,
            "bad statistics: need 3 means and 3 positive standard deviations",
        ));
    }
    Ok(Some(stats))
}

/// Writes a folder's [`STATS_FILE`].
pub fn write_stats(data_dir: &Path, stats: &FolderStats) -> Result<PathBuf> {
    let path = data_dir.join(STATS_FILE);
    let text = serde_json::to_string_pretty(stats).expect("stats serialise");
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn resized_crops_fit_and_follow_the_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (w, h) in [(500, 375), (64, 64), (28, 28), (1000, 50), (7, 300), (1, 1)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = resized_crop_params(w, h, &mut rng);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}x{h}");
            }
        }
        // On a large square image the ten tries nearly always succeed, so areas and ratios
        // stay within torchvision's ranges (up to rounding).
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let (_, _, cw, ch) = resized_crop_params(1000, 1000, &mut rng);
            let r = f64::from(cw) / f64::from(ch);
            assert!((0.74..=1.34).contains(&r), "ratio {r}");
            areas.push(f64::from(cw * ch) / 1e6);
        }
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        // Area fraction ~ U(0.08, 1) where it fits: mean a little below 0.54.
        assert!((0.45..0.56).contains(&mean), "mean area {mean}");
        assert!(areas.iter().all(|&a| (0.079..=1.0).contains(&a)));
    }

    #[test]
    fn eval_transform_takes_the_centre_of_the_resized_image() {
        // A 40x20 image whose left half is black and right half white: resized so the shorter
        // side is 16/0.875 = 18 (36x18), the 16x16 centre crop spans columns 10..26 of it, half
        // black and half white.
        let img = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let out = resize_centre_crop(&img, 16);
        assert_eq!(out.dimensions(), (16, 16));
        let row: Vec<u8> = (0..16).map(|x| out.get_pixel(x, 8)[0]).collect();
        assert!(row[..7].iter().all(|&v| v < 10), "{row:?}");
        assert!(row[9..].iter().all(|&v| v > 245), "{row:?}");
        let chw = to_chw(&out);
        assert_eq!(chw.len(), 3 * 256);
        assert_eq!(chw[15], out.get_pixel(15, 0)[0]);
        assert_eq!(chw[256 + 16], out.get_pixel(0, 1)[1]);
    }

    #[test]
    fn jpeg_completeness_needs_an_end_marker_after_the_last_scan() {
        assert!(jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9
        ]));
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        // An end marker before the scan (an embedded thumbnail's) does not count.
        assert!(!jpeg_is_complete(&[0xFF, 0xD9, 0xFF, 0xDA, 1, 2]));
        assert!(!jpeg_is_complete(&[]));
    }
}
