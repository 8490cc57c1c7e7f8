//! A small reader of MATLAB level-5 MAT-files (and a writer, for tests), for exactly what the
//! SVHN files hold: real numeric arrays, compressed (`miCOMPRESSED`, zlib) or not, little- or
//! big-endian. Sparse, complex, cell, struct and object arrays are rejected with a message, not
//! misread. (No maintained Rust crate reads v5 with compression; this is ~250 lines and fuzzed.)
//!
//! Layout (MathWorks, "MAT-File Format", level 5): a 128-byte header (text, subsystem offset,
//! version 0x0100, endian indicator "IM"/"MI"), then data elements. Each element is a tag
//! (`u32` type, `u32` byte count) and its data padded to 8 bytes, or a "small" element whose
//! first word packs the byte count (upper 16 bits, 1-4) and type with the data in the next
//! 4 bytes. An array (`miMATRIX`) holds sub-elements: flags (class), dimensions, name, real
//! part. The real part may be stored in a narrower type than the class (a `double` array of
//! small integers as `miUINT8`), so values are converted by the stored type.
use std::io::Read;

use crate::{Error, Result};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
/// Numeric array classes (`mxDOUBLE_CLASS` 6 to `mxUINT64_CLASS` 15).
const NUMERIC_CLASSES: std::ops::RangeInclusive<u8> = 6..=15;
/// Largest decompressed element accepted (4 GiB): a corrupted length must not make us allocate
/// without bound.
const MAX_DECOMPRESSED: u64 = 1 << 32;

/// A real numeric array read from a MAT-file.
#[derive(Clone, Debug, PartialEq)]
pub struct MatArray {
    /// Variable name.
    pub name: String,
    /// Dimensions, in MATLAB (column-major) order.
    pub dims: Vec<usize>,
    /// The data, column-major: raw bytes when stored as `miUINT8` (images), else empty.
    pub bytes: Vec<u8>,
    /// The data as `f64`, column-major, when not stored as `miUINT8`, else empty.
    pub values: Vec<f64>,
}

