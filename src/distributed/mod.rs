//! Training across processes: `--distributed mpi` runs the pipeline's stages (and data-parallel
//! replicas) as MPI ranks. The MPI code is in [`mpi`], compiled only with the cargo feature
//! `mpi`; what is here is compiled in every build: the checks that need no MPI, the message a
//! build without the feature gives, and the self-test's tensors.
use crate::{Error, Result};
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[cfg(feature = "mpi")]
mod driver;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod wire;

#[cfg(feature = "mpi")]
pub use driver::train;

use crate::config::TrainConfig;
use crate::data::Batch;
use crate::model::SplitNet;
use crate::optim::Optimizer;
use crate::pipeline::{Segment, SegmentOutcome};
use crate::rules::Rule;
use std::ops::Range;

/// Runs one segment of the pipeline for the trainer ([`crate::train::run_with_runner`]) some
/// other way than on threads in this process: under `--distributed mpi`, rank 0's trainer
/// hands each segment to the ranks that run the stages and replicas, and gets back every
/// step's stats and, at the drain, the other stages' variables and optimizer state.
pub trait SegmentRunner {
    /// [`crate::pipeline::run_segment`]'s contract: run `batches` (index in the epoch, batch)
    /// through the stages and return every step's stats for the whole network, in order, and
    /// each stage's timing, with `net` and `optimizers` holding every stage's state afterwards.
    #[allow(clippy::too_many_arguments)]
    fn run_segment(
        &mut self,
        cfg: &TrainConfig,
        net: &SplitNet,
        rule: &dyn Rule,
        stages: &[Range<usize>],
        devices: &[tch::Device],
        optimizers: &mut [Optimizer],
        segment: &Segment,
        batches: &mut dyn Iterator<Item = (usize, Batch)>,
    ) -> Result<SegmentOutcome>;
}

/// Where rank `rank` sits in a job of `workers` stages × `replicas` replicas: rank r runs
/// stage r % W of replica r / W, so a replica's stages are consecutive ranks (neighbours on one
/// host when mpirun fills hosts in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// This rank.
    pub rank: usize,
    /// Stages per replica (W).
    pub workers: usize,
    /// Replicas (R).
    pub replicas: usize,
}

impl Place {
    /// The stage this rank runs.
    pub fn stage(&self) -> usize {
        self.rank % self.workers
    }

    /// The replica this rank belongs to.
    pub fn replica(&self) -> usize {
        self.rank / self.workers
    }

    /// The rank that runs `stage` of `replica`.
    pub fn rank_of(&self, replica: usize, stage: usize) -> usize {
        replica * self.workers + stage
    }
}

/// The rank of this process in its MPI job, read from the launcher's environment (so that it
/// is known before MPI is initialised, e.g. to print a bad flag's error on rank 0 only).
pub fn launched_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// What `--distributed mpi` says in a binary built without the `mpi` feature (the same line as
/// the configuration check's).
pub fn not_built() -> Error {
    Error::Config(
        "--distributed: mpi: this binary was built without the `mpi` feature; build it with `cargo build --release --features mpi`"
            .into(),
    )
}

/// Whether this binary can run `--distributed mpi`.
pub const AVAILABLE: bool = cfg!(feature = "mpi");

/// Checks that the job has one rank per stage and replica: `size == workers × replicas`.
pub fn check_world_size(size: usize, workers: usize, replicas: usize) -> Result<()> {
    let want = workers * replicas;
    if size == want {
        return Ok(());
    }
    Err(Error::Config(format!(
        "--distributed mpi: the job has {size} rank{} but --workers {workers} × --replicas {replicas} needs {want}; start it with `mpirun -np {want}` or change --workers/--replicas",
        if size == 1 { "" } else { "s" }
    )))
}

/// The number of ranks of the job that started this process, when an MPI launcher
/// (OpenMPI's or MPICH's/Hydra's mpirun) did, read from the launcher's environment without
/// initialising MPI. Lets a run that forgot `--distributed mpi` under `mpirun -np 4` refuse
/// rather than have four independent runs write the same run folder.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// What a rank other than 0 does with an error that ended its command (`main` prints errors
/// on rank 0 only). An error met once MPI is running is one every rank met alike (the driver
/// aborts the job on any other), so it is not printed again. An error met before (a bad flag
/// or file, which usually every rank meets alike) may be this rank's own, e.g. a device its
/// host lacks: the rank then joins MPI's start-up, which completes only if rank 0 did not fail
/// too (otherwise mpirun ends the job on rank 0's exit, and rank 0's line is the one shown),
/// and ends the job with its own line through MPI_Abort.
#[cfg(feature = "mpi")]
pub fn rank_failed(e: &dyn std::fmt::Display) {
    if ::mpi::environment::is_initialized() {
        return;
    }
    if let Ok(m) = mpi::Mpi::init() {
        m.abort(e);
    }
}

