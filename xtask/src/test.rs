//! `cargo xtask test`: everything CI runs, in order, each step with its verdict and duration.

use std::process::Command;

use anyhow::bail;

use crate::{
    progress::{Step, run_logged},
    toolchain,
};

/// Which parts to run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Selection {
    pub unit_only: bool,
    pub e2e_only: bool,
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Logs are read by people and by the failure excerpt: no colour codes.
    cmd.current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never");
    cmd
}

/// Runs a step, turning a failure into the step's error after marking it failed.
fn step(title: &str, log: &str, cmd: &mut Command) -> anyhow::Result<String> {
    let step = Step::start(title);
    match run_logged(&step, log, cmd) {
        Ok(path) => {
            let summary = test_summary(&std::fs::read_to_string(path).unwrap_or_default());
            if summary.is_empty() {
                step.done()
            } else {
                step.done_with(&summary)
            }
            Ok(summary)
        }
        Err(err) => {
            step.failed();
            Err(err)
        }
    }
}

/// Sums cargo test's "test result" lines into one line.
fn test_summary(log: &str) -> String {
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut seen = false;
    for line in log.lines().filter(|l| l.starts_with("test result:")) {
        seen = true;
        let number = |word: &str| {
            line.split(';').find_map(|part| {
                let part = part
                    .trim()
                    .trim_start_matches("test result: ok.")
                    .trim_start_matches("test result: FAILED.")
                    .trim();
                part.strip_suffix(word).and_then(|n| n.trim().parse::<u64>().ok())
            })
        };
        passed += number("passed").unwrap_or(0);
        failed += number("failed").unwrap_or(0);
        ignored += number("ignored").unwrap_or(0);
    }
    if seen { format!("{passed} passed, {failed} failed, {ignored} ignored") } else { String::new() }
}

pub fn run(selection: Selection) -> anyhow::Result<()> {
    let object = toolchain::build_ebpf()?;
    if !selection.e2e_only {
        step(
            "formatting (cargo fmt --check)",
            "fmt",
            cargo().args(["fmt", "--all", "--", "--check", "--color", "never"]),
        )?;
        step(
            "lints (cargo clippy -D warnings)",
            "clippy",
            cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
        )?;
        // Everything that needs no root: unit tests, and the integration tests of every crate
        // but the end-to-end test bed (whose own unit tests run here too).
        step(
            "unit and integration tests",
            "unit-tests",
            cargo().args(["test", "--workspace", "--exclude", "nodemesh-testbed"]),
        )?;
        step(
            "test bed unit tests",
            "testbed-unit-tests",
            cargo().args(["test", "-p", "nodemesh-testbed", "--lib", "--bins"]),
        )?;
    }
    if selection.unit_only {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("end-to-end tests need root (BPF, network namespaces, cgroups): run `sudo cargo xtask test`");
    }
    toolchain::ensure_test_tools()?;
    step(
        "building mesh-node and mesh-control",
        "build-binaries",
        cargo().args(["build", "-p", "mesh-node", "-p", "mesh-control", "--bins"]),
    )?;
    let mesh_node = crate::workspace_root().join("target/debug/mesh-node");
    let mesh_control = crate::workspace_root().join("target/debug/mesh-control");
    step(
        "end-to-end tests (real eBPF, network namespaces, mesh-node processes)",
        "e2e-tests",
        cargo()
            .args(["test", "-p", "nodemesh-testbed", "--test", "*"])
            .env("MESH_NODE_BIN", &mesh_node)
            .env("MESH_CONTROL_BIN", &mesh_control)
            .env("NODEMESH_BPF_OBJECT", &object),
    )?;
    eprintln!("all tests passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::test_summary;

    #[test]
    fn sums_test_result_lines() {
        let log = "test result: ok. 14 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
                   noise\n\
                   test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n";
        assert_eq!(test_summary(log), "16 passed, 3 failed, 1 ignored");
        assert_eq!(test_summary("nothing"), "");
    }
}
