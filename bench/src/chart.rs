//! The `--sweep` chart: throughput and TPOT against concurrency, one line per stage, as a
//! self-contained SVG.

use std::fmt::Write;

use llamapool_bench::metrics::StageReport;

const W: f64 = 900.0;
const H: f64 = 380.0;
const COLORS: [&str; 7] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

/// Two panels side by side: tokens/s and TPOT p50 (ms), x = concurrency on a log2 scale.
pub fn svg(reports: &[StageReport]) -> String {
    let mut series: Vec<(String, Vec<&StageReport>)> = Vec::new();
    for r in reports {
        let key = if r.interference {
            format!("stage {} + busy loop", r.stage)
        } else {
            format!("stage {}", r.stage)
        };
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, points)) => points.push(r),
            None => series.push((key, vec![r])),
        }
    }
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    panel(&mut out, &series, 0.0, "aggregate tokens/s", |r| {
        r.tokens_per_s
    });
    panel(&mut out, &series, W / 2.0, "TPOT p50 (ms)", |r| {
        r.tpot_p50_ms
    });
    for (i, (name, _)) in series.iter().enumerate() {
        let y = 20.0 + 16.0 * i as f64;
        let color = COLORS[i % COLORS.len()];
        let _ = write!(
            out,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            W - 150.0,
            y - 9.0,
            W - 135.0,
            y
        );
    }
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    series: &[(String, Vec<&StageReport>)],
    x0: f64,
    title: &str,
    value: impl Fn(&StageReport) -> f64,
) {
    let (left, top, width, height) = (x0 + 60.0, 40.0, W / 2.0 - 110.0, H - 90.0);
    let all: Vec<&StageReport> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let max_c = all.iter().map(|r| r.concurrency).max().unwrap_or(1).max(2) as f64;
    let max_v = all
        .iter()
        .map(|r| value(r))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let x = |c: usize| left + (c.max(1) as f64).log2() / max_c.log2() * width;
    let y = |v: f64| top + height - v / max_v * height;
    let _ = write!(
        out,
        r#"<text x="{}" y="24" font-size="14">{title}</text>"#,
        left
    );
    let _ = write!(
        out,
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=4 {
        let v = max_v * f64::from(k) / 4.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.0}</text><line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##,
            left - 5.0,
            y(v) + 4.0,
            left + width,
            y(v),
            y(v)
        );
    }
    let mut c = 1usize;
    while (c as f64) <= max_c {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{c}</text>"#,
            x(c),
            top + height + 16.0
        );
        c *= 2;
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">concurrency</text>"#,
        left + width / 2.0,
        top + height + 34.0
    );
    for (i, (_, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(usize, f64)> = points
            .iter()
            .map(|r| (r.concurrency, value(r)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        pts.sort_by_key(|p| p.0);
        let path: Vec<String> = pts
            .iter()
            .map(|(c, v)| format!("{:.1},{:.1}", x(*c), y(*v)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for (c, v) in pts {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(c),
                y(v)
            );
        }
    }
}
