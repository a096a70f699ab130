//! What a bench run measured (every run, as recorded) and what it concludes (medians, and ratios
//! against the direct path measured in the same run). Pure: the report renders these.

use serde::{Deserialize, Serialize};

use super::{connections::ConnectReport, latency::LoadReport};

/// A way for the client pod's traffic to reach the server pod.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No mesh: the same pods and links, no mesh-node at all.
    Direct,
    /// mesh-node standalone (no control plane): capture on both nodes, plain TCP between them.
    L4,
    /// mesh-control + both mesh-nodes: HBONE (HTTP/2 CONNECT over mutual TLS 1.3), pooled tunnels.
    Mtls,
    /// The peer users would pick instead: no mesh-node; an Envoy on each node (`tcp_proxy`), the
    /// client pointed at node-a's, which tunnels over mutual TLS 1.3 to node-b's (one TLS
    /// connection per client connection), which forwards plaintext to the server pod.
    Envoy,
    /// Like [`Mode::Envoy`], with both Envoys' HTTP port behind the HTTP connection manager and
    /// its router (HTTP/1.1, parsed and routed per request on both nodes) instead of
    /// `tcp_proxy`: the Envoy peer of the L7 modes. Only the HTTP measurements use it.
    EnvoyHttp,
    /// Like [`Mode::Mtls`] with `--hbone-tunnel-reuse=false`: a new mTLS tunnel per connection.
    /// Only the connection-setup measurement uses it.
    MtlsFreshTunnels,
    /// Like [`Mode::Mtls`] with an ALLOW AuthorizationPolicy of 1 HTTP rule on the server pod:
    /// its node parses every request and checks it. Only the HTTP measurements use the L7 modes.
    #[serde(rename = "mtls-l7-1")]
    #[value(name = "mtls-l7-1")]
    MtlsL7One,
    /// The same with 100 rules, the requests allowed only by the last.
    #[serde(rename = "mtls-l7-100")]
    #[value(name = "mtls-l7-100")]
    MtlsL7Hundred,
    /// The same with 10,000 rules, the requests allowed only by the last.
    #[serde(rename = "mtls-l7-10000")]
    #[value(name = "mtls-l7-10000")]
    MtlsL7TenThousand,
}

impl Mode {
    /// The modes every measurement compares, in the order each round runs them. The first is
    /// the baseline. Envoy is the peer (its test bed is in `modes.rs`).
    pub const COMPARED: [Mode; 4] = [Mode::Direct, Mode::L4, Mode::Mtls, Mode::Envoy];

    /// The L7 modes, which only the HTTP latency measurement runs (beside [`Mode::COMPARED`]):
    /// ours with policies, and Envoy's HTTP router.
    pub const L7: [Mode; 4] =
        [Mode::MtlsL7One, Mode::MtlsL7Hundred, Mode::MtlsL7TenThousand, Mode::EnvoyHttp];

