//! The mediated path with real processes: calls through the daemon's
//! engine pipeline to replicas, per-method access, rate limits, and live
//! changes to the pipeline under steady load with no call lost or failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use shmesh::control::{PolicyAnswer, PolicyRequest};
use shmesh::status::Code;

/// The entry point of child processes (see [`common::run_child`]).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child() {
    run_child();
}

fn policy(daemon: &Daemon, request: PolicyRequest) -> PolicyAnswer {
    shmesh_daemon::query_policy(&daemon.address(), request).unwrap()
}

fn mediated_config(dir: &Path, engines: &str) -> std::path::PathBuf {
    let config = dir.join("shmeshd.toml");
    std::fs::write(
        &config,
        format!("[[services]]\nname = \"echo\"\npath = \"mediated\"\n\n{engines}"),
    )
    .unwrap();
    config
}

#[test]
fn mediated_calls_pass_the_engines_and_reach_every_replica() {
    let _serial = serial();
    let dir = scratch("mediated");
    let config = mediated_config(
        &dir,
        "[[engines]]\nkind = \"metrics\"\n\n[[engines]]\nkind = \"access\"\n[[engines.rules]]\naction = \"deny\"\nmethods = [2]\n",
    );
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _a = spawn_child("replica", &daemon, "echo");
    let _b = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("two replicas", |r| replicas(r, "echo") == 2);

    let channels: Vec<_> = (0..2).map(|_| connect(&daemon, "echo")).collect();
    // Three processes take turns on every call: the mediated path's waits
    // give the CPU away between checks.
    assert_eq!(channels[0].limits().wait_mode, shmesh::WaitMode::Yield);
    for (i, channel) in channels.iter().enumerate() {
        for n in 0..50u32 {
            let body = format!("{i}:{n}");
            assert_eq!(echo(channel, body.as_bytes()).unwrap(), body.as_bytes());
        }
    }
    let denied = channels[0]
        .call(ECHO_TOO, b"no", Some(std::time::Duration::from_secs(10)))
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied}");
    assert!(denied.message().contains("rule 1"), "{denied}");

    let report = daemon.wait_for("100 calls counted by the replicas", |r| {
        answered(r, "echo") == 100
    });
    let echo_status = report.services.iter().find(|s| s.name == "echo").unwrap();
    assert_eq!(echo_status.path, "mediated");
    assert_eq!(echo_status.mediated_clients.len(), 2, "{report:#?}");
    // The daemon counted every call, the denied one included …
    let counted: Vec<(u32, u64)> = echo_status
        .mediated
        .iter()
        .map(|m| (m.method, m.calls))
        .collect();
    assert!(counted.contains(&(ECHO, 100)), "{counted:?}");
    assert!(counted.contains(&(ECHO_TOO, 1)), "{counted:?}");
    // … and the replicas answered all the others, between them.
    let answered: u64 = echo_status
        .replicas
        .iter()
        .filter_map(|r| r.stats.as_ref())
        .flat_map(|s| &s.methods)
        .map(|m| m.calls)
        .sum();
    assert_eq!(answered, 100, "{report:#?}");
    // The daemon is a client of each replica.
    for r in &echo_status.replicas {
        assert_eq!(r.connections.len(), 1, "{report:#?}");
        assert_eq!(r.connections[0].caller.app, "shmeshd");
    }
    assert_eq!(report.engines.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rate_limit_is_added_upgraded_with_its_state_and_removed_live() {
    let _serial = serial();
    let dir = scratch("ratelimit");
    let config = mediated_config(&dir, "");
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _a = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");
    assert_eq!(echo(&channel, b"free").unwrap(), b"free");

    // 5 calls of burst, then a bucket that refills once a day.
    let strict = "name = \"limit\"\nkind = \"rate-limit\"\nrate = 0.00001\nburst = 5\nwhen_empty = \"reject\"\n";
    let answer = policy(
        &daemon,
        PolicyRequest::Add {
            spec: strict.into(),
            position: None,
        },
    );
    assert_eq!(answer.error, None);
    for _ in 0..5 {
        echo(&channel, b"x").unwrap();
    }
    let limited = echo(&channel, b"x").unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited}");

    // An upgrade carries the empty bucket over.
    let answer = policy(
        &daemon,
        PolicyRequest::Upgrade {
            name: "limit".into(),
            spec: strict.into(),
        },
    );
    assert_eq!(answer.error, None);
    assert_eq!(
        echo(&channel, b"x").unwrap_err().code(),
        Code::ResourceExhausted
    );
    // A spec that does not parse is refused, naming the key.
    let answer = policy(
        &daemon,
        PolicyRequest::Upgrade {
            name: "limit".into(),
            spec: "kind = \"rate-limit\"\nrate = 1.0\nburst = 1\nspeed = 3\n".into(),
        },
    );
    assert!(
        answer.error.as_deref().unwrap().contains("speed"),
        "{answer:?}"
    );

    // Removed: calls pass again.
    let answer = policy(
        &daemon,
        PolicyRequest::Remove {
            name: "limit".into(),
        },
    );
    assert_eq!(answer.error, None);
    assert!(answer.engines.is_empty());
    assert_eq!(echo(&channel, b"free again").unwrap(), b"free again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_hundred_upgrades_and_a_hundred_add_remove_cycles_lose_no_call() {
    let _serial = serial();
    let dir = scratch("upgrades");
    let config = mediated_config(
        &dir,
        "[[engines]]\nkind = \"metrics\"\n\n[[engines]]\nname = \"limit\"\nkind = \"rate-limit\"\nrate = 1000000.0\nburst = 1000\n\n[[engines]]\nkind = \"qos\"\nmax_in_flight = 2\n",
    );
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _a = spawn_child("replica", &daemon, "echo");
    let _b = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("two replicas", |r| replicas(r, "echo") == 2);

    // Steady load: four callers checking every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let channel = connect(&daemon, "echo");
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!("{i}:{n}");
                    match echo(&channel, body.as_bytes()) {
                        Ok(answer) if answer == body.as_bytes() => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(_) => panic!("wrong answer to {body}"),
                        Err(status) => {
                            eprintln!("call failed: {status}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    n += 1;
                }
            })
        })
        .collect();

    let limit = "name = \"limit\"\nkind = \"rate-limit\"\nrate = 1000000.0\nburst = 1000\n";
    let extra =
        "name = \"extra\"\nkind = \"qos\"\nmax_in_flight = 1\norder = \"earliest-deadline\"\n";
    for round in 0..100 {
        let upgraded = policy(
            &daemon,
            PolicyRequest::Upgrade {
                name: if round % 2 == 0 { "limit" } else { "qos" }.into(),
                spec: if round % 2 == 0 {
                    limit.to_owned()
                } else {
                    "kind = \"qos\"\nmax_in_flight = 2\n".to_owned()
                },
            },
        );
        assert_eq!(upgraded.error, None, "round {round}");
        let added = policy(
            &daemon,
            PolicyRequest::Add {
                spec: extra.into(),
                position: Some(1),
            },
        );
        assert_eq!(added.error, None, "round {round}");
        let removed = policy(
            &daemon,
            PolicyRequest::Remove {
                name: "extra".into(),
            },
        );
        assert_eq!(removed.error, None, "round {round}");
    }
    // Let the callers see the final pipeline too.
    let seen = ok.load(Ordering::Relaxed);
    while ok.load(Ordering::Relaxed) < seen + 100 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 100);
    // The metrics engine counted every call the callers saw answered
    // (it was never replaced, so nothing was lost in between).
    let report = daemon.status();
    let counted: u64 = report.services[0].mediated.iter().map(|m| m.calls).sum();
    assert_eq!(counted, ok.load(Ordering::Relaxed), "{report:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mediated_clients_reconnect_after_a_daemon_restart_as_they_chose() {
    use shmesh::client::{Gap, ReconnectingChannel};
    let _serial = serial();
    let dir = scratch("reconnect");
    let config = mediated_config(&dir, "[[engines]]\nkind = \"metrics\"\n");
    let socket = dir.join("d.sock");
    let mut daemon = Daemon::start(&socket, Some(&config));
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let options = options(&daemon, "echo", SCHEMA);
    let waiting =
        ReconnectingChannel::new("shm+svc://echo", options.clone(), Gap::WaitUntilDeadline);
    let failing = ReconnectingChannel::new("shm+svc://echo", options, Gap::FailFast);
    let timeout = Some(std::time::Duration::from_secs(30));
    assert_eq!(&waiting.call(ECHO, b"a", timeout).unwrap()[..], b"a");
    assert_eq!(&failing.call(ECHO, b"b", timeout).unwrap()[..], b"b");

    // The daemon dies: both mediated connections go with it.
    daemon.process.kill9();
    let deadline = std::time::Instant::now() + WATCHDOG;
    while waiting.is_connected() || failing.is_connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "connections never noticed"
        );
        std::thread::yield_now();
    }
    // Fail fast: Unavailable at once, naming why.
    let err = failing.call(ECHO, b"c", timeout).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("cannot connect"), "{err}");
    // Wait: the call rides out the gap and is answered once the daemon is
    // back and the replica has registered again.
    let config_again = config.clone();
    let socket_again = socket.clone();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        Daemon::start(&socket_again, Some(&config_again))
    });
    assert_eq!(&waiting.call(ECHO, b"d", timeout).unwrap()[..], b"d");
    let _daemon = restart.join().unwrap();
    assert_eq!(&failing.call(ECHO, b"e", timeout).unwrap()[..], b"e");
    let _ = std::fs::remove_dir_all(&dir);
}

