//! Fuzzes `SlabHandle::from_words` followed by `PoolLayout::resolve`: how a
//! handle that a peer wrote is checked against a pool before its slab is read
//! or released.
//!
//! Input (via `arbitrary`): a pool layout of the two shapes the crate builds
//! (contiguous from a `PoolConfig`, or size classes scattered through a
//! segment as a segment header may place them), the two words of a handle,
//! and a payload length. The handle is either raw words or aimed near a slab
//! start, so both accepted and rejected handles are common.
//!
//! Properties checked:
//!
//! - nothing panics;
//! - `from_words` is lossless (`to_words` gives the words back);
//! - an accepted handle names the start of a slab that lies wholly inside
//!   its class, in the layout's segment, and the length fits the slab;
//! - `resolve` gives exactly the answer of a brute-force model computed in
//!   128-bit arithmetic (so the rejections are right too).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shmesh_shm::handle::{BadHandle, SlabHandle};
use shmesh_shm::pool::{
    ClassConfig, ClassLayout, MAX_CLASSES, MAX_SLAB_SIZE, MAX_SLABS_PER_CLASS, MIN_SLAB_SIZE,
    PoolConfig, PoolLayout, SlabLocation,
};

/// Alignment of a pool class region in a segment.
const PAGE: u64 = 4096;

/// Number of slab sizes: powers of two from `MIN_SLAB_SIZE` to `MAX_SLAB_SIZE`.
const SLAB_SHIFTS: u8 = (MAX_SLAB_SIZE / MIN_SLAB_SIZE).trailing_zeros() as u8 + 1;

#[derive(Debug, Arbitrary)]
struct ClassSpec {
    /// Slab size is `MIN_SLAB_SIZE << (shift % SLAB_SHIFTS)`.
    shift: u8,
    /// Slab count is `1 + count % MAX_SLABS_PER_CLASS`.
    count: u32,
    /// Where the class goes in a scattered layout (sort key).
    place: u8,
    /// Pages of gap before the class in a scattered layout.
    gap: u16,
}

#[derive(Debug, Arbitrary)]
enum Shape {
    /// `PoolLayout::contiguous` from this base.
    Contiguous { base: u64 },
    /// Classes in `place` order, each on a page boundary after a gap, the
    /// way `parse_header` accepts pool classes.
    Scattered { start_pages: u32 },
}

#[derive(Debug, Arbitrary)]
enum HandleSpec {
    /// Raw words, as a hostile peer may write them.
    Raw([u64; 2]),
    /// Near the start of slab `index` of class `class`: `delta` bytes off,
    /// possibly in another segment.
    Near {
        class: u8,
        index: u32,
        delta: i16,
        /// The high word's segment half is the layout's xor this.
        segment_xor: u32,
        generation: u32,
    },
}

