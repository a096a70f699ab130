//! `meshctl proxy-config <what> [--node N]`: a node's own view of the mesh, read from its admin
//! endpoint (`/config`, `/traffic`, `/certs`, `/connections`); without `--node`, every node of
//! the context, with a NODE column.
//!
//! `-o json`: `{"<what>": [ {"node": <name>, ...}, ... ], "unreachable": [ {"node", "error"} ]}`
//! with, per item:
//! - workloads: `pod`, `ip`, `pod_node` (where it runs), `service_account`, `policies`
//!   (the policies selecting it);
//! - services: `service` (`namespace/name`), `hostname`, `vips`, `ports`
//!   (`port`, `target_port`, `protocol`), `endpoints` (`port`, `workload`, `addr`, `identity`,
//!   `ejected_for_ms`);
//! - policies: `policy`, `scope`, `action`, `http_rules`, `workloads` (those it selects);
//! - routes: `route`;
//! - certs: the node's `/certs` entries as they are (`identity`, `pods`, `serial`, `not_before`,
//!   `not_after`, `signed_by`, `trust_roots`, `last_error`);
//! - connections: the node's `/connections` entries as they are (`id`, `direction`, `pod`,
//!   `source`, `destination`, `source_identity`, `destination_identity`, `service`,
//!   `transport`, `protocol`, `policy`, `opened_at`, `duration_ms`, `bytes_sent`,
//!   `bytes_received`).
//!
//! A node that does not answer: with `--node`, an error (exit 2); otherwise listed under
//! `unreachable` and the outcome is Failed (exit 1).

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde_json::{Value, json};

use crate::{
    Outcome,
    client::get_json,
    context::{Context, Node},
    output::{Format, Table, cell},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to show.
    #[arg(value_enum)]
    what: What,
    /// The node whose view to show (default: every node in the context).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Meshed workloads the node knows (every node's), with their IPs and policies.
    Workloads,
    /// Services: cluster IPs, ports and endpoints (with their health).
    Services,
    /// Authorization policies in force and the workloads they select.
    Policies,
    /// HTTP routes in force.
    Routes,
    /// The node's workload certificates.
    Certs,
    /// Connections open through the node's proxy now.
    Connections,
}

impl What {
    fn key(self) -> &'static str {
        match self {
            What::Workloads => "workloads",
            What::Services => "services",
            What::Policies => "policies",
            What::Routes => "routes",
            What::Certs => "certs",
            What::Connections => "connections",
        }
    }
}

pub fn run(context: &Context, args: Args, format: Format) -> anyhow::Result<Outcome> {
    let nodes: Vec<&Node> = match &args.node {
        Some(name) => vec![context.node(name)?],
        None => context.nodes.iter().collect(),
    };
    let what = args.what;
    let fetched: Vec<(String, anyhow::Result<Vec<Value>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            nodes.iter().map(|node| (node.name.clone(), scope.spawn(move || items(node, what)))).collect();
        handles
            .into_iter()
            .map(|(name, handle)| {
                let items =
                    handle.join().unwrap_or_else(|_| Err(anyhow::anyhow!("meshctl's fetch panicked")));
                (name, items)
            })
            .collect()
    });
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for (name, result) in fetched {
        match result {
            Ok(items) => all.extend(items.into_iter().map(|mut item| {
                // The node first, then the item's own keys.
                let mut with_node = serde_json::Map::new();
                with_node.insert("node".into(), Value::from(name.as_str()));
                if let Value::Object(fields) = &mut item {
                    with_node.append(fields);
                }
                Value::Object(with_node)
            })),
            Err(err) if args.node.is_some() => return Err(err.context(format!("node {name}"))),
            Err(err) => unreachable.push(json!({"node": name, "error": crate::one_line(&err)})),
        }
    }
    let report = json!({ what.key(): all, "unreachable": unreachable });
    let with_node_column = args.node.is_none();
    crate::output::emit(format, &report, |report| render(what, report, with_node_column))?;
    Ok(if unreachable.is_empty() { Outcome::Passed } else { Outcome::Failed })
}

