//! `--distributed mpi`: `mpirun -np W×R sgr train --distributed mpi --workers W --replicas R`
//! runs stage `r % W` of replica `r / W` on rank r.
//!
//! * Rank 0 runs the ordinary trainer ([`crate::train::run_with_runner`]): it alone reads the
//!   data, evaluates, writes `metrics.jsonl`, diagnostics and the checkpoint, exactly as the
//!   in-process pipeline does (so a run resumes with any W, on threads or on ranks). It also
//!   runs stage 0 of replica 0, and feeds every other replica's stage 0 its share of each
//!   batch (the batch's samples split evenly, in order).
//! * Every other rank builds the same network from the seed on its own, keeps only its stage
//!   busy, and follows rank 0's control messages: take the state (at the start, after a
//!   resume), run a segment, stop.
//! * At every drain (end of a segment: where diagnostics are due, and at the epoch's end) every
//!   rank sends rank 0 its steps' stats, and replica 0's ranks send their stage's variables
//!   (parameters and BatchNorm buffers) and optimizer state, so that rank 0's copy of the whole
//!   network is current for diagnostics, evaluation and the checkpoint.
//! * Replicas: before each update, a stage's gradients are averaged over its R replicas
//!   (all-reduce on a communicator per stage). BatchNorm statistics stay per replica, as in
//!   PyTorch's DDP without SyncBN; the checkpoint holds replica 0's.
//! * Failure: an error on any rank prints one line and calls MPI_Abort, so mpirun ends every
//!   rank, non-zero; a rank that dies is noticed by mpirun itself, which does the same.
use super::mpi::{
    Mpi, TAG_BACK, TAG_STATE, TAG_STATS, all_reduce_mean, broadcast_bytes, recv_i64s, recv_named,
    recv_packet, recv_tensor, send_i64s, send_named, send_packet, send_tensor,
};
use super::{Place, SegmentRunner, check_world_size};
use crate::config::TrainConfig;
use crate::data::{Batch, Dataset, Meta, Source, Split};
use crate::model::SplitNet;
use crate::optim::Optimizer;
use crate::pipeline::{self, Link, Packet, Segment, SegmentOutcome, Stage, StageTiming};
use crate::rules::{self, Rule, StepStats};
use crate::train::Summary;
use crate::{Error, Result};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Message tag of rank 0's control messages to the other ranks.
const TAG_CONTROL: i32 = 5;
/// Control: the stage's variables and optimizer state follow.
const CONTROL_STATE: i64 = 1;
/// Control: run a segment `[_, epoch, steps, first index, first global step]`.
const CONTROL_SEGMENT: i64 = 2;
/// Control: training is over.
const CONTROL_STOP: i64 = 3;

/// Test hook, read only here: `SGR_TEST_KILL_AT_STEP=N` with `SGR_TEST_KILL_RANK=r` makes rank
/// r kill itself with SIGKILL when it receives the batch of global step N (the tests check that
/// the job then ends, non-zero, and that the last checkpoint resumes).
fn kill_hook(rank: usize) -> Option<usize> {
    let step = std::env::var("SGR_TEST_KILL_AT_STEP").ok()?.parse().ok()?;
    let victim: usize = std::env::var("SGR_TEST_KILL_RANK").ok()?.parse().ok()?;
    (victim == rank).then_some(step)
}

/// What `--distributed mpi` cannot run (the same on every rank, so every rank refuses and
/// rank 0 prints it).
fn check_supported(cfg: &TrainConfig) -> Result<()> {
    let fail = |why: &str| Err(Error::Config(format!("--distributed mpi: {why}")));
    if cfg.rule == rules::RuleKind::Bp {
        return fail(
            "rule bp back-propagates through the whole network, so its step cannot be cut into stages; MPI runs local rules (dgl, sgr, fg, fg-sgr)",
        );
    }
    if cfg.precision == crate::precision::Precision::Fp16 {
        return fail(
            "fp16's loss scale is one decision per step for all modules and replicas; use --precision bf16 or fp32",
        );
    }
    if cfg.on_nan == crate::config::OnNan::SkipBatch {
        return fail(
            "--on-nan skip-batch would undo a batch that other ranks already applied; use --on-nan stop",
        );
    }
    Ok(())
}

