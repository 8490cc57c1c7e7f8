//! The `sgr` command line: train, evaluate, inspect data, benchmark, sweep presets, report.
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sgr::bench::{self, GridArgs};
use sgr::config::{self, DeviceKind, TrainConfig, TrainOptions};
use sgr::data::{self, DatasetKind};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Local learning with Successive Gradient Reconciliation (SGR) on libtorch.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a network with a rule (bp, dgl, sgr, fg) into a run folder.
    Train {
        /// Run folder (metrics.jsonl, checkpoint.safetensors, summary.json).
        #[arg(long)]
        out: PathBuf,
        /// TOML file with the same fields as the flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue the run in --out from its checkpoint.
        #[arg(long)]
        resume: bool,
        /// No progress bar or per-epoch lines.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        options: Box<TrainOptions>,
    },
    /// Print the test accuracy of a checkpoint (every head).
    Eval {
        /// A checkpoint written by `sgr train`.
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        args: EvalArgs,
    },
    /// Inspect data sets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Benchmark training steps (each setting in its own process).
    Bench {
        #[command(subcommand)]
        command: Box<BenchCommand>,
    },
    /// Run every cell of an experiment preset, each as its own `sgr train` (finished cells are
    /// skipped, interrupted ones resumed).
    Sweep {
        /// Preset name (presets/NAME.toml) or path of a preset file.
        #[arg(long)]
        preset: String,
        /// Sweep folder, one run folder per cell [default: runs/<preset name>]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Check the preset and list what would run, resume or be skipped; train nothing.
        #[arg(long)]
        dry_run: bool,
        /// Cells to run at once, each its own process; cells whose preset does not set
        /// `threads` get max(1, cores / N) threads. At most the preset's number of cells.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Run every cell on this device instead of the preset's (a run-only field: a sweep
        /// folder can be continued on another device).
        #[arg(long)]
        device: Option<DeviceKind>,
    },
    /// Write report.md, report.json and plots (PNG, SVG) from a sweep folder.
    Report {
        /// Sweep folder (the --out of `sgr sweep`).
        dir: PathBuf,
        /// Report folder [default: <dir>/report]
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Internal: panic on purpose, so that tests can check what the panic hook prints and
    /// that the bad-input checks would notice a panic.
    #[command(hide = true)]
    InternalPanic,
    /// Internal: under `mpirun -np 2`, send tensors of every kind and pipeline packets from
    /// rank 0 to rank 1 and back, each rank writing what it received to
    /// <out>/rank<r>.safetensors; optionally kill or fail a rank on purpose (the tests check that
    /// the job then ends, non-zero).
    #[command(hide = true)]
    InternalMpiSelftest {
        /// Folder for rank0.safetensors and rank1.safetensors.
        #[arg(long)]
        out: PathBuf,
        /// Then ping-pong until this rank kills itself with SIGKILL.
        #[arg(long)]
        kill_rank: Option<usize>,
        /// Round of the ping-pong at which --kill-rank kills itself.
        #[arg(long, default_value_t = 10)]
        kill_after: usize,
        /// This rank fails with an error instead of taking part.
        #[arg(long)]
        fail_rank: Option<usize>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Sample counts, per-class counts and per-channel mean/std of both splits.
    Info {
        /// Data set.
        #[arg(long)]
        data: DatasetKind,
        /// Data folder.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Streamed sets: decode every image (after the evaluation transform at --image-size)
        /// for per-channel mean/std, and store the training split's in <data-dir>/sgr-stats.json,
        /// which training then normalises with instead of ImageNet's statistics.
        #[arg(long)]
        compute_stats: bool,
        /// Streamed sets: image size for --compute-stats.
        #[arg(long, default_value_t = data::DEFAULT_IMAGE_SIZE)]
        image_size: i64,
        /// Streamed sets: decode threads for --compute-stats.
        #[arg(long, default_value_t = 1)]
        loader_workers: usize,
        /// Streamed sets: skip unreadable images (counted) instead of stopping.
        #[arg(long)]
        skip_bad_images: bool,
    },
}

/// Flags of `sgr bench data`.
#[derive(clap::Args)]
struct DataBenchArgs {
    /// Data set.
    #[arg(long)]
    data: DatasetKind,
    /// Data folder.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Decode threads to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    loader_workers: Vec<usize>,
    /// Image size of a streamed set.
    #[arg(long, default_value_t = data::DEFAULT_IMAGE_SIZE)]
    image_size: i64,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: i64,
    /// Batches per measurement.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Seed of the shuffle and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CPU threads for libtorch (normalisation of each batch).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training batches per second from the data loader alone (decode, augmentation,
    /// normalisation; no model), per --loader-workers value.
    Data(DataBenchArgs),
    /// Peak training memory per K (and rule), with ratios to global BP.
    Memory(GridArgs),
    /// Milliseconds per training step and peak memory per rule and K.
    Step(GridArgs),
    /// sgr against the PyTorch reference (bench/reference), alternating processes.
    Compare {
        #[command(flatten)]
        grid: GridArgs,
        /// Python with torch (default: the project's .venv).
        #[arg(long)]
        python: Option<PathBuf>,
        /// The reference script (default: bench/reference/sgr_ref.py of this checkout).
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// Throughput of the module pipeline (--workers W, default 2, one thread per worker)
    /// against the sequential step on one and two threads, per rule and K, side by side in
    /// this process; with each stage's idle fraction and the speedups the per-module times
    /// predict for W = 2, 4, 8.
    Pipeline(GridArgs),
    /// One step's gradient at bf16 and fp16 (autocast; fp16 with loss scaling) against fp32,
    /// for dgl and for sgr's exact and jvp penalty gradients, from the same weights and batch.
    Precision(bench::PrecisionArgs),
    /// Internal: measure one cell (a `bench::Cell` as JSON) and print its row as JSON.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        cell: String,
    },
}

fn train(
    out: &Path,
    config_file: Option<&Path>,
    resume: bool,
    quiet: bool,
    flags: &TrainOptions,
) -> Result<()> {
    let file = config_file.map(config::read_options_file).transpose()?;
    let config_json = out.join("config.json");
    let cfg = if resume {
        let text = std::fs::read_to_string(&config_json)
            .with_context(|| format!("--resume: no run to resume in {}", out.display()))?;
        let saved: TrainConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid run configuration", config_json.display()))?;
        TrainConfig::resolve(flags, file.as_ref(), Some(&saved))?
    } else {
        for existing in ["checkpoint.safetensors", "summary.json", "metrics.jsonl"] {
            if out.join(existing).exists() {
                bail!(
                    "{} already holds a run ({existing}); pass --resume to continue it or choose another --out",
                    out.display()
                );
            }
        }
        TrainConfig::resolve(flags, file.as_ref(), None)?
    };
    let summary = if cfg.distributed == config::Distributed::Mpi {
        match train_mpi(&cfg, out, resume, quiet)? {
            Some(summary) => summary,
            None => return Ok(()), // not rank 0: rank 0 reports
        }
    } else {
        sgr::distributed::check_not_launched()?;
        // Bad data (missing files, a --holdout larger than the set) fails before the run
        // folder exists.
        let ds = sgr::train::load_data(&cfg)?;
        sgr::train::check_model(&cfg, &ds)?;
        // Fail on an unwritable folder before any training time is spent.
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create run folder {}", out.display()))?;
        sgr::checkpoint::write_atomic(&config_json, &serde_json::to_vec_pretty(&cfg)?)?;
        sgr::train::run_with_data(&cfg, &ds, out, resume, quiet)?
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let device = summary
        .peak_device_bytes
        .map(|b| format!(", peak device memory {:.0} MiB", mib(b)))
        .unwrap_or_default();
    println!(
        "{} {} K={} on {}: test accuracy {:.2}% (best {:.2}%), {:.0} img/s, peak host RSS {:.0} MiB{device} -> {}",
        summary.rule,
        summary.model,
        summary.modules,
        summary.dataset,
        100.0 * summary.test_accuracy,
        100.0 * summary.best_test_accuracy,
        summary.images_per_second,
        mib(summary.peak_host_rss_bytes),
        out.join("summary.json").display()
    );
    Ok(())
}

/// `--distributed mpi`: this process is one rank of the job (see `sgr::distributed`); the
/// summary on rank 0.
#[cfg(feature = "mpi")]
fn train_mpi(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    quiet: bool,
) -> Result<Option<sgr::train::Summary>> {
    Ok(sgr::distributed::train(cfg, out, resume, quiet)?)
}

/// Without the `mpi` feature the configuration check refuses `--distributed mpi` first.
#[cfg(not(feature = "mpi"))]
fn train_mpi(
    _cfg: &TrainConfig,
    _out: &Path,
    _resume: bool,
    _quiet: bool,
) -> Result<Option<sgr::train::Summary>> {
    Err(sgr::distributed::not_built().into())
}

/// What `sgr eval --json` prints.
#[derive(serde::Serialize)]
struct EvalOutput {
    checkpoint: PathBuf,
    epoch: usize,
    data: String,
    /// `test`, or `holdout` for a run trained with --holdout (which evaluates on held-out
    /// training images).
    split: &'static str,
    test_images: usize,
    test_accuracy: f64,
    test_loss: f64,
    module_test_accuracy: Vec<f64>,
}

/// `sgr eval`'s options besides the checkpoint: overrides of the run's configuration.
#[derive(clap::Args)]
struct EvalArgs {
    /// Data set (default: the one the run was trained on).
    #[arg(long)]
    data: Option<DatasetKind>,
    /// Data folder (default: the run's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: i64,
    /// Compute device (default: the one the run was trained on).
    #[arg(long)]
    device: Option<DeviceKind>,
    /// Evaluate on the first N test images only, 0 = all (default: the run's
    /// --test-subset, so that the result matches its summary.json).
    #[arg(long)]
    test_subset: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn eval(path: &Path, args: EvalArgs) -> Result<()> {
    let EvalArgs {
        data,
        data_dir,
        batch_size,
        device,
        test_subset,
        json,
    } = args;
    let (vars, _, state) = sgr::checkpoint::load(path)?;
    let state = state.with_context(|| {
        format!(
            "{}: has no run configuration (not written by `sgr train`)",
            path.display()
        )
    })?;
    let mut cfg: TrainConfig = serde_json::from_value(state.config)
        .with_context(|| format!("{}: bad run configuration", path.display()))?;
    if let Some(d) = data {
        cfg.data = d;
    }
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    if let Some(d) = device {
        cfg.device = d;
    }
    if let Some(n) = test_subset {
        cfg.test_subset = n;
    }
    let ds = sgr::train::load_data(&cfg)?;
    let net = sgr::train::build_net(&cfg, &ds)?;
    sgr::checkpoint::load_into(&net, path, &vars, false)?;
    let e = sgr::train::evaluate(&net, &ds, &ds.test, batch_size)?;
    let acc = e.module_accuracy.last().copied().unwrap_or(0.0);
    let split = if cfg.holdout > 0 { "holdout" } else { "test" };
    if json {
        let out = EvalOutput {
            checkpoint: path.to_path_buf(),
            epoch: state.epoch,
            data: cfg.data.to_string(),
            split,
            test_images: ds.test.len(),
            test_accuracy: acc,
            test_loss: e.loss,
            module_test_accuracy: e.module_accuracy,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{split} accuracy {:.2}% ({} {split} images, epoch {})",
        100.0 * acc,
        ds.test.len(),
        state.epoch
    );
    if e.module_accuracy.len() > 1 {
        let heads: Vec<String> = e
            .module_accuracy
            .iter()
            .map(|a| format!("{:.2}%", 100.0 * a))
            .collect();
        println!("per-module head accuracy: {}", heads.join(" "));
    }
    Ok(())
}

fn grid(args: &GridArgs) -> Result<()> {
    let rows = bench::run_grid(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{}",
            bench::header(&rows[0].config, &args.bench, args.repeats)
        );
        print!("{}", bench::table(&rows));
    }
    Ok(())
}

fn sweep(
    preset: &str,
    out: Option<PathBuf>,
    dry_run: bool,
    jobs: usize,
    device: Option<DeviceKind>,
) -> Result<()> {
    let path = sgr::preset::resolve(preset)?;
    let out =
        out.unwrap_or_else(|| Path::new("runs").join(path.file_stem().unwrap_or(path.as_os_str())));
    let o = sgr::sweep::run(&path, &out, dry_run, jobs, device)?;
    if dry_run {
        return Ok(());
    }
    println!(
        "sweep {}: {} trained, {} skipped (already finished), {} failed -> {}",
        path.display(),
        o.done.len(),
        o.skipped.len(),
        o.failed.len(),
        out.join("sweep.json").display()
    );
    if !o.failed.is_empty() {
        let names: Vec<&str> = o.failed.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "{} of {} cells failed: {} (reasons above and in {})",
            o.failed.len(),
            o.done.len() + o.skipped.len() + o.failed.len(),
            names.join(", "),
            out.join("sweep.json").display()
        );
    }
    Ok(())
}

fn report(dir: &Path, out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| dir.join("report"));
    let w = sgr::report::write(dir, &out)?;
    let not_used: Vec<String> = w
        .not_used
        .iter()
        .map(|(name, state)| format!("{name}: {state}"))
        .collect();
    println!(
        "{}: {} of {} runs finished, {} plots, {}{}",
        w.report.display(),
        w.finished,
        w.total,
        w.plots.len(),
        w.json.display(),
        if not_used.is_empty() {
            String::new()
        } else {
            format!("; not used: {}", not_used.join(", "))
        }
    );
    Ok(())
}

fn bench_data(args: &DataBenchArgs) -> Result<()> {
    if args.batch_size < 1 || args.batches < 1 {
        bail!("--batch-size and --batches must be at least 1");
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let mut rows = Vec::new();
    for &workers in &args.loader_workers {
        let opts = data::LoadOptions {
            image_size: args.image_size,
            workers,
            skip_bad: false,
        };
        let ds = data::load_with(args.data, &args.data_dir, &opts)?;
        rows.push(data::throughput::measure(
            &ds,
            args.batch_size,
            args.batches,
            args.seed,
        )?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{} at {} px, batch {}, {} batches",
            args.data, args.image_size, args.batch_size, args.batches
        );
        println!(
            "{:>8}{:>10}{:>10}{:>12}",
            "workers", "images", "seconds", "images/s"
        );
        for r in &rows {
            println!(
                "{:>8}{:>10}{:>10.2}{:>12.1}",
                r.workers, r.images, r.seconds, r.images_per_second
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            out,
            config,
            resume,
            quiet,
            options,
        } => train(&out, config.as_deref(), resume, quiet, &options),
        Command::Eval { checkpoint, args } => eval(&checkpoint, args),
        Command::Data {
            command:
                DataCommand::Info {
                    data,
                    data_dir,
                    json,
                    compute_stats,
                    image_size,
                    loader_workers,
                    skip_bad_images,
                },
        } => {
            let opts = data::LoadOptions {
                image_size,
                workers: loader_workers,
                skip_bad: skip_bad_images,
            };
            let ds = data::load_with(data, &data_dir, &opts)?;
            let info = data::info_with(&ds, compute_stats)?;
            if compute_stats && data.streams() {
                let stats = data::folder::FolderStats {
                    mean: info.train.mean.clone(),
                    std: info.train.std.clone(),
                    image_size,
                };
                let path = data::folder::write_stats(&data_dir, &stats)?;
                eprintln!("wrote {}", path.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{info}");
            }
            Ok(())
        }
        Command::Sweep {
            preset,
            out,
            dry_run,
            jobs,
            device,
        } => sweep(&preset, out, dry_run, jobs, device),
        Command::Report { dir, out } => report(&dir, out),
        Command::InternalPanic => panic!("deliberate panic (sgr internal-panic)"),
        Command::InternalMpiSelftest {
            out,
            kill_rank,
            kill_after,
            fail_rank,
        } => {
            let opts = sgr::distributed::SelftestOptions {
                out,
                kill_rank,
                kill_after,
                fail_rank,
            };
            if let Some(msg) = sgr::distributed::selftest(&opts)? {
                println!("{msg}");
            }
            Ok(())
        }
        Command::Bench { command } => match *command {
            BenchCommand::Data(args) => bench_data(&args),
            BenchCommand::Memory(mut args) => {
                args.bench.live_memory = true;
                grid(&args)
            }
            BenchCommand::Step(args) => grid(&args),
            BenchCommand::Compare {
                grid,
                python,
                reference,
            } => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                let python = python.unwrap_or_else(|| root.join(".venv/bin/python"));
                let reference =
                    reference.unwrap_or_else(|| root.join("bench/reference/sgr_ref.py"));
                let rows = bench::run_compare(&grid, &python, &reference)?;
                if grid.json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                        "{}",
                        bench::header(&rows[0].config, &grid.bench, grid.repeats)
                    );
                    print!("{}", bench::compare_table(&rows));
                }
                Ok(())
            }
            BenchCommand::Pipeline(args) => {
                let rows = bench::pipeline::run(&args)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    println!(
                        "{}",
                        bench::header(&rows[0].config, &args.bench, args.repeats)
                    );
                    print!("{}", bench::pipeline::table(&rows));
                }
                Ok(())
            }
            BenchCommand::Precision(args) => {
                let rows = bench::precision_check(&args)?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", bench::precision_table(&rows));
                }
                Ok(())
            }
            BenchCommand::Worker { cell } => {
                let cell: bench::Cell = serde_json::from_str(&cell)?;
                let row = bench::measure(&cell)?;
                println!("{}", serde_json::to_string(&row)?);
                Ok(())
            }
        },
    }
}

fn main() -> ExitCode {
    // A panic is a bug in sgr; say so in one line, with where it happened so that a report
    // is actionable, and the backtrace only when RUST_BACKTRACE asks for it.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let first = msg.lines().next().unwrap_or(msg);
        let location = info
            .location()
            .map(|l| format!(" (at {}:{}:{})", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        eprintln!("error: internal error (please report): {first}{location}");
        // `capture` honours RUST_BACKTRACE / RUST_LIB_BACKTRACE and is a no-op without them.
        let trace = std::backtrace::Backtrace::capture();
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("stack backtrace:\n{trace}");
        }
    }));
    // Under mpirun every rank parses the same flags and reads the same files, so an error
    // before the ranks part ways is usually the same on each: rank 0 alone prints it, and
    // another rank only when rank 0 did not fail (see `sgr::distributed::rank_failed`).
    let quiet_rank = sgr::distributed::launched_rank().is_some_and(|r| r > 0);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if quiet_rank => return ExitCode::from(e.exit_code() as u8),
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if quiet_rank => {
            sgr::distributed::rank_failed(&format!("{e:#}"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
