//! Property tests of the decoders that read untrusted shared memory:
//! [`Descriptor::decode`], [`SlabHandle::from_words`] with
//! [`PoolLayout::resolve`], and [`parse_header`].
//!
//! They cover the same ground as the libFuzzer targets in `fuzz/` and run
//! with a plain `cargo test`, on the stable toolchain.

#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use proptest::sample::Index;
use shmesh_shm::descriptor::{CorruptDescriptor, DESCRIPTOR_WORDS, Descriptor, Flags};
use shmesh_shm::handle::{BadHandle, SlabHandle};
use shmesh_shm::pool::{
    ClassConfig, ClassLayout, MAX_SLAB_SIZE, MAX_SLABS_PER_CLASS, MIN_SLAB_SIZE, PoolConfig,
    PoolLayout, SlabLocation,
};
use shmesh_shm::ring::{self, Entry, EntryWords, MAX_CAPACITY, MAX_ENTRY_WORDS};
use shmesh_shm::segment::{
    HEADER_LEN, HEADER_WORDS, LAYOUT_VERSION, MAGIC, MAX_REGIONS, Region, RegionKind, Segment,
    SegmentBuilder, parse_header,
};

// ---------------------------------------------------------------------------
// Descriptors

/// Flags as a sender may set them: any of this crate's bits, any upper bits.
fn flags() -> impl Strategy<Value = Flags> {
    (0u32..=Flags::KNOWN.0, any::<u16>())
        .prop_map(|(known, upper)| Flags(known | (u32::from(upper) << 16)))
}

fn slab_handle() -> impl Strategy<Value = SlabHandle> {
    (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(segment, generation, offset)| {
        SlabHandle {
            segment,
            generation,
            offset,
        }
    })
}

