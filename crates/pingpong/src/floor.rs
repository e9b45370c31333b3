//! The hardware floor: two processes bouncing one cache line.
//!
//! The parent stores an odd value into a [`SharedWord`]; the child spins until
//! it sees it and stores the next even value; the parent spins until it sees
//! that. No ring, no descriptor, no payload: the least a shared-memory round
//! trip can cost on this machine, and what the rings are measured against.
//!
//! [`SharedWord`]: shmesh_shm::segment::SharedWord

use std::time::{Duration, Instant};

use shmesh_shm::segment::Segment;

use crate::{PingPongError, tags};

/// The value that tells the child to exit.
const STOP: u64 = u64::MAX;

/// Child side: answers every odd value with the next even one.
pub fn serve(segment: &std::sync::Arc<Segment>) -> Result<(), PingPongError> {
    let word = segment.word(tags::FLOOR_WORD)?;
    let parent = rustix::process::getppid();
    let mut turns = 0u32;
    loop {
        let v = word.load();
        if v == STOP {
            return Ok(());
        }
        if v % 2 == 1 {
            word.store(v + 1);
            continue;
        }
        std::hint::spin_loop();
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(1 << 22) && rustix::process::getppid() != parent {
            return Ok(());
        }
    }
}

/// Parent side of the floor ping-pong over `segment`'s floor word.
pub struct FloorClient {
    word: shmesh_shm::segment::SharedWord,
    next: u64,
}

impl FloorClient {
    /// The parent end; the child must run [`serve`].
    pub fn new(segment: &std::sync::Arc<Segment>) -> Result<Self, PingPongError> {
        let word = segment.word(tags::FLOOR_WORD)?;
        word.store(0);
        Ok(FloorClient { word, next: 1 })
    }

    /// One round trip; fails if the child does not answer within `timeout`.
    pub fn round_trip(&mut self, timeout: Duration) -> Result<(), PingPongError> {
        self.word.store(self.next);
        let want = self.next + 1;
        let mut turns = 0u32;
        while self.word.load() != want {
            std::hint::spin_loop();
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(1 << 16) {
                let start = Instant::now();
                // Re-check against a clock only on the slow path.
                while self.word.load() != want {
                    if start.elapsed() > timeout {
                        return Err(PingPongError::TimedOut);
                    }
                    std::hint::spin_loop();
                }
            }
        }
        self.next += 2;
        Ok(())
    }

    /// Tells the child to exit.
    pub fn stop(&self) {
        self.word.store(STOP);
    }
}

impl Drop for FloorClient {
    fn drop(&mut self) {
        self.stop();
    }
}
