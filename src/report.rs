//! `sgr report`: tables and plots of a sweep folder, as pure functions of the JSON files the
//! runs wrote (`summary.json`, `metrics.jsonl`, `config.json`, and `sweep.json` when present).
//!
//! The report is tolerant: a run folder without `summary.json` (unfinished), with a corrupt one,
//! or listed in `sweep.json` but never started is listed as not used, and every table is built
//! from the finished runs, with a cell of the grid that has none marked `–`. The "Sources"
//! section names, for every number, the run folders it came from.
//!
//! This module does not touch libtorch: it reads JSON, computes means, writes Markdown and
//! draws with plotters (PNG and SVG, text in the bundled DejaVu Sans, so no system fonts are
//! needed).
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
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
struct SummaryFile {
    rule: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    dataset: String,
    modules: usize,
    #[serde(default)]
    epochs: usize,
    seed: u64,
    test_accuracy: f64,
    #[serde(default)]
    module_test_accuracy: Vec<f64>,
    #[serde(default)]
    images_per_second: f64,
    /// Host RSS peak: `peak_host_rss_bytes`, named `peak_memory_bytes` in older summaries.
    #[serde(default, alias = "peak_host_rss_bytes")]
    peak_memory_bytes: u64,
    /// Device memory peak of `--device cuda` runs (absent in older summaries and CPU runs).
    #[serde(default)]
    peak_device_bytes: Option<u64>,
}

/// The fields of a `metrics.jsonl` line the report uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct EpochLine {
    epoch: usize,
    grad_cosine: Vec<f64>,
    bp_cosine: Vec<f64>,
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
    summary: Option<SummaryFile>,
    epochs: Vec<EpochLine>,
}

