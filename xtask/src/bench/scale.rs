//! The control plane at scale (`cargo xtask bench --scale`): mesh-control (the real binary, in
//! local mode) serves a generated cluster ([`cluster`]) of 1,000 and 10,000 workloads and 1,000
//! services to 100 simulated node clients ([`client`]: light delta-xDS clients that ACK every
//! response); changes are made one at a time, and each is timed from the moment its file is
//! renamed into place to the moment the last node received it. mesh-control's memory is read
//! from `/proc`. This file holds the plan, the results, their summary and tables (pure); the
//! runner is [`run`].

pub mod cluster;

#[cfg(feature = "bench")]
pub mod client;
#[cfg(feature = "bench")]
pub mod run;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use self::cluster::ChangeKind;
use super::{
    report::{Table, number, thousands},
    results::Machine,
};

/// The goal: p99 from a change to all nodes applying it, at 10,000 workloads.
pub const GOAL_P99_MS: f64 = 100.0;

/// One cluster size to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub workloads: u32,
    pub services: u32,
}

/// What a scale run does.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub sizes: Vec<Size>,
    /// Simulated node clients (the pods are spread over as many nodes).
    pub nodes: u32,
    /// Changes per size, made one at a time.
    pub changes: u32,
    /// Quiet time between one change converging and the next being made (plus a jitter of up
    /// to the same again, so changes do not fall into step with mesh-control's polling).
    pub gap: Duration,
    pub sync_timeout: Duration,
    pub change_timeout: Duration,
}

impl Plan {
    /// The sizes (1k and 10k workloads, 1k services, 100 nodes, 200 changes), or for a
    /// smoke run a few seconds' worth (100 workloads, 5 nodes, 10 changes).
    pub fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                sizes: vec![Size { workloads: 100, services: 10 }],
                nodes: 5,
                changes: 10,
                gap: Duration::from_millis(100),
                sync_timeout: Duration::from_secs(60),
                change_timeout: Duration::from_secs(20),
            }
        } else {
            Plan {
                sizes: vec![
                    Size { workloads: 1000, services: 1000 },
                    Size { workloads: 10_000, services: 1000 },
                ],
                nodes: 100,
                changes: 200,
                gap: Duration::from_millis(150),
                sync_timeout: Duration::from_secs(300),
                change_timeout: Duration::from_secs(30),
            }
        }
    }

    /// Returns the wait before change `i`: the gap plus a deterministic jitter in `[0, gap)`.
    pub fn gap_before(&self, i: u32) -> Duration {
        let jitter = (u64::from(i).wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0;
        self.gap + self.gap.mul_f64(jitter)
    }
}

/// How a scale run was done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleMeta {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started: String,
    pub smoke: bool,
    /// Whether mesh-control was built with optimisations.
    pub release: bool,
    pub machine: Machine,
    pub nodes: u32,
    pub changes: u32,
    /// mesh-control's `--reload-interval-ms` (how often it polls the files; inotify wakes it
    /// at once on a change).
    pub reload_interval_ms: u64,
    /// Things the reader should know.
    pub notes: Vec<String>,
}

/// One change, timed from the rename of its file (µs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeRun {
    pub kind: ChangeKind,
    /// Until mesh-control logged the new configuration (read, translated, snapshot built).
    pub noticed_us: Option<u64>,
    /// Until the first node received it.
    pub first_us: u64,
    /// Until the last node received it.
    pub converged_us: u64,
}

/// mesh-control's memory (`/proc/<pid>/status`, KiB) and CPU time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlUsage {
    /// VmRSS once it serves, before any node connected.
    pub started_kib: u64,
    /// VmRSS once every node holds the full state.
    pub synced_kib: u64,
    /// VmRSS after the changes, with every node connected and idle.
    pub steady_kib: u64,
    /// VmHWM: the peak resident size over the whole run.
    pub peak_kib: u64,
    /// CPU seconds (user + system) over the initial sync.
    pub sync_cpu_secs: f64,
    /// CPU seconds over all the changes (gaps included).
    pub changes_cpu_secs: f64,
}

/// One cluster size, measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SizeRun {
    pub size: Size,
    pub nodes: u32,
    /// Address resources (workloads + services) a node holds when in sync.
    pub addresses: usize,
    /// From the clients starting to connect until the last one held the full state (µs).
    pub initial_sync_us: u64,
    pub changes: Vec<ChangeRun>,
    pub usage: ControlUsage,
}

/// Everything a scale run recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleResults {
    pub meta: ScaleMeta,
    pub runs: Vec<SizeRun>,
}

