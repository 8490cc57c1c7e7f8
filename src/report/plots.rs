//! Drawing the report's charts with plotters: line charts with labelled ticks, error bars and
//! dashed reference lines, side-by-side panels, PNG and SVG.
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// A fixed colour per rule (bp black, dgl blue, sgr red), so every chart reads the same way.
pub(super) fn rule_color(rule: &str) -> RGBColor {
    match rule {
        "bp" => RGBColor(0, 0, 0),
        "dgl" => RGBColor(31, 119, 180),
        "sgr" => RGBColor(214, 39, 40),
        other => {
            let extra = [
                RGBColor(44, 160, 44),
                RGBColor(148, 103, 189),
                RGBColor(140, 86, 75),
            ];
            extra[other.bytes().map(usize::from).sum::<usize>() % extra.len()]
        }
    }
}

/// One line of a chart: `(x, y, ± error)` points.
pub(super) struct Series {
    pub(super) label: String,
    pub(super) color: RGBColor,
    pub(super) points: Vec<(f64, f64, Option<f64>)>,
}

/// A line chart with labelled x ticks and optional dashed horizontal reference lines.
pub(super) struct LineChart {
    pub(super) title: String,
    pub(super) x_desc: String,
    pub(super) y_desc: String,
    pub(super) ticks: Vec<(f64, String)>,
    pub(super) x_range: (f64, f64),
    pub(super) y_from_zero: bool,
    pub(super) series: Vec<Series>,
    pub(super) hlines: Vec<(String, RGBColor, f64)>,
}

impl LineChart {
    fn y_extent(&self) -> Option<(f64, f64)> {
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .flat_map(|&(_, y, e)| {
                let e = e.unwrap_or(0.0);
                [y - e, y + e]
            })
            .chain(self.hlines.iter().map(|h| h.2))
            .filter(|y| y.is_finite());
        ys.fold(None, |acc, y| match acc {
            None => Some((y, y)),
            Some((lo, hi)) => Some((f64::min(lo, y), f64::max(hi, y))),
        })
    }
}

fn padded((lo, hi): (f64, f64), from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (lo, hi);
    if from_zero && lo >= 0.0 {
        lo = 0.0;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.1
    } else {
        hi.abs().max(1.0) * 0.1
    };
    if !(from_zero && lo == 0.0) {
        lo -= pad;
    }
    hi += pad;
    (lo, hi)
}

pub(super) enum Figure {
    One(LineChart),
    /// Side by side, sharing the y range.
    Panels(Vec<LineChart>),
    /// Points only (no lines, no error bars).
    Scatter(LineChart),
}

const FONT: &str = "sans-serif";

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bundled font is a valid TTF; if registration failed, drawing text would report it.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        );
    });
}

/// Colours for settings that are not a plain rule: distinct for up to nine (none black or
/// dgl's blue, so that those stay the references), then a ramp.
pub(super) fn setting_color(i: usize, n: usize) -> RGBColor {
    const PALETTE: [RGBColor; 9] = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(127, 127, 127),
    ];
    if n <= PALETTE.len() {
        PALETTE[i % PALETTE.len()]
    } else {
        sequence_color(i, n)
    }
}

/// Colours for `n` ordered items (boundaries): distinct for a few, a blue→orange ramp for many.
pub(super) fn sequence_color(i: usize, n: usize) -> RGBColor {
    const TAB: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    if n <= TAB.len() {
        return TAB[i];
    }
    let t = i as f64 / (n - 1).max(1) as f64;
    let lerp = |a: u8, b: u8| (a as f64 + t * (b as f64 - a as f64)).round() as u8;
    RGBColor(lerp(8, 253), lerp(48, 141), lerp(107, 60))
}

/// Integer ticks from `lo` to `hi`, at most about 12 of them.
pub(super) fn int_ticks(lo: usize, hi: usize) -> Vec<(f64, String)> {
    let step = (hi.saturating_sub(lo) / 12).max(1);
    (lo..=hi)
        .step_by(step)
        .map(|i| (i as f64, i.to_string()))
        .collect()
}

/// About `n` ticks at round values (1, 2 or 5 × a power of ten) spanning `lo..=hi`, labelled
/// with enough decimals for their step.
pub(super) fn round_ticks(lo: f64, hi: f64, n: usize) -> Vec<(f64, String)> {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return vec![(lo, format!("{lo}"))];
    }
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10()).ceil().max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|i| {
            let x = i as f64 * step;
            (x, format!("{x:.decimals$}"))
        })
        .collect()
}

/// Enough decimals to tell apart labels about a tenth of the range apart.
fn y_decimals(lo: f64, hi: f64) -> usize {
    let step = (hi - lo) / 10.0;
    if !(step.is_finite() && step > 0.0) {
        return 2;
    }
    (-step.log10()).ceil().clamp(0.0, 6.0) as usize
}