impl Run {
    fn finished(&self) -> Option<&SummaryFile> {
        self.summary
            .as_ref()
            .filter(|_| self.state == RunState::Finished)
    }
    /// Final test error of the last module, percent.
    fn test_error(&self) -> Option<f64> {
        self.finished().map(|s| 100.0 * (1.0 - s.test_accuracy))
    }
    fn peak_mib(&self) -> Option<f64> {
        self.finished()
            .map(|s| s.peak_device_bytes.unwrap_or(s.peak_memory_bytes) as f64 / (1024.0 * 1024.0))
    }
    fn images_per_second(&self) -> Option<f64> {
        self.finished().map(|s| s.images_per_second)
    }
    /// The last epoch's per-boundary value picked by `pick`, if it has K-1 entries.
    fn final_discord(&self, pick: fn(&EpochLine) -> &Vec<f64>) -> Option<&[f64]> {
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
fn parse_cell_name(name: &str) -> Option<(String, usize, u64)> {
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

/// Reads one run folder; `None` if it cannot tell which cell it is (the reason goes to `notes`).
fn load_run(
    dir: &Path,
    name: &str,
    expected: Option<&(String, usize, u64)>,
    notes: &mut Vec<String>,
) -> Option<Run> {
    let mut warnings = Vec::new();
    let summary: std::result::Result<Option<SummaryFile>, String> =
        match read_json(&dir.join("summary.json")) {
            Ok(Some(v)) => serde_json::from_value::<SummaryFile>(v)
                .map_err(|e| format!("summary.json: {e}"))
                .and_then(|s| {
                    if !(0.0..=1.0).contains(&s.test_accuracy) || s.modules == 0 {
                        Err(format!(
                            "summary.json: impossible values (test accuracy {}, K {})",
                            s.test_accuracy, s.modules
                        ))
                    } else {
                        Ok(Some(s))
                    }
                }),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
    let config = match read_json(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => {
            warnings.push(e);
            None
        }
    };
    let metrics_path = dir.join("metrics.jsonl");
    let mut epochs = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&metrics_path) {
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
    let identity = summary
        .as_ref()
        .ok()
        .and_then(|s| s.as_ref())
        .map(|s| (s.rule.clone(), s.modules, s.seed))
        .or_else(|| config.as_ref().and_then(identity_of))
        .or_else(|| expected.cloned())
        .or_else(|| parse_cell_name(name));
    let Some((rule, modules, seed)) = identity else {
        notes.push(format!(
            "{name}: has run files but no readable summary.json or config.json, and its name is not <rule>-k<K>-s<seed>"
        ));
        return None;
    };
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
    })
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
    let mut expected: BTreeMap<String, (String, usize, u64)> = BTreeMap::new();
    let mut title = String::new();
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
                    expected.insert(name.to_string(), id);
                }
            }
            if let Some(p) = v.get("preset") {
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
        } else if let Some((rule, modules, seed)) = expected.get(&name).cloned() {
            runs.push(Run {
                dir: name,
                rule,
                modules,
                seed,
                state: RunState::NotStarted,
                warnings: Vec::new(),
                summary: None,
                epochs: Vec::new(),
            });
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

/// Mean and sample standard deviation (n − 1; `None` for a single value).
pub fn mean_std(xs: &[f64]) -> Option<(f64, Option<f64>)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.len() > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

fn rule_rank(rule: &str) -> usize {
    match rule {
        "bp" => 0,
        "dgl" => 1,
        "sgr" => 2,
        _ => 3,
    }
}

fn rule_color(rule: &str) -> RGBColor {
    match rule {
        "bp" => RGBColor(0, 0, 0),
        "dgl" => RGBColor(31, 119, 180),
        "sgr" => RGBColor(214, 39, 40),
        other => {
            let extra = [
                RGBColor(44, 160, 44),
                RGBColor(148, 103, 189),
                RGBColor(140, 86, 75),
            ];
            extra[other.bytes().map(usize::from).sum::<usize>() % extra.len()]
        }
    }
}

/// The runs of one (rule, K) cell of the grid, over seeds.
struct Group<'a> {
    rule: &'a str,
    k: usize,
    runs: Vec<&'a Run>,
}

impl<'a> Group<'a> {
    fn finished(&self) -> Vec<&'a Run> {
        self.runs
            .iter()
            .copied()
            .filter(|r| r.finished().is_some())
            .collect()
    }
    fn values(&self, f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(|r| f(r)).collect()
    }
    fn mean(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        mean_std(&self.values(f)).map(|m| m.0)
    }
    fn used(&self) -> String {
        names(&self.finished())
    }
    /// Mean over finished seeds of a per-index vector (only runs where it has `len` entries).
    fn mean_vec(&self, len: usize, f: impl Fn(&Run) -> Option<&[f64]>) -> (Vec<f64>, Vec<&'a Run>) {
        let picked: Vec<(&Run, &[f64])> = self
            .runs
            .iter()
            .filter_map(|r| f(r).filter(|v| v.len() == len).map(|v| (*r, v)))
            .collect();
        let mean = (0..len)
            .map(|i| picked.iter().map(|(_, v)| v[i]).sum::<f64>() / picked.len().max(1) as f64)
            .collect();
        (mean, picked.into_iter().map(|(r, _)| r).collect())
    }
    fn is_local(&self) -> bool {
        self.rule != "bp"
    }
}

