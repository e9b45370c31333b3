//! The connection handshake, sans IO: message types, their binary codec,
//! and the server's decision.
//!
//! Like `quinn-proto`, nothing here touches a socket: [`encode`] and
//! [`decode`] are pure functions over bytes and [`negotiate`] is a pure
//! function from a client's [`Hello`] and the server's [`ServerPolicy`] to
//! granted [`Limits`] or a [`Refuse`]. The socket glue is in
//! [`socket`](crate::socket).
//!
//! # Exchange
//!
//! ```text
//! client                                   server
//!   │── Hello (version, service, schema, requested limits) ──▶│  negotiate()
//!   │◀─ Welcome (version, granted limits, connection id,      │
//!   │            roles of the fds attached with SCM_RIGHTS) ──│
//!   │                          or                             │
//!   │◀─ Refuse (reason with both sides' values, message) ─────│
//! ```
//!
//! # Wire format
//!
//! All integers are little-endian. Every message is a 12-byte header and a
//! body:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"SHMH"` |
//! | 4 | 2 | wire format version, [`WIRE_VERSION`] |
//! | 6 | 1 | tag: 1 `Hello`, 2 `Welcome`, 3 `Refuse` |
//! | 7 | 1 | reserved, zero |
//! | 8 | 4 | body length in bytes, at most [`MAX_BODY_LEN`] |
//!
//! The header is frozen: every future version keeps these 12 bytes, so any
//! build can tell a shmesh peer from a stranger and which version it speaks,
//! and answer in a format it understands.
//!
//! Two versions are in play. The header's *wire format version* covers the
//! layout of these handshake messages. The `protocol_version` inside
//! [`Hello`] and [`Welcome`] names the protocol the connection speaks once
//! set up (segment layout, rings, descriptors); it changes without the
//! handshake's encoding changing, and [`negotiate`] answers a mismatch with
//! a polite [`RefuseReason::VersionMismatch`].
//!
//! Bodies (`[n]` is n bytes, `str8`/`str16` a UTF-8 string after a `u8`/`u16`
//! byte count):
//!
//! ```text
//! Limits   ring_depth u32 · wait_mode u8 (0 poll, 1 adaptive, 2 block, 3 yield)
//!          · class count u8 (≤ 16) · spin_ns u64 · max_message u64
//!          · per class, slab sizes strictly increasing: slab_size u64 · count u32
//! Hello    protocol_version u16 · service str8 (1..=255 bytes)
//!          · schema_hash [32] · requested Limits
//! Welcome  protocol_version u16 · connection_id u64 · granted Limits
//!          · fd count u8 (≤ 16) · one role per fd, in the order the fds
//!            are attached: u8 (1 segment, 2 client doorbell, 3 server doorbell,
//!            4 liveness socket: sent by the host daemon)
//! Refuse   reason u8 · the reason's fields · message str16 (≤ 1024 bytes)
//!          1 version mismatch   client u16 · server u16
//!          2 unknown service    requested str8 · offered str8
//!          3 schema mismatch    client [32] · server [32]
//!          4 limits refused     field u8 (1 ring depth, 2 pool classes,
//!                               3 max message) · requested u64 · limit u64
//!          5 busy               (nothing)
//!          6 no replica         requested str8   (from the host daemon)
//!          7 denied             requested str8   (from the host daemon)
//! ```
//!
//! The encoding is canonical: [`decode`] accepts exactly the bytes
//! [`encode`] produces for some message, so `encode(decode(x)?) == x`.
//! Reserved bytes must be zero, every count and length is checked against
//! its bound and against the bytes present, enumerations reject unknown
//! values, strings must be UTF-8, and nothing may follow the body. A
//! violation is a typed [`HandshakeError`]; decoding never panics
//! (property-tested and fuzzed by `fuzz/fuzz_targets/handshake.rs`).
//!
//! The message types keep these bounds as invariants (a [`ServiceName`] is
//! 1 to 255 bytes, [`PoolClasses`] holds at most 16 strictly increasing
//! classes …), which is why [`encode`] cannot fail.
//!
//! # Example
//!
//! ```
//! use shmesh::handshake::{
//!     self, Hello, Limits, Msg, PROTOCOL_VERSION, SchemaHash, ServerPolicy, ServiceName,
//! };
//!
//! let service = ServiceName::new("echo").unwrap();
//! let hello = Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     service: service.clone(),
//!     schema_hash: SchemaHash([7; 32]),
//!     requested: Limits::default(),
//! };
//! let bytes = handshake::encode(&Msg::Hello(hello.clone()));
//! assert_eq!(handshake::decode(&bytes).unwrap(), Msg::Hello(hello.clone()));
//!
//! let policy = ServerPolicy::new(service, SchemaHash([7; 32]));
//! let granted = handshake::negotiate(&hello, &policy).unwrap();
//! assert_eq!(granted, Limits::default());
//! ```

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use thiserror::Error;

/// The first four bytes of every handshake message.
pub const MAGIC: [u8; 4] = *b"SHMH";
/// The handshake wire format version this build reads and writes.
pub const WIRE_VERSION: u16 = 1;
/// The connection protocol version this build speaks (see the module docs
/// for how it differs from [`WIRE_VERSION`]). Version 3 added call
/// metadata ([`METADATA`](crate::protocol::METADATA)) and the
/// [`STREAM`](crate::protocol::STREAM) flag on stream opens: a version-2
/// peer would take the block for message bytes, and could not tell a
/// stream from a unary call on a fallback, so the two do not connect.
pub const PROTOCOL_VERSION: u16 = 3;
/// Bytes in a message header.
pub const HEADER_LEN: usize = 12;
/// Largest body [`decode`] accepts. Every message [`encode`] produces is
/// smaller (the largest, a `Refuse` naming two services, is 1,539 bytes).
pub const MAX_BODY_LEN: usize = 4096;
/// Longest service name, in bytes.
pub const MAX_SERVICE_LEN: usize = 255;
/// Most pool size classes in [`Limits`].
pub const MAX_POOL_CLASSES: usize = 16;
/// Most file descriptors a [`Welcome`] announces.
pub const MAX_WELCOME_FDS: usize = 16;
/// Longest [`Refuse`] message, in bytes.
pub const MAX_REFUSE_MESSAGE: usize = 1024;
/// Smallest ring depth [`negotiate`] grants (a ring holds at least two
/// entries).
pub const MIN_RING_DEPTH: u32 = 2;

const TAG_HELLO: u8 = 1;
const TAG_WELCOME: u8 = 2;
const TAG_REFUSE: u8 = 3;

// ---------------------------------------------------------------------------
// Bounded values

/// A service name: valid UTF-8, 1 to [`MAX_SERVICE_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

/// A string that cannot be a [`ServiceName`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServiceNameError {
    /// The name is empty.
    #[error("service name is empty")]
    Empty,
    /// The name is too long.
    #[error("service name is {len} bytes long; at most {max} allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
}

impl ServiceName {
    /// Checks and wraps a name.
    pub fn new(name: impl Into<String>) -> Result<Self, ServiceNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(ServiceNameError::Empty);
        }
        if name.len() > MAX_SERVICE_LEN {
            return Err(ServiceNameError::TooLong {
                len: name.len(),
                max: MAX_SERVICE_LEN,
            });
        }
        Ok(ServiceName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = ServiceNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::new(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A 32-byte hash of the service's schema (its methods and message types),
/// so both sides can tell they were built from the same definition. Shown
/// in lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SchemaHash(pub [u8; 32]);

impl fmt::Display for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SchemaHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaHash({self})")
    }
}

