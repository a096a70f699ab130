//! The machine around the BPF programs: kernel release, BTF, cgroup v2, bpffs, privileges and
//! the CNI config. Reads files and calls `statfs`; the parsing is in [`super::parse`].

use std::path::{Path, PathBuf};

use super::{
    Check,
    bpf::MIN_KERNEL,
    parse::{self, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, KernelVersion, Mount},
};

/// `BPF_FS_MAGIC` and `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The CNI plugin's type in the runtime's config (mesh-node's `cni::PLUGIN_TYPE`).
const PLUGIN_TYPE: &str = "nodemesh-cni";

pub fn kernel() -> Check {
    let release = match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) => release.trim().to_owned(),
        Err(err) => {
            return Check::fail(
                "kernel",
                format!("cannot read /proc/sys/kernel/osrelease: {err}"),
                "mount /proc",
            );
        }
    };
    match KernelVersion::parse(&release) {
        Ok(version) if version >= MIN_KERNEL => Check::pass(
            "kernel",
            format!("{release} (nodemesh needs {}.{}+)", MIN_KERNEL.major, MIN_KERNEL.minor),
        ),
        Ok(_) => Check::fail(
            "kernel",
            format!("{release} is older than {}.{}", MIN_KERNEL.major, MIN_KERNEL.minor),
            format!(
                "upgrade to Linux {}.{}+: record_established calls bpf_get_netns_cookie from sock_ops (5.15), capture_inbound is an sk_lookup program (5.9)",
                MIN_KERNEL.major, MIN_KERNEL.minor
            ),
        ),
        Err(err) => Check::warn("kernel", format!("{err}"), "the BPF probes below decide"),
    }
}

pub fn btf() -> Check {
    let path = "/sys/kernel/btf/vmlinux";
    let hint = "optional for nodemesh (its programs carry no CO-RE relocations); bpftool and tracing tools want a kernel built with CONFIG_DEBUG_INFO_BTF=y";
    match std::fs::File::open(path).and_then(|mut f| {
        let mut magic = [0u8; 2];
        std::io::Read::read_exact(&mut f, &mut magic)?;
        Ok((magic, f.metadata()?.len()))
    }) {
        // BTF's magic 0xeB9F, little-endian on this machine's byte order.
        Ok((magic, size)) if u16::from_ne_bytes(magic) == 0xeb9f => {
            Check::pass("BTF", format!("{path} ({} KiB)", size.div_ceil(1024)))
        }
        Ok(_) => Check::warn("BTF", format!("{path} is not BTF"), hint),
        Err(err) => Check::warn("BTF", format!("{path}: {err}"), hint),
    }
}

/// cgroup v2: where it is mounted, and whether `cgroup_root` (the pods' cgroup tree) is in it.
pub fn cgroup(mounts: &[Mount], cgroup_root: Option<&Path>) -> Check {
    let v2: Vec<_> = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point.display().to_string())
        .collect();
    let v1 = mounts.iter().any(|m| m.fs_type == "cgroup");
    if v2.is_empty() {
        return Check::fail(
            "cgroup v2",
            "no cgroup2 filesystem is mounted",
            "boot with systemd.unified_cgroup_hierarchy=1 (or mount -t cgroup2 none /sys/fs/cgroup): connect4/6 and sock_ops attach to a cgroup v2 directory",
        );
    }
    let layout = if v1 { "hybrid: cgroup v1 controllers beside it" } else { "unified" };
    let found = format!("mounted at {} ({layout})", v2.join(", "));
    let Some(root) = cgroup_root else { return Check::pass("cgroup v2", found) };
    match statfs_type(root) {
        Ok(CGROUP2_SUPER_MAGIC) => {
            Check::pass("cgroup v2", format!("{} is cgroup v2; {found}", root.display()))
        }
        Ok(_) => Check::fail(
            "cgroup v2",
            format!("{} is not in a cgroup v2 hierarchy; {found}", root.display()),
            format!("give mesh-node --pods-cgroup under {}", v2[0]),
        ),
        Err(err) => Check::fail(
            "cgroup v2",
            format!("{}: {err}; {found}", root.display()),
            "create the pods' cgroup or fix the path",
        ),
    }
}

