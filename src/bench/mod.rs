//! `sgr bench`: time and memory of training steps, each setting in its own process.
//!
//! Peak RSS is a per-process high-water mark, so every (rule, K) cell runs as a child
//! `sgr bench worker` process on synthetic data of a fixed shape; the parent collects one JSON
//! line from each and prints a table (or the rows as JSON with `--json`). A cell is a
//! [`TrainConfig`], resolved from the same [`TrainOptions`] flags as `sgr train` (so every
//! training option can be benchmarked), plus the [`BenchArgs`] that only a benchmark has.
//! Workers build the same `SplitNet`, `Optimizer` and `Rule` as `sgr train`, so the step measured
//! is the real one.
pub mod pipeline;

use crate::config::{TrainConfig, TrainOptions};
use crate::data::{Batch, DatasetKind};
use crate::memory::{Meter, gpu_used_bytes};
use crate::model::{FeatureShape, LocalLossKind, SplitNet, SplitStrategy};
use crate::rules::{self, RuleKind};
use crate::{Error, Result};
use clap::{ArgAction, ArgMatches, FromArgMatches};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// glibc mmap threshold (bytes) used for live-memory measurements.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// What only a benchmark cell has: the synthetic input and the steps to time.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct BenchArgs {
    /// Input channels of the synthetic data.
    #[arg(long, default_value_t = 3)]
    pub channels: i64,
    /// Input height and width of the synthetic data (`--image-size` sets it too).
    #[arg(long, default_value_t = 32)]
    pub size: i64,
    /// Classes of the synthetic data.
    #[arg(long, default_value_t = 10)]
    pub classes: i64,
    /// Timed steps per cell (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps per cell.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Run workers with glibc's mmap threshold fixed at 1 MiB, so that every tensor of 1 MiB or
    /// more is returned to the OS when freed and the high-water mark tracks live tensors rather
    /// than allocator slack (set by `sgr bench memory`; it slows steps, so `bench step` leaves
    /// the allocator alone).
    #[arg(skip)]
    #[serde(default)]
    pub live_memory: bool,
}

/// One benchmark cell, as a worker measures it: a resolved training configuration (rule and
/// K included) and the bench settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// The configuration `sgr train` would run with these flags.
    pub config: TrainConfig,
    /// Input shape, steps, warm-up and allocator mode.
    pub bench: BenchArgs,
}

/// Training options that a benchmark cell does not use (it times `--steps` steps on
/// synthetic input with a constant `--lr`); giving one is an error rather than silently
/// ignored.
const NOT_BENCHMARKED: &[&str] = &[
    "data",
    "data_dir",
    "epochs",
    "train_subset",
    "test_subset",
    "augment",
    "max_steps_per_epoch",
    "schedule",
    "warmup_epochs",
    "milestones",
    "gamma",
    "diag_every",
    "on_nan",
    "holdout",
    "lambda_schedule",
    "lambda_schedule_epochs",
    "random_erasing",
];

/// Training options the PyTorch reference of `sgr bench compare` does not take: they must be
/// at their defaults (which are the reference's), or the two sides would run different steps.
const NOT_MIRRORED_BY_REFERENCE: &[&str] = &[
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "decay_bn_and_bias",
    "seed",
    "sgr_grad",
    "fd_eps",
    "sgr_side",
    "optimizer",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "label_smoothing",
    "clip_grad_norm",
    "patch_size",
    "token_pool",
    "precision",
    "channels_last",
    "local_loss",
];

/// The arguments of `sgr bench memory|step|compare`: every `sgr train` option, with `--rule`
/// and `--modules` taking comma-separated lists (the grid), plus [`BenchArgs`].
#[derive(Debug, Clone)]
pub struct GridArgs {
    /// Rules of the grid.
    pub rules: Vec<RuleKind>,
    /// K values of the grid.
    pub modules: Vec<usize>,
    /// Local losses of the grid's `dgl` and `sgr` cells (`bp` and `fg` run `ce` only).
    pub local_losses: Vec<LocalLossKind>,
    /// Run the whole grid this many times, alternating cells, and keep medians.
    pub repeats: usize,
    /// Print the rows as a JSON array.
    pub json: bool,
    /// Input shape, steps and warm-up.
    pub bench: BenchArgs,
    /// Every other training option, as `sgr train` takes it (`rule` and `modules` unset).
    pub options: TrainOptions,
}

