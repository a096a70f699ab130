//! `meshctl check`: can this machine run mesh-node? A pre-flight of the kernel (version, each
//! BPF program type, helper and map type the programs use, probed for real), BTF, cgroup v2,
//! bpffs, privileges and the CNI config, one line each with what was found and, when
//! something is wrong, how to fix it.
//!
//! `-o json`: `{"checks": [{"name", "status": "pass"|"warn"|"fail", "detail", "hint"}],
//! "passed": bool}`; `passed` (and exit 0) unless a required item fails; warnings never fail.

mod bpf;
mod host;
mod parse;

use std::path::PathBuf;

use serde::Serialize;

use crate::{Outcome, output::Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where mesh-node keeps its pins (its --bpffs).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The cgroup v2 directory that will hold the pods (mesh-node's --pods-cgroup); checked to
    /// be inside a cgroup v2 hierarchy.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// The container runtime's CNI config directory (Kubernetes mode).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
}

/// How an item came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Works, but worth knowing (never fails the check).
    Warn,
    /// mesh-node cannot run (or not fully) until this is fixed.
    Fail,
}

/// One checked item.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (warnings and failures).
    pub hint: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Pass, detail: detail.into(), hint: None }
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Warn, detail: detail.into(), hint: Some(hint.into()) }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Check { name: name.into(), status: Status::Fail, detail: detail.into(), hint: Some(hint.into()) }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    checks: Vec<Check>,
    passed: bool,
}

pub fn run(args: Args, format: Format) -> anyhow::Result<Outcome> {
    let checks = collect(&args);
    let passed = checks.iter().all(|c| c.status != Status::Fail);
    let report = Report { checks, passed };
    crate::output::emit(format, &serde_json::to_value(&report)?, |_| render(&report))?;
    Ok(if passed { Outcome::Passed } else { Outcome::Failed })
}

fn collect(args: &Args) -> Vec<Check> {
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse::mountinfo(&t)).unwrap_or_default();
    let caps = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| anyhow::anyhow!("cannot read /proc/self/status: {e}"))
        .and_then(|t| parse::cap_eff(&t));
    let mut checks = vec![host::kernel()];
    checks.extend(bpf::program_checks());
    checks.extend(bpf::helper_checks());
    checks.extend(bpf::map_checks());
    checks.push(host::btf());
    checks.push(host::cgroup(&mounts, args.cgroup_root.as_deref()));
    checks.push(host::bpffs(&mounts, &args.bpffs, caps.as_ref().ok().copied()));
    checks.extend(host::privileges(&caps));
    checks.push(host::cni(&args.cni_conf_dir));
    checks
}

fn render(report: &Report) -> String {
    let width = report.checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for check in &report.checks {
        let mark = match check.status {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
        };
        out.push_str(&format!("{mark} {:<width$}   {}\n", check.name, check.detail));
        if let Some(hint) = &check.hint {
            out.push_str(&format!("  {:<width$}   → {hint}\n", ""));
        }
    }
    let count = |status| report.checks.iter().filter(|c| c.status == status).count();
    let (failed, warned) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&if failed == 0 {
        format!("\nThis machine can run mesh-node ({} checks, {warned} warnings).\n", report.checks.len())
    } else {
        format!(
            "\n{failed} required checks failed ({warned} warnings): mesh-node cannot run here as it is.\n"
        )
    });
    out
}