/// bpffs at `dir`: mounted, or mountable by mesh-node.
pub fn bpffs(mounts: &[Mount], dir: &Path, caps: Option<u64>) -> Check {
    let elsewhere: Vec<_> = mounts
        .iter()
        .filter(|m| m.fs_type == "bpf" && m.mount_point != dir)
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if matches!(statfs_type(dir), Ok(BPF_FS_MAGIC)) {
        return Check::pass("bpffs", format!("mounted at {}", dir.display()));
    }
    let known = std::fs::read_to_string("/proc/filesystems")
        .map(|t| t.lines().any(|l| l.split_whitespace().last() == Some("bpf")))
        .unwrap_or(false);
    let also = if elsewhere.is_empty() {
        String::new()
    } else {
        format!("; bpffs is mounted at {}", elsewhere.join(", "))
    };
    if !known {
        return Check::fail(
            "bpffs",
            format!("{} is not a bpffs and this kernel has no bpf filesystem{also}", dir.display()),
            "use a kernel built with CONFIG_BPF_SYSCALL",
        );
    }
    if caps.is_some_and(|c| parse::has_cap(c, CAP_SYS_ADMIN)) {
        Check::warn(
            "bpffs",
            format!("not mounted at {}; mesh-node mounts it at start{also}", dir.display()),
            format!(
                "mount -t bpf bpf {} on the host (in Kubernetes: mount the host's, so pins outlive the container)",
                dir.display()
            ),
        )
    } else {
        Check::fail(
            "bpffs",
            format!(
                "not mounted at {} and mesh-node could not mount it without CAP_SYS_ADMIN{also}",
                dir.display()
            ),
            format!("mount -t bpf bpf {} on the host, or give mesh-node CAP_SYS_ADMIN", dir.display()),
        )
    }
}

/// Root and the effective capabilities mesh-node uses (see deploy/base/mesh-node.yaml).
pub fn privileges(caps: &anyhow::Result<u64>) -> Vec<Check> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let root = if euid == 0 {
        Check::pass("root", "running as uid 0")
    } else {
        Check::fail(
            "root",
            format!("running as uid {euid}"),
            "run mesh-node (and this check) as root: mesh-node refuses other users",
        )
    };
    let caps = match caps {
        Ok(caps) => *caps,
        Err(err) => return vec![root, Check::fail("capabilities", format!("{err:#}"), "mount /proc")],
    };
    let wanted = [
        (CAP_BPF, "CAP_BPF", "load programs and maps"),
        (CAP_PERFMON, "CAP_PERFMON", "load the programs, with CAP_BPF"),
        (
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN",
            "attach cgroup and sk_lookup programs, routes and sysctls in pod netns, IP_TRANSPARENT and SO_MARK",
        ),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "setns into pod netns, mount bpffs, move into the proxy cgroup"),
    ];
    let missing: Vec<_> = wanted.iter().filter(|(cap, ..)| !parse::has_cap(caps, *cap)).collect();
    let capabilities = if missing.is_empty() {
        let names: Vec<_> = wanted.iter().map(|(_, name, _)| *name).collect();
        Check::pass("capabilities", format!("effective: {}", names.join(", ")))
    } else {
        let names: Vec<_> = missing.iter().map(|(_, name, _)| *name).collect();
        let why: Vec<_> = missing.iter().map(|(_, name, why)| format!("{name}: {why}")).collect();
        Check::fail(
            "capabilities",
            format!("missing {} (CapEff {caps:016x})", names.join(", ")),
            format!("grant them (privileged: true, as deploy/base/mesh-node.yaml does) — {}", why.join("; ")),
        )
    };
    vec![root, capabilities]
}

/// The runtime's CNI config: present, valid, and whether nodemesh's plugin is chained.
pub fn cni(dir: &Path) -> Check {
    let local =
        "local mode needs no CNI; in Kubernetes pass the runtime's CNI config directory (--cni-conf-dir)";
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Check::warn("CNI config", format!("{} does not exist", dir.display()), local);
        }
        Err(err) => {
            return Check::fail(
                "CNI config",
                format!("{}: {err}", dir.display()),
                "make it readable by root",
            );
        }
    };
    // The runtime's choice, as mesh-node chains into it: the first by name.
    let mut configs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
        })
        .collect();
    configs.sort();
    let Some(primary) = configs.first() else {
        return Check::warn(
            "CNI config",
            format!("no .conflist/.conf in {}", dir.display()),
            "the cluster's network plugin has not written its config yet; mesh-node chains into it once it does",
        );
    };
    let parsed =
        std::fs::read_to_string(primary).map_err(anyhow::Error::from).and_then(|t| parse::cni_config(&t));
    let config = match parsed {
        Ok(config) => config,
        Err(err) => {
            return Check::fail(
                "CNI config",
                format!("{}: {err:#}", primary.display()),
                "fix the file: the container runtime cannot read it either, so no pod gets a network",
            );
        }
    };
    let chain = format!("{} ({})", primary.display(), config.plugins.join(" → "));
    match config.chained(PLUGIN_TYPE) {
        Some(true) => Check::pass("CNI config", format!("{PLUGIN_TYPE} chained last in {chain}")),
        Some(false) => Check::warn(
            "CNI config",
            format!("{PLUGIN_TYPE} is not last in {chain}"),
            "it must run after the network plugin: restart mesh-node, which re-chains it last",
        ),
        None => Check::warn(
            "CNI config",
            format!("{PLUGIN_TYPE} not chained in {chain}"),
            "mesh-node --cni-conf-dir chains it at start; until then new pods of ambient namespaces are not held for capture",
        ),
    }
}

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}
