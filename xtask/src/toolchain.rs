//! The eBPF toolchain of TOOLCHAIN.md: check each piece, say what is missing and why it is needed,
//! install it.
//!
//! The rustup toolchains have no `rust-src`, so `-Z build-std=core` uses Debian's Rust
//! (`rustc-web`, `cargo-web`, `rust-web-src`); `bpf-linker` is built against Debian's LLVM 22 to
//! match that rustc.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::progress::Step;

/// Debian's rustc, which `-Z build-std=core` works with.
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// Debian's cargo, which drives it.
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// bpf-linker 0.13.0 builds against LLVM 22 (its default feature wants LLVM 23).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The eBPF crate uses edition 2024; Debian 12's own `rustc` package (1.63) is too old.
const MIN_RUST: (u32, u32) = (1, 85);

/// How to tell that a piece of the toolchain is there.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// The file exists.
    File(&'static str),
    /// The program runs and says it is at least this Rust version.
    RustVersion(&'static str),
}

/// A Debian package a step needs, and how to tell it is installed.
#[derive(Clone, Copy, Debug)]
pub struct Package {
    name: &'static str,
    probe: Probe,
    why: &'static str,
}

impl Package {
    /// Returns a package that counts as installed when `path` exists.
    pub const fn with_file(name: &'static str, path: &'static str, why: &'static str) -> Self {
        Package { name, probe: Probe::File(path), why }
    }
}

/// The packages `build-ebpf` needs (TOOLCHAIN.md §1).
pub const EBPF_PACKAGES: [Package; 4] = [
    Package {
        name: "rustc-web",
        probe: Probe::RustVersion(DEBIAN_RUSTC),
        why: "a Rust compiler whose standard library source Debian ships",
    },
    Package {
        name: "cargo-web",
        probe: Probe::RustVersion(DEBIAN_CARGO),
        why: "the cargo that drives that compiler",
    },
    Package {
        name: "rust-web-src",
        probe: Probe::File("/usr/lib/rustlib/src/rust/library/core/src/lib.rs"),
        why: "core's source, for -Z build-std=core",
    },
    Package {
        name: "llvm-22-dev",
        // llvm-config comes with llvm-22; the -dev package is what provides libLLVM.so to link.
        probe: Probe::File("/usr/lib/llvm-22/lib/libLLVM.so"),
        why: "LLVM 22 to build bpf-linker against",
    },
];

/// The packages the end-to-end tests and the demo need.
pub const TEST_PACKAGES: [Package; 3] = [
    Package {
        name: "iproute2",
        probe: Probe::File("/usr/sbin/ip"),
        why: "`ip`: network namespaces and veths for the topologies",
    },
    Package {
        name: "curl",
        probe: Probe::File("/usr/bin/curl"),
        why: "a real HTTP client in pods for the L7 tests",
    },
    Package {
        name: "python3-prometheus-client",
        probe: Probe::File("/usr/lib/python3/dist-packages/prometheus_client/openmetrics/parser.py"),
        why: "a strict OpenMetrics parser for the telemetry tests' /metrics checks",
    },
];

/// Returns `Ok(what was found)` or `Err(why the piece counts as missing)`.
fn probe(probe: Probe) -> Result<String, String> {
    match probe {
        Probe::File(path) if Path::new(path).exists() => Ok(path.to_owned()),
        Probe::File(path) => Err(format!("no {path}")),
        Probe::RustVersion(program) => {
            if !Path::new(program).exists() {
                return Err(format!("no {program}"));
            }
            let output = Command::new(program)
                .arg("--version")
                .env_remove("RUSTUP_TOOLCHAIN")
                .output()
                .map_err(|err| format!("{program} does not run: {err}"))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            // `rustc 1.96.0`, without the commit and build notes.
            let version = stdout.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            match parse_rust_version(&version) {
                Some(found) if found >= MIN_RUST => Ok(format!("{version} at {program}")),
                Some(_) => Err(format!(
                    "{program} is {version}, older than {}.{} (Debian's plain rustc/cargo packages)",
                    MIN_RUST.0, MIN_RUST.1
                )),
                None => Err(format!("{program} --version says {version:?}")),
            }
        }
    }
}

/// Returns (major, minor) from `rustc 1.96.0 (ac68faa20 2026-05-25)` or `cargo 1.96.0 (…)`.
fn parse_rust_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split_whitespace().nth(1)?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Returns why the missing packages cannot be installed here, if they cannot.
fn install_refusal(missing: &[&str], root: bool, has_apt: bool) -> Option<String> {
    let list = missing.join(", ");
    if !has_apt {
        return Some(format!(
            "apt-get not found: cannot install {list} (this recipe is for Debian 12); install the \
             equivalent of Debian's {list} by hand"
        ));
    }
    if !root {
        return Some(format!(
            "not root: cannot install {list}; run as root or install {}: apt-get install -y {}",
            if missing.len() == 1 { "it" } else { "them" },
            missing.join(" ")
        ));
    }
    None
}

/// Prints a ✓/✗ line per package; returns the missing ones.
pub fn check_packages(packages: &[Package]) -> Vec<Package> {
    let mut missing = Vec::new();
    for package in packages {
        match probe(package.probe) {
            Ok(found) => eprintln!("  ✓ {:<13} {found}", package.name),
            Err(reason) => {
                eprintln!("  ✗ {:<13} missing ({reason}): {}", package.name, package.why);
                missing.push(*package);
            }
        }
    }
    missing
}

/// Checks `packages` and installs the missing ones with apt, saying what and why.
pub fn ensure_packages(packages: &[Package]) -> anyhow::Result<()> {
    let missing = check_packages(packages);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if let Some(refusal) = install_refusal(&names, crate::is_root(), which("apt-get").is_some()) {
        bail!(refusal);
    }
    let step = Step::start(format!("installing {} (apt-get)", names.join(", ")));
    step.detail("apt-get update");
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        // Wait for a concurrent apt (e.g. unattended upgrades on a fresh machine) to finish.
        cmd.args(["-q", "-o", "DPkg::Lock::Timeout=300"]).args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    crate::progress::run_logged(&step, "apt-update", &mut apt(&["update"]))?;
    step.detail(&format!("apt-get install -y {}", names.join(" ")));
    let mut install = apt(&["install", "-y"]);
    install.args(&names);
    step.run("apt-install", &mut install)?;
    // Installed is not the same as usable: e.g. a pinned old version.
    for package in &missing {
        if let Err(reason) = probe(package.probe) {
            bail!("apt-get installed {} but it is still not usable: {reason}", package.name);
        }
    }
    Ok(())
}

/// Returns the path of `program` on PATH or in cargo's bin directory.
pub fn which(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(cargo_bin_dir());
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

/// Returns where `cargo install` puts programs: `$CARGO_HOME/bin`, by default `~/.cargo/bin`.
fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Returns PATH with cargo's bin directory (bpf-linker) and LLVM 22's tools in front.
pub fn build_path() -> std::ffi::OsString {
    let mut dirs = vec![cargo_bin_dir(), PathBuf::from(LLVM_BIN)];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// Returns `Ok(path and version)` of a working bpf-linker, or `Err(why it is missing)`.
fn probe_bpf_linker() -> Result<String, String> {
    let path = which("bpf-linker").ok_or("not on PATH nor in ~/.cargo/bin")?;
    // It links libLLVM dynamically: a removed or upgraded LLVM leaves a binary that cannot start.
    match Command::new(&path).arg("--version").output() {
        Ok(output) if output.status.success() => {
            Ok(format!("{} at {}", String::from_utf8_lossy(&output.stdout).trim(), path.display()))
        }
        Ok(output) => Err(format!(
            "{} does not run: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or("no output")
        )),
        Err(err) => Err(format!("{} does not run: {err}", path.display())),
    }
}

/// Checks bpf-linker and builds it against LLVM 22 if it is missing or broken.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let why = "links the eBPF object (built against LLVM 22)";
    let reason = match probe_bpf_linker() {
        Ok(found) => {
            eprintln!("  ✓ {:<13} {found}", "bpf-linker");
            return Ok(());
        }
        Err(reason) => reason,
    };
    eprintln!("  ✗ {:<13} missing ({reason}): {why}", "bpf-linker");
    let step = Step::start(format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} into {} (about a minute)",
        cargo_bin_dir().display()
    ));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        // Its own lockfile: dependency versions known to build, whatever is newest today.
        .arg("--locked")
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("PATH", build_path());
    step.run("bpf-linker-install", &mut cmd)?;
    if let Err(reason) = probe_bpf_linker() {
        bail!("cargo installed bpf-linker but it is still not usable: {reason}");
    }
    Ok(())
}

