//! MPI (feature `mpi`): tensors and packets between ranks of a real `mpirun` job, and a rank
//! that dies or fails ending the whole job rather than hanging it.
use crate::common::assert_no_panic;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What an `mpirun` job left: its exit status (None: killed by the test's timeout), its
/// stdout and stderr, and how long it ran.
pub struct Job {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `mpirun -np <np> sgr <args>` with output in files under `dir`, killing it after
/// `timeout`. OpenMPI is told to run as root (CI containers run as root), to start more ranks
/// than cores (CI machines may have one or two) and not to use cross-memory attach for large
/// messages (containers often forbid the ptrace it needs).
pub fn mpirun(np: usize, args: &[&str], dir: &Path, timeout: Duration) -> Job {
    mpirun_with(np, args, dir, timeout, &[])
}

/// [`mpirun`] with extra environment variables for the job (mpirun hands its environment to
/// the ranks it starts on this host).
pub fn mpirun_with(
    np: usize,
    args: &[&str],
    dir: &Path,
    timeout: Duration,
    env: &[(&str, &str)],
) -> Job {
    which_mpirun();
    let out_path = dir.join("mpirun.stdout");
    let err_path = dir.join("mpirun.stderr");
    let start = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-np", &np.to_string()])
        .arg(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot start mpirun");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            // SIGTERM first: mpirun then takes its ranks down with it.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Job {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Fails with one clear message when the feature is on but no MPI is installed.
fn which_mpirun() {
    let found = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "mpirun not found: the mpi feature's tests need an MPI (scripts/setup.sh installs OpenMPI)"
    );
}

#[test]
fn mpi_two_ranks_round_trip_tensors_of_every_kind_and_packets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let job = mpirun(
        2,
        &["internal-mpi-selftest", "--out", dir],
        tmp.path(),
        Duration::from_secs(120),
    );
    assert!(
        job.status.is_some_and(|s| s.success()),
        "{:?}\n{}\n{}",
        job.status,
        job.stdout,
        job.stderr
    );
    // Only rank 0 prints, and it checked the packets and the echoed tensors itself.
    assert_eq!(
        job.stdout.trim(),
        "mpi self-test: 13 tensors and 2 packets round-tripped between 2 ranks"
    );
    let sent = sgr::distributed::selftest_tensors();
    // Rank 1 received them once, rank 0 got them back from rank 1: both must be bit-identical
    // to what was sent, with the same kinds and shapes.
    for rank in 0..2 {
        let got = tch::Tensor::read_safetensors(tmp.path().join(format!("rank{rank}.safetensors")))
            .unwrap();
        assert_eq!(got.len(), sent.len());
        for (name, want) in &sent {
            let (_, t) = got
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("rank {rank}: {name} missing"));
            assert!(
                sgr::distributed::mpi::identical(t, want),
                "rank {rank}: {name} differs: {:?} {:?} vs {:?} {:?}",
                t.kind(),
                t.size(),
                want.kind(),
                want.size()
            );
        }
    }
}

/// A rank that dies by SIGKILL (as under the OOM killer) while the other waits for its
/// message: mpirun must notice and end the job, non-zero, within seconds, on either rank.
#[test]
fn mpi_rank_killed_mid_run_ends_the_job_nonzero_without_hanging() {
    for victim in ["0", "1"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        let job = mpirun(
            2,
            &[
                "internal-mpi-selftest",
                "--out",
                dir,
                "--kill-rank",
                victim,
                "--kill-after",
                "20",
            ],
            tmp.path(),
            Duration::from_secs(120),
        );
        let status = job.status.unwrap_or_else(|| {
            panic!(
                "victim rank {victim}: the job hung (killed after {:?})\n{}",
                job.elapsed, job.stderr
            )
        });
        assert!(!status.success(), "victim rank {victim}: exit 0");
        assert!(
            job.stderr.contains("killing myself with SIGKILL"),
            "the kill did not happen: {}",
            job.stderr
        );
        // Measured: about 2 s in all, of which the self-test itself is about 1.5 s.
        assert!(
            job.elapsed < Duration::from_secs(60),
            "victim rank {victim}: the job took {:?} to end",
            job.elapsed
        );
        assert_no_panic(&job.stderr);
    }
}

/// An error on one rank only (which the others cannot know about) aborts the whole job with
/// that rank's one-line error.
#[test]
fn mpi_error_on_one_rank_aborts_the_job_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let job = mpirun(
        2,
        &["internal-mpi-selftest", "--out", dir, "--fail-rank", "1"],
        tmp.path(),
        Duration::from_secs(120),
    );
    let status = job.status.expect("the job hung after a rank's error");
    assert!(!status.success());
    assert!(
        job.stderr
            .contains("error: rank 1: deliberate failure (--fail-rank)"),
        "{}",
        job.stderr
    );
    assert!(job.elapsed < Duration::from_secs(60), "{:?}", job.elapsed);
    assert_no_panic(&job.stderr);
}

