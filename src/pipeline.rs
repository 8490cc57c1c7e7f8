//! Module-parallel training: the K modules grouped into W contiguous stages, each stage on its
//! own worker (a thread here, an MPI rank in [`crate::distributed`]), joined by links that carry
//! one batch's boundary tensors at a time.
//!
//! # Why this is exact
//! In a local rule, module k's part of step t needs only what module k-1 handed on in step t
//! (its detached output and, for receiver-side SGR, its forwarded gradient, see
//! [`rules::Carry`]), computed with module k-1's parameters after t updates. So stage s can run
//! batch t while stage s-1 already runs batch t+1: each stage updates its own parameters as
//! soon as its part of step t is done, with step t's learning rate, and every module sees
//! exactly the inputs the sequential step gives it. No staleness, no approximation: on the CPU
//! with one thread per worker, the pipeline's weights equal the sequential run's bit for bit
//! (`tests/pipeline.rs`).
//!
//! Sender-side SGR (`--sgr-side sender|both`) is the one backward dependency: module k-1's
//! penalty needs module k's input gradient on the same batch. Across a stage boundary it runs
//! in lock-step: the upstream stage sends its output, waits for the downstream stage's first
//! module to send that target back ([`Link::send_back`]), applies the penalty and only then
//! updates. Still exact; the upstream stage idles for one module's forward and backward per
//! batch at that boundary.
//!
//! Anything that needs every module at once (gradient diagnostics, evaluation, checkpoints)
//! runs at drained points: the trainer feeds a segment of batches, closes the first link, and
//! every stage finishes its last batch and returns before the next segment starts.
use crate::config::TrainConfig;
use crate::data::Batch;
use crate::model::SplitNet;
use crate::optim::Optimizer;
use crate::precision::StepScope;
use crate::rules::{self, Carry, Rule, StepContext, StepRecorder, StepStats};
use crate::{Error, Result};
use indicatif::ProgressBar;
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use tch::{Device, Tensor};

/// One batch crossing a stage boundary.
#[derive(Debug)]
pub struct Packet {
    /// The batch's index in its epoch.
    pub index: usize,
    /// The previous stage's detached output (the images, for stage 0).
    pub h: Tensor,
    /// Receiver-side SGR: the previous module's plain-loss gradient w.r.t. `h`.
    pub forwarded: Option<Tensor>,
    /// The labels.
    pub labels: Tensor,
    /// The images, for a local loss that reads them (InfoPro's reconstruction; see
    /// [`needs_images`]).
    pub images: Option<Tensor>,
}

/// A stage's connections to its neighbours: channels between threads ([`ChannelLink`]) or
/// messages between MPI ranks.
pub trait Link {
    /// The next batch from the previous stage (or the data, for stage 0); `None` when the
    /// segment ends.
    fn recv(&mut self) -> Result<Option<Packet>>;
    /// Hands a batch to the next stage (never called by the last stage).
    fn send(&mut self, packet: Packet) -> Result<()>;
    /// Sender-side SGR: returns the first module's plain input gradient for batch `index` to
    /// the previous stage.
    fn send_back(&mut self, index: usize, grad: Tensor) -> Result<()>;
    /// Sender-side SGR: waits for the next stage's input gradient for batch `index`.
    fn recv_back(&mut self, index: usize) -> Result<Tensor>;
    /// Data-parallel replicas: averages the stage's gradients over its replicas before the
    /// update (a single replica has nothing to do).
    fn reduce_gradients(&mut self, _opt: &mut Optimizer) -> Result<()> {
        Ok(())
    }
}

/// What one stage owns: its modules, and the optimizer over their variables.
pub struct Stage<'a> {
    /// The modules it runs, in order.
    pub modules: Range<usize>,
    /// The network (the stage reads and writes its own modules' tensors only).
    pub net: &'a SplitNet,
    /// The optimizer over the stage's modules' variables.
    pub opt: &'a mut Optimizer,
    /// The rule.
    pub rule: &'a dyn Rule,
    /// Where the stage's variables live.
    pub device: Device,
    /// Whether this is the last stage (it sends nothing on).
    pub last: bool,
    /// Where the stage's time went (accumulated by [`run_stage`]).
    pub timing: StageTiming,
}

