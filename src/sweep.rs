//! `sgr sweep`: runs every cell of a [`preset`](crate::preset) as its own child `sgr train`
//! process, into `<out>/<cell name>/`, up to `--jobs` cells at once.
//!
//! A sweep can be stopped (or killed, children and all) and started again at any time: a cell
//! whose `summary.json` exists is skipped, a cell with a `config.json` but no summary is
//! continued with `sgr train --resume` (from its last checkpoint). A cell folder that holds a run
//! of a *different* configuration (the preset was edited, or `--out` is another sweep's) stops
//! the sweep before anything is written, rather than mixing two configurations in one folder. A
//! cell that fails while training does not stop the sweep; the outcome lists it.
//! `<out>/sweep.json` records the preset and the state of every cell; only this process writes
//! it, always whole (atomic rename), so it is consistent however many cells run at once. Each
//! cell's child output is also kept in `<cell>/train.log`. On Linux the children die with the
//! sweep, however it ends.
//!
//! With `--jobs N`, a cell whose preset does not set `threads` gets `max(1, cores / N)` libtorch
//! threads, so N cells share the machine instead of each spinning on every core.
use crate::config::{DeviceKind, TrainConfig};
use crate::preset::{self, Cell, Preset};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    /// The cell's setting: its name without `-k<K>-s<seed>` (the rule, for the cells of
    /// `rules`), the same for every K and seed of one rule or variant combination. Absent in
    /// files written before variants existed; the rule is the setting there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setting: Option<String>,
    /// The `[[variants]]` entry the cell comes from (its `name`, else its rule); absent for
    /// the cells of `rules`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The variant's axis values of this cell (option name to value).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub axes: serde_json::Map<String, serde_json::Value>,
    /// State.
    pub status: CellStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall-clock seconds of the child process (this sweep only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// When this sweep started the child process (UTC, `2025-01-31T12:00:00.000Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// When the child process ended (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
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
    /// Cells run at once (`--jobs`); absent in files written before `--jobs` existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
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
    die_with_this_process(&mut cmd);
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

/// Makes the child die when this process does (Linux), so that a sweep killed by any signal
/// leaves no orphan training on, which a rerun would then race in the same folder. The kernel
/// ties this to the *thread* that starts the child; each child is started by the thread that
/// then waits for it, so the tie holds for the child's whole life.
#[cfg(target_os = "linux")]
fn die_with_this_process(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then there is no one to train for.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_this_process(_cmd: &mut Command) {}

fn write_record(path: &Path, record: &SweepRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).expect("sweep record serialises");
    crate::checkpoint::write_atomic(path, &bytes)
}

/// UTC time as `2025-01-31T12:00:00.000Z` (with `millis`) or `2025-01-31 12:00:00Z`: sortable
/// as text, and unambiguous in logs of sweeps that run for days across machines.
pub fn utc(t: SystemTime, millis: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian; eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rest / 3600, (rest % 3600) / 60, rest % 60);
    if millis {
        format!(
            "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
            d.subsec_millis()
        )
    } else {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}Z")
    }
}

/// Libtorch threads per cell with `jobs` cells at once on `cores` cores.
pub fn threads_per_cell(cores: usize, jobs: usize) -> usize {
    (cores / jobs.max(1)).max(1)
}

/// Checks `--jobs` against the preset's number of cells (all of them, finished ones included,
/// so that the same command stays valid as the sweep progresses).
pub fn check_jobs(jobs: usize, cells: usize) -> Result<()> {
    if jobs == 0 || jobs > cells {
        return Err(Error::Config(format!(
            "--jobs {jobs}: must be from 1 to {cells}, the number of cells of the preset (finished ones included)"
        )));
    }
    Ok(())
}

/// What a running cell's thread reports when its child process ends.
struct Finished {
    index: usize,
    result: std::result::Result<(), String>,
    seconds: f64,
    at: SystemTime,
}