/// Trains `cfg` into `out` as one rank of an MPI job; returns the summary on rank 0 and `None`
/// on the others. Errors that every rank meets alike (the job's size, an unsupported option,
/// rank 0's set-up: data, model, run folder) are returned on every rank, printed by rank 0
/// only (see `main`), and leave no run folder; an error during training on any rank ends the
/// whole job through MPI_Abort.
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool, quiet: bool) -> Result<Option<Summary>> {
    let m = Mpi::init()?;
    check_world_size(m.size(), cfg.workers, cfg.replicas)?;
    check_supported(cfg)?;
    let place = Place {
        rank: m.rank(),
        workers: cfg.workers,
        replicas: cfg.replicas,
    };
    let world = m.world();
    // Rank 0 reads the data and checks the model, as `sgr train` does in one process; the
    // others get the data set's description (what building the network needs), or nothing
    // when rank 0 failed.
    let data = (place.rank == 0).then(|| {
        let ds = crate::train::load_data(cfg)?;
        crate::train::check_model(cfg, &ds)?;
        Ok(ds)
    });
    let payload = match &data {
        Some(Ok(ds)) => serde_json::to_vec(&ds.meta).expect("meta serialises"),
        _ => Vec::new(),
    };
    let meta = broadcast_bytes(world, &payload);
    let data = match data {
        Some(Err(e)) => return Err(e),
        Some(Ok(ds)) => Some(ds),
        None if meta.is_empty() => return Err(collective("rank 0 could not load the data")),
        None => None,
    };
    // Every other rank builds its stage; the run folder is written only once all have.
    let follower = match data {
        Some(_) => None,
        None => Some(
            serde_json::from_slice::<Meta>(&meta)
                .map_err(|e| Error::Config(format!("distributed: bad data description ({e})")))
                .and_then(|meta| Follower::build(cfg, place, meta)),
        ),
    };
    let built = !matches!(follower, Some(Err(_)));
    if let Some(Err(e)) = &follower {
        eprintln!(
            "error: rank {}: {}",
            place.rank,
            e.to_string().replace('\n', " ")
        );
    }
    if !all_agree(world, built) {
        return Err(collective(
            "a rank could not build its stage (its error is above)",
        ));
    }
    let written = data.as_ref().map(|_| write_run_folder(cfg, out));
    let ok = matches!(written, Some(Ok(())));
    let ok = broadcast_bytes(world, &[ok as u8]) == [1];
    if let Some(Err(e)) = written {
        return Err(e);
    }
    if !ok {
        return Err(collective("rank 0 could not write the run folder"));
    }
    // The R replicas of each stage average their gradients on their own communicator.
    let stage_comm = world
        .split_by_color(Color::with_value(place.stage() as i32))
        .ok_or_else(|| Error::Config("distributed: cannot split the communicator".into()))?;
    let ranks = Ranks {
        world,
        stage_comm: &stage_comm,
        place,
        kill: kill_hook(place.rank),
    };
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    } else {
        // libtorch's default is one thread per core in every process: the ranks on one host
        // share its cores instead, as the in-process pipeline's stages do.
        let local = world.split_shared(place.rank as i32).size().max(1) as usize;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / local).max(1) as i32);
    }
    if let Some(ds) = data {
        let mut runner = RootRunner {
            ranks,
            sent_state: false,
            timings: vec![StageTiming::default(); cfg.workers],
        };
        return match crate::train::run_with_runner(cfg, &ds, out, resume, quiet, Some(&mut runner))
        {
            Ok(summary) => {
                for r in 1..m.size() {
                    send_i64s(world, r as i32, TAG_CONTROL, &[CONTROL_STOP]);
                }
                if !quiet {
                    let idle: Vec<String> = runner
                        .timings
                        .iter()
                        .map(|t| format!("{:.0}%", 100.0 * t.idle_fraction()))
                        .collect();
                    eprintln!(
                        "mpi: {} ranks ({} stage(s) × {} replica(s)); time each stage of replica 0 waited on its links: {}",
                        m.size(),
                        place.workers,
                        place.replicas,
                        idle.join(" ")
                    );
                }
                Ok(Some(summary))
            }
            Err(e) => m.abort(&e),
        };
    }
    let mut follower = follower.expect("a rank other than 0").expect("built");
    match follower.follow(cfg, ranks) {
        Ok(()) => Ok(None),
        Err(e) => m.abort(&e),
    }
}

