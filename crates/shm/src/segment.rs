//! Segments: sealed, anonymous shared memory with a validated table of
//! contents.
//!
//! A segment is a `memfd` sized once and sealed against shrinking, growing
//! and further sealing, then mapped shared. It has no name in any file
//! system and vanishes when the last process that holds its fd or mapping
//! goes away, so nothing outlives a `kill -9`. The creator passes the fd to a
//! peer (over a Unix socket with `SCM_RIGHTS`); the peer maps it with
//! [`Segment::open`].
//!
//! The first page holds a header: magic, layout version, the segment's
//! number, its length, and a table of regions (rings, doorbells, pool size
//! classes), each with a kind, a tag chosen by the layer above, an offset, a
//! length and two parameters. [`Segment::open`] reads the header once, word
//! by word, into private memory and checks all of it before anything is
//! used; the segment's real length always comes from `fstat`, never from the
//! peer. The seals are checked too: without `F_SEAL_SHRINK` the creator could
//! truncate the file under us and turn our next access into `SIGBUS`.
//!
//! # Example
//!
//! ```
//! use shmesh_shm::descriptor::Descriptor;
//! use shmesh_shm::pool::PoolConfig;
//! use shmesh_shm::segment::{Segment, SegmentBuilder};
//!
//! // The owner lays out and creates the segment …
//! let mut builder = SegmentBuilder::new(7);
//! builder.ring::<Descriptor>(0, 64).doorbell(0).pool(0, &PoolConfig::default());
//! let seg = builder.create("example").unwrap();
//!
//! // … and the peer maps it from the fd (here: a duplicate in-process).
//! let peer = Segment::open(seg.fd().try_clone_to_owned().unwrap()).unwrap();
//!
//! let mut tx = seg.ring_producer::<Descriptor>(0).unwrap();
//! let mut rx = peer.ring_consumer::<Descriptor>(0).unwrap();
//! let pool = seg.pool(0).unwrap();
//! let view = peer.pool_view(0).unwrap();
//!
//! let mut slab = pool.alloc(2).unwrap();
//! slab[..2].copy_from_slice(b"hi");
//! let payload = slab.send();
//! tx.try_push(Descriptor { payload, len: 2, flags: shmesh_shm::descriptor::Flags::PAYLOAD,
//!                          ..Default::default() }).unwrap();
//! let d = rx.try_pop().unwrap().unwrap();
//! assert_eq!(view.read(d.payload, d.len.into()).unwrap(), b"hi");
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use rustix::fs::{
    MemfdFlags, SealFlags, fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create,
};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};
use thiserror::Error;

use crate::doorbell::{self, Doorbell, DoorbellWords, EventDoorbell};
use crate::pool::{self, ClassLayout, Pool, PoolConfig, PoolConfigError, PoolLayout, PoolView};
use crate::ring::{self, Consumer, Entry, Producer, RingConfigError, RingIndices};

/// "SHMESHSG" in little-endian: the first word of every segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMESHSG");
/// The layout version this build reads and writes.
pub const LAYOUT_VERSION: u32 = 1;
/// Most regions in one segment.
pub const MAX_REGIONS: usize = 32;
/// Bytes reserved for the header; regions start at or after this offset.
pub const HEADER_LEN: u64 = 4096;
/// Largest segment this build opens: bounds what a peer can make us map.
pub const MAX_SEGMENT_LEN: u64 = 16 << 30;

/// Bytes a word region takes: a cache-line pair, so nothing shares its line.
const WORD_REGION_LEN: u64 = 128;

/// Words of the fixed part of the header.
const FIXED_WORDS: usize = 4;
/// Words per region entry.
const ENTRY_WORDS: usize = 5;
/// Words of the header that are read and validated (see [`parse_header`]).
pub const HEADER_WORDS: usize = FIXED_WORDS + MAX_REGIONS * ENTRY_WORDS;

/// The seals every segment must carry.
fn required_seals() -> SealFlags {
    SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
}

/// What a region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// A descriptor ring: indices, then slots.
    Ring,
    /// A doorbell's words.
    Doorbell,
    /// One size class of a payload pool.
    PoolClass,
    /// A single 64-bit word on its own cache-line pair (flags, counters, the
    /// benchmark floor).
    Word,
}

impl RegionKind {
    fn code(self) -> u32 {
        match self {
            RegionKind::Ring => 1,
            RegionKind::Doorbell => 2,
            RegionKind::PoolClass => 3,
            RegionKind::Word => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(RegionKind::Ring),
            2 => Some(RegionKind::Doorbell),
            3 => Some(RegionKind::PoolClass),
            4 => Some(RegionKind::Word),
            _ => None,
        }
    }

