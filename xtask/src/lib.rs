//! nodemesh's developer commands, run as `cargo xtask <command>`:
//!
//! - `build-ebpf` ([`ebpf`]): checks the eBPF toolchain piece by piece, installs what is missing
//!   ([`toolchain`]), builds the kernel programs.
//! - `test` ([`test`]): everything CI runs, in order: the kernel programs, formatting, lints, unit
//!   tests, and the end-to-end tests (as root).
//! - `kube-apiserver` ([`kube_apiserver`]): builds, once, the real kube-apiserver the Kubernetes
//!   discovery tests run against, from Debian's source package; `test` does it too.
//! - `manifest-tools` ([`manifest_tools`]): installs the checkers the deploy tests run on
//!   `deploy/` (kubernetes-validate, yamllint, hadolint; kubectl if missing); `test` does it too.
//! - `kind-up` ([`kind`]): on a machine with Docker and kind, a kind cluster running nodemesh,
//!   a demo namespace enrolled, and a connectivity check.
//! - `gen-crds` ([`crds`]): writes the CRD manifests in `deploy/crds/` from the Rust types.
//! - `demo` ([`demo`]): a two-node mesh in network namespaces with real traffic, and a report of
//!   what it captured.
//! - `bench` ([`bench`]): what the mesh costs against the direct path, measured in one run
//!   (throughput, latency at a fixed rate, connection setup, proxy CPU and memory).
//!
//! Every step shows a spinner with its elapsed time and sends the output of the commands it runs
//! to `target/xtask/<step>.log` ([`progress`]); a failure is one message saying what failed and
//! why, with the few lines of the log that matter ([`cargo_log`]).

pub mod bench;
pub mod cargo_log;
pub mod crds;
pub mod demo;
pub mod ebpf;
pub mod kind;
pub mod kube_apiserver;
pub mod manifest_tools;
pub mod progress;
pub mod test;
pub mod toolchain;

use std::{path::PathBuf, process::ExitCode};

/// Returns the workspace root (the xtask crate's parent).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Returns cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Returns whether this process runs as root (installing packages, BPF, namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a command's error, if any, as its one message, and returns the exit code.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nerror: {err:#}");
            ExitCode::FAILURE
        }
    }
}
