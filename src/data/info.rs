//! `sgr data info`: sample counts per class and per-channel pixel statistics of each split.
use std::fmt;

use serde::Serialize;

use super::DatasetKind;
use super::folder::{FolderSplit, Transform};
use super::source::{Dataset, Source, Split};
use crate::Result;

/// Summary statistics of one split, for `sgr data info` and sanity checks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitInfo {
    /// Number of samples.
    pub count: usize,
    /// Samples per class, indexed by label.
    pub per_class: Vec<usize>,
    /// Per-channel mean of the pixels scaled to [0, 1] (empty for a streamed split unless the
    /// statistics were asked for: they need every image decoded).
    pub mean: Vec<f64>,
    /// Per-channel population standard deviation of the pixels scaled to [0, 1] (same).
    pub std: Vec<f64>,
}

/// Summary statistics of a data set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataInfo {
    /// Which data set.
    pub kind: DatasetKind,
    /// Class names in label order (folder names, or `class K`).
    pub classes: Vec<String>,
    /// Training split.
    pub train: SplitInfo,
    /// Test split.
    pub test: SplitInfo,
    /// Files skipped as unreadable while computing statistics (`--skip-bad-images`).
    pub skipped_images: usize,
}

/// Exact per-channel histograms of `u8` pixel values: exact means and standard deviations
/// without an `f32` copy of the data.
struct Histogram(Vec<[u64; 256]>);

impl Histogram {
    fn new(channels: usize) -> Self {
        Histogram(vec![[0u64; 256]; channels])
    }

    /// Adds `CHW`-ordered samples of `plane` pixels per channel.
    fn add(&mut self, bytes: &[u8], plane: usize) {
        let c = self.0.len();
        for (k, chunk) in bytes.chunks_exact(plane).enumerate() {
            let h = &mut self.0[k % c];
            for &v in chunk {
                h[v as usize] += 1;
            }
        }
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    /// Per-channel mean and population standard deviation of the values scaled to [0, 1].
    fn moments(&self) -> (Vec<f64>, Vec<f64>) {
        self.0
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
            .unzip()
    }
}

/// Exact per-channel mean and population standard deviation of an in-memory split's pixels in
/// [0, 1].
pub(crate) fn split_moments(split: &Split) -> (Vec<f64>, Vec<f64>) {
    let info = memory_info(split, 0);
    (info.mean, info.std)
}

/// Samples per class of `labels`.
fn per_class(labels: &[i64], classes: i64) -> Vec<usize> {
    let mut counts = vec![0usize; classes.max(0) as usize];
    for &y in labels {
        if let Some(c) = counts.get_mut(y as usize) {
            *c += 1;
        }
    }
    counts
}

/// Computes counts and pixel statistics of an in-memory split, from histograms over chunks of
/// samples.
fn memory_info(split: &Split, classes: i64) -> SplitInfo {
    let labels = Vec::<i64>::try_from(&split.labels).expect("labels are i64");
    let (n, c, h, w) = split.images.size4().expect("images are [N, C, H, W]");
    let plane = (h * w) as usize;
    let mut hist = Histogram::new(c as usize);
    const CHUNK: i64 = 4096;
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let bytes = Vec::<u8>::try_from(&split.images.narrow(0, start, len).reshape([-1]))
            .expect("images are u8");
        hist.add(&bytes, plane);
        start += len;
    }
    let (mean, std) = hist.moments();
    SplitInfo {
        count: n as usize,
        per_class: per_class(&labels, classes),
        mean,
        std,
    }
}