    fn alignment(self) -> u64 {
        match self {
            RegionKind::Ring => 128,
            RegionKind::Doorbell => 64,
            RegionKind::PoolClass => 4096,
            RegionKind::Word => 128,
        }
    }
}

/// One entry of a segment's table of contents, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What it holds.
    pub kind: RegionKind,
    /// The layer above's name for it (for example "request ring" = 0).
    pub tag: u32,
    /// Offset from the start of the segment.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Ring: words per entry. Pool class: slab size.
    pub param_a: u64,
    /// Ring: capacity. Pool class: slab count.
    pub param_b: u64,
}

impl Region {
    /// The length a region of this kind and these parameters must have.
    fn expected_len(&self) -> u64 {
        match self.kind {
            RegionKind::Ring => {
                ring::region_len(self.param_a as usize, self.param_b as usize) as u64
            }
            RegionKind::Doorbell => doorbell::REGION_LEN as u64,
            RegionKind::PoolClass => self.param_a * self.param_b,
            RegionKind::Word => WORD_REGION_LEN,
        }
    }
}

/// A segment's header that does not describe a usable segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Not a shmesh segment.
    #[error("bad magic {found:#018x}: not a shmesh segment")]
    BadMagic {
        /// The first word found.
        found: u64,
    },
    /// Made by an incompatible version.
    #[error("segment layout version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The header's length disagrees with the file's.
    #[error("header says the segment is {header} bytes but it is {actual}")]
    LengthMismatch {
        /// The length in the header.
        header: u64,
        /// The length `fstat` reports.
        actual: u64,
    },
    /// A word or field the format reserves is not zero.
    #[error("header word {index} has reserved bits set: {value:#x}")]
    ReservedNotZero {
        /// Index of the header word.
        index: usize,
        /// Its value.
        value: u64,
    },
    /// A region whose kind takes no parameters has some.
    #[error("region {index} ({kind:?}) takes no parameters, has {param_a} and {param_b}")]
    UnexpectedParams {
        /// Index in the table.
        index: usize,
        /// Its kind.
        kind: RegionKind,
        /// First parameter.
        param_a: u64,
        /// Second parameter.
        param_b: u64,
    },
    /// More regions than the table holds.
    #[error("{count} regions, at most {max}")]
    TooManyRegions {
        /// The count in the header.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A region of a kind this build does not know.
    #[error("region {index} has unknown kind {code}")]
    UnknownKind {
        /// Index in the table.
        index: usize,
        /// The kind code.
        code: u32,
    },
    /// A region outside the segment or inside the header.
    #[error("region {index} ({offset}+{len}) lies outside [{HEADER_LEN}, {segment_len})")]
    OutOfBounds {
        /// Index in the table.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The segment's length.
        segment_len: u64,
    },
    /// A region not aligned for its kind.
    #[error("region {index} at offset {offset} is not aligned to {align}")]
    Misaligned {
        /// Index in the table.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Required alignment.
        align: u64,
    },
    /// A region's length disagrees with its parameters.
    #[error("region {index} is {found} bytes, its parameters need {expected}")]
    SizeMismatch {
        /// Index in the table.
        index: usize,
        /// Length implied by the parameters.
        expected: u64,
        /// Length in the table.
        found: u64,
    },
    /// Two regions overlap.
    #[error("regions {first} and {second} overlap")]
    Overlap {
        /// One region's index.
        first: usize,
        /// The other's.
        second: usize,
    },
    /// Two rings or doorbells share a tag.
    #[error("two {kind:?} regions share tag {tag}")]
    DuplicateTag {
        /// Their kind.
        kind: RegionKind,
        /// The tag.
        tag: u32,
    },
    /// A ring with impossible parameters.
    #[error("region {index}: {source}")]
    BadRing {
        /// Index in the table.
        index: usize,
        /// What is wrong.
        #[source]
        source: RingConfigError,
    },
    /// A pool class with impossible parameters, or classes out of order.
    #[error("region {index}: {source}")]
    BadPoolClass {
        /// Index in the table.
        index: usize,
        /// What is wrong.
        #[source]
        source: PoolConfigError,
    },
}