/// Where a stage's wall time went: waiting on its links (for a batch, for room downstream, for
/// a sender-side target) or working.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTiming {
    /// Seconds in [`run_stage`].
    pub total: f64,
    /// Seconds blocked on the links.
    pub waiting: f64,
}

impl StageTiming {
    /// The fraction of the time the stage waited (its bubble and back-pressure).
    pub fn idle_fraction(&self) -> f64 {
        if self.total > 0.0 {
            self.waiting / self.total
        } else {
            0.0
        }
    }
}

/// What a segment returns: every batch's stats for the whole network, and each stage's timing.
#[derive(Debug, Default)]
pub struct SegmentOutcome {
    /// Per batch, in order: the stages' stats joined.
    pub stats: Vec<StepStats>,
    /// Per stage.
    pub timings: Vec<StageTiming>,
}

/// Where a segment of batches sits in training: what a stage needs to give each batch its
/// step context and learning rate.
pub struct Segment<'s> {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Steps in the epoch.
    pub steps: usize,
    /// The batch index the segment starts at, and the global step of that batch.
    pub first: (usize, usize),
    /// The learning rate of batch `i` of the epoch.
    pub lr_at: &'s (dyn Fn(usize) -> f64 + Sync),
    /// Bumped by the last stage after each batch (progress display).
    pub progress: Option<&'s ProgressBar>,
}

impl Segment<'_> {
    /// The step context of batch `index` (as the sequential trainer computes it).
    fn context(&self, index: usize) -> StepContext {
        StepContext {
            global_step: self.first.1 + (index - self.first.0),
            epoch: self.epoch as f64 + index as f64 / self.steps.max(1) as f64,
        }
    }
}

/// Whether a stage past the first needs the batch's images: only for a local loss that reads
/// them (InfoPro's decoder reconstructs the input).
pub fn needs_images(net: &SplitNet) -> bool {
    net.spec.local_loss.kind == crate::model::LocalLossKind::Infopro
}

/// Runs `stage` on every batch `link` delivers until the segment ends; returns each batch's
/// stats for the stage's modules, in order.
///
/// Per batch, as the sequential trainer does for the whole network: zero the gradients, run
/// the stage's modules (inside the precision scope), hand the boundary tensors on, apply a
/// lock-step sender penalty if the next stage sends a target back, check that the losses and
/// gradients are finite, average over replicas, clip each module, update.
pub fn run_stage(
    cfg: &TrainConfig,
    stage: &mut Stage,
    link: &mut dyn Link,
    segment: &Segment,
) -> Result<Vec<StepStats>> {
    if cfg.threads > 0 {
        // OpenMP's thread count is per calling thread: a new thread starts at the default.
        tch::set_num_threads(cfg.threads as i32);
    }
    let (net, rule, device) = (stage.net, stage.rule, stage.device);
    let mut stats = Vec::new();
    let started = std::time::Instant::now();
    let mut waiting = 0.0;
    let mut timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t = std::time::Instant::now();
        let out = f();
        waiting += t.elapsed().as_secs_f64();
        out
    };
    loop {
        let mut next = None;
        timed(&mut || {
            next = link.recv()?;
            Ok(())
        })?;
        let Some(packet) = next else { break };
        let index = packet.index;
        let at = segment.context(index);
        let batch = Batch {
            labels: packet.labels.to_device(device),
            images: match &packet.images {
                Some(images) => images.to_device(device),
                None => Tensor::empty([0], (tch::Kind::Float, device)),
            },
        };
        let carry = Carry {
            h: packet.h.to_device(device),
            forwarded: packet.forwarded.map(|g| g.to_device(device)),
        };
        stage.opt.zero_grad();
        let mut record = StepRecorder::new(stage.modules.clone(), batch.labels.size()[0]);
        let scope = StepScope::new(cfg.precision, device, 1.0)?;
        let (carry, last_input) = rules::run_modules(
            rule,
            net,
            stage.modules.clone(),
            carry,
            &batch,
            &at,
            &mut record,
            |grad| link.send_back(index, grad),
        )?;
        if !stage.last {
            let mut packet = Some(Packet {
                index,
                h: carry.h,
                forwarded: carry.forwarded,
                labels: packet.labels,
                images: packet.images,
            });
            timed(&mut || link.send(packet.take().expect("sent once")))?;
        }
        if let Some(input) = last_input {
            let mut target = None;
            timed(&mut || {
                target = Some(link.recv_back(index)?);
                Ok(())
            })?;
            let target = target.expect("received").to_device(device);
            let j = stage.modules.end - 1;
            rule.sender_step(net, j, (&input, &target), &batch, &at, &mut record)?;
        }
        drop(scope);
        let step = record.finish();
        let modules = stage.modules.clone();
        if let Some(what) = crate::train::non_finite(net, modules, &step, stage.opt) {
            return Err(Error::NonFinite(format!(
                "training diverged at epoch {}, step {}: {what}",
                segment.epoch + 1,
                index + 1
            )));
        }
        link.reduce_gradients(stage.opt)?;
        if cfg.clip_grad_norm > 0.0 {
            stage.opt.clip_grad_norm(cfg.clip_grad_norm);
        }
        stage.opt.step((segment.lr_at)(index));
        if let (true, Some(bar)) = (stage.last, segment.progress) {
            bar.inc(1);
        }
        stats.push(step);
    }
    stage.timing.total += started.elapsed().as_secs_f64();
    stage.timing.waiting += waiting;
    Ok(stats)
}

