//! How close `--sgr-grad fd` comes to the exact SGR penalty gradient on a real-size network.
//!
//! ```sh
//! cargo run --release --example sgr_fd_accuracy -- [resnet20|resnet32|resnet56|resnet110] [K] [batch] [fd_eps,...] [f32|f64|both]
//! ```
//!
//! For every module k ≥ 2 the penalty's parameter gradient λ·∇_θ D is isolated as
//! (gradients of an `sgr` step with λ = 1) − (gradients of the same step with λ = 0), once with
//! the exact double backward and once per finite-difference step size, on one random batch
//! (3x32x32, 10 classes) at PyTorch's default initialisation. Printed per precision and
//! `fd_eps`: the cosine and the relative L2 error between the two, over all module parameters.
use sgr::data::Batch;
use sgr::model::{Arch, FeatureShape, HeadKind, ModelSpec, SplitNet, SplitStrategy};
use sgr::rules::{self, RuleKind, SgrConfig, SgrGrad};
use tch::{Device, Kind, Tensor};

fn penalty_grad(net: &SplitNet, batch: &Batch, cfg: &SgrConfig) -> Tensor {
    let grads = |lambda: f64| {
        let mut vars = net.vs.trainable_variables();
        for v in vars.iter_mut() {
            v.zero_grad();
        }
        let cfg = SgrConfig {
            lambda,
            ..cfg.clone()
        };
        rules::build(RuleKind::Sgr, &cfg)
            .step(net, batch, &rules::StepContext::default())
            .expect("step");
        Tensor::cat(
            &vars
                .iter()
                .map(|v| {
                    let g = v.grad();
                    if g.defined() {
                        g.flatten(0, -1).to_kind(Kind::Double)
                    } else {
                        v.zeros_like().flatten(0, -1).to_kind(Kind::Double)
                    }
                })
                .collect::<Vec<_>>(),
            0,
        )
    };
    grads(1.0) - grads(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch: Arch = args
        .get(1)
        .and_then(|name| name.parse().ok())
        .unwrap_or_else(|| "resnet32".parse().expect("a registered network"));
    let modules: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let batch_size: i64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: Vec<f64> = args
        .get(4)
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1e-2, 1e-3, 1e-4, 1e-5]);
    let precisions: &[bool] = match args.get(5).map(String::as_str) {
        Some("f32") => &[false],
        Some("f64") => &[true],
        _ => &[false, true],
    };
    tch::set_num_threads(1);
    let spec = ModelSpec {
        arch,
        modules,
        split: SplitStrategy::Table,
        head: HeadKind::Conv,
        input: FeatureShape::map(3, 32, 32),
        classes: 10,
        penalty_cost: None,
        options: Default::default(),
        label_smoothing: 0.0,
        local_loss: Default::default(),
    };
    println!("| precision | fd_eps | cosine(fd, exact) | relative L2 error |");
    println!("|---|---|---|---|");
    for &double in precisions {
        let mut net = sgr::model::with_seed(0, || SplitNet::new(&spec, Device::Cpu)).expect("net");
        let kind = if double { Kind::Double } else { Kind::Float };
        if double {
            net.vs.double();
        }
        let batch = sgr::model::with_seed(1, || Batch {
            images: Tensor::randn([batch_size, 3, 32, 32], (kind, Device::Cpu)),
            labels: Tensor::randint(10, [batch_size], (Kind::Int64, Device::Cpu)),
        });
        let exact = penalty_grad(&net, &batch, &SgrConfig::default());
        for &fd_eps in &steps {
            let cfg = SgrConfig {
                grad: SgrGrad::Fd,
                fd_eps,
                ..SgrConfig::default()
            };
            let fd = penalty_grad(&net, &batch, &cfg);
            let cos = fd.dot(&exact).double_value(&[])
                / (fd.norm().double_value(&[]) * exact.norm().double_value(&[]));
            let rel = (&fd - &exact).norm().double_value(&[]) / exact.norm().double_value(&[]);
            let name = if double { "f64" } else { "f32" };
            println!("| {name} | {fd_eps:e} | {cos:.5} | {rel:.2e} |");
        }
    }
}
