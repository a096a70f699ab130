//! Authorization on the destination side: who is calling (from the mTLS handshake, or nobody
//! for plaintext) and what the pod's policies say about it, per connection and, for HTTP, per
//! request. Decisions are `mesh_policy`'s pure functions; this module gathers their inputs and
//! keeps open connections honest when policies change.

use std::net::IpAddr;

use mesh_api::SpiffeId;
use mesh_manifests::MtlsMode;
use mesh_policy::authz::{self, Decision, Peer, Verdict};

use crate::{
    pod::PodContext,
    traffic::{AppProtocol, Traffic},
};

/// The source of a connection as the destination knows it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub ip: IpAddr,
    /// The mTLS peer's identity; `None` for plaintext (PERMISSIVE pods).
    pub identity: Option<SpiffeId>,
    /// `ns/name` of the workload at `ip`, when the node knows it (for telemetry only: never
    /// trusted for authorization, which uses the identity).
    pub workload: Option<String>,
    /// The identity in Istio's principal form, formatted once (every request is checked).
    principal: Option<String>,
}

impl Caller {
    pub fn new(traffic: &Traffic, ip: IpAddr, identity: Option<SpiffeId>) -> Self {
        let workload = traffic.workload_at(ip).map(ToString::to_string);
        let principal = identity.as_ref().map(|id| {
            let uri = id.to_string();
            mesh_policy::principal_of(&uri).unwrap_or(&uri).to_owned()
        });
        Caller { ip, identity, workload, principal }
    }

    /// Istio's principal form: the SPIFFE ID without `spiffe://`.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The same source arriving in plaintext: it proves no identity.
    pub fn in_plaintext(&self) -> Caller {
        Caller { identity: None, principal: None, ..self.clone() }
    }

    /// The caller as the policy decisions see it.
    fn peer(&self) -> Peer<'_> {
        Peer { ip: self.ip, principal: self.principal(), namespace: self.namespace() }
    }

    /// The namespace the caller's identity proves (never the address's: that is not proof).
    pub fn namespace(&self) -> Option<&str> {
        self.identity.as_ref().map(SpiffeId::namespace)
    }
}

/// The workload a decision is about: its address and namespace (which policies apply to it).
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub ip: IpAddr,
    pub namespace: &'a str,
}

impl<'a> Workload<'a> {
    pub fn of(pod: &'a PodContext) -> Self {
        Workload { ip: IpAddr::V4(pod.ip), namespace: &pod.key.namespace }
    }
}

/// How much a decision carries: the verdict only (the proxy, per connection and request) or
/// also every policy's evaluation with reasons (`meshctl explain`, through the admin endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    Verdict,
    Explained,
}

/// Decides a connection to `workload`'s `port`; `http` says whether it will be parsed as HTTP.
pub fn decide_connection(
    traffic: &Traffic,
    workload: Workload<'_>,
    caller: &Caller,
    port: u16,
    http: bool,
    detail: Detail,
) -> Decision {
    let policies = traffic.policies_for(workload.ip, workload.namespace);
    let peer = caller.peer();
    match detail {
        Detail::Verdict => authz::check_connection(&policies, &peer, port, http),
        Detail::Explained => authz::explain_connection(&policies, &peer, port, http),
    }
}

/// Decides one HTTP request to `workload`'s `port`.
pub fn decide_request(
    traffic: &Traffic,
    workload: Workload<'_>,
    caller: &Caller,
    port: u16,
    request: &authz::Request<'_>,
    detail: Detail,
) -> Decision {
    let policies = traffic.policies_for(workload.ip, workload.namespace);
    let peer = caller.peer();
    match detail {
        Detail::Verdict => authz::check_request(&policies, &peer, port, request),
        Detail::Explained => authz::explain_request(&policies, &peer, port, request),
    }
}

/// Decides a connection to `pod`'s `port`; `http` says whether it will be parsed as HTTP.
pub fn check_connection(
    pod: &PodContext,
    traffic: &Traffic,
    caller: &Caller,
    port: u16,
    http: bool,
) -> Decision {
    decide_connection(traffic, Workload::of(pod), caller, port, http, Detail::Verdict)
}

/// Returns how an inbound connection to `port` of `workload` is read: `None` relayed as
/// opaque TCP and decided at once; `Some(declared)` handed to protocol detection with the
/// port's declaration (then HTTP is decided request by request). It is parsed when any policy
/// of the workload has HTTP conditions (they can only be checked on requests) or the port is
/// declared HTTP.
pub fn inbound_parsing(traffic: &Traffic, workload: Workload<'_>, port: u16) -> Option<AppProtocol> {
    let declared = traffic.declared_protocol(workload.ip, port);
    let needs_http = traffic.policies_for(workload.ip, workload.namespace).iter().any(|p| p.has_l7());
    (needs_http || matches!(declared, AppProtocol::Http1 | AppProtocol::Http2)).then_some(declared)
}

/// Returns whether plaintext arriving at a pod's inbound listener is refused: with a mesh CA,
/// meshed peers come through HBONE, so plaintext comes from outside the mesh, which a STRICT
/// pod refuses.
pub fn refuses_plaintext(mesh_ca: bool, mode: MtlsMode) -> bool {
    mesh_ca && mode == MtlsMode::Strict
}

/// Decides one HTTP request.
pub fn check_request(
    pod: &PodContext,
    traffic: &Traffic,
    caller: &Caller,
    port: u16,
    request: &authz::Request<'_>,
) -> Decision {
    decide_request(traffic, Workload::of(pod), caller, port, request, Detail::Verdict)
}

/// Logs what a decision means; AUDIT matches are logged whatever the verdict.
pub fn log_decision(decision: &Decision, caller: &Caller, pod: &PodContext, port: u16, what: &str) {
    for audited in &decision.audited {
        tracing::info!(
            target: "audit", policy = %audited, src.identity = ?caller.principal(), src.addr = %caller.ip,
            dst.identity = %pod.identity, dst.port = port, what, "AUDIT policy matched"
        );
    }
    if decision.verdict == Verdict::Deny {
        tracing::warn!(
            src.identity = ?caller.principal(), src.addr = %caller.ip, dst.identity = %pod.identity,
            dst.port = port, policy = ?decision.policy, reason = %decision.reason, what, "denied by policy"
        );
    }
}

/// Resolves once a policy change denies this (L4) connection; it is then closed. Connections
/// parsed as HTTP need no watch: each request is checked against the policies in force.
pub async fn until_revoked(pod: &PodContext, caller: &Caller, port: u16) -> Decision {
    let mut changes = pod.mesh.changes();
    loop {
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let traffic = pod.mesh.traffic();
        let decision = check_connection(pod, &traffic, caller, port, false);
        if decision.verdict == Verdict::Deny {
            return decision;
        }
    }
}
