//! The async client side: what a generated `FooClient` calls, over an
//! [`AsyncChannel`].
//!
//! Requests are encoded straight into a buffer loaned in shared memory
//! (awaiting a slab while the pool is busy); server-streaming requests too.

use std::marker::PhantomData;
use std::time::Duration;

use shmesh::asynchronous::{AsyncCall, AsyncChannel};
use shmesh::client::RequestBuf;
use shmesh::metadata::Metadata;
use shmesh::status::{Code, Status};

use crate::{decode, encode_into};

/// `message` encoded into a buffer loaned from `loan`, or `None` if the
/// pool had no slab to lend (the caller then copies from the heap).
pub(crate) fn encoded<T: prost::Message>(
    loan: Result<RequestBuf, Status>,
    message: &T,
) -> Result<Option<RequestBuf>, Status> {
    match loan {
        Ok(mut buf) => {
            encode_into(message, &mut buf)?;
            Ok(Some(buf))
        }
        Err(status) if status.code() == Code::ResourceExhausted => Ok(None),
        Err(status) => Err(status),
    }
}

/// A unary call: sends `request` to `method` and decodes the response as a
/// `Resp` (named `response_type` in errors).
pub async fn unary<Req, Resp>(
    channel: &AsyncChannel,
    method: u32,
    request: &Req,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Resp, Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let mut buf = channel
        .loan_wait_with(request.encoded_len(), metadata, timeout)
        .await?;
    encode_into(request, &mut buf)?;
    let response = channel.send(method, buf, timeout).await?;
    decode(&response, response_type)
}

/// A server-streaming call: sends `request` to `method`; read the
/// responses from the returned [`Streaming`].
pub async fn server_streaming<Req, Resp>(
    channel: &AsyncChannel,
    method: u32,
    request: &Req,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Streaming<Resp>, Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let mut buf = channel
        .loan_wait_with(request.encoded_len(), metadata, timeout)
        .await?;
    encode_into(request, &mut buf)?;
    let call = channel.server_stream_buf(method, buf, timeout).await?;
    Ok(Streaming::new(call, response_type))
}

