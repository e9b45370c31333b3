//! Compiles `proto/route_guide.proto` with shmesh-build (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    shmesh_build::compile_protos(&["proto/route_guide.proto"], &["proto"])?;
    Ok(())
}
