//! Rule `dgl`: decoupled greedy learning (Belilovsky et al., ICML 2020), non-greedy form.
//!
//! Every module is updated on every batch. Module k takes the previous module's output
//! *detached*, so its local loss L_k (`--local-loss`; CE(head_k(f_k(sg(h_{k-1}))), y) by default) reaches only
//! θ_k and the head's parameters. Its graph is released by its own backward before module k+1 runs, which
//! is where the memory saving comes from: only one module's activations are alive at a time.
use super::{Carry, ModuleOutcome, Rule, StepContext, StepRecorder};
use crate::Result;
use crate::data::Batch;
use crate::model::SplitNet;

/// Decoupled greedy learning.
pub struct Dgl;

impl Rule for Dgl {
    fn module_step(
        &self,
        net: &SplitNet,
        k: usize,
        carry: Carry,
        batch: &Batch,
        _at: &StepContext,
        record: &mut StepRecorder,
    ) -> Result<ModuleOutcome> {
        let h_out = net.forward_module(k, &carry.h.detach(), true);
        let (loss, logits) = net.local_loss(k, &h_out, &batch.labels, &batch.images, true);
        loss.backward(); // frees module k's graph
        record.loss(&loss, &logits, &batch.labels, k + 1 == net.num_modules());
        Ok(ModuleOutcome {
            carry: Carry {
                h: h_out.detach(),
                forwarded: None,
            },
            back: None,
        })
    }
}
