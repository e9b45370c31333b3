//! Where a ring round trip's time goes: ping-pong between two threads over
//! (a) one cache line both sides write (the floor), (b) one line per
//! direction with no ring logic, (c) rings of 2-word handles and (d) rings
//! of 7-word descriptors, one ring per direction; then (e, f) a line per
//! direction plus a 64-byte payload each way, next to the signal's line
//! (in its 128-byte block, as a 128-byte ring slot would carry it) or
//! elsewhere (as a slab in a pool does).
//!
//! ```text
//! cargo run --release -p shmesh-shm --example cache_lines
//! ```
//!
//! On the 2-core reference VM, (b) costs about twice (a): a line that one
//! core only reads and the other only writes moves twice per message, while
//! a line that each side reads and then writes migrates once. Any design with
//! one SPSC ring per direction pays (b); the ring's own work is (c) or (d)
//! minus (b). See BENCHMARKS.md.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use shmesh_shm::descriptor::Descriptor;
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::ring::{self, Entry};

const ROUND_TRIPS: u64 = 2_000_000;

#[repr(C, align(128))]
struct Line([AtomicU64; 8]);

fn new_line() -> Arc<Line> {
    Arc::new(Line(std::array::from_fn(|_| AtomicU64::new(0))))
}

/// Nanoseconds per round trip of `client` against `server` on another thread.
fn time(client: impl FnOnce(), server: impl FnOnce() + Send + 'static) -> f64 {
    let t = std::thread::spawn(server);
    let start = Instant::now();
    client();
    let elapsed = start.elapsed();
    t.join().unwrap();
    elapsed.as_nanos() as f64 / ROUND_TRIPS as f64
}

fn spin_until(word: &AtomicU64, value: u64) {
    while word.load(Ordering::Acquire) != value {
        std::hint::spin_loop();
    }
}

fn one_line() -> f64 {
    let a = new_line();
    let server = a.clone();
    time(
        move || {
            for i in 0..ROUND_TRIPS {
                a.0[0].store(2 * i + 1, Ordering::Release);
                spin_until(&a.0[0], 2 * i + 2);
            }
        },
        move || {
            for i in 0..ROUND_TRIPS {
                spin_until(&server.0[0], 2 * i + 1);
                server.0[0].store(2 * i + 2, Ordering::Release);
            }
        },
    )
}

fn two_lines() -> f64 {
    let (request, response) = (new_line(), new_line());
    let (rq, rs) = (request.clone(), response.clone());
    time(
        move || {
            for i in 1..=ROUND_TRIPS {
                request.0[7].store(i, Ordering::Release);
                spin_until(&response.0[7], i);
            }
        },
        move || {
            for i in 1..=ROUND_TRIPS {
                spin_until(&rq.0[7], i);
                rs.0[7].store(i, Ordering::Release);
            }
        },
    )
}

/// A 64-byte line (no padding to 128).
#[repr(C, align(64))]
struct Line64([AtomicU64; 8]);

/// 128-byte blocks of two 64-byte lines, 128-byte aligned: the pair an
/// adjacent-line prefetcher fetches together.
#[repr(C, align(128))]
struct Block([Line64; 2]);

fn new_blocks(n: usize) -> Arc<Vec<Block>> {
    Arc::new(
        (0..n)
            .map(|_| {
                Block(std::array::from_fn(|_| {
                    Line64(std::array::from_fn(|_| AtomicU64::new(0)))
                }))
            })
            .collect(),
    )
}

/// One line per direction carrying the signal, plus a 64-byte payload per
/// direction written before it and read after it: in the other half of the
/// signal's 128-byte block (`adjacent`, as a 128-byte ring slot would put
/// it) or in a block 4 KiB away (a slab in a pool).
fn with_payload(adjacent: bool) -> f64 {
    let (request, response) = (new_blocks(64), new_blocks(64));
    let (rq, rs) = (request.clone(), response.clone());
    let at = if adjacent { (0, 0) } else { (32, 0) };
    let write = |line: &Line64, v: u64| {
        for w in &line.0 {
            w.store(v, Ordering::Relaxed);
        }
    };
    let read = |line: &Line64| {
        line.0
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    time(
        move || {
            for i in 1..=ROUND_TRIPS {
                write(&request[at.0].0[at.1], i);
                request[0].0[1].0[7].store(i, Ordering::Release);
                spin_until(&response[0].0[1].0[7], i);
                assert_eq!(read(&response[at.0].0[at.1]), 8 * i);
            }
        },
        move || {
            for i in 1..=ROUND_TRIPS {
                spin_until(&rq[0].0[1].0[7], i);
                assert_eq!(read(&rq[at.0].0[at.1]), 8 * i);
                write(&rs[at.0].0[at.1], i);
                rs[0].0[1].0[7].store(i, Ordering::Release);
            }
        },
    )
}

fn rings<E: Entry + Copy + Send + 'static>(entry: E) -> f64 {
    let (mut tx, mut rx) = ring::channel::<E>(256).unwrap();
    let (mut tx2, mut rx2) = ring::channel::<E>(256).unwrap();
    time(
        move || {
            for _ in 0..ROUND_TRIPS {
                assert!(tx.try_push(entry).is_ok());
                while rx2.try_pop().unwrap().is_none() {
                    std::hint::spin_loop();
                }
            }
        },
        move || {
            for _ in 0..ROUND_TRIPS {
                let e = loop {
                    if let Some(e) = rx.try_pop().unwrap() {
                        break e;
                    }
                    std::hint::spin_loop();
                };
                assert!(tx2.try_push(e).is_ok());
            }
        },
    )
}

fn main() {
    println!("{ROUND_TRIPS} round trips between two threads, best of 3 runs (ns per round trip)");
    let best = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
    let floor = best(&one_line);
    let rows: [(&str, f64); 6] = [
        ("one line, both directions (floor)", floor),
        ("one line per direction, no ring", best(&two_lines)),
        (
            "rings of 2-word handles",
            best(&|| rings(SlabHandle::default())),
        ),
        (
            "rings of 7-word descriptors",
            best(&|| rings(Descriptor::default())),
        ),
        (
            "line per direction + 64 B, same block",
            best(&|| with_payload(true)),
        ),
        (
            "line per direction + 64 B, elsewhere",
            best(&|| with_payload(false)),
        ),
    ];
    for (name, ns) in rows {
        println!("{name:<36} {ns:>7.0} ns  {:>4.1}x floor", ns / floor);
    }
}
