//! `sgr report` on a hand-made study sweep: runs grouped into settings by their config (not just
//! rule × K), paired per-seed differences against dgl with their t-interval, unpaired runs,
//! the convergence check, the λ and gap plots, and report.json. Every expected number is worked
//! out by hand in the comments.
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

const SGR: &str = env!("CARGO_BIN_EXE_sgr");

/// t quantile 0.975 for 2 degrees of freedom (three pairs), from a printed t table.
const T2: f64 = 4.303;

/// The fields every run of the fake study shares, as the trainer writes them.
fn base_config(rule: &str, k: usize, seed: u64) -> serde_json::Map<String, Value> {
    let v = json!({
        "data": "fashion-mnist", "data_dir": "data", "model": "mlp-8x256", "rule": rule,
        "modules": k, "split": "even", "aux_head": "linear", "epochs": 5, "batch_size": 128,
        "lr": 0.1, "momentum": 0.9, "nesterov": false, "weight_decay": 0.0005,
        "decay_bn_and_bias": false, "schedule": "cosine", "warmup_epochs": 0.0,
        "milestones": [], "gamma": 0.1, "seed": seed, "threads": 1, "train_subset": 0,
        "test_subset": 0, "augment": true, "max_steps_per_epoch": 0, "lambda": 0.1,
        "sgr_distance": "l2", "sgr_from": 2, "sgr_every": 1, "sgr_grad": "exact",
        "fd_eps": 0.03, "diag_every": 50, "on_nan": "stop", "device": "cpu",
        "sgr_side": "receiver", "lambda_schedule": "constant", "lambda_schedule_epochs": 0
    });
    v.as_object().unwrap().clone()
}

