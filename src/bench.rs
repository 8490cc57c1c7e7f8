//! `sgr bench`: time and memory of training steps, each setting in its own process.
//!
//! Peak RSS is a per-process high-water mark, so every (rule, K) cell runs as a child
//! `sgr bench worker` process on synthetic data of a fixed shape; the parent collects one JSON
//! line from each and prints a table (or the rows as JSON with `--json`). Workers build the
//! same `SplitNet`, `Sgd` and `Rule` as `sgr train`, so the step measured is the real one.
use crate::config::DeviceKind;
use crate::data::Batch;
use crate::memory::{Meter, gpu_used_bytes};
use crate::model::{Arch, FeatureShape, HeadKind, ModelSpec, SplitNet, SplitStrategy};
use crate::optim::{Sgd, SgdConfig};
use crate::rules::{self, RuleKind, SgrConfig, SgrGrad};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// glibc mmap threshold (bytes) used for live-memory measurements.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// One benchmark cell, as a worker measures it.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct CellArgs {
    /// Network.
    #[arg(long, default_value = "resnet32")]
    pub model: Arch,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Input channels of the synthetic data.
    #[arg(long, default_value_t = 3)]
    pub channels: i64,
    /// Input height and width of the synthetic data.
    #[arg(long, default_value_t = 32)]
    pub size: i64,
    /// Classes of the synthetic data.
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    /// Auxiliary head type.
    #[arg(long, default_value = "conv")]
    pub aux_head: HeadKind,
    /// Split strategy.
    #[arg(long, default_value = "table")]
    pub split: SplitStrategy,
    /// Timed steps per cell (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps per cell.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// libtorch CPU threads (0 = default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// SGR λ.
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f64,
    /// SGR: apply the penalty every N steps.
    #[arg(long, default_value_t = 1)]
    pub sgr_every: usize,
    /// SGR penalty gradient: exact (double backward), jvp (exact, tangents) or fd.
    #[arg(long, default_value = "exact")]
    pub sgr_grad: SgrGrad,
    /// Compute device. On `cuda`, memory is the GPU's used memory (`nvidia-smi`) at the end
    /// minus after construction, i.e. the caching allocator's peak reservation.
    #[arg(long, default_value = "cpu")]
    #[serde(default)]
    pub device: DeviceKind,
    /// Run workers with glibc's mmap threshold fixed at 1 MiB, so that every tensor of 1 MiB or
    /// more is returned to the OS when freed and the high-water mark tracks live tensors rather
    /// than allocator slack (set by `sgr bench memory`; it slows steps, so `bench step` leaves
    /// the allocator alone).
    #[arg(skip)]
    #[serde(default)]
    pub live_memory: bool,
}

/// One measured row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Rule.
    pub rule: RuleKind,
    /// K.
    pub modules: usize,
    /// Batch size.
    pub batch_size: i64,
    /// Median milliseconds per training step (forward, backward, optimizer).
    pub ms_per_step: f64,
    /// Fastest step, ms.
    pub ms_min: f64,
    /// Mean ms/step: the amortised cost when steps differ (e.g. `--sgr-every N`).
    #[serde(default)]
    pub ms_mean: f64,
    /// Peak RSS above the post-construction baseline, bytes.
    pub peak_memory_bytes: u64,
    /// Baseline RSS, bytes.
    pub baseline_rss_bytes: u64,
    /// Analytic activation bytes of the largest module.
    pub largest_module_activation_bytes: i64,
    /// `peak_memory_bytes` relative to the `bp` K=1 row of the same run (filled by the parent).
    #[serde(default)]
    pub memory_ratio_to_bp: f64,
    /// `ms_per_step` relative to the `bp` K=1 row (filled by the parent).
    #[serde(default)]
    pub time_ratio_to_bp: f64,
}

