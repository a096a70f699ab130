//! `meshctl connectivity-test`: real traffic through the mesh, with a pass/fail row per check
//! (like `cilium connectivity test`).
//!
//! Local mode only (the context names mesh-control's `configDir`): the probes run in existing
//! enrolled pods, placed by meshctl itself ([`probes`]), and the test objects are files in the
//! config directory ([`objects`]). The checks ([`checks`]):
//!
//! | check | what passes |
//! |---|---|
//! | `pod-to-pod-cross-node` | a stream from the client pod to a pod on another node is echoed intact, the server sees the client pod's address, the client's node counted the connection (it was captured) |
//! | `pod-to-pod-same-node` | the same, to a pod on the client's node |
//! | `pod-to-service` | the same, through a Service `meshctl-conntest` (cluster IP) selecting the server, once the client's node routes it |
//! | `mtls-on-the-wire` | while a stream with a random marker crosses, a packet capture of the client node's interfaces never sees the marker, and all traffic between the two pods is TLS to `:15008` |
//! | `deny-policy` | with an AuthorizationPolicy DENY for the client's principal on the server, connections are refused; once it is removed, they flow again |
//!
//! Every probe is killed and every cgroup and file removed on every exit path, Ctrl-C included.

mod checks;
mod objects;
mod pods;
mod probe;
mod probes;
mod progress;
mod report;
mod wire;

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::Context as _;

use self::{
    checks::{Runner, Verdict},
    objects::TestObjects,
    probes::Probes,
    progress::Progress,
    report::{CheckResult, Status},
};
use crate::{Outcome, context::Context, output::Format};

/// The probes' port when `--port` is not given: below the ephemeral range, above the usual
/// application ports, not one of the mesh's own.
const DEFAULT_PORT: u16 = 17080;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// The client pod (`namespace/pod`, or a pod name found in one namespace only); by default
    /// one with peers on another node and on its own.
    #[arg(long)]
    client: Option<String>,
    /// The server pod; by default one on another node than the client, preferably one a
    /// Service can select by its labels alone.
    #[arg(long)]
    server: Option<String>,
    /// The port the probe servers listen on inside the pods (must be free there).
    #[arg(long, default_value_t = DEFAULT_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The cluster IP of the test Service (default: a free address near the Services').
    #[arg(long)]
    service_ip: Option<Ipv4Addr>,
    /// Runs every check even after one failed (by default the rest is skipped).
    #[arg(long)]
    keep_going: bool,
    #[command(subcommand)]
    probe: Option<Probe>,
}

#[derive(Debug, clap::Subcommand)]
enum Probe {
    /// Runs inside a pod (meshctl starts it there).
    #[command(hide = true)]
    Probe {
        #[command(subcommand)]
        role: probe::Role,
    },
}

/// The checks in the order they run.
const CHECKS: [&str; 5] =
    ["pod-to-pod-cross-node", "pod-to-pod-same-node", "pod-to-service", "mtls-on-the-wire", "deny-policy"];

