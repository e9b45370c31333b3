//! A connection's thread: the handshake, then reading the request ring and
//! sending each descriptor where it belongs.
//!
//! Quick unary handlers ([`Router::route`], [`Router::route_in_place`]) run
//! right here and answer in one descriptor: the fast path, with no hand-off.
//! Everything else (blocking, async and streaming handlers, large answers)
//! gets a mailbox in the connection's call table and runs elsewhere; this
//! thread then only delivers the client's messages, credits and
//! cancellations to it.

use rustc_hash::FxHashMap as HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::ring::Consumer;
use shmesh_shm::segment::Segment;
use thiserror::Error;

use crate::deadline;
use crate::handshake::{FdRole, ServerPolicy};
use crate::layout::{self, LayoutError, ServerEnds};
use crate::mailbox::Mailbox;
use crate::metadata::Metadata;
use crate::protocol::{self, CreditCounter, MESSAGE, METADATA, MORE, OPEN, WINDOW};
use crate::server::link::{AllocFailed, Assembly, Gone, Link, LinkParts};
use crate::server::stream::{CallEnd, ServerStream, is_message};
use crate::server::{Job, Reply, ReplyBody, Request, Route, Router, Runtime, Workers};
use crate::socket::{self, Connection};
use crate::stats::Stats;
use crate::status::{Code, Status};

/// How often an idle connection re-checks liveness and shutdown.
const LIVENESS_SLICE: Duration = Duration::from_millis(20);
/// How long a client may take to say Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one connection ended badly.
#[derive(Debug, Error)]
pub(crate) enum ConnectionError {
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection segment: {0}")]
    Layout(#[from] LayoutError),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot start the liveness watcher: {0}")]
    Thread(std::io::Error),
}

/// What a connection's thread needs from its server.
pub(crate) struct ServerContext<'a> {
    pub policy: &'a ServerPolicy,
    pub router: &'a Arc<Router>,
    pub shutdown: &'a AtomicBool,
    pub stats: &'a Arc<Stats>,
    pub workers: &'a Arc<Workers>,
    pub runtime: &'a Runtime,
    /// How long shutdown waits for calls in progress.
    pub grace: Duration,
}

/// Runs connection `id` from its handshake to its end.
pub(crate) fn serve_connection(
    mut conn: Connection,
    id: u64,
    server: &ServerContext<'_>,
) -> Result<(), ConnectionError> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let mut made: Option<(Arc<Segment>, OwnedFd)> = None;
    let accepted = socket::server_handshake(&mut conn, server.policy, id, |limits| {
        let segment = layout::create(id as u32, limits)?;
        let share = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|e| {
                LayoutError::Create(shmesh_shm::segment::CreateError::System {
                    step: "share",
                    source: e,
                })
            })
        };
        let segment_fd = share(segment.fd())?;
        let bell = layout::client_bell_fd()?;
        let bell_for_client = share(bell.as_fd())?;
        made = Some((segment, bell));
        Ok::<_, LayoutError>(vec![
            (FdRole::Segment, segment_fd),
            (FdRole::ClientDoorbell, bell_for_client),
        ])
    })
    .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let Some((segment, client_bell)) = made else {
        return Err(ConnectionError::Handshake("no segment was made".into()));
    };
    serve_established(
        Established {
            conn,
            id,
            granted: accepted.welcome.granted,
            segment,
            client_bell,
            peer: accepted.peer,
        },
        server,
    )
}

/// A connection whose handshake is done: by this server on its own socket,
/// or by the host daemon, which made the segment and hands it over.
pub(crate) struct Established {
    /// The socket whose end tells of the client's death.
    pub conn: Connection,
    pub id: u64,
    pub granted: crate::handshake::Limits,
    pub segment: Arc<Segment>,
    pub client_bell: OwnedFd,
    pub peer: socket::PeerCredentials,
}

