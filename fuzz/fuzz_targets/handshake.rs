//! Fuzzes `shmesh::handshake::decode`, the decoder of every handshake
//! message a peer sends over the Unix socket before anything is trusted.
//!
//! Input: raw bytes, decoded twice:
//!
//! - as they are, a whole message;
//! - as a body behind a valid header (tag from the first byte, length
//!   matching), so the fuzzer reaches the body decoders without first
//!   having to discover the magic and the length rule.
//!
//! Properties checked:
//!
//! - decoding never panics (libFuzzer reports any panic as a crash);
//! - decoding is canonical and lossless: an accepted message re-encodes to
//!   exactly the bytes it was decoded from, and decoding those bytes gives
//!   the same message again;
//! - an accepted message respects the format's bounds (body length, refuse
//!   message length).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmesh::handshake::{
    self, HEADER_LEN, MAGIC, MAX_BODY_LEN, MAX_REFUSE_MESSAGE, Msg, WIRE_VERSION,
};

fn check(bytes: &[u8]) {
    let Ok(msg) = handshake::decode(bytes) else {
        return;
    };
    let again = handshake::encode(&msg);
    assert_eq!(again, bytes, "accepted a non-canonical encoding of {msg:?}");
    assert_eq!(
        handshake::decode(&again).as_ref(),
        Ok(&msg),
        "re-decoding changed {msg:?}"
    );
    assert!(again.len() - HEADER_LEN <= MAX_BODY_LEN);
    if let Msg::Refuse(refuse) = &msg {
        assert!(refuse.message().len() <= MAX_REFUSE_MESSAGE);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);

    if let Some((&tag, body)) = data.split_first() {
        let mut framed = Vec::with_capacity(HEADER_LEN + body.len());
        framed.extend_from_slice(&MAGIC);
        framed.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        framed.push(tag % 4);
        framed.push(0);
        framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
        framed.extend_from_slice(body);
        check(&framed);
    }
});