/// Measures one cell in this process.
pub fn measure(cell: &CellArgs, rule: RuleKind, modules: usize) -> Result<Row> {
    if cell.threads > 0 {
        tch::set_num_threads(cell.threads as i32);
    }
    let sgr = SgrConfig {
        lambda: cell.lambda,
        every: cell.sgr_every,
        grad: cell.sgr_grad,
        ..Default::default()
    };
    let spec = ModelSpec {
        arch: cell.model.clone(),
        modules,
        split: cell.split,
        head: cell.aux_head,
        input: FeatureShape::map(cell.channels, cell.size, cell.size),
        classes: cell.classes,
        penalty_cost: rules::penalty_cost(rule, &sgr),
    };
    let device = cell.device.tch_device()?;
    let net = crate::model::with_seed(0, || SplitNet::new(&spec, device))?;
    let mut opt = Sgd::new(&net.vs, SgdConfig::default());
    let rule_impl = rules::build(rule, &sgr);
    let batch = Batch {
        images: Tensor::randn(
            [cell.batch_size, cell.channels, cell.size, cell.size],
            (Kind::Float, device),
        ),
        labels: Tensor::randint(cell.classes, [cell.batch_size], (Kind::Int64, device)),
    };
    let sync = || {
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    sync();
    let gpu_baseline = device.is_cuda().then(gpu_used_bytes).flatten();
    // With the normal allocator, memory freed by the warm-up stays resident and would hide the
    // peak, so the baseline is taken first. In live-memory mode freed tensors leave the RSS, so
    // the baseline is taken after warm-up and excludes libtorch's one-time caches and pools.
    let mut meter = Meter::start();
    let mut times = Vec::with_capacity(cell.steps);
    for step in 0..cell.warmup + cell.steps {
        if cell.live_memory && step == cell.warmup {
            meter = Meter::start();
        }
        let start = Instant::now();
        opt.zero_grad();
        rule_impl.step(&net, &batch, &rules::StepContext::at_step(step))?;
        opt.step(0.01);
        sync();
        if step >= cell.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms_mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let largest = (0..net.num_modules())
        .map(|k| net.module_activation_bytes(k, cell.batch_size))
        .max()
        .unwrap_or(0);
    Ok(Row {
        rule,
        modules,
        batch_size: cell.batch_size,
        ms_per_step: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        ms_min: times.first().copied().unwrap_or(f64::NAN),
        ms_mean,
        peak_memory_bytes: match gpu_baseline {
            Some(base) => gpu_used_bytes().unwrap_or(base).saturating_sub(base),
            None => meter.peak_above_baseline(),
        },
        baseline_rss_bytes: gpu_baseline.unwrap_or(meter.baseline()),
        largest_module_activation_bytes: largest,
        memory_ratio_to_bp: 0.0,
        time_ratio_to_bp: 0.0,
    })
}

/// Runs every (rule, K) cell in a child process of this binary, plus a `bp` K=1 reference row
/// first; `repeats` alternates the whole set that many times and keeps each cell's median.
pub fn run_grid(
    cell: &CellArgs,
    rules_list: &[RuleKind],
    ks: &[usize],
    repeats: usize,
) -> Result<Vec<Row>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    let mut cells: Vec<(RuleKind, usize)> = vec![(RuleKind::Bp, 1)];
    for &rule in rules_list {
        for &k in ks {
            if !cells.contains(&(rule, k)) {
                cells.push((rule, k));
            }
        }
    }
    // Validate every K before spending minutes on the first cells.
    for &(_, k) in &cells {
        crate::model::splits::check_k(&cell.model, k, cell.split)?;
    }
    let cell_json = serde_json::to_string(cell).expect("cell serialises");
    let mut samples: Vec<Vec<Row>> = vec![Vec::new(); cells.len()];
    for _ in 0..repeats.max(1) {
        for (i, &(rule, k)) in cells.iter().enumerate() {
            let row = worker_row(&exe, cell, &cell_json, rule, k)?;
            // Progress on stderr, so a run stopped by a time limit still shows what it measured.
            eprintln!(
                "  {rule} K={k}: {:.1} ms/step, peak {} MiB",
                row.ms_per_step,
                mib(row.peak_memory_bytes as f64)
            );
            samples[i].push(row);
        }
    }
    let mut rows: Vec<Row> = samples
        .into_iter()
        .map(|mut rs| {
            let peak = median(rs.iter().map(|r| r.peak_memory_bytes).collect());
            rs.sort_by(|a, b| a.ms_per_step.total_cmp(&b.ms_per_step));
            let mut row = rs[rs.len() / 2].clone();
            row.peak_memory_bytes = peak;
            row
        })
        .collect();
    let (bp_mem, bp_ms) = (rows[0].peak_memory_bytes as f64, rows[0].ms_per_step);
    for r in &mut rows {
        r.memory_ratio_to_bp = r.peak_memory_bytes as f64 / bp_mem.max(1.0);
        r.time_ratio_to_bp = r.ms_per_step / bp_ms;
    }
    Ok(rows)
}

/// The line printed above a table: what was measured, where, and how often.
pub fn header(cell: &CellArgs, repeats: usize) -> String {
    let threads = match cell.threads {
        0 => "default threads".to_string(),
        n => format!("{n} thread(s)"),
    };
    format!(
        "{} batch {} input {}x{}x{}, device {}, {threads}, median of {} steps after {} warm-up, {} alternating repeat(s)",
        cell.model,
        cell.batch_size,
        cell.channels,
        cell.size,
        cell.size,
        cell.device.name(),
        cell.steps,
        cell.warmup,
        repeats
    )
}

/// A Markdown table from a header row and data rows.
fn markdown(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for row in rows {
        s.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    s
}

fn mib(bytes: f64) -> String {
    format!("{:.0}", bytes / (1024.0 * 1024.0))
}

/// Renders rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "rule",
        "K",
        "ms/step (median)",
        "ms/step (mean)",
        "time vs bp",
        "peak MiB",
        "memory vs bp",
        "largest module activations MiB",
    ];
    markdown(
        &header,
        rows.iter().map(|r| {
            vec![
                r.rule.to_string(),
                r.modules.to_string(),
                format!("{:.0}", r.ms_per_step),
                format!("{:.0}", r.ms_mean),
                format!("{:.2}", r.time_ratio_to_bp),
                mib(r.peak_memory_bytes as f64),
                format!("{:.2}", r.memory_ratio_to_bp),
                format!(
                    "{:.1}",
                    r.largest_module_activation_bytes as f64 / (1024.0 * 1024.0)
                ),
            ]
        }),
    )
}

