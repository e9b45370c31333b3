//! Fuzzes `segment::parse_header`, which checks the header and region table
//! a peer wrote at the start of a segment before anything in it is used.
//!
//! Input (via `arbitrary`), one of:
//!
//! - raw header words and a segment length, optionally with the magic,
//!   version and length words made right so the region table is reached;
//! - a well-formed header, laid out here the way `SegmentBuilder` does it
//!   (optionally with gaps between regions), then damaged by a few word
//!   mutations.
//!
//! Properties checked:
//!
//! - nothing panics;
//! - an accepted header has every region inside `[HEADER_LEN, len)`, aligned
//!   for its kind, with valid parameters and exactly the length they imply,
//!   no two regions overlapping, no two rings or doorbells sharing a tag, and
//!   the classes of each pool in strictly increasing slab size; the regions
//!   returned are exactly the table's words; every pool it describes resolves
//!   its first and last slab;
//! - a well-formed header that was not damaged is accepted, with exactly the
//!   regions that were written.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::pool::{
    ClassLayout, MAX_SLAB_SIZE, MAX_SLABS_PER_CLASS, MIN_SLAB_SIZE, PoolLayout,
};
use shmesh_shm::ring::{self, MAX_CAPACITY, MAX_ENTRY_WORDS};
use shmesh_shm::segment::{
    HEADER_LEN, HEADER_WORDS, LAYOUT_VERSION, MAGIC, MAX_REGIONS, Region, RegionKind, parse_header,
};

/// Words of the fixed part of the header, and per region entry.
const FIXED_WORDS: usize = 4;
const ENTRY_WORDS: usize = 5;
/// Length of a doorbell region.
const DOORBELL_LEN: u64 = 64;

/// Table code and alignment of the region kinds this target knows in
/// detail. Kinds added later are checked by the rules every region obeys.
fn known(kind: RegionKind) -> Option<(u64, u64)> {
    match kind {
        RegionKind::Ring => Some((1, 128)),
        RegionKind::Doorbell => Some((2, 64)),
        RegionKind::PoolClass => Some((3, 4096)),
        RegionKind::Word => Some((4, 128)),
    }
}

fn code(kind: RegionKind) -> u64 {
    known(kind).expect("built regions are of known kinds").0
}

fn alignment(kind: RegionKind) -> u64 {
    known(kind).expect("built regions are of known kinds").1
}

/// Number of slab sizes: powers of two from `MIN_SLAB_SIZE` to `MAX_SLAB_SIZE`.
const SLAB_SHIFTS: u8 = (MAX_SLAB_SIZE / MIN_SLAB_SIZE).trailing_zeros() as u8 + 1;

#[derive(Debug, Arbitrary)]
enum RegionSpec {
    Ring {
        tag: u32,
        /// Words per entry: `1 + words % MAX_ENTRY_WORDS`.
        words: u8,
        /// Capacity: `2 << (shift % 24)`.
        shift: u8,
    },
    Doorbell {
        tag: u32,
    },
    Pool {
        tag: u32,
        /// (slab size shift, count) per class.
        classes: Vec<(u8, u32)>,
    },
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    Set { word: u8, value: u64 },
    Xor { word: u8, mask: u64 },
    Add { word: u8, delta: i32 },
    Swap { a: u8, b: u8 },
}

#[derive(Debug, Arbitrary)]
enum Input {
    Raw {
        words: Vec<u64>,
        actual_len: u64,
        /// Put the right magic, version and length in the fixed words.
        fix_fixed: bool,
        count: u8,
    },
    Built {
        id: u32,
        regions: Vec<RegionSpec>,
        /// Alignment units of gap before each region, cycled.
        gaps: Vec<u8>,
        /// Pages of slack after the last region.
        slack: u8,
        mutations: Vec<Mutation>,
    },
}

