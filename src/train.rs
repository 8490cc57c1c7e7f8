//! The one training loop. Every rule runs through [`run`]: per epoch it sets the learning rate,
//! runs the rule's step on each batch, checks for non-finite values, steps the optimizer,
//! evaluates every head on the test split, appends `metrics.jsonl`, and writes the checkpoint.
use crate::checkpoint::{self, TrainState};
use crate::config::{OnNan, TrainConfig};
use crate::data::{self, Batches, Dataset, Order};
use crate::diagnostics::{self, Discord};
use crate::memory::Meter;
use crate::metrics::{self, DiagRecord, EpochRecord};
use crate::model::{FeatureShape, SplitNet};
use crate::optim::Optimizer;
use crate::pipeline;
use crate::precision::{LossScaler, Precision, StepScope, Verdict};
use crate::rules::{self, StepStats, cross_entropy};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Tensor};

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Rule name.
    pub rule: String,
    /// Network name.
    pub model: String,
    /// Data set name.
    pub dataset: String,
    /// K.
    pub modules: usize,
    /// Unit ranges of the modules.
    pub module_ranges: Vec<[usize; 2]>,
    /// Epochs trained.
    pub epochs: usize,
    /// Seed.
    pub seed: u64,
    /// Final test accuracy of the last module (fraction).
    pub test_accuracy: f64,
    /// Best test accuracy over epochs.
    pub best_test_accuracy: f64,
    /// Final test accuracy of every head.
    pub module_test_accuracy: Vec<f64>,
    /// Training seconds (excluding evaluation).
    pub train_seconds: f64,
    /// Training throughput.
    pub images_per_second: f64,
    /// Peak host resident memory (RSS) above the post-construction baseline, bytes (see
    /// `memory`); on `--device cuda` this is the host side only. Written as
    /// `peak_memory_bytes` before it was named for what it is.
    #[serde(alias = "peak_memory_bytes")]
    pub peak_host_rss_bytes: u64,
    /// On `--device cuda`: the GPU's used memory above the post-construction baseline, read
    /// with `nvidia-smi` after every epoch (the caching allocator keeps what it reserved, so
    /// this is the run's peak reservation, training and evaluation included); `None` on the
    /// CPU or where `nvidia-smi` cannot be read.
    #[serde(default)]
    pub peak_device_bytes: Option<u64>,
    /// Analytic activation bytes kept alive by each module at this batch size.
    pub module_activation_bytes: Vec<i64>,
    /// Distinct images skipped as unreadable (`--skip-bad-images`; 0 for in-memory sets).
    #[serde(default)]
    pub skipped_images: usize,
    /// Trainable parameters (backbone and heads).
    pub parameters: i64,
    /// The full resolved configuration.
    pub config: TrainConfig,
}

/// Test-split evaluation of every head.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Accuracy of each module's head (the last is the network's).
    pub module_accuracy: Vec<f64>,
    /// Mean loss of the last module.
    pub loss: f64,
}

/// Evaluates every head of `net` on `split` in inference mode. Fails only for a streamed split
/// with an unreadable image (without `--skip-bad-images`).
pub fn evaluate(
    net: &SplitNet,
    ds: &Dataset,
    split: &data::Source,
    batch_size: i64,
) -> Result<Evaluation> {
    let _guard = tch::no_grad_guard();
    let modules = net.num_modules();
    let mut correct = vec![0i64; modules];
    let (mut loss_sum, mut seen) = (0.0, 0i64);
    let mut batches = Batches::new(
        split,
        &ds.meta,
        batch_size,
        Order::Sequential,
        false,
        net.device(),
    )
    .keep_singleton();
    // Pipeline stages may sit on different devices.
    let devices: Vec<Device> = (0..modules).map(|k| net.module_device(k)).collect();
    for batch in batches.by_ref() {
        let mut h = batch.images.shallow_clone();
        for (k, right) in correct.iter_mut().enumerate() {
            h = net.forward_module(k, &h.to_device(devices[k]), false);
            let logits = net.head_logits(k, &h, false);
            let labels = batch.labels.to_device(devices[k]);
            *right += rules::correct(&logits, &labels);
            if k + 1 == modules {
                let n = labels.size()[0];
                loss_sum += cross_entropy(&logits, &labels).double_value(&[]) * n as f64;
            }
        }
        seen += batch.labels.size()[0];
    }
    if let Some(e) = batches.take_error() {
        return Err(e);
    }
    let seen_f = seen.max(1) as f64;
    Ok(Evaluation {
        module_accuracy: correct.iter().map(|&c| c as f64 / seen_f).collect(),
        loss: loss_sum / seen_f,
    })
}

