//! `cargo xtask demo`: builds what the demo needs, then runs it (`xtask-demo`, see
//! [`scenario`]).
//!
//! The demo drives the end-to-end test bed, so it lives in its own binary behind the `demo`
//! feature: the xtask itself does not depend on the code it builds and tests, and a test bed that
//! does not compile is reported by `cargo xtask test` like any other failure.

#[cfg(feature = "demo")]
pub mod scenario;

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{ebpf, progress::Step, toolchain};

/// Builds the kernel programs, the binaries and the demo, then runs the demo in this terminal.
pub fn run() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!(
            "the demo needs root (it loads BPF programs and creates network namespaces and cgroups): \
             run `sudo cargo xtask demo`"
        );
    }
    let object = ebpf::build()?;
    toolchain::ensure_test_tools()?;
    let cargo = || {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never");
        cmd
    };
    Step::start("building mesh-node, mesh-control, meshctl and pod-app").run(
        "build-binaries",
        cargo().args([
            "build",
            "-p",
            "mesh-node",
            "-p",
            "mesh-control",
            "-p",
            "meshctl",
            "-p",
            "nodemesh-testbed",
            "--bins",
        ]),
    )?;
    // Its own invocation: building the xtask package with the feature beside other packages
    // would rebuild the running `xtask` binary with it too.
    Step::start("building the demo").run(
        "build-demo",
        cargo().args(["build", "-p", "xtask", "--features", "demo", "--bin", "xtask-demo"]),
    )?;

    let debug = crate::target_dir().join("debug");
    let demo = debug.join("xtask-demo");
    let status = Command::new(&demo)
        .env("MESH_NODE_BIN", debug.join("mesh-node"))
        .env("MESH_CONTROL_BIN", debug.join("mesh-control"))
        .env("MESHCTL_BIN", debug.join("meshctl"))
        .env("POD_APP_BIN", debug.join("pod-app"))
        .env("NODEMESH_BPF_OBJECT", object)
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    if !status.success() {
        // The demo has said what went wrong; only its verdict is passed on.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
