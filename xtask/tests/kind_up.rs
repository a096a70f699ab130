//! `cargo xtask kind-up` stops before changing anything, with one message, where Docker or kind
//! is missing (as on the machines the tests run on) or Docker's daemon does not answer. Run as
//! the real binary with a PATH that holds only what each case gives it.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

/// Runs `xtask kind-up` with PATH (and cargo's bin directory) limited to `bin`.
fn kind_up(bin: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("kind-up")
        .env("PATH", bin)
        .env("CARGO_HOME", bin)
        .output()
        .expect("xtask runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-kind-up-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn without_docker_and_kind_it_stops_with_one_message() {
    let dir = temp_dir("none");
    let (ok, stderr) = kind_up(&dir);
    assert!(!ok, "kind-up succeeded without Docker:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        [
            "error: cargo xtask kind-up needs Docker, kind and kubectl, and docker, kind, kubectl are not on PATH: install them (Docker Engine, kind 0.20 or later, kubectl) and run it again. Nothing was created. Without them, the manifests are checked offline and against a real kube-apiserver by `cargo xtask test` (tests/tests/deploy_manifests.rs)."
        ],
        "{stderr}"
    );
    // Failed before any step started.
    assert!(!stderr.contains("==>") && !stderr.contains('✗'), "a step ran:\n{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn with_kubectl_alone_it_names_docker_and_kind() {
    let dir = temp_dir("kubectl");
    script(&dir, "kubectl", "exit 0");
    let (ok, stderr) = kind_up(&dir);
    assert!(!ok);
    assert!(stderr.contains("and docker, kind are not on PATH: install them"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn a_docker_daemon_that_does_not_answer_stops_it() {
    let dir = temp_dir("daemon");
    script(
        &dir,
        "docker",
        "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2; exit 1",
    );
    // A kind that would fail loudly if kind-up went as far as calling it.
    script(&dir, "kind", "echo 'kind must not run' >&2; exit 3");
    script(&dir, "kubectl", "exit 0");
    let (ok, stderr) = kind_up(&dir);
    assert!(!ok);
    assert!(
        stderr.contains("Docker is installed (")
            && stderr.contains("but its daemon does not answer: Cannot connect to the Docker daemon"),
        "{stderr}"
    );
    assert!(!stderr.contains("kind must not run"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
