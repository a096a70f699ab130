//! A Service's `nodemesh.io/*` traffic annotations → how the source-side proxy balances,
//! limits and ejects its endpoints. A bad value is a problem naming the annotation; the
//! Service itself still translates (without that setting).

use std::collections::BTreeMap;

use mesh_api::workload::v1::{CircuitBreaker, LoadBalancerMode, LoadBalancing, OutlierDetection};

use super::duration::parse_millis;

pub const LOAD_BALANCER: &str = "nodemesh.io/load-balancer";
pub const MAX_CONNECTIONS: &str = "nodemesh.io/max-connections";
pub const MAX_PENDING_REQUESTS: &str = "nodemesh.io/max-pending-requests";
pub const MAX_REQUESTS_PER_CONNECTION: &str = "nodemesh.io/max-requests-per-connection";
pub const OUTLIER_CONSECUTIVE_ERRORS: &str = "nodemesh.io/outlier-consecutive-errors";
pub const OUTLIER_BASE_EJECTION: &str = "nodemesh.io/outlier-base-ejection";
pub const OUTLIER_MAX_EJECTION: &str = "nodemesh.io/outlier-max-ejection";

/// What a Service's annotations ask of the proxies sending to it; `None`: not set, the
/// proxy's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub load_balancing: Option<LoadBalancing>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub outlier_detection: Option<OutlierDetection>,
}

/// Reads the traffic annotations; returns the policy of the valid ones and a message for
/// each bad one.
pub(super) fn traffic_policy(annotations: Option<&BTreeMap<String, String>>) -> (TrafficPolicy, Vec<String>) {
    let mut problems = Vec::new();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
    let mut count = |key: &str| -> Option<u32> {
        let value = get(key)?;
        value
            .parse()
            .inspect_err(|_| problems.push(format!("annotation {key}: {value:?} is not a whole number")))
            .ok()
    };
    let max_connections = count(MAX_CONNECTIONS);
    let max_pending_requests = count(MAX_PENDING_REQUESTS);
    let max_requests_per_connection = count(MAX_REQUESTS_PER_CONNECTION);
    let consecutive_errors = count(OUTLIER_CONSECUTIVE_ERRORS);
    let mut policy = TrafficPolicy::default();
    if let Some(value) = get(LOAD_BALANCER) {
        match value {
            "least-request" => policy.load_balancing = Some(mode(LoadBalancerMode::LeastRequest)),
            "round-robin" => policy.load_balancing = Some(mode(LoadBalancerMode::RoundRobin)),
            other => problems.push(format!(
                "annotation {LOAD_BALANCER}: must be least-request or round-robin, not {other:?}"
            )),
        }
    }
    if max_connections.is_some() || max_pending_requests.is_some() || max_requests_per_connection.is_some() {
        policy.circuit_breaker = Some(CircuitBreaker {
            max_connections: max_connections.unwrap_or_default(),
            max_pending_requests: max_pending_requests.unwrap_or_default(),
            max_requests_per_connection: max_requests_per_connection.unwrap_or_default(),
        });
    }
    let mut duration = |key: &str| -> Option<u64> {
        let value = get(key)?;
        parse_millis(value).inspect_err(|err| problems.push(format!("annotation {key}: {err}"))).ok()
    };
    let base_ejection_ms = duration(OUTLIER_BASE_EJECTION);
    let max_ejection_ms = duration(OUTLIER_MAX_EJECTION);
    if let (Some(base), Some(max)) = (base_ejection_ms, max_ejection_ms)
        && max < base
    {
        problems.push(format!(
            "annotation {OUTLIER_MAX_EJECTION}: {max} ms is shorter than {OUTLIER_BASE_EJECTION} ({base} ms)"
        ));
    }
    if consecutive_errors.is_some() || base_ejection_ms.is_some() || max_ejection_ms.is_some() {
        policy.outlier_detection = Some(OutlierDetection {
            consecutive_errors: consecutive_errors.unwrap_or_default(),
            base_ejection_ms: base_ejection_ms.unwrap_or_default(),
            max_ejection_ms: max_ejection_ms.unwrap_or_default(),
        });
    }
    (policy, problems)
}

