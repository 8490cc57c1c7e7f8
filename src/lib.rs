//! # sgr: local learning with Successive Gradient Reconciliation
//!
//! The crate follows the data flow of a training run:
//! [`data`] (real and synthetic image sets, batching, augmentation) →
//! [`model`] (networks as ordered units, split into K modules, auxiliary heads) →
//! [`rules`] (what one training step does: `bp`, `dgl`, `sgr`, `fg`) →
//! [`train`] (the one training loop: [`schedule`], [`optim`], [`checkpoint`], [`metrics`],
//! [`diagnostics`]; [`pipeline`] runs the modules as stages on several workers) → [`bench`] (timing and [`memory`]) → the `sgr` binary.
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod diagnostics;
pub mod distributed;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod precision;
pub mod preset;
pub mod report;
pub mod rules;
pub mod schedule;
pub mod sweep;
pub mod train;

pub use error::{Error, Result};
