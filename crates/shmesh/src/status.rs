//! The status of a call, modelled on gRPC's.
//!
//! Every call ends with a [`Status`]: a [`Code`] (the 17 gRPC codes, with
//! gRPC's numbers and canonical names), a human-readable message and
//! optional opaque details (gRPC's `grpc-status-details-bin`, typically an
//! encoded `google.rpc.Status`; shmesh does not interpret them).
//!
//! # Wire format
//!
//! A response carries its status in two places. The code travels on its
//! own, as the `u32` status word of the response descriptor, so a
//! successful call needs nothing more. A non-OK status also puts its message
//! and details in a payload slab, encoded by [`Status::encode_into`] and read
//! back by [`Status::decode`]. All integers are little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | message length in bytes, at most [`MAX_MESSAGE_LEN`] |
//! | 4 | message length | message, UTF-8 |
//! | 4 + message length | the rest | details, at most [`MAX_DETAILS_LEN`] bytes |
//!
//! The details run to the end of the bytes given to [`Status::decode`], so
//! the caller passes exactly the payload's length, not the whole slab.
//!
//! # Limits
//!
//! - A message is at most [`MAX_MESSAGE_LEN`] (64 KiB). A [`Status`] never
//!   holds a longer one: the constructors truncate a longer message at the
//!   last char boundary at or below the limit, so a status can always be
//!   built, even from an unbounded error chain.
//! - Details are at most [`MAX_DETAILS_LEN`] (1 MiB). [`Status::with_details`]
//!   accepts more, but [`Status::encode_into`] refuses to encode them
//!   ([`StatusEncodeError::DetailsTooLong`]).
//!
//! [`Status::decode`] enforces both limits, so whatever it returns can be
//! encoded again.
//!
//! # Unknown codes
//!
//! A peer built against a later protocol may send a code this build does not
//! know. As gRPC prescribes, such a status is treated as [`Code::Unknown`];
//! the raw value is not lost, [`Status::decode`] names it in the message:
//! `"unknown status code 42: <the peer's message>"` (or just
//! `"unknown status code 42"` when the peer sent no message). The details are
//! kept as sent.
//!
//! # Example
//!
//! ```
//! use shmesh::status::{Code, Status};
//!
//! let status = Status::deadline_exceeded("no reply within 50 ms").with_details(vec![1, 2, 3]);
//! assert_eq!(status.to_string(), "status DEADLINE_EXCEEDED: no reply within 50 ms");
//!
//! // The server writes the code into the descriptor and the rest into a slab.
//! let word = status.code().as_u32();
//! let mut slab = [0u8; 256];
//! let len = status.encode_into(&mut slab).unwrap();
//!
//! // The client reads them back.
//! let received = Status::decode(word, &slab[..len]).unwrap();
//! assert_eq!(received, status);
//! assert_eq!(received.code(), Code::DeadlineExceeded);
//!
//! // A code from the future becomes UNKNOWN and keeps its number in the message.
//! let future = Status::decode(42, &slab[..len]).unwrap();
//! assert_eq!(future.code(), Code::Unknown);
//! assert_eq!(future.message(), "unknown status code 42: no reply within 50 ms");
//! ```

use std::fmt;
use std::str::Utf8Error;

use thiserror::Error;

/// Longest message a [`Status`] holds, in bytes (64 KiB). Longer messages
/// are truncated on construction.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Most bytes of details a status may carry on the wire (1 MiB).
pub const MAX_DETAILS_LEN: usize = 1024 * 1024;
/// Bytes of the message length that starts every encoded status.
pub const LENGTH_PREFIX_LEN: usize = 4;

// ---------------------------------------------------------------------------
// Code