/// One row of `sgr bench compare`: the same cell in sgr and in the PyTorch reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareRow {
    /// Rule.
    pub rule: RuleKind,
    /// K.
    pub modules: usize,
    /// Median ms/step of sgr (median over repeats of each worker's median).
    pub sgr_ms_per_step: f64,
    /// Median ms/step of the PyTorch reference.
    pub pytorch_ms_per_step: f64,
    /// PyTorch time / sgr time (> 1: sgr is faster).
    pub speed_ratio: f64,
    /// Median peak memory above baseline of sgr, bytes.
    pub sgr_peak_memory_bytes: u64,
    /// Median peak memory above baseline of PyTorch, bytes.
    pub pytorch_peak_memory_bytes: u64,
    /// sgr memory / PyTorch memory (< 1: sgr is leaner).
    pub memory_ratio: f64,
}

#[derive(Deserialize)]
struct ReferenceRow {
    ms_per_step: f64,
    peak_memory_bytes: u64,
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn run_json(cmd: &mut std::process::Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::Config(format!("cannot start {what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Config(format!(
            "{what} failed: {}",
            err.lines().last().unwrap_or("").trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string())
}

/// Measures one cell in a child `sgr bench worker` process (with the live-memory allocator
/// setting when `cell.live_memory`).
fn worker_row(
    exe: &std::path::Path,
    cell: &CellArgs,
    cell_json: &str,
    rule: RuleKind,
    k: usize,
) -> Result<Row> {
    let k_arg = k.to_string();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "bench",
        "worker",
        "--cell",
        cell_json,
        "--rule",
        rule.name(),
        "--modules",
        &k_arg,
    ]);
    if cell.live_memory {
        cmd.env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD.to_string());
    }
    let text = run_json(&mut cmd, &format!("bench worker for rule {rule} K={k}"))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("bad worker output ({e}): {text}")))
}

