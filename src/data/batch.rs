//! Batching: the epoch's order (a seeded permutation), augmentation, normalisation, and for
//! streamed sets the decode workers with their bounded prefetch queues.
//!
//! All randomness here (shuffling, crop offsets, flips, resized crops) comes from ChaCha8
//! streams seeded from `(seed, epoch, batch or sample position)`, never from libtorch's global
//! RNG, and never from which worker thread did the work. A run resumed at epoch `e` thus sees
//! exactly the batches, in the same order and with the same augmentation, that an uninterrupted
//! run would have seen, with any number of `--loader-workers`.
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::folder::{self, FolderSplit, Transform};
use super::source::Source;
use super::{AugmentKind, Meta, augment};
use crate::{Error, Result};

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
pub(crate) fn mix(seed: u64, epoch: u64) -> u64 {
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

/// An iterator over the batches of one pass through a [`Source`].
///
/// The last partial batch is kept, except when it would hold a single sample: BatchNorm cannot
/// compute batch statistics from one sample in training mode. (Call [`Batches::keep_singleton`]
/// for evaluation, where every sample must count.)
///
/// A streamed source is decoded by `workers` threads: worker `w` builds batches `w, w + N, ...`
/// in turn into its own queue of [`PREFETCH`] batches, and the iterator takes batch `b` from
/// queue `b mod N`. Batches thus arrive in order, at most `N * (PREFETCH + 1)` of them are
/// decoded ahead, and each sample's random crop depends only on `(seed, epoch, position)`. A
/// file that fails to decode ends the pass early; [`Batches::take_error`] returns why.
pub struct Batches {
    source: Source,
    order: Arc<Vec<i64>>,
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
    /// Streamed sources: the workers' queues, started on the first batch.
    queues: Option<Vec<Receiver<Result<RawBatch>>>>,
    /// The error that ended a streamed pass.
    error: Option<Error>,
}

/// Batches each decode worker may have ready ahead of the consumer.
pub const PREFETCH: usize = 2;

/// A decoded batch before it becomes a tensor: `u8 [B, C, H, W]` pixels and labels.
struct RawBatch {
    pixels: Vec<u8>,
    labels: Vec<i64>,
}

impl Batches {
    /// Prepares one pass over `source` in `order`, with batches of `batch_size` samples moved to
    /// `device`. If `augment`, `meta.augment` is applied; its random choices for batch `b` come
    /// from a ChaCha8 stream determined by `(seed, epoch, b)` (`(0, 0, b)` for `Sequential`).
    ///
    /// # Panics
    /// If `batch_size < 1`, or `meta` does not describe `source` (channel count, normalisation
    /// vector lengths); configs are validated before this point.
    pub fn new(
        source: impl Into<Source>,
        meta: &Meta,
        batch_size: i64,
        order: Order,
        augment: bool,
        device: Device,
    ) -> Batches {
        let source = source.into();
        assert!(
            batch_size >= 1,
            "batch size must be at least 1, got {batch_size}"
        );
        let n = source.len();
        let c = meta.channels;
        if let Source::Memory(split) = &source {
            assert_eq!(
                split.images.size()[1],
                c,
                "split and meta disagree on channels"
            );
        }
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
            (true, AugmentKind::CropFlip | AugmentKind::ResizedCropFlip) => Some(true),
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
            source,
            order: Arc::new(order),
            batch_size: batch_size as usize,
            n_batches: 0,
            next: 0,
            augment,
            erasing: 0.0,
            seed,
            scale: per_channel(&scale),
            shift: per_channel(&shift),
            device,
            queues: None,
            error: None,
        };
        batches.n_batches = batches.count_batches(false);
        batches
    }

    /// Adds random erasing with probability `p` per sample (see [`augment::draw_erasing`]).
    /// Batch `b`'s rectangles come from its `(seed, epoch, b)` stream, after the crop and flip
    /// draws of an in-memory set, so batches stay reproducible and, with `p = 0`, unchanged.
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

    /// The error that ended a streamed pass early (an unreadable image without
    /// `--skip-bad-images`), if any; taking it clears it. Always `None` for in-memory sources.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    /// The ChaCha stream of batch `b` (crops, flips and erasing of in-memory sets).
    fn batch_rng(&self, b: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(b as u64 + 1);
        rng
    }

    /// Normalises `u8` pixels on the device: `(x / 255 - mean) / std == x * scale + shift`,
    /// then erases rectangles when random erasing is on, with draws from `rng`. Pixels travel
    /// as `u8` (4x less traffic than `f32`).
    fn finish(&self, x: Tensor, y: Tensor, rng: &mut ChaCha8Rng) -> Batch {
        let (n, c, h, w) = x.size4().expect("[B, C, H, W] images");
        let erases = (self.erasing > 0.0)
            .then(|| augment::draw_erasing(rng, n as usize, self.erasing, (c, h, w)));
        let mut x = x.to_device(self.device).to_kind(Kind::Float) * &self.scale + &self.shift;
        if let Some(erases) = erases {
            augment::erase(&mut x, &erases);
        }
        Batch {
            images: x,
            labels: y.to_device(self.device),
        }
    }

    /// Builds in-memory batch `b`.
    fn memory_batch(&self, split: &super::Split, b: usize) -> Batch {
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let idx = Tensor::from_slice(&self.order[start..end]);
        let mut x = split.images.index_select(0, &idx);
        let y = split.labels.index_select(0, &idx);
        let mut rng = self.batch_rng(b);
        if let Some(flip) = self.augment {
            x = augment::pad_crop_flip(&x, &augment::Params::draw(&mut rng, end - start, flip));
        }
        self.finish(x, y, &mut rng)
    }

    /// Starts the decode workers of a streamed source.
    fn start_workers(&self, folder: &FolderSplit) -> Vec<Receiver<Result<RawBatch>>> {
        let workers = folder.workers().max(1).min(self.n_batches.max(1));
        (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(PREFETCH);
                let job = Job {
                    folder: folder.clone(),
                    order: Arc::clone(&self.order),
                    batch_size: self.batch_size,
                    transform: if self.augment.is_some() {
                        Transform::Train
                    } else {
                        Transform::Eval
                    },
                    seed: self.seed,
                };
                let n_batches = self.n_batches;
                std::thread::Builder::new()
                    .name(format!("sgr-loader-{w}"))
                    .spawn(move || job.run(w, workers, n_batches, tx))
                    .expect("spawning a loader thread");
                rx
            })
            .collect()
    }
}

