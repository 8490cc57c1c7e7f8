//! Agreement with the independent PyTorch implementation in `bench/reference/`: the same
//! initial weights and batch, one training step of each rule at K=4, and both sides' parameter
//! gradients, updated variables (BatchNorm running statistics included) and losses compared.
//!
//! Tolerance: relative L2 error ≤ 1e-4 per tensor in f32. Both sides run the same libtorch
//! kernels, but summation order differs (e.g. one fused backward vs several), so bit equality
//! is not expected; measured errors are around 1e-6.
use crate::common::*;
use sgr::data::Batch;
use sgr::model::{
    Arch, FeatureShape, HeadKind, InfoproClass, LocalLossKind, LocalLossSpec, ModelSpec,
    NetOptions, SplitNet, SplitStrategy, TokenPool,
};
use sgr::optim::{OptimConfig, Optimizer, OptimizerKind};
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
    let extra = serde_json::json!({"model": "resnet20", "aux_head": "conv", "in_channels": c});
    compare(rule, &net, &batch, OptimConfig::default(), 1, extra);
}

/// `rule` under a local loss (`--local-loss infopro|predsim`): the decoder (upsampling, its
/// BatchNorm, the reconstruction of the un-normalised image), the contrastive term, and PredSim's
/// projection and similarity matrices, against the reference's own PyTorch formulation of each.
fn agree_local_loss(rule: RuleKind, kind: LocalLossKind, class: InfoproClass) {
    let name = format!("{rule}_with_{kind}_agrees_with_pytorch");
    if skip_without_torch(&name) {
        return;
    }
    let (k, c, s) = (4, 1, 12);
    let local_loss = LocalLossSpec {
        kind,
        recon_weights: [0.7, 1.3],
        class_weights: [0.4, 2.0],
        class,
        temperature: 0.5,
        beta: 0.7,
        input_mean: vec![0.3],
        input_std: vec![0.5],
    };
    let spec = ModelSpec {
        arch: "resnet20".parse::<Arch>().unwrap(),
        modules: k,
        split: SplitStrategy::Even,
        head: HeadKind::Conv,
        input: FeatureShape::map(c, s, s),
        classes: 3,
        penalty_cost: None,
        options: NetOptions::default(),
        label_smoothing: 0.0,
        local_loss: local_loss.clone(),
    };
    let net = sgr::model::with_seed(21, || SplitNet::new(&spec, tch::Device::Cpu)).unwrap();
    let batch: Batch = tiny_batch(8, c, s, false, 22);
    let extra = serde_json::json!({
        "model": "resnet20", "aux_head": "conv", "in_channels": c, "size": s,
        "local_loss": kind.name(), "infopro_recon_weights": local_loss.recon_weights,
        "infopro_class_weights": local_loss.class_weights,
        "infopro_class": if class == InfoproClass::Contrast { "contrast" } else { "softmax" },
        "infopro_temperature": local_loss.temperature, "predsim_beta": local_loss.beta,
        "input_mean": local_loss.input_mean, "input_std": local_loss.input_std,
    });
    compare(rule, &net, &batch, OptimConfig::default(), 1, extra);
}

#[test]
fn dgl_with_infopro_agrees_with_pytorch() {
    agree_local_loss(RuleKind::Dgl, LocalLossKind::Infopro, InfoproClass::Softmax);
}

#[test]
fn sgr_with_infopro_agrees_with_pytorch() {
    agree_local_loss(RuleKind::Sgr, LocalLossKind::Infopro, InfoproClass::Softmax);
}

#[test]
fn sgr_with_infopro_contrast_agrees_with_pytorch() {
    agree_local_loss(
        RuleKind::Sgr,
        LocalLossKind::Infopro,
        InfoproClass::Contrast,
    );
}

#[test]
fn dgl_with_predsim_agrees_with_pytorch() {
    agree_local_loss(RuleKind::Dgl, LocalLossKind::Predsim, InfoproClass::Softmax);
}

#[test]
fn sgr_with_predsim_agrees_with_pytorch() {
    agree_local_loss(RuleKind::Sgr, LocalLossKind::Predsim, InfoproClass::Softmax);
}

