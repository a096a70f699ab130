//! Rendering a bench run: tables for the terminal and for `docs/benchmarks.md`, and the files
//! under `target/bench/` (JSON of every run and the summary, the SVG chart, the Markdown).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    chart,
    results::{LatencySummary, Meta, ModeSummary, Results, summarize},
};

/// A table: a title, a header row, rows of cells, and a note under it.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub note: Option<String>,
}

impl Table {
    /// Renders for a terminal: columns aligned, the first to the left, the others to the right.
    pub fn to_text(&self) -> String {
        let columns = self.header.len();
        let width = |c: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let line = |row: &[String]| {
            let mut out = String::from("  ");
            for (c, w) in widths.iter().enumerate() {
                let cell = row.get(c).map_or("", String::as_str);
                let pad = w.saturating_sub(cell.chars().count());
                if c == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("   ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = format!("{}\n{}\n", self.title, line(&self.header));
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        if let Some(note) = &self.note {
            let _ = writeln!(out, "  {note}");
        }
        out
    }

    /// Renders as a Markdown table with its title in bold.
    pub fn to_markdown(&self) -> String {
        let row = |cells: &[String]| format!("| {} |", cells.join(" | "));
        let align: Vec<String> =
            (0..self.header.len()).map(|c| if c == 0 { ":--".into() } else { "--:".into() }).collect();
        let mut out = format!("**{}**\n\n{}\n{}\n", self.title, row(&self.header), row(&align));
        for r in &self.rows {
            out.push_str(&row(r));
            out.push('\n');
        }
        if let Some(note) = &self.note {
            let _ = write!(out, "\n{note}\n");
        }
        out
    }
}

/// Formats a ratio as `0.62×`, or `—` when there is none.
pub fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.2}×"))
}

/// Formats a number with `decimals` decimals, or `—`.
pub fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

/// Formats an added latency in µs with its sign (`+31`, `-2`), or `—`.
pub fn added(value: Option<f64>) -> String {
    signed(value, 0)
}

/// Formats a difference with its sign and `decimals` decimals (`+0.031`), or `—`.
pub fn signed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:+.decimals$}"))
}

