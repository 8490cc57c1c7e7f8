//! Reliability: runs survive SIGKILL and full disks without torn files, and a resumed run
//! ends exactly where an uninterrupted one does.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SGR: &str = env!("CARGO_BIN_EXE_sgr");

fn train_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--data",
        "synthetic",
        "--model",
        "resnet20",
        "--rule",
        "sgr",
        "--modules",
        "2",
        "--epochs",
        "4",
        "--batch-size",
        "50",
        "--train-subset",
        "600",
        "--threads",
        "1",
        "--diag-every",
        "3",
        "--seed",
        "9",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.to_string_lossy().into_owned()])
    .collect()
}

fn spawn(args: &[String]) -> Child {
    Command::new(SGR)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_ok(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The epoch of the newest checkpoint, from its sidecar (0 if none yet).
fn saved_epoch(out: &Path) -> usize {
    std::fs::read_to_string(out.join("checkpoint.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or(0) as usize
}

/// Every file a kill could have torn must still parse.
fn assert_intact(out: &Path) -> usize {
    let ckpt = out.join("checkpoint.safetensors");
    let epoch = if ckpt.exists() {
        let (_, _, state) =
            sgr::checkpoint::load(&ckpt).expect("checkpoint is readable after a kill");
        state.unwrap().epoch
    } else {
        0
    };
    for f in ["metrics.jsonl", "diagnostics.jsonl"] {
        if let Ok(text) = std::fs::read_to_string(out.join(f)) {
            for line in text.lines() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("torn line in {f}: {e}: {line}"));
            }
            assert!(text.is_empty() || text.ends_with('\n'), "{f} ends mid-line");
        }
    }
    if out.join("summary.json").exists() {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(out.join("summary.json")).unwrap(),
        )
        .unwrap();
    }
    epoch
}

#[test]
fn sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    wait_ok(spawn(&train_args(&whole)));

    let killed = tmp.path().join("killed");
    let mut args = train_args(&killed);
    // Kill at several points: before the first checkpoint, then mid-epoch after epoch 1 and
    // after epoch 2 were saved (each time resuming from what the kill left).
    for (round, (after_epoch, delay_ms)) in [(0usize, 300u64), (1, 250), (2, 100)]
        .into_iter()
        .enumerate()
    {
        let mut child = spawn(&args);
        // Round 0 waits for the run to exist (config.json), the others for a saved epoch; on a
        // loaded machine start-up alone can take seconds.
        let deadline = Instant::now() + Duration::from_secs(300);
        while (!killed.join("config.json").exists() || saved_epoch(&killed) < after_epoch)
            && Instant::now() < deadline
        {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("round {round}: the run ended before the kill ({status}): {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let epoch = assert_intact(&killed);
        eprintln!("kill {round}: checkpoint at epoch {epoch}");
        assert!(
            epoch >= after_epoch && epoch < 4,
            "kill {round} came too late or too early ({epoch})"
        );
        if round == 0 {
            args.push("--resume".into());
        }
    }
    // Resume to the end.
    let start = Instant::now();
    wait_ok(spawn(&args));
    assert!(start.elapsed() < Duration::from_secs(300));
    assert_eq!(assert_intact(&killed), 4);

    let (va, ma, _) = sgr::checkpoint::load(&whole.join("checkpoint.safetensors")).unwrap();
    let (vb, mb, _) = sgr::checkpoint::load(&killed.join("checkpoint.safetensors")).unwrap();
    for (a, b) in [(&va, &vb), (&ma, &mb)] {
        for (name, t) in a {
            let d = (t - &b[name]).abs().max().double_value(&[]);
            assert!(d == 0.0, "{name} differs by {d} after kill/resume");
        }
    }
    let lines = |p: &Path| -> Vec<(u64, f64, f64)> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["epoch"].as_u64().unwrap(),
                    v["train_loss"].as_f64().unwrap(),
                    v["test_accuracy"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(lines(&whole), lines(&killed));
}

#[test]
fn unwritable_out_is_reported_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(SGR)
        .args(train_args(&file.join("run")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a-file"), "{err}");
    crate::common::assert_no_panic(&err);
}

#[test]
fn full_disk_fails_at_the_write_and_keeps_the_last_checkpoint() {
    // A full disk without mounting anything (a container without CAP_SYS_ADMIN cannot mount a
    // small tmpfs): once a checkpoint exists, the temporary file the next checkpoint is
    // written to is made a link to /dev/full, where every write fails with ENOSPC, exactly
    // as on a full disk. (RLIMIT_FSIZE cannot stand in: it limits each file's size, and
    // every checkpoint of a run has the same size.)
    let full = Path::new("/dev/full");
    assert!(full.exists(), "this test needs Linux's /dev/full");
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut child = spawn(&train_args(&run));
    let deadline = Instant::now() + Duration::from_secs(300);
    while saved_epoch(&run) < 1 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended before its first checkpoint ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // If a save is under way its temporary file exists; the link goes in once it is renamed.
    loop {
        match std::os::unix::fs::symlink(full, run.join(".checkpoint.safetensors.tmp")) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("cannot link /dev/full: {e}"),
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the run did not notice the full disk"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left") && err.contains("checkpoint.safetensors"),
        "{err}"
    );
    crate::common::assert_no_panic(&err);
    // The last checkpoint written before the failed one is intact and agrees with its sidecar.
    let epoch = assert_intact(&run);
    assert!((1..4).contains(&epoch), "checkpoint at epoch {epoch}");
    assert_eq!(saved_epoch(&run), epoch);
    assert!(!run.join("summary.json").exists());
}

mod hostile {
    //! Random and truncated bytes fed to every parser that reads user files: each returns an
    //! error or a value, never panics.
    use proptest::prelude::*;

    const GOOD_CONFIG: &str = "model = \"resnet32\"\nrule = \"sgr\"\nmodules = 8\nlr = 0.1\nmilestones = [2, 4]\nlambda = 0.1\n";

    fn valid_checkpoint() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let t = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]);
        sgr::checkpoint::save_tensors(&path, &[("fc.weight".into(), t)]).unwrap();
        std::fs::read(path).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn config_parser_never_panics(text in "\\PC{0,200}") {
            let _ = sgr::config::parse_options(&text);
            let _ = sgr::preset::parse(&text);
        }

        #[test]
        fn truncated_configs_never_panic(cut in 0usize..GOOD_CONFIG.len()) {
            let _ = sgr::config::parse_options(&GOOD_CONFIG[..cut]);
            let _ = sgr::preset::parse(&GOOD_CONFIG[..cut]);
        }

        #[test]
        fn checkpoint_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..200) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            prop_assert!(sgr::checkpoint::load(&path).is_err() || bytes.len() >= 8);
            // A real checkpoint cut short is an error, not a panic.
            let good = valid_checkpoint();
            let cut = cut.min(good.len() - 1);
            std::fs::write(&path, &good[..cut]).unwrap();
            prop_assert!(sgr::checkpoint::load(&path).is_err());
            // The sidecar is only informational, but a run config.json is read on --resume.
            let _ = serde_json::from_slice::<sgr::config::TrainConfig>(&bytes);
        }
    }

    #[test]
    fn checkpoint_with_a_huge_header_length_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        assert!(sgr::checkpoint::load(&path).is_err());
    }
}
