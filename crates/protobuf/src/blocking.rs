//! The blocking client side: what a generated `FooBlockingClient` calls,
//! over a [`Channel`] (or, with feature `tonic`, over gRPC through
//! `grpc_blocking`). The same calls as [`client`](crate::client), for
//! threads.

use std::marker::PhantomData;
use std::time::Duration;

use shmesh::client::{Call, Channel};
use shmesh::metadata::Metadata;
use shmesh::status::Status;

use crate::client::encoded;
use crate::decode;

/// A unary call: sends `request` to `method` (encoded straight into a
/// loaned buffer) and decodes the response as a `Resp` (named
/// `response_type` in errors).
pub fn unary<Req, Resp>(
    channel: &Channel,
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
    let loan = channel.loan_with(request.encoded_len(), metadata, timeout);
    let response = match encoded(loan, request)? {
        Some(buf) => channel.send(method, buf, timeout)?,
        None => channel.call_with(method, &request.encode_to_vec(), metadata, timeout)?,
    };
    decode(&response, response_type)
}

/// A server-streaming call: sends `request` to `method`; read the
/// responses from the returned [`Streaming`] (an iterator too).
pub fn server_streaming<Req, Resp>(
    channel: &Channel,
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
    let mut buf = channel.loan_with(request.encoded_len(), metadata, timeout)?;
    crate::encode_into(request, &mut buf)?;
    let call = channel.server_stream_buf(method, buf, timeout)?;
    Ok(Streaming::new(call, response_type))
}

