//! The SVG chart of a run, written by hand (no plotting crate to build): throughput ratio to
//! direct per mode, latency percentiles per mode at each fixed rate on a log scale (raw, then
//! HTTP/1.1 with the L7 modes), and the proxies' CPU per 1,000 HTTP requests.

use std::fmt::Write as _;

use super::results::{LatencySummary, Meta, ModeSummary};

const PANEL_W: f64 = 330.0;
const HEIGHT: f64 = 380.0;
const TOP: f64 = 60.0;
const PLOT_H: f64 = 220.0;
const LEFT: f64 = 55.0;
const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];

/// Returns an axis label: `1k` for thousands, seconds for a million µs and more when `micros`,
/// small values without float noise (`0.01`, not `0.010000000000000002`).
fn tick_label(t: f64, micros: bool) -> String {
    if micros && t >= 1e6 {
        format!("{:.0} s", t / 1e6)
    } else if t >= 1000.0 {
        format!("{:.0}k", t / 1000.0)
    } else {
        format!("{}", (t * 1e6).round() / 1e6)
    }
}

/// Escapes text for SVG.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One panel of grouped bars: groups along x (modes), series within a group (e.g. p50…p99.9).
struct Panel<'a> {
    title: String,
    /// Wider for panels with more groups.
    width: f64,
    groups: Vec<&'a str>,
    series: Vec<&'a str>,
    /// `values[group][series]`.
    values: Vec<Vec<Option<f64>>>,
    /// Log-scale (latency) or linear from 0 (ratios).
    log: bool,
    /// A reference line (1.0 for ratios).
    reference: Option<f64>,
    unit: &'a str,
}

impl Panel<'_> {
    /// Returns the axis range and ticks.
    fn axis(&self) -> (f64, f64, Vec<f64>) {
        let max = self.values.iter().flatten().flatten().copied().fold(0.0_f64, f64::max);
        if self.log {
            let min =
                self.values.iter().flatten().flatten().copied().filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
            let (lo, hi) = if max > 0.0 {
                (
                    10f64.powf(min.log10().floor()),
                    10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0)),
                )
            } else {
                (1.0, 10.0)
            };
            let mut ticks = Vec::new();
            let mut t = lo;
            while t <= hi * 1.0001 {
                ticks.push(t);
                t *= 10.0;
            }
            (lo, hi, ticks)
        } else {
            let hi = max.max(self.reference.unwrap_or(0.0)).max(0.1) * 1.1;
            let step = match hi {
                h if h > 2.0 => 0.5,
                h if h > 0.5 => 0.25,
                h if h > 0.2 => 0.05,
                _ => 0.02,
            };
            let ticks = (0..).map(|i| f64::from(i) * step).take_while(|t| *t <= hi).collect();
            (0.0, hi, ticks)
        }
    }

    fn y(&self, value: f64, lo: f64, hi: f64) -> f64 {
        let share = if self.log {
            (value.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
        } else {
            (value - lo) / (hi - lo)
        };
        TOP + PLOT_H * (1.0 - share.clamp(0.0, 1.0))
    }

    fn render(&self, out: &mut String, x0: f64) {
        let (lo, hi, ticks) = self.axis();
        let plot_w = self.width - LEFT - 15.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="30" font-size="13" font-weight="bold" text-anchor="middle">{}</text>"#,
            x0 + self.width / 2.0,
            esc(&self.title)
        );
        for t in &ticks {
            let y = self.y(*t, lo, hi);
            let label = tick_label(*t, self.unit.starts_with("µs"));
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                x0 + LEFT,
                x0 + LEFT + plot_w,
                x0 + LEFT - 4.0,
                y + 3.0,
                esc(&label)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            x0 + 14.0,
            TOP + PLOT_H / 2.0,
            x0 + 14.0,
            TOP + PLOT_H / 2.0,
            esc(self.unit)
        );
        if let Some(r) = self.reference {
            let y = self.y(r, lo, hi);
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#333" stroke-dasharray="4 3"/>"##,
                x0 + LEFT,
                x0 + LEFT + plot_w
            );
        }
        let groups = self.groups.len().max(1) as f64;
        let group_w = plot_w / groups;
        let bar_w = (group_w * 0.8) / self.series.len().max(1) as f64;
        for (g, name) in self.groups.iter().enumerate() {
            let gx = x0 + LEFT + group_w * g as f64 + group_w * 0.1;
            for (s, value) in self.values[g].iter().enumerate() {
                let Some(value) = value else { continue };
                let y = self.y(*value, lo, hi);
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {} {value:.2}</title></rect>"#,
                    gx + bar_w * s as f64,
                    (bar_w - 1.0).max(1.0),
                    (TOP + PLOT_H - y).max(0.5),
                    COLORS[s % COLORS.len()],
                    esc(name),
                    esc(self.series[s])
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                gx + group_w * 0.4,
                TOP + PLOT_H + 14.0,
                esc(name)
            );
        }
        for (s, name) in self.series.iter().enumerate() {
            let lx = x0 + LEFT + 70.0 * s as f64;
            let ly = TOP + PLOT_H + 36.0;
            let _ = writeln!(
                out,
                r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{ly:.1}" font-size="10">{}</text>"#,
                ly - 9.0,
                COLORS[s % COLORS.len()],
                lx + 13.0,
                esc(name)
            );
        }
    }
}

