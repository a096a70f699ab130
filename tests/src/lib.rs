//! nodemesh's test bed: topologies of network namespaces with real mesh-node processes.
//!
//! Used by the end-to-end tests in `tests/tests/` and by `cargo xtask demo`. A [`Topology`]
//! builds two nodes (netns joined by a veth link, a bridge for each node's pods), pods behind
//! veths, an external host outside the mesh, a cgroup tree per node under a test-owned cgroup,
//! and a private bpffs; it starts mesh-node and pod-app processes inside them and tears all of
//! it down on drop, also sweeping what an interrupted earlier run of the same name left.
//!
//! For L7, pods run pod-app's HTTP server and client ([`http_app`]), `curl` or raw TCP
//! ([`Topology::http_client`], [`Topology::curl`], [`Topology::raw_tcp`]), and tests add
//! Services, policies and routes with [`Topology::write_config`].
//!
//! [`KubeApiServer`] runs a real kube-apiserver and etcd on loopback for the tests of the
//! Kubernetes discovery (built once by `cargo xtask kube-apiserver`); [`deploy`] applies the
//! manifests in `deploy/` to it as they are written.

pub mod curl;
pub mod deploy;
pub mod http_app;
pub mod kube_apiserver;
pub mod manifest;
pub mod netns;
pub mod objects;
pub mod payload;
pub mod process;
pub mod prometheus;
pub mod report;
pub mod rogue;
pub mod sniff;
pub mod telemetry;
pub mod topology;

pub use curl::CurlResponse;
pub use kube_apiserver::{KubeApiServer, TokenUser};
pub use report::{
    ClientReport, HttpReport, PodReport, PodsReport, RawReport, SendReport, ServerStats, Traffic,
};
pub use topology::{NodeId, PodSpec, ServerHandle, Topology};

/// Fails with one clear line when not running as root.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "end-to-end tests need root (BPF, network namespaces, cgroups): run `sudo cargo xtask test`"
        );
    }
    Ok(())
}

/// Polls `check` until it returns `Some` or `within` passes, then fails naming `what`.
///
/// For what the mesh records just after a client sees the result (a log line, a failure
/// counter): the proxy closes the client's socket first, so reading at once is a race.
pub fn eventually<T>(what: &str, within: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}
