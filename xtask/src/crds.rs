//! `cargo xtask gen-crds`: writes `deploy/crds/` from the CRD types in `mesh-manifests`
//! (`mesh_manifests::crd::crd_files`). A test in `mesh-manifests` fails when the checked-in
//! files differ from what this writes.
//!
//! The generator reads the types, so it is its own binary (`xtask-gen-crds`) behind the `crds`
//! feature, like the demo: the xtask itself does not depend on the code it builds and tests.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::progress::Step;

/// Returns where the generated CRDs are checked in.
pub fn crds_dir() -> PathBuf {
    crate::workspace_root().join("deploy").join("crds")
}

/// Builds the generator, then runs it.
pub fn run() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Its own invocation, so the running `xtask` binary is not rebuilt with the feature.
    Step::start("building the CRD generator").run(
        "build-gen-crds",
        Command::new(cargo).current_dir(crate::workspace_root()).env("CARGO_TERM_COLOR", "never").args([
            "build",
            "-p",
            "xtask",
            "--features",
            "crds",
            "--bin",
            "xtask-gen-crds",
        ]),
    )?;
    let generator = crate::target_dir().join("debug").join("xtask-gen-crds");
    let status =
        Command::new(&generator).status().with_context(|| format!("running {}", generator.display()))?;
    anyhow::ensure!(status.success(), "{} failed ({status})", generator.display());
    Ok(())
}

/// Writes every generated CRD into `deploy/crds/`, and removes YAML files there that no type
/// generates any more (a renamed or dropped CRD), so the directory is exactly the types.
#[cfg(feature = "crds")]
pub fn write() -> anyhow::Result<()> {
    let dir = crds_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = mesh_manifests::crd::crd_files()?;
    for file in &files {
        let path = dir.join(&file.file_name);
        let unchanged = std::fs::read_to_string(&path).is_ok_and(|text| text == file.yaml);
        if !unchanged {
            std::fs::write(&path, &file.yaml).with_context(|| format!("writing {}", path.display()))?;
        }
        println!("{} {}", if unchanged { "unchanged" } else { "wrote    " }, path.display());
    }
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".yaml") && !files.iter().any(|f| f.file_name == name) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            println!("removed   {} (no type generates it)", path.display());
        }
    }
    Ok(())
}