/// What one decode worker needs: the files, the epoch's order and how to transform.
struct Job {
    folder: FolderSplit,
    order: Arc<Vec<i64>>,
    batch_size: usize,
    transform: Transform,
    seed: u64,
}

impl Job {
    /// Builds batches `first, first + step, ...` below `n_batches` into `tx`; stops at the first
    /// error (after sending it) or when the consumer is gone.
    fn run(self, first: usize, step: usize, n_batches: usize, tx: SyncSender<Result<RawBatch>>) {
        for b in (first..n_batches).step_by(step) {
            let batch = self.batch(b);
            let failed = batch.is_err();
            if tx.send(batch).is_err() || failed {
                return;
            }
        }
    }

    fn batch(&self, b: usize) -> Result<RawBatch> {
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let size = self.folder.image_size() as usize;
        let mut pixels = Vec::with_capacity((end - start) * 3 * size * size);
        let mut labels = Vec::with_capacity(end - start);
        for pos in start..end {
            let i = self.order[pos] as usize;
            // One stream per position in the epoch's order: the crop of a sample does not depend
            // on which worker decodes it, nor on the batch size.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(folder::SAMPLE_STREAM_BASE + pos as u64);
            match self.folder.load(i, self.transform, &mut rng) {
                Ok(img) => {
                    pixels.extend_from_slice(&img);
                    labels.push(self.folder.labels()[i]);
                }
                Err(e) if self.folder.skip_bad() => self.folder.record_skip(i, &e),
                Err(e) => return Err(e),
            }
        }
        Ok(RawBatch { pixels, labels })
    }
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        loop {
            if self.next >= self.n_batches || self.error.is_some() {
                return None;
            }
            let b = self.next;
            self.next += 1;
            let folder = match &self.source {
                Source::Memory(split) => return Some(self.memory_batch(split, b)),
                Source::Folder(f) => f.clone(),
            };
            if self.queues.is_none() {
                self.queues = Some(self.start_workers(&folder));
            }
            let queues = self.queues.as_ref().expect("started above");
            let raw = match queues[b % queues.len()].recv() {
                Ok(Ok(raw)) => raw,
                Ok(Err(e)) => {
                    self.error = Some(e);
                    return None;
                }
                Err(_) => {
                    self.error = Some(Error::data(
                        folder.root(),
                        "a loader thread stopped without an answer",
                    ));
                    return None;
                }
            };
            if raw.labels.is_empty() {
                // Every image of this batch was skipped as unreadable.
                continue;
            }
            let s = folder.image_size();
            let n = raw.labels.len() as i64;
            let x = Tensor::from_slice(&raw.pixels).view([n, 3, s, s]);
            // The workers drew the crops from per-sample streams; erasing uses the batch's.
            return Some(self.finish(x, Tensor::from_slice(&raw.labels), &mut self.batch_rng(b)));
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n_batches - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches {}

#[cfg(test)]
mod tests {
    use super::super::{Dataset, DatasetKind, MNIST_MEAN, MNIST_STD, Split, load_idx_pair};
    use super::*;
    use std::path::{Path, PathBuf};

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
                indexed_split(n),
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
}
