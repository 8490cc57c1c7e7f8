//! Batched augmentation on `u8` images: zero-pad by [`PAD`] then crop back to the original size at
//! a per-sample offset, optionally mirrored horizontally.
//!
//! The random choices are *inputs* ([`Params`]), drawn by the caller from a seeded ChaCha stream,
//! so that the transform itself is a pure function that can be tested exactly and replayed on
//! resume. Crop and flip are fused into two `gather`s (rows, then columns with the flip folded into
//! the column index), which keeps the cost independent of how many samples are flipped and avoids
//! a per-sample loop of small tensor ops.
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

/// Zero padding on each side before the random crop (the usual 4 pixels for 28/32-pixel images).
pub const PAD: i64 = 4;

/// The random choices for one batch: per-sample crop offsets and flip flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// `(dy, dx)` of each crop's top-left corner in the padded image, each in `0..=2*PAD`;
    /// `(PAD, PAD)` is the identity crop.
    pub offsets: Vec<(i64, i64)>,
    /// Whether each sample is mirrored left-right (after cropping).
    pub flips: Vec<bool>,
}

impl Params {
    /// The parameters that leave every one of `n` samples unchanged.
    pub fn identity(n: usize) -> Self {
        Params {
            offsets: vec![(PAD, PAD); n],
            flips: vec![false; n],
        }
    }

    /// Draws crop offsets uniformly in `0..=2*PAD` and, if `flip`, mirror flags with p = 0.5.
    ///
    /// Uses only the raw ChaCha output (via the crate's own uniform sampler) so the draws do not
    /// depend on the `rand` version's sampling algorithms.
    pub fn draw(rng: &mut ChaCha8Rng, n: usize, flip: bool) -> Self {
        let span = (2 * PAD + 1) as u64;
        let mut offsets = Vec::with_capacity(n);
        let mut flips = Vec::with_capacity(n);
        for _ in 0..n {
            let dy = super::uniform_below(rng, span) as i64;
            let dx = super::uniform_below(rng, span) as i64;
            offsets.push((dy, dx));
            flips.push(flip && super::uniform_below(rng, 2) == 1);
        }
        Params { offsets, flips }
    }
}

/// Pads `images` (`u8 [B, C, H, W]`) with [`PAD`] zeros on each side, crops each sample back to
/// `H x W` at `params.offsets[b]` and mirrors it if `params.flips[b]`.
///
/// # Panics
/// If `images` is not 4-D, the parameter lengths differ from `B`, or an offset is outside
/// `0..=2*PAD` (all programming errors, not data errors).
pub fn pad_crop_flip(images: &Tensor, params: &Params) -> Tensor {
    let (b, c, h, w) = images.size4().expect("augment expects [B, C, H, W] images");
    assert_eq!(params.offsets.len() as i64, b, "one crop offset per sample");
    assert_eq!(params.flips.len() as i64, b, "one flip flag per sample");
    let device = images.device();
    let mut rows = Vec::with_capacity((b * h) as usize);
    let mut cols = Vec::with_capacity((b * w) as usize);
    for (&(dy, dx), &flip) in params.offsets.iter().zip(&params.flips) {
        assert!(
            (0..=2 * PAD).contains(&dy) && (0..=2 * PAD).contains(&dx),
            "crop offset ({dy}, {dx}) outside 0..={}",
            2 * PAD
        );
        rows.extend((0..h).map(|i| dy + i));
        cols.extend((0..w).map(|j| dx + if flip { w - 1 - j } else { j }));
    }
    let padded = images.constant_pad_nd([PAD, PAD, PAD, PAD]);
    let rows = Tensor::from_slice(&rows)
        .to_device(device)
        .view([b, 1, h, 1])
        .expand([b, c, h, w + 2 * PAD], false);
    let cols = Tensor::from_slice(&cols)
        .to_device(device)
        .view([b, 1, 1, w])
        .expand([b, c, h, w], false);
    padded.gather(2, &rows, false).gather(3, &cols, false)
}

