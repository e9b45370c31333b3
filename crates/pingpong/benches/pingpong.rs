//! Two-process round trips: the parent calls an echo child through the
//! shared segment, one call in flight, and criterion times each
//! `Client::call` (allocate, fill and checksum the request, push, ring, wait,
//! check the response and give its slab back).
//!
//! - `rtt/poll`, `rtt/adaptive`, `rtt/block`: one child per group, payloads
//!   of 0 (descriptor only), 64, 4096 and 65536 bytes;
//! - `floor`: two processes bouncing one cache line, the least a round trip
//!   through shared memory can cost on this machine.
//!
//! Run with `cargo bench -p shmesh-pingpong --bench pingpong`. Both processes
//! are busy (spinning) in `poll` mode: on a 2-core machine, run nothing else.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shmesh_pingpong::floor::FloorClient;
use shmesh_pingpong::{Client, PeerRole, PingPongConfig, mode_name};
use shmesh_shm::doorbell::WaitMode;

/// Payload sizes per call; 0 sends a bare descriptor.
const SIZES: [usize; 4] = [0, 64, 4096, 65536];

fn peer() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shmesh-pingpong-peer"))
}

fn rtt(c: &mut Criterion, mode: WaitMode) {
    let config = PingPongConfig::new(mode, *SIZES.iter().max().unwrap()).unwrap();
    let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
    // The first call waits for the child to start and map the segment.
    client
        .call(64, Some(Instant::now() + Duration::from_secs(10)))
        .unwrap();

    let mut group = c.benchmark_group(format!("rtt/{}", mode_name(mode)));
    for len in SIZES {
        group.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, &len| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    client.call(len, None).unwrap();
                }
                start.elapsed()
            });
        });
    }
    group.finish();

    let status = client.shutdown().unwrap().unwrap();
    assert!(status.success(), "echo peer failed: {status}");
}

fn rtt_poll(c: &mut Criterion) {
    rtt(c, WaitMode::Poll);
}

fn rtt_adaptive(c: &mut Criterion) {
    rtt(c, WaitMode::Adaptive);
}

fn rtt_block(c: &mut Criterion) {
    rtt(c, WaitMode::Block);
}

fn floor(c: &mut Criterion) {
    let config = PingPongConfig::new(WaitMode::Poll, 64).unwrap();
    let segment = shmesh_pingpong::create_segment(&config).unwrap();
    let mut child =
        shmesh_pingpong::spawn_peer(peer(), &[], &segment, PeerRole::Floor, config.policy).unwrap();
    let mut floor = FloorClient::new(&segment).unwrap();
    let timeout = Duration::from_secs(10);
    floor.round_trip(timeout).unwrap();

    c.bench_function("floor", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                floor.round_trip(timeout).unwrap();
            }
            start.elapsed()
        });
    });

    floor.stop();
    let status = child.wait().unwrap();
    assert!(status.success(), "floor peer failed: {status}");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = floor, rtt_poll, rtt_adaptive, rtt_block
}
criterion_main!(benches);
