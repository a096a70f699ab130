//! Writes `deploy/crds/` from the CRD types; run by `cargo xtask gen-crds`.

fn main() -> std::process::ExitCode {
    xtask::exit_code(xtask::crds::write())
}