/// Returns the nearest-rank percentile `p` (0–100) of `values`, `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// p50, p99 and max of a series, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Spread {
    fn of_us(values: impl Iterator<Item = u64>) -> Spread {
        let ms: Vec<f64> = values.map(|us| us as f64 / 1000.0).collect();
        Spread {
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: percentile(&ms, 100.0),
        }
    }
}

/// What one size concludes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizeSummary {
    pub size: Size,
    pub nodes: u32,
    pub changes: usize,
    pub initial_sync_ms: f64,
    /// Rename → the last node received it.
    pub converged: Spread,
    /// Rename → the first node received it.
    pub first: Spread,
    /// Rename → mesh-control logged the new configuration.
    pub noticed: Spread,
    /// mesh-control's log → the last node received it.
    pub distributed: Spread,
    pub started_mib: f64,
    pub synced_mib: f64,
    pub steady_mib: f64,
    pub peak_mib: f64,
    pub cpu_ms_per_change: Option<f64>,
}

const KIB_PER_MIB: f64 = 1024.0;

/// Returns what each size's runs conclude.
pub fn summarize(results: &ScaleResults) -> Vec<SizeSummary> {
    results
        .runs
        .iter()
        .map(|run| {
            let c = &run.changes;
            let u = &run.usage;
            SizeSummary {
                size: run.size,
                nodes: run.nodes,
                changes: c.len(),
                initial_sync_ms: run.initial_sync_us as f64 / 1000.0,
                converged: Spread::of_us(c.iter().map(|c| c.converged_us)),
                first: Spread::of_us(c.iter().map(|c| c.first_us)),
                noticed: Spread::of_us(c.iter().filter_map(|c| c.noticed_us)),
                distributed: Spread::of_us(
                    c.iter().filter_map(|c| c.noticed_us.map(|n| c.converged_us.saturating_sub(n))),
                ),
                started_mib: u.started_kib as f64 / KIB_PER_MIB,
                synced_mib: u.synced_kib as f64 / KIB_PER_MIB,
                steady_mib: u.steady_kib as f64 / KIB_PER_MIB,
                peak_mib: u.peak_kib as f64 / KIB_PER_MIB,
                cpu_ms_per_change: (!c.is_empty()).then(|| u.changes_cpu_secs * 1000.0 / c.len() as f64),
            }
        })
        .collect()
}

/// Returns the tables of a scale run.
pub fn tables(meta: &ScaleMeta, summary: &[SizeSummary]) -> Vec<Table> {
    let ms = |v: Option<f64>| number(v, 1);
    let convergence = summary
        .iter()
        .map(|s| {
            vec![
                thousands(s.size.workloads.into()),
                thousands(s.size.services.into()),
                s.nodes.to_string(),
                number(Some(s.initial_sync_ms / 1000.0), 2),
                ms(s.converged.p50_ms),
                ms(s.converged.p99_ms),
                ms(s.converged.max_ms),
                ms(s.noticed.p50_ms),
                ms(s.noticed.p99_ms),
                ms(s.distributed.p50_ms),
                ms(s.distributed.p99_ms),
                ms(s.first.p50_ms),
            ]
        })
        .collect();
    let memory = summary
        .iter()
        .map(|s| {
            vec![
                thousands(s.size.workloads.into()),
                thousands(s.size.services.into()),
                number(Some(s.started_mib), 1),
                number(Some(s.synced_mib), 1),
                number(Some(s.steady_mib), 1),
                number(Some(s.peak_mib), 1),
                number(s.cpu_ms_per_change, 1),
            ]
        })
        .collect();
    vec![
        Table {
            title: format!(
                "Convergence: a manifest file renamed into place → the last of {} node clients received the change \
                 (ms, {} changes one at a time; initial sync in s)",
                meta.nodes, meta.changes
            ),
            header: [
                "workloads",
                "services",
                "nodes",
                "initial sync s",
                "p50",
                "p99",
                "max",
                "noticed p50",
                "noticed p99",
                "pushed p50",
                "pushed p99",
                "first node p50",
            ]
            .map(String::from)
            .to_vec(),
            rows: convergence,
            note: Some(format!(
                "Changes in turn: add a pod, change a service's port, delete the pod. \"noticed\": rename → mesh-control \
                 logged the new configuration (woken by inotify, or its poll every {} ms, it reads every file, translates \
                 and builds the snapshot); \"pushed\": that log line → the last node received it. Goal: p99 ≤ {GOAL_P99_MS:.0} ms at \
                 10,000 workloads.",
                meta.reload_interval_ms
            )),
        },
        Table {
            title: "mesh-control memory (VmRSS, MiB) and CPU".into(),
            header: ["workloads", "services", "started", "synced", "steady", "peak (VmHWM)", "CPU ms per change"]
                .map(String::from)
                .to_vec(),
            rows: memory,
            note: Some(
                "started: serving, no node connected; synced: every node holds the full state; steady: after the \
                 changes, nodes connected and idle. CPU per change includes the gaps between changes."
                    .into(),
            ),
        },
    ]
}

