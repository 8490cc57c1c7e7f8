//! `sgr sweep`: runs every cell of a [`preset`](crate::preset) as its own child `sgr train`
//! process, into `<out>/<rule>-k<K>-s<seed>/`.
//!
//! A sweep can be stopped and started again at any time: a cell whose `summary.json` exists is
//! skipped, a cell with a `config.json` but no summary is continued with `sgr train --resume`
//! (from its last checkpoint). A cell folder that holds a run of a *different* configuration
//! (the preset was edited, or `--out` is another sweep's) stops the sweep before anything is
//! written, rather than mixing two configurations in one folder. A cell that fails while
//! training does not stop the sweep; the outcome lists it. `<out>/sweep.json` records the preset and the
//! state of every cell; each cell's child output is also kept in `<cell>/train.log`.
use crate::config::TrainConfig;
use crate::preset::{self, Cell, Preset};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Configuration fields that do not change a run's result (or only its diagnostics); a cell
/// whose saved configuration differs only in these is still the same cell.
const RUN_ONLY: &[&str] = &["threads", "data_dir", "diag_every", "on_nan", "device"];

/// What the sweep will do with a cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Start the run.
    Run,
    /// Continue it from its checkpoint (`epochs_done` complete epochs in `metrics.jsonl`).
    Resume {
        /// Epochs recorded so far.
        epochs_done: usize,
    },
    /// Finished already (`summary.json` exists).
    Skip,
    /// The folder holds something that is not this cell's run; the reason says what.
    Conflict(String),
}

/// State of a cell in `sweep.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CellStatus {
    /// Not run yet in this sweep.
    Pending,
    /// Being trained now.
    Running,
    /// Trained to the end in this sweep.
    Done,
    /// Found finished, not run again.
    Skipped,
    /// Failed (see `error`).
    Failed,
}

/// One cell in `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellRecord {
    /// Folder name inside the sweep folder.
    pub name: String,
    /// Rule name.
    pub rule: String,
    /// K.
    pub modules: usize,
    /// Seed.
    pub seed: u64,
    /// State.
    pub status: CellStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall-clock seconds of the child process (this sweep only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The cell's configuration.
    pub config: TrainConfig,
}

/// `sweep.json`: the resolved preset and every cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    /// The preset file the sweep was started from.
    pub preset_file: PathBuf,
    /// The preset as parsed.
    pub preset: Preset,
    /// Every cell, in run order.
    pub cells: Vec<CellRecord>,
}

/// What a sweep did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Cells trained to the end now.
    pub done: Vec<String>,
    /// Cells found finished.
    pub skipped: Vec<String>,
    /// Cells that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

fn to_map(cfg: &TrainConfig) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(cfg).expect("config serialises") {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a struct serialises to an object"),
    }
}

/// The fields (other than [`RUN_ONLY`] ones) in which `saved` differs from `wanted`.
fn differences(saved: &TrainConfig, wanted: &TrainConfig) -> Vec<String> {
    let (a, b) = (to_map(saved), to_map(wanted));
    b.iter()
        .filter(|(k, v)| !RUN_ONLY.contains(&k.as_str()) && a.get(*k) != Some(*v))
        .map(|(k, v)| {
            let old = a.get(k).map(|v| v.to_string()).unwrap_or("nothing".into());
            format!("{k} is {old}, the preset says {v}")
        })
        .collect()
}

fn epochs_recorded(dir: &Path) -> usize {
    crate::metrics::read_lines::<serde_json::Value>(&dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.get("epoch").and_then(|e| e.as_u64()))
        .max()
        .unwrap_or(0) as usize
}

