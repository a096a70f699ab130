//! The BPF filesystem that holds nodemesh's pinned maps and links.

use std::{
    io,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot inspect {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("cannot mount the BPF filesystem at {path}: {source} (mesh-node needs CAP_SYS_ADMIN)")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot create {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
}

/// Returns whether `path` is the root of, or inside, a mounted bpffs.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        BpffsError::Stat { path: path.to_owned(), source: io::Error::from(io::ErrorKind::InvalidInput) }
    })?;
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(BpffsError::Stat { path: path.to_owned(), source: io::Error::last_os_error() });
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpffs at `path` unless one is there already, as a node agent must on a fresh node.
pub fn ensure_mounted(path: &Path) -> Result<(), BpffsError> {
    std::fs::create_dir_all(path)
        .map_err(|source| BpffsError::CreateDir { path: path.to_owned(), source })?;
    if is_bpffs(path)? {
        return Ok(());
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        BpffsError::Mount { path: path.to_owned(), source: io::ErrorKind::InvalidInput.into() }
    })?;
    // SAFETY: all strings are NUL-terminated and live for the call.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(BpffsError::Mount { path: path.to_owned(), source: io::Error::last_os_error() });
    }
    tracing::info!(path = %path.display(), "mounted the BPF filesystem");
    Ok(())
}
