//! Experiment presets: one TOML file naming a grid of training runs (rules × K × seeds on one
//! data set and network, plus `[[variants]]`), for `sgr sweep`.
//!
//! A preset is parsed strictly (unknown keys are errors naming the key and the file) and every
//! cell's [`TrainConfig`] is built and validated, including its split into K modules, before a
//! single run starts, so a typo cannot waste the first hours of a grid.
//!
//! `bp` trains the whole network end to end, so it runs at K = 1 only, once per seed, whatever
//! `modules` lists.
//!
//! # Variants
//!
//! A `[[variants]]` entry is one rule with its own settings: any training option (the keys of
//! `[train]`), plus an optional `name` and its own `modules` and `seeds`. An option given as a
//! list is an *axis*: the variant expands into the Cartesian product of its axes, and every
//! combination is crossed with K and the seeds. A variant's options override the top-level keys
//! and `[train]`. Its cells are named
//! `<name>-<axis part>-…-k<K>-s<seed>`, with the axes in the order of the file, where the name
//! defaults to the rule, and an axis part is the value alone for a string (`cosine-sample`),
//! `<key><value>` for a number (`lambda0.1`, with the key's `sgr_` prefix dropped: `every4`),
//! `<key>` or `no-<key>` for a boolean, and `<key><v1>_<v2>…` for a list. So
//! `name = "sgr-cos"`, `sgr_distance = ["cosine", "l2"]`, `lambda = [0.1, 1.0]` gives
//! `sgr-cos-cosine-lambda0.1-k4-s0` and three more per K and seed. Two cells with one name
//! are an error naming both.
use crate::config::{TrainConfig, TrainOptions};
use crate::data::DatasetKind;
use crate::model::{Arch, splits};
use crate::rules::RuleKind;
use crate::schedule::ScheduleKind;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A grid of runs, as written in `presets/*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Data set.
    pub data: DatasetKind,
    /// Network.
    pub model: Arch,
    /// Rules to run over `modules` and `seeds` (`bp` runs at K = 1 only); may be empty when
    /// there are `variants`.
    #[serde(default)]
    pub rules: Vec<RuleKind>,
    /// K values for the local rules (and for variants that do not list their own).
    #[serde(default)]
    pub modules: Vec<usize>,
    /// Seeds; every (rule, K) runs once per seed (and every variant cell that does not list
    /// its own).
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: i64,
    /// Base learning rate.
    pub lr: f64,
    /// LR schedule.
    pub schedule: ScheduleKind,
    /// Linear warm-up epochs.
    pub warmup_epochs: f64,
    /// SGR penalty weight λ (ignored by bp and dgl).
    pub lambda: f64,
    /// Train on the first N training images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_subset: Option<usize>,
    /// Any other `sgr train` option (same names, with `_`), applied to every cell.
    #[serde(default)]
    pub train: TrainOptions,
    /// `[[variants]]`: rules with their own settings and axes (see the module docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
}

/// One `[[variants]]` entry: its keys and values in the order of the file (the order of the
/// axes in cell names and in the run order), kept as JSON values so that every training option,
/// including ones added later, works without a list of fields here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Variant {
    /// `(key, value)` in file order.
    pub entries: Vec<(String, Value)>,
    /// The line of each entry in the preset file, when read from one (for error messages).
    lines: Vec<Option<usize>>,
    /// The line of its `[[variants]]` header, when read from a file.
    header: Option<usize>,
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.entries.len()))?;
        for (k, v) in &self.entries {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Variant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Variant;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of training options")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Variant, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                let lines = vec![None; entries.len()];
                Ok(Variant {
                    entries,
                    lines,
                    header: None,
                })
            }
        }
        d.deserialize_map(Visit)
    }
}

impl Variant {
    /// A variant with these entries (in this order), not read from a file.
    pub fn new(entries: Vec<(String, Value)>) -> Self {
        let lines = vec![None; entries.len()];
        Variant {
            entries,
            lines,
            header: None,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The `name` key, else the rule when it is one value (not an axis).
    fn prefix(&self) -> Option<&str> {
        match (self.get("name"), self.get("rule")) {
            (Some(Value::String(n)), _) => Some(n),
            (_, Some(Value::String(r))) => Some(r),
            _ => None,
        }
    }

    /// How error messages and `sweep.json` call the `index`-th (0-based) variant: its name or
    /// rule, else its position.
    pub fn label(&self, index: usize) -> String {
        match self.prefix() {
            Some(p) => p.to_string(),
            None => format!("variants[{}]", index + 1),
        }
    }

    /// `[[variants]] 2 (sgr-cos, line 20)`, for error messages.
    fn describe(&self, index: usize) -> String {
        let line = self.header.or(self.lines.iter().flatten().min().copied());
        let name = self.prefix().map(|p| format!("`{p}`"));
        let what: Vec<String> = name
            .into_iter()
            .chain(line.map(|l| format!("line {l}")))
            .collect();
        if what.is_empty() {
            format!("[[variants]] {}", index + 1)
        } else {
            format!("[[variants]] {} ({})", index + 1, what.join(", "))
        }
    }
}

/// Keys a variant has besides the training options.
const VARIANT_KEYS: &[&str] = &["name", "modules", "seeds"];

/// One run of a grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Folder name inside the sweep folder: `<rule>-k<K>-s<seed>`, or for a variant
    /// `<name>-<axes>-k<K>-s<seed>`.
    pub name: String,
    /// Rule.
    pub rule: RuleKind,
    /// K.
    pub modules: usize,
    /// Seed.
    pub seed: u64,
    /// The `[[variants]]` entry the cell comes from ([`Variant::label`]); `None` for the cells
    /// of `rules`.
    pub variant: Option<String>,
    /// The position (0-based) of that entry among the preset's variants.
    pub variant_index: Option<usize>,
    /// The variant's axis values of this cell, in file order.
    pub axes: Vec<(String, Value)>,
    /// Whether the preset sets `threads` for this cell (otherwise `sgr sweep` chooses it from
    /// `--jobs`).
    pub threads_set: bool,
    /// The run's full configuration.
    pub config: TrainConfig,
}

impl Cell {
    /// The cell's setting: its name without `-k<K>-s<seed>`, the same for every K and seed of
    /// one rule or variant combination (what a report groups by).
    pub fn setting(&self) -> &str {
        let tail = format!("-k{}-s{}", self.modules, self.seed);
        self.name.strip_suffix(&tail).unwrap_or(&self.name)
    }
}

/// The folder name of a cell: `<rule>-k<K>-s<seed>`.
pub fn cell_name(rule: &str, modules: usize, seed: u64) -> String {
    format!("{rule}-k{modules}-s{seed}")
}

/// Keys of [`Preset`] that `[train]` may not repeat, and the grid keys it may not set.
const TOP_LEVEL: &[&str] = &[
    "data",
    "model",
    "epochs",
    "batch_size",
    "lr",
    "schedule",
    "warmup_epochs",
    "lambda",
    "train_subset",
    "test_subset",
];
const GRID: &[(&str, &str)] = &[("rule", "rules"), ("modules", "modules"), ("seed", "seeds")];

/// Every training option with its default value (the keys of `[train]` and of a variant).
fn option_defaults() -> serde_json::Map<String, Value> {
    match serde_json::to_value(TrainConfig::default()).expect("config serialises") {
        Value::Object(m) => m,
        _ => unreachable!("a struct serialises to an object"),
    }
}

/// Parses preset TOML; the error is one line (`line N: message`).
pub fn parse(text: &str) -> std::result::Result<Preset, String> {
    let mut preset: Preset = crate::config::parse_toml(text)?;
    if !preset.variants.is_empty() {
        locate_variants(text, &mut preset.variants);
        for (i, v) in preset.variants.iter().enumerate() {
            check_variant(v, i)?;
        }
    }
    Ok(preset)
}

/// Puts each variant's entries in file order and records their lines. The typed parse loses
/// both (its tables are sorted by key); the span-keeping parse has them.
fn locate_variants(text: &str, variants: &mut [Variant]) {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return;
    };
    let line_of = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
    let Some(toml::de::DeValue::Array(tables)) = root
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "variants")
        .map(|(_, v)| v.get_ref())
    else {
        return;
    };
    for (v, table) in variants.iter_mut().zip(tables.iter()) {
        let toml::de::DeValue::Table(t) = table.get_ref() else {
            continue;
        };
        let position = |key: &str| {
            t.iter()
                .find(|(k, _)| k.get_ref() == key)
                .map(|(k, _)| k.span().start)
        };
        let mut entries: Vec<(Option<usize>, (String, Value))> = std::mem::take(&mut v.entries)
            .into_iter()
            .map(|e| (position(&e.0), e))
            .collect();
        entries.sort_by_key(|(p, _)| p.unwrap_or(usize::MAX));
        v.lines = entries.iter().map(|(p, _)| p.map(line_of)).collect();
        v.entries = entries.into_iter().map(|(_, e)| e).collect();
        // The header is the nearest `[[variants]]` line above the first key.
        v.header = v.lines.iter().flatten().min().and_then(|&first| {
            let above: Vec<&str> = text.lines().take(first).collect();
            above
                .iter()
                .rposition(|l| l.trim_start().starts_with("[[") && l.contains("variants"))
                .map(|i| i + 1)
        });
    }
}

/// Letters, digits, `.`, `_` and `-`: safe and readable in folder names.
fn name_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `value` of option `key` is an axis (a list of values) rather than one value: a list,
/// or for an option that is itself a list (`milestones`), a list of lists.
fn is_axis(defaults: &serde_json::Map<String, Value>, key: &str, value: &Value) -> bool {
    match value {
        Value::Array(items) if matches!(defaults.get(key), Some(Value::Array(_))) => {
            !items.is_empty() && items.iter().all(Value::is_array)
        }
        Value::Array(_) => true,
        _ => false,
    }
}

/// The values of an entry: the axis's items, or the one value.
fn values_of(defaults: &serde_json::Map<String, Value>, key: &str, value: &Value) -> Vec<Value> {
    match value {
        Value::Array(items) if is_axis(defaults, key, value) => items.clone(),
        v => vec![v.clone()],
    }
}

/// Checks a variant's keys and value types, naming the line: unknown keys, misspelt values.
/// (Value ranges and the split into K modules are checked per cell by [`Preset::cells`].)
fn check_variant(v: &Variant, index: usize) -> std::result::Result<(), String> {
    let defaults = option_defaults();
    let at = |i: usize| match v.lines.get(i).copied().flatten() {
        Some(l) => format!("line {l}: {}", v.describe(index)),
        None => v.describe(index),
    };
    for (i, (key, value)) in v.entries.iter().enumerate() {
        let bad = |why: String| Err(format!("{}: {key}: {why}", at(i)));
        match key.as_str() {
            "name" => match value {
                Value::String(n)
                    if !n.is_empty() && !n.starts_with(['.', '-']) && n.chars().all(name_safe) => {}
                _ => {
                    return bad(format!(
                        "{value} is not a usable name (it starts folder names: letters, digits, `.`, `_` and `-`, not first `.` or `-`)"
                    ));
                }
            },
            "modules" | "seeds" => {
                let items = match value {
                    Value::Array(items) => items.clone(),
                    v => vec![v.clone()],
                };
                if items.is_empty() || !items.iter().all(|x| x.as_u64().is_some()) {
                    return bad(format!(
                        "{value} is not a whole number or a non-empty list of whole numbers"
                    ));
                }
            }
            "seed" => return bad("set per cell; list the values in `seeds`".into()),
            "rules" => return bad("a variant has one `rule` (or a list of rules: an axis)".into()),
            _ if !defaults.contains_key(key) => {
                let mut known: Vec<&str> = VARIANT_KEYS.to_vec();
                known.extend(
                    defaults
                        .keys()
                        .map(String::as_str)
                        .filter(|k| !matches!(*k, "seed" | "modules")),
                );
                return bad(format!(
                    "unknown key (a variant takes {})",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            _ => {
                if value.as_array().is_some_and(Vec::is_empty) && is_axis(&defaults, key, value) {
                    return bad("an empty list gives no cells".into());
                }
                for item in values_of(&defaults, key, value) {
                    let one = Value::Object([(key.clone(), item)].into_iter().collect());
                    if let Err(e) = serde_json::from_value::<TrainOptions>(one) {
                        return bad(e.to_string());
                    }
                }
            }
        }
    }
    if v.get("rule").is_none() {
        return Err(format!(
            "{}: give it a `rule` (bp, dgl or sgr)",
            v.describe(index)
        ));
    }
    Ok(())
}

/// A value as it reads in a listing: strings without quotes, the rest as JSON.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The part of a cell name that an axis value makes (see the module docs).
fn axis_part(key: &str, value: &Value) -> String {
    let short = key.strip_prefix("sgr_").unwrap_or(key);
    fn text(v: &Value) -> String {
        let raw = match v {
            Value::String(s) => s.clone(),
            // Integers as written; floats in Rust's shortest form (0.1, 1, 0.0001).
            Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or(f64::NAN)),
            Value::Array(items) if items.is_empty() => "none".into(),
            Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("_"),
            other => other.to_string(),
        };
        raw.chars()
            .map(|c| if name_safe(c) { c } else { '_' })
            .collect()
    }
    match value {
        Value::String(_) => text(value),
        Value::Bool(true) => short.to_string(),
        Value::Bool(false) => format!("no-{short}"),
        v => format!("{short}{}", text(v)),
    }
}

/// Reads and checks a preset file: parses it, then builds and validates every cell. Errors name
/// the file.
pub fn load(path: &Path) -> Result<(Preset, Vec<Cell>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let named = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
    let preset = parse(&text).map_err(named)?;
    let cells = preset.cells().map_err(|e| named(e.to_string()))?;
    Ok((preset, cells))
}

/// Finds a preset by name or path: an existing file path as given; otherwise
/// `presets/NAME.toml` in the current folder, then in the source tree of this binary.
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let given = PathBuf::from(name_or_path);
    if given.is_file() {
        return Ok(given);
    }
    let file = if name_or_path.ends_with(".toml") {
        name_or_path.to_string()
    } else {
        format!("{name_or_path}.toml")
    };
    let roots = [
        PathBuf::from("presets"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"),
    ];
    for root in &roots {
        let p = root.join(&file);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut known: Vec<String> = roots
        .iter()
        .filter_map(|r| std::fs::read_dir(r).ok())
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    known.sort();
    known.dedup();
    Err(Error::Config(format!(
        "--preset {name_or_path}: no such file, and no presets/{file} in the current folder or in {} (known presets: {})",
        roots[1].display(),
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )))
}

impl Preset {
    /// The (rule, K, seed) cells of `rules` in run order: seed by seed (so a partly finished
    /// grid has whole seeds), `bp` at K = 1 first, then each rule over `modules`.
    fn grid(&self) -> Vec<(RuleKind, usize, u64)> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            if self.rules.contains(&RuleKind::Bp) {
                out.push((RuleKind::Bp, 1, seed));
            }
            for &rule in self.rules.iter().filter(|r| **r != RuleKind::Bp) {
                for &k in &self.modules {
                    if !out.contains(&(rule, k, seed)) {
                        out.push((rule, k, seed));
                    }
                }
            }
        }
        out
    }

    /// Every variant combination (in file order, the first axis varying slowest), with its
    /// K values and seeds.
    fn combinations(&self) -> Result<Vec<Combination>> {
        let defaults = option_defaults();
        let mut out = Vec::new();
        for (index, v) in self.variants.iter().enumerate() {
            // Also for a preset that did not come through `parse` (its lines are unknown).
            check_variant(v, index).map_err(Error::Config)?;
            let whole = |key: &str| -> Option<Vec<u64>> {
                v.get(key).map(|val| match val {
                    Value::Array(items) => items.iter().filter_map(Value::as_u64).collect(),
                    x => x.as_u64().into_iter().collect(),
                })
            };
            let mut fixed = serde_json::Map::new();
            let mut axes: Vec<(&str, Vec<Value>)> = Vec::new();
            for (key, value) in &v.entries {
                if VARIANT_KEYS.contains(&key.as_str()) {
                    continue;
                }
                if is_axis(&defaults, key, value) {
                    axes.push((key, values_of(&defaults, key, value)));
                } else {
                    fixed.insert(key.clone(), value.clone());
                }
            }
            let mut picks: Vec<Vec<(String, Value)>> = vec![Vec::new()];
            for (key, values) in &axes {
                picks = picks
                    .into_iter()
                    .flat_map(|p| {
                        values.iter().map(move |x| {
                            let mut p = p.clone();
                            p.push((key.to_string(), x.clone()));
                            p
                        })
                    })
                    .collect();
            }
            for axes in picks {
                let mut values = fixed.clone();
                values.extend(axes.iter().cloned());
                let what = v.describe(index);
                let rule: RuleKind = values
                    .get("rule")
                    .cloned()
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| Error::Config(format!("{what}: rule: {e}")))?
                    .ok_or_else(|| Error::Config(format!("{what}: give it a `rule`")))?;
                let modules = if rule == RuleKind::Bp {
                    vec![1]
                } else {
                    match whole("modules") {
                        Some(ks) => ks.into_iter().map(|k| k as usize).collect(),
                        None => self.modules.clone(),
                    }
                };
                if modules.is_empty() {
                    return Err(Error::Config(format!(
                        "{what}: no K to run: give `modules` at the top level or in the variant"
                    )));
                }
                let seeds = whole("seeds").unwrap_or_else(|| self.seeds.clone());
                if seeds.is_empty() {
                    return Err(Error::Config(format!(
                        "{what}: no seeds to run: give `seeds` at the top level or in the variant"
                    )));
                }
                let stem: Vec<String> = v
                    .prefix()
                    .map(str::to_string)
                    .into_iter()
                    .chain(axes.iter().map(|(k, x)| axis_part(k, x)))
                    .collect();
                out.push(Combination {
                    index,
                    stem: stem.join("-"),
                    threads_set: self.train.threads.is_some() || values.contains_key("threads"),
                    values,
                    axes,
                    rule,
                    modules,
                    seeds,
                });
            }
        }
        Ok(out)
    }

    /// Builds and validates every cell's configuration (values, and the split of the network
    /// into K modules), in run order: seed by seed, the cells of `rules` first, then the
    /// variants' in file order. Two cells with one name are an error naming where both come
    /// from.
    pub fn cells(&self) -> Result<Vec<Cell>> {
        let fail = |why: String| Err(Error::Config(why));
        if self.rules.is_empty() && self.variants.is_empty() {
            return fail(
                "rules: name at least one rule (bp, dgl, sgr), or add [[variants]]".into(),
            );
        }
        if !self.rules.is_empty() {
            if self.seeds.is_empty() {
                return fail("seeds: name at least one seed".into());
            }
            if self.modules.is_empty() && self.rules.iter().any(|r| *r != RuleKind::Bp) {
                return fail("modules: name at least one K for the local rules".into());
            }
        }
        let set = serde_json::to_value(&self.train).expect("options serialise");
        for key in set.as_object().into_iter().flat_map(|m| m.keys()) {
            if TOP_LEVEL.contains(&key.as_str()) {
                return fail(format!(
                    "[train] {key}: already a top-level key of the preset; set it in one place"
                ));
            }
            if let Some((_, list)) = GRID.iter().find(|(k, _)| k == key) {
                return fail(format!(
                    "[train] {key}: set per cell by the grid; list the values in `{list}`"
                ));
            }
        }
        let base = TrainOptions {
            data: Some(self.data),
            model: Some(self.model.clone()),
            epochs: Some(self.epochs),
            batch_size: Some(self.batch_size),
            lr: Some(self.lr),
            schedule: Some(self.schedule),
            warmup_epochs: Some(self.warmup_epochs),
            lambda: Some(self.lambda),
            train_subset: self.train_subset,
            test_subset: self.test_subset,
            ..self.train.clone()
        };
        let base = serde_json::to_value(&base).expect("options serialise");
        let combos = self.combinations()?;

        // Seed by seed: the top-level seeds, then any that only variants list.
        let mut seeds = self.seeds.clone();
        for c in &combos {
            for s in &c.seeds {
                if !seeds.contains(s) {
                    seeds.push(*s);
                }
            }
        }
        let grid = self.grid();
        let mut planned: Vec<(String, u64, usize, Option<&Combination>, RuleKind)> = Vec::new();
        for &seed in &seeds {
            for &(rule, k, s) in grid.iter().filter(|g| g.2 == seed) {
                planned.push((cell_name(rule.name(), k, s), s, k, None, rule));
            }
            for c in combos.iter().filter(|c| c.seeds.contains(&seed)) {
                for &k in &c.modules {
                    let name = format!("{}-k{k}-s{seed}", c.stem);
                    planned.push((name, seed, k, Some(c), c.rule));
                }
            }
        }

        let origin = |c: Option<&Combination>| match c {
            None => "`rules`".to_string(),
            Some(c) => self.variants[c.index].describe(c.index),
        };
        let mut seen: std::collections::HashMap<&str, Option<&Combination>> =
            std::collections::HashMap::new();
        for (name, _, _, combo, _) in &planned {
            if let Some(first) = seen.insert(name, *combo) {
                return fail(format!(
                    "two cells are named {name}: one from {}, one from {}; cell names must be unique (give a variant its own `name`, or drop a repeated value)",
                    origin(first),
                    origin(*combo)
                ));
            }
        }

        let mut cells = Vec::new();
        for (name, seed, k, combo, rule) in planned {
            let in_cell = |e: Error| Error::Config(format!("cell {name}: {e}"));
            let mut options = base.clone();
            let obj = options.as_object_mut().expect("options are an object");
            if let Some(c) = combo {
                obj.extend(c.values.clone());
            }
            obj.insert(
                "rule".into(),
                serde_json::to_value(rule).expect("rule serialises"),
            );
            obj.insert("modules".into(), k.into());
            obj.insert("seed".into(), seed.into());
            let options: TrainOptions = serde_json::from_value(options)
                .map_err(|e| in_cell(Error::Config(format!("bad configuration: {e}"))))?;
            let config = TrainConfig::resolve(&options, None, None).map_err(in_cell)?;
            splits::check_k(&config.model, k, config.split).map_err(in_cell)?;
            cells.push(Cell {
                rule,
                modules: k,
                seed,
                variant: combo.map(|c| self.variants[c.index].label(c.index)),
                variant_index: combo.map(|c| c.index),
                axes: combo.map(|c| c.axes.clone()).unwrap_or_default(),
                threads_set: match combo {
                    Some(c) => c.threads_set,
                    None => self.train.threads.is_some(),
                },
                config,
                name,
            });
        }
        Ok(cells)
    }
}

/// One combination of a variant's axis values.
struct Combination {
    /// Position of the variant in the preset.
    index: usize,
    /// The cell name without `-k<K>-s<seed>`.
    stem: String,
    /// The variant's options with this combination's axis values.
    values: serde_json::Map<String, Value>,
    /// The axis values alone, in file order.
    axes: Vec<(String, Value)>,
    rule: RuleKind,
    modules: Vec<usize>,
    seeds: Vec<u64>,
    threads_set: bool,
}