    /// Returns the short name used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::L4 => "L4 plaintext",
            Mode::Mtls => "HBONE mTLS",
            Mode::Envoy => "Envoy mTLS (tcp_proxy)",
            Mode::EnvoyHttp => "Envoy mTLS (HTTP router)",
            Mode::MtlsFreshTunnels => "mTLS, new tunnel each",
            Mode::MtlsL7One => "mTLS+L7 (1 rule)",
            Mode::MtlsL7Hundred => "mTLS+L7 (100 rules)",
            Mode::MtlsL7TenThousand => "mTLS+L7 (10,000 rules)",
        }
    }

    /// Returns a shorter name, for the chart's axes.
    pub fn short_label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::L4 => "L4",
            Mode::Mtls => "mTLS",
            Mode::Envoy => "Envoy",
            Mode::EnvoyHttp => "Envoy L7",
            Mode::MtlsFreshTunnels => "mTLS new",
            Mode::MtlsL7One => "L7 ×1",
            Mode::MtlsL7Hundred => "L7 ×100",
            Mode::MtlsL7TenThousand => "L7 ×10k",
        }
    }

    /// Returns the name of the mode's test bed (part of its network namespaces' names).
    pub fn bed_name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::L4 => "l4",
            Mode::Mtls => "mtls",
            Mode::Envoy => "envoy",
            Mode::EnvoyHttp => "envoy-http",
            Mode::MtlsFreshTunnels => "mtls-fresh",
            Mode::MtlsL7One => "mtls-l7-1",
            Mode::MtlsL7Hundred => "mtls-l7-100",
            Mode::MtlsL7TenThousand => "mtls-l7-10000",
        }
    }

    /// Returns how many HTTP rules the server pod's policy has (0: no policy, traffic stays L4).
    pub fn l7_rules(self) -> u32 {
        match self {
            Mode::MtlsL7One => 1,
            Mode::MtlsL7Hundred => 100,
            Mode::MtlsL7TenThousand => 10_000,
            Mode::Direct | Mode::L4 | Mode::Mtls | Mode::Envoy | Mode::EnvoyHttp | Mode::MtlsFreshTunnels => {
                0
            }
        }
    }

    /// Returns whether the mode's proxies are Envoys (no mesh-node).
    pub fn is_envoy(self) -> bool {
        matches!(self, Mode::Envoy | Mode::EnvoyHttp)
    }

    /// Returns whether proxies (mesh-nodes, or Envoys) are on the path (and so have CPU and
    /// memory to report).
    pub fn has_proxies(self) -> bool {
        self != Mode::Direct
    }

    /// Returns the open files the busiest process needs to hold `conns` connections, with
    /// slack: an L4 proxy holds two sockets per connection (captured and upstream on node-a,
    /// captured and delivery on node-b); over HBONE each proxy holds one per connection plus the
    /// shared tunnels (100 streams each); an Envoy holds two per connection like an L4 proxy
    /// (downstream, and its own TLS connection upstream); the client and the server one each.
    pub fn files_to_hold(self, conns: u32) -> u64 {
        let conns = u64::from(conns);
        let per_process = match self {
            Mode::L4 | Mode::Envoy | Mode::EnvoyHttp => 2 * conns,
            Mode::Direct => conns,
            Mode::Mtls
            | Mode::MtlsFreshTunnels
            | Mode::MtlsL7One
            | Mode::MtlsL7Hundred
            | Mode::MtlsL7TenThousand => conns + conns.div_ceil(100),
        };
        per_process + 1024
    }
}

/// The machine the numbers come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// The open-files limit the bench ran with (it decides whether 10,000 connections fit).
    pub fd_limit: u64,
}

/// How the run was done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started: String,
    pub smoke: bool,
    /// Rounds: each measurement ran this many times per mode, interleaved.
    pub rounds: u32,
    /// Whether the binaries were built with optimisations (`--release`).
    pub release: bool,
    pub machine: Machine,
    pub throughput_secs: f64,
    pub latency_secs: f64,
    pub latency_conns: u32,
    pub request_bytes: usize,
    pub connect_secs: f64,
    pub connect_workers: u32,
    /// HTTP latency: request (and response) body bytes and keep-alive connections.
    #[serde(default)]
    pub http_body_bytes: usize,
    #[serde(default)]
    pub http_conns: u32,
    /// Things the reader should know (limits hit, steps skipped).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThroughputRun {
    pub mode: Mode,
    pub round: u32,
    pub streams: u32,
    /// Bytes the receiver verified.
    pub bytes: u64,
    pub elapsed_us: u64,
    pub gbit_per_s: f64,
}

/// One fixed-rate run, raw or HTTP (the report says which wire: `statuses` is set for HTTP).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyRun {
    pub mode: Mode,
    pub round: u32,
    pub report: LoadReport,
    /// CPU seconds both proxies used during the run.
    pub proxy_cpu_secs: Option<f64>,
    /// Busy CPU seconds of the whole machine during the run (load generator, apps, kernel and
    /// proxies; the same for every mode but what the mesh adds).
    #[serde(default)]
    pub machine_cpu_secs: Option<f64>,
    /// Why the run is not counted (the rate was missed, it stalled, a response was not 200), if
    /// it is not.
    pub discarded: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectRun {
    pub mode: Mode,
    pub round: u32,
    pub report: ConnectReport,
    /// HBONE tunnels node-a opened during the run (from its log), for the mTLS modes.
    pub tunnels_opened: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    pub conns: u32,
    /// Both proxies' VmRSS with the connections open.
    pub rss_kib: Option<u64>,
    /// Why it was not measured, if it was not.
    pub skipped: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRun {
    pub mode: Mode,
    /// Both proxies' VmRSS right after start-up, before any traffic.
    pub idle_kib: u64,
    /// Both proxies' VmRSS after the other measurements, just before connections are held.
    pub before_hold_kib: u64,
    pub held: Vec<Held>,
}

/// Everything one bench run recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub throughput: Vec<ThroughputRun>,
    pub latency: Vec<LatencyRun>,
    /// The HTTP/1.1 workload at fixed rates, in every mode (L7 modes included).
    #[serde(default)]
    pub http_latency: Vec<LatencyRun>,
    pub connect: Vec<ConnectRun>,
    pub memory: Vec<MemoryRun>,
}