/// `sgr train` flags of a small run on the synthetic set into `out`.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--data",
        "synthetic",
        "--batch-size",
        "16",
        "--train-subset",
        "96",
        "--test-subset",
        "64",
        "--threads",
        "1",
        "--seed",
        "5",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(out.to_str().unwrap().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `sgr <args>` in this process's stead (no MPI) and checks it succeeded.
fn sgr_ok(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sgr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `mpirun -np <np> sgr <args>` and checks it succeeded.
fn mpirun_ok(np: usize, args: &[String], dir: &Path) -> Job {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let job = mpirun(np, &refs, dir, Duration::from_secs(300));
    assert!(
        job.status.is_some_and(|s| s.success()),
        "mpirun -np {np} sgr {args:?}: {:?}\n{}\n{}",
        job.status,
        job.stdout,
        job.stderr
    );
    assert_no_panic(&job.stderr);
    job
}

/// Stages as MPI ranks compute what the in-process pipeline computes, bit for bit: weights,
/// BatchNorm buffers, optimizer state and every epoch's metrics, with drains mid-epoch
/// (diagnostics every 3 steps), receiver-side SGR's forwarded gradients, sender-side SGR's
/// lock-step targets sent back, and InfoPro's images travelling with the batch.
#[test]
fn mpi_stages_equal_the_in_process_pipeline_bit_for_bit() {
    let cases = [
        (
            2,
            "--model resnet20 --rule sgr --modules 2 --epochs 2 --diag-every 3",
        ),
        (
            3,
            "--model resnet20 --rule sgr --modules 4 --sgr-side both --epochs 1 --diag-every 0",
        ),
        (
            2,
            "--model resnet20 --rule dgl --local-loss infopro --modules 2 --epochs 1 --diag-every 0",
        ),
    ];
    for (workers, extra) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let w = workers.to_string();
        let mut extra: Vec<&str> = extra.split_whitespace().collect();
        extra.extend(["--workers", &w]);
        let threads = tmp.path().join("threads");
        sgr_ok(&train_args(&threads, &extra));
        let ranks = tmp.path().join("ranks");
        let mut mpi_extra = extra.clone();
        mpi_extra.extend(["--distributed", "mpi"]);
        let job = mpirun_ok(workers, &train_args(&ranks, &mpi_extra), tmp.path());
        // Rank 0 alone reports.
        assert_eq!(job.stdout.lines().count(), 1, "{}", job.stdout);
        crate::pipeline::assert_same_run(&threads, &ranks, &format!("{extra:?}"));
    }
}

/// R = 2 replicas of one stage: one update from a 16-sample batch equals, in one process, the
/// average of the gradients of its two 8-sample halves followed by one optimizer step. The
/// net has BatchNorm, and each half is normalised with its own statistics, as each replica
/// does; replica 0's running statistics (the checkpoint's) are those of the first half.
#[test]
fn mpi_replicas_average_two_half_batch_updates() {
    use sgr::data::{Batch, Batches, Order};
    use sgr::rules::StepContext;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let extra: Vec<&str> = "--model resnet20 --rule sgr --modules 2 --epochs 1 \
        --max-steps-per-epoch 1 --diag-every 0 --replicas 2 --distributed mpi"
        .split_whitespace()
        .collect();
    mpirun_ok(2, &train_args(&run, &extra), tmp.path());
    let text = std::fs::read_to_string(run.join("config.json")).unwrap();
    let cfg: sgr::config::TrainConfig = serde_json::from_str(&text).unwrap();
    tch::set_num_threads(1);

    let ds = sgr::train::load_data(&cfg).unwrap();
    let net = sgr::train::build_net(&cfg, &ds).unwrap();
    let mut opt = sgr::train::build_optimizer(&cfg, &net);
    let rule = sgr::rules::build_with(cfg.rule, &cfg.sgr(), &cfg.fg());
    let batch = Batches::new(
        &ds.train,
        &ds.meta,
        cfg.batch_size,
        Order::Shuffled {
            seed: cfg.seed,
            epoch: 0,
        },
        cfg.augment,
        tch::Device::Cpu,
    )
    .with_random_erasing(if cfg.augment { cfg.random_erasing } else { 0.0 })
    .next()
    .unwrap();
    let half = |a: i64| Batch {
        images: batch.images.narrow(0, a, 8),
        labels: batch.labels.narrow(0, a, 8),
    };
    let at = StepContext {
        global_step: 0,
        epoch: 0.0,
    };
    opt.zero_grad();
    rule.step(&net, &half(0), &at).unwrap();
    let g0 = opt.flat_grads().copy();
    opt.zero_grad();
    // Replica 1's forward moves its own running statistics, not replica 0's.
    net.with_frozen_buffers(|| rule.step(&net, &half(8), &at))
        .unwrap();
    let g1 = opt.flat_grads().copy();
    let mean = (&g0 + &g1) / 2.0;
    tch::no_grad(|| opt.flat_grads().copy_(&mean));
    opt.step(cfg.schedule().lr(0, 0, 1, 1));

    let (saved, _, state) = sgr::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.unwrap().global_step, 1);
    let mut worst: f64 = 0.0;
    for (name, t) in net.vs.variables() {
        let other = &saved[&name];
        let scale = t.abs().max().double_value(&[]).max(1e-3);
        let diff = (&t - other).abs().max().double_value(&[]) / scale;
        worst = worst.max(diff);
        assert!(diff < 1e-5, "{name}: relative difference {diff:e}");
    }
    // The update moved the weights: a test that compared untouched weights would pass anyway.
    let fresh = sgr::train::build_net(&cfg, &ds).unwrap();
    let moved = fresh
        .vs
        .variables()
        .iter()
        .any(|(name, t)| !t.equal(&saved[name]));
    assert!(moved, "the checkpoint holds the initial weights");
    eprintln!("replicas vs averaged half-batch updates: worst relative difference {worst:e}");
}

