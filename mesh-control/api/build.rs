//! Compiles the protos with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos =
        ["nodemesh/ca/v1/ca.proto", "nodemesh/workload/v1/workload.proto", "nodemesh/xds/v1/xds.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
