//! The swap chart: throughput against connection count, one line per backend, as SVG (text
//! stays text, so no font files are needed to draw it).

use std::path::Path;

use plotters::prelude::*;

/// One backend's line: (connections, requests per second) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(usize, f64)>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Draws `series` into an SVG file at `path`. Connection counts are evenly spaced categories
/// (1, 64, 512 would crowd into a corner on a linear axis).
pub fn throughput(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    draw(path, title, series).map_err(|e| format!("{}: cannot draw the chart: {e}", path.display()))
}

fn draw(path: &Path, title: &str, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let mut counts: Vec<usize> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0f64, f64::max)
        .max(1.0)
        * 1.15;

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
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
        .y_desc("requests per second (median)")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => counts.get(*i).map_or(String::new(), |c| c.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| super::report::grouped(*v))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(SegmentValue<usize>, f64)> = s
            .points
            .iter()
            .filter_map(|&(conns, y)| {
                let at = counts.iter().position(|&c| c == conns)?;
                Some((SegmentValue::CenterOf(at), y))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(&s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
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
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_line_per_backend_with_labels() {
        let dir = std::env::temp_dir().join(format!("wharf-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for xs in [vec![1usize, 64, 512], vec![8, 16], vec![4]] {
            let path = dir.join("t.svg");
            let series = vec![
                Series {
                    name: "epoll".into(),
                    points: xs.iter().map(|&x| (x, 1000.0 * x as f64)).collect(),
                },
                Series {
                    name: "io_uring".into(),
                    points: xs.iter().map(|&x| (x, 1100.0 * x as f64)).collect(),
                },
            ];
            throughput(&path, "wharf echo", &series).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
            let texts: Vec<&str> = svg
                .split("<text")
                .skip(1)
                .filter_map(|t| Some(t.split_once('>')?.1.split_once('<')?.0.trim()))
                .collect();
            for label in ["wharf echo", "connections", "epoll", "io_uring"] {
                assert!(texts.contains(&label), "{label} missing from {texts:?}");
            }
            for x in &xs {
                assert!(
                    texts.contains(&x.to_string().as_str()),
                    "tick {x} in {texts:?}"
                );
            }
            // Each backend: its line and its legend sample, in its own color.
            for color in ["#1F77B4", "#D62728"] {
                let lines = svg
                    .lines()
                    .filter(|l| l.starts_with("<polyline") && l.contains(color))
                    .count();
                assert_eq!(lines, 2, "{color}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