fn names(runs: &[&Run]) -> String {
    if runs.is_empty() {
        "–".into()
    } else {
        runs.iter()
            .map(|r| format!("`{}`", r.dir))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A statistic of a group for a plot: mean and optional ± error.
type GroupStat<'f> = dyn Fn(&Group) -> Option<(f64, Option<f64>)> + 'f;

/// One rule's column of a gradient-discord table: rule, grad cos and bp cos per boundary, and
/// the runs they came from.
type DiscordColumn<'a> = (&'a str, Vec<f64>, Vec<f64>, Vec<&'a Run>);

fn groups(runs: &Runs) -> Vec<Group<'_>> {
    let mut map: BTreeMap<(usize, &str, usize), Vec<&Run>> = BTreeMap::new();
    for r in &runs.runs {
        map.entry((rule_rank(&r.rule), r.rule.as_str(), r.modules))
            .or_default()
            .push(r);
    }
    map.into_iter()
        .map(|((_, rule, k), mut runs)| {
            runs.sort_by_key(|r| r.seed);
            Group { rule, k, runs }
        })
        .collect()
}

/// `9.00 ± 1.41`, `9.00` for one seed, `–` for none; `(n of m)` when seeds are missing.
fn fmt_stat(xs: &[f64], expected: usize, decimals: usize) -> String {
    match mean_std(xs) {
        None => "–".into(),
        Some((m, std)) => {
            let mut s = match std {
                Some(sd) => format!("{m:.decimals$} ± {sd:.decimals$}"),
                None => format!("{m:.decimals$}"),
            };
            if xs.len() < expected {
                let _ = write!(s, " ({} of {expected} seeds)", xs.len());
            }
            s
        }
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("–".into(), |v| format!("{v:.decimals$}"))
}

/// The files a report wrote and what it found.
#[derive(Debug, Clone)]
pub struct Written {
    /// `report.md`.
    pub report: PathBuf,
    /// The plots (PNG and SVG).
    pub plots: Vec<PathBuf>,
    /// Runs finished / all runs.
    pub finished: usize,
    /// Every run.
    pub total: usize,
    /// Runs not used, with their state.
    pub not_used: Vec<(String, String)>,
}

/// Writes `report.md` and the plots for the sweep folder `root` into `out`.
pub fn write(root: &Path, out: &Path) -> Result<Written> {
    let runs = collect(root)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let groups = groups(&runs);
    let mut plots = Vec::new();
    let mut md = String::new();
    let finished = runs.runs.iter().filter(|r| r.finished().is_some()).count();
    let count = |f: fn(&RunState) -> bool| runs.runs.iter().filter(|r| f(&r.state)).count();
    let _ = writeln!(md, "# Report: {}\n", runs.title);
    let _ = writeln!(
        md,
        "Written by `sgr report` from `{}`: {} runs, {finished} finished, {} unfinished, {} corrupt, {} not started.\n",
        runs.root.display(),
        runs.runs.len(),
        count(|s| matches!(s, RunState::Unfinished { .. })),
        count(|s| matches!(s, RunState::Corrupt(_))),
        count(|s| matches!(s, RunState::NotStarted)),
    );

    // Test error table: rows = rule, columns = K.
    let ks: BTreeSet<usize> = groups.iter().map(|g| g.k).collect();
    let mut rules: Vec<&str> = groups.iter().map(|g| g.rule).collect();
    rules.dedup();
    let find = |rule: &str, k: usize| groups.iter().find(|g| g.rule == rule && g.k == k);
    let _ = writeln!(md, "## Test error (%)\n");
    let _ = writeln!(
        md,
        "Final-epoch test error of the last module, mean ± sample standard deviation (n − 1) over seeds. \
         `–`: no finished run for a cell of the grid; `(n of m seeds)`: only n of its m runs finished. \
         bp trains the whole network (K = 1).\n"
    );
    let _ = write!(md, "| rule |");
    for k in &ks {
        let _ = write!(md, " K={k} |");
    }
    let _ = write!(md, "\n|---|");
    for _ in &ks {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    for rule in &rules {
        let _ = write!(md, "| {rule} |");
        for &k in &ks {
            let cell = find(rule, k).map_or(String::new(), |g| {
                fmt_stat(&g.values(Run::test_error), g.runs.len(), 2)
            });
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
    let bp = find("bp", 1);
    let bp_error = bp.and_then(|g| mean_std(&g.values(Run::test_error)));
    let k_points = |f: &GroupStat| -> Vec<Series> {
        rules
            .iter()
            .filter(|r| **r != "bp")
            .map(|rule| Series {
                label: rule.to_string(),
                color: rule_color(rule),
                points: groups
                    .iter()
                    .filter(|g| g.rule == *rule)
                    .filter_map(|g| f(g).map(|(m, s)| ((g.k as f64).log2(), m, s)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let local_ks: Vec<usize> = groups
        .iter()
        .filter(|g| g.is_local() && !g.finished().is_empty())
        .map(|g| g.k)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let k_axis = |ks: &[usize]| -> (Vec<(f64, String)>, (f64, f64)) {
        let ticks: Vec<(f64, String)> = ks
            .iter()
            .map(|&k| ((k as f64).log2(), k.to_string()))
            .collect();
        let lo = ticks.first().map_or(0.0, |t| t.0);
        let hi = ticks.last().map_or(1.0, |t| t.0);
        let pad = ((hi - lo) * 0.08).max(0.5);
        (ticks, (lo - pad, hi + pad))
    };
    let error_series = k_points(&|g| mean_std(&g.values(Run::test_error)));
    if !error_series.is_empty() {
        let (ticks, x_range) = k_axis(&local_ks);
        let chart = LineChart {
            title: format!("Test error vs K ({})", runs.title),
            x_desc: "K (modules)".into(),
            y_desc: "test error (%)".into(),
            ticks,
            x_range,
            y_from_zero: false,
            series: error_series,
            hlines: bp_error
                .map(|(m, _)| ("bp (K=1)".to_string(), rule_color("bp"), m))
                .into_iter()
                .collect(),
        };
        plots.extend(save(&Figure::One(chart), out, "test_error_vs_k")?);
        let _ = writeln!(
            md,
            "![Test error vs K](test_error_vs_k.png)\n\nTest error vs K, mean over seeds with ± one standard deviation; bp as a dashed line ([SVG](test_error_vs_k.svg)).\n"
        );
    }

    // Memory and throughput.
    let bp_mem = bp.and_then(|g| g.mean(Run::peak_mib));
    let bp_ips = bp.and_then(|g| g.mean(Run::images_per_second));
    let _ = writeln!(md, "## Memory and throughput\n");
    let _ = writeln!(
        md,
        "Peak memory: peak resident memory above the process's post-construction baseline during training (`peak_host_rss_bytes` of summary.json; on `--device cuda`, the device's `peak_device_bytes`), \
         mean over finished seeds; \"vs bp\" divides by bp's mean. Images/s: training throughput (evaluation excluded).\n"
    );
    let _ = writeln!(
        md,
        "| rule | K | peak memory (MiB) | vs bp | images/s | vs bp | finished |\n|---|---|---|---|---|---|---|"
    );
    for g in &groups {
        let mem = g.mean(Run::peak_mib);
        let ips = g.mean(Run::images_per_second);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} of {} |",
            g.rule,
            g.k,
            fmt_opt(mem, 1),
            ratio(mem, bp_mem),
            fmt_opt(ips, 0),
            ratio(ips, bp_ips),
            g.finished().len(),
            g.runs.len()
        );
    }
    md.push('\n');
    let mem_series = k_points(&|g| g.mean(Run::peak_mib).map(|m| (m, None)));
    if !mem_series.is_empty() {
        let (ticks, x_range) = k_axis(&local_ks);
        let chart = LineChart {
            title: format!("Peak memory vs K ({})", runs.title),
            x_desc: "K (modules)".into(),
            y_desc: "peak memory (MiB)".into(),
            ticks,
            x_range,
            y_from_zero: true,
            series: mem_series,
            hlines: bp_mem
                .map(|m| ("bp (K=1)".to_string(), rule_color("bp"), m))
                .into_iter()
                .collect(),
        };
        plots.extend(save(&Figure::One(chart), out, "peak_memory_vs_k")?);
        let _ = writeln!(
            md,
            "![Peak memory vs K](peak_memory_vs_k.png)\n\nPeak memory vs K, mean over seeds; bp as a dashed line ([SVG](peak_memory_vs_k.svg)).\n"
        );
    }

    // Gradient discord at the final epoch.
    let _ = writeln!(md, "## Gradient discord (final epoch)\n");
    let _ = writeln!(
        md,
        "Per boundary b (between modules b and b+1), epoch means from the diagnostics, averaged over finished seeds: \
         **grad cos** = cos(∂L_{{b+1}}/∂h_b, ∂L_b/∂h_b), how well module b's local gradient agrees with what module b+1 \
         wants of its input; **bp cos** = cos(∂L_b/∂h_b, global-BP gradient at h_b). 1 is perfect agreement.\n"
    );
    let local_rules: Vec<&str> = rules.iter().copied().filter(|r| *r != "bp").collect();
    let mut discord_sources: Vec<String> = Vec::new();
    let mut any_discord = false;
    for &k in ks.iter().filter(|k| **k > 1) {
        let cols: Vec<DiscordColumn> = local_rules
            .iter()
            .filter_map(|rule| {
                let g = find(rule, k)?;
                let (gc, used) = g.mean_vec(k - 1, |r| r.final_discord(|e| &e.grad_cosine));
                let (bc, _) = g.mean_vec(k - 1, |r| r.final_discord(|e| &e.bp_cosine));
                (!used.is_empty()).then_some((*rule, gc, bc, used))
            })
            .collect();
        if cols.is_empty() {
            continue;
        }
        any_discord = true;
        let _ = writeln!(md, "### K = {k}\n");
        let _ = write!(md, "| boundary |");
        for (rule, ..) in &cols {
            let _ = write!(md, " {rule} grad cos |");
        }
        for (rule, ..) in &cols {
            let _ = write!(md, " {rule} bp cos |");
        }
        let _ = write!(md, "\n|---|");
        for _ in 0..2 * cols.len() {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        for b in 0..k - 1 {
            let _ = write!(md, "| {}→{} |", b + 1, b + 2);
            for (_, gc, ..) in &cols {
                let _ = write!(md, " {:.3} |", gc[b]);
            }
            for (_, _, bc, _) in &cols {
                let _ = write!(md, " {:.3} |", bc[b]);
            }
            md.push('\n');
        }
        md.push('\n');
        for (rule, _, _, used) in &cols {
            discord_sources.push(format!("{rule} K={k}: {}", names(used)));
        }
    }
    if !any_discord {
        let _ = writeln!(
            md,
            "No finished run with K > 1 has gradient diagnostics (`diag_every` = 0, or no diagnostic step in the last epoch).\n"
        );
    }
    // Gradient cosine over epochs, largest K with diagnostics.
    let discord_k = ks.iter().rev().copied().filter(|k| *k > 1).find(|&k| {
        local_rules.iter().any(|rule| {
            find(rule, k).is_some_and(|g| {
                g.finished()
                    .iter()
                    .any(|r| r.epochs.iter().any(|e| e.grad_cosine.len() + 1 == k))
            })
        })
    });
    let mut curve_sources = Vec::new();
    if let Some(k) = discord_k {
        let mut panels = Vec::new();
        for rule in &local_rules {
            let Some(g) = find(rule, k) else { continue };
            let used: Vec<&Run> = g
                .finished()
                .into_iter()
                .filter(|r| r.epochs.iter().any(|e| e.grad_cosine.len() + 1 == k))
                .collect();
            if used.is_empty() {
                continue;
            }
            let max_epoch = used
                .iter()
                .flat_map(|r| r.epochs.iter().map(|e| e.epoch))
                .max()
                .unwrap_or(1);
            let series: Vec<Series> = (0..k - 1)
                .map(|b| Series {
                    label: format!("boundary {}→{}", b + 1, b + 2),
                    color: sequence_color(b, k - 1),
                    points: (1..=max_epoch)
                        .filter_map(|ep| {
                            let vals: Vec<f64> = used
                                .iter()
                                .filter_map(|r| r.epochs.iter().find(|e| e.epoch == ep))
                                .filter(|e| e.grad_cosine.len() + 1 == k)
                                .map(|e| e.grad_cosine[b])
                                .collect();
                            mean_std(&vals).map(|(m, _)| (ep as f64, m, None))
                        })
                        .collect(),
                })
                .collect();
            curve_sources.push(format!("{rule} K={k}: {}", names(&used)));
            panels.push(LineChart {
                title: if k - 1 > 8 {
                    format!("{rule}, K={k} (boundaries: blue shallow → orange deep)")
                } else {
                    format!("{rule}, K={k}")
                },
                x_desc: "epoch".into(),
                y_desc: "grad cosine".into(),
                ticks: int_ticks(1, max_epoch),
                x_range: (0.7, max_epoch as f64 + 0.3),
                y_from_zero: false,
                series,
                hlines: Vec::new(),
            });
        }
        plots.extend(save(
            &Figure::Panels(panels),
            out,
            "grad_cosine_over_epochs",
        )?);
        let _ = writeln!(
            md,
            "![Gradient cosine per boundary over epochs](grad_cosine_over_epochs.png)\n\n\
             Gradient cosine (grad cos) per boundary over epochs at K = {k}, mean over finished seeds ([SVG](grad_cosine_over_epochs.svg)).\n"
        );
    }

    // Per-module head accuracy at the largest K.
    let head_k = local_ks.last().copied();
    let mut head_sources = Vec::new();
    let _ = writeln!(md, "## Per-module head accuracy\n");
    if let Some(k) = head_k {
        let mut series = Vec::new();
        let mut cols = Vec::new();
        for rule in &local_rules {
            let Some(g) = find(rule, k) else { continue };
            let (acc, used) = g.mean_vec(k, |r| {
                r.finished().map(|s| s.module_test_accuracy.as_slice())
            });
            if used.is_empty() {
                continue;
            }
            head_sources.push(format!("{rule} K={k}: {}", names(&used)));
            series.push(Series {
                label: rule.to_string(),
                color: rule_color(rule),
                points: acc
                    .iter()
                    .enumerate()
                    .map(|(i, a)| ((i + 1) as f64, 100.0 * a, None))
                    .collect(),
            });
            cols.push((*rule, acc));
        }
        let bp_acc = bp_error.map(|(e, _)| 100.0 - e);
        let _ = writeln!(
            md,
            "Final test accuracy (%) of each module's head at K = {k} (module K's head is the network's classifier), mean over finished seeds.\n"
        );
        let _ = write!(md, "| module |");
        for (rule, _) in &cols {
            let _ = write!(md, " {rule} |");
        }
        let _ = write!(md, "\n|---|");
        for _ in &cols {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        for m in 0..k {
            let _ = write!(md, "| {} |", m + 1);
            for (_, acc) in &cols {
                let _ = write!(md, " {:.2} |", 100.0 * acc[m]);
            }
            md.push('\n');
        }
        md.push('\n');
        if !series.is_empty() {
            let chart = LineChart {
                title: format!("Head test accuracy vs module depth, K={k}"),
                x_desc: "module".into(),
                y_desc: "head test accuracy (%)".into(),
                ticks: int_ticks(1, k),
                x_range: (0.6, k as f64 + 0.4),
                y_from_zero: false,
                series,
                hlines: bp_acc
                    .map(|a| ("bp (K=1)".to_string(), rule_color("bp"), a))
                    .into_iter()
                    .collect(),
            };
            plots.extend(save(&Figure::One(chart), out, "head_accuracy_vs_depth")?);
            let _ = writeln!(
                md,
                "![Head accuracy vs module depth](head_accuracy_vs_depth.png)\n\nHead test accuracy vs module depth at K = {k}; bp's final accuracy as a dashed line ([SVG](head_accuracy_vs_depth.svg)).\n"
            );
        }
    } else {
        let _ = writeln!(md, "No finished run with K > 1.\n");
    }

    // Runs not used.
    let not_used: Vec<(String, String)> = runs
        .runs
        .iter()
        .filter(|r| r.finished().is_none())
        .map(|r| (r.dir.clone(), r.state.to_string()))
        .collect();
    let _ = writeln!(md, "## Runs not used\n");
    if not_used.is_empty() && runs.notes.is_empty() {
        let _ = writeln!(md, "None: every run finished.\n");
    } else {
        let _ = writeln!(
            md,
            "| run folder | rule | K | seed | state |\n|---|---|---|---|---|"
        );
        for r in runs.runs.iter().filter(|r| r.finished().is_none()) {
            let _ = writeln!(
                md,
                "| `{}` | {} | {} | {} | {} |",
                r.dir,
                r.rule,
                r.modules,
                r.seed,
                r.state.to_string().replace('|', "\\|")
            );
        }
        md.push('\n');
        for n in &runs.notes {
            let _ = writeln!(md, "- {}", n.replace('|', "\\|"));
        }
        if !runs.notes.is_empty() {
            md.push('\n');
        }
    }

    // Sources.
    let _ = writeln!(md, "## Sources\n");
    let _ = writeln!(
        md,
        "Every number in the row of a rule and K above (test error, peak memory, images/s, gradient discord, head accuracy) \
         comes from these run folders (under `{}`) and no others; \"vs bp\" ratios also use the bp row's folders.\n",
        runs.root.display()
    );
    let _ = writeln!(
        md,
        "| rule | K | run folders used | not used |\n|---|---|---|---|"
    );
    for g in &groups {
        let unused: Vec<&Run> = g
            .runs
            .iter()
            .copied()
            .filter(|r| r.finished().is_none())
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            g.rule,
            g.k,
            g.used(),
            if unused.is_empty() {
                String::new()
            } else {
                names(&unused)
            }
        );
    }
    md.push('\n');
    let mut plot_lines = Vec::new();
    if plots.iter().any(|p| p.ends_with("test_error_vs_k.png")) {
        plot_lines.push(
            "`test_error_vs_k`, `peak_memory_vs_k`: every row of the table above".to_string(),
        );
    }
    if !discord_sources.is_empty() {
        plot_lines.push(format!(
            "gradient discord tables: {}",
            discord_sources.join("; ")
        ));
    }
    if !curve_sources.is_empty() {
        plot_lines.push(format!(
            "`grad_cosine_over_epochs` (metrics.jsonl): {}",
            curve_sources.join("; ")
        ));
    }
    if !head_sources.is_empty() {
        plot_lines.push(format!(
            "`head_accuracy_vs_depth` and its table (summary.json): {}",
            head_sources.join("; ")
        ));
    }
    for l in &plot_lines {
        let _ = writeln!(md, "- {l}");
    }
    if !plot_lines.is_empty() {
        md.push('\n');
    }
    let _ = writeln!(md, "Every run:\n");
    let _ = writeln!(
        md,
        "| run folder | rule | K | seed | state | test error (%) | peak MiB | images/s | notes |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs.runs {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.dir,
            r.rule,
            r.modules,
            r.seed,
            r.state.to_string().replace('|', "\\|"),
            fmt_opt(r.test_error(), 2),
            fmt_opt(r.peak_mib(), 1),
            fmt_opt(r.images_per_second(), 0),
            r.warnings.join("; ").replace('|', "\\|")
        );
    }

    let report = out.join("report.md");
    std::fs::write(&report, md).map_err(|e| Error::io(&report, e))?;
    Ok(Written {
        report,
        plots,
        finished,
        total: runs.runs.len(),
        not_used,
    })
}

// ---------------------------------------------------------------------------------------------
// Plots

/// One line of a chart: `(x, y, ± error)` points.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64, Option<f64>)>,
}

/// A line chart with labelled x ticks and optional dashed horizontal reference lines.
struct LineChart {
    title: String,
    x_desc: String,
    y_desc: String,
    ticks: Vec<(f64, String)>,
    x_range: (f64, f64),
    y_from_zero: bool,
    series: Vec<Series>,
    hlines: Vec<(String, RGBColor, f64)>,
}

impl LineChart {
    fn y_extent(&self) -> Option<(f64, f64)> {
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .flat_map(|&(_, y, e)| {
                let e = e.unwrap_or(0.0);
                [y - e, y + e]
            })
            .chain(self.hlines.iter().map(|h| h.2))
            .filter(|y| y.is_finite());
        ys.fold(None, |acc, y| match acc {
            None => Some((y, y)),
            Some((lo, hi)) => Some((f64::min(lo, y), f64::max(hi, y))),
        })
    }
}

fn padded((lo, hi): (f64, f64), from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (lo, hi);
    if from_zero && lo >= 0.0 {
        lo = 0.0;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.1
    } else {
        hi.abs().max(1.0) * 0.1
    };
    if !(from_zero && lo == 0.0) {
        lo -= pad;
    }
    hi += pad;
    (lo, hi)
}

enum Figure {
    One(LineChart),
    /// Side by side, sharing the y range.
    Panels(Vec<LineChart>),
}

const FONT: &str = "sans-serif";

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bundled font is a valid TTF; if registration failed, drawing text would report it.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// Colours for `n` ordered items (boundaries): distinct for a few, a blue→orange ramp for many.
fn sequence_color(i: usize, n: usize) -> RGBColor {
    const TAB: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    if n <= TAB.len() {
        return TAB[i];
    }
    let t = i as f64 / (n - 1).max(1) as f64;
    let lerp = |a: u8, b: u8| (a as f64 + t * (b as f64 - a as f64)).round() as u8;
    RGBColor(lerp(8, 253), lerp(48, 141), lerp(107, 60))
}

/// Integer ticks from `lo` to `hi`, at most about 12 of them.
fn int_ticks(lo: usize, hi: usize) -> Vec<(f64, String)> {
    let step = (hi.saturating_sub(lo) / 12).max(1);
    (lo..=hi)
        .step_by(step)
        .map(|i| (i as f64, i.to_string()))
        .collect()
}

/// Enough decimals to tell apart labels about a tenth of the range apart.
fn y_decimals(lo: f64, hi: f64) -> usize {
    let step = (hi - lo) / 10.0;
    if !(step.is_finite() && step > 0.0) {
        return 2;
    }
    (-step.log10()).ceil().clamp(0.0, 6.0) as usize
}

type DrawResult = std::result::Result<(), String>;

/// A linear f64 axis whose labels and grid lines sit exactly at the given ticks (plotters'
/// `with_key_points` cannot be formatted with a custom label formatter).
#[derive(Clone)]
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    c: &LineChart,
    (y0, y1): (f64, f64),
) -> DrawResult {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let (x0, x1) = c.x_range;
    let x_axis = TickAxis {
        lo: x0,
        hi: x1,
        ticks: c.ticks.iter().map(|t| t.0).collect(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&c.title, (FONT, 18))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_axis, y0..y1)
        .map_err(err)?;
    let x_fmt = |x: &f64| {
        c.ticks
            .iter()
            .min_by(|a, b| (a.0 - x).abs().total_cmp(&(b.0 - x).abs()))
            .map(|t| t.1.clone())
            .unwrap_or_default()
    };
    let decimals = y_decimals(y0, y1);
    let y_fmt = |y: &f64| format!("{y:.decimals$}");
    chart
        .configure_mesh()
        .x_desc(c.x_desc.as_str())
        .y_desc(c.y_desc.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    let cap = (x1 - x0) * 0.012;
    for s in &c.series {
        let style = s.color.stroke_width(2);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.1)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, s.color.filled())))
            .map_err(err)?;
        let bars = s.points.iter().filter_map(|&(x, y, e)| {
            e.filter(|e| *e > 0.0).map(|e| {
                PathElement::new(
                    vec![
                        (x - cap, y - e),
                        (x + cap, y - e),
                        (x, y - e),
                        (x, y + e),
                        (x - cap, y + e),
                        (x + cap, y + e),
                    ],
                    s.color.stroke_width(1),
                )
            })
        });
        chart.draw_series(bars).map_err(err)?;
    }
    for (label, color, y) in &c.hlines {
        let style = color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, *y), (x1, *y)], 8, 5, style))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    // A legend of more than a dozen entries would cover the plot; colours then run shallow→deep.
    if c.series.len() + c.hlines.len() <= 12 {
        chart
            .configure_series_labels()
            .position(legend_corner(c, (x0, x1), (y0, y1)))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 13))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// The corner of the plot where the legend covers the fewest data points.
