//! The node's private state directory (`/run/nodemesh` by default: tmpfs, root only), where the
//! last good config and the workload certificates survive a mesh-node restart, so a node
//! restarted while mesh-control is down serves at once.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create {path} (0700): {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is readable by others (mode {mode:o}); it holds private keys")]
    Exposed { path: PathBuf, mode: u32 },
}

/// A directory only root can read.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating, 0700) `root`, refusing one that others can read.
    pub fn open(root: &Path) -> Result<Self, StateDirError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|source| StateDirError::Create { path: root.to_owned(), source })?;
        let mode = std::fs::metadata(root)
            .map_err(|source| StateDirError::Create { path: root.to_owned(), source })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(StateDirError::Exposed { path: root.to_owned(), mode: mode & 0o777 });
        }
        Ok(StateDir { root: root.to_owned() })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Replaces `name` atomically (write a 0600 temporary, then rename): a crash leaves the old
    /// file or the new one, never half of one.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), StateDirError> {
        let path = self.path(name);
        let temporary = self.path(&format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(contents)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|source| StateDirError::Write { path, source })
    }

    /// Reads `name`, or `None` if it does not exist.
    pub fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nm-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn files_are_private_and_replaced_whole() {
        let root = scratch("private");
        let state = StateDir::open(&root).expect("open");
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(state.read("config").unwrap(), None);
        state.write("config", b"one").expect("write");
        state.write("config", b"two").expect("write");
        assert_eq!(state.read("config").unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(std::fs::metadata(state.path("config")).unwrap().permissions().mode() & 0o777, 0o600);
        state.remove("config");
        assert_eq!(state.read("config").unwrap(), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_directory_others_can_read_is_refused() {
        let root = scratch("exposed");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = StateDir::open(&root).expect_err("refused");
        assert!(err.to_string().contains("readable by others"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