impl MatArray {
    /// Number of elements (product of the dimensions).
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` (column-major) as `f64`, whichever way it is stored.
    pub fn get(&self, i: usize) -> f64 {
        if self.bytes.is_empty() {
            self.values[i]
        } else {
            f64::from(self.bytes[i])
        }
    }
}

/// A cursor over element bytes with the file's byte order.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    big: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: needs {n} bytes at offset {}, file has {}",
                self.pos,
                self.bytes.len()
            ));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b: [u8; 4] = self.take(4)?.try_into().expect("4 bytes");
        Ok(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Reads one element: `(type, data)`, skipping the padding to 8 bytes.
    fn element(&mut self) -> std::result::Result<(u32, &'a [u8]), String> {
        let first = self.u32()?;
        if first >> 16 != 0 {
            // Small data element: count in the upper half, data in the next 4 bytes.
            let (n, ty) = ((first >> 16) as usize, first & 0xFFFF);
            if n > 4 {
                return Err(format!("small data element claims {n} bytes (at most 4)"));
            }
            let data = self.take(4)?;
            return Ok((ty, &data[..n]));
        }
        let n = self.u32()? as usize;
        let data = self.take(n)?;
        if first != MI_COMPRESSED {
            // Compressed elements are not padded; everything else is, to 8 bytes.
            self.take((8 - n % 8) % 8)?;
        }
        Ok((first, data))
    }
}

fn elem_size(ty: u32) -> Option<usize> {
    Some(match ty {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        _ => return None,
    })
}

/// Converts numeric element data to `f64`.
fn to_f64(ty: u32, data: &[u8], big: bool) -> std::result::Result<Vec<f64>, String> {
    let size = elem_size(ty).ok_or_else(|| format!("data type {ty} is not numeric"))?;
    if !data.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes is not a whole number of {size}-byte values",
            data.len()
        ));
    }
    let word = |c: &[u8]| -> [u8; 8] {
        let mut w = [0u8; 8];
        if big {
            w[8 - c.len()..].copy_from_slice(c);
        } else {
            w[..c.len()].copy_from_slice(c);
        }
        w
    };
    let read = |w: [u8; 8]| {
        if big {
            u64::from_be_bytes(w)
        } else {
            u64::from_le_bytes(w)
        }
    };
    Ok(data
        .chunks_exact(size)
        .map(|c| {
            let u = read(word(c));
            match ty {
                MI_INT8 => f64::from(u as u8 as i8),
                MI_UINT8 => f64::from(u as u8),
                MI_INT16 => f64::from(u as u16 as i16),
                MI_UINT16 => f64::from(u as u16),
                MI_INT32 => f64::from(u as u32 as i32),
                MI_UINT32 => f64::from(u as u32),
                MI_SINGLE => f64::from(f32::from_bits(u as u32)),
                MI_DOUBLE => f64::from_bits(u),
                MI_INT64 => u as i64 as f64,
                _ => u as f64,
            }
        })
        .collect())
}

/// Parses an `miMATRIX` element's data.
fn parse_matrix(data: &[u8], big: bool) -> std::result::Result<MatArray, String> {
    let mut c = Cursor {
        bytes: data,
        pos: 0,
        big,
    };
    let (ty, flags) = c.element()?;
    if ty != MI_UINT32 || flags.len() < 8 {
        return Err("array without its flags".into());
    }
    let flags = Cursor {
        bytes: flags,
        pos: 0,
        big,
    }
    .u32()?;
    let class = (flags & 0xFF) as u8;
    if !NUMERIC_CLASSES.contains(&class) {
        return Err(format!(
            "array class {class} is not a numeric array (cell, struct, sparse, char, object are not supported)"
        ));
    }
    if flags & 0x800 != 0 {
        return Err("complex arrays are not supported".into());
    }
    let (ty, dims) = c.element()?;
    if ty != MI_INT32 || dims.len() < 8 || !dims.len().is_multiple_of(4) {
        return Err("array without valid dimensions".into());
    }
    let dims: Vec<usize> = to_f64(MI_INT32, dims, big)?
        .into_iter()
        .map(|d| {
            if d < 0.0 {
                Err(format!("negative dimension {d}"))
            } else {
                Ok(d as usize)
            }
        })
        .collect::<std::result::Result<_, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let (ty, name) = c.element()?;
    if ty != MI_INT8 && ty != MI_UINT8 {
        return Err("array without a name".into());
    }
    let name = String::from_utf8_lossy(name).into_owned();
    let (ty, real) = c.element()?;
    let size = elem_size(ty).ok_or_else(|| format!("{name}: data type {ty} is not numeric"))?;
    if real.len() != count * size {
        return Err(format!(
            "{name}: {} data bytes for dimensions {dims:?} of {size}-byte values",
            real.len()
        ));
    }
    let (bytes, values) = if ty == MI_UINT8 {
        (real.to_vec(), Vec::new())
    } else {
        (Vec::new(), to_f64(ty, real, big)?)
    };
    Ok(MatArray {
        name,
        dims,
        bytes,
        values,
    })
}

/// Parses a level-5 MAT-file held in memory into its numeric arrays, in file order.
pub fn parse(bytes: &[u8]) -> std::result::Result<Vec<MatArray>, String> {
    if bytes.len() < 128 {
        return Err(format!(
            "{} bytes is shorter than the 128-byte MAT-file header",
            bytes.len()
        ));
    }
    if bytes.starts_with(b"\x89HDF") || bytes[..128].windows(8).any(|w| w == b"\x89HDF\r\n\x1a\n") {
        return Err("a MATLAB v7.3 (HDF5) file; save it with -v7 or -v6".into());
    }
    let big = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => return Err("not a level-5 MAT-file (no endian indicator at byte 126)".into()),
    };
    let mut c = Cursor {
        bytes,
        pos: 128,
        big,
    };
    let mut arrays = Vec::new();
    while !c.at_end() {
        let (ty, data) = c.element()?;
        let array = match ty {
            MI_MATRIX => parse_matrix(data, big)?,
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .take(MAX_DECOMPRESSED)
                    .read_to_end(&mut inflated)
                    .map_err(|e| format!("corrupt compressed element: {e}"))?;
                let mut inner = Cursor {
                    bytes: &inflated,
                    pos: 0,
                    big,
                };
                let (ty, data) = inner.element()?;
                if ty != MI_MATRIX {
                    return Err(format!("compressed element of type {ty}, not an array"));
                }
                parse_matrix(data, big)?
            }
            other => return Err(format!("top-level element of type {other}, not an array")),
        };
        arrays.push(array);
    }
    Ok(arrays)
}

/// Reads a MAT-file; errors name the file.
pub fn read_file(path: &std::path::Path) -> Result<Vec<MatArray>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|reason| Error::data(path, reason))
}

/// How [`write`] stores an array's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `miUINT8`, class `uint8`.
    Uint8,
    /// `miDOUBLE`, class `double`.
    Double,
    /// `miUINT8` data of a `double`-class array (what MATLAB does for small integers).
    DoubleAsUint8,
}

/// Writes a little-endian level-5 MAT-file of real arrays `(name, dims, values, storage)`,
/// each zlib-compressed if `compress`. For tests (the SVHN layout without the real files).
pub fn write(arrays: &[(&str, Vec<usize>, Vec<f64>, Storage)], compress: bool) -> Vec<u8> {
    fn element(ty: u32, data: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(out.len() + (8 - data.len() % 8) % 8, 0);
    }
    let mut out = Vec::new();
    let mut header = b"MATLAB 5.0 MAT-file, written by sgr tests".to_vec();
    header.resize(116, b' ');
    out.extend_from_slice(&header);
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&0x0100u16.to_le_bytes());
    out.extend_from_slice(b"IM");
    for (name, dims, values, storage) in arrays {
        let mut m = Vec::new();
        let class: u32 = if *storage == Storage::Uint8 { 9 } else { 6 };
        let mut flags = class.to_le_bytes().to_vec();
        flags.extend_from_slice(&0u32.to_le_bytes());
        element(MI_UINT32, &flags, &mut m);
        let d: Vec<u8> = dims
            .iter()
            .flat_map(|&d| (d as i32).to_le_bytes())
            .collect();
        element(MI_INT32, &d, &mut m);
        element(MI_INT8, name.as_bytes(), &mut m);
        match storage {
            Storage::Double => {
                let v: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                element(MI_DOUBLE, &v, &mut m);
            }
            Storage::Uint8 | Storage::DoubleAsUint8 => {
                let v: Vec<u8> = values.iter().map(|&v| v as u8).collect();
                element(MI_UINT8, &v, &mut m);
            }
        }
        let mut matrix = Vec::new();
        element(MI_MATRIX, &m, &mut matrix);
        if compress {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut z, &matrix).expect("in-memory write");
            let z = z.finish().expect("in-memory write");
            out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
        } else {
            out.extend_from_slice(&matrix);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_storage_compressed_or_not() {
        let x: Vec<f64> = (0..24).map(|i| (i * 7 % 256) as f64).collect();
        let y = vec![1.0, 10.0, 3.0];
        let z = vec![-1.5, 2.25];
        for compress in [false, true] {
            let bytes = write(
                &[
                    ("X", vec![2, 3, 4], x.clone(), Storage::Uint8),
                    ("y", vec![3, 1], y.clone(), Storage::DoubleAsUint8),
                    ("z", vec![1, 2], z.clone(), Storage::Double),
                ],
                compress,
            );
            let arrays = parse(&bytes).unwrap();
            assert_eq!(arrays.len(), 3);
            assert_eq!(
                (arrays[0].name.as_str(), &arrays[0].dims),
                ("X", &vec![2, 3, 4])
            );
            assert_eq!(arrays[0].bytes.len(), 24);
            assert_eq!((0..24).map(|i| arrays[0].get(i)).collect::<Vec<_>>(), x);
            assert_eq!((0..3).map(|i| arrays[1].get(i)).collect::<Vec<_>>(), y);
            assert_eq!(arrays[2].values, z);
        }
    }

    #[test]
    fn small_elements_and_big_endian_numbers_decode() {
        // A small element: 3 bytes of type miUINT8 packed in one 8-byte word.
        let mut c = Cursor {
            bytes: &[2, 0, 3, 0, 7, 8, 9, 0],
            pos: 0,
            big: false,
        };
        assert_eq!(c.element().unwrap(), (MI_UINT8, &[7u8, 8, 9][..]));
        assert_eq!(
            to_f64(MI_INT16, &[0xFF, 0xFE, 0x00, 0x05], true).unwrap(),
            vec![-2.0, 5.0]
        );
        assert_eq!(
            to_f64(MI_DOUBLE, &1.5f64.to_be_bytes(), true).unwrap(),
            vec![1.5]
        );
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert!(parse(&[0u8; 10]).unwrap_err().contains("header"));
        let mut v73 = vec![0u8; 600];
        v73[512..520].copy_from_slice(b"\x89HDF\r\n\x1a\n");
        assert!(parse(&v73).unwrap_err().contains("endian") || parse(&v73).is_err());
        let good = write(&[("y", vec![2, 1], vec![1.0, 2.0], Storage::Double)], false);
        let mut bad = good.clone();
        bad[126..128].copy_from_slice(b"XX");
        assert!(parse(&bad).unwrap_err().contains("endian"));
        for keep in 129..good.len() {
            assert!(parse(&good[..keep]).is_err(), "cut at {keep} parsed");
        }
    }
}
