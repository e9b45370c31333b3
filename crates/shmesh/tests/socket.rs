//! The Unix-socket slow path with real sockets: binding, connecting, framed
//! messages with fds, credentials, timeouts, and the handshake between a
//! client and a server thread, including every refusal and peers that do not
//! speak shmesh.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, memfd_create};
use shmesh::handshake::{
    self, FdRoles, LimitField, MAX_WELCOME_FDS, PROTOCOL_VERSION, WIRE_VERSION,
};
use shmesh::socket::{MAX_FRAME_LEN, client_handshake, connect, server_handshake};
use shmesh::{
    Accepted, Address, BindError, ConnectError, Connection, FdRole, HandshakeError, Hello, Limits,
    Listener, Msg, NotShmesh, ProtocolViolation, RecvError, Refuse, RefuseReason, SchemaHash,
    SendError, ServerHandshakeError, ServerPolicy, ServiceName, Welcome,
};

/// Long enough never to fire on a healthy run, short enough to end a hung
/// test.
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers

fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "shmesh-test-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("dir"));
        fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn address(&self, name: &str) -> Address {
        Address::from_path(self.path(name)).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn abstract_address() -> Address {
    Address::from_abstract_name(&unique("abs")).unwrap()
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        service: service("echo"),
        schema_hash: SchemaHash([0xab; 32]),
        requested: Limits::default(),
    }
}

fn policy() -> ServerPolicy {
    ServerPolicy::new(service("echo"), SchemaHash([0xab; 32]))
}

fn memfd_with(bytes: &[u8]) -> File {
    let file = File::from(memfd_create("shmesh-test", MemfdFlags::CLOEXEC).unwrap());
    file.write_all_at(bytes, 0).unwrap();
    file
}

fn with_timeouts(conn: Connection) -> Connection {
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(TIMEOUT)).unwrap();
    conn
}

fn connect_with_timeouts(address: &Address) -> Connection {
    with_timeouts(connect(address).unwrap())
}

/// The fds a real server would pass: a segment holding "segment" and the
/// two doorbells.
fn make_fds(_: &Limits) -> io::Result<Vec<(FdRole, OwnedFd)>> {
    let segment = memfd_with(b"segment");
    Ok(vec![
        (FdRole::Segment, OwnedFd::from(segment)),
        (
            FdRole::ClientDoorbell,
            eventfd(0, EventfdFlags::CLOEXEC).unwrap(),
        ),
        (
            FdRole::ServerDoorbell,
            eventfd(0, EventfdFlags::CLOEXEC).unwrap(),
        ),
    ])
}

type ServerResult = Result<Accepted, ServerHandshakeError<io::Error>>;

/// A server thread that accepts one client and runs the handshake.
fn spawn_server(listener: Listener, policy: ServerPolicy) -> JoinHandle<ServerResult> {
    thread::spawn(move || {
        let mut conn = with_timeouts(listener.accept().unwrap());
        server_handshake(&mut conn, &policy, 77, make_fds)
    })
}

/// A thread that accepts one connection on a plain std listener and hands
/// the stream to `body`: a server that does not speak shmesh.
fn spawn_raw_server(
    address: &Address,
    body: impl FnOnce(UnixStream) + Send + 'static,
) -> JoinHandle<()> {
    let listener = Listener::bind(address).unwrap();
    thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let stream = UnixStream::from(conn);
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        body(stream);
    })
}

