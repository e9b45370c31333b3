//! A channel that connects again when its connection is lost: for clients
//! that must outlive a server restart, or a host daemon restart on the
//! mediated path.
//!
//! A call in flight when the connection dies fails with `Unavailable` and is
//! never sent again (the server may have run it). The calls after it
//! connect again first; while that fails, [`Gap`] says what they do: fail
//! at once with `Unavailable`, or keep trying until their deadline.
//!
//! ```no_run
//! use std::time::Duration;
//! use shmesh::client::{ChannelOptions, Gap, ReconnectingChannel};
//!
//! let options = ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]));
//! let channel = ReconnectingChannel::new("shm+svc://echo", options, Gap::WaitUntilDeadline);
//! let answer = channel.call(1, b"hi", Some(Duration::from_secs(2)))?;
//! # Ok::<(), shmesh::status::Status>(())
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::{Channel, ChannelOptions, Response, lock};
use crate::status::Status;

/// What a call does while the channel cannot connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gap {
    /// Fail at once with `Unavailable`, naming why connecting failed.
    #[default]
    FailFast,
    /// Keep trying (backing off from 5 ms to 200 ms) until the call's
    /// deadline, then fail with `Unavailable`; a call without a deadline
    /// waits as long as it takes.
    WaitUntilDeadline,
}

/// How long a wait between two attempts to connect may grow.
const RETRY_MAX: Duration = Duration::from_millis(200);

/// A [`Channel`] that connects again, on the next call, once its
/// connection is lost. Cheap to share between threads (`&self` calls).
#[derive(Debug)]
pub struct ReconnectingChannel {
    address: String,
    options: ChannelOptions,
    gap: Gap,
    current: Mutex<Option<Channel>>,
}

impl ReconnectingChannel {
    /// A channel to `address` that connects on first use.
    pub fn new(address: impl Into<String>, options: ChannelOptions, gap: Gap) -> Self {
        ReconnectingChannel {
            address: address.into(),
            options,
            gap,
            current: Mutex::new(None),
        }
    }

    /// Whether a live connection is at hand (no call needs to connect).
    pub fn is_connected(&self) -> bool {
        lock(&self.current).as_ref().is_some_and(|c| !c.is_dead())
    }

    /// The live channel, connecting first if there is none; waits as
    /// [`Gap`] says, up to `deadline`.
    pub fn channel(&self, deadline: Option<Instant>) -> Result<Channel, Status> {
        let mut current = lock(&self.current);
        if let Some(channel) = current.as_ref().filter(|c| !c.is_dead()) {
            return Ok(channel.clone());
        }
        *current = None;
        let mut retry = Duration::from_millis(5);
        loop {
            match Channel::connect(&self.address, &self.options) {
                Ok(channel) => {
                    *current = Some(channel.clone());
                    return Ok(channel);
                }
                Err(e) => {
                    let why = format!("cannot connect to {}: {e}", self.address);
                    if self.gap == Gap::FailFast {
                        return Err(Status::unavailable(why));
                    }
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now + retry >= d) {
                        return Err(Status::unavailable(format!(
                            "{why} (gave up at the call's deadline)"
                        )));
                    }
                    tracing::debug!("{why}; trying again in {retry:?}");
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Calls `method` with `request` (see [`Channel::call`]), connecting
    /// first if needed.
    pub fn call(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let channel = self.channel(deadline)?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        channel.call(method, request, left)
    }

    /// [`ReconnectingChannel::call`] with `metadata` (see
    /// [`Channel::call_with`]).
    pub fn call_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &crate::Metadata,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let channel = self.channel(deadline)?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        channel.call_with(method, request, metadata, left)
    }
}
