//! `--plot FILE.svg`: throughput over time (top) and latency percentiles (bottom), drawn with
//! plotters' SVG backend from a finished [`Report`].

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;

/// Width and height of the picture in pixels.
const SIZE: (u32, u32) = (1000, 800);
/// The percentiles on the lower chart's x axis.
const QUANTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

/// Why the plot could not be written.
#[derive(Debug)]
pub struct PlotError(String);

impl std::fmt::Display for PlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plot: {}", self.0)
    }
}

impl std::error::Error for PlotError {}

fn err(e: impl std::fmt::Display) -> PlotError {
    PlotError(e.to_string())
}

/// Draws `report` into the SVG file `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    throughput(report, &top)?;
    latencies(report, &bottom)?;
    root.present().map_err(err)
}

fn throughput(
    report: &Report,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), PlotError> {
    let tl = &report.timeline;
    let per_s = |n: u64| n as f64 / tl.interval_s.max(1e-9);
    let accepted: Vec<(f64, f64)> = tl
        .points
        .iter()
        .map(|p| (p.t_s, per_s(p.messages)))
        .collect();
    let delivered: Vec<(f64, f64)> = tl
        .points
        .iter()
        .map(|p| (p.t_s, per_s(p.delivered)))
        .collect();
    let any_delivered = tl.points.iter().any(|p| p.delivered > 0);
    let t_max = tl.points.last().map(|p| p.t_s).unwrap_or(1.0).max(1e-3);
    let y_max = accepted
        .iter()
        .chain(delivered.iter())
        .map(|p| p.1)
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("turnpike bench {}: throughput", report.bench),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msgs/s")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(accepted, BLUE.stroke_width(2)))
        .map_err(err)?
        .label(if report.bench == "day" {
            "inbound accepted"
        } else {
            "accepted"
        })
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if any_delivered {
        chart
            .draw_series(LineSeries::new(delivered, RED.stroke_width(2)))
            .map_err(err)?
            .label("delivered to customers")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

fn latencies(
    report: &Report,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), PlotError> {
    // Over the whole run: one line per latency, whatever the number of phases.
    let lines: Vec<(String, [f64; 5])> = report
        .latency_us
        .iter()
        .filter(|(_, p)| p.count > 0)
        .map(|(name, p)| {
            let v = [p.p50, p.p90, p.p99, p.p999, p.max].map(|x| x.max(1) as f64);
            (name.clone(), v)
        })
        .collect();
    let y_max = lines.iter().flat_map(|l| l.1).fold(10.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "latency percentiles (microseconds, log scale)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2f64..4.2f64, (1f64..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && (0.0..5.0).contains(&i) {
                QUANTILES[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| duration_label(*v))
        .y_desc("latency")
        .draw()
        .map_err(err)?;
    for (i, (label, v)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = v.iter().enumerate().map(|(x, y)| (x as f64, *y)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// `250us`, `12ms`, `3s` for an axis label in microseconds.
fn duration_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{}s", us / 1e6)
    } else if us >= 1e3 {
        format!("{}ms", us / 1e3)
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::{self, Percentiles, Phase, Point, Report, Timeline};
    use super::*;

    #[test]
    fn writes_an_svg_with_both_charts() {
        let mut r = Report::new("mx", 0);
        r.timeline = Timeline {
            interval_s: 0.5,
            points: (1..=6)
                .map(|i| Point {
                    t_s: i as f64 * 0.5,
                    phase: "mx".into(),
                    messages: 100 * i,
                    bytes: 0,
                    delivered: 0,
                })
                .collect(),
        };
        let mut phase = Phase {
            name: "mx".into(),
            ..Phase::default()
        };
        let p = Percentiles {
            count: 10,
            p50: 100,
            p90: 200,
            p99: 900,
            p999: 1500,
            max: 3000,
            mean: 150.0,
        };
        r.latency_us
            .insert(report::latency::END_OF_DATA_TO_REPLY.into(), p);
        phase.messages = 10;
        r.phases.push(phase);
        let path = std::env::temp_dir().join(format!("tp-plot-{}.svg", std::process::id()));
        write_svg(&r, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("throughput") && svg.contains("end_of_data_to_reply"));
        assert!(svg.contains("<polyline"), "no line drawn");
    }
}
