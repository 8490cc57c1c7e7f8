//! A seeded synthetic image set that needs no download: for smoke tests, CI and benchmarks.
//!
//! It has to be *learnable*, so a training test can check that loss falls and accuracy rises,
//! yet no single pixel should give the class away. Each class gets a fixed template made of a
//! base pattern shared by all classes plus a small class-specific deviation; a sample is its
//! class template plus per-pixel Gaussian noise (larger than the class deviations), quantised to
//! `u8`. Telling classes apart therefore requires pooling evidence over many pixels. The pixel statistics come out close to mean 0.5, std 0.25, which is what
//! [`super::SYNTHETIC_MEAN`]/[`super::SYNTHETIC_STD`] normalise with.
//!
//! Everything is drawn from ChaCha8 (never from libtorch's global RNG), with separate streams for
//! the templates, the training samples and the test samples, so the set is a pure function of its
//! arguments and the training samples do not change when `n_test` does.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use super::{AugmentKind, Dataset, DatasetKind, Meta, SYNTHETIC_MEAN, SYNTHETIC_STD, Split};

/// Range of the shared base pattern (uniform).
const BASE_LO: f64 = 0.15;
const BASE_HI: f64 = 0.85;
/// Half-width of each class's uniform deviation from the base pattern.
const CLASS_DEV: f64 = 0.1;
/// Standard deviation of the per-sample pixel noise.
const NOISE_STD: f64 = 0.15;

const STREAM_TEMPLATES: u64 = 0;
const STREAM_TRAIN: u64 = 1;
const STREAM_TEST: u64 = 2;

/// Uniform `f64` in `[0, 1)` from the raw ChaCha output (53 random bits).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    use rand::RngCore;
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Standard normal via Box-Muller; written out so the values do not depend on `rand`'s
/// distribution code.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - unit(rng); // (0, 1], keeps ln finite
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Builds one split: labels cycle through the classes (`i % classes`), so every prefix is
/// nearly balanced.
fn split(rng: &mut ChaCha8Rng, templates: &[Vec<f64>], n: usize, shape: [i64; 3]) -> Split {
    let classes = templates.len();
    let pixels = templates[0].len();
    let mut images = Vec::with_capacity(n * pixels);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % classes;
        labels.push(class as i64);
        for &t in &templates[class] {
            let v = (t + NOISE_STD * normal(rng)).clamp(0.0, 1.0);
            images.push((v * 255.0).round() as u8);
        }
    }
    let [c, h, w] = shape;
    Split {
        images: Tensor::from_slice(&images).reshape([n as i64, c, h, w]),
        labels: Tensor::from_slice(&labels),
    }
}

/// Generates a synthetic data set of `channels x size x size` images in `classes` classes, with
/// `n_train` training and `n_test` test samples. Deterministic for a given set of arguments.
///
/// # Panics
/// If `channels`, `size` or `classes` is not positive (a programming error: the CLI's defaults
/// are fixed).
pub fn generate(
    seed: u64,
    n_train: usize,
    n_test: usize,
    channels: i64,
    size: i64,
    classes: i64,
) -> Dataset {
    assert!(
        channels > 0 && size > 0 && classes > 0,
        "synthetic shape must be positive"
    );
    let pixels = (channels * size * size) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_TEMPLATES);
    let base: Vec<f64> = (0..pixels)
        .map(|_| BASE_LO + (BASE_HI - BASE_LO) * unit(&mut rng))
        .collect();
    let templates: Vec<Vec<f64>> = (0..classes)
        .map(|_| {
            base.iter()
                .map(|b| b + CLASS_DEV * (2.0 * unit(&mut rng) - 1.0))
                .collect()
        })
        .collect();
    let shape = [channels, size, size];
    let mut train_rng = ChaCha8Rng::seed_from_u64(seed);
    train_rng.set_stream(STREAM_TRAIN);
    let mut test_rng = ChaCha8Rng::seed_from_u64(seed);
    test_rng.set_stream(STREAM_TEST);
    Dataset {
        meta: Meta {
            kind: DatasetKind::Synthetic,
            channels,
            height: size,
            width: size,
            classes,
            mean: vec![SYNTHETIC_MEAN; channels as usize],
            std: vec![SYNTHETIC_STD; channels as usize],
            augment: AugmentKind::None,
        },
        train: split(&mut train_rng, &templates, n_train, shape).into(),
        test: split(&mut test_rng, &templates, n_test, shape).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let a = generate(7, 50, 20, 3, 8, 10);
        let b = generate(7, 50, 20, 3, 8, 10);
        let c = generate(8, 50, 20, 3, 8, 10);
        assert!(
            a.train
                .memory()
                .unwrap()
                .images
                .equal(&b.train.memory().unwrap().images)
                && a.test
                    .memory()
                    .unwrap()
                    .images
                    .equal(&b.test.memory().unwrap().images)
        );
        assert!(
            a.train
                .memory()
                .unwrap()
                .labels
                .equal(&b.train.memory().unwrap().labels)
        );
        assert!(
            !a.train
                .memory()
                .unwrap()
                .images
                .equal(&c.train.memory().unwrap().images)
        );
        assert_eq!(a.train.memory().unwrap().images.size(), [50, 3, 8, 8]);
        assert_eq!(a.train.memory().unwrap().images.kind(), Kind::Uint8);
        assert_eq!(a.test.memory().unwrap().labels.size(), [20]);
        // Train samples do not depend on the test size.
        let d = generate(7, 50, 3, 3, 8, 10);
        assert!(
            a.train
                .memory()
                .unwrap()
                .images
                .equal(&d.train.memory().unwrap().images)
        );
    }

    #[test]
    fn statistics_match_the_normalisation_constants() {
        let ds = generate(1, 1000, 10, 3, 16, 10);
        let x = ds.train.memory().unwrap().images.to_kind(Kind::Double) / 255.0;
        let mean = x.mean(Kind::Double).double_value(&[]);
        let std = x.std(false).double_value(&[]);
        assert!((mean - SYNTHETIC_MEAN).abs() < 0.02, "mean {mean}");
        assert!((std - SYNTHETIC_STD).abs() < 0.03, "std {std}");
    }

    #[test]
    fn learnable_by_nearest_class_mean() {
        // Class means estimated on train classify the test set well above chance (10%): the
        // signal is there. Per-pixel noise is larger than the class deviations, so it is not
        // visible in single pixels.
        let ds = generate(3, 500, 200, 3, 16, 10);
        let x = ds
            .train
            .memory()
            .unwrap()
            .images
            .to_kind(Kind::Float)
            .flatten(1, -1);
        let means: Vec<Tensor> = (0..10)
            .map(|k| {
                let idx = Tensor::arange_start_step(k, 500, 10, (Kind::Int64, tch::Device::Cpu));
                x.index_select(0, &idx).mean_dim(0, false, Kind::Float)
            })
            .collect();
        let means = Tensor::stack(&means, 0);
        let t = ds
            .test
            .memory()
            .unwrap()
            .images
            .to_kind(Kind::Float)
            .flatten(1, -1);
        let dist = t
            .unsqueeze(1)
            .g_sub(&means.unsqueeze(0))
            .square()
            .sum_dim_intlist(2, false, Kind::Float);
        let pred = dist.argmin(1, false);
        let acc = pred
            .eq_tensor(&ds.test.memory().unwrap().labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        assert!(acc.double_value(&[]) > 0.9, "accuracy {acc}");
        const { assert!(NOISE_STD > CLASS_DEV) };
    }
}