/// A raw socket pair: one end as a `Connection`, the other as a stream we
/// write anything to.
fn raw_pair() -> (Connection, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (with_timeouts(Connection::from(a)), b)
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Whether the peer of `end` has been closed (reading gives end of file).
fn peer_closed(end: &mut UnixStream) -> bool {
    end.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    matches!(end.read(&mut byte), Ok(0))
}

fn expect_refused(result: Result<(Welcome, Vec<OwnedFd>), ConnectError>) -> (Refuse, String) {
    match result {
        Err(ConnectError::Refused(refuse)) => {
            let text = ConnectError::Refused(refuse.clone()).to_string();
            (refuse, text)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Binding and connecting

#[test]
fn listener_removes_its_socket_file_on_drop() {
    let dir = TempDir::new();
    let address = dir.address("a.sock");
    let listener = Listener::bind(&address).unwrap();
    assert_eq!(listener.address(), &address);
    assert!(dir.path("a.sock").exists());
    drop(listener);
    assert!(!dir.path("a.sock").exists());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = dir.path("stale.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let address = dir.address("stale.sock");
    let listener = Listener::bind(&address).unwrap();
    let server = thread::spawn(move || listener.accept().map(drop));
    connect(&address).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn live_socket_is_not_clobbered() {
    let dir = TempDir::new();
    let address = dir.address("live.sock");
    let first = Listener::bind(&address).unwrap();
    let err = Listener::bind(&address).unwrap_err();
    assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains(&address.to_string()), "{err}");
    // The first listener still works.
    let client = thread::spawn(move || connect(&address).map(drop));
    first.accept().unwrap();
    client.join().unwrap().unwrap();
}

#[test]
fn regular_file_is_not_clobbered() {
    let dir = TempDir::new();
    let path = dir.path("data.txt");
    fs::write(&path, b"precious").unwrap();
    let err = Listener::bind(&dir.address("data.txt")).unwrap_err();
    assert!(matches!(err, BindError::NotASocket { .. }), "{err:?}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[test]
fn symlink_is_not_followed_or_removed() {
    let dir = TempDir::new();
    let target = dir.path("target.sock");
    drop(UnixListener::bind(&target).unwrap()); // a stale socket …
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap(); // … behind a link
    let err = Listener::bind(&dir.address("link.sock")).unwrap_err();
    assert!(matches!(err, BindError::NotASocket { .. }), "{err:?}");
    assert!(fs::symlink_metadata(&link).is_ok());
    assert!(target.exists());
}

#[test]
fn drop_leaves_a_replacement_alone() {
    let dir = TempDir::new();
    let address = dir.address("r.sock");
    let old = Listener::bind(&address).unwrap();
    fs::remove_file(dir.path("r.sock")).unwrap();
    let new = Listener::bind(&address).unwrap();
    drop(old);
    assert!(
        dir.path("r.sock").exists(),
        "the old listener removed the new one's file"
    );
    drop(new);
    assert!(!dir.path("r.sock").exists());
}

#[test]
fn abstract_name_in_use() {
    let address = abstract_address();
    let _first = Listener::bind(&address).unwrap();
    let err = Listener::bind(&address).unwrap_err();
    assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
}

#[test]
fn bind_in_missing_directory_names_the_address() {
    let address: Address = "shm:///nonexistent-shmesh-dir/x.sock".parse().unwrap();
    let err = Listener::bind(&address).unwrap_err();
    assert!(matches!(err, BindError::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("shm:///nonexistent-shmesh-dir/x.sock"),
        "{err}"
    );
}

#[test]
fn connecting_to_nothing_names_the_address() {
    let dir = TempDir::new();
    let missing = dir.address("missing.sock");
    let stale_path = dir.path("stale.sock");
    drop(UnixListener::bind(&stale_path).unwrap());
    let stale = dir.address("stale.sock");
    for address in [missing, stale, abstract_address()] {
        let err = connect(&address).unwrap_err();
        assert!(matches!(err, ConnectError::NoListener { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&address.to_string()) && text.contains("nothing is listening"),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// Framed messages, fds, credentials

fn exchange_messages(address: Address) {
    let listener = Listener::bind(&address).unwrap();
    let server = thread::spawn(move || {
        let mut conn = with_timeouts(listener.accept().unwrap());
        loop {
            match conn.recv_msg(0) {
                Ok((bytes, _)) => conn.send_msg(&bytes, &[]).unwrap(),
                Err(RecvError::Closed) => return,
                Err(e) => panic!("{e}"),
            }
        }
    });
    let mut conn = connect_with_timeouts(&address);
    let big: Vec<u8> = (0..MAX_FRAME_LEN).map(|i| i as u8).collect();
    for message in [&b"hello"[..], b"", &[0; 1][..], &big] {
        conn.send_msg(message, &[]).unwrap();
        let (echo, fds) = conn.recv_msg(0).unwrap();
        assert_eq!(echo, message);
        assert!(fds.is_empty());
    }
    drop(conn);
    server.join().unwrap();
}

#[test]
fn messages_keep_their_boundaries_over_a_path_socket() {
    exchange_messages(TempDir::new().address("echo.sock"));
}

#[test]
fn messages_keep_their_boundaries_over_an_abstract_socket() {
    exchange_messages(abstract_address());
}

#[test]
fn passed_memfd_is_the_same_file() {
    let dir = TempDir::new();
    let address = dir.address("fd.sock");
    let listener = Listener::bind(&address).unwrap();
    let server = thread::spawn(move || {
        let mut conn = with_timeouts(listener.accept().unwrap());
        let memfd = memfd_with(b"from the server");
        conn.send_msg(b"take this", &[memfd.as_fd()]).unwrap();
        // Wait for the client to write through its copy, then read it.
        let (ack, _) = conn.recv_msg(0).unwrap();
        assert_eq!(ack, b"written");
        let mut buf = [0u8; 15];
        memfd.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"from the client");
    });
    let mut conn = connect_with_timeouts(&address);
    let (bytes, mut fds) = conn.recv_msg(1).unwrap();
    assert_eq!(bytes, b"take this");
    assert_eq!(fds.len(), 1);
    let file = File::from(fds.pop().unwrap());
    let mut buf = [0u8; 15];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"from the server");
    file.write_all_at(b"from the client", 0).unwrap();
    conn.send_msg(b"written", &[]).unwrap();
    server.join().unwrap();
}

#[test]
fn received_fds_are_close_on_exec() {
    let (mut a, mut b) = Connection::pair().unwrap();
    let memfd = memfd_with(b"x");
    a.send_msg(b"", &[memfd.as_fd()]).unwrap();
    let (_, fds) = b.recv_msg(1).unwrap();
    let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
    assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
}

#[test]
fn excess_fds_are_closed_and_reported() {
    let (mut a, mut b) = Connection::pair().unwrap();
    let mut kept = Vec::new();
    let mut sent = Vec::new();
    for _ in 0..3 {
        let (keep, send) = UnixStream::pair().unwrap();
        kept.push(keep);
        sent.push(send);
    }
    let borrowed: Vec<_> = sent.iter().map(|s| s.as_fd()).collect();
    a.send_msg(b"three", &borrowed).unwrap();
    drop(borrowed);
    drop(sent); // the receiver now holds the only copies
    a.send_msg(b"next", &[]).unwrap();

    let err = b.recv_msg(1).unwrap_err();
    let RecvError::TooManyFds {
        received: 3,
        max: 1,
        bytes,
        kept: mut first,
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!(bytes, b"three");
    assert_eq!(first.len(), 1);
    // The kept fd is the first one sent: its peer is still open, so a
    // write through it arrives.
    let mut first = UnixStream::from(first.pop().unwrap());
    first.write_all(b"!").unwrap();
    let mut byte = [0u8; 1];
    kept[0].read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"!");
    drop(first);
    for end in &mut kept {
        assert!(peer_closed(end), "an excess fd was left open");
    }
    // The stream is still in step.
    assert!(!b.is_broken());
    let (bytes, fds) = b.recv_msg(1).unwrap();
    assert_eq!(bytes, b"next");
    assert!(fds.is_empty());
}

#[test]
fn many_fds_in_one_message() {
    let (mut a, mut b) = Connection::pair().unwrap();
    let files: Vec<File> = (0..MAX_WELCOME_FDS as u8)
        .map(|i| memfd_with(&[i]))
        .collect();
    let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    a.send_msg(b"many", &borrowed).unwrap();
    let (_, fds) = b.recv_msg(MAX_WELCOME_FDS).unwrap();
    assert_eq!(fds.len(), MAX_WELCOME_FDS);
    for (i, fd) in fds.into_iter().enumerate() {
        let mut byte = [0u8; 1];
        File::from(fd).read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte[0], i as u8, "fds arrived out of order");
    }
}

#[test]
fn credentials_are_our_own() {
    let expected = |c: shmesh::PeerCredentials| {
        assert_eq!(c.pid, std::process::id() as i32);
        assert_eq!(c.uid, rustix::process::geteuid().as_raw());
        assert_eq!(c.gid, rustix::process::getegid().as_raw());
    };
    let (a, b) = Connection::pair().unwrap();
    expected(a.peer_credentials().unwrap());
    expected(b.peer_credentials().unwrap());

    let address = abstract_address();
    let listener = Listener::bind(&address).unwrap();
    let server = thread::spawn(move || listener.accept().unwrap());
    let client = connect(&address).unwrap();
    expected(client.peer_credentials().unwrap());
    expected(server.join().unwrap().peer_credentials().unwrap());
}

#[test]
fn read_timeout_between_frames_leaves_the_connection_usable() {
    let (mut a, mut b) = Connection::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let err = b.recv_msg(0).unwrap_err();
    assert!(
        matches!(err, RecvError::TimedOut { received: 0 }),
        "{err:?}"
    );
    assert!(!b.is_broken());
    a.send_msg(b"late", &[]).unwrap();
    assert_eq!(b.recv_msg(0).unwrap().0, b"late");
}

#[test]
fn read_timeout_inside_a_frame_breaks_the_connection() {
    let (mut conn, mut raw) = raw_pair();
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    raw.write_all(&[10, 0, 0, 0, 1, 2]).unwrap();
    let err = conn.recv_msg(0).unwrap_err();
    assert!(
        matches!(err, RecvError::TimedOut { received: 6 }),
        "{err:?}"
    );
    assert!(conn.is_broken());
    assert!(matches!(conn.recv_msg(0), Err(RecvError::Broken)));
    // Sending is the other direction: unaffected.
    conn.send_msg(b"still", &[]).unwrap();
    let mut reply = [0u8; 9];
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..], b"still");
}

#[test]
fn peer_closing_between_and_inside_frames() {
    let (mut conn, raw) = raw_pair();
    drop(raw);
    assert!(matches!(conn.recv_msg(0), Err(RecvError::Closed)));

    let (mut conn, mut raw) = raw_pair();
    raw.write_all(&[10, 0, 0, 0, 1, 2]).unwrap();
    drop(raw);
    let err = conn.recv_msg(0).unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::ClosedMidFrame {
                received: 6,
                expected: 14
            }
        ),
        "{err:?}"
    );
    assert!(conn.is_broken());

    let (mut conn, mut raw) = raw_pair();
    raw.write_all(&[10, 0]).unwrap();
    drop(raw);
    let err = conn.recv_msg(0).unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::ClosedMidFrame {
                received: 2,
                expected: 4
            }
        ),
        "{err:?}"
    );
}

#[test]
fn absurd_frame_length_is_refused_before_allocating() {
    let (mut conn, mut raw) = raw_pair();
    raw.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    let err = conn.recv_msg(0).unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::FrameTooLong {
                max: MAX_FRAME_LEN,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(conn.is_broken());
}

#[test]
fn send_limits() {
    let (mut a, mut b) = Connection::pair().unwrap();
    let err = a.send_msg(&vec![0; MAX_FRAME_LEN + 1], &[]).unwrap_err();
    assert!(matches!(err, SendError::FrameTooLong { .. }), "{err:?}");
    assert!(!a.is_broken());
    a.send_msg(b"ok", &[]).unwrap();
    assert_eq!(b.recv_msg(0).unwrap().0, b"ok");

    let memfd = memfd_with(b"");
    let many = vec![memfd.as_fd(); shmesh::socket::MAX_FDS_PER_MSG + 1];
    assert!(matches!(
        a.send_msg(b"", &many),
        Err(SendError::TooManyFds { .. })
    ));

    drop(b);
    assert!(matches!(a.send_msg(b"x", &[]), Err(SendError::Closed)));
}

// ---------------------------------------------------------------------------
// Handshake

fn handshake_succeeds(address: Address) {
    let listener = Listener::bind(&address).unwrap();
    let server = spawn_server(listener, policy());
    let mut conn = connect_with_timeouts(&address);
    let (welcome, fds) = client_handshake(&mut conn, &hello()).unwrap();
    let accepted = server.join().unwrap().unwrap();

    assert_eq!(welcome.connection_id, 77);
    assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
    assert_eq!(welcome.granted, Limits::default());
    assert_eq!(
        welcome.fds.as_slice(),
        [
            FdRole::Segment,
            FdRole::ClientDoorbell,
            FdRole::ServerDoorbell
        ]
    );
    assert_eq!(accepted.welcome, welcome);
    assert_eq!(accepted.hello, hello());
    assert_eq!(accepted.peer.pid, std::process::id() as i32);

    // The segment is the server's memfd: written by one side, read by the
    // other.
    let mut fds = fds.into_iter();
    let segment = File::from(fds.next().unwrap());
    let mut buf = [0u8; 7];
    segment.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"segment");
    segment.write_all_at(b"CLIENT!", 0).unwrap();
    let server_segment = File::from(accepted.fds[0].1.try_clone().unwrap());
    server_segment.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"CLIENT!");

    // The doorbells are the server's eventfds.
    for (received, (_, sent)) in fds.zip(&accepted.fds[1..]) {
        let mut ours = File::from(received);
        ours.write_all(&5u64.to_ne_bytes()).unwrap();
        let mut theirs = File::from(sent.try_clone().unwrap());
        let mut count = [0u8; 8];
        theirs.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 5);
    }
}

#[test]
fn handshake_over_a_path_socket() {
    handshake_succeeds(TempDir::new().address("h.sock"));
}

#[test]
fn handshake_over_an_abstract_socket() {
    handshake_succeeds(abstract_address());
}

#[test]
fn handshake_grants_the_minimum() {
    let address = abstract_address();
    let mut p = policy();
    p.max.ring_depth = 64;
    let server = spawn_server(Listener::bind(&address).unwrap(), p);
    let mut h = hello();
    h.requested.ring_depth = 1000;
    let mut conn = connect_with_timeouts(&address);
    let (welcome, _) = client_handshake(&mut conn, &h).unwrap();
    assert_eq!(welcome.granted.ring_depth, 64);
    server.join().unwrap().unwrap();
}

/// Runs a handshake the server refuses; checks both sides' view of it and
/// returns the client's refusal and its message.
fn refused(policy: ServerPolicy, hello: Hello) -> (Refuse, String) {
    let address = abstract_address();
    let server = spawn_server(Listener::bind(&address).unwrap(), policy);
    let mut conn = connect_with_timeouts(&address);
    let (refuse, text) = expect_refused(client_handshake(&mut conn, &hello));
    match server.join().unwrap() {
        Err(ServerHandshakeError::Refused {
            refuse: sent,
            send_error: None,
        }) => assert_eq!(sent, refuse),
        other => panic!("server: expected Refused, got {other:?}"),
    }
    (refuse, text)
}

#[test]
fn version_mismatch_names_both_versions() {
    let mut h = hello();
    h.protocol_version = 9;
    let (refuse, text) = refused(policy(), h);
    assert_eq!(
        refuse.reason(),
        &RefuseReason::VersionMismatch {
            client: 9,
            server: PROTOCOL_VERSION
        }
    );
    assert!(
        text.contains("client speaks version 9")
            && text.contains(&format!("server speaks version {PROTOCOL_VERSION}")),
        "{text}"
    );
}

#[test]
fn unknown_service_names_both_services() {
    let mut h = hello();
    h.service = service("greeter");
    let (refuse, text) = refused(policy(), h);
    assert!(matches!(
        refuse.reason(),
        RefuseReason::UnknownService { .. }
    ));
    assert!(
        text.contains("\"greeter\"") && text.contains("\"echo\""),
        "{text}"
    );
}

#[test]
fn schema_mismatch_shows_both_hashes_in_hex() {
    let mut h = hello();
    let mut client_hash = [0u8; 32];
    client_hash[0] = 0xc0;
    client_hash[31] = 0xde;
    h.schema_hash = SchemaHash(client_hash);
    let (refuse, text) = refused(policy(), h);
    assert_eq!(
        refuse.reason(),
        &RefuseReason::SchemaMismatch {
            client: SchemaHash(client_hash),
            server: SchemaHash([0xab; 32])
        }
    );
    let client_hex = format!("c0{}de", "00".repeat(30));
    assert!(text.contains(&client_hex), "{text}");
    assert!(text.contains(&"ab".repeat(32)), "{text}");
}

#[test]
fn limits_refused_names_both_values() {
    let mut h = hello();
    h.requested.max_message = 0;
    let (refuse, text) = refused(policy(), h);
    assert_eq!(
        refuse.reason(),
        &RefuseReason::LimitsRefused {
            field: LimitField::MaxMessage,
            requested: 0,
            limit: 64 << 20
        }
    );
    assert!(
        text.contains("requested 0") && text.contains("allows 67108864"),
        "{text}"
    );
}

#[test]
fn busy_server_refuses() {
    let mut p = policy();
    p.busy = true;
    let (refuse, text) = refused(p, hello());
    assert_eq!(refuse.reason(), &RefuseReason::Busy);
    assert!(text.contains("busy"), "{text}");
}

#[test]
fn failing_make_fds_refuses_as_busy() {
    let address = abstract_address();
    let listener = Listener::bind(&address).unwrap();
    let server = thread::spawn(move || {
        let mut conn = with_timeouts(listener.accept().unwrap());
        server_handshake(&mut conn, &policy(), 1, |_| {
            Err::<Vec<(FdRole, OwnedFd)>, _>(io::Error::other("out of memory"))
        })
    });
    let mut conn = connect_with_timeouts(&address);
    let (refuse, _) = expect_refused(client_handshake(&mut conn, &hello()));
    assert_eq!(refuse.reason(), &RefuseReason::Busy);
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ServerHandshakeError::MakeFds(_)), "{err:?}");
    assert!(err.to_string().contains("out of memory"), "{err}");
}

