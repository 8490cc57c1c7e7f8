//! Run records: `metrics.jsonl` (one object per epoch), `diagnostics.jsonl` (one object per
//! diagnostic step) and `summary.json`. Lines are appended whole and flushed; on resume, lines
//! from epochs after the checkpoint are dropped so the files match the restored state.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

/// One epoch of training and evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Learning rate at the epoch's first step.
    pub lr: f64,
    /// Learning rate at the epoch's last step (absent in records written before it existed).
    #[serde(default)]
    pub last_lr: f64,
    /// Mean training loss of the last module.
    pub train_loss: f64,
    /// Training accuracy of the last module (fraction).
    pub train_accuracy: f64,
    /// Test loss of the last module.
    pub test_loss: f64,
    /// Test accuracy of the last module (fraction).
    pub test_accuracy: f64,
    /// Training seconds of this epoch (excluding evaluation).
    pub seconds: f64,
    /// Training throughput.
    pub images_per_second: f64,
    /// Test accuracy of every module's head, first to last.
    pub module_test_accuracy: Vec<f64>,
    /// Mean training loss of every module's head.
    pub module_train_loss: Vec<f64>,
    /// Mean SGR penalty D of every module over the steps where the penalty was applied to it
    /// (modules from `--sgr-from` on, every `--sgr-every`-th step); 0 where it never was.
    pub sgr_penalty: Vec<f64>,
    /// Epoch mean of cos(∂L_b/∂h_{b-1}, ∂L_{b-1}/∂h_{b-1}) per boundary.
    pub grad_cosine: Vec<f64>,
    /// Epoch mean of the relative L2 distance of the same pair per boundary.
    pub grad_rel_distance: Vec<f64>,
    /// Epoch mean of cos(∂L_{b-1}/∂h_{b-1}, global-BP gradient at h_{b-1}) per boundary.
    pub bp_cosine: Vec<f64>,
    /// Peak host RSS above baseline so far, bytes (`peak_memory_bytes` in older records).
    #[serde(alias = "peak_memory_bytes")]
    pub peak_host_rss_bytes: u64,
    /// Peak device memory above baseline so far on `--device cuda`, bytes (see `Summary`).
    #[serde(default)]
    pub peak_device_bytes: Option<u64>,
}

/// One diagnostic measurement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiagRecord {
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Optimizer step (global, 0-based) before which it was taken.
    pub step: usize,
    /// Per boundary, see [`EpochRecord`].
    pub grad_cosine: Vec<f64>,
    /// Per boundary.
    pub grad_rel_distance: Vec<f64>,
    /// Per boundary.
    pub bp_cosine: Vec<f64>,
}

/// Appends `record` as one JSON line to `path`.
pub fn append<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    let mut line = serde_json::to_string(record).expect("records serialise");
    line.push('\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // One write call per line: a kill cannot leave half a line from us.
    f.write_all(line.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|e| Error::io(path, e))
}

/// Reads every complete, parseable line of a JSONL file (a torn last line is skipped).
pub fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Keeps only the lines of `path` whose `epoch` field is at most `epoch` (atomic rewrite).
pub fn truncate_after_epoch(path: &Path, epoch: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                .is_some_and(|e| e as usize <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::checkpoint::write_atomic(path, kept.as_bytes())
}
