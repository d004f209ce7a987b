//! Draws a [`Timeline`] as a chart: throughput over time, with the fault and recovery
//! events as labelled vertical lines. SVG or PNG by the file's extension.
//!
//! Text needs a TrueType font (plotters measures labels with it, for SVG too): DejaVu
//! Sans from Debian's fonts-dejavu-core, or the file named by `DRS_BENCH_FONT`.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::timeline::{EventKind, Timeline};

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 560);
/// Where fonts are looked for, in order, after `DRS_BENCH_FONT`.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font once; the error says what to install.
fn font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates: Vec<String> = std::env::var("DRS_BENCH_FONT")
                .into_iter()
                .chain(FONT_PATHS.iter().map(|s| s.to_string()))
                .collect();
            for path in &candidates {
                let Ok(bytes) = std::fs::read(path) else {
                    continue;
                };
                // Registered fonts live as long as the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
            Err(format!(
                "no usable TrueType font for chart text (tried {}); install fonts-dejavu-core or set DRS_BENCH_FONT",
                candidates.join(", ")
            ))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Writes the chart of `t` to `path` (`.svg` or `.png`).
pub fn draw(t: &Timeline, path: &Path) -> anyhow::Result<()> {
    font()?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "svg" => write(t, path, SVGBackend::new(path, SIZE)),
        "png" => write(t, path, BitMapBackend::new(path, SIZE)),
        _ => bail!("{}: a chart is .svg or .png", path.display()),
    }
}

/// Plots `t` on `backend` and writes it out.
fn write<DB: DrawingBackend>(t: &Timeline, path: &Path, backend: DB) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let root = backend.into_drawing_area();
    plot(t, &root)?;
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("write {}", path.display()))
}

fn plot<DB: DrawingBackend>(t: &Timeline, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e}");
    let unit = t.unit();
    let end = t.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let top = t
        .samples
        .iter()
        .map(|s| s.value(unit))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.25;
    root.fill(&WHITE).map_err(err)?;
    let p = t.phases();
    let caption = format!(
        "{}: {}, {} (before {:.1}{}{} {})",
        t.system,
        t.scenario.name(),
        t.workload.name(),
        p.before,
        p.during
            .map_or(String::new(), |v| format!(", during {v:.1}")),
        p.after.map_or(String::new(), |v| format!(", after {v:.1}")),
        unit.label()
    );
    let mut chart = ChartBuilder::on(root)
        .margin(16)
        .caption(caption, (FONT, 22))
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit.label())
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            t.samples.iter().map(|s| (s.t, s.value(unit))),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?;
    // Failed operations, as red marks on the time axis.
    chart
        .draw_series(
            t.samples
                .iter()
                .filter(|s| s.errors > 0)
                .map(|s| Circle::new((s.t, 0.0), 4, RED.filled())),
        )
        .map_err(err)?;
    for (i, e) in t.events.iter().enumerate() {
        let color = match e.kind {
            EventKind::Fault => RED,
            EventKind::Recovery => GREEN,
            EventKind::Mark => RGBColor(120, 120, 120),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(e.t, 0.0), (e.t, top)],
                color.stroke_width(2),
            )))
            .map_err(err)?;
        // Labels step down so that close events stay readable.
        let y = top * (0.97 - 0.06 * (i % 4) as f64);
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {}", e.label),
                (e.t, y),
                (FONT, 14).into_font().color(&color),
            )))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{Event, Sample, Scenario, Workload};

    #[test]
    fn charts_are_written_as_svg_and_png() {
        let t = Timeline {
            scenario: Scenario::Restart,
            workload: Workload::RandRead,
            system: "DRS 4+2".into(),
            samples: (1..=40)
                .map(|i| Sample {
                    t: i as f64 * 0.25,
                    dt: 0.25,
                    bytes: 4096 * 100,
                    ops: if (10..20).contains(&i) { 40 } else { 100 },
                    errors: u64::from(i == 12),
                })
                .collect(),
            events: vec![
                Event {
                    t: 2.5,
                    kind: EventKind::Fault,
                    label: "SIGKILL node 1".into(),
                },
                Event {
                    t: 5.0,
                    kind: EventKind::Recovery,
                    label: "node 1 up".into(),
                },
            ],
            load: (0.1, 0.2),
            first_error: None,
            rebuilt_bytes: None,
        };
        let dir = std::env::temp_dir().join(format!("drs-chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("t.svg");
        let png = dir.join("t.png");
        let res = draw(&t, &svg).and_then(|_| draw(&t, &png));
        if let Err(e) = font() {
            // No font on this machine: the error must say what to install.
            assert!(format!("{e}").contains("fonts-dejavu-core"), "{e}");
            assert!(res.is_err());
            return;
        }
        res.unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..40.min(text.len())]);
        assert!(text.contains("SIGKILL node 1") && text.contains("node 1 up"));
        assert!(text.contains("ops/s"));
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 10_000,
            "a real picture: {} bytes",
            bytes.len()
        );
        assert!(draw(&t, &dir.join("t.gif")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