/// Creating a segment failed.
#[derive(Debug, Error)]
pub enum CreateError {
    /// The layout asked for is invalid.
    #[error("invalid segment layout: {0}")]
    Layout(#[from] HeaderError),
    /// A ring asked for is invalid.
    #[error("invalid ring: {0}")]
    Ring(#[from] RingConfigError),
    /// The system refused a step of creation.
    #[error("cannot {step} shared memory segment: {source}")]
    System {
        /// What was being done.
        step: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Opening a segment received from a peer failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The system refused a step of opening.
    #[error("cannot {step} shared memory segment: {source}")]
    System {
        /// What was being done.
        step: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not sealed, so its creator could still resize it.
    #[error("segment is missing seals {missing:?}: its creator could resize it under us")]
    MissingSeals {
        /// The required seals not present.
        missing: SealFlags,
    },
    /// The file is too small or too large to be a segment.
    #[error("segment of {len} bytes is outside [{min}, {max}]")]
    BadLength {
        /// Its length.
        len: u64,
        /// Smallest possible.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The header is invalid.
    #[error("invalid segment header: {0}")]
    Header(#[from] HeaderError),
}

/// Looking up a region of an open segment failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    /// No region of that kind and tag.
    #[error("segment has no {kind:?} region with tag {tag}")]
    NotFound {
        /// Kind asked for.
        kind: RegionKind,
        /// Tag asked for.
        tag: u32,
    },
    /// The ring holds entries of another size than the type asked for.
    #[error("ring {tag} holds {found}-word entries, the type asked for has {expected}")]
    EntrySize {
        /// The ring's tag.
        tag: u32,
        /// Words of the type asked for.
        expected: u64,
        /// Words per entry in the ring.
        found: u64,
    },
}

/// Lays out a segment's regions, then creates it.
#[derive(Debug, Clone)]
pub struct SegmentBuilder {
    id: u32,
    regions: Vec<Region>,
    next: u64,
    error: Option<RingConfigError>,
}

impl SegmentBuilder {
    /// Starts an empty layout for segment number `id` (the number written in
    /// every slab handle of its pools).
    pub fn new(id: u32) -> Self {
        SegmentBuilder {
            id,
            regions: Vec::new(),
            next: HEADER_LEN,
            error: None,
        }
    }

    fn push(&mut self, kind: RegionKind, tag: u32, param_a: u64, param_b: u64) {
        let align = kind.alignment();
        let offset = self.next.div_ceil(align) * align;
        let mut region = Region {
            kind,
            tag,
            offset,
            len: 0,
            param_a,
            param_b,
        };
        region.len = region.expected_len();
        self.next = offset + region.len;
        self.regions.push(region);
    }

    /// Adds a ring of `capacity` entries of type `E` under `tag`.
    pub fn ring<E: Entry>(&mut self, tag: u32, capacity: usize) -> &mut Self {
        if let Err(e) = ring::check_config(E::WORDS, capacity as u64) {
            self.error.get_or_insert(e);
            return self;
        }
        self.push(RegionKind::Ring, tag, E::WORDS as u64, capacity as u64);
        self
    }

    /// Adds a doorbell under `tag`.
    pub fn doorbell(&mut self, tag: u32) -> &mut Self {
        self.push(RegionKind::Doorbell, tag, 0, 0);
        self
    }

    /// Adds a shared 64-bit word under `tag`, on its own cache-line pair.
    pub fn word(&mut self, tag: u32) -> &mut Self {
        self.push(RegionKind::Word, tag, 0, 0);
        self
    }

    /// Adds a payload pool's size classes under `tag`.
    pub fn pool(&mut self, tag: u32, config: &PoolConfig) -> &mut Self {
        for c in config.classes() {
            self.push(RegionKind::PoolClass, tag, c.slab_size, c.count);
        }
        self
    }

    /// Total bytes the segment will take.
    pub fn len(&self) -> u64 {
        self.next.div_ceil(4096) * 4096
    }

    /// Whether no region was added.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Creates, sizes, seals and maps the segment and writes its header.
    /// `name` shows in `/proc/PID/fd` and `/proc/PID/maps` as `memfd:shmesh:NAME`.
    pub fn create(&self, name: &str) -> Result<Arc<Segment>, CreateError> {
        if let Some(e) = &self.error {
            return Err(CreateError::Ring(e.clone()));
        }
        let len = self.len();
        // Checking our own layout with the reader's rules keeps the two in step.
        let header = self.header_words(len);
        parse_header(&header, len)?;

        let sys = |step| {
            move |e: rustix::io::Errno| CreateError::System {
                step,
                source: e.into(),
            }
        };
        let fd = memfd_create(
            format!("shmesh:{name}"),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(sys("create"))?;
        ftruncate(&fd, len).map_err(sys("size"))?;
        fcntl_add_seals(&fd, required_seals()).map_err(sys("seal"))?;
        let map = Mapping::new(&fd, len as usize).map_err(sys("map"))?;
        for (i, word) in header.iter().enumerate() {
            // Relaxed: the segment reaches a peer only through an fd sent
            // over a socket after this, which orders these stores.
            map.word(i).store(*word, StdOrdering::Relaxed);
        }
        Ok(Arc::new(Segment {
            fd,
            map,
            id: self.id,
            regions: self.regions.clone(),
        }))
    }

    fn header_words(&self, len: u64) -> [u64; HEADER_WORDS] {
        let mut w = [0u64; HEADER_WORDS];
        w[0] = MAGIC;
        w[1] = u64::from(LAYOUT_VERSION) | ((self.regions.len() as u64) << 32);
        w[2] = len;
        w[3] = u64::from(self.id);
        for (i, r) in self.regions.iter().enumerate().take(MAX_REGIONS) {
            let e = &mut w[FIXED_WORDS + i * ENTRY_WORDS..][..ENTRY_WORDS];
            e[0] = u64::from(r.kind.code()) | (u64::from(r.tag) << 32);
            e[1] = r.offset;
            e[2] = r.len;
            e[3] = r.param_a;
            e[4] = r.param_b;
        }
        w
    }
}

/// Parses and checks a header read from a segment of `actual_len` bytes.
/// Returns the segment's number and its regions.
///
/// Pure: this is what the fuzzer drives.
pub fn parse_header(
    words: &[u64; HEADER_WORDS],
    actual_len: u64,
) -> Result<(u32, Vec<Region>), HeaderError> {
    if words[0] != MAGIC {
        return Err(HeaderError::BadMagic { found: words[0] });
    }
    // Truncations below are the encoding: two 32-bit fields per word.
    let version = words[1] as u32;
    if version != LAYOUT_VERSION {
        return Err(HeaderError::UnsupportedVersion {
            found: version,
            supported: LAYOUT_VERSION,
        });
    }
    let count = words[1] >> 32;
    if count > MAX_REGIONS as u64 {
        return Err(HeaderError::TooManyRegions {
            count,
            max: MAX_REGIONS,
        });
    }
    if words[2] != actual_len {
        return Err(HeaderError::LengthMismatch {
            header: words[2],
            actual: actual_len,
        });
    }
    if words[3] >> 32 != 0 {
        return Err(HeaderError::ReservedNotZero {
            index: 3,
            value: words[3],
        });
    }
    let id = words[3] as u32;
    let mut regions = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        let e = &words[FIXED_WORDS + index * ENTRY_WORDS..][..ENTRY_WORDS];
        let code = e[0] as u32;
        let kind = RegionKind::from_code(code).ok_or(HeaderError::UnknownKind { index, code })?;
        let region = Region {
            kind,
            tag: (e[0] >> 32) as u32,
            offset: e[1],
            len: e[2],
            param_a: e[3],
            param_b: e[4],
        };
        let end = region.offset.checked_add(region.len);
        if region.offset < HEADER_LEN || end.is_none_or(|end| end > actual_len) {
            return Err(HeaderError::OutOfBounds {
                index,
                offset: region.offset,
                len: region.len,
                segment_len: actual_len,
            });
        }
        if !region.offset.is_multiple_of(kind.alignment()) {
            return Err(HeaderError::Misaligned {
                index,
                offset: region.offset,
                align: kind.alignment(),
            });
        }
        // Parameters first: they bound the arithmetic of `expected_len`.
        match kind {
            RegionKind::Ring => ring::check_config(region.param_a as usize, region.param_b)
                .map_err(|source| HeaderError::BadRing { index, source })?,
            RegionKind::PoolClass => pool::check_class(region.param_a, region.param_b)
                .map_err(|source| HeaderError::BadPoolClass { index, source })?,
            RegionKind::Doorbell | RegionKind::Word => {
                if region.param_a != 0 || region.param_b != 0 {
                    return Err(HeaderError::UnexpectedParams {
                        index,
                        kind,
                        param_a: region.param_a,
                        param_b: region.param_b,
                    });
                }
            }
        }
        let expected = region.expected_len();
        if expected != region.len {
            return Err(HeaderError::SizeMismatch {
                index,
                expected,
                found: region.len,
            });
        }
        regions.push(region);
    }
    check_overlaps_and_tags(&regions)?;
    Ok((id, regions))
}

fn check_overlaps_and_tags(regions: &[Region]) -> Result<(), HeaderError> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].offset);
    for pair in order.windows(2) {
        let (a, b) = (&regions[pair[0]], &regions[pair[1]]);
        if a.offset + a.len > b.offset {
            return Err(HeaderError::Overlap {
                first: pair[0],
                second: pair[1],
            });
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            if a.kind != b.kind || a.tag != b.tag {
                continue;
            }
            if a.kind != RegionKind::PoolClass {
                return Err(HeaderError::DuplicateTag {
                    kind: a.kind,
                    tag: a.tag,
                });
            }
            // Classes of one pool must be in strictly increasing slab size.
            if b.param_a <= a.param_a {
                return Err(HeaderError::BadPoolClass {
                    index: j,
                    source: PoolConfigError::Unordered {
                        prev: a.param_a,
                        next: b.param_a,
                    },
                });
            }
        }
    }
    Ok(())
}

/// A shared mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: &OwnedFd, len: usize) -> rustix::io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes of `fd` at an address
        // the kernel picks; it aliases no Rust object. The file is sealed
        // against shrinking, so every page stays backed while mapped.
        // MAP_POPULATE faults every page in now, so no call on the fast path
        // pays for a first touch.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                0,
            )?
        };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(rustix::io::Errno::NOMEM)?;
        Ok(Mapping { ptr, len })
    }

    /// The `i`th 64-bit word of the mapping, as an atomic.
    fn word(&self, i: usize) -> &StdAtomicU64 {
        assert!((i + 1) * 8 <= self.len, "header word out of the mapping");
        // SAFETY: in bounds (checked above) and 8-byte aligned (the mapping is
        // page aligned); `AtomicU64` has the layout of `u64`, every bit
        // pattern is valid, and shared memory is only accessed atomically.
        unsafe { &*self.ptr.as_ptr().add(i * 8).cast::<StdAtomicU64>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every
        // pointer into the mapping is held by something that keeps the owning
        // `Segment` (and so this `Mapping`) alive.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A mapped segment: its fd (to pass to a peer) and its validated regions.
///
/// Everything built from a segment (ring ends, doorbells, pools) holds an
/// `Arc<Segment>`, so the mapping lives as long as any of them.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    map: Mapping,
    id: u32,
    regions: Vec<Region>,
}

// SAFETY: the mapping's memory is only accessed through atomics or through
// the pool's ownership discipline; the pointer is valid from any thread.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// Maps a segment received from a peer, after checking its seals, its
    /// length and its header.
    pub fn open(fd: OwnedFd) -> Result<Arc<Segment>, OpenError> {
        let sys = |step| {
            move |e: rustix::io::Errno| OpenError::System {
                step,
                source: e.into(),
            }
        };
        let seals = fcntl_get_seals(&fd).map_err(sys("read seals of"))?;
        let missing = required_seals() - seals;
        if !missing.is_empty() {
            return Err(OpenError::MissingSeals { missing });
        }
        let len = fstat(&fd).map_err(sys("stat"))?.st_size;
        let len = u64::try_from(len).unwrap_or(0);
        if !(HEADER_LEN..=MAX_SEGMENT_LEN).contains(&len) {
            return Err(OpenError::BadLength {
                len,
                min: HEADER_LEN,
                max: MAX_SEGMENT_LEN,
            });
        }
        let map = Mapping::new(&fd, len as usize).map_err(sys("map"))?;
        let mut words = [0u64; HEADER_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            // Relaxed: one private copy of each word; the creator wrote the
            // header before sending the fd.
            *w = map.word(i).load(StdOrdering::Relaxed);
        }
        let (id, regions) = parse_header(&words, len)?;
        Ok(Arc::new(Segment {
            fd,
            map,
            id,
            regions,
        }))
    }

    /// The fd to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The segment's number (written in every slab handle of its pools).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len as u64
    }

    /// Whether the segment has no bytes (never true for a valid segment).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The validated table of contents.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    fn find(&self, kind: RegionKind, tag: u32) -> Result<Region, RegionError> {
        self.regions
            .iter()
            .find(|r| r.kind == kind && r.tag == tag)
            .copied()
            .ok_or(RegionError::NotFound { kind, tag })
    }

    fn at(&self, offset: u64) -> NonNull<u8> {
        // SAFETY: callers pass offsets of validated regions, which lie inside
        // the mapping.
        unsafe { self.map.ptr.add(offset as usize) }
    }

    fn ring_parts<E: Entry>(
        &self,
        tag: u32,
    ) -> Result<(NonNull<RingIndices>, NonNull<crate::sync::AtomicU64>, u64), RegionError> {
        let r = self.find(RegionKind::Ring, tag)?;
        if r.param_a != E::WORDS as u64 {
            return Err(RegionError::EntrySize {
                tag,
                expected: E::WORDS as u64,
                found: r.param_a,
            });
        }
        let indices = self.at(r.offset).cast::<RingIndices>();
        let slots = self
            .at(r.offset + std::mem::size_of::<RingIndices>() as u64)
            .cast::<crate::sync::AtomicU64>();
        Ok((indices, slots, r.param_b))
    }

    /// The producer end of ring `tag`. Take it in one process only.
    pub fn ring_producer<E: Entry>(self: &Arc<Self>, tag: u32) -> Result<Producer<E>, RegionError> {
        let (indices, slots, capacity) = self.ring_parts::<E>(tag)?;
        // SAFETY: the region was validated: in bounds, 128-byte aligned, sized
        // for the indices and `capacity * E::WORDS` words, capacity checked;
        // the segment (kept alive by the Arc) is only accessed atomically.
        Ok(unsafe { Producer::from_raw(indices, slots, capacity, self.clone()) })
    }

    /// The consumer end of ring `tag`. Take it in one process only.
    pub fn ring_consumer<E: Entry>(self: &Arc<Self>, tag: u32) -> Result<Consumer<E>, RegionError> {
        let (indices, slots, capacity) = self.ring_parts::<E>(tag)?;
        // SAFETY: as in `ring_producer`.
        Ok(unsafe { Consumer::from_raw(indices, slots, capacity, self.clone()) })
    }

    /// The futex doorbell `tag`.
    pub fn doorbell(self: &Arc<Self>, tag: u32) -> Result<Doorbell, RegionError> {
        let r = self.find(RegionKind::Doorbell, tag)?;
        // SAFETY: a validated 64-byte, 64-aligned region inside the mapping,
        // kept alive by the Arc and only accessed atomically.
        Ok(unsafe { Doorbell::from_raw(self.at(r.offset).cast::<DoorbellWords>(), self.clone()) })
    }

    /// Doorbell `tag`, parking on the eventfd `fd` (shared with the peer).
    pub fn event_doorbell(
        self: &Arc<Self>,
        tag: u32,
        fd: OwnedFd,
    ) -> Result<EventDoorbell, RegionError> {
        let r = self.find(RegionKind::Doorbell, tag)?;
        // SAFETY: as in `doorbell`.
        Ok(unsafe {
            EventDoorbell::from_raw(self.at(r.offset).cast::<DoorbellWords>(), self.clone(), fd)
        })
    }

    /// The shared word `tag`.
    pub fn word(self: &Arc<Self>, tag: u32) -> Result<SharedWord, RegionError> {
        let r = self.find(RegionKind::Word, tag)?;
        Ok(SharedWord {
            word: self.at(r.offset).cast::<StdAtomicU64>(),
            _owner: self.clone(),
        })
    }

    fn pool_layout(&self, tag: u32) -> Result<PoolLayout, RegionError> {
        let classes: Vec<ClassLayout> = self
            .regions
            .iter()
            .filter(|r| r.kind == RegionKind::PoolClass && r.tag == tag)
            .map(|r| ClassLayout {
                base: r.offset,
                slab_size: r.param_a,
                count: r.param_b,
            })
            .collect();
        if classes.is_empty() {
            return Err(RegionError::NotFound {
                kind: RegionKind::PoolClass,
                tag,
            });
        }
        Ok(PoolLayout {
            segment: self.id,
            classes,
        })
    }

    /// The owner's side of pool `tag`. Take it in one process, once: the
    /// allocator's state is private to the `Pool` value.
    pub fn pool(self: &Arc<Self>, tag: u32) -> Result<Pool, RegionError> {
        let layout = self.pool_layout(tag)?;
        // SAFETY: every class is a validated region inside the mapping, which
        // the Arc keeps alive; offsets are relative to the mapping's start.
        Ok(unsafe { Pool::from_raw(layout, self.map.ptr, self.clone()) })
    }

    /// The peer's read-only view of pool `tag`.
    pub fn pool_view(self: &Arc<Self>, tag: u32) -> Result<PoolView, RegionError> {
        let layout = self.pool_layout(tag)?;
        // SAFETY: as in `pool`.
        Ok(unsafe { PoolView::from_raw(layout, self.map.ptr, self.clone()) })
    }
}

