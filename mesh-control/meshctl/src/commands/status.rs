//! `meshctl status`: the control plane and every node of the context at a glance.
//!
//! Reads mesh-control's `/healthz/ready`, `/debug/config`, `/debug/nodes`, `/policies` and
//! `/routes`, and each node's `/healthz/ready`, `/config`, `/certs` and `/pods`. A node (or the
//! control plane) that does not answer is reported as unreachable, not as an error of the
//! command; any problem found makes the outcome Failed (exit 1).
//!
//! `-o json` (stable keys):
//!
//! ```text
//! { "passed": bool,
//!   "control_plane": { "admin", "reachable", "error", "ready",
//!     "config": { "version", "workloads", "services", "policies", "routes", "error", "problems": [] } | null,
//!     "policies_not_accepted": [ { "name", "reason", "message" } ],
//!     "routes_not_accepted": [ { "name", "parent", "reason", "message" } ],
//!     "problems": [ "..." ] },
//!   "nodes": [ { "name", "admin", "reachable", "error", "ready", "not_ready_reason", "source",
//!     "connected",                 // its xDS stream, as the node and mesh-control both see it
//!     "config_version", "in_sync", // the snapshot it holds entirely; whether it is mesh-control's
//!     "xds": [ { "type", "type_url", "state": "ACK"|"NACK"|"PENDING"|"NONE", "nonce", "version", "nack_reason" } ],
//!     "rejected": [ { "resource", "reason" } ],
//!     "certificates": [ { "identity", "serial", "not_after", "expires_in_secs", "pods", "last_error" } ],
//!     "pods": { "count", "names": [ "namespace/name" ] },
//!     "failed_pods": [ { "pod", "error" } ],
//!     "problems": [ "..." ] } ] }
//! ```

mod model;

use serde_json::Value;

use crate::{
    Outcome,
    client::{self, get_json},
    context::{Context, Endpoint},
    output::{Format, Table, cell},
};
use model::{ControlData, Fetched, NodeData};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(context: &Context, _args: Args, format: Format) -> anyhow::Result<Outcome> {
    let control = context.control_plane.endpoint();
    // Every endpoint at once: a node that hangs costs its timeout once, not once per node.
    let (control_data, nodes) = std::thread::scope(|scope| {
        let control = scope.spawn(|| fetch_control(&control));
        let nodes: Vec<_> = context
            .nodes
            .iter()
            .map(|node| {
                let endpoint = node.endpoint();
                (node, scope.spawn(move || fetch_node(&endpoint)))
            })
            .collect();
        let nodes: Vec<_> = nodes
            .into_iter()
            .map(|(node, handle)| {
                let data = handle.join().unwrap_or_else(|_| Err("meshctl's fetch panicked".into()));
                (node.name.clone(), node.admin.to_string(), data)
            })
            .collect();
        (control.join().unwrap_or_else(|_| Err("meshctl's fetch panicked".into())), nodes)
    });
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let report = model::report(&context.control_plane.admin.to_string(), &control_data, &nodes, now);
    crate::output::emit(format, &report, render)?;
    Ok(if report["passed"] == true { Outcome::Passed } else { Outcome::Failed })
}

fn fetch_control(endpoint: &Endpoint) -> Fetched<ControlData> {
    let attempt = || -> anyhow::Result<ControlData> {
        let ready = client::request(endpoint, "GET", "/healthz/ready")?.status == 200;
        Ok(ControlData {
            ready,
            config: get_json(endpoint, "/debug/config")?,
            nodes: get_json(endpoint, "/debug/nodes")?,
            policies: get_json(endpoint, "/policies")?,
            routes: get_json(endpoint, "/routes")?,
        })
    };
    attempt().map_err(|e| crate::one_line(&e))
}

fn fetch_node(endpoint: &Endpoint) -> Fetched<NodeData> {
    let attempt = || -> anyhow::Result<NodeData> {
        let ready = client::request(endpoint, "GET", "/healthz/ready")?;
        let reason = ready.body.trim();
        Ok(NodeData {
            ready: ready.status == 200,
            not_ready_reason: (ready.status != 200)
                .then(|| reason.strip_prefix("not ready: ").unwrap_or(reason).to_owned()),
            config: get_json(endpoint, "/config")?,
            certs: get_json(endpoint, "/certs")?,
            pods: get_json(endpoint, "/pods")?,
        })
    };
    attempt().map_err(|e| crate::one_line(&e))
}

