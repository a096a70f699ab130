//! The steps traffic meets, each with the proxy's own function: the source proxy's handling of
//! a service's cluster IP (protocol, route, backends, endpoints), then each destination's
//! inbound proxy (plaintext or HBONE, parsing, the authorization decision and how it shows).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_api::SpiffeId;
use mesh_manifests::MtlsMode;
use mesh_policy::{
    authz::{self, Decision},
    route::{self, RouteRequest},
};

use super::{
    BackendView, DecisionView, Effect, EndpointView, Explanation, InboundView, NodeState, RouteView,
    VerdictView,
    resolve::{Http, Pod},
};
use crate::{
    proxy::{
        authz::{
            Caller, Detail, Workload, decide_connection, decide_request, inbound_parsing, refuses_plaintext,
        },
        http::outbound::{backend_target, upstream_headers},
        protocol::{self, Protocol},
    },
    traffic::ServiceEntry,
};

/// What every step shares.
pub(super) struct Context<'a> {
    pub(super) state: &'a NodeState<'a>,
    pub(super) pods: &'a [Pod],
    pub(super) caller: &'a Caller,
    pub(super) hbone_source: bool,
    pub(super) sniffed: Option<Protocol>,
    /// The source pod's namespace (routes from other namespaces than a service's apply only to
    /// their own namespace's clients).
    pub(super) source_namespace: &'a str,
}

