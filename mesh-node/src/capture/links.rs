//! Pinned BPF links, one file per attachment, named `<link>@<generation>`.
//!
//! Each mesh-node process is a new generation. Installing a link pins the new attachment first
//! and then unpins (detaches) every older generation of the same link, so a restart never
//! leaves a gap in capture and never leaves a duplicate behind.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::programs::links::{FdLink, PinnedLink};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot use the pin directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot pin link {path}: {}", causes(source))]
    Pin { path: PathBuf, source: Box<aya::pin::PinError> },
    #[error("cannot detach pinned link {path}: {source}")]
    Unpin { path: PathBuf, source: std::io::Error },
    #[error("cannot open pinned link {path}: {}", causes(source))]
    Open { path: PathBuf, source: Box<aya::programs::links::LinkError> },
}

/// Returns an error's message with its causes (aya's errors keep the OS error as a cause).
pub fn causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

/// Which attachment a link is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkName {
    Connect4,
    Connect6,
    SockOps,
    /// sk_lookup on one pod's netns, named `<namespace>:<pod>` with `.` written as `,`
    /// (bpffs refuses `.` in names; Kubernetes names never contain `:` or `,`).
    Pod(String),
}

impl LinkName {
    /// Returns the link of a pod's sk_lookup attachment.
    pub fn pod(namespace: &str, name: &str) -> Self {
        LinkName::Pod(format!("{namespace}:{name}").replace('.', ","))
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "connect4" => Some(LinkName::Connect4),
            "connect6" => Some(LinkName::Connect6),
            "sock_ops" => Some(LinkName::SockOps),
            _ => s.strip_prefix("sk_lookup:").map(|pod| LinkName::Pod(pod.to_owned())),
        }
    }
}

impl fmt::Display for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkName::Connect4 => f.write_str("connect4"),
            LinkName::Connect6 => f.write_str("connect6"),
            LinkName::SockOps => f.write_str("sock_ops"),
            LinkName::Pod(pod) => write!(f, "sk_lookup:{pod}"),
        }
    }
}

/// The link pin directory of one node, and this process's generation in it.
pub struct PinnedLinks {
    dir: PathBuf,
    generation: String,
    installed: Mutex<BTreeMap<LinkName, PinnedLink>>,
}

impl fmt::Debug for PinnedLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedLinks").field("dir", &self.dir).field("generation", &self.generation).finish()
    }
}

impl PinnedLinks {
    /// Opens (creating if needed) the pin directory with a fresh generation.
    pub fn open(dir: &Path) -> Result<Self, LinkError> {
        std::fs::create_dir_all(dir).map_err(|source| LinkError::Dir { path: dir.to_owned(), source })?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(PinnedLinks {
            dir: dir.to_owned(),
            generation: format!("{nanos:x}"),
            installed: Mutex::new(BTreeMap::new()),
        })
    }

    /// Lists pinned files as (link, generation, path).
    fn pinned(&self) -> Result<Vec<(LinkName, String, PathBuf)>, LinkError> {
        let dir_err = |source| LinkError::Dir { path: self.dir.clone(), source };
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(dir_err)? {
            let path = entry.map_err(dir_err)?.path();
            let Some(file) = path.file_name().and_then(|f| f.to_str()) else { continue };
            let Some((name, generation)) = file.rsplit_once('@') else { continue };
            if let Some(link) = LinkName::parse(name) {
                found.push((link, generation.to_owned(), path));
            }
        }
        Ok(found)
    }

    /// Returns every link name that has a pin, of any generation.
    pub fn pinned_names(&self) -> Result<HashSet<LinkName>, LinkError> {
        Ok(self.pinned()?.into_iter().map(|(l, _, _)| l).collect())
    }

    /// Returns the links this generation installed.
    pub fn installed(&self) -> Vec<LinkName> {
        self.installed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect()
    }

    /// Pins a new attachment of `link`, then detaches older ones.
    pub fn install(&self, link: &LinkName, fd_link: FdLink) -> Result<(), LinkError> {
        let path = self.dir.join(format!("{link}@{}", self.generation));
        let pinned = fd_link
            .pin(&path)
            .map_err(|source| LinkError::Pin { path: path.clone(), source: Box::new(source) })?;
        let previous = self
            .installed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(link.clone(), pinned);
        if let Some(previous) = previous {
            // Only reachable when a pod is re-enrolled within one process; its pin was replaced
            // at the same path, so the old handle just closes.
            drop(previous);
        }
        for (name, generation, old) in self.pinned()? {
            if &name == link && generation != self.generation {
                unpin(&old)?;
            }
        }
        Ok(())
    }

    /// Detaches every generation of `link`.
    pub fn retire_all(&self, link: &LinkName) -> Result<(), LinkError> {
        self.installed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(link);
        for (name, _, path) in self.pinned()? {
            if &name == link {
                unpin(&path)?;
            }
        }
        Ok(())
    }

    /// Detaches every pinned link in the directory; returns how many.
    pub fn retire_everything(&self) -> Result<usize, LinkError> {
        self.installed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        let pinned = self.pinned()?;
        for (_, _, path) in &pinned {
            unpin(path)?;
        }
        Ok(pinned.len())
    }
}

fn unpin(path: &Path) -> Result<(), LinkError> {
    match PinnedLink::from_pin(path) {
        // Unpinning removes the file; dropping the returned link closes the last reference,
        // which detaches the program.
        Ok(link) => {
            link.unpin().map(drop).map_err(|source| LinkError::Unpin { path: path.to_owned(), source })
        }
        Err(source) => {
            if !path.exists() {
                return Ok(());
            }
            Err(LinkError::Open { path: path.to_owned(), source: Box::new(source) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        for link in [
            LinkName::Connect4,
            LinkName::Connect6,
            LinkName::SockOps,
            LinkName::pod("demo", "a1"),
            LinkName::pod("kube.system", "x.y"),
        ] {
            assert_eq!(LinkName::parse(&link.to_string()), Some(link));
        }
        assert_eq!(LinkName::parse("something-else"), None);
        assert!(!LinkName::pod("kube.system", "x.y").to_string().contains('.'));
    }
}
