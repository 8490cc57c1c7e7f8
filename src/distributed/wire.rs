//! What a tensor looks like on the wire: a small header of `i64`s (element kind, rank, sizes),
//! then its bytes in row-major order. Kept apart from the MPI calls so that the encoding is
//! compiled and tested in every build, also without the `mpi` feature.
use crate::{Error, Result};
use tch::Kind;

/// The element kinds that can cross a rank boundary, with their wire codes. The codes are
/// libtorch's `ScalarType` numbers, so that a header reads the same in a debugger on either
/// side; kinds that training never sends (complex, quantised, float8) are refused.
const KINDS: [(Kind, i64); 10] = [
    (Kind::Uint8, 0),
    (Kind::Int8, 1),
    (Kind::Int16, 2),
    (Kind::Int, 3),
    (Kind::Int64, 4),
    (Kind::Half, 5),
    (Kind::Float, 6),
    (Kind::Double, 7),
    (Kind::Bool, 11),
    (Kind::BFloat16, 15),
];

/// The wire code of `kind`.
pub fn kind_code(kind: Kind) -> Result<i64> {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|&(_, c)| c)
        .ok_or_else(|| {
            Error::Config(format!(
                "distributed: tensors of kind {kind:?} cannot be sent"
            ))
        })
}

/// The kind with wire code `code`.
pub fn kind_of(code: i64) -> Result<Kind> {
    KINDS
        .iter()
        .find(|(_, c)| *c == code)
        .map(|&(k, _)| k)
        .ok_or_else(|| {
            Error::Config(format!(
                "distributed: unknown tensor kind code {code} in a message"
            ))
        })
}

/// A tensor's description, sent before its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Element kind.
    pub kind: Kind,
    /// Sizes, outermost first (empty for a 0-dimensional tensor).
    pub shape: Vec<i64>,
}

impl Header {
    /// The header as sent: `[kind code, number of dimensions, sizes...]`.
    pub fn encode(&self) -> Result<Vec<i64>> {
        let mut v = Vec::with_capacity(2 + self.shape.len());
        v.push(kind_code(self.kind)?);
        v.push(self.shape.len() as i64);
        v.extend_from_slice(&self.shape);
        Ok(v)
    }

    /// Reads a header; a message that is not one (a protocol mismatch between ranks, e.g.
    /// two different `sgr` binaries) is an error, not a panic.
    pub fn decode(v: &[i64]) -> Result<Header> {
        let bad = |why: &str| Error::Config(format!("distributed: bad tensor header {v:?}: {why}"));
        if v.len() < 2 {
            return Err(bad("too short"));
        }
        let kind = kind_of(v[0])?;
        let ndim = v[1];
        if ndim < 0 || v.len() as i64 != 2 + ndim {
            return Err(bad("its length does not match its number of dimensions"));
        }
        let shape = v[2..].to_vec();
        if shape.iter().any(|&d| d < 0) {
            return Err(bad("negative size"));
        }
        Ok(Header { kind, shape })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    /// Number of bytes that follow the header.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.kind.elt_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        for (kind, shape) in [
            (Kind::Float, vec![2, 3, 4]),
            (Kind::Int64, vec![]),
            (Kind::Bool, vec![0, 5]),
            (Kind::BFloat16, vec![7]),
        ] {
            let h = Header { kind, shape };
            let v = h.encode().unwrap();
            assert_eq!(Header::decode(&v).unwrap(), h);
        }
        let h = Header {
            kind: Kind::Half,
            shape: vec![3, 5],
        };
        assert_eq!(h.byte_len(), 30);
        assert!(Header::decode(&[6]).is_err());
        assert!(Header::decode(&[6, 2, 3]).is_err());
        assert!(Header::decode(&[6, 1, -3]).is_err());
        assert!(Header::decode(&[99, 0]).is_err());
        assert!(kind_code(Kind::ComplexFloat).is_err());
    }
}
