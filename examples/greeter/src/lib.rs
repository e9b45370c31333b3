//! gRPC's helloworld `Greeter` over shmesh: the code generated from
//! `proto/greeter.proto` by shmesh-build, and the service's implementation
//! the server binary and the tests run.

/// The `helloworld` package: messages, `greeter_client`,
/// `greeter_blocking_client`, `greeter_server`, `greeter_schema`.
pub mod helloworld {
    include!(concat!(env!("OUT_DIR"), "/helloworld.rs"));
}

use helloworld::greeter_server::Greeter;
use helloworld::{HelloReply, HelloRequest};
use shmesh_protobuf::Request;
use shmesh_protobuf::server::ResponseSink;
use shmesh_protobuf::shmesh::status::Status;

/// Where the server listens unless told otherwise.
pub const DEFAULT_ADDRESS: &str = "shm://@shmesh-greeter";

/// The most greetings one `SayHelloManyTimes` sends.
pub const MAX_TIMES: u32 = 10_000;

/// Greets by name.
#[derive(Debug, Default)]
pub struct MyGreeter;

impl Greeter for MyGreeter {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        Ok(HelloReply {
            message: format!("Hello {}!", request.get_ref().name),
        })
    }

    async fn say_hello_many_times(
        &self,
        request: Request<HelloRequest>,
        mut responses: ResponseSink<HelloReply>,
    ) -> Result<(), Status> {
        let HelloRequest { name, times } = request.into_inner();
        if times > MAX_TIMES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_TIMES} greetings, not {times}"
            )));
        }
        for i in 1..=times {
            responses
                .send(&HelloReply {
                    message: format!("Hello {name} #{i}!"),
                })
                .await?;
        }
        Ok(())
    }
}
