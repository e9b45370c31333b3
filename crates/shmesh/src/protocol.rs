//! The call protocol on the rings: which descriptors make up a call, who
//! gives which slab back, and how much a sender may have in flight.
//!
//! Pure rules and small helpers, no IO; the client and the server both follow
//! them.
//!
//! # A call
//!
//! The client opens a call with a descriptor flagged [`OPEN`] carrying the
//! method and the deadline. Its messages follow (the first may ride on the
//! `OPEN` descriptor); the last it sends carries `END` (half-close). The
//! server answers with messages and ends the call with exactly one `END`
//! descriptor: with `STATUS` set and the encoded [`Status`](crate::status::Status) as payload
//! when the call failed.
//!
//! - **Unary**: one descriptor each way. The request is
//!   `OPEN | MESSAGE | END`; the response is `MESSAGE | END`. Descriptors
//!   that carry a message (even an empty one) are flagged [`MESSAGE`].
//! - **Streams** (server, client, bidirectional): the opening descriptor is
//!   also flagged [`STREAM`]; messages travel as their own descriptors; the
//!   server's `END` carries no message, only the status.
//!
//! # Slabs
//!
//! The server gives back every response slab through the return ring when
//! its reader is done with it. A client message flagged [`RETURN`] is given
//! back the same way; an unflagged one (a unary request) is freed by the
//! client when the call's `END` arrives: one ring push saved per call.
//!
//! # Messages larger than a slab
//!
//! A message larger than the largest slab (up to the connection's
//! `max_message`) is cut into chunks of at most the largest slab, each but
//! the last flagged [`MORE`]: "the next payload descriptor of this call
//! continues this message". Every chunk is flagged [`RETURN`]. The receiver
//! copies the chunks into one buffer ([`Assembler`]); a message that would
//! exceed `max_message` is refused with `ResourceExhausted`, never
//! truncated.
//!
//! # Flow control
//!
//! Each direction of each call starts with [`WINDOW`] credits; every
//! descriptor carrying a message or chunk costs one except those that open
//! or end the call ([`costs_credit`]). The receiver grants credits back
//! with a [`CREDIT`] descriptor (no payload, the count in the aux word) once
//! it has consumed half a window, so a fast sender waits instead of
//! exhausting the pool while a slow reader holds slabs. Unary calls never
//! need a grant unless a message is chunked.
//!
//! # Metadata
//!
//! A call may carry [metadata](crate::metadata) (ASCII key/value pairs: a
//! trace context, a tenant). It rides on the call's `OPEN` descriptor,
//! flagged [`METADATA`]: the payload starts with the encoded block
//! ([`Metadata::decode`](crate::metadata::Metadata::decode) has its
//! format), and the message, if the descriptor carries one ([`MESSAGE`]),
//! follows it in the same payload. A unary call with metadata is still one
//! descriptor each way. A call opened without a message (a client stream)
//! opens with a descriptor whose payload is the block alone, flagged
//! [`RETURN`]. When the message is chunked, the block rides at the start of
//! the first chunk and must fit in it whole (the sender checks; the
//! largest slab is far larger than the 4 KiB a block may take); the chunks
//! hold the block and the message end to end. The receiver copies the block
//! once out of shared memory, checks it, and hands the handler the message
//! without it; a block that breaks the rules fails the call with
//! `InvalidArgument` and leaves the connection up. A call without metadata
//! is the same, bit for bit, as before the flag existed. The flag means
//! nothing on any other descriptor and must be clear there.
//!
//! # Cancellation
//!
//! A client that gives up sends a descriptor flagged `CANCEL` for the call.
//! The server marks the call cancelled (its handler can observe it) and ends
//! it with `Cancelled` unless it has ended already. Descriptors for calls the
//! receiver does not know (finished, cancelled) are dropped after giving
//! back any slab flagged [`RETURN`].

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::handle::SlabHandle;
use thiserror::Error;

/// Opens a call (client to server): the method and deadline words are
/// meaningful.
pub const OPEN: Flags = Flags(1 << 16);
/// The receiver gives this payload's slab back through the return ring.
pub const RETURN: Flags = Flags(1 << 17);
/// The next payload descriptor of this call continues this message.
pub const MORE: Flags = Flags(1 << 18);
/// Grants the receiver `aux` more payload descriptors on this call.
pub const CREDIT: Flags = Flags(1 << 19);
/// The descriptor carries a message (or a chunk of one): its payload, or an
/// empty message without one. Distinguishes "one empty message" from "no
/// message" on opening and ending descriptors.
pub const MESSAGE: Flags = Flags(1 << 20);

