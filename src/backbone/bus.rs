//! The room bus: small messages between linked nodes for `crate::rooms`, carried on each
//! link's control stream (`Bus`, opaque here). Each live link, dialed or accepted, has a
//! bounded queue of bus messages toward its peer; the backbone tells the handler that
//! `node` installed what arrives and when a peer node becomes reachable or unreachable
//! (its first link up, its last link down). What the messages mean, and who forwards what
//! to whom, is the rooms' business.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::session::PeerInfo;
use super::Backbone;
use crate::config::Role;

/// Bus messages queued toward one link at most; more are dropped (the rooms resend their
/// state every second, so a dropped state heals; a dropped data message is lost).
pub(super) const BUS_QUEUE: usize = 1024;

/// What the backbone tells the rooms.
pub trait BusHandler: Send + Sync {
    /// A bus message from `node` (a direct peer).
    fn on_message(&self, node: &str, role: Role, bytes: Bytes);
    /// `node` became reachable (`up`) or unreachable over direct links.
    fn on_peer(&self, node: &str, role: Role, up: bool);
}

struct BusLink {
    node: String,
    role: Role,
    dialed: bool,
    tx: mpsc::Sender<Bytes>,
}

/// The live links' bus queues, by link id.
#[derive(Default)]
pub(super) struct BusLinks {
    links: HashMap<usize, BusLink>,
    handler: Option<Arc<dyn BusHandler>>,
}

impl Backbone {
    /// Installs the handler of bus messages and peer changes (the rooms).
    pub fn set_bus_handler(&self, handler: Arc<dyn BusHandler>) {
        self.bus.lock().handler = Some(handler);
    }

    /// Queues `bytes` toward `node` over one live link to it (one this node dialed
    /// first). `false` if there is none or its queue is full.
    pub fn bus_send(&self, node: &str, bytes: Bytes) -> bool {
        let bus = self.bus.lock();
        let mut links: Vec<&BusLink> = bus.links.values().filter(|l| l.node == node).collect();
        links.sort_by_key(|l| !l.dialed);
        links.first().is_some_and(|l| l.tx.try_send(bytes).is_ok())
    }

    /// The nodes reachable over direct links, with their roles.
    pub fn bus_peers(&self) -> Vec<(String, Role)> {
        let bus = self.bus.lock();
        let mut peers: Vec<(String, Role)> = bus
            .links
            .values()
            .map(|l| (l.node.clone(), l.role))
            .collect();
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        peers.dedup_by(|a, b| a.0 == b.0);
        peers
    }

    /// A link is up: its queue of bus messages, to send on its control stream.
    pub(super) fn bus_attach(
        &self,
        link_id: usize,
        peer: &PeerInfo,
        dialed: bool,
    ) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(BUS_QUEUE);
        let mut bus = self.bus.lock();
        let first = !bus.links.values().any(|l| l.node == peer.node_id);
        bus.links.insert(
            link_id,
            BusLink {
                node: peer.node_id.clone(),
                role: peer.role,
                dialed,
                tx,
            },
        );
        let handler = bus.handler.clone();
        drop(bus);
        if let (true, Some(h)) = (first, handler) {
            h.on_peer(&peer.node_id, peer.role, true);
        }
        rx
    }

    /// A link is down.
    pub(super) fn bus_detach(&self, link_id: usize, peer: &PeerInfo) {
        let mut bus = self.bus.lock();
        bus.links.remove(&link_id);
        let last = !bus.links.values().any(|l| l.node == peer.node_id);
        let handler = bus.handler.clone();
        drop(bus);
        if let (true, Some(h)) = (last, handler) {
            h.on_peer(&peer.node_id, peer.role, false);
        }
    }

    /// A bus message arrived from `peer`.
    pub(super) fn bus_received(&self, peer: &PeerInfo, bytes: Bytes) {
        let handler = self.bus.lock().handler.clone();
        if let Some(h) = handler {
            h.on_message(&peer.node_id, peer.role, bytes);
        }
    }
}
