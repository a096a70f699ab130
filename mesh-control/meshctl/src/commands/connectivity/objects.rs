//! The objects connectivity-test writes into mesh-control's config directory (local mode): a
//! Service selecting the server pod and a DENY AuthorizationPolicy. Every file is named
//! `meshctl-conntest-*.yaml`, starts with a comment naming the meshctl process that wrote it,
//! and is removed when [`TestObjects`] is dropped, whatever happened.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use super::probes::PREFIX;

/// The Service's name (its file is `meshctl-conntest-service.yaml`).
pub const SERVICE: &str = PREFIX;
/// The policy's name (its file is `meshctl-conntest-deny.yaml`).
pub const DENY_POLICY: &str = "meshctl-conntest-deny";
/// The port the Service exposes (its target port is the probe's).
pub const SERVICE_PORT: u16 = 80;

/// The files of one run.
#[derive(Debug)]
pub struct TestObjects {
    dir: PathBuf,
    written: BTreeSet<PathBuf>,
}

impl TestObjects {
    /// Takes `dir` for this run: files an earlier run left are removed, unless the meshctl that
    /// wrote them is still running (two runs would fight over the same objects).
    pub fn claim(dir: &Path) -> anyhow::Result<(Self, Vec<PathBuf>)> {
        anyhow::ensure!(dir.is_dir(), "the context's configDir {} is not a directory", dir.display());
        let mut stale = Vec::new();
        for file in test_files(dir)? {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if let Some(pid) = writer_pid(&text)
                && pid != std::process::id()
                && Path::new(&format!("/proc/{pid}")).exists()
            {
                bail!(
                    "another connectivity-test (pid {pid}) is running against {}: wait for it to finish",
                    dir.display()
                );
            }
            std::fs::remove_file(&file).with_context(|| format!("removing the stale {}", file.display()))?;
            stale.push(file);
        }
        Ok((TestObjects { dir: dir.to_owned(), written: BTreeSet::new() }, stale))
    }

    fn path(&self, object: &str) -> PathBuf {
        self.dir.join(format!("{object}.yaml"))
    }

    /// Writes an object's file atomically (a temporary name mesh-control does not read, then a
    /// rename), so mesh-control never reads half of it.
    pub fn write(&mut self, object: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(object);
        let tmp = self.dir.join(format!(".{object}.yaml.tmp"));
        let text = format!(
            "# written by meshctl connectivity-test (pid {}); removed when it ends\n{yaml}",
            std::process::id()
        );
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        self.written.insert(path.clone());
        if let Err(err) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(err).with_context(|| format!("renaming into {}", path.display()));
        }
        Ok(path)
    }

    /// Removes an object's file.
    pub fn remove(&mut self, object: &str) -> anyhow::Result<()> {
        let path = self.path(object);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
        }
        self.written.remove(&path);
        Ok(())
    }

    /// Removes every file of the run; returns what could not be removed.
    pub fn cleanup(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        for path in std::mem::take(&mut self.written) {
            let tmp = path
                .with_file_name(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
            let _ = std::fs::remove_file(tmp);
            match std::fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    left.push(format!("{}: {err}", path.display()));
                }
                _ => {}
            }
        }
        left
    }
}

impl Drop for TestObjects {
    fn drop(&mut self) {
        for problem in self.cleanup() {
            eprintln!("meshctl: could not remove {problem}");
        }
    }
}

/// Lists the files of connectivity-test in `dir`.
pub fn test_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.trim_start_matches('.').starts_with(PREFIX) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn writer_pid(text: &str) -> Option<u32> {
    let first = text.lines().next()?;
    first.split("(pid ").nth(1)?.split(')').next()?.parse().ok()
}

/// Quotes a string for YAML (a JSON string is a YAML flow scalar).
fn quoted(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Returns the Service selecting the server pod by `selector`, at `vip`, port 80 → `target`,
/// declared opaque TCP (the probe's protocol is not HTTP).
pub fn service_yaml(
    namespace: &str,
    vip: Ipv4Addr,
    selector: &BTreeMap<String, String>,
    target: u16,
) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE}\n  namespace: {}\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs:\n  - {vip}\n  selector:\n",
        quoted(namespace)
    );
    for (key, value) in selector {
        let _ = writeln!(yaml, "    {}: {}", quoted(key), quoted(value));
    }
    let _ = write!(
        yaml,
        "  ports:\n  - name: tcp-conntest\n    protocol: TCP\n    appProtocol: tcp\n    port: {SERVICE_PORT}\n    targetPort: {target}\n"
    );
    yaml
}

/// Returns a DENY policy for connections from `principal` to `port`, on the pods `selector`
/// picks (the server alone), or, without one, on the namespace (still only that caller and
/// that port).
pub fn deny_policy_yaml(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    principal: &str,
    port: u16,
) -> String {
    let mut yaml = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {DENY_POLICY}\n  namespace: {}\nspec:\n",
        quoted(namespace)
    );
    if let Some(selector) = selector {
        yaml.push_str("  selector:\n    matchLabels:\n");
        for (key, value) in selector {
            let _ = writeln!(yaml, "      {}: {}", quoted(key), quoted(value));
        }
    }
    let _ = write!(
        yaml,
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [{}]\n    to:\n    - operation:\n        ports: [\"{port}\"]\n",
        quoted(principal)
    );
    yaml
}