/// Fetches and normalises one node's items.
fn items(node: &Node, what: What) -> anyhow::Result<Vec<Value>> {
    let endpoint = node.endpoint();
    match what {
        What::Workloads => {
            let config = get_json(&endpoint, "/config")?;
            let traffic = get_json(&endpoint, "/traffic")?;
            Ok(workloads(&config, &traffic))
        }
        What::Services => Ok(services(&get_json(&endpoint, "/traffic")?)),
        What::Policies => Ok(policies(&get_json(&endpoint, "/traffic")?)),
        What::Routes => Ok(routes(&get_json(&endpoint, "/traffic")?)),
        What::Certs => Ok(list(&get_json(&endpoint, "/certs")?["certificates"])),
        What::Connections => Ok(list(&get_json(&endpoint, "/connections")?["connections"])),
    }
}

fn list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

/// The meshed workloads of `/config`, with the policies `/traffic` says select each.
fn workloads(config: &Value, traffic: &Value) -> Vec<Value> {
    let policies: BTreeMap<&str, &Value> = traffic["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| Some((w["workload"].as_str()?, &w["policies"])))
        .collect();
    config["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let pod = w["pod"].as_str().unwrap_or_default();
            json!({
                "pod": pod, "ip": w["ip"], "pod_node": w["node"], "service_account": w["service_account"],
                "policies": policies.get(pod).copied().cloned().unwrap_or_else(|| json!([])),
            })
        })
        .collect()
}

fn services(traffic: &Value) -> Vec<Value> {
    traffic["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            let s = &entry["service"];
            let health: BTreeMap<String, &Value> = entry["health"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| Some((h["endpoint"].as_str()?.to_owned(), h)))
                .collect();
            let mut endpoints = Vec::new();
            for (port, list) in s["endpoints"].as_object().into_iter().flatten() {
                for e in list.as_array().into_iter().flatten() {
                    let addr = e["addr"].as_str().unwrap_or_default();
                    let ejected = health.get(addr).map_or(Value::Null, |h| h["ejected_for_ms"].clone());
                    endpoints.push(json!({
                        "port": port.parse::<u16>().map_or_else(|_| Value::from(port.as_str()), Value::from),
                        "workload": e["workload"], "addr": addr, "identity": e["identity"], "ejected_for_ms": ejected,
                    }));
                }
            }
            let ports: Vec<Value> = list(&s["ports"])
                .iter()
                .map(|p| json!({"port": p["port"], "target_port": p["target_port"], "protocol": p["protocol"]}))
                .collect();
            json!({
                "service": format!("{}/{}", s["namespace"].as_str().unwrap_or("?"), s["name"].as_str().unwrap_or("?")),
                "hostname": s["key"], "vips": s["vips"], "ports": ports, "endpoints": endpoints,
            })
        })
        .collect()
}

fn policies(traffic: &Value) -> Vec<Value> {
    let mut selected: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in traffic["workloads"].as_array().into_iter().flatten() {
        for p in w["policies"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            selected.entry(p).or_default().push(w["workload"].as_str().unwrap_or("?"));
        }
    }
    let mut items: Vec<Value> = traffic["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let name = p["policy"].as_str().unwrap_or_default();
            json!({
                "policy": name, "scope": p["scope"], "action": p["action"], "http_rules": p["http_rules"],
                "workloads": selected.get(name).cloned().unwrap_or_default(),
            })
        })
        .collect();
    items.sort_by(|a, b| a["policy"].as_str().cmp(&b["policy"].as_str()));
    items
}

fn routes(traffic: &Value) -> Vec<Value> {
    traffic["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| match r {
            Value::String(name) => json!({"route": name}),
            // A richer entry: kept, under a stable `route` name.
            Value::Object(fields) => {
                let mut item = fields.clone();
                let name = ["route", "key", "name"]
                    .iter()
                    .find_map(|k| fields.get(*k).cloned())
                    .unwrap_or(Value::Null);
                item.insert("route".into(), name);
                Value::Object(item)
            }
            other => json!({"route": other}),
        })
        .collect()
}

