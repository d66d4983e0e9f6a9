//! The backbone wire format, version 5 (documented in `docs/backbone-protocol.md`).
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

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::auth::{Nonce, Proof};
use crate::media::{
    valid_rid, AudioConfig, Codec, Frame, Metadata, SimulcastLayer, StreamConfig, StreamKey,
    Timebase, VideoConfig,
};

/// Protocol version carried in the hello; peers with another major version are refused.
pub const VERSION: u16 = 5;
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

/// The role a node announces in its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    Origin,
    Edge,
    Standalone,
}

impl PeerRole {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            PeerRole::Origin => 1,
            PeerRole::Edge => 2,
            PeerRole::Standalone => 3,
        }
    }

    fn from_u8(v: u8) -> Result<PeerRole, WireError> {
        match v {
            1 => Ok(PeerRole::Origin),
            2 => Ok(PeerRole::Edge),
            3 => Ok(PeerRole::Standalone),
            _ => Err(WireError::Invalid("unknown role")),
        }
    }

    /// Origins and standalone nodes hold publishers and belong to the mesh.
    pub fn is_origin(self) -> bool {
        matches!(self, PeerRole::Origin | PeerRole::Standalone)
    }
}

/// A stream published on the announcing node: which publish (`session`) and since when.
/// Two origins that both hold a publisher of one name keep the one that ranks first
/// ([`Announcement::rank`]); both sides compute the same answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub stream: StreamKey,
    pub session: u64,
    /// When the publish started, in unix milliseconds (of the announcing node's clock).
    pub started_ms: u64,
}

impl Announcement {
    /// The order that settles a name published on two origins: the earlier publish wins,
    /// then the lower node id. Lower is better.
    pub fn rank<'a>(&self, node: &'a str) -> (u64, &'a str) {
        (self.started_ms, node)
    }
}

/// What a node tells the cluster about itself, for routing: sent every second in
/// [`ControlMessage::NodeState`], passed on at most once by an origin.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeRecord {
    pub node: String,
    pub role: PeerRole,
    pub region: String,
    /// Base URLs clients are sent to.
    pub http_url: String,
    pub rtmp_url: String,
    /// The node process's start (unix ms): a restarted node is a new incarnation.
    pub incarnation: u64,
    /// Milliseconds since the record was made (0 from its own node; a relaying origin adds
    /// how long it held it), so a relayed record ages like a direct one.
    pub age_ms: u32,
    /// Viewers (players of every protocol) attached now.
    pub viewers: u32,
    /// Load, 0-1000: the larger of viewers / max_viewers and CPU use.
    pub load_permille: u16,
    /// Egresses (RTMP pushes, recordings) running.
    pub egress: u32,
    /// Bits per second sent to viewers, downstream nodes and egress.
    pub out_bps: u64,
    /// Measured round-trip times to the nodes it links to: (node, µs).
    pub links: Vec<(String, u32)>,
    /// Streams it has now (published, or pulled for viewers): "warm" for routing.
    pub streams: Vec<StreamKey>,
    /// Which upstream serves how many of its pulled streams: (node, streams).
    pub pulls: Vec<(String, u32)>,
}

/// At most this many links and streams go in one record.
pub const MAX_RECORD_ITEMS: usize = 1024;

