//! Compiles `proto/greeter.proto` into messages, clients and a server with
//! shmesh-build (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    shmesh_build::compile_protos(&["proto/greeter.proto"], &["proto"])?;
    Ok(())
}
