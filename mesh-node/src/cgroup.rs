//! cgroup v2 placement: where capture applies, and where the proxy lives.
//!
//! connect4/6 and sock_ops apply to every socket created by a process in the pods cgroup or
//! below. The proxy moves itself into a cgroup outside that subtree before it opens any socket,
//! so its own connections are never captured (its mark is a second line of defence).

use std::{
    io,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{path} is the root of the cgroup v2 hierarchy: refusing to capture every process on the machine; give the cgroup that holds the pods"
    )]
    RootCgroup { path: PathBuf },
    #[error("the proxy cgroup {proxy} is inside the pods cgroup {pods}: the proxy would capture itself")]
    ProxyInsidePods { proxy: PathBuf, pods: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

fn fs_type(path: &Path) -> Result<i64, CgroupError> {
    let io_err = |source| CgroupError::Io { action: "inspect", path: path.to_owned(), source };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: zeroed plain-data struct owned here.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    Ok(stat.f_type as i64)
}

/// Checks that `path` is a non-root cgroup v2 directory capture may attach to.
pub fn validate_pods_cgroup(path: &Path) -> Result<PathBuf, CgroupError> {
    let path = path.canonicalize().map_err(|source| CgroupError::Io {
        action: "resolve",
        path: path.to_owned(),
        source,
    })?;
    if fs_type(&path)? != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 { path });
    }
    let parent_is_cgroup2 =
        path.parent().map(|p| fs_type(p).map(|t| t == CGROUP2_SUPER_MAGIC)).transpose()?;
    if parent_is_cgroup2 != Some(true) {
        return Err(CgroupError::RootCgroup { path });
    }
    Ok(path)
}

/// Creates the proxy cgroup if needed and moves this whole process into it.
pub fn join_proxy_cgroup(proxy: &Path, pods: &Path) -> Result<PathBuf, CgroupError> {
    std::fs::create_dir_all(proxy).map_err(|source| CgroupError::Io {
        action: "create",
        path: proxy.to_owned(),
        source,
    })?;
    let proxy = proxy.canonicalize().map_err(|source| CgroupError::Io {
        action: "resolve",
        path: proxy.to_owned(),
        source,
    })?;
    if fs_type(&proxy)? != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 { path: proxy });
    }
    if proxy.starts_with(pods) {
        return Err(CgroupError::ProxyInsidePods { proxy, pods: pods.to_owned() });
    }
    let procs = proxy.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(|source| CgroupError::Io {
        action: "join",
        path: procs,
        source,
    })?;
    Ok(proxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the cgroup v2 mount point of this machine, if it has one.
    fn cgroup2_mount() -> Option<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        mounts.lines().find_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, dir, fs) = (fields.next(), fields.next()?, fields.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(dir))
        })
    }

    #[test]
    fn refuses_the_root_cgroup_and_non_cgroup_directories() {
        let Some(root) = cgroup2_mount() else {
            eprintln!("no cgroup v2 mount on this machine: nothing to check");
            return;
        };
        assert!(matches!(validate_pods_cgroup(&root), Err(CgroupError::RootCgroup { .. })));
        let tmp = std::env::temp_dir();
        assert!(matches!(validate_pods_cgroup(&tmp), Err(CgroupError::NotCgroup2 { .. })));
        let missing = validate_pods_cgroup(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/cgroup"), "{missing}");
    }
}
