//! Where a network is cut into K gradient-isolated modules. Split points are data: one table
//! per network, in InfoPro's notation (a cut `[stage, block]` means "after block `block` of
//! stage `stage`"; stage 0 is the stem), converted once into contiguous unit ranges.
use super::network::{Arch, Network};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How the units are divided among modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SplitStrategy {
    /// The network's split table (InfoPro's where it has one); unknown K is an error.
    #[default]
    Table,
    /// Balanced by unit count, any K up to the number of units.
    Even,
    /// Balanced by estimated activation bytes (the largest module is as small as possible).
    BalancedMemory,
}

/// Extra activation memory of the modules a rule regularises, for the balanced-memory split:
/// modules `from..=K` (1-based) cost `factor` times their activation bytes. SGR's exact double
/// backward keeps a second graph per regularised module (BENCHMARKS.md: 2.1–2.6x `dgl`'s peak),
/// and module 1 never carries the penalty, so a split that ignores this puts too much in the
/// regularised modules and too little in the first.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PenaltyCost {
    /// First module (1-based) that carries the extra cost.
    pub from: usize,
    /// Memory of such a module relative to its plain (`dgl`) memory.
    pub factor: f64,
}

/// How one entry of a network's split table cuts its units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableEntry {
    /// Explicit cuts: the exclusive end unit of every module but the last, increasing.
    Ends(Vec<usize>),
    /// Balanced by unit count (where no published table exists).
    Even,
}

/// The K values in `net`'s split table.
pub fn table_ks(net: &dyn Network) -> Vec<usize> {
    net.split_table().iter().map(|(k, _)| *k).collect()
}

/// Converts module ends into unit ranges and checks them (strictly increasing, inside the
/// network).
fn ranges_from_ends(net: &dyn Network, ends: &[usize]) -> Result<Vec<Range<usize>>> {
    let units = net.num_units();
    let mut ranges = Vec::with_capacity(ends.len() + 1);
    let mut start = 0;
    for &end in ends {
        if end <= start || end >= units {
            return Err(Error::Config(format!(
                "invalid cut before unit {end} in the split table of {}",
                net.name()
            )));
        }
        ranges.push(start..end);
        start = end;
    }
    ranges.push(start..units);
    Ok(ranges)
}

