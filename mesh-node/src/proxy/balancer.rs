//! Load balancing and resilience on the source side: which endpoint of a service gets the next
//! request or connection, which endpoints are ejected for failing, and when a service is
//! overloaded (circuit breaking). State is per service and shared by every pod of the node.
//!
//! Picking is least-request power-of-two-choices by default (two random healthy endpoints, the
//! one with fewer requests in flight wins), round-robin when the service asks for it. An
//! endpoint failing `consecutive_errors` times in a row is ejected for `base × times ejected`
//! (capped); the last healthy endpoint is never ejected, so a service never goes dark because
//! of ejection alone.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use serde::Serialize;

use crate::{
    pod::lock,
    traffic::{Endpoint, Resilience},
};

#[derive(Debug, Default)]
pub struct Balancers {
    services: Mutex<HashMap<String, Arc<ServiceBalancer>>>,
}

impl Balancers {
    /// The live state of `service` (`ns/hostname`).
    pub fn get(&self, service: &str) -> Arc<ServiceBalancer> {
        lock(&self.services).entry(service.to_owned()).or_default().clone()
    }

    /// Every service's endpoint states, for the admin endpoint.
    pub fn snapshot(&self, now: Instant) -> HashMap<String, Vec<EndpointHealth>> {
        lock(&self.services).iter().map(|(k, b)| (k.clone(), b.snapshot(now))).collect()
    }
}

#[derive(Debug, Default, Clone)]
struct EndpointState {
    in_flight: usize,
    consecutive_errors: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

impl EndpointState {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// One endpoint as the admin endpoint shows it.
#[derive(Debug, Serialize)]
pub struct EndpointHealth {
    pub endpoint: SocketAddr,
    pub in_flight: usize,
    pub consecutive_errors: u32,
    pub times_ejected: u32,
    /// Milliseconds left in the current ejection, if ejected.
    pub ejected_for_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct ServiceBalancer {
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
    cursor: AtomicUsize,
    pending: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
}

/// How an attempt at an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx answer, a refused or reset connection, a timeout.
    Failure,
}

/// What happened to an endpoint's health after an outcome was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthChange {
    None,
    Ejected { for_ms: u64 },
}

/// Counts a request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<ServiceBalancer>,
    endpoint: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(state) = lock(&self.balancer.endpoints).get_mut(&self.endpoint) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// A slot under a counted limit (pending requests, connections), released when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn take_slot(counter: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
        .ok()
        .map(|_| Slot(counter.clone()))
}

impl ServiceBalancer {
    /// Admits a request unless `max_pending_requests` are already in flight (circuit open).
    pub fn admit_request(&self, resilience: &Resilience) -> Option<Slot> {
        take_slot(&self.pending, resilience.max_pending_requests)
    }

    /// Requests in flight to the service from this node.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Retries in flight to the service from this node.
    pub fn retries_in_flight(&self) -> usize {
        self.retries.load(Ordering::Acquire)
    }

    /// Counts a retry in flight until the returned slot is dropped.
    pub fn retrying(&self) -> Slot {
        self.retries.fetch_add(1, Ordering::AcqRel);
        Slot(self.retries.clone())
    }

    /// Admits a new upstream connection unless `max_connections` are open.
    pub fn admit_connection(&self, resilience: &Resilience) -> Option<Slot> {
        take_slot(&self.connections, resilience.max_connections)
    }

    /// Picks an endpoint for the next request or connection and counts it in flight. `rolls` are
    /// two uniform random numbers (power of two choices). Ejected endpoints are skipped unless
    /// every endpoint is ejected.
    pub fn pick(
        self: &Arc<Self>,
        endpoints: &[Endpoint],
        resilience: &Resilience,
        rolls: (u32, u32),
        now: Instant,
    ) -> Option<(Endpoint, InFlight)> {
        if endpoints.is_empty() {
            return None;
        }
        let mut states = lock(&self.endpoints);
        let healthy: Vec<&Endpoint> =
            endpoints.iter().filter(|e| !states.get(&e.addr).is_some_and(|s| s.ejected(now))).collect();
        let candidates: Vec<&Endpoint> =
            if healthy.is_empty() { endpoints.iter().collect() } else { healthy };
        let chosen = if resilience.round_robin {
            candidates[self.cursor.fetch_add(1, Ordering::Relaxed) % candidates.len()]
        } else {
            let n = candidates.len();
            let first = rolls.0 as usize % n;
            let second = if n > 1 { (first + 1 + rolls.1 as usize % (n - 1)) % n } else { first };
            let load = |e: &Endpoint| states.get(&e.addr).map_or(0, |s| s.in_flight);
            let (a, b) = (candidates[first], candidates[second]);
            if load(b) < load(a) { b } else { a }
        };
        states.entry(chosen.addr).or_default().in_flight += 1;
        Some((chosen.clone(), InFlight { balancer: self.clone(), endpoint: chosen.addr }))
    }