/// Loads the data set of `cfg`, cut to the configured subsets. With `holdout`, the last
/// `holdout` training images become the evaluation split (before `train_subset` and
/// `test_subset` apply), so settings can be chosen without the test set.
pub fn load_data(cfg: &TrainConfig) -> Result<Dataset> {
    let mut ds = data::load_with(cfg.data, &cfg.data_dir, &load_options(cfg))?;
    if cfg.holdout > 0 {
        let n = ds.train.len();
        if cfg.holdout >= n {
            return Err(Error::Config(format!(
                "--holdout {}: must be smaller than the {n} training images",
                cfg.holdout
            )));
        }
        ds.test = ds.train.tail(cfg.holdout);
        ds.train = ds.train.subset(n - cfg.holdout);
    }
    if cfg.train_subset > 0 {
        ds.train = ds.train.subset(cfg.train_subset);
    }
    if cfg.test_subset > 0 {
        ds.test = ds.test.subset(cfg.test_subset);
    }
    Ok(ds)
}

/// Builds `cfg`'s network for `ds` once on the CPU and drops it, so that what only a build can
/// check (a patch size that does not divide the images, a head that cannot read the features,
/// a layer that rule `fg` cannot estimate) fails before a run folder is written.
pub fn check_model(cfg: &TrainConfig, ds: &Dataset) -> Result<()> {
    let spec = model_spec_for(cfg, ds);
    let net = crate::model::with_seed(cfg.seed as i64, || SplitNet::new(&spec, Device::Cpu))?;
    if cfg.rule.forward_gradient() {
        let first = Batches::new(
            &ds.train,
            &ds.meta,
            2,
            Order::Sequential,
            false,
            Device::Cpu,
        )
        .next()
        .ok_or_else(|| {
            Error::Config(format!("--data {}: the training split is empty", cfg.data))
        })?;
        rules::fg::check_network(&net, &first)?;
    }
    Ok(())
}

/// The model `cfg` asks for on data `ds`.
fn model_spec_for(cfg: &TrainConfig, ds: &Dataset) -> crate::model::ModelSpec {
    let input = FeatureShape::map(ds.meta.channels, ds.meta.height, ds.meta.width);
    let mut spec = cfg.model_spec(input, ds.meta.classes);
    // InfoPro's decoder reconstructs the image before normalisation.
    spec.local_loss.input_mean = ds.meta.mean.clone();
    spec.local_loss.input_std = ds.meta.std.clone();
    spec
}

/// The options of `cfg` for reading a streamed set.
pub fn load_options(cfg: &TrainConfig) -> data::LoadOptions {
    data::LoadOptions {
        image_size: cfg.image_size,
        workers: cfg.loader_workers,
        skip_bad: cfg.skip_bad_images,
    }
}

/// Builds the network for `cfg` on data `ds` (seeding libtorch first), on `--device`, or on
/// the first of `--devices` (the trainer then moves later stages to theirs).
pub fn build_net(cfg: &TrainConfig, ds: &Dataset) -> Result<SplitNet> {
    let spec = model_spec_for(cfg, ds);
    // On the first stage's device: the batches are made where the net says it is.
    let device = pipeline::stage_devices(cfg)?[0];
    crate::model::with_seed(cfg.seed as i64, || SplitNet::new(&spec, device))
}

/// The optimizer of `cfg` over `net`'s parameters. With `--clip-grad-norm`, every module is
/// clipped by its own gradient norm (its gradient is its own: the modules are isolated), and
/// the whole network by one norm under `bp`.
pub fn build_optimizer(cfg: &TrainConfig, net: &SplitNet) -> Optimizer {
    let mut opt = Optimizer::with_layout(
        &net.vs,
        cfg.optim(),
        &net.no_weight_decay(),
        cfg.channels_last,
    );
    if cfg.rule != rules::RuleKind::Bp {
        opt.set_clip_groups(|name| net.module_of_variable(name).unwrap_or(0));
    }
    opt
}