/// Serves an established connection until it ends.
pub(crate) fn serve_established(
    established: Established,
    server: &ServerContext<'_>,
) -> Result<(), ConnectionError> {
    let Established {
        conn,
        id,
        granted,
        segment,
        client_bell,
        peer,
    } = established;
    tracing::debug!(
        connection = id,
        pid = peer.pid,
        uid = peer.uid,
        "client connected"
    );
    let ends = ServerEnds::open(&segment, client_bell)?;
    let wait_policy = layout::wait_policy(&granted);

    // The socket is the liveness signal: it closes when the client dies.
    let dead = Arc::new(AtomicBool::new(false));
    conn.set_read_timeout(None)
        .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let watcher_conn = conn
        .as_fd()
        .try_clone_to_owned()
        .map_err(ConnectionError::Thread)?;
    {
        let dead = dead.clone();
        let bell = ends.server_bell.clone();
        std::thread::Builder::new()
            .name(format!("shmesh-watch-{id}"))
            .spawn(move || {
                let mut conn = Connection::from(std::os::unix::net::UnixStream::from(watcher_conn));
                let _ = conn.recv_msg(0);
                // Release: pairs with the Acquire loads of whoever waits.
                dead.store(true, Ordering::Release);
                bell.notify();
            })
            .map_err(ConnectionError::Thread)?;
    }

    let recorder = server.stats.connection(id, peer);
    let link = Arc::new(Link::new(LinkParts {
        responses: ends.responses,
        give_back: ends.give_back,
        returned: ends.returned,
        pool: ends.pool,
        peer_pool: ends.peer_pool,
        client_bell: ends.client_bell,
        server_bell: ends.server_bell,
        dead,
        max_message: granted.max_message,
        peer,
        recorder: recorder.fork(),
    }));
    let mut dispatcher = Dispatcher {
        requests: ends.requests,
        link: link.clone(),
        router: server.router.clone(),
        workers: server.workers.clone(),
        runtime: server.runtime.clone(),
        assembling: HashMap::default(),
        recorder: std::cell::RefCell::new(recorder),
        grace: server.grace,
    };
    let result = dispatcher.run(wait_policy, server.shutdown);
    link.cancel_all();
    // Shut the socket down rather than only close it: the watcher holds a
    // duplicate of it, and both must see the end. The client learns we are
    // gone.
    let _ = rustix::net::shutdown(&conn, rustix::net::Shutdown::Both);
    result
}

/// The bytes of a client descriptor's payload, checked.
fn read<'l>(link: &'l Link, d: &Descriptor) -> Result<&'l [u8], Gone> {
    if !d.flags.contains(Flags::PAYLOAD) {
        return Ok(&[]);
    }
    link.peer_pool.read(d.payload, d.len.into()).map_err(|e| {
        link.break_off(format!("call {}: {e}", d.call_id));
        Gone
    })
}

/// A unary request arriving in chunks.
struct ChunkedRequest {
    first: Descriptor,
    metadata: Metadata,
    message: Assembly,
    credits: CreditCounter,
}

/// A unary request's bytes.
pub(crate) enum Payload {
    /// In place in the client's pool, as `d` names it (checked), from the
    /// given offset on: past the call's metadata block, if it has one.
    Shared(Descriptor, usize),
    /// Assembled from chunks.
    Owned(Vec<u8>),
}

impl Payload {
    pub(crate) fn bytes<'a>(&'a self, link: &'a Link) -> &'a [u8] {
        match self {
            Payload::Shared(d, skip) if d.flags.contains(Flags::PAYLOAD) => link
                .peer_pool
                .read(d.payload, d.len.into())
                .ok()
                .and_then(|bytes| bytes.get(*skip..))
                .unwrap_or(&[]),
            Payload::Shared(..) => &[],
            Payload::Owned(v) => v,
        }
    }
}

/// A whole unary request, handed to a task.
#[cfg(feature = "tokio")]
pub(crate) struct UnaryRequest {
    pub first: Descriptor,
    pub payload: Payload,
    pub metadata: Metadata,
}

/// What a unary handler answered.
pub(crate) enum Answer<'p> {
    Bytes(Vec<u8>),
    InPlace(ReplyBody<'p>),
    Failed(Status),
}

