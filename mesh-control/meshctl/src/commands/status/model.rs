//! The status report as a pure function of what the admin endpoints answered (and the time),
//! so every judgement (what counts as a problem) is tested with fixed inputs.

use serde_json::{Value, json};

/// What mesh-control's admin endpoint answered.
#[derive(Debug, Default)]
pub struct ControlData {
    pub ready: bool,
    /// `/debug/config`, `/debug/nodes`, `/policies`, `/routes`.
    pub config: Value,
    pub nodes: Value,
    pub policies: Value,
    pub routes: Value,
}

/// What one node's admin endpoint answered.
#[derive(Debug, Default)]
pub struct NodeData {
    /// `/healthz/ready`: 200, or 503 with the reason.
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    /// `/config`, `/certs`, `/pods`.
    pub config: Value,
    pub certs: Value,
    pub pods: Value,
}

/// An endpoint's answers, or why there are none.
pub type Fetched<T> = Result<T, String>;

/// Builds the report (its shape is documented on [`super`]).
pub fn report(
    admin: &str,
    control: &Fetched<ControlData>,
    nodes: &[(String, String, Fetched<NodeData>)],
    now: i64,
) -> Value {
    let control_json = control_plane(admin, control);
    let snapshot = control.as_ref().ok().and_then(|c| c.config["snapshot_version"].as_str());
    let sync = control.as_ref().ok().map(|c| &c.nodes);
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(name, admin, data)| node(name, admin, data, sync.map(|s| &s[name]), snapshot, now))
        .collect();
    let passed = control_json["problems"].as_array().is_some_and(Vec::is_empty)
        && nodes.iter().all(|n| n["problems"].as_array().is_some_and(Vec::is_empty));
    json!({"passed": passed, "control_plane": control_json, "nodes": nodes})
}

fn control_plane(admin: &str, control: &Fetched<ControlData>) -> Value {
    let data = match control {
        Ok(data) => data,
        Err(error) => {
            return json!({
                "admin": admin, "reachable": false, "error": error, "ready": false, "config": null,
                "policies_not_accepted": [], "routes_not_accepted": [],
                "problems": [format!("mesh-control's admin endpoint is unreachable: {error}")],
            });
        }
    };
    let mut problems = Vec::new();
    if !data.ready {
        problems.push("mesh-control is not ready".to_owned());
    }
    let c = &data.config;
    if let Some(error) = c["error"].as_str() {
        problems.push(format!("the manifests are refused (the last good config is served): {error}"));
    }
    let translation: Vec<String> = strings(&c["problems"]);
    problems.extend(translation.iter().map(|p| format!("not taken as written: {p}")));
    let policies: Vec<Value> = data.policies["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["accepted"]["status"] != true)
        .map(|p| {
            json!({
                "name": qualified(p), "reason": p["accepted"]["reason"], "message": p["accepted"]["message"],
            })
        })
        .collect();
    let mut routes = Vec::new();
    for route in data.routes["routes"].as_array().into_iter().flatten() {
        let parents = route["parents"].as_array().cloned().unwrap_or_default();
        for parent in &parents {
            for condition in ["accepted", "resolved_refs"] {
                if parent[condition]["status"] != true {
                    routes.push(json!({
                        "name": qualified(route), "parent": parent["service"],
                        "reason": parent[condition]["reason"], "message": parent[condition]["message"],
                    }));
                }
            }
        }
        if route["distributed"] == false && parents.iter().all(|p| p["accepted"]["status"] == true) {
            routes.push(json!({"name": qualified(route), "parent": null, "reason": "NotDistributed", "message": "held back from the nodes"}));
        }
    }
    for p in &policies {
        problems.push(format!("policy {} not accepted: {}", cell(&p["name"]), cell(&p["message"])));
    }
    for r in &routes {
        problems.push(format!(
            "route {} not accepted ({}): {}",
            cell(&r["name"]),
            cell(&r["reason"]),
            cell(&r["message"])
        ));
    }
    json!({
        "admin": admin, "reachable": true, "error": null, "ready": data.ready,
        "config": {
            "version": c["snapshot_version"], "workloads": c["workloads"], "services": c["services"],
            "policies": c["authorization_policies"], "routes": c["http_routes"],
            "error": c["error"], "problems": translation,
        },
        "policies_not_accepted": policies, "routes_not_accepted": routes, "problems": problems,
    })
}

fn node(
    name: &str,
    admin: &str,
    data: &Fetched<NodeData>,
    sync: Option<&Value>,
    snapshot: Option<&str>,
    now: i64,
) -> Value {
    let sync = sync.filter(|s| s.is_object());
    let control_sees = sync.map(|s| s["connected"] == true);
    let xds = xds_types(sync);
    let version = sync.and_then(|s| s["synced_version"].as_str());
    let in_sync = matches!((version, snapshot), (Some(v), Some(s)) if v == s);
    let data = match data {
        Ok(data) => data,
        Err(error) => {
            return json!({
                "name": name, "admin": admin, "reachable": false, "error": error, "ready": false,
                "not_ready_reason": null, "source": null, "connected": control_sees.unwrap_or(false),
                "config_version": version, "in_sync": in_sync, "xds": xds, "rejected": [],
                "certificates": [], "pods": {"count": 0, "names": []}, "failed_pods": [],
                "problems": [format!("admin endpoint unreachable: {error}")],
            });
        }
    };
    let mut problems = Vec::new();
    if !data.ready {
        problems.push(format!("not ready: {}", data.not_ready_reason.as_deref().unwrap_or("?")));
    }
    // Standalone nodes (no mesh-control) have no xDS status.
    let standalone = data.config["xds"].is_null();
    let connected = !standalone && data.config["xds"]["connected"] == true && control_sees != Some(false);
    if !standalone {
        if !connected {
            let error = data.config["xds"]["last_error"].as_str().unwrap_or("no stream");
            problems.push(format!("not connected to mesh-control ({error})"));
        }
        if snapshot.is_some() && !in_sync {
            problems.push(format!(
                "does not hold mesh-control's config {} (holds {})",
                snapshot.unwrap_or("-"),
                version.unwrap_or("none entirely")
            ));
        }
    }
    for t in &xds {
        if t["state"] == "NACK" {
            problems.push(format!("rejected {}: {}", cell(&t["type"]), cell(&t["nack_reason"])));
        }
    }
    let certificates: Vec<Value> = data.certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let not_after = c["not_after"].as_str();
            let left = not_after.and_then(parse_time).map(|t| t - now);
            json!({
                "identity": c["identity"], "serial": c["serial"], "not_after": not_after,
                "expires_in_secs": left, "pods": c["pods"], "last_error": c["last_error"],
            })
        })
        .collect();
    for c in &certificates {
        let identity = cell(&c["identity"]);
        match c["expires_in_secs"].as_i64() {
            None if c["serial"].is_null() => problems.push(format!("no certificate for {identity}")),
            Some(left) if left <= 0 => problems.push(format!("the certificate of {identity} has expired")),
            _ => {}
        }
        if let Some(error) = c["last_error"].as_str() {
            problems.push(format!("certificate of {identity}: {error}"));
        }
    }
    let names: Vec<String> = data.pods["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or("?"), p["name"].as_str().unwrap_or("?")))
        .collect();
    let failed: Vec<Value> = data.pods["failed_pods"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(pod, error)| json!({"pod": pod, "error": error}))
        .collect();
    for f in &failed {
        problems.push(format!("pod {} not enrolled: {}", cell(&f["pod"]), cell(&f["error"])));
    }
    json!({
        "name": name, "admin": admin, "reachable": true, "error": null, "ready": data.ready,
        "not_ready_reason": data.not_ready_reason, "source": data.config["source"],
        "connected": connected, "config_version": version, "in_sync": in_sync, "xds": xds,
        "rejected": data.config["rejected"].as_array().cloned().unwrap_or_default(),
        "certificates": certificates, "pods": {"count": names.len(), "names": names},
        "failed_pods": failed, "problems": problems,
    })
}

