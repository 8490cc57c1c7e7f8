//! `sgr bench pipeline`: throughput of the module pipeline (`--workers W`, one thread per
//! worker) against the sequential step on one and on two threads, measured side by side in one
//! process, plus each stage's idle fraction and the speedup that the measured per-module times
//! predict for more workers.
use super::{GridArgs, markdown, median, plan};
use crate::config::TrainConfig;
use crate::data::Batch;
use crate::model::{FeatureShape, SplitNet};
use crate::pipeline::{self, Segment};
use crate::rules::{self, Carry, RuleKind, StepContext, StepRecorder};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One row of `sgr bench pipeline`: one rule and K, at W workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRow {
    /// Rule.
    pub rule: RuleKind,
    /// K.
    pub modules: usize,
    /// Workers W (stages), one thread each.
    pub workers: usize,
    /// Units of every stage's modules, and the modules of each stage (1-based, inclusive).
    pub stage_modules: Vec<[usize; 2]>,
    /// Milliseconds per step of the sequential trainer on one thread (median over repeats).
    pub sequential_1_thread_ms: f64,
    /// The same on two threads (libtorch's intra-op parallelism).
    pub sequential_2_threads_ms: f64,
    /// Milliseconds per step of the pipeline: the wall time of `steps` batches through it
    /// (fill and drain included) divided by `steps` (median over repeats).
    pub pipeline_ms: f64,
    /// Throughput ratio pipeline / sequential on one thread.
    pub speedup_vs_sequential_1_thread: f64,
    /// Throughput ratio pipeline / sequential on two threads.
    pub speedup_vs_sequential_2_threads: f64,
    /// Fraction of each stage's time spent waiting on its links (median over repeats).
    pub stage_idle_fraction: Vec<f64>,
    /// Milliseconds of each module's part of a step, sequential on one thread (median).
    pub module_ms: Vec<f64>,
    /// Speedups over one thread that the module times predict for W = 2, 4, 8 workers (each
    /// on its own core, no communication cost; `null` where W > K): the sum of the module
    /// times over the slowest stage of the best contiguous grouping.
    pub predicted_speedup: Vec<(usize, Option<f64>)>,
    /// Timed batches per repeat.
    pub steps: usize,
    /// The row's configuration.
    pub config: TrainConfig,
}

/// The synthetic batch of a cell.
fn batch_for(cfg: &TrainConfig, args: &GridArgs, device: Device) -> Batch {
    let b = &args.bench;
    crate::model::with_seed(cfg.seed as i64 + 1, || Batch {
        images: Tensor::randn(
            [cfg.batch_size, b.channels, b.size, b.size],
            (Kind::Float, device),
        ),
        labels: Tensor::randint(b.classes, [cfg.batch_size], (Kind::Int64, device)),
    })
}

/// A fresh net for `cfg` (the same weights every time).
fn net_for(cfg: &TrainConfig, args: &GridArgs) -> Result<SplitNet> {
    let b = &args.bench;
    let input = FeatureShape::map(b.channels, b.size, b.size);
    crate::model::with_seed(cfg.seed as i64, || {
        SplitNet::new(&cfg.model_spec(input, b.classes), cfg.tch_device()?)
    })
}

