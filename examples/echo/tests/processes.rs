//! The echo server and clients as real processes: a million calls, clients
//! killed with SIGKILL a hundred times, the server killed under load, and a
//! hostile client writing forged descriptors.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shmesh::client::{Channel, ChannelOptions};
use shmesh::status::Code;
use shmesh_example_echo::{ECHO, ECHO_STREAM, SCHEMA, SERVICE, SLEEP, SLOW_SUM, STATS};

/// These tests each keep both cores busy; on a 2-core machine they run one
/// at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn address(test: &str) -> String {
    format!("shm://@shmesh-echo-{test}-{}", std::process::id())
}

/// A child process killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(addr: &str) -> Reaped {
    let child = Command::new(Path::new(env!("CARGO_BIN_EXE_echo-server")))
        .arg(addr)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Reaped(child)
}

/// Connects, retrying while the server starts.
fn connect(addr: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::connect(addr, &ChannelOptions::new(SERVICE, SCHEMA)) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("server never came up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn live_connections(channel: &Channel) -> u64 {
    let bytes = channel
        .call(STATS, b"", Some(Duration::from_secs(5)))
        .unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

fn kill9(child: &Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

#[test]
fn a_million_calls_from_eight_threads() {
    let _serial = serial();
    let addr = address("million");
    let _server = spawn_server(&addr);
    let channel = connect(&addr);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                for i in 0..125_000u64 {
                    let mut request = (t << 40 | i).to_le_bytes().to_vec();
                    request.resize(8 + ((t + i) % 200) as usize, (i ^ t) as u8);
                    let response = channel
                        .call(ECHO, &request, Some(Duration::from_secs(30)))
                        .unwrap();
                    assert_eq!(&response[..], &request[..], "thread {t} call {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(channel.pool_in_use(), 0, "request slabs leaked");
}

#[test]
fn server_survives_a_hundred_clients_killed_mid_call_or_stream() {
    let _serial = serial();
    let addr = address("kill-clients");
    let _server = spawn_server(&addr);
    let observer = connect(&addr);
    for round in 0..100 {
        // Half the clients die in the middle of a stream, half between
        // unary calls.
        let mut args = vec![addr.as_str(), "--calls", "0", "--size", "300"];
        if round % 2 == 1 {
            args.push("--stream");
        }
        let client = Reaped(
            Command::new(Path::new(env!("CARGO_BIN_EXE_echo-client")))
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Let it connect and get calls in flight (some rounds kill it
        // earlier: that is a case too).
        std::thread::sleep(Duration::from_millis(round % 7 * 3));
        kill9(&client.0);
        drop(client);
        // The server keeps serving the others throughout.
        assert_eq!(
            &observer.call(ECHO, b"still here", None).unwrap()[..],
            b"still here"
        );
    }
    // Every dead client's connection (and its segment) is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_connections(&observer) != 1 {
        assert!(
            Instant::now() < deadline,
            "connections of dead clients linger: {}",
            live_connections(&observer)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killing_the_server_fails_every_call_in_flight_with_unavailable() {
    let _serial = serial();
    let addr = address("kill-server");
    let server = spawn_server(&addr);
    let channel = connect(&addr);
    let (done, results) = mpsc::channel();
    for t in 0..8u64 {
        let channel = channel.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            // Long calls: all eight are in flight when the server dies.
            let r = channel.call(SLEEP, &(1000 + t).to_le_bytes(), None);
            let _ = done.send(r.map(|_| ()).map_err(|s| s.code()));
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    kill9(&server.0);
    for _ in 0..8 {
        // The watchdog: a call that hangs fails the test.
        let r = results
            .recv_timeout(Duration::from_secs(10))
            .expect("a call hung after the server died");
        assert_eq!(r, Err(Code::Unavailable));
    }
    assert_eq!(
        channel.call(ECHO, b"x", None).unwrap_err().code(),
        Code::Unavailable
    );
}

#[test]
fn a_hostile_client_is_cut_off_and_the_others_are_served() {
    use shmesh::handshake::{FdRole, Hello, Limits, PROTOCOL_VERSION, ServiceName};
    use shmesh::protocol::{MESSAGE, MORE, OPEN, RETURN, WINDOW};
    use shmesh_shm::descriptor::{Descriptor, Flags};
    use shmesh_shm::handle::SlabHandle;

    let _serial = serial();
    let addr = address("hostile");
    let _server = spawn_server(&addr);
    let honest = connect(&addr);

    let forged_handles = [
        // A handle far outside the pool.
        SlabHandle {
            segment: 1,
            generation: 1,
            offset: 1 << 40,
        },
        // A handle into the middle of a slab.
        SlabHandle {
            segment: 1,
            generation: 1,
            offset: 4096 + 3,
        },
        // A handle naming another segment.
        SlabHandle {
            segment: 77,
            generation: 1,
            offset: 4096,
        },
    ];
    let forged = |handle, flags| Descriptor {
        call_id: 1,
        method_id: ECHO,
        flags: flags | Flags::PAYLOAD,
        payload: handle,
        len: 16,
        ..Default::default()
    };
    let mut attacks: Vec<(&str, Vec<Descriptor>)> = Vec::new();
    for handle in forged_handles {
        // A unary request with a forged payload.
        attacks.push((
            "forged request handle",
            vec![forged(handle, OPEN | MESSAGE | Flags::END)],
        ));
        // A slab to give back for a call that does not exist.
        attacks.push((
            "forged handle on an unknown call",
            vec![forged(handle, MESSAGE | RETURN)],
        ));
    }
    // One call opened twice.
    let open = Descriptor {
        call_id: 9,
        method_id: ECHO,
        flags: OPEN | MESSAGE | MORE,
        ..Default::default()
    };
    attacks.push(("a call opened twice", vec![open, open]));
    // A stream that ignores its flow-control window while its handler
    // reads nothing.
    let opened = Descriptor {
        call_id: 5,
        method_id: shmesh_example_echo::SLOW_SUM,
        flags: OPEN,
        ..Default::default()
    };
    let message = Descriptor {
        call_id: 5,
        method_id: shmesh_example_echo::SLOW_SUM,
        flags: MESSAGE,
        ..Default::default()
    };
    let mut overrun = vec![opened];
    overrun.extend(std::iter::repeat_n(message, WINDOW as usize + 3));
    attacks.push(("a flow-control overrun", overrun));

    for (what, descriptors) in attacks {
        let mut conn = shmesh::connect(&addr.parse().unwrap()).unwrap();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: ServiceName::new(SERVICE).unwrap(),
            schema_hash: SCHEMA,
            requested: Limits::default(),
        };
        let (welcome, fds) = shmesh::client_handshake(&mut conn, &hello).unwrap();
        assert_eq!(
            welcome.fds.as_slice(),
            &[FdRole::Segment, FdRole::ClientDoorbell]
        );
        let mut fds = fds.into_iter();
        let segment = shmesh_shm::segment::Segment::open(fds.next().unwrap()).unwrap();
        let mut ends = shmesh::layout::ClientEnds::open(&segment, fds.next().unwrap()).unwrap();
        for d in descriptors {
            ends.requests.try_push(d).unwrap();
        }
        ends.server_bell.notify();
        // The server hangs up on us: the socket reaches end of file (a
        // timeout here would mean it kept the connection).
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let ended = conn.recv_msg(0);
        assert!(
            matches!(ended, Err(shmesh::RecvError::Closed)),
            "{what}: server kept a hostile connection ({ended:?})"
        );
        assert_eq!(&honest.call(ECHO, b"fine", None).unwrap()[..], b"fine");
    }
}

#[test]
fn streams_between_processes_check_out_and_fail_fast_when_the_server_dies() {
    let _serial = serial();
    let addr = address("streams");
    let server = spawn_server(&addr);
    let channel = connect(&addr);
    // Eight bidirectional streams at once, every echo checked.
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                let mut call = channel.open(ECHO_STREAM, None).unwrap();
                for i in 0..5_000u32 {
                    let mut m = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    m.resize(8 + (i as usize * 31) % 2000, t as u8);
                    call.send(&m).unwrap();
                    assert_eq!(&call.recv().unwrap().unwrap()[..], &m[..]);
                }
                call.close_send().unwrap();
                assert!(call.recv().unwrap().is_none());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A fast sender against a slow reader: flow control, nothing lost.
    let mut call = channel.open(SLOW_SUM, None).unwrap();
    for i in 0..3_000usize {
        call.send(&vec![7; i % 700]).unwrap();
    }
    let total = call.finish().unwrap();
    let expected: u64 = (0..3_000u64).map(|i| i % 700).sum();
    assert_eq!(u64::from_le_bytes(total[..8].try_into().unwrap()), expected);
    drop(total);
    assert_eq!(channel.calls_in_flight(), 0);

    // Streams in flight when the server is killed all end Unavailable.
    let (done, results) = mpsc::channel();
    for _ in 0..4 {
        let (channel, done) = (channel.clone(), done.clone());
        std::thread::spawn(move || {
            let mut call = channel.open(ECHO_STREAM, None).unwrap();
            let r = loop {
                if let Err(e) = call.send(b"ping") {
                    break e.code();
                }
                match call.recv() {
                    Ok(Some(_)) => {}
                    Ok(None) => break Code::Ok,
                    Err(e) => break e.code(),
                }
            };
            let _ = done.send(r);
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    kill9(&server.0);
    for _ in 0..4 {
        let r = results
            .recv_timeout(Duration::from_secs(10))
            .expect("a stream hung after the server died");
        assert_eq!(r, Code::Unavailable);
    }
}
