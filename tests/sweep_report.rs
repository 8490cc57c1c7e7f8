//! Experiment grids and reports: presets are checked before anything runs, `sgr report` builds
//! its tables from hand-made run folders (with an unfinished, a corrupt and a never-started
//! cell), and a tiny real sweep runs end to end, then skips and resumes cells.
use serde_json::json;
use sgr::preset;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{text, write};

const SGR: &str = env!("CARGO_BIN_EXE_sgr");

const BASE: &str = r#"
data = "synthetic"
model = "resnet20"
rules = ["bp", "dgl", "sgr"]
modules = [2, 5]
seeds = [0, 1]
epochs = 2
batch_size = 32
lr = 0.05
schedule = "cosine"
warmup_epochs = 0.0
lambda = 1.0
test_subset = 100
"#;

#[test]
fn preset_builds_one_validated_cell_per_rule_k_and_seed() {
    let p = preset::parse(&format!("{BASE}\n[train]\nthreads = 1\nnesterov = true\n")).unwrap();
    let cells = p.cells().unwrap();
    let names: Vec<&str> = cells.iter().map(|c| c.name.as_str()).collect();
    // bp once per seed at K=1, seed by seed.
    assert_eq!(
        names,
        [
            "bp-k1-s0",
            "dgl-k2-s0",
            "dgl-k5-s0",
            "sgr-k2-s0",
            "sgr-k5-s0",
            "bp-k1-s1",
            "dgl-k2-s1",
            "dgl-k5-s1",
            "sgr-k2-s1",
            "sgr-k5-s1"
        ]
    );
    let c = &cells[4];
    assert_eq!((c.config.modules, c.config.seed), (5, 0));
    assert_eq!(c.config.rule, sgr::rules::RuleKind::Sgr);
    assert_eq!((c.config.epochs, c.config.batch_size), (2, 32));
    assert_eq!((c.config.test_subset, c.config.train_subset), (100, 0));
    assert!(c.config.nesterov && c.config.threads == 1);
    assert_eq!(cells[0].config.modules, 1);
}

#[test]
fn shipped_presets_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    for (name, cells) in [
        ("fmnist-quick", 10),
        ("fmnist-full", 27),
        ("cifar10-paper-r32", 39),
        ("cifar10-paper-r110", 57),
        ("study-mlp-screen", 28),
        ("study-mlp", 30),
        ("study-resnet-confirm", 12),
    ] {
        let path = preset::resolve(name).unwrap();
        assert_eq!(
            path.canonicalize().unwrap(),
            dir.join(format!("{name}.toml")).canonicalize().unwrap()
        );
        let (_, c) = preset::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.len(), cells, "{name}");
    }
    let (p, _) = preset::load(&dir.join("cifar10-paper-r110.toml")).unwrap();
    assert_eq!(
        (p.batch_size, p.lr, p.warmup_epochs, p.epochs),
        (1024, 0.8, 5.0, 400)
    );
    let e = preset::resolve("no-such-preset").unwrap_err().to_string();
    assert!(
        e.contains("no-such-preset") && e.contains("fmnist-quick"),
        "{e}"
    );
}

#[test]
fn bad_presets_are_rejected_naming_the_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: String, wants: &[&str]| {
        let path = dir.path().join(format!("{name}.toml"));
        write(&path, &text);
        let e = preset::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{name}: {e}");
        for w in wants {
            assert!(e.contains(w), "{name}: wanted {w:?} in {e}");
        }
        assert!(!e.contains('\n'), "{e}");
    };
    check(
        "unknown-top",
        format!("{BASE}learning_rate = 0.1\n"),
        &["learning_rate", "line 14"],
    );
    check(
        "unknown-train",
        format!("{BASE}[train]\nnesterof = true\n"),
        &["nesterof"],
    );
    // ResNet-20's split table has K = 1, 2, 4, 5, 10 only.
    check(
        "k-not-in-table",
        BASE.replace("modules = [2, 5]", "modules = [2, 8]"),
        &["cell dgl-k8-s0", "split table", "1, 2, 4, 5, 10"],
    );
    check(
        "k-too-large",
        format!(
            "{}[train]\nsplit = \"even\"\n",
            BASE.replace("modules = [2, 5]", "modules = [11]")
        ),
        &["cell dgl-k11-s0", "1..=10"],
    );
    check(
        "zero-epochs",
        BASE.replace("epochs = 2", "epochs = 0"),
        &["cell bp-k1-s0", "--epochs"],
    );
    check(
        "twice",
        format!("{BASE}[train]\nlr = 0.2\n"),
        &["[train] lr", "top-level"],
    );
    check(
        "grid-key",
        format!("{BASE}[train]\nseed = 3\n"),
        &["[train] seed", "seeds"],
    );
    check("missing", BASE.replace("lambda = 1.0\n", ""), &["lambda"]);
    check(
        "no-seeds",
        BASE.replace("seeds = [0, 1]", "seeds = []"),
        &["seeds"],
    );

    // Through the binary: one error line, non-zero exit, and nothing started or written.
    let path = dir.path().join("k-not-in-table.toml");
    let out_dir = dir.path().join("runs/never");
    let out = Command::new(SGR)
        .args(["sweep", "--preset"])
        .arg(&path)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("dgl-k8-s0")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(!out_dir.exists());
}