/// Without MPI there is no job to end: nothing to do.
#[cfg(not(feature = "mpi"))]
pub fn rank_failed(_e: &dyn std::fmt::Display) {}

/// The error of a non-distributed run under a launcher that started several ranks.
pub fn check_not_launched() -> Result<()> {
    match launched_ranks() {
        Some(n) if n > 1 => Err(Error::Config(format!(
            "started by mpirun with {n} ranks but without --distributed mpi: every rank would train the same run; add --distributed mpi --workers W (and --replicas R) with W × R = {n}"
        ))),
        _ => Ok(()),
    }
}

/// The tensors `sgr internal-mpi-selftest` sends from rank 0 to rank 1 and back: every kind a
/// message can carry, 0-dimensional, empty, non-contiguous and multi-megabyte (past the
/// eager limit of shared-memory transports, so that the large-message path is used).
/// Deterministic without touching the global random generator.
pub fn selftest_tensors() -> Vec<(String, Tensor)> {
    let wave = |n: i64| {
        Tensor::arange(n, (Kind::Double, tch::Device::Cpu))
            .g_mul_scalar(0.37)
            .sin()
    };
    let ints = |n: i64| {
        Tensor::arange(n, (Kind::Int64, tch::Device::Cpu))
            .g_mul_scalar(7919)
            .remainder(201)
            .g_sub_scalar(100)
    };
    vec![
        (
            "f32_2x3x4".into(),
            wave(24).to_kind(Kind::Float).reshape([2, 3, 4]),
        ),
        ("f64_5".into(), wave(5).g_mul_scalar(1e10)),
        ("i64_labels_7".into(), ints(7).remainder(10).abs()),
        (
            "u8_1x28x28".into(),
            ints(784)
                .remainder(256)
                .abs()
                .to_kind(Kind::Uint8)
                .reshape([1, 28, 28]),
        ),
        ("i8_6".into(), ints(6).to_kind(Kind::Int8)),
        (
            "i16_3x2".into(),
            ints(6)
                .g_mul_scalar(300)
                .to_kind(Kind::Int16)
                .reshape([3, 2]),
        ),
        ("i32_scalar".into(), Tensor::from(-123456i32)),
        ("bool_3x3".into(), ints(9).remainder(3).eq(0)),
        (
            "f16_4x4".into(),
            wave(16).to_kind(Kind::Half).reshape([4, 4]),
        ),
        (
            "bf16_2x2".into(),
            wave(4).to_kind(Kind::BFloat16).reshape([2, 2]),
        ),
        (
            "f32_empty_0x3".into(),
            Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu)),
        ),
        (
            "f32_transposed_5x3".into(),
            wave(15).to_kind(Kind::Float).reshape([3, 5]).tr(),
        ),
        ("f32_4mib".into(), wave(1 << 20).to_kind(Kind::Float)),
    ]
}

/// Options of `sgr internal-mpi-selftest`.
#[derive(Debug, Clone, Default)]
pub struct SelftestOptions {
    /// Folder for `rank0.safetensors` and `rank1.safetensors` (what each rank received).
    pub out: PathBuf,
    /// After the round trip, ping-pong a tensor until this rank kills itself with SIGKILL at
    /// round `kill_after` (the job must then end, not hang).
    pub kill_rank: Option<usize>,
    /// Round at which `kill_rank` kills itself.
    pub kill_after: usize,
    /// This rank returns an error instead of taking part (the job must end through MPI_Abort).
    pub fail_rank: Option<usize>,
}

/// Runs the MPI self-test (2 ranks); what rank 0 prints on success (nothing on rank 1).
#[cfg(not(feature = "mpi"))]
pub fn selftest(_opts: &SelftestOptions) -> Result<Option<String>> {
    Err(not_built())
}

/// Runs the MPI self-test (2 ranks); what rank 0 prints on success (nothing on rank 1). Any
/// error on a rank ends the whole job through MPI_Abort.
#[cfg(feature = "mpi")]
pub fn selftest(opts: &SelftestOptions) -> Result<Option<String>> {
    let m = mpi::Mpi::init()?;
    match selftest_ranks(&m, opts) {
        Ok(msg) => Ok((m.rank() == 0).then_some(msg)),
        Err(e) => m.abort(&e),
    }
}

