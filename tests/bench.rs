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
