//! The eBPF toolchain of TOOLCHAIN.md: check each piece, install what is missing, build.
//!
//! The rustup toolchains here have no `rust-src`, so `-Z build-std=core` uses Debian's Rust
//! (`rustc-web`, `cargo-web`, `rust-web-src`); `bpf-linker` is built against Debian's LLVM 22 to
//! match that rustc.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::progress::{Step, run_logged};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A Debian package the build needs, and how to tell it is there.
struct Package {
    name: &'static str,
    marker: &'static str,
    why: &'static str,
}

const EBPF_PACKAGES: [Package; 4] = [
    Package {
        name: "rustc-web",
        marker: DEBIAN_RUSTC,
        why: "a Rust compiler whose standard library source is available",
    },
    Package { name: "cargo-web", marker: DEBIAN_CARGO, why: "the cargo that drives it" },
    Package { name: "rust-web-src", marker: RUST_SRC, why: "core's source, for -Z build-std=core" },
    Package {
        name: "llvm-22-dev",
        // llvm-config comes with llvm-22; the -dev package is what provides libLLVM.so to link.
        marker: "/usr/lib/llvm-22/lib/libLLVM.so",
        why: "LLVM 22's libLLVM.so, to build bpf-linker",
    },
];

const TEST_PACKAGES: [Package; 1] = [Package {
    name: "iproute2",
    marker: "/usr/sbin/ip",
    why: "network namespaces and veths for the topologies",
}];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs the missing packages of `packages` with apt, saying what and why.
fn ensure_packages(packages: &[Package]) -> anyhow::Result<()> {
    let missing: Vec<&Package> = packages.iter().filter(|p| !Path::new(p.marker).exists()).collect();
    for p in packages {
        let mark = if Path::new(p.marker).exists() { "✓" } else { "✗" };
        eprintln!("  {mark} {:<14} {}", p.name, p.why);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if which("apt-get").is_none() {
        bail!(
            "missing {}: apt-get not found (this recipe is for Debian 12); install them by hand",
            names.join(", ")
        );
    }
    if !is_root() {
        bail!(
            "missing {}: not root, cannot install; run as root or: sudo apt-get install -y {}",
            names.join(", "),
            names.join(" ")
        );
    }
    let step = Step::start(format!("installing {}", names.join(", ")));
    step.detail("apt-get update");
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive");
    if let Err(err) = run_logged(&step, "apt-update", &mut update) {
        step.failed();
        return Err(err);
    }
    step.detail("apt-get install");
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-q"]).args(&names).env("DEBIAN_FRONTEND", "noninteractive");
    match run_logged(&step, "apt-install", &mut install) {
        Ok(_) => step.done(),
        Err(err) => {
            step.failed();
            return Err(err);
        }
    }
    Ok(())
}

/// Returns the path of `program` on PATH or in `~/.cargo/bin`.
pub fn which(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(cargo_bin_dir());
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory (bpf-linker) and LLVM 22 in front.
fn build_path() -> std::ffi::OsString {
    let mut dirs = vec![cargo_bin_dir(), PathBuf::from(LLVM_BIN)];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Some(path) = which("bpf-linker") {
        eprintln!("  ✓ {:<14} {}", "bpf-linker", path.display());
        return Ok(());
    }
    eprintln!("  ✗ {:<14} links eBPF objects; building it against LLVM 22 (about a minute)", "bpf-linker");
    let step = Step::start(format!("cargo install bpf-linker {BPF_LINKER_VERSION}"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("PATH", build_path());
    match run_logged(&step, "bpf-linker", &mut cmd) {
        Ok(_) => {
            step.done();
            Ok(())
        }
        Err(err) => {
            step.failed();
            Err(err)
        }
    }
}

/// Makes sure the packages the end-to-end tests use are there.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    eprintln!("test tools:");
    ensure_packages(&TEST_PACKAGES)
}

/// Returns the path of the built kernel object.
pub fn object_path() -> PathBuf {
    crate::workspace_root().join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
}

/// Checks and installs the toolchain, then builds the kernel programs.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    eprintln!("eBPF toolchain:");
    ensure_packages(&EBPF_PACKAGES)?;
    ensure_bpf_linker()?;
    let step = Step::start("building the kernel programs (mesh-ebpf)");
    let root = crate::workspace_root();
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(root.join("mesh-ebpf/programs"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf"))
        // Only this child may use nightly flags on the stable Debian compiler.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", DEBIAN_RUSTC)
        .env("PATH", build_path())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS");
    match run_logged(&step, "build-ebpf", &mut cmd) {
        Ok(_) => {}
        Err(err) => {
            step.failed();
            return Err(err);
        }
    }
    let object = object_path();
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build left no object at {}", object.display()))?
        .len();
    step.done_with(&format!("{} ({} KiB)", object.display(), size / 1024));
    Ok(object)
}