fn count_request(count: u32, size: u32) -> Vec<u8> {
    let mut request = count.to_le_bytes().to_vec();
    request.extend_from_slice(&size.to_le_bytes());
    request
}

/// How many calls of `method` ended with `code` in `stats`.
fn ended_with(stats: &[shmesh::control::MethodStats], method: u32, code: Code) -> u64 {
    stats
        .iter()
        .filter(|m| m.method == method)
        .flat_map(|m| &m.by_code)
        .filter(|(c, _)| *c == code as u8)
        .map(|(_, n)| n)
        .sum()
}

/// The daemon's own counts of the mediated calls to `service`.
fn mediated(report: &shmesh::control::StatusReport) -> &[shmesh::control::MethodStats] {
    report
        .services
        .iter()
        .find(|s| s.name == "echo")
        .map_or(&[], |s| &s.mediated[..])
}

/// The replicas' counts of the calls they served, added up per method.
fn served(report: &shmesh::control::StatusReport) -> Vec<shmesh::control::MethodStats> {
    report
        .services
        .iter()
        .filter(|s| s.name == "echo")
        .flat_map(|s| &s.replicas)
        .filter_map(|r| r.stats.as_ref())
        .flat_map(|s| s.methods.iter().cloned())
        .collect()
}

/// Waits until `cond` holds (a watchdog, not a timing assertion).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let give_up = std::time::Instant::now() + WATCHDOG;
    while !cond() {
        assert!(
            std::time::Instant::now() < give_up,
            "never happened: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A server stream still flows through the mediator: the daemon's health
/// check after a peer died.
fn a_stream_flows(channel: &shmesh::client::Channel) {
    let timeout = Some(std::time::Duration::from_secs(60));
    let mut call = channel
        .server_stream(COUNT, &count_request(40, 16), timeout)
        .unwrap();
    let mut next = 0u32;
    while let Some(m) = call.recv().unwrap() {
        assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), next);
        next += 1;
    }
    assert_eq!(next, 40);
}

