//! The library's error type. Every failure a user can cause (a wrong path, a truncated file, a bad
//! flag or config value) becomes one of these and is printed as one line by the binary. Tensor
//! shape mismatches inside the math are bugs and may panic; files and configs never do.
use std::path::PathBuf;

/// Errors raised by the `sgr` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file or folder.
    // The I/O error is part of the message, not a `source`: a cause chain would print it twice.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        err: std::io::Error,
    },
    /// A data file that exists but is not what it should be (bad magic, truncated, bad label).
    #[error("{}: {reason}", path.display())]
    Data {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value that cannot be used (unsupported K, unknown field, ...).
    #[error("{0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not match the run.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Training diverged (NaN/Inf loss or gradient).
    #[error("{0}")]
    NonFinite(String),
    /// An error reported by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Shorthand for `Result<T, sgr::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    /// A data-format error on `path`.
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
