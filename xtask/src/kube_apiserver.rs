//! `cargo xtask kube-apiserver`: a real kube-apiserver for the Kubernetes discovery tests, built
//! once from Debian's `kubernetes` source package and cached under the target directory.
//!
//! This machine reaches package registries only, and Debian 12 ships Kubernetes as source alone:
//! v1.20.2 with its Go dependencies vendored, which builds offline with Debian's Go 1.19 in four
//! to six minutes on two cores. The deb-src entry it needs is given to apt on the command line, so
//! /etc stays untouched. Source and build trees (~2 GB) live in a scratch directory removed
//! afterwards; only the binary (~105 MB) is kept. The tests run it against Debian's `etcd-server`
//! (`nodemesh-testbed`'s `kube_apiserver` module). One vendored library is fixed for Go 1.19
//! before building ([`reflect2`]), or custom resources crash the API server.

mod reflect2;

use std::{
    fs::{self, File},
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    progress::{self, Step},
    toolchain::{self, Package},
};

/// The Kubernetes version Debian 12's `kubernetes` source package builds.
pub const VERSION: &str = "v1.20.2";
/// Tells the tests where the binary is; `cargo xtask test` sets it for the end-to-end step.
pub const ENV_VAR: &str = "NODEMESH_KUBE_APISERVER";
/// The Debian release whose source package carries [`VERSION`].
const SUITE: &str = "bookworm";
/// Debian's Go 1.19, named directly: a newer `go` on PATH would not build Kubernetes 1.20.
const GO_BIN: &str = "/usr/lib/go-1.19/bin";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Free space the source, Go's build cache and the outputs take at their peak, with a margin.
const SCRATCH_BYTES: u64 = 5 << 30;

/// What the tests need beside the binary.
const RUN_PACKAGES: [Package; 1] = [Package::with_file(
    "etcd-server",
    "/usr/bin/etcd",
    "etcd 3.4, the store kube-apiserver runs against in the tests",
)];

/// What building the binary needs.
const BUILD_PACKAGES: [Package; 4] = [
    Package::with_file(
        "golang-go",
        "/usr/lib/go-1.19/bin/go",
        "Go 1.19, which builds Kubernetes 1.20's vendored source offline",
    ),
    Package::with_file("dpkg-dev", "/usr/bin/dpkg-source", "dpkg-source unpacks the source package"),
    Package::with_file("make", "/usr/bin/make", "runs Kubernetes' build (make WHAT=cmd/kube-apiserver)"),
    Package::with_file("rsync", "/usr/bin/rsync", "Kubernetes' build scripts copy generated code with it"),
];

/// Returns where the built binary is cached: `<target>/tools/kube-apiserver-<version>/`.
pub fn binary_path() -> PathBuf {
    crate::target_dir().join("tools").join(format!("kube-apiserver-{VERSION}")).join("kube-apiserver")
}

/// Returns the file recording which source fixes the cached binary was built with.
fn fixes_path(binary: &Path) -> PathBuf {
    binary.with_extension("fixes")
}

/// Returns `Ok(what runs)` when `binary` starts, is [`VERSION`] and was built with the current
/// [`reflect2::FIXES`], or `Err(why not)`.
fn probe_binary(binary: &Path) -> Result<String, String> {
    if !binary.is_file() {
        return Err(format!("no {}", binary.display()));
    }
    if fs::read_to_string(fixes_path(binary)).ok().as_deref() != Some(reflect2::FIXES) {
        return Err(format!(
            "{} was built without the fix for {} (custom resources crash it)",
            binary.display(),
            reflect2::FIXES
        ));
    }
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|err| format!("{} does not run: {err}", binary.display()))?;
    let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || !said.split_whitespace().any(|word| word == VERSION) {
        return Err(format!("{} --version says {said:?}, not Kubernetes {VERSION}", binary.display()));
    }
    Ok(format!("{said} at {}", binary.display()))
}

