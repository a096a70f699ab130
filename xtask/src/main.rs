//! `cargo xtask`: nodemesh's developer commands (see the `xtask` library for what each does).

use clap::{Parser, Subcommand};
use xtask::{bench, crds, demo, ebpf, kind, kube_apiserver, manifest_tools, test};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "nodemesh developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if needed and build the kernel programs.
    BuildEbpf,
    /// Run everything CI runs: build, fmt, clippy, unit tests, end-to-end tests (as root).
    Test {
        /// Only formatting, lints and unit tests (no root needed).
        #[arg(long, conflicts_with = "e2e_only")]
        unit_only: bool,
        /// Only the end-to-end tests.
        #[arg(long)]
        e2e_only: bool,
    },
    /// Build (once, 4-6 minutes) the kube-apiserver the Kubernetes tests run against, and install etcd.
    KubeApiserver,
    /// Install the checkers the deploy tests use (kubernetes-validate, yamllint, hadolint; kubectl
    /// if missing) into target/tools/manifest-tools.
    ManifestTools,
    /// With Docker and kind: create a kind cluster, build and load the images, apply deploy/,
    /// enrol a demo namespace with two apps and check they connect through the mesh.
    KindUp,
    /// Write deploy/crds/ from the CRD types in mesh-control/manifests (a test fails when stale).
    GenCrds,
    /// Run the two-node demo (as root) and show what the mesh captured.
    Demo,
    /// Measure the mesh against the direct path (as root): throughput, latency at a fixed rate,
    /// connection setup, proxy CPU and memory; report in target/bench/.
    Bench {
        /// A couple of seconds per mode: checks the harness and that every byte arrives (CI).
        #[arg(long)]
        smoke: bool,
        /// Runs per mode of each measurement (default 5; 1 with --smoke).
        #[arg(long, conflicts_with = "scale")]
        rounds: Option<u32>,
        /// Instead: the control plane at scale (1k and 10k workloads, 1k services, 100 simulated
        /// nodes): time from a manifest change to every node having it, and mesh-control's memory.
        #[arg(long)]
        scale: bool,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Cmd::BuildEbpf => ebpf::build().map(|_| ()),
        Cmd::Test { unit_only, e2e_only } => test::run(match (unit_only, e2e_only) {
            (true, _) => test::Selection::UnitOnly,
            (_, true) => test::Selection::E2eOnly,
            _ => test::Selection::All,
        }),
        Cmd::KubeApiserver => kube_apiserver::ensure().map(|_| ()),
        Cmd::ManifestTools => manifest_tools::ensure().map(|_| ()),
        Cmd::KindUp => kind::up(),
        Cmd::GenCrds => crds::run(),
        Cmd::Demo => demo::run(),
        Cmd::Bench { smoke, scale: true, .. } => bench::run_scale(smoke),
        Cmd::Bench { smoke, rounds, scale: false } => bench::run(smoke, rounds),
    };
    xtask::exit_code(result)
}
