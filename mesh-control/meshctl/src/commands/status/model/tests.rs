use serde_json::json;

use super::*;

const NOW: i64 = 1_795_536_548 - 86_400; // a day before the certificates below expire
const VERSION: &str = "c2eecb9384097795";
const ADDRESS: &str = "type.googleapis.com/nodemesh.workload.v1.Address";
const AUTHZ: &str = "type.googleapis.com/nodemesh.workload.v1.Authorization";

#[test]
fn certificate_times_parse_in_both_notations() {
    assert_eq!(parse_time("2026-11-24 16:09:08.0 +00:00:00"), Some(1_795_536_548));
    assert_eq!(parse_time("2026-11-24T16:09:08Z"), Some(1_795_536_548));
    assert_eq!(parse_time("2026-11-24 17:09:08.5 +01:00:00"), Some(1_795_536_548));
    assert_eq!(parse_time("2026-11-24T11:09:08-05:00"), Some(1_795_536_548));
    assert_eq!(parse_time("2000-03-01 00:00:00.0 +00:00:00"), Some(951_868_800));
    assert_eq!(parse_time("1969-12-31T23:00:00Z"), Some(-3600));
    for bad in [
        "",
        "yesterday",
        "2026-13-01 00:00:00.0 +00:00:00",
        "2026-11-24",
        "2026-11-24 16:09",
        "2026-11-24T16:09:08 x",
    ] {
        assert_eq!(parse_time(bad), None, "{bad:?}");
    }
}

fn control() -> ControlData {
    let sync = |nonce: &str| {
        json!({
            "connected": true, "acked": {ADDRESS: nonce, AUTHZ: "2"}, "last_nack": null,
            "types": {
                ADDRESS: {"acked_nonce": nonce, "acked_version": VERSION, "pending_nonce": null, "nack": null},
                AUTHZ: {"acked_nonce": "2", "acked_version": VERSION, "pending_nonce": null, "nack": null},
            },
            "synced_version": VERSION,
        })
    };
    ControlData {
        ready: true,
        config: json!({"snapshot_version": VERSION, "workloads": 6, "services": 1, "authorization_policies": 1,
                       "http_routes": 1, "problems": [], "error": null}),
        nodes: json!({"node-a": sync("1"), "node-b": sync("1")}),
        policies: json!({"served": true, "policies": [{"namespace": "demo", "name": "allow-get",
            "accepted": {"status": true, "reason": "Accepted", "message": "enforced as written"}}]}),
        routes: json!({"served": true, "routes": [{"namespace": "demo", "name": "web", "distributed": true,
            "parents": [{"service": "demo/web:80",
                "accepted": {"status": true, "reason": "Accepted", "message": "ok"},
                "resolved_refs": {"status": true, "reason": "ResolvedRefs", "message": "ok"}}]}]}),
    }
}

fn node(pods: &[&str]) -> NodeData {
    let certs: Vec<_> = pods
        .iter()
        .map(|p| {
            json!({"identity": format!("spiffe://cluster.local/ns/demo/sa/{p}"), "pods": 1, "serial": "7f:01",
                   "not_after": "2026-11-24 16:09:08.0 +00:00:00", "last_error": null})
        })
        .collect();
    let listed: Vec<_> =
        pods.iter().map(|p| json!({"namespace": "demo", "name": p, "ip": "10.1.1.2"})).collect();
    NodeData {
        ready: true,
        not_ready_reason: None,
        config: json!({"source": "xDS from https://10.0.0.1:15012", "xds": {"connected": true, "last_error": null},
                       "workloads": [], "rejected": []}),
        certs: json!({"ca": true, "certificates": certs}),
        pods: json!({"node": "x", "ready": true, "pods": listed, "failed_pods": {}}),
    }
}

fn nodes(a: Fetched<NodeData>, b: Fetched<NodeData>) -> Vec<(String, String, Fetched<NodeData>)> {
    vec![("node-a".into(), "127.0.0.1:15000".into(), a), ("node-b".into(), "127.0.0.1:15000".into(), b)]
}

fn problems(value: &Value) -> Vec<String> {
    strings(&value["problems"])
}

