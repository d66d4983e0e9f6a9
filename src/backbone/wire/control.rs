//! Control-stream messages: the hello, announces, subscriptions and node state.

use bytes::{BufMut, Bytes, BytesMut};

use super::{put_frame, put_str, Reader, WireError, VERSION};
use crate::backbone::auth::{Nonce, Proof};
use crate::config::Role;
use crate::media::StreamKey;

/// The role a node announces in its hello and its records is its configured [`Role`],
/// one byte on the wire.
pub(crate) fn role_to_u8(role: Role) -> u8 {
    match role {
        Role::Origin => 1,
        Role::Edge => 2,
        Role::Standalone => 3,
    }
}

fn role_from_u8(v: u8) -> Result<Role, WireError> {
    match v {
        1 => Ok(Role::Origin),
        2 => Ok(Role::Edge),
        3 => Ok(Role::Standalone),
        _ => Err(WireError::Invalid("unknown role")),
    }
}

/// A stream published on the announcing node: which publish (`session`) and since when.
/// Two origins that both hold a publisher of one name keep the one that ranks first
/// ([`Announcement::rank`]); both sides compute the same answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub stream: StreamKey,
    pub timeline: u64,
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
    pub role: Role,
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
    /// Its links as measured: (node, round-trip µs, packets lost per mille).
    pub links: Vec<(String, u32, u16)>,
    /// Streams it has now (published, or pulled for viewers): "warm" for routing.
    pub streams: Vec<StreamKey>,
    /// Which upstream serves how many of its pulled streams: (node, streams).
    pub pulls: Vec<(String, u32)>,
}

impl NodeRecord {
    /// The record of a node with nothing measured yet: no viewers, load, links or streams.
    pub fn idle(
        node: &str,
        role: Role,
        region: &str,
        http_url: &str,
        rtmp_url: &str,
        incarnation: u64,
    ) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            role,
            region: region.into(),
            http_url: http_url.into(),
            rtmp_url: rtmp_url.into(),
            incarnation,
            age_ms: 0,
            viewers: 0,
            load_permille: 0,
            egress: 0,
            out_bps: 0,
            links: vec![],
            streams: vec![],
            pulls: vec![],
        }
    }
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
        role: Role,
        region: String,
        nonce: Nonce,
    },
    /// Acceptor → dialer, answer to a hello of this version: who the acceptor is, and its
    /// nonce.
    Challenge {
        version: u16,
        node_id: String,
        role: Role,
        region: String,
        nonce: Nonce,
    },
    /// Dialer → acceptor: the dialer's proof of the token ([`crate::backbone::auth`]).
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
    SubscribeOk { id: u64, timeline: u64 },
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
    /// Either side: a message of the room bus (`crate::rooms`), opaque to the backbone;
    /// at most [`MAX_BUS_BYTES`].
    Bus(Bytes),
}

/// The largest room-bus message.
pub const MAX_BUS_BYTES: usize = 1 << 20;
pub(super) const T_HELLO: u8 = 0x01;
pub(super) const T_WELCOME: u8 = 0x02;
pub(super) const T_ANNOUNCE: u8 = 0x03;
pub(super) const T_WITHDRAW: u8 = 0x04;
pub(super) const T_SUBSCRIBE: u8 = 0x05;
pub(super) const T_SUBSCRIBE_OK: u8 = 0x06;
pub(super) const T_SUBSCRIBE_ERROR: u8 = 0x07;
pub(super) const T_UNSUBSCRIBE: u8 = 0x08;
pub(super) const T_SUBSCRIBE_DONE: u8 = 0x09;
pub(super) const T_KEYFRAME_REQUEST: u8 = 0x0a;
pub(super) const T_GOAWAY: u8 = 0x0b;
pub(super) const T_NODE_STATE: u8 = 0x0c;
pub(super) const T_CHALLENGE: u8 = 0x0d;
pub(super) const T_AUTH: u8 = 0x0e;
pub(super) const T_BUS: u8 = 0x0f;

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
            ControlMessage::Bus(_) => "Bus",
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
                body.put_u8(role_to_u8(*role));
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
                body.put_u64(a.timeline);
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
            ControlMessage::SubscribeOk { id, timeline } => {
                body.put_u64(*id);
                body.put_u64(*timeline);
                T_SUBSCRIBE_OK
            }
            ControlMessage::SubscribeError { id, code, reason }
            | ControlMessage::SubscribeDone { id, code, reason } => {
                body.put_u64(*id);
                body.put_u16(*code);
                put_str(&mut body, reason);
                if matches!(self, ControlMessage::SubscribeError { .. }) {
                    T_SUBSCRIBE_ERROR
                } else {
                    T_SUBSCRIBE_DONE
                }
            }
            ControlMessage::Unsubscribe { id } => {
                body.put_u64(*id);
                T_UNSUBSCRIBE
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
            ControlMessage::Bus(bytes) => {
                body.put_slice(&bytes[..bytes.len().min(MAX_BUS_BYTES)]);
                T_BUS
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
                let (node_id, role, region, nonce) =
                    (r.string()?, role_from_u8(r.u8()?)?, r.string()?, r.array()?);
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
                timeline: r.u64()?,
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
                timeline: r.u64()?,
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
            T_BUS => {
                let bytes = r.rest();
                if bytes.is_empty() || bytes.len() > MAX_BUS_BYTES {
                    return Err(WireError::Invalid("bus message size"));
                }
                ControlMessage::Bus(bytes)
            }
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

pub(super) fn put_record(out: &mut BytesMut, r: &NodeRecord) {
    put_str(out, &r.node);
    out.put_u8(role_to_u8(r.role));
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
    for (node, rtt_us, loss_permille) in links {
        put_str(out, node);
        out.put_u32(*rtt_us);
        out.put_u16(*loss_permille);
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

impl Reader {
    /// A u16 item count, at most [`MAX_RECORD_ITEMS`].
    pub(super) fn count(&mut self) -> Result<usize, WireError> {
        let n = self.u16()? as usize;
        if n > MAX_RECORD_ITEMS {
            return Err(WireError::Invalid("too many items"));
        }
        Ok(n)
    }

    pub(super) fn record(&mut self) -> Result<NodeRecord, WireError> {
        let node = self.string()?;
        let role = role_from_u8(self.u8()?)?;
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
            links.push((self.string()?, self.u32()?, self.u16()?.min(1000)));
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
}
