//! `cargo xtask build-ebpf`: the kernel programs (`mesh-ebpf/programs`), built with Debian's Rust
//! for `bpfel-unknown-none` (TOOLCHAIN.md §3).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    progress::Step,
    toolchain::{self, DEBIAN_CARGO, DEBIAN_RUSTC},
};

/// Returns the kernel crate's own target directory, apart from user space's builds.
fn ebpf_target_dir() -> PathBuf {
    crate::target_dir().join("ebpf")
}

/// Returns the path of the built kernel object.
pub fn object_path() -> PathBuf {
    ebpf_target_dir().join("bpfel-unknown-none/release/mesh-ebpf")
}

/// Checks and installs the toolchain, then builds the kernel programs (cargo skips the build when
/// nothing changed). Returns the object's path.
pub fn build() -> anyhow::Result<PathBuf> {
    toolchain::ensure_ebpf_toolchain()?;
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(crate::workspace_root().join("mesh-ebpf/programs"))
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(ebpf_target_dir())
        // Only this child may use nightly flags on the stable Debian compiler.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", DEBIAN_RUSTC)
        .env("PATH", toolchain::build_path())
        .env("CARGO_TERM_COLOR", "never")
        // What rustup and the outer cargo set is meant for user space, not for this build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let step = Step::start("building the kernel programs (mesh-ebpf)");
    crate::progress::run_logged(&step, "build-ebpf", &mut cmd)?;
    let object = object_path();
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the eBPF build succeeded but left no object at {}", object.display()))?
        .len();
    step.done_with(&format!("{} ({} KiB)", object.display(), size / 1024));
    Ok(object)
}