impl From<[u8; 32]> for SchemaHash {
    fn from(bytes: [u8; 32]) -> Self {
        SchemaHash(bytes)
    }
}

/// One size class of a payload pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolClass {
    /// Bytes per slab.
    pub slab_size: u64,
    /// Number of slabs.
    pub count: u32,
}

/// The size classes of a payload pool: at most [`MAX_POOL_CLASSES`], slab
/// sizes strictly increasing (so each size appears once).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PoolClasses(Vec<PoolClass>);

/// A list of classes that cannot be [`PoolClasses`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolClassesError {
    /// More classes than allowed.
    #[error("{count} pool classes; at most {max} allowed")]
    TooMany {
        /// The number given.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// A class is not larger than the one before it.
    #[error(
        "pool class {index} has slab size {slab_size}, not larger than the previous class's {previous}"
    )]
    NotIncreasing {
        /// Index of the offending class.
        index: usize,
        /// Its slab size.
        slab_size: u64,
        /// The previous class's slab size.
        previous: u64,
    },
}

impl PoolClasses {
    /// Checks and wraps a list of classes.
    pub fn new(classes: Vec<PoolClass>) -> Result<Self, PoolClassesError> {
        check_classes(&classes)?;
        Ok(PoolClasses(classes))
    }

    /// The classes, smallest first.
    pub fn as_slice(&self) -> &[PoolClass] {
        &self.0
    }
}

fn check_classes(classes: &[PoolClass]) -> Result<(), PoolClassesError> {
    if classes.len() > MAX_POOL_CLASSES {
        return Err(PoolClassesError::TooMany {
            count: classes.len(),
            max: MAX_POOL_CLASSES,
        });
    }
    for (index, pair) in classes.windows(2).enumerate() {
        if pair[1].slab_size <= pair[0].slab_size {
            return Err(PoolClassesError::NotIncreasing {
                index: index + 1,
                slab_size: pair[1].slab_size,
                previous: pair[0].slab_size,
            });
        }
    }
    Ok(())
}

impl Deref for PoolClasses {
    type Target = [PoolClass];

    fn deref(&self) -> &[PoolClass] {
        &self.0
    }
}

/// How the side that waits for a ring waits (the wire form of
/// `shmesh_shm::WaitMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WaitMode {
    /// Spin, never park (code 0). Most CPU.
    Poll,
    /// Spin for `spin_ns`, then park (code 1).
    #[default]
    Adaptive,
    /// Park at once (code 2). Least CPU.
    Block,
    /// Spin for `spin_ns` while giving the CPU away between checks, then
    /// park (code 3). For connections through a relay (the daemon's mediated
    /// path), where more threads wait than there are cores.
    Yield,
}

impl WaitMode {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            WaitMode::Poll => 0,
            WaitMode::Adaptive => 1,
            WaitMode::Block => 2,
            WaitMode::Yield => 3,
        }
    }

    /// The mode a byte on the wire names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(WaitMode::Poll),
            1 => Some(WaitMode::Adaptive),
            2 => Some(WaitMode::Block),
            3 => Some(WaitMode::Yield),
            _ => None,
        }
    }

    /// CPU the mode may burn, in increasing order: what [`negotiate`] takes
    /// the minimum of.
    fn cpu_rank(self) -> u8 {
        match self {
            WaitMode::Block => 0,
            WaitMode::Yield => 1,
            WaitMode::Adaptive => 2,
            WaitMode::Poll => 3,
        }
    }
}

/// What a file descriptor attached to a [`Welcome`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdRole {
    /// A shared-memory segment (a sealed memfd) (code 1).
    Segment,
    /// The eventfd the server rings to wake the client (code 2).
    ClientDoorbell,
    /// The eventfd the client rings to wake the server (code 3).
    ServerDoorbell,
    /// The client's end of a socket pair whose other end the server holds
    /// (code 4): sent by the host daemon, which brokers the connection, so
    /// that each side still learns of the other's death from a socket.
    Liveness,
}

impl FdRole {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            FdRole::Segment => 1,
            FdRole::ClientDoorbell => 2,
            FdRole::ServerDoorbell => 3,
            FdRole::Liveness => 4,
        }
    }

    /// The role a byte on the wire names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(FdRole::Segment),
            2 => Some(FdRole::ClientDoorbell),
            3 => Some(FdRole::ServerDoorbell),
            4 => Some(FdRole::Liveness),
            _ => None,
        }
    }
}

/// The roles of the fds attached to a [`Welcome`], in the order they are
/// attached: at most [`MAX_WELCOME_FDS`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FdRoles(Vec<FdRole>);

/// More fd roles than a [`Welcome`] may announce.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{count} file descriptors; a welcome carries at most {max}")]
pub struct TooManyFds {
    /// The number given.
    pub count: usize,
    /// The most allowed.
    pub max: usize,
}

impl FdRoles {
    /// Checks and wraps a list of roles.
    pub fn new(roles: Vec<FdRole>) -> Result<Self, TooManyFds> {
        if roles.len() > MAX_WELCOME_FDS {
            return Err(TooManyFds {
                count: roles.len(),
                max: MAX_WELCOME_FDS,
            });
        }
        Ok(FdRoles(roles))
    }

    /// The roles, in attachment order.
    pub fn as_slice(&self) -> &[FdRole] {
        &self.0
    }
}

impl Deref for FdRoles {
    type Target = [FdRole];

    fn deref(&self) -> &[FdRole] {
        &self.0
    }
}

// ---------------------------------------------------------------------------
// Messages

/// Resource limits of a connection: what a client requests in [`Hello`] and
/// a server grants in [`Welcome`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Entries per descriptor ring (the server rounds down to a power of
    /// two).
    pub ring_depth: u32,
    /// Size classes of the payload pool.
    pub pool_classes: PoolClasses,
    /// How a waiting side waits.
    pub wait_mode: WaitMode,
    /// For [`WaitMode::Adaptive`] and [`WaitMode::Yield`]: nanoseconds to
    /// spin before parking.
    pub spin_ns: u64,
    /// Largest message payload, in bytes.
    pub max_message: u64,
}

impl Default for Limits {
    /// A 256-deep ring; the default pool of `shmesh-shm` (256 B × 1024,
    /// 4 KiB × 256, 64 KiB × 32, 1 MiB × 4); adaptive waiting with a 50 µs
    /// spin; messages up to 64 MiB (those above the largest slab travel in
    /// chunks).
    fn default() -> Self {
        Limits {
            ring_depth: 256,
            pool_classes: PoolClasses(vec![
                PoolClass {
                    slab_size: 256,
                    count: 1024,
                },
                PoolClass {
                    slab_size: 4 << 10,
                    count: 256,
                },
                PoolClass {
                    slab_size: 64 << 10,
                    count: 32,
                },
                PoolClass {
                    slab_size: 1 << 20,
                    count: 4,
                },
            ]),
            wait_mode: WaitMode::Adaptive,
            spin_ns: 50_000,
            max_message: 64 << 20,
        }
    }
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The connection protocol version the client speaks
    /// ([`PROTOCOL_VERSION`]).
    pub protocol_version: u16,
    /// The service the client wants.
    pub service: ServiceName,
    /// The hash of the schema the client was built against.
    pub schema_hash: SchemaHash,
    /// The limits the client asks for.
    pub requested: Limits,
}

/// The server's acceptance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Welcome {
    /// The connection protocol version both sides will speak.
    pub protocol_version: u16,
    /// The limits granted (never more than requested; see [`negotiate`]).
    pub granted: Limits,
    /// The server's name for this connection, for logs and metrics.
    pub connection_id: u64,
    /// What each fd attached to this message is, in attachment order.
    pub fds: FdRoles,
}

