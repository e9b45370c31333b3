//! Compiles `proto/echo.proto` (the gRPC echo service `shmesh bench`
//! measures) with protox, a pure-Rust protobuf compiler, so building needs no
//! system `protoc`; tonic-prost-build turns the descriptors into Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let descriptors = protox::compile(["proto/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // `bytes` fields as `Bytes`: the server echoes without copying.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
