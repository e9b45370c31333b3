//! Deadlines as they travel between processes: absolute nanoseconds of
//! `CLOCK_MONOTONIC`, a clock every process on the host shares.

use std::time::{Duration, Instant};

use rustix::time::{ClockId, clock_gettime};

/// Nanoseconds of `CLOCK_MONOTONIC` now.
pub fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// The wire form of a deadline `timeout` from now (0 means none, so a
/// deadline is never 0).
pub fn to_wire(timeout: Option<Duration>) -> u64 {
    match timeout {
        None => 0,
        Some(t) => now_ns()
            .saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX))
            .max(1),
    }
}

/// Time left until a wire deadline: `None` for no deadline, zero if passed.
pub fn remaining(deadline_ns: u64) -> Option<Duration> {
    (deadline_ns != 0).then(|| Duration::from_nanos(deadline_ns.saturating_sub(now_ns())))
}

/// Whether a wire deadline has passed (`false` for no deadline; reads the
/// clock only when there is one).
pub fn passed(deadline_ns: u64) -> bool {
    deadline_ns != 0 && now_ns() >= deadline_ns
}

/// A successful `result` of a call that finished after its deadline
/// becomes `DeadlineExceeded`, as the caller saw it: both sides report the
/// same outcome.
pub fn enforce<T>(
    result: Result<T, crate::status::Status>,
    deadline_ns: u64,
) -> Result<T, crate::status::Status> {
    match result {
        Ok(_) if passed(deadline_ns) => Err(crate::status::Status::deadline_exceeded(
            "the handler finished after the caller's deadline",
        )),
        other => other,
    }
}

/// The local instant a wire deadline corresponds to.
pub fn to_instant(deadline_ns: u64) -> Option<Instant> {
    remaining(deadline_ns).map(|left| Instant::now() + left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(to_wire(None), 0);
        assert_eq!(remaining(0), None);
        let wire = to_wire(Some(Duration::from_secs(5)));
        let left = remaining(wire).unwrap_or_default();
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4));
        let past = to_wire(Some(Duration::ZERO));
        assert_eq!(remaining(past), Some(Duration::ZERO));
    }
}
