//! What status each outcome gives, and that the same outcome twice is no change.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use mesh_api::workload::v1::Authorization;
use mesh_manifests::{
    crd::{ParentReference, PolicyStatus, RouteParentStatus, RouteStatus},
    translate::{Acceptance, AuthorizationSpec, ParentStatus, RouteSpec},
};

use super::{CONTROLLER_NAME, policy_status, route_status};

fn at(second: i64) -> Time {
    Time(Timestamp::from_second(second).expect("time"))
}

fn spec(acceptance: Acceptance, generation: i64) -> AuthorizationSpec {
    AuthorizationSpec { authorization: Authorization::default(), generation: Some(generation), acceptance }
}

fn unenforceable(message: &str) -> Acceptance {
    Acceptance::rejected("UnenforceableHTTPRule", message)
}

fn accepted_condition(status: &str, reason: &str, message: &str, generation: i64, since: i64) -> Condition {
    Condition {
        type_: "Accepted".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: at(since),
    }
}

#[test]
fn a_policy_gets_one_accepted_condition_written_only_when_it_changes() {
    let accepted = Acceptance::accepted();
    let first = policy_status(None, &spec(accepted.clone(), 1), &at(100)).expect("no status yet");
    assert_eq!(first.conditions, [accepted_condition("True", "Accepted", "enforced as written", 1, 100)]);
    assert_eq!(policy_status(Some(&first), &spec(accepted.clone(), 1), &at(200)), None, "nothing changed");

    // A new generation still accepted: observedGeneration moves, the transition time stays.
    let second = policy_status(Some(&first), &spec(accepted, 2), &at(200)).expect("new generation");
    assert_eq!(second.conditions[0].last_transition_time, at(100));
    assert_eq!(second.conditions[0].observed_generation, Some(2));

    // Rejected: a transition, with the reason and the findings.
    let message = "rules[0]: HTTP conditions (paths) can never apply: port 5432 is declared \"tcp\"";
    let third = policy_status(Some(&second), &spec(unenforceable(message), 3), &at(300)).expect("rejected");
    assert_eq!(third.conditions, [accepted_condition("False", "UnenforceableHTTPRule", message, 3, 300)]);
    // Still rejected, for another reason: same transition time, new message.
    let fourth =
        policy_status(Some(&third), &spec(unenforceable("rules[1]: …"), 3), &at(400)).expect("message");
    assert_eq!(
        fourth.conditions,
        [accepted_condition("False", "UnenforceableHTTPRule", "rules[1]: …", 3, 300)]
    );
}

#[test]
fn a_policys_other_conditions_are_kept() {
    let other = Condition { type_: "Audited".into(), ..accepted_condition("True", "Seen", "", 1, 50) };
    let current = PolicyStatus { conditions: vec![other.clone()] };
    let status = policy_status(Some(&current), &spec(Acceptance::accepted(), 1), &at(100)).expect("added");
    assert_eq!(status.conditions.len(), 2);
    assert_eq!(status.conditions[0], other);
    assert_eq!(policy_status(Some(&status), &spec(Acceptance::accepted(), 1), &at(200)), None);
}

fn parent(name: &str) -> ParentReference {
    ParentReference { kind: Some("Service".into()), name: name.into(), ..Default::default() }
}

fn route(parents: Vec<(&str, Acceptance, Acceptance)>) -> RouteSpec {
    RouteSpec {
        namespace: "demo".into(),
        name: "r".into(),
        route: None,
        generation: Some(4),
        parents: parents
            .into_iter()
            .map(|(name, accepted, resolved_refs)| ParentStatus {
                parent_ref: parent(name),
                accepted,
                resolved_refs,
            })
            .collect(),
    }
}

#[test]
fn a_route_gets_one_entry_per_service_parent_beside_other_controllers() {
    let resolved = Acceptance::condition(true, "ResolvedRefs", "every backend Service exists");
    let accepted = Acceptance::condition(true, "Accepted", "applied to traffic for this Service");
    let missing = Acceptance::condition(false, "NoMatchingParent", "Service demo/details does not exist");
    let gateway = RouteParentStatus {
        parent_ref: ParentReference { name: "gw".into(), ..Default::default() },
        controller_name: "example.com/gateway".into(),
        conditions: vec![],
    };
    // A stale entry of ours, for a parent the route no longer has.
    let stale = RouteParentStatus {
        parent_ref: parent("old"),
        controller_name: CONTROLLER_NAME.into(),
        conditions: vec![],
    };
    let current = RouteStatus { parents: vec![gateway.clone(), stale] };
    let spec =
        route(vec![("reviews", accepted.clone(), resolved.clone()), ("details", missing, resolved.clone())]);
    let status = route_status(Some(&current), &spec, &at(100)).expect("written");
    assert_eq!(status.parents[0], gateway, "another controller's entry stays");
    /// (parent, [(type, status, reason)]).
    type Entry<'a> = (&'a str, Vec<(&'a str, &'a str, &'a str)>);
    let ours: Vec<Entry> = status.parents[1..]
        .iter()
        .map(|p| {
            assert_eq!(p.controller_name, "nodemesh.io/mesh-control");
            assert!(
                p.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(4) && c.last_transition_time == at(100))
            );
            let conditions = p
                .conditions
                .iter()
                .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
                .collect();
            (p.parent_ref.name.as_str(), conditions)
        })
        .collect();
    assert_eq!(
        ours,
        [
            ("reviews", vec![("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]),
            (
                "details",
                vec![("Accepted", "False", "NoMatchingParent"), ("ResolvedRefs", "True", "ResolvedRefs")]
            ),
        ]
    );
    assert_eq!(route_status(Some(&status), &spec, &at(200)), None, "the same outcome is no change");

    // The missing Service appears: only that parent's Accepted transitions.
    let fixed = route(vec![("reviews", accepted.clone(), resolved.clone()), ("details", accepted, resolved)]);
    let next = route_status(Some(&status), &fixed, &at(300)).expect("transition");
    let times: Vec<(&str, &str, &Time)> = next.parents[1..]
        .iter()
        .flat_map(|p| {
            p.conditions
                .iter()
                .map(move |c| (p.parent_ref.name.as_str(), c.type_.as_str(), &c.last_transition_time))
        })
        .collect();
    assert_eq!(
        times,
        [
            ("reviews", "Accepted", &at(100)),
            ("reviews", "ResolvedRefs", &at(100)),
            ("details", "Accepted", &at(300)),
            ("details", "ResolvedRefs", &at(100)),
        ]
    );
}
