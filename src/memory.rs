//! The CPU memory meter: peak resident memory of the process above a baseline.
//!
//! libtorch exposes no allocator statistics on CPU, so we read the kernel's high-water mark
//! (`VmHWM` in `/proc/self/status`). Writing `5` to `/proc/self/clear_refs` resets it to the
//! current RSS, so a measurement is "peak RSS during training minus RSS after the model, data
//! and optimizer were built". This counts everything training allocates (activations kept for
//! backward, gradients, momentum buffers once created, libtorch workspaces, allocator slack)
//! and nothing allocated before the baseline (weights, the data set, the libraries).
//!
//! On a GPU, [`gpu_used_bytes`] reads the device's used memory from `nvidia-smi` (libtorch's
//! caching-allocator statistics are not exposed through tch). The caching allocator keeps what
//! it reserved, so "used at the end minus used after construction" is the peak reservation of
//! the steps, measured the same way for any process on the device (one process at a time).
use std::fs;

fn status_kib(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Current resident set size in bytes (0 where `/proc` is unavailable).
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:").unwrap_or(0) * 1024
}

/// Peak resident set size since the last reset, in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:").unwrap_or(0) * 1024
}

/// A baseline taken now; [`Meter::peak_above_baseline`] reports the growth since.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    baseline: u64,
}

impl Meter {
    /// Resets the kernel's high-water mark and records the current RSS as the baseline.
    pub fn start() -> Self {
        // Ignored where not permitted: the meter then reports the peak since process start.
        let _ = fs::write("/proc/self/clear_refs", "5");
        Meter {
            baseline: rss_bytes(),
        }
    }

    /// The baseline RSS in bytes.
    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// Peak RSS above the baseline, in bytes.
    pub fn peak_above_baseline(&self) -> u64 {
        peak_rss_bytes().saturating_sub(self.baseline)
    }
}

/// Memory in use on GPU 0 (all processes), in bytes, from `nvidia-smi`; `None` where
/// `nvidia-smi` is missing or fails.
pub fn gpu_used_bytes() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}
