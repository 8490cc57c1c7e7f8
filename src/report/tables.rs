//! The sections of `report.md` built on the setting × K grid (rule × K when nothing else
//! varies): test error, memory and throughput, gradient discord, per-module head accuracy, runs
//! not used and sources. Each section appends
//! Markdown to a [`Doc`] and draws its plots into the report folder.
use super::load::{Run, RunState, Runs};
use super::mean_std;
use super::plots::{
    Figure, LineChart, Series, int_ticks, rule_color, save, sequence_color, setting_color,
};
use super::settings::{Setting, Settings, pairing_key};
use crate::Result;
use plotters::style::{BLACK, RGBColor};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The report being written: Markdown so far, the plots drawn, and where each plot's numbers
/// came from (listed in the Sources section).
pub(super) struct Doc<'a> {
    pub(super) runs: &'a Runs,
    pub(super) out: &'a Path,
    pub(super) md: String,
    pub(super) plots: Vec<PathBuf>,
    pub(super) plot_sources: Vec<String>,
}

impl Doc<'_> {
    /// Draws `fig` as `<stem>.png` and `.svg` in the report folder.
    pub(super) fn save(&mut self, fig: &Figure, stem: &str) -> Result<()> {
        self.plots.extend(save(fig, self.out, stem)?);
        Ok(())
    }
}

/// `` `a`, `b` `` for the run folders, `–` for none.
pub(super) fn names(runs: &[&Run]) -> String {
    if runs.is_empty() {
        "–".into()
    } else {
        runs.iter()
            .map(|r| format!("`{}`", r.dir))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Mean over finished seeds of a per-index vector (only runs where it has `len` entries), and
/// the runs used.
fn mean_vec<'a>(
    s: &Setting<'a>,
    len: usize,
    f: impl Fn(&Run) -> Option<&[f64]>,
) -> (Vec<f64>, Vec<&'a Run>) {
    let picked: Vec<(&Run, &[f64])> = s
        .runs
        .iter()
        .filter_map(|r| f(r).filter(|v| v.len() == len).map(|v| (*r, v)))
        .collect();
    let mean = (0..len)
        .map(|i| picked.iter().map(|(_, v)| v[i]).sum::<f64>() / picked.len().max(1) as f64)
        .collect();
    (mean, picked.into_iter().map(|(r, _)| r).collect())
}

/// A statistic of a setting for a plot: mean and optional ± error.
type Stat<'f> = dyn Fn(&Setting) -> Option<(f64, Option<f64>)> + 'f;

/// One setting's column of a gradient-discord table: label, grad cos and bp cos per boundary,
/// and the runs they came from.
type DiscordColumn<'a> = (&'a str, Vec<f64>, Vec<f64>, Vec<&'a Run>);

/// At most this many settings get a panel of gradient cosine over epochs or a line of head
/// accuracy (more would not be readable).
const MAX_SHOWN: usize = 6;

/// With more settings than this at one K, a gradient-discord table has a row per setting
/// instead of two columns per setting.
const MAX_DISCORD_COLUMNS: usize = 4;

/// The settings × K grid of a sweep (the rule × K grid when only rule and K vary): its rows in
/// table order, the Ks present and a colour per row.
pub(super) struct Grid<'a> {
    pub(super) settings: &'a Settings<'a>,
    ks: BTreeSet<usize>,
    /// Distinct labels in table order.
    labels: Vec<&'a str>,
    /// The Ks of local settings with at least one finished run (the x axis of the K plots).
    local_ks: Vec<usize>,
    colors: BTreeMap<&'a str, RGBColor>,
}