/// A 64-bit word shared with the peer, on its own cache-line pair.
///
/// The plainest possible shared state: the floor that the rings are measured
/// against, and a place for flags such as "closing". The peer can write any
/// value at any time; treat what you load as untrusted.
#[derive(Debug)]
pub struct SharedWord {
    word: NonNull<StdAtomicU64>,
    _owner: Arc<Segment>,
}

// SAFETY: the pointer targets an atomic in a mapping the Arc keeps alive.
unsafe impl Send for SharedWord {}
// SAFETY: only atomic operations are performed through it.
unsafe impl Sync for SharedWord {}

impl SharedWord {
    fn get(&self) -> &StdAtomicU64 {
        // SAFETY: a validated, 128-byte aligned region of the mapping, which
        // `_owner` keeps alive; `AtomicU64` has `u64`'s layout and any bit
        // pattern is valid.
        unsafe { self.word.as_ref() }
    }

    /// Reads the word. Acquire: pairs with the peer's [`SharedWord::store`],
    /// so what it wrote before the store is visible after this load.
    pub fn load(&self) -> u64 {
        self.get().load(StdOrdering::Acquire)
    }

    /// Writes the word. Release: pairs with the peer's [`SharedWord::load`].
    pub fn store(&self, value: u64) {
        self.get().store(value, StdOrdering::Release)
    }

