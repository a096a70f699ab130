//! Child processes placed inside a pod or node: its netns and (for pods) its cgroup, before exec.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::Context as _;

/// Locates a workspace binary: `$<NAME>_BIN` (e.g. `MESH_NODE_BIN`), else beside the running
/// executable or one level up (`target/debug/deps/..` for tests, `target/debug` for the xtask),
/// else in `$CARGO_TARGET_DIR/debug`, else in the workspace's `target/debug`.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.is_file(), "{var} is set to {}, which is not a file", path.display());
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)).collect();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&dir).join("debug").join(name));
    }
    // This crate is `<workspace>/tests`.
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug").join(name));
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let searched: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    anyhow::bail!(
        "cannot find the {name} binary (looked at {}): build it with `cargo build -p {}` or set {var}",
        searched.join(", "),
        if name == "pod-app" { "nodemesh-testbed" } else { name }
    )
}

/// Prepares `cmd` to start inside `netns` and, if given, inside `cgroup` (joined before exec,
/// so no socket of the process is ever created outside it).
pub fn place(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) -> anyhow::Result<()> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs = match cgroup {
        Some(dir) => Some(
            CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .context("cgroup path contains NUL")?,
        ),
        None => None,
    };
    // SAFETY: the closure only calls async-signal-safe functions (setns, open, write, close) on
    // data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs.
pub fn terminate(child: &mut Child, grace: std::time::Duration) {
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