/// Control-stream messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlMessage {
    /// Dialer → acceptor, first message: who the dialer is, and its nonce.
    Hello {
        version: u16,
        node_id: String,
        role: PeerRole,
        region: String,
        nonce: Nonce,
    },
    /// Acceptor → dialer, answer to a hello of this version: who the acceptor is, and its
    /// nonce.
    Challenge {
        version: u16,
        node_id: String,
        role: PeerRole,
        region: String,
        nonce: Nonce,
    },
    /// Dialer → acceptor: the dialer's proof of the token ([`super::auth`]).
    Auth { proof: Proof },
    /// Acceptor → dialer, once the dialer's proof checked out: the acceptor's proof. The
    /// session is up on both sides once this is verified.
    Welcome { proof: Proof },
    /// Acceptor → dialer: a stream is published on the acceptor.
    Announce(Announcement),
    /// Acceptor → dialer: the stream is no longer published there.
    Withdraw { stream: StreamKey },
    /// Dialer → acceptor: send me this stream as subscription `id`.
    Subscribe { id: u64, stream: StreamKey },
    /// Acceptor → dialer: media for `id` follows on group streams, on the timeline
    /// `session` (one publish, as the acceptor serves it: a subscriber that moves to another
    /// upstream keeps its timestamps when the session is the same).
    SubscribeOk { id: u64, session: u64 },
    /// Acceptor → dialer: subscription `id` refused.
    SubscribeError { id: u64, code: u16, reason: String },
    /// Dialer → acceptor: stop sending `id`.
    Unsubscribe { id: u64 },
    /// Acceptor → dialer: subscription `id` is over (the stream ended, or the subscriber
    /// fell too far behind).
    SubscribeDone { id: u64, code: u16, reason: String },
    /// Dialer → acceptor: a consumer of `id` needs a keyframe.
    KeyframeRequest { id: u64 },
    /// Either side: closing; `reason` is for logs.
    GoAway { reason: String },
    /// Either side: node states (its own first, then any it passes on).
    NodeState(Vec<NodeRecord>),
}

/// Error and completion codes in SubscribeError / SubscribeDone.
pub mod code {
    pub const NOT_FOUND: u16 = 404;
    pub const TIMEOUT: u16 = 504;
    pub const ENDED: u16 = 200;
    pub const TOO_SLOW: u16 = 429;
    /// The stream lives on, published elsewhere (its publisher here lost the name to
    /// another origin): look it up again.
    pub const MOVED: u16 = 409;
}

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_ANNOUNCE: u8 = 0x03;
const T_WITHDRAW: u8 = 0x04;
const T_SUBSCRIBE: u8 = 0x05;
const T_SUBSCRIBE_OK: u8 = 0x06;
const T_SUBSCRIBE_ERROR: u8 = 0x07;
const T_UNSUBSCRIBE: u8 = 0x08;
const T_SUBSCRIBE_DONE: u8 = 0x09;
const T_KEYFRAME_REQUEST: u8 = 0x0a;
const T_GOAWAY: u8 = 0x0b;
const T_NODE_STATE: u8 = 0x0c;
const T_CHALLENGE: u8 = 0x0d;
const T_AUTH: u8 = 0x0e;

