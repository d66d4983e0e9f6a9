//! The backbone control session: a sans-IO state machine for one control stream.
//!
//! Bytes in ([`ControlSession::handle_input`]) → events out; calls (subscribe, announce, ...)
//! → bytes to send ([`ControlSession::poll_transmit`]). It runs the hello (version, and a
//! challenge-response proof of the shared token, [`super::auth`]: the token never travels),
//! checks which side may send which message, subscription ids, and whose node records a peer
//! may send; anything else is a [`SessionError`] that closes the connection. Before the hello
//! completes a peer may send only the hello messages, each at most
//! [`wire::HANDSHAKE_MESSAGE`] bytes. It never touches a socket, a clock or a random
//! generator (the caller passes the nonce in), so the tests below drive two sessions against
//! each other with exact bytes.
//!
//! Roles: the **dialer** opened the connection; it subscribes and receives announces. The
//! **acceptor** announces its local streams and sends media. A pair of origins that list each
//! other has one connection per direction, each used one way.
//!
//! Node records: the acceptor takes from the dialer only the dialer's own record (anyone
//! with the token may dial in, so a dialer vouches for itself alone). The dialer takes the
//! acceptor's own record and the records it passes on, since the dialer chose to dial it
//! (a configured upstream). A record naming the peer must carry the peer's hello role.

use std::collections::{HashMap, HashSet};

use bytes::{Bytes, BytesMut};

use super::auth::{self, ChannelBinding, ClusterKey, Handshake, Nonce};
use super::wire::{
    self, Announcement, ControlMessage, FrameDecoder, NodeRecord, WireError, VERSION,
};
use crate::config::Role;
use crate::media::StreamKey;

/// Who a node is, as said in the hello.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    pub node_id: String,
    pub role: Role,
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
    #[error("peer did not prove the cluster token (wrong backbone.token)")]
    Unauthorized,
    #[error("this node has no backbone.token: it authenticates nobody")]
    NoToken,
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
    /// A room-bus message (opaque here; `crate::rooms` reads it).
    Bus(bytes::Bytes),
    // Dialer side.
    Announced(Announcement),
    Withdrawn(StreamKey),
    /// Subscription `id` accepted; its media is on timeline `timeline`.
    SubscribeAccepted {
        id: u64,
        timeline: u64,
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
    /// Dialer: Hello sent, waiting for the Challenge. Acceptor: waiting for the Hello.
    AwaitingPeer,
    /// Dialer: Auth sent, waiting for the Welcome. Acceptor: Challenge sent, waiting for
    /// the Auth.
    AwaitingProof,
    Ready,
    Closed,
}

pub struct ControlSession {
    side: Side,
    local: PeerInfo,
    /// `None` without a token: every hello fails.
    key: Option<ClusterKey>,
    /// This side's nonce, and the peer's once known.
    nonce: Nonce,
    /// What both ends derive from the TLS session this control stream travels in.
    channel: ChannelBinding,
    peer_nonce: Nonce,
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
    /// The dialer's session; the hello is queued at once. `nonce` must be fresh random bytes
    /// (never reused: it is what makes the acceptor's proof unusable elsewhere); `channel`
    /// is the connection's TLS channel binding ([`auth::CHANNEL_BINDING_LABEL`]).
    pub fn dialer(
        local: PeerInfo,
        token: &str,
        nonce: Nonce,
        channel: ChannelBinding,
    ) -> ControlSession {
        let mut s = ControlSession::new(Side::Dialer, local, token, nonce, channel);
        let hello = ControlMessage::Hello {
            version: VERSION,
            node_id: s.local.node_id.clone(),
            role: s.local.role,
            region: s.local.region.clone(),
            nonce,
        };
        s.send(hello);
        s
    }

    /// The acceptor's session; `nonce` and `channel` as for [`Self::dialer`].
    pub fn acceptor(
        local: PeerInfo,
        token: &str,
        nonce: Nonce,
        channel: ChannelBinding,
    ) -> ControlSession {
        ControlSession::new(Side::Acceptor, local, token, nonce, channel)
    }