/// An error every rank returns because one of them failed (that one printed why); `main`
/// prints nothing for it on ranks other than 0.
fn collective(what: &str) -> Error {
    Error::Config(format!("--distributed mpi: {what}"))
}

/// Whether `ok` holds on every rank (a logical and over the world).
fn all_agree(world: &SimpleCommunicator, ok: bool) -> bool {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    let mine = [ok as i32];
    let mut all = [0i32];
    world.all_reduce_into(&mine[..], &mut all[..], SystemOperation::min());
    all[0] == 1
}

/// Rank 0 writes the run folder and its `config.json`, as `sgr train` does before training.
fn write_run_folder(cfg: &TrainConfig, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json = serde_json::to_vec_pretty(cfg).expect("config serialises");
    crate::checkpoint::write_atomic(&out.join("config.json"), &json)
}

/// A data set with `meta` and no images: what a rank other than 0 builds the network from.
fn description_only(meta: Meta) -> Dataset {
    let empty = || Split {
        images: Tensor::zeros(
            [0, meta.channels, meta.height, meta.width],
            (Kind::Uint8, Device::Cpu),
        ),
        labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
    };
    Dataset {
        train: Source::Memory(empty()),
        test: Source::Memory(empty()),
        meta,
    }
}

/// Every variable (parameters and buffers) of the modules `modules`.
fn stage_variables(net: &SplitNet, modules: Range<usize>) -> Vec<(String, Tensor)> {
    modules
        .flat_map(|k| {
            let mut v = net.module_variables(k, true);
            v.extend(net.module_variables(k, false));
            v
        })
        .collect()
}

/// Copies `received` into `net`'s variables of the same names.
fn load_variables(net: &SplitNet, received: Vec<(String, Tensor)>) -> Result<()> {
    let mut vars = net.vs.variables();
    tch::no_grad(|| {
        for (name, t) in received {
            let dst = vars.get_mut(&name).ok_or_else(|| {
                Error::Config(format!("distributed: received unknown variable `{name}`"))
            })?;
            if dst.size() != t.size() {
                return Err(Error::Config(format!(
                    "distributed: variable `{name}` has the wrong shape"
                )));
            }
            dst.copy_(&t);
        }
        Ok(())
    })
}

/// Sends the variables and optimizer state of the stage with `modules` to rank `to`.
fn send_state(
    world: &SimpleCommunicator,
    to: i32,
    net: &SplitNet,
    modules: Range<usize>,
    opt: &Optimizer,
) -> Result<()> {
    send_named(world, to, TAG_STATE, &stage_variables(net, modules))?;
    send_named(world, to, TAG_STATE, &opt.state())
}

/// Receives what [`send_state`] sent into `net` and `opt`.
fn recv_state(
    world: &SimpleCommunicator,
    from: i32,
    net: &SplitNet,
    opt: &mut Optimizer,
) -> Result<()> {
    load_variables(net, recv_named(world, from, TAG_STATE, Device::Cpu)?)?;
    let state: HashMap<String, Tensor> = recv_named(world, from, TAG_STATE, Device::Cpu)?
        .into_iter()
        .collect();
    opt.load_state(&state)
}

/// A stage's timing and its steps' stats as one message of `f64`s: the timing, then per step
/// each list with its length first.
fn encode_stats(stats: &[StepStats], timing: StageTiming) -> Vec<f64> {
    let mut v = vec![timing.total, timing.waiting, stats.len() as f64];
    for s in stats {
        v.push(s.module_losses.len() as f64);
        v.extend(&s.module_losses);
        v.push(s.penalties.len() as f64);
        v.extend(&s.penalties);
        v.push(s.penalty_applied.len() as f64);
        v.extend(s.penalty_applied.iter().map(|&a| a as u8 as f64));
        v.push(s.correct as f64);
        v.push(s.samples as f64);
    }
    v
}

