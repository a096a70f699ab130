//! `cargo xtask test`: everything CI runs, in order, each step with its verdict and duration.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    bench,
    cargo_log::{self, TestCounts},
    ebpf, kube_apiserver, manifest_tools,
    progress::Step,
    toolchain,
};

/// Which parts to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// Everything, as CI runs it.
    #[default]
    All,
    /// Formatting, lints and unit tests: no root needed.
    UnitOnly,
    /// The end-to-end tests (and what they need built).
    E2eOnly,
}

/// One step of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    BuildEbpf,
    TestTools,
    Fmt,
    Clippy,
    UnitTests,
    TestbedUnitTests,
    BuildBinaries,
    /// Stops the run: the end-to-end tests cannot run without root.
    NeedRoot,
    EndToEnd,
    /// `cargo xtask bench --smoke`: the bench harness works and every byte arrives; then
    /// `cargo xtask bench --scale --smoke`: every simulated node gets every change (no timing).
    BenchSmoke,
}

/// Returns the steps to run, in order. Without root everything else still runs, then the run
/// fails saying why the end-to-end tests did not.
fn stages(selection: Selection, root: bool) -> Vec<Stage> {
    use Stage::*;
    let unit = [Fmt, Clippy, UnitTests, TestbedUnitTests];
    let e2e: &[Stage] =
        if root { &[BuildBinaries, EndToEnd, BenchSmoke] } else { &[BuildBinaries, NeedRoot] };
    match selection {
        Selection::All => [&[BuildEbpf, TestTools][..], &unit, e2e].concat(),
        Selection::UnitOnly => [&[BuildEbpf][..], &unit].concat(),
        Selection::E2eOnly if !root => vec![NeedRoot],
        Selection::E2eOnly => [&[BuildEbpf, TestTools][..], e2e].concat(),
    }
}

/// Returns `cargo` (the one running the xtask) in the workspace, with plain output for the logs.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never");
    cmd
}

/// Runs a step's command; adds its test counts to `totals`.
fn run_step(title: &str, log: &str, cmd: &mut Command, totals: &mut TestCounts) -> anyhow::Result<()> {
    let text = Step::start(title).run(log, cmd)?;
    *totals += cargo_log::test_counts(&text).unwrap_or_default();
    Ok(())
}

