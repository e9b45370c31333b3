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