/// Reads what [`encode_stats`] wrote.
fn decode_stats(v: &[f64]) -> Result<(Vec<StepStats>, StageTiming)> {
    let bad = || Error::Config("distributed: bad step statistics message".into());
    let mut it = v.iter().copied();
    let mut next = || it.next().ok_or_else(bad);
    let timing = StageTiming {
        total: next()?,
        waiting: next()?,
    };
    let steps = next()? as usize;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let list = |next: &mut dyn FnMut() -> Result<f64>| -> Result<Vec<f64>> {
            let n = next()? as usize;
            (0..n).map(|_| next()).collect()
        };
        let module_losses = list(&mut next)?;
        let penalties = list(&mut next)?;
        let penalty_applied = list(&mut next)?.into_iter().map(|a| a != 0.0).collect();
        let correct = next()? as i64;
        let samples = next()? as i64;
        out.push(StepStats {
            module_losses,
            penalties,
            penalty_applied,
            correct,
            samples,
        });
    }
    Ok((out, timing))
}

/// One stage's stats of one step over its replicas: losses and penalties as means over all
/// their samples (what one process computes on the whole batch, up to BatchNorm's
/// per-replica statistics), correct counts and samples summed.
fn combine_replicas(parts: Vec<StepStats>) -> StepStats {
    if parts.len() == 1 {
        return parts.into_iter().next().expect("one part");
    }
    let total: i64 = parts.iter().map(|p| p.samples).sum();
    let weighted = |pick: &dyn Fn(&StepStats) -> &Vec<f64>| -> Vec<f64> {
        let len = pick(&parts[0]).len();
        (0..len)
            .map(|k| {
                parts
                    .iter()
                    .map(|p| pick(p)[k] * p.samples as f64)
                    .sum::<f64>()
                    / total.max(1) as f64
            })
            .collect()
    };
    StepStats {
        module_losses: weighted(&|p| &p.module_losses),
        penalties: weighted(&|p| &p.penalties),
        penalty_applied: (0..parts[0].penalty_applied.len())
            .map(|k| parts.iter().any(|p| p.penalty_applied[k]))
            .collect(),
        correct: parts.iter().map(|p| p.correct).sum(),
        samples: total,
    }
}

/// Where a stage's batches come from.
enum Upstream<'f> {
    /// The previous stage's rank.
    Rank(i32),
    /// Rank 0's data: each batch is split over the replicas; `replicas` are the stage-0 ranks
    /// of replicas 1.., which get their shares as packets.
    Feed {
        batches: &'f mut dyn Iterator<Item = (usize, Batch)>,
        replicas: Vec<i32>,
    },
}

/// A stage's [`Link`] over MPI.
struct MpiLink<'a> {
    world: &'a SimpleCommunicator,
    upstream: Upstream<'a>,
    /// The next stage's rank (none for the last stage).
    next: Option<i32>,
    /// The previous stage's rank (for sender-side SGR's targets; none for stage 0).
    prev: Option<i32>,
    /// The stage's R replicas, for the gradient average.
    stage_comm: &'a SimpleCommunicator,
    device: Device,
    /// Whether later stages need the images (InfoPro), so rank 0 sends them along.
    images: bool,
    /// The segment's first (index, global step), for the kill hook.
    first: (usize, usize),
    kill: Option<usize>,
}

impl MpiLink<'_> {
    /// The kill hook (tests only): dies as a rank killed by the OOM killer would.
    fn maybe_die(&self, index: usize) {
        let Some(at) = self.kill else { return };
        if self.first.1 + index - self.first.0 == at {
            eprintln!(
                "rank {}: SGR_TEST_KILL_AT_STEP={at}: killing this rank with SIGKILL",
                self.world.rank()
            );
            #[cfg(target_os = "linux")]
            // SAFETY: plain libc calls on this process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            #[cfg(not(target_os = "linux"))]
            std::process::abort();
        }
    }
}

