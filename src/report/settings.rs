//! Settings: what distinguishes runs beyond rule and K, read generically from each run's
//! configuration, so that a field added to the trainer later (an SGR variant, a network) splits
//! the report's rows without a change here. Also the statistics of the study: runs of one setting
//! aggregated over seeds, paired per-seed differences against `dgl` with a Student-t interval,
//! and the convergence check.
//!
//! A run's *setting* is its configuration (a missing key taking its default) without the seed
//! and the fields that only say how it was executed, and without the fields that cannot change
//! what it trains: SGR's fields for a rule other than `sgr`, `fd_eps` unless `sgr_grad` is `fd`,
//! the step schedule's `milestones` and `gamma` for another schedule, `lambda_schedule_epochs`
//! for a constant λ, and the split and auxiliary head of a one-module run.
use super::load::{Run, Runs};
use super::mean_std;
use crate::rules::RuleKind;
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Config fields that say how a run was executed, not what it trained.
const RUN_ONLY: &[&str] = &[
    "seed",
    "threads",
    "data_dir",
    "diag_every",
    "on_nan",
    "device",
];

/// Fields of a one-module run that cannot matter (there is no boundary and no auxiliary head).
const MULTI_MODULE_ONLY: &[&str] = &["split", "aux_head"];

/// Defaults of fields that this build's `TrainConfig` may not know yet; a run folder written by
/// a build without them is one that ran with these values.
const LATER_DEFAULTS: &[(&str, &str)] =
    &[("sgr_side", "receiver"), ("lambda_schedule", "constant")];

/// The order in which fields appear in a label; unlisted fields follow alphabetically.
const LABEL_ORDER: &[&str] = &[
    "model",
    "data",
    "sgr_distance",
    "lambda",
    "sgr_side",
    "lambda_schedule",
    "lambda_schedule_epochs",
    "sgr_every",
    "sgr_grad",
    "sgr_from",
    "fd_eps",
];

/// Whether a config field only matters to SGR (`dgl` and `bp` runs ignore it).
pub(super) fn sgr_only(key: &str) -> bool {
    key.starts_with("sgr_") || key.starts_with("lambda") || key == "fd_eps"
}

/// Whether a config field only matters to the forward-gradient rule `fg`.
pub(super) fn fg_only(key: &str) -> bool {
    key.starts_with("fg_")
}

/// The rank of a rule in tables: the reference first, then plain local learning, then SGR.
pub(super) fn rule_rank(rule: &str) -> usize {
    match rule {
        "bp" => 0,
        "dgl" => 1,
        "sgr" => 2,
        "fg" => 3,
        "fg-sgr" => 4,
        _ => 5,
    }
}

/// A configuration as a sorted map (so that equal settings serialise to equal text).
pub(super) type Fields = BTreeMap<String, Value>;

/// Every field's default: this build's `TrainConfig::default()` plus [`LATER_DEFAULTS`].
fn defaults() -> Fields {
    let mut d: Fields = match serde_json::to_value(crate::config::TrainConfig::default()) {
        Ok(Value::Object(m)) => m.into_iter().collect(),
        _ => Fields::new(),
    };
    for (k, v) in LATER_DEFAULTS {
        d.entry(k.to_string()).or_insert_with(|| Value::from(*v));
    }
    d
}

fn text<'f>(f: &'f Fields, key: &str) -> Option<&'f str> {
    f.get(key).and_then(Value::as_str)
}

/// Drops the fields that do not make a setting (see the module documentation).
fn canonicalize(f: &mut Fields) {
    for k in RUN_ONLY {
        f.remove(*k);
    }
    let rule = text(f, "rule").and_then(|r| <RuleKind as clap::ValueEnum>::from_str(r, false).ok());
    if !rule.is_some_and(RuleKind::reconciles) {
        f.retain(|k, _| !sgr_only(k));
    }
    if !rule.is_some_and(RuleKind::forward_gradient) {
        f.retain(|k, _| !fg_only(k));
    }
    if text(f, "sgr_grad") != Some("fd") {
        f.remove("fd_eps");
    }
    if text(f, "lambda_schedule") == Some("constant") {
        f.remove("lambda_schedule_epochs");
    }
    if text(f, "schedule") != Some("step") {
        f.remove("milestones");
        f.remove("gamma");
    }
    if f.get("modules").and_then(Value::as_u64) == Some(1) {
        for k in MULTI_MODULE_ONLY {
            f.remove(*k);
        }
    }
}

