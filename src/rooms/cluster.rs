//! Rooms across the cluster: what nodes tell each other over the backbone's room bus.
//!
//! * **Room records** go everywhere: a node sends each room it creates to its peers, and
//!   all it knows to a peer that comes up. A closed room's id is sent too, and remembered.
//! * **Slices**: each node sends its own slice of a room whenever it changes and every
//!   [`REFRESH`]; a slice not refreshed within [`SLICE_TTL`] is forgotten (its node died
//!   or lost its links), and its participants leave with reason `lost`.
//! * **Data**: a broadcast goes wherever the room has participants; a whisper goes toward
//!   the node serving its target, and only that node delivers it, to that participant.
//!
//! Who passes what on: origins are fully meshed and edges hang off origins, so an origin
//! passes what an edge sent to every other peer, and what another origin sent to its
//! edges; edges pass nothing on. A message reaches every node in at most origin → origin
//! → edge, never loops, and an edge linked to several origins may hear a message twice:
//! slices carry their owner's stamp (a copy is a no-op) and data an id (a copy is dropped).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::state::{valid_identity, valid_room_id, RoomInfo, SliceUpdate, MAX_SLICE_ITEMS};
use super::{Event, Outgoing, Rooms};
use crate::backbone::{Backbone, BusHandler};
use crate::config::Role;

/// How often a node sends its slices again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A slice not refreshed for this long is forgotten.
pub const SLICE_TTL: Duration = Duration::from_secs(3);
/// Data message ids remembered to drop copies.
const SEEN_IDS: usize = 8192;

/// A room-bus message (JSON on the wire).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum BusMsg {
    Room {
        info: RoomInfo,
    },
    Closed {
        room: String,
    },
    Slice(SliceUpdate),
    Data {
        room: String,
        from: String,
        to: Option<String>,
        payload: serde_json::Value,
        /// The sending node and its count: unique, to drop copies.
        id: (String, u64),
    },
}

/// A data message's id: the sending node and its count.
type DataId = (String, u64);
/// Data ids seen lately, and their order (the oldest is forgotten first).
type Seen = (HashSet<DataId>, VecDeque<DataId>);

/// The cluster side of [`Rooms`]: the backbone, this node's role, copies seen.
pub(super) struct Cluster {
    pub(super) backbone: Arc<Backbone>,
    pub(super) role: Role,
    seen: parking_lot::Mutex<Seen>,
}

impl Cluster {
    pub(super) fn new(backbone: Arc<Backbone>, role: Role) -> Cluster {
        Cluster {
            backbone,
            role,
            seen: Default::default(),
        }
    }

    /// `true` the first time an id is seen.
    fn first_sight(&self, id: &(String, u64)) -> bool {
        let mut seen = self.seen.lock();
        if !seen.0.insert(id.clone()) {
            return false;
        }
        seen.1.push_back(id.clone());
        if seen.1.len() > SEEN_IDS {
            if let Some(old) = seen.1.pop_front() {
                seen.0.remove(&old);
            }
        }
        true
    }

    fn send(&self, node: &str, msg: &BusMsg) {
        if let Ok(bytes) = serde_json::to_vec(msg) {
            if !self.backbone.bus_send(node, Bytes::from(bytes)) {
                debug!(%node, "room bus: message dropped (no link or queue full)");
            }
        }
    }

    /// To every peer.
    pub(super) fn broadcast(&self, msg: &BusMsg) {
        for (node, _) in self.backbone.bus_peers() {
            self.send(&node, msg);
        }
    }

    /// Passes on what `from` (of `role`) sent: an origin passes an edge's to every other
    /// peer and another origin's to its edges; an edge passes nothing on.
    fn pass_on(&self, from: &str, from_role: Role, msg: &BusMsg) {
        if !self.role.is_origin() {
            return;
        }
        for (node, role) in self.backbone.bus_peers() {
            if node == from {
                continue;
            }
            if from_role.is_origin() && role.is_origin() {
                continue;
            }
            self.send(&node, msg);
        }
    }
}

/// The bus handler the backbone calls (holds the rooms weakly: the rooms own the cluster).
pub(super) struct Handler(pub(super) Weak<Rooms>);

impl BusHandler for Handler {
    fn on_message(&self, node: &str, role: Role, bytes: Bytes) {
        if let Some(rooms) = self.0.upgrade() {
            rooms.on_bus(node, role, &bytes);
        }
    }

    fn on_peer(&self, node: &str, _role: Role, up: bool) {
        if let (true, Some(rooms)) = (up, self.0.upgrade()) {
            rooms.send_state_to(node);
        }
    }
}

/// Whether a peer's slice is within bounds and names valid participants and streams.
pub fn valid_slice(s: &SliceUpdate) -> bool {
    valid_room_id(&s.room)
        && s.participants.len() <= MAX_SLICE_ITEMS
        && s.tracks.len() <= MAX_SLICE_ITEMS
        && s.participants
            .iter()
            .all(|p| valid_identity(&p.identity) && p.name.len() <= 256 && p.node == s.node)
        && s.tracks.iter().all(|t| {
            t.stream
                .strip_prefix("room/")
                .and_then(|n| n.split_once('.'))
                .is_some_and(|(r, i)| r == s.room && valid_identity(i))
        })
}

impl Rooms {
    /// Joins the room bus of `backbone` (this node being `role`).
    pub fn attach(self: &Arc<Self>, backbone: Arc<Backbone>, role: Role) {
        backbone.set_bus_handler(Arc::new(Handler(Arc::downgrade(self))));
        let _ = self.cluster.set(Cluster::new(backbone, role));
    }