impl<'a> Grid<'a> {
    pub(super) fn new(settings: &'a Settings<'a>) -> Self {
        let list = &settings.list;
        let ks = list.iter().map(|s| s.k).collect();
        let mut labels: Vec<&str> = list.iter().map(|s| s.label.as_str()).collect();
        labels.dedup();
        let local_ks = list
            .iter()
            .filter(|s| s.is_local() && !s.finished().is_empty())
            .map(|s| s.k)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Plain `bp` and `dgl` keep their colours; every other label gets its own.
        let mut colors = BTreeMap::new();
        let others: Vec<&str> = labels
            .iter()
            .copied()
            .filter(|l| !(settings.labels_are_rules() || matches!(*l, "bp" | "dgl")))
            .collect();
        for s in list {
            let color = match others.iter().position(|l| *l == s.label) {
                Some(i) => setting_color(i, others.len()),
                None => rule_color(s.rule),
            };
            colors.insert(s.label.as_str(), color);
        }
        Grid {
            settings,
            ks,
            labels,
            local_ks,
            colors,
        }
    }
    fn list(&self) -> &'a [Setting<'a>] {
        &self.settings.list
    }
    /// "rule" for an old rule × K grid, "setting" when rows are finer than rules.
    pub(super) fn row_name(&self) -> &'static str {
        if self.settings.labels_are_rules() {
            "rule"
        } else {
            "setting"
        }
    }
    pub(super) fn color(&self, label: &str) -> RGBColor {
        self.colors.get(label).copied().unwrap_or(BLACK)
    }
    fn find(&self, label: &str, k: usize) -> Option<&'a Setting<'a>> {
        self.list().iter().find(|s| s.label == label && s.k == k)
    }
    /// The whole-network `bp` settings.
    fn bps(&self) -> impl Iterator<Item = &'a Setting<'a>> {
        self.list().iter().filter(|s| s.rule == "bp" && s.k == 1)
    }
    /// The `bp` setting of the same data, network and recipe as `s`.
    fn bp_for(&self, s: &Setting) -> Option<&'a Setting<'a>> {
        let key = pairing_key(&s.fields, true);
        self.bps().find(|b| pairing_key(&b.fields, true) == key)
    }
    /// Dashed reference lines at `f` of each bp setting.
    fn bp_lines(&self, f: impl Fn(&Setting) -> Option<f64>) -> Vec<(String, RGBColor, f64)> {
        self.bps()
            .filter_map(|b| f(b).map(|v| (format!("{} (K=1)", b.label), rule_color("bp"), v)))
            .collect()
    }
    fn local_labels(&self) -> Vec<&'a str> {
        self.labels
            .iter()
            .copied()
            .filter(|l| self.list().iter().any(|s| s.label == *l && s.is_local()))
            .collect()
    }
    /// The local settings at K with finished runs passing `keep`; with more than
    /// [`MAX_SHOWN`], the `dgl` ones and then those of lowest mean test error. Also whether
    /// some were left out.
    fn shown_at(&self, k: usize, keep: impl Fn(&Run) -> bool) -> (Vec<&'a Setting<'a>>, bool) {
        let mut at: Vec<&Setting> = self
            .list()
            .iter()
            .filter(|s| s.k == k && s.is_local() && s.finished().iter().any(|r| keep(r)))
            .collect();
        if at.len() <= MAX_SHOWN {
            return (at, false);
        }
        let mut ranked = at.clone();
        ranked.sort_by(|a, b| {
            let e = |s: &Setting| s.mean(Run::test_error).unwrap_or(f64::INFINITY);
            (a.rule != "dgl")
                .cmp(&(b.rule != "dgl"))
                .then(e(a).total_cmp(&e(b)))
        });
        ranked.truncate(MAX_SHOWN);
        at.retain(|s| ranked.iter().any(|r| std::ptr::eq(*r, *s)));
        (at, true)
    }
    /// One series per local label of a statistic over K (x = log2 K).
    fn k_points(&self, f: &Stat) -> Vec<Series> {
        self.local_labels()
            .into_iter()
            .map(|label| Series {
                label: label.to_string(),
                color: self.color(label),
                points: self
                    .list()
                    .iter()
                    .filter(|s| s.label == label)
                    .filter_map(|s| f(s).map(|(m, sd)| ((s.k as f64).log2(), m, sd)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }
    /// Ticks at the local Ks on a log2 axis, and the padded x range.
    fn k_axis(&self) -> (Vec<(f64, String)>, (f64, f64)) {
        let ticks: Vec<(f64, String)> = self
            .local_ks
            .iter()
            .map(|&k| ((k as f64).log2(), k.to_string()))
            .collect();
        let lo = ticks.first().map_or(0.0, |t| t.0);
        let hi = ticks.last().map_or(1.0, |t| t.0);
        let pad = ((hi - lo) * 0.08).max(0.5);
        (ticks, (lo - pad, hi + pad))
    }
    /// The label of the setting a run belongs to.
    fn label_of(&self, run: &Run) -> &'a str {
        self.list()
            .iter()
            .find(|s| s.runs.iter().any(|r| std::ptr::eq(*r, run)))
            .map_or("", |s| s.label.as_str())
    }
}

/// `9.00 ± 1.41`, `9.00` for one seed, `–` for none; `(n of m)` when seeds are missing.
pub(super) fn fmt_stat(xs: &[f64], expected: usize, decimals: usize) -> String {
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

/// A finite value with `decimals` decimals, `–` otherwise.
pub(super) fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("–".into(), |v| format!("{v:.decimals$}"))
}

/// Title line and the count of runs by state.
pub(super) fn header(doc: &mut Doc) {
    let runs = doc.runs;
    let finished = runs.runs.iter().filter(|r| r.finished().is_some()).count();
    let count = |f: fn(&RunState) -> bool| runs.runs.iter().filter(|r| f(&r.state)).count();
    let _ = writeln!(doc.md, "# Report: {}\n", runs.title);
    let _ = writeln!(
        doc.md,
        "Written by `sgr report` from `{}`: {} runs, {finished} finished, {} unfinished, {} corrupt, {} not started.\n",
        runs.root.display(),
        runs.runs.len(),
        count(|s| matches!(s, RunState::Unfinished { .. })),
        count(|s| matches!(s, RunState::Corrupt(_))),
        count(|s| matches!(s, RunState::NotStarted)),
    );
}

/// Test error table (rows = setting, columns = K) and its plot over K.
pub(super) fn test_error(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Test error (%)\n");
    let _ = writeln!(
        md,
        "Final-epoch test error of the last module, mean ± sample standard deviation (n − 1) over seeds. \
         `–`: no finished run for a cell of the grid; `(n of m seeds)`: only n of its m runs finished. \
         bp trains the whole network (K = 1).\n"
    );
    let _ = write!(md, "| {} |", grid.row_name());
    for k in &grid.ks {
        let _ = write!(md, " K={k} |");
    }
    let _ = write!(md, "\n|---|");
    for _ in &grid.ks {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    for label in &grid.labels {
        let _ = write!(md, "| {label} |");
        for &k in &grid.ks {
            let cell = grid.find(label, k).map_or(String::new(), |s| {
                fmt_stat(&s.values(Run::test_error), s.runs.len(), 2)
            });
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
    let error_series = grid.k_points(&|s| mean_std(&s.values(Run::test_error)));
    if !error_series.is_empty() {
        let (ticks, x_range) = grid.k_axis();
        let chart = LineChart {
            title: format!("Test error vs K ({})", doc.runs.title),
            x_desc: "K (modules)".into(),
            y_desc: "test error (%)".into(),
            ticks,
            x_range,
            y_from_zero: false,
            series: error_series,
            hlines: grid.bp_lines(|b| b.mean(Run::test_error)),
        };
        doc.save(&Figure::One(chart), "test_error_vs_k")?;
        let _ = writeln!(
            doc.md,
            "![Test error vs K](test_error_vs_k.png)\n\nTest error vs K, mean over seeds with ± one standard deviation; bp as a dashed line ([SVG](test_error_vs_k.svg)).\n"
        );
        doc.plot_sources.push(
            "`test_error_vs_k`, `peak_memory_vs_k`: every row of the table above".to_string(),
        );
    }
    Ok(())
}

/// Peak memory and images/s per setting and K, with ratios to bp, and the memory plot.
pub(super) fn memory(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Memory and throughput\n");
    let _ = writeln!(
        md,
        "Peak memory: peak resident memory above the process's post-construction baseline during training (`peak_host_rss_bytes` of summary.json; on `--device cuda`, the device's `peak_device_bytes`), \
         mean over finished seeds; \"vs bp\" divides by bp's mean. Images/s: training throughput (evaluation excluded).\n"
    );
    let _ = writeln!(
        md,
        "| {} | K | peak memory (MiB) | vs bp | images/s | vs bp | finished |\n|---|---|---|---|---|---|---|",
        grid.row_name()
    );
    for s in grid.list() {
        let bp = grid.bp_for(s);
        let mem = s.mean(Run::peak_mib);
        let ips = s.mean(Run::images_per_second);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} of {} |",
            s.label,
            s.k,
            fmt_opt(mem, 1),
            ratio(mem, bp.and_then(|b| b.mean(Run::peak_mib))),
            fmt_opt(ips, 0),
            ratio(ips, bp.and_then(|b| b.mean(Run::images_per_second))),
            s.finished().len(),
            s.runs.len()
        );
    }
    md.push('\n');
    let mem_series = grid.k_points(&|s| s.mean(Run::peak_mib).map(|m| (m, None)));
    if !mem_series.is_empty() {
        let (ticks, x_range) = grid.k_axis();
        let chart = LineChart {
            title: format!("Peak memory vs K ({})", doc.runs.title),
            x_desc: "K (modules)".into(),
            y_desc: "peak memory (MiB)".into(),
            ticks,
            x_range,
            y_from_zero: true,
            series: mem_series,
            hlines: grid.bp_lines(|b| b.mean(Run::peak_mib)),
        };
        doc.save(&Figure::One(chart), "peak_memory_vs_k")?;
        let _ = writeln!(
            doc.md,
            "![Peak memory vs K](peak_memory_vs_k.png)\n\nPeak memory vs K, mean over seeds; bp as a dashed line ([SVG](peak_memory_vs_k.svg)).\n"
        );
    }
    Ok(())
}

/// Final-epoch gradient discord per boundary: one table per K, then the curves over epochs.
pub(super) fn discord(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Gradient discord (final epoch)\n");
    let _ = writeln!(
        md,
        "Per boundary b (between modules b and b+1), epoch means from the diagnostics, averaged over finished seeds: \
         **grad cos** = cos(∂L_{{b+1}}/∂h_b, ∂L_b/∂h_b), how well module b's local gradient agrees with what module b+1 \
         wants of its input; **bp cos** = cos(∂L_b/∂h_b, global-BP gradient at h_b). 1 is perfect agreement.\n"
    );
    let mut sources: Vec<String> = Vec::new();
    for &k in grid.ks.iter().filter(|k| **k > 1) {
        let cols: Vec<DiscordColumn> = grid
            .list()
            .iter()
            .filter(|s| s.k == k && s.is_local())
            .filter_map(|s| {
                let (gc, used) = mean_vec(s, k - 1, |r| r.final_discord(|e| &e.grad_cosine));
                let (bc, _) = mean_vec(s, k - 1, |r| r.final_discord(|e| &e.bp_cosine));
                (!used.is_empty()).then_some((s.label.as_str(), gc, bc, used))
            })
            .collect();
        if cols.is_empty() {
            continue;
        }
        if cols.len() <= MAX_DISCORD_COLUMNS {
            discord_table(md, k, &cols);
        } else {
            discord_rows(md, k, &cols, grid.row_name());
        }
        for (label, _, _, used) in &cols {
            sources.push(format!("{label} K={k}: {}", names(used)));
        }
    }
    if sources.is_empty() {
        let _ = writeln!(
            md,
            "No finished run with K > 1 has gradient diagnostics (`diag_every` = 0, or no diagnostic step in the last epoch).\n"
        );
    } else {
        doc.plot_sources
            .push(format!("gradient discord tables: {}", sources.join("; ")));
    }
    discord_curves(doc, grid)
}

/// Boundaries as rows, two columns (grad cos, bp cos) per setting.
fn discord_table(md: &mut String, k: usize, cols: &[DiscordColumn]) {
    let _ = writeln!(md, "### K = {k}\n");
    let _ = write!(md, "| boundary |");
    for (label, ..) in cols {
        let _ = write!(md, " {label} grad cos |");
    }
    for (label, ..) in cols {
        let _ = write!(md, " {label} bp cos |");
    }
    let _ = write!(md, "\n|---|");
    for _ in 0..2 * cols.len() {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    for b in 0..k - 1 {
        let _ = write!(md, "| {}→{} |", b + 1, b + 2);
        for (_, gc, ..) in cols {
            let _ = write!(md, " {:.3} |", gc[b]);
        }
        for (_, _, bc, _) in cols {
            let _ = write!(md, " {:.3} |", bc[b]);
        }
        md.push('\n');
    }
    md.push('\n');
}

/// Settings as rows (for many settings): one table of grad cos and one of bp cos, a column per
/// boundary.
fn discord_rows(md: &mut String, k: usize, cols: &[DiscordColumn], row_name: &str) {
    let _ = writeln!(md, "### K = {k}\n");
    for (what, pick) in [("grad cos", 1), ("bp cos", 2)] {
        let _ = write!(md, "| {row_name} ({what}) |");
        for b in 0..k - 1 {
            let _ = write!(md, " {}→{} |", b + 1, b + 2);
        }
        let _ = write!(md, " mean |\n|---|");
        for _ in 0..k {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        for (label, gc, bc, _) in cols {
            let v = if pick == 1 { gc } else { bc };
            let _ = write!(md, "| {label} |");
            for x in v {
                let _ = write!(md, " {x:.3} |");
            }
            let _ = writeln!(md, " {:.3} |", v.iter().sum::<f64>() / v.len() as f64);
        }
        md.push('\n');
    }
}

/// Gradient cosine per boundary over epochs at the largest K with diagnostics, one panel per
/// local setting (at most [`MAX_SHOWN`]).
fn discord_curves(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let has_diag = |r: &Run, k: usize| r.epochs.iter().any(|e| e.grad_cosine.len() + 1 == k);
    let discord_k = grid.ks.iter().rev().copied().filter(|k| *k > 1).find(|&k| {
        grid.list()
            .iter()
            .any(|s| s.k == k && s.is_local() && s.finished().iter().any(|r| has_diag(r, k)))
    });
    let Some(k) = discord_k else { return Ok(()) };
    let (shown, cut) = grid.shown_at(k, |r| has_diag(r, k));
    let mut panels = Vec::new();
    let mut sources = Vec::new();
    for s in shown {
        let used: Vec<&Run> = s
            .finished()
            .into_iter()
            .filter(|r| has_diag(r, k))
            .collect();
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
        let label = &s.label;
        sources.push(format!("{label} K={k}: {}", names(&used)));
        panels.push(LineChart {
            title: if k - 1 > 8 {
                format!("{label}, K={k} (boundaries: blue shallow → orange deep)")
            } else {
                format!("{label}, K={k}")
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
    doc.save(&Figure::Panels(panels), "grad_cosine_over_epochs")?;
    let _ = writeln!(
        doc.md,
        "![Gradient cosine per boundary over epochs](grad_cosine_over_epochs.png)\n\n\
         Gradient cosine (grad cos) per boundary over epochs at K = {k}, mean over finished seeds{} ([SVG](grad_cosine_over_epochs.svg)).\n",
        if cut {
            format!("; dgl and the local settings of lowest test error, {MAX_SHOWN} in all")
        } else {
            String::new()
        }
    );
    doc.plot_sources.push(format!(
        "`grad_cosine_over_epochs` (metrics.jsonl): {}",
        sources.join("; ")
    ));
    Ok(())
}

/// Final test accuracy of every module's head at the largest K, table and plot.
pub(super) fn head_accuracy(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let _ = writeln!(doc.md, "## Per-module head accuracy\n");
    let Some(k) = grid.local_ks.last().copied() else {
        let _ = writeln!(doc.md, "No finished run with K > 1.\n");
        return Ok(());
    };
    let heads = |r: &Run| r.finished().map(|s| s.module_test_accuracy.len() == k) == Some(true);
    let (shown, cut) = grid.shown_at(k, heads);
    let mut series = Vec::new();
    let mut cols = Vec::new();
    let mut sources = Vec::new();
    for s in shown {
        let (acc, used) = mean_vec(s, k, |r| {
            r.finished().map(|s| s.module_test_accuracy.as_slice())
        });
        let label = s.label.as_str();
        sources.push(format!("{label} K={k}: {}", names(&used)));
        series.push(Series {
            label: label.to_string(),
            color: grid.color(label),
            points: acc
                .iter()
                .enumerate()
                .map(|(i, a)| ((i + 1) as f64, 100.0 * a, None))
                .collect(),
        });
        cols.push((label, acc));
    }
    let md = &mut doc.md;
    let _ = writeln!(
        md,
        "Final test accuracy (%) of each module's head at K = {k} (module K's head is the network's classifier), mean over finished seeds{}.\n",
        if cut {
            format!("; dgl and the local settings of lowest test error, {MAX_SHOWN} in all")
        } else {
            String::new()
        }
    );
    let _ = write!(md, "| module |");
    for (label, _) in &cols {
        let _ = write!(md, " {label} |");
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
    if series.is_empty() {
        return Ok(());
    }
    let chart = LineChart {
        title: format!("Head test accuracy vs module depth, K={k}"),
        x_desc: "module".into(),
        y_desc: "head test accuracy (%)".into(),
        ticks: int_ticks(1, k),
        x_range: (0.6, k as f64 + 0.4),
        y_from_zero: false,
        series,
        hlines: grid.bp_lines(|b| b.mean(Run::test_error).map(|e| 100.0 - e)),
    };
    doc.save(&Figure::One(chart), "head_accuracy_vs_depth")?;
    let _ = writeln!(
        doc.md,
        "![Head accuracy vs module depth](head_accuracy_vs_depth.png)\n\nHead test accuracy vs module depth at K = {k}; bp's final accuracy as a dashed line ([SVG](head_accuracy_vs_depth.svg)).\n"
    );
    doc.plot_sources.push(format!(
        "`head_accuracy_vs_depth` and its table (summary.json): {}",
        sources.join("; ")
    ));
    Ok(())
}

/// Runs without a usable summary, with their state, and the folders that were not runs.
pub(super) fn not_used(doc: &mut Doc, grid: &Grid) {
    let runs = doc.runs;
    let md = &mut doc.md;
    let _ = writeln!(md, "## Runs not used\n");
    let unused: Vec<&Run> = runs
        .runs
        .iter()
        .filter(|r| r.finished().is_none())
        .collect();
    if unused.is_empty() && runs.notes.is_empty() {
        let _ = writeln!(md, "None: every run finished.\n");
        return;
    }
    let _ = writeln!(
        md,
        "| run folder | {} | K | seed | state |\n|---|---|---|---|---|",
        grid.row_name()
    );
    for r in unused {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} |",
            r.dir,
            grid.label_of(r),
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

/// Which run folders every number came from, and every run with its own numbers.
pub(super) fn sources(doc: &mut Doc, grid: &Grid) {
    let runs = doc.runs;
    let row = grid.row_name();
    let md = &mut doc.md;
    let _ = writeln!(md, "## Sources\n");
    let _ = writeln!(
        md,
        "Every number in the row of a {row} and K above (test error, peak memory, images/s, gradient discord, head accuracy) \
         comes from these run folders (under `{}`) and no others; \"vs bp\" ratios also use the bp row's folders.\n",
        runs.root.display()
    );
    let _ = writeln!(
        md,
        "| {row} | K | run folders used | not used |\n|---|---|---|---|"
    );
    for s in grid.list() {
        let unused: Vec<&Run> = s
            .runs
            .iter()
            .copied()
            .filter(|r| r.finished().is_none())
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            s.label,
            s.k,
            names(&s.finished()),
            if unused.is_empty() {
                String::new()
            } else {
                names(&unused)
            }
        );
    }
    md.push('\n');
    for l in &doc.plot_sources {
        let _ = writeln!(md, "- {l}");
    }
    if !doc.plot_sources.is_empty() {
        md.push('\n');
    }
    let _ = writeln!(md, "Every run:\n");
    let _ = writeln!(
        md,
        "| run folder | {row} | K | seed | state | test error (%) | peak MiB | images/s | notes |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs.runs {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.dir,
            grid.label_of(r),
            r.modules,
            r.seed,
            r.state.to_string().replace('|', "\\|"),
            fmt_opt(r.test_error(), 2),
            fmt_opt(r.peak_mib(), 1),
            fmt_opt(r.images_per_second(), 0),
            r.warnings.join("; ").replace('|', "\\|")
        );
    }
}