impl Link for MpiLink<'_> {
    fn recv(&mut self) -> Result<Option<Packet>> {
        let packet = match &mut self.upstream {
            Upstream::Rank(from) => recv_packet(self.world, *from, self.device)?,
            Upstream::Feed { batches, replicas } => match batches.next() {
                None => {
                    for &r in replicas.iter() {
                        send_packet(self.world, r, None)?;
                    }
                    None
                }
                Some((index, batch)) => {
                    let n = batch.labels.size()[0];
                    let shares = replicas.len() as i64 + 1;
                    if n < shares {
                        return Err(Error::Config(format!(
                            "--replicas {shares}: batch {} has {n} sample(s), fewer than the replicas",
                            index + 1
                        )));
                    }
                    // Replica q takes samples [q·n/R, (q+1)·n/R): even shares, in order.
                    let share = |q: i64| {
                        let (a, b) = (q * n / shares, (q + 1) * n / shares);
                        let images = batch.images.narrow(0, a, b - a);
                        Packet {
                            index,
                            h: images.shallow_clone(),
                            forwarded: None,
                            labels: batch.labels.narrow(0, a, b - a),
                            images: self.images.then_some(images),
                        }
                    };
                    for (q, &r) in replicas.iter().enumerate() {
                        send_packet(self.world, r, Some(&share(q as i64 + 1)))?;
                    }
                    Some(share(0))
                }
            },
        };
        match &packet {
            Some(p) => self.maybe_die(p.index),
            // The segment ends here too: the next stage must hear it.
            None => {
                if let Some(next) = self.next {
                    send_packet(self.world, next, None)?;
                }
            }
        }
        Ok(packet)
    }

    fn send(&mut self, packet: Packet) -> Result<()> {
        let next = self.next.expect("the last stage sends nothing");
        send_packet(self.world, next, Some(&packet))
    }

    fn send_back(&mut self, index: usize, grad: Tensor) -> Result<()> {
        let prev = self.prev.expect("stage 0 has no predecessor");
        send_i64s(self.world, prev, TAG_BACK, &[index as i64]);
        send_tensor(self.world, prev, TAG_BACK, &grad)
    }

    fn recv_back(&mut self, index: usize) -> Result<Tensor> {
        let next = self.next.expect("the last stage has no successor");
        let got = recv_i64s(self.world, next, TAG_BACK);
        if got != [index as i64] {
            return Err(Error::Config(format!(
                "distributed: expected the target of batch {index} from rank {next}, got {got:?}"
            )));
        }
        recv_tensor(self.world, next, TAG_BACK, self.device)
    }

    fn reduce_gradients(&mut self, opt: &mut Optimizer) -> Result<()> {
        all_reduce_mean(self.stage_comm, opt.flat_grads())
    }
}

/// This rank's place in the job and its communicators.
#[derive(Clone, Copy)]
struct Ranks<'a> {
    world: &'a SimpleCommunicator,
    /// The R replicas of this rank's stage.
    stage_comm: &'a SimpleCommunicator,
    place: Place,
    /// The kill hook's global step (tests only).
    kill: Option<usize>,
}

impl<'a> Ranks<'a> {
    /// The link of this rank's stage for `segment`, between its replica's neighbours.
    fn link(
        self,
        upstream: Upstream<'a>,
        device: Device,
        images: bool,
        segment: &Segment,
    ) -> MpiLink<'a> {
        let (q, s) = (self.place.replica(), self.place.stage());
        MpiLink {
            world: self.world,
            upstream,
            next: (s + 1 < self.place.workers).then(|| self.place.rank_of(q, s + 1) as i32),
            prev: (s > 0).then(|| self.place.rank_of(q, s - 1) as i32),
            stage_comm: self.stage_comm,
            device,
            images,
            first: segment.first,
            kill: self.kill,
        }
    }
}

/// Rank 0's side of every segment: stage 0 of replica 0 fed from the trainer's batches, then
/// the drain (everyone's stats, replica 0's stages' state).
struct RootRunner<'a> {
    ranks: Ranks<'a>,
    /// Whether the other ranks have rank 0's (possibly resumed) state yet.
    sent_state: bool,
    /// Replica 0's stages' timings over the run so far.
    timings: Vec<StageTiming>,
}

