//! Fuzzes `Descriptor::decode`, the decoder of every descriptor a peer puts
//! on a ring.
//!
//! Input: up to 64 bytes, read as eight little-endian words (missing bytes
//! are zero). Properties checked:
//!
//! - decoding never panics (libFuzzer reports any panic as a crash);
//! - an accepted descriptor obeys the format's rules (no unknown flag bits,
//!   no payload fields without the payload flag);
//! - decoding is lossless: re-encoding an accepted descriptor gives back the
//!   very words that were decoded, and decoding those gives the same
//!   descriptor again;
//! - a rejection names the rule that was broken;
//! - the ring's `Entry` path decodes exactly like `Descriptor::decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shmesh_shm::descriptor::{CorruptDescriptor, DESCRIPTOR_WORDS, Descriptor, Flags};
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::ring::{Entry, EntryWords, MAX_ENTRY_WORDS};

fn words_from(data: &[u8]) -> [u64; DESCRIPTOR_WORDS] {
    let mut words = [0u64; DESCRIPTOR_WORDS];
    for (word, chunk) in words.iter_mut().zip(data.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_le_bytes(bytes);
    }
    words
}

fuzz_target!(|data: &[u8]| {
    let words = words_from(data);
    let decoded = Descriptor::decode(&words);

    // The ring decodes through `Entry`, from a slot-sized scratch array whose
    // words past the descriptor are whatever the slot held.
    let mut slot: EntryWords = [u64::MAX; MAX_ENTRY_WORDS];
    slot[..DESCRIPTOR_WORDS].copy_from_slice(&words);
    assert_eq!(
        <Descriptor as Entry>::decode(&slot),
        decoded,
        "Entry::decode disagrees with Descriptor::decode"
    );

    match decoded {
        Ok(d) => {
            let unknown = d.flags.0 & !(Flags::KNOWN.0 | Flags::UPPER.0);
            assert_eq!(unknown, 0, "accepted unknown flag bits: {d:?}");
            if !d.flags.contains(Flags::PAYLOAD) {
                assert_eq!(d.len, 0, "accepted a length without payload flag");
                assert_eq!(
                    d.payload,
                    SlabHandle::default(),
                    "accepted a handle without payload flag"
                );
            }

            let again = d.to_words();
            assert_eq!(again, words, "decode is lossy: {d:?}");
            assert_eq!(
                Descriptor::decode(&again),
                Ok(d),
                "re-encoded descriptor does not decode to itself"
            );

            let mut out: EntryWords = [0; MAX_ENTRY_WORDS];
            d.encode(&mut out);
            assert_eq!(out[..DESCRIPTOR_WORDS], words, "Entry::encode differs");
        }
        Err(CorruptDescriptor::UnknownFlags { bits }) => {
            let flags = (words[1] >> 32) as u32;
            assert_ne!(bits, 0);
            assert_eq!(bits, flags & !(Flags::KNOWN.0 | Flags::UPPER.0));
        }
        Err(CorruptDescriptor::PayloadWithoutFlag { len }) => {
            let flags = Flags((words[1] >> 32) as u32);
            assert!(!flags.contains(Flags::PAYLOAD));
            assert_eq!(len, words[4] as u32);
            assert!(len != 0 || words[2] != 0 || words[3] != 0);
        }
    }
});
