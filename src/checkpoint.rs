//! Checkpoints: one safetensors file holding the model variables, the optimizer's state
//! (`optimizer.momentum.{name}` for SGD, `optimizer.exp_avg{,_sq}.{name}` and `optimizer.step`
//! for AdamW) and the training state (JSON in the file's metadata
//! under `sgr.state`), written atomically (temp file, fsync, rename), so a kill at any moment
//! leaves either the previous checkpoint or the new one, never a torn file. A human-readable
//! `checkpoint.json` sidecar mirrors the state; the embedded copy is the one `--resume` trusts.
use crate::model::SplitNet;
use crate::optim::Optimizer;
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Prefix of the optimizer's tensors inside a checkpoint.
const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Metadata key of the training state.
const STATE_KEY: &str = "sgr.state";

/// Where training stands, stored inside every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Best test accuracy so far (fraction).
    pub best_test_accuracy: f64,
    /// Training seconds so far (excluding evaluation).
    pub train_seconds: f64,
    /// Images trained on so far.
    pub images: u64,
    /// Peak host RSS above baseline seen so far, bytes (`peak_memory_bytes` in checkpoints
    /// written before it was named for what it is).
    #[serde(alias = "peak_memory_bytes")]
    pub peak_host_rss_bytes: u64,
    /// Peak device memory above baseline seen so far on `--device cuda`, bytes.
    #[serde(default)]
    pub peak_device_bytes: Option<u64>,
    /// The fp16 loss scaler's state (`--precision fp16` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::precision::LossScaler>,
    /// The resolved run configuration.
    pub config: serde_json::Value,
}

/// A loaded checkpoint: model variables (by name), the optimizer state (by the names of
/// [`Optimizer::state`]), and the
/// training state when the file was written by [`save`].
pub type Loaded = (
    HashMap<String, Tensor>,
    HashMap<String, Tensor>,
    Option<TrainState>,
);

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_raw(t: &Tensor) -> Raw {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let (dtype, kind) = match t.kind() {
        Kind::Double => (Dtype::F64, Kind::Double),
        Kind::Int64 => (Dtype::I64, Kind::Int64),
        _ => (Dtype::F32, Kind::Float),
    };
    let t = t.to_kind(kind);
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, numel);
    Raw {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    }
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename, then
/// fsync of the folder so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes named tensors to a plain safetensors file (atomically), e.g. to hand weights or a
/// batch to another program.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let raw: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), to_raw(t)))
        .collect();
    let bytes = safetensors::serialize(raw, None).map_err(|e| Error::Checkpoint {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Saves `net`, the optimizers `opts` (one, or one per pipeline stage: saved as one) and
/// `state` to `path` atomically (plus the `.json` sidecar).
pub fn save(path: &Path, net: &SplitNet, opts: &[Optimizer], state: &TrainState) -> Result<()> {
    let mut tensors: Vec<(String, Raw)> = net
        .vs
        .variables()
        .iter()
        .map(|(name, t)| (name.clone(), to_raw(t)))
        .collect();
    tensors.extend(
        crate::optim::merged_state(opts)
            .iter()
            .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), to_raw(t))),
    );
    let state_json = serde_json::to_string(state).expect("state serialises");
    let metadata = HashMap::from([(STATE_KEY.to_string(), state_json)]);
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::Checkpoint {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)?;
    let sidecar = serde_json::to_vec_pretty(state).expect("state serialises");
    write_atomic(&path.with_extension("json"), &sidecar)
}

/// Reads a checkpoint written by [`save`] (or a plain safetensors file of model variables, in
/// which case the state is `None`).
pub fn load(path: &Path) -> Result<Loaded> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.into(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let state = match meta.metadata().as_ref().and_then(|m| m.get(STATE_KEY)) {
        Some(json) => {
            Some(serde_json::from_str(json).map_err(|e| bad(format!("bad training state: {e}")))?)
        }
        None => None,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let mut variables = HashMap::new();
    let mut momentum = HashMap::new();
    for (name, view) in st.iter() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has unsupported dtype {other:?}"
                )));
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        match name.strip_prefix(OPTIMIZER_PREFIX) {
            Some(var) => momentum.insert(var.to_string(), t),
            None => variables.insert(name.to_string(), t),
        };
    }
    Ok((variables, momentum, state))
}

/// Copies `variables` into `net`. Every variable of the net must be present with its shape;
/// extra entries (e.g. auxiliary heads of a run with another K) are ignored when
/// `allow_extra` is set, otherwise they are an error.
pub fn load_into(
    net: &SplitNet,
    path: &Path,
    variables: &HashMap<String, Tensor>,
    allow_extra: bool,
) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.into(),
        reason,
    };
    let mut ours = net.vs.variables();
    if let Some(extra) = variables
        .keys()
        .find(|k| !allow_extra && !ours.contains_key(*k))
    {
        return Err(bad(format!(
            "has variable `{extra}` that this model lacks (different model or --modules?)"
        )));
    }
    tch::no_grad(|| {
        for (name, var) in ours.iter_mut() {
            let saved = variables.get(name).ok_or_else(|| {
                bad(format!(
                    "lacks variable `{name}` (different model or --modules?)"
                ))
            })?;
            if saved.size() != var.size() {
                return Err(bad(format!(
                    "variable `{name}` has shape {:?}, the model wants {:?}",
                    saved.size(),
                    var.size()
                )));
            }
            var.copy_(&saved.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(())
    })
}

/// The checkpoint path inside a run folder.
pub fn path_in(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint.safetensors")
}
