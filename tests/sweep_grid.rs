//! Preset variants and parallel sweeps: `[[variants]]` expand into named, validated cells;
//! `sgr sweep --jobs 2` runs two cells at once, and a sweep killed (parent and children) mid-run
//! resumes to the results of an uninterrupted one.
use serde_json::{Value, json};
use sgr::preset::{self, Cell};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{text, write};

const SGR: &str = env!("CARGO_BIN_EXE_sgr");

fn sweep(dir: &Path, preset: &Path, out: &str, extra: &[&str]) -> Output {
    Command::new(SGR)
        .current_dir(dir)
        .args(["sweep", "--preset"])
        .arg(preset)
        .args(["--out", out])
        .args(extra)
        .output()
        .unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The top of a preset: synthetic data, tiny recipe.
const HEAD: &str = r#"
data = "synthetic"
model = "resnet20"
epochs = 2
batch_size = 32
lr = 0.05
schedule = "cosine"
warmup_epochs = 0.0
lambda = 1.0
test_subset = 64
"#;

fn names(cells: &[Cell]) -> Vec<&str> {
    cells.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn variants_expand_into_named_cells_with_overrides() {
    let text = format!(
        r#"{HEAD}
rules = ["bp", "dgl"]
modules = [2, 5]
seeds = [0, 1]

[train]
sgr_every = 2
nesterov = true

[[variants]]
name = "sgr-cos"
rule = "sgr"
sgr_distance = ["cosine", "l2"]
lambda = [0.01, 0.1, 1]
modules = 5

[[variants]]
rule = "sgr"
sgr_every = [1, 4]
lr = 0.2
nesterov = false
seeds = [7]
threads = 1

[[variants]]
rule = ["bp", "dgl"]
milestones = [[1], [1, 2]]
schedule = "step"
seeds = 1
"#
    );
    let p = preset::parse(&text).unwrap();
    let cells = p.cells().unwrap();
    let expected = [
        // Seed 0: `rules` first, then the variants that run seed 0 (axes in file order, the
        // first varying slowest, K innermost).
        "bp-k1-s0",
        "dgl-k2-s0",
        "dgl-k5-s0",
        "sgr-cos-cosine-lambda0.01-k5-s0",
        "sgr-cos-cosine-lambda0.1-k5-s0",
        "sgr-cos-cosine-lambda1-k5-s0",
        "sgr-cos-l2-lambda0.01-k5-s0",
        "sgr-cos-l2-lambda0.1-k5-s0",
        "sgr-cos-l2-lambda1-k5-s0",
        "bp-k1-s1",
        "dgl-k2-s1",
        "dgl-k5-s1",
        "sgr-cos-cosine-lambda0.01-k5-s1",
        "sgr-cos-cosine-lambda0.1-k5-s1",
        "sgr-cos-cosine-lambda1-k5-s1",
        "sgr-cos-l2-lambda0.01-k5-s1",
        "sgr-cos-l2-lambda0.1-k5-s1",
        "sgr-cos-l2-lambda1-k5-s1",
        // The rule axis without a name: bp at K=1 only; the list-valued option as an axis of
        // lists. Seed 1 is also a top-level seed, so these run with it.
        "bp-milestones1-k1-s1",
        "bp-milestones1_2-k1-s1",
        "dgl-milestones1-k2-s1",
        "dgl-milestones1-k5-s1",
        "dgl-milestones1_2-k2-s1",
        "dgl-milestones1_2-k5-s1",
        // Seeds only a variant lists come last.
        "sgr-every1-k2-s7",
        "sgr-every1-k5-s7",
        "sgr-every4-k2-s7",
        "sgr-every4-k5-s7",
    ];
    assert_eq!(names(&cells), expected);
    let cell = |name: &str| cells.iter().find(|c| c.name == name).unwrap();

    // Top-level cells keep their names and settings, with [train] applied.
    let dgl = cell("dgl-k2-s0");
    assert_eq!((dgl.variant.as_deref(), dgl.setting()), (None, "dgl"));
    assert!(dgl.axes.is_empty() && !dgl.threads_set);
    assert_eq!((dgl.config.sgr_every, dgl.config.lambda), (2, 1.0));
    assert!(dgl.config.nesterov);

    // Axis values override the top level (lambda) and variant scalars ride along; [train]
    // still applies where the variant says nothing.
    let c = cell("sgr-cos-l2-lambda0.1-k5-s1");
    assert_eq!(c.config.rule, sgr::rules::RuleKind::Sgr);
    assert_eq!(c.config.sgr_distance, sgr::rules::SgrDistance::L2);
    assert_eq!(
        (c.config.lambda, c.config.modules, c.config.seed),
        (0.1, 5, 1)
    );
    assert_eq!((c.config.sgr_every, c.config.lr), (2, 0.05));
    assert!(c.config.nesterov);
    assert_eq!(c.variant.as_deref(), Some("sgr-cos"));
    assert_eq!(c.variant_index, Some(0));
    assert_eq!(c.setting(), "sgr-cos-l2-lambda0.1");
    assert_eq!(
        c.axes,
        [
            ("sgr_distance".to_string(), json!("l2")),
            ("lambda".to_string(), json!(0.1))
        ]
    );
    assert_eq!(cell("sgr-cos-cosine-lambda1-k5-s0").config.lambda, 1.0);

    // A variant's scalars override [train] (sgr_every, nesterov) and the top level (lr), and
    // its own seeds replace the preset's; it fixes threads.
    let c = cell("sgr-every4-k5-s7");
    assert_eq!(
        (c.config.sgr_every, c.config.lr, c.config.seed),
        (4, 0.2, 7)
    );
    assert!(!c.config.nesterov);
    assert!(c.threads_set && c.config.threads == 1);
    assert_eq!(c.variant.as_deref(), Some("sgr"));

    let c = cell("dgl-milestones1_2-k5-s1");
    assert_eq!(c.config.milestones, [1, 2]);
    assert_eq!(c.config.schedule, sgr::schedule::ScheduleKind::Step);
    assert_eq!(c.variant.as_deref(), Some("variants[3]"));
    assert_eq!(cell("bp-milestones1-k1-s1").config.modules, 1);

    // Product size: 2 x 3 combinations x 1 K x 2 seeds; 2 combinations x 2 K x 1 seed; 2
    // milestone lists x (bp at K=1 + dgl at 2 K) x 1 seed.
    let count = |i: usize| cells.iter().filter(|c| c.variant_index == Some(i)).count();
    assert_eq!((count(0), count(1), count(2)), (12, 4, 6));

    // Without [[variants]] a preset is what it was: rules may not be empty then.
    let e = preset::parse(&format!("{HEAD}\nrules = []\nmodules = [2]\nseeds = [0]\n"))
        .unwrap()
        .cells()
        .unwrap_err()
        .to_string();
    assert!(e.contains("rules") && e.contains("[[variants]]"), "{e}");

    // A variant alone is a preset; a list in a list-valued option is one value, not an axis.
    let p = preset::parse(&format!(
        "{HEAD}\nseeds = [3]\n[[variants]]\nrule = \"dgl\"\nmodules = [2, 5]\nmilestones = [1, 2]\n"
    ))
    .unwrap();
    let cells = p.cells().unwrap();
    assert_eq!(names(&cells), ["dgl-k2-s3", "dgl-k5-s3"]);
    assert_eq!(cells[1].config.milestones, [1, 2]);
}

#[test]
fn bad_variants_are_rejected_naming_the_key_line_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{HEAD}rules = [\"dgl\"]\nmodules = [2]\nseeds = [0]\n");
    // Line numbers below count from the first line of `base` + "\n".
    let lines_in_base = base.lines().count();
    let check = |name: &str, variant: &str, wants: &[&str]| {
        let path = dir.path().join(format!("{name}.toml"));
        write(&path, &format!("{base}\n[[variants]]\n{variant}"));
        let e = preset::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{name}: {e}");
        for w in wants {
            assert!(e.contains(w), "{name}: wanted {w:?} in {e}");
        }
        assert!(!e.contains('\n'), "{e}");
    };
    let header = lines_in_base + 2;
    check(
        "unknown-key",
        "rule = \"sgr\"\nlamda = [0.1, 1.0]\n",
        &[
            &format!("line {}", header + 2),
            "lamda",
            "unknown key",
            &format!("[[variants]] 1 (`sgr`, line {header})"),
        ],
    );
    check(
        "bad-value",
        "rule = \"sgr\"\nsgr_distance = [\"l2\", \"cos\"]\n",
        &[&format!("line {}", header + 2), "sgr_distance", "cos"],
    );
    check(
        "bad-type",
        "rule = \"sgr\"\nlambda = [0.1, \"big\"]\n",
        &["lambda", "big"],
    );
    check("seed", "rule = \"sgr\"\nseed = 3\n", &["seed", "`seeds`"]);
    check("no-rule", "lambda = [0.1, 1.0]\n", &["`rule`"]);
    check(
        "empty-axis",
        "rule = \"sgr\"\nlambda = []\n",
        &["lambda", "empty list"],
    );
    check(
        "bad-name",
        "name = \"a/b\"\nrule = \"sgr\"\n",
        &["name", "a/b"],
    );
    check(
        "bad-modules",
        "rule = \"sgr\"\nmodules = [2, \"x\"]\n",
        &["modules"],
    );
    // Values are validated per cell, like [train] values.
    check(
        "negative-lambda",
        "name = \"neg\"\nrule = \"sgr\"\nlambda = [0.1, -1.0]\n",
        &["cell neg-lambda-1-k2-s0", "--lambda"],
    );
    check(
        "k-not-in-table",
        "rule = \"sgr\"\nmodules = [8]\n",
        &["cell sgr-k8-s0", "split table"],
    );
    // Duplicate names: with `rules`, within a variant, and between variants; both named.
    check(
        "dup-rules",
        "rule = \"dgl\"\nlambda = 0.5\n",
        &["dgl-k2-s0", "`rules`", "[[variants]] 1 (`dgl`"],
    );
    check(
        "dup-value",
        "rule = \"sgr\"\nlambda = [0.1, 0.1]\n",
        &["sgr-lambda0.1-k2-s0", "[[variants]] 1 (`sgr`"],
    );
    check(
        "dup-variants",
        "name = \"x\"\nrule = \"sgr\"\n[[variants]]\nname = \"x\"\nrule = \"dgl\"\n",
        &["x-k2-s0", "[[variants]] 1 (`x`", "[[variants]] 2 (`x`"],
    );

    // Through the binary: one error line, non-zero exit, nothing written.
    let out_dir = dir.path().join("runs/never");
    for name in ["unknown-key", "dup-variants"] {
        let out = sweep(
            dir.path(),
            &dir.path().join(format!("{name}.toml")),
            "runs/never",
            &[],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert!(!out_dir.exists());
    }
}

/// A preset with `n` tiny cells (dgl at K=2 over `n` seeds), `epochs` epochs of 2 steps each.
fn tiny(n: usize, epochs: usize, extra_train: &str) -> String {
    let seeds: Vec<String> = (0..n).map(|s| s.to_string()).collect();
    format!(
        r#"
data = "synthetic"
model = "resnet20"
rules = ["dgl"]
modules = [2]
seeds = [{}]
epochs = {epochs}
batch_size = 32
lr = 0.05
schedule = "cosine"
warmup_epochs = 0.0
lambda = 1.0
test_subset = 64

[train]
max_steps_per_epoch = 2
diag_every = 1
{extra_train}
"#,
        seeds.join(", ")
    )
}

#[test]
fn bad_jobs_is_one_error_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.toml");
    write(&path, &tiny(3, 1, ""));
    for (jobs, dry) in [("0", false), ("4", false), ("0", true), ("4", true)] {
        let mut extra = vec!["--jobs", jobs];
        if dry {
            extra.push("--dry-run");
        }
        let out = sweep(dir.path(), &path, "runs/x", &extra);
        assert!(!out.status.success(), "--jobs {jobs}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("error: --jobs {jobs}: must be from 1 to 3"))
                && stderr.contains("cells of the preset")
                && stderr.lines().count() == 1,
            "{stderr}"
        );
        assert!(!dir.path().join("runs").exists());
    }
    // As many jobs as cells is fine (checked without training: --dry-run).
    let out = sweep(dir.path(), &path, "runs/x", &["--jobs", "3", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn dry_run_lists_the_variants_cells() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.toml");
    write(
        &path,
        &format!(
            "{}\n[[variants]]\nname = \"s\"\nrule = \"sgr\"\nsgr_distance = [\"l2\", \"cosine\"]\nlambda = [0.1, 1.0]\nseeds = [5]\n",
            tiny(1, 1, "threads = 1")
        ),
    );
    let out = sweep(dir.path(), &path, "runs/v", &["--dry-run", "--jobs", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    for want in [
        "5 cells",
        "rules dgl x K 2 x seeds 0: 1 cells",
        "variant s (sgr): sgr_distance l2, cosine x lambda 0.1, 1.0 x K 2 x seeds 5: 4 cells",
        "--jobs 2: 2 cell(s) at once",
        "s-l2-lambda0.1-k2-s5",
        "s-cosine-lambda1-k2-s5",
    ] {
        assert!(said.contains(want), "wanted {want:?} in {said}");
    }
    assert!(!dir.path().join("runs").exists());
}

/// (started, finished) of every cell in a sweep.json, by name.
fn intervals(record: &Value) -> Vec<(String, String, String)> {
    record["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["started"].as_str().unwrap().to_string(),
                c["finished"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_jobs_run_two_cells_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.toml");
    write(&path, &tiny(2, 2, ""));
    let out = sweep(dir.path(), &path, "runs/two", &["--jobs", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("2 trained, 0 skipped"), "{said}");
    // One line per start and finish, with the time, position, name and state.
    let line = |needle: &str| {
        said.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in {said}"))
            .to_string()
    };
    let started = line("[2/2] dgl-k2-s1: run");
    assert!(started.ends_with("(2 running)"), "{started}");
    assert!(
        started.starts_with("20") && started.contains("Z [2/2]"),
        "{started}"
    );
    assert!(line("[1/2] dgl-k2-s0: done in").contains("test error"));

    let record = read_json(&dir.path().join("runs/two/sweep.json"));
    assert_eq!(record["jobs"], 2);
    let iv = intervals(&record);
    // UTC stamps of one format compare as text: each child started before the other ended.
    assert!(iv[0].1 < iv[1].2 && iv[1].1 < iv[0].2, "{iv:?}");
    // The preset does not set threads: each cell gets max(1, cores / 2).
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = (cores / 2).max(1);
    for c in record["cells"].as_array().unwrap() {
        assert_eq!(c["status"], "done");
        assert_eq!(c["config"]["threads"], threads);
        assert_eq!(c["setting"], "dgl");
    }
    let toml = std::fs::read_to_string(dir.path().join("runs/two/dgl-k2-s0/cell.toml")).unwrap();
    assert!(toml.contains(&format!("threads = {threads}")), "{toml}");
}

/// Live processes (zombies excluded) as (pid, parent pid), from `/proc`.
fn processes() -> Vec<(u32, u32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after ')'.
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            (rest.len() > 1 && rest[0] != "Z").then_some((pid, rest[1].parse().ok()?))
        })
        .collect()
}

fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill")
        .args([sig, "--", pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// The epoch of a cell's newest checkpoint, from its sidecar (written after the checkpoint;
/// `metrics.jsonl` gets its line before, so it can be one epoch ahead).
fn saved_epoch(cell: &Path) -> usize {
    std::fs::read(cell.join("checkpoint.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or(0) as usize
}

/// A cell's name, every epoch's (train loss, test accuracy), and its final test accuracy.
type CellResult = (String, Vec<(f64, f64)>, f64);

fn results(root: &Path, names: &[String]) -> Vec<CellResult> {
    names
        .iter()
        .map(|n| {
            let cell = root.join(n);
            let epochs = std::fs::read_to_string(cell.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    (
                        v["train_loss"].as_f64().unwrap(),
                        v["test_accuracy"].as_f64().unwrap(),
                    )
                })
                .collect();
            let acc = read_json(&cell.join("summary.json"))["test_accuracy"]
                .as_f64()
                .unwrap();
            (n.clone(), epochs, acc)
        })
        .collect()
}

#[test]
fn killed_parallel_sweep_resumes_to_the_uninterrupted_results() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.toml");
    let epochs = 4;
    // threads = 1 in both sweeps, so that --jobs does not change the arithmetic.
    write(&path, &tiny(3, epochs, "threads = 1"));
    let names: Vec<String> = (0..3).map(|s| format!("dgl-k2-s{s}")).collect();

    // The reference: one cell at a time, uninterrupted (and so never overlapping).
    let out = sweep(dir.path(), &path, "runs/whole", &["--jobs", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let iv = intervals(&read_json(&dir.path().join("runs/whole/sweep.json")));
    assert!(iv[0].2 <= iv[1].1 && iv[1].2 <= iv[2].1, "{iv:?}");

    // Two at a time, killed once a cell has finished and another is part-way (at least one
    // saved epoch, at least two still to go). SIGKILL goes to the sweep process alone, its
    // children stopped first (SIGSTOP) so that they cannot notice the lost parent themselves
    // (a write to the closed pipe): they must die with it rather than live on as orphans.
    let root = dir.path().join("runs/killed");
    let log = std::fs::File::create(dir.path().join("killed.log")).unwrap();
    let mut parent = Command::new(SGR)
        .current_dir(dir.path())
        .args(["sweep", "--preset"])
        .arg(&path)
        .args(["--out", "runs/killed", "--jobs", "2"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let partway = loop {
        assert!(Instant::now() < deadline, "no moment to kill the sweep at");
        if let Some(status) = parent.try_wait().unwrap() {
            panic!(
                "the sweep ended before the kill ({status}): {}",
                std::fs::read_to_string(dir.path().join("killed.log")).unwrap()
            );
        }
        let done = names
            .iter()
            .filter(|n| root.join(n).join("summary.json").exists())
            .count();
        let partway = names.iter().find(|n| {
            let e = saved_epoch(&root.join(n));
            !root.join(n).join("summary.json").exists() && (1..=epochs - 2).contains(&e)
        });
        if let (true, Some(p)) = (done >= 1, partway) {
            break p.clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let children: Vec<u32> = processes()
        .into_iter()
        .filter(|&(_, ppid)| ppid == parent.id())
        .map(|(pid, _)| pid)
        .collect();
    assert!(!children.is_empty(), "no running child");
    for c in &children {
        signal("-STOP", &c.to_string());
    }
    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    let alive = || -> Vec<u32> {
        let live: Vec<u32> = processes().into_iter().map(|(p, _)| p).collect();
        children
            .iter()
            .copied()
            .filter(|c| live.contains(c))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alive().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphans = alive();
    for o in &orphans {
        signal("-KILL", &o.to_string());
    }
    assert!(
        orphans.is_empty(),
        "children {orphans:?} outlived the killed sweep"
    );
    // The kill left a whole sweep.json (the parent writes it atomically) that still shows the
    // interrupted cell running, and that cell unfinished.
    let record = read_json(&root.join("sweep.json"));
    let state = |n: &str| {
        record["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .map(|c| c["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state(&partway), "running");
    assert!(!root.join(&partway).join("summary.json").exists());
    let finished: Vec<&String> = names
        .iter()
        .filter(|n| root.join(n).join("summary.json").exists())
        .collect();
    assert!(!finished.is_empty());

    // Again: finished cells skipped, the interrupted one resumed from its checkpoint.
    let out = sweep(dir.path(), &path, "runs/killed", &["--jobs", "2"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for n in &finished {
        assert!(said.contains(&format!("{n}: skipped")), "{n}: {said}");
    }
    assert!(
        said.contains(&format!("{partway}: resume (after epoch")),
        "{partway}: {said}"
    );
    assert!(
        said.contains(&format!("[{partway}] resuming after epoch")),
        "{said}"
    );
    let record = read_json(&root.join("sweep.json"));
    for c in record["cells"].as_array().unwrap() {
        let want = if finished.contains(&&c["name"].as_str().unwrap().to_string()) {
            "skipped"
        } else {
            "done"
        };
        assert_eq!(c["status"], want, "{c}");
    }
    // Every cell ends exactly where the uninterrupted sweep's did.
    let whole = results(&dir.path().join("runs/whole"), &names);
    let resumed = results(&root, &names);
    assert_eq!(whole, resumed);
    assert!(whole.iter().all(|(_, e, _)| e.len() == epochs));
}

#[test]
fn old_sweep_records_still_read() {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "results/fmnist-quick/sweep.json",
    ]
    .iter()
    .collect();
    let record: sgr::sweep::SweepRecord =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(record.cells.len(), 10);
    assert!(record.preset.variants.is_empty() && record.jobs.is_none());
    let c = &record.cells[0];
    assert_eq!((c.name.as_str(), c.setting.as_deref()), ("bp-k1-s0", None));
    assert!(c.axes.is_empty() && c.started.is_none());
}

#[test]
fn device_flag_runs_every_cell_on_the_given_device() {
    // A preset written for a GPU runs on the CPU with `--device cpu`, and the cells record it.
    let tmp = tempfile::tempdir().unwrap();
    let preset = tmp.path().join("gpu.toml");
    write(
        &preset,
        &format!(
            "{HEAD}rules = [\"dgl\"]\nmodules = [2]\nseeds = [0]\ntrain_subset = 64\n[train]\nsplit = \"even\"\ndevice = \"cuda\"\nthreads = 1\nmax_steps_per_epoch = 2\n"
        ),
    );
    let out = sweep(tmp.path(), &preset, "s", &["--device", "cpu"]);
    assert!(out.status.success(), "{}", text(&out));
    let config = read_json(&tmp.path().join("s/dgl-k2-s0/config.json"));
    assert_eq!(config["device"], json!("cpu"));
    assert!(tmp.path().join("s/dgl-k2-s0/summary.json").exists());
}