/// Each resource type's state as mesh-control records it: `ACK` (the last answer), `NACK`
/// (with the node's reason), `PENDING` (sent, not answered yet) or `NONE` (never sent).
fn xds_types(sync: Option<&Value>) -> Vec<Value> {
    let Some(sync) = sync else { return Vec::new() };
    let types = sync["types"].as_object().cloned().unwrap_or_default();
    let acked = sync["acked"].as_object().cloned().unwrap_or_default();
    let mut urls: Vec<&String> = types.keys().chain(acked.keys()).collect();
    urls.sort();
    urls.dedup();
    urls.into_iter()
        .map(|url| {
            let t = &types.get(url).cloned().unwrap_or(Value::Null);
            let (state, nonce) = if t["nack"].is_string() {
                ("NACK", &t["acked_nonce"])
            } else if t["pending_nonce"].is_string() {
                ("PENDING", &t["pending_nonce"])
            } else if t["acked_nonce"].is_string() {
                ("ACK", &t["acked_nonce"])
            } else if let Some(nonce) = acked.get(url) {
                ("ACK", nonce)
            } else {
                ("NONE", &Value::Null)
            };
            json!({
                "type": url.rsplit('.').next().unwrap_or(url), "type_url": url, "state": state,
                "nonce": nonce, "version": t["acked_version"], "nack_reason": t["nack"],
            })
        })
        .collect()
}

fn qualified(object: &Value) -> String {
    format!("{}/{}", object["namespace"].as_str().unwrap_or("?"), object["name"].as_str().unwrap_or("?"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

fn cell(value: &Value) -> String {
    crate::output::cell(value)
}

/// Parses a certificate time as mesh-node shows it (`2026-11-24 16:09:08.0 +00:00:00`, the
/// `time` crate's display) or as RFC 3339 (`2026-11-24T16:09:08Z`) into Unix seconds.
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    let (date, rest) = text.split_at_checked(10)?;
    let rest = rest.strip_prefix([' ', 'T'])?;
    let mut date = date.split('-');
    let (year, month, day): (i64, i64, i64) =
        (date.next()?.parse().ok()?, date.next()?.parse().ok()?, date.next()?.parse().ok()?);
    let time_end = rest.find([' ', 'Z', '+', '-']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(time_end);
    let mut time = time.split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: f64 = time.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second >= 61.0 {
        return None;
    }
    let offset = offset.trim();
    let offset_secs = match offset {
        "" | "Z" => 0,
        _ => {
            let (sign, digits) = match offset.split_at_checked(1)? {
                ("+", d) => (1, d),
                ("-", d) => (-1, d),
                _ => return None,
            };
            let parts: Vec<i64> = digits.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
            let secs = match parts.as_slice() {
                [h] => h * 3600,
                [h, m] => h * 3600 + m * 60,
                [h, m, s] => h * 3600 + m * 60 + s,
                _ => return None,
            };
            sign * secs
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second as i64 - offset_secs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests;