/// Lays out the regions the way `SegmentBuilder` does (plus optional gaps),
/// skipping specs that would repeat a ring's, doorbell's or pool's tag.
fn build(specs: &[RegionSpec], gaps: &[u8]) -> (Vec<Region>, u64) {
    let mut regions: Vec<Region> = Vec::new();
    let mut seen: Vec<(u8, u32)> = Vec::new();
    let mut next = HEADER_LEN;
    let mut push = |regions: &mut Vec<Region>, kind, tag, len, param_a, param_b| {
        let align = alignment(kind);
        let gap = if gaps.is_empty() {
            0
        } else {
            u64::from(gaps[regions.len() % gaps.len()])
        };
        let offset = next.div_ceil(align) * align + gap * align;
        next = offset + len;
        regions.push(Region {
            kind,
            tag,
            offset,
            len,
            param_a,
            param_b,
        });
    };
    for spec in specs {
        let (key, tag) = match spec {
            RegionSpec::Ring { tag, .. } => (0, *tag),
            RegionSpec::Doorbell { tag } => (1, *tag),
            RegionSpec::Pool { tag, .. } => (2, *tag),
        };
        if seen.contains(&(key, tag)) {
            continue;
        }
        match spec {
            RegionSpec::Ring { tag, words, shift } => {
                if regions.len() == MAX_REGIONS {
                    break;
                }
                let words = 1 + usize::from(*words) % MAX_ENTRY_WORDS;
                let capacity = 2u64 << (shift % 24);
                let len = ring::region_len(words, capacity as usize) as u64;
                push(
                    &mut regions,
                    RegionKind::Ring,
                    *tag,
                    len,
                    words as u64,
                    capacity,
                );
            }
            RegionSpec::Doorbell { tag } => {
                if regions.len() == MAX_REGIONS {
                    break;
                }
                push(&mut regions, RegionKind::Doorbell, *tag, DOORBELL_LEN, 0, 0);
            }
            RegionSpec::Pool { tag, classes } => {
                let mut classes: Vec<(u8, u64)> = classes
                    .iter()
                    .map(|&(s, c)| (s % SLAB_SHIFTS, 1 + u64::from(c) % MAX_SLABS_PER_CLASS))
                    .collect();
                classes.sort_by_key(|c| c.0);
                classes.dedup_by_key(|c| c.0);
                if classes.is_empty() || regions.len() + classes.len() > MAX_REGIONS {
                    continue;
                }
                for (shift, count) in classes {
                    let slab = MIN_SLAB_SIZE << shift;
                    push(
                        &mut regions,
                        RegionKind::PoolClass,
                        *tag,
                        slab * count,
                        slab,
                        count,
                    );
                }
            }
        }
        seen.push((key, tag));
    }
    (regions, next)
}

fn encode(id: u32, regions: &[Region], len: u64) -> [u64; HEADER_WORDS] {
    let mut w = [0u64; HEADER_WORDS];
    w[0] = MAGIC;
    w[1] = u64::from(LAYOUT_VERSION) | ((regions.len() as u64) << 32);
    w[2] = len;
    w[3] = u64::from(id);
    for (i, r) in regions.iter().enumerate() {
        let e = &mut w[FIXED_WORDS + i * ENTRY_WORDS..][..ENTRY_WORDS];
        e[0] = code(r.kind) | (u64::from(r.tag) << 32);
        e[1] = r.offset;
        e[2] = r.len;
        e[3] = r.param_a;
        e[4] = r.param_b;
    }
    w
}

fn mutate(w: &mut [u64; HEADER_WORDS], m: &Mutation) {
    let at = |i: u8| usize::from(i) % HEADER_WORDS;
    match *m {
        Mutation::Set { word, value } => w[at(word)] = value,
        Mutation::Xor { word, mask } => w[at(word)] ^= mask,
        Mutation::Add { word, delta } => {
            w[at(word)] = w[at(word)].wrapping_add_signed(i64::from(delta));
        }
        Mutation::Swap { a, b } => w.swap(at(a), at(b)),
    }
}