#[cfg(feature = "mpi")]
fn selftest_ranks(m: &mpi::Mpi, opts: &SelftestOptions) -> Result<String> {
    use self::mpi::{
        Packet, TAG_TEST, identical, recv_packet, recv_tensor, send_packet, send_tensor,
    };
    use tch::Device;
    let world = m.world();
    if m.size() != 2 {
        return Err(Error::Config(format!(
            "internal-mpi-selftest needs 2 ranks, the job has {}",
            m.size()
        )));
    }
    let rank = m.rank();
    if opts.fail_rank == Some(rank) {
        return Err(Error::Config("deliberate failure (--fail-rank)".into()));
    }
    let other = (1 - rank) as i32;
    let sent = selftest_tensors();
    let mut received = Vec::new();
    if rank == 0 {
        for (_, t) in &sent {
            send_tensor(world, other, TAG_TEST, t)?;
        }
        for (name, t) in &sent {
            let back = recv_tensor(world, other, TAG_TEST, Device::Cpu)?;
            if !identical(t, &back) {
                return Err(Error::Config(format!("{name} came back changed")));
            }
            received.push((name.clone(), back));
        }
    } else {
        for (name, _) in &sent {
            received.push((
                name.clone(),
                recv_tensor(world, other, TAG_TEST, Device::Cpu)?,
            ));
        }
        for (_, t) in &received {
            send_tensor(world, other, TAG_TEST, t)?;
        }
    }
    // Packets: rank 0 sends two batches (with and without the optional fields) and the end of
    // the segment; rank 1 returns each batch with its index plus 100.
    let get = |name: &str| {
        sent.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let packets = [
        Packet {
            index: 3,
            h: get("f32_2x3x4"),
            forwarded: Some(get("f32_2x3x4").g_mul_scalar(2.0)),
            labels: get("i64_labels_7"),
            images: Some(get("u8_1x28x28")),
        },
        Packet {
            index: 4,
            h: get("f32_transposed_5x3"),
            forwarded: None,
            labels: get("i64_labels_7"),
            images: None,
        },
    ];
    if rank == 0 {
        for p in &packets {
            send_packet(world, other, Some(p))?;
        }
        send_packet(world, other, None)?;
        for p in &packets {
            let q = recv_packet(world, other, Device::Cpu)?
                .ok_or_else(|| Error::Config("packet missing".into()))?;
            let same_opt = |a: &Option<Tensor>, b: &Option<Tensor>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => identical(a, b),
                _ => false,
            };
            if q.index != p.index + 100
                || !identical(&q.h, &p.h)
                || !identical(&q.labels, &p.labels)
                || !same_opt(&q.forwarded, &p.forwarded)
                || !same_opt(&q.images, &p.images)
            {
                return Err(Error::Config(format!(
                    "packet {} came back changed",
                    p.index
                )));
            }
        }
        if recv_packet(world, other, Device::Cpu)?.is_some() {
            return Err(Error::Config("end of segment missing".into()));
        }
    } else {
        while let Some(mut p) = recv_packet(world, other, Device::Cpu)? {
            p.index += 100;
            send_packet(world, other, Some(&p))?;
        }
        send_packet(world, other, None)?;
    }
    let path = opts.out.join(format!("rank{rank}.safetensors"));
    let contiguous: Vec<(String, Tensor)> = received
        .iter()
        .map(|(n, t)| (n.clone(), t.contiguous()))
        .collect();
    Tensor::write_safetensors(&contiguous, &path)?;
    if let Some(victim) = opts.kill_rank {
        // Ping-pong until the victim kills itself; the survivor then waits in a receive that
        // can never complete, and only mpirun can end the job.
        let ball = get("f32_4mib");
        for round in 0.. {
            if rank == victim && round == opts.kill_after {
                eprintln!("rank {rank}: killing myself with SIGKILL at round {round}");
                // SAFETY: plain libc calls on this process.
                #[cfg(target_os = "linux")]
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                #[cfg(not(target_os = "linux"))]
                std::process::abort();
            }
            if (round + rank).is_multiple_of(2) {
                send_tensor(world, other, TAG_TEST, &ball)?;
            } else {
                let _ = recv_tensor(world, other, TAG_TEST, Device::Cpu)?;
            }
        }
    }
    Ok(format!(
        "mpi self-test: {} tensors and {} packets round-tripped between 2 ranks",
        sent.len(),
        packets.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_size_must_be_workers_times_replicas() {
        assert!(check_world_size(6, 3, 2).is_ok());
        assert!(check_world_size(1, 1, 1).is_ok());
        let e = check_world_size(3, 2, 1).unwrap_err().to_string();
        assert!(e.contains("3 ranks") && e.contains("mpirun -np 2"), "{e}");
        let e = check_world_size(1, 2, 2).unwrap_err().to_string();
        assert!(
            e.contains("1 rank but") && e.contains("mpirun -np 4"),
            "{e}"
        );
    }

    #[test]
    fn ranks_map_to_stage_and_replica_and_back() {
        let (workers, replicas) = (3, 2);
        let mut seen = Vec::new();
        for rank in 0..workers * replicas {
            let p = Place {
                rank,
                workers,
                replicas,
            };
            assert!(p.stage() < workers && p.replica() < replicas);
            assert_eq!(p.rank_of(p.replica(), p.stage()), rank);
            seen.push((p.replica(), p.stage()));
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), workers * replicas);
        // A replica's stages are consecutive ranks.
        let p = Place {
            rank: 4,
            workers,
            replicas,
        };
        assert_eq!((p.replica(), p.stage()), (1, 1));
    }
}
