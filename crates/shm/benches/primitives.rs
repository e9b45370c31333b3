//! Micro-benchmarks of the shared-memory primitives, each on one thread:
//!
//! - `ring/push_pop`: one descriptor pushed and popped on a heap ring of 1024;
//! - `ring/batch32`: 32 descriptors through `push_batch` + `pop_batch`
//!   (reported per element);
//! - `pool/alloc_drop`: a 64-byte slab loaned and dropped (Loaned → Free);
//! - `pool/alloc_send_release`: the full owner cycle, alloc → send →
//!   `release_returned`;
//! - `doorbell/notify_no_sleepers`: what a producer pays per message while
//!   the consumer is awake (no system call), for the futex and the eventfd
//!   doorbell.
//!
//! Run with `cargo bench -p shmesh-shm --bench primitives`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::doorbell::{Doorbell, EventDoorbell};
use shmesh_shm::pool::{Pool, PoolConfig};
use shmesh_shm::ring;

/// Ring capacity used throughout.
const RING_CAPACITY: usize = 1024;
/// Descriptors per batch.
const BATCH: usize = 32;

fn descriptor(call_id: u64) -> Descriptor {
    Descriptor {
        call_id,
        method_id: 1,
        flags: Flags::END,
        ..Default::default()
    }
}

fn ring_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");

    let (mut tx, mut rx) = ring::channel::<Descriptor>(RING_CAPACITY).unwrap();
    let mut id = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop", |b| {
        b.iter(|| {
            id += 1;
            tx.try_push(black_box(descriptor(id))).unwrap();
            black_box(rx.try_pop().unwrap().unwrap())
        });
    });

    let (mut tx, mut rx) = ring::channel::<Descriptor>(RING_CAPACITY).unwrap();
    let batch: Vec<Descriptor> = (0..BATCH as u64).map(descriptor).collect();
    let mut out = Vec::with_capacity(BATCH);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch32", |b| {
        b.iter(|| {
            assert_eq!(tx.push_batch(black_box(&batch)).unwrap(), BATCH);
            out.clear();
            assert_eq!(rx.pop_batch(&mut out, BATCH).unwrap(), BATCH);
            black_box(&out);
        });
    });
    group.finish();
}

fn pool_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(1));
    let pool = Pool::new_heap(0, &PoolConfig::default()).unwrap();

    group.bench_function("alloc_drop", |b| {
        b.iter(|| drop(black_box(pool.alloc(black_box(64)).unwrap())));
    });

    group.bench_function("alloc_send_release", |b| {
        b.iter(|| {
            let handle = pool.alloc(black_box(64)).unwrap().send();
            pool.release_returned(black_box(handle)).unwrap();
        });
    });
    assert_eq!(pool.occupancy().in_use(), 0);
    group.finish();
}

fn doorbell_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("doorbell/notify_no_sleepers");
    group.throughput(Throughput::Elements(1));

    let bell = Doorbell::new_heap();
    group.bench_function("futex", |b| {
        b.iter(|| assert!(!black_box(&bell).notify()));
    });

    let event = EventDoorbell::new_heap().unwrap();
    group.bench_function("eventfd", |b| {
        b.iter(|| assert!(!black_box(&event).notify()));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = ring_benches, pool_benches, doorbell_benches
}
criterion_main!(benches);
