//! The study sections of `report.md` (issue 12) and `report.json`: every setting over seeds with
//! its convergence check, the paired comparison with `dgl`, test error and reconciliation
//! against λ, and the gap to `bp` against the boundary gradient cosine.
use super::load::Run;
use super::mean_std;
use super::plots::{Figure, LineChart, Series, round_ticks, rule_color, setting_color};
use super::settings::{
    CONVERGED_POINTS, Comparison, Convergence, Interval, Setting, Settings, comparisons, label,
    pairing_key,
};
use super::tables::{Doc, Grid, fmt_stat, names};
use crate::{Error, Result};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

/// One finished local run placed against `bp`: its test error minus the mean test error of the
/// `bp` runs of the same data, network and recipe, and its final boundary gradient cosine.
pub(super) struct Gap<'a> {
    pub(super) run: &'a Run,
    /// Index of its setting.
    pub(super) setting: usize,
    pub(super) gap: f64,
    pub(super) grad_cosine: f64,
}

/// What the study sections compute once and report twice (Markdown and JSON).
pub(super) struct Study<'a> {
    pub(super) settings: &'a Settings<'a>,
    pub(super) comparisons: Vec<Comparison<'a>>,
    /// Settings with no `dgl` setting to pair with, and why.
    pub(super) alone: Vec<(usize, String)>,
    pub(super) gaps: Vec<Gap<'a>>,
    /// Convergence per setting (same order as the settings).
    pub(super) convergence: Vec<Option<Convergence>>,
}

impl<'a> Study<'a> {
    pub(super) fn new(settings: &'a Settings<'a>) -> Self {
        let (comparisons, alone) = comparisons(settings);
        Study {
            settings,
            comparisons,
            alone,
            gaps: gaps(settings),
            convergence: settings.list.iter().map(Setting::convergence).collect(),
        }
    }
    fn setting(&self, i: usize) -> &'a Setting<'a> {
        &self.settings.list[i]
    }
}

/// The gap to `bp` of every finished local run with diagnostics in its last epoch and a `bp`
/// reference.
fn gaps<'a>(settings: &Settings<'a>) -> Vec<Gap<'a>> {
    let mut bp_error: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in settings.list.iter().filter(|s| s.rule == "bp" && s.k == 1) {
        bp_error
            .entry(pairing_key(&s.fields, true))
            .or_default()
            .extend(s.values(Run::test_error));
    }
    let mut out = Vec::new();
    for (i, s) in settings
        .list
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_local())
    {
        let Some(bp) = bp_error
            .get(&pairing_key(&s.fields, true))
            .and_then(|v| mean_std(v))
        else {
            continue;
        };
        for r in s.finished() {
            if let (Some(err), Some(cos)) = (r.test_error(), r.final_grad_cosine()) {
                out.push(Gap {
                    run: r,
                    setting: i,
                    gap: err - bp.0,
                    grad_cosine: cos,
                });
            }
        }
    }
    out
}

/// `+0.35`, `−0.20`, and `0.00` for anything that rounds to zero (no sign from rounding noise).
fn signed(x: f64) -> String {
    if (x * 100.0).round() == 0.0 {
        return "0.00".into();
    }
    format!("{x:+.2}").replace('-', "−")
}