/// Decides what to do with `cell` given the contents of its folder `dir`.
pub fn plan(cell: &Cell, dir: &Path) -> Plan {
    let config_json = dir.join("config.json");
    let has_summary = dir.join("summary.json").is_file();
    let saved = match std::fs::read_to_string(&config_json) {
        Ok(text) => match serde_json::from_str::<TrainConfig>(&text) {
            Ok(c) => Some(c),
            Err(e) => {
                return Plan::Conflict(format!(
                    "{} is not a readable run configuration ({e}); remove the folder to rerun the cell",
                    config_json.display()
                ));
            }
        },
        Err(_) => None,
    };
    match saved {
        Some(saved) => {
            let diff = differences(&saved, &cell.config);
            if !diff.is_empty() {
                return Plan::Conflict(format!(
                    "{} holds a run of another configuration ({}); remove the folder or sweep into another --out",
                    dir.display(),
                    diff.join("; ")
                ));
            }
            let summary_ok = has_summary
                && std::fs::read(dir.join("summary.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some();
            if summary_ok {
                Plan::Skip
            } else {
                // A torn summary.json is rewritten by resuming (the checkpoint is complete).
                Plan::Resume {
                    epochs_done: epochs_recorded(dir),
                }
            }
        }
        None if has_summary => Plan::Conflict(format!(
            "{} has a summary.json but no config.json; remove the folder to rerun the cell",
            dir.display()
        )),
        None => {
            let leftovers: Vec<&str> = ["checkpoint.safetensors", "metrics.jsonl"]
                .into_iter()
                .filter(|f| dir.join(f).exists())
                .collect();
            if leftovers.is_empty() {
                Plan::Run
            } else {
                Plan::Conflict(format!(
                    "{} holds {} but no config.json; remove the folder to rerun the cell",
                    dir.display(),
                    leftovers.join(" and ")
                ))
            }
        }
    }
}

fn describe(p: &Plan) -> String {
    match p {
        Plan::Run => "run".into(),
        Plan::Resume { epochs_done } => format!("resume (after epoch {epochs_done})"),
        Plan::Skip => "skip (finished: summary.json exists)".into(),
        Plan::Conflict(why) => format!("conflict: {why}"),
    }
}

/// `1h02m`, `5m12s`, `42s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Prints above the progress bar (or plainly when there is no terminal to draw it on).
fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Command-line flag value of a config field (its serde name, e.g. `skip-batch`).
fn flag_value<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v).expect("value serialises") {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Runs `sgr train` for `cell` in `dir` as a child process, passing its output through (each
/// line prefixed with the cell name) and into `dir/train.log`. Returns the child's last error
/// line on failure.
fn run_child(
    exe: &Path,
    cell: &Cell,
    dir: &Path,
    resume: bool,
    bar: &ProgressBar,
) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg("--out").arg(dir);
    if resume {
        // The saved config.json is the run's; only the run-only fields follow the preset.
        let c = &cell.config;
        cmd.arg("--resume")
            .args(["--threads", &c.threads.to_string()])
            .arg("--data-dir")
            .arg(&c.data_dir)
            .args(["--diag-every", &c.diag_every.to_string()])
            .args(["--on-nan", &flag_value(&c.on_nan)])
            .args(["--device", &flag_value(&c.device)]);
    } else {
        let toml_path = dir.join("cell.toml");
        let text = toml::to_string(&cell.config).map_err(|e| format!("cell.toml: {e}"))?;
        let header = format!(
            "# Written by `sgr sweep` for cell {}; `sgr train --config cell.toml` reruns it.\n",
            cell.name
        );
        crate::checkpoint::write_atomic(&toml_path, format!("{header}{text}").as_bytes())
            .map_err(|e| e.to_string())?;
        cmd.arg("--config").arg(&toml_path);
    }
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(writer2).stderr(writer);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    // Drop our copies of the pipe's write end, so reading ends when the child exits.
    drop(cmd);
    let log_path = dir.join("train.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .ok();
    let mut last_error = None;
    let mut last_line = None;
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        buf.clear();
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if line.trim().is_empty() {
            continue;
        }
        say(bar, &format!("  [{}] {line}", cell.name));
        if line.starts_with("error:") {
            last_error = Some(line.trim_start_matches("error:").trim().to_string());
        }
        last_line = Some(line);
    }
    let status = child
        .wait()
        .map_err(|e| format!("lost the child process: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(last_error.or(last_line).unwrap_or_else(|| {
            format!(
                "sgr train exited with {status} (see {})",
                log_path.display()
            )
        }))
    }
}

fn write_record(path: &Path, record: &SweepRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).expect("sweep record serialises");
    crate::checkpoint::write_atomic(path, &bytes)
}