/// Returns the Markdown of a scale run.
pub fn markdown(results: &ScaleResults) -> String {
    let meta = &results.meta;
    let m = &meta.machine;
    let mut out = format!(
        "Measured {} on {} vCPU ({}), Linux {}, mesh-control {} build, {} simulated nodes{}.\n\n",
        meta.started,
        m.nproc,
        m.cpu_model,
        m.kernel,
        if meta.release { "release" } else { "debug" },
        meta.nodes,
        if meta.smoke { " (smoke run: not a measurement)" } else { "" }
    );
    for table in tables(meta, &summarize(results)) {
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
    results: &'a ScaleResults,
    summary: Vec<SizeSummary>,
}

/// Writes `<dir>/scale-<timestamp>.json`, `scale-latest.json` and `scale-latest.md`; returns the
/// timestamped JSON's path.
pub fn write_files(dir: &Path, results: &ScaleResults) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(&Document { results, summary: summarize(results) })?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let stamped = write(&format!("scale-{}.json", results.meta.started.replace(':', "")), &json)?;
    write("scale-latest.json", &json)?;
    write("scale-latest.md", &markdown(results))?;
    Ok(stamped)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{
        ChangeKind, ChangeRun, ControlUsage, Plan, ScaleMeta, ScaleResults, Size, SizeRun, percentile,
        summarize, tables,
    };

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(100.0));
        assert_eq!(percentile(&values, 99.0), Some(198.0));
        assert_eq!(percentile(&values, 100.0), Some(200.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0, f64::NAN, 1.0], 100.0), Some(3.0), "not-a-number is ignored");
    }

    #[test]
    fn gaps_are_jittered_within_one_gap() {
        let plan = Plan::new(false);
        let gaps: Vec<Duration> = (0..50).map(|i| plan.gap_before(i)).collect();
        assert!(gaps.iter().all(|g| *g >= plan.gap && *g < plan.gap * 2));
        assert!(gaps.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(plan.gap_before(7), plan.gap_before(7), "deterministic");
    }

    #[test]
    fn the_summary_splits_convergence_into_noticing_and_pushing() {
        let change = |noticed: Option<u64>, converged: u64| ChangeRun {
            kind: ChangeKind::AddPod,
            noticed_us: noticed,
            first_us: converged / 2,
            converged_us: converged,
        };
        let results = ScaleResults {
            meta: ScaleMeta { nodes: 100, changes: 3, reload_interval_ms: 1000, ..ScaleMeta::default() },
            runs: vec![SizeRun {
                size: Size { workloads: 10_000, services: 1000 },
                nodes: 100,
                addresses: 11_000,
                initial_sync_us: 2_500_000,
                changes: vec![
                    change(Some(40_000), 50_000),
                    change(Some(10_000), 30_000),
                    change(None, 90_000),
                ],
                usage: ControlUsage {
                    synced_kib: 102_400,
                    peak_kib: 204_800,
                    changes_cpu_secs: 0.3,
                    ..ControlUsage::default()
                },
            }],
        };
        let summary = summarize(&results);
        let s = &summary[0];
        assert_eq!((s.converged.p50_ms, s.converged.max_ms), (Some(50.0), Some(90.0)));
        assert_eq!(s.noticed.max_ms, Some(40.0), "a change without its log line is left out");
        assert_eq!(s.distributed.p50_ms, Some(10.0));
        assert_eq!((s.synced_mib, s.peak_mib), (100.0, 200.0));
        assert_eq!(s.cpu_ms_per_change, Some(100.0));
        let tables = tables(&results.meta, &summary);
        assert_eq!(
            tables[0].rows[0],
            [
                "10,000", "1,000", "100", "2.50", "50.0", "90.0", "90.0", "10.0", "40.0", "10.0", "20.0",
                "25.0"
            ]
        );
        assert_eq!(tables[1].rows[0], ["10,000", "1,000", "0.0", "100.0", "0.0", "200.0", "100.0"]);
    }
}
