//! Reading a sweep folder: which folders are runs, what state each is in, and the parts of
//! `summary.json`, `metrics.jsonl` and `config.json` the report uses.
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files that make a folder a run folder.
const RUN_FILES: &[&str] = &[
    "summary.json",
    "config.json",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "cell.toml",
];

/// The fields of `summary.json` the report uses.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct SummaryFile {
    pub(super) rule: String,
    #[serde(default)]
    pub(super) model: String,
    #[serde(default)]
    pub(super) dataset: String,
    pub(super) modules: usize,
    #[serde(default)]
    pub(super) epochs: usize,
    pub(super) seed: u64,
    pub(super) test_accuracy: f64,
    #[serde(default)]
    pub(super) module_test_accuracy: Vec<f64>,
    #[serde(default)]
    pub(super) images_per_second: f64,
    /// Host RSS peak: `peak_host_rss_bytes`, named `peak_memory_bytes` in older summaries.
    #[serde(default, alias = "peak_host_rss_bytes")]
    pub(super) peak_memory_bytes: u64,
    /// Device memory peak of `--device cuda` runs (absent in older summaries and CPU runs).
    #[serde(default)]
    pub(super) peak_device_bytes: Option<u64>,
    /// The resolved configuration the trainer embeds (used when `config.json` is missing).
    #[serde(default)]
    pub(super) config: Option<Value>,
}

/// The fields of a `metrics.jsonl` line the report uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct EpochLine {
    pub(super) epoch: usize,
    /// Test accuracy after this epoch (a fraction).
    pub(super) test_accuracy: Option<f64>,
    pub(super) grad_cosine: Vec<f64>,
    pub(super) bp_cosine: Vec<f64>,
}

/// What state a run folder is in.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// `summary.json` is present and readable.
    Finished,
    /// No `summary.json` yet.
    Unfinished {
        /// Epochs in `metrics.jsonl`.
        epochs_done: usize,
        /// Epochs configured (from `config.json`), if readable.
        epochs: Option<usize>,
    },
    /// `summary.json` exists but cannot be used.
    Corrupt(String),
    /// Listed in `sweep.json` but has no folder.
    NotStarted,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Finished => f.write_str("finished"),
            RunState::Unfinished {
                epochs_done,
                epochs: Some(n),
            } => write!(f, "unfinished ({epochs_done} of {n} epochs)"),
            RunState::Unfinished { epochs_done, .. } => {
                write!(f, "unfinished ({epochs_done} epochs)")
            }
            RunState::Corrupt(why) => write!(f, "corrupt: {why}"),
            RunState::NotStarted => f.write_str("not started"),
        }
    }
}

/// One run folder of a sweep.
#[derive(Debug, Clone)]
pub struct Run {
    /// Folder name inside the sweep folder.
    pub dir: String,
    /// Rule name.
    pub rule: String,
    /// K.
    pub modules: usize,
    /// Seed.
    pub seed: u64,
    /// State.
    pub state: RunState,
    /// Problems that did not stop the run from being used.
    pub warnings: Vec<String>,
    pub(super) summary: Option<SummaryFile>,
    pub(super) epochs: Vec<EpochLine>,
    /// The run's configuration as far as known: `config.json`, else the copy in `summary.json`,
    /// else the cell's in `sweep.json`; `model` and `data` from `summary.json`, else from the
    /// preset in `sweep.json`, if it lacks them.
    pub(super) config: Option<Value>,
}

