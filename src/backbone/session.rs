//! The backbone control session: a sans-IO state machine for one control stream.
//!
//! Bytes in ([`ControlSession::handle_input`]) → events out; calls (subscribe, announce, ...)
//! → bytes to send ([`ControlSession::poll_transmit`]). It checks the hello (version, shared
//! token), which side may send which message, and subscription ids; anything else is a
//! [`SessionError`] that closes the connection. It never touches a socket or a clock, so the
//! tests below drive two sessions against each other with exact bytes.
//!
//! Roles: the **dialer** opened the connection; it subscribes and receives announces. The
//! **acceptor** announces its local streams and sends media. A pair of origins that list each
//! other has one connection per direction, each used one way.

use std::collections::{HashMap, HashSet};

use bytes::{Bytes, BytesMut};

use super::wire::{
    Announcement, ControlMessage, FrameDecoder, NodeRecord, PeerRole, WireError, VERSION,
};
use crate::media::StreamKey;

/// Who a node is, as said in the hello.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    pub node_id: String,
    pub role: PeerRole,
    pub region: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("malformed control message: {0}")]
    Wire(#[from] WireError),
    #[error("peer speaks protocol version {theirs}, this node {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("peer presented a wrong cluster token")]
    Unauthorized,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("session is closed")]
    Closed,
}

/// What the peer told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// Hello/welcome exchanged; the peer is known.
    Ready(PeerInfo),
    /// Either side: the peer's node states.
    NodeState(Vec<NodeRecord>),
    // Dialer side.
    Announced(Announcement),
    Withdrawn(StreamKey),
    /// Subscription `id` accepted; its media is on timeline `session`.
    SubscribeAccepted {
        id: u64,
        session: u64,
    },
    SubscribeRejected {
        id: u64,
        code: u16,
        reason: String,
    },
    SubscriptionDone {
        id: u64,
        code: u16,
        reason: String,
    },
    // Acceptor side.
    SubscribeRequested {
        id: u64,
        stream: StreamKey,
    },
    Unsubscribed(u64),
    KeyframeRequested(u64),
    // Either.
    GoAway(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingPeer,
    Ready,
    Closed,
}

pub struct ControlSession {
    side: Side,
    local: PeerInfo,
    token: String,
    state: State,
    peer: Option<PeerInfo>,
    decoder: FrameDecoder,
    out: BytesMut,
    next_id: u64,
    /// Dialer: subscriptions asked for and not yet answered.
    requested: HashSet<u64>,
    /// Dialer: subscriptions accepted and not done. Acceptor: subscriptions being served.
    active: HashMap<u64, StreamKey>,
}

impl ControlSession {
    /// The dialer's session; the hello is queued at once.
    pub fn dialer(local: PeerInfo, token: &str) -> ControlSession {
        let mut s = ControlSession::new(Side::Dialer, local, token);
        let hello = ControlMessage::Hello {
            version: VERSION,
            node_id: s.local.node_id.clone(),
            role: s.local.role,
            region: s.local.region.clone(),
            token: s.token.clone(),
        };
        s.send(hello);
        s
    }

    pub fn acceptor(local: PeerInfo, token: &str) -> ControlSession {
        ControlSession::new(Side::Acceptor, local, token)
    }

