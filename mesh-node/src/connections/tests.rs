use std::net::SocketAddr;

use super::*;

fn table() -> (Arc<Connections>, Registry) {
    let mut registry = Registry::default();
    let tcp = TcpMetrics::register(&mut registry);
    (Arc::new(Connections::new(tcp)), registry)
}

fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn open(table: &Arc<Connections>, direction: Direction, source: &str) -> (Tracked, Counter, Counter) {
    let (sent, received) = (Counter::default(), Counter::default());
    let tracked = table.open(
        direction,
        &Arc::from("demo"),
        &Arc::from("a1"),
        addr(source),
        (sent.clone(), received.clone()),
    );
    (tracked, sent, received)
}

#[test]
fn a_connection_is_listed_while_open_with_live_counts_and_removed_on_drop() {
    let (table, _) = table();
    let (conn, pod_sent, pod_received) = open(&table, Direction::Outbound, "10.1.1.2:40000");
    conn.set_destination(addr("10.1.2.2:8080"));
    conn.set_mtls(
        "spiffe://cluster.local/ns/demo/sa/a1".into(),
        "spiffe://cluster.local/ns/demo/sa/b1".into(),
    );
    let (sent, received) = conn.meters();
    sent.add(100);
    received.add(7);
    let listed = table.list();
    assert_eq!(listed.len(), 1);
    let row = &listed[0];
    assert_eq!(row.direction, "outbound");
    assert_eq!(row.pod, "demo/a1");
    assert_eq!(row.source, "10.1.1.2:40000");
    assert_eq!(row.destination.as_deref(), Some("10.1.2.2:8080"));
    assert_eq!(row.source_identity.as_deref(), Some("spiffe://cluster.local/ns/demo/sa/a1"));
    assert_eq!(row.destination_identity.as_deref(), Some("spiffe://cluster.local/ns/demo/sa/b1"));
    assert_eq!(row.transport, Transport::Hbone);
    assert_eq!((row.bytes_sent, row.bytes_received), (100, 7));
    assert_eq!((pod_sent.get(), pod_received.get()), (100, 7));
    let json = serde_json::to_value(row).expect("json");
    for key in [
        "id",
        "direction",
        "pod",
        "source",
        "destination",
        "source_identity",
        "destination_identity",
        "service",
        "transport",
        "protocol",
        "policy",
        "opened_at",
        "duration_ms",
        "bytes_sent",
        "bytes_received",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(json.as_object().map(|o| o.len()), Some(15), "exactly the agreed keys: {json}");
    assert_eq!(json["transport"], "hbone");
    assert_eq!(json["protocol"], "tcp");
    assert!(json["policy"].is_null());
    drop((sent, received));
    drop(conn);
    assert!(table.list().is_empty());
}

#[test]
fn inbound_identities_are_swapped_into_source_and_destination() {
    let (table, _) = table();
    let (conn, _, _) = open(&table, Direction::Inbound, "10.1.1.2:50000");
    conn.set_destination(addr("10.1.2.2:8080"));
    conn.set_mtls("spiffe://td/ns/demo/sa/b1".into(), "spiffe://td/ns/demo/sa/a1".into());
    conn.set_policy(PolicyResult::Allow);
    let row = &table.list()[0];
    assert_eq!(row.source_identity.as_deref(), Some("spiffe://td/ns/demo/sa/a1"));
    assert_eq!(row.destination_identity.as_deref(), Some("spiffe://td/ns/demo/sa/b1"));
    assert_eq!(serde_json::to_value(row).expect("json")["policy"], "allow");
}

#[test]
fn istio_counters_follow_istio_directions_on_both_reporters() {
    let (table, registry) = table();
    let (out, _, _) = open(&table, Direction::Outbound, "10.1.1.2:40000");
    out.set_destination(addr("10.1.2.2:8080"));
    out.set_remote_workload(Some("demo/b1".into()));
    out.set_mtls("spiffe://td/ns/demo/sa/a1".into(), "spiffe://td/ns/demo/sa/b1".into());
    let (pod_sent, pod_received) = out.meters();
    pod_sent.add(1000); // request direction
    pod_received.add(30); // response direction
    let text = render(&registry);
    let source = r#"reporter="source",source_workload="a1",source_workload_namespace="demo",source_principal="spiffe://td/ns/demo/sa/a1",destination_workload="b1",destination_workload_namespace="demo",destination_principal="spiffe://td/ns/demo/sa/b1",destination_service="unknown",request_protocol="tcp",response_flags="-",connection_security_policy="mutual_tls""#;
    assert!(text.contains(&format!("istio_tcp_received_bytes_total{{{source}}} 1000")), "{text}");
    assert!(text.contains(&format!("istio_tcp_sent_bytes_total{{{source}}} 30")), "{text}");
    assert!(text.contains(&format!("istio_tcp_connections_opened_total{{{source}}} 1")), "{text}");
    assert!(!text.contains("istio_tcp_connections_closed_total{"), "{text}");

    let (inb, _, _) = open(&table, Direction::Inbound, "10.1.1.2:50000");
    inb.set_destination(addr("10.1.1.9:8080"));
    let (pod_sent2, pod_received2) = inb.meters();
    pod_received2.add(1000); // request direction
    pod_sent2.add(30); // response direction
    drop((pod_sent, pod_received, pod_sent2, pod_received2));
    drop(inb);
    drop(out);
    let text = render(&registry);
    let destination = r#"reporter="destination",source_workload="unknown",source_workload_namespace="unknown",source_principal="unknown",destination_workload="a1",destination_workload_namespace="demo",destination_principal="unknown",destination_service="unknown",request_protocol="tcp",response_flags="-",connection_security_policy="none""#;
    assert!(text.contains(&format!("istio_tcp_received_bytes_total{{{destination}}} 1000")), "{text}");
    assert!(text.contains(&format!("istio_tcp_sent_bytes_total{{{destination}}} 30")), "{text}");
    assert!(text.contains(&format!("istio_tcp_connections_closed_total{{{destination}}} 1")), "{text}");
    assert!(text.contains(&format!("istio_tcp_connections_closed_total{{{source}}} 1")), "{text}");
}

#[test]
fn a_failed_connection_counts_open_and_close_with_its_flags_and_capture_failures() {
    let (table, registry) = table();
    let (conn, _, _) = open(&table, Direction::Outbound, "10.1.1.2:40000");
    conn.set_destination(addr("10.1.2.2:8080"));
    conn.fail(&ProxyError::ConnectTimeout {
        dst: addr("10.1.2.2:8080"),
        timeout: std::time::Duration::from_secs(1),
    });
    drop(conn);
    let text = render(&registry);
    assert!(text.contains(r#"response_flags="UF",connection_security_policy="none"} 1"#), "{text}");
    assert_eq!(text.matches("istio_tcp_connections_opened_total{").count(), 1, "{text}");

    let (uncaptured, _, _) = open(&table, Direction::Outbound, "10.1.1.2:40001");
    uncaptured.fail(&ProxyError::NoOriginalDestination);
    drop(uncaptured);
    let failures = table
        .capture_failures()
        .get_or_create(&CaptureFailureLabels { reason: CaptureFailure::NoOriginalDestination })
        .get();
    assert_eq!(failures, 1);
    // Without a destination it never became an Istio connection.
    assert_eq!(render(&registry).matches("istio_tcp_connections_opened_total{").count(), 1);
}

#[test]
fn denied_connections_show_the_deny_and_rbac() {
    let (table, registry) = table();
    let (conn, _, _) = open(&table, Direction::Inbound, "10.1.1.2:40000");
    conn.set_destination(addr("10.1.2.2:8080"));
    conn.fail(&ProxyError::Denied("policy demo/deny".into()));
    assert_eq!(serde_json::to_value(&table.list()[0]).expect("json")["policy"], "deny");
    drop(conn);
    assert!(render(&registry).contains(r#"response_flags="RBAC""#));
}

#[test]
fn times_are_rfc3339_utc() {
    use std::time::{Duration, UNIX_EPOCH};
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
    assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "2026-12-31T23:59:59.000Z");
}