/// Which limit a server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitField {
    /// [`Limits::ring_depth`] (code 1).
    RingDepth,
    /// [`Limits::pool_classes`] (code 2).
    PoolClasses,
    /// [`Limits::max_message`] (code 3).
    MaxMessage,
}

impl LimitField {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            LimitField::RingDepth => 1,
            LimitField::PoolClasses => 2,
            LimitField::MaxMessage => 3,
        }
    }

    /// The field a byte on the wire names, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(LimitField::RingDepth),
            2 => Some(LimitField::PoolClasses),
            3 => Some(LimitField::MaxMessage),
            _ => None,
        }
    }
}

impl fmt::Display for LimitField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitField::RingDepth => "ring depth",
            LimitField::PoolClasses => "pool classes",
            LimitField::MaxMessage => "max message",
        })
    }
}

/// Why a server refused a connection, with both sides' values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The two sides speak different protocol versions (code 1). Also sent
    /// by [`server_handshake`](crate::socket::server_handshake), with wire
    /// format versions, for a `Hello` in a wire format it cannot read.
    VersionMismatch {
        /// The client's version.
        client: u16,
        /// The server's version.
        server: u16,
    },
    /// The server does not offer the service asked for (code 2).
    UnknownService {
        /// The service the client asked for.
        requested: ServiceName,
        /// The service the server offers.
        offered: ServiceName,
    },
    /// The two sides were built from different schemas (code 3).
    SchemaMismatch {
        /// The client's schema hash.
        client: SchemaHash,
        /// The server's schema hash.
        server: SchemaHash,
    },
    /// A requested limit leaves nothing usable once capped by the server's
    /// (code 4).
    LimitsRefused {
        /// Which limit.
        field: LimitField,
        /// The client's value. For [`LimitField::PoolClasses`]: the number
        /// of classes requested.
        requested: u64,
        /// The server's maximum. For [`LimitField::PoolClasses`]: the
        /// number of classes the server could grant (zero).
        limit: u64,
    },
    /// The server takes no new connections now; try again later (code 5).
    Busy,
    /// The host daemon knows no live replica of the service (code 6).
    NoReplica {
        /// The service the client asked for.
        requested: ServiceName,
    },
    /// The host daemon's access control denies this caller the service
    /// (code 7); the message names the rule.
    Denied {
        /// The service the client asked for.
        requested: ServiceName,
    },
}

impl RefuseReason {
    fn code(&self) -> u8 {
        match self {
            RefuseReason::VersionMismatch { .. } => 1,
            RefuseReason::UnknownService { .. } => 2,
            RefuseReason::SchemaMismatch { .. } => 3,
            RefuseReason::LimitsRefused { .. } => 4,
            RefuseReason::Busy => 5,
            RefuseReason::NoReplica { .. } => 6,
            RefuseReason::Denied { .. } => 7,
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::VersionMismatch { client, server } => write!(
                f,
                "version mismatch: client speaks version {client}, server speaks version {server}"
            ),
            RefuseReason::UnknownService { requested, offered } => write!(
                f,
                "unknown service: client asked for {:?}, server offers {:?}",
                requested.as_str(),
                offered.as_str()
            ),
            RefuseReason::SchemaMismatch { client, server } => write!(
                f,
                "schema mismatch: client schema {client}, server schema {server}"
            ),
            RefuseReason::LimitsRefused {
                field,
                requested,
                limit,
            } => write!(
                f,
                "limits refused: {field}: client requested {requested}, server allows {limit}"
            ),
            RefuseReason::Busy => f.write_str("server busy"),
            RefuseReason::NoReplica { requested } => write!(
                f,
                "no replica of service {:?} is registered with the host daemon",
                requested.as_str()
            ),
            RefuseReason::Denied { requested } => write!(
                f,
                "access to service {:?} denied by the host daemon",
                requested.as_str()
            ),
        }
    }
}

/// The server's refusal: a reason and a message for humans, at most
/// [`MAX_REFUSE_MESSAGE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Refuse {
    reason: RefuseReason,
    message: String,
}

impl Refuse {
    /// A refusal. A message longer than [`MAX_REFUSE_MESSAGE`] bytes is cut
    /// at the last character boundary that fits.
    pub fn new(reason: RefuseReason, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_REFUSE_MESSAGE {
            let mut end = MAX_REFUSE_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Refuse { reason, message }
    }

    /// Why.
    pub fn reason(&self) -> &RefuseReason {
        &self.reason
    }

    /// The server's message (may be empty).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Refuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if !self.message.is_empty() {
            write!(f, " ({})", self.message)?;
        }
        Ok(())
    }
}

/// Any handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Msg {
    /// Client to server.
    Hello(Hello),
    /// Server to client: accepted.
    Welcome(Welcome),
    /// Server to client: refused.
    Refuse(Refuse),
}

impl Msg {
    /// The message's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello(_) => "Hello",
            Msg::Welcome(_) => "Welcome",
            Msg::Refuse(_) => "Refuse",
        }
    }
}

impl From<Hello> for Msg {
    fn from(m: Hello) -> Self {
        Msg::Hello(m)
    }
}

impl From<Welcome> for Msg {
    fn from(m: Welcome) -> Self {
        Msg::Welcome(m)
    }
}

impl From<Refuse> for Msg {
    fn from(m: Refuse) -> Self {
        Msg::Refuse(m)
    }
}

// ---------------------------------------------------------------------------
// Encoding

/// Encodes a message in the wire format of the [module docs](self).
pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    let tag = match msg {
        Msg::Hello(_) => TAG_HELLO,
        Msg::Welcome(_) => TAG_WELCOME,
        Msg::Refuse(_) => TAG_REFUSE,
    };
    out.push(tag);
    out.push(0);
    out.extend_from_slice(&[0; 4]); // body length, filled in below
    match msg {
        Msg::Hello(h) => {
            out.extend_from_slice(&h.protocol_version.to_le_bytes());
            put_str8(&mut out, &h.service);
            out.extend_from_slice(&h.schema_hash.0);
            put_limits(&mut out, &h.requested);
        }
        Msg::Welcome(w) => {
            out.extend_from_slice(&w.protocol_version.to_le_bytes());
            out.extend_from_slice(&w.connection_id.to_le_bytes());
            put_limits(&mut out, &w.granted);
            // `FdRoles` holds at most `MAX_WELCOME_FDS` (16) roles.
            out.push(w.fds.len() as u8);
            out.extend(w.fds.iter().map(|role| role.code()));
        }
        Msg::Refuse(r) => {
            out.push(r.reason.code());
            match &r.reason {
                RefuseReason::VersionMismatch { client, server } => {
                    out.extend_from_slice(&client.to_le_bytes());
                    out.extend_from_slice(&server.to_le_bytes());
                }
                RefuseReason::UnknownService { requested, offered } => {
                    put_str8(&mut out, requested);
                    put_str8(&mut out, offered);
                }
                RefuseReason::SchemaMismatch { client, server } => {
                    out.extend_from_slice(&client.0);
                    out.extend_from_slice(&server.0);
                }
                RefuseReason::LimitsRefused {
                    field,
                    requested,
                    limit,
                } => {
                    out.push(field.code());
                    out.extend_from_slice(&requested.to_le_bytes());
                    out.extend_from_slice(&limit.to_le_bytes());
                }
                RefuseReason::Busy => {}
                RefuseReason::NoReplica { requested } | RefuseReason::Denied { requested } => {
                    put_str8(&mut out, requested);
                }
            }
            // `Refuse::new` bounds the message to `MAX_REFUSE_MESSAGE` bytes.
            out.extend_from_slice(&(r.message.len() as u16).to_le_bytes());
            out.extend_from_slice(r.message.as_bytes());
        }
    }
    // The types' invariants bound every body well below `MAX_BODY_LEN`.
    let body_len = (out.len() - HEADER_LEN) as u32;
    out[8..12].copy_from_slice(&body_len.to_le_bytes());
    out
}

