//! Checking the mesh's telemetry from outside, as an operator's tools would: admin requests of
//! any method (`POST /logging`), a strict OpenMetrics parser over a `/metrics` exposition
//! (Python `prometheus_client`'s, from Debian's `python3-prometheus-client`), the metric names a
//! Grafana dashboard's PromQL refers to, and the JSON log lines of a component.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::{NodeId, Topology, netns};

/// Debian's Python, which `python3-prometheus-client` installs into (not a pyenv `python3`).
pub const PYTHON: &str = "/usr/bin/python3";

/// Parses stdin with the OpenMetrics parser and prints each family's name, type and sample
/// names as JSON; any violation of the format is an exception (exit 1, the message on stderr).
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
try:
    families = [
        {"name": f.name, "type": f.type, "samples": sorted({s.name for s in f.samples})}
        for f in text_string_to_metric_families(sys.stdin.read())
    ]
except Exception as err:
    sys.stderr.write("invalid OpenMetrics exposition: %s\n" % err)
    sys.exit(1)
print(json.dumps(families))
"#;

/// One metric family as the parser read it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Family {
    pub name: String,
    /// `counter`, `gauge`, `histogram`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The sample names present (e.g. `x_total`, `x_bucket`).
    pub samples: Vec<String>,
}

/// Parses `text` as OpenMetrics text exposition with a strict, independent parser; returns its
/// families by name, or the parser's complaint.
pub fn parse_openmetrics(text: &str) -> anyhow::Result<BTreeMap<String, Family>> {
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {PYTHON} (install python3-prometheus-client)"))?;
    let mut stdin = child.stdin.take().context("python stdin")?;
    stdin.write_all(text.as_bytes()).context("handing the exposition to the parser")?;
    drop(stdin);
    let output = child.wait_with_output().context("running the OpenMetrics parser")?;
    anyhow::ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr).trim());
    let families: Vec<Family> = serde_json::from_slice(&output.stdout).context("parser output")?;
    Ok(families.into_iter().map(|f| (f.name.clone(), f)).collect())
}

/// Returns whether `name` (as PromQL refers to it) is exported by one of `families`: a sample
/// name present now, or a name the family's type gives its samples (a labelled family may not
/// have a sample yet).
pub fn exports(families: &BTreeMap<String, Family>, name: &str) -> bool {
    families.values().any(|f| {
        f.samples.iter().any(|s| s == name) || {
            let suffixes: &[&str] = match f.kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gauge" | "unknown" => &[""],
                _ => &[],
            };
            suffixes.iter().any(|suffix| format!("{}{suffix}", f.name) == name)
        }
    })
}

/// Returns the metric names (`nodemesh_…`, `istio_…`) a PromQL expression refers to. Quoted
/// strings (label values) are skipped.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => {
                quote = Some(c);
                unquoted.push(' ');
            }
            None => unquoted.push(c),
        }
    }
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    unquoted
        .split(|c: char| !is_name(c))
        .filter(|word| word.starts_with("nodemesh_") || word.starts_with("istio_"))
        .map(str::to_owned)
        .collect()
}

/// Returns every PromQL expression (`targets[].expr`) of a Grafana dashboard, with its panel's
/// title.
pub fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(targets) = map.get("targets").and_then(|t| t.as_array()) {
                    let title = map.get("title").and_then(|t| t.as_str()).unwrap_or("?").to_owned();
                    for expr in targets.iter().filter_map(|t| t["expr"].as_str()) {
                        found.push((title.clone(), expr.to_owned()));
                    }
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

/// `METHOD path` on a node's admin endpoint (`127.0.0.1:15000` in its netns).
pub fn node_admin(
    topology: &Topology,
    node: NodeId,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    netns::http_request(&topology.node_netns(node), SocketAddr::from(([127, 0, 0, 1], 15000)), method, path)
}

/// `METHOD path` on mesh-control's admin endpoint (`127.0.0.1:15014` in node-a's netns).
pub fn control_admin(topology: &Topology, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    netns::http_request(
        &topology.node_netns(NodeId::A),
        SocketAddr::from(([127, 0, 0, 1], 15014)),
        method,
        path,
    )
}

/// Returns the JSON objects among a log's lines (a component run with `--log-format json`).
pub fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_names_skip_functions_labels_and_strings() {
        let names = promql_metric_names(
            r#"sum by (destination_workload) (rate(istio_requests_total{reporter="destination",response_code=~"5.."}[5m])) / ignoring(x) nodemesh_ebpf_map_max_entries{map="nodemesh_x"} + histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket[1m])) by (le))"#,
        );
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "istio_request_duration_milliseconds_bucket",
                "istio_requests_total",
                "nodemesh_ebpf_map_max_entries"
            ]
        );
    }

    #[test]
    fn exported_names_follow_the_family_type() {
        let families: BTreeMap<String, Family> = [
            Family { name: "a".into(), kind: "counter".into(), samples: vec![] },
            Family { name: "h".into(), kind: "histogram".into(), samples: vec!["h_bucket".into()] },
            Family { name: "g".into(), kind: "gauge".into(), samples: vec![] },
        ]
        .into_iter()
        .map(|f| (f.name.clone(), f))
        .collect();
        assert!(exports(&families, "a_total"));
        assert!(!exports(&families, "a"));
        assert!(exports(&families, "h_count"));
        assert!(exports(&families, "g"));
        assert!(!exports(&families, "g_total"));
        assert!(!exports(&families, "missing_total"));
    }
}