impl ControlMessage {
    /// The message's name, for logs and counts.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello { .. } => "Hello",
            ControlMessage::Challenge { .. } => "Challenge",
            ControlMessage::Auth { .. } => "Auth",
            ControlMessage::Welcome { .. } => "Welcome",
            ControlMessage::Announce(_) => "Announce",
            ControlMessage::Withdraw { .. } => "Withdraw",
            ControlMessage::Subscribe { .. } => "Subscribe",
            ControlMessage::SubscribeOk { .. } => "SubscribeOk",
            ControlMessage::SubscribeError { .. } => "SubscribeError",
            ControlMessage::Unsubscribe { .. } => "Unsubscribe",
            ControlMessage::SubscribeDone { .. } => "SubscribeDone",
            ControlMessage::KeyframeRequest { .. } => "KeyframeRequest",
            ControlMessage::GoAway { .. } => "GoAway",
            ControlMessage::NodeState(_) => "NodeState",
        }
    }

    /// Appends the framed message.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        let t = match self {
            ControlMessage::Hello {
                version,
                node_id,
                role,
                region,
                nonce,
            }
            | ControlMessage::Challenge {
                version,
                node_id,
                role,
                region,
                nonce,
            } => {
                body.put_u16(*version);
                put_str(&mut body, node_id);
                body.put_u8(role.to_u8());
                put_str(&mut body, region);
                body.put_slice(nonce);
                if matches!(self, ControlMessage::Hello { .. }) {
                    T_HELLO
                } else {
                    T_CHALLENGE
                }
            }
            ControlMessage::Auth { proof } => {
                body.put_slice(proof);
                T_AUTH
            }
            ControlMessage::Welcome { proof } => {
                body.put_slice(proof);
                T_WELCOME
            }
            ControlMessage::Announce(a) => {
                put_str(&mut body, &a.stream.to_string());
                body.put_u64(a.session);
                body.put_u64(a.started_ms);
                T_ANNOUNCE
            }
            ControlMessage::Withdraw { stream } => {
                put_str(&mut body, &stream.to_string());
                T_WITHDRAW
            }
            ControlMessage::Subscribe { id, stream } => {
                body.put_u64(*id);
                put_str(&mut body, &stream.to_string());
                T_SUBSCRIBE
            }
            ControlMessage::SubscribeOk { id, session } => {
                body.put_u64(*id);
                body.put_u64(*session);
                T_SUBSCRIBE_OK
            }
            ControlMessage::SubscribeError { id, code, reason } => {
                body.put_u64(*id);
                body.put_u16(*code);
                put_str(&mut body, reason);
                T_SUBSCRIBE_ERROR
            }
            ControlMessage::Unsubscribe { id } => {
                body.put_u64(*id);
                T_UNSUBSCRIBE
            }
            ControlMessage::SubscribeDone { id, code, reason } => {
                body.put_u64(*id);
                body.put_u16(*code);
                put_str(&mut body, reason);
                T_SUBSCRIBE_DONE
            }
            ControlMessage::KeyframeRequest { id } => {
                body.put_u64(*id);
                T_KEYFRAME_REQUEST
            }
            ControlMessage::GoAway { reason } => {
                put_str(&mut body, reason);
                T_GOAWAY
            }
            ControlMessage::NodeState(records) => {
                body.put_u16(records.len().min(MAX_RECORD_ITEMS) as u16);
                for r in records.iter().take(MAX_RECORD_ITEMS) {
                    put_record(&mut body, r);
                }
                T_NODE_STATE
            }
        };
        put_frame(out, t, &body);
    }

    /// Decodes one message body of type `t`.
    pub fn decode(t: u8, body: Bytes) -> Result<ControlMessage, WireError> {
        let mut r = Reader(body);
        let msg = match t {
            T_HELLO | T_CHALLENGE => {
                let version = r.u16()?;
                if version != VERSION {
                    return Err(WireError::Version(version));
                }
                let (node_id, role, region, nonce) = (
                    r.string()?,
                    PeerRole::from_u8(r.u8()?)?,
                    r.string()?,
                    r.array()?,
                );
                if t == T_HELLO {
                    ControlMessage::Hello {
                        version,
                        node_id,
                        role,
                        region,
                        nonce,
                    }
                } else {
                    ControlMessage::Challenge {
                        version,
                        node_id,
                        role,
                        region,
                        nonce,
                    }
                }
            }
            T_AUTH => ControlMessage::Auth { proof: r.array()? },
            T_WELCOME => ControlMessage::Welcome { proof: r.array()? },
            T_ANNOUNCE => ControlMessage::Announce(Announcement {
                stream: r.stream_key()?,
                session: r.u64()?,
                started_ms: r.u64()?,
            }),
            T_WITHDRAW => ControlMessage::Withdraw {
                stream: r.stream_key()?,
            },
            T_SUBSCRIBE => ControlMessage::Subscribe {
                id: r.u64()?,
                stream: r.stream_key()?,
            },
            T_SUBSCRIBE_OK => ControlMessage::SubscribeOk {
                id: r.u64()?,
                session: r.u64()?,
            },
            T_SUBSCRIBE_ERROR => ControlMessage::SubscribeError {
                id: r.u64()?,
                code: r.u16()?,
                reason: r.string()?,
            },
            T_UNSUBSCRIBE => ControlMessage::Unsubscribe { id: r.u64()? },
            T_SUBSCRIBE_DONE => ControlMessage::SubscribeDone {
                id: r.u64()?,
                code: r.u16()?,
                reason: r.string()?,
            },
            T_KEYFRAME_REQUEST => ControlMessage::KeyframeRequest { id: r.u64()? },
            T_GOAWAY => ControlMessage::GoAway {
                reason: r.string()?,
            },
            T_NODE_STATE => {
                let n = r.count()?;
                let mut records = Vec::new();
                for _ in 0..n {
                    records.push(r.record()?);
                }
                ControlMessage::NodeState(records)
            }
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// First bytes of every media stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    pub subscription: u64,
    /// Increases by one per group within a subscription.
    pub sequence: u64,
}

impl GroupHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&GROUP_MAGIC);
        out.put_u8(VERSION as u8);
        out.put_u64(self.subscription);
        out.put_u64(self.sequence);
    }

    pub fn decode(b: &[u8; GROUP_HEADER_LEN]) -> Result<GroupHeader, WireError> {
        if b[..2] != GROUP_MAGIC || b[2] != VERSION as u8 {
            return Err(WireError::BadGroupHeader);
        }
        let mut r = &b[3..];
        Ok(GroupHeader {
            subscription: r.get_u64(),
            sequence: r.get_u64(),
        })
    }
}