/// Returns the tables of a run.
pub fn tables(meta: &Meta, summary: &[ModeSummary]) -> Vec<Table> {
    let rounds = meta.rounds;
    let mut tables = Vec::new();

    let mut streams: Vec<u32> = summary.iter().flat_map(|m| m.throughput.iter().map(|t| t.streams)).collect();
    streams.sort();
    streams.dedup();
    if !streams.is_empty() {
        let mut header = vec!["mode".to_owned()];
        for n in &streams {
            let label = if *n == 1 { "1 stream".to_owned() } else { format!("{n} streams") };
            header.push(format!("{label} Gbit/s"));
            header.push("× direct".into());
        }
        let rows = summary
            .iter()
            .filter(|m| !m.throughput.is_empty())
            .map(|m| {
                let mut row = vec![m.mode.label().to_owned()];
                for n in &streams {
                    let t = m.throughput.iter().find(|t| t.streams == *n);
                    row.push(number(t.and_then(|t| t.gbit_per_s), 2));
                    row.push(ratio(t.and_then(|t| t.ratio)));
                }
                row
            })
            .collect();
        tables.push(Table {
            title: format!(
                "Throughput, client pod → server pod across nodes (median of {rounds}; every byte verified by the receiver)"
            ),
            header,
            rows,
            note: None,
        });
    }

    if let Some(table) = latency_table(summary, |m| &m.latency, false) {
        tables.push(Table {
            title: format!(
                "Latency at a fixed rate: {} B requests over {} connections, open loop, µs from each request's \
                 intended send time (median of kept runs)",
                meta.request_bytes, meta.latency_conns
            ),
            note: Some(
                "A run whose achieved rate is off the target by more than ±2 % is discarded. vCPU per 1k req/s is \
                 both proxies' CPU seconds per 1,000 requests (/proc/<pid>/stat). Added machine vCPU: the whole \
                 machine's busy CPU seconds per 1,000 requests (/proc/stat) less direct's in the same run: \
                 everything the mesh costs, kernel work outside the proxies (softirqs, kernel workers) included."
                    .into(),
            ),
            ..table
        });
    }
    if let Some(table) = latency_table(summary, |m| &m.http_latency, true) {
        tables.push(Table {
            title: format!(
                "HTTP/1.1 latency at a fixed rate: POST of {} B, {} B response, {} keep-alive connections, open \
                 loop, µs from each request's intended send time (median of kept runs)",
                meta.http_body_bytes, meta.http_body_bytes, meta.http_conns
            ),
            note: Some(
                "mTLS+L7 (N rules): HBONE mTLS with one ALLOW AuthorizationPolicy of N rules (POST and a \
                 distinct path prefix each) on the server pod; the requests match only the last rule, so its \
                 node parses every request and evaluates every rule. Envoy mTLS (HTTP router): both Envoys \
                 parse and route every request (HTTP connection manager, router filter; no authorization). \
                 The other modes carry the same requests as bytes (L4). Every response is checked: 200 and the body echoed. CPU × mTLS: proxy CPU per \
                 request over HBONE mTLS's at the same rate, same run. Runs discarded as for the raw \
                 latency, and when a response is not 200 or responses stall; \"saturated\": the last \
                 response came over 1 s after the last request was due (requests queued: the path does not \
                 keep up with the rate, and the mode is not run at higher rates in that round)."
                    .into(),
            ),
            ..table
        });
    }

    let connect_rows: Vec<Vec<String>> = summary
        .iter()
        .filter_map(|m| m.connect.as_ref().map(|c| (m, c)))
        .map(|(m, c)| {
            vec![
                m.mode.label().to_owned(),
                number(c.per_second, 0),
                ratio(c.ratio),
                number(c.setup_p50_us, 0),
                number(c.setup_p99_us, 0),
            ]
        })
        .collect();
    if !connect_rows.is_empty() {
        tables.push(Table {
            title: format!(
                "New connections per second ({} workers back to back, each: connect, greeting, 16 B echoed, close)",
                meta.connect_workers
            ),
            header: ["mode", "conn/s", "× direct", "setup p50 µs", "setup p99 µs"].map(String::from).to_vec(),
            rows: connect_rows,
            note: Some(
                "HBONE mTLS reuses pooled tunnels; \"mTLS, new tunnel each\" runs mesh-node with \
                 --hbone-tunnel-reuse=false, so every connection is a new mTLS tunnel; Envoy's tcp_proxy \
                 opens a new mTLS connection per connection too."
                    .into(),
            ),
        });
    }

    let mut held: Vec<u32> =
        summary.iter().filter_map(|m| m.memory.as_ref()).flat_map(|m| m.held.iter().map(|h| h.0)).collect();
    held.sort();
    held.dedup();
    let memory_rows: Vec<Vec<String>> = summary
        .iter()
        .filter_map(|m| m.memory.as_ref().map(|mem| (m, mem)))
        .map(|(m, mem)| {
            let mut row = vec![
                m.mode.label().to_owned(),
                number(Some(mem.idle_mib), 1),
                number(Some(mem.before_hold_mib), 1),
            ];
            for n in &held {
                let h = mem.held.iter().find(|h| h.0 == *n);
                row.push(number(h.and_then(|h| h.1), 1));
                row.push(number(h.and_then(|h| h.2), 1));
            }
            row
        })
        .collect();
    if !memory_rows.is_empty() {
        let mut header = vec!["mode".to_owned(), "idle MiB".into(), "after runs MiB".into()];
        for n in &held {
            header.push(format!("{} conns MiB", thousands(u64::from(*n))));
            header.push("MiB per 1k".into());
        }
        tables.push(Table {
            title: "Proxy memory: both proxies' VmRSS together (the two mesh-nodes, or the two Envoys)"
                .into(),
            header,
            rows: memory_rows,
            note: Some("MiB per 1k: growth over \"after runs\" per 1,000 open connections.".into()),
        });
    }
    tables
}

/// Returns the rows of a fixed-rate latency table (raw or HTTP, picked by `runs`), with a
/// "CPU × mTLS" column when `vs_mtls`; `None` when no mode has such runs.
fn latency_table(
    summary: &[ModeSummary],
    runs: fn(&ModeSummary) -> &Vec<LatencySummary>,
    vs_mtls: bool,
) -> Option<Table> {
    let rows: Vec<Vec<String>> = summary
        .iter()
        .flat_map(|m| {
            runs(m).iter().map(move |l| {
                let mut row = vec![
                    m.mode.label().to_owned(),
                    l.rate.to_string(),
                    number(l.p50_us, 0),
                    number(l.p90_us, 0),
                    number(l.p99_us, 0),
                    number(l.p999_us, 0),
                    if m.mode.has_proxies() { added(l.added_p50_us) } else { "—".into() },
                    if m.mode.has_proxies() { added(l.added_p99_us) } else { "—".into() },
                    number(l.cpu_secs_per_1k, 3),
                    if m.mode.has_proxies() { signed(l.added_machine_cpu_per_1k, 3) } else { "—".into() },
                ];
                if vs_mtls {
                    row.push(ratio(l.cpu_vs_mtls));
                }
                let saturated = match l.runs_saturated {
                    0 => String::new(),
                    n => format!(", {n} saturated"),
                };
                row.push(format!("{}/{}{saturated}", l.runs_kept, l.runs_kept + l.runs_discarded));
                row
            })
        })
        .collect();
    let mut header: Vec<String> = [
        "mode",
        "req/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "added p50",
        "added p99",
        "vCPU per 1k req/s",
        "added machine vCPU",
    ]
    .map(String::from)
    .to_vec();
    if vs_mtls {
        header.push("CPU × mTLS".into());
    }
    header.push("runs kept".into());
    (!rows.is_empty()).then(|| Table { title: String::new(), header, rows, note: None })
}

