//! SVHN, cropped-digits format (`train_32x32.mat`, `test_32x32.mat`): MATLAB level-5 files
//! holding `X`, `uint8 [32, 32, 3, N]` (row, column, channel, image; column-major), and `y`,
//! `[N, 1]` labels 1-10 where 10 stands for the digit 0 (Netzer et al. 2011, the data set's
//! page). Labels become 0-9 with the digit as the class.
use std::path::Path;

use super::mat::{self, MatArray};
use crate::{Error, Result};

/// Side length of an SVHN image.
pub const SIZE: usize = 32;
/// Pixel bytes of one image (3 x 32 x 32).
pub const IMAGE_BYTES: usize = 3 * SIZE * SIZE;

/// Converts the `X` and `y` arrays of an SVHN file into CHW pixel bytes and labels 0-9.
pub fn from_arrays(arrays: &[MatArray]) -> std::result::Result<(Vec<u8>, Vec<i64>), String> {
    let find = |name: &str| {
        arrays
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| format!("no variable '{name}' (an SVHN file holds X and y)"))
    };
    let (x, y) = (find("X")?, find("y")?);
    if x.dims.len() != 4 || x.dims[..3] != [SIZE, SIZE, 3] {
        return Err(format!(
            "X has dimensions {:?}, expected [32, 32, 3, N]",
            x.dims
        ));
    }
    if x.bytes.is_empty() && !x.is_empty() {
        return Err("X is not stored as uint8".into());
    }
    let n = x.dims[3];
    if n == 0 {
        return Err("X holds no images".into());
    }
    if y.len() != n || y.dims.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(format!(
            "y has dimensions {:?} but X holds {n} images",
            y.dims
        ));
    }
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let v = y.get(i);
        if v.fract() != 0.0 || !(1.0..=10.0).contains(&v) {
            return Err(format!("label {v} of image {i} is not 1-10"));
        }
        labels.push(v as i64 % 10);
    }
    // X(r, c, ch, i) sits at r + 32 c + 1024 ch + 3072 i; CHW wants ch, r, c.
    let mut pixels = vec![0u8; n * IMAGE_BYTES];
    for (src, dst) in x
        .bytes
        .chunks_exact(IMAGE_BYTES)
        .zip(pixels.chunks_exact_mut(IMAGE_BYTES))
    {
        for ch in 0..3 {
            for r in 0..SIZE {
                for c in 0..SIZE {
                    dst[ch * SIZE * SIZE + r * SIZE + c] = src[r + SIZE * c + SIZE * SIZE * ch];
                }
            }
        }
    }
    Ok((pixels, labels))
}

/// Reads one SVHN `.mat` file; errors name it.
pub fn read_file(path: &Path) -> Result<(Vec<u8>, Vec<i64>)> {
    let arrays = mat::read_file(path)?;
    from_arrays(&arrays).map_err(|reason| Error::data(path, reason))
}

/// Builds the `X` and `y` arrays of an SVHN file from CHW images and labels 0-9, for
/// [`mat::write`] (tests: the published layout without the real files).
pub fn to_arrays(
    pixels: &[u8],
    labels: &[i64],
) -> [(&'static str, Vec<usize>, Vec<f64>, mat::Storage); 2] {
    let n = labels.len();
    let mut x = vec![0f64; n * IMAGE_BYTES];
    for (src, dst) in pixels
        .chunks_exact(IMAGE_BYTES)
        .zip(x.chunks_exact_mut(IMAGE_BYTES))
    {
        for ch in 0..3 {
            for r in 0..SIZE {
                for c in 0..SIZE {
                    dst[r + SIZE * c + SIZE * SIZE * ch] =
                        f64::from(src[ch * SIZE * SIZE + r * SIZE + c]);
                }
            }
        }
    }
    let y = labels
        .iter()
        .map(|&l| if l == 0 { 10.0 } else { l as f64 })
        .collect();
    [
        ("X", vec![SIZE, SIZE, 3, n], x, mat::Storage::Uint8),
        ("y", vec![n, 1], y, mat::Storage::DoubleAsUint8),
    ]
}
