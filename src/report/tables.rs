//! The sections of `report.md` built on the rule × K grid: test error, memory and throughput,
//! gradient discord, per-module head accuracy, runs not used and sources. Each section appends
//! Markdown to a [`Doc`] and draws its plots into the report folder.
use super::load::{Run, RunState, Runs};
use super::mean_std;
use super::plots::{Figure, LineChart, Series, int_ticks, rule_color, save, sequence_color};
use crate::Result;
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

fn rule_rank(rule: &str) -> usize {
    match rule {
        "bp" => 0,
        "dgl" => 1,
        "sgr" => 2,
        _ => 3,
    }
}

/// The runs of one (rule, K) cell of the grid, over seeds.
pub(super) struct Group<'a> {
    pub(super) rule: &'a str,
    pub(super) k: usize,
    pub(super) runs: Vec<&'a Run>,
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

/// A statistic of a group for a plot: mean and optional ± error.
type GroupStat<'f> = dyn Fn(&Group) -> Option<(f64, Option<f64>)> + 'f;

/// One rule's column of a gradient-discord table: rule, grad cos and bp cos per boundary, and
/// the runs they came from.
type DiscordColumn<'a> = (&'a str, Vec<f64>, Vec<f64>, Vec<&'a Run>);

/// The rule × K grid of a sweep: its groups in table order, and the Ks and rules present.
pub(super) struct Grid<'a> {
    pub(super) groups: Vec<Group<'a>>,
    ks: BTreeSet<usize>,
    rules: Vec<&'a str>,
    /// The Ks of local rules with at least one finished run (the x axis of the K plots).
    local_ks: Vec<usize>,
}

