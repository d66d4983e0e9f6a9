//! The backbone wire format, version 6 (documented in `docs/backbone-protocol.md`).
//!
//! Sans-IO: encoding appends to a `BytesMut`; decoding takes bytes and returns values or a
//! [`WireError`]. Every read is bounds-checked; no input can make this code panic, and no
//! buffer is sized from an announced length: [`FrameDecoder`] holds only the bytes that
//! arrived and refuses a frame announced above its limit ([`MAX_CONTROL_MESSAGE`] on the
//! control stream, [`HANDSHAKE_MESSAGE`] before the hello completes, [`MAX_MESSAGE`] for
//! media items).
//!
//! Two kinds of QUIC stream carry it:
//! * the **control stream** (bidirectional, opened by the dialer): a sequence of
//!   `u32 length | u8 type | body` messages ([`ControlMessage`]);
//! * **media streams** (unidirectional, opened by the media sender, one per group): a
//!   [`GroupHeader`] then `u32 length | u8 kind | body` items ([`MediaItem`]).

mod control;
mod media;
#[cfg(test)]
mod tests;

pub(crate) use control::role_to_u8;
pub use control::{Announcement, ControlMessage, NodeRecord, MAX_RECORD_ITEMS};
pub use media::{GroupHeader, MediaItem};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::media::{Codec, StreamKey};

/// Protocol version carried in the hello; peers with another major version are refused.
pub const VERSION: u16 = 7;
/// The TLS ALPN token of the backbone.
pub const ALPN: &[u8] = b"meshcast/3";
/// Largest media item accepted (a 4K keyframe fits comfortably).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest control message accepted once the hello is done (a node state of a few hundred
/// nodes is well under 1 MiB: its stream lists are capped at 256 KiB).
pub const MAX_CONTROL_MESSAGE: usize = 4 << 20;
/// Largest message accepted before the hello completes (a Hello is at most ~2.1 KB).
pub const HANDSHAKE_MESSAGE: usize = 4 << 10;
/// Largest string field.
pub(crate) const MAX_STRING: usize = 1024;
/// Media stream header: magic `MG` (meshcast group), then version.
const GROUP_MAGIC: [u8; 2] = *b"MG";
pub const GROUP_HEADER_LEN: usize = 2 + 1 + 8 + 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message truncated")]
    Truncated,
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown control message type {0:#04x}")]
    UnknownType(u8),
    #[error("unknown media item kind {0:#04x}")]
    UnknownKind(u8),
    #[error("string field is not UTF-8 or too long")]
    BadString,
    #[error("invalid stream name: {0}")]
    BadStreamKey(String),
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("bad media stream header")]
    BadGroupHeader,
    #[error("{0} trailing bytes after message body")]
    Trailing(usize),
    /// A Hello or Challenge of another protocol version (its first two bytes are the
    /// version in every version; the rest is not read).
    #[error("protocol version {0}")]
    Version(u16),
}

/// Every code the backbone puts on the wire, by name (the table in
/// `docs/backbone-protocol.md`, "Codes", lists the same).
///
/// * `u16` result codes of SubscribeError and SubscribeDone: what the subscriber does next
///   (`backbone::rehome::UpstreamEnd::of`: only [`code::ENDED`] ends a pull; any other code
///   makes it look for another upstream).
/// * `u32` QUIC application codes: `CLOSE_*` close a connection, `STREAM_*` stop or reset
///   a media (group) stream. The reason phrase that goes with a close is for logs.
pub mod code {
    /// SubscribeDone: the publisher ended the stream.
    pub const ENDED: u16 = 200;
    /// SubscribeError: the stream is not published here (nor, for an edge's subscribe,
    /// anywhere this node can pull it from).
    pub const NOT_FOUND: u16 = 404;
    /// SubscribeDone: the stream lives on, published elsewhere (its publisher here lost the
    /// name to another origin): look it up again.
    pub const MOVED: u16 = 409;
    /// SubscribeDone: the subscriber fell too far behind, or stopped reading.
    pub const TOO_SLOW: u16 = 429;
    /// SubscribeError: this node's own pull of the stream did not go live in time.
    pub const TIMEOUT: u16 = 504;
    /// SubscribeDone (never seen by a live subscriber): the subscriber unsubscribed, or the
    /// link went away while the media was being written.
    pub const GONE: u16 = 0;

