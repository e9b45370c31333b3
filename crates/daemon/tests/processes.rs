//! shmeshd with real processes: the daemon is the `shmeshd` binary,
//! replicas and some clients are this test binary started again as a child
//! (see [`child`]), the rest of the clients run in the test process. Every
//! wait is bounded by a watchdog that fails the test; nothing asserts a
//! duration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shmesh::client::Channel;
use shmesh::status::Code;
use shmesh::{RefuseReason, SchemaHash};

/// How many connection segments process `pid` maps.
fn mapped_segments(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("shmesh:conn-"))
        .count()
}

/// The entry point of child processes (see [`common::run_child`]).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child() {
    run_child();
}

#[test]
fn brokered_connections_spread_over_replicas_and_show_in_status_and_metrics() {
    let _serial = serial();
    let dir = scratch("brokered");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let _a = spawn_child("replica", &daemon, "echo");
    let _b = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("two replicas", |r| replicas(r, "echo") == 2);

    let channels: Vec<Channel> = (0..4).map(|_| connect(&daemon, "echo")).collect();
    // The kernel's record of a brokered connection names the daemon, so a
    // channel does not claim to know the server's identity.
    assert!(channels.iter().all(|c| c.peer().is_none()));
    for (i, channel) in channels.iter().enumerate() {
        for n in 0..100u32 {
            let body = format!("{i}:{n}");
            assert_eq!(echo(channel, body.as_bytes()).unwrap(), body.as_bytes());
        }
    }
    // The replicas' counters come from their load pages, read by the
    // daemon from shared memory: published within a tick.
    let report = daemon.wait_for("four connections and 400 calls counted", |r| {
        connections(r, "echo").iter().sum::<usize>() == 4 && answered(r, "echo") == 400
    });
    // The least-loaded replica gets each new connection.
    assert_eq!(connections(&report, "echo"), vec![2, 2], "{report:#?}");
    // The daemon made the four segments but keeps none of them mapped.
    let deadline = Instant::now() + WATCHDOG;
    while mapped_segments(daemon.process.0.id() as i32) != 0 {
        assert!(Instant::now() < deadline, "the daemon kept segments mapped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let echo_status = &report.services[0];
    assert_eq!(echo_status.grants_total, 4);
    let calls: u64 = echo_status
        .replicas
        .iter()
        .filter_map(|r| r.stats.as_ref())
        .flat_map(|s| &s.methods)
        .map(|m| m.calls)
        .sum();
    assert_eq!(calls, 400, "{report:#?}");
    for r in &echo_status.replicas {
        for c in &r.connections {
            assert_eq!(c.caller.pid, std::process::id() as i32);
        }
    }

    let text = daemon.metrics_text();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains("shmesh_replicas{service=\"echo\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("shmesh_grants_total{service=\"echo\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("shmesh_calls_total{service=\"echo\""),
        "{text}"
    );
    assert!(text.contains("code=\"Ok\"} 200"), "{text}");

    // A client built from another schema, and one for a service nobody
    // serves, are refused with reasons they can act on.
    let err = Channel::connect(
        "shm+svc://echo",
        &options(&daemon, "echo", SchemaHash([8; 32])),
    )
    .unwrap_err();
    assert!(
        matches!(err.refusal(), Some(RefuseReason::SchemaMismatch { server, .. }) if *server == SCHEMA),
        "{err}"
    );
    let err =
        Channel::connect("shm+svc://nobody", &options(&daemon, "nobody", SCHEMA)).unwrap_err();
    assert!(
        matches!(err.refusal(), Some(RefuseReason::NoReplica { .. })),
        "{err}"
    );
    let report = daemon.status();
    assert_eq!(report.services[0].refusals_total, 1, "{report:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn access_rules_refuse_at_connect_and_name_the_rule() {
    let _serial = serial();
    let dir = scratch("access");
    let uid = rustix::process::geteuid().as_raw();
    let config = dir.join("shmeshd.toml");
    std::fs::write(
        &config,
        format!(
            "[access]\ndefault = \"allow\"\n\n[[access.rules]]\naction = \"deny\"\nservice = \"secret\"\nuid = {uid}\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    let _secret = spawn_child("replica", &daemon, "secret");
    let _open = spawn_child("replica", &daemon, "open");
    daemon.wait_for("both services", |r| {
        replicas(r, "secret") == 1 && replicas(r, "open") == 1
    });

    let err =
        Channel::connect("shm+svc://secret", &options(&daemon, "secret", SCHEMA)).unwrap_err();
    assert!(
        matches!(err.refusal(), Some(RefuseReason::Denied { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("access rule 1"), "{err}");
    let open = connect(&daemon, "open");
    assert_eq!(echo(&open, b"hi").unwrap(), b"hi");
    let report = daemon.status();
    let secret = report.services.iter().find(|s| s.name == "secret").unwrap();
    assert_eq!((secret.grants_total, secret.refusals_total), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_clients_and_replicas_are_noticed_and_their_grants_revoked() {
    let _serial = serial();
    let dir = scratch("killed");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let mut replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);

    // A client process killed mid-calls: its connection goes away.
    let mut client = spawn_child("client", &daemon, "echo");
    daemon.wait_for("the client's connection", |r| connections(r, "echo") == [1]);
    let replica_pid = replica.0.id() as i32;
    let deadline = Instant::now() + WATCHDOG;
    while mapped_segments(replica_pid) != 1 {
        assert!(
            Instant::now() < deadline,
            "the replica never mapped the segment"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    client.kill9();
    daemon.wait_for("the killed client's connection to go", |r| {
        connections(r, "echo") == [0]
    });
    // Its segment is gone from the replica too.
    let deadline = Instant::now() + WATCHDOG;
    while mapped_segments(replica_pid) != 0 {
        assert!(
            Instant::now() < deadline,
            "the replica kept the dead client's segment"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // The replica killed under a live channel: the channel fails with
    // Unavailable, the replica leaves the registry, new clients are told.
    let channel = connect(&daemon, "echo");
    assert_eq!(echo(&channel, b"before").unwrap(), b"before");
    replica.kill9();
    let deadline = Instant::now() + WATCHDOG;
    let status = loop {
        match echo(&channel, b"after") {
            Err(status) => break status,
            Ok(_) => assert!(Instant::now() < deadline, "calls still answered"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    daemon.wait_for("the replica to go", |r| replicas(r, "echo") == 0);
    let err = Channel::connect("shm+svc://echo", &options(&daemon, "echo", SCHEMA)).unwrap_err();
    assert!(
        matches!(err.refusal(), Some(RefuseReason::NoReplica { .. })),
        "{err}"
    );

    // A new replica takes over.
    let _replacement = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the new replica", |r| replicas(r, "echo") == 1);
    assert_eq!(echo(&connect(&daemon, "echo"), b"again").unwrap(), b"again");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_daemon_gets_its_replicas_back_and_connections_never_notice() {
    let _serial = serial();
    let dir = scratch("restart");
    let socket = dir.join("d.sock");
    let mut daemon = Daemon::start(&socket, None);
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");
    assert_eq!(echo(&channel, b"one").unwrap(), b"one");

    daemon.process.kill9();
    // Granted connections never touch the daemon.
    for n in 0..1000u32 {
        assert_eq!(echo(&channel, &n.to_le_bytes()).unwrap(), n.to_le_bytes());
    }
    // New connections cannot be brokered meanwhile.
    assert!(Channel::connect("shm+svc://echo", &options(&daemon, "echo", SCHEMA)).is_err());

    let daemon = Daemon::start(&socket, None);
    daemon.wait_for("the replica to register again", |r| {
        replicas(r, "echo") == 1
    });
    assert_eq!(echo(&connect(&daemon, "echo"), b"two").unwrap(), b"two");
    assert_eq!(echo(&channel, b"three").unwrap(), b"three");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_file_is_named_with_its_line_and_key() {
    let dir = scratch("config");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[metrics]\nenabled = true\ncolour = \"blue\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_shmeshd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(dir.join("d.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:3:1: key `colour`: unknown field `colour`",
        config.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nothing_a_process_sends_stops_the_daemon() {
    use shmesh::control::{self, Registration, ToDaemon};
    use std::io::Write;
    let _serial = serial();
    let dir = scratch("hostile");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("the replica", |r| replicas(r, "echo") == 1);
    let address = daemon.address();

    // Raw bytes: no framing at all, an absurd length prefix, a frame cut
    // short, a frame of zeros.
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        u32::MAX.to_le_bytes().to_vec(),
        [16u32.to_le_bytes().to_vec(), vec![1, 2, 3]].concat(),
        [64u32.to_le_bytes().to_vec(), vec![0; 64]].concat(),
    ] {
        let mut raw = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        let _ = raw.write_all(&bytes);
    }
    // Well-framed nonsense: garbage, a control header with a garbage body,
    // a registration whose policy is not a Hello, answers sent unasked.
    let hostile: Vec<Vec<u8>> = vec![
        (0..200u8).collect(),
        [
            control::MAGIC.to_vec(),
            control::VERSION.to_le_bytes().to_vec(),
            vec![0xff; 40],
        ]
        .concat(),
        control::encode(&ToDaemon::Register(Registration {
            app: "evil".into(),
            policy: vec![0xAA; 300],
        })),
        control::encode(&ToDaemon::Closed { connection: 42 }),
        control::encode(&ToDaemon::Resolve {
            service: "x".repeat(100_000),
        }),
    ];
    for message in &hostile {
        let mut conn = shmesh::socket::connect(&address).unwrap();
        let _ = conn.send_msg(message, &[]);
        let _ = conn.recv_msg(0);
    }
    // A registered "replica" that then talks nonsense is dropped, not the
    // daemon.
    {
        let mut conn = shmesh::socket::connect(&address).unwrap();
        let hello = shmesh::handshake::Hello {
            protocol_version: shmesh::handshake::PROTOCOL_VERSION,
            service: shmesh::ServiceName::new("evil").unwrap(),
            schema_hash: SCHEMA,
            requested: shmesh::Limits::default(),
        };
        let policy = shmesh::handshake::encode(&shmesh::handshake::Msg::Hello(hello));
        let register = control::encode(&ToDaemon::Register(Registration {
            app: "evil".into(),
            policy,
        }));
        // Without a load page: refused.
        let mut bare = shmesh::socket::connect(&address).unwrap();
        bare.send_msg(&register, &[]).unwrap();
        let (answer, _) = bare.recv_msg(0).unwrap();
        assert!(matches!(
            control::decode_from_daemon(&answer),
            Ok(control::FromDaemon::Refused { .. })
        ));
        // With one: registered, then nonsense.
        let page = shmesh_shm::load::LoadPage::create().unwrap();
        conn.send_msg(&register, &[page.fd()]).unwrap();
        let (answer, _) = conn.recv_msg(0).unwrap();
        assert!(matches!(
            control::decode_from_daemon(&answer),
            Ok(control::FromDaemon::Registered { .. })
        ));
        // Its counters, read from its page, are garbage: status and
        // metrics go on without them.
        page.publish_report(&[0xff; 300]).unwrap();
        let report = daemon.wait_for("the evil replica", |r| replicas(r, "evil") == 1);
        let evil = report.services.iter().find(|s| s.name == "evil").unwrap();
        assert!(evil.replicas[0].stats.is_none(), "{evil:#?}");
        let forged = control::encode_report(&control::ReplicaStats {
            methods: vec![control::MethodStats {
                method: 1,
                calls: 1,
                by_code: vec![(200, 1)],
                latency: vec![1; 1000],
            }],
            connections_total: 1,
        });
        page.publish_report(&forged).unwrap();
        let report = daemon.status();
        let evil = report.services.iter().find(|s| s.name == "evil").unwrap();
        assert!(evil.replicas[0].stats.is_none(), "{evil:#?}");
        let text = daemon.metrics_text();
        assert!(text.contains(" 200 "), "{text}");
        conn.send_msg(&[0xde, 0xad, 0xbe, 0xef], &[]).unwrap();
        let _ = conn.recv_msg(0);
    }
    daemon.wait_for("the evil replica to be dropped", |r| {
        replicas(r, "evil") == 0
    });
    // The daemon still brokers honest clients.
    assert_eq!(
        echo(&connect(&daemon, "echo"), b"still here").unwrap(),
        b"still here"
    );
    assert!(
        !daemon.log.lock().unwrap().contains("panicked"),
        "{}",
        daemon.log.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_the_configured_user_may_serve_a_service() {
    use shmesh::server::{Router, Server};
    let _serial = serial();
    let dir = scratch("replica-uid");
    let me = rustix::process::geteuid().as_raw();
    // Root may serve anything, so as root the intruder is a child running
    // as nobody; otherwise this process, configured out.
    let allowed = if me == 0 { 1000 } else { me + 1 };
    let config = dir.join("shmeshd.toml");
    std::fs::write(
        &config,
        format!("[[services]]\nname = \"payroll\"\nreplica_uid = {allowed}\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&dir.join("d.sock"), Some(&config));
    if me == 0 {
        use std::os::unix::process::CommandExt;
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--ignored", "--nocapture", "--quiet"])
            .env("SHMESHD_TEST_ROLE", "replica")
            .env("SHMESHD_TEST_SOCKET", &daemon.socket)
            .env("SHMESHD_TEST_SERVICE", "payroll")
            .uid(65534)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stderr.contains("may not serve it") || stdout.contains("may not serve it"),
            "stdout:\n{stdout}\nstderr:\n{stderr}"
        );
    } else {
        let err =
            Server::register_with(&daemon.address(), "payroll", SCHEMA, Router::new()).unwrap_err();
        assert!(err.to_string().contains("may not serve it"), "{err}");
    }
    assert_eq!(replicas(&daemon.status(), "payroll"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn balancing_clients_spread_calls_and_fail_over_when_a_replica_dies() {
    use shmesh::client::BalancedChannel;
    let _serial = serial();
    let dir = scratch("balanced");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let mut replicas_running: Vec<Reaped> = (0..3)
        .map(|_| spawn_child("replica", &daemon, "echo"))
        .collect();
    daemon.wait_for("three replicas", |r| replicas(r, "echo") == 3);

    let channel =
        BalancedChannel::connect("shm+svc://echo", options(&daemon, "echo", SCHEMA)).unwrap();
    assert_eq!(channel.replicas().len(), 3);
    let timeout = Some(Duration::from_secs(10));
    for n in 0..300u32 {
        let body = n.to_le_bytes();
        assert_eq!(&channel.call(ECHO, &body, timeout).unwrap()[..], body);
    }
    // Every replica answered some of them.
    let report = daemon.wait_for("300 calls counted", |r| answered(r, "echo") == 300);
    let per_replica: Vec<u64> = report.services[0]
        .replicas
        .iter()
        .map(|r| {
            r.stats
                .as_ref()
                .map_or(0, |s| s.methods.iter().map(|m| m.calls).sum())
        })
        .collect();
    assert_eq!(per_replica.iter().sum::<u64>(), 300, "{per_replica:?}");
    assert!(per_replica.iter().all(|&n| n > 0), "{per_replica:?}");

    // One replica dies: once the client has seen it, every call goes to
    // the others.
    let victim = report.services[0].replicas[0].id;
    let victim_pid = report.services[0].replicas[0].process.as_ref().unwrap().pid;
    let index = replicas_running
        .iter()
        .position(|r| r.0.id() as i32 == victim_pid)
        .unwrap();
    replicas_running[index].kill9();
    let deadline = Instant::now() + WATCHDOG;
    while channel.live().contains(&victim) {
        assert!(
            Instant::now() < deadline,
            "the client never saw the replica die"
        );
        std::thread::yield_now();
    }
    for n in 0..300u32 {
        let body = n.to_le_bytes();
        assert_eq!(&channel.call(ECHO, &body, timeout).unwrap()[..], body);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn changing_a_registered_servers_limits_replaces_its_registration() {
    use shmesh::server::{BackgroundServer, Router, Server};
    let _serial = serial();
    let dir = scratch("limits");
    let daemon = Daemon::start(&dir.join("d.sock"), None);
    let router = Router::new().route(ECHO, |request| Ok(request.payload.to_vec()));
    let mut server = Server::register_with(&daemon.address(), "echo", SCHEMA, router).unwrap();
    server.set_max_limits(shmesh::Limits {
        max_message: 1 << 20,
        ..shmesh::Limits::default()
    });
    let _server = BackgroundServer::spawn(server).unwrap();
    daemon.wait_for("one replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");
    assert_eq!(echo(&channel, b"limits").unwrap(), b"limits");
    // The new limits were negotiated, and the old registration is gone.
    assert_eq!(channel.limits().max_message, 1 << 20);
    assert_eq!(replicas(&daemon.status(), "echo"), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