/// A rank killed mid-epoch (SIGKILL, as by the OOM killer) ends the job non-zero within
/// seconds; the last checkpoint (epoch 1) then resumes on threads with another W and ends
/// where an uninterrupted run ends, bit for bit.
#[test]
fn mpi_rank_killed_mid_epoch_ends_the_job_and_the_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let common: Vec<&str> = "--model resnet20 --rule sgr --modules 2 --epochs 2 \
        --max-steps-per-epoch 4 --diag-every 0"
        .split_whitespace()
        .collect();
    let mut mpi_flags = common.clone();
    mpi_flags.extend(["--workers", "2", "--distributed", "mpi"]);
    let args = train_args(&run, &mpi_flags);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let job = mpirun_with(
        2,
        &refs,
        tmp.path(),
        Duration::from_secs(120),
        &[("SGR_TEST_KILL_AT_STEP", "6"), ("SGR_TEST_KILL_RANK", "1")],
    );
    let status = job
        .status
        .unwrap_or_else(|| panic!("the job hung after the kill\n{}", job.stderr));
    assert!(!status.success());
    assert!(
        job.stderr
            .contains("SGR_TEST_KILL_AT_STEP=6: killing this rank"),
        "{}",
        job.stderr
    );
    assert!(job.elapsed < Duration::from_secs(60), "{:?}", job.elapsed);
    assert_no_panic(&job.stderr);
    let (_, _, state) = sgr::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(state.unwrap().epoch, 1, "the checkpoint is epoch 1's");

    let mut resume = train_args(&run, &common);
    resume.extend(["--resume", "--distributed", "none", "--workers", "1"].map(String::from));
    sgr_ok(&resume);
    let whole = tmp.path().join("whole");
    sgr_ok(&train_args(&whole, &common));
    crate::pipeline::assert_same_run(&whole, &run, "killed on ranks, resumed on 1 thread");
}