/// A status code: the 17 codes of gRPC, with gRPC's numeric values.
///
/// The number is what travels in a response descriptor's status word
/// ([`Code::as_u32`], [`Code::from_u32`]). The descriptions below follow
/// gRPC's.
///
/// ```
/// use shmesh::status::Code;
///
/// assert_eq!(Code::Unavailable.as_u32(), 14);
/// assert_eq!(Code::from_u32(14), Some(Code::Unavailable));
/// assert_eq!(Code::from_u32(17), None);
/// assert_eq!(Code::Unavailable.to_string(), "UNAVAILABLE");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Code {
    /// Not an error; returned on success (0).
    Ok = 0,
    /// The operation was cancelled, typically by the caller (1).
    Cancelled = 1,
    /// Unknown error, for instance an error from another address space or a
    /// status code this build does not know (2).
    Unknown = 2,
    /// The client specified an invalid argument, whatever the state of the
    /// system (3).
    InvalidArgument = 3,
    /// The deadline expired before the operation could complete (4).
    DeadlineExceeded = 4,
    /// Some requested entity was not found (5).
    NotFound = 5,
    /// The entity a client attempted to create already exists (6).
    AlreadyExists = 6,
    /// The caller does not have permission to execute the operation (7).
    PermissionDenied = 7,
    /// Some resource has been exhausted: a quota, pool slabs, ring slots,
    /// memory (8).
    ResourceExhausted = 8,
    /// The system is not in a state required for the operation (9).
    FailedPrecondition = 9,
    /// The operation was aborted, typically by a concurrency conflict (10).
    Aborted = 10,
    /// The operation was attempted past the valid range (11).
    OutOfRange = 11,
    /// The operation is not implemented or not supported (12).
    Unimplemented = 12,
    /// Internal error: an invariant the system relies on is broken (13).
    Internal = 13,
    /// The service is currently unavailable; retrying with a backoff may
    /// succeed (14).
    Unavailable = 14,
    /// Unrecoverable data loss or corruption (15).
    DataLoss = 15,
    /// The request lacks valid authentication credentials (16).
    Unauthenticated = 16,
}

impl Code {
    /// All codes, in numeric order: `Code::ALL[n].as_u32() == n`.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code a number names, if any (`None` for numbers above 16).
    pub fn from_u32(value: u32) -> Option<Code> {
        Some(match value {
            0 => Code::Ok,
            1 => Code::Cancelled,
            2 => Code::Unknown,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => return None,
        })
    }

    /// The code's number, as gRPC assigns it.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// gRPC's canonical name of the code: `"OK"`, `"CANCELLED"`,
    /// `"DEADLINE_EXCEEDED"` …
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// Whether this is [`Code::Ok`].
    pub fn is_ok(self) -> bool {
        self == Code::Ok
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Code> for u32 {
    fn from(code: Code) -> u32 {
        code.as_u32()
    }
}

// ---------------------------------------------------------------------------
// Status

/// The outcome of a call: a [`Code`], a message and opaque details.
///
/// The message is at most [`MAX_MESSAGE_LEN`] bytes: every constructor
/// truncates a longer one at a char boundary (see the [module
/// docs](self#limits)). A `Status` is an [`Error`](std::error::Error), shown
/// as `status CODE: message` (`status CODE` when the message is empty); the
/// details are not shown.
///
/// ```
/// use shmesh::status::{Code, Status};
///
/// let status = Status::not_found("no such key: 7");
/// assert_eq!(status.code(), Code::NotFound);
/// assert_eq!(status.message(), "no such key: 7");
/// assert!(status.details().is_empty());
/// assert_eq!(status.to_string(), "status NOT_FOUND: no such key: 7");
///
/// let err: Box<dyn std::error::Error> = Box::new(Status::new(Code::Aborted, ""));
/// assert_eq!(err.to_string(), "status ABORTED");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Status {
    code: Code,
    message: String,
    details: Vec<u8>,
}

/// Defines one constructor per non-OK code.
macro_rules! constructors {
    ($($name:ident => $code:ident,)*) => {
        $(
            #[doc = concat!(
                "A [`Code::", stringify!($code), "`] status with this message ",
                "(truncated to [`MAX_MESSAGE_LEN`] bytes) and no details."
            )]
            pub fn $name(message: impl Into<String>) -> Status {
                Status::new(Code::$code, message)
            }
        )*
    };
}