    fn new(side: Side, local: PeerInfo, token: &str) -> ControlSession {
        ControlSession {
            side,
            local,
            token: token.to_string(),
            state: State::AwaitingPeer,
            peer: None,
            decoder: FrameDecoder::default(),
            out: BytesMut::new(),
            next_id: 1,
            requested: HashSet::new(),
            active: HashMap::new(),
        }
    }

    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref()
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Bytes to write to the control stream, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// Feeds bytes read from the control stream.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<Vec<SessionEvent>, SessionError> {
        if self.state == State::Closed {
            return Err(SessionError::Closed);
        }
        self.decoder.push(data);
        let mut events = Vec::new();
        loop {
            let next = self.decoder.next_frame().and_then(|f| match f {
                Some((t, body)) => ControlMessage::decode(t, body).map(Some),
                None => Ok(None),
            });
            match next {
                Ok(Some(msg)) => match self.on_message(msg) {
                    Ok(Some(ev)) => events.push(ev),
                    Ok(None) => {}
                    Err(e) => {
                        self.state = State::Closed;
                        return Err(e);
                    }
                },
                Ok(None) => return Ok(events),
                Err(e) => {
                    self.state = State::Closed;
                    return Err(e.into());
                }
            }
        }
    }

    fn on_message(&mut self, msg: ControlMessage) -> Result<Option<SessionEvent>, SessionError> {
        use ControlMessage as M;
        if self.state == State::AwaitingPeer {
            return match (self.side, msg) {
                (
                    Side::Acceptor,
                    M::Hello {
                        version,
                        node_id,
                        role,
                        region,
                        token,
                    },
                ) => {
                    if version != VERSION {
                        return Err(SessionError::Version {
                            ours: VERSION,
                            theirs: version,
                        });
                    }
                    if !constant_time_eq(token.as_bytes(), self.token.as_bytes()) {
                        self.send(M::GoAway {
                            reason: "unauthorized".into(),
                        });
                        return Err(SessionError::Unauthorized);
                    }
                    let welcome = M::Welcome {
                        version: VERSION,
                        node_id: self.local.node_id.clone(),
                        role: self.local.role,
                        region: self.local.region.clone(),
                    };
                    self.send(welcome);
                    Ok(Some(self.ready(PeerInfo {
                        node_id,
                        role,
                        region,
                    })))
                }
                (
                    Side::Dialer,
                    M::Welcome {
                        version,
                        node_id,
                        role,
                        region,
                    },
                ) => {
                    if version != VERSION {
                        return Err(SessionError::Version {
                            ours: VERSION,
                            theirs: version,
                        });
                    }
                    Ok(Some(self.ready(PeerInfo {
                        node_id,
                        role,
                        region,
                    })))
                }
                (_, M::GoAway { reason }) => Err(SessionError::Protocol(format!(
                    "peer refused the session: {reason}"
                ))),
                (_, other) => Err(SessionError::Protocol(format!(
                    "expected hello, got {}",
                    other.name()
                ))),
            };
        }
        let ev = match (self.side, msg) {
            (_, M::GoAway { reason }) => SessionEvent::GoAway(reason),
            (_, M::NodeState(records)) => SessionEvent::NodeState(records),
            (Side::Dialer, M::Announce(a)) => SessionEvent::Announced(a),
            (Side::Dialer, M::Withdraw { stream }) => SessionEvent::Withdrawn(stream),
            (Side::Dialer, M::SubscribeOk { id, session }) => {
                let Some(stream) = self.take_requested(id)? else {
                    return Err(unknown(id));
                };
                self.active.insert(id, stream);
                SessionEvent::SubscribeAccepted { id, session }
            }
            (Side::Dialer, M::SubscribeError { id, code, reason }) => {
                if self.take_requested(id)?.is_none() {
                    return Err(unknown(id));
                }
                SessionEvent::SubscribeRejected { id, code, reason }
            }
            (Side::Dialer, M::SubscribeDone { id, code, reason }) => {
                // Done may cross an unsubscribe in flight: then the id is already gone.
                if self.active.remove(&id).is_none() && !self.requested.remove(&id) {
                    return Ok(None);
                }
                SessionEvent::SubscriptionDone { id, code, reason }
            }
            (Side::Acceptor, M::Subscribe { id, stream }) => {
                if self.active.contains_key(&id) {
                    return Err(SessionError::Protocol(format!(
                        "subscription id {id} reused"
                    )));
                }
                self.active.insert(id, stream.clone());
                SessionEvent::SubscribeRequested { id, stream }
            }
            (Side::Acceptor, M::Unsubscribe { id }) => {
                // It may cross our SubscribeDone: an unknown id is not an error.
                if self.active.remove(&id).is_none() {
                    return Ok(None);
                }
                SessionEvent::Unsubscribed(id)
            }
            (Side::Acceptor, M::KeyframeRequest { id }) => {
                if !self.active.contains_key(&id) {
                    return Ok(None);
                }
                SessionEvent::KeyframeRequested(id)
            }
            (side, other) => {
                return Err(SessionError::Protocol(format!(
                    "{} is not allowed toward the {:?}",
                    other.name(),
                    side
                )))
            }
        };
        Ok(Some(ev))
    }

    fn ready(&mut self, peer: PeerInfo) -> SessionEvent {
        self.state = State::Ready;
        self.peer = Some(peer.clone());
        SessionEvent::Ready(peer)
    }

    fn take_requested(&mut self, id: u64) -> Result<Option<StreamKey>, SessionError> {
        if self.requested.remove(&id) {
            // The key is kept in `active` under the same id while requested.
            Ok(self.active.remove(&id))
        } else {
            Ok(None)
        }
    }

    fn send(&mut self, msg: ControlMessage) {
        msg.encode(&mut self.out);
    }

    fn require(&self, side: Side) -> Result<(), SessionError> {
        match self.state {
            State::Closed => Err(SessionError::Closed),
            State::AwaitingPeer => Err(SessionError::Protocol("session not ready".into())),
            State::Ready if self.side != side => Err(SessionError::Protocol(format!(
                "only the {side:?} may do that"
            ))),
            State::Ready => Ok(()),
        }
    }

    // ---- dialer calls ----

    /// Asks for `stream`; returns the subscription id.
    pub fn subscribe(&mut self, stream: StreamKey) -> Result<u64, SessionError> {
        self.require(Side::Dialer)?;
        let id = self.next_id;
        self.next_id += 1;
        self.requested.insert(id);
        self.active.insert(id, stream.clone());
        self.send(ControlMessage::Subscribe { id, stream });
        Ok(id)
    }

    pub fn unsubscribe(&mut self, id: u64) -> Result<(), SessionError> {
        self.require(Side::Dialer)?;
        if self.active.remove(&id).is_some() {
            self.requested.remove(&id);
            self.send(ControlMessage::Unsubscribe { id });
        }
        Ok(())
    }

    pub fn request_keyframe(&mut self, id: u64) -> Result<(), SessionError> {
        self.require(Side::Dialer)?;
        if self.active.contains_key(&id) && !self.requested.contains(&id) {
            self.send(ControlMessage::KeyframeRequest { id });
        }
        Ok(())
    }

    // ---- acceptor calls ----

    pub fn announce(&mut self, announcement: Announcement) -> Result<(), SessionError> {
        self.require(Side::Acceptor)?;
        self.send(ControlMessage::Announce(announcement));
        Ok(())
    }

    pub fn withdraw(&mut self, stream: StreamKey) -> Result<(), SessionError> {
        self.require(Side::Acceptor)?;
        self.send(ControlMessage::Withdraw { stream });
        Ok(())
    }

    /// Accepts subscription `id`, served on timeline `session`; `false` if it was
    /// unsubscribed meanwhile.
    pub fn accept(&mut self, id: u64, session: u64) -> Result<bool, SessionError> {
        self.require(Side::Acceptor)?;
        if self.active.contains_key(&id) {
            self.send(ControlMessage::SubscribeOk { id, session });
            return Ok(true);
        }
        Ok(false)
    }

    pub fn reject(&mut self, id: u64, code: u16, reason: &str) -> Result<(), SessionError> {
        self.require(Side::Acceptor)?;
        if self.active.remove(&id).is_some() {
            self.send(ControlMessage::SubscribeError {
                id,
                code,
                reason: reason.into(),
            });
        }
        Ok(())
    }

    /// The subscription is over from the sender's side.
    pub fn done(&mut self, id: u64, code: u16, reason: &str) -> Result<(), SessionError> {
        self.require(Side::Acceptor)?;
        if self.active.remove(&id).is_some() {
            self.send(ControlMessage::SubscribeDone {
                id,
                code,
                reason: reason.into(),
            });
        }
        Ok(())
    }

    /// Sends node states (either side, once the session is up).
    pub fn node_state(&mut self, records: Vec<NodeRecord>) {
        if self.state == State::Ready {
            self.send(ControlMessage::NodeState(records));
        }
    }

    pub fn go_away(&mut self, reason: &str) {
        self.send(ControlMessage::GoAway {
            reason: reason.into(),
        });
        self.state = State::Closed;
    }
}