type DrawResult = std::result::Result<(), String>;

/// A linear f64 axis whose labels and grid lines sit exactly at the given ticks (plotters'
/// `with_key_points` cannot be formatted with a custom label formatter).
#[derive(Clone)]
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    c: &LineChart,
    (y0, y1): (f64, f64),
    scatter: bool,
) -> DrawResult {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let (x0, x1) = c.x_range;
    let x_axis = TickAxis {
        lo: x0,
        hi: x1,
        ticks: c.ticks.iter().map(|t| t.0).collect(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&c.title, (FONT, 18))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_axis, y0..y1)
        .map_err(err)?;
    let x_fmt = |x: &f64| {
        c.ticks
            .iter()
            .min_by(|a, b| (a.0 - x).abs().total_cmp(&(b.0 - x).abs()))
            .map(|t| t.1.clone())
            .unwrap_or_default()
    };
    let decimals = y_decimals(y0, y1);
    let y_fmt = |y: &f64| format!("{y:.decimals$}");
    chart
        .configure_mesh()
        .x_desc(c.x_desc.as_str())
        .y_desc(c.y_desc.as_str())
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    let cap = (x1 - x0) * 0.012;
    for s in &c.series {
        let style = s.color.stroke_width(2);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.0, p.1)).collect();
        if scatter {
            let fill = s.color.mix(0.75).filled();
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, fill)))
                .map_err(err)?
                .label(s.label.as_str())
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, fill));
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, s.color.filled())))
            .map_err(err)?;
        let bars = s.points.iter().filter_map(|&(x, y, e)| {
            e.filter(|e| *e > 0.0).map(|e| {
                PathElement::new(
                    vec![
                        (x - cap, y - e),
                        (x + cap, y - e),
                        (x, y - e),
                        (x, y + e),
                        (x - cap, y + e),
                        (x + cap, y + e),
                    ],
                    s.color.stroke_width(1),
                )
            })
        });
        chart.draw_series(bars).map_err(err)?;
    }
    for (label, color, y) in &c.hlines {
        let style = color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, *y), (x1, *y)], 8, 5, style))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    // A legend of more than a dozen entries would cover the plot; colours then run shallow→deep.
    if c.series.len() + c.hlines.len() <= 12 {
        chart
            .configure_series_labels()
            .position(legend_corner(c, (x0, x1), (y0, y1), scatter))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 13))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// The corner of the plot where the legend covers the fewest data points. A reference line
/// counts as 21 points along its length, or (in a scatter, where each point is a run that the
/// legend must not hide) as one point at each end.
fn legend_corner(
    c: &LineChart,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    scatter: bool,
) -> SeriesLabelPosition {
    let mut pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (p.0, p.1)))
        .collect();
    let samples = if scatter { 1 } else { 20 };
    for h in &c.hlines {
        pts.extend((0..=samples).map(|i| (x0 + (x1 - x0) * i as f64 / samples as f64, h.2)));
    }
    let norm = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, upper: bool| {
        pts.iter()
            .map(|&p| norm(p))
            .filter(|&(x, y)| {
                (if right { x > 0.6 } else { x < 0.4 }) && (if upper { y > 0.6 } else { y < 0.4 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| covered(right, upper))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0)
}

fn draw_figure<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    match fig {
        Figure::One(c) => {
            let y = padded(c.y_extent().unwrap_or((0.0, 1.0)), c.y_from_zero);
            draw_chart(root, c, y, false)
        }
        Figure::Scatter(c) => {
            let y = padded(c.y_extent().unwrap_or((0.0, 1.0)), c.y_from_zero);
            draw_chart(root, c, y, true)
        }
        Figure::Panels(panels) => {
            let extent = panels
                .iter()
                .filter_map(LineChart::y_extent)
                .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
                .unwrap_or((0.0, 1.0));
            let y = padded(extent, false);
            let areas = root.split_evenly((1, panels.len().max(1)));
            for (area, c) in areas.iter().zip(panels) {
                draw_chart(area, c, y, false)?;
            }
            Ok(())
        }
    }
}

/// Draws `fig` to `<dir>/<stem>.png` and `<dir>/<stem>.svg`.
pub(super) fn save(fig: &Figure, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    ensure_font();
    let size = match fig {
        Figure::One(_) | Figure::Scatter(_) => (800, 520),
        Figure::Panels(p) => (560 * p.len().max(1) as u32, 480),
    };
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let fail =
        |path: &Path, why: String| Error::Config(format!("{}: cannot draw: {why}", path.display()));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_figure(&root, fig).map_err(|e| fail(&png, e))?;
        root.present().map_err(|e| fail(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_figure(&root, fig).map_err(|e| fail(&svg, e))?;
        root.present().map_err(|e| fail(&svg, e.to_string()))?;
    }
    Ok(vec![png, svg])
}