/// Checks everything an accepted header promises.
fn check_accepted(words: &[u64; HEADER_WORDS], len: u64, id: u32, regions: &[Region]) {
    assert_eq!(words[0], MAGIC);
    assert_eq!(words[1] as u32, LAYOUT_VERSION);
    assert_eq!(words[1] >> 32, regions.len() as u64, "region count");
    assert!(regions.len() <= MAX_REGIONS);
    assert_eq!(words[2], len);
    assert_eq!(id, words[3] as u32);

    for (i, r) in regions.iter().enumerate() {
        // The region is what the table says.
        let e = &words[FIXED_WORDS + i * ENTRY_WORDS..][..ENTRY_WORDS];
        assert_eq!(e[0] >> 32, u64::from(r.tag), "region {i} tag");
        assert_eq!(
            [e[1], e[2], e[3], e[4]],
            [r.offset, r.len, r.param_a, r.param_b]
        );

        // In bounds, outside the header, not empty.
        let end = u128::from(r.offset) + u128::from(r.len);
        assert!(r.offset >= HEADER_LEN, "region {i} in the header: {r:?}");
        assert!(
            end <= u128::from(len),
            "region {i} past the end {len}: {r:?}"
        );
        assert!(r.len > 0, "empty region {i}: {r:?}");
        // Every kind is at least cache-line aligned.
        assert_eq!(r.offset % 64, 0, "region {i} misaligned: {r:?}");

        let Some((code, align)) = known(r.kind) else {
            assert!(e[0] as u32 > 3, "region {i}: known code, unknown kind");
            continue;
        };
        assert_eq!(e[0] as u32, code as u32, "region {i} kind: {r:?}");
        assert_eq!(r.offset % align, 0, "region {i} misaligned: {r:?}");

        // Parameters valid and the length exactly what they imply.
        let expected = match r.kind {
            RegionKind::Ring => {
                assert!((1..=MAX_ENTRY_WORDS as u64).contains(&r.param_a), "{r:?}");
                assert!(r.param_b.is_power_of_two(), "{r:?}");
                assert!((2..=MAX_CAPACITY).contains(&r.param_b), "{r:?}");
                ring::region_len(r.param_a as usize, r.param_b as usize) as u128
            }
            RegionKind::PoolClass => {
                assert!(r.param_a.is_power_of_two(), "{r:?}");
                assert!(
                    (MIN_SLAB_SIZE..=MAX_SLAB_SIZE).contains(&r.param_a),
                    "{r:?}"
                );
                assert!((1..=MAX_SLABS_PER_CLASS).contains(&r.param_b), "{r:?}");
                u128::from(r.param_a) * u128::from(r.param_b)
            }
            RegionKind::Doorbell | RegionKind::Word => {
                assert_eq!((r.param_a, r.param_b), (0, 0), "{r:?}");
                if r.kind == RegionKind::Doorbell {
                    u128::from(DOORBELL_LEN)
                } else {
                    128
                }
            }
        };
        assert_eq!(u128::from(r.len), expected, "region {i} length: {r:?}");
    }

    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            let (a0, a1) = (
                u128::from(a.offset),
                u128::from(a.offset) + u128::from(a.len),
            );
            let (b0, b1) = (
                u128::from(b.offset),
                u128::from(b.offset) + u128::from(b.len),
            );
            assert!(
                a1 <= b0 || b1 <= a0,
                "regions {i} and {j} overlap: {a:?} {b:?}"
            );
            if a.kind == b.kind && a.tag == b.tag {
                assert_eq!(a.kind, RegionKind::PoolClass, "duplicate tag: {a:?} {b:?}");
                assert!(
                    a.param_a < b.param_a,
                    "pool classes out of order: {a:?} {b:?}"
                );
            }
        }
    }

    // Each pool the table describes checks its own slabs: the first and last
    // slab of every class resolve, one byte past the last does not.
    let mut tags: Vec<u32> = regions
        .iter()
        .filter(|r| r.kind == RegionKind::PoolClass)
        .map(|r| r.tag)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    for tag in tags {
        let layout = PoolLayout {
            segment: id,
            classes: regions
                .iter()
                .filter(|r| r.kind == RegionKind::PoolClass && r.tag == tag)
                .map(|r| ClassLayout {
                    base: r.offset,
                    slab_size: r.param_a,
                    count: r.param_b,
                })
                .collect(),
        };
        assert!(layout.end() <= len);
        for (class, c) in layout.classes.iter().enumerate() {
            let last = c.base + (c.count - 1) * c.slab_size;
            for offset in [c.base, last] {
                let handle = SlabHandle {
                    segment: id,
                    generation: 0,
                    offset,
                };
                let loc = layout
                    .resolve(handle, c.slab_size)
                    .expect("slab of a valid pool resolves");
                assert_eq!((loc.class, loc.offset), (class, offset));
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw {
            words,
            actual_len,
            fix_fixed,
            count,
        } => {
            let mut w = [0u64; HEADER_WORDS];
            for (dst, src) in w.iter_mut().zip(&words) {
                *dst = *src;
            }
            if fix_fixed {
                w[0] = MAGIC;
                w[1] = u64::from(LAYOUT_VERSION) | (u64::from(count % 40) << 32);
                w[2] = actual_len;
            }
            if let Ok((id, regions)) = parse_header(&w, actual_len) {
                check_accepted(&w, actual_len, id, &regions);
            }
        }
        Input::Built {
            id,
            regions,
            gaps,
            slack,
            mutations,
        } => {
            let (regions, end) = build(&regions, &gaps);
            let len = (end.div_ceil(4096) + u64::from(slack)) * 4096;
            let mut w = encode(id, &regions, len);
            let pristine = mutations.is_empty();
            for m in mutations.iter().take(4) {
                mutate(&mut w, m);
            }
            let result = parse_header(&w, len);
            if pristine {
                assert_eq!(
                    result,
                    Ok((id, regions.clone())),
                    "a well-formed header was refused"
                );
            }
            if let Ok((id, got)) = result {
                check_accepted(&w, len, id, &got);
            }
        }
    }
});
