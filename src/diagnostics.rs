//! Gradient-discord diagnostics, measured the same way under every rule.
//!
//! At boundary b (between modules b-1 and b) the theory says training converges only if module
//! b's local-loss gradient w.r.t. its input, `g_in_b = ∂L_b/∂h_{b-1}`, agrees with module b-1's
//! local-loss gradient w.r.t. its output, `g_out_{b-1} = ∂L_{b-1}/∂h_{b-1}`. We report their
//! cosine and relative L2 distance, and how well the local signal `g_out_{b-1}` matches what
//! global back-propagation would deliver at `h_{b-1}` (`∂L_K/∂h_{b-1}`).
//!
//! The measurement costs one extra forward/backward per module plus one global forward/backward;
//! BatchNorm running statistics are restored afterwards, and no parameter gradient is touched.
use crate::data::Batch;
use crate::model::SplitNet;
use tch::{Kind, Tensor};

/// Discord measures at every boundary (index b-1 for the boundary before module b).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discord {
    /// cos(g_in_b, g_out_{b-1}).
    pub grad_cosine: Vec<f64>,
    /// ‖g_in_b − g_out_{b-1}‖ / ‖g_out_{b-1}‖.
    pub grad_rel_distance: Vec<f64>,
    /// cos(g_out_{b-1}, ∂L_K/∂h_{b-1}): local signal vs the global-BP gradient.
    pub bp_cosine: Vec<f64>,
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let dot = (a * b).sum(Kind::Double).double_value(&[]);
    let na = a.norm().double_value(&[]);
    let nb = b.norm().double_value(&[]);
    dot / (na * nb).max(1e-30)
}

/// Measures [`Discord`] for `net` on `batch` without changing parameters, gradients or
/// BatchNorm statistics. Returns empty vectors when K = 1.
pub fn measure(net: &SplitNet, batch: &Batch) -> Discord {
    let modules = net.num_modules();
    if modules < 2 {
        return Discord::default();
    }
    net.with_frozen_buffers(|| {
        // Local gradients: each module on its detached input, as the local rules see it.
        let mut input_grads = Vec::with_capacity(modules);
        let mut output_grads = Vec::with_capacity(modules);
        let mut h = batch.images.shallow_clone();
        for k in 0..modules {
            let h_in = h.detach().set_requires_grad(true);
            let h_out = net.forward_module(k, &h_in, true);
            let (loss, _) = net.local_loss(k, &h_out, &batch.labels, &batch.images, true);
            let mut g = Tensor::run_backward(&[&loss], &[&h_in, &h_out], false, false);
            output_grads.push(g.pop().unwrap());
            input_grads.push(g.pop().unwrap());
            h = h_out.detach();
        }
        let global = global_boundary_grads(net, batch);
        let mut d = Discord::default();
        for b in 1..modules {
            let (g_in, g_out) = (&input_grads[b], &output_grads[b - 1]);
            d.grad_cosine.push(cosine(g_in, g_out));
            let rel =
                (g_in - g_out).norm().double_value(&[]) / g_out.norm().double_value(&[]).max(1e-30);
            d.grad_rel_distance.push(rel);
            d.bp_cosine.push(cosine(g_out, &global[b - 1]));
        }
        d
    })
}

/// The gradient global back-propagation delivers at every boundary, `∂L_K/∂h_b` for
/// b = 1..K-1 (module outputs 0..K-2), computed module by module: one forward without a graph
/// keeps only the boundary activations, then a backward sweep recomputes each module from its
/// input and pushes the upstream gradient through it (`∂⟨f_k(h), u⟩/∂h = J_kᵀ u`). Peak memory
/// is one module's graph; the values equal an end-to-end backward (BatchNorm uses the same
/// batch statistics in both passes). Call inside [`SplitNet::with_frozen_buffers`].
pub fn global_boundary_grads(net: &SplitNet, batch: &Batch) -> Vec<Tensor> {
    let modules = net.num_modules();
    let mut inputs = Vec::with_capacity(modules);
    let mut h = batch.images.shallow_clone();
    tch::no_grad(|| {
        for k in 0..modules {
            let out = net.forward_module(k, &h, true);
            inputs.push(std::mem::replace(&mut h, out));
        }
    });
    let mut grads = Vec::with_capacity(modules - 1);
    let mut upstream: Option<Tensor> = None;
    for k in (1..modules).rev() {
        let h_in = inputs[k].detach().set_requires_grad(true);
        let out = net.forward_module(k, &h_in, true);
        let scalar = match &upstream {
            None => {
                net.local_loss(k, &out, &batch.labels, &batch.images, true)
                    .0
            }
            Some(u) => (&out * u).sum(out.kind()),
        };
        let g = Tensor::run_backward(&[&scalar], &[&h_in], false, false).remove(0);
        grads.push(g.shallow_clone());
        upstream = Some(g);
    }
    grads.reverse();
    grads
}