    /// A peer came up: every room record, then this node's slices.
    fn send_state_to(&self, node: &str) {
        let Some(c) = self.cluster.get() else { return };
        let (infos, slices) = {
            let t = self.table.lock();
            (t.infos(), t.my_slices())
        };
        for info in infos {
            c.send(node, &BusMsg::Room { info });
        }
        for s in slices {
            c.send(node, &BusMsg::Slice(s));
        }
    }

    /// Tells the cluster about a room made here.
    pub(super) fn announce_room(&self, info: &RoomInfo) {
        if let Some(c) = self.cluster.get() {
            c.broadcast(&BusMsg::Room { info: info.clone() });
        }
    }

    pub(super) fn announce_closed(&self, room: &str) {
        if let Some(c) = self.cluster.get() {
            c.broadcast(&BusMsg::Closed {
                room: room.to_string(),
            });
        }
    }

    /// Sends this node's slice of `room` after a change.
    pub(super) fn announce_slice(&self, slice: SliceUpdate) {
        if let Some(c) = self.cluster.get() {
            c.broadcast(&BusMsg::Slice(slice));
        }
    }

    /// Every [`REFRESH`]: this node's slices again.
    pub(super) fn refresh_slices(&self) {
        let Some(c) = self.cluster.get() else { return };
        let slices = self.table.lock().my_slices();
        for s in slices {
            c.broadcast(&BusMsg::Slice(s));
        }
    }

    /// A data message from a participant here, for participants on other nodes: a
    /// broadcast to every peer, a whisper toward its target's node only.
    pub(super) fn data_out(
        &self,
        room: &str,
        from: &str,
        to: Option<(&str, &str)>,
        payload: &serde_json::Value,
    ) {
        let Some(c) = self.cluster.get() else { return };
        let n = self
            .data_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let msg = BusMsg::Data {
            room: room.to_string(),
            from: from.to_string(),
            to: to.map(|(identity, _)| identity.to_string()),
            payload: payload.clone(),
            id: (self.me.clone(), n),
        };
        c.first_sight(&(self.me.clone(), n));
        match to {
            None => c.broadcast(&msg),
            Some((_, node)) => self.whisper_toward(c, node, None, &msg),
        }
    }

    /// Sends a whisper to `node` directly if it is a peer, else to the origins (an edge:
    /// its origins; an origin: the other origins, when the whisper came from an edge or
    /// from here).
    fn whisper_toward(&self, c: &Cluster, node: &str, from: Option<(&str, Role)>, msg: &BusMsg) {
        let peers = c.backbone.bus_peers();
        if peers.iter().any(|(n, _)| n == node) {
            c.send(node, msg);
            return;
        }
        if from.is_some_and(|(_, r)| r.is_origin()) {
            return;
        }
        for (n, role) in peers {
            if role.is_origin() && from.is_none_or(|(f, _)| f != n) {
                c.send(&n, msg);
            }
        }
    }

    fn on_bus(&self, from: &str, role: Role, bytes: &[u8]) {
        let Some(c) = self.cluster.get() else { return };
        let msg: BusMsg = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                debug!(node = %from, "room bus: malformed message dropped: {e}");
                return;
            }
        };
        let now = Instant::now();
        match &msg {
            BusMsg::Room { info } => {
                if !valid_room_id(&info.id) {
                    return;
                }
                if self.table.lock().learn_room(info.clone(), now) {
                    c.pass_on(from, role, &msg);
                }
            }
            BusMsg::Closed { room } => {
                if self.close_here(room, "the room was closed") {
                    c.pass_on(from, role, &msg);
                }
            }
            BusMsg::Slice(update) => {
                if !valid_slice(update) {
                    debug!(node = %from, "room bus: invalid slice dropped");
                    return;
                }
                let mut table = self.table.lock();
                let Some(events) = table.apply_slice(update.clone(), now + SLICE_TTL, now) else {
                    return;
                };
                self.deliver(&update.room, &events);
                self.close_replaced(&table, &update.room);
                drop(table);
                c.pass_on(from, role, &msg);
            }
            BusMsg::Data {
                room,
                from: sender,
                to,
                payload,
                id,
            } => {
                if !c.first_sight(id) {
                    return;
                }
                let table = self.table.lock();
                match to {
                    None => {
                        let event = Event::Data {
                            from: sender.clone(),
                            whisper: false,
                            payload: payload.clone(),
                        };
                        self.deliver_data(room, &event, None, Some(sender));
                        drop(table);
                        c.pass_on(from, role, &msg);
                    }
                    Some(target) => {
                        let node = table
                            .member(room, target)
                            .map(|m| m.participant.node.clone());
                        drop(table);
                        match node {
                            Some(n) if n == self.me => {
                                let event = Event::Data {
                                    from: sender.clone(),
                                    whisper: true,
                                    payload: payload.clone(),
                                };
                                self.deliver_data(room, &event, Some(target), None);
                            }
                            Some(n) => self.whisper_toward(c, &n, Some((from, role)), &msg),
                            None => {}
                        }
                    }
                }
            }
        }
    }

    /// A participant here whose identity joined again elsewhere, more recently, is closed.
    fn close_replaced(&self, table: &super::state::RoomTable, room: &str) {
        let local = self.local.lock();
        let Some(members) = local.get(room) else {
            return;
        };
        for (identity, l) in members {
            if table
                .member(room, identity)
                .is_some_and(|m| m.participant.session != l.session)
            {
                let _ = l.tx.try_send(Outgoing::Close(
                    super::close::REPLACED,
                    "the same identity joined again elsewhere".into(),
                ));
            }
        }
    }
}