/// A fake finished run: summary.json and a 3-epoch metrics.jsonl whose last epoch has the given
/// per-boundary cosines.
#[allow(clippy::too_many_arguments)]
fn fake_run(
    root: &Path,
    rule: &str,
    k: usize,
    seed: u64,
    acc: f64,
    peak_mib: u64,
    ips: f64,
    grad_cos: f64,
    bp_cos: f64,
) {
    let dir = root.join(preset::cell_name(rule, k, seed));
    let heads: Vec<f64> = (0..k).map(|i| acc - 0.1 * (k - 1 - i) as f64).collect();
    write(
        &dir.join("config.json"),
        &json!({"rule": rule, "modules": k, "seed": seed, "epochs": 3}).to_string(),
    );
    let mut lines = String::new();
    for epoch in 1..=3 {
        let c = if epoch == 3 { grad_cos } else { 0.0 };
        let b = if epoch == 3 { bp_cos } else { 0.0 };
        lines.push_str(
            &json!({
                "epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_accuracy": 0.5,
                "test_loss": 1.0, "test_accuracy": acc, "seconds": 1.0, "images_per_second": ips,
                "module_test_accuracy": heads, "module_train_loss": vec![1.0; k],
                "sgr_penalty": vec![0.0; k], "grad_cosine": vec![c; k - 1],
                "grad_rel_distance": vec![1.0; k - 1], "bp_cosine": vec![b; k - 1],
                "peak_memory_bytes": peak_mib << 20
            })
            .to_string(),
        );
        lines.push('\n');
    }
    write(&dir.join("metrics.jsonl"), &lines);
    let mut summary = json!({
        "rule": rule, "model": "resnet20", "dataset": "synthetic", "modules": k,
        "module_ranges": [], "epochs": 3, "seed": seed, "test_accuracy": acc,
        "best_test_accuracy": acc, "module_test_accuracy": heads, "train_seconds": 3.0,
        "images_per_second": ips,
        "module_activation_bytes": [], "parameters": 1000, "config": {}
    });
    // Summaries written before the field was renamed say peak_memory_bytes; both are read.
    let peak_key = if seed == 0 {
        "peak_memory_bytes"
    } else {
        "peak_host_rss_bytes"
    };
    summary[peak_key] = (peak_mib << 20).into();
    write(&dir.join("summary.json"), &summary.to_string());
}

