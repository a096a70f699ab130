//! Compiling policies: what is refused, naming the field, and what must stay accepted.

use super::*;

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let compile = |rule: AuthorizationRule| {
        Policy::compile(&Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            rules: vec![rule],
            ..Default::default()
        })
    };
    let source = |f: fn(&mut AuthorizationSource)| {
        let mut src = AuthorizationSource::default();
        f(&mut src);
        AuthorizationRule { from: vec![AuthorizationSource::default(), src], ..Default::default() }
    };
    let operation = |f: fn(&mut AuthorizationOperation)| {
        let mut op = AuthorizationOperation::default();
        f(&mut op);
        AuthorizationRule { to: vec![AuthorizationOperation::default(), op], ..Default::default() }
    };
    let cases: Vec<(AuthorizationRule, &str, &str)> = vec![
        (
            source(|s| s.ip_blocks = vec!["10.0.0.0/33".into()]),
            "rules[0].from[1].source.ipBlocks[0]",
            "not a CIDR",
        ),
        (
            source(|s| s.not_ip_blocks = vec!["10.0.0.0/8".into(), "nope".into()]),
            "rules[0].from[1].source.notIpBlocks[1]",
            "not a CIDR",
        ),
        (
            source(|s| s.principals = vec![String::new()]),
            "rules[0].from[1].source.principals[0]",
            "must not be empty",
        ),
        (
            source(|s| s.not_namespaces = vec!["a*b".into()]),
            "rules[0].from[1].source.notNamespaces[0]",
            "`*` may only",
        ),
        (
            operation(|o| o.paths = vec!["/a".into(), "/a*b*".into(), "/c".into()]),
            "rules[0].to[1].operation.paths[1]",
            "`*` may only",
        ),
        (
            operation(|o| o.methods = vec!["get".into()]),
            "rules[0].to[1].operation.methods[0]",
            "not an HTTP method",
        ),
        (
            operation(|o| o.not_methods = vec!["*".into()]),
            "rules[0].to[1].operation.notMethods[0]",
            "not an HTTP method",
        ),
        (operation(|o| o.ports = vec![70000]), "rules[0].to[1].operation.ports[0]", "not a port"),
        (operation(|o| o.not_ports = vec![0]), "rules[0].to[1].operation.notPorts[0]", "not a port"),
        (
            operation(|o| o.hosts = vec![String::new()]),
            "rules[0].to[1].operation.hosts[0]",
            "must not be empty",
        ),
        (when("request.auth.claims[iss]", &["x"], &[]), "rules[0].when[0].key", "unknown condition key"),
        (when("remote.ip", &["10.0.0.1"], &[]), "rules[0].when[0].key", "unknown condition key"),
        (when("", &["x"], &[]), "rules[0].when[0].key", "must not be empty"),
        (when("request.headers[]", &["x"], &[]), "rules[0].when[0].key", "must not be empty"),
        (when("request.headers[a b]", &["x"], &[]), "rules[0].when[0].key", "not a valid header name"),
        (when("source.ip", &[], &[]), "rules[0].when[0]", "needs values or notValues"),
        (when("source.ip", &["10.0.0.0/8"], &["bad"]), "rules[0].when[0].notValues[0]", "not a CIDR"),
        (when("destination.port", &["http"], &[]), "rules[0].when[0].values[0]", "not a port"),
        (when("source.principal", &["**"], &[]), "rules[0].when[0].values[0]", "`*` may only"),
    ];
    for (rule, field, problem) in cases {
        let err = compile(rule).expect_err(field);
        assert_eq!((err.object(), err.field()), ("demo/p", field), "{err}");
        assert!(err.to_string().contains(problem), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    let unknown_action =
        Authorization { name: "p".into(), namespace: "demo".into(), action: 7, ..Default::default() };
    assert_eq!(Policy::compile(&unknown_action).unwrap_err().field(), "spec.action");
    let unknown_scope =
        Authorization { name: "p".into(), namespace: "demo".into(), scope: -1, ..Default::default() };
    assert_eq!(Policy::compile(&unknown_scope).unwrap_err().field(), "scope");
    let unnamed = Authorization { namespace: "demo".into(), ..Default::default() };
    assert_eq!(Policy::compile(&unnamed).unwrap_err().field(), "metadata.name");
}

#[test]
fn empty_entries_match_anything_so_a_translated_deny_fails_closed() {
    // The control plane empties a DENY field whose values were invalid; the entry must then
    // match everyone rather than be refused (a refused DENY would deny nothing).
    let deny = policy("d", D, vec![from(AuthorizationSource::default())]);
    assert_eq!(request(&[deny], &plain(), &get("/")).verdict, Verdict::Deny);
    let deny = policy("d", D, vec![to(AuthorizationOperation::default())]);
    assert_eq!(request(&[deny], &mtls(), &get("/")).verdict, Verdict::Deny);
}
