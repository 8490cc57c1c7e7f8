//! `sgr bench`: the rows scripts read, on a network small enough to run in seconds.
use std::process::Command;

fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const TINY: [&str; 14] = [
    "--model",
    "resnet20",
    "--batch-size",
    "8",
    "--channels",
    "1",
    "--size",
    "8",
    "--steps",
    "1",
    "--warmup",
    "1",
    "--threads",
    "1",
];

#[test]
fn memory_and_step_rows_have_a_bp_reference_and_ratios() {
    for kind in ["memory", "step"] {
        let mut args = vec![kind, "--modules", "2,5", "--rule", "dgl,sgr", "--json"];
        args.extend(TINY);
        let rows = bench_json(&args);
        // bp K=1 first, then every rule x K.
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(
            (rows[0]["rule"].as_str(), rows[0]["modules"].as_u64()),
            (Some("bp"), Some(1))
        );
        assert_eq!(rows[0]["memory_ratio_to_bp"].as_f64(), Some(1.0));
        for r in &rows {
            assert!(r["ms_per_step"].as_f64().unwrap() > 0.0);
            assert!(r["peak_memory_bytes"].as_u64().is_some());
            assert!(r["memory_ratio_to_bp"].as_f64().unwrap() >= 0.0);
        }
        // The analytic activation estimate of the largest module falls with K.
        let act = |i: usize| rows[i]["largest_module_activation_bytes"].as_i64().unwrap();
        assert!(act(2) < act(1) && act(1) < act(0));
    }
}