fn put_str8(out: &mut Vec<u8>, name: &ServiceName) {
    // A `ServiceName` is at most `MAX_SERVICE_LEN` (255) bytes.
    out.push(name.0.len() as u8);
    out.extend_from_slice(name.0.as_bytes());
}

fn put_limits(out: &mut Vec<u8>, limits: &Limits) {
    out.extend_from_slice(&limits.ring_depth.to_le_bytes());
    out.push(limits.wait_mode.code());
    // `PoolClasses` holds at most `MAX_POOL_CLASSES` (16) classes.
    out.push(limits.pool_classes.len() as u8);
    out.extend_from_slice(&limits.spin_ns.to_le_bytes());
    out.extend_from_slice(&limits.max_message.to_le_bytes());
    for class in limits.pool_classes.iter() {
        out.extend_from_slice(&class.slab_size.to_le_bytes());
        out.extend_from_slice(&class.count.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------
// Decoding

/// Bytes that are not a valid handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The input ends inside a field.
    #[error("truncated {what}: needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the input.
        available: usize,
    },
    /// The first four bytes are not `"SHMH"`: not a shmesh peer.
    #[error("bad magic {found:02x?}: not a shmesh handshake")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A wire format version this build cannot read.
    #[error(
        "handshake wire format version {found} is not supported (this build reads {supported})"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// An unknown message tag.
    #[error("unknown message tag {tag}")]
    UnknownTag {
        /// The tag found.
        tag: u8,
    },
    /// The header's reserved byte is not zero.
    #[error("reserved header byte is {value:#04x}, not zero")]
    ReservedNotZero {
        /// Its value.
        value: u8,
    },
    /// A length beyond its bound.
    #[error("{what} is {len} bytes long; at most {max} allowed")]
    TooLong {
        /// What is too long.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// Bytes after the end of the message (or of its body).
    #[error("{count} trailing bytes after the {what}")]
    TrailingBytes {
        /// `"message"` (past the header's body length) or `"body"` (inside
        /// it, after the last field).
        what: &'static str,
        /// How many.
        count: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Which string.
        what: &'static str,
    },
    /// A name that must not be empty is.
    #[error("{what} is empty")]
    EmptyName {
        /// Which name.
        what: &'static str,
    },
    /// An enumeration byte with no meaning.
    #[error("unknown {what} code {value}")]
    UnknownValue {
        /// Which enumeration.
        what: &'static str,
        /// The byte found.
        value: u8,
    },
    /// More pool classes than [`MAX_POOL_CLASSES`].
    #[error("{count} pool classes; at most {max} allowed")]
    TooManyClasses {
        /// The count found.
        count: usize,
        /// The most allowed.
        max: usize,
    },
    /// Pool classes whose slab sizes do not strictly increase.
    #[error(
        "pool class {index} has slab size {slab_size}, not larger than the previous class's {previous}"
    )]
    ClassesNotIncreasing {
        /// Index of the offending class.
        index: usize,
        /// Its slab size.
        slab_size: u64,
        /// The previous class's slab size.
        previous: u64,
    },
    /// More fds announced than [`MAX_WELCOME_FDS`].
    #[error("welcome announces {count} file descriptors; at most {max} allowed")]
    TooManyFds {
        /// The count found.
        count: usize,
        /// The most allowed.
        max: usize,
    },
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HandshakeError> {
        if self.buf.len() < n {
            return Err(HandshakeError::Truncated {
                what,
                needed: n,
                available: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], HandshakeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HandshakeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HandshakeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, HandshakeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, HandshakeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn utf8(&mut self, len: usize, what: &'static str) -> Result<String, HandshakeError> {
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| HandshakeError::BadUtf8 { what })
    }

    fn service(&mut self, what: &'static str) -> Result<ServiceName, HandshakeError> {
        let len = usize::from(self.u8(what)?);
        if len == 0 {
            return Err(HandshakeError::EmptyName { what });
        }
        // A u8 length cannot exceed `MAX_SERVICE_LEN`.
        Ok(ServiceName(self.utf8(len, what)?))
    }

    fn limits(&mut self) -> Result<Limits, HandshakeError> {
        let ring_depth = self.u32("ring depth")?;
        let code = self.u8("wait mode")?;
        let wait_mode = WaitMode::from_code(code).ok_or(HandshakeError::UnknownValue {
            what: "wait mode",
            value: code,
        })?;
        let count = usize::from(self.u8("pool class count")?);
        if count > MAX_POOL_CLASSES {
            return Err(HandshakeError::TooManyClasses {
                count,
                max: MAX_POOL_CLASSES,
            });
        }
        let spin_ns = self.u64("spin time")?;
        let max_message = self.u64("max message")?;
        let mut classes = Vec::with_capacity(count);
        for _ in 0..count {
            let slab_size = self.u64("pool class slab size")?;
            let count = self.u32("pool class count")?;
            classes.push(PoolClass { slab_size, count });
        }
        let pool_classes = PoolClasses::new(classes).map_err(|e| match e {
            PoolClassesError::TooMany { count, max } => {
                HandshakeError::TooManyClasses { count, max }
            }
            PoolClassesError::NotIncreasing {
                index,
                slab_size,
                previous,
            } => HandshakeError::ClassesNotIncreasing {
                index,
                slab_size,
                previous,
            },
        })?;
        Ok(Limits {
            ring_depth,
            pool_classes,
            wait_mode,
            spin_ns,
            max_message,
        })
    }
}

/// Decodes one message, which must fill `bytes` exactly. Never panics;
/// every violation of the wire format is a [`HandshakeError`].
pub fn decode(bytes: &[u8]) -> Result<Msg, HandshakeError> {
    let mut header = Reader { buf: bytes };
    // Check the magic on its own first, so that a stranger's short reply
    // reads as "not shmesh" rather than "truncated".
    if let Some(found) = bytes.get(..MAGIC.len())
        && found != MAGIC
    {
        let mut magic = [0; 4];
        magic.copy_from_slice(found);
        return Err(HandshakeError::BadMagic { found: magic });
    }
    header.take(MAGIC.len(), "magic")?;
    let version = header.u16("wire format version")?;
    if version != WIRE_VERSION {
        return Err(HandshakeError::UnsupportedVersion {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let tag = header.u8("message tag")?;
    if !matches!(tag, TAG_HELLO | TAG_WELCOME | TAG_REFUSE) {
        return Err(HandshakeError::UnknownTag { tag });
    }
    let reserved = header.u8("reserved byte")?;
    if reserved != 0 {
        return Err(HandshakeError::ReservedNotZero { value: reserved });
    }
    let body_len = header.u32("body length")? as usize;
    if body_len > MAX_BODY_LEN {
        return Err(HandshakeError::TooLong {
            what: "body",
            len: body_len,
            max: MAX_BODY_LEN,
        });
    }
    let body = header.take(body_len, "body")?;
    if !header.buf.is_empty() {
        return Err(HandshakeError::TrailingBytes {
            what: "message",
            count: header.buf.len(),
        });
    }

    let mut r = Reader { buf: body };
    let msg = match tag {
        TAG_HELLO => Msg::Hello(Hello {
            protocol_version: r.u16("protocol version")?,
            service: r.service("service name")?,
            schema_hash: SchemaHash(r.array("schema hash")?),
            requested: r.limits()?,
        }),
        TAG_WELCOME => {
            let protocol_version = r.u16("protocol version")?;
            let connection_id = r.u64("connection id")?;
            let granted = r.limits()?;
            let count = usize::from(r.u8("fd count")?);
            if count > MAX_WELCOME_FDS {
                return Err(HandshakeError::TooManyFds {
                    count,
                    max: MAX_WELCOME_FDS,
                });
            }
            let mut roles = Vec::with_capacity(count);
            for &code in r.take(count, "fd roles")? {
                roles.push(FdRole::from_code(code).ok_or(HandshakeError::UnknownValue {
                    what: "fd role",
                    value: code,
                })?);
            }
            Msg::Welcome(Welcome {
                protocol_version,
                granted,
                connection_id,
                fds: FdRoles(roles),
            })
        }
        _ => {
            let code = r.u8("refuse reason")?;
            let reason = match code {
                1 => RefuseReason::VersionMismatch {
                    client: r.u16("client version")?,
                    server: r.u16("server version")?,
                },
                2 => RefuseReason::UnknownService {
                    requested: r.service("requested service name")?,
                    offered: r.service("offered service name")?,
                },
                3 => RefuseReason::SchemaMismatch {
                    client: SchemaHash(r.array("client schema hash")?),
                    server: SchemaHash(r.array("server schema hash")?),
                },
                4 => {
                    let code = r.u8("limit field")?;
                    let field =
                        LimitField::from_code(code).ok_or(HandshakeError::UnknownValue {
                            what: "limit field",
                            value: code,
                        })?;
                    RefuseReason::LimitsRefused {
                        field,
                        requested: r.u64("requested limit")?,
                        limit: r.u64("server limit")?,
                    }
                }
                5 => RefuseReason::Busy,
                6 => RefuseReason::NoReplica {
                    requested: r.service("requested service name")?,
                },
                7 => RefuseReason::Denied {
                    requested: r.service("requested service name")?,
                },
                value => {
                    return Err(HandshakeError::UnknownValue {
                        what: "refuse reason",
                        value,
                    });
                }
            };
            let len = usize::from(r.u16("refuse message length")?);
            if len > MAX_REFUSE_MESSAGE {
                return Err(HandshakeError::TooLong {
                    what: "refuse message",
                    len,
                    max: MAX_REFUSE_MESSAGE,
                });
            }
            let message = r.utf8(len, "refuse message")?;
            Msg::Refuse(Refuse { reason, message })
        }
    };
    if !r.buf.is_empty() {
        return Err(HandshakeError::TrailingBytes {
            what: "body",
            count: r.buf.len(),
        });
    }
    Ok(msg)
}

// ---------------------------------------------------------------------------
// Negotiation

/// What a server offers and how much it grants at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPolicy {
    /// The service this server offers.
    pub service: ServiceName,
    /// The hash of the schema this server was built against.
    pub schema_hash: SchemaHash,
    /// The most the server grants of each limit. Its pool classes are the
    /// only slab sizes it grants; its ring depth should be a power of two.
    pub max: Limits,
    /// Set while the server takes no new connections (at capacity,
    /// draining): every otherwise acceptable `Hello` is refused with
    /// [`RefuseReason::Busy`].
    pub busy: bool,
}

impl ServerPolicy {
    /// A policy with [`Limits::default`] as maximum, not busy.
    pub fn new(service: ServiceName, schema_hash: SchemaHash) -> Self {
        ServerPolicy {
            service,
            schema_hash,
            max: Limits::default(),
            busy: false,
        }
    }
}

/// Decides a client's [`Hello`]: the limits to grant, or why not.
///
/// Checks, in this order (lasting reasons before passing ones, so a client
/// that could never connect is not told to retry):
///
/// 1. the protocol version must equal [`PROTOCOL_VERSION`], else
///    [`RefuseReason::VersionMismatch`];
/// 2. the service must be the policy's, else
///    [`RefuseReason::UnknownService`];
/// 3. the schema hash must be the policy's, else
///    [`RefuseReason::SchemaMismatch`];
/// 4. the limits are granted as below, else [`RefuseReason::LimitsRefused`];
/// 5. the server must not be busy, else [`RefuseReason::Busy`].
///
/// **Granting.** Every limit is a resource the server spends, and each is
/// granted as the minimum of the request and the server's maximum, so a
/// grant never exceeds either:
///
/// - `ring_depth`: the minimum, rounded down to a power of two (a ring's
///   capacity is one); refused if below [`MIN_RING_DEPTH`];
/// - `pool_classes`: per requested class, the count is capped by the
///   server's class of the same slab size (a size the server does not list
///   is capped at zero); classes left with no slabs are dropped; refused if
///   no class is left;
/// - `wait_mode`: the one that burns less CPU (`Block` < `Adaptive` <
///   `Poll`), so a server can forbid busy polling;
/// - `spin_ns`: the minimum;
/// - `max_message`: the minimum; refused if zero.
///
/// Whether the granted pool can carry a `max_message` payload is left to
/// the layer that lays out the segment.
pub fn negotiate(hello: &Hello, server: &ServerPolicy) -> Result<Limits, Refuse> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refuse::new(
            RefuseReason::VersionMismatch {
                client: hello.protocol_version,
                server: PROTOCOL_VERSION,
            },
            "",
        ));
    }
    if hello.service != server.service {
        return Err(Refuse::new(
            RefuseReason::UnknownService {
                requested: hello.service.clone(),
                offered: server.service.clone(),
            },
            "",
        ));
    }
    if hello.schema_hash != server.schema_hash {
        return Err(Refuse::new(
            RefuseReason::SchemaMismatch {
                client: hello.schema_hash,
                server: server.schema_hash,
            },
            "client and server were built from different service definitions",
        ));
    }
    let granted = grant(&hello.requested, &server.max)?;
    if server.busy {
        return Err(Refuse::new(RefuseReason::Busy, "try again later"));
    }
    Ok(granted)
}

/// Caps each requested limit by the server's maximum (see [`negotiate`]).
fn grant(req: &Limits, max: &Limits) -> Result<Limits, Refuse> {
    let depth = req.ring_depth.min(max.ring_depth);
    if depth < MIN_RING_DEPTH {
        return Err(Refuse::new(
            RefuseReason::LimitsRefused {
                field: LimitField::RingDepth,
                requested: req.ring_depth.into(),
                limit: max.ring_depth.into(),
            },
            format!("a ring holds at least {MIN_RING_DEPTH} entries"),
        ));
    }
    let ring_depth = 1 << depth.ilog2();

    let classes: Vec<PoolClass> = req
        .pool_classes
        .iter()
        .filter_map(|class| {
            let cap = max
                .pool_classes
                .iter()
                .find(|offered| offered.slab_size == class.slab_size)
                .map_or(0, |offered| offered.count);
            let count = class.count.min(cap);
            (count > 0).then_some(PoolClass {
                slab_size: class.slab_size,
                count,
            })
        })
        .collect();
    if classes.is_empty() {
        let sizes = |classes: &PoolClasses| {
            classes
                .iter()
                .map(|c| c.slab_size.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Refuse::new(
            RefuseReason::LimitsRefused {
                field: LimitField::PoolClasses,
                requested: req.pool_classes.len() as u64,
                limit: 0,
            },
            format!(
                "no requested slab size is offered: client asked for [{}], server offers [{}]",
                sizes(&req.pool_classes),
                sizes(&max.pool_classes)
            ),
        ));
    }

    let max_message = req.max_message.min(max.max_message);
    if max_message == 0 {
        return Err(Refuse::new(
            RefuseReason::LimitsRefused {
                field: LimitField::MaxMessage,
                requested: req.max_message,
                limit: max.max_message,
            },
            "",
        ));
    }

    let wait_mode = if req.wait_mode.cpu_rank() <= max.wait_mode.cpu_rank() {
        req.wait_mode
    } else {
        max.wait_mode
    };

    Ok(Limits {
        ring_depth,
        // A subset of strictly increasing, at most 16 classes is still both.
        pool_classes: PoolClasses(classes),
        wait_mode,
        spin_ns: req.spin_ns.min(max.spin_ns),
        max_message,
    })
}

/// A granted limit larger than the one requested (see [`check_grant`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("granted {field} {granted} exceeds the requested {requested}")]
pub struct GrantExceedsRequest {
    /// Which limit: `"ring depth"`, `"wait mode"` (values are wire codes),
    /// `"spin time"`, `"max message"`, `"pool class slab size"` (a size not
    /// requested; `requested` is 0) or `"pool class count"`.
    pub field: &'static str,
    /// The requested value.
    pub requested: u64,
    /// The granted value.
    pub granted: u64,
}

/// Checks that a server's grant stays within the client's request, as
/// [`negotiate`]'s always does: the client's check on an untrusted
/// [`Welcome`].
pub fn check_grant(requested: &Limits, granted: &Limits) -> Result<(), GrantExceedsRequest> {
    let exceeds = |field, requested: u64, granted: u64| {
        if granted > requested {
            Err(GrantExceedsRequest {
                field,
                requested,
                granted,
            })
        } else {
            Ok(())
        }
    };
    exceeds(
        "ring depth",
        requested.ring_depth.into(),
        granted.ring_depth.into(),
    )?;
    if granted.wait_mode.cpu_rank() > requested.wait_mode.cpu_rank() {
        return Err(GrantExceedsRequest {
            field: "wait mode",
            requested: requested.wait_mode.code().into(),
            granted: granted.wait_mode.code().into(),
        });
    }
    exceeds("spin time", requested.spin_ns, granted.spin_ns)?;
    exceeds("max message", requested.max_message, granted.max_message)?;
    for class in granted.pool_classes.iter() {
        match requested
            .pool_classes
            .iter()
            .find(|asked| asked.slab_size == class.slab_size)
        {
            Some(asked) => exceeds("pool class count", asked.count.into(), class.count.into())?,
            None => exceeds("pool class slab size", 0, class.slab_size)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn classes(list: &[(u64, u32)]) -> PoolClasses {
        PoolClasses::new(
            list.iter()
                .map(|&(slab_size, count)| PoolClass { slab_size, count })
                .collect(),
        )
        .unwrap()
    }

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            service: name("echo"),
            schema_hash: SchemaHash([0xab; 32]),
            requested: Limits::default(),
        }
    }

    fn policy() -> ServerPolicy {
        ServerPolicy::new(name("echo"), SchemaHash([0xab; 32]))
    }

    fn welcome() -> Welcome {
        Welcome {
            protocol_version: PROTOCOL_VERSION,
            granted: Limits::default(),
            connection_id: 0x0102_0304_0506_0708,
            fds: FdRoles::new(vec![
                FdRole::Segment,
                FdRole::ClientDoorbell,
                FdRole::ServerDoorbell,
            ])
            .unwrap(),
        }
    }

    fn all_messages() -> Vec<Msg> {
        let long = name(&"s".repeat(MAX_SERVICE_LEN));
        vec![
            hello().into(),
            welcome().into(),
            Refuse::new(
                RefuseReason::VersionMismatch {
                    client: 2,
                    server: 1,
                },
                "",
            )
            .into(),
            Refuse::new(
                RefuseReason::UnknownService {
                    requested: long.clone(),
                    offered: long,
                },
                "x".repeat(MAX_REFUSE_MESSAGE),
            )
            .into(),
            Refuse::new(
                RefuseReason::SchemaMismatch {
                    client: SchemaHash([1; 32]),
                    server: SchemaHash([2; 32]),
                },
                "é",
            )
            .into(),
            Refuse::new(
                RefuseReason::LimitsRefused {
                    field: LimitField::MaxMessage,
                    requested: 0,
                    limit: 9,
                },
                "m",
            )
            .into(),
            Refuse::new(RefuseReason::Busy, "later").into(),
        ]
    }

    // --- codec ------------------------------------------------------------

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = encode(&msg);
            assert!(bytes.len() - HEADER_LEN <= MAX_BODY_LEN);
            assert_eq!(decode(&bytes), Ok(msg));
        }
    }

    #[test]
    fn largest_message_fits_the_documented_size() {
        let largest = all_messages()
            .iter()
            .map(|m| encode(m).len() - HEADER_LEN)
            .max()
            .unwrap();
        assert_eq!(largest, 1539);
    }

    #[test]
    fn header_layout() {
        let bytes = encode(&hello().into());
        assert_eq!(&bytes[0..4], b"SHMH");
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), WIRE_VERSION);
        assert_eq!(bytes[6], TAG_HELLO);
        assert_eq!(bytes[7], 0);
        let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - HEADER_LEN);
        // protocol version, then the service name with its length.
        assert_eq!(&bytes[12..14], &PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(bytes[14], 4);
        assert_eq!(&bytes[15..19], b"echo");
    }

    #[test]
    fn every_prefix_is_truncated() {
        for msg in all_messages() {
            let bytes = encode(&msg);
            for len in 4..bytes.len() {
                assert!(
                    matches!(decode(&bytes[..len]), Err(HandshakeError::Truncated { .. })),
                    "{} prefix of {len}",
                    msg.kind()
                );
            }
        }
        assert!(matches!(
            decode(b"SH"),
            Err(HandshakeError::Truncated { what: "magic", .. })
        ));
        assert!(matches!(
            decode(b""),
            Err(HandshakeError::Truncated { what: "magic", .. })
        ));
    }

    #[test]
    fn bad_magic() {
        assert_eq!(
            decode(b"HTTP/1.1 400 Bad Request\r\n"),
            Err(HandshakeError::BadMagic { found: *b"HTTP" })
        );
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = encode(&hello().into());
        bytes[4] = 2;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::UnsupportedVersion {
                found: 2,
                supported: WIRE_VERSION
            })
        );
    }

    #[test]
    fn unknown_tag_and_reserved() {
        let mut bytes = encode(&hello().into());
        bytes[6] = 9;
        assert_eq!(decode(&bytes), Err(HandshakeError::UnknownTag { tag: 9 }));
        let mut bytes = encode(&hello().into());
        bytes[7] = 1;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::ReservedNotZero { value: 1 })
        );
    }

    #[test]
    fn body_too_long() {
        let mut bytes = encode(&hello().into());
        bytes[8..12].copy_from_slice(&(MAX_BODY_LEN as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TooLong {
                what: "body",
                len: MAX_BODY_LEN + 1,
                max: MAX_BODY_LEN
            })
        );
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = encode(&hello().into());
        bytes.push(0);
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TrailingBytes {
                what: "message",
                count: 1
            })
        );
        // A byte inside the body's declared length, after the last field.
        let body_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        bytes[8..12].copy_from_slice(&(body_len + 1).to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TrailingBytes {
                what: "body",
                count: 1
            })
        );
    }

    #[test]
    fn bad_utf8_and_empty_name() {
        let mut bytes = encode(&hello().into());
        bytes[15] = 0xff; // first byte of "echo"
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::BadUtf8 {
                what: "service name"
            })
        );

        let mut refuse = encode(&Refuse::new(RefuseReason::Busy, "ok").into());
        let last = refuse.len() - 1;
        refuse[last] = 0xc3; // a lone lead byte
        assert_eq!(
            decode(&refuse),
            Err(HandshakeError::BadUtf8 {
                what: "refuse message"
            })
        );

        // A zero-length name, with the body shortened to match.
        let mut bytes = encode(&hello().into());
        bytes[14] = 0;
        bytes.drain(15..19);
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::EmptyName {
                what: "service name"
            })
        );
    }

    /// Offset of the limits in an encoded `hello()`.
    const HELLO_LIMITS: usize = HEADER_LEN + 2 + 1 + 4 + 32;

    #[test]
    fn unknown_enumeration_values() {
        let mut bytes = encode(&hello().into());
        bytes[HELLO_LIMITS + 4] = 4; // wait mode
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::UnknownValue {
                what: "wait mode",
                value: 4
            })
        );

        let mut bytes = encode(&welcome().into());
        let last = bytes.len() - 1;
        bytes[last] = 0; // last fd role
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::UnknownValue {
                what: "fd role",
                value: 0
            })
        );

        let mut bytes = encode(&Refuse::new(RefuseReason::Busy, "").into());
        bytes[HEADER_LEN] = 8;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::UnknownValue {
                what: "refuse reason",
                value: 8
            })
        );

        let refuse = Refuse::new(
            RefuseReason::LimitsRefused {
                field: LimitField::RingDepth,
                requested: 0,
                limit: 0,
            },
            "",
        );
        let mut bytes = encode(&refuse.into());
        bytes[HEADER_LEN + 1] = 0;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::UnknownValue {
                what: "limit field",
                value: 0
            })
        );
    }

    #[test]
    fn too_many_classes() {
        let mut bytes = encode(&hello().into());
        bytes[HELLO_LIMITS + 5] = MAX_POOL_CLASSES as u8 + 1;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TooManyClasses {
                count: MAX_POOL_CLASSES + 1,
                max: MAX_POOL_CLASSES
            })
        );
    }

    #[test]
    fn classes_not_increasing() {
        let mut bytes = encode(&hello().into());
        // The second class's slab size (the default has four classes).
        let second = HELLO_LIMITS + 22 + 12;
        bytes[second..second + 8].copy_from_slice(&256u64.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::ClassesNotIncreasing {
                index: 1,
                slab_size: 256,
                previous: 256
            })
        );
    }

    #[test]
    fn too_many_fds() {
        let mut bytes = encode(&welcome().into());
        let count_at = bytes.len() - 4;
        assert_eq!(bytes[count_at], 3);
        bytes[count_at] = MAX_WELCOME_FDS as u8 + 1;
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TooManyFds {
                count: MAX_WELCOME_FDS + 1,
                max: MAX_WELCOME_FDS
            })
        );
    }

    #[test]
    fn refuse_message_too_long() {
        let mut bytes = encode(&Refuse::new(RefuseReason::Busy, "").into());
        let len_at = HEADER_LEN + 1;
        bytes[len_at..len_at + 2].copy_from_slice(&(MAX_REFUSE_MESSAGE as u16 + 1).to_le_bytes());
        bytes.extend(std::iter::repeat_n(b'x', MAX_REFUSE_MESSAGE + 1));
        let body_len = (bytes.len() - HEADER_LEN) as u32;
        bytes[8..12].copy_from_slice(&body_len.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(HandshakeError::TooLong {
                what: "refuse message",
                len: MAX_REFUSE_MESSAGE + 1,
                max: MAX_REFUSE_MESSAGE
            })
        );
    }

    // --- bounded values -----------------------------------------------------

    #[test]
    fn service_name_bounds() {
        assert_eq!(ServiceName::new(""), Err(ServiceNameError::Empty));
        assert!(ServiceName::new("s".repeat(MAX_SERVICE_LEN)).is_ok());
        assert_eq!(
            ServiceName::new("s".repeat(MAX_SERVICE_LEN + 1)),
            Err(ServiceNameError::TooLong {
                len: MAX_SERVICE_LEN + 1,
                max: MAX_SERVICE_LEN
            })
        );
        assert_eq!("echo".parse::<ServiceName>().unwrap().as_str(), "echo");
    }

    #[test]
    fn pool_classes_bounds() {
        let many: Vec<_> = (0..=MAX_POOL_CLASSES as u64)
            .map(|i| PoolClass {
                slab_size: 64 << i,
                count: 1,
            })
            .collect();
        assert_eq!(
            PoolClasses::new(many.clone()),
            Err(PoolClassesError::TooMany {
                count: MAX_POOL_CLASSES + 1,
                max: MAX_POOL_CLASSES
            })
        );
        assert!(PoolClasses::new(many[..MAX_POOL_CLASSES].to_vec()).is_ok());
        assert_eq!(
            PoolClasses::new(vec![
                PoolClass {
                    slab_size: 128,
                    count: 1
                },
                PoolClass {
                    slab_size: 64,
                    count: 1
                },
            ]),
            Err(PoolClassesError::NotIncreasing {
                index: 1,
                slab_size: 64,
                previous: 128
            })
        );
    }

    #[test]
    fn fd_roles_bounds() {
        assert!(FdRoles::new(vec![FdRole::Segment; MAX_WELCOME_FDS]).is_ok());
        assert_eq!(
            FdRoles::new(vec![FdRole::Segment; MAX_WELCOME_FDS + 1]),
            Err(TooManyFds {
                count: MAX_WELCOME_FDS + 1,
                max: MAX_WELCOME_FDS
            })
        );
    }

    #[test]
    fn refuse_message_is_cut_at_a_char_boundary() {
        let r = Refuse::new(RefuseReason::Busy, "é".repeat(MAX_REFUSE_MESSAGE));
        assert_eq!(r.message().len(), MAX_REFUSE_MESSAGE);
        let r = Refuse::new(RefuseReason::Busy, format!("x{}", "é".repeat(600)));
        assert_eq!(r.message().len(), MAX_REFUSE_MESSAGE - 1);
        assert_eq!(decode(&encode(&r.clone().into())), Ok(Msg::Refuse(r)));
    }

    #[test]
    fn schema_hash_is_hex() {
        let mut bytes = [0; 32];
        bytes[0] = 0xde;
        bytes[31] = 0x0f;
        let s = SchemaHash(bytes).to_string();
        assert_eq!(s.len(), 64);
        assert!(s.starts_with("de00") && s.ends_with("000f"), "{s}");
    }

    // --- negotiation --------------------------------------------------------

    #[test]
    fn equal_request_and_policy_is_granted_as_asked() {
        assert_eq!(negotiate(&hello(), &policy()), Ok(Limits::default()));
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut h = hello();
        h.protocol_version = 7;
        let refuse = negotiate(&h, &policy()).unwrap_err();
        assert_eq!(
            refuse.reason(),
            &RefuseReason::VersionMismatch {
                client: 7,
                server: PROTOCOL_VERSION
            }
        );
        let text = refuse.to_string();
        assert!(
            text.contains("version 7") && text.contains(&format!("version {PROTOCOL_VERSION}")),
            "{text}"
        );
    }

    #[test]
    fn unknown_service_names_both_services() {
        let mut h = hello();
        h.service = name("greeter");
        let refuse = negotiate(&h, &policy()).unwrap_err();
        assert_eq!(
            refuse.reason(),
            &RefuseReason::UnknownService {
                requested: name("greeter"),
                offered: name("echo")
            }
        );
        let text = refuse.to_string();
        assert!(
            text.contains("\"greeter\"") && text.contains("\"echo\""),
            "{text}"
        );
    }

    #[test]
    fn schema_mismatch_names_both_hashes() {
        let mut h = hello();
        h.schema_hash = SchemaHash([0x11; 32]);
        let refuse = negotiate(&h, &policy()).unwrap_err();
        assert_eq!(
            refuse.reason(),
            &RefuseReason::SchemaMismatch {
                client: SchemaHash([0x11; 32]),
                server: SchemaHash([0xab; 32])
            }
        );
        let text = refuse.to_string();
        assert!(
            text.contains(&"11".repeat(32)) && text.contains(&"ab".repeat(32)),
            "{text}"
        );
    }

    #[test]
    fn refusals_come_in_order() {
        // Everything wrong: the version is reported first …
        let mut h = hello();
        h.protocol_version = 9;
        h.service = name("other");
        h.schema_hash = SchemaHash([0; 32]);
        h.requested.ring_depth = 0;
        let mut p = policy();
        p.busy = true;
        let reason = |h: &Hello| negotiate(h, &p).unwrap_err().reason().clone();
        assert!(matches!(reason(&h), RefuseReason::VersionMismatch { .. }));
        // … then the service, the schema, the limits, and busy last.
        h.protocol_version = PROTOCOL_VERSION;
        assert!(matches!(reason(&h), RefuseReason::UnknownService { .. }));
        h.service = name("echo");
        assert!(matches!(reason(&h), RefuseReason::SchemaMismatch { .. }));
        h.schema_hash = SchemaHash([0xab; 32]);
        assert!(matches!(reason(&h), RefuseReason::LimitsRefused { .. }));
        h.requested.ring_depth = 64;
        assert_eq!(reason(&h), RefuseReason::Busy);
    }

    #[test]
    fn busy() {
        let mut p = policy();
        p.busy = true;
        let refuse = negotiate(&hello(), &p).unwrap_err();
        assert_eq!(refuse.reason(), &RefuseReason::Busy);
    }

    #[test]
    fn ring_depth_is_capped_and_rounded_down() {
        let mut h = hello();
        let mut p = policy();
        p.max.ring_depth = 1024;
        for (req, granted) in [(4096, 1024), (1024, 1024), (1000, 512), (2, 2), (3, 2)] {
            h.requested.ring_depth = req;
            assert_eq!(negotiate(&h, &p).unwrap().ring_depth, granted, "{req}");
        }
    }

    #[test]
    fn ring_depth_refused() {
        let mut h = hello();
        for depth in [0, 1] {
            h.requested.ring_depth = depth;
            assert_eq!(
                negotiate(&h, &policy()).unwrap_err().reason(),
                &RefuseReason::LimitsRefused {
                    field: LimitField::RingDepth,
                    requested: depth.into(),
                    limit: 256
                }
            );
        }
    }

    #[test]
    fn pool_classes_are_capped_per_size() {
        let mut h = hello();
        h.requested.pool_classes = classes(&[(128, 10), (256, 5000), (4096, 3), (1 << 30, 1)]);
        let granted = negotiate(&h, &policy()).unwrap();
        // 128 B and 1 GiB are not offered; 256 B is capped at 1024.
        assert_eq!(granted.pool_classes, classes(&[(256, 1024), (4096, 3)]));
    }

    #[test]
    fn pool_classes_refused_when_none_left() {
        let mut h = hello();
        h.requested.pool_classes = classes(&[(128, 10), (512, 1)]);
        let refuse = negotiate(&h, &policy()).unwrap_err();
        assert_eq!(
            refuse.reason(),
            &RefuseReason::LimitsRefused {
                field: LimitField::PoolClasses,
                requested: 2,
                limit: 0
            }
        );
        assert!(refuse.message().contains("[128, 512]"), "{refuse}");
        assert!(
            refuse.message().contains("[256, 4096, 65536, 1048576]"),
            "{refuse}"
        );

        h.requested.pool_classes = classes(&[(256, 0)]);
        assert!(negotiate(&h, &policy()).is_err());
        h.requested.pool_classes = PoolClasses::default();
        assert!(negotiate(&h, &policy()).is_err());
    }

    #[test]
    fn max_message_refused_when_zero() {
        let mut h = hello();
        h.requested.max_message = 0;
        assert_eq!(
            negotiate(&h, &policy()).unwrap_err().reason(),
            &RefuseReason::LimitsRefused {
                field: LimitField::MaxMessage,
                requested: 0,
                limit: 64 << 20
            }
        );
        h.requested.max_message = 1 << 30;
        assert_eq!(negotiate(&h, &policy()).unwrap().max_message, 64 << 20);
    }

    #[test]
    fn wait_mode_takes_the_cheaper() {
        use WaitMode::*;
        let mut h = hello();
        let mut p = policy();
        for (req, max, granted) in [
            (Poll, Poll, Poll),
            (Poll, Adaptive, Adaptive),
            (Poll, Block, Block),
            (Adaptive, Poll, Adaptive),
            (Block, Poll, Block),
            (Adaptive, Block, Block),
            (Poll, Yield, Yield),
            (Adaptive, Yield, Yield),
            (Yield, Adaptive, Yield),
            (Yield, Block, Block),
        ] {
            h.requested.wait_mode = req;
            p.max.wait_mode = max;
            assert_eq!(negotiate(&h, &p).unwrap().wait_mode, granted);
        }
    }

    #[test]
    fn spin_is_the_minimum() {
        let mut h = hello();
        h.requested.spin_ns = 1_000_000;
        assert_eq!(negotiate(&h, &policy()).unwrap().spin_ns, 50_000);
        h.requested.spin_ns = 10;
        assert_eq!(negotiate(&h, &policy()).unwrap().spin_ns, 10);
    }

    #[test]
    fn negotiated_grants_pass_check_grant() {
        let mut h = hello();
        h.requested.ring_depth = 1000;
        h.requested.wait_mode = WaitMode::Poll;
        h.requested.pool_classes = classes(&[(256, 5000), (512, 1), (4096, 3)]);
        let granted = negotiate(&h, &policy()).unwrap();
        assert_eq!(check_grant(&h.requested, &granted), Ok(()));
    }

    #[test]
    fn check_grant_catches_each_excess() {
        let req = Limits::default();
        type Change = fn(&mut Limits);
        let cases: [(&str, Change); 6] = [
            ("ring depth", |l| l.ring_depth *= 2),
            ("wait mode", |l| l.wait_mode = WaitMode::Poll),
            ("spin time", |l| l.spin_ns += 1),
            ("max message", |l| l.max_message += 1),
            ("pool class count", |l| {
                l.pool_classes = classes(&[(256, 1025)]);
            }),
            ("pool class slab size", |l| {
                l.pool_classes = classes(&[(128, 1)]);
            }),
        ];
        for (field, change) in cases {
            let mut granted = req.clone();
            change(&mut granted);
            assert_eq!(check_grant(&req, &granted).unwrap_err().field, field);
        }
        let mut less = req.clone();
        less.wait_mode = WaitMode::Block;
        less.pool_classes = classes(&[(4096, 1)]);
        assert_eq!(check_grant(&req, &less), Ok(()));
    }
}
