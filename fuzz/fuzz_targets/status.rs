//! Fuzzes `shmesh::status::Status::decode`, the decoder of the error a
//! server writes into shared memory when a call fails (code from the
//! descriptor, message and details from the slab), and
//! `shmesh::protocol::unpack_handle`, which turns a word a client wrote
//! into a slab handle the server then checks.
//!
//! Input: a code word and raw bytes.
//!
//! Properties checked:
//!
//! - decoding never panics (libFuzzer reports any panic as a crash);
//! - an accepted status re-encodes into at most `encoded_len` bytes and
//!   decodes from them, under its own code, to the same status;
//! - any word unpacks to a handle in the given segment whose offset is a
//!   whole number of 64-byte lines, and packing it again gives the word back
//!   when it fits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmesh::protocol::{pack_handle, unpack_handle};
use shmesh::status::Status;

fuzz_target!(|input: (u32, u64, &[u8])| {
    let (code, word, bytes) = input;
    if let Ok(status) = Status::decode(code, bytes) {
        let mut buf = vec![0u8; status.encoded_len()];
        let n = status
            .encode_into(&mut buf)
            .expect("a decoded status re-encodes");
        // Under the status's own code: an unknown code decodes as Unknown,
        // with the code named in the message.
        let again =
            Status::decode(status.code() as u32, &buf[..n]).expect("a re-encoded status decodes");
        assert_eq!(again, status);
    }
    let handle = unpack_handle(7, word);
    assert_eq!(handle.segment, 7);
    assert_eq!(handle.offset % 64, 0);
    if let Some(packed) = pack_handle(handle) {
        assert_eq!(unpack_handle(7, packed), handle);
    }
});