/// Runs the selected steps and stops at the first failure.
pub fn run(selection: Selection) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut object = ebpf::object_path();
    let mut totals = TestCounts::default();
    let debug = crate::target_dir().join("debug");
    for stage in stages(selection, crate::is_root()) {
        match stage {
            Stage::BuildEbpf => object = ebpf::build()?,
            Stage::TestTools => {
                toolchain::ensure_test_tools()?;
                eprintln!("manifest checkers (deploy tests):");
                match manifest_tools::ensure() {
                    Ok(_) => {}
                    // Only the root-run tests use them: elsewhere, say why they are missing.
                    Err(err) if !crate::is_root() => eprintln!("  ✗ not installed: {err:#}"),
                    Err(err) => return Err(err),
                }
                // Built once (4 to 6 minutes) and cached; only the root-run tests use it.
                if crate::is_root() {
                    kube_apiserver::ensure()?;
                } else {
                    kube_apiserver::report();
                }
            }
            Stage::Fmt => {
                run_step(
                    "formatting (cargo fmt --check)",
                    "fmt",
                    cargo().args(["fmt", "--all", "--", "--check", "--color", "never"]),
                    &mut totals,
                )?;
                // The kernel crate is outside the workspace.
                run_step(
                    "formatting the kernel programs (cargo fmt --check)",
                    "fmt-ebpf",
                    cargo()
                        .args(["fmt", "--manifest-path", "mesh-ebpf/programs/Cargo.toml"])
                        .args(["--", "--check", "--color", "never"]),
                    &mut totals,
                )?;
            }
            Stage::Clippy => run_step(
                "lints (cargo clippy -D warnings)",
                "clippy",
                // The demo, the bench harness and the CRD generator are behind features (see
                // xtask's Cargo.toml): lint them too.
                cargo()
                    .args([
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--features",
                        "xtask/demo,xtask/bench,xtask/crds",
                    ])
                    .args(["--", "-D", "warnings"]),
                &mut totals,
            )?,
            // Everything that needs no root: unit tests and the integration tests of every crate
            // but the end-to-end test bed...
            Stage::UnitTests => run_step(
                "unit tests",
                "unit-tests",
                cargo().args(["test", "--workspace", "--exclude", "nodemesh-testbed", "--no-fail-fast"]),
                &mut totals,
            )?,
            // ...and the test bed's own unit tests.
            Stage::TestbedUnitTests => run_step(
                "test bed unit tests",
                "testbed-unit-tests",
                cargo().args(["test", "-p", "nodemesh-testbed", "--lib", "--bins", "--no-fail-fast"]),
                &mut totals,
            )?,
            Stage::BuildBinaries => run_step(
                "building mesh-node, mesh-control and meshctl",
                "build-binaries",
                cargo().args(["build", "-p", "mesh-node", "-p", "mesh-control", "-p", "meshctl", "--bins"]),
                &mut totals,
            )?,
            Stage::NeedRoot => bail!(
                "end-to-end tests need root (BPF, network namespaces, cgroups): run `sudo cargo xtask test{}`",
                if selection == Selection::E2eOnly { " --e2e-only" } else { "" }
            ),
            Stage::EndToEnd => run_step(
                "end-to-end tests (real eBPF, network namespaces, mesh-node processes)",
                "e2e-tests",
                &mut e2e_command(&debug, &object),
                &mut totals,
            )?,
            Stage::BenchSmoke => {
                bench::run_with(&object, true, None)?;
                bench::run_scale(true)?;
            }
        }
    }
    eprintln!("\nall passed in {}: {totals}", minutes(started.elapsed()));
    Ok(())
}

/// Returns the command running the test bed's end-to-end tests against the built binaries.
fn e2e_command(debug: &Path, object: &Path) -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "nodemesh-testbed", "--test", "*", "--no-fail-fast"])
        .env("MESH_NODE_BIN", debug.join("mesh-node"))
        .env("MESH_CONTROL_BIN", debug.join("mesh-control"))
        .env("MESHCTL_BIN", debug.join("meshctl"))
        .env("NODEMESH_BPF_OBJECT", object)
        .env(kube_apiserver::ENV_VAR, kube_apiserver::binary_path())
        .env(manifest_tools::ENV_VAR, manifest_tools::bin_dir());
    cmd
}

fn minutes(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    if secs >= 60 { format!("{}m{:02}s", secs / 60, secs % 60) } else { format!("{secs}s") }
}

#[cfg(test)]
mod tests {
    use super::{Selection, Stage::*, stages};

    #[test]
    fn everything_runs_in_order_as_root() {
        assert_eq!(
            stages(Selection::All, true),
            [
                BuildEbpf,
                TestTools,
                Fmt,
                Clippy,
                UnitTests,
                TestbedUnitTests,
                BuildBinaries,
                EndToEnd,
                BenchSmoke
            ]
        );
    }

    #[test]
    fn without_root_everything_else_runs_then_the_run_fails() {
        assert_eq!(
            stages(Selection::All, false),
            [BuildEbpf, TestTools, Fmt, Clippy, UnitTests, TestbedUnitTests, BuildBinaries, NeedRoot]
        );
        assert_eq!(stages(Selection::E2eOnly, false), [NeedRoot]);
    }

    #[test]
    fn parts_run_alone() {
        assert_eq!(stages(Selection::UnitOnly, false), [BuildEbpf, Fmt, Clippy, UnitTests, TestbedUnitTests]);
        assert_eq!(
            stages(Selection::E2eOnly, true),
            [BuildEbpf, TestTools, BuildBinaries, EndToEnd, BenchSmoke]
        );
    }
}