/// Returns gigabits per second for `bytes` in `elapsed_us` microseconds.
pub fn gbit_per_s(bytes: u64, elapsed_us: u64) -> f64 {
    if elapsed_us == 0 { 0.0 } else { bytes as f64 * 8.0 / (elapsed_us as f64 * 1000.0) }
}

/// Returns the median (the mean of the middle two for an even count), `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] })
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ThroughputSummary {
    pub streams: u32,
    pub runs: usize,
    pub gbit_per_s: Option<f64>,
    /// Median throughput over the direct path's median.
    pub ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub rate: u32,
    pub runs_kept: usize,
    pub runs_discarded: usize,
    /// Kept runs in which the path fell behind the rate (requests queued; see
    /// [`LoadReport::saturated`]).
    #[serde(default)]
    pub runs_saturated: usize,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// Median p50 / p99 minus the direct path's.
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    /// Both proxies' CPU seconds per 1,000 requests, which is also vCPU per 1,000 requests/s.
    pub cpu_secs_per_1k: Option<f64>,
    /// That CPU over HBONE mTLS's at the same rate in the same run (L7 policy against L4 only).
    #[serde(default)]
    pub cpu_vs_mtls: Option<f64>,
    /// The whole machine's busy CPU seconds per 1,000 requests, less the direct path's: all the
    /// mesh costs, including kernel work outside the proxies' own time.
    #[serde(default)]
    pub added_machine_cpu_per_1k: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnectSummary {
    pub runs: usize,
    pub per_second: Option<f64>,
    pub ratio: Option<f64>,
    pub setup_p50_us: Option<f64>,
    pub setup_p99_us: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemorySummary {
    pub idle_mib: f64,
    pub before_hold_mib: f64,
    /// (connections, MiB with them open, MiB per 1,000 of them over `before_hold_mib`).
    pub held: Vec<(u32, Option<f64>, Option<f64>)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModeSummary {
    pub mode: Mode,
    pub throughput: Vec<ThroughputSummary>,
    pub latency: Vec<LatencySummary>,
    /// The HTTP/1.1 workload (same shape as `latency`).
    #[serde(default)]
    pub http_latency: Vec<LatencySummary>,
    pub connect: Option<ConnectSummary>,
    pub memory: Option<MemorySummary>,
}

const KIB_PER_MIB: f64 = 1024.0;

/// Returns what the runs conclude, one entry per mode that has results, in mode order.
pub fn summarize(results: &Results) -> Vec<ModeSummary> {
    let mut modes: Vec<Mode> = results
        .throughput
        .iter()
        .map(|r| r.mode)
        .chain(results.latency.iter().map(|r| r.mode))
        .chain(results.http_latency.iter().map(|r| r.mode))
        .chain(results.connect.iter().map(|r| r.mode))
        .chain(results.memory.iter().map(|r| r.mode))
        .collect();
    modes.sort();
    modes.dedup();

    let mut streams: Vec<u32> = results.throughput.iter().map(|r| r.streams).collect();
    streams.sort();
    streams.dedup();

    let throughput_of = |mode: Mode, n: u32| -> (usize, Option<f64>) {
        let values: Vec<f64> = results
            .throughput
            .iter()
            .filter(|r| r.mode == mode && r.streams == n)
            .map(|r| r.gbit_per_s)
            .collect();
        (values.len(), median(&values))
    };
    let connect_of = |mode: Mode| -> Vec<&ConnectReport> {
        // A run in which connections failed is not a rate of working connections.
        results.connect.iter().filter(|r| r.mode == mode && r.report.failed == 0).map(|r| &r.report).collect()
    };
    let direct_connect = median(&connect_of(Mode::Direct).iter().map(|r| r.per_second).collect::<Vec<_>>());

    modes
        .into_iter()
        .map(|mode| {
            let throughput = streams
                .iter()
                .filter(|n| results.throughput.iter().any(|r| r.mode == mode && r.streams == **n))
                .map(|&n| {
                    let (runs, gbit) = throughput_of(mode, n);
                    let base = throughput_of(Mode::Direct, n).1;
                    let ratio = gbit.zip(base).filter(|(_, b)| *b > 0.0).map(|(g, b)| g / b);
                    ThroughputSummary { streams: n, runs, gbit_per_s: gbit, ratio }
                })
                .collect();
            let latency = latency_summaries(&results.latency, mode);
            let http_latency = latency_summaries(&results.http_latency, mode);
            let runs = connect_of(mode);
            let connect = (!runs.is_empty()).then(|| {
                let per_second = median(&runs.iter().map(|r| r.per_second).collect::<Vec<_>>());
                ConnectSummary {
                    runs: runs.len(),
                    per_second,
                    ratio: per_second.zip(direct_connect).filter(|(_, b)| *b > 0.0).map(|(m, b)| m / b),
                    setup_p50_us: median(&runs.iter().map(|r| r.setup_p50_us).collect::<Vec<_>>()),
                    setup_p99_us: median(&runs.iter().map(|r| r.setup_p99_us).collect::<Vec<_>>()),
                }
            });
            let memory = results.memory.iter().find(|m| m.mode == mode).map(|m| {
                let before = m.before_hold_kib as f64 / KIB_PER_MIB;
                MemorySummary {
                    idle_mib: m.idle_kib as f64 / KIB_PER_MIB,
                    before_hold_mib: before,
                    held: m
                        .held
                        .iter()
                        .map(|h| {
                            let mib = h.rss_kib.map(|k| k as f64 / KIB_PER_MIB);
                            let per_1k = mib.map(|v| (v - before) * 1000.0 / f64::from(h.conns.max(1)));
                            (h.conns, mib, per_1k)
                        })
                        .collect(),
                }
            });
            ModeSummary { mode, throughput, latency, http_latency, connect, memory }
        })
        .collect()
}

/// Returns `mode`'s summary of fixed-rate runs, one per rate it ran at: medians of the kept
/// runs, added latency against direct's medians, CPU per 1,000 requests and against HBONE
/// mTLS's, all from the same `runs`.
fn latency_summaries(runs: &[LatencyRun], mode: Mode) -> Vec<LatencySummary> {
    let mut rates: Vec<u32> = runs.iter().filter(|r| r.mode == mode).map(|r| r.report.target_rps).collect();
    rates.sort();
    rates.dedup();
    let kept = |mode: Mode, rate: u32| -> Vec<&LatencyRun> {
        runs.iter()
            .filter(|r| r.mode == mode && r.report.target_rps == rate && r.discarded.is_none())
            .collect()
    };
    let pick = |runs: &[&LatencyRun], field: fn(&LoadReport) -> f64| -> Option<f64> {
        median(&runs.iter().map(|r| field(&r.report)).collect::<Vec<_>>())
    };
    let per_1k = |runs: &[&LatencyRun], field: fn(&LatencyRun) -> Option<f64>| -> Option<f64> {
        let per_1k: Vec<f64> = runs
            .iter()
            .filter(|r| r.report.completed > 0)
            .filter_map(|r| field(r).map(|cpu| cpu * 1000.0 / r.report.completed as f64))
            .collect();
        median(&per_1k)
    };
    let cpu = |runs: &[&LatencyRun]| per_1k(runs, |r| r.proxy_cpu_secs);
    let machine = |runs: &[&LatencyRun]| per_1k(runs, |r| r.machine_cpu_secs);
    rates
        .into_iter()
        .map(|rate| {
            let mine = kept(mode, rate);
            let base = kept(Mode::Direct, rate);
            let all = runs.iter().filter(|r| r.mode == mode && r.report.target_rps == rate).count();
            let p50 = pick(&mine, |r| r.p50_us);
            let p99 = pick(&mine, |r| r.p99_us);
            let cpu_secs_per_1k = cpu(&mine);
            LatencySummary {
                rate,
                runs_kept: mine.len(),
                runs_discarded: all - mine.len(),
                runs_saturated: mine.iter().filter(|r| r.report.saturated().is_some()).count(),
                p50_us: p50,
                p90_us: pick(&mine, |r| r.p90_us),
                p99_us: p99,
                p999_us: pick(&mine, |r| r.p999_us),
                added_p50_us: p50.zip(pick(&base, |r| r.p50_us)).map(|(m, b)| m - b),
                added_p99_us: p99.zip(pick(&base, |r| r.p99_us)).map(|(m, b)| m - b),
                cpu_secs_per_1k,
                cpu_vs_mtls: cpu_secs_per_1k
                    .zip(cpu(&kept(Mode::Mtls, rate)))
                    .filter(|(_, m)| *m > 0.0)
                    .map(|(c, m)| c / m),
                added_machine_cpu_per_1k: machine(&mine).zip(machine(&base)).map(|(m, b)| m - b),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{ConnectRun, Held, LatencyRun, MemoryRun, Mode, Results, ThroughputRun, median, summarize};
    use crate::bench::{connections::ConnectReport, latency::LoadReport};

    #[test]
    fn holding_connections_needs_files_per_proxy_path() {
        assert_eq!(Mode::L4.files_to_hold(10_000), 21_024, "two sockets per connection");
        assert_eq!(Mode::Mtls.files_to_hold(10_000), 11_124, "one per connection, plus 100 tunnels");
        assert_eq!(Mode::Direct.files_to_hold(1000), 2024);
    }

    #[test]
    fn gigabits_per_second() {
        assert_eq!(super::gbit_per_s(1_250_000_000, 1_000_000), 10.0);
        assert_eq!(super::gbit_per_s(5, 0), 0.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0), "not-a-number is ignored");
    }

    fn tp(mode: Mode, streams: u32, gbit: f64) -> ThroughputRun {
        ThroughputRun { mode, round: 0, streams, bytes: 1, elapsed_us: 1, gbit_per_s: gbit }
    }

    fn lat(mode: Mode, p50: f64, p99: f64, cpu: Option<f64>, discarded: bool) -> LatencyRun {
        LatencyRun {
            machine_cpu_secs: None,
            mode,
            round: 0,
            report: LoadReport {
                target_rps: 1000,
                achieved_rps: 1000.0,
                completed: 10_000,
                p50_us: p50,
                p90_us: p50,
                p99_us: p99,
                p999_us: p99,
                ..LoadReport::default()
            },
            proxy_cpu_secs: cpu,
            discarded: discarded.then(|| "missed".to_owned()),
        }
    }

    #[test]
    fn ratios_and_added_latency_are_against_direct_in_the_same_run() {
        let results = Results {
            throughput: vec![
                tp(Mode::Direct, 1, 10.0),
                tp(Mode::Direct, 1, 12.0),
                tp(Mode::Direct, 1, 11.0),
                tp(Mode::Mtls, 1, 5.5),
                tp(Mode::Mtls, 1, 4.0),
                tp(Mode::Mtls, 1, 6.0),
            ],
            latency: vec![
                lat(Mode::Direct, 50.0, 90.0, None, false),
                lat(Mode::Direct, 52.0, 94.0, None, false),
                lat(Mode::Mtls, 100.0, 200.0, Some(0.4), false),
                lat(Mode::Mtls, 110.0, 220.0, Some(0.6), false),
                lat(Mode::Mtls, 9_000.0, 90_000.0, Some(9.0), true),
            ],
            connect: vec![
                ConnectRun {
                    mode: Mode::Direct,
                    round: 0,
                    report: ConnectReport { per_second: 4000.0, ..ConnectReport::default() },
                    tunnels_opened: None,
                },
                ConnectRun {
                    mode: Mode::Mtls,
                    round: 0,
                    report: ConnectReport { per_second: 1000.0, ..ConnectReport::default() },
                    tunnels_opened: Some(0),
                },
            ],
            memory: vec![MemoryRun {
                mode: Mode::Mtls,
                idle_kib: 8 * 1024,
                before_hold_kib: 10 * 1024,
                held: vec![Held { conns: 1000, rss_kib: Some(30 * 1024), skipped: None }],
            }],
            ..Results::default()
        };
        let summary = summarize(&results);
        assert_eq!(summary.iter().map(|s| s.mode).collect::<Vec<_>>(), [Mode::Direct, Mode::Mtls]);
        let mtls = &summary[1];
        assert_eq!(mtls.throughput[0].gbit_per_s, Some(5.5));
        assert_eq!(mtls.throughput[0].ratio, Some(0.5));
        assert_eq!(summary[0].throughput[0].ratio, Some(1.0));
        let l = &mtls.latency[0];
        assert_eq!((l.runs_kept, l.runs_discarded), (2, 1), "the run that missed its rate is not counted");
        assert_eq!(l.p50_us, Some(105.0));
        assert_eq!(l.added_p50_us, Some(54.0));
        assert_eq!(l.added_p99_us, Some(118.0));
        let cpu = l.cpu_secs_per_1k.expect("cpu");
        assert!((cpu - 0.05).abs() < 1e-12, "0.5 CPU s over 10,000 requests: {cpu}");
        assert_eq!(summary[0].latency[0].cpu_secs_per_1k, None, "no proxies on the direct path");
        assert_eq!(mtls.connect.as_ref().and_then(|c| c.ratio), Some(0.25));
        let memory = mtls.memory.as_ref().expect("memory");
        assert_eq!(memory.idle_mib, 8.0);
        assert_eq!(memory.held, [(1000, Some(30.0), Some(20.0))]);
    }

    #[test]
    fn http_runs_are_summarized_apart_and_l7_cpu_is_against_mtls_in_the_same_run() {
        let results = Results {
            latency: vec![
                lat(Mode::Direct, 10.0, 20.0, None, false),
                lat(Mode::Mtls, 900.0, 900.0, Some(9.0), false),
            ],
            http_latency: vec![
                lat(Mode::Direct, 60.0, 100.0, None, false),
                lat(Mode::Mtls, 150.0, 300.0, Some(1.0), false),
                lat(Mode::MtlsL7One, 200.0, 400.0, Some(1.5), false),
                lat(Mode::MtlsL7TenThousand, 5_000.0, 9_000.0, Some(20.0), true),
            ],
            ..Results::default()
        };
        let summary = summarize(&results);
        let of = |mode: Mode| summary.iter().find(|s| s.mode == mode).expect("mode");
        assert_eq!(of(Mode::Mtls).latency[0].p50_us, Some(900.0), "raw runs stay raw");
        let mtls = &of(Mode::Mtls).http_latency[0];
        assert_eq!((mtls.p50_us, mtls.added_p50_us), (Some(150.0), Some(90.0)), "against direct's HTTP runs");
        assert_eq!(mtls.cpu_vs_mtls, Some(1.0));
        let l7 = &of(Mode::MtlsL7One).http_latency[0];
        assert_eq!(l7.added_p99_us, Some(300.0));
        assert!((l7.cpu_vs_mtls.expect("ratio") - 1.5).abs() < 1e-12);
        assert!(of(Mode::MtlsL7One).latency.is_empty(), "L7 modes run HTTP only");
        let overloaded = &of(Mode::MtlsL7TenThousand).http_latency[0];
        assert_eq!((overloaded.runs_kept, overloaded.p50_us, overloaded.cpu_vs_mtls), (0, None, None));
        assert_eq!(of(Mode::Direct).http_latency[0].cpu_vs_mtls, None);
    }

    #[test]
    fn runs_saved_before_the_http_measurement_still_load() {
        let old = r#"{"meta":{"started":"2026-11-23T11:11:32Z","smoke":false,"rounds":1,"release":true,
            "machine":{"nproc":2,"kernel":"6","cpu_model":"x","fd_limit":1},"throughput_secs":5.0,
            "latency_secs":10.0,"latency_conns":16,"request_bytes":1024,"connect_secs":3.0,
            "connect_workers":8,"notes":[]},"throughput":[],"latency":[],"connect":[],"memory":[]}"#;
        let results: Results = serde_json::from_str(old).expect("an old run parses");
        assert!(results.http_latency.is_empty());
        let modes: Vec<String> = Mode::L7.iter().map(|m| serde_json::to_string(m).unwrap()).collect();
        assert_eq!(modes, ["\"mtls-l7-1\"", "\"mtls-l7-100\"", "\"mtls-l7-10000\"", "\"envoy-http\""]);
    }
}