/// One erased rectangle: sample, top-left corner, size, and the noise that fills it
/// (`[C, h, w]`, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Erase {
    /// Sample index in the batch.
    pub sample: i64,
    /// Top row.
    pub top: i64,
    /// Left column.
    pub left: i64,
    /// Height.
    pub height: i64,
    /// Width.
    pub width: i64,
    /// Standard-normal fill values, `C·height·width` of them.
    pub noise: Vec<f32>,
}

/// A uniform draw in `[0, 1)` from the raw ChaCha output (53 bits).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal draw (Box–Muller on two uniform draws).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u = 1.0 - unit(rng); // in (0, 1], so the log is finite
    let v = unit(rng);
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Draws random erasing for `n` samples of `c x h x w`, as timm's `RandomErasing` in pixel
/// mode (Zhong et al., 2020): with probability `p` a sample gets one rectangle of area
/// U(0.02, 1/3) of the image and log-uniform aspect ratio in [0.3, 1/0.3], placed uniformly
/// (up to 10 attempts to fit), filled with per-pixel standard-normal noise, which after
/// normalisation is the data's own scale.
pub fn draw_erasing(
    rng: &mut ChaCha8Rng,
    n: usize,
    p: f64,
    (c, h, w): (i64, i64, i64),
) -> Vec<Erase> {
    let mut out = Vec::new();
    let log_ratio = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for sample in 0..n as i64 {
        if unit(rng) >= p {
            continue;
        }
        for _ in 0..10 {
            let area = (h * w) as f64 * (0.02 + unit(rng) * (1.0 / 3.0 - 0.02));
            let ratio = (log_ratio.0 + unit(rng) * (log_ratio.1 - log_ratio.0)).exp();
            let height = (area * ratio).sqrt().round() as i64;
            let width = (area / ratio).sqrt().round() as i64;
            if height < 1 || width < 1 || height >= h || width >= w {
                continue;
            }
            let top = super::uniform_below(rng, (h - height + 1) as u64) as i64;
            let left = super::uniform_below(rng, (w - width + 1) as u64) as i64;
            let noise = (0..c * height * width).map(|_| normal(rng)).collect();
            out.push(Erase {
                sample,
                top,
                left,
                height,
                width,
                noise,
            });
            break;
        }
    }
    out
}