/// Returns a latency panel: percentiles of `runs` at `rate`, one group per mode that ran it.
fn latency_panel<'a>(
    title: String,
    summary: &'a [ModeSummary],
    runs: fn(&ModeSummary) -> &Vec<LatencySummary>,
    rate: u32,
) -> Panel<'a> {
    let with_rate: Vec<&ModeSummary> =
        summary.iter().filter(|m| runs(m).iter().any(|l| l.rate == rate)).collect();
    Panel {
        title,
        width: PANEL_W.max(LEFT + 15.0 + 62.0 * with_rate.len() as f64),
        groups: with_rate.iter().map(|m| m.mode.short_label()).collect(),
        series: vec!["p50", "p90", "p99", "p99.9"],
        values: with_rate
            .iter()
            .map(|m| {
                let l = runs(m).iter().find(|l| l.rate == rate);
                vec![
                    l.and_then(|l| l.p50_us),
                    l.and_then(|l| l.p90_us),
                    l.and_then(|l| l.p99_us),
                    l.and_then(|l| l.p999_us),
                ]
            })
            .collect(),
        log: true,
        reference: None,
        unit: "µs (log scale)",
    }
}

/// Returns the rates `runs` were measured at, in order.
fn rates_of(summary: &[ModeSummary], runs: fn(&ModeSummary) -> &Vec<LatencySummary>) -> Vec<u32> {
    let mut rates: Vec<u32> = summary.iter().flat_map(|m| runs(m).iter().map(|l| l.rate)).collect();
    rates.sort();
    rates.dedup();
    rates
}

