//! Generates the tonic/prost code for every `.proto` file in `switchyard/v1`, with protox
//! (a pure-Rust protobuf compiler), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "switchyard/v1/tensor.proto",
        "switchyard/v1/expert.proto",
        "switchyard/v1/router.proto",
        "switchyard/v1/coordinator.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Tensor payloads become `bytes::Bytes`: decoded without a copy, sent without one.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