impl Run {
    pub(super) fn finished(&self) -> Option<&SummaryFile> {
        self.summary
            .as_ref()
            .filter(|_| self.state == RunState::Finished)
    }
    /// Final test error of the last module, percent.
    pub(super) fn test_error(&self) -> Option<f64> {
        self.finished().map(|s| 100.0 * (1.0 - s.test_accuracy))
    }
    pub(super) fn peak_mib(&self) -> Option<f64> {
        self.finished()
            .map(|s| s.peak_device_bytes.unwrap_or(s.peak_memory_bytes) as f64 / (1024.0 * 1024.0))
    }
    pub(super) fn images_per_second(&self) -> Option<f64> {
        self.finished().map(|s| s.images_per_second)
    }
    /// Mean over boundaries of the last epoch's gradient cosine (finished runs with K > 1 and
    /// diagnostics in the last epoch only).
    pub(super) fn final_grad_cosine(&self) -> Option<f64> {
        let v = self.final_discord(|e| &e.grad_cosine)?;
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
    /// The last epoch's per-boundary value picked by `pick`, if it has K-1 entries.
    pub(super) fn final_discord(&self, pick: fn(&EpochLine) -> &Vec<f64>) -> Option<&[f64]> {
        self.finished()?;
        let last = self.epochs.last()?;
        let v = pick(last);
        (v.len() + 1 == self.modules).then_some(v.as_slice())
    }
}

/// Every run folder of a sweep folder.
#[derive(Debug, Clone)]
pub struct Runs {
    /// The sweep folder.
    pub root: PathBuf,
    /// What was run (network and data), for titles.
    pub title: String,
    /// Every run, in folder-name order.
    pub runs: Vec<Run>,
    /// Folders and files that could not be read as runs at all.
    pub notes: Vec<String>,
}

/// `<rule>-k<K>-s<seed>` back into its parts.
pub(super) fn parse_cell_name(name: &str) -> Option<(String, usize, u64)> {
    let (rest, seed) = name.rsplit_once("-s")?;
    let (rule, k) = rest.rsplit_once("-k")?;
    Some((rule.to_string(), k.parse().ok()?, seed.parse().ok()?))
}

fn read_json(path: &Path) -> std::result::Result<Option<Value>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", file_name(path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", file_name(path))),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn identity_of(v: &Value) -> Option<(String, usize, u64)> {
    Some((
        v.get("rule")?.as_str()?.to_string(),
        v.get("modules")?.as_u64()? as usize,
        v.get("seed")?.as_u64()?,
    ))
}

/// `summary.json`: `Ok(None)` if absent, `Err` if unreadable or impossible.
fn read_summary(dir: &Path) -> std::result::Result<Option<SummaryFile>, String> {
    let Some(v) = read_json(&dir.join("summary.json"))? else {
        return Ok(None);
    };
    let s = serde_json::from_value::<SummaryFile>(v).map_err(|e| format!("summary.json: {e}"))?;
    if !(0.0..=1.0).contains(&s.test_accuracy) || s.modules == 0 {
        return Err(format!(
            "summary.json: impossible values (test accuracy {}, K {})",
            s.test_accuracy, s.modules
        ));
    }
    Ok(Some(s))
}

/// The readable lines of `metrics.jsonl` by epoch; a count of unreadable ones goes to
/// `warnings`.
fn read_epochs(dir: &Path, warnings: &mut Vec<String>) -> Vec<EpochLine> {
    let mut epochs = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) {
        let mut bad = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<EpochLine>(line) {
                Ok(e) if e.epoch > 0 => epochs.push(e),
                _ => bad += 1,
            }
        }
        if bad > 0 {
            warnings.push(format!("metrics.jsonl: {bad} unreadable line(s) skipped"));
        }
    }
    epochs.sort_by_key(|e| e.epoch);
    epochs
}

/// Reads one run folder; `None` if it cannot tell which cell it is (the reason goes to `notes`).
fn load_run(
    dir: &Path,
    name: &str,
    expected: Option<&Cell>,
    notes: &mut Vec<String>,
) -> Option<Run> {
    let mut warnings = Vec::new();
    let summary = read_summary(dir);
    let config = match read_json(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => {
            warnings.push(e);
            None
        }
    };
    let epochs = read_epochs(dir, &mut warnings);
    let identity = summary
        .as_ref()
        .ok()
        .and_then(|s| s.as_ref())
        .map(|s| (s.rule.clone(), s.modules, s.seed))
        .or_else(|| config.as_ref().and_then(identity_of))
        .or_else(|| expected.map(|c| c.id.clone()))
        .or_else(|| parse_cell_name(name));
    let Some((rule, modules, seed)) = identity else {
        notes.push(format!(
            "{name}: has run files but no readable summary.json or config.json, and its name is not <rule>-k<K>-s<seed>"
        ));
        return None;
    };
    let config = known_config(
        config,
        summary.as_ref().ok().and_then(|s| s.as_ref()),
        expected,
    );
    let (state, summary) = match summary {
        Ok(Some(s)) => (RunState::Finished, Some(s)),
        Ok(None) => (
            RunState::Unfinished {
                epochs_done: epochs.last().map_or(0, |e| e.epoch),
                epochs: config
                    .as_ref()
                    .and_then(|c| c.get("epochs")?.as_u64())
                    .map(|e| e as usize),
            },
            None,
        ),
        Err(e) => (RunState::Corrupt(e), None),
    };
    Some(Run {
        dir: name.to_string(),
        rule,
        modules,
        seed,
        state,
        warnings,
        summary,
        epochs,
        config,
    })
}

