//! Two real processes sharing a segment: a healthy peer, a peer killed with
//! SIGKILL, and a hostile peer scribbling over the shared memory.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use shmesh_pingpong::{Client, PeerRole, PingPongConfig, PingPongError};
use shmesh_shm::doorbell::WaitMode;

/// The tests below each keep two processes busy; on a 2-core machine they
/// run one at a time, or spinning waiters starve each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn peer() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shmesh-pingpong-peer"))
}

/// Payload sizes cycle through empty, tiny, cache-line-straddling, a page and
/// a large slab, so every size class and the no-payload path are exercised.
fn size(i: u64) -> usize {
    [0, 1, 63, 200, 4096, 3000, 100, 70_000][(i % 8) as usize]
}

/// 1,000,000 descriptors each way, with checksummed payloads, up to 32 in
/// flight. The client checks every response's call id, length, checksum and
/// content; the peer checks every request's. A loss, duplicate, reordering
/// or corruption fails the run.
#[test]
fn a_million_calls_between_two_processes() {
    let _serial = serial();
    const CALLS: u64 = 1_000_000;
    const DEPTH: u64 = 32;
    let config = PingPongConfig::new(WaitMode::Adaptive, 70_000).unwrap();
    let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
    let watchdog = || Some(Instant::now() + Duration::from_secs(30));
    let (mut sent, mut received) = (0, 0);
    while received < CALLS {
        while sent < CALLS && sent - received < DEPTH {
            client.send(size(sent), watchdog()).unwrap();
            sent += 1;
        }
        assert_eq!(client.recv(watchdog()).unwrap(), received);
        received += 1;
    }
    let status = client.shutdown().unwrap().unwrap();
    assert!(status.success(), "peer failed: {status}");
}

/// A peer killed with SIGKILL while holding request slabs: the client's calls
/// fail (they do not hang), and the pool takes back everything the dead peer
/// held.
#[test]
fn slabs_held_by_a_killed_peer_are_reclaimed() {
    let _serial = serial();
    let config = PingPongConfig::new(WaitMode::Adaptive, 4096).unwrap();
    for round in 0..5 {
        let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
        let pid = client.peer_pid().unwrap();
        for i in 0..1000 {
            client.call(size(i) % 4096, None).unwrap();
        }
        // Requests in flight when the peer dies.
        for i in 0..16 {
            client.send(4000 + i, None).unwrap();
        }
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut failed = false;
        while client.in_flight() > 0 {
            match client.recv(Some(deadline)) {
                Ok(_) => {}
                Err(PingPongError::PeerExited(_) | PingPongError::TimedOut) => {
                    failed = true;
                    break;
                }
                Err(e) => panic!("round {round}: unexpected {e}"),
            }
        }
        if !failed {
            // The peer answered everything before it died: nothing to reclaim
            // on that side, but the next call must fail.
            assert!(
                client
                    .call(10, Some(Instant::now() + Duration::from_secs(2)))
                    .is_err()
            );
        }
        let reclaimed = client.reclaim_from_dead_peer().unwrap();
        assert_eq!(
            client.pool().occupancy().in_use(),
            0,
            "round {round}: reclaimed {reclaimed}"
        );
    }
}

/// A peer that serves while writing random words over ring indices,
/// descriptors, pool slabs, doorbells and the header. The client must report
/// each problem as an error, never crash or hang, and a healthy peer must be
/// served normally afterwards.
#[test]
fn hostile_peer_cannot_crash_or_hang_the_client() {
    let _serial = serial();
    let config = PingPongConfig::new(WaitMode::Adaptive, 4096).unwrap();
    let mut errors: std::collections::BTreeMap<String, u32> = Default::default();
    let mut calls_ok = 0u64;
    for _ in 0..20 {
        let round_end = Instant::now() + Duration::from_secs(1);
        let mut client = Client::spawn(&config, peer(), &[], PeerRole::Hostile).unwrap();
        // A hostile peer can make us miss a wake-up (it may zero the
        // doorbell's sleeper count), so a call may take up to its deadline:
        // bounded by time, not by count.
        for i in 0.. {
            if Instant::now() > round_end {
                break;
            }
            match client.call(
                size(i) % 4096,
                Some(Instant::now() + Duration::from_millis(100)),
            ) {
                Ok(()) => calls_ok += 1,
                Err(e) => {
                    let kind = format!("{e:?}");
                    let kind = kind.split(['(', ' ', '{']).next().unwrap_or("?").to_owned();
                    *errors.entry(kind).or_default() += 1;
                    break;
                }
            }
        }
    }
    eprintln!("hostile peer: {calls_ok} calls succeeded; errors by kind: {errors:?}");
    assert!(!errors.is_empty(), "scribbling went unnoticed");
    let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
    for i in 0..1000 {
        client
            .call(
                size(i) % 4096,
                Some(Instant::now() + Duration::from_secs(30)),
            )
            .unwrap();
    }
    assert!(client.shutdown().unwrap().unwrap().success());
}

/// Every wait mode works across processes (the floor too).
#[test]
fn every_wait_mode_across_processes() {
    let _serial = serial();
    for mode in [WaitMode::Poll, WaitMode::Adaptive, WaitMode::Block] {
        let config = PingPongConfig::new(mode, 4096).unwrap();
        let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
        for i in 0..2000 {
            client
                .call(
                    size(i) % 4096,
                    Some(Instant::now() + Duration::from_secs(30)),
                )
                .unwrap();
        }
        assert!(client.shutdown().unwrap().unwrap().success());
    }
    let config = PingPongConfig::new(WaitMode::Poll, 64).unwrap();
    let segment = shmesh_pingpong::create_segment(&config).unwrap();
    let mut child =
        shmesh_pingpong::spawn_peer(peer(), &[], &segment, PeerRole::Floor, config.policy).unwrap();
    let mut floor = shmesh_pingpong::floor::FloorClient::new(&segment).unwrap();
    for _ in 0..10_000 {
        floor.round_trip(Duration::from_secs(30)).unwrap();
    }
    floor.stop();
    assert!(child.wait().unwrap().success());
}