/// A fake run of 5 epochs in `root/name`: test error (%) `final_err` at the end and
/// `final_err + last_step` after epoch 4 (so the convergence window, epochs 4–5, moves by
/// `last_step`), the last epoch's boundary gradient cosines `cos`, and summary.json unless
/// `finished` is false. `edit` changes the config.
#[allow(clippy::too_many_arguments)]
fn run(
    root: &Path,
    name: &str,
    rule: &str,
    k: usize,
    seed: u64,
    final_err: f64,
    last_step: f64,
    cos: &[f64],
    finished: bool,
    edit: &[(&str, Value)],
) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = base_config(rule, k, seed);
    for (key, v) in edit {
        if v.is_null() {
            config.remove(*key);
        } else {
            config.insert(key.to_string(), v.clone());
        }
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let errs = [
        final_err + 10.0,
        final_err + 5.0,
        final_err + 2.0,
        final_err + last_step,
        final_err,
    ];
    let mut lines = String::new();
    for (i, e) in errs.iter().enumerate() {
        let acc = 1.0 - e / 100.0;
        let c: Vec<f64> = if i == 4 {
            cos.to_vec()
        } else {
            vec![0.0; k - 1]
        };
        lines.push_str(
            &json!({
                "epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_accuracy": 0.5,
                "test_loss": 1.0, "test_accuracy": acc, "seconds": 1.0, "images_per_second": 1000.0,
                "module_test_accuracy": vec![acc; k], "module_train_loss": vec![1.0; k],
                "sgr_penalty": vec![0.0; k], "grad_cosine": c, "grad_rel_distance": vec![1.0; k - 1],
                "bp_cosine": vec![0.1; k - 1], "peak_memory_bytes": 50u64 << 20
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    if finished {
        let acc = 1.0 - final_err / 100.0;
        std::fs::write(
            dir.join("summary.json"),
            json!({
                "rule": rule, "model": "mlp-8x256", "dataset": "fashion-mnist", "modules": k,
                "module_ranges": [], "epochs": 5, "seed": seed, "test_accuracy": acc,
                "best_test_accuracy": acc, "module_test_accuracy": vec![acc; k],
                "train_seconds": 5.0, "images_per_second": 1000.0,
                "peak_memory_bytes": 50u64 << 20, "module_activation_bytes": [],
                "parameters": 1000, "config": config
            })
            .to_string(),
        )
        .unwrap();
    }
}

fn approx(v: &Value, want: f64, tol: f64) {
    let got = v.as_f64().unwrap_or(f64::NAN);
    assert!((got - want).abs() < tol, "got {got}, want {want}");
}

/// The study sweep. Test errors (%), final epoch:
/// - bp K=1: s0 10.0, s1 10.2, s2 10.4 (moved 0.15 over epochs 4–5: converged).
/// - dgl K=4: s0 14.0, s1 14.5, s2 15.0 (moved 0.1: converged). Seed 2 was configured with
///   λ = 1, cosine and 2 threads: fields dgl ignores, so it is the same setting.
/// - sgr cosine λ=0.1 receiver K=4: s0 13.0, s1 13.6, s2 14.1 (moved 0.5: not converged).
///   Δ vs dgl: −1.0, −0.9, −0.9; mean −0.9333, sd 0.05774, half-width 4.303·0.05774/√3 =
///   0.1434: [−1.077, −0.790], excludes 0 (better).
/// - sgr cosine λ=1.0 receiver K=4: s0 14.5, s1 14.0, s3 12.0. Seed 3 has no dgl partner and
///   dgl's seed 2 none here: pairs s0 +0.5, s1 −0.5, mean 0, [−6.35, +6.35].
/// - sgr cosine λ=0.1 sender K=4: s0 14.2, s1 14.4, s2 unfinished: pairs +0.2, −0.1.
/// - sgr l2 λ=0.1 receiver K=4: s0 14.8, s1 15.3; its config.json predates `sgr_side` and
///   `lambda_schedule` (missing = receiver, constant).
/// - sgr cosine λ=0.1 receiver K=8: s0 13.0; there is no dgl at K=8.
fn study(root: &Path) {
    let none: &[(&str, Value)] = &[];
    let cos = |side: &str, l: f64| {
        vec![
            ("sgr_distance", json!("cosine")),
            ("lambda", json!(l)),
            ("sgr_side", json!(side)),
        ]
    };
    for (s, e) in [(0, 10.0), (1, 10.2), (2, 10.4)] {
        run(
            root,
            &format!("bp-k1-s{s}"),
            "bp",
            1,
            s,
            e,
            0.15,
            &[],
            true,
            none,
        );
    }
    let dgl_cos = [0.2, 0.3, 0.4];
    run(
        root,
        "dgl-k4-s0",
        "dgl",
        4,
        0,
        14.0,
        0.1,
        &dgl_cos,
        true,
        none,
    );
    run(
        root,
        "dgl-k4-s1",
        "dgl",
        4,
        1,
        14.5,
        0.1,
        &dgl_cos,
        true,
        none,
    );
    run(
        root,
        "dgl-k4-s2",
        "dgl",
        4,
        2,
        15.0,
        0.1,
        &dgl_cos,
        true,
        &[
            ("lambda", json!(1.0)),
            ("sgr_distance", json!("cosine")),
            ("threads", json!(2)),
        ],
    );
    let c6 = [0.5, 0.6, 0.7];
    for (s, e) in [(0, 13.0), (1, 13.6), (2, 14.1)] {
        let name = format!("sgr-cos-0.1-k4-s{s}");
        run(
            root,
            &name,
            "sgr",
            4,
            s,
            e,
            0.5,
            &c6,
            true,
            &cos("receiver", 0.1),
        );
    }
    let c9 = [0.8, 0.9, 1.0];
    for (s, e) in [(0, 14.5), (1, 14.0), (3, 12.0)] {
        let name = format!("sgr-cos-1-k4-s{s}");
        run(
            root,
            &name,
            "sgr",
            4,
            s,
            e,
            0.0,
            &c9,
            true,
            &cos("receiver", 1.0),
        );
    }
    for (s, e, fin) in [(0, 14.2, true), (1, 14.4, true), (2, 14.0, false)] {
        let name = format!("sgr-cos-0.1-sender-k4-s{s}");
        run(
            root,
            &name,
            "sgr",
            4,
            s,
            e,
            0.0,
            &c6,
            fin,
            &cos("sender", 0.1),
        );
    }
    let old = [
        ("sgr_side", Value::Null),
        ("lambda_schedule", Value::Null),
        ("lambda_schedule_epochs", Value::Null),
    ];
    run(
        root,
        "sgr-l2-k4-s0",
        "sgr",
        4,
        0,
        14.8,
        0.0,
        &c6,
        true,
        &old,
    );
    run(
        root,
        "sgr-l2-k4-s1",
        "sgr",
        4,
        1,
        15.3,
        0.0,
        &c6,
        true,
        &old,
    );
    let c8 = [0.5; 7];
    run(
        root,
        "sgr-cos-0.1-k8-s0",
        "sgr",
        8,
        0,
        13.0,
        0.0,
        &c8,
        true,
        &cos("receiver", 0.1),
    );
}

fn report(root: &Path) -> (String, Value) {
    let out = Command::new(SGR).arg("report").arg(root).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = root.join("report");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let json: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    (md, json)
}

#[test]
fn report_groups_settings_and_pairs_them_with_dgl_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("study");
    study(&root);
    let (md, json) = report(&root);

    // Settings: labelled by the fields that vary (distance, λ, side), K in its own column.
    assert_eq!(
        json["varying"],
        json!(["sgr_distance", "lambda", "sgr_side"])
    );
    for want in [
        "| setting | K=1 | K=4 | K=8 |",
        "| bp | 10.20 ± 0.20 |  |  |",
        "| dgl |  | 14.50 ± 0.50 |  |",
        // 13.0, 13.6, 14.1: mean 13.567, sd 0.551.
        "| sgr cosine λ=0.1 receiver |  | 13.57 ± 0.55 | 13.00 |",
        "| sgr cosine λ=0.1 sender |  | 14.30 ± 0.14 (2 of 3 seeds) |  |",
        "| sgr l2 λ=0.1 receiver |  | 15.05 ± 0.35 |  |",
        // Settings and convergence (window epochs 4–5).
        "| bp | 1 | 3 of 3 | 10.20 ± 0.20 | – | 0.15 (epochs 4–5) | yes |",
        "| dgl | 4 | 3 of 3 | 14.50 ± 0.50 | 0.300 ± 0.000 | 0.10 (epochs 4–5) | yes |",
        "| sgr cosine λ=0.1 receiver | 4 | 3 of 3 | 13.57 ± 0.55 | 0.600 ± 0.000 | 0.50 (epochs 4–5) | **no** |",
        "(dgl, the issue's criterion: dgl K=4: yes)",
        // Paired comparisons.
        "| sgr cosine λ=0.1 receiver | 4 | dgl | 3 | 0, 1, 2 | s0: −1.00, s1: −0.90, s2: −0.90 | **−0.93** | **[−1.08, −0.79]** | **yes: better** |",
        "| sgr cosine λ=1.0 receiver | 4 | dgl | 2 | 0, 1 | s0: +0.50, s1: −0.50 | 0.00 | [−6.35, +6.35] | no |",
        "| sgr cosine λ=0.1 sender | 4 | dgl | 2 | 0, 1 | s0: +0.20, s1: −0.10 |",
        // bp − dgl: −4.0, −4.3, −4.6: mean −4.3, sd 0.3, half 4.303·0.3/√3 = 0.745.
        "| bp (K=1) | 4 | dgl | 3 | 0, 1, 2 | s0: −4.00, s1: −4.30, s2: −4.60 | **−4.30** | **[−5.05, −3.55]** | **yes: better** |",
        // Unpaired runs, with why.
        "`sgr-cos-1-k4-s3` (no finished dgl run with seed 3)",
        "`dgl-k4-s2` (no finished sgr cosine λ=1.0 receiver run with seed 2)",
        "`sgr-cos-0.1-sender-k4-s2` (unfinished (5 of 5 epochs))",
        "- sgr cosine λ=0.1 receiver K=8: no dgl setting of the same data, network, K and recipe; runs `sgr-cos-0.1-k8-s0`",
        // Plots over λ at K=4 (the cosine receiver line has two λ); none at K=8.
        "![Test error vs λ, K=4](test_error_vs_lambda_k4.png)",
        "![Gradient cosine vs λ, K=4](grad_cosine_vs_lambda_k4.png)",
        "Skipped at K=8: one finished sgr λ value per line",
        "![Gap to bp vs gradient cosine](gap_to_bp_vs_grad_cosine.png)",
        // The sources and every-run tables name the setting.
        "| `sgr-l2-k4-s1` | sgr l2 λ=0.1 receiver | 4 | 1 | finished |",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    // l2 pairs too: 14.8 − 14.0, 15.3 − 14.5, the same difference twice (sd 0).
    assert!(md.contains("| sgr l2 λ=0.1 receiver | 4 | dgl | 2 | 0, 1 | s0: +0.80, s1: +0.80 | **+0.80** | **[+0.80, +0.80]** | **yes: worse** |"), "{md}");

    let report_dir = root.join("report");
    for stem in [
        "test_error_vs_lambda_k4",
        "grad_cosine_vs_lambda_k4",
        "gap_to_bp_vs_grad_cosine",
        "test_error_vs_k",
    ] {
        let png = std::fs::read(report_dir.join(format!("{stem}.png"))).unwrap();
        assert!(png.len() > 1000 && png.starts_with(b"\x89PNG"), "{stem}");
        let svg = std::fs::read_to_string(report_dir.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains("</svg>"), "{stem}");
    }
    assert!(!report_dir.join("test_error_vs_lambda_k8.png").exists());
    let svg = std::fs::read_to_string(report_dir.join("test_error_vs_lambda_k4.svg")).unwrap();
    assert!(svg.contains("λ (log scale)") && svg.contains("sgr cosine receiver"));

    // report.json: the aggregated settings.
    let settings = json["settings"].as_array().unwrap();
    let find = |label: &str, k: u64| {
        settings
            .iter()
            .find(|s| s["label"] == label && s["modules"] == k)
            .unwrap_or_else(|| panic!("no setting {label} K={k}"))
    };
    let dgl = find("dgl", 4);
    assert_eq!(dgl["runs"].as_array().unwrap().len(), 3);
    assert!(dgl["fields"].get("lambda").is_none() && dgl["fields"].get("seed").is_none());
    approx(&dgl["test_error"]["mean"], 14.5, 1e-9);
    approx(&dgl["test_error"]["std"], 0.5, 1e-9);
    assert_eq!(dgl["test_error"]["n"], 3);
    approx(&dgl["grad_cosine"]["mean"], 0.3, 1e-9);
    assert_eq!(dgl["convergence"]["converged"], true);
    approx(&dgl["convergence"]["moved"], 0.1, 1e-9);
    assert_eq!(
        (&dgl["convergence"]["from"], &dgl["convergence"]["epochs"]),
        (&json!(4), &json!(5))
    );
    let sender = find("sgr cosine λ=0.1 sender", 4);
    assert_eq!(sender["finished"], 2);
    assert_eq!(sender["fields"]["sgr_side"], "sender");
    assert_eq!(
        find("sgr l2 λ=0.1 receiver", 4)["fields"]["sgr_side"],
        "receiver"
    );
    assert_eq!(
        find("sgr cosine λ=0.1 receiver", 4)["convergence"]["converged"],
        false
    );
    assert_eq!(settings.len(), 7);

    // report.json: the paired comparisons.
    let paired = json["paired"].as_array().unwrap();
    let pair = |label: &str| {
        paired
            .iter()
            .find(|p| p["setting"] == label)
            .unwrap_or_else(|| panic!("no comparison of {label}"))
    };
    let best = pair("sgr cosine λ=0.1 receiver");
    assert_eq!(best["baseline"], "dgl");
    assert_eq!(best["modules"], 4);
    assert_eq!(best["n"], 3);
    let seeds: Vec<u64> = best["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [0, 1, 2]);
    assert_eq!(best["pairs"][1]["run"], "sgr-cos-0.1-k4-s1");
    assert_eq!(best["pairs"][1]["baseline_run"], "dgl-k4-s1");
    approx(&best["pairs"][1]["diff"], -0.9, 1e-9);
    approx(&best["mean"], -0.9333333333, 1e-9);
    let half = T2 * (0.01f64 / 3.0).sqrt() / 3f64.sqrt();
    approx(&best["ci95"][0], -0.9333333333 - half, 2e-4);
    approx(&best["ci95"][1], -0.9333333333 + half, 2e-4);
    approx(&best["t"], T2, 5e-4);
    assert_eq!(best["excludes_zero"], true);
    assert_eq!(best["direction"], "better");
    assert_eq!(best["unpaired"], json!([]));

    let strong = pair("sgr cosine λ=1.0 receiver");
    assert_eq!(strong["n"], 2);
    approx(&strong["mean"], 0.0, 1e-9);
    assert_eq!(strong["excludes_zero"], false);
    let unpaired: Vec<&str> = strong["unpaired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["run"].as_str().unwrap())
        .collect();
    assert_eq!(unpaired, ["sgr-cos-1-k4-s3", "dgl-k4-s2"]);
    let sender = pair("sgr cosine λ=0.1 sender");
    assert_eq!(sender["n"], 2);
    assert_eq!(sender["unpaired"][0]["run"], "sgr-cos-0.1-sender-k4-s2");
    let bp = pair("bp");
    assert_eq!(
        (&bp["setting_modules"], &bp["modules"]),
        (&json!(1), &json!(4))
    );
    approx(&bp["mean"], -4.3, 1e-9);
    assert_eq!(json["unpaired_settings"][0]["modules"], 8);
    assert_eq!(paired.len(), 5);

    // Gap to bp: every finished local run with diagnostics and a bp reference (mean 10.2).
    let gaps = json["gap_to_bp"].as_array().unwrap();
    assert_eq!(gaps.len(), 3 + 3 + 3 + 2 + 2 + 1);
    let g = gaps.iter().find(|g| g["run"] == "dgl-k4-s1").unwrap();
    approx(&g["gap"], 14.5 - 10.2, 1e-9);
    approx(&g["grad_cosine"], 0.3, 1e-9);
}

#[test]
fn report_without_bp_or_lambda_range_skips_those_plots_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    let none: &[(&str, Value)] = &[];
    run(
        &root,
        "dgl-k2-s0",
        "dgl",
        2,
        0,
        20.0,
        0.0,
        &[0.3],
        true,
        none,
    );
    run(
        &root,
        "sgr-k2-s0",
        "sgr",
        2,
        0,
        19.0,
        0.0,
        &[0.4],
        true,
        none,
    );
    let (md, json) = report(&root);
    for want in [
        "| rule | K=2 |",
        "Skipped at K=2: one finished sgr λ value per line",
        "## Gap to bp vs boundary gradient cosine\n\nSkipped: no finished bp run.",
        // One pair: a mean but no interval.
        "| sgr | 2 | dgl | 1 | 0 | s0: −1.00 | −1.00 | – | – (1 pair) |",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    assert!(!root.join("report/gap_to_bp_vs_grad_cosine.png").exists());
    assert_eq!(json["paired"][0]["ci95"], Value::Null);
    assert_eq!(json["varying"], json!([]));
}

#[test]
fn report_pairs_fg_sgr_with_fg_as_well_as_with_dgl() {
    // dgl, fg and fg-sgr at K=4, seeds 1 and 2. fg-sgr − fg per seed: 14.57 − 14.48 = +0.09,
    // 14.76 − 14.89 = −0.13; mean −0.02. fg-sgr − dgl: +2.57, +2.76.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fg");
    let tangents = [("fg_tangents", json!(16))];
    for (seed, dgl, fg, fg_sgr) in [(1, 12.0, 14.48, 14.57), (2, 12.0, 14.89, 14.76)] {
        let cos = [0.5, 0.5, 0.5];
        run(
            &root,
            &format!("dgl-s{seed}"),
            "dgl",
            4,
            seed,
            dgl,
            0.1,
            &cos,
            true,
            &[],
        );
        run(
            &root,
            &format!("fg-s{seed}"),
            "fg",
            4,
            seed,
            fg,
            0.1,
            &cos,
            true,
            &tangents,
        );
        let name = format!("fg-sgr-s{seed}");
        run(
            &root, &name, "fg-sgr", 4, seed, fg_sgr, 0.1, &cos, true, &tangents,
        );
    }
    let (md, json) = report(&root);
    let comparisons = json["paired"].as_array().unwrap();
    let find = |setting: &str, baseline: &str| {
        comparisons
            .iter()
            .find(|c| c["setting"] == setting && c["baseline"] == baseline)
            .unwrap_or_else(|| panic!("no {setting} vs {baseline} in {comparisons:?}"))
    };
    let vs_fg = find("fg-sgr", "fg");
    approx(&vs_fg["mean"], -0.02, 1e-9);
    assert_eq!(vs_fg["n"], 2);
    approx(&find("fg-sgr", "dgl")["mean"], 2.665, 1e-9);
    approx(&find("fg", "dgl")["mean"], 2.685, 1e-9);
    // fg is compared with dgl only.
    assert_eq!(comparisons.len(), 3, "{comparisons:?}");
    assert!(md.contains("| fg-sgr | 4 | fg |"), "{md}");
}