/// `units` split into `k` contiguous ranges whose sizes differ by at most one; the larger
/// ranges come last, so the early, wide (activation-heavy) modules get fewer units.
pub fn even(units: usize, k: usize) -> Vec<Range<usize>> {
    let (base, extra) = (units / k, units % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = base + usize::from(i >= k - extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Contiguous split of weighted units into `k` ranges minimising the largest range weight
/// (dynamic programming; ties broken towards earlier cuts).
pub fn balanced(weights: &[i64], k: usize) -> Vec<Range<usize>> {
    balanced_scaled(weights, &vec![1.0; k])
}

/// Contiguous split of weighted units into `factors.len()` ranges minimising the largest
/// `factors[j] ·` (weight of range j) (dynamic programming; ties broken towards earlier cuts).
pub fn balanced_scaled(weights: &[i64], factors: &[f64]) -> Vec<Range<usize>> {
    let (n, k) = (weights.len(), factors.len());
    let prefix: Vec<i64> = std::iter::once(0)
        .chain(weights.iter().scan(0, |s, w| {
            *s += w;
            Some(*s)
        }))
        .collect();
    // best[j][i]: minimal max cost splitting the first i units into j ranges.
    let mut best = vec![vec![f64::INFINITY; n + 1]; k + 1];
    let mut cut = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0.0;
    for j in 1..=k {
        for i in j..=n {
            for p in (j - 1)..i {
                if best[j - 1][p].is_infinite() {
                    continue;
                }
                let cost = best[j - 1][p].max(factors[j - 1] * (prefix[i] - prefix[p]) as f64);
                if cost < best[j][i] {
                    best[j][i] = cost;
                    cut[j][i] = p;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(k);
    let mut end = n;
    for j in (1..=k).rev() {
        let start = cut[j][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    ranges
}

/// Checks that `arch` can be cut into `k` modules with `strategy`, without building anything
/// (the same errors as [`split`]).
pub fn check_k(arch: &Arch, k: usize, strategy: SplitStrategy) -> Result<()> {
    let net = arch.network();
    split(net, k, strategy, &vec![1; net.num_units()], None).map(|_| ())
}

/// Resolves the module ranges for `net` cut into `k` modules. `unit_weights` (activation
/// elements per unit) and `penalty` (what the rule adds to some modules) are used by
/// [`SplitStrategy::BalancedMemory`].
pub fn split(
    net: &dyn Network,
    k: usize,
    strategy: SplitStrategy,
    unit_weights: &[i64],
    penalty: Option<PenaltyCost>,
) -> Result<Vec<Range<usize>>> {
    let units = net.num_units();
    if k == 0 || k > units {
        return Err(Error::Config(format!(
            "--modules {k} is not possible for {}: it has {units} units ({}), so K must be 1..={units}",
            net.name(),
            net.describe_units()
        )));
    }
    match strategy {
        SplitStrategy::Table => match net.split_table().into_iter().find(|(kk, _)| *kk == k) {
            Some((_, TableEntry::Ends(ends))) => ranges_from_ends(net, &ends),
            Some((_, TableEntry::Even)) => Ok(even(units, k)),
            None => Err(Error::Config(format!(
                "--modules {k} is not in the split table of {} (supported: {}); use --split even or --split balanced-memory for other K",
                net.name(),
                table_ks(net)
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
        SplitStrategy::Even => Ok(even(units, k)),
        SplitStrategy::BalancedMemory => {
            let factors: Vec<f64> = (1..=k)
                .map(|module| match penalty {
                    Some(p) if module >= p.from => p.factor,
                    _ => 1.0,
                })
                .collect();
            Ok(balanced_scaled(unit_weights, &factors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Arch {
        name.parse().unwrap()
    }

    fn covers(ranges: &[Range<usize>], n: usize) -> bool {
        ranges.first().map(|r| r.start) == Some(0)
            && ranges.last().map(|r| r.end) == Some(n)
            && ranges.windows(2).all(|w| w[0].end == w[1].start)
            && ranges.iter().all(|r| !r.is_empty())
    }

    #[test]
    fn every_table_entry_partitions_the_units() {
        for name in ["resnet20", "resnet32", "resnet56", "resnet110", "mlp-8x16"] {
            let arch = named(name);
            let net = arch.network();
            for k in table_ks(net) {
                let r = split(net, k, SplitStrategy::Table, &[], None).unwrap();
                assert_eq!(r.len(), k, "{arch} K={k}");
                assert!(covers(&r, arch.num_units()), "{arch} K={k}: {r:?}");
            }
        }
    }

    #[test]
    fn infopro_resnet32_k2_cuts_after_unit_7() {
        let r = split(
            named("resnet32").network(),
            2,
            SplitStrategy::Table,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(r, vec![0..8, 8..16]);
        let r = split(
            named("resnet32").network(),
            4,
            SplitStrategy::Table,
            &[],
            None,
        )
        .unwrap();
        assert_eq!(r, vec![0..4, 4..8, 8..12, 12..16]);
    }

    #[test]
    fn one_module_per_unit_at_full_k() {
        let r = split(
            named("resnet110").network(),
            55,
            SplitStrategy::Table,
            &[],
            None,
        )
        .unwrap();
        assert!(r.iter().enumerate().all(|(i, r)| *r == (i..i + 1)));
        assert_eq!(
            split(
                named("resnet32").network(),
                16,
                SplitStrategy::Table,
                &[],
                None
            )
            .unwrap(),
            even(16, 16)
        );
    }

    #[test]
    fn bad_k_is_a_config_error_listing_supported_values() {
        let e = split(
            named("resnet32").network(),
            17,
            SplitStrategy::Table,
            &[],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("1..=16"), "{e}");
        let e = split(
            named("resnet32").network(),
            5,
            SplitStrategy::Table,
            &[],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("1, 2, 3, 4, 8, 16"), "{e}");
        assert!(
            split(
                named("resnet32").network(),
                5,
                SplitStrategy::Even,
                &[],
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn balanced_minimises_the_largest_module() {
        let w = [10, 1, 1, 1, 1, 10];
        let r = balanced(&w, 3);
        assert!(covers(&r, 6));
        let max = r
            .iter()
            .map(|r| w[r.clone()].iter().sum::<i64>())
            .max()
            .unwrap();
        assert_eq!(max, 10);
        // Brute force over all 2-cut positions agrees.
        let mut bf = i64::MAX;
        for a in 1..6 {
            for b in a + 1..6 {
                let s = [
                    w[..a].iter().sum::<i64>(),
                    w[a..b].iter().sum(),
                    w[b..].iter().sum(),
                ];
                bf = bf.min(*s.iter().max().unwrap());
            }
        }
        assert_eq!(max, bf);
    }

    #[test]
    fn scaled_balance_matches_brute_force_and_grows_the_unpenalised_module() {
        let w = [6, 5, 4, 4, 3, 2, 2, 1];
        let factors = [1.0, 2.5, 2.5];
        let cost = |r: &[Range<usize>]| {
            r.iter()
                .zip(factors)
                .map(|(r, f)| f * w[r.clone()].iter().sum::<i64>() as f64)
                .fold(0.0, f64::max)
        };
        let r = balanced_scaled(&w, &factors);
        assert!(covers(&r, w.len()));
        let mut bf = f64::INFINITY;
        for a in 1..w.len() {
            for b in a + 1..w.len() {
                bf = bf.min(cost(&[0..a, a..b, b..w.len()]));
            }
        }
        assert_eq!(cost(&r), bf);
        // With the penalty, the first module takes more units than the unscaled split gives it.
        assert!(r[0].len() > balanced(&w, 3)[0].len(), "{r:?}");
        let penalty = Some(PenaltyCost {
            from: 2,
            factor: 2.5,
        });
        let via_split = split(
            named("resnet20").network(),
            3,
            SplitStrategy::BalancedMemory,
            &[6, 5, 4, 4, 3, 2, 2, 1, 1, 1],
            penalty,
        )
        .unwrap();
        assert!(covers(&via_split, 10));
    }

    #[test]
    fn even_sizes_differ_by_at_most_one() {
        for n in 1..30 {
            for k in 1..=n {
                let r = even(n, k);
                assert!(covers(&r, n));
                let lens: Vec<_> = r.iter().map(|r| r.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
    }
}