/// Returns the path of a working kube-apiserver, building it (and installing etcd and the build's
/// packages) when the cache has none.
pub fn ensure() -> anyhow::Result<PathBuf> {
    eprintln!("kube-apiserver {VERSION} (real API server for the Kubernetes discovery tests):");
    toolchain::ensure_packages(&RUN_PACKAGES)?;
    let binary = binary_path();
    let reason = match probe_binary(&binary) {
        Ok(found) => {
            eprintln!("  ✓ {:<13} {found}", "kube-apiserver");
            return Ok(binary);
        }
        Err(reason) => reason,
    };
    let tools = binary.parent().context("the cache path has no parent")?;
    fs::create_dir_all(tools).with_context(|| format!("creating {}", tools.display()))?;
    // Two runs at once (two terminals, or `cargo xtask test` beside this) would share the scratch
    // tree; the second waits and then finds the first one's binary.
    let _lock = lock(&tools.join(".build.lock"))?;
    if let Ok(found) = probe_binary(&binary) {
        eprintln!("  ✓ {:<13} {found} (built by a concurrent run)", "kube-apiserver");
        return Ok(binary);
    }
    eprintln!(
        "  ✗ {:<13} missing ({reason}): building it from Debian's kubernetes source package \
         (4 to 6 minutes on 2 cores, ~2 GB of scratch space removed afterwards)",
        "kube-apiserver"
    );
    build(&binary)?;
    Ok(binary)
}

/// Prints whether the binary and etcd are there, without installing or building anything (when
/// not root: the tests that use them need root anyway).
pub fn report() {
    eprintln!("kube-apiserver {VERSION}:");
    toolchain::check_packages(&RUN_PACKAGES);
    match probe_binary(&binary_path()) {
        Ok(found) => eprintln!("  ✓ {:<13} {found}", "kube-apiserver"),
        Err(reason) => {
            eprintln!(
                "  ✗ {:<13} missing ({reason}): `sudo cargo xtask kube-apiserver` builds it",
                "kube-apiserver"
            )
        }
    }
}

/// Holds an exclusive lock on a file until dropped (the kernel releases it if we die).
struct Lock(#[expect(dead_code, reason = "held only for its file descriptor")] File);

fn lock(path: &Path) -> anyhow::Result<Lock> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("  … another run is building kube-apiserver (lock {}); waiting for it", path.display());
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(Lock(file))
}

/// A scratch directory, removed when dropped: whether the build passed or failed, its GBs go.
struct Scratch(PathBuf);

impl Scratch {
    /// Creates `dir` empty, removing what an interrupted earlier build left there.
    fn create(dir: PathBuf) -> anyhow::Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the old scratch {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove the scratch directory {}: {err}", self.0.display());
        }
    }
}

/// Fails early, rather than minutes in, when the disk cannot hold the build.
fn check_free_space(dir: &Path) -> anyhow::Result<()> {
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).context("path contains NUL")?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
    }
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < SCRATCH_BYTES {
        bail!(
            "building kube-apiserver needs about {} GiB free in {}, and only {} MiB are: free some space or \
             set CARGO_TARGET_DIR to a larger disk",
            SCRATCH_BYTES >> 30,
            dir.display(),
            free >> 20
        );
    }
    Ok(())
}

/// Builds the binary in a scratch directory beside the cache and moves it to `binary`.
fn build(binary: &Path) -> anyhow::Result<()> {
    let tools = binary.parent().context("the cache path has no parent")?;
    let scratch = Scratch::create(tools.join("build"))?;
    check_free_space(&scratch.0)?;
    toolchain::ensure_packages(&BUILD_PACKAGES)?;
    // A GOPATH layout, as Debian's own build uses.
    let tree = scratch.0.join("gopath/src/k8s.io/kubernetes");
    fetch_source(&scratch.0, &tree)?;
    reflect2::fix(&tree)?;

    let step =
        Step::start("building kube-apiserver (make WHAT=cmd/kube-apiserver; 4 to 6 minutes on 2 cores)");
    let mut path = vec![PathBuf::from(GO_BIN)];
    if let Some(outer) = std::env::var_os("PATH") {
        path.extend(std::env::split_paths(&outer));
    }
    let mut make = Command::new("make");
    make.arg("WHAT=cmd/kube-apiserver")
        .current_dir(&tree)
        .env("PATH", std::env::join_paths(path).context("PATH")?)
        .env("GOPATH", scratch.0.join("gopath"))
        // Go's cache and anything the scripts write under HOME go with the scratch directory.
        .env("GOCACHE", scratch.0.join("go-cache"))
        .env("HOME", scratch.0.join("home"))
        // A static binary, as Debian builds it.
        .env("CGO_ENABLED", "0")
        // Everything is vendored: a download attempt is a bug, not something to wait for.
        .env("GOPROXY", "off")
        .env_remove("GOFLAGS")
        .env_remove("GOROOT")
        .env_remove("GO111MODULE");
    progress::run_logged(&step, "kube-apiserver-build", &mut make)?;

    let built = tree.join("_output/bin/kube-apiserver");
    let staged = binary.with_extension("partial");
    fs::copy(&built, &staged)
        .with_context(|| format!("the build passed but {} cannot be copied", built.display()))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", staged.display()))?;
    // Atomic: a concurrent reader sees no binary or a whole one.
    fs::rename(&staged, binary).with_context(|| format!("moving the binary to {}", binary.display()))?;
    let fixes = fixes_path(binary);
    fs::write(&fixes, reflect2::FIXES).with_context(|| format!("writing {}", fixes.display()))?;
    if let Err(reason) = probe_binary(binary) {
        bail!("kube-apiserver was built but is not usable: {reason}");
    }
    let size = fs::metadata(binary).map(|m| m.len() >> 20).unwrap_or_default();
    step.done_with(&format!("{} ({size} MiB)", binary.display()));
    Ok(())
}

