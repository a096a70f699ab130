//! The two-node demo, run by `cargo xtask demo` once everything it needs is built (it finds the
//! binaries through `MESH_NODE_BIN`, `MESH_CONTROL_BIN`, `POD_APP_BIN` and `NODEMESH_BPF_OBJECT`).

fn main() -> std::process::ExitCode {
    xtask::exit_code(xtask::demo::scenario::run())
}
