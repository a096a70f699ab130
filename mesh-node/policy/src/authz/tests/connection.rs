//! Connection-level decisions: what waits for requests, and failing closed without HTTP.

use super::*;

/// Name, policies, peer, destination port, parsed as HTTP, expected verdict.
type ConnectionCase = (&'static str, Vec<Policy>, Peer<'static>, u16, bool, Verdict);

#[test]
fn connections_defer_http_rules_when_parsed_and_fail_closed_when_not() {
    let allow_get = || policy("allow-get", A, vec![to(methods(&["GET"]))]);
    let deny_admin = || policy("deny-admin", D, vec![to(paths(&["/admin*"]))]);
    let allow_l4 = || policy("allow-web", A, vec![from(principals(&[WEB]))]);
    let deny_web = || policy("deny-web", D, vec![from(principals(&[WEB]))]);
    let cases: Vec<ConnectionCase> = vec![
        ("no policies", vec![], plain(), 80, false, Verdict::Allow),
        ("ALLOW with HTTP parts, HTTP", vec![allow_get()], mtls(), 80, true, Verdict::PerRequest),
        ("ALLOW with HTTP parts never allows TCP", vec![allow_get()], mtls(), 80, false, Verdict::Deny),
        ("DENY with HTTP parts, HTTP", vec![deny_admin()], mtls(), 80, true, Verdict::PerRequest),
        ("DENY with HTTP parts fails closed on TCP", vec![deny_admin()], mtls(), 80, false, Verdict::Deny),
        (
            "DENY with HTTP parts on another port",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation {
                    ports: vec![9090],
                    paths: s(&["/admin"]),
                    ..Default::default()
                })],
            )],
            mtls(),
            80,
            false,
            Verdict::Allow,
        ),
        (
            "DENY with HTTP parts for another caller",
            vec![policy(
                "d",
                D,
                vec![AuthorizationRule {
                    from: vec![principals(&["x/ns/y/sa/z"])],
                    to: vec![paths(&["/admin"])],
                    ..Default::default()
                }],
            )],
            mtls(),
            80,
            false,
            Verdict::Allow,
        ),
        ("an L4 DENY decides at once", vec![deny_web(), allow_get()], mtls(), 80, true, Verdict::Deny),
        (
            "L4 ALLOW with a pending DENY",
            vec![allow_l4(), deny_admin()],
            mtls(),
            80,
            true,
            Verdict::PerRequest,
        ),
        (
            "no ALLOW can match: a pending DENY changes nothing",
            vec![allow_l4(), deny_admin()],
            Peer { principal: Some("x/ns/y/sa/z"), ..mtls() },
            80,
            true,
            Verdict::Deny,
        ),
        ("one ALLOW already matches", vec![allow_l4(), allow_get()], mtls(), 80, true, Verdict::Allow),
        (
            "ALLOW header condition never allows TCP",
            vec![policy("a", A, vec![when("request.headers[x-a]", &["1"], &[])])],
            mtls(),
            80,
            false,
            Verdict::Deny,
        ),
        (
            "DENY header condition fails closed on TCP",
            vec![policy("d", D, vec![when("request.headers[x-a]", &["1"], &[])])],
            mtls(),
            80,
            false,
            Verdict::Deny,
        ),
        (
            "an L4-only operation of an ALLOW rule still allows TCP",
            vec![policy(
                "a",
                A,
                vec![AuthorizationRule {
                    to: vec![
                        paths(&["/x"]),
                        AuthorizationOperation { ports: vec![80], ..Default::default() },
                    ],
                    ..Default::default()
                }],
            )],
            mtls(),
            80,
            false,
            Verdict::Allow,
        ),
        (
            "an ALLOW whose L4 part misses is decided at once",
            vec![policy(
                "a",
                A,
                vec![AuthorizationRule {
                    from: vec![principals(&["x/*"])],
                    to: vec![paths(&["/x"])],
                    ..Default::default()
                }],
            )],
            mtls(),
            80,
            true,
            Verdict::Deny,
        ),
        (
            "DENY notPaths fails closed on TCP",
            vec![policy(
                "d",
                D,
                vec![to(AuthorizationOperation { not_paths: s(&["/health"]), ..Default::default() })],
            )],
            mtls(),
            80,
            false,
            Verdict::Deny,
        ),
        (
            "DENY notPrincipals on a plaintext connection",
            vec![policy(
                "d",
                D,
                vec![from(AuthorizationSource { not_principals: s(&["*"]), ..Default::default() })],
            )],
            plain(),
            80,
            true,
            Verdict::Deny,
        ),
    ];
    for (name, policies, peer, port, http, want) in &cases {
        let refs: Vec<&Policy> = policies.iter().collect();
        let decision = check_connection(&refs, peer, *port, *http);
        assert_eq!(decision.verdict, *want, "{name}: {decision:#?}");
    }
}