/// Every setting over seeds, with the convergence check.
pub(super) fn settings_table(doc: &mut Doc, grid: &Grid, study: &Study) {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Settings and convergence\n");
    let varying = &study.settings.varying;
    let _ = writeln!(
        md,
        "A setting is a run's configuration without its seed, without the fields that only say how it ran (threads, data_dir, \
         diag_every, on_nan, device) and without the fields its rule ignores (SGR's for bp and dgl, split and aux_head at K = 1); \
         a field a run's config.json lacks takes its default. Runs of one setting differ only in the seed. Rows are labelled by \
         the fields that vary across this sweep: {}.\n",
        if varying.is_empty() {
            "none besides rule and K".to_string()
        } else {
            varying
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(
        md,
        "Test error (%) and grad cos (the last epoch's boundary gradient cosine, averaged over boundaries): mean ± sample \
         standard deviation over finished seeds. **Converged** (issue 12): the mean-over-seeds test error moved by less than \
         {CONVERGED_POINTS} points over the last 20% of epochs (rounded up; measured as max − min from the epoch before that \
         span to the last, from metrics.jsonl); `–`: no finished run, or too few epochs.\n"
    );
    let _ = writeln!(
        md,
        "| {} | K | finished | test error (%) | grad cos | moved, last 20% (points) | converged |\n|---|---|---|---|---|---|---|",
        grid.row_name()
    );
    for (s, conv) in study.settings.list.iter().zip(&study.convergence) {
        let errors = s.values(Run::test_error);
        let cosines = s.values(Run::final_grad_cosine);
        let (moved, converged) = match conv {
            Some(c) => (
                format!("{:.2} (epochs {}–{})", c.moved, c.from, c.epochs),
                if c.converged { "yes" } else { "**no**" }.to_string(),
            ),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} of {} | {} | {} | {moved} | {converged} |",
            s.label,
            s.k,
            s.finished().len(),
            s.runs.len(),
            fmt_stat(&errors, errors.len(), 2),
            fmt_stat(&cosines, cosines.len(), 3),
        );
    }
    md.push('\n');
    if let Some(line) = convergence_summary(study) {
        let _ = writeln!(md, "{line}\n");
    }
}

/// `Converged: 4 of 7 settings checked (dgl, the criterion: dgl K=4: yes)`.
fn convergence_summary(study: &Study) -> Option<String> {
    let checked: Vec<bool> = study
        .convergence
        .iter()
        .flatten()
        .map(|c| c.converged)
        .collect();
    if checked.is_empty() {
        return None;
    }
    let dgl: Vec<String> = study
        .settings
        .list
        .iter()
        .zip(&study.convergence)
        .filter(|(s, _)| s.rule == "dgl")
        .filter_map(|(s, c)| {
            let c = c.as_ref()?;
            let yes = if c.converged { "yes" } else { "no" };
            Some(format!("{} K={}: {yes}", s.label, s.k))
        })
        .collect();
    Some(format!(
        "Converged: {} of {} settings checked{}.",
        checked.iter().filter(|c| **c).count(),
        checked.len(),
        if dgl.is_empty() {
            String::new()
        } else {
            format!(" (dgl, the issue's criterion: {})", dgl.join("; "))
        }
    ))
}

/// `−0.50 … +1.20` and whether it excludes zero, for a table cell.
fn interval_cells(iv: Option<&Interval>) -> (String, String, String) {
    let Some(iv) = iv else {
        return ("–".into(), "–".into(), "– (no pair)".into());
    };
    let mean = signed(iv.mean);
    match (iv.ci, iv.excludes_zero()) {
        (None, _) => (mean, "–".into(), "– (1 pair)".into()),
        (Some((lo, hi)), ex) => {
            let ci = format!("[{}, {}]", signed(lo), signed(hi));
            let verdict = match ex {
                Some(true) => "**yes: worse**",
                Some(false) => "**yes: better**",
                None => "no",
            };
            if ex.is_some() {
                (format!("**{mean}**"), format!("**{ci}**"), verdict.into())
            } else {
                (mean, ci, verdict.into())
            }
        }
    }
}

/// Per-seed differences against `dgl`, their mean and 95% t-interval, and the unpaired runs.
pub(super) fn paired(doc: &mut Doc, study: &Study) {
    let md = &mut doc.md;
    let _ = writeln!(md, "## Paired comparison with dgl\n");
    let _ = writeln!(
        md,
        "Each finished run is paired with the finished dgl run of the same seed (same initial weights and batch order) and \
         the same data, network, K and recipe (every setting field but the rule and SGR's fields; bp is compared with dgl at \
         every K; fg-sgr also with fg, in rows whose vs column says so). Δ = its test error − the baseline's, in points: negative is better than the baseline. Mean Δ with a 95% Student-t interval, \
         mean ± t(0.975, n − 1) · sd / √n over the n pairs; **bold**: the interval excludes 0.\n"
    );
    if study.comparisons.is_empty() {
        let _ = writeln!(
            md,
            "No setting to compare: the sweep has no dgl runs, or no other runs of the same data, network and recipe.\n"
        );
    } else {
        let _ = writeln!(
            md,
            "| setting | K | vs | n | seeds | Δ per seed (points) | mean Δ | 95% interval | excludes 0 |\n|---|---|---|---|---|---|---|---|---|"
        );
        for c in &study.comparisons {
            let _ = writeln!(md, "{}", comparison_row(study, c));
        }
        md.push('\n');
    }
    unpaired_list(md, study);
}

/// One row of the paired table.
fn comparison_row(study: &Study, c: &Comparison) -> String {
    let (s, d) = (study.setting(c.setting), study.setting(c.baseline));
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "–".to_string()
        } else {
            v.join(", ")
        }
    };
    let seeds = or_dash(c.pairs.iter().map(|p| p.seed.to_string()).collect());
    let per_seed = or_dash(
        c.pairs
            .iter()
            .map(|p| format!("s{}: {}", p.seed, signed(p.diff)))
            .collect(),
    );
    let (mean, ci, verdict) = interval_cells(c.interval.as_ref());
    let name = if s.is_local() {
        s.label.clone()
    } else {
        format!("{} (K={})", s.label, s.k)
    };
    format!(
        "| {name} | {} | {} | {} | {seeds} | {per_seed} | {mean} | {ci} | {verdict} |",
        d.k,
        d.label,
        c.pairs.len(),
    )
}

