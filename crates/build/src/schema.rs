//! The schema hash a generated client and server exchange at connect.
//!
//! # The rule
//!
//! The hash is the SHA-256 of this canonical encoding of the service
//! (integers little-endian, strings as a `u32` byte length then UTF-8):
//!
//! ```text
//! "shmesh-schema-v1\n"                 (17 bytes, no length prefix)
//! service full name                    e.g. "helloworld.Greeter"
//! u32 method count
//! per method, in declaration order:
//!     method name                      e.g. "SayHello"
//!     input type full name             e.g. "helloworld.HelloRequest"
//!     output type full name            e.g. "helloworld.HelloReply"
//!     u8 flags                         1 = client streaming, 2 = server streaming
//! ```
//!
//! So the hash changes, and a client and a server built from the two
//! versions refuse each other at connect (shmesh's schema mismatch), when
//! the package or the service is renamed, or a method is added, removed,
//! renamed or moved (method ids are positions, so moving one changes
//! ids), or its request or response type is another message (by full
//! name), or it starts or stops streaming on either side.
//!
//! It does not change with what protobuf keeps wire-compatible: fields
//! added to or removed from messages, comments, options, the order of
//! messages in the file. Those are protobuf's own evolution rules, which
//! prost follows on decode.

use sha2::{Digest, Sha256};

/// A service as the schema hash sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSchema {
    /// Fully qualified name, `package.Service` (or `Service` without a
    /// package).
    pub name: String,
    /// The methods, in declaration order (method id = index + 1).
    pub methods: Vec<MethodSchema>,
}

/// A method as the schema hash sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSchema {
    /// The name in the `.proto` file, e.g. `SayHello`.
    pub name: String,
    /// Fully qualified request type, without a leading dot.
    pub input_type: String,
    /// Fully qualified response type, without a leading dot.
    pub output_type: String,
    /// Whether the client sends a stream of requests.
    pub client_streaming: bool,
    /// Whether the server sends a stream of responses.
    pub server_streaming: bool,
}

/// What the canonical encoding starts with: changes if the encoding does.
const MAGIC: &[u8; 17] = b"shmesh-schema-v1\n";

impl ServiceSchema {
    /// The canonical encoding the hash is taken of (see the [module
    /// docs](self)).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_str(&mut out, &self.name);
        put_len(&mut out, self.methods.len());
        for m in &self.methods {
            put_str(&mut out, &m.name);
            put_str(&mut out, &m.input_type);
            put_str(&mut out, &m.output_type);
            out.push(u8::from(m.client_streaming) | (u8::from(m.server_streaming) << 1));
        }
        out
    }

    /// SHA-256 of [`ServiceSchema::canonical_bytes`].
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical_bytes()).into()
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Names and method lists are far below 4 GiB; saturate rather than wrap.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeter() -> ServiceSchema {
        ServiceSchema {
            name: "helloworld.Greeter".into(),
            methods: vec![
                MethodSchema {
                    name: "SayHello".into(),
                    input_type: "helloworld.HelloRequest".into(),
                    output_type: "helloworld.HelloReply".into(),
                    client_streaming: false,
                    server_streaming: false,
                },
                MethodSchema {
                    name: "SayHelloManyTimes".into(),
                    input_type: "helloworld.HelloRequest".into(),
                    output_type: "helloworld.HelloReply".into(),
                    client_streaming: false,
                    server_streaming: true,
                },
            ],
        }
    }

    #[test]
    fn encoding_is_the_documented_one() {
        let schema = ServiceSchema {
            name: "p.S".into(),
            methods: vec![MethodSchema {
                name: "M".into(),
                input_type: "p.A".into(),
                output_type: "p.B".into(),
                client_streaming: true,
                server_streaming: true,
            }],
        };
        let mut expected = b"shmesh-schema-v1\n".to_vec();
        expected.extend_from_slice(&[3, 0, 0, 0]);
        expected.extend_from_slice(b"p.S");
        expected.extend_from_slice(&[1, 0, 0, 0]);
        expected.extend_from_slice(&[1, 0, 0, 0, b'M']);
        expected.extend_from_slice(&[3, 0, 0, 0]);
        expected.extend_from_slice(b"p.A");
        expected.extend_from_slice(&[3, 0, 0, 0]);
        expected.extend_from_slice(b"p.B");
        expected.push(3);
        assert_eq!(schema.canonical_bytes(), expected);
    }

    #[test]
    fn every_part_of_the_rule_changes_the_hash() {
        let base = greeter().hash();
        let changes: Vec<fn(&mut ServiceSchema)> = vec![
            |s| s.name = "helloworld.Greeter2".into(),
            |s| s.methods.swap(0, 1),
            |s| {
                s.methods.pop();
            },
            |s| s.methods[0].name = "SayHi".into(),
            |s| s.methods[0].input_type = "helloworld.Other".into(),
            |s| s.methods[0].output_type = "helloworld.Other".into(),
            |s| s.methods[0].client_streaming = true,
            |s| s.methods[1].server_streaming = false,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            let mut schema = greeter();
            change(&mut schema);
            assert_ne!(schema.hash(), base, "change {i} kept the hash");
        }
        assert_eq!(greeter().hash(), base);
    }

    #[test]
    fn lengths_keep_names_apart() {
        // "ab" + "c" and "a" + "bc" must not encode alike.
        let mut one = greeter();
        one.methods[0].input_type = "ab".into();
        one.methods[0].output_type = "c".into();
        let mut two = greeter();
        two.methods[0].input_type = "a".into();
        two.methods[0].output_type = "bc".into();
        assert_ne!(one.hash(), two.hash());
    }
}