#[test]
fn mediated_streams_of_every_kind_arrive_intact_in_order_through_the_engines() {
    let _serial = serial();
    let dir = scratch("streams");
    let config = mediated_config(
        &dir,
        "[[engines]]\nkind = \"metrics\"\n\n[[engines]]\nname = \"limit\"\nkind = \"rate-limit\"\nrate = 1000000.0\nburst = 1000\n",
    );
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _a = spawn_child("replica", &daemon, "echo");
    let _b = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("two replicas", |r| replicas(r, "echo") == 2);
    let channel = connect(&daemon, "echo");
    let timeout = Some(std::time::Duration::from_secs(60));

    // Server streaming: far more messages than the flow-control window,
    // and messages larger than the largest slab (sent in chunks).
    for (count, size) in [(1000u32, 64u32), (3, 3 << 20)] {
        let mut call = channel
            .server_stream(COUNT, &count_request(count, size), timeout)
            .unwrap();
        let mut next = 0u32;
        while let Some(m) = call.recv().unwrap() {
            assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), next);
            assert_eq!(m.len(), size as usize);
            assert!(m[4..].iter().all(|&b| b == (next % 251) as u8), "{next}");
            next += 1;
        }
        assert_eq!(next, count);
    }

    // Client streaming, one message larger than a slab among them.
    let mut call = channel.open(SUM, timeout).unwrap();
    let mut expected = 0u64;
    for i in 0..2000u64 {
        let message = vec![(i % 256) as u8; (i % 300) as usize];
        expected += message.iter().map(|&b| u64::from(b)).sum::<u64>();
        call.send(&message).unwrap();
    }
    call.send(&vec![1u8; 3 << 20]).unwrap();
    expected += 3 << 20;
    let answer = call.finish().unwrap();
    assert_eq!(
        u64::from_le_bytes(answer[..8].try_into().unwrap()),
        expected
    );
    assert_eq!(u64::from_le_bytes(answer[8..16].try_into().unwrap()), 2001);
    drop(answer);

    // Bidirectional, sending and receiving from two threads at once.
    let size =
        |i: u32| 4 + (i as usize * 7919) % 9000 + if i.is_multiple_of(97) { 2 << 20 } else { 0 };
    let mut call = channel.open(ECHO_STREAM, timeout).unwrap();
    let (mut incoming, mut outgoing) = call.split();
    std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..500u32 {
                let mut m = i.to_le_bytes().to_vec();
                m.resize(size(i), i as u8);
                outgoing.send(&m).unwrap();
            }
            outgoing.close_send().unwrap();
        });
        for i in 0..500u32 {
            let m = incoming.recv().unwrap().unwrap();
            assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), i);
            assert_eq!(m.len(), size(i));
            assert!(m[4..].iter().all(|&b| b == i as u8), "{i}");
        }
        assert!(incoming.recv().unwrap().is_none());
    });
    drop(call);
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);

    // The engines admit a stream once: a bucket of one token lets one
    // stream through and refuses the next, as its status.
    let answer = policy(
        &daemon,
        PolicyRequest::Remove {
            name: "limit".into(),
        },
    );
    assert_eq!(answer.error, None);
    let strict = "name = \"strict\"\nkind = \"rate-limit\"\nrate = 0.00001\nburst = 1\nwhen_empty = \"reject\"\n";
    let answer = policy(
        &daemon,
        PolicyRequest::Add {
            spec: strict.into(),
            position: None,
        },
    );
    assert_eq!(answer.error, None);
    let mut call = channel
        .server_stream(COUNT, &count_request(100, 8), timeout)
        .unwrap();
    let mut received = 0;
    while call.recv().unwrap().is_some() {
        received += 1;
    }
    assert_eq!(received, 100);
    let refused = channel
        .server_stream(COUNT, &count_request(100, 8), timeout)
        .unwrap()
        .recv()
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");

    // The metrics engine counted each stream once, with its final code
    // (the replica's own counters arrive through its load page, within a
    // tick).
    let report = daemon.wait_for("the replica's counters", |r| {
        ended_with(&served(r), COUNT, Code::Ok) == 3
    });
    let counted = mediated(&report);
    assert_eq!(ended_with(counted, COUNT, Code::Ok), 3, "{counted:?}");
    assert_eq!(ended_with(counted, COUNT, Code::ResourceExhausted), 1);
    assert_eq!(ended_with(counted, SUM, Code::Ok), 1, "{counted:?}");
    assert_eq!(ended_with(counted, ECHO_STREAM, Code::Ok), 1, "{counted:?}");
    let replicas_served = served(&report);
    assert_eq!(ended_with(&replicas_served, COUNT, Code::Ok), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replica_killed_mid_stream_fails_its_streams_unavailable() {
    let _serial = serial();
    let dir = scratch("replica-killed");
    let config = mediated_config(&dir, "[[engines]]\nkind = \"metrics\"\n");
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let mut replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");
    let timeout = Some(std::time::Duration::from_secs(60));

    let mut forever = channel.server_stream(FOREVER, b"go", timeout).unwrap();
    for i in 0..3u64 {
        let m = forever.recv().unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(m[..8].try_into().unwrap()), i);
    }
    let mut echo = channel.open(ECHO_STREAM, timeout).unwrap();
    echo.send(b"hello").unwrap();
    assert_eq!(&echo.recv().unwrap().unwrap()[..], b"hello");

    replica.kill9();
    // What was on its way still arrives, then the end. Flow control holds
    // end to end: however fast the replica sent while this client read
    // nothing, no more than a window waited here, the message the daemon
    // was forwarding, and a window in the daemon.
    let mut drained = 0;
    let err = loop {
        match forever.recv() {
            Ok(Some(_)) => drained += 1,
            Ok(None) => panic!("the stream ended well"),
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    let bound = 2 * shmesh::protocol::WINDOW + 8;
    assert!(drained <= bound, "{drained} messages were buffered");
    let err = echo.recv().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    drop((forever, echo));

    // The daemon is unharmed: a new replica serves calls and streams.
    daemon.wait_for("the dead replica gone", |r| replicas(r, "echo") == 0);
    let _again = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("a new replica", |r| replicas(r, "echo") == 1);
    assert_eq!(echo_call(&channel, b"still here"), b"still here");
    a_stream_flows(&channel);
    let report = daemon.status();
    let counted = mediated(&report);
    assert_eq!(
        ended_with(counted, FOREVER, Code::Unavailable),
        1,
        "{counted:?}"
    );
    assert_eq!(ended_with(counted, ECHO_STREAM, Code::Unavailable), 1);
    eventually("slabs return", || channel.pool_in_use() == 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_killed_mid_stream_cancels_its_streams_upstream() {
    let _serial = serial();
    let dir = scratch("client-killed");
    let config = mediated_config(&dir, "[[engines]]\nkind = \"metrics\"\n");
    let socket = dir.join("d.sock");
    let daemon = Daemon::start(&socket, Some(&config));
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);

    // The streamer holds a server stream (which it no longer reads, so the
    // replica waits for credit) and a bidirectional one open.
    let mut streamer = spawn_child("streamer", &daemon, "echo");
    let marker = dir.join("d.sock.streaming");
    eventually("the streamer is streaming", || marker.exists());
    streamer.kill9();

    // The replica's handlers see their streams cancelled, and so end.
    let report = daemon.wait_for("both streams cancelled in the replica", |r| {
        let served = served(r);
        ended_with(&served, FOREVER, Code::Cancelled) == 1
            && ended_with(&served, ECHO_STREAM, Code::Cancelled) == 1
    });
    let counted = mediated(&report);
    assert_eq!(
        ended_with(counted, FOREVER, Code::Cancelled),
        1,
        "{counted:?}"
    );
    assert_eq!(ended_with(counted, ECHO_STREAM, Code::Cancelled), 1);

    // The daemon is unharmed.
    let channel = connect(&daemon, "echo");
    assert_eq!(echo_call(&channel, b"still here"), b"still here");
    a_stream_flows(&channel);
    let _ = std::fs::remove_dir_all(&dir);
}

fn echo_call(channel: &shmesh::client::Channel, body: &[u8]) -> Vec<u8> {
    echo(channel, body).unwrap()
}
