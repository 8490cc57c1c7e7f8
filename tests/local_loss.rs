//! `--local-loss infopro|predsim`: the losses' tangents and the SGR gradient under them checked
//! numerically in f64, their extra layers owned by the heads, and bad input refused cleanly.
use crate::common::*;
use sgr::data::Batch;
use sgr::model::{
    Arch, FeatureShape, HeadKind, InfoproClass, LocalLossKind, LocalLossSpec, ModelSpec,
    NetOptions, SplitNet, SplitStrategy,
};
use sgr::rules::sgr::distance;
use sgr::rules::{self, RuleKind, SgrConfig, SgrDistance, SgrGrad};
use tch::{Device, Tensor};

/// The three non-ce losses under test.
fn losses() -> Vec<(&'static str, LocalLossSpec)> {
    let base = LocalLossSpec {
        // Both terms weigh at every module (the published K=4 schedule has λ2 = 0 at module 1,
        // which would leave the classification term untested there).
        recon_weights: [0.7, 1.3],
        class_weights: [0.4, 2.0],
        // A normalisation to undo, as the trainer sets it from the data set.
        input_mean: vec![0.3, 0.5],
        input_std: vec![0.5, 0.25],
        ..Default::default()
    };
    vec![
        (
            "infopro softmax",
            LocalLossSpec {
                kind: LocalLossKind::Infopro,
                ..base.clone()
            },
        ),
        (
            "infopro contrast",
            LocalLossSpec {
                kind: LocalLossKind::Infopro,
                class: InfoproClass::Contrast,
                temperature: 0.5,
                ..base.clone()
            },
        ),
        (
            "predsim",
            LocalLossSpec {
                kind: LocalLossKind::Predsim,
                // Both terms matter at 0.7 (0.99 leaves the prediction term at 1%).
                beta: 0.7,
                ..base
            },
        ),
    ]
}

/// A tiny f64 network `arch` in `modules` even modules on 2x8x8 inputs, 3 classes.
fn net_with(arch: &str, modules: usize, head: HeadKind, local_loss: &LocalLossSpec) -> SplitNet {
    let spec = ModelSpec {
        arch: arch.parse::<Arch>().unwrap(),
        modules,
        split: SplitStrategy::Even,
        head,
        input: FeatureShape::map(2, 8, 8),
        classes: 3,
        penalty_cost: None,
        options: NetOptions::default(),
        label_smoothing: 0.0,
        local_loss: local_loss.clone(),
    };
    let mut net = sgr::model::with_seed(51, || SplitNet::new(&spec, Device::Cpu)).unwrap();
    net.vs.double();
    net
}

fn resnet(loss: &LocalLossSpec) -> SplitNet {
    net_with("resnet20", 3, HeadKind::Conv, loss)
}

fn batch() -> Batch {
    tiny_batch(6, 2, 8, true, 52)
}

fn step(net: &SplitNet, kind: RuleKind, cfg: &SgrConfig, batch: &Batch) {
    zero_grads(net);
    rules::build(kind, cfg)
        .step(net, batch, &rules::StepContext::default())
        .unwrap();
}

fn all_grads(net: &SplitNet) -> Vec<f64> {
    (0..net.num_modules())
        .flat_map(|k| net.module_variables(k, true))
        .flat_map(|(_, t)| {
            Vec::<f64>::try_from(t.grad().to_kind(tch::Kind::Double).flatten(0, -1)).unwrap()
        })
        .collect()
}