/// Runs every (rule, K) cell alternately in an sgr worker and a PyTorch reference worker
/// (`python reference bench ...`), `repeats` times, with the same thread count, steps,
/// warm-up, input and memory method (high-water mark above each process's baseline).
pub fn run_compare(
    cell: &CellArgs,
    rules_list: &[RuleKind],
    ks: &[usize],
    repeats: usize,
    python: &std::path::Path,
    reference: &std::path::Path,
) -> Result<Vec<CompareRow>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    if cell.split != SplitStrategy::Table {
        return Err(Error::Config(
            "sgr bench compare: only --split table (the reference implements the split tables)"
                .into(),
        ));
    }
    if !reference.exists() {
        return Err(Error::Config(format!(
            "PyTorch reference not found: {}",
            reference.display()
        )));
    }
    // Both sides must use the same explicit thread count.
    let mut cell = cell.clone();
    if cell.threads == 0 {
        cell.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    let cell = &cell;
    let cell_json = serde_json::to_string(cell).expect("cell serialises");
    let mut rows = Vec::new();
    for &rule in rules_list {
        for &k in ks {
            crate::model::splits::check_k(&cell.model, k, cell.split)?;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let k_arg = k.to_string();
            for _ in 0..repeats.max(1) {
                let mine = worker_row(&exe, cell, &cell_json, rule, k)?;
                let text = run_json(
                    std::process::Command::new(python).arg(reference).args([
                        "bench",
                        "--model",
                        &cell.model.to_string(),
                        "--batch-size",
                        &cell.batch_size.to_string(),
                        "--modules",
                        &k_arg,
                        "--rule",
                        rule.name(),
                        "--aux-head",
                        &format!("{:?}", cell.aux_head).to_lowercase(),
                        "--steps",
                        &cell.steps.to_string(),
                        "--warmup",
                        &cell.warmup.to_string(),
                        "--threads",
                        &cell.threads.max(1).to_string(),
                        "--in-channels",
                        &cell.channels.to_string(),
                        "--size",
                        &cell.size.to_string(),
                        "--classes",
                        &cell.classes.to_string(),
                        "--lambda",
                        &cell.lambda.to_string(),
                        "--sgr-every",
                        &cell.sgr_every.to_string(),
                        "--device",
                        cell.device.name(),
                    ]),
                    "the PyTorch reference",
                )?;
                let row: ReferenceRow = serde_json::from_str(&text)
                    .map_err(|e| Error::Config(format!("bad reference output ({e}): {text}")))?;
                eprintln!(
                    "  {rule} K={k}: sgr {:.1} ms/step, {} MiB; PyTorch {:.1} ms/step, {} MiB",
                    mine.ms_per_step,
                    mib(mine.peak_memory_bytes as f64),
                    row.ms_per_step,
                    mib(row.peak_memory_bytes as f64)
                );
                ours.push(mine);
                theirs.push(row);
            }
            let sgr_ms = median(ours.iter().map(|r| r.ms_per_step).collect());
            let py_ms = median(theirs.iter().map(|r| r.ms_per_step).collect());
            let sgr_mem = median(ours.iter().map(|r| r.peak_memory_bytes).collect());
            let py_mem = median(theirs.iter().map(|r| r.peak_memory_bytes).collect());
            rows.push(CompareRow {
                rule,
                modules: k,
                sgr_ms_per_step: sgr_ms,
                pytorch_ms_per_step: py_ms,
                speed_ratio: py_ms / sgr_ms,
                sgr_peak_memory_bytes: sgr_mem,
                pytorch_peak_memory_bytes: py_mem,
                memory_ratio: sgr_mem as f64 / (py_mem as f64).max(1.0),
            });
        }
    }
    Ok(rows)
}

/// Renders compare rows as a Markdown table.
pub fn compare_table(rows: &[CompareRow]) -> String {
    let header = [
        "rule",
        "K",
        "sgr ms/step",
        "PyTorch ms/step",
        "PyTorch/sgr time",
        "sgr peak MiB",
        "PyTorch peak MiB",
        "sgr/PyTorch memory",
    ];
    markdown(
        &header,
        rows.iter().map(|r| {
            vec![
                r.rule.to_string(),
                r.modules.to_string(),
                format!("{:.0}", r.sgr_ms_per_step),
                format!("{:.0}", r.pytorch_ms_per_step),
                format!("{:.2}", r.speed_ratio),
                mib(r.sgr_peak_memory_bytes as f64),
                mib(r.pytorch_peak_memory_bytes as f64),
                format!("{:.2}", r.memory_ratio),
            ]
        }),
    )
}