/// Formats an integer with thousands separators (`10,000`).
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Returns the civil UTC date and time of a Unix timestamp: (year, month, day, h, m, s).
pub fn civil_utc(unix_secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (secs / 3600) as u32, (secs % 3600 / 60) as u32, (secs % 60) as u32)
}

/// Returns `YYYY-MM-DDTHH:MM:SSZ` for a Unix timestamp.
pub fn iso_utc(unix_secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil_utc(unix_secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Returns the Markdown of a run's results (what `docs/benchmarks.md` quotes).
pub fn markdown(results: &Results) -> String {
    let meta = &results.meta;
    let summary = summarize(results);
    let m = &meta.machine;
    let mut out = format!(
        "Measured {} on {} vCPU ({}), Linux {}, {} build, {} rounds interleaved{}.\n\n",
        meta.started,
        m.nproc,
        m.cpu_model,
        m.kernel,
        if meta.release { "release" } else { "debug" },
        meta.rounds,
        if meta.smoke { " (smoke run: not a measurement)" } else { "" }
    );
    for table in tables(meta, &summary) {
        out.push_str(&table.to_markdown());
        out.push('\n');
    }
    for note in &meta.notes {
        let _ = writeln!(out, "- {note}");
    }
    out
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(flatten)]
    results: &'a Results,
    summary: Vec<ModeSummary>,
}

/// Writes `<dir>/<timestamp>.json` and `.svg`, and `latest.json`, `latest.svg`, `latest.md`.
/// Returns the timestamped JSON's path.
pub fn write_files(dir: &Path, results: &Results) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = summarize(results);
    let json = serde_json::to_string_pretty(&Document { results, summary: summary.clone() })?;
    let svg = chart::svg(&results.meta, &summary);
    let stamp = results.meta.started.replace(':', "");
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let stamped = write(&format!("{stamp}.json"), &json)?;
    write(&format!("{stamp}.svg"), &svg)?;
    write("latest.json", &json)?;
    write("latest.svg", &svg)?;
    write("latest.md", &markdown(results))?;
    Ok(stamped)
}

#[cfg(test)]
mod tests {
    use super::{Table, added, civil_utc, iso_utc, number, ratio, tables, thousands};
    use crate::bench::results::{LatencySummary, Meta, Mode, ModeSummary, ThroughputSummary};