/// The best record of a run's configuration (see [`Run::config`]).
fn known_config(
    config_json: Option<Value>,
    summary: Option<&SummaryFile>,
    cell: Option<&Cell>,
) -> Option<Value> {
    let mut config = config_json
        .filter(Value::is_object)
        .or_else(|| {
            summary
                .and_then(|s| s.config.clone())
                .filter(Value::is_object)
        })
        .or_else(|| cell.and_then(|c| c.config.clone()))?;
    if let (Some(map), Some(s)) = (config.as_object_mut(), summary) {
        for (key, value) in [("model", &s.model), ("data", &s.dataset)] {
            if !map.contains_key(key) && !value.is_empty() {
                map.insert(key.to_string(), Value::from(value.as_str()));
            }
        }
    }
    Some(config)
}

/// A cell that `sweep.json` lists: its identity and configuration.
struct Cell {
    id: (String, usize, u64),
    config: Option<Value>,
}

/// Reads every run folder under `root` (and the cells `sweep.json` lists).
pub fn collect(root: &Path) -> Result<Runs> {
    if !root.is_dir() {
        return Err(Error::Config(format!(
            "{}: no such folder (give the --out folder of `sgr sweep`)",
            root.display()
        )));
    }
    let mut notes = Vec::new();
    let mut expected: BTreeMap<String, Cell> = BTreeMap::new();
    let mut title = String::new();
    // The network and data of the whole sweep, for run configs that do not name them.
    let mut preset_fill: Vec<(&str, Value)> = Vec::new();
    match read_json(&root.join("sweep.json")) {
        Ok(Some(v)) => {
            for c in v
                .get("cells")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                if let (Some(name), Some(id)) =
                    (c.get("name").and_then(|n| n.as_str()), identity_of(c))
                {
                    let config = c.get("config").filter(|v| v.is_object()).cloned();
                    expected.insert(name.to_string(), Cell { id, config });
                }
            }
            if let Some(p) = v.get("preset") {
                for key in ["model", "data"] {
                    if let Some(value) = p.get(key).filter(|v| v.is_string()) {
                        preset_fill.push((key, value.clone()));
                    }
                }
                let s = |k: &str| p.get(k).map(flag_text).unwrap_or_default();
                title = format!("{} on {}, {} epochs", s("model"), s("data"), s("epochs"));
            }
        }
        Ok(None) => {}
        Err(e) => notes.push(format!(
            "{e} (the grid is taken from the run folders alone)"
        )),
    }
    let mut names: BTreeSet<String> = expected.keys().cloned().collect();
    let entries = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && RUN_FILES.iter().any(|f| path.join(f).exists()) {
            names.insert(name);
        }
    }
    let mut runs = Vec::new();
    for name in names {
        let dir = root.join(&name);
        if dir.is_dir() {
            if let Some(run) = load_run(&dir, &name, expected.get(&name), &mut notes) {
                runs.push(run);
            }
        } else if let Some(cell) = expected.get(&name) {
            let (rule, modules, seed) = cell.id.clone();
            runs.push(Run {
                dir: name,
                rule,
                modules,
                seed,
                state: RunState::NotStarted,
                warnings: Vec::new(),
                summary: None,
                epochs: Vec::new(),
                config: cell.config.clone(),
            });
        }
    }
    for r in &mut runs {
        if let Some(Value::Object(c)) = &mut r.config {
            for (key, value) in &preset_fill {
                c.entry(key.to_string()).or_insert_with(|| value.clone());
            }
        }
    }
    if runs.is_empty() && notes.is_empty() {
        return Err(Error::Config(format!(
            "{}: no run folders (folders with summary.json, config.json or metrics.jsonl) and no sweep.json",
            root.display()
        )));
    }
    if title.is_empty()
        && let Some(s) = runs.iter().find_map(|r| r.finished())
    {
        title = format!("{} on {}, {} epochs", s.model, s.dataset, s.epochs);
    }
    Ok(Runs {
        root: root.to_path_buf(),
        title,
        runs,
        notes,
    })
}

fn flag_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
