//! Experiment presets: one TOML file naming a grid of training runs (rules × K × seeds on one
//! data set and network), for `sgr sweep`.
//!
//! A preset is parsed strictly (unknown keys are errors naming the key and the file) and every
//! cell's [`TrainConfig`] is built and validated, including its split into K modules, before a
//! single run starts, so a typo cannot waste the first hours of a grid.
//!
//! `bp` trains the whole network end to end, so it runs at K = 1 only, once per seed, whatever
//! `modules` lists.
use crate::config::{TrainConfig, TrainOptions};
use crate::data::DatasetKind;
use crate::model::{Arch, splits};
use crate::rules::RuleKind;
use crate::schedule::ScheduleKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A grid of runs, as written in `presets/*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Data set.
    pub data: DatasetKind,
    /// Network.
    pub model: Arch,
    /// Rules to run (`bp` runs at K = 1 only).
    pub rules: Vec<RuleKind>,
    /// K values for the local rules.
    pub modules: Vec<usize>,
    /// Seeds; every (rule, K) runs once per seed.
    pub seeds: Vec<u64>,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: i64,
    /// Base learning rate.
    pub lr: f64,
    /// LR schedule.
    pub schedule: ScheduleKind,
    /// Linear warm-up epochs.
    pub warmup_epochs: f64,
    /// SGR penalty weight λ (ignored by bp and dgl).
    pub lambda: f64,
    /// Train on the first N training images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_subset: Option<usize>,
    /// Any other `sgr train` option (same names, with `_`), applied to every cell.
    #[serde(default)]
    pub train: TrainOptions,
}

/// One run of a grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Folder name inside the sweep folder: `<rule>-k<K>-s<seed>`.
    pub name: String,
    /// Rule.
    pub rule: RuleKind,
    /// K.
    pub modules: usize,
    /// Seed.
    pub seed: u64,
    /// The run's full configuration.
    pub config: TrainConfig,
}

/// The folder name of a cell: `<rule>-k<K>-s<seed>`.
pub fn cell_name(rule: &str, modules: usize, seed: u64) -> String {
    format!("{rule}-k{modules}-s{seed}")
}

/// Keys of [`Preset`] that `[train]` may not repeat, and the grid keys it may not set.
const TOP_LEVEL: &[&str] = &[
    "data",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "schedule",
    "warmup_epochs",
    "lambda",
    "train_subset",
    "test_subset",
];
const GRID: &[(&str, &str)] = &[("rule", "rules"), ("modules", "modules"), ("seed", "seeds")];

/// Parses preset TOML; the error is one line (`line N: message`).
pub fn parse(text: &str) -> std::result::Result<Preset, String> {
    crate::config::parse_toml(text)
}

/// Reads and checks a preset file: parses it, then builds and validates every cell. Errors name
/// the file.
pub fn load(path: &Path) -> Result<(Preset, Vec<Cell>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let named = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let preset = parse(&text).map_err(named)?;
    let cells = preset.cells().map_err(|e| named(e.to_string()))?;
    Ok((preset, cells))
}

/// Finds a preset by name or path: an existing file path as given; otherwise
/// `presets/NAME.toml` in the current folder, then in the source tree of this binary.
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let given = PathBuf::from(name_or_path);
    if given.is_file() {
        return Ok(given);
    }
    let file = if name_or_path.ends_with(".toml") {
        name_or_path.to_string()
    } else {
        format!("{name_or_path}.toml")
    };
    let roots = [
        PathBuf::from("presets"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"),
    ];
    for root in &roots {
        let p = root.join(&file);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut known: Vec<String> = roots
        .iter()
        .filter_map(|r| std::fs::read_dir(r).ok())
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    known.sort();
    known.dedup();
    Err(Error::Config(format!(
        "--preset {name_or_path}: no such file, and no presets/{file} in the current folder or in {} (known presets: {})",
        roots[1].display(),
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )))
}

impl Preset {
    /// The (rule, K, seed) cells in run order: seed by seed (so a partly finished grid has whole
    /// seeds), `bp` at K = 1 first, then each rule over `modules`.
    fn grid(&self) -> Vec<(RuleKind, usize, u64)> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            if self.rules.contains(&RuleKind::Bp) {
                out.push((RuleKind::Bp, 1, seed));
            }
            for &rule in self.rules.iter().filter(|r| **r != RuleKind::Bp) {
                for &k in &self.modules {
                    if !out.contains(&(rule, k, seed)) {
                        out.push((rule, k, seed));
                    }
                }
            }
        }
        out
    }

    /// Builds and validates every cell's configuration (values, and the split of the network
    /// into K modules).
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let fail = |why: String| Err(Error::Config(why));
        if self.rules.is_empty() {
            return fail("rules: name at least one rule (bp, dgl, sgr)".into());
        }
        if self.seeds.is_empty() {
            return fail("seeds: name at least one seed".into());
        }
        if self.modules.is_empty() && self.rules.iter().any(|r| *r != RuleKind::Bp) {
            return fail("modules: name at least one K for the local rules".into());
        }
        let set = serde_json::to_value(&self.train).expect("options serialise");
        for key in set.as_object().into_iter().flat_map(|m| m.keys()) {
            if TOP_LEVEL.contains(&key.as_str()) {
                return fail(format!(
                    "[train] {key}: already a top-level key of the preset; set it in one place"
                ));
            }
            if let Some((_, list)) = GRID.iter().find(|(k, _)| k == key) {
                return fail(format!(
                    "[train] {key}: set per cell by the grid; list the values in `{list}`"
                ));
            }
        }
        let mut cells = Vec::new();
        for (rule, k, seed) in self.grid() {
            let name = cell_name(rule.name(), k, seed);
            let options = TrainOptions {
                data: Some(self.data),
                model: Some(self.model.clone()),
                rule: Some(rule),
                modules: Some(k),
                seed: Some(seed),
                epochs: Some(self.epochs),
                batch_size: Some(self.batch_size),
                lr: Some(self.lr),
                schedule: Some(self.schedule),
                warmup_epochs: Some(self.warmup_epochs),
                lambda: Some(self.lambda),
                train_subset: self.train_subset,
                test_subset: self.test_subset,
                ..self.train.clone()
            };
            let in_cell = |e: Error| Error::Config(format!("cell {name}: {e}"));
            let config = TrainConfig::resolve(&options, None, None).map_err(in_cell)?;
            splits::check_k(&config.model, k, config.split).map_err(in_cell)?;
            cells.push(Cell {
                name,
                rule,
                modules: k,
                seed,
                config,
            });
        }
        Ok(cells)
    }
}
