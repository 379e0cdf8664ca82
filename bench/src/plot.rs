//! SVG plots: one bar chart per (workload, metric), a bar per contender at its median with a
//! whisker from the minimum to the maximum over the rounds. SVG backend only: no fonts or
//! bitmaps are compiled in (plotters' naive text metrics suffice for labels).

use std::path::Path;

use plotters::prelude::*;

use crate::model::{Contender, Metric, Workload};
use crate::report::Summary;

/// Colour of a contender's bar: baselines grey, peers blue, Sidewall orange.
fn colour(contender: &str) -> RGBColor {
    match Contender::from_name(contender) {
        Some(c) if c.is_sidewall() => RGBColor(230, 120, 20),
        Some(c) if c.is_peer() => RGBColor(60, 110, 180),
        _ => RGBColor(150, 150, 150),
    }
}

/// Draws one chart into `path`.
fn chart(path: &Path, title: &str, unit: &str, bars: &[&Summary]) -> Result<(), String> {
    let top = bars.iter().map(|s| s.max.max(s.median)).fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let n = i32::try_from(bars.len()).map_err(|e| e.to_string())?;
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
        .map_err(|e| e.to_string())?;
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => usize::try_from(*i)
            .ok()
            .and_then(|i| bars.get(i))
            .map_or_else(String::new, |s| s.contender.clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&label)
        .y_desc(unit)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in (0..n).zip(bars) {
        let right = if i + 1 < n {
            SegmentValue::Exact(i + 1)
        } else {
            SegmentValue::Last
        };
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (right, s.median)],
            colour(&s.contender).filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        chart.draw_series([bar]).map_err(|e| e.to_string())?;
        let whisker = PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), s.min),
                (SegmentValue::CenterOf(i), s.max),
            ],
            BLACK.stroke_width(2),
        );
        chart.draw_series([whisker]).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes one SVG per (workload, metric) of `summary` into `dir` and returns the file names.
pub fn write_all(dir: &Path, summary: &[Summary]) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for workload in Workload::ALL {
        for metric in Metric::ALL {
            let bars: Vec<&Summary> = summary
                .iter()
                .filter(|s| s.workload == workload.name() && s.metric == metric.name())
                .collect();
            if bars.is_empty() {
                continue;
            }
            let file = format!("{}_{}.svg", workload.name(), metric.name());
            let title = format!("{} · {} (median, min–max)", workload.name(), metric.name());
            chart(&dir.join(&file), &title, metric.unit(), &bars)?;
            written.push(file);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Row, summarize};

    #[test]
    fn one_svg_per_workload_and_metric() {
        let rows = vec![
            Row::new(Contender::Direct, Workload::RrC1, Metric::Rps, 30_000.0, 1),
            Row::new(
                Contender::SidewallL4,
                Workload::RrC1,
                Metric::Rps,
                9_000.0,
                1,
            ),
            Row::new(
                Contender::SidewallL4,
                Workload::RrC1,
                Metric::P99Us,
                150.0,
                1,
            ),
        ];
        let dir = std::env::temp_dir().join(format!("sidewall-bench-plot-{}", std::process::id()));
        let files = write_all(&dir, &summarize(&rows)).unwrap();
        let svg = std::fs::read_to_string(dir.join("rr-c1_rps.svg")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(files, ["rr-c1_rps.svg", "rr-c1_p99_us.svg"]);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("sidewall-l4"), "the bars are labelled");
    }
}
