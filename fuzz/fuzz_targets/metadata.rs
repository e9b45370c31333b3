//! Fuzzes `shmesh::Metadata::decode`, the decoder of the metadata block a
//! client puts at the start of a call's opening payload, in shared memory
//! the server does not trust.
//!
//! Input: raw bytes (a block, then whatever follows it).
//!
//! Properties checked:
//!
//! - decoding never panics (libFuzzer reports any panic as a crash);
//! - an accepted block lies within the input, holds at most 32 entries,
//!   and re-encodes to exactly the bytes it was decoded from;
//! - every entry obeys the rules: inserting the entries one by one into
//!   empty metadata succeeds and gives the same metadata back (so no key
//!   appears twice and every key and value is valid).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmesh::metadata::{MAX_BLOCK_LEN, MAX_ENTRIES, Metadata};

fuzz_target!(|bytes: &[u8]| {
    let Ok((metadata, used)) = Metadata::decode(bytes) else {
        return;
    };
    assert!(used >= 2 && used <= bytes.len() && used <= MAX_BLOCK_LEN);
    assert!(metadata.len() <= MAX_ENTRIES);
    assert_eq!(metadata.iter().count(), metadata.len());
    if metadata.is_empty() {
        // An empty block: just its length prefix.
        assert_eq!(&bytes[..used], &[0, 0]);
        assert_eq!(metadata.encoded_len(), 0);
    } else {
        let mut again = vec![0; metadata.encoded_len()];
        metadata.encode_into(&mut again);
        assert_eq!(&again[..], &bytes[..used]);
    }
    let mut rebuilt = Metadata::new();
    for (key, value) in &metadata {
        rebuilt
            .insert(key, value)
            .expect("a decoded entry obeys the rules");
        assert_eq!(metadata.get(key), Some(value));
    }
    assert_eq!(rebuilt, metadata);
});