#[test]
fn report_tables_from_finished_runs_and_lists_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("runs/grid");
    // Test error (%) by hand: bp 8, 10 -> 9.00 ± 1.41; dgl K=2 12, 14 -> 13.00 ± 1.41;
    // sgr K=2 11, 11.5 -> 11.25 ± 0.35 (sample std sqrt(0.125) = 0.354); dgl K=4 only seed 0
    // (seed 1 is corrupt) -> 15.00; sgr K=4: unfinished and never started -> –.
    fake_run(&root, "bp", 1, 0, 0.92, 100, 1000.0, 0.0, 0.0);
    fake_run(&root, "bp", 1, 1, 0.90, 100, 1000.0, 0.0, 0.0);
    fake_run(&root, "dgl", 2, 0, 0.88, 60, 800.0, 0.2, 0.1);
    fake_run(&root, "dgl", 2, 1, 0.86, 70, 900.0, 0.4, 0.3);
    fake_run(&root, "sgr", 2, 0, 0.89, 80, 500.0, 0.6, 0.5);
    fake_run(&root, "sgr", 2, 1, 0.885, 80, 500.0, 0.8, 0.7);
    fake_run(&root, "dgl", 4, 0, 0.85, 40, 700.0, 0.1, 0.1);
    fake_run(&root, "dgl", 4, 1, 0.84, 40, 700.0, 0.1, 0.1);
    write(
        &root.join("dgl-k4-s1/summary.json"),
        "{\"rule\": \"dgl\", \"modu",
    );
    // Unfinished: config and one epoch, no summary.
    fake_run(&root, "sgr", 4, 0, 0.5, 40, 300.0, 0.1, 0.1);
    std::fs::remove_file(root.join("sgr-k4-s0/summary.json")).unwrap();
    let first: String = std::fs::read_to_string(root.join("sgr-k4-s0/metrics.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    write(
        &root.join("sgr-k4-s0/metrics.jsonl"),
        &format!("{first}\n{{torn"),
    );
    // sweep.json lists one more cell that never started; a non-run folder is ignored.
    let cells: Vec<_> = [
        ("bp", 1),
        ("dgl", 2),
        ("sgr", 2),
        ("dgl", 4),
        ("sgr", 4),
    ]
    .iter()
    .flat_map(|&(r, k)| {
        (0..2u64).map(move |s| json!({"name": preset::cell_name(r, k, s), "rule": r, "modules": k, "seed": s}))
    })
    .collect();
    write(
        &root.join("sweep.json"),
        &json!({"preset": {"model": "resnet20", "data": "synthetic", "epochs": 3}, "cells": cells})
            .to_string(),
    );
    write(&root.join("notes/readme.txt"), "not a run");

    let out = Command::new(SGR).arg("report").arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("7 of 10 runs finished"), "{said}");
    let report_dir = root.join("report");
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    for want in [
        "# Report: resnet20 on synthetic, 3 epochs",
        "| rule | K=1 | K=2 | K=4 |",
        "| bp | 9.00 ± 1.41 |  |  |",
        "| dgl |  | 13.00 ± 1.41 | 15.00 (1 of 2 seeds) |",
        "| sgr |  | 11.25 ± 0.35 | – |",
        // Memory (MiB) and images/s, ratios to bp.
        "| bp | 1 | 100.0 | 1.00 | 1000 | 1.00 | 2 of 2 |",
        "| dgl | 2 | 65.0 | 0.65 | 850 | 0.85 | 2 of 2 |",
        "| sgr | 4 | – | – | – | – | 0 of 2 |",
        // Final-epoch discord, K=2: dgl (0.2+0.4)/2, sgr (0.6+0.8)/2; bp cos likewise.
        "| boundary | dgl grad cos | sgr grad cos | dgl bp cos | sgr bp cos |",
        "| 1→2 | 0.300 | 0.700 | 0.200 | 0.600 |",
        // Not used, with reasons.
        "| `sgr-k4-s0` | sgr | 4 | 0 | unfinished (1 of 3 epochs) |",
        "| `dgl-k4-s1` | dgl | 4 | 1 | corrupt: summary.json:",
        "| `sgr-k4-s1` | sgr | 4 | 1 | not started |",
        // Sources.
        "| dgl | 2 | `dgl-k2-s0`, `dgl-k2-s1` |  |",
        "| dgl | 4 | `dgl-k4-s0` | `dgl-k4-s1` |",
        "| sgr | 4 | – | `sgr-k4-s0`, `sgr-k4-s1` |",
        "metrics.jsonl: 1 unreadable line(s) skipped",
        "![Test error vs K](test_error_vs_k.png)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    assert!(!md.contains("`notes`"), "{md}");
    for stem in [
        "test_error_vs_k",
        "peak_memory_vs_k",
        "grad_cosine_over_epochs",
        "head_accuracy_vs_depth",
    ] {
        let png = std::fs::read(report_dir.join(format!("{stem}.png"))).unwrap();
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG"),
            "{stem}.png"
        );
        let svg = std::fs::read_to_string(report_dir.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{stem}.svg");
        assert!(md.contains(&format!("({stem}.svg)")), "{stem} not linked");
    }
    // Text is drawn (the bundled font works): the SVG carries the axis title.
    let svg = std::fs::read_to_string(report_dir.join("test_error_vs_k.svg")).unwrap();
    assert!(svg.contains("test error (%)"));

    // No runs at all is an error naming the folder.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(SGR)
        .arg("report")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("no run folders"), "{}", text(&out));
}

