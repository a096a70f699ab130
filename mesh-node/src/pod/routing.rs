//! Per-pod-netns settings that route delivery replies back to the proxy (no iptables).
//!
//! The proxy delivers inbound connections to the app from the client's own address
//! (`IP_TRANSPARENT`) with mark [`DELIVERY_MARK`]. With `tcp_fwmark_accept` the app's accepted
//! socket inherits that mark; a rule sends marked packets to a table whose only route is
//! "everything is local", so replies reach the proxy's socket instead of leaving the pod.
//! `fwmark_reflect` marks the kernel's own resets too, so a refused delivery fails fast.

use std::{io, net::Ipv4Addr};

use futures_util::TryStreamExt as _;
use mesh_ebpf_common::{DELIVERY_MARK, DELIVERY_ROUTE_TABLE};
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

/// Priority of the delivery rule: before the main table (32766).
const RULE_PRIORITY: u32 = 32_764;
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot set {sysctl} in the pod netns: {source}")]
    Sysctl { sysctl: &'static str, source: io::Error },
    #[error("netlink {action}: {source}")]
    Netlink { action: &'static str, source: rtnetlink::Error },
}

const SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.tcp_fwmark_accept", "/proc/sys/net/ipv4/tcp_fwmark_accept"),
    ("net.ipv4.fwmark_reflect", "/proc/sys/net/ipv4/fwmark_reflect"),
];

/// Turns on mark inheritance and reflection. Must run on a thread inside the pod's netns:
/// `/proc/sys/net` shows the netns of the thread that opens it.
pub fn enable_mark_inheritance() -> Result<(), RoutingError> {
    for (sysctl, path) in SYSCTLS {
        std::fs::write(path, "1").map_err(|source| RoutingError::Sysctl { sysctl, source })?;
    }
    Ok(())
}

fn is_delivery_rule(rule: &RuleMessage) -> bool {
    let has = |want: &RuleAttribute| rule.attributes.iter().any(|a| a == want);
    has(&RuleAttribute::FwMark(DELIVERY_MARK))
        && (rule.header.table == DELIVERY_ROUTE_TABLE as u8
            || has(&RuleAttribute::Table(DELIVERY_ROUTE_TABLE)))
}

async fn delivery_rules(handle: &Handle) -> Result<Vec<RuleMessage>, RoutingError> {
    handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_filter(|r| std::future::ready(is_delivery_rule(r)))
        .try_collect()
        .await
        .map_err(|source| RoutingError::Netlink { action: "list rules", source })
}

fn local_route() -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(LOOPBACK_IFINDEX)
        .table_id(DELIVERY_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build()
}

/// Installs the delivery rule and route through a netlink handle whose socket lives in the
/// pod's netns. Idempotent, so a restarted mesh-node re-adopts pods without duplicates.
pub async fn install(handle: &Handle) -> Result<(), RoutingError> {
    handle
        .route()
        .add(local_route())
        .replace()
        .execute()
        .await
        .map_err(|source| RoutingError::Netlink { action: "add local route to delivery table", source })?;
    if delivery_rules(handle).await?.is_empty() {
        handle
            .rule()
            .add()
            .v4()
            .fw_mark(DELIVERY_MARK)
            .table_id(DELIVERY_ROUTE_TABLE)
            .priority(RULE_PRIORITY)
            .action(RuleAction::ToTable)
            .execute()
            .await
            .map_err(|source| RoutingError::Netlink { action: "add delivery rule", source })?;
    }
    Ok(())
}

/// Removes the delivery rule and route.
pub async fn remove(handle: &Handle) -> Result<(), RoutingError> {
    for rule in delivery_rules(handle).await? {
        handle
            .rule()
            .del(rule)
            .execute()
            .await
            .map_err(|source| RoutingError::Netlink { action: "delete delivery rule", source })?;
    }
    match handle.route().del(local_route()).execute().await {
        Ok(()) => Ok(()),
        // Already gone (ESRCH): nothing to remove.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        Err(source) => Err(RoutingError::Netlink { action: "delete delivery route", source }),
    }
}