    /// Connection close: the node is shutting down.
    pub const CLOSE_SHUTDOWN: u32 = 0;
    /// Connection close: the hello failed (version, authentication, certificate) or the
    /// link broke the protocol; the reason says which.
    pub const CLOSE_ERROR: u32 = 1;
    /// Connection close: nothing arrived within the link timeout (the peer is presumed dead).
    pub const CLOSE_SILENT: u32 = 2;

    /// Media stream STOP_SENDING: nobody reads this group (unsubscribed, or the pull ended).
    pub const STREAM_UNWANTED: u32 = 0;
    /// Media stream STOP_SENDING: its header or an item was malformed.
    pub const STREAM_MALFORMED: u32 = 1;
    /// Media stream RESET: the sender abandoned the group (its subscriber lagged; the next
    /// group starts at a keyframe).
    pub const STREAM_ABANDONED: u32 = 1;
}

/// Splits a byte stream into `(type, body)` frames.
///
/// It holds only the bytes pushed so far (never a buffer sized from an announced length)
/// and refuses a frame announced above its limit as soon as the length prefix is in.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    limit: usize,
}

impl Default for FrameDecoder {
    /// A decoder of frames up to [`MAX_MESSAGE`].
    fn default() -> Self {
        FrameDecoder::with_limit(MAX_MESSAGE)
    }
}

impl FrameDecoder {
    /// A decoder of frames up to `limit` bytes (type and body).
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            limit: limit.min(MAX_MESSAGE),
        }
    }

    /// Changes the limit for the frames not yet returned.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_MESSAGE);
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes pushed and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Bytes)>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len == 0 {
            return Err(WireError::Truncated);
        }
        if len > self.limit {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let mut frame = self.buf.split_to(len).freeze();
        let t = frame.get_u8();
        Ok(Some((t, frame)))
    }
}

/// Parses a frame length prefix, checking the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(WireError::Truncated);
    }
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

fn put_frame(out: &mut BytesMut, t: u8, body: &[u8]) {
    out.reserve(5 + body.len());
    out.put_u32(1 + body.len() as u32);
    out.put_u8(t);
    out.put_slice(body);
}

pub(super) fn put_str(out: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, MAX_STRING);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(super) fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

/// Bounds-checked reads over a message body.
pub(super) struct Reader(Bytes);

impl Reader {
    pub(super) fn need(&self, n: usize) -> Result<(), WireError> {
        if self.0.remaining() < n {
            Err(WireError::Truncated)
        } else {
            Ok(())
        }
    }
    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    pub(super) fn i32(&mut self) -> Result<i32, WireError> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }
    pub(super) fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    pub(super) fn i64(&mut self) -> Result<i64, WireError> {
        self.need(8)?;
        Ok(self.0.get_i64())
    }
    pub(super) fn f64(&mut self) -> Result<f64, WireError> {
        self.need(8)?;
        Ok(self.0.get_f64())
    }
    pub(super) fn string(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(WireError::BadString);
        }
        self.need(len)?;
        let b = self.0.split_to(len);
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadString)
    }
    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut out = [0u8; N];
        self.0.copy_to_slice(&mut out);
        Ok(out)
    }
    pub(super) fn bytes(&mut self) -> Result<Bytes, WireError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.0.split_to(len))
    }
    pub(super) fn stream_key(&mut self) -> Result<StreamKey, WireError> {
        let s = self.string()?;
        StreamKey::parse_relayable(&s).map_err(|_| WireError::BadStreamKey(s))
    }
    pub(super) fn codec(&mut self) -> Result<Codec, WireError> {
        let id = self.u8()?;
        Codec::from_wire_id(id).ok_or(WireError::UnknownCodec(id))
    }
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
    pub(super) fn finish(&self) -> Result<(), WireError> {
        match self.0.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}