/// Downloads Debian's `kubernetes` source package with a private deb-src list and unpacks it into
/// `tree`.
fn fetch_source(scratch: &Path, tree: &Path) -> anyhow::Result<()> {
    let step = Step::start(format!("downloading and unpacking Debian's kubernetes source package ({SUITE})"));
    let apt_dir = scratch.join("apt");
    let parts = apt_dir.join("sources.list.d");
    let downloads = scratch.join("download");
    for dir in [&parts, &apt_dir.join("lists/partial"), &apt_dir.join("cache/archives/partial"), &downloads] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mirror = find_mirror(&read_apt_sources())
        .unwrap_or_else(|| Mirror { uri: DEFAULT_MIRROR.to_owned(), signed_by: DEFAULT_KEYRING.to_owned() });
    let entry = format!(
        "Types: deb-src\nURIs: {}\nSuites: {SUITE}\nComponents: main\nSigned-By: {}\n",
        mirror.uri, mirror.signed_by
    );
    let list = parts.join("nodemesh-kubernetes-src.sources");
    fs::write(&list, entry).with_context(|| format!("writing {}", list.display()))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-q")
            // Only our deb-src entry, with its own lists and cache: the system's apt state and
            // /etc are left as they were.
            .args(["-o", "Dir::Etc::SourceList=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::Etc::SourceParts={}", parts.display()))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt_dir.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt_dir.join("cache").display()))
            // The _apt sandbox user cannot write into root's scratch directory.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args)
            .current_dir(&downloads);
        cmd
    };
    step.detail(&format!("apt-get update (deb-src {} {SUITE} main)", mirror.uri));
    progress::run_logged(&step, "kube-apiserver-apt-update", &mut apt(&["update"]))?;
    step.detail("apt-get source --download-only kubernetes");
    progress::run_logged(
        &step,
        "kube-apiserver-apt-source",
        &mut apt(&["source", "--download-only", "kubernetes"]),
    )?;
    let dsc = only_dsc(&downloads)?;
    step.detail(&format!("dpkg-source -x {}", dsc.display()));
    let parent = tree.parent().context("the source tree path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut unpack = Command::new("dpkg-source");
    // apt already checked the files against the signed Sources index.
    unpack.args(["--no-check", "-x"]).arg(&dsc).arg(tree);
    progress::run_logged(&step, "kube-apiserver-unpack", &mut unpack)?;
    step.done_with(&format!("{}", dsc.file_name().unwrap_or_default().to_string_lossy()));
    Ok(())
}

/// Returns the one `.dsc` apt-get downloaded into `dir`.
fn only_dsc(dir: &Path) -> anyhow::Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "dsc"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kubernetes .dsc from apt-get source in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}

/// A Debian mirror the machine already uses, and the keyring its entry trusts.
#[derive(Debug, PartialEq, Eq)]
struct Mirror {
    uri: String,
    signed_by: String,
}

/// Returns the files of /etc/apt's source lists as (name, text).
fn read_apt_sources() -> Vec<(String, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        parts.sort();
        files.extend(parts);
    }
    files
        .into_iter()
        .filter_map(|path| Some((path.to_string_lossy().into_owned(), fs::read_to_string(&path).ok()?)))
        .collect()
}

/// Returns the first `deb` entry for [`SUITE`] in apt source files, deb822 (`*.sources`) or
/// one-line (`*.list`); security and update suites do not count, they carry no source package of
/// their own for this.
fn find_mirror(files: &[(String, String)]) -> Option<Mirror> {
    files.iter().find_map(|(name, text)| {
        if name.ends_with(".sources") {
            deb822_mirror(text)
        } else if name.ends_with(".list") {
            one_line_mirror(text)
        } else {
            None
        }
    })
}

