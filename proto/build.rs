//! Compiles every `.proto` under `proto/` with protox (pure Rust, so a fresh
//! machine needs no system `protoc`) and generates tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/meta.proto", "proto/csi.proto", "proto/pluginregistration.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