struct Dispatcher {
    requests: Consumer<Descriptor>,
    link: Arc<Link>,
    router: Arc<Router>,
    workers: Arc<Workers>,
    runtime: Runtime,
    assembling: HashMap<u64, ChunkedRequest>,
    /// Counters for the calls answered on this thread (others record
    /// through the link's). A `RefCell` so the inline path can run on
    /// `&self`, borrowing the router and the link instead of cloning their
    /// `Arc`s per call.
    recorder: std::cell::RefCell<crate::stats::ConnectionRecorder>,
    grace: Duration,
}

impl Dispatcher {
    fn run(
        &mut self,
        policy: shmesh_shm::doorbell::WaitPolicy,
        shutdown: &AtomicBool,
    ) -> Result<(), ConnectionError> {
        // When shutdown was first seen with calls still in progress.
        let mut stopping_since: Option<std::time::Instant> = None;
        loop {
            if let Some(why) = self.link.broken() {
                return Err(ConnectionError::Protocol(why));
            }
            self.link.flush_give_back();
            // Take back the response slabs the client returned, once per
            // pass: handlers allocate from the pool next. One load when
            // there is nothing.
            if self.link.reclaim().is_err() {
                continue;
            }
            let d = match self.requests.try_pop() {
                Ok(Some(d)) => d,
                Ok(None) => {
                    let link = &self.link;
                    if link.is_dead() {
                        return Ok(());
                    }
                    // Acquire: pairs with the shutdown handle's Release.
                    if shutdown.load(Ordering::Acquire) {
                        if self.assembling.is_empty() && link.calls_in_progress() == 0 {
                            return Ok(());
                        }
                        let since = *stopping_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= self.grace {
                            tracing::warn!(
                                calls = link.calls_in_progress(),
                                "shutdown grace period over: closing a connection with calls in progress"
                            );
                            return Ok(());
                        }
                    }
                    // Once stopping, wake for requests and for calls ending
                    // (they ring the bell), not for the shutdown flag again.
                    let stopping = stopping_since.is_some();
                    let requests = &self.requests;
                    let _ = link.server_bell.wait_for(policy, LIVENESS_SLICE, || {
                        requests.has_pending_hint()
                            || link.is_dead()
                            || (!stopping && shutdown.load(Ordering::Acquire))
                    });
                    continue;
                }
                Err(e) => return Err(ConnectionError::Protocol(format!("request ring: {e}"))),
            };
            match self.dispatch(d) {
                Ok(()) => {}
                Err(Gone) => match self.link.broken() {
                    Some(why) => return Err(ConnectionError::Protocol(why)),
                    None => return Ok(()),
                },
            }
        }
    }

    fn dispatch(&mut self, d: Descriptor) -> Result<(), Gone> {
        if d.flags.contains(OPEN) {
            return self.open(d);
        }
        if self.assembling.contains_key(&d.call_id) {
            return self.assemble(d);
        }
        match self.link.mailbox(d.call_id) {
            Some(mailbox) => self.deliver(&mailbox, d),
            // A call that ended (or never was): drop what it sent.
            None => self.link.discard(&d),
        }
    }

    /// Hands a client descriptor to a call served off this thread.
    fn deliver(&self, mailbox: &Mailbox, d: Descriptor) -> Result<(), Gone> {
        if d.flags.contains(Flags::CANCEL) {
            mailbox.update(|s| s.cancelled = true);
            return Ok(());
        }
        if d.flags.contains(protocol::CREDIT) {
            let n = protocol::granted(&d);
            mailbox.update(|s| s.credit = s.credit.saturating_add(n));
            return Ok(());
        }
        if d.flags.contains(Flags::PAYLOAD)
            && let Err(e) = self.link.peer_pool.read(d.payload, d.len.into())
        {
            self.link.break_off(format!("call {}: {e}", d.call_id));
            return Err(Gone);
        }
        let mut state = mailbox.lock();
        if state.finished || state.peer_ended {
            drop(state);
            return self.link.discard(&d);
        }
        if is_message(&d) {
            // Two free descriptors (opening, ending) beyond the window.
            if state.inbox.len() >= WINDOW as usize + 2 {
                drop(state);
                self.link.break_off(format!(
                    "call {} sent more than its flow-control window",
                    d.call_id
                ));
                return Err(Gone);
            }
            state.inbox.push_back(d);
        }
        if d.flags.contains(Flags::END) {
            state.peer_ended = true;
        }
        mailbox.wake_all(&mut state);
        Ok(())
    }