impl Status {
    /// A status with this code and message (truncated to
    /// [`MAX_MESSAGE_LEN`] bytes, at a char boundary) and no details.
    ///
    /// ```
    /// use shmesh::status::{Code, MAX_MESSAGE_LEN, Status};
    ///
    /// let status = Status::new(Code::Internal, "é".repeat(MAX_MESSAGE_LEN));
    /// assert_eq!(status.message().len(), MAX_MESSAGE_LEN);
    /// let status = Status::new(Code::Internal, format!("x{}", "é".repeat(MAX_MESSAGE_LEN)));
    /// assert_eq!(status.message().len(), MAX_MESSAGE_LEN - 1);
    /// ```
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: truncate_message(message.into()),
            details: Vec::new(),
        }
    }

    constructors! {
        cancelled => Cancelled,
        unknown => Unknown,
        invalid_argument => InvalidArgument,
        deadline_exceeded => DeadlineExceeded,
        not_found => NotFound,
        already_exists => AlreadyExists,
        permission_denied => PermissionDenied,
        resource_exhausted => ResourceExhausted,
        failed_precondition => FailedPrecondition,
        aborted => Aborted,
        out_of_range => OutOfRange,
        unimplemented => Unimplemented,
        internal => Internal,
        unavailable => Unavailable,
        data_loss => DataLoss,
        unauthenticated => Unauthenticated,
    }

    /// The same status with these details, replacing any it had.
    ///
    /// Details longer than [`MAX_DETAILS_LEN`] are accepted here but cannot
    /// be encoded: [`encode_into`](Status::encode_into) refuses them.
    #[must_use]
    pub fn with_details(mut self, details: impl Into<Vec<u8>>) -> Status {
        self.details = details.into();
        self
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message, at most [`MAX_MESSAGE_LEN`] bytes.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The details (opaque bytes, possibly empty).
    pub fn details(&self) -> &[u8] {
        &self.details
    }

    /// Bytes [`encode_into`](Status::encode_into) writes: the 4-byte length,
    /// the message and the details (computed even when the details are too
    /// long to encode).
    pub fn encoded_len(&self) -> usize {
        LENGTH_PREFIX_LEN + self.message.len() + self.details.len()
    }

    /// Writes the message and details at the start of `buf` in the [wire
    /// format](self#wire-format) and returns the number of bytes written,
    /// [`encoded_len`](Status::encoded_len). The code is not written: it
    /// travels separately (see [`Code::as_u32`]). Bytes of `buf` past the
    /// returned length are left untouched.
    ///
    /// # Errors
    ///
    /// [`StatusEncodeError::DetailsTooLong`] if the details exceed
    /// [`MAX_DETAILS_LEN`]; [`StatusEncodeError::BufferTooSmall`] if `buf` is
    /// shorter than [`encoded_len`](Status::encoded_len). On error, `buf` is
    /// left untouched.
    ///
    /// ```
    /// use shmesh::status::{Status, StatusEncodeError};
    ///
    /// let status = Status::unavailable("draining");
    /// let mut buf = [0u8; 8];
    /// assert_eq!(
    ///     status.encode_into(&mut buf),
    ///     Err(StatusEncodeError::BufferTooSmall { needed: 12, available: 8 })
    /// );
    /// ```
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, StatusEncodeError> {
        if self.details.len() > MAX_DETAILS_LEN {
            return Err(StatusEncodeError::DetailsTooLong {
                len: self.details.len(),
                max: MAX_DETAILS_LEN,
            });
        }
        let needed = self.encoded_len();
        let available = buf.len();
        let Some(out) = buf.get_mut(..needed) else {
            return Err(StatusEncodeError::BufferTooSmall { needed, available });
        };
        let (prefix, rest) = out.split_at_mut(LENGTH_PREFIX_LEN);
        let (message, details) = rest.split_at_mut(self.message.len());
        // The message is at most MAX_MESSAGE_LEN bytes, so its length fits.
        prefix.copy_from_slice(&(self.message.len() as u32).to_le_bytes());
        message.copy_from_slice(self.message.as_bytes());
        details.copy_from_slice(&self.details);
        Ok(needed)
    }

    /// Reads a status back: `code` is the response descriptor's status word
    /// and `bytes` exactly the payload [`encode_into`](Status::encode_into)
    /// wrote (the details run to its end).
    ///
    /// A `code` this build does not know decodes as [`Code::Unknown`] with a
    /// message naming the raw value, `"unknown status code N"`, followed by
    /// `": "` and the peer's message if there was one (truncated to
    /// [`MAX_MESSAGE_LEN`]); the details are kept (see the [module
    /// docs](self#unknown-codes)). Decoding never panics, whatever the input.
    ///
    /// # Errors
    ///
    /// A [`StatusDecodeError`] if `bytes` is not a valid encoding: fewer than
    /// 4 bytes, a message length above [`MAX_MESSAGE_LEN`] or beyond the
    /// bytes present, a message that is not UTF-8, or details longer than
    /// [`MAX_DETAILS_LEN`].
    ///
    /// ```
    /// use shmesh::status::{Code, Status, StatusDecodeError};
    ///
    /// let status = Status::decode(5, b"\x02\0\0\0hi\x07").unwrap();
    /// assert_eq!(status, Status::not_found("hi").with_details(vec![7]));
    ///
    /// assert_eq!(
    ///     Status::decode(5, b"\x09\0\0\0hi"),
    ///     Err(StatusDecodeError::MessageOverrun { len: 9, available: 2 })
    /// );
    /// ```
    pub fn decode(code: u32, bytes: &[u8]) -> Result<Status, StatusDecodeError> {
        let Some((prefix, rest)) = bytes.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
            return Err(StatusDecodeError::TruncatedLength { len: bytes.len() });
        };
        // Lossless on every target shmesh supports (usize is at least 32 bits).
        let len = u32::from_le_bytes(*prefix) as usize;
        if len > MAX_MESSAGE_LEN {
            return Err(StatusDecodeError::MessageTooLong {
                len,
                max: MAX_MESSAGE_LEN,
            });
        }
        let Some((message, details)) = rest.split_at_checked(len) else {
            return Err(StatusDecodeError::MessageOverrun {
                len,
                available: rest.len(),
            });
        };
        let message = std::str::from_utf8(message)
            .map_err(|source| StatusDecodeError::InvalidUtf8 { source })?;
        if details.len() > MAX_DETAILS_LEN {
            return Err(StatusDecodeError::DetailsTooLong {
                len: details.len(),
                max: MAX_DETAILS_LEN,
            });
        }
        let status = match Code::from_u32(code) {
            Some(code) => Status::new(code, message),
            None if message.is_empty() => {
                Status::new(Code::Unknown, format!("unknown status code {code}"))
            }
            None => Status::new(
                Code::Unknown,
                format!("unknown status code {code}: {message}"),
            ),
        };
        Ok(status.with_details(details))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "status {}", self.code)
        } else {
            write!(f, "status {}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}

/// Cuts `message` to at most [`MAX_MESSAGE_LEN`] bytes, at a char boundary.
fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        // Index 0 is a char boundary, so this stops.
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

// ---------------------------------------------------------------------------
// Errors

/// Why [`Status::encode_into`] could not encode a status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StatusEncodeError {
    /// The buffer cannot hold the encoding.
    #[error("status needs {needed} bytes; the buffer holds {available}")]
    BufferTooSmall {
        /// Bytes the encoding takes ([`Status::encoded_len`]).
        needed: usize,
        /// Bytes in the buffer.
        available: usize,
    },
    /// The details exceed [`MAX_DETAILS_LEN`].
    #[error("status details are {len} bytes long; at most {max} allowed")]
    DetailsTooLong {
        /// Their length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
}

/// Why [`Status::decode`] rejected its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StatusDecodeError {
    /// Fewer than the 4 bytes of the message length.
    #[error("status payload is {len} bytes; the message length alone takes 4")]
    TruncatedLength {
        /// Bytes given.
        len: usize,
    },
    /// The message length exceeds [`MAX_MESSAGE_LEN`].
    #[error("status message is {len} bytes long; at most {max} allowed")]
    MessageTooLong {
        /// The length read.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The message length runs past the end of the bytes.
    #[error("status message is {len} bytes long but only {available} bytes follow its length")]
    MessageOverrun {
        /// The length read.
        len: usize,
        /// Bytes after the length.
        available: usize,
    },
    /// The message is not UTF-8.
    #[error("status message is not valid UTF-8")]
    InvalidUtf8 {
        /// Where and how the bytes go wrong.
        #[source]
        source: Utf8Error,
    },
    /// The details exceed [`MAX_DETAILS_LEN`].
    #[error("status details are {len} bytes long; at most {max} allowed")]
    DetailsTooLong {
        /// Their length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];

    fn encode(status: &Status) -> Vec<u8> {
        let mut buf = vec![0; status.encoded_len()];
        let len = status.encode_into(&mut buf).unwrap();
        assert_eq!(len, buf.len());
        buf
    }

    /// A payload with this message length prefix and body.
    fn payload(len: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn every_code_round_trips_through_its_number_and_name() {
        for (n, (&code, &name)) in Code::ALL.iter().zip(NAMES.iter()).enumerate() {
            let n = u32::try_from(n).unwrap();
            assert_eq!(code as u32, n);
            assert_eq!(code.as_u32(), n);
            assert_eq!(u32::from(code), n);
            assert_eq!(Code::from_u32(n), Some(code));
            assert_eq!(code.as_str(), name);
            assert_eq!(code.to_string(), name);
            assert_eq!(code.is_ok(), n == 0);
        }
        for n in [17, 18, 100, 0x8000_0000, u32::MAX] {
            assert_eq!(Code::from_u32(n), None, "{n}");
        }
    }

    #[test]
    fn constructors_set_their_codes() {
        type Make = fn(&'static str) -> Status;
        let cases: [(Make, Code); 16] = [
            (Status::cancelled, Code::Cancelled),
            (Status::unknown, Code::Unknown),
            (Status::invalid_argument, Code::InvalidArgument),
            (Status::deadline_exceeded, Code::DeadlineExceeded),
            (Status::not_found, Code::NotFound),
            (Status::already_exists, Code::AlreadyExists),
            (Status::permission_denied, Code::PermissionDenied),
            (Status::resource_exhausted, Code::ResourceExhausted),
            (Status::failed_precondition, Code::FailedPrecondition),
            (Status::aborted, Code::Aborted),
            (Status::out_of_range, Code::OutOfRange),
            (Status::unimplemented, Code::Unimplemented),
            (Status::internal, Code::Internal),
            (Status::unavailable, Code::Unavailable),
            (Status::data_loss, Code::DataLoss),
            (Status::unauthenticated, Code::Unauthenticated),
        ];
        for (make, code) in cases {
            let status = make("why");
            assert_eq!(status, Status::new(code, "why"));
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "why");
            assert!(status.details().is_empty());
        }
        let covered: Vec<Code> = cases.iter().map(|&(_, code)| code).collect();
        assert_eq!(covered, Code::ALL[1..]);
    }

    #[test]
    fn with_details_replaces_details() {
        let status = Status::internal("x")
            .with_details([1u8, 2])
            .with_details(vec![3]);
        assert_eq!(status.details(), [3]);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "x");
    }

    #[test]
    fn display_and_error() {
        let status = Status::deadline_exceeded("no reply in 5 ms").with_details(vec![9; 4]);
        assert_eq!(
            status.to_string(),
            "status DEADLINE_EXCEEDED: no reply in 5 ms"
        );
        assert_eq!(Status::new(Code::Ok, "").to_string(), "status OK");
        let err: Box<dyn std::error::Error + Send + Sync> = Box::new(status);
        assert!(err.source().is_none());
        assert_eq!(
            err.to_string(),
            "status DEADLINE_EXCEEDED: no reply in 5 ms"
        );
    }

    #[test]
    fn long_messages_are_truncated_at_a_char_boundary() {
        let exact = "a".repeat(MAX_MESSAGE_LEN);
        assert_eq!(Status::internal(exact.clone()).message(), exact);

        let over = "a".repeat(MAX_MESSAGE_LEN + 10);
        assert_eq!(Status::internal(over).message(), exact);

        // "€" is 3 bytes: one straddles the limit and must go entirely.
        let straddling = format!("{}€€", "a".repeat(MAX_MESSAGE_LEN - 4));
        let status = Status::internal(straddling);
        assert_eq!(status.message().len(), MAX_MESSAGE_LEN - 1);
        assert!(status.message().ends_with("a€"));

        // A 4-byte char, at every offset relative to the limit.
        for pad in 0..4 {
            let message = format!(
                "{}{}",
                "a".repeat(pad),
                "🦀".repeat(MAX_MESSAGE_LEN / 4 + 1)
            );
            let status = Status::internal(message.clone());
            let len = status.message().len();
            assert!(len <= MAX_MESSAGE_LEN && len > MAX_MESSAGE_LEN - 4, "{pad}");
            assert!(message.starts_with(status.message()));
        }
    }

    #[test]
    fn encoding_is_as_documented() {
        let status = Status::unavailable("hé").with_details(vec![0xff, 0]);
        assert_eq!(status.encoded_len(), 4 + 3 + 2);
        assert_eq!(encode(&status), [3, 0, 0, 0, b'h', 0xc3, 0xa9, 0xff, 0]);
        assert_eq!(encode(&Status::new(Code::Ok, "")), [0, 0, 0, 0]);
    }

    #[test]
    fn encode_decode_round_trips() {
        let statuses = [
            Status::new(Code::Ok, ""),
            Status::cancelled(""),
            Status::unavailable("shutting down").with_details(b"retry-after=5".to_vec()),
            Status::internal("ünïcödé ✓ 🦀").with_details(vec![0; 100]),
            Status::data_loss("x".repeat(MAX_MESSAGE_LEN)).with_details(vec![7; MAX_DETAILS_LEN]),
        ];
        for status in statuses {
            let bytes = encode(&status);
            assert_eq!(
                Status::decode(status.code().as_u32(), &bytes),
                Ok(status.clone())
            );
        }
        for code in Code::ALL {
            let status = Status::new(code, code.as_str()).with_details(vec![code as u8]);
            assert_eq!(Status::decode(code.as_u32(), &encode(&status)), Ok(status));
        }
    }

    #[test]
    fn encode_into_a_larger_buffer_leaves_the_rest_alone() {
        let status = Status::aborted("conflict");
        let mut buf = [0xaau8; 64];
        let len = status.encode_into(&mut buf).unwrap();
        assert_eq!(len, status.encoded_len());
        assert!(buf[len..].iter().all(|&b| b == 0xaa));
        assert_eq!(Status::decode(10, &buf[..len]), Ok(status));
    }

    #[test]
    fn buffer_too_small_is_an_error() {
        let status = Status::resource_exhausted("pool empty").with_details(vec![1, 2, 3]);
        let needed = status.encoded_len();
        for available in 0..needed {
            let mut buf = vec![0x55; available];
            assert_eq!(
                status.encode_into(&mut buf),
                Err(StatusEncodeError::BufferTooSmall { needed, available })
            );
            assert!(buf.iter().all(|&b| b == 0x55), "buffer written on error");
        }
        let mut buf = vec![0; needed];
        assert_eq!(status.encode_into(&mut buf), Ok(needed));
        let e = status.encode_into(&mut [0; 3]).unwrap_err().to_string();
        assert!(e.contains(&needed.to_string()) && e.contains('3'), "{e}");
    }

    #[test]
    fn details_too_long_to_encode() {
        let status = Status::internal("big").with_details(vec![0; MAX_DETAILS_LEN + 1]);
        let mut buf = vec![0; status.encoded_len()];
        assert_eq!(
            status.encode_into(&mut buf),
            Err(StatusEncodeError::DetailsTooLong {
                len: MAX_DETAILS_LEN + 1,
                max: MAX_DETAILS_LEN
            })
        );
        // Too long wins over too small.
        assert!(matches!(
            status.encode_into(&mut []),
            Err(StatusEncodeError::DetailsTooLong { .. })
        ));
    }

    #[test]
    fn decode_rejects_a_truncated_length() {
        for len in 0..4 {
            assert_eq!(
                Status::decode(2, &[0; 3][..len]),
                Err(StatusDecodeError::TruncatedLength { len })
            );
        }
    }

    #[test]
    fn decode_rejects_a_message_over_the_limit() {
        for declared in [MAX_MESSAGE_LEN as u32 + 1, u32::MAX] {
            assert_eq!(
                Status::decode(2, &payload(declared, b"short")),
                Err(StatusDecodeError::MessageTooLong {
                    len: declared as usize,
                    max: MAX_MESSAGE_LEN
                })
            );
        }
        // Even when the bytes are all there.
        let bytes = payload(MAX_MESSAGE_LEN as u32 + 1, &[b'a'; MAX_MESSAGE_LEN + 1]);
        assert!(matches!(
            Status::decode(2, &bytes),
            Err(StatusDecodeError::MessageTooLong { .. })
        ));
    }

    #[test]
    fn decode_rejects_a_message_past_the_end() {
        assert_eq!(
            Status::decode(13, &payload(5, b"abcd")),
            Err(StatusDecodeError::MessageOverrun {
                len: 5,
                available: 4
            })
        );
        assert_eq!(
            Status::decode(13, &payload(1, b"")),
            Err(StatusDecodeError::MessageOverrun {
                len: 1,
                available: 0
            })
        );
        // Exactly enough is fine.
        assert_eq!(
            Status::decode(13, &payload(4, b"abcd")),
            Ok(Status::internal("abcd"))
        );
    }

    #[test]
    fn decode_rejects_invalid_utf8() {
        // Invalid bytes in the message; the same bytes in the details are fine.
        let err = Status::decode(3, &payload(3, b"a\xffb")).unwrap_err();
        let StatusDecodeError::InvalidUtf8 { source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(source.valid_up_to(), 1);
        assert!(err.source().is_some());
        assert!(err.to_string().contains("UTF-8"), "{err}");
        // A multi-byte char cut by the message length.
        assert!(matches!(
            Status::decode(3, &payload(1, "é".as_bytes())),
            Err(StatusDecodeError::InvalidUtf8 { .. })
        ));
        assert_eq!(
            Status::decode(3, &payload(1, b"a\xff")),
            Ok(Status::invalid_argument("a").with_details(vec![0xff]))
        );
    }

    #[test]
    fn decode_rejects_details_over_the_limit() {
        let mut body = b"m".to_vec();
        body.resize(1 + MAX_DETAILS_LEN + 1, 0);
        assert_eq!(
            Status::decode(15, &payload(1, &body)),
            Err(StatusDecodeError::DetailsTooLong {
                len: MAX_DETAILS_LEN + 1,
                max: MAX_DETAILS_LEN
            })
        );
        body.pop();
        let status = Status::decode(15, &payload(1, &body)).unwrap();
        assert_eq!(status.details().len(), MAX_DETAILS_LEN);
    }

    #[test]
    fn unknown_codes_decode_as_unknown_naming_the_value() {
        let bytes = encode(&Status::unavailable("try later").with_details(vec![1, 2]));
        let status = Status::decode(17, &bytes).unwrap();
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(status.message(), "unknown status code 17: try later");
        assert_eq!(status.details(), [1, 2]);

        let status = Status::decode(u32::MAX, &[0, 0, 0, 0]).unwrap();
        assert_eq!(
            status,
            Status::unknown(format!("unknown status code {}", u32::MAX))
        );

        // The combined message still respects the limit.
        let bytes = encode(&Status::internal("z".repeat(MAX_MESSAGE_LEN)));
        let status = Status::decode(1000, &bytes).unwrap();
        assert_eq!(status.message().len(), MAX_MESSAGE_LEN);
        assert!(
            status
                .message()
                .starts_with("unknown status code 1000: zzz")
        );

        // Malformed bytes are still an error, whatever the code.
        assert_eq!(
            Status::decode(99, &[1]),
            Err(StatusDecodeError::TruncatedLength { len: 1 })
        );
    }

    #[test]
    fn errors_read_well() {
        let e = StatusDecodeError::MessageOverrun {
            len: 9,
            available: 2,
        }
        .to_string();
        assert!(e.contains('9') && e.contains('2'), "{e}");
        let e = StatusDecodeError::TruncatedLength { len: 1 }.to_string();
        assert!(e.contains('1') && e.contains('4'), "{e}");
        let e = StatusEncodeError::DetailsTooLong { len: 5, max: 4 }.to_string();
        assert!(e.contains("details"), "{e}");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn any_code() -> impl Strategy<Value = Code> {
            prop::sample::select(Code::ALL.to_vec())
        }

        /// Checks what holds of any successful decode.
        fn check_decoded(code: u32, bytes: &[u8], status: &Status) -> Result<(), TestCaseError> {
            prop_assert!(status.message().len() <= MAX_MESSAGE_LEN);
            prop_assert!(status.details().len() <= MAX_DETAILS_LEN);
            prop_assert!(bytes.ends_with(status.details()));
            match Code::from_u32(code) {
                Some(known) => {
                    prop_assert_eq!(status.code(), known);
                    // The encoding is canonical.
                    let mut buf = vec![0; status.encoded_len()];
                    prop_assert_eq!(status.encode_into(&mut buf), Ok(bytes.len()));
                    prop_assert_eq!(&buf[..], bytes);
                }
                None => {
                    prop_assert_eq!(status.code(), Code::Unknown);
                    let prefix = format!("unknown status code {code}");
                    prop_assert!(status.message().starts_with(&prefix));
                }
            }
            Ok(())
        }

        proptest! {
            /// Arbitrary bytes with an arbitrary code never panic, and
            /// whatever decodes satisfies the limits and re-encodes.
            #[test]
            fn arbitrary_bytes_never_panic(
                code in any::<u32>(),
                bytes in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                if let Ok(status) = Status::decode(code, &bytes) {
                    check_decoded(code, &bytes, &status)?;
                }
            }

            /// The same with a plausible length prefix, so decoding gets
            /// past the length checks.
            #[test]
            fn plausible_lengths_never_panic(
                code in prop_oneof![0u32..20, any::<u32>()],
                len in prop_oneof![0u32..300, any::<u32>()],
                body in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let bytes = payload(len, &body);
                match Status::decode(code, &bytes) {
                    Ok(status) => check_decoded(code, &bytes, &status)?,
                    Err(StatusDecodeError::MessageOverrun { len: l, available }) => {
                        prop_assert_eq!(l, len as usize);
                        prop_assert!(available < l);
                    }
                    Err(_) => {}
                }
            }

            /// Every status round-trips through its encoding and code.
            #[test]
            fn encode_decode_round_trips(
                code in any_code(),
                message in any::<String>(),
                details in prop::collection::vec(any::<u8>(), 0..300),
            ) {
                let status = Status::new(code, message).with_details(details);
                let mut buf = vec![0; status.encoded_len()];
                prop_assert_eq!(status.encode_into(&mut buf), Ok(buf.len()));
                prop_assert_eq!(Status::decode(code.as_u32(), &buf), Ok(status));
            }

            /// Encoding into any buffer either fits exactly `encoded_len`
            /// bytes or reports the shortfall; it never panics.
            #[test]
            fn encode_into_any_buffer(
                code in any_code(),
                message in ".{0,40}",
                details in prop::collection::vec(any::<u8>(), 0..40),
                size in 0usize..100,
            ) {
                let status = Status::new(code, message).with_details(details);
                let needed = status.encoded_len();
                let mut buf = vec![0; size];
                match status.encode_into(&mut buf) {
                    Ok(n) => {
                        prop_assert_eq!(n, needed);
                        prop_assert!(size >= needed);
                        prop_assert_eq!(Status::decode(code.as_u32(), &buf[..n]), Ok(status));
                    }
                    Err(e) => {
                        prop_assert!(size < needed);
                        prop_assert_eq!(e, StatusEncodeError::BufferTooSmall { needed, available: size });
                    }
                }
            }
        }
    }
}