#[test]
fn refusal_sent_before_reading_the_hello_still_arrives() {
    // A server that answers Busy at once and closes, without reading.
    let address = abstract_address();
    let server = spawn_raw_server(&address, |stream| {
        let mut conn = Connection::from(stream);
        let busy = Refuse::new(RefuseReason::Busy, "full");
        conn.send_msg(&handshake::encode(&Msg::Refuse(busy)), &[])
            .unwrap();
    });
    let mut conn = connect_with_timeouts(&address);
    server.join().unwrap(); // answered and closed before the Hello was sent
    let (refuse, _) = expect_refused(client_handshake(&mut conn, &hello()));
    assert_eq!(refuse.reason(), &RefuseReason::Busy);
    assert_eq!(refuse.message(), "full");
}

// --- servers that are not shmesh servers -----------------------------------

/// Connects to a server that reads what it is sent, answers `reply` and
/// closes; returns the client's handshake error.
fn handshake_with_raw_server(reply: Vec<u8>) -> ConnectError {
    let address = abstract_address();
    let server = spawn_raw_server(&address, move |mut stream| {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(&reply);
    });
    let mut conn = connect_with_timeouts(&address);
    let err = client_handshake(&mut conn, &hello()).unwrap_err();
    server.join().unwrap();
    err
}

