//! Fuzzes `shmesh::control`, the decoders of the messages between
//! processes and the host daemon: what the daemon reads from any local
//! process (`decode_to_daemon`), what a replica reads from the daemon
//! (`decode_from_daemon`), and the counters the daemon reads from a
//! replica's load page (`decode_report`).
//!
//! Input: raw bytes, tried with and without a valid header in front.
//!
//! Properties checked:
//!
//! - decoding never panics (libFuzzer reports any panic as a crash);
//! - an accepted message re-encodes to bytes that decode to the same
//!   message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmesh::control::{self, MAGIC, VERSION};

fn check(bytes: &[u8]) {
    if let Ok(message) = control::decode_to_daemon(bytes) {
        let again = control::decode_to_daemon(&control::encode(&message));
        assert_eq!(again.as_ref(), Ok(&message));
    }
    if let Ok(message) = control::decode_from_daemon(bytes) {
        let again = control::decode_from_daemon(&control::encode(&message));
        assert_eq!(again.as_ref(), Ok(&message));
    }
    if let Ok(report) = control::decode_report(bytes) {
        let again = control::decode_report(&control::encode_report(&report));
        assert_eq!(again.as_ref(), Ok(&report));
    }
}

fuzz_target!(|bytes: &[u8]| {
    check(bytes);
    // Most random inputs fail the header; also try them as bodies.
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(&VERSION.to_le_bytes());
    framed.extend_from_slice(bytes);
    check(&framed);
});