/// Column header and how to read it from an item.
type Column = (&'static str, fn(&Value) -> String);

fn columns(what: What) -> Vec<Column> {
    match what {
        What::Workloads => vec![
            ("pod", |i| cell(&i["pod"])),
            ("ip", |i| cell(&i["ip"])),
            ("pod node", |i| cell(&i["pod_node"])),
            ("service account", |i| cell(&i["service_account"])),
            ("policies", |i| cell(&i["policies"])),
        ],
        What::Services => vec![
            ("service", |i| cell(&i["service"])),
            ("vips", |i| cell(&i["vips"])),
            ("ports", |i| {
                let ports: Vec<String> = list(&i["ports"])
                    .iter()
                    .map(|p| {
                        format!("{}→{}/{}", cell(&p["port"]), cell(&p["target_port"]), cell(&p["protocol"]))
                    })
                    .collect();
                ports.join(",")
            }),
            ("endpoints", |i| {
                let endpoints: Vec<String> = list(&i["endpoints"])
                    .iter()
                    .map(|e| {
                        let ejected = if e["ejected_for_ms"].is_number() { " EJECTED" } else { "" };
                        format!("{} ({}){ejected}", cell(&e["addr"]), cell(&e["workload"]))
                    })
                    .collect();
                if endpoints.is_empty() { "-".into() } else { endpoints.join(", ") }
            }),
        ],
        What::Policies => vec![
            ("policy", |i| cell(&i["policy"])),
            ("action", |i| cell(&i["action"])),
            ("scope", |i| cell(&i["scope"])),
            ("http rules", |i| if i["http_rules"] == true { "yes".into() } else { "no".into() }),
            ("workloads", |i| cell(&i["workloads"])),
        ],
        What::Routes => vec![("route", |i| cell(&i["route"]))],
        What::Certs => vec![
            ("identity", |i| cell(&i["identity"])),
            ("pods", |i| cell(&i["pods"])),
            ("serial", |i| cell(&i["serial"])),
            ("not after", |i| cell(&i["not_after"])),
            ("last error", |i| cell(&i["last_error"])),
        ],
        What::Connections => vec![
            ("id", |i| cell(&i["id"])),
            ("direction", |i| cell(&i["direction"])),
            ("pod", |i| cell(&i["pod"])),
            ("source", |i| cell(&i["source"])),
            ("destination", |i| cell(&i["destination"])),
            ("source identity", |i| cell(&i["source_identity"])),
            ("destination identity", |i| cell(&i["destination_identity"])),
            ("service", |i| cell(&i["service"])),
            ("transport", |i| cell(&i["transport"])),
            ("protocol", |i| cell(&i["protocol"])),
            ("policy", |i| cell(&i["policy"])),
            ("opened at", |i| cell(&i["opened_at"])),
            ("duration ms", |i| cell(&i["duration_ms"])),
            ("bytes sent", |i| cell(&i["bytes_sent"])),
            ("bytes received", |i| cell(&i["bytes_received"])),
        ],
    }
}

fn render(what: What, report: &Value, with_node_column: bool) -> String {
    let columns = columns(what);
    let mut header: Vec<&str> = Vec::new();
    if with_node_column {
        header.push("node");
    }
    header.extend(columns.iter().map(|(name, _)| *name));
    let mut table = Table::new(&header);
    for item in report[what.key()].as_array().into_iter().flatten() {
        let mut row = Vec::new();
        if with_node_column {
            row.push(cell(&item["node"]));
        }
        row.extend(columns.iter().map(|(_, read)| read(item)));
        table.row(row);
    }
    let mut out = table.render();
    for u in report["unreachable"].as_array().into_iter().flatten() {
        out.push_str(&format!("node {} unreachable: {}\n", cell(&u["node"]), cell(&u["error"])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic() -> Value {
        json!({
            "services": [{"service": {"key": "demo/web.demo.svc.cluster.local", "namespace": "demo", "name": "web",
                "vips": ["10.96.0.10"], "ports": [{"port": 80, "target_port": 8080, "protocol": "Http1"}],
                "endpoints": {"80": [
                    {"workload": "demo/b1", "addr": "10.1.2.2:8080", "identity": "spiffe://cluster.local/ns/demo/sa/b1"},
                    {"workload": "demo/b2", "addr": "10.1.2.3:8080", "identity": "spiffe://cluster.local/ns/demo/sa/b2"}]}},
                "health": [{"endpoint": "10.1.2.3:8080", "in_flight": 0, "consecutive_errors": 5,
                            "times_ejected": 1, "ejected_for_ms": 2900}]}],
            "policies": [{"policy": "demo/z-deny", "scope": "Namespace", "action": "Deny", "http_rules": false},
                         {"policy": "demo/allow-get", "scope": "WorkloadSelector", "action": "Allow", "http_rules": true}],
            "routes": ["demo/web-route", {"key": "demo/other", "hostnames": []}],
            "workloads": [{"workload": "demo/a1", "ip": "10.1.1.2", "policies": ["demo/z-deny"]},
                          {"workload": "demo/b1", "ip": "10.1.2.2", "policies": ["demo/allow-get", "demo/z-deny"]}],
        })
    }

    #[test]
    fn the_node_view_reads_into_stable_items() {
        let config = json!({"workloads": [
            {"pod": "demo/a1", "node": "node-a", "ip": "10.1.1.2", "service_account": "a1"},
            {"pod": "demo/b1", "node": "node-b", "ip": "10.1.2.2", "service_account": "b1"}]});
        let workloads = workloads(&config, &traffic());
        assert_eq!(
            workloads[1],
            json!({"pod": "demo/b1", "ip": "10.1.2.2", "pod_node": "node-b", "service_account": "b1",
                   "policies": ["demo/allow-get", "demo/z-deny"]})
        );
        let services = services(&traffic());
        assert_eq!(services[0]["service"], "demo/web");
        assert_eq!(services[0]["ports"], json!([{"port": 80, "target_port": 8080, "protocol": "Http1"}]));
        let endpoints = services[0]["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(
            (endpoints[0]["port"].clone(), endpoints[0]["ejected_for_ms"].clone()),
            (json!(80), Value::Null)
        );
        assert_eq!(endpoints[1]["ejected_for_ms"], 2900);
        let policies = policies(&traffic());
        assert_eq!(policies[0]["policy"], "demo/allow-get", "sorted by name");
        assert_eq!(policies[0]["workloads"], json!(["demo/b1"]));
        assert_eq!(policies[1]["workloads"], json!(["demo/a1", "demo/b1"]));
        let routes = routes(&traffic());
        assert_eq!(routes[0], json!({"route": "demo/web-route"}));
        assert_eq!(routes[1]["route"], "demo/other");
    }

    #[test]
    fn tables_have_a_node_column_only_for_every_node() {
        let report = json!({"services": [{"node": "node-a", "service": "demo/web", "vips": ["10.96.0.10"],
            "ports": [{"port": 80, "target_port": 8080, "protocol": "Http1"}],
            "endpoints": [{"addr": "10.1.2.2:8080", "workload": "demo/b1", "ejected_for_ms": null}]}],
            "unreachable": [{"node": "node-b", "error": "connection refused"}]});
        let all = render(What::Services, &report, true);
        assert_eq!(
            all,
            "NODE     SERVICE    VIPS         PORTS           ENDPOINTS\n\
             node-a   demo/web   10.96.0.10   80→8080/Http1   10.1.2.2:8080 (demo/b1)\n\
             node node-b unreachable: connection refused\n"
        );
        assert!(render(What::Services, &report, false).starts_with("SERVICE "));
        assert!(
            render(What::Connections, &json!({"connections": []}), false).starts_with("ID   DIRECTION   POD")
        );
    }
}