#[test]
fn a_healthy_mesh_passes_with_every_fact_in_place() {
    let report =
        report("127.0.0.1:15014", &Ok(control()), &nodes(Ok(node(&["a1", "a2"])), Ok(node(&["b1"]))), NOW);
    assert_eq!(report["passed"], true, "{report:#}");
    let cp = &report["control_plane"];
    assert_eq!((cp["reachable"].clone(), cp["ready"].clone()), (json!(true), json!(true)));
    assert_eq!(
        cp["config"],
        json!({"version": VERSION, "workloads": 6, "services": 1, "policies": 1, "routes": 1,
               "error": null, "problems": []})
    );
    let a = &report["nodes"][0];
    assert_eq!(
        (a["name"].as_str(), a["connected"].as_bool(), a["in_sync"].as_bool()),
        (Some("node-a"), Some(true), Some(true))
    );
    assert_eq!(a["config_version"], VERSION);
    assert_eq!(a["pods"], json!({"count": 2, "names": ["demo/a1", "demo/a2"]}));
    assert_eq!(a["certificates"][0]["expires_in_secs"], 86_400);
    let states: Vec<_> =
        a["xds"].as_array().expect("xds").iter().map(|t| (t["type"].clone(), t["state"].clone())).collect();
    assert_eq!(states, [(json!("Address"), json!("ACK")), (json!("Authorization"), json!("ACK"))]);
    assert!(problems(a).is_empty() && problems(cp).is_empty());
}

#[test]
fn an_unreachable_node_fails_the_report_but_not_the_others() {
    let mut control = control();
    control.nodes["node-b"]["connected"] = json!(false);
    let report = report(
        "127.0.0.1:15014",
        &Ok(control),
        &nodes(Ok(node(&["a1"])), Err("connection refused".into())),
        NOW,
    );
    assert_eq!(report["passed"], false);
    assert!(problems(&report["nodes"][0]).is_empty(), "{report:#}");
    let b = &report["nodes"][1];
    assert_eq!((b["reachable"].as_bool(), b["connected"].as_bool()), (Some(false), Some(false)));
    assert_eq!(problems(b), ["admin endpoint unreachable: connection refused"]);
}

#[test]
fn nacks_stale_config_certificate_trouble_and_refused_objects_are_problems() {
    let mut control = control();
    control.nodes["node-a"]["types"][AUTHZ]["nack"] = json!("demo/p: unknown action");
    control.nodes["node-a"]["synced_version"] = json!(null);
    control.policies["policies"][0]["accepted"] =
        json!({"status": false, "reason": "Invalid", "message": "no rules"});
    control.routes["routes"][0]["parents"][0]["resolved_refs"] =
        json!({"status": false, "reason": "BackendNotFound", "message": "no Service web-v9"});
    let mut a = node(&["a1"]);
    a.certs["certificates"][0]["last_error"] = json!("CA unavailable");
    a.certs["certificates"][0]["not_after"] = json!("2026-11-22 16:09:08.0 +00:00:00");
    let report = report("127.0.0.1:15014", &Ok(control), &nodes(Ok(a), Ok(node(&["b1"]))), NOW);
    assert_eq!(report["passed"], false);
    let cp = &report["control_plane"];
    assert_eq!(
        cp["policies_not_accepted"],
        json!([{"name": "demo/allow-get", "reason": "Invalid", "message": "no rules"}])
    );
    assert_eq!(cp["routes_not_accepted"][0]["reason"], "BackendNotFound");
    assert_eq!(problems(cp).len(), 2, "{cp:#}");
    let a = &report["nodes"][0];
    assert_eq!(a["xds"][1]["state"], "NACK");
    assert_eq!(a["xds"][1]["nack_reason"], "demo/p: unknown action");
    assert_eq!(a["in_sync"], false);
    let found = problems(a);
    for needle in [
        "rejected Authorization: demo/p",
        "does not hold mesh-control's config",
        "has expired",
        "CA unavailable",
    ] {
        assert!(found.iter().any(|p| p.contains(needle)), "{needle} in {found:?}");
    }
    assert!(problems(&report["nodes"][1]).is_empty());
}

#[test]
fn an_unreachable_control_plane_still_reports_the_nodes() {
    let report = report(
        "127.0.0.1:15014",
        &Err("connection refused".into()),
        &nodes(Ok(node(&["a1"])), Ok(node(&["b1"]))),
        NOW,
    );
    assert_eq!(report["passed"], false);
    assert_eq!(report["control_plane"]["reachable"], false);
    assert_eq!(report["nodes"][0]["reachable"], true);
    assert_eq!(report["nodes"][0]["pods"]["count"], 1);
}