/// The runs of compared settings left out of the pairs, and the settings with no dgl.
fn unpaired_list(md: &mut String, study: &Study) {
    let unpaired: Vec<&Comparison> = study
        .comparisons
        .iter()
        .filter(|c| !c.unpaired.is_empty())
        .collect();
    if unpaired.is_empty() && study.alone.is_empty() {
        let _ = writeln!(
            md,
            "Unpaired runs: none (every run of a compared setting and its dgl setting is finished and has a partner).\n"
        );
        return;
    }
    let _ = writeln!(md, "Unpaired runs (not counted above):\n");
    for c in unpaired {
        let (s, d) = (study.setting(c.setting), study.setting(c.baseline));
        let items: Vec<String> = c
            .unpaired
            .iter()
            .map(|(dir, why)| format!("`{dir}` ({why})"))
            .collect();
        let _ = writeln!(
            md,
            "- {} K={} vs {} K={}: {}",
            s.label,
            s.k,
            d.label,
            d.k,
            items.join("; ")
        );
    }
    for (i, why) in &study.alone {
        let s = study.setting(*i);
        let _ = writeln!(
            md,
            "- {} K={}: {why}; runs {}",
            s.label,
            s.k,
            names(&s.runs)
        );
    }
    md.push('\n');
}

/// The sgr settings at one K, as lines over λ: one per combination of the other varying
/// fields.
fn lambda_lines<'a>(study: &Study<'a>, k: usize) -> BTreeMap<String, Vec<&'a Setting<'a>>> {
    let others: Vec<String> = study
        .settings
        .varying
        .iter()
        .filter(|v| v.as_str() != "lambda")
        .cloned()
        .collect();
    let mut lines: BTreeMap<String, Vec<&Setting>> = BTreeMap::new();
    for s in study.settings.list.iter() {
        if s.rule == "sgr" && s.k == k && s.lambda().is_some_and(|l| l > 0.0) {
            lines
                .entry(label(s.rule, &s.fields, &others))
                .or_default()
                .push(s);
        }
    }
    for v in lines.values_mut() {
        v.sort_by(|a, b| {
            a.lambda()
                .unwrap_or(0.0)
                .total_cmp(&b.lambda().unwrap_or(0.0))
        });
    }
    lines
}