    #[test]
    fn numbers_ratios_and_added_latency() {
        assert_eq!(ratio(Some(0.6149)), "0.61×");
        assert_eq!(ratio(None), "—");
        assert_eq!(number(Some(12.345), 1), "12.3");
        assert_eq!(added(Some(31.4)), "+31");
        assert_eq!(added(Some(-2.2)), "-2");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(civil_utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z", "a leap day");
        assert_eq!(iso_utc(1_795_432_245), "2026-11-23T11:10:45Z");
    }

    #[test]
    fn text_tables_align_and_markdown_tables_have_a_rule() {
        let table = Table {
            title: "T".into(),
            header: vec!["mode".into(), "Gbit/s".into()],
            rows: vec![vec!["direct".into(), "12.50".into()], vec!["L4 plaintext".into(), "3.1".into()]],
            note: Some("n".into()),
        };
        assert_eq!(
            table.to_text(),
            "T\n  mode           Gbit/s\n  direct          12.50\n  L4 plaintext      3.1\n  n\n"
        );
        assert_eq!(
            table.to_markdown(),
            "**T**\n\n| mode | Gbit/s |\n| :-- | --: |\n| direct | 12.50 |\n| L4 plaintext | 3.1 |\n\nn\n"
        );
    }

    #[test]
    fn the_tables_show_ratios_and_added_latency_per_mode() {
        let summary = vec![
            ModeSummary {
                mode: Mode::Direct,
                throughput: vec![ThroughputSummary {
                    streams: 1,
                    runs: 5,
                    gbit_per_s: Some(10.0),
                    ratio: Some(1.0),
                }],
                latency: vec![LatencySummary {
                    rate: 1000,
                    runs_kept: 5,
                    runs_discarded: 0,
                    runs_saturated: 0,
                    p50_us: Some(40.0),
                    p90_us: Some(50.0),
                    p99_us: Some(70.0),
                    p999_us: Some(90.0),
                    added_p50_us: Some(0.0),
                    added_p99_us: Some(0.0),
                    cpu_secs_per_1k: None,
                    cpu_vs_mtls: None,
                    added_machine_cpu_per_1k: None,
                }],
                http_latency: Vec::new(),
                connect: None,
                memory: None,
            },
            ModeSummary {
                mode: Mode::Mtls,
                throughput: vec![ThroughputSummary {
                    streams: 1,
                    runs: 5,
                    gbit_per_s: Some(6.0),
                    ratio: Some(0.6),
                }],
                latency: vec![LatencySummary {
                    rate: 1000,
                    runs_kept: 4,
                    runs_discarded: 1,
                    runs_saturated: 0,
                    p50_us: Some(90.0),
                    p90_us: Some(100.0),
                    p99_us: Some(150.0),
                    p999_us: Some(300.0),
                    added_p50_us: Some(50.0),
                    added_p99_us: Some(80.0),
                    cpu_secs_per_1k: Some(0.0321),
                    cpu_vs_mtls: None,
                    added_machine_cpu_per_1k: Some(0.0456),
                }],
                http_latency: Vec::new(),
                connect: None,
                memory: None,
            },
        ];
        let meta = Meta { rounds: 5, request_bytes: 1024, latency_conns: 16, ..Meta::default() };
        let tables = tables(&meta, &summary);
        assert_eq!(tables.len(), 2, "no connection or memory results, no such tables");
        assert_eq!(tables[0].rows[1], ["HBONE mTLS", "6.00", "0.60×"]);
        assert_eq!(
            tables[1].rows[1],
            ["HBONE mTLS", "1000", "90", "100", "150", "300", "+50", "+80", "0.032", "+0.046", "4/5"]
        );
        assert_eq!(tables[1].rows[0][6], "—", "the baseline adds nothing to itself");
    }

    #[test]
    fn the_http_table_has_every_mode_and_cpu_against_mtls() {
        let http = |rate, cpu, vs| LatencySummary {
            rate,
            runs_kept: 5,
            runs_discarded: 0,
            runs_saturated: 0,
            p50_us: Some(200.0),
            p90_us: Some(250.0),
            p99_us: Some(400.0),
            p999_us: Some(900.0),
            added_p50_us: Some(100.0),
            added_p99_us: Some(150.0),
            cpu_secs_per_1k: cpu,
            cpu_vs_mtls: vs,
            added_machine_cpu_per_1k: None,
        };
        let mode = |mode, http_latency| ModeSummary {
            mode,
            throughput: Vec::new(),
            latency: Vec::new(),
            http_latency,
            connect: None,
            memory: None,
        };
        let summary = [
            mode(Mode::Direct, vec![http(1000, None, None)]),
            mode(Mode::Mtls, vec![http(1000, Some(0.1), Some(1.0))]),
            mode(Mode::MtlsL7TenThousand, vec![http(1000, Some(0.25), Some(2.5)), http(5000, None, None)]),
        ];
        let meta = Meta { rounds: 5, http_body_bytes: 1024, http_conns: 16, ..Meta::default() };
        let tables = tables(&meta, &summary);
        assert_eq!(tables.len(), 1, "HTTP runs only: one table");
        let table = &tables[0];
        assert!(table.title.starts_with("HTTP/1.1 latency") && table.title.contains("16 keep-alive"));
        assert_eq!(table.header[9], "added machine vCPU");
        assert_eq!(table.header[10], "CPU × mTLS");
        assert_eq!(
            table.rows[2],
            [
                "mTLS+L7 (10,000 rules)",
                "1000",
                "200",
                "250",
                "400",
                "900",
                "+100",
                "+150",
                "0.250",
                "—",
                "2.50×",
                "5/5"
            ]
        );
        assert_eq!(table.rows[3][8..], ["—", "—", "—", "5/5"], "nothing to compare");
        assert_eq!(table.rows[0][6], "—");
    }
}
