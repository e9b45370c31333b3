//! The shared-memory segment of one connection, and each side's ends of it.
//!
//! The server creates one segment per accepted connection, sized from the
//! limits it granted, and passes its fd in the `Welcome`. Nothing in it is
//! shared with any other connection: one client can never see another's
//! calls.
//!
//! ```text
//! client ── REQUESTS ring (descriptors) + SERVER bell ──▶ server
//!        ◀── RESPONSES ring (descriptors) + CLIENT bell ── server
//!        ◀── TO_CLIENT return ring (for streams; a unary response releases its request) ── server
//!        ── TO_SERVER return ring (response slabs given back) ──▶ server
//! client pool (requests)                     server pool (responses)
//! ```
//!
//! The client's doorbell parks on an eventfd the server creates and sends
//! with the segment, so a client can wait on it from an event loop; the
//! server's doorbell is a plain futex.

use std::sync::Arc;

use shmesh_shm::descriptor::Descriptor;
use std::os::fd::OwnedFd;

use shmesh_shm::doorbell::{self, Doorbell, EventDoorbell, WaitPolicy};
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::pool::{ClassConfig, Pool, PoolConfig, PoolConfigError, PoolView};
use shmesh_shm::ring::{Consumer, Producer};
use shmesh_shm::segment::{CreateError, RegionError, Segment, SegmentBuilder};
use thiserror::Error;

use crate::handshake::{Limits, WaitMode};

/// Region tags of a connection segment.
mod tags {
    pub const REQUESTS: u32 = 0;
    pub const RESPONSES: u32 = 1;
    pub const TO_CLIENT: u32 = 2;
    pub const TO_SERVER: u32 = 3;
    pub const SERVER_BELL: u32 = 0;
    pub const CLIENT_BELL: u32 = 1;
    pub const CLIENT_POOL: u32 = 0;
    pub const SERVER_POOL: u32 = 1;
}

