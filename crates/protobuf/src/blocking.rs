//! The blocking client side: what a generated `FooBlockingClient` calls,
//! over a [`Channel`]. The same calls as [`client`](crate::client), for
//! threads.

use std::marker::PhantomData;
use std::time::Duration;

use shmesh::client::{Call, Channel};
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
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Resp, Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let response = match encoded(channel.loan(request.encoded_len(), timeout), request)? {
        Some(buf) => channel.send(method, buf, timeout)?,
        None => channel.call(method, &request.encode_to_vec(), timeout)?,
    };
    decode(&response, response_type)
}

/// A server-streaming call: sends `request` to `method`; read the
/// responses from the returned [`Streaming`] (an iterator too).
pub fn server_streaming<Req, Resp>(
    channel: &Channel,
    method: u32,
    request: &Req,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Streaming<Resp>, Status>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let mut buf = channel.loan(request.encoded_len(), timeout)?;
    crate::encode_into(request, &mut buf)?;
    let call = channel.server_stream_buf(method, buf, timeout)?;
    Ok(Streaming::new(call, response_type))
}

/// A client-streaming call to `method`: send requests on the returned
/// [`ClientStreaming`], then [`finish`](ClientStreaming::finish) it.
pub fn client_streaming<Req, Resp>(
    channel: &Channel,
    method: u32,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<ClientStreaming<Req, Resp>, Status> {
    Ok(ClientStreaming {
        sender: Sender::new(channel, method, timeout)?,
        response_type,
        _response: PhantomData,
    })
}

/// A bidirectional-streaming call to `method`: send and receive on the
/// returned [`BidiStreaming`].
pub fn bidi_streaming<Req, Resp>(
    channel: &Channel,
    method: u32,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<BidiStreaming<Req, Resp>, Status> {
    Ok(BidiStreaming {
        sender: Sender::new(channel, method, timeout)?,
        response_type,
        _response: PhantomData,
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
    fn new(channel: &Channel, method: u32, timeout: Option<Duration>) -> Result<Self, Status> {
        Ok(Sender {
            channel: channel.clone(),
            call: channel.open(method, timeout)?,
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
    call: Call,
    response_type: &'static str,
    _message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Streaming<T> {
    /// Reads responses of type `T` (named `response_type` in errors) from
    /// `call`.
    pub fn new(call: Call, response_type: &'static str) -> Self {
        Streaming {
            call,
            response_type,
            _message: PhantomData,
        }
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub fn message(&mut self) -> Result<Option<T>, Status> {
        match self.call.recv()? {
            Some(response) => decode(&response, self.response_type).map(Some),
            None => Ok(None),
        }
    }

    /// The untyped call underneath.
    pub fn into_inner(self) -> Call {
        self.call
    }
}

impl<T: prost::Message + Default> Iterator for Streaming<T> {
    type Item = Result<T, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        self.message().transpose()
    }
}

/// A client-streaming call: send requests, then
/// [`finish`](ClientStreaming::finish). Dropping it unfinished cancels the
/// call.
#[derive(Debug)]
pub struct ClientStreaming<Req, Resp> {
    sender: Sender<Req>,
    response_type: &'static str,
    _response: PhantomData<fn() -> Resp>,
}

impl<Req: prost::Message, Resp: prost::Message + Default> ClientStreaming<Req, Resp> {
    /// Sends one request, waiting for the server's credit when the window
    /// is full.
    pub fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.sender.send(message)
    }

    /// Closes the sending side and waits for the server's one response.
    pub fn finish(self) -> Result<Resp, Status> {
        let response = self.sender.call.finish()?;
        decode(&response, self.response_type)
    }
}

/// A bidirectional-streaming call: send requests and read responses in any
/// order; [`close_send`](BidiStreaming::close_send) when done sending.
#[derive(Debug)]
pub struct BidiStreaming<Req, Resp> {
    sender: Sender<Req>,
    response_type: &'static str,
    _response: PhantomData<fn() -> Resp>,
}

impl<Req: prost::Message, Resp: prost::Message + Default> BidiStreaming<Req, Resp> {
    /// Sends one request, waiting for the server's credit when the window
    /// is full.
    pub fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.sender.send(message)
    }

    /// Closes the sending side: the server sees the end of its requests.
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.sender.call.close_send()
    }

    /// The next response; `None` once the call has ended successfully,
    /// its status if it failed.
    pub fn message(&mut self) -> Result<Option<Resp>, Status> {
        match self.sender.call.recv()? {
            Some(response) => decode(&response, self.response_type).map(Some),
            None => Ok(None),
        }
    }
}