#[test]
fn compare_runs_both_implementations() {
    if crate::common::skip_without_torch("compare_runs_both_implementations") {
        return;
    }
    let mut args = vec!["compare", "--modules", "2", "--rule", "sgr", "--json"];
    args.extend(TINY);
    let rows = bench_json(&args);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    for key in [
        "sgr_ms_per_step",
        "pytorch_ms_per_step",
        "speed_ratio",
        "memory_ratio",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    let ratio = r["pytorch_ms_per_step"].as_f64().unwrap() / r["sgr_ms_per_step"].as_f64().unwrap();
    assert!((ratio - r["speed_ratio"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn bad_k_is_rejected_before_any_worker_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["bench", "memory", "--model", "resnet32", "--modules", "3,5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--modules 5"), "{err}");
    crate::common::assert_no_panic(&err);
}

/// Runs `sgr bench` expecting failure; returns stderr.
fn bench_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    crate::common::assert_no_panic(&err);
    err
}

#[test]
fn cells_take_every_training_option() {
    let mut args = vec![
        "step",
        "--modules",
        "1,4",
        "--rule",
        "sgr",
        "--sgr-distance",
        "cosine",
        "--sgr-from",
        "3",
        "--sgr-grad",
        "fd",
        "--fd-eps",
        "0.01",
        "--sgr-every",
        "2",
        "--nesterov",
        "--json",
    ];
    args.extend(TINY);
    let rows = bench_json(&args);
    // bp K=1, then sgr K=4 only: sgr K=1 would be dgl under the name sgr.
    let cells: Vec<_> = rows
        .iter()
        .map(|r| (r["rule"].as_str().unwrap(), r["modules"].as_u64().unwrap()))
        .collect();
    assert_eq!(cells, [("bp", 1), ("sgr", 4)]);
    let cfg = &rows[1]["config"];
    for (key, value) in [
        ("rule", serde_json::json!("sgr")),
        ("modules", 4.into()),
        ("sgr_distance", "cosine".into()),
        ("sgr_from", 3.into()),
        ("sgr_grad", "fd".into()),
        ("fd_eps", 0.01.into()),
        ("sgr_every", 2.into()),
        ("nesterov", true.into()),
        ("batch_size", 8.into()),
        ("threads", 1.into()),
        ("data", "synthetic".into()),
    ] {
        assert_eq!(cfg[key], value, "{key}: {cfg}");
    }
}

#[test]
fn bench_refuses_what_train_refuses_and_what_it_would_ignore() {
    let err = bench_error(&["step", "--rule", "sgr", "--modules", "2", "--sgr-from", "3"]);
    assert!(
        err.starts_with("error: cell sgr K=2: --sgr-from: 3 is larger than --modules 2"),
        "{err}"
    );
    let err = bench_error(&["step", "--rule", "dgl", "--modules", "2", "--epochs", "3"]);
    assert!(
        err.starts_with("error: sgr bench: --epochs does not apply to a benchmark"),
        "{err}"
    );
    // A λ schedule would be read at the cells' epoch 0, where a warm-up is λ = 0 (dgl).
    let err = bench_error(&[
        "step",
        "--rule",
        "sgr",
        "--modules",
        "2",
        "--lambda-schedule",
        "warmup",
    ]);
    assert!(
        err.starts_with("error: sgr bench: --lambda-schedule does not apply"),
        "{err}"
    );
    let err = bench_error(&["memory", "--modules", "2", "--no-augment"]);
    assert!(
        err.starts_with("error: sgr bench: --augment does not apply"),
        "{err}"
    );
    let err = bench_error(&["step", "--modules", "2", "--lr=-1"]);
    assert!(err.contains("--lr: must be a positive number"), "{err}");
    // The PyTorch reference runs the exact gradient with default optimizer settings only.
    let err = bench_error(&[
        "compare",
        "--rule",
        "sgr",
        "--modules",
        "2",
        "--sgr-grad",
        "jvp",
    ]);
    assert!(
        err.starts_with("error: sgr bench compare: the PyTorch reference has no --sgr-grad"),
        "{err}"
    );
}

#[test]
fn image_size_sets_the_synthetic_input_side() {
    // TINY without its --size 8.
    let at = TINY.iter().position(|a| *a == "--size").unwrap();
    let tiny: Vec<&str> = [&TINY[..at], &TINY[at + 2..]].concat();
    let activations = |size_flag: &str, side: &str| {
        let mut args = vec!["step", "--modules", "2", "--rule", "dgl", "--json"];
        args.extend(&tiny);
        args.extend([size_flag, side]);
        let rows = bench_json(&args);
        rows[1]["largest_module_activation_bytes"].as_i64().unwrap()
    };
    let by_image_size = activations("--image-size", "12");
    assert_eq!(by_image_size, activations("--size", "12"));
    assert_ne!(by_image_size, activations("--size", "8"));
    let err = bench_error(&["memory", "--size", "32", "--image-size", "224"]);
    assert!(
        err.starts_with("error: --size 32 and --image-size 224 disagree"),
        "{err}"
    );
}

#[test]
fn pipeline_rows_carry_both_speedups_stage_idle_and_predictions() {
    let mut args = vec![
        "pipeline",
        "--modules",
        "2,3",
        "--rule",
        "dgl,sgr",
        "--split",
        "even",
        "--json",
    ];
    args.extend(TINY);
    let rows = bench_json(&args);
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        let k = r["modules"].as_u64().unwrap() as usize;
        assert_eq!(r["workers"].as_u64(), Some(2));
        let ms = |key: &str| r[key].as_f64().unwrap();
        for key in [
            "sequential_1_thread_ms",
            "sequential_2_threads_ms",
            "pipeline_ms",
        ] {
            assert!(ms(key) > 0.0, "{key}: {r}");
        }
        let ratio = ms("sequential_1_thread_ms") / ms("pipeline_ms");
        assert!((ms("speedup_vs_sequential_1_thread") - ratio).abs() < 1e-9);
        let ratio = ms("sequential_2_threads_ms") / ms("pipeline_ms");
        assert!((ms("speedup_vs_sequential_2_threads") - ratio).abs() < 1e-9);
        let idle = r["stage_idle_fraction"].as_array().unwrap();
        assert_eq!(idle.len(), 2);
        assert!(
            idle.iter()
                .all(|f| (0.0..=1.0).contains(&f.as_f64().unwrap()))
        );
        assert_eq!(r["module_ms"].as_array().unwrap().len(), k);
        // Predictions for W = 2, 4, 8: none beyond K.
        let predicted = r["predicted_speedup"].as_array().unwrap();
        assert_eq!(predicted.len(), 3);
        assert!(predicted[0][1].as_f64().unwrap() >= 1.0);
        assert!(predicted[1][1].is_null() && predicted[2][1].is_null());
        assert_eq!(r["stage_modules"][0][0].as_u64(), Some(1));
        assert_eq!(
            r["stage_modules"][1][1].as_u64(),
            Some(k as u64),
            "the stages cover every module"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(["bench", "pipeline", "--rule", "bp", "--modules", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--rule bp"), "{err}");
}
