//! STL-10, binary format (`stl10_binary/{train,test}_X.bin`, `{train,test}_y.bin`): headerless
//! `uint8` files; each image is 3 x 96 x 96 bytes, channel by channel, each channel stored
//! column by column (MATLAB order); each label is one byte, 1-10 (Coates et al. 2011, the data
//! set's page and its reference reader). Labels become 0-9; `class_names.txt`, when present,
//! names them. The 100,000 unlabelled images are not read.
use std::path::Path;

use crate::{Error, Result};

/// Side length of an STL-10 image.
pub const SIZE: usize = 96;
/// Pixel bytes of one image (3 x 96 x 96).
pub const IMAGE_BYTES: usize = 3 * SIZE * SIZE;
/// Classes.
pub const CLASSES: usize = 10;

/// Converts STL-10 image and label bytes into CHW (row-major) pixel bytes and labels 0-9,
/// checking that the sizes agree and every label is 1-10.
pub fn parse(images: &[u8], labels: &[u8]) -> std::result::Result<(Vec<u8>, Vec<i64>), String> {
    if images.is_empty() || !images.len().is_multiple_of(IMAGE_BYTES) {
        return Err(format!(
            "image file length {} is not a positive multiple of {IMAGE_BYTES} (3 x 96 x 96; truncated?)",
            images.len()
        ));
    }
    let n = images.len() / IMAGE_BYTES;
    if labels.len() != n {
        return Err(format!(
            "label file holds {} labels but the image file {n} images",
            labels.len()
        ));
    }
    let labels = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if (1..=CLASSES as u8).contains(&l) {
                Ok(i64::from(l) - 1)
            } else {
                Err(format!("label {l} of image {i} is not 1-10"))
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut pixels = vec![0u8; images.len()];
    let plane = SIZE * SIZE;
    for (src, dst) in images
        .chunks_exact(plane)
        .zip(pixels.chunks_exact_mut(plane))
    {
        // Column-major to row-major: a transpose of each 96 x 96 plane.
        for c in 0..SIZE {
            for r in 0..SIZE {
                dst[r * SIZE + c] = src[c * SIZE + r];
            }
        }
    }
    Ok((pixels, labels))
}

/// Reads `dir/{split}_X.bin` and `dir/{split}_y.bin`; errors name the file.
pub fn read_split(dir: &Path, split: &str) -> Result<(Vec<u8>, Vec<i64>)> {
    let xp = super::find_file(dir, &format!("{split}_X.bin"))?;
    let yp = super::find_file(dir, &format!("{split}_y.bin"))?;
    let x = super::idx::read_maybe_gz(&xp)?;
    let y = super::idx::read_maybe_gz(&yp)?;
    if x.is_empty() || !x.len().is_multiple_of(IMAGE_BYTES) {
        return Err(Error::data(
            &xp,
            format!(
                "length {} is not a positive multiple of {IMAGE_BYTES} (3 x 96 x 96; truncated?)",
                x.len()
            ),
        ));
    }
    parse(&x, &y).map_err(|reason| Error::data(&yp, reason))
}

/// Class names from `dir/class_names.txt` (one a line), if the file is there and has 10.
pub fn class_names(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("class_names.txt")).ok()?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (names.len() == CLASSES).then_some(names)
}

/// Serialises CHW images and labels 0-9 in the STL-10 layout (tests: the published layout
/// without the real files): `(images, labels)` bytes.
pub fn write(pixels: &[u8], labels: &[i64]) -> (Vec<u8>, Vec<u8>) {
    let plane = SIZE * SIZE;
    let mut out = vec![0u8; pixels.len()];
    for (src, dst) in pixels.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
        for r in 0..SIZE {
            for c in 0..SIZE {
                dst[c * SIZE + r] = src[r * SIZE + c];
            }
        }
    }
    (out, labels.iter().map(|&l| (l + 1) as u8).collect())
}