#[test]
fn local_loss_tangents_match_central_differences_in_f64() {
    let batch = batch();
    let mut cases: Vec<(String, SplitNet)> = losses()
        .into_iter()
        .map(|(name, spec)| (name.to_string(), resnet(&spec)))
        .collect();
    // PredSim on vectors (an MLP: no projection, the features compared as they are).
    let predsim = losses().pop().unwrap().1;
    cases.push((
        "predsim mlp".into(),
        net_with("mlp-3x7", 3, HeadKind::Linear, &predsim),
    ));
    for (name, net) in cases {
        let mut h = batch.images.shallow_clone();
        for k in 0..net.num_modules() - 1 {
            h = tch::no_grad(|| net.with_frozen_buffers(|| net.forward_module(k, &h, true)));
            let v = h.randn_like();
            let (value, tangent) = tch::no_grad(|| {
                net.local_loss_dual(
                    k,
                    &(h.shallow_clone(), v.shallow_clone()),
                    &batch.labels,
                    &batch.images,
                )
            });
            let loss_at = |x: &Tensor| {
                net.with_frozen_buffers(|| {
                    let (loss, _) = net.local_loss(k, x, &batch.labels, &batch.images, true);
                    loss.double_value(&[])
                })
            };
            let eps = 1e-6;
            let fd = (loss_at(&(&h + &v * eps)) - loss_at(&(&h - &v * eps))) / (2.0 * eps);
            let t = tangent.double_value(&[]);
            assert!(
                (t - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
                "{name}, module {}: tangent {t} vs central difference {fd}",
                k + 1
            );
            assert!(
                (value.double_value(&[]) - loss_at(&h)).abs() < 1e-12,
                "{name}: the dual's value is not the loss"
            );
        }
    }
}

/// The input of module `k` and module k-1's output gradient of its local loss, computed
/// independently of the rule code.
fn input_and_target(net: &SplitNet, batch: &Batch, k: usize) -> (Tensor, Tensor) {
    let mut h = batch.images.shallow_clone();
    let mut target = None;
    for j in 0..k {
        let out = net
            .forward_module(j, &h.detach(), true)
            .detach()
            .set_requires_grad(true);
        let (loss, _) = net.local_loss(j, &out, &batch.labels, &batch.images, true);
        target = Some(Tensor::run_backward(&[&loss], &[&out], false, false).remove(0));
        h = out.detach();
    }
    (h, target.unwrap())
}

#[test]
fn sgr_gradient_under_every_local_loss_matches_finite_differences_in_f64() {
    let batch = batch();
    for (name, spec) in losses() {
        let net = resnet(&spec);
        let cfg = SgrConfig {
            lambda: 3.0,
            distance: SgrDistance::L2,
            ..Default::default()
        };
        step(&net, RuleKind::Sgr, &cfg, &batch);
        let (h, target) = net.with_frozen_buffers(|| input_and_target(&net, &batch, 1));
        // L̃ = L + λ·D(∂L/∂h_in, g_prev) of module 2, L the selected local loss.
        let value = || {
            net.with_frozen_buffers(|| {
                let h_in = h.detach().set_requires_grad(true);
                let out = net.forward_module(1, &h_in, true);
                let (loss, _) = net.local_loss(1, &out, &batch.labels, &batch.images, true);
                let g = Tensor::run_backward(&[&loss], &[&h_in], true, true).remove(0);
                (loss + distance(cfg.distance, &g, &target) * cfg.lambda).double_value(&[])
            })
        };
        let (fd, picks) = fd_over_parameters(&net, 1, &value);
        let exact = picked(&net, 1, &picks);
        let err = rel_err(&exact, &fd);
        assert!(err < 1e-6, "{name}: exact vs FD over parameters {err:e}");
        // The loss's own layers are module 2's and got gradient.
        let vars = net.module_variables(1, true);
        let extra = if name.starts_with("infopro") {
            ".decoder."
        } else {
            ".sim."
        };
        let (i, _) = vars
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n.contains(extra))
            .unwrap_or_else(|| panic!("{name}: no {extra} variable in module 2"));
        assert!(picks.iter().any(|&(p, _)| p == i));
        assert!(
            vars[i]
                .1
                .grad()
                .abs()
                .sum(tch::Kind::Double)
                .double_value(&[])
                > 0.0
        );
        // The penalty matters here, so the check is not the plain loss's gradient.
        step(&net, RuleKind::Dgl, &cfg, &batch);
        assert!(rel_err(&picked(&net, 1, &picks), &exact) > 1e-3, "{name}");
    }
}

