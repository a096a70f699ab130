//! Installing the plugin on the node: the binary into the CNI bin directory, and an entry
//! chained after the cluster's network plugin in its config list. Uninstalling removes both
//! and leaves the cluster's own config as it was.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::PLUGIN_TYPE;

/// Where the plugin goes and what its entry says.
#[derive(Clone, Debug)]
pub struct CniInstall {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub socket: PathBuf,
    pub timeout_secs: u64,
    pub exempt_namespaces: Vec<String>,
}

impl CniInstall {
    /// Installs the binary and chains the entry into the primary config. Returns the config
    /// file changed, or `None` when the cluster's network plugin has written no config yet.
    #[cfg(test)]
    fn install(&self) -> anyhow::Result<Option<PathBuf>> {
        self.install_binary()?;
        self.install_config()
    }

    /// Copies this binary in as the plugin.
    pub fn install_binary(&self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding mesh-node's own binary")?;
        let target = self.bin_dir.join(PLUGIN_TYPE);
        let temporary = self.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        std::fs::copy(&exe, &temporary)
            .with_context(|| format!("copying {} to {}", exe.display(), temporary.display()))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&temporary, &target).with_context(|| format!("installing {}", target.display()))
    }

    /// Chains the entry into the primary config, writing only when that changes it (the
    /// cluster's network plugin may rewrite its config at any time, so this is re-checked).
    pub fn install_config(&self) -> anyhow::Result<Option<PathBuf>> {
        let Some(primary) = primary_config(&self.conf_dir)? else { return Ok(None) };
        let text =
            std::fs::read_to_string(&primary).with_context(|| format!("reading {}", primary.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", primary.display()))?;
        let chained = chain(config.clone(), self.entry())
            .with_context(|| format!("chaining into {}", primary.display()))?;
        if chained == config {
            return Ok(Some(primary));
        }
        // A single-plugin .conf becomes a .conflist of the same name (the runtime reads either).
        let destination = primary.with_extension("conflist");
        write_atomically(&destination, &serde_json::to_vec_pretty(&chained)?)?;
        if destination != primary {
            std::fs::remove_file(&primary).with_context(|| format!("replacing {}", primary.display()))?;
        }
        Ok(Some(destination))
    }

    /// Removes the entry and the binary; returns whether anything was removed.
    pub fn uninstall(&self) -> anyhow::Result<bool> {
        let mut removed = false;
        if let Some(primary) = primary_config(&self.conf_dir)? {
            let text = std::fs::read_to_string(&primary)?;
            let mut config: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", primary.display()))?;
            if let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) {
                let before = plugins.len();
                plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
                if plugins.len() != before {
                    write_atomically(&primary, &serde_json::to_vec_pretty(&config)?)?;
                    removed = true;
                }
            }
        }
        match std::fs::remove_file(self.bin_dir.join(PLUGIN_TYPE)) {
            Ok(()) => removed = true,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context("removing the plugin binary"),
        }
        Ok(removed)
    }

    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.socket,
            "timeoutSeconds": self.timeout_secs,
            "exemptNamespaces": self.exempt_namespaces,
        })
    }
}

/// The config file the runtime uses: the first by name (`.conflist`, `.conf`, `.json`).
fn primary_config(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
        })
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

/// Returns the config list with our entry last (replacing an earlier one of ours).
fn chain(config: Value, entry: Value) -> anyhow::Result<Value> {
    let Value::Object(mut config) = config else { anyhow::bail!("the config is not a JSON object") };
    let mut list = if config.contains_key("plugins") {
        config
    } else {
        // A single plugin config: it becomes the first plugin of a list with its name and version.
        anyhow::ensure!(config.contains_key("type"), "neither a config list (plugins) nor a plugin (type)");
        let mut list = serde_json::Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(value) = config.remove(key) {
                list.insert(key.to_owned(), value);
            }
        }
        list.insert("plugins".into(), json!([Value::Object(config)]));
        list
    };
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        anyhow::bail!("plugins is not a list");
    };
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    anyhow::ensure!(!plugins.is_empty(), "no network plugin to chain after");
    plugins.push(entry);
    Ok(Value::Object(list))
}

fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension("nodemesh-tmp");
    std::fs::write(&temporary, contents).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(name: &str) -> (PathBuf, CniInstall) {
        let root = std::env::temp_dir().join(format!("nm-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["net.d", "bin"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let install = CniInstall {
            conf_dir: root.join("net.d"),
            bin_dir: root.join("bin"),
            socket: "/var/run/nodemesh/cni.sock".into(),
            timeout_secs: 30,
            exempt_namespaces: vec!["kube-system".into()],
        };
        (root, install)
    }

    fn types(config: &Value) -> Vec<&str> {
        config["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn chains_after_the_cluster_plugin_once_and_uninstalls_back() {
        let (root, install) = setup("list");
        let original = json!({"cniVersion": "1.0.0", "name": "kindnet", "plugins": [{"type": "ptp"}, {"type": "portmap"}]});
        let conf = install.conf_dir.join("10-kindnet.conflist");
        std::fs::write(&conf, original.to_string()).unwrap();
        std::fs::write(install.conf_dir.join("20-other.conflist"), "{}").unwrap();
        assert_eq!(install.install().unwrap(), Some(conf.clone()));
        assert_eq!(install.install().unwrap(), Some(conf.clone()), "a second install changes nothing");
        let chained: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(types(&chained), ["ptp", "portmap", PLUGIN_TYPE]);
        assert_eq!(chained["plugins"][2]["agentSocket"], "/var/run/nodemesh/cni.sock");
        assert!(install.bin_dir.join(PLUGIN_TYPE).is_file());

        assert!(install.uninstall().unwrap());
        let restored: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(restored, original);
        assert!(!install.bin_dir.join(PLUGIN_TYPE).exists());
        assert!(!install.uninstall().unwrap(), "nothing left to remove");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_no_config_yet_is_not_an_error() {
        let (root, install) = setup("single");
        assert_eq!(install.install().unwrap(), None, "the cluster's plugin has not written its config");
        std::fs::write(
            install.conf_dir.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"br","type":"bridge"}"#,
        )
        .unwrap();
        let written = install.install().unwrap().unwrap();
        assert_eq!(written, install.conf_dir.join("10-bridge.conflist"));
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
        assert_eq!((list["name"].as_str(), list["cniVersion"].as_str()), (Some("br"), Some("0.4.0")));
        assert_eq!(types(&list), ["bridge", PLUGIN_TYPE]);
        assert!(!install.conf_dir.join("10-bridge.conf").exists());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_broken_config_is_reported_naming_the_file() {
        let (root, install) = setup("broken");
        std::fs::write(install.conf_dir.join("05-x.conflist"), "{ not json").unwrap();
        let err = format!("{:#}", install.install().unwrap_err());
        assert!(err.contains("05-x.conflist is not valid JSON"), "{err}");
        std::fs::write(install.conf_dir.join("05-x.conflist"), r#"{"plugins": []}"#).unwrap();
        let err = format!("{:#}", install.install().unwrap_err());
        assert!(err.contains("no network plugin to chain after"), "{err}");
        let _ = std::fs::remove_dir_all(root);
    }
}