/// A client-streaming call to `method`: send requests on the returned
/// [`ClientStreaming`], then [`finish`](ClientStreaming::finish) it for
/// the one response.
pub fn client_streaming<Req, Resp>(
    channel: &AsyncChannel,
    method: u32,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<ClientStreaming<Req, Resp>, Status> {
    Ok(ClientStreaming {
        inner: Upstream::Shmesh {
            sender: Box::new(Sender::new(channel, method, metadata, timeout)?),
            response_type,
            _response: PhantomData,
        },
    })
}

/// A bidirectional-streaming call to `method`: send and receive on the
/// returned [`BidiStreaming`].
pub fn bidi_streaming<Req, Resp>(
    channel: &AsyncChannel,
    method: u32,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<BidiStreaming<Req, Resp>, Status> {
    Ok(BidiStreaming {
        sender: Upstream::Shmesh {
            sender: Box::new(Sender::new(channel, method, metadata, timeout)?),
            response_type,
            _response: PhantomData,
        },
        responses: None,
    })
}

/// The sending side of a streaming call: encodes each message into a loan.
#[derive(Debug)]
struct Sender<Req> {
    channel: AsyncChannel,
    call: AsyncCall,
    _request: PhantomData<fn(&Req)>,
}

impl<Req> Sender<Req> {
    fn new(
        channel: &AsyncChannel,
        method: u32,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Self, Status> {
        Ok(Sender {
            channel: channel.clone(),
            call: channel.open_with(method, metadata, timeout)?,
            _request: PhantomData,
        })
    }
}

impl<Req: prost::Message> Sender<Req> {
    async fn send(&mut self, message: &Req) -> Result<(), Status> {
        let mut buf = self.channel.loan_wait(message.encoded_len(), None).await?;
        encode_into(message, &mut buf)?;
        self.call.send_buf(buf).await
    }
}

/// The responses of a server-streaming (or bidirectional) call, read one
/// at a time like tonic's `Streaming`. Dropping it before the end cancels
/// the call.
#[derive(Debug)]
pub struct Streaming<T> {
    inner: Downstream<T>,
}

#[derive(Debug)]
enum Downstream<T> {
    Shmesh {
        call: Box<AsyncCall>,
        response_type: &'static str,
        _message: PhantomData<fn() -> T>,
    },
    #[cfg(feature = "tonic")]
    Grpc(Box<tonic::Streaming<T>>),
}

impl<T: prost::Message + Default> Streaming<T> {
    /// Reads responses of type `T` (named `response_type` in errors) from
    /// `call`.
    pub fn new(call: AsyncCall, response_type: &'static str) -> Self {
        Streaming {
            inner: Downstream::Shmesh {
                call: Box::new(call),
                response_type,
                _message: PhantomData,
            },
        }
    }

    /// Reads the responses of a gRPC call.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(stream: tonic::Streaming<T>) -> Self {
        Streaming {
            inner: Downstream::Grpc(Box::new(stream)),
        }
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        match &mut self.inner {
            Downstream::Shmesh {
                call,
                response_type,
                ..
            } => match call.recv().await? {
                Some(response) => decode(&response, response_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Downstream::Grpc(stream) => stream.message().await.map_err(crate::grpc::from_tonic),
        }
    }
}

/// The sending side of a client-streaming or bidirectional call.
#[derive(Debug)]
enum Upstream<Req, Resp> {
    Shmesh {
        sender: Box<Sender<Req>>,
        response_type: &'static str,
        _response: PhantomData<fn() -> Resp>,
    },
    /// Requests go into tonic's request stream; the call runs as a task.
    #[cfg(feature = "tonic")]
    Grpc {
        tx: Option<tokio::sync::mpsc::Sender<Req>>,
        call: Option<tokio::task::JoinHandle<Result<crate::grpc::Reply<Resp>, Status>>>,
    },
}

impl<Req: prost::Message + Clone, Resp> Upstream<Req, Resp> {
    async fn send(&mut self, message: &Req) -> Result<(), Status> {
        match self {
            Upstream::Shmesh { sender, .. } => sender.send(message).await,
            #[cfg(feature = "tonic")]
            Upstream::Grpc { tx, .. } => match tx {
                Some(tx) => tx
                    .send(message.clone())
                    .await
                    .map_err(|_| Status::cancelled("the call has ended")),
                None => Err(Status::failed_precondition("the sending side is closed")),
            },
        }
    }

    fn close_send(&mut self) -> Result<(), Status> {
        match self {
            Upstream::Shmesh { sender, .. } => sender.call.close_send(),
            #[cfg(feature = "tonic")]
            Upstream::Grpc { tx, .. } => {
                *tx = None;
                Ok(())
            }
        }
    }
}

/// A client-streaming call: send requests, then
/// [`finish`](ClientStreaming::finish). Dropping it unfinished cancels the
/// call.
#[derive(Debug)]
pub struct ClientStreaming<Req, Resp> {
    inner: Upstream<Req, Resp>,
}

impl<Req, Resp> ClientStreaming<Req, Resp> {
    /// A client-streaming gRPC call running as `call`, fed by `tx`.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        tx: tokio::sync::mpsc::Sender<Req>,
        call: tokio::task::JoinHandle<Result<crate::grpc::Reply<Resp>, Status>>,
    ) -> Self {
        ClientStreaming {
            inner: Upstream::Grpc {
                tx: Some(tx),
                call: Some(call),
            },
        }
    }
}

impl<Req: prost::Message + Clone, Resp: prost::Message + Default> ClientStreaming<Req, Resp> {
    /// Sends one request, awaiting the server's credit when the window is
    /// full.
    pub async fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.inner.send(message).await
    }

    /// Closes the sending side and awaits the server's one response.
    pub async fn finish(self) -> Result<Resp, Status> {
        match self.inner {
            Upstream::Shmesh {
                sender,
                response_type,
                ..
            } => {
                let response = sender.call.finish().await?;
                decode(&response, response_type)
            }
            #[cfg(feature = "tonic")]
            Upstream::Grpc { tx, call } => {
                drop(tx);
                match crate::grpc::joined(call).await? {
                    crate::grpc::Reply::One(reply) => Ok(reply),
                    crate::grpc::Reply::Stream(_) => {
                        Err(Status::internal("a stream where one response was due"))
                    }
                }
            }
        }
    }
}

/// A bidirectional-streaming call: send requests and read responses in any
/// order; [`close_send`](BidiStreaming::close_send) when done sending.
/// Dropping it before the end cancels the call.
#[derive(Debug)]
pub struct BidiStreaming<Req, Resp> {
    sender: Upstream<Req, Resp>,
    /// Over gRPC, the responses once the call's task has them.
    responses: Option<Streaming<Resp>>,
}

impl<Req, Resp> BidiStreaming<Req, Resp> {
    /// A bidirectional gRPC call running as `call`, fed by `tx`.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        tx: tokio::sync::mpsc::Sender<Req>,
        call: tokio::task::JoinHandle<Result<crate::grpc::Reply<Resp>, Status>>,
    ) -> Self {
        BidiStreaming {
            sender: Upstream::Grpc {
                tx: Some(tx),
                call: Some(call),
            },
            responses: None,
        }
    }
}

impl<Req: prost::Message + Clone, Resp: prost::Message + Default> BidiStreaming<Req, Resp> {
    /// Sends one request, awaiting the server's credit when the window is
    /// full.
    pub async fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.sender.send(message).await
    }

    /// Closes the sending side: the server sees the end of its requests.
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.sender.close_send()
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub async fn message(&mut self) -> Result<Option<Resp>, Status> {
        if let Some(responses) = &mut self.responses {
            return responses.message().await;
        }
        match &mut self.sender {
            Upstream::Shmesh {
                sender,
                response_type,
                ..
            } => match sender.call.recv().await? {
                Some(response) => decode(&response, response_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Upstream::Grpc { call, .. } => {
                let responses = match crate::grpc::joined(call.take()).await? {
                    crate::grpc::Reply::Stream(stream) => Streaming {
                        inner: Downstream::Grpc(stream),
                    },
                    crate::grpc::Reply::One(_) => {
                        return Err(Status::internal("one response where a stream was due"));
                    }
                };
                self.responses.insert(responses).message().await
            }
        }
    }
}
