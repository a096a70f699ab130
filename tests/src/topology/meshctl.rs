//! Running `meshctl` against the topology, as an operator would: through a context file naming
//! mesh-control's and each node's admin endpoint (inside the nodes' netns).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use super::{NodeId, Topology};
use crate::{netns, process::find_binary};

/// What a meshctl run printed and how it ended.
#[derive(Debug)]
pub struct MeshctlRun {
    /// Exit code: 0 all passed, 1 something checked failed, 2 meshctl could not do its job.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Topology {
    /// The meshctl context of this topology (written when mesh-control starts).
    pub fn meshctl_context(&self) -> PathBuf {
        self.state_dir.join("meshctl.yaml")
    }

    /// Writes [`Topology::meshctl_context`].
    pub(super) fn write_meshctl_context(&self) -> anyhow::Result<()> {
        let netns_of = |node: NodeId| netns::path(&self.node_netns(node)).display().to_string();
        let mut yaml = format!(
            "controlPlane:\n  admin: 127.0.0.1:15014\n  netns: {}\n  configDir: {}\nnodes:\n",
            netns_of(NodeId::A),
            self.state_dir.display()
        );
        for node in NodeId::ALL {
            yaml.push_str(&format!(
                "  - name: {}\n    admin: 127.0.0.1:15000\n    netns: {}\n",
                node.name(),
                netns_of(node)
            ));
        }
        let path = self.meshctl_context();
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    /// Runs meshctl with `args` against this topology.
    pub fn meshctl(&self, args: &[&str]) -> anyhow::Result<MeshctlRun> {
        let binary = find_binary("meshctl")?;
        let output = Command::new(&binary)
            .arg("--context")
            .arg(self.meshctl_context())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        Ok(MeshctlRun {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs meshctl with `args` and `-o json`, and parses what it printed; a run that could not
    /// do its job (exit 2) is an error carrying its message.
    pub fn meshctl_json(&self, args: &[&str]) -> anyhow::Result<(i32, serde_json::Value)> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let run = self.meshctl(&all)?;
        anyhow::ensure!(
            run.code == 0 || run.code == 1,
            "meshctl {} failed ({}): {}",
            args.join(" "),
            run.code,
            run.stderr.trim()
        );
        let value = serde_json::from_str(&run.stdout)
            .with_context(|| format!("meshctl {} printed no JSON: {}", args.join(" "), run.stdout))?;
        Ok((run.code, value))
    }
}