/// The connection segment could not be built or opened.
#[derive(Debug, Error)]
pub enum LayoutError {
    /// The granted pool classes are not a valid pool.
    #[error("granted pool classes are invalid: {0}")]
    Pool(#[from] PoolConfigError),
    /// The segment could not be created.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The segment lacks a region a connection needs.
    #[error("connection segment is incomplete: {0}")]
    Region(#[from] RegionError),
    /// The client's doorbell eventfd could not be made.
    #[error(transparent)]
    EventFd(#[from] shmesh_shm::doorbell::EventFdError),
}

/// A fresh eventfd for a connection's client doorbell (the server keeps one
/// copy and sends the other).
pub fn client_bell_fd() -> Result<OwnedFd, LayoutError> {
    Ok(EventDoorbell::create_fd()?)
}

/// The pool configuration the limits describe.
pub fn pool_config(limits: &Limits) -> Result<PoolConfig, PoolConfigError> {
    PoolConfig::new(
        limits
            .pool_classes
            .as_slice()
            .iter()
            .map(|c| ClassConfig {
                slab_size: c.slab_size,
                count: u64::from(c.count),
            })
            .collect(),
    )
}

/// The wait policy the limits describe.
pub fn wait_policy(limits: &Limits) -> WaitPolicy {
    let mode = match limits.wait_mode {
        WaitMode::Poll => doorbell::WaitMode::Poll,
        WaitMode::Adaptive => doorbell::WaitMode::Adaptive,
        WaitMode::Block => doorbell::WaitMode::Block,
        WaitMode::Yield => doorbell::WaitMode::Yield,
    };
    WaitPolicy {
        mode,
        spin: std::time::Duration::from_nanos(limits.spin_ns),
    }
}

/// Creates the segment of connection number `id` for the granted `limits`.
pub fn create(id: u32, limits: &Limits) -> Result<Arc<Segment>, LayoutError> {
    let pool = pool_config(limits)?;
    let depth = limits.ring_depth as usize;
    let mut b = SegmentBuilder::new(id);
    b.ring::<Descriptor>(tags::REQUESTS, depth)
        .ring::<Descriptor>(tags::RESPONSES, depth)
        // Twice as deep as the rings they pair with: a side holds at most a
        // ring's worth of the other's slabs plus what it is working on.
        .ring::<SlabHandle>(tags::TO_CLIENT, depth * 2)
        .ring::<SlabHandle>(tags::TO_SERVER, depth * 2)
        .doorbell(tags::SERVER_BELL)
        .doorbell(tags::CLIENT_BELL)
        .pool(tags::CLIENT_POOL, &pool)
        .pool(tags::SERVER_POOL, &pool);
    Ok(b.create(&format!("conn-{id}"))?)
}

/// The doorbell the server waits on, for a thread that only needs to ring it.
pub fn server_bell(segment: &Arc<Segment>) -> Result<Doorbell, RegionError> {
    segment.doorbell(tags::SERVER_BELL)
}

/// The client's ends of a connection segment.
pub struct ClientEnds {
    /// Requests to the server.
    pub requests: Producer<Descriptor>,
    /// Responses from the server.
    pub responses: Consumer<Descriptor>,
    /// Request slabs the server gives back.
    pub returned: Consumer<SlabHandle>,
    /// Response slabs we give back.
    pub give_back: Producer<SlabHandle>,
    /// Our pool (requests).
    pub pool: Pool,
    /// The server's pool (responses), read-only.
    pub peer_pool: PoolView,
    /// Rung by us after pushing a request.
    pub server_bell: Doorbell,
    /// Waited on by us for responses (an eventfd doorbell).
    pub client_bell: EventDoorbell,
}

impl ClientEnds {
    /// Takes the client's ends of `segment`, with the eventfd of the client's
    /// doorbell. Call once per connection.
    pub fn open(segment: &Arc<Segment>, client_bell: OwnedFd) -> Result<Self, LayoutError> {
        Ok(ClientEnds {
            requests: segment.ring_producer(tags::REQUESTS)?,
            responses: segment.ring_consumer(tags::RESPONSES)?,
            returned: segment.ring_consumer(tags::TO_CLIENT)?,
            give_back: segment.ring_producer(tags::TO_SERVER)?,
            pool: segment.pool(tags::CLIENT_POOL)?,
            peer_pool: segment.pool_view(tags::SERVER_POOL)?,
            server_bell: segment.doorbell(tags::SERVER_BELL)?,
            client_bell: segment.event_doorbell(tags::CLIENT_BELL, client_bell)?,
        })
    }
}

/// The server's ends of a connection segment.
pub struct ServerEnds {
    /// Requests from the client.
    pub requests: Consumer<Descriptor>,
    /// Responses to the client.
    pub responses: Producer<Descriptor>,
    /// Request slabs we give back.
    pub give_back: Producer<SlabHandle>,
    /// Response slabs the client gives back.
    pub returned: Consumer<SlabHandle>,
    /// Our pool (responses); shared with the threads running offloaded
    /// handlers.
    pub pool: Arc<Pool>,
    /// The client's pool (requests), read-only; shared likewise.
    pub peer_pool: Arc<PoolView>,
    /// Waited on by us for requests (and for offloaded handlers' answers).
    pub server_bell: Arc<Doorbell>,
    /// Rung by us after pushing a response (an eventfd doorbell).
    pub client_bell: EventDoorbell,
}

impl ServerEnds {
    /// Takes the server's ends of `segment`, with our copy of the eventfd of
    /// the client's doorbell. Call once per connection.
    pub fn open(segment: &Arc<Segment>, client_bell: OwnedFd) -> Result<Self, LayoutError> {
        Ok(ServerEnds {
            requests: segment.ring_consumer(tags::REQUESTS)?,
            responses: segment.ring_producer(tags::RESPONSES)?,
            give_back: segment.ring_producer(tags::TO_CLIENT)?,
            returned: segment.ring_consumer(tags::TO_SERVER)?,
            pool: Arc::new(segment.pool(tags::SERVER_POOL)?),
            peer_pool: Arc::new(segment.pool_view(tags::CLIENT_POOL)?),
            server_bell: Arc::new(segment.doorbell(tags::SERVER_BELL)?),
            client_bell: segment.event_doorbell(tags::CLIENT_BELL, client_bell)?,
        })
    }
}