impl<'a> Grid<'a> {
    pub(super) fn new(runs: &'a Runs) -> Self {
        let mut map: BTreeMap<(usize, &str, usize), Vec<&Run>> = BTreeMap::new();
        for r in &runs.runs {
            map.entry((rule_rank(&r.rule), r.rule.as_str(), r.modules))
                .or_default()
                .push(r);
        }
        let groups: Vec<Group> = map
            .into_iter()
            .map(|((_, rule, k), mut runs)| {
                runs.sort_by_key(|r| r.seed);
                Group { rule, k, runs }
            })
            .collect();
        let ks = groups.iter().map(|g| g.k).collect();
        let mut rules: Vec<&str> = groups.iter().map(|g| g.rule).collect();
        rules.dedup();
        let local_ks = groups
            .iter()
            .filter(|g| g.is_local() && !g.finished().is_empty())
            .map(|g| g.k)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Grid {
            groups,
            ks,
            rules,
            local_ks,
        }
    }
    fn find(&self, rule: &str, k: usize) -> Option<&Group<'a>> {
        self.groups.iter().find(|g| g.rule == rule && g.k == k)
    }
    fn bp(&self) -> Option<&Group<'a>> {
        self.find("bp", 1)
    }
    fn bp_error(&self) -> Option<(f64, Option<f64>)> {
        self.bp().and_then(|g| mean_std(&g.values(Run::test_error)))
    }
    fn local_rules(&self) -> Vec<&'a str> {
        self.rules.iter().copied().filter(|r| *r != "bp").collect()
    }
    /// One series per local rule of a statistic over K (x = log2 K).
    fn k_points(&self, f: &GroupStat) -> Vec<Series> {
        self.local_rules()
            .into_iter()
            .map(|rule| Series {
                label: rule.to_string(),
                color: rule_color(rule),
                points: self
                    .groups
                    .iter()
                    .filter(|g| g.rule == rule)
                    .filter_map(|g| f(g).map(|(m, s)| ((g.k as f64).log2(), m, s)))
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

/// Test error table (rows = rule, columns = K) and its plot over K.
pub(super) fn test_error(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Test error (%)\n");
    let _ = writeln!(
        md,
        "Final-epoch test error of the last module, mean ± sample standard deviation (n − 1) over seeds. \
         `–`: no finished run for a cell of the grid; `(n of m seeds)`: only n of its m runs finished. \
         bp trains the whole network (K = 1).\n"
    );
    let _ = write!(md, "| rule |");
    for k in &grid.ks {
        let _ = write!(md, " K={k} |");
    }
    let _ = write!(md, "\n|---|");
    for _ in &grid.ks {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    for rule in &grid.rules {
        let _ = write!(md, "| {rule} |");
        for &k in &grid.ks {
            let cell = grid.find(rule, k).map_or(String::new(), |g| {
                fmt_stat(&g.values(Run::test_error), g.runs.len(), 2)
            });
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
    let error_series = grid.k_points(&|g| mean_std(&g.values(Run::test_error)));
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
            hlines: grid
                .bp_error()
                .map(|(m, _)| ("bp (K=1)".to_string(), rule_color("bp"), m))
                .into_iter()
                .collect(),
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

/// Peak memory and images/s per rule and K, with ratios to bp, and the memory plot.
pub(super) fn memory(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let bp_mem = grid.bp().and_then(|g| g.mean(Run::peak_mib));
    let bp_ips = grid.bp().and_then(|g| g.mean(Run::images_per_second));
    let md = &mut doc.md;
    let _ = writeln!(md, "## Memory and throughput\n");
    let _ = writeln!(
        md,
        "Peak memory: peak resident memory above the process's post-construction baseline during training (`peak_memory_bytes` of summary.json), \
         mean over finished seeds; \"vs bp\" divides by bp's mean. Images/s: training throughput (evaluation excluded).\n"
    );
    let _ = writeln!(
        md,
        "| rule | K | peak memory (MiB) | vs bp | images/s | vs bp | finished |\n|---|---|---|---|---|---|---|"
    );
    for g in &grid.groups {
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
    let mem_series = grid.k_points(&|g| g.mean(Run::peak_mib).map(|m| (m, None)));
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
            hlines: bp_mem
                .map(|m| ("bp (K=1)".to_string(), rule_color("bp"), m))
                .into_iter()
                .collect(),
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
    let local_rules = grid.local_rules();
    let mut sources: Vec<String> = Vec::new();
    for &k in grid.ks.iter().filter(|k| **k > 1) {
        let cols: Vec<DiscordColumn> = local_rules
            .iter()
            .filter_map(|rule| {
                let g = grid.find(rule, k)?;
                let (gc, used) = g.mean_vec(k - 1, |r| r.final_discord(|e| &e.grad_cosine));
                let (bc, _) = g.mean_vec(k - 1, |r| r.final_discord(|e| &e.bp_cosine));
                (!used.is_empty()).then_some((*rule, gc, bc, used))
            })
            .collect();
        if cols.is_empty() {
            continue;
        }
        discord_table(md, k, &cols);
        for (rule, _, _, used) in &cols {
            sources.push(format!("{rule} K={k}: {}", names(used)));
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

fn discord_table(md: &mut String, k: usize, cols: &[DiscordColumn]) {
    let _ = writeln!(md, "### K = {k}\n");
    let _ = write!(md, "| boundary |");
    for (rule, ..) in cols {
        let _ = write!(md, " {rule} grad cos |");
    }
    for (rule, ..) in cols {
        let _ = write!(md, " {rule} bp cos |");
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

/// Gradient cosine per boundary over epochs at the largest K with diagnostics, one panel per
/// local rule.
fn discord_curves(doc: &mut Doc, grid: &Grid) -> Result<()> {
    let local_rules = grid.local_rules();
    let has_diag = |r: &Run, k: usize| r.epochs.iter().any(|e| e.grad_cosine.len() + 1 == k);
    let discord_k = grid.ks.iter().rev().copied().filter(|k| *k > 1).find(|&k| {
        local_rules.iter().any(|rule| {
            grid.find(rule, k)
                .is_some_and(|g| g.finished().iter().any(|r| has_diag(r, k)))
        })
    });
    let Some(k) = discord_k else { return Ok(()) };
    let mut panels = Vec::new();
    let mut sources = Vec::new();
    for rule in &local_rules {
        let Some(g) = grid.find(rule, k) else {
            continue;
        };
        let used: Vec<&Run> = g
            .finished()
            .into_iter()
            .filter(|r| has_diag(r, k))
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
        sources.push(format!("{rule} K={k}: {}", names(&used)));
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
    doc.save(&Figure::Panels(panels), "grad_cosine_over_epochs")?;
    let _ = writeln!(
        doc.md,
        "![Gradient cosine per boundary over epochs](grad_cosine_over_epochs.png)\n\n\
         Gradient cosine (grad cos) per boundary over epochs at K = {k}, mean over finished seeds ([SVG](grad_cosine_over_epochs.svg)).\n"
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
    let mut series = Vec::new();
    let mut cols = Vec::new();
    let mut sources = Vec::new();
    for rule in grid.local_rules() {
        let Some(g) = grid.find(rule, k) else {
            continue;
        };
        let (acc, used) = g.mean_vec(k, |r| {
            r.finished().map(|s| s.module_test_accuracy.as_slice())
        });
        if used.is_empty() {
            continue;
        }
        sources.push(format!("{rule} K={k}: {}", names(&used)));
        series.push(Series {
            label: rule.to_string(),
            color: rule_color(rule),
            points: acc
                .iter()
                .enumerate()
                .map(|(i, a)| ((i + 1) as f64, 100.0 * a, None))
                .collect(),
        });
        cols.push((rule, acc));
    }
    let md = &mut doc.md;
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
        hlines: grid
            .bp_error()
            .map(|(e, _)| ("bp (K=1)".to_string(), rule_color("bp"), 100.0 - e))
            .into_iter()
            .collect(),
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
pub(super) fn not_used(doc: &mut Doc) {
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
        "| run folder | rule | K | seed | state |\n|---|---|---|---|---|"
    );
    for r in unused {
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

/// Which run folders every number came from, and every run with its own numbers.
pub(super) fn sources(doc: &mut Doc, grid: &Grid) {
    let runs = doc.runs;
    let md = &mut doc.md;
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
    for g in &grid.groups {
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
    for l in &doc.plot_sources {
        let _ = writeln!(md, "- {l}");
    }
    if !doc.plot_sources.is_empty() {
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
}
