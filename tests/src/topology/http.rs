//! The test bed's HTTP tools: extra objects for the control plane (Services, authorization
//! policies, HTTP routes), pod-app's HTTP server and client, `curl`, and raw TCP, each run
//! inside a pod as its app would be (its netns and cgroup, so the mesh captures it).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
};

use anyhow::Context as _;

use super::{ServerHandle, Topology};
use crate::{
    curl::{self, CurlResponse},
    netns,
    report::{HttpReport, RawReport, ServerStats},
};

impl Topology {
    /// Writes `yaml` (one or more Kubernetes-shaped documents: Services, AuthorizationPolicies,
    /// HTTPRoutes) as `<name>.yaml` into the control plane's config directory, atomically (a
    /// temporary file renamed into place), so mesh-control never reads half of it. Written
    /// before [`Topology::start_meshed`], it is in the first configuration nodes receive;
    /// afterwards mesh-control reloads it. Returns the file's path.
    pub fn write_config(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.config_path(name)?;
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(path)
    }

    /// Removes a file written by [`Topology::write_config`].
    pub fn remove_config(&self, name: &str) -> anyhow::Result<()> {
        let path = self.config_path(name)?;
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    fn config_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "config name {name:?}: letters, digits, `-` and `_` only"
        );
        anyhow::ensure!(
            !name.ends_with("-pods"),
            "config name {name:?} would replace a node's pod manifests"
        );
        Ok(self.state_dir.join(format!("{name}.yaml")))
    }

    /// Starts `pod-app http-serve --port <port>` in a pod (or `ext`) with `args` (e.g.
    /// `["--fail-first", "1"]`) and waits until it listens. Its name (`x-server`) is the pod's
    /// unless `args` has a `--name`.
    pub fn http_serve(&self, pod_or_ext: &str, port: u16, args: &[&str]) -> anyhow::Result<ServerHandle> {
        let mut all = args.to_vec();
        if !args.contains(&"--name") {
            all.extend(["--name", pod_or_ext]);
        }
        self.start_server(pod_or_ext, "http-serve", port, &all)
    }

    /// Returns what an [`Topology::http_serve`] server has received so far, asked over its
    /// pod's loopback (not captured, not counted).
    pub fn http_stats(&self, server: &ServerHandle) -> anyhow::Result<ServerStats> {
        let body = self.http_admin(server, "/admin/stats")?;
        serde_json::from_str(&body).with_context(|| format!("parsing the stats of {}: {body}", server.place))
    }

    /// Makes an [`Topology::http_serve`] server answer every request with `status` from now on
    /// (e.g. 500 to make an endpoint bad, then 200 to recover it).
    pub fn set_http_status(&self, server: &ServerHandle, status: u16) -> anyhow::Result<()> {
        self.http_admin(server, &format!("/admin/status?code={status}")).map(drop)
    }

    fn http_admin(&self, server: &ServerHandle, path: &str) -> anyhow::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port));
        let (status, body) = netns::http_get(&self.netns_name(&server.place), addr, path)?;
        anyhow::ensure!(status == 200, "pod-app in {} answered {path} with {status}: {body}", server.place);
        Ok(body)
    }

    /// Runs `pod-app http-client <args>` in a pod (or `ext`), e.g.
    /// `["--url", "http://10.96.0.10/", "--requests", "100"]`, and returns its report.
    pub fn http_client(&self, pod_or_ext: &str, args: &[&str]) -> anyhow::Result<HttpReport> {
        let mut cmd = self.app_command(pod_or_ext)?;
        cmd.arg("http-client").args(args);
        let output = cmd.output().context("running pod-app http-client")?;
        anyhow::ensure!(
            output.status.success(),
            "pod-app http-client {args:?} in {pod_or_ext} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!("parsing the http-client report {:?}", String::from_utf8_lossy(&output.stdout))
        })
    }

    /// Runs `curl <args>` in a pod (or `ext`) as the pod's app would, and returns the final
    /// response (status 0 and curl's exit code and message when there was none). At most 10 s
    /// unless `args` says otherwise (`--max-time`).
    pub fn curl(&self, pod_or_ext: &str, args: &[&str]) -> anyhow::Result<CurlResponse> {
        let mut cmd = self.command_in(pod_or_ext, "curl")?;
        cmd.args(curl::base_args()).args(args);
        let output = cmd.output().context("running curl (install curl)")?;
        Ok(curl::parse(
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
            output.status.code().unwrap_or(-1),
        ))
    }

    /// Writes `request` as-is on one TCP connection from a pod (or `ext`) to `to` and returns
    /// what came back, read until the peer closes or nothing arrives for 1.5 s.
    pub fn raw_tcp(&self, pod_or_ext: &str, to: SocketAddr, request: &[u8]) -> anyhow::Result<RawReport> {
        let mut cmd = self.app_command(pod_or_ext)?;
        cmd.args(["raw", "--to", &to.to_string(), "--idle-ms", "1500"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting pod-app raw")?;
        let mut stdin = child.stdin.take().context("pod-app raw stdin")?;
        stdin.write_all(request).context("handing the request to pod-app raw")?;
        drop(stdin);
        let output = child.wait_with_output().context("running pod-app raw")?;
        anyhow::ensure!(
            output.status.success(),
            "pod-app raw in {pod_or_ext} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing the raw report {:?}", String::from_utf8_lossy(&output.stdout)))
    }
}