/// One training step of `rule` at `cfg`'s precision: forward and backward inside a
/// [`StepScope`] (autocast, and the fp16 loss scale of `scaler`), ended before the update;
/// with `--channels-last` on a channels-last copy of the images (the convolution weights are
/// channels-last views from [`build_optimizer`] on).
pub fn run_step(
    cfg: &TrainConfig,
    net: &SplitNet,
    rule: &dyn rules::Rule,
    batch: &data::Batch,
    at: &rules::StepContext,
    scaler: &Option<LossScaler>,
) -> Result<StepStats> {
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let _scope = StepScope::new(cfg.precision, net.device(), scale)?;
    if cfg.channels_last {
        let batch = data::Batch {
            images: crate::precision::to_channels_last(&batch.images),
            labels: batch.labels.shallow_clone(),
        };
        return rule.step(net, &batch, at);
    }
    rule.step(net, batch, at)
}

/// Leaves no trace of a skipped batch: drops its gradients and restores the BatchNorm buffers
/// saved before it (when they were saved).
fn discard_batch(opt: &mut Optimizer, buffers: &mut Option<Vec<(Tensor, Tensor)>>) {
    opt.zero_grad();
    if let Some(buffers) = buffers {
        tch::no_grad(|| {
            for (live, saved) in buffers.iter_mut() {
                live.copy_(saved);
            }
        });
    }
}

/// Where in the run a non-finite value appeared, or `None` if all is finite: `stats` and `opt`
/// cover `modules` (all of them, or a pipeline stage's).
pub(crate) fn non_finite(
    net: &SplitNet,
    modules: std::ops::Range<usize>,
    stats: &StepStats,
    opt: &mut Optimizer,
) -> Option<String> {
    let first = modules.start;
    if let Some(k) = stats.module_losses.iter().position(|l| !l.is_finite()) {
        return Some(format!(
            "the loss of module {} is {}",
            first + k + 1,
            stats.module_losses[k]
        ));
    }
    if opt.grads_finite() {
        return None;
    }
    let bad = modules.clone().find(|&k| {
        net.module_variables(k, true).iter().any(|(_, t)| {
            let g = t.grad();
            g.defined() && !bool::try_from(g.isfinite().all()).unwrap_or(false)
        })
    });
    Some(format!(
        "a gradient of module {} is not finite",
        bad.map_or(0, |k| k + 1)
    ))
}

#[derive(Default)]
struct EpochTotals {
    module_loss: Vec<f64>,
    /// Sum of each module's SGR penalty over the steps where it was applied, and their count.
    penalty: Vec<f64>,
    penalty_steps: Vec<usize>,
    correct: i64,
    samples: i64,
    discord: Vec<Discord>,
}

impl EpochTotals {
    fn add(&mut self, s: &StepStats) {
        if self.module_loss.is_empty() {
            self.module_loss = vec![0.0; s.module_losses.len()];
            self.penalty = vec![0.0; s.penalties.len()];
            self.penalty_steps = vec![0; s.penalties.len()];
        }
        let n = s.samples as f64;
        for (acc, l) in self.module_loss.iter_mut().zip(&s.module_losses) {
            *acc += l * n;
        }
        for (k, p) in s.penalties.iter().enumerate() {
            if s.penalty_applied.get(k).copied().unwrap_or(false) {
                self.penalty[k] += p;
                self.penalty_steps[k] += 1;
            }
        }
        self.correct += s.correct;
        self.samples += s.samples;
    }

    /// Each module's mean penalty over the steps where it was applied (0 where it never was):
    /// with `--sgr-every N` a mean over every step would shrink it by about N.
    fn penalty_mean(&self) -> Vec<f64> {
        self.penalty
            .iter()
            .zip(&self.penalty_steps)
            .map(|(p, &n)| if n > 0 { p / n as f64 } else { 0.0 })
            .collect()
    }

    fn discord_mean(&self, pick: impl Fn(&Discord) -> &Vec<f64>) -> Vec<f64> {
        let Some(first) = self.discord.first() else {
            return Vec::new();
        };
        let n = self.discord.len() as f64;
        (0..pick(first).len())
            .map(|b| self.discord.iter().map(|d| pick(d)[b]).sum::<f64>() / n)
            .collect()
    }
}

