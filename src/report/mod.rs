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
//! needed). `load` reads the folder, `settings` groups runs into settings (configuration without
//! the seed) and computes the study's statistics, `tables` and `study` write the sections and
//! `report.json`, `plots` draws.
mod load;
mod plots;
mod settings;
mod study;
mod tables;

pub use load::{Run, RunState, Runs, collect};
pub use settings::t_quantile;

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tables::{Doc, Grid};

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

/// The files a report wrote and what it found.
#[derive(Debug, Clone)]
pub struct Written {
    /// `report.md`.
    pub report: PathBuf,
    /// `report.json`: the aggregated settings and paired comparisons.
    pub json: PathBuf,
    /// The plots (PNG and SVG).
    pub plots: Vec<PathBuf>,
    /// Runs finished / all runs.
    pub finished: usize,
    /// Every run.
    pub total: usize,
    /// Runs not used, with their state.
    pub not_used: Vec<(String, String)>,
}

/// Writes `report.md`, `report.json` and the plots for the sweep folder `root` into `out`.
pub fn write(root: &Path, out: &Path) -> Result<Written> {
    let runs = collect(root)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let settings = settings::settings(&runs);
    let grid = Grid::new(&settings);
    let study = study::Study::new(&settings);
    let mut doc = Doc {
        runs: &runs,
        out,
        md: String::new(),
        plots: Vec::new(),
        plot_sources: Vec::new(),
    };
    tables::header(&mut doc);
    tables::test_error(&mut doc, &grid)?;
    study::settings_table(&mut doc, &grid, &study);
    study::paired(&mut doc, &study);
    study::lambda_plots(&mut doc, &study)?;
    study::gap_scatter(&mut doc, &grid, &study)?;
    tables::memory(&mut doc, &grid)?;
    tables::discord(&mut doc, &grid)?;
    tables::head_accuracy(&mut doc, &grid)?;
    tables::not_used(&mut doc, &grid);
    tables::sources(&mut doc, &grid);
    let json = study::write_json(&doc, &study)?;

    let report = out.join("report.md");
    std::fs::write(&report, &doc.md).map_err(|e| Error::io(&report, e))?;
    let not_used = runs
        .runs
        .iter()
        .filter(|r| r.finished().is_none())
        .map(|r| (r.dir.clone(), r.state.to_string()))
        .collect();
    Ok(Written {
        report,
        json,
        plots: doc.plots,
        finished: runs.runs.iter().filter(|r| r.finished().is_some()).count(),
        total: runs.runs.len(),
        not_used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tables::fmt_stat;

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
        assert_eq!(load::parse_cell_name(&name), Some(("sgr".into(), 16, 2)));
        assert_eq!(load::parse_cell_name("report"), None);
    }
}
