//! `sgr bench data`: how fast the batcher delivers training batches (decode, augmentation,
//! normalisation) without any model, e.g. to compare `--loader-workers` settings or with
//! torchvision's `DataLoader` (bench/reference/imagefolder_bench.py).
use std::time::Instant;

use serde::Serialize;
use tch::Device;

use super::{Batches, Dataset, Order};
use crate::Result;

/// One measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throughput {
    /// Decode threads (1 for in-memory sets, which have none).
    pub workers: usize,
    /// Images delivered.
    pub images: usize,
    /// Seconds from creating the pass (threads start) to the last batch.
    pub seconds: f64,
    /// `images / seconds`.
    pub images_per_second: f64,
}

/// Takes up to `batches` shuffled, augmented training batches of `batch_size` from `ds` on the
/// CPU (epoch 0 of `seed`) and times them; fails if an image cannot be read.
pub fn measure(ds: &Dataset, batch_size: i64, batches: usize, seed: u64) -> Result<Throughput> {
    let workers = ds.train.folder().map_or(1, |f| f.workers());
    let start = Instant::now();
    let order = Order::Shuffled { seed, epoch: 0 };
    let mut pass = Batches::new(&ds.train, &ds.meta, batch_size, order, true, Device::Cpu);
    let mut images = 0;
    for batch in pass.by_ref().take(batches) {
        images += batch.labels.size()[0] as usize;
    }
    if let Some(e) = pass.take_error() {
        return Err(e);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Throughput {
        workers,
        images,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
    })
}