/// A client-streaming call to `method`: send requests on the returned
/// [`ClientStreaming`], then [`finish`](ClientStreaming::finish) it.
pub fn client_streaming<Req, Resp>(
    channel: &Channel,
    method: u32,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<ClientStreaming<Req, Resp>, Status> {
    Ok(ClientStreaming {
        inner: Upstream::Shmesh {
            sender: Box::new(Sender::new(channel, method, metadata, timeout)?),
            response_type,
            _grpc: PhantomData,
        },
    })
}

/// A bidirectional-streaming call to `method`: send and receive on the
/// returned [`BidiStreaming`].
pub fn bidi_streaming<Req, Resp>(
    channel: &Channel,
    method: u32,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<BidiStreaming<Req, Resp>, Status> {
    Ok(BidiStreaming {
        inner: Upstream::Shmesh {
            sender: Box::new(Sender::new(channel, method, metadata, timeout)?),
            response_type,
            _grpc: PhantomData,
        },
    })
}

#[derive(Debug)]
struct Sender<Req> {
    channel: Channel,
    call: Call,
    timeout: Option<Duration>,
    _request: PhantomData<fn(&Req)>,
}

impl<Req> Sender<Req> {
    fn new(
        channel: &Channel,
        method: u32,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Self, Status> {
        Ok(Sender {
            channel: channel.clone(),
            call: channel.open_with(method, metadata, timeout)?,
            timeout,
            _request: PhantomData,
        })
    }
}

impl<Req: prost::Message> Sender<Req> {
    fn send(&mut self, message: &Req) -> Result<(), Status> {
        match encoded(
            self.channel.loan(message.encoded_len(), self.timeout),
            message,
        )? {
            Some(buf) => self.call.send_buf(buf),
            None => self.call.send(&message.encode_to_vec()),
        }
    }
}

/// The responses of a server-streaming call, read one at a time with
/// [`message`](Streaming::message) or as an iterator. Dropping it before
/// the end cancels the call.
#[derive(Debug)]
pub struct Streaming<T> {
    inner: Downstream<T>,
}

#[derive(Debug)]
enum Downstream<T> {
    Shmesh {
        call: Call,
        response_type: &'static str,
        _message: PhantomData<fn() -> T>,
    },
    #[cfg(feature = "tonic")]
    Grpc(Waiting<crate::client::Streaming<T>>),
}

/// An async call of a blocking client over gRPC, and the runtime it runs
/// on (see [`crate::grpc_blocking`]).
#[cfg(feature = "tonic")]
#[derive(Debug)]
struct Waiting<C> {
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
    call: C,
}

impl<T: prost::Message + Default> Streaming<T> {
    /// Reads responses of type `T` (named `response_type` in errors) from
    /// `call`.
    pub fn new(call: Call, response_type: &'static str) -> Self {
        Streaming {
            inner: Downstream::Shmesh {
                call,
                response_type,
                _message: PhantomData,
            },
        }
    }

    /// Reads the responses of a gRPC call running on `runtime`.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        runtime: std::sync::Arc<tokio::runtime::Runtime>,
        call: crate::client::Streaming<T>,
    ) -> Self {
        Streaming {
            inner: Downstream::Grpc(Waiting { runtime, call }),
        }
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub fn message(&mut self) -> Result<Option<T>, Status> {
        match &mut self.inner {
            Downstream::Shmesh {
                call,
                response_type,
                ..
            } => match call.recv()? {
                Some(response) => decode(&response, response_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Downstream::Grpc(w) => w.runtime.block_on(w.call.message()),
        }
    }
}

impl<T: prost::Message + Default> Iterator for Streaming<T> {
    type Item = Result<T, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        self.message().transpose()
    }
}

/// Requests streaming up, over shmesh or gRPC.
#[derive(Debug)]
enum Upstream<Req, C> {
    Shmesh {
        sender: Box<Sender<Req>>,
        response_type: &'static str,
        /// The gRPC call type (unused without feature `tonic`).
        _grpc: PhantomData<fn() -> C>,
    },
    #[cfg(feature = "tonic")]
    Grpc(Waiting<C>),
}

/// A client-streaming call: send requests, then
/// [`finish`](ClientStreaming::finish). Dropping it unfinished cancels the
/// call.
#[derive(Debug)]
pub struct ClientStreaming<Req, Resp> {
    inner: Upstream<Req, crate::client::ClientStreaming<Req, Resp>>,
}

impl<Req, Resp> ClientStreaming<Req, Resp>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    /// Sends over gRPC through `call`, running on `runtime`.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        runtime: std::sync::Arc<tokio::runtime::Runtime>,
        call: crate::client::ClientStreaming<Req, Resp>,
    ) -> Self {
        ClientStreaming {
            inner: Upstream::Grpc(Waiting { runtime, call }),
        }
    }

    /// Sends one request, waiting for the server's credit when the window
    /// is full.
    pub fn send(&mut self, message: &Req) -> Result<(), Status> {
        match &mut self.inner {
            Upstream::Shmesh { sender, .. } => sender.send(message),
            #[cfg(feature = "tonic")]
            Upstream::Grpc(w) => w.runtime.block_on(w.call.send(message)),
        }
    }

    /// Closes the sending side and waits for the server's one response.
    pub fn finish(self) -> Result<Resp, Status> {
        match self.inner {
            Upstream::Shmesh {
                sender,
                response_type,
                ..
            } => {
                let response = sender.call.finish()?;
                decode(&response, response_type)
            }
            #[cfg(feature = "tonic")]
            Upstream::Grpc(w) => w.runtime.block_on(w.call.finish()),
        }
    }
}

/// A bidirectional-streaming call: send requests and read responses in any
/// order; [`close_send`](BidiStreaming::close_send) when done sending.
#[derive(Debug)]
pub struct BidiStreaming<Req, Resp> {
    inner: Upstream<Req, crate::client::BidiStreaming<Req, Resp>>,
}

impl<Req, Resp> BidiStreaming<Req, Resp>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    /// Sends and receives over gRPC through `call`, running on `runtime`.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        runtime: std::sync::Arc<tokio::runtime::Runtime>,
        call: crate::client::BidiStreaming<Req, Resp>,
    ) -> Self {
        BidiStreaming {
            inner: Upstream::Grpc(Waiting { runtime, call }),
        }
    }

    /// Sends one request, waiting for the server's credit when the window
    /// is full.
    pub fn send(&mut self, message: &Req) -> Result<(), Status> {
        match &mut self.inner {
            Upstream::Shmesh { sender, .. } => sender.send(message),
            #[cfg(feature = "tonic")]
            Upstream::Grpc(w) => w.runtime.block_on(w.call.send(message)),
        }
    }

    /// Closes the sending side: the server sees the end of its requests.
    pub fn close_send(&mut self) -> Result<(), Status> {
        match &mut self.inner {
            Upstream::Shmesh { sender, .. } => sender.call.close_send(),
            #[cfg(feature = "tonic")]
            Upstream::Grpc(w) => w.call.close_send(),
        }
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub fn message(&mut self) -> Result<Option<Resp>, Status> {
        match &mut self.inner {
            Upstream::Shmesh {
                sender,
                response_type,
                ..
            } => match sender.call.recv()? {
                Some(response) => decode(&response, response_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Upstream::Grpc(w) => w.runtime.block_on(w.call.message()),
        }
    }
}
