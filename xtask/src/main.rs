//! `cargo xtask`: nodemesh's developer commands.
//!
//! - `build-ebpf`: checks the eBPF toolchain, installs what is missing, builds the kernel programs.
//! - `test`: formatting, lints, unit tests and the end-to-end tests (root), as CI runs them.
//! - `demo`: a two-node mesh in network namespaces with real traffic, and what it captured.

mod demo;
mod progress;
mod test;
mod toolchain;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "nodemesh developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if needed and build the kernel programs.
    BuildEbpf,
    /// Run everything CI runs: fmt, clippy, unit tests, end-to-end tests.
    Test {
        /// Only formatting, lints and unit tests (no root needed).
        #[arg(long, conflicts_with = "e2e_only")]
        unit_only: bool,
        /// Only the end-to-end tests.
        #[arg(long)]
        e2e_only: bool,
    },
    /// Run the two-node demo and show what the mesh captured.
    Demo,
}

/// Returns the workspace root (the xtask crate's parent).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::BuildEbpf => toolchain::build_ebpf().map(|_| ()),
        Cmd::Test { unit_only, e2e_only } => test::run(test::Selection { unit_only, e2e_only }),
        Cmd::Demo => demo::run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nerror: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