/// Trains with `cfg` into the run folder `out`, continuing from its checkpoint if `resume`.
pub fn run(cfg: &TrainConfig, out: &Path, resume: bool, quiet: bool) -> Result<Summary> {
    let ds = load_data(cfg)?;
    run_with_data(cfg, &ds, out, resume, quiet)
}

/// [`run`] on an already loaded data set (`cfg.data` is then only a label).
pub fn run_with_data(
    cfg: &TrainConfig,
    ds: &Dataset,
    out: &Path,
    resume: bool,
    quiet: bool,
) -> Result<Summary> {
    run_with_runner(cfg, ds, out, resume, quiet, None)
}

/// [`run_with_data`], with the pipeline's segments run by `runner` instead of threads in this
/// process (`--distributed mpi`: rank 0 runs this trainer, the other stages run on other ranks;
/// see [`crate::distributed`]).
pub fn run_with_runner(
    cfg: &TrainConfig,
    ds: &Dataset,
    out: &Path,
    resume: bool,
    quiet: bool,
    mut runner: Option<&mut dyn crate::distributed::SegmentRunner>,
) -> Result<Summary> {
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    let mut trainer = Trainer::new(cfg, ds, out, quiet)?;
    let mut state = trainer.start_or_resume(resume)?;
    trainer.print_header(&state);
    let device = trainer.net.device();
    let device_baseline = device_used_bytes(device);
    let meter = Meter::start();
    let mut last_eval = None;
    for epoch in state.epoch..cfg.epochs {
        let (totals, seconds, lrs) = if trainer.stages.len() > 1 || runner.is_some() {
            trainer.train_epoch_pipelined(epoch, &mut state, runner.as_deref_mut())?
        } else {
            trainer.train_epoch(epoch, &mut state)?
        };
        state.peak_host_rss_bytes = state.peak_host_rss_bytes.max(meter.peak_above_baseline());
        let eval = evaluate(&trainer.net, ds, &ds.test, cfg.batch_size.max(256))?;
        if let (Some(base), Some(now)) = (device_baseline, device_used_bytes(device)) {
            let peak = now.saturating_sub(base);
            state.peak_device_bytes = Some(state.peak_device_bytes.map_or(peak, |p| p.max(peak)));
        }
        let record = trainer.epoch_record(epoch, lrs, &totals, seconds, &eval, &state);
        metrics::append(&trainer.metrics_path, &record)?;
        state.epoch = epoch + 1;
        state.train_seconds += seconds;
        state.images += totals.samples as u64;
        state.best_test_accuracy = state.best_test_accuracy.max(record.test_accuracy);
        checkpoint::save(&trainer.ckpt_path, &trainer.net, &trainer.opts, &state)?;
        last_eval = Some(eval);
    }
    let eval = match last_eval {
        Some(e) => e,
        None => evaluate(&trainer.net, ds, &ds.test, cfg.batch_size.max(256))?,
    };
    trainer.write_summary(&state, eval)
}

/// The device's used memory on CUDA (after the queued work finished), `None` on the CPU or
/// where `nvidia-smi` cannot be read (see [`crate::memory::gpu_used_bytes`]).
fn device_used_bytes(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cuda(index) => {
            tch::Cuda::synchronize(index as i64);
            crate::memory::gpu_used_bytes()
        }
        _ => None,
    }
}

/// Every buffer of `net` (BatchNorm running statistics), each with a same-shaped tensor that
/// [`Trainer::train_epoch`] copies it into before a step, so that a skipped batch's update of
/// the running statistics can be undone.
fn buffer_snapshots(net: &SplitNet) -> Vec<(Tensor, Tensor)> {
    net.buffers()
        .into_iter()
        .map(|t| {
            let saved = t.detach().copy();
            (t, saved)
        })
        .collect()
}

/// One run's network, optimizer, rule and files: the phases of [`run_with_data`].
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    ds: &'a Dataset,
    out: &'a Path,
    quiet: bool,
    net: SplitNet,
    /// One optimizer per pipeline stage (one over every variable when `--workers 1`).
    opts: Vec<Optimizer>,
    /// The modules of each pipeline stage, and its device.
    stages: Vec<std::ops::Range<usize>>,
    devices: Vec<Device>,
    rule: Box<dyn rules::Rule>,
    ckpt_path: std::path::PathBuf,
    metrics_path: std::path::PathBuf,
    diag_path: std::path::PathBuf,
}