/// Set by SIGINT, SIGTERM or SIGHUP: every wait stops, and the run cleans up and ends.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The run was interrupted by a signal.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Returns whether a signal asked the run to end.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn run(context: &Context, args: Args, format: Format) -> anyhow::Result<Outcome> {
    if let Some(Probe::Probe { role }) = args.probe {
        probe::run(role)?;
        return Ok(Outcome::Passed);
    }
    let Some(config_dir) = context.control_plane.config_dir.clone() else {
        anyhow::bail!(
            "connectivity-test runs its probes in local-mode pods and writes its test objects into \
             mesh-control's config directory, and this context names none (controlPlane.configDir): \
             deploying test pods into Kubernetes is not supported yet (a kind cluster from \
             `cargo xtask kind-up` is where that will run)"
        );
    };
    catch_signals();
    let discovery = pods::discover(context, &config_dir)?;
    for (node, why) in &discovery.unreachable {
        eprintln!("meshctl: node {node} did not answer, its pods are left out: {why}");
    }
    let plan = pods::plan(&discovery.pods, args.client.as_deref(), args.server.as_deref())?;
    for node in &discovery.nodes {
        for stale in probes::sweep_stale_cgroups(&node.pods_cgroup) {
            eprintln!("meshctl: removed {} (left by an interrupted run)", stale.display());
        }
    }
    let (objects, stale) = TestObjects::claim(&config_dir)?;
    for file in stale {
        eprintln!("meshctl: removed {} (left by an interrupted run)", file.display());
    }
    let token = checks::random_bytes(8).map(|b| probe::to_hex(&b))?;
    eprintln!(
        "connectivity-test: client {} ({}), servers: {} (other node), {} (same node); port {}",
        plan.client.key(),
        plan.client.node,
        plan.cross_node.as_ref().map_or("none".into(), pods::MeshPod::key),
        plan.same_node.as_ref().map_or("none".into(), pods::MeshPod::key),
        args.port
    );

    let mut progress = Progress::new(format == Format::Table, CHECKS.len());
    let mut runner = Runner::new(
        context.control_plane.endpoint(),
        discovery,
        plan,
        Probes::new(token),
        objects,
        config_dir,
        args.port,
        args.service_ip,
        &mut progress,
    );
    let mut results: Vec<CheckResult> = Vec::new();
    let mut outcome: anyhow::Result<()> = Ok(());
    for name in CHECKS {
        if !args.keep_going && results.iter().any(|r| r.status == Status::Fail) {
            results.push(CheckResult {
                name,
                status: Status::Skip,
                detail: "not run: an earlier check failed (--keep-going runs every check)".into(),
                duration_ms: 0,
            });
            continue;
        }
        let started = Instant::now();
        runner.progress.start(name, &describe_check(name, &runner));
        let verdict = match name {
            "pod-to-pod-cross-node" => {
                let server = runner.plan.cross_node.clone();
                runner.pod_to_pod(server, "no enrolled pod on another node than the client")
            }
            "pod-to-pod-same-node" => {
                let server = runner.plan.same_node.clone();
                runner.pod_to_pod(server, "no other enrolled pod on the client's node")
            }
            "pod-to-service" => runner.pod_to_service(),
            "mtls-on-the-wire" => runner.mtls_on_the_wire(),
            _ => runner.deny_policy(),
        };
        let verdict = match verdict {
            // A Ctrl-C on a terminal also reaches the probes: whatever the check saw then is
            // not a verdict.
            _ if interrupted() => {
                outcome = Err(Interrupted.into());
                break;
            }
            Ok(verdict) => verdict,
            Err(err) => Verdict::Fail(crate::one_line(&err)),
        };
        let (status, detail) = match verdict {
            Verdict::Pass(d) => (Status::Pass, d),
            Verdict::Fail(d) => (Status::Fail, d),
            Verdict::Skip(d) => (Status::Skip, d),
        };
        let result = CheckResult { name, status, detail, duration_ms: started.elapsed().as_millis() as u64 };
        runner.progress.finish(&result);
        results.push(result);
    }
    let mut left = runner.probes.cleanup();
    left.extend(runner.objects.cleanup());
    drop(runner);
    drop(progress);
    outcome.context("test objects and probes removed")?;
    if !left.is_empty() {
        anyhow::bail!("the checks ran, but cleaning up failed: could not remove {}", left.join("; "));
    }
    let value = report::to_json(&results);
    crate::output::emit(format, &value, report::render)?;
    Ok(if value["passed"] == true { Outcome::Passed } else { Outcome::Failed })
}

fn describe_check(name: &str, runner: &Runner) -> String {
    let plan = &runner.plan;
    let to = |pod: &Option<pods::MeshPod>| pod.as_ref().map_or("-".into(), pods::MeshPod::key);
    match name {
        "pod-to-pod-cross-node" => format!("{} → {}", plan.client.key(), to(&plan.cross_node)),
        "pod-to-pod-same-node" => format!("{} → {}", plan.client.key(), to(&plan.same_node)),
        "pod-to-service" => {
            format!("{} → Service {} → {}", plan.client.key(), objects::SERVICE, plan.primary().key())
        }
        "mtls-on-the-wire" => {
            format!("capture on {} while {} → {}", plan.client.node, plan.client.key(), plan.primary().key())
        }
        _ => format!("DENY {} on {}", plan.client.key(), plan.primary().key()),
    }
}
