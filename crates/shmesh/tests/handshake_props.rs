//! Property tests of the handshake codec and of `negotiate`.
//!
//! They cover the ground of the libFuzzer target
//! `fuzz/fuzz_targets/handshake.rs` with a plain `cargo test`, on stable:
//! every message round-trips, untrusted bytes never make `decode` panic, and
//! whatever `decode` accepts is exactly what `encode` writes for it.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use shmesh::handshake::{
    self, FdRole, FdRoles, HEADER_LEN, HandshakeError, Hello, LimitField, Limits, MAGIC,
    MAX_BODY_LEN, MAX_SERVICE_LEN, MIN_RING_DEPTH, Msg, PROTOCOL_VERSION, PoolClass, PoolClasses,
    Refuse, RefuseReason, SchemaHash, ServerPolicy, ServiceName, WIRE_VERSION, WaitMode, Welcome,
    check_grant, negotiate,
};

// ---------------------------------------------------------------------------
// Strategies

fn service_name() -> impl Strategy<Value = ServiceName> {
    prop_oneof![
        // Short ASCII names, likely to collide between client and server.
        prop::sample::select(vec!["echo", "greeter", "a"]).prop_map(str::to_owned),
        // Any characters, up to 62 of them (at most 248 bytes).
        prop::collection::vec(any::<char>(), 1..63).prop_map(String::from_iter),
        // The longest name.
        Just("n".repeat(MAX_SERVICE_LEN)),
    ]
    .prop_map(|s| ServiceName::new(s).unwrap())
}

fn schema_hash() -> impl Strategy<Value = SchemaHash> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(SchemaHash),
        Just(SchemaHash([0xab; 32])),
    ]
}

fn pool_classes() -> impl Strategy<Value = PoolClasses> {
    prop_oneof![
        // Arbitrary sizes and counts (keys come out strictly increasing).
        prop::collection::btree_map(any::<u64>(), any::<u32>(), 0..=16),
        // Realistic power-of-two sizes, so client and server overlap.
        prop::collection::btree_map((6u32..27).prop_map(|s| 1u64 << s), 0u32..5000, 0..=8),
    ]
    .prop_map(|map| {
        PoolClasses::new(
            map.into_iter()
                .map(|(slab_size, count)| PoolClass { slab_size, count })
                .collect(),
        )
        .unwrap()
    })
}

fn wait_mode() -> impl Strategy<Value = WaitMode> {
    prop::sample::select(vec![WaitMode::Poll, WaitMode::Adaptive, WaitMode::Block])
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop_oneof![any::<u32>(), 0u32..5000],
        pool_classes(),
        wait_mode(),
        any::<u64>(),
        prop_oneof![any::<u64>(), 0u64..(4 << 20)],
    )
        .prop_map(
            |(ring_depth, pool_classes, wait_mode, spin_ns, max_message)| Limits {
                ring_depth,
                pool_classes,
                wait_mode,
                spin_ns,
                max_message,
            },
        )
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof![Just(PROTOCOL_VERSION), any::<u16>()],
        service_name(),
        schema_hash(),
        limits(),
    )
        .prop_map(
            |(protocol_version, service, schema_hash, requested)| Hello {
                protocol_version,
                service,
                schema_hash,
                requested,
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u16>(),
        limits(),
        any::<u64>(),
        prop::collection::vec(
            prop::sample::select(vec![
                FdRole::Segment,
                FdRole::ClientDoorbell,
                FdRole::ServerDoorbell,
                FdRole::Liveness,
            ]),
            0..=16,
        ),
    )
        .prop_map(
            |(protocol_version, granted, connection_id, roles)| Welcome {
                protocol_version,
                granted,
                connection_id,
                fds: FdRoles::new(roles).unwrap(),
            },
        )
}

fn refuse_reason() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        (any::<u16>(), any::<u16>())
            .prop_map(|(client, server)| RefuseReason::VersionMismatch { client, server }),
        (service_name(), service_name())
            .prop_map(|(requested, offered)| RefuseReason::UnknownService { requested, offered }),
        (schema_hash(), schema_hash())
            .prop_map(|(client, server)| RefuseReason::SchemaMismatch { client, server }),
        (
            prop::sample::select(vec![
                LimitField::RingDepth,
                LimitField::PoolClasses,
                LimitField::MaxMessage,
            ]),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(field, requested, limit)| RefuseReason::LimitsRefused {
                field,
                requested,
                limit,
            }),
        Just(RefuseReason::Busy),
        service_name().prop_map(|requested| RefuseReason::NoReplica { requested }),
        service_name().prop_map(|requested| RefuseReason::Denied { requested }),
    ]
}

fn refuse() -> impl Strategy<Value = Refuse> {
    (
        refuse_reason(),
        // Up to 400 characters: often more than the 1024-byte limit, which
        // `Refuse::new` cuts at a character boundary.
        prop::collection::vec(any::<char>(), 0..400).prop_map(String::from_iter),
    )
        .prop_map(|(reason, message)| Refuse::new(reason, message))
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        hello().prop_map(Msg::Hello),
        welcome().prop_map(Msg::Welcome),
        refuse().prop_map(Msg::Refuse),
    ]
}