/// On a unary request (client to server): the aux word carries a response
/// slab the client gives back ([`pack_handle`]), saving the return ring's
/// cache line on a busy channel.
pub const GIVES_BACK: Flags = Flags(1 << 21);

/// On an `OPEN` descriptor: the payload starts with the call's encoded
/// metadata block; the message, if any, follows it.
pub const METADATA: Flags = Flags(1 << 22);

/// On an opening descriptor (client to server): the call is a stream
/// (server, client or bidirectional streaming), opened with
/// [`Channel::open`](crate::client::Channel::open) or
/// [`Channel::server_stream`](crate::client::Channel::server_stream).
///
/// A server that routes by method knows a method's kind from its own
/// handlers and ignores the flag; one that serves methods it does not know
/// (a proxy's fallback, the host daemon's mediated path) cannot tell
/// otherwise: a server-streaming call with a small request is
/// `OPEN | MESSAGE | END` like a unary one, and a unary call with a request
/// larger than a slab opens without `END` like a stream.
pub const STREAM: Flags = Flags(1 << 23);

/// Payload descriptors a sender may have unacknowledged per call and
/// direction.
pub const WINDOW: u32 = 16;

/// Consumed payload descriptors after which a receiver grants credit.
pub const GRANT_EVERY: u32 = WINDOW / 2;

/// A descriptor granting `credits` on `call_id`.
pub fn credit(call_id: u64, credits: u32) -> Descriptor {
    Descriptor {
        call_id,
        flags: CREDIT,
        aux: u64::from(credits),
        ..Default::default()
    }
}

/// A descriptor cancelling `call_id`.
pub fn cancel(call_id: u64) -> Descriptor {
    Descriptor {
        call_id,
        flags: Flags::CANCEL,
        ..Default::default()
    }
}

/// Whether sending a descriptor with `flags` takes a credit: messages and
/// chunks do, except on the call's opening and ending descriptors.
pub fn costs_credit(flags: Flags) -> bool {
    flags.contains(MESSAGE) && !flags.contains(OPEN) && !flags.contains(Flags::END)
}

/// The credits a [`CREDIT`] descriptor grants (saturated to `u32`).
pub fn granted(d: &Descriptor) -> u32 {
    u32::try_from(d.aux).unwrap_or(u32::MAX)
}

/// A slab handle of the peer's pool packed into one word, for
/// [`GIVES_BACK`]: generation (30 bits) and offset in 64-byte lines (34
/// bits); the segment is the connection's. `None` if it does not fit (the
/// slab then goes back on the return ring). Never 0: no slab sits at
/// offset 0, where the segment header is.
pub fn pack_handle(h: SlabHandle) -> Option<u64> {
    let lines = h.offset / 64;
    (h.offset.is_multiple_of(64) && lines != 0 && lines < 1 << 34 && h.generation < 1 << 30)
        .then(|| u64::from(h.generation) << 34 | lines)
}

/// The handle [`pack_handle`] packed, in `segment`. Any word unpacks to
/// some handle; the pool checks it like any other handed back.
pub fn unpack_handle(segment: u32, word: u64) -> SlabHandle {
    SlabHandle {
        segment,
        generation: (word >> 34) as u32,
        offset: (word & ((1 << 34) - 1)) * 64,
    }
}

/// Counts consumed payload descriptors and says when to grant credit.
#[derive(Debug, Default, Clone, Copy)]
pub struct CreditCounter {
    consumed: u32,
}

impl CreditCounter {
    /// Records one consumed descriptor that cost its sender a credit; returns the credits to grant
    /// now, if it is time.
    pub fn consumed(&mut self) -> Option<u32> {
        self.consumed += 1;
        (self.consumed >= GRANT_EVERY).then(|| std::mem::take(&mut self.consumed))
    }
}