impl SegmentRunner for RootRunner<'_> {
    fn run_segment(
        &mut self,
        cfg: &TrainConfig,
        net: &SplitNet,
        rule: &dyn Rule,
        stages: &[Range<usize>],
        devices: &[Device],
        optimizers: &mut [Optimizer],
        segment: &Segment,
        batches: &mut dyn Iterator<Item = (usize, Batch)>,
    ) -> Result<SegmentOutcome> {
        let (world, place) = (self.ranks.world, self.ranks.place);
        let size = world.size() as usize;
        let stage_of = |r: usize| Place { rank: r, ..place }.stage();
        if !self.sent_state {
            // A resumed run's weights and optimizer state exist on rank 0 only.
            for r in 1..size {
                let s = stage_of(r);
                send_i64s(world, r as i32, TAG_CONTROL, &[CONTROL_STATE]);
                send_state(world, r as i32, net, stages[s].clone(), &optimizers[s])?;
            }
            self.sent_state = true;
        }
        let header = [
            CONTROL_SEGMENT,
            segment.epoch as i64,
            segment.steps as i64,
            segment.first.0 as i64,
            segment.first.1 as i64,
        ];
        for r in 1..size {
            send_i64s(world, r as i32, TAG_CONTROL, &header);
        }
        let replicas = (1..place.replicas)
            .map(|q| place.rank_of(q, 0) as i32)
            .collect();
        let mut link = self.ranks.link(
            Upstream::Feed { batches, replicas },
            devices[0],
            pipeline::needs_images(net),
            segment,
        );
        let mut stage = Stage {
            modules: stages[0].clone(),
            net,
            opt: &mut optimizers[0],
            rule,
            device: devices[0],
            last: place.workers == 1,
            timing: StageTiming::default(),
        };
        let mine = pipeline::run_stage(cfg, &mut stage, &mut link, segment)?;
        // The drain: every rank's stats and timing, then replica 0's stages' state.
        let mut timings = vec![stage.timing];
        let mut by_rank = vec![mine];
        for r in 1..size {
            let v = super::mpi::recv_f64s(world, r as i32, TAG_STATS);
            let (stats, timing) = decode_stats(&v)?;
            if r < place.workers {
                timings.push(timing);
            }
            by_rank.push(stats);
        }
        for (s, opt) in optimizers.iter_mut().enumerate().skip(1) {
            recv_state(world, place.rank_of(0, s) as i32, net, opt)?;
        }
        let steps = by_rank.iter().map(Vec::len).min().unwrap_or(0);
        let mut parts: Vec<_> = by_rank.into_iter().map(Vec::into_iter).collect();
        let stats: Vec<StepStats> = (0..steps)
            .map(|_| {
                let per_rank: Vec<StepStats> =
                    parts.iter_mut().map(|p| p.next().expect("steps")).collect();
                let per_stage = (0..place.workers)
                    .map(|s| {
                        combine_replicas(
                            (0..place.replicas)
                                .map(|q| per_rank[place.rank_of(q, s)].clone())
                                .collect(),
                        )
                    })
                    .collect();
                StepStats::concat(per_stage)
            })
            .collect();
        for (sum, t) in self.timings.iter_mut().zip(&timings) {
            sum.total += t.total;
            sum.waiting += t.waiting;
        }
        if let (true, Some(bar)) = (place.workers > 1, segment.progress) {
            bar.inc(stats.len() as u64);
        }
        Ok(SegmentOutcome { stats, timings })
    }
}

/// A rank other than 0: the network built from the seed, its stage and the stage's optimizer.
struct Follower {
    net: SplitNet,
    modules: Range<usize>,
    device: Device,
    opt: Optimizer,
    rule: Box<dyn Rule>,
}