    fn new(
        side: Side,
        local: PeerInfo,
        token: &str,
        nonce: Nonce,
        channel: ChannelBinding,
    ) -> ControlSession {
        ControlSession {
            side,
            local,
            key: ClusterKey::new(token),
            nonce,
            channel,
            peer_nonce: [0; 32],
            state: State::AwaitingPeer,
            peer: None,
            decoder: FrameDecoder::with_limit(wire::HANDSHAKE_MESSAGE),
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
                Err(WireError::Version(theirs)) => {
                    self.state = State::Closed;
                    return Err(SessionError::Version {
                        ours: VERSION,
                        theirs,
                    });
                }
                Err(e) => {
                    self.state = State::Closed;
                    return Err(e.into());
                }
            }
        }
    }

    fn on_message(&mut self, msg: ControlMessage) -> Result<Option<SessionEvent>, SessionError> {
        use ControlMessage as M;
        if self.state != State::Ready {
            return self.on_handshake(msg);
        }
        let ev = match (self.side, msg) {
            (_, M::GoAway { reason }) => SessionEvent::GoAway(reason),
            (_, M::NodeState(records)) => {
                self.check_records(&records)?;
                SessionEvent::NodeState(records)
            }
            (_, M::Bus(bytes)) => SessionEvent::Bus(bytes),
            (Side::Dialer, M::Announce(a)) => SessionEvent::Announced(a),
            (Side::Dialer, M::Withdraw { stream }) => SessionEvent::Withdrawn(stream),
            (Side::Dialer, M::SubscribeOk { id, timeline }) => {
                let Some(stream) = self.take_requested(id)? else {
                    return Err(unknown(id));
                };
                self.active.insert(id, stream);
                SessionEvent::SubscribeAccepted { id, timeline }
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

    /// The hello exchange: Hello → Challenge → Auth → Welcome.
    fn on_handshake(&mut self, msg: ControlMessage) -> Result<Option<SessionEvent>, SessionError> {
        use ControlMessage as M;
        match (self.side, self.state, msg) {
            (
                Side::Acceptor,
                State::AwaitingPeer,
                M::Hello {
                    version,
                    node_id,
                    role,
                    region,
                    nonce,
                },
            ) => {
                check_version(version)?;
                if self.key.is_none() {
                    return Err(self.refuse(SessionError::NoToken));
                }
                self.peer = Some(PeerInfo {
                    node_id,
                    role,
                    region,
                });
                self.peer_nonce = nonce;
                self.state = State::AwaitingProof;
                self.send(M::Challenge {
                    version: VERSION,
                    node_id: self.local.node_id.clone(),
                    role: self.local.role,
                    region: self.local.region.clone(),
                    nonce: self.nonce,
                });
                Ok(None)
            }
            (
                Side::Dialer,
                State::AwaitingPeer,
                M::Challenge {
                    version,
                    node_id,
                    role,
                    region,
                    nonce,
                },
            ) => {
                check_version(version)?;
                self.peer = Some(PeerInfo {
                    node_id,
                    role,
                    region,
                });
                self.peer_nonce = nonce;
                let Some(proof) = self.prove() else {
                    return Err(self.refuse(SessionError::NoToken));
                };
                self.state = State::AwaitingProof;
                self.send(M::Auth { proof });
                Ok(None)
            }
            (Side::Acceptor, State::AwaitingProof, M::Auth { proof })
            | (Side::Dialer, State::AwaitingProof, M::Welcome { proof }) => {
                if !self.peer_proof_holds(&proof) {
                    return Err(self.refuse(SessionError::Unauthorized));
                }
                if self.side == Side::Acceptor {
                    let Some(proof) = self.prove() else {
                        return Err(self.refuse(SessionError::NoToken));
                    };
                    self.send(M::Welcome { proof });
                }
                self.state = State::Ready;
                self.decoder.set_limit(wire::MAX_CONTROL_MESSAGE);
                let peer = self.peer.clone().ok_or(SessionError::Closed)?;
                Ok(Some(SessionEvent::Ready(peer)))
            }
            (_, _, M::GoAway { reason }) if reason == UNAUTHORIZED => {
                Err(SessionError::Unauthorized)
            }
            (_, _, M::GoAway { reason }) => Err(SessionError::Protocol(format!(
                "peer refused the session: {reason}"
            ))),
            (_, _, other) => Err(SessionError::Protocol(format!(
                "{} before the hello completed",
                other.name()
            ))),
        }
    }

    /// What both hellos said; `None` before the peer's.
    fn handshake(&self) -> Option<Handshake<'_>> {
        let peer = self.peer.as_ref()?;
        Some(match self.side {
            Side::Dialer => Handshake {
                channel: &self.channel,
                dialer: &self.local,
                dialer_nonce: &self.nonce,
                acceptor: peer,
                acceptor_nonce: &self.peer_nonce,
            },
            Side::Acceptor => Handshake {
                channel: &self.channel,
                dialer: peer,
                dialer_nonce: &self.peer_nonce,
                acceptor: &self.local,
                acceptor_nonce: &self.nonce,
            },
        })
    }

    /// This side's proof; `None` without a token.
    fn prove(&self) -> Option<auth::Proof> {
        Some(self.key.as_ref()?.prove(self.side, &self.handshake()?))
    }

    fn peer_proof_holds(&self, proof: &auth::Proof) -> bool {
        let peer_side = match self.side {
            Side::Dialer => Side::Acceptor,
            Side::Acceptor => Side::Dialer,
        };
        match (&self.key, self.handshake()) {
            (Some(key), Some(h)) => key.verify(peer_side, &h, proof),
            _ => false,
        }
    }

    /// Says "unauthorized" on the wire (the peer logs why) and closes.
    fn refuse(&mut self, e: SessionError) -> SessionError {
        self.send(ControlMessage::GoAway {
            reason: UNAUTHORIZED.into(),
        });
        e
    }

    /// The node-record rule (see the module doc): a dialer describes itself only; a record
    /// naming the peer carries its hello role.
    fn check_records(&self, records: &[NodeRecord]) -> Result<(), SessionError> {
        let Some(peer) = &self.peer else {
            return Err(SessionError::Closed);
        };
        for r in records {
            if r.node == peer.node_id {
                if r.role != peer.role {
                    return Err(SessionError::Protocol(format!(
                        "node record of {} says {:?}, its hello {:?}",
                        peer.node_id, r.role, peer.role
                    )));
                }
            } else if self.side == Side::Acceptor {
                return Err(SessionError::Protocol(format!(
                    "node record about {:?} from {}: a dialer may only describe itself",
                    r.node, peer.node_id
                )));
            }
        }
        Ok(())
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
            State::AwaitingPeer | State::AwaitingProof => {
                Err(SessionError::Protocol("session not ready".into()))
            }
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
    pub fn accept(&mut self, id: u64, timeline: u64) -> Result<bool, SessionError> {
        self.require(Side::Acceptor)?;
        if self.active.contains_key(&id) {
            self.send(ControlMessage::SubscribeOk { id, timeline });
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

    /// Sends a room-bus message (either side, once the session is up).
    pub fn bus(&mut self, bytes: bytes::Bytes) {
        if self.state == State::Ready {
            self.send(ControlMessage::Bus(bytes));
        }
    }

    pub fn go_away(&mut self, reason: &str) {
        self.send(ControlMessage::GoAway {
            reason: reason.into(),
        });
        self.state = State::Closed;
    }
}

/// The GoAway reason of a failed proof.
const UNAUTHORIZED: &str = "unauthorized";

fn check_version(theirs: u16) -> Result<(), SessionError> {
    // The codec refuses other versions already; kept for a caller building messages itself.
    if theirs != VERSION {
        return Err(SessionError::Version {
            ours: VERSION,
            theirs,
        });
    }
    Ok(())
}

fn unknown(id: u64) -> SessionError {
    SessionError::Protocol(format!("answer for unknown subscription {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "a-cluster-token-of-32-characters";

    fn info(id: &str, role: Role) -> PeerInfo {
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

    /// Moves pending bytes from `from` to `to`, returning `to`'s result.
    fn try_pump(
        from: &mut ControlSession,
        to: &mut ControlSession,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        let b = from.poll_transmit().expect("something to send");
        to.handle_input(&b)
    }

    fn edge(token: &str) -> ControlSession {
        ControlSession::dialer(info("edge-1", Role::Edge), token, [1; 32], [0; 32])
    }

    fn origin(token: &str) -> ControlSession {
        ControlSession::acceptor(info("origin-a", Role::Origin), token, [2; 32], [0; 32])
    }

    /// Hello → Challenge → Auth → Welcome.
    fn pair() -> (ControlSession, ControlSession) {
        let (mut edge, mut origin) = (edge(TOKEN), origin(TOKEN));
        assert_eq!(pump(&mut edge, &mut origin), vec![], "hello: a challenge");
        assert_eq!(pump(&mut origin, &mut edge), vec![], "challenge: a proof");
        assert!(!edge.is_ready() && !origin.is_ready());
        assert_eq!(
            pump(&mut edge, &mut origin),
            vec![SessionEvent::Ready(info("edge-1", Role::Edge))]
        );
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::Ready(info("origin-a", Role::Origin))]
        );
        (edge, origin)
    }

    #[test]
    fn hello_is_the_exact_first_bytes_and_carries_no_token() {
        let mut d = ControlSession::dialer(info("a", Role::Origin), "k", [9; 32], [0; 32]);
        let bytes = d.poll_transmit().unwrap();
        let mut expected = vec![0, 0, 0, 43, 1, 0, 7, 0, 1, b'a', 1, 0, 2, b'e', b'u'];
        expected.extend([9; 32]);
        assert_eq!(&bytes[..], &expected[..]);
    }

    #[test]
    fn the_right_token_is_proven_both_ways_without_being_sent() {
        let (mut edge, mut origin) = (edge(TOKEN), origin(TOKEN));
        let mut wire = Vec::new();
        for _ in 0..2 {
            let b = edge.poll_transmit().unwrap();
            wire.extend_from_slice(&b);
            origin.handle_input(&b).unwrap();
            let b = origin.poll_transmit().unwrap();
            wire.extend_from_slice(&b);
            edge.handle_input(&b).unwrap();
        }
        assert!(edge.is_ready() && origin.is_ready());
        assert!(!wire.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()));
    }

    #[test]
    fn a_wrong_token_is_unauthorized_on_both_sides() {
        let (mut d, mut a) = (edge("a-wrong-token-of-some-length"), origin(TOKEN));
        pump(&mut d, &mut a);
        pump(&mut a, &mut d);
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::Unauthorized));
        assert!(!a.is_ready());
        // The refusal is said on the wire before closing, and the dialer names it.
        assert_eq!(try_pump(&mut a, &mut d), Err(SessionError::Unauthorized));
        assert!(!d.is_ready());
    }

    #[test]
    fn an_acceptor_with_the_wrong_token_is_unauthorized_for_the_dialer() {
        let (mut d, mut a) = (edge(TOKEN), origin("a-wrong-token-of-some-length"));
        pump(&mut d, &mut a);
        pump(&mut a, &mut d);
        // The acceptor cannot tell the dialer is right; the dialer finds the acceptor wrong.
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::Unauthorized));
        let (mut d, mut a) = (edge(TOKEN), origin("a-wrong-token-of-some-length"));
        pump(&mut d, &mut a);
        pump(&mut a, &mut d);
        let _auth = d.poll_transmit().unwrap();
        // A forged welcome (the acceptor skipping its check) still fails at the dialer.
        let mut forged = BytesMut::new();
        ControlMessage::Welcome { proof: [0; 32] }.encode(&mut forged);
        assert_eq!(d.handle_input(&forged), Err(SessionError::Unauthorized));
    }

    #[test]
    fn an_empty_token_never_authenticates() {
        // Both sides empty: HMAC with an empty key would match; it must not be computed.
        let (mut d, mut a) = (edge(""), origin(""));
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::NoToken));
        assert_eq!(try_pump(&mut a, &mut d), Err(SessionError::Unauthorized));
        // An acceptor without a token refuses a dialer with one.
        let (mut d, mut a) = (edge(TOKEN), origin(""));
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::NoToken));
        // A dialer without a token answers no challenge.
        let (mut d, mut a) = (edge(""), origin(TOKEN));
        pump(&mut d, &mut a);
        assert_eq!(try_pump(&mut a, &mut d), Err(SessionError::NoToken));
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::Unauthorized));
    }

    #[test]
    fn a_replayed_or_reflected_proof_is_refused() {
        // Record a good session's Auth.
        let (mut d, mut a) = (edge(TOKEN), origin(TOKEN));
        pump(&mut d, &mut a);
        pump(&mut a, &mut d);
        let recorded_auth = d.poll_transmit().unwrap();
        a.handle_input(&recorded_auth).unwrap();
        let recorded_welcome = a.poll_transmit().unwrap();
        // Replayed into a session with a fresh acceptor nonce: refused.
        let mut replayer = edge(TOKEN);
        let mut a2 =
            ControlSession::acceptor(info("origin-a", Role::Origin), TOKEN, [3; 32], [0; 32]);
        pump(&mut replayer, &mut a2);
        let _ = a2.poll_transmit();
        assert_eq!(
            a2.handle_input(&recorded_auth),
            Err(SessionError::Unauthorized)
        );
        // A rogue acceptor replaying a recorded welcome to a dialer with a fresh nonce.
        let mut d2 = ControlSession::dialer(info("edge-1", Role::Edge), TOKEN, [4; 32], [0; 32]);
        let mut rogue = origin("not-the-token-at-all");
        pump(&mut d2, &mut rogue);
        pump(&mut rogue, &mut d2);
        assert_eq!(
            d2.handle_input(&recorded_welcome),
            Err(SessionError::Unauthorized)
        );
        // Reflection: the acceptor's own Welcome proof sent back as an Auth.
        let (mut d3, mut a3) = (edge(TOKEN), origin(TOKEN));
        pump(&mut d3, &mut a3);
        let challenge = a3.poll_transmit().unwrap();
        d3.handle_input(&challenge).unwrap();
        let hs = a3.handshake().unwrap();
        let acceptor_proof = ClusterKey::new(TOKEN).unwrap().prove(Side::Acceptor, &hs);
        let mut reflected = BytesMut::new();
        ControlMessage::Auth {
            proof: acceptor_proof,
        }
        .encode(&mut reflected);
        assert_eq!(a3.handle_input(&reflected), Err(SessionError::Unauthorized));
    }

    #[test]
    fn proofs_from_another_tls_session_are_refused() {
        // A man-in-the-middle terminating TLS toward each side relays the hello messages:
        // each side's channel binding differs, so neither proof holds.
        let mut d = ControlSession::dialer(info("edge-1", Role::Edge), TOKEN, [1; 32], [7; 32]);
        let mut a = origin(TOKEN);
        pump(&mut d, &mut a);
        pump(&mut a, &mut d);
        assert_eq!(try_pump(&mut d, &mut a), Err(SessionError::Unauthorized));
    }

    #[test]
    fn nothing_but_the_hello_and_nothing_large_passes_before_it_completes() {
        // A frame announced above the handshake limit is refused from its length prefix.
        let mut a = origin(TOKEN);
        let big = (wire::HANDSHAKE_MESSAGE as u32 + 1).to_be_bytes();
        assert!(matches!(
            a.handle_input(&big),
            Err(SessionError::Wire(WireError::TooLarge(_)))
        ));
        // A node state before the proof: refused, not recorded.
        let (mut d, mut a) = (edge(TOKEN), origin(TOKEN));
        pump(&mut d, &mut a);
        let mut buf = BytesMut::new();
        ControlMessage::NodeState(vec![]).encode(&mut buf);
        assert!(matches!(
            a.handle_input(&buf),
            Err(SessionError::Protocol(_))
        ));
        // A second hello instead of the proof.
        let (mut d, mut a) = (edge(TOKEN), origin(TOKEN));
        let hello = d.poll_transmit().unwrap();
        a.handle_input(&hello).unwrap();
        assert!(matches!(
            a.handle_input(&hello),
            Err(SessionError::Protocol(_))
        ));
    }

    fn record(node: &str, role: Role) -> NodeRecord {
        NodeRecord::idle(node, role, "eu", "http://x", "rtmp://x", 1)
    }

    #[test]
    fn a_dialer_may_only_describe_itself() {
        let (mut edge, mut origin) = pair();
        let own = record("edge-1", Role::Edge);
        edge.node_state(vec![own.clone()]);
        assert_eq!(
            pump(&mut edge, &mut origin),
            vec![SessionEvent::NodeState(vec![own.clone()])]
        );
        edge.node_state(vec![own, record("edge-2", Role::Edge)]);
        let err = try_pump(&mut edge, &mut origin).unwrap_err();
        assert!(
            matches!(&err, SessionError::Protocol(m) if m.contains("edge-2")),
            "{err}"
        );
        // Its own record under another role than its hello's.
        let (mut edge, mut origin) = pair();
        edge.node_state(vec![record("edge-1", Role::Origin)]);
        assert!(try_pump(&mut edge, &mut origin).is_err());
    }

    #[test]
    fn the_acceptor_passes_on_records_to_the_dialer_that_chose_it() {
        let (mut edge, mut origin) = pair();
        let records = vec![
            record("origin-a", Role::Origin),
            record("edge-9", Role::Edge),
            record("origin-b", Role::Origin),
        ];
        origin.node_state(records.clone());
        assert_eq!(
            pump(&mut origin, &mut edge),
            vec![SessionEvent::NodeState(records)]
        );
        origin.node_state(vec![record("origin-a", Role::Edge)]);
        assert!(try_pump(&mut origin, &mut edge).is_err(), "role != hello");
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
            vec![SessionEvent::SubscribeAccepted { id, timeline: 5 }]
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
            timeline: 5,
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
    fn version_mismatch_is_refused() {
        let mut a = origin(TOKEN);
        let mut buf = BytesMut::new();
        ControlMessage::Hello {
            version: 99,
            node_id: "x".into(),
            role: Role::Origin,
            region: "r".into(),
            nonce: [0; 32],
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
        let mut a = ControlSession::acceptor(info("y", Role::Origin), TOKEN, [2; 32], [0; 32]);
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
        ControlMessage::SubscribeOk {
            id: 42,
            timeline: 1,
        }
        .encode(&mut buf);
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
        let mut a = origin(TOKEN);
        assert!(a.handle_input(&[0, 0, 0, 3, 0x55, 1, 2]).is_err());
    }
}