/// Items on a media (group) stream.
#[derive(Clone, Debug, PartialEq)]
pub enum MediaItem {
    /// The stream's configuration; at the start of every group, and again on change.
    Config(StreamConfig),
    Frame(Frame),
    /// How many publishers the stream has had (it grows when a publisher comes back to the
    /// stream held for it); first item of every group.
    Publishes(u64),
}

const K_CONFIG: u8 = 0x01;
const K_FRAME: u8 = 0x02;
const K_PUBLISHES: u8 = 0x03;

const CF_VIDEO: u8 = 1;
const CF_AUDIO: u8 = 2;
const CF_FRAME_RATE: u8 = 4;
const CF_VIDEO_BITRATE: u8 = 8;
const CF_AUDIO_BITRATE: u8 = 16;
const CF_ENCODER: u8 = 32;
const CF_SIMULCAST: u8 = 64;

impl MediaItem {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            MediaItem::Config(c) => {
                let mut body = BytesMut::new();
                let m = &c.metadata;
                let flags = (c.video.is_some() as u8 * CF_VIDEO)
                    | (c.audio.is_some() as u8 * CF_AUDIO)
                    | (m.frame_rate.is_some() as u8 * CF_FRAME_RATE)
                    | (m.video_bitrate_kbps.is_some() as u8 * CF_VIDEO_BITRATE)
                    | (m.audio_bitrate_kbps.is_some() as u8 * CF_AUDIO_BITRATE)
                    | (m.encoder.is_some() as u8 * CF_ENCODER)
                    | (!c.simulcast.is_empty() as u8 * CF_SIMULCAST);
                body.put_u8(flags);
                if let Some(v) = &c.video {
                    body.put_u8(v.codec.wire_id());
                    body.put_u32(v.width);
                    body.put_u32(v.height);
                    put_bytes(&mut body, &v.record);
                }
                if let Some(a) = &c.audio {
                    body.put_u8(a.codec.wire_id());
                    body.put_u32(a.sample_rate);
                    body.put_u8(a.channels);
                    put_bytes(&mut body, &a.specific);
                }
                for v in [m.frame_rate, m.video_bitrate_kbps, m.audio_bitrate_kbps]
                    .into_iter()
                    .flatten()
                {
                    body.put_f64(v);
                }
                if let Some(e) = &m.encoder {
                    put_str(&mut body, e);
                }
                if !c.simulcast.is_empty() {
                    body.put_u8(c.simulcast.len().min(u8::MAX as usize) as u8);
                    for l in c.simulcast.iter().take(u8::MAX as usize) {
                        put_str(&mut body, &l.rid);
                        body.put_u32(l.width);
                        body.put_u32(l.height);
                    }
                }
                put_frame(out, K_CONFIG, &body);
            }
            MediaItem::Frame(f) => {
                let len = 1 + 1 + 4 + 8 + 4 + f.payload.len();
                out.reserve(4 + 1 + len);
                out.put_u32(1 + len as u32);
                out.put_u8(K_FRAME);
                out.put_u8(f.codec.wire_id());
                out.put_u8(f.keyframe as u8);
                out.put_u32(f.timebase.0);
                out.put_i64(f.dts);
                out.put_i32((f.pts - f.dts).clamp(0, i32::MAX as i64) as i32);
                out.put_slice(&f.payload);
            }
            MediaItem::Publishes(n) => {
                out.put_u32(1 + 8);
                out.put_u8(K_PUBLISHES);
                out.put_u64(*n);
            }
        }
    }

    pub fn decode(kind: u8, body: Bytes) -> Result<MediaItem, WireError> {
        let mut r = Reader(body);
        match kind {
            K_CONFIG => {
                let flags = r.u8()?;
                let video = if flags & CF_VIDEO != 0 {
                    Some(VideoConfig {
                        codec: r.codec()?,
                        width: r.u32()?,
                        height: r.u32()?,
                        record: r.bytes()?,
                    })
                } else {
                    None
                };
                let audio = if flags & CF_AUDIO != 0 {
                    Some(AudioConfig {
                        codec: r.codec()?,
                        sample_rate: r.u32()?,
                        channels: r.u8()?,
                        specific: r.bytes()?,
                    })
                } else {
                    None
                };
                let mut opt = |bit: u8| -> Result<Option<f64>, WireError> {
                    if flags & bit != 0 {
                        Ok(Some(r.f64()?))
                    } else {
                        Ok(None)
                    }
                };
                let metadata = Metadata {
                    frame_rate: opt(CF_FRAME_RATE)?,
                    video_bitrate_kbps: opt(CF_VIDEO_BITRATE)?,
                    audio_bitrate_kbps: opt(CF_AUDIO_BITRATE)?,
                    encoder: if flags & CF_ENCODER != 0 {
                        Some(r.string()?)
                    } else {
                        None
                    },
                };
                let mut simulcast = vec![];
                if flags & CF_SIMULCAST != 0 {
                    for _ in 0..r.u8()? {
                        let rid = r.string()?;
                        if !valid_rid(&rid) {
                            return Err(WireError::Invalid("bad simulcast rid"));
                        }
                        simulcast.push(SimulcastLayer {
                            rid,
                            width: r.u32()?,
                            height: r.u32()?,
                        });
                    }
                }
                r.finish()?;
                Ok(MediaItem::Config(StreamConfig {
                    video,
                    audio,
                    metadata,
                    simulcast,
                }))
            }
            K_FRAME => {
                let codec = r.codec()?;
                let flags = r.u8()?;
                let timebase = r.u32()?;
                if timebase == 0 {
                    return Err(WireError::Invalid("zero timebase"));
                }
                let dts = r.i64()?;
                let pts_offset = r.i32()?;
                if pts_offset < 0 {
                    return Err(WireError::Invalid("negative pts offset"));
                }
                Ok(MediaItem::Frame(Frame {
                    codec,
                    dts,
                    pts: dts.saturating_add(pts_offset as i64),
                    timebase: Timebase(timebase),
                    keyframe: flags & 1 != 0,
                    payload: r.rest(),
                }))
            }
            K_PUBLISHES => {
                let n = r.u64()?;
                r.finish()?;
                Ok(MediaItem::Publishes(n))
            }
            other => Err(WireError::UnknownKind(other)),
        }
    }
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