fn legend_corner(c: &LineChart, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let mut pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (p.0, p.1)))
        .collect();
    for h in &c.hlines {
        pts.extend((0..=20).map(|i| (x0 + (x1 - x0) * i as f64 / 20.0, h.2)));
    }
    let norm = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, upper: bool| {
        pts.iter()
            .map(|&p| norm(p))
            .filter(|&(x, y)| {
                (if right { x > 0.6 } else { x < 0.4 }) && (if upper { y > 0.6 } else { y < 0.4 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| covered(right, upper))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0)
}

fn draw_figure<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    match fig {
        Figure::One(c) => {
            let y = padded(c.y_extent().unwrap_or((0.0, 1.0)), c.y_from_zero);
            draw_chart(root, c, y)
        }
        Figure::Panels(panels) => {
            let extent = panels
                .iter()
                .filter_map(LineChart::y_extent)
                .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
                .unwrap_or((0.0, 1.0));
            let y = padded(extent, false);
            let areas = root.split_evenly((1, panels.len().max(1)));
            for (area, c) in areas.iter().zip(panels) {
                draw_chart(area, c, y)?;
            }
            Ok(())
        }
    }
}

/// Draws `fig` to `<dir>/<stem>.png` and `<dir>/<stem>.svg`.
fn save(fig: &Figure, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    ensure_font();
    let size = match fig {
        Figure::One(_) => (800, 520),
        Figure::Panels(p) => (560 * p.len().max(1) as u32, 480),
    };
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let fail =
        |path: &Path, why: String| Error::Config(format!("{}: cannot draw: {why}", path.display()));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_figure(&root, fig).map_err(|e| fail(&png, e))?;
        root.present().map_err(|e| fail(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_figure(&root, fig).map_err(|e| fail(&svg, e))?;
        root.present().map_err(|e| fail(&svg, e.to_string()))?;
    }
    Ok(vec![png, svg])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[10.0, 8.0]).unwrap();
        assert_eq!(m, 9.0);
        assert!((s.unwrap() - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[3.0]), Some((3.0, None)));
        assert_eq!(mean_std(&[]), None);
        assert_eq!(fmt_stat(&[10.0, 8.0], 2, 2), "9.00 ± 1.41");
        assert_eq!(fmt_stat(&[10.0], 2, 2), "10.00 (1 of 2 seeds)");
        assert_eq!(fmt_stat(&[], 2, 2), "–");
    }

    #[test]
    fn cell_names_round_trip() {
        let name = crate::preset::cell_name("sgr", 16, 2);
        assert_eq!(name, "sgr-k16-s2");
        assert_eq!(parse_cell_name(&name), Some(("sgr".into(), 16, 2)));
        assert_eq!(parse_cell_name("report"), None);
    }
}