/// Runs (or with `dry_run`, only checks and lists) the sweep of the preset file `preset_path`
/// into `out`, `jobs` cells at once, on `device` when given instead of the preset's (the device
/// is a run-only field, so one sweep folder can be continued on another device).
pub fn run(
    preset_path: &Path,
    out: &Path,
    dry_run: bool,
    jobs: usize,
    device: Option<DeviceKind>,
) -> Result<Outcome> {
    let (preset, mut cells) = preset::load(preset_path)?;
    if let Some(device) = device {
        for c in cells.iter_mut() {
            c.config.device = device;
        }
    }
    let total = cells.len();
    check_jobs(jobs, total)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads_per_cell(cores, jobs);
    for c in cells.iter_mut().filter(|c| !c.threads_set) {
        c.config.threads = threads;
    }
    let plans: Vec<Plan> = cells.iter().map(|c| plan(c, &out.join(&c.name))).collect();
    if dry_run {
        println!(
            "{}: {} on {}, {} cells -> {}",
            preset_path.display(),
            preset.model,
            preset.data,
            total,
            out.display()
        );
        for line in grid_summary(&preset, &cells) {
            println!("  {line}");
        }
        let fixed = cells.iter().filter(|c| c.threads_set).count();
        println!(
            "  --jobs {jobs}: {jobs} cell(s) at once, {threads} thread(s) each ({cores} cores){}",
            match fixed {
                0 => String::new(),
                n if n == total => " unless the preset sets threads (it does for all)".into(),
                n => format!(" unless the preset sets threads (it does for {n})"),
            }
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

    // Check each device and data set once, not once per failing cell.
    let to_run: Vec<&Cell> = cells
        .iter()
        .zip(&plans)
        .filter(|(_, p)| matches!(p, Plan::Run | Plan::Resume { .. }))
        .map(|(c, _)| c)
        .collect();
    let mut checked = Vec::new();
    for cfg in to_run.iter().map(|c| &c.config) {
        let key = (cfg.device, cfg.data, cfg.data_dir.clone(), cfg.image_size);
        if !checked.contains(&key) {
            cfg.tch_device()?;
            crate::data::load_with(cfg.data, &cfg.data_dir, &crate::train::load_options(cfg))?;
            checked.push(key);
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    let record_path = out.join("sweep.json");
    let mut record = SweepRecord {
        preset_file: preset_path.to_path_buf(),
        preset: preset.clone(),
        jobs: Some(jobs),
        cells: cells
            .iter()
            .zip(&plans)
            .map(|(c, p)| CellRecord {
                name: c.name.clone(),
                rule: c.rule.to_string(),
                modules: c.modules,
                seed: c.seed,
                setting: Some(c.setting().to_string()),
                variant: c.variant.clone(),
                axes: c.axes.iter().cloned().collect(),
                status: if *p == Plan::Skip {
                    CellStatus::Skipped
                } else {
                    CellStatus::Pending
                },
                error: None,
                seconds: None,
                started: None,
                finished: None,
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
            "sweep {}: {} on {}, {total} cells -> {}, {jobs} at once",
            preset_path.display(),
            preset.model,
            preset.data,
            out.display()
        ),
    );
    // Start and finish lines carry the time, the cell's position in the preset and its name.
    let tag = |i: usize| {
        format!(
            "{} [{}/{total}] {}",
            utc(SystemTime::now(), false),
            i + 1,
            cells[i].name
        )
    };
    let mut outcome = Outcome::default();
    let mut queue = std::collections::VecDeque::new();
    for (i, p) in plans.iter().enumerate() {
        match p {
            Plan::Skip => {
                say(
                    &bar,
                    &format!("{}: skipped (finished: summary.json exists)", tag(i)),
                );
                outcome.skipped.push(cells[i].name.clone());
                bar.inc(1);
            }
            Plan::Conflict(why) => unreachable!("conflicts stop the sweep first: {why}"),
            Plan::Run | Plan::Resume { .. } => queue.push_back(i),
        }
    }

    let (tx, rx) = std::sync::mpsc::channel::<Finished>();
    std::thread::scope(|scope| -> Result<()> {
        let mut running: Vec<usize> = Vec::new();
        loop {
            while running.len() < jobs {
                let Some(i) = queue.pop_front() else { break };
                let (cell, p) = (&cells[i], &plans[i]);
                running.push(i);
                let now = SystemTime::now();
                record.cells[i].status = CellStatus::Running;
                record.cells[i].started = Some(utc(now, true));
                write_record(&record_path, &record)?;
                say(
                    &bar,
                    &format!("{}: {} ({} running)", tag(i), describe(p), running.len()),
                );
                let (tx, exe, bar, dir) = (tx.clone(), &exe, &bar, out.join(&cell.name));
                let resume = matches!(p, Plan::Resume { .. });
                scope.spawn(move || {
                    let start = Instant::now();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_child(exe, cell, &dir, resume, bar)
                    }))
                    .unwrap_or_else(|_| Err("internal error while running the cell".into()));
                    // The receiver outlives every sender in this scope.
                    let _ = tx.send(Finished {
                        index: i,
                        result,
                        seconds: start.elapsed().as_secs_f64(),
                        at: SystemTime::now(),
                    });
                });
            }
            let names: Vec<&str> = running.iter().map(|&i| cells[i].name.as_str()).collect();
            bar.set_message(names.join(" "));
            if running.is_empty() {
                return Ok(());
            }
            let f = rx.recv().expect("a running cell reports back");
            running.retain(|&i| i != f.index);
            let (i, c) = (f.index, &mut record.cells[f.index]);
            c.seconds = Some(f.seconds);
            c.finished = Some(utc(f.at, true));
            let took = duration(f.seconds);
            match f.result {
                Ok(()) => {
                    let acc = std::fs::read(out.join(&cells[i].name).join("summary.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| v.get("test_accuracy").and_then(|a| a.as_f64()));
                    let err = acc
                        .map(|a| format!(": test error {:.2}%", 100.0 * (1.0 - a)))
                        .unwrap_or_default();
                    c.status = CellStatus::Done;
                    say(&bar, &format!("{}: done in {took}{err}", tag(i)));
                    outcome.done.push(cells[i].name.clone());
                }
                Err(why) => {
                    c.status = CellStatus::Failed;
                    c.error = Some(why.clone());
                    say(&bar, &format!("{}: FAILED after {took}: {why}", tag(i)));
                    outcome.failed.push((cells[i].name.clone(), why));
                }
            }
            write_record(&record_path, &record)?;
            bar.inc(1);
        }
    })?;
    bar.finish_and_clear();
    Ok(outcome)
}

/// What the preset expands to, one line for `rules` and one per variant (for `--dry-run`).
fn grid_summary(preset: &Preset, cells: &[Cell]) -> Vec<String> {
    let list = |v: Vec<String>| v.join(", ");
    let mut lines = Vec::new();
    let from_rules = cells.iter().filter(|c| c.variant.is_none()).count();
    if from_rules > 0 {
        lines.push(format!(
            "rules {} x K {} x seeds {}: {from_rules} cells",
            list(preset.rules.iter().map(|r| r.to_string()).collect()),
            list(preset.modules.iter().map(|k| k.to_string()).collect()),
            list(preset.seeds.iter().map(|s| s.to_string()).collect()),
        ));
    }
    for (i, v) in preset.variants.iter().enumerate() {
        let label = v.label(i);
        let mine: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.variant_index == Some(i))
            .collect();
        let mut axes: Vec<(String, Vec<String>)> = Vec::new();
        for c in &mine {
            for (k, x) in &c.axes {
                let x = preset::show(x);
                match axes.iter_mut().find(|(a, _)| a == k) {
                    Some((_, xs)) if !xs.contains(&x) => xs.push(x),
                    Some(_) => {}
                    None => axes.push((k.clone(), vec![x])),
                }
            }
        }
        let mut ks: Vec<usize> = mine.iter().map(|c| c.modules).collect();
        let mut seeds: Vec<u64> = mine.iter().map(|c| c.seed).collect();
        ks.sort();
        ks.dedup();
        seeds.sort();
        seeds.dedup();
        let parts: Vec<String> = axes
            .iter()
            .map(|(k, xs)| format!("{k} {}", xs.join(", ")))
            .chain([
                format!("K {}", list(ks.iter().map(|k| k.to_string()).collect())),
                format!(
                    "seeds {}",
                    list(seeds.iter().map(|s| s.to_string()).collect())
                ),
            ])
            .collect();
        lines.push(format!(
            "variant {label} ({}): {}: {} cells",
            mine.first().map_or("?".into(), |c| c.rule.to_string()),
            parts.join(" x "),
            mine.len()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_stamps_match_known_dates() {
        let at = |secs: u64, ms: u64| UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms);
        assert_eq!(utc(at(0, 0), true), "1970-01-01T00:00:00.000Z");
        // A leap day, the last second of a century year that is a leap year, and after it.
        assert_eq!(utc(at(951_782_400, 7), true), "2000-02-29T00:00:00.007Z");
        assert_eq!(utc(at(978_307_199, 0), false), "2000-12-31 23:59:59Z");
        assert_eq!(utc(at(978_307_200, 0), false), "2001-01-01 00:00:00Z");
        assert_eq!(
            utc(at(1_700_000_000, 999), true),
            "2023-11-14T22:13:20.999Z"
        );
        assert_eq!(utc(at(4_107_542_400, 0), false), "2100-03-01 00:00:00Z");
    }

    #[test]
    fn threads_split_the_cores_among_jobs() {
        assert_eq!(threads_per_cell(16, 1), 16);
        assert_eq!(threads_per_cell(16, 3), 5);
        assert_eq!(threads_per_cell(2, 4), 1);
        assert!(
            check_jobs(0, 3)
                .unwrap_err()
                .to_string()
                .contains("--jobs 0")
        );
        assert!(check_jobs(4, 3).is_err());
        assert!(check_jobs(3, 3).is_ok() && check_jobs(1, 1).is_ok());
    }
}