/// Any descriptor the format allows.
fn descriptor() -> impl Strategy<Value = Descriptor> {
    (
        any::<u64>(),
        any::<u32>(),
        flags(),
        slab_handle(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(call_id, method_id, flags, payload, len, status, deadline_ns, aux)| {
                let with_payload = flags.contains(Flags::PAYLOAD);
                Descriptor {
                    call_id,
                    method_id,
                    flags,
                    payload: if with_payload {
                        payload
                    } else {
                        SlabHandle::default()
                    },
                    len: if with_payload { len } else { 0 },
                    status,
                    deadline_ns,
                    aux,
                }
            },
        )
}

/// Descriptor words as a peer may write them: random, or a valid descriptor
/// with one word replaced (so that both outcomes are common).
fn descriptor_words() -> impl Strategy<Value = [u64; DESCRIPTOR_WORDS]> {
    prop_oneof![
        any::<[u64; DESCRIPTOR_WORDS]>(),
        (descriptor(), 0..DESCRIPTOR_WORDS, any::<u64>()).prop_map(|(d, i, v)| {
            let mut w = d.to_words();
            w[i] = v;
            w
        }),
        (descriptor(), 0..DESCRIPTOR_WORDS, 0..64u32).prop_map(|(d, i, bit)| {
            let mut w = d.to_words();
            w[i] ^= 1 << bit;
            w
        }),
    ]
}

/// What `Descriptor::decode` must answer, from the format's rules.
fn decode_model(w: &[u64; DESCRIPTOR_WORDS]) -> Result<Descriptor, CorruptDescriptor> {
    let flags = (w[1] >> 32) as u32;
    let unknown = flags & !(Flags::KNOWN.0 | Flags::UPPER.0);
    if unknown != 0 {
        return Err(CorruptDescriptor::UnknownFlags { bits: unknown });
    }
    let len = w[4] as u32;
    if flags & Flags::PAYLOAD.0 == 0 && (len != 0 || w[2] != 0 || w[3] != 0) {
        return Err(CorruptDescriptor::PayloadWithoutFlag { len });
    }
    Ok(Descriptor {
        call_id: w[0],
        method_id: w[1] as u32,
        flags: Flags(flags),
        payload: SlabHandle {
            offset: w[2],
            segment: w[3] as u32,
            generation: (w[3] >> 32) as u32,
        },
        len,
        status: (w[4] >> 32) as u32,
        deadline_ns: w[5],
        aux: w[6],
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn descriptor_decode_follows_the_rules(words in descriptor_words()) {
        let got = Descriptor::decode(&words);
        prop_assert_eq!(&got, &decode_model(&words));
        if let Ok(d) = got {
            // Lossless: the words come back exactly.
            prop_assert_eq!(d.to_words(), words);
        }
        // The ring's path agrees, whatever the rest of the slot holds.
        let mut slot: EntryWords = [u64::MAX; MAX_ENTRY_WORDS];
        slot[..DESCRIPTOR_WORDS].copy_from_slice(&words);
        prop_assert_eq!(<Descriptor as Entry>::decode(&slot), got);
    }

    #[test]
    fn descriptor_round_trips(d in descriptor()) {
        prop_assert_eq!(Descriptor::decode(&d.to_words()), Ok(d));
        let mut out: EntryWords = [0; MAX_ENTRY_WORDS];
        d.encode(&mut out);
        prop_assert_eq!(<Descriptor as Entry>::decode(&out), Ok(d));
    }

    #[test]
    fn handle_words_round_trip(words in any::<[u64; 2]>(), h in slab_handle()) {
        prop_assert_eq!(SlabHandle::from_words(words).to_words(), words);
        prop_assert_eq!(SlabHandle::from_words(h.to_words()), h);
        let mut out: EntryWords = [0; MAX_ENTRY_WORDS];
        h.encode(&mut out);
        prop_assert_eq!(<SlabHandle as Entry>::decode(&out), Ok(h));
    }
}

// ---------------------------------------------------------------------------
// Pool layouts and handles

/// Number of slab sizes: powers of two from `MIN_SLAB_SIZE` to `MAX_SLAB_SIZE`.
const SLAB_SHIFTS: u32 = (MAX_SLAB_SIZE / MIN_SLAB_SIZE).trailing_zeros() + 1;

/// A valid pool configuration with slab sizes `MIN_SLAB_SIZE << 0..max_shift`
/// and at most `max_count` slabs per class.
fn pool_config(
    max_shift: u32,
    max_count: u64,
    max_classes: usize,
) -> impl Strategy<Value = PoolConfig> {
    prop::collection::vec((0..max_shift, 1..=max_count), 1..=max_classes).prop_map(|mut classes| {
        classes.sort_by_key(|c| c.0);
        classes.dedup_by_key(|c| c.0);
        PoolConfig::new(
            classes
                .into_iter()
                .map(|(shift, count)| ClassConfig {
                    slab_size: MIN_SLAB_SIZE << shift,
                    count,
                })
                .collect(),
        )
        .unwrap()
    })
}

/// A layout of the two shapes the crate builds: contiguous from any base
/// (`Pool::new_heap`), or classes placed on page boundaries in any order
/// with gaps (a segment's pool regions).
fn layout_of(
    config: PoolConfig,
    segment: u32,
    contiguous: bool,
    base: u64,
    keys: &[(u8, u8)],
) -> PoolLayout {
    if contiguous {
        return PoolLayout::contiguous(segment, base, &config);
    }
    let classes = config.classes();
    let mut order: Vec<usize> = (0..classes.len()).collect();
    order.sort_by_key(|&i| keys.get(i).map_or(0, |k| k.0));
    let mut bases = vec![0; classes.len()];
    let mut at = HEADER_LEN;
    for &i in &order {
        let gap = keys.get(i).map_or(0, |k| u64::from(k.1 % 4));
        at = at.div_ceil(4096) * 4096 + gap * 4096;
        bases[i] = at;
        at += classes[i].slab_size * classes[i].count;
    }
    PoolLayout {
        segment,
        classes: classes
            .iter()
            .zip(bases)
            .map(|(c, base)| ClassLayout {
                base,
                slab_size: c.slab_size,
                count: c.count,
            })
            .collect(),
    }
}

fn layout(
    max_shift: u32,
    max_count: u64,
    max_classes: usize,
    max_base: u64,
) -> impl Strategy<Value = PoolLayout> {
    (
        pool_config(max_shift, max_count, max_classes),
        any::<u32>(),
        any::<bool>(),
        0..max_base,
        prop::collection::vec(any::<(u8, u8)>(), 16),
    )
        .prop_map(|(config, segment, contiguous, base, keys)| {
            layout_of(config, segment, contiguous, base, &keys)
        })
}

/// The brute-force model: every slab start of the layout, with its class,
/// index and size.
fn slab_starts(layout: &PoolLayout) -> HashMap<u64, SlabLocation> {
    let mut starts = HashMap::new();
    for (class, c) in layout.classes.iter().enumerate() {
        for index in 0..c.count {
            let offset = c.base + index * c.slab_size;
            let old = starts.insert(
                offset,
                SlabLocation {
                    class,
                    index,
                    offset,
                    slab_size: c.slab_size,
                },
            );
            assert!(old.is_none(), "test layout overlaps");
        }
    }
    starts
}

/// Offsets worth probing: around every slab start and class end, plus the
/// extremes.
fn probes(layout: &PoolLayout, extra: &[u64]) -> Vec<u64> {
    let mut out = vec![
        0,
        1,
        u64::MAX,
        u64::MAX - 63,
        layout.end(),
        layout.end() + 1,
    ];
    for c in &layout.classes {
        for index in 0..=c.count {
            let s = c.base + index * c.slab_size;
            for delta in [0, 1, 8, 63, 64, c.slab_size / 2, c.slab_size - 1] {
                out.push(s + delta);
            }
            out.push(s.wrapping_sub(1));
            out.push(s.wrapping_sub(64));
        }
    }
    out.extend_from_slice(extra);
    out
}

/// Checks `resolve` against the model for one offset, at lengths around the
/// slab size and in a foreign segment.
fn check_offset(
    layout: &PoolLayout,
    starts: &HashMap<u64, SlabLocation>,
    offset: u64,
    generation: u32,
) -> Result<(), TestCaseError> {
    let handle = SlabHandle {
        segment: layout.segment,
        generation,
        offset,
    };
    let foreign = SlabHandle {
        segment: layout.segment ^ 1,
        ..handle
    };
    prop_assert!(
        matches!(
            layout.resolve(foreign, 0),
            Err(BadHandle::WrongSegment { .. })
        ),
        "foreign segment accepted"
    );
    match starts.get(&offset) {
        Some(loc) => {
            prop_assert_eq!(layout.resolve(handle, 0), Ok(*loc));
            prop_assert_eq!(layout.resolve(handle, loc.slab_size), Ok(*loc));
            prop_assert_eq!(
                layout.resolve(handle, loc.slab_size + 1),
                Err(BadHandle::TooLong {
                    len: loc.slab_size + 1,
                    slab_size: loc.slab_size,
                })
            );
            prop_assert!(
                matches!(
                    layout.resolve(handle, u64::MAX),
                    Err(BadHandle::TooLong { .. })
                ),
                "length u64::MAX accepted"
            );
        }
        None => {
            let inside = layout
                .classes
                .iter()
                .find(|c| offset >= c.base && offset - c.base < c.slab_size * c.count);
            let got = layout.resolve(handle, 0);
            match inside {
                Some(c) => prop_assert_eq!(
                    got,
                    Err(BadHandle::Misaligned {
                        offset,
                        slab_size: c.slab_size,
                    })
                ),
                None => prop_assert_eq!(got, Err(BadHandle::OutOfBounds { offset })),
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any slab size, few slabs: probe around every slab boundary.
    #[test]
    fn resolve_accepts_exactly_slab_starts(
        layout in layout(SLAB_SHIFTS, 8, 8, 1 << 48),
        extra in prop::collection::vec(any::<u64>(), 8),
        generation in any::<u32>(),
    ) {
        let starts = slab_starts(&layout);
        for offset in probes(&layout, &extra) {
            check_offset(&layout, &starts, offset, generation)?;
        }
    }

    /// Handle words as a peer may write them, against a layout: raw, or in
    /// the layout's segment, or also at an offset inside the pool.
    #[test]
    fn resolve_of_raw_words_is_sound(
        layout in layout(SLAB_SHIFTS, MAX_SLABS_PER_CLASS, 4, 1 << 48),
        raw in any::<[u64; 2]>(),
        own_segment in any::<bool>(),
        inside in any::<Option<Index>>(),
        len in prop_oneof![any::<u64>(), 0..=MAX_SLAB_SIZE],
    ) {
        let mut words = raw;
        if own_segment {
            words[1] = (words[1] & !u64::from(u32::MAX)) | u64::from(layout.segment);
        }
        if let Some(at) = inside {
            let start = layout.classes.iter().map(|c| c.base).min().unwrap();
            words[0] = start + at.index((layout.end() - start) as usize) as u64;
        }
        let handle = SlabHandle::from_words(words);
        match layout.resolve(handle, len) {
            Ok(loc) => {
                prop_assert_eq!(handle.segment, layout.segment);
                let c = layout.classes[loc.class];
                prop_assert!(loc.index < c.count);
                prop_assert_eq!(loc.offset, c.base + loc.index * c.slab_size);
                prop_assert_eq!(loc.offset, handle.offset);
                prop_assert!(len <= c.slab_size);
            }
            Err(BadHandle::WrongSegment { expected, found }) => {
                prop_assert_eq!((expected, found), (layout.segment, handle.segment));
                prop_assert_ne!(expected, found);
            }
            Err(e) => prop_assert!(
                matches!(e, BadHandle::OutOfBounds { .. } | BadHandle::Misaligned { .. } | BadHandle::TooLong { .. }),
                "unexpected {e:?}"
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Small layouts, every byte offset up to past the end.
    #[test]
    fn resolve_exhaustive_on_small_layouts(layout in layout(4, 4, 3, 4096)) {
        let starts = slab_starts(&layout);
        let accepted: Vec<u64> = (0..layout.end() + 128)
            .filter(|&offset| {
                let h = SlabHandle { segment: layout.segment, generation: 0, offset };
                layout.resolve(h, 0).is_ok()
            })
            .collect();
        let mut expected: Vec<u64> = starts.keys().copied().collect();
        expected.sort_unstable();
        prop_assert_eq!(accepted, expected);
    }
}

// ---------------------------------------------------------------------------
// Segment headers

const FIXED_WORDS: usize = 4;
const ENTRY_WORDS: usize = 5;
/// Length of a doorbell region.
const DOORBELL_LEN: u64 = 64;

/// Table code and alignment of the region kinds these tests know in detail.
/// Kinds added later are held to the rules every region obeys.
fn known(kind: RegionKind) -> Option<(u32, u64)> {
    match kind {
        RegionKind::Ring => Some((1, 128)),
        RegionKind::Doorbell => Some((2, 64)),
        RegionKind::PoolClass => Some((3, 4096)),
        RegionKind::Word => Some((4, 128)),
    }
}

/// Everything an accepted header promises.
fn check_accepted(
    words: &[u64; HEADER_WORDS],
    len: u64,
    id: u32,
    regions: &[Region],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(words[0], MAGIC);
    prop_assert_eq!(words[1] as u32, LAYOUT_VERSION);
    prop_assert_eq!(words[1] >> 32, regions.len() as u64);
    prop_assert!(regions.len() <= MAX_REGIONS);
    prop_assert_eq!(words[2], len);
    prop_assert_eq!(id, words[3] as u32);
    for (i, r) in regions.iter().enumerate() {
        let e = &words[FIXED_WORDS + i * ENTRY_WORDS..][..ENTRY_WORDS];
        prop_assert_eq!(e[0] >> 32, u64::from(r.tag));
        prop_assert_eq!(
            [e[1], e[2], e[3], e[4]],
            [r.offset, r.len, r.param_a, r.param_b]
        );
        let end = u128::from(r.offset) + u128::from(r.len);
        prop_assert!(
            r.offset >= HEADER_LEN,
            "region {} in the header: {:?}",
            i,
            r
        );
        prop_assert!(end <= u128::from(len), "region {} past the end: {:?}", i, r);
        prop_assert!(r.len > 0, "empty region {}", i);
        prop_assert_eq!(r.offset % 64, 0, "region {} misaligned", i);
        let Some((code, align)) = known(r.kind) else {
            prop_assert!(e[0] as u32 > 3, "known code, unknown kind");
            continue;
        };
        prop_assert_eq!(e[0] as u32, code);
        prop_assert_eq!(r.offset % align, 0, "region {} misaligned: {:?}", i, r);
        let expected = match r.kind {
            RegionKind::Ring => {
                prop_assert!((1..=MAX_ENTRY_WORDS as u64).contains(&r.param_a));
                prop_assert!(
                    r.param_b.is_power_of_two() && (2..=MAX_CAPACITY).contains(&r.param_b)
                );
                ring::region_len(r.param_a as usize, r.param_b as usize) as u128
            }
            RegionKind::PoolClass => {
                prop_assert!(r.param_a.is_power_of_two());
                prop_assert!((MIN_SLAB_SIZE..=MAX_SLAB_SIZE).contains(&r.param_a));
                prop_assert!((1..=MAX_SLABS_PER_CLASS).contains(&r.param_b));
                u128::from(r.param_a) * u128::from(r.param_b)
            }
            RegionKind::Doorbell | RegionKind::Word => {
                prop_assert_eq!((r.param_a, r.param_b), (0, 0));
                if r.kind == RegionKind::Doorbell {
                    u128::from(DOORBELL_LEN)
                } else {
                    128
                }
            }
        };
        prop_assert_eq!(u128::from(r.len), expected, "region {} length", i);
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
            prop_assert!(
                a1 <= b0 || b1 <= a0,
                "regions {} and {} overlap: {:?} {:?}",
                i,
                j,
                a,
                b
            );
            if a.kind == b.kind && a.tag == b.tag {
                prop_assert_eq!(a.kind, RegionKind::PoolClass, "duplicate tag");
                prop_assert!(a.param_a < b.param_a, "pool classes out of order");
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum RegionSpec {
    DescriptorRing { tag: u32, shift: u32 },
    HandleRing { tag: u32, shift: u32 },
    Doorbell { tag: u32 },
    Pool { tag: u32, config: PoolConfig },
}

fn region_spec() -> impl Strategy<Value = RegionSpec> {
    prop_oneof![
        (0..4u32, 1..10u32).prop_map(|(tag, shift)| RegionSpec::DescriptorRing { tag, shift }),
        (0..4u32, 1..10u32).prop_map(|(tag, shift)| RegionSpec::HandleRing { tag, shift }),
        (0..4u32).prop_map(|tag| RegionSpec::Doorbell { tag }),
        (0..3u32, pool_config(9, 16, 4)).prop_map(|(tag, config)| RegionSpec::Pool { tag, config }),
    ]
}

/// A builder from specs, skipping any that would repeat a kind and tag.
fn builder(id: u32, specs: &[RegionSpec]) -> SegmentBuilder {
    let mut b = SegmentBuilder::new(id);
    let mut seen = Vec::new();
    for spec in specs {
        let key = match spec {
            RegionSpec::DescriptorRing { tag, .. } | RegionSpec::HandleRing { tag, .. } => {
                (0, *tag)
            }
            RegionSpec::Doorbell { tag } => (1, *tag),
            RegionSpec::Pool { tag, .. } => (2, *tag),
        };
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        match spec {
            RegionSpec::DescriptorRing { tag, shift } => b.ring::<Descriptor>(*tag, 1 << shift),
            RegionSpec::HandleRing { tag, shift } => b.ring::<SlabHandle>(*tag, 1 << shift),
            RegionSpec::Doorbell { tag } => b.doorbell(*tag),
            RegionSpec::Pool { tag, config } => b.pool(*tag, config),
        };
    }
    b
}

/// The header words exactly as the builder wrote them into the segment.
fn written_header(seg: &Segment) -> [u64; HEADER_WORDS] {
    let file = std::fs::File::from(seg.fd().try_clone_to_owned().unwrap());
    let mut bytes = vec![0u8; HEADER_WORDS * 8];
    file.read_exact_at(&mut bytes, 0).unwrap();
    let mut words = [0u64; HEADER_WORDS];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes(chunk.try_into().unwrap());
    }
    words
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(u64),
    FlipBit(u32),
    Add(i64),
    CopyFrom(Index),
    /// A value near the segment length, a favourite of broken offsets.
    NearLen(i64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<u64>().prop_map(Mutation::Set),
        (0..64u32).prop_map(Mutation::FlipBit),
        (-8192..8192i64).prop_map(Mutation::Add),
        any::<Index>().prop_map(Mutation::CopyFrom),
        (-8192..8192i64).prop_map(Mutation::NearLen),
    ]
}

/// One word to change (mostly among the words in use) and how.
fn word_mutation() -> impl Strategy<Value = (bool, Index, Mutation)> {
    (prop::bool::weighted(0.9), any::<Index>(), mutation())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn parse_header_accepts_what_the_builder_writes_and_survives_damage(
        id in any::<u32>(),
        specs in prop::collection::vec(region_spec(), 0..8),
        mutations in prop::collection::vec(word_mutation(), 32),
    ) {
        let b = builder(id, &specs);
        let seg = b.create("decode-props").unwrap();
        let len = seg.len();
        let words = written_header(&seg);

        // The builder's header is accepted, with exactly its regions.
        let parsed = parse_header(&words, len);
        prop_assert_eq!(&parsed, &Ok((id, seg.regions().to_vec())));
        check_accepted(&words, len, id, seg.regions())?;
        let peer = Segment::open(seg.fd().try_clone_to_owned().unwrap()).unwrap();
        prop_assert_eq!(peer.regions(), seg.regions());

        // Any other length is refused.
        prop_assert!(parse_header(&words, len + 4096).is_err());
        prop_assert!(parse_header(&words, len - 1).is_err());

        // A single damaged word: refused, or still a sound table.
        let used = FIXED_WORDS + seg.regions().len() * ENTRY_WORDS;
        for (in_use, at, how) in mutations {
            let i = if in_use { at.index(used) } else { at.index(HEADER_WORDS) };
            let mut w = words;
            w[i] = match how {
                Mutation::Set(v) => v,
                Mutation::FlipBit(bit) => w[i] ^ (1 << bit),
                Mutation::Add(d) => w[i].wrapping_add_signed(d),
                Mutation::CopyFrom(from) => words[from.index(used)],
                Mutation::NearLen(d) => len.wrapping_add_signed(d),
            };
            if let Ok((id, regions)) = parse_header(&w, len) {
                check_accepted(&w, len, id, &regions)?;
            }
        }
    }

    #[test]
    fn parse_header_never_panics_on_arbitrary_words(
        raw in prop::collection::vec(any::<u64>(), HEADER_WORDS),
        len in prop_oneof![any::<u64>(), HEADER_LEN..(1u64 << 34)],
        fix_fixed in any::<bool>(),
        count in 0..40u64,
    ) {
        let mut w = [0u64; HEADER_WORDS];
        w.copy_from_slice(&raw);
        if fix_fixed {
            w[0] = MAGIC;
            w[1] = u64::from(LAYOUT_VERSION) | (count << 32);
            w[2] = len;
        }
        if let Ok((id, regions)) = parse_header(&w, len) {
            check_accepted(&w, len, id, &regions)?;
        }
    }
}