fn put_record(out: &mut BytesMut, r: &NodeRecord) {
    put_str(out, &r.node);
    out.put_u8(r.role.to_u8());
    put_str(out, &r.region);
    put_str(out, &r.http_url);
    put_str(out, &r.rtmp_url);
    out.put_u64(r.incarnation);
    out.put_u32(r.age_ms);
    out.put_u32(r.viewers);
    out.put_u16(r.load_permille);
    out.put_u32(r.egress);
    out.put_u64(r.out_bps);
    let links = &r.links[..r.links.len().min(MAX_RECORD_ITEMS)];
    out.put_u16(links.len() as u16);
    for (node, rtt_us) in links {
        put_str(out, node);
        out.put_u32(*rtt_us);
    }
    let streams = &r.streams[..r.streams.len().min(MAX_RECORD_ITEMS)];
    out.put_u16(streams.len() as u16);
    for k in streams {
        put_str(out, &k.to_string());
    }
    let pulls = &r.pulls[..r.pulls.len().min(MAX_RECORD_ITEMS)];
    out.put_u16(pulls.len() as u16);
    for (node, n) in pulls {
        put_str(out, node);
        out.put_u32(*n);
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
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

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.put_slice(b);
}

/// Bounds-checked reads over a message body.
struct Reader(Bytes);

impl Reader {
    /// A u16 item count, at most [`MAX_RECORD_ITEMS`].
    fn count(&mut self) -> Result<usize, WireError> {
        let n = self.u16()? as usize;
        if n > MAX_RECORD_ITEMS {
            return Err(WireError::Invalid("too many items"));
        }
        Ok(n)
    }

    fn record(&mut self) -> Result<NodeRecord, WireError> {
        let node = self.string()?;
        let role = PeerRole::from_u8(self.u8()?)?;
        let region = self.string()?;
        let http_url = self.string()?;
        let rtmp_url = self.string()?;
        let incarnation = self.u64()?;
        let age_ms = self.u32()?;
        let viewers = self.u32()?;
        let load_permille = self.u16()?;
        let egress = self.u32()?;
        let out_bps = self.u64()?;
        let mut links = Vec::new();
        for _ in 0..self.count()? {
            links.push((self.string()?, self.u32()?));
        }
        let mut streams = Vec::new();
        for _ in 0..self.count()? {
            streams.push(self.stream_key()?);
        }
        let mut pulls = Vec::new();
        for _ in 0..self.count()? {
            pulls.push((self.string()?, self.u32()?));
        }
        Ok(NodeRecord {
            node,
            role,
            region,
            http_url,
            rtmp_url,
            incarnation,
            age_ms,
            viewers,
            load_permille,
            egress,
            out_bps,
            links,
            streams,
            pulls,
        })
    }

    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.0.remaining() < n {
            Err(WireError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        self.need(8)?;
        Ok(self.0.get_i64())
    }
    fn f64(&mut self) -> Result<f64, WireError> {
        self.need(8)?;
        Ok(self.0.get_f64())
    }
    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(WireError::BadString);
        }
        self.need(len)?;
        let b = self.0.split_to(len);
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadString)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut out = [0u8; N];
        self.0.copy_to_slice(&mut out);
        Ok(out)
    }
    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.0.split_to(len))
    }
    fn stream_key(&mut self) -> Result<StreamKey, WireError> {
        let s = self.string()?;
        StreamKey::parse_relayable(&s).map_err(|_| WireError::BadStreamKey(s))
    }
    fn codec(&mut self) -> Result<Codec, WireError> {
        let id = self.u8()?;
        Codec::from_wire_id(id).ok_or(WireError::UnknownCodec(id))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
    fn finish(&self) -> Result<(), WireError> {
        match self.0.remaining() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey::new("live", "demo").unwrap()
    }

    fn announcement() -> Announcement {
        Announcement {
            stream: key(),
            session: 0x0102,
            started_ms: 1_700_000_000_000,
        }
    }

    fn all_messages() -> Vec<ControlMessage> {
        vec![
            ControlMessage::Hello {
                version: VERSION,
                node_id: "a".into(),
                role: PeerRole::Origin,
                region: "eu".into(),
                nonce: [7; 32],
            },
            ControlMessage::Challenge {
                version: VERSION,
                node_id: "b".into(),
                role: PeerRole::Edge,
                region: "us".into(),
                nonce: [8; 32],
            },
            ControlMessage::Auth { proof: [9; 32] },
            ControlMessage::Welcome { proof: [10; 32] },
            ControlMessage::Announce(announcement()),
            ControlMessage::NodeState(vec![NodeRecord {
                node: "edge-1".into(),
                role: PeerRole::Edge,
                region: "eu".into(),
                http_url: "http://10.0.0.1:8080".into(),
                rtmp_url: "rtmp://10.0.0.1:1935".into(),
                incarnation: 1_700_000_000_000,
                age_ms: 250,
                viewers: 12,
                load_permille: 120,
                egress: 1,
                out_bps: 2_500_000,
                links: vec![("origin-a".into(), 31_000)],
                streams: vec![key()],
                pulls: vec![("origin-a".into(), 1)],
            }]),
            ControlMessage::Withdraw { stream: key() },
            ControlMessage::Subscribe {
                id: 7,
                stream: key(),
            },
            ControlMessage::SubscribeOk { id: 7, session: 9 },
            ControlMessage::SubscribeError {
                id: 7,
                code: code::NOT_FOUND,
                reason: "nope".into(),
            },
            ControlMessage::Unsubscribe { id: 7 },
            ControlMessage::SubscribeDone {
                id: 7,
                code: code::ENDED,
                reason: "ended".into(),
            },
            ControlMessage::KeyframeRequest { id: 7 },
            ControlMessage::GoAway {
                reason: "bye".into(),
            },
        ]
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<ControlMessage>, WireError> {
        let mut d = FrameDecoder::default();
        d.push(bytes);
        let mut out = vec![];
        while let Some((t, body)) = d.next_frame()? {
            out.push(ControlMessage::decode(t, body)?);
        }
        Ok(out)
    }

    #[test]
    fn control_messages_round_trip() {
        let msgs = all_messages();
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        assert_eq!(decode_all(&buf).unwrap(), msgs);
    }

    #[test]
    fn subscribe_ok_carries_the_session_after_the_id() {
        let mut buf = BytesMut::new();
        ControlMessage::SubscribeOk { id: 1, session: 2 }.encode(&mut buf);
        let expected = [
            0,
            0,
            0,
            17,
            T_SUBSCRIBE_OK,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
        ];
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn subscribe_has_exact_bytes() {
        let mut buf = BytesMut::new();
        ControlMessage::Subscribe {
            id: 1,
            stream: key(),
        }
        .encode(&mut buf);
        let mut expected = vec![0, 0, 0, 20, T_SUBSCRIBE, 0, 0, 0, 0, 0, 0, 0, 1, 0, 9];
        expected.extend_from_slice(b"live/demo");
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn announce_has_exact_bytes() {
        let mut buf = BytesMut::new();
        ControlMessage::Announce(announcement()).encode(&mut buf);
        let mut expected = vec![0, 0, 0, 28, T_ANNOUNCE, 0, 9];
        expected.extend_from_slice(b"live/demo");
        expected.extend_from_slice(&0x0102u64.to_be_bytes());
        expected.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn the_earlier_publish_ranks_first_then_the_lower_node_id() {
        let a = announcement();
        let later = Announcement {
            started_ms: a.started_ms + 1,
            ..a.clone()
        };
        assert!(a.rank("origin-z") < later.rank("origin-a"));
        assert!(a.rank("origin-a") < a.rank("origin-b"));
    }

    #[test]
    fn decoder_waits_for_whole_frames_byte_by_byte() {
        let mut buf = BytesMut::new();
        ControlMessage::Announce(announcement()).encode(&mut buf);
        let mut d = FrameDecoder::default();
        for (i, b) in buf.iter().enumerate() {
            d.push(&[*b]);
            let got = d.next_frame().unwrap();
            assert_eq!(got.is_some(), i == buf.len() - 1);
        }
    }

    #[test]
    fn truncated_bodies_are_errors_not_panics() {
        for m in all_messages() {
            let mut buf = BytesMut::new();
            m.encode(&mut buf);
            let t = buf[4];
            let body = Bytes::copy_from_slice(&buf[5..]);
            for cut in 0..body.len() {
                assert!(
                    ControlMessage::decode(t, body.slice(..cut)).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn hello_has_exact_bytes_and_another_version_is_named_not_parsed() {
        let mut buf = BytesMut::new();
        ControlMessage::Hello {
            version: VERSION,
            node_id: "a".into(),
            role: PeerRole::Edge,
            region: "eu".into(),
            nonce: [7; 32],
        }
        .encode(&mut buf);
        let mut expected = vec![0, 0, 0, 43, T_HELLO, 0, 5, 0, 1, b'a', 2, 0, 2, b'e', b'u'];
        expected.extend([7; 32]);
        assert_eq!(&buf[..], &expected[..]);
        // A version-4 hello (it carried the token in the clear): only the version is read.
        let mut v4 = BytesMut::new();
        v4.put_u16(4);
        put_str(&mut v4, "a");
        v4.put_u8(1);
        put_str(&mut v4, "eu");
        put_str(&mut v4, "change-me");
        assert_eq!(
            ControlMessage::decode(T_HELLO, v4.freeze()),
            Err(WireError::Version(4))
        );
    }

    #[test]
    fn decoder_refuses_an_announced_length_over_its_limit_before_the_bytes_arrive() {
        let mut d = FrameDecoder::with_limit(HANDSHAKE_MESSAGE);
        d.push(&(HANDSHAKE_MESSAGE as u32 + 1).to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(WireError::TooLarge(HANDSHAKE_MESSAGE + 1))
        );
        // A frame within the limit waits for its bytes, holding only what arrived.
        let mut d = FrameDecoder::with_limit(MAX_CONTROL_MESSAGE);
        d.push(&(MAX_CONTROL_MESSAGE as u32).to_be_bytes());
        d.push(&[T_GOAWAY, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 6);
        // The limit may tighten or loosen between frames.
        d.set_limit(16);
        assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn rejects_oversized_unknown_and_bad_fields() {
        let mut d = FrameDecoder::default();
        d.push(&[0xff, 0xff, 0xff, 0xff, 1]);
        assert!(matches!(d.next_frame(), Err(WireError::TooLarge(_))));
        assert_eq!(
            ControlMessage::decode(0x7f, Bytes::new()),
            Err(WireError::UnknownType(0x7f))
        );
        // A stream name that would escape a path.
        let mut body = BytesMut::new();
        put_str(&mut body, "../etc");
        assert!(matches!(
            ControlMessage::decode(T_ANNOUNCE, body.freeze()),
            Err(WireError::BadStreamKey(_))
        ));
        // Invalid UTF-8.
        let body = Bytes::from_static(&[0, 2, 0xff, 0xfe]);
        assert_eq!(
            ControlMessage::decode(T_GOAWAY, body),
            Err(WireError::BadString)
        );
        // Trailing garbage.
        let body = Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 9]);
        assert_eq!(
            ControlMessage::decode(T_UNSUBSCRIBE, body),
            Err(WireError::Trailing(1))
        );
    }

    #[test]
    fn media_items_round_trip() {
        let config = StreamConfig {
            video: Some(VideoConfig {
                codec: Codec::H264,
                record: Bytes::from_static(&[1, 2, 3]),
                width: 1920,
                height: 1080,
            }),
            audio: Some(AudioConfig {
                codec: Codec::Aac,
                specific: Bytes::from_static(&[0x12, 0x10]),
                sample_rate: 44100,
                channels: 2,
            }),
            metadata: Metadata {
                frame_rate: Some(30.0),
                video_bitrate_kbps: None,
                audio_bitrate_kbps: Some(128.0),
                encoder: Some("Lavf".into()),
            },
            simulcast: vec![
                SimulcastLayer {
                    rid: "q".into(),
                    width: 480,
                    height: 270,
                },
                SimulcastLayer {
                    rid: "f".into(),
                    width: 1920,
                    height: 1080,
                },
            ],
        };
        let frame = Frame {
            codec: Codec::H264,
            dts: -5,
            pts: 75,
            timebase: Timebase(90_000),
            keyframe: true,
            payload: Bytes::from_static(&[0, 0, 0, 1, 0x65]),
        };
        let items = vec![
            MediaItem::Config(config),
            MediaItem::Publishes(2),
            MediaItem::Frame(frame),
        ];
        let mut buf = BytesMut::new();
        for i in &items {
            i.encode(&mut buf);
        }
        let mut d = FrameDecoder::default();
        d.push(&buf);
        let mut out = vec![];
        while let Some((k, body)) = d.next_frame().unwrap() {
            out.push(MediaItem::decode(k, body).unwrap());
        }
        assert_eq!(out, items);
    }

    #[test]
    fn group_header_round_trips_and_checks_magic() {
        let h = GroupHeader {
            subscription: 3,
            sequence: 42,
        };
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        let arr: [u8; GROUP_HEADER_LEN] = buf[..].try_into().unwrap();
        assert_eq!(GroupHeader::decode(&arr).unwrap(), h);
        let mut bad = arr;
        bad[0] = b'X';
        assert_eq!(GroupHeader::decode(&bad), Err(WireError::BadGroupHeader));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0xdead_beefu64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 48) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8)
                .collect();
            let t = (seed >> 56) as u8 % 16;
            let _ = ControlMessage::decode(t, Bytes::from(bytes.clone()));
            let _ = MediaItem::decode(t % 4, Bytes::from(bytes));
        }
    }
}
