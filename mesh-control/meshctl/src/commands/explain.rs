//! `meshctl explain <from> <to> [--port P] [--http "METHOD PATH"] [--header K:V …]`: why a
//! connection or request is allowed or denied, and where it goes.
//!
//! The nodes compute it (`GET /explain` on their admin endpoint) with the proxy's own decision
//! functions; meshctl only asks and merges. Every node holds the whole mesh's config, but each
//! half of a decision is made by one node: routing and the transport by the source pod's node,
//! authorization by each destination's node. So meshctl takes the outbound half from the
//! source's node and each endpoint's inbound half from the node hosting it, and a node whose
//! config lags shows up as it would for real traffic.

mod render;

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    Outcome, client,
    context::{Context, Node},
    output::{Format, emit},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source pod: <namespace>/<name> (or a name only one namespace has).
    pub from: String,
    /// The destination: a pod (<namespace>/<name>), a service hostname
    /// (<name>.<namespace>[.svc.cluster.local]) or an IP address, optionally with :port.
    pub to: String,
    /// The destination port (a service with one port needs none).
    #[arg(long)]
    pub port: Option<u16>,
    /// The client's HTTP/1.1 request, "METHOD PATH" (e.g. "GET /api/users?x=1"); without it the
    /// connection's bytes are taken not to be HTTP.
    #[arg(long, value_name = "METHOD PATH")]
    pub http: Option<String>,
    /// A request header, NAME:VALUE (repeatable; needs --http). Host defaults to the destination.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
}

/// The query string of `GET /explain` for these arguments, or why they make no request.
fn query(args: &Args) -> anyhow::Result<String> {
    let mut params = vec![("from", args.from.clone()), ("to", args.to.clone())];
    if let Some(port) = args.port {
        if port == 0 {
            bail!("--port 0: not a port (1-65535)");
        }
        params.push(("port", port.to_string()));
    }
    match &args.http {
        Some(http) => {
            let (method, path) = parse_http(http)?;
            params.push(("method", method.to_owned()));
            params.push(("path", path.to_owned()));
        }
        None if !args.headers.is_empty() => bail!("--header needs --http (headers belong to a request)"),
        None => {}
    }
    for header in &args.headers {
        match header.split_once(':') {
            Some((name, _)) if !name.trim().is_empty() && !name.contains(char::is_whitespace) => {
                params.push(("header", header.clone()));
            }
            _ => bail!("--header {header:?}: not NAME:VALUE"),
        }
    }
    Ok(params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect::<Vec<_>>().join("&"))
}

/// Reads `--http "METHOD PATH"`.
fn parse_http(http: &str) -> anyhow::Result<(&str, &str)> {
    let mut words = http.split_whitespace();
    let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
        bail!("--http {http:?}: not \"METHOD PATH\" (e.g. \"GET /api\")");
    };
    let token = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !method.bytes().all(token) || !method.bytes().any(|b| b.is_ascii_uppercase()) {
        bail!("--http {http:?}: {method:?} is not an HTTP method (uppercase, e.g. GET)");
    }
    if !path.starts_with('/') {
        bail!("--http {http:?}: the path {path:?} must start with /");
    }
    Ok((method, path))
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks `node` to explain; a question it cannot answer is the error, in its words.
fn ask(node: &Node, query: &str) -> anyhow::Result<Value> {
    let response = client::request(&node.endpoint(), "GET", &format!("/explain?{query}"))
        .with_context(|| format!("asking node {}", node.name))?;
    match response.status {
        200 => serde_json::from_str(&response.body)
            .with_context(|| format!("node {} answered /explain with something that is not JSON", node.name)),
        400 => bail!("{}", response.body.trim()),
        404 => bail!("node {} has no /explain (an older mesh-node?)", node.name),
        status => bail!("node {} answered /explain with {status}: {}", node.name, response.body.trim()),
    }
}

pub fn run(context: &Context, args: Args, format: Format) -> anyhow::Result<Outcome> {
    let query = query(&args)?;
    let Some(first) = context.nodes.first() else { bail!("the context names no node to ask") };
    let mut explanation = ask(first, &query)?;
    // The source's node owns the outbound half (its capture, its routing, its certificates).
    let mut notes = Vec::new();
    if let Some(source_node) = explanation["source"]["node"].as_str().map(str::to_owned)
        && source_node != first.name
    {
        match context.node(&source_node) {
            Ok(node) => explanation = ask(node, &query)?,
            Err(_) => notes.push(format!(
                "the source's node {source_node} is not in the context: its half is {}'s view",
                first.name
            )),
        }
    }
    merge_inbound_halves(context, &query, &mut explanation, &mut notes)?;
    explanation["notes"] = notes.into();
    emit(format, &explanation, render::human)?;
    Ok(if explanation["verdict"]["allowed"] == Value::Bool(true) { Outcome::Passed } else { Outcome::Failed })
}