/// The setting of a run whose configuration is `config` (`None`: only rule and K are known).
fn setting_fields(run: &Run, config: Option<&Value>, defaults: &Fields) -> Fields {
    let mut f = defaults.clone();
    if let Some(Value::Object(c)) = config {
        for (k, v) in c {
            f.insert(k.clone(), v.clone());
        }
    }
    f.insert("rule".into(), Value::from(run.rule.as_str()));
    f.insert("modules".into(), Value::from(run.modules));
    canonicalize(&mut f);
    f
}

/// The fields a paired baseline must share with a setting: all but the rule and SGR's and
/// `fg`'s fields.
/// With `whole_network`, also not K, split or auxiliary head (to compare `bp` with `dgl`, or
/// any run with `bp`'s error).
pub(super) fn pairing_key(f: &Fields, whole_network: bool) -> String {
    let kept: Fields = f
        .iter()
        .filter(|(k, _)| k.as_str() != "rule" && !sgr_only(k) && !fg_only(k))
        .filter(|(k, _)| {
            !(whole_network && (k.as_str() == "modules" || MULTI_MODULE_ONLY.contains(&k.as_str())))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::to_string(&kept).unwrap_or_default()
}

/// The runs of one setting over seeds.
#[derive(Debug)]
pub(super) struct Setting<'a> {
    /// The setting's fields (see the module documentation).
    pub(super) fields: Fields,
    /// Rule name.
    pub(super) rule: &'a str,
    /// K.
    pub(super) k: usize,
    /// The rule and the values of the fields that vary across the sweep, without K.
    pub(super) label: String,
    /// Its runs, by seed.
    pub(super) runs: Vec<&'a Run>,
}

impl<'a> Setting<'a> {
    /// Its finished runs.
    pub(super) fn finished(&self) -> Vec<&'a Run> {
        self.runs
            .iter()
            .copied()
            .filter(|r| r.finished().is_some())
            .collect()
    }
    /// `f` of every run where it is defined (finished runs, for the statistics of `Run`).
    pub(super) fn values(&self, f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(|r| f(r)).collect()
    }
    /// Mean of [`Setting::values`].
    pub(super) fn mean(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        mean_std(&self.values(f)).map(|m| m.0)
    }
    /// Whether the rule trains modules in isolation (not `bp`).
    pub(super) fn is_local(&self) -> bool {
        self.rule != "bp"
    }
    /// SGR's λ, if the setting has one.
    pub(super) fn lambda(&self) -> Option<f64> {
        self.fields.get("lambda").and_then(Value::as_f64)
    }
    /// The convergence check over its finished runs.
    pub(super) fn convergence(&self) -> Option<Convergence> {
        convergence(&self.finished())
    }
}

/// Every setting of a sweep, in table order (rule, label, K).
#[derive(Debug)]
pub(super) struct Settings<'a> {
    /// The settings.
    pub(super) list: Vec<Setting<'a>>,
    /// Fields (besides rule and K) whose value differs between settings that have them.
    pub(super) varying: Vec<String>,
}

impl Settings<'_> {
    /// Whether every label is just the rule (an old rule × K grid).
    pub(super) fn labels_are_rules(&self) -> bool {
        self.list.iter().all(|s| s.label == s.rule)
    }
}