impl Context<'_> {
    pub(super) fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip.map(IpAddr::V4) == Some(ip))
    }

    /// The source proxy's handling of a connection to a service's cluster IP (`to_service`, then
    /// HTTP routing when it parses HTTP).
    pub(super) fn through_service(
        &self,
        out: &mut Explanation,
        service: &Arc<ServiceEntry>,
        port: u16,
        request: Option<&Http>,
    ) {
        let Some(service_port) = service.port(port) else {
            out.outbound.handled_as = "tcp";
            out.outbound.note = format!("captured; service {} has no port {port}", service.key);
            out.failures.push(VerdictView::failed(
                Effect::Reset,
                None,
                format!("service {} has no port {port}: the source proxy resets the connection", service.key),
            ));
            return;
        };
        let parsing = self.state.traffic.outbound_parsing(service, service_port);
        let read_as = protocol::decide(parsing, self.sniffed);
        let traffic = self.state.traffic;
        if !read_as.is_http() {
            out.outbound.handled_as = "tcp";
            out.outbound.note = format!(
                "captured; service {} port {port} ({parsing:?}) read as TCP: one endpoint per connection, no routes",
                service.key
            );
            let endpoints = service.endpoints(port);
            if endpoints.is_empty() {
                out.failures.push(VerdictView::failed(
                    Effect::Reset,
                    None,
                    format!(
                        "service {} port {port} has no endpoints: the source proxy resets the connection",
                        service.key
                    ),
                ));
            }
            for endpoint in endpoints {
                // As `to_service`: HBONE to an endpoint with an identity when the node has a CA.
                let expected = endpoint.identity.clone().filter(|_| self.hbone_source);
                let view = self.endpoint(
                    Some(&service.key),
                    None,
                    Some(endpoint.workload.clone()),
                    endpoint.addr,
                    expected,
                    request,
                    false,
                );
                out.endpoints.push(view);
            }
            return;
        }
        out.outbound.handled_as = "http";
        let Some(request) = request else {
            out.outbound.note = format!("captured; service {} port {port} is declared HTTP", service.key);
            out.failures.push(VerdictView::failed(
                Effect::BadRequest,
                None,
                "the port is declared HTTP and the bytes are not: the source proxy answers 400",
            ));
            return;
        };
        out.outbound.note = format!(
            "captured; service {} port {port} ({parsing:?}) read as HTTP: routed, balanced and retried request by request",
            service.key
        );
        let attributes = RouteRequest {
            method: &request.method,
            path: &request.path,
            query: request.query.as_deref(),
            host: &request.host,
            headers: &request.headers,
        };
        let matched = route::select(traffic.routes(), &service.key, port, self.source_namespace, &attributes);
        let mut upstream = request.headers.clone();
        upstream_headers(&mut upstream, matched.as_ref());
        let forwarded = Http {
            method: request.method.clone(),
            path: request.path.clone(),
            query: request.query.clone(),
            host: request.host.clone(),
            headers: upstream,
        };
        // The backends the rule may pick, with their share of requests.
        let mut choices: Vec<(Option<&route::Backend>, Option<f64>)> = vec![(None, None)];
        if let Some(m) = &matched {
            let total: u64 = m.rule.backends.iter().map(|b| u64::from(b.weight)).sum();
            out.route = Some(RouteView {
                route: m.route.key().to_owned(),
                rule: m.rule_index,
                backends: m
                    .rule
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        service: b.service.clone(),
                        port: if b.port == 0 { port } else { b.port },
                        weight: b.weight,
                        share: if total == 0 { 0.0 } else { f64::from(b.weight) / total as f64 },
                    })
                    .collect(),
            });
            if !m.rule.backends.is_empty() {
                choices = m
                    .rule
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .map(|b| (Some(b), Some(f64::from(b.weight) / total as f64)))
                    .collect();
                if choices.is_empty() {
                    out.failures.push(VerdictView::of_failure((
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        "NR",
                        format!("route {} rule {}: every backend has weight 0", m.route.key(), m.rule_index),
                    )));
                }
            }
        }
        for (backend, share) in choices {
            let (target, target_port) =
                match backend_target(traffic, service, port, matched.as_ref(), backend) {
                    Ok(target) => target,
                    Err(failure) => {
                        out.failures.push(VerdictView::of_failure(failure));
                        continue;
                    }
                };
            let endpoints = target.endpoints(target_port);
            if endpoints.is_empty() {
                out.failures.push(VerdictView::of_failure((
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    format!("{} port {target_port} has no endpoints", target.key),
                )));
            }
            for endpoint in endpoints {
                // As the pooled upstream connector: HBONE to meshed addresses.
                let expected =
                    if self.hbone_source { (self.state.identity_of)(endpoint.addr.ip()) } else { None };
                let view = self.endpoint(
                    Some(&target.key),
                    share,
                    Some(endpoint.workload.clone()),
                    endpoint.addr,
                    expected,
                    Some(&forwarded),
                    true,
                );
                out.endpoints.push(view);
            }
        }
    }

    /// One endpoint: how the source reaches it and what its destination proxy decides.
    /// `expected`: the identity it must present (HBONE), none for plaintext. `source_http`: the
    /// source proxy itself sends the request (so a refused stream becomes its 503).
    #[allow(clippy::too_many_arguments, reason = "one endpoint's whole context, used by three callers")]
    pub(super) fn endpoint(
        &self,
        service: Option<&str>,
        share: Option<f64>,
        workload: Option<String>,
        addr: SocketAddr,
        expected: Option<SpiffeId>,
        request: Option<&Http>,
        source_http: bool,
    ) -> EndpointView {
        let pod = self.pod_at(addr.ip());
        let hbone = expected.is_some();
        let (inbound, verdict) = self.inbound(pod, addr, hbone, request, source_http);
        EndpointView {
            service: service.map(str::to_owned),
            share,
            workload: workload.or_else(|| pod.map(|p| p.key.to_string())),
            address: addr,
            node: pod.and_then(|p| p.node.clone()),
            identity: expected.as_ref().map(ToString::to_string),
            transport: if hbone { "hbone" } else { "plaintext" },
            inbound,
            verdict,
        }
    }

    /// The destination's proxy (`hbone_inbound` / `inbound`, then `http::inbound` per request).
    fn inbound(
        &self,
        pod: Option<&Pod>,
        addr: SocketAddr,
        hbone: bool,
        request: Option<&Http>,
        source_http: bool,
    ) -> (InboundView, VerdictView) {
        let caller_principal = if hbone { self.caller.principal() } else { None };
        let mut view = InboundView {
            node: self.state.node.to_owned(),
            enforced: false,
            caller_ip: self.caller.ip,
            caller_principal: caller_principal.map(str::to_owned),
            mtls_mode: pod.and_then(|p| p.mtls_mode).map(|m| match m {
                MtlsMode::Strict => "STRICT",
                MtlsMode::Permissive => "PERMISSIVE",
            }),
            parsed_as: "none",
            policies: Vec::new(),
            decision: None,
            notes: Vec::new(),
        };
        let Some(pod) = pod.filter(|p| p.meshed) else {
            view.notes.push("the destination is not in the mesh: no proxy enforces policies there".into());
            return (view, VerdictView::allowed("the destination is outside the mesh: delivered as is"));
        };
        view.enforced = true;
        let caller = if hbone { self.caller.clone() } else { self.caller.in_plaintext() };
        if !hbone && refuses_plaintext(self.state.mesh_ca, pod.mtls_mode.unwrap_or_default()) {
            view.notes.push("plaintext reaches a STRICT pod's inbound listener: refused".into());
            let reason = format!(
                "{} is STRICT mTLS and the connection arrives in plaintext (the source is not captured): reset",
                pod.key
            );
            return (view, VerdictView::failed(Effect::Reset, None, reason));
        }
        let workload = Workload { ip: addr.ip(), namespace: &pod.key.namespace };
        let traffic = self.state.traffic;
        let parsing = inbound_parsing(traffic, workload, addr.port());
        let read_as = parsing.map_or(Protocol::Tcp, |declared| protocol::decide(declared, self.sniffed));
        if let Some(declared) = parsing {
            view.notes.push(format!(
                "parsed: {} (port {} declared {declared:?})",
                if traffic.policies_for(addr.ip(), &pod.key.namespace).iter().any(|p| p.has_l7()) {
                    "a policy has HTTP rules"
                } else {
                    "the port is declared HTTP"
                },
                addr.port()
            ));
        }
        if read_as.is_http() {
            view.parsed_as = "http";
            let Some(request) = request else {
                return (
                    view,
                    VerdictView::failed(
                        Effect::BadRequest,
                        None,
                        "the port is declared HTTP and the bytes are not: the destination proxy answers 400",
                    ),
                );
            };
            let decision = decide_request(
                traffic,
                workload,
                &caller,
                addr.port(),
                &request.attributes(),
                Detail::Explained,
            );
            let verdict = if decision.verdict == authz::Verdict::Deny {
                VerdictView::failed(
                    Effect::Forbidden,
                    decision.policy.clone(),
                    format!("403 RBAC: access denied: {}", decision.reason),
                )
            } else {
                VerdictView::allowed(decision.reason.clone())
            };
            record(&mut view, decision);
            return (view, verdict);
        }
        view.parsed_as = "tcp";
        let decision = decide_connection(traffic, workload, &caller, addr.port(), false, Detail::Explained);
        // Policies whose HTTP rules apply to this port (`l7_ports` empty: to any port).
        let needing: Vec<&str> = traffic
            .policies_for(addr.ip(), &pod.key.namespace)
            .into_iter()
            .filter(|p| p.has_l7() && (p.l7_ports().is_empty() || p.l7_ports().contains(&addr.port())))
            .map(|p| p.key())
            .collect();
        if !needing.is_empty() {
            view.notes.push(format!(
                "needs HTTP: {} has rules with HTTP parts, which cannot be checked on a connection that \
                 is not HTTP: DENY ones count as matching, ALLOW ones never match (fail closed)",
                needing.join(", ")
            ));
        }
        let verdict = if decision.verdict == authz::Verdict::Deny {
            let (effect, how) = match (source_http, parsing.is_some(), hbone) {
                (true, _, _) => (Effect::Unavailable, "the source proxy's request fails: 503"),
                (false, false, _) => (Effect::Reset, "refused at once: the client's connection is reset"),
                (false, true, true) => (Effect::Closed, "refused after detection: the stream is closed"),
                (false, true, false) => (Effect::Reset, "refused after detection: the connection is reset"),
            };
            VerdictView::failed(effect, decision.policy.clone(), format!("{}: {how}", decision.reason))
        } else {
            VerdictView::allowed(decision.reason.clone())
        };
        record(&mut view, decision);
        (view, verdict)
    }
}

fn record(view: &mut InboundView, decision: Decision) {
    view.policies = decision.evaluated;
    view.decision = Some(DecisionView {
        verdict: decision.verdict,
        policy: decision.policy,
        reason: decision.reason,
        audited: decision.audited,
    });
}