/// Runs (or with `dry_run`, only checks and lists) the sweep of the preset file `preset_path`
/// into `out`.
pub fn run(preset_path: &Path, out: &Path, dry_run: bool) -> Result<Outcome> {
    let (preset, cells) = preset::load(preset_path)?;
    let plans: Vec<Plan> = cells.iter().map(|c| plan(c, &out.join(&c.name))).collect();
    let total = cells.len();
    if dry_run {
        println!(
            "{}: {} on {}, {} cells -> {}",
            preset_path.display(),
            preset.model,
            preset.data,
            total,
            out.display()
        );
        let width = cells.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for (c, p) in cells.iter().zip(&plans) {
            println!("  {:width$}  {}", c.name, describe(p));
        }
    }
    // A folder holding another run means the preset changed or --out is wrong: stop before
    // anything is written, rather than mix two configurations in one sweep folder.
    let conflicts: Vec<String> = cells
        .iter()
        .zip(&plans)
        .filter_map(|(c, p)| match p {
            Plan::Conflict(why) => Some(format!("{}: {why}", c.name)),
            _ => None,
        })
        .collect();
    if !conflicts.is_empty() {
        return Err(Error::Config(format!(
            "{} of {total} cells conflict with what is already in {}: {}",
            conflicts.len(),
            out.display(),
            conflicts.join("; ")
        )));
    }
    if dry_run {
        return Ok(Outcome::default());
    }

    // Check the device and the data once, not once per failing cell.
    if plans
        .iter()
        .any(|p| matches!(p, Plan::Run | Plan::Resume { .. }))
    {
        let cfg = &cells[0].config;
        cfg.tch_device()?;
        crate::data::load(cfg.data, &cfg.data_dir)?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    let record_path = out.join("sweep.json");
    let mut record = SweepRecord {
        preset_file: preset_path.to_path_buf(),
        preset: preset.clone(),
        cells: cells
            .iter()
            .zip(&plans)
            .map(|(c, p)| CellRecord {
                name: c.name.clone(),
                rule: c.rule.to_string(),
                modules: c.modules,
                seed: c.seed,
                status: if *p == Plan::Skip {
                    CellStatus::Skipped
                } else {
                    CellStatus::Pending
                },
                error: None,
                seconds: None,
                config: c.config.clone(),
            })
            .collect(),
    };
    write_record(&record_path, &record)?;

    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("sweep {bar:30} {pos}/{len} cells {msg} [{elapsed}]")
            .expect("valid template"),
    );
    if !bar.is_hidden() {
        bar.enable_steady_tick(std::time::Duration::from_secs(1));
    }
    say(
        &bar,
        &format!(
            "sweep {}: {} on {}, {total} cells -> {}",
            preset_path.display(),
            preset.model,
            preset.data,
            out.display()
        ),
    );
    let mut outcome = Outcome::default();
    for (i, (cell, p)) in cells.iter().zip(&plans).enumerate() {
        let dir = out.join(&cell.name);
        let tag = format!("[{}/{total}] {}", i + 1, cell.name);
        bar.set_message(cell.name.clone());
        let result = match p {
            Plan::Skip => {
                say(
                    &bar,
                    &format!("{tag}: skipped (finished: summary.json exists)"),
                );
                outcome.skipped.push(cell.name.clone());
                bar.inc(1);
                continue;
            }
            Plan::Conflict(why) => unreachable!("conflicts stop the sweep first: {why}"),
            Plan::Run | Plan::Resume { .. } => {
                let resume = matches!(p, Plan::Resume { .. });
                say(&bar, &format!("{tag}: {}", describe(p)));
                record.cells[i].status = CellStatus::Running;
                write_record(&record_path, &record)?;
                let start = Instant::now();
                let r = run_child(&exe, cell, &dir, resume, &bar);
                record.cells[i].seconds = Some(start.elapsed().as_secs_f64());
                r
            }
        };
        match result {
            Ok(()) => {
                let secs = record.cells[i].seconds.unwrap_or(0.0);
                let acc = std::fs::read(dir.join("summary.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.get("test_accuracy").and_then(|a| a.as_f64()));
                let err = acc
                    .map(|a| format!(": test error {:.2}%", 100.0 * (1.0 - a)))
                    .unwrap_or_default();
                say(&bar, &format!("{tag}: done in {}{err}", duration(secs)));
                record.cells[i].status = CellStatus::Done;
                outcome.done.push(cell.name.clone());
            }
            Err(why) => {
                say(&bar, &format!("{tag}: FAILED: {why}"));
                record.cells[i].status = CellStatus::Failed;
                record.cells[i].error = Some(why.clone());
                outcome.failed.push((cell.name.clone(), why));
            }
        }
        write_record(&record_path, &record)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(outcome)
}