/// Groups the runs of a sweep into settings and labels them.
pub(super) fn settings(runs: &Runs) -> Settings<'_> {
    let defaults = defaults();
    let mut map: BTreeMap<String, (Fields, Vec<&Run>)> = BTreeMap::new();
    let mut unknown = Vec::new();
    for r in &runs.runs {
        match &r.config {
            Some(c) => {
                let f = setting_fields(r, Some(c), &defaults);
                let key = serde_json::to_string(&f).unwrap_or_default();
                map.entry(key).or_insert_with(|| (f, Vec::new())).1.push(r);
            }
            None => unknown.push(r),
        }
    }
    // A run whose configuration is unknown (listed in sweep.json without one, never started)
    // belongs to the one known setting of its rule and K; with several, it stands alone.
    for r in unknown {
        let same: Vec<&String> = map
            .iter()
            .filter(|(_, (f, _))| {
                text(f, "rule") == Some(r.rule.as_str())
                    && f.get("modules").and_then(Value::as_u64) == Some(r.modules as u64)
            })
            .map(|(k, _)| k)
            .collect();
        let key = match same.as_slice() {
            [one] => (*one).clone(),
            _ => {
                let f = setting_fields(r, None, &defaults);
                let key = serde_json::to_string(&f).unwrap_or_default();
                map.entry(key.clone()).or_insert_with(|| (f, Vec::new()));
                key
            }
        };
        if let Some(entry) = map.get_mut(&key) {
            entry.1.push(r);
        }
    }
    let mut list: Vec<Setting> = map
        .into_values()
        .map(|(fields, mut runs)| {
            runs.sort_by(|a, b| a.seed.cmp(&b.seed).then(a.dir.cmp(&b.dir)));
            Setting {
                rule: runs[0].rule.as_str(),
                k: runs[0].modules,
                fields,
                label: String::new(),
                runs,
            }
        })
        .collect();
    let varying = label_all(&mut list);
    // By rule, then by the varying fields in label order (λ numerically), then K.
    list.sort_by(|a, b| {
        (rule_rank(a.rule), a.rule)
            .cmp(&(rule_rank(b.rule), b.rule))
            .then_with(|| {
                varying
                    .iter()
                    .map(|k| value_cmp(a.fields.get(k), b.fields.get(k)))
                    .find(|o| o.is_ne())
                    .unwrap_or(Ordering::Equal)
            })
            .then_with(|| a.label.cmp(&b.label))
            .then(a.k.cmp(&b.k))
    });
    Settings { list, varying }
}

/// Labels every setting by the fields that vary, returning those fields. If two settings of
/// one K would still share a label (they differ only in a field one of them lacks), that field
/// is shown too.
fn label_all(list: &mut [Setting]) -> Vec<String> {
    let mut values: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for s in list.iter() {
        for (k, v) in &s.fields {
            values.entry(k).or_default().insert(v.to_string());
        }
    }
    let mut varying: Vec<String> = values
        .iter()
        .filter(|(k, vals)| !matches!(**k, "rule" | "modules") && vals.len() > 1)
        .map(|(k, _)| k.to_string())
        .collect();
    for _ in 0..2 {
        for s in list.iter_mut() {
            s.label = label(s.rule, &s.fields, &varying);
        }
        let mut extra = BTreeSet::new();
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if a.label == b.label && a.k == b.k {
                    let keys: BTreeSet<&String> = a.fields.keys().chain(b.fields.keys()).collect();
                    extra.extend(
                        keys.into_iter()
                            .filter(|k| a.fields.get(*k) != b.fields.get(*k))
                            .cloned(),
                    );
                }
            }
        }
        if extra.is_empty() {
            break;
        }
        varying.extend(extra);
        varying.sort();
        varying.dedup();
    }
    varying.sort_by_key(|k| label_rank(k));
    varying
}

/// Numbers by value, anything else by its JSON text; a missing field first.
fn value_cmp(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            let f = |n: &serde_json::Number| n.as_f64().unwrap_or(f64::NAN);
            f(x).total_cmp(&f(y))
        }
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
        (x, y) => x.is_some().cmp(&y.is_some()),
    }
}

fn label_rank(key: &str) -> (usize, String) {
    let rank = LABEL_ORDER
        .iter()
        .position(|k| *k == key)
        .unwrap_or(LABEL_ORDER.len());
    (rank, key.to_string())
}