/// Applies `erases` to the normalised float batch `x` (`[B, C, H, W]`) in place.
pub fn erase(x: &mut Tensor, erases: &[Erase]) {
    let c = x.size()[1];
    tch::no_grad(|| {
        for e in erases {
            let noise = Tensor::from_slice(&e.noise)
                .view([c, e.height, e.width])
                .to_kind(x.kind())
                .to_device(x.device());
            x.get(e.sample)
                .narrow(1, e.top, e.height)
                .narrow(2, e.left, e.width)
                .copy_(&noise);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::{Device, Kind};

    fn sample_images() -> Tensor {
        // Distinct non-zero values so any displacement is visible; max 2*2*5*6 = 120 < 256.
        (Tensor::arange(2 * 2 * 5 * 6, (Kind::Int64, Device::Cpu)) + 1)
            .to_kind(Kind::Uint8)
            .reshape([2, 2, 5, 6])
    }

    #[test]
    fn identity_offsets_return_the_input() {
        let x = sample_images();
        let y = pad_crop_flip(&x, &Params::identity(2));
        assert_eq!(y.size(), x.size());
        assert_eq!(y.kind(), Kind::Uint8);
        assert!(y.equal(&x));
    }

    #[test]
    fn offsets_shift_content_and_fill_with_zeros() {
        let x = sample_images();
        // Sample 0: crop starting one row below / two columns right of the identity crop, so
        // out[i][j] = x[i+1][j+2] where in range, else zero padding. Sample 1: identity.
        let params = Params {
            offsets: vec![(PAD + 1, PAD + 2), (PAD, PAD)],
            flips: vec![false; 2],
        };
        let y = pad_crop_flip(&x, &params);
        let (h, w) = (5, 6);
        for c in 0..2 {
            for i in 0..h {
                for j in 0..w {
                    let got = y.int64_value(&[0, c, i, j]);
                    let want = if i + 1 < h && j + 2 < w {
                        x.int64_value(&[0, c, i + 1, j + 2])
                    } else {
                        0
                    };
                    assert_eq!(got, want, "c={c} i={i} j={j}");
                }
            }
        }
        assert!(y.get(1).equal(&x.get(1)));
        // The extreme offset (0, 0) moves content down-right: the top PAD rows become zero.
        let y = pad_crop_flip(
            &x,
            &Params {
                offsets: vec![(0, 0); 2],
                flips: vec![false; 2],
            },
        );
        assert_eq!(y.narrow(2, 0, PAD).sum(Kind::Int64).int64_value(&[]), 0);
        assert!(
            y.narrow(2, PAD, 1)
                .narrow(3, PAD, 2)
                .equal(&x.narrow(2, 0, 1).narrow(3, 0, 2))
        );
    }

    #[test]
    fn flip_mirrors_only_the_chosen_samples() {
        let x = sample_images();
        let params = Params {
            offsets: vec![(PAD, PAD); 2],
            flips: vec![true, false],
        };
        let y = pad_crop_flip(&x, &params);
        assert!(y.get(0).equal(&x.get(0).flip([2])));
        assert!(y.get(1).equal(&x.get(1)));
        // Flipping twice is the identity.
        assert!(pad_crop_flip(&y, &params).equal(&x));
    }

    #[test]
    fn erasing_hits_the_requested_fraction_inside_the_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let erases = draw_erasing(&mut rng, 2000, 0.25, (3, 32, 32));
        // Binomial(2000, 0.25): mean 500, sd ≈ 19; a few attempts may fail to fit.
        assert!(
            (420..=560).contains(&erases.len()),
            "{} erased",
            erases.len()
        );
        let mut area = 0.0;
        for e in &erases {
            assert!(e.top >= 0 && e.top + e.height <= 32 && e.left >= 0 && e.left + e.width <= 32);
            assert_eq!(e.noise.len() as i64, 3 * e.height * e.width);
            area += (e.height * e.width) as f64 / 1024.0;
        }
        let mean_area = area / erases.len() as f64;
        // U(0.02, 1/3) has mean ≈ 0.18; rounding and the fit test move it a little.
        assert!((0.13..0.22).contains(&mean_area), "mean area {mean_area}");
        let noise: Vec<f32> = erases
            .iter()
            .flat_map(|e| e.noise.iter().copied())
            .collect();
        let mean = noise.iter().map(|&v| v as f64).sum::<f64>() / noise.len() as f64;
        let var = noise
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / noise.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean} var {var}"
        );
        // Applying writes exactly the rectangle.
        let mut x = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
        let one = Erase {
            sample: 0,
            top: 2,
            left: 5,
            height: 3,
            width: 4,
            noise: vec![1.0; 36],
        };
        erase(&mut x, &[one]);
        assert_eq!(x.sum(Kind::Double).double_value(&[]), 36.0);
        assert_eq!(x.double_value(&[0, 2, 4, 8]), 1.0);
        assert_eq!(x.double_value(&[0, 2, 5, 8]), 0.0);
        assert!(draw_erasing(&mut rng, 100, 0.0, (3, 32, 32)).is_empty());
    }

    #[test]
    fn draw_is_deterministic_and_in_range() {
        let a = Params::draw(&mut ChaCha8Rng::seed_from_u64(1), 500, true);
        let b = Params::draw(&mut ChaCha8Rng::seed_from_u64(1), 500, true);
        assert_eq!(a, b);
        assert!(
            a.offsets
                .iter()
                .all(|&(y, x)| (0..=2 * PAD).contains(&y) && (0..=2 * PAD).contains(&x))
        );
        let flipped = a.flips.iter().filter(|&&f| f).count();
        assert!((180..=320).contains(&flipped), "{flipped} of 500 flipped");
        // Every offset value is reachable.
        for v in 0..=2 * PAD {
            assert!(a.offsets.iter().any(|&(y, _)| y == v));
        }
        let no_flip = Params::draw(&mut ChaCha8Rng::seed_from_u64(1), 100, false);
        assert!(no_flip.flips.iter().all(|&f| !f));
    }
}
