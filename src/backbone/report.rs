//! This node's record and the gossip of node records: what this node tells its peers
//! about itself every second, and what it takes from and passes on to them (the rules are
//! in `nodes.rs` and `session.rs`). The load figures in the record come from above
//! ([`LoadProbe`]); the backbone only carries them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::nodes::{self, NODE_STATE_INTERVAL};
use super::session::PeerInfo;
use super::wire::{self, NodeRecord};
use super::Backbone;
use crate::config::Role;

/// This node's load as its record reports it (measured above the backbone, by
/// `cluster::load`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Players attached now (every consumer protocol; not other nodes' pulls).
    pub viewers: u32,
    /// 0-1000: the larger of viewers against the node's maximum and CPU use.
    pub load_permille: u16,
    /// Egresses running.
    pub egress: u32,
    /// Bits per second sent to viewers, downstream nodes and egress.
    pub out_bps: u64,
}

/// Measures this node's load when its record is refreshed (every [`NODE_STATE_INTERVAL`]).
pub type LoadProbe = Box<dyn FnMut(Instant) -> NodeLoad + Send>;

impl Backbone {
    /// Records the session let through (see `session` for whose records each side takes).
    pub(super) fn on_node_state(&self, peer: &PeerInfo, link_id: usize, records: Vec<NodeRecord>) {
        self.nodes
            .lock()
            .update(records, &peer.node_id, link_id, Instant::now());
    }

    /// The node records to send to a peer of `role`: this node's, then (origins only, and
    /// only on links the peer dialed: `pass_on`) what it passes on
    /// ([`NodeTable::to_pass_on`]).
    pub(super) fn records_for(&self, role: Role, pass_on: bool) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        if pass_on && self.local.role.is_origin() {
            out.extend(self.nodes.lock().to_pass_on(role, Instant::now()));
        }
        let dropped = nodes::fit_streams(&mut out, nodes::STATE_STREAM_BYTES);
        if dropped > 0 {
            debug!(dropped, "node state: stream lists over budget left out");
        }
        out
    }

    /// Every live node record this node knows, its own included.
    pub fn node_records(&self) -> Vec<NodeRecord> {
        let mut out = vec![self.me_record.lock().clone()];
        out.extend(self.nodes.lock().fresh(Instant::now()));
        out
    }

    /// Refreshes this node's own record every [`NODE_STATE_INTERVAL`]: its load (from
    /// `load`), measured link RTTs, the streams it holds and which upstream serves them.
    pub(super) async fn state_loop(self: Arc<Self>, mut load: LoadProbe) {
        let mut tick = tokio::time::interval(NODE_STATE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let figures = load(Instant::now());
            let streams = self.hub.list();
            let mut links: Vec<(String, u32, u16)> = self
                .links()
                .into_iter()
                .map(|l| {
                    let loss = (l.loss * 1000.0).round().clamp(0.0, 1000.0) as u16;
                    (l.node, (l.rtt_ms * 1000.0) as u32, loss)
                })
                .collect();
            links.sort();
            links.dedup_by(|a, b| a.0 == b.0);
            let mut pulls: HashMap<String, u32> = HashMap::new();
            for s in &streams {
                if let crate::hub::Source::Relay { node } = &s.source {
                    *pulls.entry(node.clone()).or_default() += 1;
                }
            }
            let mut pulls: Vec<(String, u32)> = pulls.into_iter().collect();
            pulls.sort();
            let mut me = self.me_record.lock();
            me.viewers = figures.viewers;
            me.egress = figures.egress;
            me.out_bps = figures.out_bps;
            me.load_permille = figures.load_permille;
            me.pulls = pulls;
            me.links = links;
            me.streams = streams
                .into_iter()
                // Derived streams (audio bridges) are local views, not names on the wire.
                .filter(|s| !matches!(s.source, crate::hub::Source::Bridge { .. }))
                .map(|s| s.stream)
                .take(wire::MAX_RECORD_ITEMS)
                .collect();
        }
    }
}