/// Replaces each endpoint's inbound half by the one its own node computes, then the verdict.
fn merge_inbound_halves(
    context: &Context,
    query: &str,
    explanation: &mut Value,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let computed_on = explanation["node"].as_str().unwrap_or_default().to_owned();
    let mut answers: BTreeMap<String, Value> = BTreeMap::new();
    let mut merged = false;
    let Some(endpoints) = explanation["endpoints"].as_array_mut() else { return Ok(()) };
    for endpoint in endpoints {
        let Some(node) = endpoint["node"].as_str().map(str::to_owned) else { continue };
        if node == computed_on || !endpoint["inbound"]["enforced"].as_bool().unwrap_or(false) {
            continue;
        }
        let Ok(node_context) = context.node(&node) else {
            notes.push(format!("node {node} is not in the context: {computed_on} decided its inbound half"));
            continue;
        };
        if !answers.contains_key(&node) {
            answers.insert(node.clone(), ask(node_context, query)?);
        }
        let theirs = answers[&node]["endpoints"].as_array().and_then(|list| {
            list.iter().find(|e| e["address"] == endpoint["address"] && e["service"] == endpoint["service"])
        });
        match theirs {
            Some(theirs) => {
                endpoint["inbound"] = theirs["inbound"].clone();
                endpoint["verdict"] = theirs["verdict"].clone();
                merged = true;
            }
            None => notes.push(format!(
                "node {node} does not route to {} as {computed_on} does (config versions differ?): \
                 {computed_on} decided its inbound half",
                endpoint["address"]
            )),
        }
    }
    if merged {
        let outcomes: Vec<&Value> = explanation["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| &e["verdict"])
            .chain(explanation["failures"].as_array().into_iter().flatten())
            .collect();
        explanation["verdict"] = combine(&outcomes);
    }
    Ok(())
}

/// One verdict for all outcomes: theirs when allowed, effect and policy agree, else "varies".
/// The rule mesh-node's `explain::combine` applies before the halves are merged.
fn combine(outcomes: &[&Value]) -> Value {
    let key = |v: &Value| (v["allowed"].clone(), v["effect"].clone(), v["by"].clone());
    match outcomes {
        [] => serde_json::json!({
            "allowed": false, "by": null, "effect": "503", "reason": "nowhere to go",
        }),
        [first, rest @ ..] if rest.iter().all(|v| key(v) == key(first)) => (*first).clone(),
        _ => serde_json::json!({
            "allowed": null, "by": null, "effect": "varies",
            "reason": "depends on the endpoint the request goes to (see each endpoint)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(http: Option<&str>, headers: &[&str]) -> Args {
        Args {
            from: "demo/a1".into(),
            to: "web.demo".into(),
            port: Some(80),
            http: http.map(str::to_owned),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    #[test]
    fn arguments_become_one_encoded_query_or_one_clear_error() {
        let q = query(&args(Some("GET /a b"), &[])).unwrap_err().to_string();
        assert!(q.contains("not \"METHOD PATH\""), "{q}");
        let q = query(&args(Some("get /"), &[])).unwrap_err().to_string();
        assert!(q.contains("not an HTTP method"), "{q}");
        let q = query(&args(Some("GET api"), &[])).unwrap_err().to_string();
        assert!(q.contains("must start with /"), "{q}");
        let q = query(&args(None, &["x-a:1"])).unwrap_err().to_string();
        assert!(q.contains("needs --http"), "{q}");
        let q = query(&args(Some("GET /"), &["novalue"])).unwrap_err().to_string();
        assert!(q.contains("not NAME:VALUE"), "{q}");
        assert_eq!(
            query(&args(Some("POST /x?y=1&z"), &["x-canary: 1"])).unwrap(),
            "from=demo%2Fa1&to=web.demo&port=80&method=POST&path=%2Fx%3Fy%3D1%26z&header=x-canary%3A%201"
        );
    }

    #[test]
    fn outcomes_combine_when_they_agree_only() {
        let allowed = serde_json::json!({"allowed": true, "by": null, "effect": "forwarded", "reason": "a"});
        let also = serde_json::json!({"allowed": true, "by": null, "effect": "forwarded", "reason": "b"});
        let denied = serde_json::json!({"allowed": false, "by": "demo/p", "effect": "403", "reason": "c"});
        assert_eq!(combine(&[&allowed, &also]), allowed);
        assert_eq!(combine(&[&allowed, &denied])["effect"], "varies");
        assert_eq!(combine(&[])["allowed"], false);
    }
}