#[derive(Debug, Arbitrary)]
enum LenSpec {
    Raw(u64),
    /// The slab size of class `class` plus a small signed adjustment.
    AroundSlab {
        class: u8,
        delta: i8,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    segment: u32,
    classes: Vec<ClassSpec>,
    shape: Shape,
    handle: HandleSpec,
    len: LenSpec,
}

/// Valid class configurations: strictly increasing power-of-two slab sizes,
/// counts in range, at most `MAX_CLASSES`.
fn configs(specs: &[ClassSpec]) -> Vec<ClassConfig> {
    let mut shifts: Vec<(u8, u64)> = specs
        .iter()
        .take(MAX_CLASSES)
        .map(|s| {
            (
                s.shift % SLAB_SHIFTS,
                1 + u64::from(s.count) % MAX_SLABS_PER_CLASS,
            )
        })
        .collect();
    shifts.sort_by_key(|s| s.0);
    shifts.dedup_by_key(|s| s.0);
    if shifts.is_empty() {
        shifts.push((0, 1));
    }
    shifts
        .into_iter()
        .map(|(shift, count)| ClassConfig {
            slab_size: MIN_SLAB_SIZE << shift,
            count,
        })
        .collect()
}

fn layout(input: &Input) -> PoolLayout {
    let configs = configs(&input.classes);
    let config = PoolConfig::new(configs.clone()).expect("generated config is valid");
    match input.shape {
        Shape::Contiguous { base } => {
            // Keep `contiguous`'s own additions from overflowing: its base is
            // chosen by trusted code, never by a peer.
            PoolLayout::contiguous(input.segment, base >> 2, &config)
        }
        Shape::Scattered { start_pages } => {
            let mut order: Vec<usize> = (0..configs.len()).collect();
            order.sort_by_key(|&i| input.classes.get(i).map_or(0, |s| s.place));
            let mut bases = vec![0u64; configs.len()];
            let mut at = PAGE * (1 + u64::from(start_pages));
            for &i in &order {
                let gap = input.classes.get(i).map_or(0, |s| u64::from(s.gap));
                at = at.div_ceil(PAGE) * PAGE + gap * PAGE;
                bases[i] = at;
                at += configs[i].slab_size * configs[i].count;
            }
            PoolLayout {
                segment: input.segment,
                classes: configs
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
    }
}

fn handle_words(input: &Input, layout: &PoolLayout) -> [u64; 2] {
    match input.handle {
        HandleSpec::Raw(words) => words,
        HandleSpec::Near {
            class,
            index,
            delta,
            segment_xor,
            generation,
        } => {
            let c = &layout.classes[usize::from(class) % layout.classes.len()];
            // Aim at, or just past, an existing slab.
            let index = u64::from(index) % (c.count + 1);
            let offset = (c.base + index * c.slab_size).wrapping_add_signed(i64::from(delta));
            let segment = input.segment ^ segment_xor;
            [offset, u64::from(segment) | (u64::from(generation) << 32)]
        }
    }
}

fn payload_len(input: &Input, layout: &PoolLayout) -> u64 {
    match input.len {
        LenSpec::Raw(len) => len,
        LenSpec::AroundSlab { class, delta } => {
            let c = &layout.classes[usize::from(class) % layout.classes.len()];
            c.slab_size.saturating_add_signed(i64::from(delta))
        }
    }
}

/// What `resolve` must answer, computed independently and in 128-bit
/// arithmetic.
fn model(layout: &PoolLayout, handle: SlabHandle, len: u64) -> Result<SlabLocation, BadHandle> {
    if handle.segment != layout.segment {
        return Err(BadHandle::WrongSegment {
            expected: layout.segment,
            found: handle.segment,
        });
    }
    let offset = u128::from(handle.offset);
    // Classes never overlap, so at most one contains the offset.
    let containing: Vec<(usize, &ClassLayout)> = layout
        .classes
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            let base = u128::from(c.base);
            let end = base + u128::from(c.slab_size) * u128::from(c.count);
            base <= offset && offset < end
        })
        .collect();
    assert!(containing.len() <= 1, "test layout overlaps: {layout:?}");
    let Some(&(class, c)) = containing.first() else {
        return Err(BadHandle::OutOfBounds {
            offset: handle.offset,
        });
    };
    let rel = offset - u128::from(c.base);
    if rel % u128::from(c.slab_size) != 0 {
        return Err(BadHandle::Misaligned {
            offset: handle.offset,
            slab_size: c.slab_size,
        });
    }
    if len > c.slab_size {
        return Err(BadHandle::TooLong {
            len,
            slab_size: c.slab_size,
        });
    }
    Ok(SlabLocation {
        class,
        index: (rel / u128::from(c.slab_size)) as u64,
        offset: handle.offset,
        slab_size: c.slab_size,
    })
}

fuzz_target!(|input: Input| {
    let layout = layout(&input);
    let words = handle_words(&input, &layout);
    let len = payload_len(&input, &layout);

    let handle = SlabHandle::from_words(words);
    assert_eq!(handle.to_words(), words, "from_words is lossy");

    let got = layout.resolve(handle, len);
    if let Ok(loc) = &got {
        assert_eq!(handle.segment, layout.segment, "accepted a foreign segment");
        let c = layout.classes.get(loc.class).expect("class index in range");
        assert_eq!(loc.slab_size, c.slab_size);
        assert_eq!(loc.offset, handle.offset);
        assert!(loc.index < c.count, "slab index past the class: {loc:?}");
        let start = u128::from(c.base) + u128::from(loc.index) * u128::from(c.slab_size);
        assert_eq!(u128::from(loc.offset), start, "not a slab start: {loc:?}");
        let class_end = u128::from(c.base) + u128::from(c.slab_size) * u128::from(c.count);
        assert!(
            start + u128::from(c.slab_size) <= class_end,
            "slab leaves its class"
        );
        assert!(len <= loc.slab_size, "length {len} does not fit {loc:?}");
        assert!(
            start + u128::from(len) <= class_end,
            "payload leaves the class"
        );
        assert!(
            u128::from(layout.end()) >= class_end,
            "layout end before a class end"
        );
    }
    assert_eq!(
        got,
        model(&layout, handle, len),
        "resolve disagrees with the model for {layout:?}, {handle:?}, len {len}"
    );
});