/// λ tick label: `0.01`, `0.1`, `1`, `10`.
fn lambda_text(l: f64) -> String {
    format!("{l}")
}

/// The sgr settings of one K on a log-λ axis, with the dgl settings they pair with.
struct LambdaPanel<'s, 'a> {
    k: usize,
    lines: BTreeMap<String, Vec<&'s Setting<'a>>>,
    dgl: Vec<&'s Setting<'a>>,
    ticks: Vec<(f64, String)>,
    x_range: (f64, f64),
}

impl<'s, 'a> LambdaPanel<'s, 'a> {
    /// The panel of K, or why it is not drawn (no line with two λ values that have finished
    /// runs).
    fn new(study: &'s Study<'a>, k: usize) -> std::result::Result<Self, String> {
        let lines = lambda_lines(study, k);
        let done = |s: &Setting| !s.finished().is_empty();
        let mut xs: Vec<f64> = lines
            .values()
            .flatten()
            .filter(|s| done(s))
            .filter_map(|s| s.lambda())
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        if !lines
            .values()
            .any(|v| v.iter().filter(|s| done(s)).count() > 1)
        {
            return Err(format!(
                "K={k}: {} finished sgr λ value{} per line, so no line to draw",
                if xs.is_empty() { "no" } else { "one" },
                if xs.is_empty() { "s" } else { "" }
            ));
        }
        let dgl = study
            .settings
            .list
            .iter()
            .filter(|d| d.rule == "dgl" && d.k == k)
            .filter(|d| {
                let key = pairing_key(&d.fields, false);
                lines
                    .values()
                    .flatten()
                    .any(|s| pairing_key(&s.fields, false) == key)
            })
            .collect();
        let ticks: Vec<(f64, String)> = xs.iter().map(|l| (l.log10(), lambda_text(*l))).collect();
        let (lo, hi) = (ticks[0].0, ticks[ticks.len() - 1].0);
        let pad = ((hi - lo) * 0.06).max(0.2);
        Ok(LambdaPanel {
            k,
            lines,
            dgl,
            ticks,
            x_range: (lo - pad, hi + pad),
        })
    }

