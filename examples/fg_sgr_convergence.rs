//! How `fg-sgr`'s BP-free estimate of the SGR penalty gradient approaches the exact one as the
//! number of tangents N grows.
//!
//! ```sh
//! cargo run --release --example fg_sgr_convergence -- [model] [K] [batch] [N,N,...] [repeats]
//! ```
//!
//! On the first training batch of Fashion-MNIST (`data/`; random images if it is missing), at
//! the seed-1 initialisation, for module 2 of `model` (default `mlp-4x256`, K = 4, linear
//! heads, batch 128): the exact `∇_θ D` of the receiver-side l2 penalty (reverse mode, double
//! backward) against the rule's estimate with N tangents, as cosines over the module's
//! parameters, mean ± sd over `repeats` independent draws (default 4). Columns:
//! * `rule`: what `--rule fg-sgr --fg-tangents N` uses (v̂ from the estimated ĝ_in, ĝ_prev);
//! * `exact v`: the nested forward-mode estimate with the exact direction v (isolates it);
//! * `ĝ_in`: the input-gradient estimate against ∂L_k/∂h;
//! * `fg`: rule `fg`'s estimate of the plain local gradient, for reference.
use sgr::config::TrainConfig;
use sgr::data::{Batch, Batches, DatasetKind, Order};
use sgr::model::{Arch, HeadKind, SplitNet, SplitStrategy};
use sgr::rules::cross_entropy;
use sgr::rules::fg::{estimate, tangent_seed};
use sgr::rules::fg_sgr::{input_gradient, output_gradient, penalty_estimate};
use tch::{Device, Kind, Tensor};

/// Flattens `(parameter, value)` pairs in the order of `order` (data pointers).
fn flat(order: &[Tensor], list: Vec<(Tensor, Tensor)>) -> Tensor {
    let parts: Vec<Tensor> = order
        .iter()
        .map(|p| {
            list.iter()
                .find(|(q, _)| q.data_ptr() == p.data_ptr())
                .map(|(_, g)| g.flatten(0, -1).to_kind(Kind::Double))
                .unwrap_or_else(|| p.zeros_like().flatten(0, -1).to_kind(Kind::Double))
        })
        .collect();
    Tensor::cat(&parts, 0)
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten(0, -1).to_kind(Kind::Double);
    let b = b.flatten(0, -1).to_kind(Kind::Double);
    (a.dot(&b) / (a.norm() * b.norm() + 1e-300)).double_value(&[])
}

fn first_batch(cfg: &TrainConfig, batch: i64) -> Batch {
    match sgr::train::load_data(cfg) {
        Ok(ds) => Batches::new(
            &ds.train,
            &ds.meta,
            batch,
            Order::Sequential,
            false,
            Device::Cpu,
        )
        .next()
        .expect("a batch"),
        Err(e) => {
            eprintln!("({e}; using random images)");
            sgr::model::with_seed(2, || Batch {
                images: Tensor::randn([batch, 1, 28, 28], (Kind::Float, Device::Cpu)),
                labels: Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu)),
            })
        }
    }
}

fn mean_sd(xs: &[f64]) -> String {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    format!("{mean:.3} ± {:.3}", var.sqrt())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch: Arch = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| "mlp-4x256".parse().expect("a registered network"));
    let modules: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let batch_size: i64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(128);
    let ns: Vec<usize> = args
        .get(4)
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64, 256, 1024]);
    let repeats: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(4);
    tch::set_num_threads(1);
    let cfg = TrainConfig {
        data: DatasetKind::FashionMnist,
        model: arch,
        modules,
        split: SplitStrategy::Even,
        aux_head: HeadKind::Linear,
        seed: 1,
        ..Default::default()
    };
    let batch = first_batch(&cfg, batch_size);
    let spec = cfg.model_spec(sgr::model::FeatureShape::map(1, 28, 28), 10);
    let net = sgr::model::with_seed(1, || SplitNet::new(&spec, Device::Cpu)).expect("net");
    let (k, labels) = (1, &batch.labels);
    let h = tch::no_grad(|| net.forward_module(0, &batch.images, true));
    let order: Vec<Tensor> = net
        .module_variables(k, true)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    // Exact pieces by reverse mode (with the module's running statistics frozen).
    let (g_in, g_prev, exact_penalty, exact_local) = net.with_frozen_buffers(|| {
        let exact_grad = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| {
            let x = x.detach().set_requires_grad(true);
            let loss = cross_entropy(&f(&x), labels);
            Tensor::run_backward(&[&loss], &[&x], false, false).remove(0)
        };
        let g_prev = exact_grad(&h, &|x| net.head_logits(0, x, true));
        let x = h.detach().set_requires_grad(true);
        let loss = cross_entropy(
            &net.head_logits(k, &net.forward_module(k, &x, true), true),
            labels,
        );
        let g_in = Tensor::run_backward(&[&loss], &[&x], true, true).remove(0);
        let b = batch_size as f64;
        let v = ((&g_in - &g_prev) * (2.0 * b)).detach();
        let directional = (&g_in * &v).sum(Kind::Float);
        let penalty = Tensor::run_backward(&[&directional], &order, true, false);
        let local = Tensor::run_backward(&[&loss], &order, false, false);
        let cat = |gs: Vec<Tensor>| {
            Tensor::cat(
                &gs.iter()
                    .map(|g| g.flatten(0, -1).to_kind(Kind::Double))
                    .collect::<Vec<_>>(),
                0,
            )
        };
        (g_in.detach(), g_prev, cat(penalty), cat(local))
    });
    let b = batch_size as f64;
    let v_exact = (&g_in - &g_prev) * (2.0 * b);
    println!(
        "{} K={modules}, module {}, batch {batch_size}, {repeats} draws per N",
        spec.arch,
        k + 1
    );
    println!("| N | cos, rule (v̂) | cos, exact v | cos(ĝ_in, g_in) | cos(fg, ∇L) |");
    println!("|---|---|---|---|---|");
    for &n in &ns {
        let (mut rule, mut exact_v, mut input, mut local) = (vec![], vec![], vec![], vec![]);
        for r in 0..repeats {
            let seeds = |offset: usize| -> Vec<i64> {
                (0..n)
                    .map(|t| tangent_seed(1000 + r as u64, n, k, offset + t))
                    .collect()
            };
            let g_in_hat = input_gradient(&net, k, &h, labels, &seeds(1 << 20));
            let g_prev_hat = output_gradient(&net, 0, &h, labels, &seeds(2 << 20));
            let v_hat = (&g_in_hat - g_prev_hat) * (2.0 * b);
            let slope = |v: &Tensor| {
                let list = net.with_frozen_buffers(|| {
                    penalty_estimate(&net, k, &h, v, labels, &seeds(0), false)
                });
                flat(&order, list.into_iter().map(|(p, _, d)| (p, d)).collect())
            };
            rule.push(cosine(&slope(&v_hat), &exact_penalty));
            exact_v.push(cosine(&slope(&v_exact), &exact_penalty));
            input.push(cosine(&g_in_hat, &g_in));
            let plain = net.with_frozen_buffers(|| estimate(&net, k, &h, labels, &seeds(0)));
            local.push(cosine(&flat(&order, plain), &exact_local));
        }
        println!(
            "| {n} | {} | {} | {} | {} |",
            mean_sd(&rule),
            mean_sd(&exact_v),
            mean_sd(&input),
            mean_sd(&local)
        );
    }
}
