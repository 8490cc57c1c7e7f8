//! Small builders shared by the integration tests.
use sgr::data::Batch;
use sgr::model::{
    Arch, FeatureShape, HeadKind, ModelSpec, NetOptions, SplitNet, SplitStrategy, TokenPool,
};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// A tiny ResNet-20 cut into `modules` even modules, on `c`x`s`x`s` inputs with 3 classes.
pub fn tiny_net(modules: usize, c: i64, s: i64, double: bool, seed: i64) -> SplitNet {
    tiny_net_with_head(HeadKind::Conv, modules, c, s, double, seed)
}

/// [`tiny_net`] with auxiliary heads of `head` kind.
pub fn tiny_net_with_head(
    head: HeadKind,
    modules: usize,
    c: i64,
    s: i64,
    double: bool,
    seed: i64,
) -> SplitNet {
    tiny_with(
        "resnet20",
        head,
        modules,
        (c, s),
        double,
        seed,
        NetOptions::default(),
    )
}

/// Network `arch` with `head` heads cut evenly into `modules` modules, on `c`x`s`x`s` inputs
/// with 3 classes and network `options`, drawn from `seed` (in f64 if `double`).
fn tiny_with(
    arch: &str,
    head: HeadKind,
    modules: usize,
    (c, s): (i64, i64),
    double: bool,
    seed: i64,
    options: NetOptions,
) -> SplitNet {
    let spec = ModelSpec {
        arch: arch.parse::<Arch>().unwrap(),
        modules,
        split: SplitStrategy::Even,
        head,
        input: FeatureShape::map(c, s, s),
        classes: 3,
        penalty_cost: None,
        options,
        label_smoothing: 0.0,
        local_loss: Default::default(),
    };
    // Seed and draw under the library's lock: the tests run on several threads.
    let mut net = sgr::model::with_seed(seed, || SplitNet::new(&spec, Device::Cpu)).unwrap();
    if double {
        net.vs.double();
    }
    net
}

/// A random batch matching [`tiny_net`].
pub fn tiny_batch(b: i64, c: i64, s: i64, double: bool, seed: i64) -> Batch {
    let kind = if double { Kind::Double } else { Kind::Float };
    sgr::model::with_seed(seed, || Batch {
        images: Tensor::randn([b, c, s, s], (kind, Device::Cpu)),
        labels: Tensor::randint(3, [b], (Kind::Int64, Device::Cpu)),
    })
}

/// Every trainable variable's gradient (zeros where undefined), by name.
pub fn grads(net: &SplitNet) -> HashMap<String, Tensor> {
    net.vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| {
            let g = t.grad();
            let g = if g.defined() {
                g.copy()
            } else {
                t.zeros_like()
            };
            (n, g)
        })
        .collect()
}