fn deb822_mirror(text: &str) -> Option<Mirror> {
    let mut paragraph: Vec<(String, String)> = Vec::new();
    let mut paragraphs = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !paragraph.is_empty() {
                paragraphs.push(std::mem::take(&mut paragraph));
            }
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            // A continuation line (an inline key); such a value is not a keyring path.
            if let Some((_, value)) = paragraph.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            paragraph.push((key.trim().to_lowercase(), value.trim().to_owned()));
        }
    }
    paragraphs.into_iter().find_map(|fields| {
        let get = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let words =
            |key: &str| get(key).unwrap_or("").split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"))
            || !words("types").iter().any(|t| t == "deb")
            || !words("suites").iter().any(|s| s == SUITE)
        {
            return None;
        }
        let uri = words("uris").into_iter().next()?;
        let signed_by = get("signed-by")
            .filter(|v| v.starts_with('/') && !v.contains('\n'))
            .unwrap_or(DEFAULT_KEYRING)
            .to_owned();
        Some(Mirror { uri, signed_by })
    })
}

fn one_line_mirror(text: &str) -> Option<Mirror> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        // `deb [arch=amd64 signed-by=/k.gpg] URI SUITE COMPONENTS…`
        let (options, rest) = match rest.strip_prefix('[') {
            Some(inner) => inner.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        if words.next()? != SUITE {
            return None;
        }
        let signed_by = options
            .split_whitespace()
            .find_map(|option| option.strip_prefix("signed-by="))
            .unwrap_or(DEFAULT_KEYRING);
        Some(Mirror { uri: uri.to_owned(), signed_by: signed_by.to_owned() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect()
    }

    #[test]
    fn finds_the_mirror_in_deb822_sources() {
        // As on this kind of machine: the main suite first, then security, then a third party.
        let debian = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
            URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
            Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
            Components: main\n";
        let found = find_mirror(&files(&[
            ("/etc/apt/sources.list", ""),
            ("/etc/apt/sources.list.d/debian.sources", debian),
            ("/etc/apt/sources.list.d/nodesource.sources", "Types: deb\nURIs: https://x\nSuites: nodistro\n"),
        ]));
        assert_eq!(
            found,
            Some(Mirror { uri: "http://deb.debian.org/debian".into(), signed_by: DEFAULT_KEYRING.into() })
        );
    }

    #[test]
    fn skips_disabled_security_and_inline_key_entries() {
        let sources = "Types: deb\nURIs: http://old.example/debian\nSuites: bookworm\nEnabled: no\n\n\
            Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n\
            Types: deb-src deb\nURIs: http://mirror.example/debian http://other.example/debian\n\
            Suites: bookworm\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n";
        assert_eq!(
            deb822_mirror(sources),
            Some(Mirror { uri: "http://mirror.example/debian".into(), signed_by: DEFAULT_KEYRING.into() })
        );
        assert_eq!(deb822_mirror("Types: deb\nURIs: http://x/debian\nSuites: trixie\n"), None);
    }

    #[test]
    fn finds_the_mirror_in_one_line_lists() {
        let list = "# deb http://commented.example/debian bookworm main\n\
            deb http://security.debian.org/debian-security bookworm-security main\n\
            deb-src http://src.example/debian bookworm main\n\
            deb [arch=amd64 signed-by=/etc/apt/keyrings/m.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            find_mirror(&files(&[("/etc/apt/sources.list", list)])),
            Some(Mirror {
                uri: "http://mirror.example/debian".into(),
                signed_by: "/etc/apt/keyrings/m.gpg".into()
            })
        );
        assert_eq!(
            one_line_mirror("deb http://deb.debian.org/debian bookworm main contrib"),
            Some(Mirror { uri: "http://deb.debian.org/debian".into(), signed_by: DEFAULT_KEYRING.into() })
        );
        assert_eq!(find_mirror(&files(&[("/etc/apt/sources.list.d/x.disabled", list)])), None);
    }

    #[test]
    fn caches_the_binary_under_the_target_dir_by_version() {
        let path = binary_path();
        assert!(path.ends_with("tools/kube-apiserver-v1.20.2/kube-apiserver"), "{}", path.display());
    }

    #[test]
    fn a_missing_binary_is_reported_with_its_path() {
        assert_eq!(
            probe_binary(Path::new("/nonexistent/kube-apiserver")),
            Err("no /nonexistent/kube-apiserver".into())
        );
    }
}
