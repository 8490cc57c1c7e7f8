//! Reader for the IDX format used by MNIST and Fashion-MNIST.
//!
//! The format is a 4-byte magic (`00 00 <type> <ndims>`), `ndims` big-endian `u32` sizes and then
//! the raw elements. Only unsigned bytes (type `0x08`) occur in these data sets, so nothing else
//! is accepted. Files may be stored raw or gzipped; gzip is recognised by its `1f 8b` magic rather
//! than by the file name, because renamed downloads are common.
//!
//! Every header is checked against the actual byte length *before* anything is allocated, so a
//! corrupt or hostile header (say, one claiming 10^12 images) fails fast instead of exhausting
//! memory. The byte-level parsers are pure functions so that they can be fuzzed without files.
use std::io::Read;
use std::path::Path;

use tch::Tensor;

use crate::{Error, Result};

/// Largest file, raw or after decompression, that the readers accept (1 GiB). The biggest
/// legitimate input (CIFAR-100 `train.bin`) is about 150 MiB; the cap stops gzip bombs.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// IDX element type code for unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// Reads a file into memory, transparently decompressing gzip, refusing anything that is (or
/// inflates to) more than [`MAX_FILE_BYTES`].
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_FILE_BYTES {
        return Err(Error::data(
            path,
            format!("file is {len} bytes, more than the {MAX_FILE_BYTES}-byte limit"),
        ));
    }
    let mut raw = Vec::with_capacity(len as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Error::io(path, e))?;
    if raw.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::data(
            path,
            "file grew past the size limit while being read",
        ));
    }
    if raw.starts_with(&[0x1f, 0x8b]) {
        gunzip_capped(&raw, MAX_FILE_BYTES).map_err(|reason| Error::data(path, reason))
    } else {
        Ok(raw)
    }
}

/// Decompresses (possibly multi-member) gzip data, failing once the output exceeds `cap` bytes.
pub(crate) fn gunzip_capped(bytes: &[u8], cap: u64) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(cap + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("corrupt gzip data: {e}"))?;
    if out.len() as u64 > cap {
        return Err(format!(
            "gzip data inflates to more than {cap} bytes; refusing it"
        ));
    }
    Ok(out)
}