    /// Adds to the word and returns the previous value (AcqRel: both of the
    /// above).
    pub fn fetch_add(&self, value: u64) -> u64 {
        self.get().fetch_add(value, StdOrdering::AcqRel)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::descriptor::Descriptor;
    use crate::handle::SlabHandle;

    fn builder() -> SegmentBuilder {
        let mut b = SegmentBuilder::new(3);
        b.ring::<Descriptor>(0, 8)
            .ring::<SlabHandle>(1, 8)
            .doorbell(0)
            .pool(0, &PoolConfig::default())
            .word(0);
        b
    }

    #[test]
    fn shared_word_is_shared() {
        let seg = builder().create("t").unwrap();
        let peer = reopen(&seg).unwrap();
        seg.word(0).unwrap().store(41);
        assert_eq!(peer.word(0).unwrap().fetch_add(1), 41);
        assert_eq!(seg.word(0).unwrap().load(), 42);
        assert!(seg.word(1).is_err());
    }

    fn valid_words() -> ([u64; HEADER_WORDS], u64) {
        let b = builder();
        let len = b.len();
        (b.header_words(len), len)
    }

    fn reopen(seg: &Segment) -> Result<Arc<Segment>, OpenError> {
        Segment::open(seg.fd().try_clone_to_owned().unwrap())
    }

    #[test]
    fn creates_and_reopens_with_same_regions() {
        let seg = builder().create("t").unwrap();
        let peer = reopen(&seg).unwrap();
        assert_eq!(peer.regions(), seg.regions());
        assert_eq!(peer.id(), 3);
        assert_eq!(peer.len(), seg.len());
    }

    #[test]
    fn shared_ring_and_pool_work_across_mappings() {
        let seg = builder().create("t").unwrap();
        let peer = reopen(&seg).unwrap();
        let mut tx = seg.ring_producer::<SlabHandle>(1).unwrap();
        let mut rx = peer.ring_consumer::<SlabHandle>(1).unwrap();
        let pool = seg.pool(0).unwrap();
        let view = peer.pool_view(0).unwrap();
        let mut slab = pool.alloc(3000).unwrap();
        slab[..4].copy_from_slice(b"abcd");
        let h = slab.send();
        tx.try_push(h).unwrap();
        let got = rx.try_pop().unwrap().unwrap();
        assert_eq!(view.read(got, 4).unwrap(), b"abcd");
        pool.release_returned(got).unwrap();
    }

    #[test]
    fn lookups_report_what_is_missing() {
        let seg = builder().create("t").unwrap();
        assert_eq!(
            seg.ring_producer::<Descriptor>(9).err(),
            Some(RegionError::NotFound {
                kind: RegionKind::Ring,
                tag: 9
            })
        );
        assert_eq!(
            seg.ring_consumer::<SlabHandle>(0).err(),
            Some(RegionError::EntrySize {
                tag: 0,
                expected: 2,
                found: 7
            })
        );
        assert!(seg.pool(5).is_err());
        assert!(seg.doorbell(1).is_err());
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, 8192).unwrap();
        assert!(matches!(
            Segment::open(fd),
            Err(OpenError::MissingSeals { .. })
        ));
    }

