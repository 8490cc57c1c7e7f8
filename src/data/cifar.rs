//! Reader (and writer, for tests) of the CIFAR-10/100 "binary version" files.
//!
//! A file is a plain sequence of fixed-size records with no header: CIFAR-10 records are one label
//! byte followed by 3,072 pixel bytes (1,024 each for R, G, B, row-major, i.e. CHW); CIFAR-100
//! records carry a coarse (superclass) byte and then the fine label byte. Without a header the
//! only integrity checks available are the length (a whole number of records) and the label
//! range, so both are enforced.
use std::path::Path;

use tch::Tensor;

use crate::{Error, Result};

/// Side length of a CIFAR image.
pub const SIZE: i64 = 32;
/// Channels of a CIFAR image.
pub const CHANNELS: i64 = 3;
/// Pixel bytes in one record (3 x 32 x 32).
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Splits a CIFAR binary buffer into CHW pixel bytes and labels.
///
/// `label_bytes` is 1 for CIFAR-10 and 2 for CIFAR-100; the *last* label byte is the class (for
/// CIFAR-100 that is the fine label, the coarse one is ignored). Fails on an empty buffer, a
/// length that is not a multiple of the record size (truncated download) or a label
/// `>= classes`.
pub fn parse_records(
    bytes: &[u8],
    label_bytes: usize,
    classes: i64,
) -> std::result::Result<(Vec<u8>, Vec<i64>), String> {
    if !(1..=2).contains(&label_bytes) {
        return Err(format!(
            "CIFAR records have 1 or 2 label bytes, not {label_bytes}"
        ));
    }
    let record = label_bytes + IMAGE_BYTES;
    if bytes.is_empty() {
        return Err("CIFAR file is empty".into());
    }
    if !bytes.len().is_multiple_of(record) {
        return Err(format!(
            "CIFAR file length {} is not a multiple of the {record}-byte record size (truncated or \
             not a {} file?)",
            bytes.len(),
            if label_bytes == 1 {
                "CIFAR-10"
            } else {
                "CIFAR-100"
            }
        ));
    }
    let n = bytes.len() / record;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = i64::from(rec[label_bytes - 1]);
        if label >= classes {
            return Err(format!(
                "label {label} in record {i} is out of range for {classes} classes"
            ));
        }
        labels.push(label);
        images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok((images, labels))
}

/// Reads one CIFAR binary file (raw or gzipped) and validates it with [`parse_records`].
pub fn read_file(path: &Path, label_bytes: usize, classes: i64) -> Result<(Vec<u8>, Vec<i64>)> {
    let bytes = super::idx::read_maybe_gz(path)?;
    parse_records(&bytes, label_bytes, classes).map_err(|reason| Error::data(path, reason))
}

/// Serialises `u8` images `[N, 3, 32, 32]` and `i64` labels `[N]` in the CIFAR binary layout.
///
/// Exists so tests can build CIFAR files without the real data. For CIFAR-100 the coarse label is
/// not known here and is written as 0; the reader ignores it.
///
/// # Panics
/// If the shapes or kinds do not match the layout, or a label does not fit in a byte.
pub fn write_records(images: &Tensor, labels: &Tensor, cifar100: bool) -> Vec<u8> {
    let n = labels.size1().expect("labels must be 1-D");
    assert_eq!(
        images.size(),
        [n, CHANNELS, SIZE, SIZE],
        "images must be [N,3,32,32]"
    );
    assert_eq!(images.kind(), tch::Kind::Uint8, "images must be u8");
    let pixels = Vec::<u8>::try_from(&images.reshape([-1])).expect("reading image bytes");
    let labels = Vec::<i64>::try_from(&labels.to_kind(tch::Kind::Int64)).expect("reading labels");
    let label_bytes = if cifar100 { 2 } else { 1 };
    let mut out = Vec::with_capacity(labels.len() * (label_bytes + IMAGE_BYTES));
    for (label, img) in labels.iter().zip(pixels.chunks_exact(IMAGE_BYTES)) {
        if cifar100 {
            out.push(0);
        }
        out.push(u8::try_from(*label).expect("label must fit in a byte"));
        out.extend_from_slice(img);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(labels: &[u8], fill: u8) -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend(std::iter::repeat_n(fill, IMAGE_BYTES));
        r
    }

    #[test]
    fn parses_cifar10_and_cifar100_records() {
        let mut bytes = record(&[3], 7);
        bytes.extend(record(&[9], 8));
        let (img, lab) = parse_records(&bytes, 1, 10).unwrap();
        assert_eq!(lab, vec![3, 9]);
        assert_eq!(img.len(), 2 * IMAGE_BYTES);
        assert_eq!((img[0], img[IMAGE_BYTES]), (7, 8));

        // CIFAR-100: coarse 19, fine 99 -> the fine label is used.
        let bytes = record(&[19, 99], 1);
        let (_, lab) = parse_records(&bytes, 2, 100).unwrap();
        assert_eq!(lab, vec![99]);
    }

    #[test]
    fn rejects_truncated_empty_and_bad_labels() {
        let bytes = record(&[3], 0);
        let err = parse_records(&bytes[..bytes.len() - 1], 1, 10).unwrap_err();
        assert!(
            err.contains("not a multiple of the 3073-byte record"),
            "{err}"
        );
        assert!(parse_records(&[], 1, 10).unwrap_err().contains("empty"));
        let err = parse_records(&record(&[10], 0), 1, 10).unwrap_err();
        assert!(err.contains("label 10 in record 0"), "{err}");
        assert!(parse_records(&bytes, 3, 10).is_err());
        // A CIFAR-10 file read as CIFAR-100 fails on length rather than yielding garbage.
        assert!(parse_records(&bytes, 2, 100).is_err());
    }

    #[test]
    fn write_then_parse_round_trips() {
        let images = Tensor::arange(2 * IMAGE_BYTES as i64, (tch::Kind::Int64, tch::Device::Cpu))
            .remainder(251)
            .to_kind(tch::Kind::Uint8)
            .reshape([2, 3, 32, 32]);
        let labels = Tensor::from_slice(&[42i64, 7]);
        for (cifar100, lb, classes) in [(false, 1, 100), (true, 2, 100)] {
            let bytes = write_records(&images, &labels, cifar100);
            assert_eq!(bytes.len(), 2 * (lb + IMAGE_BYTES));
            let (img, lab) = parse_records(&bytes, lb, classes).unwrap();
            assert_eq!(lab, vec![42, 7]);
            assert_eq!(img, Vec::<u8>::try_from(&images.flatten(0, -1)).unwrap());
        }
    }
}