fn mode(mode: LoadBalancerMode) -> LoadBalancing {
    LoadBalancing { mode: mode.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(annotations: &[(&str, &str)]) -> (TrafficPolicy, Vec<String>) {
        let map = annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        traffic_policy(Some(&map))
    }

    #[test]
    fn annotations_become_the_services_traffic_policy() {
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, TrafficPolicy);
        let cases: Vec<Case> = vec![
            ("none: the proxy's defaults", vec![], TrafficPolicy::default()),
            (
                "round robin",
                vec![(LOAD_BALANCER, "round-robin")],
                TrafficPolicy {
                    load_balancing: Some(mode(LoadBalancerMode::RoundRobin)),
                    ..Default::default()
                },
            ),
            (
                "least request, explicitly",
                vec![(LOAD_BALANCER, "least-request")],
                TrafficPolicy {
                    load_balancing: Some(mode(LoadBalancerMode::LeastRequest)),
                    ..Default::default()
                },
            ),
            (
                "one limit set, the others the proxy's",
                vec![(MAX_PENDING_REQUESTS, "64")],
                TrafficPolicy {
                    circuit_breaker: Some(CircuitBreaker { max_pending_requests: 64, ..Default::default() }),
                    ..Default::default()
                },
            ),
            (
                "every limit",
                vec![
                    (MAX_CONNECTIONS, "100"),
                    (MAX_PENDING_REQUESTS, " 10 "),
                    (MAX_REQUESTS_PER_CONNECTION, "1"),
                ],
                TrafficPolicy {
                    circuit_breaker: Some(CircuitBreaker {
                        max_connections: 100,
                        max_pending_requests: 10,
                        max_requests_per_connection: 1,
                    }),
                    ..Default::default()
                },
            ),
            (
                "outlier detection with durations",
                vec![
                    (OUTLIER_CONSECUTIVE_ERRORS, "5"),
                    (OUTLIER_BASE_EJECTION, "30s"),
                    (OUTLIER_MAX_EJECTION, "5m"),
                ],
                TrafficPolicy {
                    outlier_detection: Some(OutlierDetection {
                        consecutive_errors: 5,
                        base_ejection_ms: 30_000,
                        max_ejection_ms: 300_000,
                    }),
                    ..Default::default()
                },
            ),
        ];
        for (case, annotations, expected) in cases {
            let (policy, problems) = read(&annotations);
            assert!(problems.is_empty(), "{case}: {problems:?}");
            assert_eq!(policy, expected, "{case}");
        }
    }

    #[test]
    fn a_bad_value_names_its_annotation_and_the_good_ones_still_count() {
        let cases = [
            (
                LOAD_BALANCER,
                "random",
                "annotation nodemesh.io/load-balancer: must be least-request or round-robin, not \"random\"",
            ),
            (MAX_CONNECTIONS, "-1", "annotation nodemesh.io/max-connections: \"-1\" is not a whole number"),
            (MAX_PENDING_REQUESTS, "lots", "annotation nodemesh.io/max-pending-requests: \"lots\""),
            (MAX_REQUESTS_PER_CONNECTION, "1.5", "annotation nodemesh.io/max-requests-per-connection"),
            (OUTLIER_CONSECUTIVE_ERRORS, "99999999999", "annotation nodemesh.io/outlier-consecutive-errors"),
            (
                OUTLIER_BASE_EJECTION,
                "30",
                "annotation nodemesh.io/outlier-base-ejection: \"30\" is not a duration",
            ),
            (
                OUTLIER_MAX_EJECTION,
                "1d",
                "annotation nodemesh.io/outlier-max-ejection: \"1d\" is not a duration",
            ),
        ];
        for (key, value, expected) in cases {
            let good =
                if key == LOAD_BALANCER { (MAX_CONNECTIONS, "7") } else { (LOAD_BALANCER, "round-robin") };
            let (policy, problems) = read(&[(key, value), good]);
            let problems = problems.join("; ");
            assert!(problems.contains(expected), "{key}: expected {expected:?} in {problems:?}");
            let still = if key == LOAD_BALANCER {
                policy.circuit_breaker.is_some()
            } else {
                policy.load_balancing.is_some()
            };
            assert!(still, "{key}: the valid annotation still applies");
        }
        let (_, problems) = read(&[(OUTLIER_BASE_EJECTION, "1m"), (OUTLIER_MAX_EJECTION, "30s")]);
        assert_eq!(
            problems,
            [
                "annotation nodemesh.io/outlier-max-ejection: 30000 ms is shorter than nodemesh.io/outlier-base-ejection (60000 ms)"
            ]
        );
    }
}