#[test]
fn jvp_and_fd_sgr_equal_exact_under_every_local_loss() {
    let batch = batch();
    for (name, spec) in losses() {
        for distance_kind in [SgrDistance::L2, SgrDistance::Cosine] {
            let exact_cfg = SgrConfig {
                lambda: 2.0,
                distance: distance_kind,
                ..Default::default()
            };
            let (a, b, c) = (resnet(&spec), resnet(&spec), resnet(&spec));
            step(&a, RuleKind::Sgr, &exact_cfg, &batch);
            let jvp = SgrConfig {
                grad: SgrGrad::Jvp,
                ..exact_cfg.clone()
            };
            step(&b, RuleKind::Sgr, &jvp, &batch);
            let fd = SgrConfig {
                grad: SgrGrad::Fd,
                fd_eps: 1e-6,
                ..exact_cfg.clone()
            };
            step(&c, RuleKind::Sgr, &fd, &batch);
            let exact = all_grads(&a);
            let err = rel_err(&all_grads(&b), &exact);
            assert!(
                err < 1e-10,
                "{name} {distance_kind:?}: jvp vs exact {err:e}"
            );
            let err = rel_err(&all_grads(&c), &exact);
            assert!(err < 1e-6, "{name} {distance_kind:?}: fd vs exact {err:e}");
            // Same running statistics (decoder BatchNorm included): the extra passes do not
            // count as forwards.
            assert_eq!(max_abs_diff(&values(&a), &values(&b)), 0.0, "{name}");
            assert!(max_abs_diff(&values(&a), &values(&c)) < 1e-12, "{name}");
        }
    }
}

#[test]
fn a_loss_s_layers_are_its_head_s_and_change_the_local_gradient() {
    let batch = batch();
    let ce = resnet(&LocalLossSpec::default());
    let counts = |net: &SplitNet| net.head_parameter_counts();
    for (name, spec) in losses() {
        let net = resnet(&spec);
        // Extra parameters counted in the aux heads, never in the network's classifier.
        let (with, without) = (counts(&net), counts(&ce));
        for k in 0..2 {
            assert!(with[k].1 > without[k].1, "{name}");
        }
        assert_eq!(with[2], without[2], "{name}: the classifier changed");
        assert!(net.parameter_count() > ce.parameter_count(), "{name}");
        for (var, _) in net.vs.variables() {
            if var.contains(".decoder.") || var.contains(".sim.") {
                let k = net.module_of_variable(&var);
                assert!(k.is_some_and(|k| k < 2), "{name}: {var} belongs to {k:?}");
                assert!(var.starts_with("aux."), "{var}");
            }
        }
        // The analytic memory of an aux module grows with the loss's layers.
        assert!(net.module_activation_bytes(0, 8) > ce.module_activation_bytes(0, 8));
        // dgl under the loss trains differently from dgl under ce (same backbone draws).
        step(&net, RuleKind::Dgl, &SgrConfig::default(), &batch);
        step(&ce, RuleKind::Dgl, &SgrConfig::default(), &batch);
        let g = |n: &SplitNet| -> Vec<f64> {
            n.module_variables(0, true)
                .into_iter()
                .filter(|(v, _)| !v.starts_with("aux."))
                .flat_map(|(_, t)| Vec::<f64>::try_from(t.grad().flatten(0, -1)).unwrap())
                .collect()
        };
        assert!(rel_err(&g(&net), &g(&ce)) > 1e-3, "{name}");
    }
}