    /// A line per sgr combination of `f`'s mean ± std over λ, dgl's mean dashed.
    fn chart(&self, what: &str, y_desc: &str, f: &dyn Fn(&Setting) -> Vec<f64>) -> LineChart {
        let n = self.lines.len();
        LineChart {
            title: format!("{what} vs λ, K={}", self.k),
            x_desc: "λ (log scale)".into(),
            y_desc: y_desc.into(),
            ticks: self.ticks.clone(),
            x_range: self.x_range,
            y_from_zero: false,
            series: self
                .lines
                .iter()
                .enumerate()
                .map(|(i, (name, v))| Series {
                    label: name.clone(),
                    color: if n == 1 {
                        rule_color("sgr")
                    } else {
                        setting_color(i, n)
                    },
                    points: v
                        .iter()
                        .filter_map(|s| {
                            let (m, sd) = mean_std(&f(s))?;
                            Some((s.lambda()?.log10(), m, sd))
                        })
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect(),
            hlines: self
                .dgl
                .iter()
                .filter_map(|d| {
                    mean_std(&f(d)).map(|(m, _)| (d.label.clone(), rule_color("dgl"), m))
                })
                .collect(),
        }
    }
}

/// Draws the two λ plots of one panel; returns its Sources line, or notes why the cosine plot
/// is missing in `skipped`.
fn lambda_panel_plots(
    doc: &mut Doc,
    panel: &LambdaPanel,
    skipped: &mut Vec<String>,
) -> Result<String> {
    let k = panel.k;
    let error = panel.chart("Test error", "test error (%)", &|s| {
        s.values(Run::test_error)
    });
    let stem = format!("test_error_vs_lambda_k{k}");
    doc.save(&Figure::One(error), &stem)?;
    let _ = writeln!(
        doc.md,
        "![Test error vs λ, K={k}]({stem}.png)\n\nTest error vs λ at K = {k}, mean ± one standard deviation over finished seeds, \
         a line per combination of the other varying fields; dgl of the same data, network and recipe as a dashed line ([SVG]({stem}.svg)).\n"
    );
    let cos = panel.chart(
        "Boundary gradient cosine",
        "grad cosine (mean over boundaries)",
        &|s| s.values(Run::final_grad_cosine),
    );
    if cos.series.is_empty() {
        skipped.push(format!(
            "K={k}: gradient cosine vs λ not drawn (no run has diagnostics in its last epoch)"
        ));
        return Ok(format!(
            "`{stem}`: the sgr and dgl rows of K={k} in the settings table"
        ));
    }
    let cos_stem = format!("grad_cosine_vs_lambda_k{k}");
    doc.save(&Figure::One(cos), &cos_stem)?;
    let _ = writeln!(
        doc.md,
        "![Gradient cosine vs λ, K={k}]({cos_stem}.png)\n\nAchieved boundary gradient cosine (last epoch, mean over boundaries) vs λ at K = {k}, \
         mean ± one standard deviation over seeds; dgl as a dashed line ([SVG]({cos_stem}.svg)).\n"
    );
    Ok(format!(
        "`{stem}`, `{cos_stem}`: the sgr and dgl rows of K={k} in the settings table"
    ))
}

/// Test error and the achieved boundary gradient cosine against λ (log axis), per K.
pub(super) fn lambda_plots(doc: &mut Doc, study: &Study) -> Result<()> {
    let _ = writeln!(doc.md, "## Test error and gradient cosine vs λ\n");
    let ks: BTreeSet<usize> = study
        .settings
        .list
        .iter()
        .filter(|s| s.rule == "sgr")
        .map(|s| s.k)
        .collect();
    let mut drawn = Vec::new();
    let mut skipped = Vec::new();
    for k in ks {
        match LambdaPanel::new(study, k) {
            Ok(panel) => drawn.push(lambda_panel_plots(doc, &panel, &mut skipped)?),
            Err(why) => skipped.push(why),
        }
    }
    let md = &mut doc.md;
    if drawn.is_empty() && skipped.is_empty() {
        let _ = writeln!(md, "Skipped: no sgr runs.\n");
    }
    for s in &skipped {
        let _ = writeln!(md, "Skipped at {s}.\n");
    }
    let left_out: Vec<String> = study
        .settings
        .list
        .iter()
        .filter(|s| s.rule == "sgr" && !s.lambda().is_some_and(|l| l > 0.0))
        .map(|s| format!("{} K={}", s.label, s.k))
        .collect();
    if !left_out.is_empty() {
        let _ = writeln!(
            md,
            "Not on a log-λ axis (λ ≤ 0 or missing): {}.\n",
            left_out.join(", ")
        );
    }
    doc.plot_sources.extend(drawn);
    Ok(())
}

/// Pearson correlation (n ≥ 3 and both vary).
fn correlation(xy: &[(f64, f64)]) -> Option<f64> {
    if xy.len() < 3 {
        return None;
    }
    let n = xy.len() as f64;
    let (mx, my) = (
        xy.iter().map(|p| p.0).sum::<f64>() / n,
        xy.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xy {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx).powi(2);
        syy += (y - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// At most this many settings get their own colour in the gap scatter; beyond, runs are
/// coloured by rule.
const MAX_SCATTER_SETTINGS: usize = 10;

/// The scatter's point sets, in settings order: one per setting label, or with more than
/// [`MAX_SCATTER_SETTINGS`] labels one per rule (the second value says which).
fn gap_series(grid: &Grid, study: &Study) -> (Vec<Series>, bool) {
    let labels: BTreeSet<&str> = study
        .gaps
        .iter()
        .map(|g| study.setting(g.setting).label.as_str())
        .collect();
    let by_setting = labels.len() <= MAX_SCATTER_SETTINGS;
    let mut series: Vec<Series> = Vec::new();
    for g in &study.gaps {
        let s = study.setting(g.setting);
        let (key, color) = if by_setting {
            (s.label.as_str(), grid.color(&s.label))
        } else {
            (s.rule, rule_color(s.rule))
        };
        let i = match series.iter().position(|x| x.label == key) {
            Some(i) => i,
            None => {
                series.push(Series {
                    label: key.to_string(),
                    color,
                    points: Vec::new(),
                });
                series.len() - 1
            }
        };
        series[i].points.push((g.grad_cosine, g.gap, None));
    }
    (series, by_setting)
}

/// One point per finished local run: gap to bp against its boundary gradient cosine.
pub(super) fn gap_scatter(doc: &mut Doc, grid: &Grid, study: &Study) -> Result<()> {
    let _ = writeln!(doc.md, "## Gap to bp vs boundary gradient cosine\n");
    let has_bp = study
        .settings
        .list
        .iter()
        .any(|s| s.rule == "bp" && !s.finished().is_empty());
    if study.gaps.len() < 2 {
        let why = if !has_bp {
            "no finished bp run".to_string()
        } else {
            format!(
                "{} finished local run(s) with both a bp run of the same data, network and recipe and diagnostics in the last epoch",
                study.gaps.len()
            )
        };
        let _ = writeln!(doc.md, "Skipped: {why}.\n");
        return Ok(());
    }
    let (series, by_setting) = gap_series(grid, study);
    let xs = study.gaps.iter().map(|g| g.grad_cosine);
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let pad = ((hi - lo) * 0.08).max(0.02);
    let (lo, hi) = (lo - pad, hi + pad);
    let chart = LineChart {
        title: "Gap to bp vs boundary gradient cosine (one point per run)".into(),
        x_desc: "grad cosine (last epoch, mean over boundaries)".into(),
        y_desc: "test error − bp test error (points)".into(),
        ticks: round_ticks(lo, hi, 8),
        x_range: (lo, hi),
        y_from_zero: false,
        series,
        hlines: vec![("bp".to_string(), rule_color("bp"), 0.0)],
    };
    doc.save(&Figure::Scatter(chart), "gap_to_bp_vs_grad_cosine")?;
    let xy: Vec<(f64, f64)> = study.gaps.iter().map(|g| (g.grad_cosine, g.gap)).collect();
    let _ = writeln!(
        doc.md,
        "![Gap to bp vs gradient cosine](gap_to_bp_vs_grad_cosine.png)\n\n\
         Every finished local run with diagnostics: test error minus the mean test error of bp of the same data, network and \
         recipe (points), against its last epoch's boundary gradient cosine averaged over boundaries; coloured by {} \
         ([SVG](gap_to_bp_vs_grad_cosine.svg)). {} runs{}.\n",
        if by_setting { "setting" } else { "rule" },
        xy.len(),
        correlation(&xy).map_or(String::new(), |r| format!(
            ", Pearson r = {}",
            format!("{r:.2}").replace('-', "−")
        ))
    );
    doc.plot_sources.push(
        "`gap_to_bp_vs_grad_cosine`: the runs listed under `gap_to_bp` in report.json".to_string(),
    );
    Ok(())
}

fn stat_json(xs: &[f64]) -> Value {
    match mean_std(xs) {
        Some((mean, std)) => json!({"mean": mean, "std": std, "n": xs.len()}),
        None => Value::Null,
    }
}

/// A setting in `report.json`.
fn setting_json(s: &Setting, conv: Option<&Convergence>) -> Value {
    let runs: Vec<Value> = s
        .runs
        .iter()
        .map(|r| {
            json!({
                "dir": r.dir, "seed": r.seed, "state": r.state.to_string(),
                "test_error": r.test_error(), "grad_cosine": r.final_grad_cosine(),
            })
        })
        .collect();
    json!({
        "label": s.label,
        "rule": s.rule,
        "modules": s.k,
        "fields": s.fields,
        "runs": runs,
        "finished": s.finished().len(),
        "test_error": stat_json(&s.values(Run::test_error)),
        "grad_cosine": stat_json(&s.values(Run::final_grad_cosine)),
        "peak_mib": s.mean(Run::peak_mib),
        "images_per_second": s.mean(Run::images_per_second),
        "convergence": conv.map(|c| json!({
            "epochs": c.epochs, "from": c.from, "moved": c.moved,
            "converged": c.converged, "seeds": c.seeds,
        })),
    })
}

/// A paired comparison in `report.json`.
fn comparison_json(study: &Study, c: &Comparison) -> Value {
    let (s, d) = (study.setting(c.setting), study.setting(c.baseline));
    let iv = c.interval.as_ref();
    let side = iv.and_then(Interval::excludes_zero);
    let pairs: Vec<Value> = c
        .pairs
        .iter()
        .map(|p| {
            json!({
                "seed": p.seed, "run": p.run.dir, "baseline_run": p.baseline.dir,
                "test_error": p.run.test_error(), "baseline_test_error": p.baseline.test_error(),
                "diff": p.diff,
            })
        })
        .collect();
    let unpaired: Vec<Value> = c
        .unpaired
        .iter()
        .map(|(dir, why)| json!({"run": dir, "reason": why}))
        .collect();
    json!({
        "setting": s.label,
        "setting_modules": s.k,
        "baseline": d.label,
        "modules": d.k,
        "pairs": pairs,
        "n": c.pairs.len(),
        "mean": iv.map(|i| i.mean),
        "std": iv.and_then(|i| i.std),
        "t": iv.and_then(|i| i.t),
        "ci95": iv.and_then(|i| i.ci).map(|(lo, hi)| vec![lo, hi]),
        "excludes_zero": side.is_some(),
        "direction": side.map(|worse| if worse { "worse" } else { "better" }),
        "unpaired": unpaired,
    })
}

/// `report.json`: the settings, paired comparisons and gaps behind the Markdown, for tracing
/// numbers into RESULTS.md.
pub(super) fn write_json(doc: &Doc, study: &Study) -> Result<PathBuf> {
    let settings: Vec<Value> = study
        .settings
        .list
        .iter()
        .zip(&study.convergence)
        .map(|(s, conv)| setting_json(s, conv.as_ref()))
        .collect();
    let paired: Vec<Value> = study
        .comparisons
        .iter()
        .map(|c| comparison_json(study, c))
        .collect();
    let alone: Vec<Value> = study
        .alone
        .iter()
        .map(|(i, why)| {
            let s = study.setting(*i);
            json!({"setting": s.label, "modules": s.k, "reason": why,
                   "runs": s.runs.iter().map(|r| r.dir.clone()).collect::<Vec<_>>()})
        })
        .collect();
    let gaps: Vec<Value> = study
        .gaps
        .iter()
        .map(|g| {
            let s = study.setting(g.setting);
            json!({"run": g.run.dir, "setting": s.label, "modules": s.k, "seed": g.run.seed,
                   "gap": g.gap, "grad_cosine": g.grad_cosine})
        })
        .collect();
    let value = json!({
        "schema": 1,
        "source": doc.runs.root.display().to_string(),
        "title": doc.runs.title,
        "varying": study.settings.varying,
        "converged_below_points": CONVERGED_POINTS,
        "settings": settings,
        "paired": paired,
        "unpaired_settings": alone,
        "gap_to_bp": gaps,
    });
    let path = doc.out.join("report.json");
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