/// `sgr cosine λ=0.1 sender`: the rule, then each varying field the setting has, in
/// [`LABEL_ORDER`]; names of networks, data sets and SGR variants bare, λ as `λ=`, the rest as
/// `field=value`. A field the setting lacks is left out.
pub(super) fn label(rule: &str, fields: &Fields, varying: &[String]) -> String {
    let mut keys: Vec<&String> = varying.iter().collect();
    keys.sort_by_key(|k| label_rank(k));
    let mut parts = vec![rule.to_string()];
    for k in keys {
        let Some(v) = fields.get(k.as_str()) else {
            continue;
        };
        let value = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        parts.push(match k.as_str() {
            "model" | "data" | "sgr_distance" | "sgr_side" | "lambda_schedule" | "sgr_grad" => {
                value
            }
            "lambda" => format!("λ={value}"),
            "lambda_schedule_epochs" => format!("λ-epochs={value}"),
            "sgr_every" => format!("every={value}"),
            "sgr_from" => format!("from={value}"),
            other => format!("{other}={value}"),
        });
    }
    parts.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// `P(|T| ≤ t)` for Student's t with `df` degrees of freedom, by the closed-form finite series
/// for integer `df` (with θ = atan(t/√df), a sum of powers of cos θ; Abramowitz & Stegun
/// 26.7.3–4).
fn t_central(t: f64, df: usize) -> f64 {
    let theta = (t / (df as f64).sqrt()).atan();
    let (sin, cos) = theta.sin_cos();
    let c2 = cos * cos;
    if df % 2 == 1 {
        // (2/π)(θ + sin θ cos θ (1 + (2/3) cos²θ + (2·4)/(3·5) cos⁴θ + …)), df − 2 the top power.
        let mut sum = 0.0;
        if df > 1 {
            let mut term = 1.0;
            sum = 1.0;
            for j in 1..=(df - 3) / 2 {
                term *= c2 * (2 * j) as f64 / (2 * j + 1) as f64;
                sum += term;
            }
        }
        std::f64::consts::FRAC_2_PI * (theta + sin * cos * sum)
    } else {
        // sin θ (1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + …), df − 2 the top power.
        let mut term = 1.0;
        let mut sum = 1.0;
        for j in 1..df / 2 {
            term *= c2 * (2 * j - 1) as f64 / (2 * j) as f64;
            sum += term;
        }
        sin * sum
    }
}

/// The `p` quantile of Student's t with `df` ≥ 1 degrees of freedom, for `p` in (0, 1)
/// (e.g. `t_quantile(0.975, 2)` ≈ 4.303, the half-width factor of a 95% interval from three
/// values). Solved by bisection on the exact distribution function to 1e-12.
///
/// # Panics
/// If `df` is 0 or `p` is outside (0, 1) (the report only asks for df = pairs − 1 ≥ 1).
pub fn t_quantile(p: f64, df: usize) -> f64 {
    assert!(df >= 1 && p > 0.0 && p < 1.0, "t_quantile({p}, {df})");
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let central = 2.0 * p - 1.0;
    let mut hi = 1.0;
    while t_central(hi, df) < central {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    while hi - lo > 1e-12 * hi.max(1.0) {
        let mid = 0.5 * (lo + hi);
        if t_central(mid, df) < central {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Mean of paired differences with its 95% Student-t interval.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Interval {
    /// Number of pairs.
    pub(super) n: usize,
    /// Mean difference.
    pub(super) mean: f64,
    /// Sample standard deviation (n ≥ 2).
    pub(super) std: Option<f64>,
    /// t quantile 0.975 with n − 1 degrees of freedom (n ≥ 2).
    pub(super) t: Option<f64>,
    /// mean ∓ t·std/√n (n ≥ 2).
    pub(super) ci: Option<(f64, f64)>,
}

impl Interval {
    /// The interval lies entirely above (`Some(true)`) or below (`Some(false)`) zero.
    pub(super) fn excludes_zero(&self) -> Option<bool> {
        match self.ci {
            Some((lo, _)) if lo > 0.0 => Some(true),
            Some((_, hi)) if hi < 0.0 => Some(false),
            _ => None,
        }
    }
}

/// The mean of `diffs` and its 95% t-interval (`None` with no pairs; no interval with one).
pub(super) fn interval(diffs: &[f64]) -> Option<Interval> {
    let (mean, std) = mean_std(diffs)?;
    let n = diffs.len();
    let t = std.map(|_| t_quantile(0.975, n - 1));
    let ci = std.zip(t).map(|(s, t)| {
        let half = t * s / (n as f64).sqrt();
        (mean - half, mean + half)
    });
    Some(Interval {
        n,
        mean,
        std,
        t,
        ci,
    })
}

/// One seed's pair of runs.
#[derive(Debug)]
pub(super) struct Pair<'a> {
    pub(super) seed: u64,
    pub(super) run: &'a Run,
    pub(super) baseline: &'a Run,
    /// Test error of `run` minus that of `baseline`, in points.
    pub(super) diff: f64,
}

/// A setting's runs paired by seed with those of a `dgl` setting of the same data, network,
/// K and recipe.
#[derive(Debug)]
pub(super) struct Comparison<'a> {
    /// Index of the setting in [`Settings::list`].
    pub(super) setting: usize,
    /// Index of the `dgl` setting.
    pub(super) baseline: usize,
    /// The pairs, by seed.
    pub(super) pairs: Vec<Pair<'a>>,
    /// Mean difference and interval.
    pub(super) interval: Option<Interval>,
    /// Runs of either setting left out, with why.
    pub(super) unpaired: Vec<(String, String)>,
}

/// Every comparison of a non-`dgl` setting with `dgl` (and of an `fg-sgr` setting with `fg`),
/// and the settings that have no `dgl` setting to pair with (index, reason).
pub(super) fn comparisons<'a>(
    settings: &Settings<'a>,
) -> (Vec<Comparison<'a>>, Vec<(usize, String)>) {
    let mut out = Vec::new();
    let mut alone = Vec::new();
    for (i, s) in settings.list.iter().enumerate() {
        if s.rule == "dgl" {
            continue;
        }
        let whole = !s.is_local();
        let key = pairing_key(&s.fields, whole);
        let bases: Vec<usize> = settings
            .list
            .iter()
            .enumerate()
            .filter(|(_, d)| d.rule == "dgl" && pairing_key(&d.fields, whole) == key)
            .map(|(j, _)| j)
            .collect();
        if bases.is_empty() {
            alone.push((
                i,
                if whole {
                    "no dgl setting of the same data, network and recipe".to_string()
                } else {
                    "no dgl setting of the same data, network, K and recipe".to_string()
                },
            ));
        }
        for j in bases {
            out.push(compare(settings, i, j));
        }
        // SGR without a reverse pass is also paired with its own plain rule, `fg`: that
        // difference is the penalty's effect, not the cost of forward gradients.
        if s.rule == "fg-sgr" {
            for (j, _) in settings
                .list
                .iter()
                .enumerate()
                .filter(|(_, d)| d.rule == "fg" && pairing_key(&d.fields, whole) == key)
            {
                out.push(compare(settings, i, j));
            }
        }
    }
    out.sort_by_key(|c| (settings.list[c.baseline].k, c.setting));
    (out, alone)
}

/// Pairs the finished runs of two settings by seed.
fn compare<'a>(settings: &Settings<'a>, i: usize, j: usize) -> Comparison<'a> {
    let (s, d) = (&settings.list[i], &settings.list[j]);
    let mut unpaired = Vec::new();
    for r in s
        .runs
        .iter()
        .chain(&d.runs)
        .filter(|r| r.finished().is_none())
    {
        unpaired.push((r.dir.clone(), r.state.to_string()));
    }
    let by_seed = |runs: Vec<&'a Run>, unpaired: &mut Vec<(String, String)>| {
        let mut m: BTreeMap<u64, &'a Run> = BTreeMap::new();
        for r in runs {
            if let Some(first) = m.get(&r.seed) {
                unpaired.push((
                    r.dir.clone(),
                    format!("a second run of seed {} (`{}` is used)", r.seed, first.dir),
                ));
            } else {
                m.insert(r.seed, r);
            }
        }
        m
    };
    let mine = by_seed(s.finished(), &mut unpaired);
    let base = by_seed(d.finished(), &mut unpaired);
    let mut pairs = Vec::new();
    for (&seed, &run) in &mine {
        match base.get(&seed) {
            Some(&b) => pairs.push(Pair {
                seed,
                run,
                baseline: b,
                diff: run.test_error().unwrap_or(f64::NAN) - b.test_error().unwrap_or(f64::NAN),
            }),
            None => unpaired.push((
                run.dir.clone(),
                format!("no finished {} run with seed {seed}", d.label),
            )),
        }
    }
    for (&seed, &b) in &base {
        if !mine.contains_key(&seed) {
            unpaired.push((
                b.dir.clone(),
                format!("no finished {} run with seed {seed}", s.label),
            ));
        }
    }
    let diffs: Vec<f64> = pairs.iter().map(|p| p.diff).collect();
    Comparison {
        setting: i,
        baseline: j,
        interval: interval(&diffs),
        pairs,
        unpaired,
    }
}