impl Follower {
    /// Builds the network from the seed and the stage `place` runs, with its optimizer.
    fn build(cfg: &TrainConfig, place: Place, meta: Meta) -> Result<Follower> {
        let ds = description_only(meta);
        let net = crate::train::build_net(cfg, &ds)?;
        let stages = pipeline::stages_of(cfg, &net);
        let devices = pipeline::stage_devices(cfg)?;
        let s = place.stage();
        let (modules, device) = (stages[s].clone(), devices[s]);
        pipeline::place(&net, &stages[s..=s], &devices[s..=s]);
        // The optimizer rank 0's trainer builds for this stage, so that replicas' flat
        // gradient buffers have the same layout for the all-reduce.
        let opt = if stages.len() == 1 {
            crate::train::build_optimizer(cfg, &net)
        } else {
            pipeline::stage_optimizers(cfg, &net, &stages[s..=s])
                .pop()
                .expect("one stage")
        };
        Ok(Follower {
            rule: rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg()),
            net,
            modules,
            device,
            opt,
        })
    }

    /// Runs the stage on every segment rank 0 announces until it says stop.
    fn follow(&mut self, cfg: &TrainConfig, ranks: Ranks) -> Result<()> {
        let (world, place) = (ranks.world, ranks.place);
        let s = place.stage();
        let schedule = cfg.schedule();
        loop {
            let control = recv_i64s(world, 0, TAG_CONTROL);
            match control.as_slice() {
                [CONTROL_STOP] => return Ok(()),
                [CONTROL_STATE] => recv_state(world, 0, &self.net, &mut self.opt)?,
                &[CONTROL_SEGMENT, epoch, steps, first_index, first_step] => {
                    let (epoch, steps) = (epoch as usize, steps as usize);
                    let lr_at = |i: usize| schedule.lr(epoch, i, steps, cfg.epochs);
                    let segment = Segment {
                        epoch,
                        steps,
                        first: (first_index as usize, first_step as usize),
                        lr_at: &lr_at,
                        progress: None,
                    };
                    let upstream = Upstream::Rank(if s == 0 {
                        0
                    } else {
                        place.rank_of(place.replica(), s - 1) as i32
                    });
                    let images = pipeline::needs_images(&self.net);
                    let mut link = ranks.link(upstream, self.device, images, &segment);
                    let mut stage = Stage {
                        modules: self.modules.clone(),
                        net: &self.net,
                        opt: &mut self.opt,
                        rule: &*self.rule,
                        device: self.device,
                        last: s + 1 == place.workers,
                        timing: StageTiming::default(),
                    };
                    let stats = pipeline::run_stage(cfg, &mut stage, &mut link, &segment)?;
                    let message = encode_stats(&stats, stage.timing);
                    super::mpi::send_f64s(world, 0, TAG_STATS, &message);
                    if place.replica() == 0 {
                        send_state(world, 0, &self.net, self.modules.clone(), &self.opt)?;
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "distributed: unexpected control message {other:?} from rank 0"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(losses: Vec<f64>, correct: i64, samples: i64) -> StepStats {
        StepStats {
            penalties: vec![0.5; losses.len()],
            penalty_applied: vec![true; losses.len()],
            module_losses: losses,
            correct,
            samples,
        }
    }

    #[test]
    fn step_stats_survive_the_wire() {
        let sent = vec![stats(vec![1.25, -0.1], 3, 8), stats(vec![f64::NAN], 0, 0)];
        let timing = StageTiming {
            total: 2.5,
            waiting: 0.5,
        };
        let (got, t) = decode_stats(&encode_stats(&sent, timing)).unwrap();
        assert_eq!(t, timing);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].module_losses, sent[0].module_losses);
        assert_eq!(got[0].penalty_applied, sent[0].penalty_applied);
        assert_eq!((got[0].correct, got[0].samples), (3, 8));
        assert!(got[1].module_losses[0].is_nan());
        assert!(decode_stats(&[0.0, 0.0, 2.0, 1.0]).is_err());
    }

    #[test]
    fn replicas_combine_as_one_batch() {
        // Shares of 3 and 1 samples: the loss is the mean over the 4 samples.
        let c = combine_replicas(vec![stats(vec![1.0], 2, 3), stats(vec![5.0], 1, 1)]);
        assert_eq!(c.module_losses, vec![2.0]);
        assert_eq!((c.correct, c.samples), (3, 4));
    }
}