/// The lengths of the chunks a `len`-byte message is sent as, given the
/// largest slab (`max_slab` > 0). A message that fits is one chunk; an empty
/// one is one empty chunk.
pub fn chunks(len: usize, max_slab: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = max_slab.max(1);
    let count = len.div_ceil(step).max(1);
    (0..count).map(move |i| i * step..((i + 1) * step).min(len))
}

/// The descriptors a `len`-byte message goes out as: each chunk's range
/// and flags. Every chunk has [`MESSAGE`] and `every`; all but the last
/// [`MORE`]; the first also `first`, the last also `last`.
///
/// ```
/// use shmesh::protocol::{plan, MESSAGE, MORE, OPEN};
/// use shmesh_shm::descriptor::Flags;
///
/// let parts: Vec<_> = plan(10, 4, Flags(0), OPEN, Flags::END).collect();
/// assert_eq!(parts.len(), 3);
/// assert_eq!(parts[0], (0..4, MESSAGE | MORE | OPEN));
/// assert_eq!(parts[2], (8..10, MESSAGE | Flags::END));
/// ```
pub fn plan(
    len: usize,
    max_slab: usize,
    every: Flags,
    first: Flags,
    last: Flags,
) -> impl Iterator<Item = (std::ops::Range<usize>, Flags)> {
    let count = len.div_ceil(max_slab.max(1)).max(1);
    chunks(len, max_slab).enumerate().map(move |(i, range)| {
        let mut flags = MESSAGE | every;
        if i + 1 != count {
            flags = flags | MORE;
        }
        if i == 0 {
            flags = flags | first;
        }
        if i + 1 == count {
            flags = flags | last;
        }
        (range, flags)
    })
}

/// A message assembled from chunks would exceed the limit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("message exceeds the connection's limit of {limit} bytes")]
pub struct TooLarge {
    /// The connection's `max_message`.
    pub limit: u64,
}

/// Copies the chunks of one message into one buffer, refusing to grow past
/// the connection's limit.
#[derive(Debug)]
pub struct Assembler {
    buf: Vec<u8>,
    limit: u64,
}

impl Assembler {
    /// An empty message of at most `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Assembler {
            buf: Vec::new(),
            limit,
        }
    }

    /// Appends one chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        let total = self.buf.len() as u64 + chunk.len() as u64;
        if total > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The whole message.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_message_exactly() {
        for (len, max) in [(0, 8), (1, 8), (8, 8), (9, 8), (17, 8), (64 << 20, 1 << 20)] {
            let parts: Vec<_> = chunks(len, max).collect();
            assert!(!parts.is_empty());
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, len);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            assert!(parts.iter().all(|r| r.len() <= max));
        }
        assert_eq!(chunks(64 << 20, 1 << 20).count(), 64);
    }

    #[test]
    fn handles_pack_into_one_word() {
        for (generation, offset) in [
            (1, 64),
            ((1 << 30) - 1, ((1 << 34) - 1) * 64),
            (7, 4096 * 33),
        ] {
            let h = SlabHandle {
                segment: 5,
                generation,
                offset,
            };
            let word = pack_handle(h).unwrap();
            assert_ne!(word, 0);
            assert_eq!(unpack_handle(5, word), h);
        }
        for (generation, offset) in [(1, 0), (1, 65), (1 << 30, 64), (1, 1 << 40)] {
            assert_eq!(
                pack_handle(SlabHandle {
                    segment: 5,
                    generation,
                    offset
                }),
                None
            );
        }
    }

    #[test]
    fn credit_is_granted_every_half_window() {
        let mut c = CreditCounter::default();
        let grants: Vec<_> = (0..WINDOW * 2).filter_map(|_| c.consumed()).collect();
        assert_eq!(grants, vec![GRANT_EVERY; 4]);
    }

    #[test]
    fn assembler_refuses_to_pass_the_limit() {
        let mut a = Assembler::new(10);
        a.push(&[1; 6]).unwrap();
        assert_eq!(a.push(&[2; 5]), Err(TooLarge { limit: 10 }));
        a.push(&[3; 4]).unwrap();
        assert_eq!(a.finish().len(), 10);
    }

    #[test]
    fn rpc_flags_are_in_the_upper_half() {
        for f in [OPEN, RETURN, MORE, CREDIT, MESSAGE, GIVES_BACK, METADATA] {
            assert_eq!(f.0 & Flags::UPPER.0, f.0);
        }
    }
}