#[test]
fn bad_local_loss_input_is_one_clear_error_and_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let base = [
        "train",
        "--data",
        "synthetic",
        "--epochs",
        "1",
        "--train-subset",
        "64",
        "--threads",
        "1",
        "--quiet",
    ];
    // `one_line`: clap's own message for an unknown value spans lines (with its hint), as for
    // every other flag; the checks of this crate are one line.
    let refused_as = |extra: &[&str], needle: &str, one_line: bool| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", o]);
        assert_refused(&args, needle, one_line, &out);
    };
    let refused = |extra: &[&str], needle: &str| refused_as(extra, needle, true);
    let dgl = ["--model", "resnet20", "--rule", "dgl", "--modules", "2"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        dgl.iter().chain(extra).copied().collect()
    };
    let with_model = |extra: &[&'static str]| -> Vec<&'static str> {
        ["--model", "resnet20"]
            .iter()
            .chain(extra)
            .copied()
            .collect()
    };
    refused_as(&with(&["--local-loss", "infopr"]), "infopr", false);
    refused(
        &with(&["--local-loss", "infopro", "--infopro-recon-weights=-1,2"]),
        "--infopro-recon-weights: -1 is out of range",
    );
    refused(
        &with(&["--local-loss", "infopro", "--infopro-class-weights", "1"]),
        "--infopro-class-weights: takes two weights",
    );
    refused(
        &with(&["--local-loss", "predsim", "--predsim-beta", "1.5"]),
        "--predsim-beta: 1.5 must be in [0, 1]",
    );
    refused(
        &with(&["--local-loss", "infopro", "--infopro-temperature", "0"]),
        "--infopro-temperature",
    );
    // Inputs it cannot reconstruct: an MLP's modules output vectors.
    refused(
        &[
            "--rule",
            "dgl",
            "--modules",
            "2",
            "--model",
            "mlp-2x16",
            "--local-loss",
            "infopro",
        ],
        "mlp-2x16 outputs vectors",
    );
    refused(
        &with_model(&["--rule", "bp", "--local-loss", "predsim"]),
        "predsim needs --rule dgl or sgr",
    );
    refused(
        &with_model(&["--rule", "fg", "--modules", "2", "--local-loss", "infopro"]),
        "needs --rule dgl or sgr",
    );
    refused(
        &with_model(&["--rule", "dgl", "--modules", "1", "--local-loss", "predsim"]),
        "needs --modules 2 or more",
    );
    // A run resumed with another local loss.
    let mut args: Vec<&str> = base.to_vec();
    args.extend_from_slice(&dgl);
    args.extend_from_slice(&["--local-loss", "predsim", "--out", o]);
    let (code, err) = sgr_status(&args);
    assert_eq!(code, 0, "{err}");
    let ckpt = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let (code, err) = sgr_status(&["train", "--resume", "--out", o, "--local-loss", "infopro"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--local-loss cannot change when resuming"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        ckpt,
        std::fs::read(out.join("checkpoint.safetensors")).unwrap()
    );
}

#[test]
fn bench_grids_take_the_local_loss_as_an_axis_of_the_local_rules() {
    let options = sgr::config::TrainOptions {
        model: Some("resnet20".parse().unwrap()),
        ..Default::default()
    };
    let cells = sgr::bench::plan(
        &options,
        &[RuleKind::Dgl, RuleKind::Bp],
        &[LocalLossKind::Ce, LocalLossKind::Predsim],
        &[1, 4],
        true,
    )
    .unwrap();
    let got: Vec<(RuleKind, LocalLossKind, usize)> = cells
        .iter()
        .map(|c| (c.rule, c.local_loss, c.modules))
        .collect();
    assert_eq!(
        got,
        vec![
            (RuleKind::Bp, LocalLossKind::Ce, 1),
            (RuleKind::Dgl, LocalLossKind::Ce, 1),
            (RuleKind::Dgl, LocalLossKind::Ce, 4),
            (RuleKind::Dgl, LocalLossKind::Predsim, 4),
            // bp at K = 4 (probe heads), with ce only: it has no local losses.
            (RuleKind::Bp, LocalLossKind::Ce, 4),
        ]
    );
    // A cell the loss cannot run on is refused by name before anything runs.
    let mlp = sgr::config::TrainOptions {
        model: Some("mlp-2x16".parse().unwrap()),
        ..Default::default()
    };
    let err = sgr::bench::plan(
        &mlp,
        &[RuleKind::Dgl],
        &[LocalLossKind::Infopro],
        &[2],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cell dgl infopro K=2") && err.contains("vectors"),
        "{err}"
    );
}
