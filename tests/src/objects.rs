//! The mesh objects end-to-end tests write into mesh-control's config directory (see
//! [`crate::Topology::write_config`]), as Kubernetes-shaped YAML in namespace `demo`.

/// A Service in `demo` with one cluster IP, selecting pods by `selector` (`key: value`s), with
/// `ports` (service port → target port), all declaring `app_protocol`, and `annotations`.
pub fn service(
    name: &str,
    vip: &str,
    selector: &[&str],
    ports: &[(u16, u16)],
    app_protocol: &str,
    annotations: &[(&str, &str)],
) -> String {
    let selector: String = selector.iter().map(|label| format!("    {label}\n")).collect();
    let ports: String = ports
        .iter()
        .map(|(port, target)| {
            format!(
                "  - name: {app_protocol}-{port}\n    protocol: TCP\n    appProtocol: {app_protocol}\n    port: {port}\n    targetPort: {target}\n"
            )
        })
        .collect();
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        let lines: String = annotations.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
        format!("  annotations:\n{lines}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: demo
{annotations}spec:
  type: ClusterIP
  clusterIP: {vip}
  clusterIPs:
  - {vip}
  selector:
{selector}  ports:
{ports}"
    )
}

/// An AuthorizationPolicy in `demo` on the pods labelled `app: <app>`; `rules` is the YAML list
/// under `rules:`, indented by two.
pub fn policy(name: &str, app: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: demo
spec:
  selector:
    matchLabels:
      app: {app}
  action: {action}
  rules:
{rules}"
    )
}

/// An HTTPRoute in `demo` attached to the Service `parent` port 80 (GAMMA); `rules` is the
/// YAML list under `rules:`, indented by two.
pub fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: demo
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: {parent}
    port: 80
  rules:
{rules}"
    )
}