/// The contiguous grouping of K modules of costs `costs` into `workers` stages whose costliest
/// stage costs least (what bounds a pipeline's throughput), and that cost. Exact (dynamic
/// programming over split points, O(K²·W)); among equally good groupings the one with the
/// longest last stages, where feature maps are smallest. `workers` is clamped to 1..=K.
pub fn balanced_stages(costs: &[f64], workers: usize) -> (Vec<Range<usize>>, f64) {
    let k = costs.len();
    if k == 0 {
        return (Vec::new(), 0.0);
    }
    let w = workers.clamp(1, k);
    // best[i][s]: the least possible costliest stage for modules 0..i in s stages, and where
    // its last stage starts.
    let mut best = vec![vec![(f64::INFINITY, 0usize); w + 1]; k + 1];
    best[0][0] = (0.0, 0);
    for i in 1..=k {
        for s in 1..=w.min(i) {
            let mut stage = 0.0;
            for j in (s - 1..i).rev() {
                stage += costs[j];
                let candidate = best[j][s - 1].0.max(stage);
                // `<=` while j falls: the earliest start wins ties, so later stages are longer.
                if candidate <= best[i][s].0 {
                    best[i][s] = (candidate, j);
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(w);
    let mut end = k;
    for s in (1..=w).rev() {
        let start = best[end][s].1;
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    (ranges, best[k][w].0)
}

/// The stages of `net` for `cfg.workers` workers: [`balanced_stages`] over each module's
/// activation bytes, times the rule's penalty factor where SGR regularises (the estimate
/// `--split balanced-memory` balances; a proxy for the module's time).
/// With W = K every module is a stage, so the module split (`--split`) alone sets the balance;
/// `sgr bench pipeline` reports the grouping that measured module times would choose.
pub fn stages_of(cfg: &TrainConfig, net: &SplitNet) -> Vec<Range<usize>> {
    let penalty = net.spec.penalty_cost;
    let costs: Vec<f64> = (0..net.num_modules())
        .map(|k| {
            let bytes = net.module_activation_bytes(k, 1) as f64;
            match penalty {
                // Module numbers are 1-based in `from`.
                Some(p) if k + 1 >= p.from => bytes * p.factor,
                _ => bytes,
            }
        })
        .collect();
    balanced_stages(&costs, cfg.workers).0
}

/// The device of every stage: `--devices`, or `--device` for all of them.
pub fn stage_devices(cfg: &TrainConfig) -> Result<Vec<Device>> {
    if cfg.devices.is_empty() {
        return Ok(vec![cfg.tch_device()?; cfg.workers.max(1)]);
    }
    cfg.devices.iter().map(|d| parse_device(d)).collect()
}

/// `cpu`, `cuda` (the first GPU) or `cuda:N`, checked to exist.
pub fn parse_device(text: &str) -> Result<Device> {
    let bad = |why: String| Error::Config(format!("--devices: `{text}` {why}"));
    let device = match text.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(bad("is not a device (cpu, cuda or cuda:N)".into())),
        },
    };
    let count = tch::Cuda::device_count() as usize;
    if device >= count {
        return Err(bad(format!(
            "does not exist: {count} CUDA device(s) visible{}",
            if count == 0 {
                " (or the binary was built without --features cuda)"
            } else {
                ""
            }
        )));
    }
    Ok(Device::Cuda(device))
}

/// Moves every module's variables (parameters and buffers) to its stage's device.
pub fn place(net: &SplitNet, stages: &[Range<usize>], devices: &[Device]) {
    tch::no_grad(|| {
        for (modules, &device) in stages.iter().zip(devices) {
            for k in modules.clone() {
                for trainable in [true, false] {
                    for (_, mut t) in net.module_variables(k, trainable) {
                        if t.device() != device {
                            t.set_data(&t.to_device(device));
                        }
                    }
                }
            }
        }
    });
}

/// A run's stages, each stage's device and each stage's optimizer ([`set_up`]).
pub type Stages = (Vec<Range<usize>>, Vec<Device>, Vec<Optimizer>);

/// What a run on `cfg.workers` workers needs besides the net: its stages, each stage's
/// device (the net's variables are moved there) and each stage's optimizer (one over every
/// variable for a single stage, as without a pipeline).
pub fn set_up(cfg: &TrainConfig, net: &SplitNet) -> Result<Stages> {
    let stages = stages_of(cfg, net);
    let devices = stage_devices(cfg)?;
    place(net, &stages, &devices);
    let opts = if stages.len() == 1 {
        vec![crate::train::build_optimizer(cfg, net)]
    } else {
        stage_optimizers(cfg, net, &stages)
    };
    Ok((stages, devices, opts))
}

/// One optimizer per stage, over the variables of that stage's modules.
pub fn stage_optimizers(
    cfg: &TrainConfig,
    net: &SplitNet,
    stages: &[Range<usize>],
) -> Vec<Optimizer> {
    stages
        .iter()
        .map(|modules| {
            let owns = |name: &str| {
                net.module_of_variable(name)
                    .is_some_and(|k| modules.contains(&k))
            };
            let mut opt = Optimizer::over(
                &net.vs,
                cfg.optim(),
                &net.no_weight_decay(),
                cfg.channels_last,
                owns,
            );
            opt.set_clip_groups(|name| net.module_of_variable(name).unwrap_or(0));
            opt
        })
        .collect()
}

/// A link between threads: bounded channels to the neighbours (a stage may run at most
/// [`QUEUE`] batches ahead of the next), and back channels for lock-step sender-side SGR.
pub struct ChannelLink {
    input: Receiver<Packet>,
    output: Option<SyncSender<Packet>>,
    back_out: Option<SyncSender<Tensor>>,
    back_in: Option<Receiver<Tensor>>,
}

/// Batches a channel holds: one in flight while the next stage works on another is enough to
/// keep both busy; more would only hold more activations alive.
pub const QUEUE: usize = 1;

/// Returned by a stage whose neighbour stopped: the neighbour's own error is the one to report.
fn neighbour_stopped() -> Error {
    Error::Config("pipeline: a neighbouring stage stopped".into())
}

impl Link for ChannelLink {
    fn recv(&mut self) -> Result<Option<Packet>> {
        Ok(self.input.recv().ok())
    }

    fn send(&mut self, packet: Packet) -> Result<()> {
        let output = self.output.as_ref().expect("the last stage sends nothing");
        output.send(packet).map_err(|_| neighbour_stopped())
    }

    fn send_back(&mut self, _index: usize, grad: Tensor) -> Result<()> {
        let back = self.back_out.as_ref().expect("stage 0 has no predecessor");
        back.send(grad).map_err(|_| neighbour_stopped())
    }

    fn recv_back(&mut self, _index: usize) -> Result<Tensor> {
        let back = self
            .back_in
            .as_ref()
            .expect("the last stage has no successor");
        back.recv().map_err(|_| neighbour_stopped())
    }
}

/// `&SplitNet` handed to the stage threads.
///
/// `tch::Tensor` is not `Sync` (it holds a raw pointer), so neither is `SplitNet`. Sharing is
/// sound here because each stage thread calls the net only for its own modules, whose tensors
/// (parameters, gradients, BatchNorm buffers, heads) no other thread touches while the
/// segment runs; the variable store's map is behind a mutex; gradient mode, autocast and the
/// forward-AD level are thread-local in libtorch or behind our own locks; and libtorch runs a
/// CPU backward on the calling thread.
#[derive(Clone, Copy)]
struct SharedNet<'a>(&'a SplitNet);
// SAFETY: see the type's documentation: threads touch disjoint modules only.
unsafe impl Send for SharedNet<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedNet<'_> {}

impl<'a> SharedNet<'a> {
    /// The net. A method, not the field: a closure that named `.0` would capture the bare
    /// `&SplitNet` (edition 2021 captures fields), which is not `Send`.
    fn net(self) -> &'a SplitNet {
        self.0
    }
}

/// Runs one segment through the stages on threads: `batches` feeds stage 0 from this thread,
/// and every stage returns when the segment is drained. Returns every batch's stats for the
/// whole network (stage parts joined), in order, and each stage's timing.
#[allow(clippy::too_many_arguments)]
pub fn run_segment(
    cfg: &TrainConfig,
    net: &SplitNet,
    rule: &dyn Rule,
    stages: &[Range<usize>],
    devices: &[Device],
    optimizers: &mut [Optimizer],
    segment: &Segment,
    batches: impl Iterator<Item = (usize, Batch)>,
) -> Result<SegmentOutcome> {
    let workers = stages.len();
    let shared = SharedNet(net);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_stage_threads = (cores / workers).max(1);
    // Channel s feeds stage s; back channel s carries targets from stage s+1 to stage s.
    let (feeds, mut inputs): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| sync_channel::<Packet>(QUEUE)).unzip();
    let (back_outs, mut back_ins): (Vec<_>, Vec<_>) = (0..workers.saturating_sub(1))
        .map(|_| sync_channel::<Tensor>(QUEUE))
        .unzip();
    let mut feeds = feeds.into_iter();
    let feed = feeds.next().expect("at least one stage");
    let mut links: Vec<ChannelLink> = Vec::with_capacity(workers);
    let mut outputs: Vec<Option<SyncSender<Packet>>> = feeds.map(Some).collect();
    outputs.push(None);
    let mut back_outs: Vec<Option<SyncSender<Tensor>>> = back_outs.into_iter().map(Some).collect();
    back_outs.insert(0, None);
    for s in (0..workers).rev() {
        links.push(ChannelLink {
            input: inputs.pop().expect("one input per stage"),
            output: outputs.pop().flatten(),
            back_out: back_outs.pop().flatten(),
            back_in: if s + 1 < workers {
                back_ins.pop()
            } else {
                None
            },
        });
    }
    links.reverse();
    let results: Vec<Result<(Vec<StepStats>, StageTiming)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = stages
            .iter()
            .zip(devices)
            .zip(optimizers.iter_mut())
            .zip(links)
            .enumerate()
            .map(|(s, (((modules, &device), opt), mut link))| {
                std::thread::Builder::new()
                    .name(format!("stage-{s}"))
                    .spawn_scoped(scope, move || {
                        let mut stage = Stage {
                            modules: modules.clone(),
                            net: shared.net(),
                            opt,
                            rule,
                            device,
                            last: s + 1 == workers,
                            timing: StageTiming::default(),
                        };
                        if cfg.threads == 0 {
                            // libtorch's default is one thread per core in every thread: W
                            // stages would each take all cores. They share them instead.
                            tch::set_num_threads(per_stage_threads as i32);
                        }
                        let stats = run_stage(cfg, &mut stage, &mut link, segment)?;
                        Ok((stats, stage.timing))
                    })
                    .expect("a stage thread starts")
            })
            .collect();
        for (index, batch) in batches {
            let packet = Packet {
                index,
                h: batch.images.shallow_clone(),
                forwarded: None,
                labels: batch.labels,
                // Shallow clones: in one process a later stage reads the same storage.
                images: Some(batch.images),
            };
            if feed.send(packet).is_err() {
                break; // stage 0 stopped: its error is reported below
            }
        }
        drop(feed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Config("pipeline: a stage panicked".into())))
            })
            .collect()
    });
    // The root cause, not the neighbours that stopped because of it.
    let stopped = neighbour_stopped().to_string();
    let mut parts = Vec::with_capacity(workers);
    let mut timings = Vec::with_capacity(workers);
    let mut first_error = None;
    for result in results {
        match result {
            Ok((stats, timing)) => {
                parts.push(stats);
                timings.push(timing);
            }
            Err(e) if e.to_string() == stopped => {
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let steps = parts.iter().map(Vec::len).min().unwrap_or(0);
    let mut parts: Vec<_> = parts.into_iter().map(Vec::into_iter).collect();
    let stats = (0..steps)
        .map(|_| StepStats::concat(parts.iter_mut().filter_map(Iterator::next).collect()))
        .collect();
    Ok(SegmentOutcome { stats, timings })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(ranges: &[Range<usize>], costs: &[f64]) -> Vec<f64> {
        ranges
            .iter()
            .map(|r| costs[r.clone()].iter().sum())
            .collect()
    }

    #[test]
    fn stages_are_contiguous_cover_every_module_and_minimise_the_costliest() {
        for (costs, workers, want) in [
            (vec![4.0, 4.0], 2, vec![4.0, 4.0]),
            (vec![1.0, 1.0, 1.0, 1.0], 2, vec![2.0, 2.0]),
            (vec![3.0, 1.0, 1.0, 1.0], 2, vec![3.0, 3.0]),
            (vec![1.0, 1.0, 1.0, 1.0, 1.0], 2, vec![2.0, 3.0]),
            // Only the costliest stage bounds throughput; ties give the back stages more.
            (vec![5.0, 1.0, 1.0, 1.0, 1.0], 3, vec![5.0, 1.0, 3.0]),
            (vec![223.0, 194.0, 295.0, 339.0], 2, vec![417.0, 634.0]),
            (vec![2.0, 2.0, 2.0], 3, vec![2.0, 2.0, 2.0]),
            (vec![2.0, 2.0, 2.0], 1, vec![6.0]),
            (vec![2.0, 2.0], 5, vec![2.0, 2.0]),
        ] {
            let (stages, worst) = balanced_stages(&costs, workers);
            assert_eq!(stages.len(), workers.min(costs.len()), "{costs:?}");
            assert_eq!(stages[0].start, 0);
            assert_eq!(stages.last().unwrap().end, costs.len());
            for pair in stages.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(!pair[0].is_empty());
            }
            let got = sizes(&stages, &costs);
            assert_eq!(got, want, "{costs:?} into {workers}");
            assert_eq!(worst, got.iter().cloned().fold(0.0, f64::max));
        }
    }

    #[test]
    fn devices_must_exist() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let e = parse_device("gpu0").unwrap_err().to_string();
        assert!(e.starts_with("--devices: `gpu0`"), "{e}");
        if tch::Cuda::device_count() < 8 {
            let e = parse_device("cuda:7").unwrap_err().to_string();
            assert!(e.contains("does not exist"), "{e}");
        }
    }
}