    #[test]
    fn tiny_segment_is_refused() {
        let fd = memfd_create("tiny", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        ftruncate(&fd, 100).unwrap();
        fcntl_add_seals(&fd, required_seals()).unwrap();
        assert!(matches!(
            Segment::open(fd),
            Err(OpenError::BadLength { len: 100, .. })
        ));
    }

    #[test]
    fn header_scribbled_after_create_is_refused_on_open() {
        let seg = builder().create("t").unwrap();
        seg.map.word(0).store(0, StdOrdering::Relaxed);
        assert!(matches!(
            reopen(&seg),
            Err(OpenError::Header(HeaderError::BadMagic { found: 0 }))
        ));
    }

    #[test]
    fn every_header_rule() {
        let (good, len) = valid_words();
        assert!(parse_header(&good, len).is_ok());
        let check = |edit: &dyn Fn(&mut [u64; HEADER_WORDS]),
                     want: &dyn Fn(&HeaderError) -> bool| {
            let mut w = good;
            edit(&mut w);
            let err = parse_header(&w, len).unwrap_err();
            assert!(want(&err), "unexpected {err:?}");
        };
        let entry = |i: usize, f: usize| FIXED_WORDS + i * ENTRY_WORDS + f;
        check(&|w| w[1] = 2 | (w[1] & !0xffff_ffff), &|e| {
            matches!(e, HeaderError::UnsupportedVersion { found: 2, .. })
        });
        check(&|w| w[1] = 1 | (33 << 32), &|e| {
            matches!(e, HeaderError::TooManyRegions { count: 33, .. })
        });
        check(&|w| w[2] += 4096, &|e| {
            matches!(e, HeaderError::LengthMismatch { .. })
        });
        check(&|w| w[entry(0, 0)] = 9, &|e| {
            matches!(e, HeaderError::UnknownKind { index: 0, code: 9 })
        });
        check(&|w| w[entry(0, 1)] = 0, &|e| {
            matches!(e, HeaderError::OutOfBounds { index: 0, .. })
        });
        check(&|w| w[entry(0, 1)] = u64::MAX - 10, &|e| {
            matches!(e, HeaderError::OutOfBounds { .. })
        });
        check(&|w| w[entry(0, 1)] += 8, &|e| {
            matches!(e, HeaderError::Misaligned { .. })
        });
        check(&|w| w[entry(0, 4)] = 3, &|e| {
            matches!(e, HeaderError::BadRing { .. })
        });
        check(&|w| w[entry(0, 2)] += 8, &|e| {
            matches!(e, HeaderError::SizeMismatch { .. })
        });
        check(&|w| w[entry(3, 3)] = 100, &|e| {
            matches!(e, HeaderError::BadPoolClass { .. })
        });
        // Point the second ring at the first.
        check(&|w| w[entry(1, 1)] = w[entry(0, 1)], &|e| {
            matches!(e, HeaderError::Overlap { .. })
        });
        // Give the second ring the first's tag and entry size.
        check(
            &|w| {
                w[entry(1, 0)] = w[entry(0, 0)];
                w[entry(1, 3)] = 7;
                w[entry(1, 2)] = ring::region_len(7, 8) as u64;
                w[entry(2, 1)] = w[entry(1, 1)] + 4096 * 4;
            },
            &|e| {
                matches!(
                    e,
                    HeaderError::DuplicateTag { .. } | HeaderError::Overlap { .. }
                )
            },
        );
        // Swap two pool classes' order of sizes.
        check(
            &|w| {
                let (a, b) = (entry(3, 3), entry(4, 3));
                w.swap(a, b);
                let (ca, cb) = (entry(3, 4), entry(4, 4));
                w.swap(ca, cb);
            },
            &|e| {
                matches!(
                    e,
                    HeaderError::SizeMismatch { .. } | HeaderError::BadPoolClass { .. }
                )
            },
        );
    }

    #[test]
    fn builder_rejects_bad_ring() {
        let mut b = SegmentBuilder::new(0);
        b.ring::<Descriptor>(0, 3);
        assert!(matches!(b.create("bad"), Err(CreateError::Ring(_))));
    }

    #[test]
    fn builder_rejects_too_many_regions() {
        let mut b = SegmentBuilder::new(0);
        for tag in 0..40 {
            b.doorbell(tag);
        }
        assert!(matches!(
            b.create("many"),
            Err(CreateError::Layout(HeaderError::TooManyRegions {
                count: 40,
                ..
            }))
        ));
    }
}
