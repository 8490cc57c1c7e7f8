//! Agreement with the independent PyTorch implementation in `bench/reference/`: the same
//! initial weights and batch, one training step of each rule at K=4, and both sides' parameter
//! gradients, updated variables (BatchNorm running statistics included) and losses compared.
//!
//! Tolerance: relative L2 error ≤ 1e-4 per tensor in f32. Both sides run the same libtorch
//! kernels, but summation order differs (e.g. one fused backward vs several), so bit equality
//! is not expected; measured errors are around 1e-6.
use crate::common::*;
use sgr::data::Batch;
use sgr::optim::{OptimConfig, Optimizer};
use sgr::rules::{self, RuleKind, SgrConfig};
use std::path::Path;
use std::process::Command;

fn rel(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-12)
}

fn agree(rule: RuleKind) {
    if skip_without_torch(&format!("{rule}_agrees_with_pytorch")) {
        return;
    }
    let (k, c, s) = (4, 1, 12);
    let net = tiny_net(k, c, s, false, 21);
    let batch: Batch = tiny_batch(8, c, s, false, 22);
    let dir = tempfile::tempdir().unwrap();
    let mut weights: Vec<(String, tch::Tensor)> = values(&net).into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    sgr::checkpoint::save_tensors(&dir.path().join("w.safetensors"), &weights).unwrap();
    sgr::checkpoint::save_tensors(
        &dir.path().join("b.safetensors"),
        &[
            ("images".into(), batch.images.shallow_clone()),
            ("labels".into(), batch.labels.shallow_clone()),
        ],
    )
    .unwrap();
    let sgd = OptimConfig::default();
    let sgr_cfg = SgrConfig {
        lambda: 2.0,
        ..Default::default()
    };
    let ranges: Vec<[usize; 2]> = net
        .module_ranges()
        .iter()
        .map(|r| [r.start, r.end])
        .collect();
    let config = serde_json::json!({
        "model": "resnet20", "module_ranges": ranges, "aux_head": "conv", "rule": rule.name(),
        "lr": 0.1, "momentum": sgd.momentum, "weight_decay": sgd.weight_decay, "nesterov": sgd.nesterov,
        "decay_bn_and_bias": sgd.decay_bn_and_bias, "lambda": sgr_cfg.lambda, "sgr_distance": "l2",
        "sgr_from": sgr_cfg.from, "in_channels": c, "classes": 3, "dtype": "f32"
    });
    std::fs::write(dir.path().join("c.json"), config.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/reference/sgr_ref.py");
    let out = Command::new(venv_python())
        .arg(script)
        .args(["step", "--threads", "1", "--weights"])
        .arg(dir.path().join("w.safetensors"))
        .arg("--batch")
        .arg(dir.path().join("b.safetensors"))
        .arg("--config")
        .arg(dir.path().join("c.json"))
        .arg("--out")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .expect("run .venv/bin/python (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (reference, _, _) = sgr::checkpoint::load(&dir.path().join("o.safetensors")).unwrap();

    let mut opt = Optimizer::new(&net.vs, sgd, &[]);
    zero_grads(&net);
    let stats = rules::build(rule, &sgr_cfg)
        .step(&net, &batch, &rules::StepContext::default())
        .unwrap();
    let ours_grads = grads(&net);
    opt.step(0.1);
    let ours_values = values(&net);

    let mut worst = (0.0, String::new());
    for (name, g) in &ours_grads {
        let e = rel(g, &reference[&format!("grad.{name}")]);
        if e > worst.0 {
            worst = (e, format!("grad.{name}"));
        }
    }
    for (name, v) in &ours_values {
        let e = rel(v, &reference[name]);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    for (m, loss) in stats.module_losses.iter().enumerate() {
        let theirs = reference[&format!("loss.{m}")].double_value(&[]);
        assert!(
            (loss - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
            "{rule} loss {m}: {loss} vs {theirs}"
        );
    }
    eprintln!("{rule}: worst relative error {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 <= 1e-4,
        "{rule}: {} differs from PyTorch by {:.2e}",
        worst.1,
        worst.0
    );
}

#[test]
fn bp_agrees_with_pytorch() {
    agree(RuleKind::Bp);
}

#[test]
fn dgl_agrees_with_pytorch() {
    agree(RuleKind::Dgl);
}

#[test]
fn sgr_agrees_with_pytorch() {
    agree(RuleKind::Sgr);
}

#[test]
fn only_the_light_install_may_skip_the_reference_tests() {
    let venv = tempfile::tempdir().unwrap();
    let bin = venv.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // A Python whose `import torch` fails (`false`), later one where it works (`true`); links,
    // not scripts, so that no file being written is ever executed.
    let python = bin.join("python");
    std::os::unix::fs::symlink("/bin/false", &python).unwrap();
    // No record of the install mode: the tests run (and fail if torch is missing).
    assert_eq!(torch_skip_reason(venv.path()), None);
    std::fs::write(venv.path().join("sgr-torch-install"), "full\n").unwrap();
    assert_eq!(torch_skip_reason(venv.path()), None);
    std::fs::write(venv.path().join("sgr-torch-install"), "light\n").unwrap();
    let why = torch_skip_reason(venv.path()).expect("light install without torch skips");
    assert!(why.contains("SGR_TORCH_INSTALL=light"), "{why}");
    // With torch importable, even the light install runs them.
    std::fs::remove_file(&python).unwrap();
    std::os::unix::fs::symlink("/bin/true", &python).unwrap();
    assert_eq!(torch_skip_reason(venv.path()), None);
}
