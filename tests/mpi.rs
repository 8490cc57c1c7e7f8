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