/// Every variable's value, by name.
pub fn values(net: &SplitNet) -> HashMap<String, Tensor> {
    net.vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

/// Sets every gradient of `net` to zero.
pub fn zero_grads(net: &SplitNet) {
    for (_, mut t) in net.vs.variables() {
        t.zero_grad();
    }
}

/// Largest absolute difference over tensors with the same names.
pub fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(n, t)| (t - &b[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

/// Fails if `stderr` of an `sgr` command shows a panic: Rust's own report, or the one-line
/// `internal error` the binary's panic hook turns every panic into.
pub fn assert_no_panic(stderr: &str) {
    for marker in ["panicked", "RUST_BACKTRACE", "internal error"] {
        assert!(
            !stderr.contains(marker),
            "the command panicked ({marker:?} in its stderr): {stderr}"
        );
    }
}

/// The project's Python (`.venv/bin/python`), which the PyTorch reference runs on.
pub fn venv_python() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Why a test that needs Python torch cannot run, or `None` when it must run.
///
/// `SGR_TORCH_INSTALL=light` (scripts/setup.sh) installs libtorch for the Rust side only and
/// records `light` in `<venv>/sgr-torch-install`; there, and only there, a failing
/// `import torch` means "skip". Everywhere else (the full install, which CI uses, or a venv
/// without the record) the test runs and a missing torch is a failure, so a skip can never
/// hide a broken reference.
pub fn torch_skip_reason(venv: &std::path::Path) -> Option<String> {
    let mode = std::fs::read_to_string(venv.join("sgr-torch-install")).ok()?;
    if mode.trim() != "light" {
        return None;
    }
    let imports = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!imports).then(|| {
        "needs Python torch, which the light install (SGR_TORCH_INSTALL=light) leaves out; rerun scripts/setup.sh without it to run this test".to_string()
    })
}

/// Prints one `skipped` line and returns true when the PyTorch reference cannot run here
/// (see [`torch_skip_reason`]).
pub fn skip_without_torch(test: &str) -> bool {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv");
    match torch_skip_reason(&venv) {
        Some(why) => {
            eprintln!("skipped: {test}: {why}");
            true
        }
        None => false,
    }
}

/// ‖a − b‖ / ‖b‖ over flattened vectors.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// A tiny `mlp-{depth}x{width}` cut into `modules` even modules with `head` auxiliary heads,
/// on `c`x`s`x`s` inputs with 3 classes (batches from [`tiny_batch`]).
pub fn tiny_mlp(
    depth: usize,
    width: i64,
    head: HeadKind,
    modules: usize,
    (c, s): (i64, i64),
    double: bool,
    seed: i64,
) -> SplitNet {
    tiny_with(
        &format!("mlp-{depth}x{width}"),
        head,
        modules,
        (c, s),
        double,
        seed,
        NetOptions::default(),
    )
}

/// A tiny ViT `vit-{depth}x8h2` (patch 4 on `c`x8x8 inputs: 4 patch tokens) cut into
/// `modules` even modules with `head` auxiliary heads and `pool` token pooling, 3 classes.
pub fn tiny_vit(
    depth: usize,
    head: HeadKind,
    modules: usize,
    c: i64,
    pool: TokenPool,
    double: bool,
    seed: i64,
) -> SplitNet {
    let options = NetOptions {
        patch_size: Some(4),
        token_pool: pool,
    };
    tiny_with(
        &format!("vit-{depth}x8h2"),
        head,
        modules,
        (c, 8),
        double,
        seed,
        options,
    )
}

/// Checks every unit's and every head's tangent against a central difference of its training
/// forward, in f64, running the units in order on `batch`.
pub fn check_tangents(net: &SplitNet, batch: &Batch) {
    // J·v by a central difference of the layer's training forward (frozen running
    // statistics); ReLU kinks are O(ε) rare at ε = 1e-6, so it converges in f64.
    let central = |f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, v: &Tensor| {
        let eps = 1e-6;
        net.with_frozen_buffers(|| (f(&(x + v * eps)) - f(&(x - v * eps))) / (2.0 * eps))
    };
    let mut x = batch.images.shallow_clone();
    let range_ends: Vec<usize> = net.module_ranges().iter().map(|r| r.end).collect();
    for u in 0..range_ends[range_ends.len() - 1] {
        // Every unit, and every head on its module's output.
        let v = x.randn_like();
        let (value, tangent) =
            tch::no_grad(|| net.unit_forward_dual(u, &(x.shallow_clone(), v.shallow_clone())));
        let fd = central(&|t| net.forward_unit(u, t, true), &x, &v);
        let err = (&tangent - &fd).norm().double_value(&[]) / fd.norm().double_value(&[]);
        assert!(
            err < 1e-6,
            "unit {u}: tangent vs central difference {err:e}"
        );
        let train = net.with_frozen_buffers(|| net.forward_unit(u, &x, true));
        assert!((&value - &train).abs().max().double_value(&[]) < 1e-12);
        if range_ends.contains(&(u + 1)) {
            let k = range_ends.iter().position(|&e| e == u + 1).unwrap();
            let v = value.randn_like();
            let (_, tangent) = tch::no_grad(|| {
                net.head_logits_dual(k, &(value.shallow_clone(), v.shallow_clone()))
            });
            let fd = central(&|t| net.head_logits(k, t, true), &value, &v);
            let err = (&tangent - &fd).norm().double_value(&[]) / fd.norm().double_value(&[]);
            assert!(
                err < 1e-6,
                "head {k}: tangent vs central difference {err:e}"
            );
        }
        x = value;
    }
}

/// Writes `text` to `path`, creating its folder.
pub fn write(path: &std::path::Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A child process's stdout and stderr as one string.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A few entries of every parameter of module `k`, as (variable index in
/// `module_variables(k, true)`, flat index): the first, middle and last.
pub fn parameter_picks(net: &SplitNet, k: usize) -> Vec<(usize, usize)> {
    let vars = net.module_variables(k, true);
    let mut picks = Vec::new();
    for (i, (_, t)) in vars.iter().enumerate() {
        let n = t.numel();
        for j in [0, n / 2, n - 1] {
            picks.push((i, j));
        }
    }
    picks
}

/// Central finite difference of `f` w.r.t. a few entries of module `k`'s parameters.
pub fn fd_over_parameters(
    net: &SplitNet,
    k: usize,
    f: &dyn Fn() -> f64,
) -> (Vec<f64>, Vec<(usize, usize)>) {
    let vars = net.module_variables(k, true);
    let picks = parameter_picks(net, k);
    let delta = 1e-6;
    let fd = picks
        .iter()
        .map(|&(i, j)| {
            let flat = vars[i].1.view(-1);
            let orig = tch::no_grad(|| flat.double_value(&[j as i64]));
            let set = |v: f64| {
                tch::no_grad(|| {
                    let _ = flat.get(j as i64).fill_(v);
                })
            };
            set(orig + delta);
            let plus = f();
            set(orig - delta);
            let minus = f();
            set(orig);
            (plus - minus) / (2.0 * delta)
        })
        .collect();
    (fd, picks)
}

/// Module `k`'s gradient at `picks` (see [`parameter_picks`]).
pub fn picked(net: &SplitNet, k: usize, picks: &[(usize, usize)]) -> Vec<f64> {
    let vars = net.module_variables(k, true);
    picks
        .iter()
        .map(|&(i, j)| vars[i].1.grad().view(-1).double_value(&[j as i64]))
        .collect()
}

/// Runs the `sgr` binary with `args`: its exit code (-1 if killed) and its stderr.
pub fn sgr_status(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs the `sgr` binary with `args` and asserts a clean refusal: a non-zero exit, `needle` on
/// an `error` line, no panic, exactly one line of output when `one_line` (clap's own messages
/// for unknown values span lines), and nothing at `out` (no run folder).
pub fn assert_refused(args: &[&str], needle: &str, one_line: bool, out: &std::path::Path) {
    let (code, err) = sgr_status(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(
        err.contains("error") && err.contains(needle),
        "{args:?}: {err}"
    );
    if one_line {
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_no_panic(&err);
    assert!(!out.exists(), "{args:?} wrote the run folder");
}