/// Returns the chart of a run's summary.
pub fn svg(meta: &Meta, summary: &[ModeSummary]) -> String {
    let mut panels = Vec::new();
    let mut streams: Vec<u32> = summary.iter().flat_map(|m| m.throughput.iter().map(|t| t.streams)).collect();
    streams.sort();
    streams.dedup();
    let stream_names: Vec<String> =
        streams.iter().map(|n| if *n == 1 { "1 stream".into() } else { format!("{n} streams") }).collect();
    let with_throughput: Vec<&ModeSummary> = summary.iter().filter(|m| !m.throughput.is_empty()).collect();
    if !with_throughput.is_empty() {
        panels.push(Panel {
            title: "Throughput, × direct".into(),
            width: PANEL_W,
            groups: with_throughput.iter().map(|m| m.mode.short_label()).collect(),
            series: stream_names.iter().map(String::as_str).collect(),
            values: with_throughput
                .iter()
                .map(|m| {
                    streams
                        .iter()
                        .map(|n| m.throughput.iter().find(|t| t.streams == *n).and_then(|t| t.ratio))
                        .collect()
                })
                .collect(),
            log: false,
            reference: Some(1.0),
            unit: "ratio to direct",
        });
    }
    let raw: fn(&ModeSummary) -> &Vec<LatencySummary> = |m| &m.latency;
    let http: fn(&ModeSummary) -> &Vec<LatencySummary> = |m| &m.http_latency;
    for rate in rates_of(summary, raw) {
        panels.push(latency_panel(format!("Latency at {rate} req/s"), summary, raw, rate));
    }
    let http_rates = rates_of(summary, http);
    for &rate in &http_rates {
        panels.push(latency_panel(format!("HTTP latency at {rate} req/s"), summary, http, rate));
    }
    let with_cpu: Vec<&ModeSummary> =
        summary.iter().filter(|m| m.http_latency.iter().any(|l| l.cpu_secs_per_1k.is_some())).collect();
    let rate_names: Vec<String> = http_rates.iter().map(|r| format!("{r} req/s")).collect();
    if !with_cpu.is_empty() {
        panels.push(Panel {
            title: "Proxy CPU per 1k HTTP requests".into(),
            width: PANEL_W.max(LEFT + 15.0 + 62.0 * with_cpu.len() as f64),
            groups: with_cpu.iter().map(|m| m.mode.short_label()).collect(),
            series: rate_names.iter().map(String::as_str).collect(),
            values: with_cpu
                .iter()
                .map(|m| {
                    http_rates
                        .iter()
                        .map(|r| m.http_latency.iter().find(|l| l.rate == *r).and_then(|l| l.cpu_secs_per_1k))
                        .collect()
                })
                .collect(),
            // Log: 10,000 rules cost tens of times what the others do.
            log: true,
            reference: None,
            unit: "CPU s per 1,000 requests (log scale)",
        });
    }
    let width: f64 = panels.iter().map(|p| p.width).sum::<f64>().max(PANEL_W);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{HEIGHT:.0}" viewBox="0 0 {width:.0} {HEIGHT:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    let mut x0 = 0.0;
    for panel in &panels {
        panel.render(&mut out, x0);
        x0 += panel.width;
    }
    let m = &meta.machine;
    let _ = writeln!(
        out,
        r##"<text x="8" y="{:.0}" font-size="10" fill="#555">nodemesh cargo xtask bench, {}, median of {} interleaved rounds{}</text>"##,
        HEIGHT - 22.0,
        esc(&meta.started),
        meta.rounds,
        if meta.smoke { " (smoke run, not a measurement)" } else { "" }
    );
    let _ = writeln!(
        out,
        r##"<text x="8" y="{:.0}" font-size="10" fill="#555">{} vCPU {}, Linux {}</text>"##,
        HEIGHT - 9.0,
        m.nproc,
        esc(&m.cpu_model),
        esc(&m.kernel)
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::svg;
    use crate::bench::results::{LatencySummary, Meta, Mode, ModeSummary, ThroughputSummary};

    fn mode(mode: Mode, ratio: f64, p50: Option<f64>) -> ModeSummary {
        ModeSummary {
            mode,
            throughput: vec![ThroughputSummary {
                streams: 1,
                runs: 1,
                gbit_per_s: Some(ratio),
                ratio: Some(ratio),
            }],
            latency: vec![LatencySummary {
                rate: 1000,
                runs_kept: 1,
                runs_discarded: 0,
                runs_saturated: 0,
                p50_us: p50,
                p90_us: p50,
                p99_us: p50.map(|v| v * 3.0),
                p999_us: None,
                added_p50_us: None,
                added_p99_us: None,
                cpu_secs_per_1k: None,
                cpu_vs_mtls: None,
                added_machine_cpu_per_1k: None,
            }],
            http_latency: Vec::new(),
            connect: None,
            memory: None,
        }
    }

    #[test]
    fn the_chart_has_a_panel_per_measurement_and_a_bar_per_value() {
        let summary = [mode(Mode::Direct, 1.0, Some(40.0)), mode(Mode::Mtls, 0.5, None)];
        let chart = svg(&Meta::default(), &summary);
        assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
        assert!(chart.contains("Throughput, × direct") && chart.contains("Latency at 1000 req/s"));
        assert!(chart.contains(">mTLS<") && chart.contains(">direct<"));
        // Two throughput bars, three latency bars (a missing percentile draws nothing), four
        // legend swatches... counted through their tooltips.
        assert_eq!(chart.matches("<title>").count(), 5, "{chart}");
        assert!(!chart.contains("NaN") && !chart.contains("inf"));
    }

    #[test]
    fn an_empty_run_still_draws_a_valid_chart() {
        let chart = svg(&Meta::default(), &[]);
        assert!(chart.starts_with("<svg") && chart.contains("</svg>"));
    }

    #[test]
    fn http_latency_and_proxy_cpu_get_their_own_panels() {
        let mut mtls = mode(Mode::Mtls, 0.5, Some(150.0));
        let mut l7 = mode(Mode::MtlsL7TenThousand, 0.5, Some(400.0));
        l7.throughput.clear();
        l7.latency.clear();
        for (m, cpu) in [(&mut mtls, 0.1), (&mut l7, 0.3)] {
            let mut http = m
                .latency
                .first()
                .cloned()
                .unwrap_or_else(|| mode(Mode::Mtls, 1.0, Some(400.0)).latency[0].clone());
            http.cpu_secs_per_1k = Some(cpu);
            m.http_latency = vec![http];
        }
        let chart = svg(&Meta::default(), &[mode(Mode::Direct, 1.0, Some(40.0)), mtls, l7]);
        assert!(
            chart.contains("HTTP latency at 1000 req/s") && chart.contains("Proxy CPU per 1k HTTP requests")
        );
        assert!(chart.contains(">L7 ×10k<"), "short labels on the axes");
        assert!(chart.contains("L7 ×10k: 1000 req/s 0.30"), "a CPU bar per mode and rate: {chart}");
        assert!(!chart.contains("NaN") && !chart.contains("inf"));
    }

    #[test]
    fn tick_labels_read_well() {
        assert_eq!(super::tick_label(100.0, true), "100");
        assert_eq!(super::tick_label(10_000.0, true), "10k");
        assert_eq!(super::tick_label(10_000_000.0, true), "10 s");
        assert_eq!(super::tick_label(0.01 * 10.0 * 10.0 / 10.0, false), "0.1");
        assert_eq!(super::tick_label(0.25, false), "0.25");
    }
}
