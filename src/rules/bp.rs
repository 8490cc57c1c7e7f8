//! Rule `bp`: global back-propagation, the baseline every local rule is measured against.
//!
//! The backbone and classifier get the gradient of the last loss only. When K > 1, the auxiliary
//! heads still exist and are trained on *detached* module outputs, so they act as depth-wise
//! probes (their accuracies are comparable to the local rules') without changing the backbone.
use super::{Carry, ModuleOutcome, Rule, StepContext, StepRecorder, StepStats};
use crate::Result;
use crate::data::Batch;
use crate::model::SplitNet;

/// Global back-propagation.
pub struct Bp;

impl Rule for Bp {
    fn step(&self, net: &SplitNet, batch: &Batch, _at: &StepContext) -> Result<StepStats> {
        let modules = net.num_modules();
        let mut h = batch.images.shallow_clone();
        let mut total = None;
        let mut record = StepRecorder::new(0..modules, batch.labels.size()[0]);
        for k in 0..modules {
            h = net.forward_module(k, &h, true);
            let last = k + 1 == modules;
            // Probe heads see a detached copy: no gradient from them reaches the backbone.
            let head_input = if last { h.shallow_clone() } else { h.detach() };
            let logits = net.head_logits(k, &head_input, true);
            let loss = net.loss(&logits, &batch.labels);
            record.loss(&loss, &logits, &batch.labels, last);
            total = Some(match total {
                None => loss,
                Some(t) => t + loss,
            });
        }
        if let Some(total) = total {
            total.backward();
        }
        Ok(record.finish())
    }

    /// bp's step is one backward through every module, so it cannot be cut at a boundary.
    fn module_step(
        &self,
        _net: &SplitNet,
        _k: usize,
        _carry: Carry,
        _batch: &Batch,
        _at: &StepContext,
        _record: &mut StepRecorder,
    ) -> Result<ModuleOutcome> {
        Err(crate::Error::Config(
            "--rule bp back-propagates through every module at once, so its step cannot be cut into modules (pipeline stages need a local rule)".into(),
        ))
    }
}
