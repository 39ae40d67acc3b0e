//! The SVG: throughput per scenario (bars) above latency CDFs (lines, log time
//! axis, so the tail is as readable as the median).

use std::path::Path;

use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::report::Row;

const FONT: &str = "sans-serif";

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws both charts into `path`.
pub fn draw(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 950)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(420);
    throughput(&top, rows)?;
    latency(&bottom, rows)?;
    root.present()?;
    Ok(())
}

/// One colour per scenario, the same in both charts.
fn colour(index: usize) -> PaletteColor<Palette99> {
    Palette99::pick(index)
}

fn throughput(area: &Area<'_>, rows: &[Row]) -> anyhow::Result<()> {
    let top = rows.iter().map(|r| r.events_per_sec).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (events/s)", (FONT, 24))
        .margin(20)
        .x_label_area_size(35)
        .y_label_area_size(80)
        // An integer range is discrete and includes its end: 0..n-1 is n slots.
        .build_cartesian_2d((0..rows.len().saturating_sub(1)).into_segmented(), 0.0..top)?;
    let name = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            rows.get(*i).map(|r| r.scenario.clone()).unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len().max(1))
        .x_label_formatter(&name)
        .y_desc("events/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), row.events_per_sec),
            ],
            colour(i).filled(),
        );
        bar.set_margin(0, 0, 15, 15);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
        Text::new(
            format!("{:.0}", row.events_per_sec),
            (SegmentValue::CenterOf(i), row.events_per_sec),
            (FONT, 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;
    Ok(())
}

fn latency(area: &Area<'_>, rows: &[Row]) -> anyhow::Result<()> {
    let with: Vec<(usize, &Row)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.cdf.is_empty())
        .collect();
    let points = with.iter().flat_map(|(_, r)| r.cdf.iter().map(|p| p.0));
    let (low, high) = points.fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if with.is_empty() || high <= 0.0 {
        area.draw(&Text::new(
            "no scenario with latencies",
            (40, 40),
            (FONT, 18).into_font(),
        ))?;
        return Ok(());
    }
    let low = (low * 0.8).max(0.001);
    let high = (high * 1.25).max(low * 10.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Latency CDF", (FONT, 24))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((low..high).log_scale(), 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format!("{v}"))
        .draw()?;
    for (index, row) in with {
        let style = colour(index).stroke_width(2);
        chart
            .draw_series(LineSeries::new(row.cdf.iter().copied(), style))?
            .label(format!("{} (per {})", row.scenario, row.latency_of))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}
