//! Time charts as inline SVG, drawn with `plotters` (its SVG backend writes to a string,
//! so the HTML needs no file, script or font from anywhere). Every chart gets the
//! period's deploy and config markers as vertical lines.

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::ReportError;
use super::data::{DAY_S, MarkerKind, MarkerPoint, Period};

const SIZE: (u32, u32) = (760, 280);
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const DEPLOY: RGBColor = RGBColor(200, 0, 120);
const CONFIG: RGBColor = RGBColor(120, 120, 120);

/// One line of a chart: a value per day (`None` leaves a gap).
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub daily: Vec<Option<f64>>,
}

/// A daily time chart.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub title: String,
    pub unit: String,
    pub lines: Vec<Line>,
    /// A dashed horizontal reference (a budget, a target) and its name.
    pub reference: Option<(f64, String)>,
    pub period: Period,
    pub day_names: &'a [String],
    pub markers: &'a [MarkerPoint],
}

fn chart_error(e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart {
        reason: e.to_string(),
    }
}

impl Chart<'_> {
    /// The chart as an `<svg>` element.
    ///
    /// # Errors
    /// When plotters cannot lay the chart out.
    pub fn svg(&self) -> Result<String, ReportError> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(chart_error)?;
            self.draw(&root)?;
            root.present().map_err(chart_error)?;
        }
        Ok(svg)
    }

    fn y_max(&self) -> f64 {
        let data = self
            .lines
            .iter()
            .flat_map(|l| l.daily.iter().flatten().copied())
            .chain(self.reference.as_ref().map(|r| r.0))
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        if data > 0.0 { data * 1.15 } else { 1.0 }
    }

    fn draw(
        &self,
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    ) -> Result<(), ReportError> {
        let days = self.period.days() as f64;
        let y_max = self.y_max();
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..days, 0.0..y_max)
            .map_err(chart_error)?;
        let names = self.day_names;
        let label = |x: &f64| {
            let i = x.floor() as usize;
            names
                .get(i)
                .map(|n| n.get(5..).unwrap_or(n).to_owned())
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .x_labels(self.period.days() + 1)
            .x_label_formatter(&label)
            .y_desc(self.unit.as_str())
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(chart_error)?;
        for (i, line) in self.lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let points: Vec<(f64, f64)> = line
                .daily
                .iter()
                .enumerate()
                .filter_map(|(d, v)| v.filter(|v| v.is_finite()).map(|v| (d as f64 + 0.5, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(chart_error)?
                .label(line.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(chart_error)?;
        }
        if let Some((value, name)) = &self.reference {
            let style = BLACK.mix(0.5).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, *value), (days, *value)],
                    6,
                    4,
                    style,
                ))
                .map_err(chart_error)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        }
        draw_markers(&mut chart, self.markers, self.period, y_max)?;
        if !self.lines.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(chart_error)?;
        }
        Ok(())
    }
}

type Plot<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Deploys and config changes as labelled vertical lines.
fn draw_markers(
    chart: &mut Plot<'_, '_>,
    markers: &[MarkerPoint],
    period: Period,
    y_max: f64,
) -> Result<(), ReportError> {
    for marker in markers {
        let x = (marker.at - period.from) / DAY_S;
        let color = if marker.kind == MarkerKind::Deploy {
            DEPLOY
        } else {
            CONFIG
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                color.stroke_width(2),
            )))
            .map_err(chart_error)?;
        chart
            .draw_series(std::iter::once(Text::new(
                marker.label.clone(),
                (x, y_max * 0.97),
                ("sans-serif", 11).into_font().color(&color),
            )))
            .map_err(chart_error)?;
    }
    Ok(())
}