fn unknown(id: u64) -> SessionError {
    SessionError::Protocol(format!("answer for unknown subscription {id}"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::wire::PeerRole;

    fn info(id: &str, role: PeerRole) -> PeerInfo {
        PeerInfo {
            node_id: id.into(),
            role,
            region: "eu".into(),
        }
    }

    fn key() -> StreamKey {
        StreamKey::new("live", "demo").unwrap()
    }

    /// Moves pending bytes from `from` to `to`, returning `to`'s events.
    fn pump(from: &mut ControlSession, to: &mut ControlSession) -> Vec<SessionEvent> {
        match from.poll_transmit() {
            Some(b) => to.handle_input(&b).unwrap(),
            None => vec![],
        }
    }

    fn pair() -> (ControlSession, ControlSession) {
        let mut edge = ControlSession::dialer(info("edge-1", PeerRole::Edge), "t");
        let mut origin = ControlSession::acceptor(info("origin-a", PeerRole::Origin), "t");
        assert_eq!(
            pump(&mut edge, &mut origin),
            vec![SessionEvent::Ready(info("edge-1", PeerRole::Edge))]
        );
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::Ready(info("origin-a", PeerRole::Origin))]
        );
        (edge, origin)
    }

    #[test]
    fn hello_is_the_exact_first_bytes() {
        let mut d = ControlSession::dialer(info("a", PeerRole::Origin), "k");
        let bytes = d.poll_transmit().unwrap();
        assert_eq!(
            &bytes[..],
            &[0, 0, 0, 14, 1, 0, 4, 0, 1, b'a', 1, 0, 2, b'e', b'u', 0, 1, b'k']
        );
    }

    #[test]
    fn subscribe_accept_done_flow() {
        let (mut edge, mut origin) = pair();
        let id = edge.subscribe(key()).unwrap();
        assert_eq!(
            pump(&mut edge, &mut origin),
            vec![SessionEvent::SubscribeRequested { id, stream: key() }]
        );
        origin.accept(id, 5).unwrap();
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::SubscribeAccepted { id, session: 5 }]
        );
        origin.done(id, 200, "ended").unwrap();
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::SubscriptionDone {
                id,
                code: 200,
                reason: "ended".into()
            }]
        );
    }

    #[test]
    fn reject_and_announce_flow() {
        let (mut edge, mut origin) = pair();
        let a = Announcement {
            stream: key(),
            session: 5,
            started_ms: 6,
        };
        origin.announce(a.clone()).unwrap();
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::Announced(a)]
        );
        let id = edge.subscribe(key()).unwrap();
        pump(&mut edge, &mut origin);
        origin.reject(id, 404, "not here").unwrap();
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::SubscribeRejected {
                id,
                code: 404,
                reason: "not here".into()
            }]
        );
    }

    #[test]
    fn unsubscribe_crossing_done_is_harmless() {
        let (mut edge, mut origin) = pair();
        let id = edge.subscribe(key()).unwrap();
        pump(&mut edge, &mut origin);
        origin.accept(id, 5).unwrap();
        pump(&mut origin, &mut edge);
        edge.unsubscribe(id).unwrap();
        origin.done(id, 200, "ended").unwrap();
        // Both messages cross on the wire.
        let to_origin = edge.poll_transmit().unwrap();
        let to_edge = origin.poll_transmit().unwrap();
        assert_eq!(origin.handle_input(&to_origin).unwrap(), vec![]);
        assert_eq!(edge.handle_input(&to_edge).unwrap(), vec![]);
    }

    #[test]
    fn wrong_token_is_refused() {
        let mut d = ControlSession::dialer(info("x", PeerRole::Origin), "wrong");
        let mut a = ControlSession::acceptor(info("y", PeerRole::Origin), "right");
        let b = d.poll_transmit().unwrap();
        assert_eq!(a.handle_input(&b), Err(SessionError::Unauthorized));
        // The refusal is said on the wire before closing.
        let bye = a.poll_transmit().unwrap();
        assert!(matches!(
            d.handle_input(&bye),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn version_mismatch_is_refused() {
        let mut a = ControlSession::acceptor(info("y", PeerRole::Origin), "");
        let mut buf = BytesMut::new();
        ControlMessage::Hello {
            version: 99,
            node_id: "x".into(),
            role: PeerRole::Origin,
            region: "r".into(),
            token: "".into(),
        }
        .encode(&mut buf);
        assert_eq!(
            a.handle_input(&buf),
            Err(SessionError::Version {
                ours: VERSION,
                theirs: 99
            })
        );
    }

    #[test]
    fn messages_in_the_wrong_direction_or_state_are_errors() {
        let mut a = ControlSession::acceptor(info("y", PeerRole::Origin), "");
        let mut buf = BytesMut::new();
        ControlMessage::Subscribe {
            id: 1,
            stream: key(),
        }
        .encode(&mut buf);
        assert!(matches!(
            a.handle_input(&buf),
            Err(SessionError::Protocol(_))
        ));
        assert_eq!(a.handle_input(&[]), Err(SessionError::Closed));

        let (mut edge, _origin) = pair();
        let mut buf = BytesMut::new();
        ControlMessage::Subscribe {
            id: 1,
            stream: key(),
        }
        .encode(&mut buf);
        assert!(matches!(
            edge.handle_input(&buf),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn answer_for_unknown_subscription_is_an_error() {
        let (mut edge, _origin) = pair();
        let mut buf = BytesMut::new();
        ControlMessage::SubscribeOk { id: 42, session: 1 }.encode(&mut buf);
        assert!(matches!(
            edge.handle_input(&buf),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn reused_subscription_id_is_an_error() {
        let (mut edge, mut origin) = pair();
        edge.subscribe(key()).unwrap();
        let b = edge.poll_transmit().unwrap();
        origin.handle_input(&b).unwrap();
        assert!(matches!(
            origin.handle_input(&b),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn garbage_closes_the_session() {
        let mut a = ControlSession::acceptor(info("y", PeerRole::Origin), "");
        assert!(a.handle_input(&[0, 0, 0, 3, 0x55, 1, 2]).is_err());
    }
}
