//! Learning-rate schedules as pure functions of progress (a fractional epoch), so that they can
//! be unit-tested and a resumed run gets exactly the same rates.
use serde::{Deserialize, Serialize};

/// The decay shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Cosine annealing from the base rate to zero at the last step.
    #[default]
    Cosine,
    /// Multiply by `gamma` at each milestone epoch.
    Step,
    /// Constant rate.
    Constant,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Base (peak) learning rate.
    pub lr: f64,
    /// Linear warm-up length in epochs (may be fractional; 0 = none).
    pub warmup_epochs: f64,
    /// Milestone epochs of the step schedule.
    pub milestones: Vec<usize>,
    /// Decay factor of the step schedule.
    pub gamma: f64,
}

impl Schedule {
    /// Learning rate at `step` of `steps_per_epoch`, in a run of `epochs` epochs. Warm-up
    /// starts at lr/(warm-up steps), never at zero, so the first step already moves.
    pub fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize, epochs: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        let t = epoch as f64 + step as f64 / spe; // progress in epochs
        let warmup_steps = (self.warmup_epochs * spe).round();
        let global = (epoch * steps_per_epoch.max(1) + step) as f64;
        if warmup_steps > 0.0 && global < warmup_steps {
            return self.lr * (global + 1.0) / warmup_steps;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Step => {
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                self.lr * self.gamma.powi(passed as i32)
            }
            ScheduleKind::Cosine => {
                let total = epochs as f64 - self.warmup_epochs;
                let done = (t - self.warmup_epochs).max(0.0);
                if total <= 0.0 {
                    return self.lr;
                }
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * (done / total).min(1.0)).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: f64) -> Schedule {
        Schedule {
            kind,
            lr: 0.1,
            warmup_epochs: warmup,
            milestones: vec![2, 4],
            gamma: 0.1,
        }
    }

    #[test]
    fn cosine_starts_at_base_and_decays_to_near_zero() {
        let s = sched(ScheduleKind::Cosine, 0.0);
        assert!((s.lr(0, 0, 10, 5) - 0.1).abs() < 1e-12);
        assert!((s.lr(2, 5, 10, 5) - 0.05).abs() < 1e-12); // half way
        let last = s.lr(4, 9, 10, 5);
        assert!(last > 0.0 && last < 0.001, "{last}");
        let lrs: Vec<f64> = (0..50).map(|i| s.lr(i / 10, i % 10, 10, 5)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn warmup_is_linear_and_never_zero() {
        let s = sched(ScheduleKind::Cosine, 1.0);
        assert!((s.lr(0, 0, 10, 5) - 0.01).abs() < 1e-12);
        assert!((s.lr(0, 9, 10, 5) - 0.1).abs() < 1e-12);
        assert!((s.lr(1, 0, 10, 5) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn step_schedule_decays_at_milestones() {
        let s = sched(ScheduleKind::Step, 0.0);
        assert_eq!(s.lr(1, 9, 10, 6), 0.1);
        assert!((s.lr(2, 0, 10, 6) - 0.01).abs() < 1e-12);
        assert!((s.lr(5, 0, 10, 6) - 0.001).abs() < 1e-12);
    }
}