#[test]
fn report_library_computes_mean_and_sample_std() {
    let (m, s) = sgr::report::mean_std(&[11.0, 11.5]).unwrap();
    assert!((m - 11.25).abs() < 1e-12);
    assert!((s.unwrap() - 0.125f64.sqrt()).abs() < 1e-12);
}

fn sweep(dir: &Path, preset: &Path, out: &str) -> Output {
    Command::new(SGR)
        .current_dir(dir)
        .args(["sweep", "--preset"])
        .arg(preset)
        .args(["--out", out])
        .output()
        .unwrap()
}

fn mtime(p: &PathBuf) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn tiny_sweep_runs_then_skips_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let preset_path = dir.path().join("tiny.toml");
    let tiny = r#"
data = "synthetic"
model = "resnet20"
rules = ["dgl"]
modules = [2]
seeds = [0]
epochs = 1
batch_size = 32
lr = 0.05
schedule = "cosine"
warmup_epochs = 0.0
lambda = 1.0
test_subset = 64

[train]
max_steps_per_epoch = 2
threads = 1
diag_every = 1
"#;
    write(&preset_path, tiny);
    let out = sweep(dir.path(), &preset_path, "runs/tiny");
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("[1/1] dgl-k2-s0: run"), "{said}");
    assert!(
        said.contains("[dgl-k2-s0] epoch 1/1"),
        "child output passed through: {said}"
    );
    assert!(said.contains("1 trained, 0 skipped"), "{said}");
    let cell = dir.path().join("runs/tiny/dgl-k2-s0");
    let summary = cell.join("summary.json");
    for f in [
        "summary.json",
        "config.json",
        "metrics.jsonl",
        "cell.toml",
        "train.log",
    ] {
        assert!(cell.join(f).is_file(), "{f}");
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("runs/tiny/sweep.json")).unwrap())
            .unwrap();
    assert_eq!(record["cells"][0]["name"], "dgl-k2-s0");
    assert_eq!(record["cells"][0]["status"], "done");
    assert_eq!(record["cells"][0]["config"]["max_steps_per_epoch"], 2);
    assert_eq!(record["preset"]["rules"][0], "dgl");

    // Again: the finished cell is skipped and not touched.
    let before = mtime(&summary);
    let out = sweep(dir.path(), &preset_path, "runs/tiny");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("dgl-k2-s0: skipped"), "{}", text(&out));
    assert!(
        text(&out).contains("0 trained, 1 skipped"),
        "{}",
        text(&out)
    );
    assert_eq!(mtime(&summary), before);

    // An interrupted cell (no summary) is resumed from its checkpoint, not restarted.
    std::fs::remove_file(&summary).unwrap();
    let out = sweep(dir.path(), &preset_path, "runs/tiny");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resume (after epoch 1)"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("resuming after epoch 1"),
        "{}",
        text(&out)
    );
    assert!(summary.is_file());
    let lines = std::fs::read_to_string(cell.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1);

    // An edited preset does not mix into the old folder: refused before anything is written.
    let edited = dir.path().join("edited.toml");
    write(&edited, &tiny.replace("lr = 0.05", "lr = 0.1"));
    let sweep_json = dir.path().join("runs/tiny/sweep.json");
    let before = std::fs::read(&sweep_json).unwrap();
    let out = sweep(dir.path(), &edited, "runs/tiny");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lr is 0.05, the preset says 0.1"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(&sweep_json).unwrap(), before);

    // And the report of the real sweep.
    let out = Command::new(SGR)
        .current_dir(dir.path())
        .args(["report", "runs/tiny", "--out", "rep"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::read_to_string(dir.path().join("rep/report.md")).unwrap();
    assert!(md.contains("| dgl | 2 |"), "{md}");
    assert!(md.contains("`dgl-k2-s0`"), "{md}");
}