/// Checks every piece of the eBPF toolchain and installs what is missing.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    eprintln!("eBPF toolchain:");
    ensure_packages(&EBPF_PACKAGES)?;
    ensure_bpf_linker()
}

/// Prints which test tools are there, and installs the missing ones when running as root (the
/// only case in which the end-to-end tests that need them run).
pub fn ensure_test_tools() -> anyhow::Result<()> {
    eprintln!("test tools:");
    if crate::is_root() {
        ensure_packages(&TEST_PACKAGES)
    } else {
        check_packages(&TEST_PACKAGES);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rust_versions() {
        assert_eq!(
            parse_rust_version("rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)"),
            Some((1, 96))
        );
        assert_eq!(parse_rust_version("cargo 1.63.0"), Some((1, 63)));
        assert_eq!(parse_rust_version("rustc"), None);
        assert_eq!(parse_rust_version(""), None);
        assert!(parse_rust_version("rustc 1.63.0").is_some_and(|v| v < MIN_RUST));
    }

    #[test]
    fn refuses_to_install_without_root_or_apt() {
        assert_eq!(install_refusal(&["llvm-22-dev"], true, true), None);
        assert_eq!(
            install_refusal(&["llvm-22-dev"], false, true).as_deref(),
            Some(
                "not root: cannot install llvm-22-dev; run as root or install it: apt-get install -y llvm-22-dev"
            )
        );
        let both = install_refusal(&["rustc-web", "cargo-web"], false, true).unwrap_or_default();
        assert!(both.ends_with("install them: apt-get install -y rustc-web cargo-web"), "{both}");
        let no_apt = install_refusal(&["rustc-web"], true, false).unwrap_or_default();
        assert!(no_apt.starts_with("apt-get not found: cannot install rustc-web"), "{no_apt}");
    }

    #[test]
    fn probes_files() {
        assert!(probe(Probe::File("/")).is_ok());
        assert_eq!(probe(Probe::File("/nonexistent/x")), Err("no /nonexistent/x".to_owned()));
        assert!(probe(Probe::RustVersion("/nonexistent/rustc")).is_err());
    }
}