impl<'a> Trainer<'a> {
    fn new(cfg: &'a TrainConfig, ds: &'a Dataset, out: &'a Path, quiet: bool) -> Result<Self> {
        let net = build_net(cfg, ds)?;
        let (stages, devices, opts) = pipeline::set_up(cfg, &net)?;
        Ok(Trainer {
            stages,
            devices,
            rule: rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg()),
            ckpt_path: checkpoint::path_in(out),
            metrics_path: out.join("metrics.jsonl"),
            diag_path: out.join("diagnostics.jsonl"),
            cfg,
            ds,
            out,
            quiet,
            net,
            opts,
        })
    }

    /// A fresh state, or the checkpoint's (weights, momentum and state restored) if `resume`;
    /// removes what an interrupted run may have left past its checkpoint.
    fn start_or_resume(&mut self, resume: bool) -> Result<TrainState> {
        let mut state = TrainState {
            epoch: 0,
            global_step: 0,
            best_test_accuracy: 0.0,
            train_seconds: 0.0,
            images: 0,
            peak_host_rss_bytes: 0,
            peak_device_bytes: None,
            loss_scaler: (self.cfg.precision == Precision::Fp16).then(LossScaler::default),
            config: serde_json::to_value(self.cfg).expect("config serialises"),
        };
        let ckpt_path = &self.ckpt_path;
        if resume && ckpt_path.exists() {
            let (vars, momentum, saved) = checkpoint::load(ckpt_path)?;
            checkpoint::load_into(&self.net, ckpt_path, &vars, false)?;
            for opt in &mut self.opts {
                opt.load_state(&momentum).map_err(|e| Error::Checkpoint {
                    path: ckpt_path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let saved = saved.ok_or_else(|| Error::Checkpoint {
                path: ckpt_path.clone(),
                reason: "has no training state (not written by `sgr train`)".into(),
            })?;
            state = TrainState {
                config: state.config,
                // A checkpoint written before the scaler was saved starts from the default.
                loss_scaler: saved.loss_scaler.clone().or(state.loss_scaler),
                ..saved
            };
        }
        // A kill during a write can leave a hidden temp file; the real files are never torn.
        for stale in [
            ".checkpoint.safetensors.tmp",
            ".checkpoint.json.tmp",
            ".summary.json.tmp",
        ] {
            let _ = std::fs::remove_file(self.out.join(stale));
        }
        // Records past the checkpoint belong to an interrupted epoch that will be redone.
        metrics::truncate_after_epoch(&self.metrics_path, state.epoch)?;
        metrics::truncate_after_epoch(&self.diag_path, state.epoch)?;
        Ok(state)
    }

    fn module_ranges(&self) -> Vec<[usize; 2]> {
        self.net
            .module_ranges()
            .iter()
            .map(|r| [r.start, r.end])
            .collect()
    }

    fn print_header(&self, state: &TrainState) {
        if self.quiet {
            return;
        }
        let (cfg, ds, net) = (self.cfg, self.ds, &self.net);
        eprintln!(
            "{} on {} ({} train / {} test), rule {}, K={} modules over units {:?}, {} parameters",
            cfg.model,
            cfg.data,
            ds.train.len(),
            ds.test.len(),
            cfg.rule,
            net.num_modules(),
            self.module_ranges(),
            net.parameter_count()
        );
        for (name, n) in net.head_parameter_counts() {
            eprintln!("  head {name}: {n} parameters");
        }
        if self.stages.len() > 1 {
            eprintln!(
                "pipeline: {} workers, modules per stage {:?}, devices {:?}",
                self.stages.len(),
                self.stages
                    .iter()
                    .map(|r| [r.start + 1, r.end])
                    .collect::<Vec<_>>(),
                self.devices
            );
        }
        if state.epoch > 0 {
            eprintln!(
                "resuming after epoch {} (step {})",
                state.epoch, state.global_step
            );
        }
    }

    /// The epoch's shuffled training batches, the number of steps it runs, and its progress
    /// bar.
    fn epoch_batches(&self, epoch: usize) -> (Batches, usize, ProgressBar) {
        let cfg = self.cfg;
        let batches = Batches::new(
            &self.ds.train,
            &self.ds.meta,
            cfg.batch_size,
            Order::Shuffled {
                seed: cfg.seed,
                epoch: epoch as u64,
            },
            cfg.augment,
            self.net.device(),
        )
        .with_random_erasing(if cfg.augment { cfg.random_erasing } else { 0.0 });
        let full = batches.len();
        let steps = if cfg.max_steps_per_epoch > 0 {
            full.min(cfg.max_steps_per_epoch)
        } else {
            full
        };
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]",
            )
            .expect("valid template"),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
        (batches, steps, bar)
    }

    /// Whether gradient diagnostics are due before global step `step`.
    fn diagnostics_due(&self, step: usize) -> bool {
        self.cfg.diag_every > 0
            && step.is_multiple_of(self.cfg.diag_every)
            && self.net.num_modules() > 1
    }

    /// Measures gradient discord on `batch` (the parameters are those before step
    /// `state.global_step`), appends it to `diagnostics.jsonl` and to the epoch's totals.
    fn record_diagnostics(
        &self,
        epoch: usize,
        batch: &data::Batch,
        state: &TrainState,
        totals: &mut EpochTotals,
    ) -> Result<()> {
        let d = diagnostics::measure(&self.net, batch);
        metrics::append(
            &self.diag_path,
            &DiagRecord {
                epoch: epoch + 1,
                step: state.global_step,
                grad_cosine: d.grad_cosine.clone(),
                grad_rel_distance: d.grad_rel_distance.clone(),
                bp_cosine: d.bp_cosine.clone(),
            },
        )?;
        totals.discord.push(d);
        Ok(())
    }

    /// The end of a diverged run's error message: where the last good weights are.
    fn diverged_hint(&self, state: &TrainState) -> String {
        format!(
            "the last good checkpoint ({}) is kept",
            if state.epoch > 0 {
                self.ckpt_path.display().to_string()
            } else {
                "none yet".into()
            }
        )
    }

    /// [`Trainer::train_epoch`] with the modules as pipeline stages on `--workers` threads
    /// ([`pipeline`]): the batches are fed in segments that end where diagnostics are due
    /// (they need every module at the same step, so they run with the pipeline drained) and
    /// at the epoch's end.
    fn train_epoch_pipelined(
        &mut self,
        epoch: usize,
        state: &mut TrainState,
        mut runner: Option<&mut (dyn crate::distributed::SegmentRunner + '_)>,
    ) -> Result<(EpochTotals, f64, [f64; 2])> {
        let cfg = self.cfg;
        let (mut batches, steps, bar) = self.epoch_batches(epoch);
        let schedule = cfg.schedule();
        let lr_at = |i: usize| schedule.lr(epoch, i, steps, cfg.epochs);
        let mut totals = EpochTotals::default();
        let start = Instant::now();
        let mut done = 0;
        while done < steps {
            let Some(first) = batches.next() else { break };
            if self.diagnostics_due(state.global_step) {
                self.record_diagnostics(epoch, &first, state, &mut totals)?;
            }
            let until_diagnostics = match cfg.diag_every {
                0 => usize::MAX,
                every => every - state.global_step % every,
            };
            let len = until_diagnostics.min(steps - done);
            let segment = pipeline::Segment {
                epoch,
                steps,
                first: (done, state.global_step),
                lr_at: &lr_at,
                progress: Some(&bar),
            };
            let mut feed = std::iter::once(first)
                .chain(batches.by_ref().take(len - 1))
                .enumerate()
                .map(|(j, mut batch)| {
                    if cfg.channels_last {
                        batch.images = crate::precision::to_channels_last(&batch.images);
                    }
                    (done + j, batch)
                });
            let stats = match runner.as_deref_mut() {
                Some(runner) => runner.run_segment(
                    cfg,
                    &self.net,
                    &*self.rule,
                    &self.stages,
                    &self.devices,
                    &mut self.opts,
                    &segment,
                    &mut feed,
                ),
                None => pipeline::run_segment(
                    cfg,
                    &self.net,
                    &*self.rule,
                    &self.stages,
                    &self.devices,
                    &mut self.opts,
                    &segment,
                    feed,
                ),
            }
            .map_err(|e| match e {
                Error::NonFinite(what) => Error::NonFinite(format!(
                    "{what}; {} — lower --lr",
                    self.diverged_hint(state)
                )),
                other => other,
            })?
            .stats;
            for step in &stats {
                totals.add(step);
            }
            done += stats.len();
            state.global_step += stats.len();
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                totals.module_loss.last().copied().unwrap_or(0.0) / totals.samples.max(1) as f64,
                100.0 * totals.correct as f64 / totals.samples.max(1) as f64,
                totals.samples as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
            if stats.len() < len {
                break;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        if let Some(e) = batches.take_error() {
            return Err(e);
        }
        Ok((totals, seconds, [lr_at(0), lr_at(steps.max(1) - 1)]))
    }

    /// One epoch of training steps (diagnostics, rule step, non-finite check, optimizer step);
    /// returns the epoch's totals, its training seconds and its first and last steps'
    /// learning rates.
    fn train_epoch(
        &mut self,
        epoch: usize,
        state: &mut TrainState,
    ) -> Result<(EpochTotals, f64, [f64; 2])> {
        let cfg = self.cfg;
        let (mut batches, steps, bar) = self.epoch_batches(epoch);
        let log_progress = !self.quiet && !std::io::stderr().is_terminal();
        let schedule = cfg.schedule();
        // The schedule runs on the steps that are taken: with --max-steps-per-epoch it must
        // anneal over the truncated epochs, not over full ones that never run.
        let lr_at = |i: usize| schedule.lr(epoch, i, steps, cfg.epochs);
        // A skipped batch must leave no trace, and its forward already moved the BatchNorm
        // running statistics (an inf variance would poison every later evaluation).
        let mut buffers = (cfg.on_nan == OnNan::SkipBatch).then(|| buffer_snapshots(&self.net));
        let hint = self.diverged_hint(state);
        let mut totals = EpochTotals::default();
        let mut consecutive_bad = 0;
        let start = Instant::now();
        for (i, batch) in batches.by_ref().take(steps).enumerate() {
            let lr = lr_at(i);
            if self.diagnostics_due(state.global_step) {
                self.record_diagnostics(epoch, &batch, state, &mut totals)?;
            }
            let opt = &mut self.opts[0];
            opt.zero_grad();
            if let Some(buffers) = &mut buffers {
                tch::no_grad(|| {
                    for (live, saved) in buffers.iter_mut() {
                        saved.copy_(live);
                    }
                });
            }
            let at = rules::StepContext {
                global_step: state.global_step,
                epoch: epoch as f64 + i as f64 / steps.max(1) as f64,
            };
            let stats = run_step(cfg, &self.net, &*self.rule, &batch, &at, &state.loss_scaler)?;
            let verdict = state
                .loss_scaler
                .as_mut()
                .map(|scaler| scaler.after_backward(opt));
            if verdict == Some(Verdict::Skip) {
                // An fp16 overflow: the scale was halved; the batch leaves no trace.
                discard_batch(opt, &mut buffers);
                continue;
            }
            if let Some(what) = non_finite(&self.net, 0..self.net.num_modules(), &stats, opt) {
                let msg = format!(
                    "training diverged at epoch {}, step {}: {what}; {hint} — lower --lr or pass --on-nan skip-batch",
                    epoch + 1,
                    i + 1,
                );
                consecutive_bad += 1;
                if cfg.on_nan == OnNan::Stop || consecutive_bad >= 10 {
                    bar.abandon();
                    return Err(Error::NonFinite(msg));
                }
                bar.println(format!("warning: skipping batch: {msg}"));
                discard_batch(opt, &mut buffers);
                continue;
            }
            consecutive_bad = 0;
            if cfg.clip_grad_norm > 0.0 {
                opt.clip_grad_norm(cfg.clip_grad_norm);
            }
            opt.step(lr);
            state.global_step += 1;
            totals.add(&stats);
            let secs = start.elapsed().as_secs_f64();
            let status = format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                totals.module_loss.last().copied().unwrap_or(0.0) / totals.samples.max(1) as f64,
                100.0 * totals.correct as f64 / totals.samples.max(1) as f64,
                totals.samples as f64 / secs.max(1e-9)
            );
            // In a log file (no terminal, so no bar) print a line every tenth of an epoch.
            if log_progress && (i + 1) % (steps / 10).max(1) == 0 {
                eprintln!(
                    "epoch {}/{} step {}/{}: {status}",
                    epoch + 1,
                    cfg.epochs,
                    i + 1,
                    steps
                );
            }
            bar.set_message(status);
            bar.inc(1);
        }
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        if let Some(e) = batches.take_error() {
            return Err(e);
        }
        Ok((totals, seconds, [lr_at(0), lr_at(steps.max(1) - 1)]))
    }

    /// The epoch's `metrics.jsonl` record (printed as one line unless quiet).
    fn epoch_record(
        &self,
        epoch: usize,
        [lr, last_lr]: [f64; 2],
        totals: &EpochTotals,
        seconds: f64,
        eval: &Evaluation,
        state: &TrainState,
    ) -> EpochRecord {
        let cfg = self.cfg;
        let samples = totals.samples.max(1) as f64;
        let record = EpochRecord {
            epoch: epoch + 1,
            lr,
            last_lr,
            train_loss: totals.module_loss.last().copied().unwrap_or(f64::NAN) / samples,
            train_accuracy: totals.correct as f64 / samples,
            test_loss: eval.loss,
            test_accuracy: *eval.module_accuracy.last().unwrap_or(&0.0),
            seconds,
            images_per_second: totals.samples as f64 / seconds.max(1e-9),
            module_test_accuracy: eval.module_accuracy.clone(),
            module_train_loss: totals.module_loss.iter().map(|l| l / samples).collect(),
            sgr_penalty: totals.penalty_mean(),
            grad_cosine: totals.discord_mean(|d| &d.grad_cosine),
            grad_rel_distance: totals.discord_mean(|d| &d.grad_rel_distance),
            bp_cosine: totals.discord_mean(|d| &d.bp_cosine),
            peak_host_rss_bytes: state.peak_host_rss_bytes,
            peak_device_bytes: state.peak_device_bytes,
        };
        if !self.quiet {
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | heads {} | {:.0} img/s",
                epoch + 1,
                cfg.epochs,
                record.train_loss,
                100.0 * record.train_accuracy,
                record.test_loss,
                100.0 * record.test_accuracy,
                record
                    .module_test_accuracy
                    .iter()
                    .map(|a| format!("{:.1}", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join("/"),
                record.images_per_second
            );
        }
        record
    }

    /// Writes `summary.json` (atomically) and returns it.
    fn write_summary(&self, state: &TrainState, eval: Evaluation) -> Result<Summary> {
        let (cfg, net) = (self.cfg, &self.net);
        let summary = Summary {
            rule: cfg.rule.to_string(),
            model: cfg.model.to_string(),
            dataset: cfg.data.to_string(),
            modules: net.num_modules(),
            module_ranges: self.module_ranges(),
            epochs: state.epoch,
            seed: cfg.seed,
            test_accuracy: *eval.module_accuracy.last().unwrap_or(&0.0),
            best_test_accuracy: state.best_test_accuracy,
            module_test_accuracy: eval.module_accuracy,
            train_seconds: state.train_seconds,
            images_per_second: state.images as f64 / state.train_seconds.max(1e-9),
            peak_host_rss_bytes: state.peak_host_rss_bytes,
            peak_device_bytes: state.peak_device_bytes,
            module_activation_bytes: (0..net.num_modules())
                .map(|k| net.module_activation_bytes(k, cfg.batch_size))
                .collect(),
            parameters: net.parameter_count(),
            skipped_images: [&self.ds.train, &self.ds.test]
                .iter()
                .filter_map(|s| s.folder())
                .map(|f| f.skipped())
                .sum(),
            config: cfg.clone(),
        };
        checkpoint::write_atomic(
            &self.out.join("summary.json"),
            &serde_json::to_vec_pretty(&summary).expect("summary serialises"),
        )?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(penalty: f64, applied: bool) -> StepStats {
        StepStats {
            module_losses: vec![1.0, 1.0],
            penalties: vec![0.0, penalty],
            penalty_applied: vec![false, applied],
            correct: 0,
            samples: 8,
        }
    }

    #[test]
    fn sgr_penalty_is_the_mean_over_the_steps_where_it_was_applied() {
        // --sgr-every 2 on K=2: module 2's penalty is applied on every other step; an applied
        // penalty of exactly 0 still counts as a step.
        let mut totals = EpochTotals::default();
        for s in [
            step(0.5, true),
            step(0.0, false),
            step(2.5, true),
            step(0.0, false),
            step(0.0, true),
        ] {
            totals.add(&s);
        }
        assert_eq!(totals.penalty_mean(), vec![0.0, 1.0]);
    }
}
