//! Local mode: tells the reload loop when the manifests may have changed (inotify on their
//! directory), so an edit is read at once rather than at the next poll. The poll stays, for
//! filesystems without inotify; a wake-up that changed nothing costs one look at the files'
//! metadata (see `ControlPlane::reload`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create an inotify instance: {0}")]
    Init(io::Error),
    #[error("cannot watch {path}: {source}")]
    Watch { path: PathBuf, source: io::Error },
}

/// Events that mean a manifest was written, replaced or removed. A file being created or
/// written is not one: it is read once closed, never half-written.
const EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// An inotify watch on the manifests' directory (the directory itself, or a file's parent).
#[derive(Debug)]
pub struct ManifestWatch {
    fd: AsyncFd<OwnedFd>,
}

impl ManifestWatch {
    /// Watches `path` (a directory of manifests, or one file) for changes.
    pub fn new(path: &Path) -> Result<Self, WatchError> {
        let dir = if path.is_dir() { path } else { path.parent().unwrap_or(Path::new(".")) };
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let watch_err = |source| WatchError::Watch { path: dir.to_owned(), source };
        // SAFETY: inotify_init1 has no preconditions; it returns a new descriptor or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(WatchError::Init(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor we just created and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| watch_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path that outlives the call.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), EVENTS) } < 0 {
            return Err(watch_err(io::Error::last_os_error()));
        }
        // SAFETY: the descriptor is owned by the `OwnedFd` the `AsyncFd` holds, so it stays open
        // and the same until the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|err| WatchError::Init(err.into()))?;
        Ok(ManifestWatch { fd })
    }

    /// Waits for the next change (the events themselves are read and dropped: any change
    /// means "look again", and several in a row mean it once).
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buffer = [0u8; 4096];
            let read = ready.try_io(|fd| {
                // SAFETY: reading into a buffer we own, at most its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n) }
            });
            match read {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ManifestWatch;

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nm-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    async fn wakes(watch: &ManifestWatch) -> bool {
        tokio::time::timeout(Duration::from_millis(500), watch.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn a_file_written_renamed_in_or_removed_wakes_the_watch() {
        let dir = dir("events");
        let watch = ManifestWatch::new(&dir).expect("watch");
        assert!(!wakes(&watch).await, "nothing happened yet");

        std::fs::write(dir.join("pods.yaml"), "a").expect("write");
        assert!(wakes(&watch).await, "written and closed");

        std::fs::write(dir.join(".next.tmp"), "b").expect("write");
        while tokio::time::timeout(Duration::from_millis(100), watch.changed()).await.is_ok() {}
        std::fs::rename(dir.join(".next.tmp"), dir.join("pods.yaml")).expect("rename");
        assert!(wakes(&watch).await, "renamed into place");

        std::fs::remove_file(dir.join("pods.yaml")).expect("remove");
        assert!(wakes(&watch).await, "removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_single_file_is_watched_through_its_directory() {
        let dir = dir("file");
        let file = dir.join("mesh.yaml");
        std::fs::write(&file, "a").expect("write");
        let watch = ManifestWatch::new(&file).expect("watch");
        std::fs::write(&file, "b").expect("write");
        assert!(wakes(&watch).await);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let missing = std::env::temp_dir().join("nm-watch-missing-dir/none/here");
        let err = ManifestWatch::new(&missing).expect_err("nothing to watch");
        assert!(err.to_string().contains("cannot watch"), "{err}");
    }
}
