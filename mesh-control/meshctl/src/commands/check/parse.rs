//! Pure readers of what `check` finds on the machine: kernel release, mount table, effective
//! capabilities, CNI config. Each takes the text and returns a plain value, so each is tested
//! with fixed inputs.

use std::{fmt, path::PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A kernel version as `uname -r` starts it (`6.8.0-45-generic` → 6.8.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        KernelVersion { major, minor, patch: 0 }
    }

    /// Parses the leading `major.minor[.patch]` of a release string; the rest (`-45-generic`,
    /// `+`, `-rc3`) is ignored.
    pub fn parse(release: &str) -> anyhow::Result<Self> {
        let dotted = release.trim().split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap_or("");
        let numbers: Vec<u32> = dotted.split('.').map_while(|part| part.parse().ok()).take(3).collect();
        match numbers.as_slice() {
            [major, minor] => Ok(KernelVersion { major: *major, minor: *minor, patch: 0 }),
            [major, minor, patch] => Ok(KernelVersion { major: *major, minor: *minor, patch: *patch }),
            _ => bail!("kernel release {release:?} does not start with major.minor"),
        }
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One line of `/proc/self/mountinfo`: where, what filesystem, from what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Parses `/proc/<pid>/mountinfo` (proc(5)): fields 5 (mount point, octal-escaped) and, after
/// the ` - ` separator that ends the optional fields, the filesystem type and source. Lines
/// that do not have that shape are skipped.
pub fn mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let source = after.next().unwrap_or_default();
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fs_type: fs_type.to_owned(),
                source: unescape_octal(source),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` escapes (`\040`) (space, tab, newline, backslash) in mountinfo fields.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| d[0] <= b'3' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Capabilities mesh-node uses, by number (`linux/capability.h`).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Returns the effective capability set from `/proc/<pid>/status` (`CapEff:` in hex).
pub fn cap_eff(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in the process status")?;
    u64::from_str_radix(line.trim(), 16)
        .with_context(|| format!("CapEff {:?} is not hexadecimal", line.trim()))
}

/// Returns whether capability `cap` is in the set `caps`.
pub fn has_cap(caps: u64, cap: u32) -> bool {
    cap < 64 && caps & (1 << cap) != 0
}

/// What the runtime's CNI config says about nodemesh's plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConfig {
    /// The network's name, if the config has one.
    pub name: Option<String>,
    /// The plugin types in order (a single-plugin `.conf` is a list of one).
    pub plugins: Vec<String>,
}

impl CniConfig {
    /// Returns whether `plugin` is in the chain, and whether it runs last (where mesh-node
    /// chains it: after the network plugin has set up the pod's interface and IP).
    pub fn chained(&self, plugin: &str) -> Option<bool> {
        let position = self.plugins.iter().position(|p| p == plugin)?;
        Some(position + 1 == self.plugins.len())
    }
}

/// Parses a CNI network config: a config list (`plugins`) or a single plugin (`type`), as the
/// container runtime and `mesh-node`'s chaining read them.
pub fn cni_config(text: &str) -> anyhow::Result<CniConfig> {
    let value: Value = serde_json::from_str(text).context("not valid JSON")?;
    let Value::Object(config) = value else { bail!("not a JSON object") };
    let name = config.get("name").and_then(Value::as_str).map(str::to_owned);
    let plugins = if let Some(plugins) = config.get("plugins") {
        let Value::Array(plugins) = plugins else { bail!("plugins is not a list") };
        plugins
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.get("type")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .with_context(|| format!("plugin {i} has no type"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        let plugin = config
            .get("type")
            .and_then(Value::as_str)
            .context("neither a config list (plugins) nor a plugin (type)")?;
        vec![plugin.to_owned()]
    };
    Ok(CniConfig { name, plugins })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_and_compare() {
        let v = |s| KernelVersion::parse(s).expect(s);
        assert_eq!(v("6.18.44-fc-v657"), KernelVersion { major: 6, minor: 18, patch: 44 });
        assert_eq!(v("5.15.0-91-generic"), KernelVersion { major: 5, minor: 15, patch: 0 });
        assert_eq!(v("5.4.17-2136.300.7.el8uek.x86_64"), KernelVersion { major: 5, minor: 4, patch: 17 });
        assert_eq!(v("6.1-rc3"), KernelVersion::new(6, 1));
        assert_eq!(v("5.9+\n"), KernelVersion::new(5, 9));
        assert!(v("5.14.21") < KernelVersion::new(5, 15));
        assert!(v("5.15.0") >= KernelVersion::new(5, 15));
        assert!(v("6.0.1") > KernelVersion::new(5, 15));
        assert!(v("4.19.300") < KernelVersion::new(5, 9));
        for bad in ["", "linux", "6", "-5.15"] {
            assert!(KernelVersion::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(v("5.15.0").to_string(), "5.15.0");
    }

    #[test]
    fn mountinfo_gives_mount_points_and_types_past_optional_fields() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw
52 23 0:40 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
60 23 0:41 / /mnt/with\\040space rw - ext4 /dev/vda\\0401 rw
garbage line
";
        let mounts = mountinfo(text);
        assert_eq!(mounts.len(), 4, "{mounts:?}");
        assert_eq!(mounts[1].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[1].fs_type, "cgroup2");
        assert_eq!((mounts[2].fs_type.as_str(), mounts[2].source.as_str()), ("bpf", "bpf"));
        assert_eq!(mounts[3].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[3].source, "/dev/vda 1");
        assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn cap_eff_reads_the_effective_set() {
        let status = "Name:\tmeshctl\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
        let caps = cap_eff(status).expect("CapEff");
        for cap in [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF] {
            assert!(has_cap(caps, cap), "{cap}");
        }
        assert!(!has_cap(caps, 24), "bit 24 (CAP_SYS_RESOURCE) is off in fffeffffff");
        // A container with only NET_ADMIN (bit 12).
        let only_net = cap_eff("CapEff:\t0000000000001000\n").expect("CapEff");
        assert!(has_cap(only_net, CAP_NET_ADMIN) && !has_cap(only_net, CAP_BPF));
        assert!(!has_cap(only_net, 64));
        assert!(cap_eff("Name: x\n").unwrap_err().to_string().contains("CapEff"));
        assert!(cap_eff("CapEff:\tzz\n").unwrap_err().to_string().contains("hexadecimal"));
    }

    #[test]
    fn cni_configs_list_their_chain() {
        let list = r#"{"cniVersion":"1.0.0","name":"kindnet","plugins":[
            {"type":"ptp","ipam":{"type":"host-local"}},{"type":"portmap"},
            {"type":"nodemesh-cni","agentSocket":"/var/run/nodemesh/cni.sock"}]}"#;
        let config = cni_config(list).expect("list");
        assert_eq!(config.name.as_deref(), Some("kindnet"));
        assert_eq!(config.plugins, ["ptp", "portmap", "nodemesh-cni"]);
        assert_eq!(config.chained("nodemesh-cni"), Some(true));
        assert_eq!(config.chained("bandwidth"), None);

        let single = cni_config(r#"{"cniVersion":"0.4.0","name":"bridge","type":"bridge"}"#).expect("conf");
        assert_eq!(
            (single.plugins.as_slice(), single.chained("nodemesh-cni")),
            (&["bridge".to_owned()][..], None)
        );

        let not_last =
            cni_config(r#"{"plugins":[{"type":"nodemesh-cni"},{"type":"calico"}]}"#).expect("list");
        assert_eq!(not_last.chained("nodemesh-cni"), Some(false));

        for (bad, why) in [
            ("{not json", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"plugins":{}}"#, "plugins is not a list"),
            (r#"{"plugins":[{"name":"x"}]}"#, "plugin 0 has no type"),
            (r#"{"name":"x"}"#, "neither a config list"),
        ] {
            let err = format!("{:#}", cni_config(bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