/// A ViT with token heads, AdamW over 3 steps and label smoothing: attention, LayerNorm, GELU,
/// the class token, the optimizer's moments and bias correction, and the no-decay list.
///
/// In f64: the key bias's gradient is zero in exact arithmetic (softmax ignores a constant
/// added to every key), and in f32 its rounding noise (~1e-9) is not small against AdamW's ε,
/// so Adam's normalisation turns it into updates of random sign on each side.
fn agree_vit(rule: RuleKind) {
    if skip_without_torch(&format!("{rule}_on_a_vit_with_adamw_agrees_with_pytorch")) {
        return;
    }
    let net = tiny_vit(3, HeadKind::Block, 3, 1, TokenPool::Cls, true, 23);
    let mut net = net;
    net.spec.label_smoothing = 0.1;
    let batch: Batch = tiny_batch(8, 1, 8, true, 24);
    let adamw = OptimConfig {
        kind: OptimizerKind::Adamw,
        weight_decay: 0.05,
        betas: (0.9, 0.95),
        eps: 1e-8,
        ..OptimConfig::default()
    };
    let extra = serde_json::json!({
        "model": "vit-3x8h2", "aux_head": "block", "in_channels": 1, "size": 8, "patch_size": 4,
        "token_pool": "cls", "optimizer": "adamw", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
        "label_smoothing": 0.1, "lr": 1e-2, "dtype": "f64",
    });
    compare(rule, &net, &batch, adamw, 3, extra);
}

/// Runs `steps` training steps of `rule` with `optim` on `batch` (the same batch each step) on
/// our side and in the PyTorch reference (`extra` names the model and overrides defaults), and
/// compares the last step's gradients, the updated variables and the losses.
fn compare(
    rule: RuleKind,
    net: &SplitNet,
    batch: &Batch,
    optim: OptimConfig,
    steps: usize,
    extra: serde_json::Value,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut weights: Vec<(String, tch::Tensor)> = values(net).into_iter().collect();
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
    let sgr_cfg = SgrConfig {
        lambda: 2.0,
        ..Default::default()
    };
    let ranges: Vec<[usize; 2]> = net
        .module_ranges()
        .iter()
        .map(|r| [r.start, r.end])
        .collect();
    let mut config = serde_json::json!({
        "module_ranges": ranges, "rule": rule.name(),
        "lr": 0.1, "momentum": optim.momentum, "weight_decay": optim.weight_decay, "nesterov": optim.nesterov,
        "decay_bn_and_bias": optim.decay_bn_and_bias, "lambda": sgr_cfg.lambda, "sgr_distance": "l2",
        "sgr_from": sgr_cfg.from, "classes": 3, "dtype": "f32", "steps": steps
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let lr = config["lr"].as_f64().unwrap();
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

    let mut opt = Optimizer::new(&net.vs, optim, &net.no_weight_decay());
    let rule_impl = rules::build(rule, &sgr_cfg);
    let mut last = None;
    for step in 0..steps {
        zero_grads(net);
        let stats = rule_impl
            .step(net, batch, &rules::StepContext::at_step(step))
            .unwrap();
        last = Some((stats, grads(net)));
        opt.step(lr);
    }
    let (stats, ours_grads) = last.unwrap();
    let ours_values = values(net);

    let mut worst = (0.0, String::new());
    for (name, g) in &ours_grads {
        let theirs = &reference[&format!("grad.{name}")];
        // A bias in front of a BatchNorm (InfoPro's decoder has one) has zero gradient in exact
        // arithmetic: both sides hold rounding noise, which only has to be noise-sized.
        let norm = |t: &tch::Tensor| t.to_kind(tch::Kind::Double).norm().double_value(&[]);
        if name.contains(".decoder.conv1.bias") {
            assert!(norm(g) < 1e-5 && norm(theirs) < 1e-5, "{name}: not ~0");
            continue;
        }
        let e = rel(g, theirs);
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
fn bp_on_a_vit_with_adamw_agrees_with_pytorch() {
    agree_vit(RuleKind::Bp);
}

#[test]
fn dgl_on_a_vit_with_adamw_agrees_with_pytorch() {
    agree_vit(RuleKind::Dgl);
}

#[test]
fn sgr_on_a_vit_with_adamw_agrees_with_pytorch() {
    agree_vit(RuleKind::Sgr);
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