/// Limits a real client or server would use: power-of-two slab sizes that
/// overlap between the two sides, non-zero counts, modest depths.
fn realistic_limits() -> impl Strategy<Value = Limits> {
    (
        prop_oneof![0u32..5000, (1u32..13).prop_map(|s| 1 << s)],
        prop::collection::btree_map((6u32..16).prop_map(|s| 1u64 << s), 1u32..5000, 0..=6),
        wait_mode(),
        0u64..1_000_000,
        0u64..(4 << 20),
    )
        .prop_map(
            |(ring_depth, classes, wait_mode, spin_ns, max_message)| Limits {
                ring_depth,
                pool_classes: PoolClasses::new(
                    classes
                        .into_iter()
                        .map(|(slab_size, count)| PoolClass { slab_size, count })
                        .collect(),
                )
                .unwrap(),
                wait_mode,
                spin_ns,
                max_message,
            },
        )
}

/// A Hello and a policy for the same service and schema, so that the
/// decision turns on the limits (and `busy`).
fn negotiable() -> impl Strategy<Value = (Hello, ServerPolicy)> {
    (
        service_name(),
        schema_hash(),
        realistic_limits(),
        realistic_limits(),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(service, schema_hash, requested, max, busy, generous)| {
            // Half the time the server's maximum covers the request.
            let max = if generous {
                Limits {
                    ring_depth: requested.ring_depth.saturating_mul(2),
                    pool_classes: requested.pool_classes.clone(),
                    wait_mode: WaitMode::Poll,
                    spin_ns: u64::MAX,
                    max_message: u64::MAX,
                }
            } else {
                max
            };
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                service: service.clone(),
                schema_hash,
                requested,
            };
            (
                hello,
                ServerPolicy {
                    service,
                    schema_hash,
                    max,
                    busy,
                },
            )
        })
}

/// A valid header for a body of `body.len()` bytes, then the body.
fn with_header(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.push(tag);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// What every decode must satisfy: no panic (implied by getting here), and
/// acceptance only of canonical encodings.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = handshake::decode(bytes) {
        prop_assert_eq!(
            handshake::encode(&msg),
            bytes,
            "accepted a non-canonical encoding of {:?}",
            msg
        );
    }
    Ok(())
}

/// What every decision must satisfy: a grant is within both the request and
/// the server's maximum, and usable; a refusal survives the wire.
fn check_negotiation(hello: &Hello, policy: &ServerPolicy) -> Result<(), TestCaseError> {
    match negotiate(hello, policy) {
        Ok(granted) => {
            prop_assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
            prop_assert_eq!(&hello.service, &policy.service);
            prop_assert_eq!(hello.schema_hash, policy.schema_hash);
            prop_assert!(!policy.busy);
            prop_assert_eq!(check_grant(&hello.requested, &granted), Ok(()));
            prop_assert_eq!(check_grant(&policy.max, &granted), Ok(()));
            prop_assert!(granted.ring_depth.is_power_of_two());
            prop_assert!(granted.ring_depth >= MIN_RING_DEPTH);
            prop_assert!(!granted.pool_classes.is_empty());
            prop_assert!(granted.pool_classes.iter().all(|c| c.count > 0));
            prop_assert!(granted.max_message > 0);
            // A request the server fully covers, with a power-of-two ring
            // depth, is granted exactly as asked.
            if check_grant(&policy.max, &hello.requested).is_ok()
                && hello.requested.ring_depth.is_power_of_two()
                && hello.requested.pool_classes.iter().all(|c| c.count > 0)
            {
                prop_assert_eq!(&granted, &hello.requested);
            }
        }
        Err(refuse) => {
            // The refusal survives the wire.
            let msg = Msg::Refuse(refuse);
            prop_assert_eq!(handshake::decode(&handshake::encode(&msg)), Ok(msg));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(msg in msg()) {
        let bytes = handshake::encode(&msg);
        prop_assert!(bytes.len() - HEADER_LEN <= MAX_BODY_LEN);
        prop_assert_eq!(handshake::decode(&bytes), Ok(msg));
    }

    #[test]
    fn refuse_messages_are_bounded(r in refuse()) {
        prop_assert!(r.message().len() <= handshake::MAX_REFUSE_MESSAGE);
    }

    #[test]
    fn every_proper_prefix_is_truncated(msg in msg(), cut in any::<prop::sample::Index>()) {
        let bytes = handshake::encode(&msg);
        let len = cut.index(bytes.len());
        let is_truncated = matches!(
            handshake::decode(&bytes[..len]),
            Err(HandshakeError::Truncated { .. })
        );
        prop_assert!(is_truncated);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_decode(&bytes)?;
    }

    #[test]
    fn arbitrary_bodies_never_panic(
        tag in 0u8..5,
        body in prop::collection::vec(any::<u8>(), 0..700),
    ) {
        check_decode(&with_header(tag, &body))?;
    }

    #[test]
    fn mutated_messages_never_panic(
        msg in msg(),
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<u8>(), 0u8..4),
            1..6,
        ),
    ) {
        let mut bytes = handshake::encode(&msg);
        for (at, value, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = value,
                1 => bytes[i] ^= 1 << (value % 8),
                2 => bytes.insert(i, value),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        check_decode(&bytes)?;
    }

    #[test]
    fn negotiated_grants_stay_within_both_sides(
        hello in hello(),
        max in limits(),
        service in service_name(),
        schema in schema_hash(),
        busy in any::<bool>(),
        same_identity in any::<bool>(),
    ) {
        let policy = if same_identity {
            ServerPolicy { service: hello.service.clone(), schema_hash: hello.schema_hash, max, busy }
        } else {
            ServerPolicy { service, schema_hash: schema, max, busy }
        };
        check_negotiation(&hello, &policy)?;
    }

    #[test]
    fn realistic_negotiations_stay_within_both_sides((hello, policy) in negotiable()) {
        check_negotiation(&hello, &policy)?;
    }
}