/// Median milliseconds per step of the sequential trainer on `threads` threads, and the
/// median milliseconds of each module's part (timed one module at a time).
fn sequential(
    cfg: &TrainConfig,
    args: &GridArgs,
    threads: usize,
    per_module: bool,
) -> Result<(f64, Vec<f64>)> {
    tch::set_num_threads(threads as i32);
    let net = net_for(cfg, args)?;
    let mut opt = crate::train::build_optimizer(cfg, &net);
    let rule = rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
    let batch = batch_for(cfg, args, net.device());
    let (warmup, steps) = (args.bench.warmup, args.bench.steps);
    let mut times = Vec::with_capacity(steps);
    let mut modules: Vec<Vec<f64>> = vec![Vec::new(); net.num_modules()];
    for step in 0..warmup + steps {
        let at = StepContext::at_step(step);
        opt.zero_grad();
        let start = Instant::now();
        if per_module {
            // Module by module, as a stage would run it (a sender-side target is dropped:
            // this times the receiver side).
            let mut carry = Carry::input(&batch);
            let mut record = StepRecorder::new(0..net.num_modules(), cfg.batch_size);
            for (k, times) in modules.iter_mut().enumerate() {
                let t = Instant::now();
                let (next, _) = rules::run_modules(
                    &*rule,
                    &net,
                    k..k + 1,
                    carry,
                    &batch,
                    &at,
                    &mut record,
                    |_| Ok(()),
                )?;
                if step >= warmup {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                carry = next;
            }
        } else {
            crate::train::run_step(cfg, &net, &*rule, &batch, &at, &None)?;
        }
        opt.step(cfg.lr);
        if step >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let module_ms = modules.into_iter().filter(|t| !t.is_empty()).map(median);
    Ok((median(times), module_ms.collect()))
}

/// Median milliseconds per step of the pipeline, and each stage's idle fraction.
fn pipelined(cfg: &TrainConfig, args: &GridArgs) -> Result<(f64, Vec<f64>)> {
    tch::set_num_threads(1);
    let net = net_for(cfg, args)?;
    let (stages, devices, mut opts) = pipeline::set_up(cfg, &net)?;
    let rule = rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
    let batch = batch_for(cfg, args, devices[0]);
    let (warmup, steps) = (args.bench.warmup, args.bench.steps);
    let lr = cfg.lr;
    let lr_at = move |_: usize| lr;
    let feed = |n: usize| {
        (0..n).map(|i| {
            let b = Batch {
                images: batch.images.shallow_clone(),
                labels: batch.labels.shallow_clone(),
            };
            (i, b)
        })
    };
    let segment = |n: usize| Segment {
        epoch: 0,
        steps: n,
        first: (0, 0),
        lr_at: &lr_at,
        progress: None,
    };
    if warmup > 0 {
        let seg = segment(warmup);
        let (rule, net) = (&*rule, &net);
        pipeline::run_segment(
            cfg,
            net,
            rule,
            &stages,
            &devices,
            &mut opts,
            &seg,
            feed(warmup),
        )?;
    }
    let seg = segment(steps);
    let start = Instant::now();
    let outcome = pipeline::run_segment(
        cfg,
        &net,
        &*rule,
        &stages,
        &devices,
        &mut opts,
        &seg,
        feed(steps),
    )?;
    let ms = start.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let idle = outcome.timings.iter().map(|t| t.idle_fraction()).collect();
    Ok((ms, idle))
}

/// The speedup that per-module times `t` predict for `w` workers: Σt over the slowest stage
/// of the best contiguous grouping of the modules into `w` stages (`None` if w > K).
pub fn predicted_speedup(t: &[f64], w: usize) -> Option<f64> {
    if w == 0 || w > t.len() {
        return None;
    }
    let (_, slowest) = pipeline::balanced_stages(t, w);
    (slowest > 0.0).then(|| t.iter().sum::<f64>() / slowest)
}

/// Runs `sgr bench pipeline`: for every rule and K of the grid, W = `--workers` (default 2,
/// capped at K) workers against the sequential step on one and two threads, each measured
/// `--repeats` times, alternating, in this process.
pub fn run(args: &GridArgs) -> Result<Vec<PipelineRow>> {
    let workers = args.options.workers.unwrap_or(2).max(1);
    let local: Vec<RuleKind> = args.rules.to_vec();
    if local.contains(&RuleKind::Bp) {
        return Err(Error::Config(
            "sgr bench pipeline: --rule bp cannot be cut into stages; give local rules".into(),
        ));
    }
    let ks: Vec<usize> = args.modules.iter().copied().filter(|&k| k >= 2).collect();
    if ks.is_empty() {
        return Err(Error::Config(
            "sgr bench pipeline: --modules needs a K of at least 2".into(),
        ));
    }
    let options = crate::config::TrainOptions {
        workers: None,
        threads: None,
        ..args.options.clone()
    };
    let cells = plan(&options, &local, &args.local_losses, &ks, false)?;
    let mut rows = Vec::new();
    for cfg in cells {
        let w = workers.min(cfg.modules);
        let piped = TrainConfig {
            workers: w,
            threads: 1,
            ..cfg.clone()
        };
        piped.validate()?;
        let repeats = args.repeats.max(1);
        let (mut one, mut two, mut pipe) = (Vec::new(), Vec::new(), Vec::new());
        let mut idle: Vec<Vec<f64>> = Vec::new();
        let mut module_ms: Vec<Vec<f64>> = Vec::new();
        for _ in 0..repeats {
            one.push(sequential(&cfg, args, 1, false)?.0);
            two.push(sequential(&cfg, args, 2, false)?.0);
            let (ms, fractions) = pipelined(&piped, args)?;
            pipe.push(ms);
            idle.push(fractions);
            module_ms.push(sequential(&cfg, args, 1, true)?.1);
        }
        let column = |rows: &[Vec<f64>], i: usize| median(rows.iter().map(|r| r[i]).collect());
        let module_ms: Vec<f64> = (0..cfg.modules).map(|k| column(&module_ms, k)).collect();
        let net = net_for(&piped, args)?;
        let stages = pipeline::stages_of(&piped, &net);
        let (one, two, pipe) = (median(one), median(two), median(pipe));
        rows.push(PipelineRow {
            rule: cfg.rule,
            modules: cfg.modules,
            workers: w,
            stage_modules: stages.iter().map(|r| [r.start + 1, r.end]).collect(),
            sequential_1_thread_ms: one,
            sequential_2_threads_ms: two,
            pipeline_ms: pipe,
            speedup_vs_sequential_1_thread: one / pipe,
            speedup_vs_sequential_2_threads: two / pipe,
            stage_idle_fraction: (0..w).map(|s| column(&idle, s)).collect(),
            predicted_speedup: [2, 4, 8]
                .iter()
                .map(|&w| (w, predicted_speedup(&module_ms, w)))
                .collect(),
            module_ms,
            steps: args.bench.steps,
            config: piped,
        });
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn table(rows: &[PipelineRow]) -> String {
    let fmt = |x: f64| format!("{x:.1}");
    let predicted = |r: &PipelineRow| {
        r.predicted_speedup
            .iter()
            .filter_map(|(w, s)| s.map(|s| format!("W={w}: {s:.2}x")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    markdown(
        &[
            "rule",
            "K",
            "W",
            "seq 1 thr ms",
            "seq 2 thr ms",
            "pipeline ms",
            "vs seq 1 thr",
            "vs seq 2 thr",
            "stage idle",
            "module ms",
            "predicted (per-module times)",
        ],
        rows.iter().map(|r| {
            vec![
                r.rule.to_string(),
                r.modules.to_string(),
                r.workers.to_string(),
                fmt(r.sequential_1_thread_ms),
                fmt(r.sequential_2_threads_ms),
                fmt(r.pipeline_ms),
                format!("{:.2}x", r.speedup_vs_sequential_1_thread),
                format!("{:.2}x", r.speedup_vs_sequential_2_threads),
                r.stage_idle_fraction
                    .iter()
                    .map(|f| format!("{:.0}%", 100.0 * f))
                    .collect::<Vec<_>>()
                    .join("/"),
                r.module_ms
                    .iter()
                    .map(|m| fmt(*m))
                    .collect::<Vec<_>>()
                    .join("/"),
                predicted(r),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::predicted_speedup;

    #[test]
    fn predicted_speedup_is_total_over_the_slowest_best_stage() {
        assert_eq!(predicted_speedup(&[1.0, 1.0], 2), Some(2.0));
        assert_eq!(predicted_speedup(&[1.0, 1.0], 3), None);
        // 3 | 1 1 1: the slowest stage is 3 either way.
        assert_eq!(predicted_speedup(&[3.0, 1.0, 1.0, 1.0], 2), Some(2.0));
        // 1 2 | 3 or 1 | 2 3: the first is better (3 against 5).
        assert_eq!(predicted_speedup(&[1.0, 2.0, 3.0], 2), Some(2.0));
        assert_eq!(predicted_speedup(&[1.0, 2.0, 3.0], 1), Some(1.0));
        let four = predicted_speedup(&[2.0, 2.0, 2.0, 2.0], 4).unwrap();
        assert!((four - 4.0).abs() < 1e-12);
    }
}