/// Checks the magic and header of an IDX buffer with `want_dims` dimensions and returns the
/// dimensions and the element bytes, whose length is verified to equal their product.
fn parse_header(bytes: &[u8], want_dims: u8) -> std::result::Result<(Vec<usize>, &[u8]), String> {
    if bytes.len() < 4 {
        return Err(format!(
            "truncated IDX header: {} bytes, need at least 4",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "not an IDX file: magic starts {:02x} {:02x}, expected 00 00",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        ));
    }
    let ndims = bytes[3];
    if ndims != want_dims {
        let what = match want_dims {
            3 => "an image file",
            1 => "a label file",
            _ => "this kind of file",
        };
        return Err(format!(
            "IDX file has {ndims} dimensions; {what} needs {want_dims}"
        ));
    }
    let header_len = 4 + 4 * usize::from(ndims);
    if bytes.len() < header_len {
        return Err(format!(
            "truncated IDX header: {} bytes, need {header_len}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let data = &bytes[header_len..];
    // Checked arithmetic against the real length: a header is never trusted for an allocation.
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("IDX header claims an impossible size {dims:?}"))?;
    if expected != data.len() {
        let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        return Err(format!(
            "IDX header claims {} = {expected} bytes of data but the file holds {} (truncated or corrupt)",
            shape.join("x"),
            data.len()
        ));
    }
    Ok((dims, data))
}

/// Validates an IDX image buffer and returns `(n, height, width, pixels)` with
/// `pixels.len() == n * height * width`. Rejects empty sets and zero-sized images, which no
/// real file has and which would only surface later as confusing shape errors.
pub fn parse_images(bytes: &[u8]) -> std::result::Result<(usize, usize, usize, Vec<u8>), String> {
    let (n, h, w, data) = parse_images_ref(bytes)?;
    Ok((n, h, w, data.to_vec()))
}

/// Borrowing version of [`parse_images`], so the reader copies the pixels only once.
fn parse_images_ref(bytes: &[u8]) -> std::result::Result<(usize, usize, usize, &[u8]), String> {
    let (dims, data) = parse_header(bytes, 3)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    if n == 0 {
        return Err("IDX image file contains no images".into());
    }
    if h == 0 || w == 0 {
        return Err(format!("IDX image file has zero-sized images ({h}x{w})"));
    }
    Ok((n, h, w, data))
}

/// Validates an IDX label buffer and returns the labels, each checked to be `< classes`.
pub fn parse_labels(bytes: &[u8], classes: i64) -> std::result::Result<Vec<i64>, String> {
    let (dims, data) = parse_header(bytes, 1)?;
    if dims[0] == 0 {
        return Err("IDX label file contains no labels".into());
    }
    if let Some((i, &l)) = data
        .iter()
        .enumerate()
        .find(|&(_, &l)| i64::from(l) >= classes)
    {
        return Err(format!(
            "label {l} at index {i} is out of range for {classes} classes"
        ));
    }
    Ok(data.iter().map(|&l| i64::from(l)).collect())
}

/// Reads an IDX image file (raw or gzipped) into a `u8` tensor of shape `[N, 1, H, W]` on the
/// CPU.
pub fn read_images(path: &Path) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let (n, h, w, data) = parse_images_ref(&bytes).map_err(|reason| Error::data(path, reason))?;
    Ok(Tensor::from_slice(data).reshape([n as i64, 1, h as i64, w as i64]))
}

/// Reads an IDX label file (raw or gzipped) into an `i64` tensor of shape `[N]`, rejecting
/// labels `>= classes`.
pub fn read_labels(path: &Path, classes: i64) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let labels = parse_labels(&bytes, classes).map_err(|reason| Error::data(path, reason))?;
    Ok(Tensor::from_slice(&labels))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an IDX buffer with the given magic type, dims and payload.
    pub(crate) fn idx(ty: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, ty, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_a_tiny_image_file() {
        let bytes = idx(8, &[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
        let (n, h, w, px) = parse_images(&bytes).unwrap();
        assert_eq!((n, h, w), (2, 2, 3));
        assert_eq!(px, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]);
    }

    #[test]
    fn parses_labels_and_rejects_out_of_range() {
        let bytes = idx(8, &[4], &[0, 9, 3, 1]);
        assert_eq!(parse_labels(&bytes, 10).unwrap(), vec![0, 9, 3, 1]);
        let err = parse_labels(&bytes, 9).unwrap_err();
        assert!(err.contains("label 9 at index 1"), "{err}");
    }

    #[test]
    fn rejects_bad_magic_type_and_dims() {
        let err = parse_images(&[1, 0, 8, 3, 0, 0, 0, 0]).unwrap_err();
        assert!(err.contains("not an IDX file"), "{err}");
        let err = parse_images(&idx(0x0d, &[1, 1, 1], &[0, 0, 0, 0])).unwrap_err();
        assert!(err.contains("0x0d"), "{err}");
        // A label file given where images are expected, and vice versa.
        let err = parse_images(&idx(8, &[1], &[3])).unwrap_err();
        assert!(err.contains("needs 3"), "{err}");
        let err = parse_labels(&idx(8, &[1, 1, 1], &[3]), 10).unwrap_err();
        assert!(err.contains("needs 1"), "{err}");
    }

    #[test]
    fn rejects_truncated_headers_and_data() {
        for len in 0..16 {
            let full = idx(8, &[1, 2, 2], &[1, 2, 3, 4]);
            assert!(
                parse_images(&full[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
        let err = parse_images(&idx(8, &[1, 2, 2], &[1, 2, 3])).unwrap_err();
        assert!(
            err.contains("1x2x2 = 4 bytes") && err.contains("holds 3"),
            "{err}"
        );
        // Trailing garbage is as wrong as missing data.
        assert!(parse_images(&idx(8, &[1, 2, 2], &[1, 2, 3, 4, 5])).is_err());
    }

    #[test]
    fn rejects_empty_and_zero_sized() {
        assert!(parse_images(&idx(8, &[0, 28, 28], &[])).is_err());
        assert!(parse_images(&idx(8, &[5, 0, 28], &[])).is_err());
        assert!(parse_labels(&idx(8, &[0], &[]), 10).is_err());
    }

    #[test]
    fn absurd_header_is_rejected_without_allocating() {
        // ~3*10^12 pixel bytes claimed, 8 present: must fail on the length check, not allocate.
        let bytes = idx(8, &[4_000_000_000, 28, 28], &[0; 8]);
        let err = parse_images(&bytes).unwrap_err();
        assert!(
            err.contains("3136000000000 bytes") && err.contains("holds 8"),
            "{err}"
        );
        // A product that overflows usize altogether.
        let bytes = idx(8, &[u32::MAX, u32::MAX, u32::MAX], &[0; 8]);
        let err = parse_images(&bytes).unwrap_err();
        assert!(err.contains("impossible"), "{err}");
    }

    #[test]
    fn gzip_is_detected_by_magic_and_capped() {
        use std::io::Write;
        let payload = idx(8, &[3], &[1, 2, 3]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&payload).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip_capped(&gz, 1 << 20).unwrap(), payload);
        let err = gunzip_capped(&gz, 4).unwrap_err();
        assert!(err.contains("more than 4 bytes"), "{err}");
        assert!(gunzip_capped(&gz[..gz.len() / 2], 1 << 20).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.bin"); // no .gz suffix on purpose
        std::fs::write(&path, &gz).unwrap();
        let t = read_labels(&path, 10).unwrap();
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), vec![1, 2, 3]);
    }
}