/// The flags of [`GridArgs`] that are neither training options nor [`BenchArgs`].
#[derive(clap::Args)]
struct GridOnly {
    /// Run the whole grid this many times, alternating cells, and keep medians.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Print the rows as a JSON array.
    #[arg(long)]
    json: bool,
}

impl clap::Args for GridArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        // The training options' own --rule and --modules become the grid's lists, so the two
        // can never disagree on names or values.
        let cmd = TrainOptions::augment_args(cmd)
            .mut_arg("rule", |a| {
                a.action(ArgAction::Append)
                    .value_delimiter(',')
                    .default_value("dgl")
                    .help("Rules, comma-separated (a bp K=1 reference row is always added)")
            })
            .mut_arg("modules", |a| {
                a.action(ArgAction::Append)
                    .value_delimiter(',')
                    .default_value("1,2,4,8,16")
                    .help("K values, comma-separated")
            })
            .mut_arg("local_loss", |a| {
                a.action(ArgAction::Append)
                    .value_delimiter(',')
                    .default_value("ce")
                    .help("Local losses of the dgl and sgr cells, comma-separated (ce, infopro, predsim)")
            });
        // Options a cell does not use stay parseable (to be refused by name in `plan`) but
        // out of the help.
        let cmd = NOT_BENCHMARKED
            .iter()
            .chain(&["no_augment"])
            .fold(cmd, |cmd, key| cmd.mut_arg(*key, |a| a.hide(true)));
        GridOnly::augment_args(BenchArgs::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for GridArgs {
    fn from_arg_matches(matches: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(m: &mut ArgMatches) -> std::result::Result<Self, clap::Error> {
        // Taken out first, so that the training options see neither.
        let rules = m
            .remove_many::<RuleKind>("rule")
            .map(|v| v.collect())
            .unwrap_or_default();
        let modules = m
            .remove_many::<usize>("modules")
            .map(|v| v.collect())
            .unwrap_or_default();
        let size_typed = m.value_source("size") == Some(clap::parser::ValueSource::CommandLine);
        let local_losses = m
            .remove_many::<LocalLossKind>("local_loss")
            .map(|v| v.collect())
            .unwrap_or_default();
        let options = TrainOptions::from_arg_matches_mut(m)?;
        let mut bench = BenchArgs::from_arg_matches_mut(m)?;
        // `--image-size`, the side a streamed set is cropped to, is also the synthetic input's
        // side, so an ImageNet-scale cell reads like the `sgr train` command it stands for.
        if let Some(side) = options.image_size {
            if size_typed && bench.size != side {
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--size {} and --image-size {side} disagree: both set the side of the synthetic input; give one\n",
                        bench.size
                    ),
                ));
            }
            bench.size = side;
        }
        let GridOnly { repeats, json } = GridOnly::from_arg_matches_mut(m)?;
        Ok(GridArgs {
            rules,
            modules,
            local_losses,
            repeats,
            json,
            bench,
            options,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
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
    /// Peak memory above the post-construction baseline, bytes: host RSS on the CPU, the
    /// device's used memory (`nvidia-smi`) on `--device cuda`.
    pub peak_memory_bytes: u64,
    /// Baseline RSS (CPU) or device used memory (CUDA), bytes.
    pub baseline_rss_bytes: u64,
    /// Analytic activation bytes of the largest module.
    pub largest_module_activation_bytes: i64,
    /// Parameters of the auxiliary heads (their loss's decoders and projections included).
    #[serde(default)]
    pub aux_head_parameters: i64,
    /// `peak_memory_bytes` relative to the `bp` K=1 row of the same run (filled by the parent).
    #[serde(default)]
    pub memory_ratio_to_bp: f64,
    /// `ms_per_step` relative to the `bp` K=1 row (filled by the parent).
    #[serde(default)]
    pub time_ratio_to_bp: f64,
    /// The cell's full training configuration, as `sgr train` would have resolved it.
    #[serde(default)]
    pub config: TrainConfig,
}

/// Measures one cell in this process.
pub fn measure(cell: &Cell) -> Result<Row> {
    let (cfg, bench) = (&cell.config, &cell.bench);
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    let input = FeatureShape::map(bench.channels, bench.size, bench.size);
    let device = cfg.tch_device()?;
    let net = crate::model::with_seed(cfg.seed as i64, || {
        SplitNet::new(&cfg.model_spec(input, bench.classes), device)
    })?;
    let mut opt = crate::train::build_optimizer(cfg, &net);
    let rule_impl = rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
    let mut scaler = (cfg.precision == crate::precision::Precision::Fp16)
        .then(crate::precision::LossScaler::default);
    let batch = Batch {
        images: Tensor::randn(
            [cfg.batch_size, bench.channels, bench.size, bench.size],
            (Kind::Float, device),
        ),
        labels: Tensor::randint(bench.classes, [cfg.batch_size], (Kind::Int64, device)),
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
    let mut times = Vec::with_capacity(bench.steps);
    for step in 0..bench.warmup + bench.steps {
        if bench.live_memory && step == bench.warmup {
            meter = Meter::start();
        }
        let start = Instant::now();
        opt.zero_grad();
        let at = rules::StepContext::at_step(step);
        crate::train::run_step(cfg, &net, &*rule_impl, &batch, &at, &scaler)?;
        // As in training: an fp16 overflow skips the update.
        let update = scaler
            .as_mut()
            .is_none_or(|s| s.after_backward(&mut opt) == crate::precision::Verdict::Update);
        if update {
            opt.step(cfg.lr);
        }
        sync();
        if step >= bench.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms_mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let largest = (0..net.num_modules())
        .map(|k| net.module_activation_bytes(k, cfg.batch_size))
        .max()
        .unwrap_or(0);
    let heads = net.head_parameter_counts();
    let aux_head_parameters = heads[..heads.len() - 1].iter().map(|(_, n)| n).sum();
    Ok(Row {
        rule: cfg.rule,
        modules: cfg.modules,
        batch_size: cfg.batch_size,
        ms_per_step: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        ms_min: times.first().copied().unwrap_or(f64::NAN),
        ms_mean,
        peak_memory_bytes: match gpu_baseline {
            Some(base) => gpu_used_bytes().unwrap_or(base).saturating_sub(base),
            None => meter.peak_above_baseline(),
        },
        baseline_rss_bytes: gpu_baseline.unwrap_or(meter.baseline()),
        largest_module_activation_bytes: largest,
        aux_head_parameters,
        memory_ratio_to_bp: 0.0,
        time_ratio_to_bp: 0.0,
        config: cfg.clone(),
    })
}

/// The resolved configuration of every cell of the grid `rules` x `losses` x `ks` (the `bp`
/// K=1 reference row first when `with_bp_reference`; `bp` and `fg` cells, which have no local
/// losses, with `ce` only; no losses = `ce`), each checked exactly as `sgr train` checks its
/// flags, before anything runs. `sgr` cells with K below `--sgr-from` would be `dgl`
/// under the name `sgr`: where the grid has other K they are left out with a note, and a grid
/// with none left is refused.
pub fn plan(
    options: &TrainOptions,
    rules_list: &[RuleKind],
    losses: &[LocalLossKind],
    ks: &[usize],
    with_bp_reference: bool,
) -> Result<Vec<TrainConfig>> {
    let options = options.folded();
    let given = serde_json::to_value(&options).expect("options serialise");
    if let Some(key) = NOT_BENCHMARKED
        .iter()
        .find(|k| given.get(**k).is_some_and(|v| !v.is_null()))
    {
        return Err(Error::Config(format!(
            "sgr bench: --{} does not apply to a benchmark (a cell times --steps steps on synthetic input of --channels x --size x --size, at a constant --lr and --lambda); leave it out",
            key.replace('_', "-")
        )));
    }
    let sgr_from = options
        .sgr_from
        .unwrap_or_else(|| TrainConfig::default().sgr_from);
    let mut cells: Vec<(RuleKind, LocalLossKind, usize)> = Vec::new();
    if with_bp_reference {
        cells.push((RuleKind::Bp, LocalLossKind::Ce, 1));
    }
    let losses = if losses.is_empty() {
        &[LocalLossKind::Ce][..]
    } else {
        losses
    };
    for &rule in rules_list {
        let has_local_losses = matches!(rule, RuleKind::Dgl | RuleKind::Sgr);
        for &loss in losses {
            if !has_local_losses && loss != LocalLossKind::Ce {
                continue;
            }
            for &k in ks {
                if rule == RuleKind::Sgr
                    && k < sgr_from
                    && ks.iter().any(|&other| other >= sgr_from)
                {
                    eprintln!(
                        "  sgr K={k}: left out (--sgr-from {sgr_from} > K: no module would be regularised)"
                    );
                    continue;
                }
                // K = 1 has no local loss: one ce cell stands for every loss.
                let loss = if k == 1 { LocalLossKind::Ce } else { loss };
                if !cells.contains(&(rule, loss, k)) {
                    cells.push((rule, loss, k));
                }
            }
        }
    }
    cells
        .into_iter()
        .map(|(rule, loss, k)| {
            let cell = TrainOptions {
                rule: Some(rule),
                modules: Some(k),
                local_loss: Some(loss),
                // What a cell trains on (of --channels x --size x --size, not the data set's).
                data: Some(DatasetKind::Synthetic),
                ..options.clone()
            };
            let name = match loss {
                LocalLossKind::Ce => rule.to_string(),
                other => format!("{rule} {other}"),
            };
            let in_cell = |e: Error| Error::Config(format!("cell {name} K={k}: {e}"));
            let cfg = TrainConfig::resolve(&cell, None, None).map_err(in_cell)?;
            crate::model::splits::check_k(&cfg.model, k, cfg.split)?;
            Ok(cfg)
        })
        .collect()
}

/// Runs every cell of [`plan`] (with the `bp` K=1 reference row first) in a child process of
/// this binary; `repeats` alternates the whole set that many times and keeps each cell's
/// median.
pub fn run_grid(args: &GridArgs) -> Result<Vec<Row>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    // Every cell is checked before minutes are spent on the first ones.
    let cells = plan(
        &args.options,
        &args.rules,
        &args.local_losses,
        &args.modules,
        true,
    )?;
    let mut samples: Vec<Vec<Row>> = vec![Vec::new(); cells.len()];
    for _ in 0..args.repeats.max(1) {
        for (i, cfg) in cells.iter().enumerate() {
            let row = worker_row(&exe, cfg, &args.bench)?;
            // Progress on stderr, so a run stopped by a time limit still shows what it measured.
            eprintln!(
                "  {}{} K={}: {:.1} ms/step, peak {} MiB",
                cfg.rule,
                loss_label(cfg.local_loss),
                cfg.modules,
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

/// The line printed above a table: what was measured, where, and how often (`cfg` is any
/// cell's configuration; they differ only in rule and K).
pub fn header(cfg: &TrainConfig, bench: &BenchArgs, repeats: usize) -> String {
    let threads = match cfg.threads {
        0 => "default threads".to_string(),
        n => format!("{n} thread(s)"),
    };
    format!(
        "{} batch {} input {}x{}x{}, device {}, {threads}, median of {} steps after {} warm-up, {} alternating repeat(s)",
        cfg.model,
        cfg.batch_size,
        bench.channels,
        bench.size,
        bench.size,
        cfg.device.name(),
        bench.steps,
        bench.warmup,
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

/// ` (loss)` after a rule's name for a local loss other than `ce`.
fn loss_label(loss: LocalLossKind) -> String {
    match loss {
        LocalLossKind::Ce => String::new(),
        other => format!(" ({other})"),
    }
}

/// Renders rows as a Markdown table (with the local loss and the auxiliary heads' parameters
/// when any row trains on a loss other than `ce`).
pub fn table(rows: &[Row]) -> String {
    if rows
        .iter()
        .any(|r| r.config.local_loss != LocalLossKind::Ce)
    {
        let header = [
            "rule",
            "local loss",
            "K",
            "aux head params",
            "ms/step (median)",
            "time vs bp",
            "peak MiB",
            "memory vs bp",
            "largest module activations MiB",
        ];
        return markdown(
            &header,
            rows.iter().map(|r| {
                vec![
                    r.rule.to_string(),
                    r.config.local_loss.to_string(),
                    r.modules.to_string(),
                    r.aux_head_parameters.to_string(),
                    format!("{:.0}", r.ms_per_step),
                    format!("{:.2}", r.time_ratio_to_bp),
                    mib(r.peak_memory_bytes as f64),
                    format!("{:.2}", r.memory_ratio_to_bp),
                    format!(
                        "{:.1}",
                        r.largest_module_activation_bytes as f64 / (1024.0 * 1024.0)
                    ),
                ]
            }),
        );
    }
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
    /// The sgr side's training configuration (threads as actually used).
    #[serde(default)]
    pub config: TrainConfig,
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
/// setting when `bench.live_memory`).
fn worker_row(exe: &std::path::Path, cfg: &TrainConfig, bench: &BenchArgs) -> Result<Row> {
    let cell = Cell {
        config: cfg.clone(),
        bench: bench.clone(),
    };
    let cell_json = serde_json::to_string(&cell).expect("cell serialises");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "worker", "--cell", &cell_json]);
    if bench.live_memory {
        cmd.env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD.to_string());
    }
    let (rule, k) = (cfg.rule, cfg.modules);
    let text = run_json(&mut cmd, &format!("bench worker for rule {rule} K={k}"))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("bad worker output ({e}): {text}")))
}

/// Runs every (rule, K) cell alternately in an sgr worker and a PyTorch reference worker
/// (`python reference bench ...`), `repeats` times, with the same thread count, steps,
/// warm-up, input and memory method (high-water mark above each process's baseline).
pub fn run_compare(
    args: &GridArgs,
    python: &std::path::Path,
    reference: &std::path::Path,
) -> Result<Vec<CompareRow>> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find the sgr binary: {e}")))?;
    let mut cells = plan(
        &args.options,
        &args.rules,
        &args.local_losses,
        &args.modules,
        false,
    )?;
    let defaults = serde_json::to_value(TrainConfig::default()).expect("config serialises");
    for cfg in &cells {
        if cfg.modules > 1 && cfg.aux_head == crate::model::HeadKind::Imagenet {
            return Err(Error::Config(
                "sgr bench compare: the PyTorch reference has no --aux-head imagenet; use conv, linear, mlp or block".into(),
            ));
        }
        if cfg.split != SplitStrategy::Table {
            return Err(Error::Config(
                "sgr bench compare: only --split table (the reference implements the split tables)"
                    .into(),
            ));
        }
        let value = serde_json::to_value(cfg).expect("config serialises");
        if let Some(key) = NOT_MIRRORED_BY_REFERENCE
            .iter()
            .find(|k| value.get(**k) != defaults.get(**k))
        {
            return Err(Error::Config(format!(
                "sgr bench compare: the PyTorch reference has no --{} (it runs the exact, receiver-side penalty gradient with the default optimizer settings), so the two sides would differ; leave it at its default",
                key.replace('_', "-")
            )));
        }
    }
    if !reference.exists() {
        return Err(Error::Config(format!(
            "PyTorch reference not found: {}",
            reference.display()
        )));
    }
    // Both sides must use the same explicit thread count.
    for cfg in &mut cells {
        if cfg.threads == 0 {
            cfg.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
    }
    let bench = &args.bench;
    let mut rows = Vec::new();
    for cfg in &cells {
        let (rule, k) = (cfg.rule, cfg.modules);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.max(1) {
            let mine = worker_row(&exe, cfg, bench)?;
            let text = run_json(
                std::process::Command::new(python).arg(reference).args([
                    "bench",
                    "--model",
                    &cfg.model.to_string(),
                    "--batch-size",
                    &cfg.batch_size.to_string(),
                    "--modules",
                    &k.to_string(),
                    "--rule",
                    rule.name(),
                    "--aux-head",
                    &format!("{:?}", cfg.aux_head).to_lowercase(),
                    "--steps",
                    &bench.steps.to_string(),
                    "--warmup",
                    &bench.warmup.to_string(),
                    "--threads",
                    &cfg.threads.max(1).to_string(),
                    "--in-channels",
                    &bench.channels.to_string(),
                    "--size",
                    &bench.size.to_string(),
                    "--classes",
                    &bench.classes.to_string(),
                    "--lambda",
                    &cfg.lambda.to_string(),
                    "--sgr-distance",
                    serde_json::to_value(cfg.sgr_distance)
                        .expect("distance serialises")
                        .as_str()
                        .unwrap_or_default(),
                    "--sgr-from",
                    &cfg.sgr_from.to_string(),
                    "--sgr-every",
                    &cfg.sgr_every.to_string(),
                    "--device",
                    cfg.device.name(),
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
            config: cfg.clone(),
        });
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

/// The flags of `sgr bench precision`: the network and step as `sgr train` takes them (the
/// check sets `--rule`, `--sgr-grad` and `--precision` itself) and the synthetic input.
#[derive(Debug, Clone, clap::Args)]
pub struct PrecisionArgs {
    /// Training options of the step (model, K, batch size, device, λ, ...).
    #[command(flatten)]
    pub options: TrainOptions,
    /// Input shape of the synthetic batch (steps and warm-up are not used).
    #[command(flatten)]
    pub bench: BenchArgs,
    /// Print the rows as a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// One row of `sgr bench precision`: one step's gradient at a reduced precision against the
/// same step at fp32, from the same weights and batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrecisionRow {
    /// bf16 or fp16.
    pub precision: crate::precision::Precision,
    /// `dgl`, or `sgr` with its penalty gradient.
    pub step: String,
    /// ‖g − g_fp32‖ / ‖g_fp32‖ over every parameter gradient.
    pub rel_err: f64,
    /// The same for the penalty's share (sgr's gradient minus dgl's at each precision).
    pub penalty_rel_err: Option<f64>,
    /// The step's last-module loss at this precision and at fp32.
    pub loss: [f64; 2],
    /// fp16: the loss scale of the compared step. A step that overflows is redone from the
    /// same weights at half the scale, as training would go on (GradScaler's first steps
    /// often overflow at 2^16); 1 at bf16.
    pub scale: f64,
}

/// One step of each of `dgl`, `sgr --sgr-grad exact` and `sgr --sgr-grad jvp` at fp32, bf16
/// and fp16 (each from the same initial weights and synthetic batch, through
/// [`crate::train::run_step`] and, for fp16, the loss scaler's unscale), compared with fp32.
pub fn precision_check(args: &PrecisionArgs) -> Result<Vec<PrecisionRow>> {
    use crate::precision::{LossScaler, Precision, Verdict};
    use crate::rules::SgrGrad;
    let options = args.options.folded();
    for (given, flag) in [
        (options.rule.is_some(), "rule"),
        (options.sgr_grad.is_some(), "sgr-grad"),
        (options.precision.is_some(), "precision"),
    ] {
        if given {
            return Err(Error::Config(format!(
                "sgr bench precision: --{flag} is set by the check itself (dgl, sgr exact and jvp, at fp32, bf16 and fp16); leave it out"
            )));
        }
    }
    let bench = &args.bench;
    let input = FeatureShape::map(bench.channels, bench.size, bench.size);
    let steps = [
        ("dgl", RuleKind::Dgl, SgrGrad::Exact),
        ("sgr exact", RuleKind::Sgr, SgrGrad::Exact),
        ("sgr jvp", RuleKind::Sgr, SgrGrad::Jvp),
    ];
    // (gradient, loss, scale) of every step at every precision.
    let mut results = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let mut row = Vec::new();
        for (_, rule, grad) in steps {
            let cfg = TrainConfig::resolve(
                &TrainOptions {
                    rule: Some(rule),
                    sgr_grad: Some(grad),
                    precision: Some(precision),
                    data: Some(DatasetKind::Synthetic),
                    modules: Some(options.modules.unwrap_or(3)),
                    ..options.clone()
                },
                None,
                None,
            )?;
            if cfg.threads > 0 {
                tch::set_num_threads(cfg.threads as i32);
            }
            let device = cfg.tch_device()?;
            let net = crate::model::with_seed(cfg.seed as i64, || {
                SplitNet::new(&cfg.model_spec(input, bench.classes), device)
            })?;
            let batch = crate::model::with_seed(cfg.seed as i64 + 1, || Batch {
                images: Tensor::randn(
                    [cfg.batch_size, bench.channels, bench.size, bench.size],
                    (Kind::Float, Device::Cpu),
                )
                .to_device(device),
                labels: Tensor::randint(
                    bench.classes,
                    [cfg.batch_size],
                    (Kind::Int64, Device::Cpu),
                )
                .to_device(device),
            });
            let mut opt = crate::train::build_optimizer(&cfg, &net);
            let mut scaler = (precision == Precision::Fp16).then(LossScaler::default);
            let rule_impl = rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
            let at = rules::StepContext::at_step(0);
            // The step changes nothing but gradients (and running statistics, restored), so
            // an overflowing fp16 step is redone at the halved scale.
            let (stats, scale) = loop {
                opt.zero_grad();
                let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
                let stats = net.with_frozen_buffers(|| {
                    crate::train::run_step(&cfg, &net, &*rule_impl, &batch, &at, &scaler)
                })?;
                match scaler.as_mut().map(|s| s.after_backward(&mut opt)) {
                    Some(Verdict::Skip) => continue,
                    Some(Verdict::Diverged) => {
                        return Err(Error::NonFinite(format!(
                            "sgr bench precision: the fp16 {} step is not finite even at loss scale 1",
                            cfg.rule
                        )));
                    }
                    _ => break (stats, scale),
                }
            };
            let named = net.vs.variables();
            let mut names: Vec<&String> = named
                .iter()
                .filter(|(_, t)| t.requires_grad())
                .map(|(n, _)| n)
                .collect();
            names.sort();
            let flat = Tensor::cat(
                &names
                    .iter()
                    .map(|n| {
                        let t = &named[*n];
                        let g = t.grad();
                        if g.defined() {
                            g.reshape([-1])
                        } else {
                            t.zeros_like().reshape([-1])
                        }
                        .to_kind(Kind::Double)
                        .to_device(Device::Cpu)
                    })
                    .collect::<Vec<_>>(),
                0,
            );
            row.push((flat, stats.loss(), scale));
        }
        results.push((precision, row));
    }
    let rel = |a: &Tensor, b: &Tensor| {
        (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
    };
    let (_, fp32) = &results[0];
    let mut rows = Vec::new();
    for (precision, row) in &results[1..] {
        for (i, (name, _, _)) in steps.iter().enumerate() {
            let (g, loss, scale) = &row[i];
            let penalty_rel_err =
                (i > 0).then(|| rel(&(g - &row[0].0), &(&fp32[i].0 - &fp32[0].0)));
            rows.push(PrecisionRow {
                precision: *precision,
                step: name.to_string(),
                rel_err: rel(g, &fp32[i].0),
                penalty_rel_err,
                loss: [*loss, fp32[i].1],
                scale: *scale,
            });
        }
    }
    Ok(rows)
}

/// Renders `sgr bench precision` rows as a Markdown table.
pub fn precision_table(rows: &[PrecisionRow]) -> String {
    let header = [
        "precision",
        "step",
        "gradient rel. error vs fp32",
        "penalty part rel. error",
        "loss (fp32)",
        "loss scale",
    ];
    markdown(
        &header,
        rows.iter().map(|r| {
            vec![
                r.precision.to_string(),
                r.step.clone(),
                format!("{:.3}", r.rel_err),
                r.penalty_rel_err.map_or("-".into(), |e| format!("{e:.3}")),
                format!("{:.4} ({:.4})", r.loss[0], r.loss[1]),
                format!("{}", r.scale),
            ]
        }),
    )
}