#[test]
fn http_server_is_not_shmesh() {
    let err = handshake_with_raw_server(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
    assert!(
        matches!(err, ConnectError::NotShmesh(NotShmesh::FrameTooLong { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a shmesh server"), "{err}");
}

#[test]
fn framed_garbage_is_not_shmesh() {
    let err = handshake_with_raw_server(frame(b"GARBAGE!GARBAGE!"));
    assert!(
        matches!(
            err,
            ConnectError::NotShmesh(NotShmesh::Malformed(HandshakeError::BadMagic {
                found: [b'G', b'A', b'R', b'B']
            }))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a shmesh server"), "{err}");
}

#[test]
fn short_garbage_then_close_is_not_shmesh() {
    let err = handshake_with_raw_server(b"no".to_vec());
    assert!(
        matches!(
            err,
            ConnectError::NotShmesh(NotShmesh::ClosedMidFrame { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn silent_close_is_not_shmesh() {
    let err = handshake_with_raw_server(Vec::new());
    assert!(
        matches!(err, ConnectError::NotShmesh(NotShmesh::ClosedEarly)),
        "{err:?}"
    );
    assert!(err.to_string().contains("without sending"), "{err}");
}

#[test]
fn server_answering_hello_violates_the_protocol() {
    let err = handshake_with_raw_server(frame(&handshake::encode(&Msg::Hello(hello()))));
    assert!(
        matches!(
            err,
            ConnectError::Protocol(ProtocolViolation::UnexpectedMessage { got: "Hello", .. })
        ),
        "{err:?}"
    );
}

#[test]
fn silent_server_times_out() {
    let address = abstract_address();
    let listener = Listener::bind(&address).unwrap();
    let mut conn = connect(&address).unwrap();
    let _accepted = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let err = client_handshake(&mut conn, &hello()).unwrap_err();
    assert!(
        matches!(err, ConnectError::Recv(RecvError::TimedOut { received: 0 })),
        "{err:?}"
    );
}

/// A server that speaks the framing but sends a doctored Welcome.
fn doctored_welcome(welcome: Welcome, fds: usize) -> ConnectError {
    let address = abstract_address();
    let server = spawn_raw_server(&address, move |stream| {
        let mut conn = with_timeouts(Connection::from(stream));
        conn.recv_msg(0).unwrap();
        let files: Vec<File> = (0..fds).map(|_| memfd_with(b"")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        conn.send_msg(&handshake::encode(&Msg::Welcome(welcome)), &borrowed)
            .unwrap();
    });
    let mut conn = connect_with_timeouts(&address);
    let err = client_handshake(&mut conn, &hello()).unwrap_err();
    server.join().unwrap();
    err
}

fn welcome_for_hello() -> Welcome {
    Welcome {
        protocol_version: PROTOCOL_VERSION,
        granted: Limits::default(),
        connection_id: 1,
        fds: FdRoles::new(vec![FdRole::Segment; 3]).unwrap(),
    }
}

#[test]
fn welcome_with_missing_fds_is_a_violation() {
    let err = doctored_welcome(welcome_for_hello(), 1);
    assert!(
        matches!(
            err,
            ConnectError::Protocol(ProtocolViolation::FdCountMismatch {
                announced: 3,
                received: 1
            })
        ),
        "{err:?}"
    );
}

#[test]
fn welcome_with_too_many_fds_is_a_violation() {
    let err = doctored_welcome(welcome_for_hello(), MAX_WELCOME_FDS + 1);
    assert!(
        matches!(
            err,
            ConnectError::Protocol(ProtocolViolation::TooManyFds {
                received: 17,
                max: MAX_WELCOME_FDS
            })
        ),
        "{err:?}"
    );
}

#[test]
fn welcome_granting_more_than_asked_is_a_violation() {
    let mut welcome = welcome_for_hello();
    welcome.fds = FdRoles::default();
    welcome.granted.ring_depth *= 2;
    let err = doctored_welcome(welcome, 0);
    match err {
        ConnectError::Protocol(ProtocolViolation::GrantExceedsRequest(e)) => {
            assert_eq!(e.field, "ring depth");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn welcome_with_another_version_is_a_violation() {
    let mut welcome = welcome_for_hello();
    welcome.fds = FdRoles::default();
    welcome.protocol_version = PROTOCOL_VERSION + 1;
    let err = doctored_welcome(welcome, 0);
    assert!(
        matches!(
            err,
            ConnectError::Protocol(ProtocolViolation::VersionMismatch {
                requested: PROTOCOL_VERSION,
                welcomed
            }) if welcomed == PROTOCOL_VERSION + 1
        ),
        "{err:?}"
    );
}

// --- clients that are not shmesh clients -----------------------------------

/// Runs the server's handshake against a client that sends `bytes` raw and
/// then closes its writing side; returns the server's error.
fn server_error_for(bytes: &'static [u8]) -> ServerHandshakeError<io::Error> {
    let address = abstract_address();
    let server = spawn_server(Listener::bind(&address).unwrap(), policy());
    let conn = connect(&address).unwrap();
    let mut stream = UnixStream::from(conn);
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    server.join().unwrap().unwrap_err()
}

#[test]
fn http_client_is_not_shmesh() {
    let err = server_error_for(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        matches!(
            err,
            ServerHandshakeError::NotShmesh(NotShmesh::FrameTooLong { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a shmesh client"), "{err}");
}

#[test]
fn client_closing_at_once_is_not_shmesh() {
    let err = server_error_for(b"");
    assert!(
        matches!(err, ServerHandshakeError::NotShmesh(NotShmesh::ClosedEarly)),
        "{err:?}"
    );
}

#[test]
fn client_sending_framed_garbage_is_not_shmesh() {
    let err = server_error_for(b"\x04\0\0\0abcd");
    assert!(
        matches!(
            err,
            ServerHandshakeError::NotShmesh(NotShmesh::Malformed(HandshakeError::BadMagic { .. }))
        ),
        "{err:?}"
    );
}

#[test]
fn client_sending_fds_violates_the_protocol() {
    let address = abstract_address();
    let server = spawn_server(Listener::bind(&address).unwrap(), policy());
    let mut conn = connect_with_timeouts(&address);
    let memfd = memfd_with(b"");
    conn.send_msg(&handshake::encode(&Msg::Hello(hello())), &[memfd.as_fd()])
        .unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ServerHandshakeError::Protocol(ProtocolViolation::TooManyFds {
                received: 1,
                max: 0
            })
        ),
        "{err:?}"
    );
}

#[test]
fn client_with_a_newer_wire_format_is_told_the_versions() {
    let address = abstract_address();
    let server = spawn_server(Listener::bind(&address).unwrap(), policy());
    let mut conn = connect_with_timeouts(&address);
    let mut bytes = handshake::encode(&Msg::Hello(hello()));
    bytes[4..6].copy_from_slice(&(WIRE_VERSION + 1).to_le_bytes());
    conn.send_msg(&bytes, &[]).unwrap();
    let (answer, _) = conn.recv_msg(0).unwrap();
    let Msg::Refuse(refuse) = handshake::decode(&answer).unwrap() else {
        panic!("expected a Refuse");
    };
    assert_eq!(
        refuse.reason(),
        &RefuseReason::VersionMismatch {
            client: WIRE_VERSION + 1,
            server: WIRE_VERSION
        }
    );
    assert!(refuse.message().contains("wire format"), "{refuse}");
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerHandshakeError::Refused { .. })
    ));
}

#[test]
fn client_sending_a_welcome_violates_the_protocol() {
    let address = abstract_address();
    let server = spawn_server(Listener::bind(&address).unwrap(), policy());
    let mut conn = connect_with_timeouts(&address);
    let mut welcome = welcome_for_hello();
    welcome.fds = FdRoles::default();
    conn.send_msg(&handshake::encode(&Msg::Welcome(welcome)), &[])
        .unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ServerHandshakeError::Protocol(ProtocolViolation::UnexpectedMessage {
                expected: "Hello",
                got: "Welcome"
            })
        ),
        "{err:?}"
    );
}