/// Whether test error still moved at the end of training.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Convergence {
    /// Epochs trained.
    pub(super) epochs: usize,
    /// The epoch before the last 20% of epochs: the window is `from..=epochs`.
    pub(super) from: usize,
    /// Range (max − min) of the mean-over-seeds test error over the window, points.
    pub(super) moved: f64,
    /// `moved` < [`CONVERGED_POINTS`].
    pub(super) converged: bool,
    /// Seeds averaged.
    pub(super) seeds: usize,
}

/// How little test error may move over the last 20% of epochs for a setting to count as
/// converged (issue 12), in points.
pub(super) const CONVERGED_POINTS: f64 = 0.2;

/// The convergence check of issue 12 over `runs` (one setting's finished runs): over the last
/// ⌈20%⌉ of the E epochs, counted from the epoch before them, the mean-over-seeds test error
/// (from `metrics.jsonl`) moves by less than 0.2 points. `None` with no run, with a run lacking
/// an epoch of the window, or when the window would start before epoch 1.
pub(super) fn convergence(runs: &[&Run]) -> Option<Convergence> {
    let epochs = runs
        .iter()
        .map(|r| r.epochs.last().map_or(0, |e| e.epoch))
        .min()?;
    let from = epochs.checked_sub(epochs.div_ceil(5))?;
    if from == 0 {
        return None;
    }
    let mut curve = Vec::new();
    for ep in from..=epochs {
        let errs: Option<Vec<f64>> = runs
            .iter()
            .map(|r| {
                let e = r.epochs.iter().find(|e| e.epoch == ep)?;
                e.test_accuracy.map(|a| 100.0 * (1.0 - a))
            })
            .collect();
        curve.push(mean_std(&errs?)?.0);
    }
    let lo = curve.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = curve.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let moved = hi - lo;
    Some(Convergence {
        epochs,
        from,
        moved,
        converged: moved < CONVERGED_POINTS,
        seeds: runs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_tables() {
        // Two-sided 95% (p = 0.975) from standard t tables, and a few other levels.
        for (p, df, want) in [
            (0.975, 1, 12.706),
            (0.975, 2, 4.303),
            (0.975, 3, 3.182),
            (0.975, 4, 2.776),
            (0.975, 5, 2.571),
            (0.975, 9, 2.262),
            (0.975, 10, 2.228),
            (0.975, 30, 2.042),
            (0.975, 120, 1.980),
            (0.95, 5, 2.015),
            (0.995, 3, 5.841),
            (0.9, 1, 3.078),
        ] {
            let t = t_quantile(p, df);
            assert!((t - want).abs() < 6e-4, "t({p}, {df}) = {t}, want {want}");
        }
        // Large df tends to the normal quantile; symmetry below the median.
        assert!((t_quantile(0.975, 100_000) - 1.959_964).abs() < 1e-4);
        assert!((t_quantile(0.025, 4) + t_quantile(0.975, 4)).abs() < 1e-9);
        // df = 2 has a closed form: t = 2(p − 1/2)·sqrt(2 / (1 − (2p − 1)²)).
        let exact = 0.95 * (2.0 / (1.0 - 0.95f64.powi(2))).sqrt();
        assert!((t_quantile(0.975, 2) - exact).abs() < 1e-9);
    }

    #[test]
    fn interval_of_known_differences() {
        // 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3).
        let iv = interval(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((iv.n, iv.mean, iv.std), (3, 2.0, Some(1.0)));
        let (lo, hi) = iv.ci.unwrap();
        let half = t_quantile(0.975, 2) / 3f64.sqrt();
        assert!((lo - (2.0 - half)).abs() < 1e-12 && (hi - (2.0 + half)).abs() < 1e-12);
        // 2 ± 2.48 contains 0; 3 ± 2.48 does not; −1.01 ± 0.025 lies below it.
        assert_eq!(iv.excludes_zero(), None);
        assert_eq!(
            interval(&[2.0, 3.0, 4.0]).unwrap().excludes_zero(),
            Some(true)
        );
        assert_eq!(
            interval(&[-1.0, -1.02, -1.01]).unwrap().excludes_zero(),
            Some(false)
        );
        // Two pairs: t(0.975, 1) = 12.71 makes −1.1 ± 1.27 include 0.
        assert_eq!(interval(&[-1.0, -1.2]).unwrap().excludes_zero(), None);
        let one = interval(&[0.5]).unwrap();
        assert_eq!((one.ci, one.excludes_zero()), (None, None));
        assert!(interval(&[]).is_none());
    }

    fn fields(pairs: &[(&str, Value)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn canonical_settings_drop_fields_that_cannot_matter() {
        let mut dgl = fields(&[
            ("rule", "dgl".into()),
            ("modules", 4.into()),
            ("lambda", 0.1.into()),
            ("sgr_distance", "l2".into()),
            ("fd_eps", 0.03.into()),
            ("seed", 3.into()),
            ("threads", 1.into()),
            ("schedule", "cosine".into()),
            ("milestones", Value::Array(vec![])),
            ("split", "even".into()),
        ]);
        canonicalize(&mut dgl);
        assert_eq!(
            dgl.keys().collect::<Vec<_>>(),
            ["modules", "rule", "schedule", "split"]
        );
        let mut sgr = fields(&[
            ("rule", "sgr".into()),
            ("modules", 4.into()),
            ("lambda", 0.1.into()),
            ("sgr_grad", "fd".into()),
            ("fd_eps", 0.03.into()),
            ("lambda_schedule", "constant".into()),
            ("lambda_schedule_epochs", 5.into()),
        ]);
        canonicalize(&mut sgr);
        assert!(sgr.contains_key("fd_eps") && sgr.contains_key("lambda"));
        assert!(!sgr.contains_key("lambda_schedule_epochs"));
        let mut bp = fields(&[
            ("rule", "bp".into()),
            ("modules", 1.into()),
            ("split", "even".into()),
            ("schedule", "cosine".into()),
        ]);
        canonicalize(&mut bp);
        assert!(!bp.contains_key("split"));
        // sgr pairs with dgl at the same K only; bp with dgl at any K and split.
        let dgl_k = |k: usize| fields(&[("modules", k.into()), ("rule", "dgl".into())]);
        assert_eq!(pairing_key(&sgr, false), pairing_key(&dgl_k(4), false));
        assert_ne!(pairing_key(&sgr, false), pairing_key(&dgl_k(8), false));
        assert_eq!(pairing_key(&bp, true), pairing_key(&dgl, true));
        assert_ne!(pairing_key(&bp, false), pairing_key(&dgl, false));
    }

    fn run_with(errors: &[f64]) -> Run {
        Run {
            dir: "r".into(),
            rule: "dgl".into(),
            modules: 2,
            seed: 0,
            state: super::super::load::RunState::Finished,
            warnings: Vec::new(),
            summary: None,
            epochs: errors
                .iter()
                .enumerate()
                .map(|(i, e)| super::super::load::EpochLine {
                    epoch: i + 1,
                    test_accuracy: Some(1.0 - e / 100.0),
                    ..Default::default()
                })
                .collect(),
            config: None,
        }
    }

    #[test]
    fn convergence_window_is_the_last_fifth_of_epochs_on_the_seed_mean() {
        // 10 epochs: the window is epochs 8..=10. Seed means 12.1, 12.0, 11.975: moved 0.125.
        let head = [40.0, 30.0, 20.0, 16.0, 14.0, 13.0, 12.5];
        let a = run_with(&[&head[..], &[12.0, 11.9, 11.95]].concat());
        let b = run_with(&[&head[..], &[12.2, 12.1, 12.0]].concat());
        let c = convergence(&[&a, &b]).unwrap();
        assert_eq!((c.epochs, c.from, c.seeds), (10, 8, 2));
        assert!((c.moved - 0.125).abs() < 1e-9 && c.converged, "{c:?}");
        // Seeds moving in opposite directions cancel in the mean.
        let up = run_with(&[20.0, 10.0, 10.3]);
        let down = run_with(&[20.0, 10.3, 10.0]);
        let c = convergence(&[&up, &down]).unwrap();
        assert_eq!((c.epochs, c.from), (3, 2));
        assert!(c.moved.abs() < 1e-9 && c.converged);
        // A drop of 0.25 inside the window is not converged, even if it came back up.
        let dip = run_with(&[20.0, 10.0, 10.0, 10.0, 9.75, 10.0]);
        let c = convergence(&[&dip]).unwrap();
        assert_eq!(c.from, 4);
        assert!(!c.converged);
        let late = run_with(&[20.0, 10.0, 10.0, 10.0, 10.0, 9.75]);
        assert!((convergence(&[&late]).unwrap().moved - 0.25).abs() < 1e-9);
        // One epoch has no epoch before its last fifth; no run, no check.
        assert_eq!(convergence(&[&run_with(&[10.0])]), None);
        assert_eq!(convergence(&[]), None);
        // The shortest run decides the window.
        let short = run_with(&[20.0, 10.0, 10.0, 10.0, 10.0]);
        assert_eq!(convergence(&[&late, &short]).unwrap().epochs, 5);
    }

    #[test]
    fn settings_sort_numbers_by_value() {
        let (three, ten) = (json_num(3.0), json_num(10.0));
        assert_eq!(value_cmp(Some(&three), Some(&ten)), Ordering::Less);
        assert_eq!(value_cmp(None, Some(&three)), Ordering::Less);
        assert_eq!(
            value_cmp(Some(&Value::from("cosine")), Some(&Value::from("l2"))),
            Ordering::Less
        );
    }

    fn json_num(x: f64) -> Value {
        Value::from(x)
    }

    #[test]
    fn labels_name_only_the_varying_fields() {
        let f = fields(&[
            ("rule", "sgr".into()),
            ("lambda", 0.1.into()),
            ("sgr_distance", "cosine".into()),
            ("sgr_side", "sender".into()),
            ("sgr_every", 4.into()),
            ("epochs", 3.into()),
        ]);
        let varying: Vec<String> = ["sgr_side", "epochs", "lambda", "sgr_distance"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            label("sgr", &f, &varying),
            "sgr cosine λ=0.1 sender epochs=3"
        );
        assert_eq!(label("sgr", &f, &[]), "sgr");
        assert_eq!(
            label("sgr", &f, &["sgr_every".into(), "model".into()]),
            "sgr every=4"
        );
    }
}
