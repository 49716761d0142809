//! The loss curve of a training run as a self-contained SVG file, which any
//! browser opens: training loss per optimizer step and validation loss at
//! each evaluation.

use std::fmt::Write;

const W: f64 = 800.0;
const H: f64 = 450.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Renders train and validation losses, each a list of (step, loss).
pub fn loss_svg(title: &str, train: &[(u64, f32)], val: &[(u64, f32)]) -> String {
    let finite = |p: &&(u64, f32)| p.1.is_finite();
    let all: Vec<&(u64, f32)> = train.iter().chain(val).filter(finite).collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        W / 2.0,
        escape(title)
    );
    if all.is_empty() {
        svg.push_str("<text x=\"400\" y=\"225\" text-anchor=\"middle\">no data yet</text>\n</svg>\n");
        return svg;
    }
    let x_max = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let y_min = all.iter().map(|p| p.1).fold(f32::INFINITY, f32::min) as f64;
    let y_max = all.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let (y0, y1) = (y_min - pad, y_max + pad);
    let px = |s: u64| LEFT + s as f64 / x_max * (W - LEFT - RIGHT);
    let py = |l: f32| TOP + (y1 - l as f64) / (y1 - y0) * (H - TOP - BOTTOM);

    // Axes, grid lines and tick labels.
    let (x_axis, y_axis) = (H - BOTTOM, LEFT);
    let _ = writeln!(
        svg,
        r##"<g stroke="#444"><line x1="{y_axis}" y1="{TOP}" x2="{y_axis}" y2="{x_axis}"/><line x1="{y_axis}" y1="{x_axis}" x2="{}" y2="{x_axis}"/></g>"##,
        W - RIGHT
    );
    for i in 0..=5 {
        let l = y0 + (y1 - y0) * i as f64 / 5.0;
        let y = py(l as f32);
        let _ = writeln!(
            svg,
            r##"<line x1="{y_axis}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{l:.3}</text>"##,
            W - RIGHT,
            y_axis - 6.0,
            y + 4.0
        );
        let s = (x_max * i as f64 / 5.0).round() as u64;
        let x = px(s);
        let _ = writeln!(svg, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{s}</text>"#, x_axis + 18.0);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">loss</text>"#,
        H / 2.0,
        H / 2.0
    );

    let line = |svg: &mut String, pts: &[(u64, f32)], color: &str, dots: bool| {
        let pts: Vec<&(u64, f32)> = pts.iter().filter(finite).collect();
        let coords: Vec<String> = pts.iter().map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            coords.join(" ")
        );
        if dots {
            for p in &pts {
                let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(p.0), py(p.1));
            }
        }
    };
    line(&mut svg, train, "#1f77b4", false);
    line(&mut svg, val, "#ff7f0e", true);
    let lx = W - RIGHT - 150.0;
    let _ = writeln!(
        svg,
        r##"<rect x="{lx}" y="{TOP}" width="140" height="44" fill="white" stroke="#ccc"/>
<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#1f77b4" stroke-width="2"/><text x="{}" y="{}">train loss</text>
<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ff7f0e" stroke-width="2"/><text x="{}" y="{}">validation loss</text>"##,
        lx + 8.0,
        TOP + 14.0,
        lx + 30.0,
        TOP + 14.0,
        lx + 36.0,
        TOP + 18.0,
        lx + 8.0,
        TOP + 32.0,
        lx + 30.0,
        TOP + 32.0,
        lx + 36.0,
        TOP + 36.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
