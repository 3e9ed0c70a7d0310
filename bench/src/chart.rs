//! The swap chart, as SVG (text stays text, so no font files are needed to draw it): one panel
//! per metric (requests per second, server CPU per request, p99 latency) against connection
//! count, one line per backend through the medians, and a band over the range the repetitions
//! spanned. Throughput alone says little about an open-loop run (every backend sends the
//! target rate): there the cost and latency panels are the comparison.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{grouped, micros};

/// One backend at one connection count: the median over the repetitions and the range they
/// spanned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figure {
    pub connections: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// One backend's line in a panel.
pub struct Series {
    pub name: String,
    pub points: Vec<Figure>,
}

/// How a panel's values read.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    PerSecond,
    Microseconds,
}

/// One metric: its axis label and one series per backend. A panel without any point (CPU not
/// measured) is left out of the chart.
pub struct Panel {
    pub metric: String,
    pub unit: Unit,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Height of one panel in pixels.
const PANEL_HEIGHT: u32 = 400;

/// Draws `panels`, stacked, into an SVG file at `path`. Connection counts are evenly spaced
/// categories (1, 64, 512 would crowd into a corner on a linear axis).
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    draw_panels(path, title, panels)
        .map_err(|e| format!("{}: cannot draw the chart: {e}", path.display()))
}

fn draw_panels(
    path: &Path,
    title: &str,
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error>> {
    let panels: Vec<&Panel> = panels
        .iter()
        .filter(|p| p.series.iter().any(|s| !s.points.is_empty()))
        .collect();
    let height = 50 + PANEL_HEIGHT * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root.titled(title, ("sans-serif", 22))?;
    for (panel, area) in panels
        .iter()
        .zip(body.split_evenly((panels.len().max(1), 1)))
    {
        draw_panel(&area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut counts: Vec<usize> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.connections))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let y_max = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.max.max(p.median)))
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let unit = panel.unit;

    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(
            // Segments 0..=n-1: one per connection count.
            (0..counts.len().saturating_sub(1)).into_segmented(),
            0f64..y_max,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("connections")
        .y_desc(panel.metric.as_str())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => counts.get(*i).map_or(String::new(), |c| c.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| match unit {
            Unit::PerSecond => grouped(*v),
            Unit::Microseconds => micros(*v),
        })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let at = |f: &Figure| {
            let x = counts.iter().position(|&c| c == f.connections)?;
            Some(SegmentValue::CenterOf(x))
        };
        let placed: Vec<(SegmentValue<usize>, Figure)> =
            s.points.iter().filter_map(|f| Some((at(f)?, *f))).collect();
        // The spread: a translucent band from the lowest to the highest run, and a whisker at
        // each point (a band of one point is just its whisker).
        let band: Vec<(SegmentValue<usize>, f64)> = placed
            .iter()
            .map(|(x, f)| (x.clone(), f.min))
            .chain(placed.iter().rev().map(|(x, f)| (x.clone(), f.max)))
            .collect();
        chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.15))))?;
        chart.draw_series(placed.iter().map(|(x, f)| {
            PathElement::new(
                vec![(x.clone(), f.min), (x.clone(), f.max)],
                color.mix(0.6).stroke_width(2),
            )
        }))?;
        let medians: Vec<(SegmentValue<usize>, f64)> =
            placed.iter().map(|(x, f)| (x.clone(), f.median)).collect();
        chart
            .draw_series(LineSeries::new(medians.clone(), color.stroke_width(3)))?
            .label(&s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart.draw_series(
            medians
                .into_iter()
                .map(|p| Circle::new(p, 5, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(connections: usize, median: f64) -> Figure {
        Figure {
            connections,
            median,
            min: median * 0.9,
            max: median * 1.1,
        }
    }

    fn panel(metric: &str, unit: Unit, xs: &[usize], scale: f64) -> Panel {
        Panel {
            metric: metric.into(),
            unit,
            series: ["epoll", "io_uring"]
                .iter()
                .enumerate()
                .map(|(i, name)| Series {
                    name: name.to_string(),
                    points: xs
                        .iter()
                        .map(|&x| figure(x, scale * (1.0 + i as f64 / 10.0) * x as f64))
                        .collect(),
                })
                .collect(),
        }
    }

    /// The `<text>` contents of an SVG.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once('<')?.0.trim()))
            .collect()
    }

    #[test]
    fn draws_a_panel_per_metric_with_a_line_and_a_spread_per_backend() {
        let dir = std::env::temp_dir().join(format!("wharf-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for xs in [vec![1usize, 64, 512], vec![8, 16], vec![4]] {
            let path = dir.join("t.svg");
            let panels = [
                panel("requests per second", Unit::PerSecond, &xs, 1000.0),
                panel("server CPU per request", Unit::Microseconds, &xs, 0.01),
                panel("p99 latency", Unit::Microseconds, &xs, 3.0),
            ];
            draw(&path, "wharf echo", &panels).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
            let texts = texts(&svg);
            for label in [
                "wharf echo",
                "requests per second",
                "server CPU per request",
                "p99 latency",
                "epoll",
                "io_uring",
            ] {
                assert!(texts.contains(&label), "{label} missing from {texts:?}");
            }
            assert_eq!(texts.iter().filter(|t| **t == "connections").count(), 3);
            for x in &xs {
                assert!(
                    texts.contains(&x.to_string().as_str()),
                    "tick {x} in {texts:?}"
                );
            }
            // The microsecond panels read in microseconds.
            assert!(texts.iter().any(|t| t.ends_with("µs")), "{texts:?}");
            // Each backend, in each of the three panels: its median line and its legend
            // sample, a whisker per point and its spread band, in its own color.
            for color in ["#1F77B4", "#D62728"] {
                let polylines = |width: &str| {
                    svg.lines()
                        .filter(|l| {
                            l.starts_with("<polyline")
                                && l.contains(color)
                                && l.contains(&format!("stroke-width=\"{width}\""))
                        })
                        .count()
                };
                assert_eq!(polylines("3"), 3 * 2, "{color}: {svg}");
                assert_eq!(polylines("2"), 3 * xs.len(), "{color}: {svg}");
                let bands = svg
                    .lines()
                    .filter(|l| l.starts_with("<polygon") && l.contains(color))
                    .count();
                assert_eq!(bands, 3, "{color}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_metric_without_figures_is_left_out() {
        let dir = std::env::temp_dir().join(format!("wharf-chart-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let mut unmeasured = panel("server CPU per request", Unit::Microseconds, &[1], 1.0);
        for s in &mut unmeasured.series {
            s.points.clear();
        }
        let panels = [
            panel("requests per second", Unit::PerSecond, &[1, 8], 1000.0),
            unmeasured,
        ];
        draw(&path, "wharf echo", &panels).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let texts = texts(&svg);
        assert!(texts.contains(&"requests per second"), "{texts:?}");
        assert!(!texts.contains(&"server CPU per request"), "{texts:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
