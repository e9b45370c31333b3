//! Shared-memory primitives for shmesh.
//!
//! This crate is the bottom layer of shmesh (see `docs/ARCHITECTURE.md`):
//! sans-IO building blocks with no async runtime and no sockets.
//!
//! - [`segment`]: sealed `memfd` segments with a validated table of contents;
//! - [`pool`]: a payload pool of size-classed slabs, allocated by one owner
//!   without locks or system calls, returned by the peer through a ring;
//! - [`ring`]: single-producer, single-consumer rings of fixed-size entries;
//! - [`descriptor`] and [`handle`]: the records rings carry, and their
//!   decoders;
//! - [`doorbell`]: spin-then-park wake-ups that make no system call while
//!   nobody sleeps, on a futex or an eventfd;
//! - [`load`]: sealed pages a process publishes its load and counters in,
//!   read-only for everyone else; [`seqlock`]: the sequence lock they use.
//!
//! Shared memory is untrusted input. Every structure copies a shared value
//! once into private memory, checks it, and only then uses it; everything a
//! peer can write is accessed through atomics, so a hostile peer can make us
//! read wrong values (which validation reports as typed errors) but cannot
//! cause undefined behaviour.
//!
//! Build with `RUSTFLAGS="--cfg loom"` to model-check the ring, the pool's
//! free lists and the doorbell protocol (`tests/loom.rs`).

pub mod descriptor;
pub mod doorbell;
pub mod handle;
#[cfg(not(loom))]
pub mod load;
pub mod pool;
pub mod ring;
#[cfg(not(loom))]
pub mod segment;
pub mod seqlock;
mod sync;

pub use descriptor::{CorruptDescriptor, Descriptor, Flags};
#[cfg(not(loom))]
pub use doorbell::EventDoorbell;
pub use doorbell::{Doorbell, WaitMode, WaitPolicy};
pub use handle::{BadHandle, SlabHandle};
pub use pool::{Pool, PoolConfig, PoolView};
pub use ring::{Consumer, Producer};
#[cfg(not(loom))]
pub use segment::{Segment, SegmentBuilder};