fn yes_no(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

/// Seconds as the largest two units (`23h59m`, `4m10s`), or `expired`.
fn duration(secs: &Value) -> String {
    let Some(secs) = secs.as_i64() else { return "-".into() };
    if secs <= 0 {
        return "expired".into();
    }
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn short(version: &Value) -> String {
    version.as_str().map_or("-".into(), |v| v.chars().take(12).collect())
}

fn render(report: &Value) -> String {
    let cp = &report["control_plane"];
    let mut out = String::new();
    let state = if cp["reachable"] != true {
        format!("UNREACHABLE ({})", cell(&cp["error"]))
    } else if cp["ready"] == true {
        "reachable, ready".into()
    } else {
        "reachable, NOT READY".into()
    };
    out.push_str(&format!("Control plane {}: {state}\n", cell(&cp["admin"])));
    let config = &cp["config"];
    if config.is_object() {
        out.push_str(&format!(
            "  config {}: {} workloads, {} services, {} policies, {} routes\n",
            short(&config["version"]),
            cell(&config["workloads"]),
            cell(&config["services"]),
            cell(&config["policies"]),
            cell(&config["routes"]),
        ));
    }

    let mut nodes =
        Table::new(&["node", "reachable", "ready", "connected", "config", "xds", "pods", "certificates"]);
    let mut certs = Table::new(&["node", "identity", "not after", "left", "last error"]);
    let mut pods = Vec::new();
    for node in report["nodes"].as_array().into_iter().flatten() {
        let name = cell(&node["name"]);
        let xds: Vec<String> = node["xds"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{} {}", cell(&t["type"]), cell(&t["state"])))
            .collect();
        let config = match (node["config_version"].as_str(), node["in_sync"].as_bool()) {
            (Some(v), Some(true)) => format!("{} (current)", short(&Value::from(v))),
            (Some(v), _) => format!("{} (behind)", short(&Value::from(v))),
            (None, _) => "-".into(),
        };
        let list = node["certificates"].as_array().cloned().unwrap_or_default();
        let soonest = list.iter().filter_map(|c| c["expires_in_secs"].as_i64()).min();
        let certificates = if list.is_empty() {
            "-".into()
        } else {
            format!("{} (soonest expiry in {})", list.len(), duration(&soonest.into()))
        };
        let reachable = node["reachable"] == true;
        nodes.row(vec![
            name.clone(),
            yes_no(&node["reachable"]),
            if reachable { yes_no(&node["ready"]) } else { "-".into() },
            yes_no(&node["connected"]),
            config,
            if xds.is_empty() { "-".into() } else { xds.join(", ") },
            if reachable { cell(&node["pods"]["count"]) } else { "-".into() },
            certificates,
        ]);
        for c in &list {
            certs.row(vec![
                name.clone(),
                cell(&c["identity"]),
                cell(&c["not_after"]),
                duration(&c["expires_in_secs"]),
                cell(&c["last_error"]),
            ]);
        }
        if reachable {
            let names: Vec<String> =
                node["pods"]["names"].as_array().into_iter().flatten().map(cell).collect();
            let names = if names.is_empty() { "-".to_owned() } else { names.join(", ") };
            pods.push(format!("  {name}: {names}\n"));
        }
    }
    out.push('\n');
    out.push_str(&nodes.render());
    if !certs.is_empty() {
        out.push_str("\nCertificates\n");
        out.push_str(&certs.render());
    }
    if !pods.is_empty() {
        out.push_str("\nPods enrolled\n");
        pods.iter().for_each(|line| out.push_str(line));
    }
    let mut problems = Vec::new();
    for p in cp["problems"].as_array().into_iter().flatten() {
        problems.push(format!("  control plane: {}\n", cell(p)));
    }
    for node in report["nodes"].as_array().into_iter().flatten() {
        for p in node["problems"].as_array().into_iter().flatten() {
            problems.push(format!("  {}: {}\n", cell(&node["name"]), cell(p)));
        }
    }
    if problems.is_empty() {
        out.push_str("\nNo problems found.\n");
    } else {
        out.push_str(&format!("\nProblems ({})\n", problems.len()));
        problems.iter().for_each(|line| out.push_str(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_the_two_largest_units() {
        assert_eq!(duration(&Value::from(86_400 + 7200 + 5)), "1d2h");
        assert_eq!(duration(&Value::from(3600 * 23 + 60 * 59 + 30)), "23h59m");
        assert_eq!(duration(&Value::from(250)), "4m10s");
        assert_eq!(duration(&Value::from(9)), "9s");
        assert_eq!(duration(&Value::from(0)), "expired");
        assert_eq!(duration(&Value::Null), "-");
    }
}