    fn open(&mut self, d: Descriptor) -> Result<(), Gone> {
        // Every payload is checked once, here, before anything reads it.
        read(&self.link, &d)?;
        if d.flags.contains(protocol::GIVES_BACK) {
            let segment = self.link.pool.layout().segment;
            let handle = protocol::unpack_handle(segment, d.aux);
            if let Err(e) = self.link.pool.release_returned(handle) {
                self.link
                    .break_off(format!("call {} gave back a bad slab: {e}", d.call_id));
                return Err(Gone);
            }
        }
        if self.assembling.contains_key(&d.call_id) || self.link.mailbox(d.call_id).is_some() {
            self.link
                .break_off(format!("call id {} opened twice", d.call_id));
            return Err(Gone);
        }
        // Every call from here on is counted as answered when it ends.
        self.recorder.borrow().started_call();
        let stream = d.flags.contains(protocol::STREAM);
        let Some(route) = self.router.route_for(d.method_id, stream) else {
            self.link.discard(&d)?;
            let kind = if stream { "stream" } else { "unary call" };
            let status = Status::unimplemented(format!(
                "method {} is not served here (as a {kind})",
                d.method_id
            ));
            return self.fail_now(&d, &status);
        };
        let remaining = deadline::remaining(d.deadline_ns);
        if remaining.is_some_and(|r| r.is_zero()) {
            self.link.discard(&d)?;
            let status =
                Status::deadline_exceeded("deadline passed before the server started the call");
            return self.fail_now(&d, &status);
        }
        let (metadata, skip) = if d.flags.contains(METADATA) {
            match Metadata::decode(read(&self.link, &d)?) {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.link.discard(&d)?;
                    let status = Status::invalid_argument(format!("call metadata: {e}"));
                    return self.fail_now(&d, &status);
                }
            }
        } else {
            (Metadata::new(), 0)
        };
        if route.is_streaming() {
            let Some(mailbox) = self.link.register(d.call_id) else {
                return Err(Gone);
            };
            if d.flags.contains(METADATA) && !d.flags.contains(MESSAGE) {
                // The block alone: give its slab back now; the mailbox
                // sees only the opening (and maybe the end).
                self.link.discard(&d)?;
                let mut bare = d;
                bare.flags = Flags(d.flags.0 & !Flags::PAYLOAD.0);
                self.deliver(&mailbox, bare)?;
            } else {
                self.deliver(&mailbox, d)?;
            }
            let end = CallEnd::new(self.link.clone(), mailbox, &d, metadata, skip);
            return self.start_stream(route, end);
        }
        if d.flags.contains(MORE) {
            let mut assembly = ChunkedRequest {
                first: d,
                metadata,
                message: Assembly::new(&self.link),
                credits: CreditCounter::default(),
            };
            let bytes = read(&self.link, &d)?.get(skip..).unwrap_or(&[]);
            if let Err(status) = assembly.message.push(bytes) {
                self.link.discard(&d)?;
                return self.fail_now(&d, &status);
            }
            self.link.discard(&d)?;
            self.assembling.insert(d.call_id, assembly);
            return Ok(());
        }
        self.unary(route, d, Payload::Shared(d, skip), remaining, metadata)
    }

    /// Ends a call that never started with `status`.
    fn fail_now(&self, d: &Descriptor, status: &Status) -> Result<(), Gone> {
        self.link.record(d.method_id, status.code(), Duration::ZERO);
        let end = self.link.status_descriptor(d.call_id, d.method_id, status);
        self.link.push(end)
    }

    /// The next chunk of a unary request.
    fn assemble(&mut self, d: Descriptor) -> Result<(), Gone> {
        if d.flags.contains(Flags::CANCEL) {
            if let Some(a) = self.assembling.remove(&d.call_id) {
                return self.fail_now(
                    &a.first,
                    &Status::cancelled("the client cancelled the call"),
                );
            }
            return Ok(());
        }
        if !d.flags.contains(MESSAGE) {
            return self.link.discard(&d);
        }
        let link = self.link.clone();
        let bytes = read(&link, &d)?;
        let Some(assembly) = self.assembling.get_mut(&d.call_id) else {
            return self.link.discard(&d);
        };
        let pushed = assembly.message.push(bytes);
        let grant = if protocol::costs_credit(d.flags) {
            assembly.credits.consumed()
        } else {
            None
        };
        self.link.discard(&d)?;
        if let Err(status) = pushed {
            if let Some(a) = self.assembling.remove(&d.call_id) {
                return self.fail_now(&a.first, &status);
            }
            return Ok(());
        }
        if let Some(n) = grant {
            self.link.push(protocol::credit(d.call_id, n))?;
        }
        if d.flags.contains(MORE) {
            return Ok(());
        }
        let Some(assembly) = self.assembling.remove(&d.call_id) else {
            return Ok(());
        };
        let Some(route) = self.router.route_for(assembly.first.method_id, false) else {
            return Ok(());
        };
        let first = assembly.first;
        self.unary(
            route,
            first,
            Payload::Owned(assembly.message.finish()),
            deadline::remaining(first.deadline_ns),
            assembly.metadata,
        )
    }

    /// Serves a whole unary request.
    fn unary(
        &self,
        route: &Route,
        first: Descriptor,
        payload: Payload,
        remaining: Option<Duration>,
        metadata: Metadata,
    ) -> Result<(), Gone> {
        let started = std::time::Instant::now();
        match route {
            Route::Copying(_) | Route::InPlace(_) => {
                let link = &*self.link;
                let request = Request {
                    method: first.method_id,
                    payload: payload.bytes(link),
                    peer: link.peer,
                    remaining,
                    metadata: &metadata,
                    call: None,
                };
                let answer = match route {
                    Route::Copying(handler) => match handler(&request) {
                        Ok(bytes) => Answer::Bytes(bytes),
                        Err(status) => Answer::Failed(status),
                    },
                    Route::InPlace(handler) => {
                        let mut reply = Reply::new(link);
                        match handler(&request, &mut reply) {
                            Ok(()) => Answer::InPlace(reply.into_body()),
                            Err(status) => Answer::Failed(status),
                        }
                    }
                    _ => Answer::Failed(Status::internal("route changed kind")),
                };
                // A unary request's slab needs no giving back (the response
                // releases it) unless the client asked.
                if let Payload::Shared(d, _) = &payload {
                    link.discard(d)?;
                }
                let answer = match answer {
                    Answer::Failed(status) => Answer::Failed(status),
                    ok if deadline::passed(first.deadline_ns) => {
                        drop(ok);
                        Answer::Failed(Status::deadline_exceeded(
                            "the handler finished after the caller's deadline",
                        ))
                    }
                    ok => ok,
                };
                self.answer_inline(&first, answer, started)
            }
            Route::Offloaded(_) => self.offload(first, payload, metadata, started),
            #[cfg(feature = "tokio")]
            Route::Async(handler) => {
                let Some(mailbox) = self.link.register(first.call_id) else {
                    return Err(Gone);
                };
                crate::server::task::spawn_unary(
                    &self.runtime,
                    handler.clone(),
                    self.link.clone(),
                    mailbox,
                    crate::server::dispatch::UnaryRequest {
                        first,
                        payload,
                        metadata,
                    },
                    started,
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Sends an inline handler's answer: in one descriptor if it fits a
    /// slab, otherwise from a worker that can wait for the client's credit.
    fn answer_inline(
        &self,
        first: &Descriptor,
        answer: Answer<'_>,
        started: std::time::Instant,
    ) -> Result<(), Gone> {
        let link = &*self.link;
        let (call_id, method) = (first.call_id, first.method_id);
        let mut response = Descriptor {
            call_id,
            method_id: method,
            flags: Flags::END | MESSAGE,
            ..Default::default()
        };
        let code = match answer {
            Answer::InPlace(ReplyBody::Slab(slab, len)) => {
                response.flags = response.flags | Flags::PAYLOAD;
                response.len = len as u32;
                response.payload = slab.send();
                Code::Ok
            }
            Answer::InPlace(ReplyBody::Empty) => Code::Ok,
            Answer::InPlace(ReplyBody::Heap(bytes)) | Answer::Bytes(bytes)
                if bytes.len() > link.max_slab =>
            {
                if let Err(status) = link.check_size(bytes.len()) {
                    self.recorder
                        .borrow_mut()
                        .record(method, status.code(), started.elapsed());
                    return link.push(link.status_descriptor(call_id, method, &status));
                }
                return self.send_large(*first, bytes, started);
            }
            Answer::InPlace(ReplyBody::Heap(bytes)) | Answer::Bytes(bytes) => {
                match link.write(call_id, method, &bytes, response.flags) {
                    Ok(d) => response = d,
                    Err(AllocFailed::Gone(g)) => return Err(g),
                    Err(e) => {
                        response = link.status_descriptor(call_id, method, &e.into());
                    }
                }
                Code::Ok
            }
            Answer::Failed(status) => {
                self.recorder
                    .borrow_mut()
                    .record(method, status.code(), started.elapsed());
                return link.push(link.status_descriptor(call_id, method, &status));
            }
        };
        // Counted after the answer is out: off the caller's critical path.
        let pushed = link.push(response);
        self.recorder
            .borrow_mut()
            .record(method, code, started.elapsed());
        pushed
    }

    /// Sends an answer larger than a slab from a worker thread.
    fn send_large(
        &self,
        first: Descriptor,
        bytes: Vec<u8>,
        started: std::time::Instant,
    ) -> Result<(), Gone> {
        let Some(mailbox) = self.link.register(first.call_id) else {
            return Err(Gone);
        };
        let link = self.link.clone();
        let job: Job = Box::new(move || {
            let (call_id, method) = (first.call_id, first.method_id);
            let result = link.send_blocking(&mailbox, call_id, method, &bytes, true);
            link.end_unary(call_id, method, result, started);
        });
        self.run_job(job)
    }

    /// Runs an offloaded unary handler on a worker thread.
    fn offload(
        &self,
        first: Descriptor,
        payload: Payload,
        metadata: Metadata,
        started: std::time::Instant,
    ) -> Result<(), Gone> {
        let Some(mailbox) = self.link.register(first.call_id) else {
            return Err(Gone);
        };
        let (link, router) = (self.link.clone(), self.router.clone());
        let job: Job = Box::new(move || {
            let (call_id, method) = (first.call_id, first.method_id);
            let request = Request {
                method,
                payload: payload.bytes(&link),
                peer: link.peer,
                remaining: deadline::remaining(first.deadline_ns),
                metadata: &metadata,
                call: Some(&mailbox),
            };
            let result = match router.route_for(method, false) {
                Some(Route::Offloaded(handler)) => handler(&request),
                _ => Err(Status::internal("offloaded method has no blocking handler")),
            };
            let result = match result {
                Ok(_) if mailbox.is_cancelled() => {
                    Err(Status::cancelled("the client cancelled the call"))
                }
                other => deadline::enforce(other, first.deadline_ns),
            };
            if let Payload::Shared(d, _) = &payload {
                let _ = link.discard(d);
            }
            let result = result
                .and_then(|bytes| link.send_blocking(&mailbox, call_id, method, &bytes, true));
            link.end_unary(call_id, method, result, started);
        });
        self.run_job(job)
    }

    /// Starts a streaming handler: blocking ones on a worker, async ones
    /// on the runtime.
    fn start_stream(&self, route: &Route, end: CallEnd) -> Result<(), Gone> {
        match route {
            Route::Stream(handler) => {
                let handler = handler.clone();
                let job: Job = Box::new(move || {
                    let done = end.done();
                    let mut stream = ServerStream { end };
                    let result = handler(&mut stream);
                    drop(stream);
                    done.finish(result);
                });
                self.run_job(job)
            }
            #[cfg(feature = "tokio")]
            Route::AsyncStream(handler) => {
                crate::server::task::spawn_stream(&self.runtime, handler.clone(), end);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn run_job(&self, job: Job) -> Result<(), Gone> {
        self.workers.submit(job).map_err(|_| {
            self.link
                .break_off("the server's worker threads are gone".into());
            Gone
        })
    }
}