    /// Records how an attempt ended; may eject the endpoint. `endpoints` is the service's
    /// current endpoint list (ejection never leaves it without a healthy endpoint).
    pub fn report(
        &self,
        endpoint: SocketAddr,
        outcome: Outcome,
        endpoints: &[Endpoint],
        resilience: &Resilience,
        now: Instant,
    ) -> HealthChange {
        let mut states = lock(&self.endpoints);
        let healthy_others = endpoints
            .iter()
            .filter(|e| e.addr != endpoint && !states.get(&e.addr).is_some_and(|s| s.ejected(now)))
            .count();
        let state = states.entry(endpoint).or_default();
        match outcome {
            Outcome::Success => {
                state.consecutive_errors = 0;
                HealthChange::None
            }
            Outcome::Failure => {
                state.consecutive_errors += 1;
                if state.consecutive_errors < resilience.consecutive_errors
                    || state.ejected(now)
                    || healthy_others == 0
                {
                    return HealthChange::None;
                }
                state.times_ejected += 1;
                state.consecutive_errors = 0;
                let interval =
                    resilience.base_ejection.saturating_mul(state.times_ejected).min(resilience.max_ejection);
                state.ejected_until = Some(now + interval);
                HealthChange::Ejected { for_ms: interval.as_millis() as u64 }
            }
        }
    }

    fn snapshot(&self, now: Instant) -> Vec<EndpointHealth> {
        let mut list: Vec<EndpointHealth> = lock(&self.endpoints)
            .iter()
            .map(|(addr, s)| EndpointHealth {
                endpoint: *addr,
                in_flight: s.in_flight,
                consecutive_errors: s.consecutive_errors,
                times_ejected: s.times_ejected,
                ejected_for_ms: s
                    .ejected_until
                    .filter(|u| *u > now)
                    .map(|u| u.duration_since(now).as_millis() as u64),
            })
            .collect();
        list.sort_by_key(|e| e.endpoint);
        list
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                workload: format!("demo/p{i}"),
                addr: SocketAddr::from(([10, 1, 2, 2 + i], 8080)),
                identity: None,
            })
            .collect()
    }

    fn resilience(round_robin: bool) -> Resilience {
        Resilience {
            round_robin,
            max_connections: 2,
            max_pending_requests: 2,
            max_requests_per_connection: 0,
            consecutive_errors: 3,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two() {
        let balancer = Arc::new(ServiceBalancer::default());
        let eps = endpoints(2);
        let now = Instant::now();
        let (first, _held) = balancer.pick(&eps, &resilience(false), (0, 0), now).expect("pick");
        // Whatever the rolls, the busy endpoint loses against the idle one.
        for rolls in [(0, 0), (1, 0), (0, 7), (5, 3)] {
            let (next, _) = balancer.pick(&eps, &resilience(false), rolls, now).expect("pick");
            assert_ne!(next.addr, first.addr, "rolls {rolls:?}");
        }
    }

    #[test]
    fn round_robin_cycles_through_the_endpoints() {
        let balancer = Arc::new(ServiceBalancer::default());
        let eps = endpoints(3);
        let picked: Vec<_> = (0..6)
            .map(|_| balancer.pick(&eps, &resilience(true), (0, 0), Instant::now()).expect("pick").0.addr)
            .collect();
        assert_eq!(picked[0..3], picked[3..6]);
        assert_eq!(picked[0..3].iter().collect::<std::collections::HashSet<_>>().len(), 3);
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_interval_but_never_the_last_healthy() {
        let balancer = Arc::new(ServiceBalancer::default());
        let eps = endpoints(2);
        let r = resilience(false);
        let now = Instant::now();
        let bad = eps[1].addr;
        assert_eq!(balancer.report(bad, Outcome::Failure, &eps, &r, now), HealthChange::None);
        assert_eq!(balancer.report(bad, Outcome::Success, &eps, &r, now), HealthChange::None);
        for _ in 0..2 {
            assert_eq!(balancer.report(bad, Outcome::Failure, &eps, &r, now), HealthChange::None);
        }
        assert_eq!(
            balancer.report(bad, Outcome::Failure, &eps, &r, now),
            HealthChange::Ejected { for_ms: 2000 }
        );
        for rolls in [(0, 0), (1, 0), (1, 1)] {
            let (picked, _) = balancer.pick(&eps, &r, rolls, now).expect("pick");
            assert_eq!(picked.addr, eps[0].addr, "the ejected endpoint gets nothing");
        }
        // The only healthy one is never ejected, however it fails.
        for _ in 0..5 {
            assert_eq!(balancer.report(eps[0].addr, Outcome::Failure, &eps, &r, now), HealthChange::None);
        }
        // Back after the interval; ejected again, for twice as long, then capped.
        let later = now + Duration::from_millis(2001);
        assert!(balancer.pick(&eps, &r, (1, 0), later).is_some());
        for _ in 0..2 {
            balancer.report(bad, Outcome::Failure, &eps, &r, later);
        }
        assert_eq!(
            balancer.report(bad, Outcome::Failure, &eps, &r, later),
            HealthChange::Ejected { for_ms: 4000 }
        );
        let much_later = later + Duration::from_secs(5);
        for _ in 0..2 {
            balancer.report(bad, Outcome::Failure, &eps, &r, much_later);
        }
        assert_eq!(
            balancer.report(bad, Outcome::Failure, &eps, &r, much_later),
            HealthChange::Ejected { for_ms: 5000 }
        );
    }

    #[test]
    fn circuit_breaker_limits_pending_requests_and_connections() {
        let balancer = ServiceBalancer::default();
        let r = resilience(false);
        let a = balancer.admit_request(&r).expect("1");
        let _b = balancer.admit_request(&r).expect("2");
        assert!(balancer.admit_request(&r).is_none(), "third pending request overflows");
        drop(a);
        assert!(balancer.admit_request(&r).is_some(), "a finished request frees its slot");
        let _c = balancer.admit_connection(&r).expect("1");
        let _d = balancer.admit_connection(&r).expect("2");
        assert!(balancer.admit_connection(&r).is_none());
    }
}