/// Chooses a cluster IP no Service and no pod uses: the highest free address of the /24 of
/// the first Service that has one, else of 10.96.0.0/24 (Kubernetes' default range).
pub fn pick_vip(used: &UsedAddresses) -> anyhow::Result<Ipv4Addr> {
    let base = used.services.first().map_or([10, 96, 0, 0], |ip| ip.octets());
    (2..=250u8)
        .rev()
        .map(|last| Ipv4Addr::new(base[0], base[1], base[2], last))
        .find(|ip| !used.services.contains(ip) && !used.pods.contains(ip))
        .context("no free cluster IP near the Services' (name one with --service-ip)")
}

/// The addresses the manifests already use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsedAddresses {
    /// Services' cluster IPs, in the order the files list them.
    pub services: Vec<Ipv4Addr>,
    pub pods: Vec<Ipv4Addr>,
}

/// Returns the cluster IPs of the Services in `dir`, and every pod IP.
pub fn used_addresses(dir: &Path) -> anyhow::Result<UsedAddresses> {
    let local = mesh_manifests::local::read(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut used = UsedAddresses::default();
    for spec in local.objects.services.iter().filter_map(|s| s.spec.as_ref()) {
        for ip in
            spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()).filter_map(|ip| ip.parse().ok())
        {
            if !used.services.contains(&ip) {
                used.services.push(ip);
            }
        }
    }
    used.pods =
        local.objects.pods.iter().filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()).collect();
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_read_back_as_what_they_mean() {
        let dir = std::env::temp_dir().join(format!("meshctl-objects-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let selector =
            BTreeMap::from([("app".to_owned(), "b1".to_owned()), ("v".to_owned(), "1".to_owned())]);
        let (mut objects, stale) = TestObjects::claim(&dir).unwrap();
        assert!(stale.is_empty());
        let vip = Ipv4Addr::new(10, 96, 0, 250);
        objects.write(SERVICE, &service_yaml("demo", vip, &selector, 17080)).unwrap();
        objects
            .write(
                DENY_POLICY,
                &deny_policy_yaml("demo", Some(&selector), "cluster.local/ns/demo/sa/a1", 17080),
            )
            .unwrap();
        let local = mesh_manifests::local::read(&dir).unwrap_or_else(|e| panic!("{e}"));
        let service = &local.objects.services[0];
        let spec = service.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.250"));
        assert_eq!(spec.selector.as_ref().unwrap().get("v").map(String::as_str), Some("1"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 80);
        let policy = &local.objects.authorization_policies[0];
        assert_eq!(policy.spec.rules[0].from[0].source.principals, ["cluster.local/ns/demo/sa/a1"]);
        assert_eq!(policy.spec.rules[0].to[0].operation.ports, ["17080"]);
        assert!(policy.spec.selector.is_some());
        let used = used_addresses(&dir).unwrap();
        assert_eq!(used, UsedAddresses { services: vec![vip], pods: vec![] });
        assert_eq!(pick_vip(&used).unwrap(), Ipv4Addr::new(10, 96, 0, 249));
        let pods_only = UsedAddresses { services: vec![], pods: vec![Ipv4Addr::new(10, 1, 1, 2), vip] };
        assert_eq!(pick_vip(&pods_only).unwrap(), Ipv4Addr::new(10, 96, 0, 249), "never in a pod subnet");

        // A second claim while this process "runs" is refused; files of dead runs are swept.
        assert!(TestObjects::claim(&dir).is_ok(), "our own pid: this process's earlier files");
        objects.write(SERVICE, "# x\n").unwrap();
        let dead = std::fs::read_to_string(dir.join("meshctl-conntest.yaml")).unwrap();
        std::fs::write(dir.join("meshctl-conntest.yaml"), dead.replace(&std::process::id().to_string(), "1"))
            .unwrap();
        assert!(TestObjects::claim(&dir).unwrap_err().to_string().contains("pid 1"), "pid 1 is alive");
        std::fs::write(
            dir.join("meshctl-conntest.yaml"),
            "# written by meshctl connectivity-test (pid 4000000)\n",
        )
        .unwrap();
        let (_, stale) = TestObjects::claim(&dir).unwrap();
        assert_eq!(stale.len(), 1);
        drop(objects);
        assert!(test_files(&dir).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_namespace_wide_policy_still_names_only_the_caller_and_port() {
        let yaml = deny_policy_yaml("demo", None, "td/ns/demo/sa/a1", 9);
        assert!(!yaml.contains("selector"));
        assert!(
            yaml.contains("principals: [\"td/ns/demo/sa/a1\"]") && yaml.contains("ports: [\"9\"]"),
            "{yaml}"
        );
    }
}
