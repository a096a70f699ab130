//! meshctl: operating nodemesh. Talks to mesh-control's admin endpoint and to each node's
//! (see [`context`] for how it finds them); prints tables for people, JSON or YAML for scripts.

mod client;
mod commands;
mod context;
mod output;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{context::Context, output::Format};

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate nodemesh: check, status, proxy-config, explain, connectivity-test"
)]
struct Cli {
    /// Where mesh-control and the nodes are (see `cargo xtask demo`, which writes one); without
    /// it, meshctl talks to the control plane and node agent of the machine it runs on.
    #[arg(long, global = true, env = "MESHCTL_CONTEXT")]
    context: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pre-flight: can this machine run mesh-node? (kernel, BPF, BTF, cgroup v2, bpffs, privileges, CNI)
    Check(commands::check::Args),
    /// The control plane and every node: connected, config versions, ACK/NACK, certificates, pods.
    Status(commands::status::Args),
    /// One node's view: workloads, services, policies, routes, certificates or connections.
    ProxyConfig(commands::proxy_config::Args),
    /// Why a connection or request from a pod to a destination is allowed or denied, and where it goes.
    Explain(commands::explain::Args),
    /// Runs test traffic through the mesh and reports a pass/fail table.
    ConnectivityTest(commands::connectivity::Args),
}

/// What a command reports back: whether everything it checked passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = Context::load(cli.context.as_deref()).and_then(|context| match cli.command {
        Command::Check(args) => commands::check::run(args, cli.output),
        Command::Status(args) => commands::status::run(&context, args, cli.output),
        Command::ProxyConfig(args) => commands::proxy_config::run(&context, args, cli.output),
        Command::Explain(args) => commands::explain::run(&context, args, cli.output),
        Command::ConnectivityTest(args) => commands::connectivity::run(&context, args, cli.output),
    });
    match result {
        Ok(Outcome::Passed) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Failed) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("meshctl: {}", one_line(&err));
            std::process::ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, skipping causes the message already spells out.
fn one_line(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
    }
    message.replace('\n', " ")
}