/// Counts of a folder split from its scan and, if `stats`, the pixel statistics of every image
/// after the evaluation transform (resize and centre crop to the image size: what a network is
/// shown), decoded by the split's workers.
fn folder_info(split: &FolderSplit, classes: i64, stats: bool) -> Result<SplitInfo> {
    let (mean, std) = if stats {
        let workers = split.workers().max(1);
        let n = split.len();
        let size = split.image_size() as usize;
        let hists = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    s.spawn(move || -> Result<Histogram> {
                        let mut hist = Histogram::new(3);
                        let mut rng =
                            <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
                        for i in (w..n).step_by(workers) {
                            match split.load(i, Transform::Eval, &mut rng) {
                                Ok(img) => hist.add(&img, size * size),
                                Err(e) if split.skip_bad() => split.record_skip(i, &e),
                                Err(e) => return Err(e),
                            }
                        }
                        Ok(hist)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a statistics thread panicked"))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut total = Histogram::new(3);
        for h in &hists {
            total.merge(h);
        }
        total.moments()
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(SplitInfo {
        count: split.len(),
        per_class: per_class(split.labels(), classes),
        mean,
        std,
    })
}

fn split_info(source: &Source, classes: i64, stats: bool) -> Result<SplitInfo> {
    match source {
        Source::Memory(s) => Ok(memory_info(s, classes)),
        Source::Folder(f) => folder_info(f, classes, stats),
    }
}

/// Counts and pixel statistics of both splits of `ds` (a streamed set's counts only: its
/// statistics need [`info_with`]).
pub fn info(ds: &Dataset) -> DataInfo {
    info_with(ds, false).expect("counting a scanned split reads no file")
}

/// Counts and pixel statistics of both splits of `ds`; with `stats`, a streamed set's images
/// are decoded to compute them (errors name an unreadable file unless it is skipped).
pub fn info_with(ds: &Dataset, stats: bool) -> Result<DataInfo> {
    let train = split_info(&ds.train, ds.meta.classes, stats)?;
    let test = split_info(&ds.test, ds.meta.classes, stats)?;
    let skipped_images = [&ds.train, &ds.test]
        .iter()
        .filter_map(|s| s.folder())
        .map(|f| f.skipped())
        .sum();
    Ok(DataInfo {
        kind: ds.meta.kind,
        classes: ds.class_names(),
        train,
        test,
        skipped_images,
    })
}

impl fmt::Display for DataInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tr, te) = (&self.train, &self.test);
        writeln!(f, "data set: {}", self.kind)?;
        let width = self
            .classes
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(12)
            + 1;
        writeln!(f, "{:<width$}{:>10}{:>10}", "", "train", "test")?;
        writeln!(f, "{:<width$}{:>10}{:>10}", "samples", tr.count, te.count)?;
        for (k, (a, b)) in tr.per_class.iter().zip(&te.per_class).enumerate() {
            let name = self.classes.get(k).cloned().unwrap_or(format!("class {k}"));
            writeln!(f, "{name:<width$}{a:>10}{b:>10}")?;
        }
        for (ch, (a, b)) in tr.mean.iter().zip(&te.mean).enumerate() {
            writeln!(f, "{:<width$}{a:>10.4}{b:>10.4}", format!("mean[{ch}]"))?;
        }
        for (ch, (a, b)) in tr.std.iter().zip(&te.std).enumerate() {
            writeln!(f, "{:<width$}{a:>10.4}{b:>10.4}", format!("std[{ch}]"))?;
        }
        if self.skipped_images > 0 {
            writeln!(f, "skipped {} unreadable images", self.skipped_images)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DatasetKind, load_idx_pair};
    use super::*;
    use std::path::Path;
    use tch::Kind;

    #[test]
    fn info_counts_the_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist");
        let split = load_idx_pair(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            &dir.join("t10k-labels-idx1-ubyte.gz"),
            10,
        )
        .unwrap();
        let ds = Dataset {
            meta: DatasetKind::Mnist.meta(),
            train: split.subset(100).into(),
            test: split.shallow_clone().into(),
        };
        let info = info(&ds);
        assert_eq!(info.test.count, 1000);
        assert_eq!(
            info.test.per_class,
            vec![85, 126, 116, 107, 110, 87, 87, 99, 89, 94]
        );
        assert_eq!(info.train.per_class.iter().sum::<usize>(), 100);
        // Cross-check the histogram statistics against a direct f64 computation.
        let x = split.images.to_kind(Kind::Double) / 255.0;
        assert!((info.test.mean[0] - x.mean(Kind::Double).double_value(&[])).abs() < 1e-9);
        assert!((info.test.std[0] - x.std(false).double_value(&[])).abs() < 1e-9);
        let text = info.to_string();
        assert!(
            text.contains("data set: mnist") && text.contains("class 1") && text.contains("126")
        );
    }
}
