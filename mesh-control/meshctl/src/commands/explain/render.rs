//! The explanation for people: one line per step, in the order traffic meets them.

use std::fmt::Write as _;

use serde_json::Value;

use crate::output::cell;

/// Renders the explanation `e` (what `-o json` prints) as a short report.
pub fn human(e: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{label:<12} {text}");
    };
    let source = &e["source"];
    line(
        "source",
        format!(
            "{} ({}){}{}: {}",
            cell(&source["pod"]),
            cell(&source["ip"]),
            source["node"].as_str().map(|node| format!(" on {node}")).unwrap_or_default(),
            source["identity"].as_str().map(|id| format!(", {id}")).unwrap_or_default(),
            cell(&source["note"]),
        ),
    );
    let d = &e["destination"];
    let what = match d["kind"].as_str() {
        Some("service") => format!("service {}", cell(&d["service"])),
        Some("pod") => format!("pod {}", cell(&d["pod"])),
        _ => "an address".to_owned(),
    };
    line("destination", format!("{what} at {}, declared {}", cell(&d["address"]), cell(&d["protocol"])));
    match e["request"].as_object() {
        Some(r) => line(
            "request",
            format!("{} {} (Host: {})", cell(&r["method"]), cell(&r["path"]), cell(&r["host"])),
        ),
        None => line("request", "not HTTP (give --http \"METHOD PATH\" for a request)".into()),
    }
    line("outbound", format!("{}: {}", cell(&e["outbound"]["handled_as"]), cell(&e["outbound"]["note"])));
    if let Some(route) = e["route"].as_object() {
        let backends: Vec<String> = route["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{}:{} {:.0}%",
                    cell(&b["service"]),
                    cell(&b["port"]),
                    b["share"].as_f64().unwrap_or(0.0) * 100.0
                )
            })
            .collect();
        let to = if backends.is_empty() { "the service itself".to_owned() } else { backends.join(", ") };
        line("route", format!("{} rule {} -> {to}", cell(&route["route"]), cell(&route["rule"])));
    } else if e["outbound"]["handled_as"] == "http" {
        line("route", "no HTTPRoute rule matched: the service's own endpoints".into());
    }
    for failure in e["failures"].as_array().into_iter().flatten() {
        line("failure", format!("{}: {}", cell(&failure["effect"]), cell(&failure["reason"])));
    }
    for endpoint in e["endpoints"].as_array().into_iter().flatten() {
        // The route's weight for the endpoint's service (the load balancer picks within it).
        let share = match (endpoint["share"].as_f64(), endpoint["service"].as_str()) {
            (Some(share), Some(service)) if share < 1.0 => {
                format!(" [{service}: {:.0}% of requests]", share * 100.0)
            }
            _ => String::new(),
        };
        let expects = endpoint["identity"].as_str().map(|id| format!(", expecting {id}")).unwrap_or_default();
        line(
            "endpoint",
            format!(
                "{} {}{} via {}{expects}{share}",
                cell(&endpoint["workload"]),
                cell(&endpoint["address"]),
                endpoint["node"].as_str().map(|node| format!(" on {node}")).unwrap_or_default(),
                cell(&endpoint["transport"]),
            ),
        );
        let inbound = &endpoint["inbound"];
        for note in inbound["notes"].as_array().into_iter().flatten() {
            line("  note", cell(note));
        }
        for policy in inbound["policies"].as_array().into_iter().flatten() {
            let matched = if policy["matched"] == true { "matched" } else { "no match" };
            line(
                "  policy",
                format!(
                    "{} {} {matched}: {}",
                    cell(&policy["policy"]),
                    cell(&policy["action"]).to_uppercase(),
                    cell(&policy["why"])
                ),
            );
        }
        line("  decision", format!("{} (on {})", verdict_text(&endpoint["verdict"]), cell(&inbound["node"])));
    }
    line("verdict", verdict_text(&e["verdict"]));
    for note in e["notes"].as_array().into_iter().flatten() {
        line("note", cell(note));
    }
    out
}

fn verdict_text(v: &Value) -> String {
    let head = match v["allowed"].as_bool() {
        Some(true) => "ALLOWED".to_owned(),
        Some(false) => match v["by"].as_str() {
            Some(policy) => format!("DENIED by {policy}"),
            None => "DENIED".to_owned(),
        },
        None => "VARIES".to_owned(),
    };
    format!("{head} -> {}: {}", cell(&v["effect"]), cell(&v["reason"]))
}