/// A job whose size does not match W × R, or `--distributed` forgotten under mpirun: one
/// error line (rank 0's), non-zero, no run folder.
#[test]
fn mpi_job_of_the_wrong_size_gives_one_error_line_and_no_run_folder() {
    let cases: [(usize, &[&str], &str); 3] = [
        (
            3,
            &["--workers", "2", "--distributed", "mpi"],
            "--distributed mpi: the job has 3 ranks but --workers 2 × --replicas 1 needs 2; start it with `mpirun -np 2`",
        ),
        (
            2,
            &["--workers", "2", "--replicas", "2", "--distributed", "mpi"],
            "the job has 2 ranks but --workers 2 × --replicas 2 needs 4",
        ),
        (
            2,
            &["--workers", "2"],
            "started by mpirun with 2 ranks but without --distributed mpi",
        ),
    ];
    for (np, extra, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let mut flags = vec!["--model", "resnet20", "--rule", "dgl", "--modules", "2"];
        flags.extend(extra);
        let args = train_args(&run, &flags);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let job = mpirun(np, &refs, tmp.path(), Duration::from_secs(120));
        let status = job.status.expect("the job hung");
        assert!(!status.success(), "{extra:?}");
        let errors: Vec<&str> = job.stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{extra:?}: {}", job.stderr);
        assert!(errors[0].starts_with("error: "), "{}", job.stderr);
        assert!(errors[0].contains(needle), "{extra:?}: {}", job.stderr);
        assert!(!run.exists(), "{extra:?} left a run folder");
        assert_no_panic(&job.stderr);
    }
}

/// An error that only one rank other than 0 meets before MPI starts (here rank 1 gets a bad
/// flag through mpirun's MPMD syntax; on a cluster, e.g. a device its host lacks) is printed
/// by that rank, and ends the job before rank 0 writes a run folder.
#[test]
fn mpi_an_error_of_one_rank_only_is_its_line_and_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let flags = "--model resnet20 --rule dgl --modules 2 --epochs 1 --distributed mpi";
    let mut good: Vec<&str> = flags.split_whitespace().collect();
    good.extend(["--workers", "2"]);
    let mut bad: Vec<&str> = flags.split_whitespace().collect();
    bad.extend(["--workers", "0"]);
    let mut args = train_args(&run, &good);
    args.extend([":", "-np", "1", env!("CARGO_BIN_EXE_sgr")].map(String::from));
    args.extend(train_args(&run, &bad));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let job = mpirun(1, &refs, tmp.path(), Duration::from_secs(120));
    let status = job.status.expect("the job hung");
    assert!(!status.success());
    let errors: Vec<&str> = job
        .stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(
        errors,
        ["error: rank 1: --workers: must be at least 1"],
        "{}",
        job.stderr
    );
    assert!(!run.exists(), "a run folder was written");
    assert_no_panic(&job.stderr);
}

/// Replicas of a 2-stage pipeline (4 ranks: stage-0 shares fed to rank 2, each stage's
/// gradients averaged on its own communicator) compute what replicas of the whole network on
/// one stage each compute, bit for bit: the pipeline stays exact under data parallelism.
#[test]
fn mpi_replicas_of_a_pipeline_equal_replicas_of_one_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = "--model resnet20 --rule sgr --modules 2 --epochs 1 --max-steps-per-epoch 3 \
        --diag-every 2 --replicas 2 --distributed mpi";
    let mut runs = Vec::new();
    for workers in [1usize, 2] {
        let run = tmp.path().join(format!("w{workers}"));
        let w = workers.to_string();
        let mut extra: Vec<&str> = flags.split_whitespace().collect();
        extra.extend(["--workers", &w]);
        mpirun_ok(2 * workers, &train_args(&run, &extra), tmp.path());
        runs.push(run);
    }
    crate::pipeline::assert_same_run(&runs[0], &runs[1], "R=2 with W=1 and W=2");
}
