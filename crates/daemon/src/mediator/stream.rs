//! Streams on the mediated path: server, client and bidirectional
//! streaming, forwarded message by message to one replica.
//!
//! ```text
//!            ┌─ worker (up):    client.recv ─▶ replica.send … close_send
//! client ════┤
//!            └─ thread (down):  replica.recv ─▶ client.send … done, end
//! ```
//!
//! - **Admission**: the pipeline admits a stream once, before its first
//!   message, with a size of 0. Waiting for the first message would
//!   deadlock a bidirectional client that waits for the server to speak
//!   first, and hold a client stream in the engines for as long as its
//!   client takes to begin. Engines tell a stream's calls by method as
//!   they do unary ones; `done` is told once, with the stream's final code,
//!   just before the client gets it.
//! - **Two threads**: the stream's handler, on the detached server's worker
//!   pool, carries the client's messages up; a scoped thread carries the
//!   replica's down and ends the client's stream with the replica's status.
//!   Each direction is a plain loop over blocking halves
//!   ([`ServerStream::sender`], [`Call::split`]).
//! - **Flow control** holds end to end: each pump receives its next message
//!   only once it has sent the last, waiting for credit. A slow client
//!   stops the down pump; the daemon then stops granting the replica
//!   credit, so the replica waits. The daemon holds at most a window of
//!   messages per direction per stream, in the pools they arrived in.
//! - **Copies**: a message is copied once, from the pool it came in into
//!   the pool it leaves by (the client's and the replica's connections are
//!   separate segments); `send` copies straight into slabs, so nothing is
//!   allocated per message. A message larger than a slab is assembled on
//!   arrival, as the library assembles any, and goes on in chunks.
//! - **Ends**: the replica's status becomes the client's, whatever the
//!   client still sends ([`StreamSender::end`] releases the up pump). A
//!   replica that dies fails the down pump with `Unavailable`, which the
//!   client gets. A client that cancels or dies makes the up pump (or the
//!   down pump, if it was sending) cancel the upstream stream; the
//!   replica's handler sees the cancellation, and its end releases the
//!   other pump.
//! - **Deadlines**: the upstream stream is opened with the time left after
//!   the engines; a stream without a deadline gets none upstream either (a
//!   stream may rightly live long, unlike a unary call).

use std::time::Instant;

use shmesh::client::{Call, CallReceiver, CallSender};
use shmesh::server::{ServerStream, StreamSender};
use shmesh::status::{Code, Status};

use super::Forwarder;
use crate::engine::CallInfo;

impl Forwarder {
    /// Forwards one stream of any kind to the least busy replica. Ends the
    /// client's stream itself once it is admitted and open upstream; the
    /// error returned before that (a refusal, no replica) ends it instead.
    pub(super) fn forward_stream(&self, stream: &mut ServerStream) -> Result<(), Status> {
        let now = Instant::now();
        let caller = self.caller(stream.peer());
        // A copy: the stream is lent to the up pump while `info` lives.
        let metadata = stream.metadata().clone();
        let mut info = CallInfo {
            caller: &caller,
            service: &self.service,
            method: stream.method(),
            size: 0,
            deadline: stream.remaining().map(|r| now + r),
            metadata: &metadata,
            annotations: Vec::new(),
        };
        let admitted = self.pipeline.admit(&mut info)?;
        let mut upstream = match self.open_upstream(&info) {
            Ok(upstream) => upstream,
            Err(status) => {
                admitted.done(&info, status.code());
                return Err(status);
            }
        };
        let (from_replica, to_replica) = upstream.split();
        let mut to_client = stream.sender();
        std::thread::scope(|scope| {
            let up = std::thread::Builder::new()
                .name("shmeshd-stream".into())
                .spawn_scoped(scope, move || pump_up(stream, to_replica));
            let result = match up {
                Ok(_) => pump_down(from_replica, &mut to_client),
                Err(e) => {
                    from_replica.cancel();
                    Err(Status::unavailable(format!(
                        "the daemon cannot forward the stream: {e}"
                    )))
                }
            };
            let code = match &result {
                _ if to_client.is_cancelled() => Code::Cancelled,
                Ok(()) => Code::Ok,
                Err(status) => status.code(),
            };
            admitted.done(&info, code);
            // Ending the call releases the up pump wherever it waits on the
            // client; the scope then joins it.
            to_client.end(result);
        });
        Ok(())
    }

    /// Opens the stream to the least busy replica, with the time the
    /// engines left before the caller's deadline and the caller's metadata
    /// under the engines' annotations.
    fn open_upstream(&self, info: &CallInfo<'_>) -> Result<Call, Status> {
        let timeout = match info.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Status::deadline_exceeded(
                        "deadline passed in the daemon's engines",
                    ));
                }
                Some(left)
            }
            None => None,
        };
        self.pick()?
            .open_with(info.method, &super::forwarded(info), timeout)
    }
}

/// Carries the client's messages to the replica until the client
/// half-closes, then watches for a cancellation until the call ends.
fn pump_up(from_client: &mut ServerStream, mut to_replica: CallSender<'_>) {
    loop {
        match from_client.recv() {
            Ok(Some(message)) => {
                if to_replica.send(&message).is_err() {
                    // The replica ended the stream or went away: the down
                    // pump brings the client its status.
                    return;
                }
            }
            Ok(None) => {
                if to_replica.close_send().is_err() {
                    return;
                }
                if from_client.wait_cancelled() {
                    to_replica.cancel();
                }
                return;
            }
            Err(_) => {
                // Cancelled, gone, or ended by the down pump: it returns at
                // once, and says which.
                if from_client.wait_cancelled() {
                    to_replica.cancel();
                }
                return;
            }
        }
    }
}

/// Carries the replica's messages to the client; the replica's status.
fn pump_down(
    mut from_replica: CallReceiver<'_>,
    to_client: &mut StreamSender,
) -> Result<(), Status> {
    loop {
        match from_replica.recv()? {
            Some(message) => {
                if let Err(status) = to_client.send(&message) {
                    // The client cancelled or went away: so does the replica's
                    // handler. The stream's end no longer matters to anyone.
                    from_replica.cancel();
                    return Err(status);
                }
            }
            None => return Ok(()),
        }
    }
}
