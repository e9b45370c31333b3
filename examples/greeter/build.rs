//! Compiles `proto/greeter.proto` into messages, clients and a server
//! (with its gRPC front-end) with shmesh-build (no system `protoc`), and,
//! for the tests, a stock tonic client of the same service into
//! `$OUT_DIR/tonic`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    shmesh_build::configure()
        .grpc(true)
        .compile_protos(&["proto/greeter.proto"], &["proto"])?;

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("tonic");
    std::fs::create_dir_all(&out_dir)?;
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(out_dir)
        .compile_fds(protox::compile(["proto/greeter.proto"], ["proto"])?)?;
    Ok(())
}
